// GPU tests of attnqat::quantize / dequantize / fake_quantize on CUDA tensors, bit-exact against
// the same public calls on CPU tensors (the reference, src/reference/quantize.cpp). For every
// case: quantize (codes, scales and, with compute_global_scale, g), dequantize of the GPU's
// codes, fake_quantize into a fresh output and in place (out aliasing x, strided like x), and
// dequantize(quantize(x)) == fake_quantize(x) on the GPU. Every GPU output is filled with 0xAB
// bytes before the call, so an element the kernels forget to write shows up as a mismatch.
// Shapes: awkward sizes, the token axis with N not a multiple of 16, strided leading dims (a
// [B, N, H, D] buffer viewed as [B, H, N, D], padded rows, 6-D), empty tensors; blocks: random,
// zeros, E2M1 ties, E4M3 ties, subnormal scales, zero scales, saturation, subnormal inputs,
// NaN / +Inf / -Inf poisoning.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "attnqat/attnqat.h"
#include "common/host_convert.h"
#include "cuda_test_util.h"

namespace attnqat::cuda_test {
namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// ---- cases ------------------------------------------------------------------------------------

enum class GMode { kOne, kGiven, kCompute };

using Shape = std::vector<int64_t>;
using Shapes = std::vector<Shape>;

struct Case {
  DType dtype = DType::kFloat32;
  std::vector<int64_t> shape;  // logical shape of x
  Format format = Format::kNVFP4;
  BlockAxis axis = BlockAxis::kLast;
  GMode g_mode = GMode::kOne;
  float g = 1.0f;              // the given g (GMode::kGiven)
  // Physical layout of the GPU copy of x: physical dim j holds logical dim perm[j] (the last
  // must stay last); the second-to-last physical dim gets `row_pad` extra elements per row.
  std::vector<int> perm;
  int64_t row_pad = 0;
  bool specials = true;        // overwrite blocks with the special patterns
  float scale = 1.0f;          // of the random normal values
  uint32_t seed = 1;
};

// A case of the given dtype and shape (the shape moved in: GCC 12 warns about a false
// null memmove when a vector is copy-assigned here).
Case case_of(DType dtype, Shape shape) {
  Case c;
  c.dtype = dtype;
  c.shape = std::move(shape);
  return c;
}

std::string describe(const Case& c) {
  TensorView v;
  v.ndim = static_cast<int>(c.shape.size());
  for (int i = 0; i < v.ndim; ++i) v.shape[i] = c.shape[i];
  std::string s = std::string(dtype_name(c.dtype)) + " " + v.shape_str() +
      (c.format == Format::kNVFP4 ? " nvfp4" : " mxfp4") +
      (c.axis == BlockAxis::kLast ? " last-axis" : " token-axis");
  if (c.format == Format::kNVFP4)
    s += c.g_mode == GMode::kOne ? " g=1" : c.g_mode == GMode::kGiven ? " g=" + std::to_string(c.g) : " g=computed";
  if (!c.perm.empty()) {
    s += " perm=(";
    for (size_t i = 0; i < c.perm.size(); ++i) s += (i ? "," : "") + std::to_string(c.perm[i]);
    s += ")";
  }
  if (c.row_pad) s += " row_pad=" + std::to_string(c.row_pad);
  return s;
}

int64_t numel_of(const std::vector<int64_t>& shape) {
  return std::accumulate(shape.begin(), shape.end(), int64_t{1}, std::multiplies<int64_t>());
}

TensorView view_of(void* data, DType dtype, const std::vector<int64_t>& shape,
                   const std::vector<int64_t>& strides, const char* name, Device device) {
  TensorView t;
  t.data = data;
  t.dtype = dtype;
  t.device = device;
  t.name = name;
  t.ndim = static_cast<int>(shape.size());
  for (int i = 0; i < t.ndim; ++i) {
    t.shape[i] = shape[i];
    t.stride[i] = strides[i];
  }
  return t;
}

std::vector<int64_t> contiguous_strides(const std::vector<int64_t>& shape) {
  std::vector<int64_t> s(shape.size(), 1);
  for (int i = static_cast<int>(shape.size()) - 2; i >= 0; --i) s[i] = s[i + 1] * shape[i + 1];
  return s;
}

// ---- values -----------------------------------------------------------------------------------

// Calls f(block index, element offsets of the block in row-major logical order, count) for
// every quantization block, in any order; padding (token axis) is not listed.
void for_each_block(const std::vector<int64_t>& shape, BlockAxis axis, int block,
                    const std::function<void(int64_t, const std::vector<int64_t>&)>& f) {
  const int nd = static_cast<int>(shape.size());
  std::vector<int64_t> offs;
  if (axis == BlockAxis::kLast) {
    const int64_t len = shape[nd - 1], rows = numel_of(shape) / std::max<int64_t>(len, 1);
    if (len == 0) return;
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t b = 0; b < len / block; ++b) {
        offs.clear();
        for (int i = 0; i < block; ++i) offs.push_back(r * len + b * block + i);
        f(r * (len / block) + b, offs);
      }
  } else {
    const int64_t n = shape[nd - 2], d = shape[nd - 1];
    if (n == 0 || d == 0) return;
    const int64_t lead = numel_of(shape) / (n * d), nb = (n + block - 1) / block;
    for (int64_t l = 0; l < lead; ++l)
      for (int64_t c = 0; c < d; ++c)
        for (int64_t b = 0; b < nb; ++b) {
          offs.clear();
          for (int i = 0; i < block && b * block + i < n; ++i) offs.push_back((l * n + b * block + i) * d + c);
          f((l * d + c) * nb + b, offs);
        }
  }
}

