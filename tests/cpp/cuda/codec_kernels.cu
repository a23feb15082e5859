// tests/cpp/cuda/codec_kernels.cu — test kernels over the device codec (src/cuda/common/
// codec.cuh) and their host wrappers (codec_kernels.h). One thread per input; the two sweeps
// count mismatches on the device (2^32 and 2^30 inputs are too many to copy back).
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "codec_kernels.h"
#include "cuda/common/codec.cuh"

namespace attnqat::cuda_test {
namespace {


constexpr int kThreads = 256;
constexpr int kMaxExamples = 16;

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string(what) + ": " + cudaGetErrorName(err) + " (" +
                             cudaGetErrorString(err) + ")");
}

// A device array that frees itself.
template <typename T>
class DeviceArray {
 public:
  explicit DeviceArray(size_t n) : n_(n) {
    if (n_) check(cudaMalloc(&ptr_, n_ * sizeof(T)), "cudaMalloc");
  }
  explicit DeviceArray(const std::vector<T>& host) : DeviceArray(host.size()) {
    if (n_) check(cudaMemcpy(ptr_, host.data(), n_ * sizeof(T), cudaMemcpyHostToDevice), "upload");
  }
  ~DeviceArray() { cudaFree(ptr_); }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  T* get() const { return ptr_; }
  std::vector<T> download() const {
    std::vector<T> host(n_);
    if (n_) check(cudaMemcpy(host.data(), ptr_, n_ * sizeof(T), cudaMemcpyDeviceToHost), "download");
    return host;
  }

 private:
  T* ptr_ = nullptr;
  size_t n_ = 0;
};

int blocks_for(size_t n) { return static_cast<int>((n + kThreads - 1) / kThreads); }

void finish(const char* kernel) {
  check(cudaGetLastError(), kernel);
  check(cudaDeviceSynchronize(), kernel);
}

// ---- the spec table of numerics section 1, transcribed literally ------------------------------

__device__ uint32_t spec_e2m1_code(float y) {
  const float a = fabsf(y);
  uint32_t mag;
  if (a <= 0.25f) mag = 0;
  else if (a < 0.75f) mag = 1;
  else if (a <= 1.25f) mag = 2;
  else if (a < 1.75f) mag = 3;
  else if (a <= 2.5f) mag = 4;
  else if (a < 3.5f) mag = 5;
  else if (a <= 5.0f) mag = 6;
  else mag = 7;
  if (mag == 0) return 0;
  return mag | (signbit(y) ? 0x8u : 0x0u);
}

__device__ float spec_e2m1_value(uint32_t code) {
  float v;
  switch (code & 0x7u) {
    case 0: v = 0.0f; break;
    case 1: v = 0.5f; break;
    case 2: v = 1.0f; break;
    case 3: v = 1.5f; break;
    case 4: v = 2.0f; break;
    case 5: v = 3.0f; break;
    case 6: v = 4.0f; break;
    default: v = 6.0f; break;
  }
  return (code & 0x8u) ? -v : v;
}

// ---- kernels ----------------------------------------------------------------------------------

__global__ void e2m1_kernel(const float* y, size_t n, float* round_sw, float* round,
                            float* round_abs_sw, float* round_abs, uint8_t* encode,
                            float* decode_of_encode) {
  const size_t i = static_cast<size_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= n) return;
  round_sw[i] = cuda::e2m1_round_sw(y[i]);
  round[i] = cuda::e2m1_round(y[i]);
  round_abs_sw[i] = cuda::e2m1_round_abs_sw(fabsf(y[i]));
  round_abs[i] = cuda::e2m1_round_abs(fabsf(y[i]));
  const uint32_t code = cuda::e2m1_encode(y[i]);
  encode[i] = static_cast<uint8_t>(code);
  decode_of_encode[i] = cuda::e2m1_decode(code);
}

__global__ void pack8_kernel(const float* y, size_t groups, uint32_t* packed_sw, uint32_t* packed) {
  const size_t i = static_cast<size_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= groups) return;
  float v[8];
#pragma unroll
  for (int k = 0; k < 8; ++k) v[k] = y[8 * i + k];
  packed_sw[i] = cuda::e2m1_pack8_sw(v);
  packed[i] = cuda::e2m1_pack8(v);
}

__global__ void spec_code_kernel(const float* y, size_t n, uint8_t* code) {
  const size_t i = static_cast<size_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i < n) code[i] = static_cast<uint8_t>(spec_e2m1_code(y[i]));
}

// Check bits of the sweep.
constexpr uint32_t kCheckRoundSw = 1, kCheckRound = 2, kCheckAbsSw = 4, kCheckAbs = 8,
                   kCheckEncode = 16, kCheckDecode = 32, kCheckPackSw = 64, kCheckPack = 128;