// Random normal values, then every block whose index is not 0 mod kPatterns gets a special
// pattern (relative to g for NVFP4, to a power of two for MXFP4).
constexpr int kPatterns = 14;

std::vector<float> make_values(const Case& c) {
  std::vector<float> v(numel_of(c.shape));
  std::mt19937 rng(c.seed);
  std::normal_distribution<float> normal(0.0f, c.scale);
  for (float& x : v) x = normal(rng);
  if (!c.specials) return v;
  const int block = c.format == Format::kNVFP4 ? kNvBlock : kMxBlock;
  const float g = c.format == Format::kNVFP4 && c.g_mode == GMode::kGiven ? c.g : 1.0f;
  static const float kTies[16] = {6.0f, 0.25f, 0.75f, 1.25f, 1.75f, 2.5f, 3.5f, 5.0f,
                                  -0.25f, -0.75f, -1.25f, -1.75f, -2.5f, -3.5f, -5.0f, -6.0f};
  std::uniform_int_distribution<int> pick(0, 1 << 20);
  for_each_block(c.shape, c.axis, block, [&](int64_t b, const std::vector<int64_t>& offs) {
    const int pattern = static_cast<int>(b % kPatterns);
    const int at = pick(rng) % static_cast<int>(offs.size());  // where a single special element goes
    for (size_t i = 0; i < offs.size(); ++i) {
      float& x = v[offs[i]];
      const float tie = kTies[i % 16];
      switch (pattern) {
        case 0: break;                                                  // random normal
        case 1: x = 0.0f; break;                                        // all zeros
        case 2: x = tie * g; break;                                     // amax 6g: s = 1, E2M1 ties
        case 3: x = tie * g * std::ldexp(3.0f, -9); break;              // subnormal E4M3 scale
        case 4: x = (i == 0 ? 6.375f : tie) * g; break;                 // t = 1.0625: E4M3 tie
        case 5: x = tie * g * 4096.0f; break;                           // t = 4096: s saturates at 448
        case 6: x = (i == 0 ? 3.0e4f : x) * g; break;                   // E2M1 saturation (y > 6)
        case 7: if (static_cast<int>(i) == at) x = kNaN; break;         // poisoned
        case 8: if (static_cast<int>(i) == at) x = INFINITY; break;     // poisoned
        case 9: if (static_cast<int>(i) == at) x = -INFINITY; break;    // poisoned
        case 10: x = tie * g * std::ldexp(1.0f, -13); break;            // s == 0: the block is zeros
        case 11: x = tie * 1e-40f; break;                               // fp32 subnormal inputs
        case 12: x = (i == 0 ? 6.0f * g : -0.1f * g * (i % 3)); break;  // -0 and values rounding to 0
        case 13: x = tie * std::ldexp(1.0f, static_cast<int>(b % 200) - 100); break;  // wide range
      }
    }
  });
  return v;
}

// ---- one case ---------------------------------------------------------------------------------

struct Physical {
  std::vector<int64_t> strides;  // logical strides into the physical buffer
  int64_t elements = 0;          // size of the physical buffer
};

Physical physical_layout(const Case& c) {
  const int nd = static_cast<int>(c.shape.size());
  std::vector<int> perm = c.perm;
  if (perm.empty()) {
    perm.resize(nd);
    std::iota(perm.begin(), perm.end(), 0);
  }
  std::vector<int64_t> phys_shape(nd);
  for (int j = 0; j < nd; ++j) phys_shape[j] = c.shape[perm[j]];
  std::vector<int64_t> phys_stride(nd, 1);
  for (int j = nd - 2; j >= 0; --j)
    phys_stride[j] = phys_stride[j + 1] * phys_shape[j + 1] + (j == nd - 2 ? c.row_pad : 0);
  Physical p;
  p.strides.assign(nd, 0);
  for (int j = 0; j < nd; ++j) p.strides[perm[j]] = phys_stride[j];
  p.elements = numel_of(c.shape) == 0 ? 0 : phys_stride[0] * phys_shape[0];
  return p;
}

// Element offset in the physical buffer of logical row-major element i.
int64_t physical_offset(const Case& c, const Physical& p, int64_t i) {
  int64_t off = 0;
  for (int d = static_cast<int>(c.shape.size()) - 1; d >= 0; --d) {
    off += (i % c.shape[d]) * p.strides[d];
    i /= c.shape[d];
  }
  return off;
}