struct SweepCounters {
  unsigned long long checked;
  unsigned long long mismatches;
  unsigned int examples;
  uint32_t example_bits[kMaxExamples];
  uint32_t example_checks[kMaxExamples];
};

__global__ void e2m1_sweep_kernel(SweepCounters* out) {
  unsigned long long checked = 0, mismatches = 0;
  const uint64_t step = static_cast<uint64_t>(gridDim.x) * kThreads;
  for (uint64_t u = static_cast<uint64_t>(blockIdx.x) * kThreads + threadIdx.x; u < (1ull << 32);
       u += step) {
    const uint32_t bits = static_cast<uint32_t>(u);
    if ((bits & cuda::kExpMask) == cuda::kExpMask) continue;  // Inf / NaN: not E2M1 inputs
    const float y = __uint_as_float(bits);
    const uint32_t want_code = spec_e2m1_code(y);
    const float want = spec_e2m1_value(want_code);  // +0 for code 0
    const uint32_t want_bits = __float_as_uint(want);
    const uint32_t want_abs_bits = want_bits & ~cuda::kSignMask;
    uint32_t failed = 0;
    if (__float_as_uint(cuda::e2m1_round_sw(y)) != want_bits) failed |= kCheckRoundSw;
    if (__float_as_uint(cuda::e2m1_round(y)) != want_bits) failed |= kCheckRound;
    if (__float_as_uint(cuda::e2m1_round_abs_sw(fabsf(y))) != want_abs_bits) failed |= kCheckAbsSw;
    if (__float_as_uint(cuda::e2m1_round_abs(fabsf(y))) != want_abs_bits) failed |= kCheckAbs;
    if (cuda::e2m1_encode(y) != want_code) failed |= kCheckEncode;
    if (__float_as_uint(cuda::e2m1_decode(want_code)) != want_bits) failed |= kCheckDecode;
    // The packers, with y in the nibble chosen by the low bits of the pattern and a neighbour
    // that is a zero of the other sign (nibble interactions of the sign fix-up).
    const int pos = static_cast<int>(bits & 7u);
    float v[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) v[k] = (bits & 8u) ? -0.0f : 0.0f;
#pragma unroll
    for (int k = 0; k < 8; ++k)
      if (k == pos) v[k] = y;
    if (cuda::e2m1_pack8_sw(v) != (want_code << (4 * pos))) failed |= kCheckPackSw;
    if (cuda::e2m1_pack8(v) != (want_code << (4 * pos))) failed |= kCheckPack;
    ++checked;
    if (failed) {
      ++mismatches;
      const unsigned int slot = atomicAdd(&out->examples, 1u);
      if (slot < kMaxExamples) {
        out->example_bits[slot] = bits;
        out->example_checks[slot] = failed;
      }
    }
  }
  atomicAdd(&out->checked, checked);
  if (mismatches) atomicAdd(&out->mismatches, mismatches);
}

__global__ void e4m3_decode_kernel(const uint8_t* bytes, size_t n, float* out) {
  const size_t i = static_cast<size_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i < n) out[i] = cuda::e4m3_decode(bytes[i]);
}

__global__ void e4m3_encode_kernel(const float* t, size_t n, uint8_t* out) {
  const size_t i = static_cast<size_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i < n) out[i] = static_cast<uint8_t>(cuda::e4m3_encode(t[i]));
}

__global__ void e8m0_decode_kernel(const uint8_t* codes, size_t n, float* out) {
  const size_t i = static_cast<size_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i < n) out[i] = cuda::e8m0_decode(codes[i]);
}

__global__ void nv_scale_kernel(const float* amax, const float* g, size_t n, float* quotient,
                                float* quotient_fast, uint8_t* s_bits, float* inv) {
  const size_t i = static_cast<size_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= n) return;
  quotient[i] = cuda::nv_scale_quotient(amax[i], g[i]);
  const float six_g = cuda::mul_rn(6.0f, g[i]);
  quotient_fast[i] = cuda::nv_scale_quotient_fast(amax[i], six_g, cuda::rcp_rn(six_g));
  const cuda::NvBlockScale sc = cuda::nv_block_scale(amax[i], g[i]);
  s_bits[i] = static_cast<uint8_t>(sc.s_bits);
  inv[i] = sc.inv;
}

__global__ void rcp_kernel(const float* d, size_t n, float* ieee, float* fast) {
  const size_t i = static_cast<size_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= n) return;
  ieee[i] = cuda::rcp_rn(d[i]);
  fast[i] = cuda::rcp_rn_fast(d[i]);
}

struct QuotientCounters {
  unsigned long long checked;
  unsigned long long byte_mismatches;
  unsigned long long bit_mismatches;
  unsigned int examples;
  uint32_t example_bits[kMaxExamples];
};

constexpr uint32_t kOneBits = 0x3F800000u;         // 1.0f
constexpr float kTwoM124 = 4.70197740328915e-38f;  // 2^-124

__global__ void quotient_sweep_kernel(float g, QuotientCounters* out) {
  const float six_g = cuda::mul_rn(6.0f, g);
  const float rcp_six_g = cuda::rcp_rn(six_g);
  unsigned long long checked = 0, bytes = 0, bits_off = 0;
  const uint32_t step = gridDim.x * kThreads;  // u + step stays far below 2^32: no wrap-around
  for (uint32_t u = blockIdx.x * kThreads + threadIdx.x; u <= kOneBits; u += step) {
    const float a = __uint_as_float(u);
    const float t = __fdiv_rn(a, six_g);
    const float t_fast = cuda::nv_scale_quotient_fast(a, six_g, rcp_six_g);
    const bool byte_off = cuda::e4m3_encode_nonneg(t) != cuda::e4m3_encode_nonneg(t_fast);
    const bool in_domain = a >= kTwoM124 && t >= cuda::kTwoM126;
    const bool bit_off = in_domain && __float_as_uint(t) != __float_as_uint(t_fast);
    ++checked;
    bytes += byte_off;
    bits_off += bit_off;
    if (byte_off || bit_off) {
      const unsigned int slot = atomicAdd(&out->examples, 1u);
      if (slot < kMaxExamples) out->example_bits[slot] = u;
    }
  }
  atomicAdd(&out->checked, checked);
  if (bytes) atomicAdd(&out->byte_mismatches, bytes);
  if (bits_off) atomicAdd(&out->bit_mismatches, bits_off);
}

__global__ void global_scale_kernel(const float* amax, size_t n, float* g) {
  const size_t i = static_cast<size_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i < n) g[i] = cuda::nvfp4_global_scale(amax[i]);
}

__global__ void global_scale_bits_kernel(const uint32_t* bits, size_t n, float* g) {
  const size_t i = static_cast<size_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i < n) g[i] = cuda::nvfp4_global_scale_from_bits(bits[i]);
}

__global__ void mx_scale_kernel(const float* amax, size_t n, uint8_t* code) {
  const size_t i = static_cast<size_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i < n) code[i] = static_cast<uint8_t>(cuda::mx_block_scale(amax[i]).code);
}

__global__ void hw_flag_kernel(int* flag) { *flag = ATTNQAT_HW_E2M1; }

}  // namespace

E2M1Results e2m1_on_device(const std::vector<float>& y) {
  const size_t n = y.size();
  DeviceArray<float> d_y(y), round_sw(n), round(n), abs_sw(n), abs(n), dec(n);
  DeviceArray<uint8_t> enc(n);
  if (n) {
    e2m1_kernel<<<blocks_for(n), kThreads>>>(d_y.get(), n, round_sw.get(), round.get(), abs_sw.get(),
                                             abs.get(), enc.get(), dec.get());
    finish("e2m1_kernel");
  }
  return E2M1Results{round_sw.download(), round.download(), abs_sw.download(),
                     abs.download(),      enc.download(),   dec.download()};
}

void e2m1_pack8_on_device(const std::vector<float>& y, std::vector<uint32_t>& packed_sw,
                          std::vector<uint32_t>& packed) {
  const size_t groups = y.size() / 8;
  DeviceArray<float> d_y(y);
  DeviceArray<uint32_t> d_sw(groups), d_hw(groups);
  if (groups) {
    pack8_kernel<<<blocks_for(groups), kThreads>>>(d_y.get(), groups, d_sw.get(), d_hw.get());
    finish("pack8_kernel");
  }
  packed_sw = d_sw.download();
  packed = d_hw.download();
}

SweepResult e2m1_sweep_all_fp32() {
  DeviceArray<SweepCounters> counters(1);
  check(cudaMemset(counters.get(), 0, sizeof(SweepCounters)), "cudaMemset");
  e2m1_sweep_kernel<<<4096, kThreads>>>(counters.get());
  finish("e2m1_sweep_kernel");
  const SweepCounters c = counters.download()[0];
  SweepResult r;
  r.checked = c.checked;
  r.mismatches = c.mismatches;
  for (unsigned int i = 0; i < c.examples && i < kMaxExamples; ++i) {
    r.examples.push_back(c.example_bits[i]);
    r.checks.push_back(c.example_checks[i]);
  }
  return r;
}

std::vector<uint8_t> spec_e2m1_code_on_device(const std::vector<float>& y) {
  DeviceArray<float> d_y(y);
  DeviceArray<uint8_t> code(y.size());
  if (!y.empty()) {
    spec_code_kernel<<<blocks_for(y.size()), kThreads>>>(d_y.get(), y.size(), code.get());
    finish("spec_code_kernel");
  }
  return code.download();
}