void run_case(const Case& c) {
  SCOPED_TRACE(describe(c));
  const int esize = dtype_size(c.dtype);
  const int64_t n = numel_of(c.shape);
  const std::vector<float> values = make_values(c);
  const std::vector<uint8_t> x_bytes = to_dtype_bytes(values, c.dtype);

  QuantizeOptions opts;
  opts.format = c.format;
  opts.axis = c.axis;
  opts.compute_global_scale = c.g_mode == GMode::kCompute;
  const bool nvfp4 = c.format == Format::kNVFP4;

  // Shapes of the packed tensors (the reference's validation computes the same).
  std::vector<int64_t> data_shape = c.shape, scale_shape = c.shape;
  const int nd = static_cast<int>(c.shape.size());
  if (c.axis == BlockAxis::kLast) {
    data_shape[nd - 1] = c.shape[nd - 1] / 2;
    scale_shape[nd - 1] = c.shape[nd - 1] / (nvfp4 ? kNvBlock : kMxBlock);
  } else {
    const int64_t nb = (c.shape[nd - 2] + kNvBlock - 1) / kNvBlock;
    data_shape[nd - 2] = scale_shape[nd - 2] = c.shape[nd - 1];
    data_shape[nd - 1] = nb * 8;
    scale_shape[nd - 1] = nb;
  }
  const int64_t data_bytes = numel_of(data_shape), scale_bytes = numel_of(scale_shape);
  const std::vector<int64_t> x_strides = contiguous_strides(c.shape);

  // ---- CPU reference
  std::vector<uint8_t> x_cpu = x_bytes, ref_data(data_bytes), ref_scales(scale_bytes);
  std::vector<uint8_t> ref_deq(n * esize), ref_fq(n * esize);
  float g_cpu = c.g_mode == GMode::kGiven ? c.g : 1.0f;
  const auto cpu = [&](void* p, DType dt, const std::vector<int64_t>& s, const char* name) {
    return view_of(p, dt, s, contiguous_strides(s), name, Device::kCPU);
  };
  const TensorView g_cpu_view = nvfp4 ? cpu(&g_cpu, DType::kFloat32, {1}, "global_scale") : TensorView{};
  ASSERT_TRUE(quantize(cpu(x_cpu.data(), c.dtype, c.shape, "x"), cpu(ref_data.data(), DType::kUInt8, data_shape, "data"),
                       cpu(ref_scales.data(), DType::kUInt8, scale_shape, "scales"), g_cpu_view, opts).ok());
  QuantizeOptions deq_opts = opts;
  deq_opts.compute_global_scale = false;
  ASSERT_TRUE(dequantize(cpu(ref_data.data(), DType::kUInt8, data_shape, "data"),
                         cpu(ref_scales.data(), DType::kUInt8, scale_shape, "scales"), g_cpu_view,
                         cpu(ref_deq.data(), c.dtype, c.shape, "out"), deq_opts).ok());
  float g_cpu_fq = c.g_mode == GMode::kGiven ? c.g : 1.0f;
  const TensorView g_cpu_fq_view = nvfp4 ? cpu(&g_cpu_fq, DType::kFloat32, {1}, "global_scale") : TensorView{};
  ASSERT_TRUE(fake_quantize(cpu(x_cpu.data(), c.dtype, c.shape, "x"), cpu(ref_fq.data(), c.dtype, c.shape, "out"),
                            g_cpu_fq_view, opts).ok());

  // ---- GPU: x in its physical layout, padding filled with NaN (a read of it would poison)
  const Physical phys = physical_layout(c);
  std::vector<uint8_t> x_phys(phys.elements * esize);
  {
    const std::vector<uint8_t> nan_bytes = to_dtype_bytes({kNaN}, c.dtype);
    for (int64_t i = 0; i < phys.elements; ++i) std::memcpy(&x_phys[i * esize], nan_bytes.data(), esize);
    for (int64_t i = 0; i < n; ++i)
      std::memcpy(&x_phys[physical_offset(c, phys, i) * esize], &x_bytes[i * esize], esize);
  }
  DeviceBuffer d_x(x_phys.size()), d_data(data_bytes), d_scales(scale_bytes), d_g(sizeof(float));
  DeviceBuffer d_deq(n * esize), d_fq(n * esize), d_inplace(x_phys.size());
  d_x.upload(x_phys);
  d_inplace.upload(x_phys);
  d_data.fill(kPoisonByte);
  d_scales.fill(kPoisonByte);
  d_deq.fill(kPoisonByte);
  d_fq.fill(kPoisonByte);
  const auto gpu = [&](void* p, DType dt, const std::vector<int64_t>& s, const std::vector<int64_t>& st,
                       const char* name) { return view_of(p, dt, s, st, name, Device::kCUDA); };
  const TensorView x_gpu = gpu(d_x.get(), c.dtype, c.shape, phys.strides, "x");
  const TensorView g_gpu = nvfp4 ? gpu(d_g.get(), DType::kFloat32, {1}, {1}, "global_scale") : TensorView{};
  const auto set_g = [&] {
    if (c.g_mode == GMode::kCompute) {
      d_g.fill(kPoisonByte);
    } else {
      const float gv = c.g_mode == GMode::kGiven ? c.g : 1.0f;
      d_g.upload(&gv, sizeof gv);
    }
  };

  // quantize
  set_g();
  Status st = quantize(x_gpu, gpu(d_data.get(), DType::kUInt8, data_shape, contiguous_strides(data_shape), "data"),
                       gpu(d_scales.get(), DType::kUInt8, scale_shape, contiguous_strides(scale_shape), "scales"),
                       g_gpu, opts);
  ASSERT_TRUE(st.ok()) << st.message();
  cuda_check(cudaDeviceSynchronize(), "quantize");
  EXPECT_TRUE(same_elements("quantize: data", DType::kUInt8, d_data.download(), ref_data));
  EXPECT_TRUE(same_elements("quantize: scales", DType::kUInt8, d_scales.download(), ref_scales));
  if (nvfp4) {
    float g_gpu_value;
    std::memcpy(&g_gpu_value, d_g.download().data(), sizeof g_gpu_value);
    EXPECT_EQ(bits_of(g_gpu_value), bits_of(g_cpu)) << "global scale: got " << g_gpu_value << ", want " << g_cpu;
  }

  // dequantize of the GPU's codes (g as quantize left it)
  st = dequantize(gpu(d_data.get(), DType::kUInt8, data_shape, contiguous_strides(data_shape), "data"),
                  gpu(d_scales.get(), DType::kUInt8, scale_shape, contiguous_strides(scale_shape), "scales"),
                  g_gpu, gpu(d_deq.get(), c.dtype, c.shape, x_strides, "out"), deq_opts);
  ASSERT_TRUE(st.ok()) << st.message();
  cuda_check(cudaDeviceSynchronize(), "dequantize");
  const std::vector<uint8_t> deq = d_deq.download();
  EXPECT_TRUE(same_elements("dequantize", c.dtype, deq, ref_deq));

  // fake_quantize into a fresh contiguous output
  set_g();
  st = fake_quantize(x_gpu, gpu(d_fq.get(), c.dtype, c.shape, x_strides, "out"), g_gpu, opts);
  ASSERT_TRUE(st.ok()) << st.message();
  cuda_check(cudaDeviceSynchronize(), "fake_quantize");
  const std::vector<uint8_t> fq = d_fq.download();
  EXPECT_TRUE(same_elements("fake_quantize", c.dtype, fq, ref_fq));
  EXPECT_TRUE(same_elements("GPU dequantize(quantize(x)) vs GPU fake_quantize(x)", c.dtype, deq, fq));

  // fake_quantize in place: out is x (same buffer, same strides); the padding must survive
  set_g();
  const TensorView inplace = gpu(d_inplace.get(), c.dtype, c.shape, phys.strides, "x");
  TensorView inplace_out = inplace;
  inplace_out.name = "out";
  st = fake_quantize(inplace, inplace_out, g_gpu, opts);
  ASSERT_TRUE(st.ok()) << st.message();
  cuda_check(cudaDeviceSynchronize(), "fake_quantize in place");
  const std::vector<uint8_t> after = d_inplace.download();
  std::vector<uint8_t> logical(n * esize), padding_after, padding_before;
  std::vector<bool> is_element(phys.elements, false);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t off = physical_offset(c, phys, i);
    std::memcpy(&logical[i * esize], &after[off * esize], esize);
    is_element[off] = true;
  }
  for (int64_t i = 0; i < phys.elements; ++i) {
    if (is_element[i]) continue;
    padding_after.insert(padding_after.end(), &after[i * esize], &after[(i + 1) * esize]);
    padding_before.insert(padding_before.end(), &x_phys[i * esize], &x_phys[(i + 1) * esize]);
  }
  EXPECT_TRUE(same_elements("fake_quantize in place", c.dtype, logical, ref_fq));
  EXPECT_TRUE(same_elements("fake_quantize in place: the padding between rows (bytes, untouched)",
                            DType::kUInt8, padding_after, padding_before));
}