std::vector<float> e4m3_decode_on_device(const std::vector<uint8_t>& bytes) {
  DeviceArray<uint8_t> d_in(bytes);
  DeviceArray<float> d_out(bytes.size());
  if (!bytes.empty()) {
    e4m3_decode_kernel<<<blocks_for(bytes.size()), kThreads>>>(d_in.get(), bytes.size(), d_out.get());
    finish("e4m3_decode_kernel");
  }
  return d_out.download();
}

std::vector<uint8_t> e4m3_encode_on_device(const std::vector<float>& t) {
  DeviceArray<float> d_in(t);
  DeviceArray<uint8_t> d_out(t.size());
  if (!t.empty()) {
    e4m3_encode_kernel<<<blocks_for(t.size()), kThreads>>>(d_in.get(), t.size(), d_out.get());
    finish("e4m3_encode_kernel");
  }
  return d_out.download();
}

std::vector<float> e8m0_decode_on_device(const std::vector<uint8_t>& codes) {
  DeviceArray<uint8_t> d_in(codes);
  DeviceArray<float> d_out(codes.size());
  if (!codes.empty()) {
    e8m0_decode_kernel<<<blocks_for(codes.size()), kThreads>>>(d_in.get(), codes.size(), d_out.get());
    finish("e8m0_decode_kernel");
  }
  return d_out.download();
}

NvScaleResults nv_scale_on_device(const std::vector<float>& amax, const std::vector<float>& g) {
  const size_t n = amax.size();
  if (g.size() != n) throw std::runtime_error("nv_scale_on_device: amax and g differ in size");
  DeviceArray<float> d_a(amax), d_g(g), q(n), qf(n), inv(n);
  DeviceArray<uint8_t> s(n);
  if (n) {
    nv_scale_kernel<<<blocks_for(n), kThreads>>>(d_a.get(), d_g.get(), n, q.get(), qf.get(), s.get(),
                                                 inv.get());
    finish("nv_scale_kernel");
  }
  return NvScaleResults{q.download(), qf.download(), s.download(), inv.download()};
}

void rcp_on_device(const std::vector<float>& d, std::vector<float>& ieee, std::vector<float>& fast) {
  DeviceArray<float> d_in(d), d_ieee(d.size()), d_fast(d.size());
  if (!d.empty()) {
    rcp_kernel<<<blocks_for(d.size()), kThreads>>>(d_in.get(), d.size(), d_ieee.get(), d_fast.get());
    finish("rcp_kernel");
  }
  ieee = d_ieee.download();
  fast = d_fast.download();
}

QuotientSweep fast_quotient_sweep(float g) {
  DeviceArray<QuotientCounters> counters(1);
  check(cudaMemset(counters.get(), 0, sizeof(QuotientCounters)), "cudaMemset");
  quotient_sweep_kernel<<<2048, kThreads>>>(g, counters.get());
  finish("quotient_sweep_kernel");
  const QuotientCounters c = counters.download()[0];
  QuotientSweep r;
  r.checked = c.checked;
  r.byte_mismatches = c.byte_mismatches;
  r.bit_mismatches = c.bit_mismatches;
  for (unsigned int i = 0; i < c.examples && i < kMaxExamples; ++i) r.examples.push_back(c.example_bits[i]);
  return r;
}

std::vector<float> global_scale_on_device(const std::vector<float>& amax) {
  DeviceArray<float> d_in(amax), d_out(amax.size());
  if (!amax.empty()) {
    global_scale_kernel<<<blocks_for(amax.size()), kThreads>>>(d_in.get(), amax.size(), d_out.get());
    finish("global_scale_kernel");
  }
  return d_out.download();
}

std::vector<float> global_scale_from_bits_on_device(const std::vector<uint32_t>& bits) {
  DeviceArray<uint32_t> d_in(bits);
  DeviceArray<float> d_out(bits.size());
  if (!bits.empty()) {
    global_scale_bits_kernel<<<blocks_for(bits.size()), kThreads>>>(d_in.get(), bits.size(), d_out.get());
    finish("global_scale_bits_kernel");
  }
  return d_out.download();
}

std::vector<uint8_t> mx_scale_code_on_device(const std::vector<float>& amax) {
  DeviceArray<float> d_in(amax);
  DeviceArray<uint8_t> d_out(amax.size());
  if (!amax.empty()) {
    mx_scale_kernel<<<blocks_for(amax.size()), kThreads>>>(d_in.get(), amax.size(), d_out.get());
    finish("mx_scale_kernel");
  }
  return d_out.download();
}

bool device_uses_hw_e2m1() {
  DeviceArray<int> flag(1);
  hw_flag_kernel<<<1, 1>>>(flag.get());
  finish("hw_flag_kernel");
  return flag.download()[0] != 0;
}

}  // namespace attnqat::cuda_test