class QuantizeCuda : public CudaTest {};

const DType kDtypes[] = {DType::kFloat32, DType::kBFloat16, DType::kFloat16};

TEST_F(QuantizeCuda, Nvfp4LastAxisSmallShapes) {
  for (DType dt : kDtypes) {
    for (GMode gm : {GMode::kOne, GMode::kGiven, GMode::kCompute}) {
      for (float g : {kAnchoredPScale, 32.0f}) {
        if (gm != GMode::kGiven && g != kAnchoredPScale) continue;  // g only matters when given
        for (const Shape& shape : Shapes{{1, 16}, {3, 5, 48}, {7, 3, 2, 64}}) {
          Case c = case_of(dt, shape);
          c.g_mode = gm;
          c.g = g;
          c.seed = 100 + static_cast<uint32_t>(shape.size());
          run_case(c);
        }
      }
    }
  }
}

TEST_F(QuantizeCuda, Nvfp4LastAxis2048x160) {
  for (DType dt : kDtypes) {
    for (GMode gm : {GMode::kOne, GMode::kCompute}) {
      Case c = case_of(dt, {2048, 160});
      c.g_mode = gm;
      c.scale = 300.0f;
      c.seed = 7;
      run_case(c);
    }
  }
}

TEST_F(QuantizeCuda, Nvfp4LastAxisLarge4096x13312) {
  // 54.5M elements: the path the bandwidth goal is about (one thread per block, grid-stride).
  for (DType dt : kDtypes) {
    Case c = case_of(dt, {4096, 13312});
    c.seed = 8;
    run_case(c);
  }
}

TEST_F(QuantizeCuda, Nvfp4ComputedGlobalScale) {
  // Large values (g > 1), tiny values (g clamped to 2^-100), a NaN anywhere (g = 1), all zeros.
  for (DType dt : kDtypes) {
    Case c = case_of(dt, {33, 64});
    c.g_mode = GMode::kCompute;
    c.specials = false;
    c.scale = dt == DType::kFloat16 ? 3000.0f : 1.0e6f;
    run_case(c);
    c.specials = true;  // includes NaN / Inf blocks: amax not finite, g = 1
    run_case(c);
  }
  Case tiny = case_of(DType::kFloat32, {4, 32});
  tiny.g_mode = GMode::kCompute;
  tiny.specials = false;
  tiny.scale = 1e-35f;
  run_case(tiny);
  Case zeros = tiny;
  zeros.scale = 0.0f;
  run_case(zeros);
}

TEST_F(QuantizeCuda, Mxfp4LastAxis) {
  for (DType dt : kDtypes) {
    for (const Shape& shape : Shapes{{1, 32}, {3, 5, 64}, {2048, 160}}) {
      Case c = case_of(dt, shape);
      c.format = Format::kMXFP4;
      c.scale = 10.0f;
      c.seed = 9;
      run_case(c);
    }
  }
}

TEST_F(QuantizeCuda, Nvfp4TokenAxis) {
  for (DType dt : kDtypes) {
    for (const Shape& shape : Shapes{{2, 3, 37, 64}, {1, 1, 1, 16}, {1, 2, 1000, 128}, {2, 37, 5}, {3, 40, 33}}) {
      for (GMode gm : {GMode::kOne, GMode::kGiven, GMode::kCompute}) {
        Case c = case_of(dt, shape);
        c.axis = BlockAxis::kToken;
        c.g_mode = gm;
        c.g = 0.25f;
        c.seed = 10;
        run_case(c);
      }
    }
  }
}

TEST_F(QuantizeCuda, StridedLeadingDims) {
  for (DType dt : kDtypes) {
    // [B, N, H, D] buffer viewed as [B, H, N, D]: logical dims (0, 2, 1, 3) in physical order.
    Case c = case_of(dt, {2, 3, 40, 64});
    c.perm = {0, 2, 1, 3};
    c.seed = 11;
    for (GMode gm : {GMode::kOne, GMode::kCompute}) {
      c.g_mode = gm;
      c.axis = BlockAxis::kLast;
      c.format = Format::kNVFP4;
      run_case(c);
      c.axis = BlockAxis::kToken;
      run_case(c);
    }
    c.axis = BlockAxis::kLast;
    c.format = Format::kMXFP4;
    run_case(c);

    // Padded rows (a slice of a wider buffer), and a 6-D tensor with mixed-up leading dims.
    Case pad = case_of(dt, {37, 96});
    pad.row_pad = 16;
    pad.g_mode = GMode::kCompute;
    run_case(pad);
    pad.format = Format::kMXFP4;
    run_case(pad);
    pad.format = Format::kNVFP4;
    pad.axis = BlockAxis::kToken;
    run_case(pad);

    Case six = case_of(dt, {2, 1, 3, 2, 5, 32});
    six.perm = {3, 0, 4, 1, 2, 5};
    six.row_pad = 8 * (dt == DType::kFloat32 ? 1 : 2);  // 32 bytes either way
    six.g_mode = GMode::kCompute;
    run_case(six);
    six.format = Format::kMXFP4;
    run_case(six);
    six.format = Format::kNVFP4;
    six.axis = BlockAxis::kToken;
    run_case(six);
  }
}

TEST_F(QuantizeCuda, EmptyTensors) {
  for (const Shape& shape : Shapes{{0, 16}, {4, 0}, {2, 0, 3, 32}}) {
    for (GMode gm : {GMode::kOne, GMode::kCompute}) {
      Case c = case_of(DType::kFloat32, shape);
      c.g_mode = gm;
      run_case(c);  // compute_global_scale on an empty tensor writes g = 1, like the reference
    }
  }
  for (const Shape& shape : Shapes{{2, 0, 16}, {2, 5, 0}, {0, 3, 16}}) {
    Case c = case_of(DType::kFloat32, shape);
    c.axis = BlockAxis::kToken;
    c.g_mode = GMode::kCompute;
    run_case(c);
  }
}

// ---- errors -----------------------------------------------------------------------------------

TEST_F(QuantizeCuda, MisalignedPointersAndStridesAreClearErrors) {
  DeviceBuffer buf(4096), data(1024), scales(256), g(sizeof(float));
  const float one = 1.0f;
  g.upload(&one, sizeof one);
  const TensorView g_view = view_of(g.get(), DType::kFloat32, {1}, {1}, "global_scale", Device::kCUDA);
  const auto data_view = [&](int64_t offset, int64_t cols) {
    return view_of(data.bytes_ptr() + offset, DType::kUInt8, {4, cols}, {cols, 1}, "data", Device::kCUDA);
  };
  const TensorView scales_view = view_of(scales.get(), DType::kUInt8, {4, 2}, {2, 1}, "scales", Device::kCUDA);

  // x offset by one bf16 element: 2 bytes off.
  TensorView x = view_of(buf.bytes_ptr() + 2, DType::kBFloat16, {4, 32}, {32, 1}, "x", Device::kCUDA);
  Status st = quantize(x, data_view(0, 16), scales_view, g_view, {});
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("x: expected a 16-byte aligned data pointer for the CUDA kernels, got an "
                              "address offset by 2 bytes"), std::string::npos) << st.message();
  EXPECT_NE(st.message().find(".contiguous()"), std::string::npos) << st.message();

  // A row stride that is not a multiple of 16 bytes (fp32 rows 34 elements apart).
  x = view_of(buf.get(), DType::kFloat32, {4, 32}, {34, 1}, "x", Device::kCUDA);
  st = quantize(x, data_view(0, 16), scales_view, g_view, {});
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("x: expected strides that keep rows 16-byte aligned"), std::string::npos) << st.message();
  EXPECT_NE(st.message().find("got stride 34 in dimension 0"), std::string::npos) << st.message();

  // The packed codes written 8 bytes per block: a data pointer 4 bytes off.
  x = view_of(buf.get(), DType::kFloat32, {4, 32}, {32, 1}, "x", Device::kCUDA);
  st = quantize(x, data_view(4, 16), scales_view, g_view, {});
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("data: expected a 8-byte aligned data pointer"), std::string::npos) << st.message();

  // fake_quantize: the output is checked too.
  const TensorView out = view_of(buf.bytes_ptr() + 1024 + 4, DType::kFloat32, {4, 32}, {32, 1}, "out", Device::kCUDA);
  st = fake_quantize(x, out, g_view, {});
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("out: expected a 16-byte aligned data pointer"), std::string::npos) << st.message();

  // dequantize into a misaligned output.
  st = dequantize(data_view(0, 16), scales_view, g_view, out, {});
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("out: expected a 16-byte aligned data pointer"), std::string::npos) << st.message();

  // MXFP4 writes 16 bytes of codes per block.
  QuantizeOptions mx;
  mx.format = Format::kMXFP4;
  const TensorView mx_scales = view_of(scales.get(), DType::kUInt8, {4, 1}, {1, 1}, "scales", Device::kCUDA);
  st = quantize(x, data_view(8, 16), mx_scales, TensorView{}, mx);
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("data: expected a 16-byte aligned data pointer"), std::string::npos) << st.message();

  // Nothing was launched by the failing calls, and nothing is left in an error state.
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
}

// ---- streams and CUDA graphs ------------------------------------------------------------------

TEST_F(QuantizeCuda, CapturedInACudaGraph) {
  // compute_global_scale + quantize + fake_quantize captured on a stream and replayed: no host
  // synchronization, allocation or host read happens inside the calls.
  const std::vector<int64_t> shape = {64, 256};
  const int64_t n = numel_of(shape);
  std::mt19937 rng(5);
  std::normal_distribution<float> normal(0.0f, 50.0f);
  std::vector<float> values(n);
  for (float& v : values) v = normal(rng);
  const std::vector<uint8_t> x_bytes = to_dtype_bytes(values, DType::kBFloat16);

  std::vector<uint8_t> x_cpu = x_bytes, ref_data(n / 2), ref_scales(n / 16), ref_fq(n * 2);
  float g_cpu = 0.0f;
  QuantizeOptions opts;
  opts.compute_global_scale = true;
  const auto cpu = [](void* p, DType dt, std::initializer_list<int64_t> s, const char* name) {
    return make_view(p, dt, s, name, Device::kCPU);
  };
  ASSERT_TRUE(quantize(cpu(x_cpu.data(), DType::kBFloat16, {64, 256}, "x"), cpu(ref_data.data(), DType::kUInt8, {64, 128}, "data"),
                       cpu(ref_scales.data(), DType::kUInt8, {64, 16}, "scales"), cpu(&g_cpu, DType::kFloat32, {1}, "g"), opts).ok());
  ASSERT_TRUE(fake_quantize(cpu(x_cpu.data(), DType::kBFloat16, {64, 256}, "x"), cpu(ref_fq.data(), DType::kBFloat16, {64, 256}, "out"),
                            cpu(&g_cpu, DType::kFloat32, {1}, "g"), opts).ok());

  DeviceBuffer d_x(x_bytes.size()), d_data(n / 2), d_scales(n / 16), d_g(4), d_fq(n * 2);
  d_x.upload(x_bytes);
  d_data.fill(kPoisonByte);
  d_scales.fill(kPoisonByte);
  d_g.fill(kPoisonByte);
  d_fq.fill(kPoisonByte);
  const auto gpu = [](void* p, DType dt, std::initializer_list<int64_t> s, const char* name) {
    return make_view(p, dt, s, name, Device::kCUDA);
  };
  cudaStream_t stream;
  cuda_check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate");
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  cuda_check(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal), "cudaStreamBeginCapture");
  const Status q = quantize(gpu(d_x.get(), DType::kBFloat16, {64, 256}, "x"), gpu(d_data.get(), DType::kUInt8, {64, 128}, "data"),
                            gpu(d_scales.get(), DType::kUInt8, {64, 16}, "scales"),
                            gpu(d_g.get(), DType::kFloat32, {1}, "g"), opts, stream);
  const Status f = fake_quantize(gpu(d_x.get(), DType::kBFloat16, {64, 256}, "x"), gpu(d_fq.get(), DType::kBFloat16, {64, 256}, "out"),
                                 gpu(d_g.get(), DType::kFloat32, {1}, "g"), opts, stream);
  const cudaError_t end = cudaStreamEndCapture(stream, &graph);
  EXPECT_TRUE(q.ok()) << q.message();
  EXPECT_TRUE(f.ok()) << f.message();
  ASSERT_EQ(end, cudaSuccess) << cudaGetErrorString(end);
  cuda_check(cudaGraphInstantiate(&exec, graph, 0), "cudaGraphInstantiate");
  for (int replay = 0; replay < 2; ++replay) cuda_check(cudaGraphLaunch(exec, stream), "cudaGraphLaunch");
  cuda_check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
  EXPECT_TRUE(same_elements("graph: data", DType::kUInt8, d_data.download(), ref_data));
  EXPECT_TRUE(same_elements("graph: scales", DType::kUInt8, d_scales.download(), ref_scales));
  EXPECT_TRUE(same_elements("graph: fake_quantize", DType::kBFloat16, d_fq.download(), ref_fq));
  float g_gpu;
  std::memcpy(&g_gpu, d_g.download().data(), 4);
  EXPECT_EQ(g_gpu, g_cpu);
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaStreamDestroy(stream);
}

TEST_F(QuantizeCuda, BuildInfoNamesTheArchs) {
  const BuildInfo info = build_info();
  EXPECT_TRUE(info.cuda);
  EXPECT_NE(info.cuda_archs.find("90a"), std::string::npos) << info.cuda_archs;
}

}  // namespace
}  // namespace attnqat::cuda_test
