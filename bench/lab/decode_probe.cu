// bench/lab/decode_probe.cu — a standalone driver of the FP4 decode kernel, for tuning on the GPU
// machine without building the whole library (seconds to compile instead of minutes):
//
//   nvcc -std=c++17 -O3 -arch=sm_90a -Isrc -Iinclude bench/lab/decode_probe.cu src/cuda/decode/decode.cu \
//        -o /tmp/decode_probe
//   /tmp/decode_probe [B ctx [page_size [reps [num_splits]]]]   (default: the benchmark's grid)
//   /tmp/decode_probe floor      (a read-only kernel over the same bytes, and an empty kernel)
//
// Fills a paged FP4 cache with random codes and in-range scales, times decode (split kernel +
// combine) as CUDA-graph replays rotating over input sets larger than L2, and prints time and
// effective bandwidth (packed bytes + scales read / time) next to a device-to-device copy of the
// same run. Also compares the output with a second launch on a different split count (anchored P:
// the result must not depend on the split). The numbers that count are bench/bench_decode.py's
// (same process as the BF16 baseline); this is a dev tool.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "cuda/decode/decode_kernel.cuh"
#include "cuda/decode/launch.h"

using namespace attnqat::decode;

#define CK(x)                                                                              \
  do {                                                                                     \
    cudaError_t e_ = (x);                                                                  \
    if (e_ != cudaSuccess) {                                                               \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
      std::exit(1);                                                                        \
    }                                                                                      \
  } while (0)

namespace {

constexpr int kHq = 32, kHkv = 8;
int kD = 128;  // PROBE_D=64 in the environment: head dim 64

__global__ void fill_random(uint8_t* p, size_t n, uint32_t seed, int lo, int span) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    uint32_t x = static_cast<uint32_t>(i) * 2654435761u ^ seed;
    x ^= x >> 15; x *= 2246822519u; x ^= x >> 13; x *= 3266489917u; x ^= x >> 16;
    p[i] = static_cast<uint8_t>(span > 0 ? lo + x % span : x);
  }
}

__global__ void fill_q(uint16_t* q, size_t n, uint32_t seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    uint32_t x = static_cast<uint32_t>(i) * 2654435761u ^ seed;
    x ^= x >> 15; x *= 2246822519u; x ^= x >> 13;
    const float f = (static_cast<int>(x % 2001) - 1000) / 577.0f;  // uniform, variance ~1
    const uint32_t u = __float_as_uint(f);
    q[i] = static_cast<uint16_t>(u >> 16);
  }
}

float bf16_to_float(uint16_t h) {
  const uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

struct Setup {
  int B, ctx, page;
  int pages_per_seq, sets;
  uint8_t *kd, *ks, *vd, *vs;
  std::vector<int32_t*> tables;
  std::vector<uint16_t*> qs;
  int32_t* lens;
  uint16_t* out;
  float *part_o, *part_ml;
  size_t fp4_bytes;
};

int choose_splits(int B, int ctx, int sms, int bps, int* split_keys) {
  const int units = B * kHkv;  // row_groups = 1 (GQA 4, nq 1)
  const int max_splits = std::min(1024, std::max(1, (ctx + kCtaStepKeys - 1) / kCtaStepKeys));
  const int slots = sms * bps;  // api.cu's heuristic
  const int one_wave = std::max(1, slots / units);
  const int waves = one_wave >= 16 || (ctx + one_wave - 1) / one_wave <= 2048 ? 1 : 2;
  const int min_keys = std::clamp(32 * units, 256, 1024);
  int splits = std::clamp(waves * slots / units, 1, std::min(max_splits, std::max(1, ctx / min_keys)));
  int sk = (ctx + splits - 1) / splits;
  sk = (sk + kCtaStepKeys - 1) / kCtaStepKeys * kCtaStepKeys;
  *split_keys = sk;
  return (ctx + sk - 1) / sk;
}

DecodeParams params(const Setup& s, int set, int splits, int split_keys) {
  DecodeParams p{};
  p.q = s.qs[set];
  p.q_stride_b = int64_t(kHq) * kD;
  p.q_stride_h = kD;
  p.q_stride_i = kD;
  p.k_data = s.kd; p.k_scales = s.ks; p.v_data = s.vd; p.v_scales = s.vs;
  p.page_table = s.tables[set];
  p.pt_stride_b = s.pages_per_seq;
  p.pt_stride_p = 1;
  p.seq_lens = s.lens;
  p.lens_stride = 1;
  p.pages_per_seq = s.pages_per_seq;
  p.num_pages = s.pages_per_seq * s.B * s.sets;
  p.heads_kv = kHkv;
  p.page_size = s.page;
  p.page_shift = -1;
  for (int sh = 0; sh < 31; ++sh) if ((1 << sh) == s.page) p.page_shift = sh;
  p.group = kHq / kHkv;
  p.nq = 1;
  p.rows = p.group;
  p.row_groups = 1;
  p.head_dim = kD;
  p.num_splits = splits;
  p.split_keys = split_keys;
  p.c2 = (1.0f / std::sqrt(float(kD))) * 1.44269504088896340736f;
  p.p_quant = attnqat::PQuant::kAnchored;
  p.o = s.out;
  p.lse = nullptr;
  p.heads_q = kHq;
  p.part_o = s.part_o;
  p.part_ml = s.part_ml;
  return p;
}

// The floor of any decode kernel: one kernel that only reads `n` bytes (16-byte loads, 16 KB per
// CTA, one word written per CTA), timed like the decode below. And an empty kernel: the per-call
// cost of a launch inside a graph.
__global__ void __launch_bounds__(256) read_floor_kernel(const uint4* __restrict__ src, size_t n16, uint32_t* out) {
  const size_t base = size_t(blockIdx.x) * 1024;
  uint32_t acc = 0;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const size_t i = base + j * 256 + threadIdx.x;
    if (i < n16) {
      const uint4 v = src[i];
      acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
  }
  acc = __reduce_xor_sync(0xffffffffu, acc);
  if (threadIdx.x == 0) out[blockIdx.x] = acc;
}
__global__ void empty_kernel() {}

// Median per-call time (us) of `calls` launches of fn(i) captured in one graph.
template <class F>
double graph_us(cudaStream_t st, int calls, int reps, F fn) {
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  CK(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal));
  for (int i = 0; i < calls; ++i) fn(i);
  CK(cudaStreamEndCapture(st, &graph));
  CK(cudaGraphInstantiate(&exec, graph, 0));
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  std::vector<float> t;
  for (int r = 0; r < reps + 3; ++r) {
    CK(cudaEventRecord(e0, st));
    CK(cudaGraphLaunch(exec, st));
    CK(cudaEventRecord(e1, st));
    CK(cudaEventSynchronize(e1));
    float ms;
    CK(cudaEventElapsedTime(&ms, e0, e1));
    if (r >= 3) t.push_back(ms / calls);
  }
  std::sort(t.begin(), t.end());
  CK(cudaGraphExecDestroy(exec));
  CK(cudaGraphDestroy(graph));
  CK(cudaEventDestroy(e0));
  CK(cudaEventDestroy(e1));
  return t[t.size() / 2] * 1e3;
}

void floors(size_t bytes, double copy) {
  const int sets = std::max<int>(2, int((size_t(180) << 20) / bytes) + 1);
  const size_t n16 = (bytes + 15) / 16;
  const unsigned ctas = unsigned((n16 + 1023) / 1024);
  uint8_t* buf;
  uint32_t* out;
  CK(cudaMalloc(&buf, n16 * 16 * sets));
  CK(cudaMalloc(&out, sizeof(uint32_t) * ctas));
  fill_random<<<1024, 256>>>(buf, n16 * 16 * sets, 9, 0, 0);
  cudaStream_t st;
  CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
  const double read_us = graph_us(st, sets, 20, [&](int i) {
    read_floor_kernel<<<ctas, 256, 0, st>>>(reinterpret_cast<const uint4*>(buf + n16 * 16 * i), n16, out);
  });
  const double empty_us = graph_us(st, 20, 20, [&](int) { empty_kernel<<<1, 32, 0, st>>>(); });
  const double gbs = bytes / (read_us * 1e-6) / 1e9;
  std::printf("floor %10zu bytes: read-only kernel %8.1f us (%6.0f GB/s, %5.1f%% of copy), empty kernel %.2f us\n",
              bytes, read_us, gbs, 100 * gbs / copy, empty_us);
  CK(cudaStreamDestroy(st));
  CK(cudaFree(buf));
  CK(cudaFree(out));
}

double copy_gbs() {
  const size_t n = size_t(1) << 30;
  void *a, *b;
  CK(cudaMalloc(&a, n));
  CK(cudaMalloc(&b, n));
  CK(cudaMemset(a, 1, n));
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  std::vector<float> t;
  for (int i = 0; i < 12; ++i) {
    CK(cudaEventRecord(e0));
    CK(cudaMemcpyAsync(b, a, n, cudaMemcpyDeviceToDevice));
    CK(cudaEventRecord(e1));
    CK(cudaEventSynchronize(e1));
    float ms;
    CK(cudaEventElapsedTime(&ms, e0, e1));
    if (i >= 2) t.push_back(ms);
  }
  std::sort(t.begin(), t.end());
  CK(cudaFree(a));
  CK(cudaFree(b));
  return 2.0 * n / (t[t.size() / 2] * 1e-3) / 1e9;
}

void run(int B, int ctx, int page, int reps, double copy, int sms, int bps, int force_splits = 0) {
  Setup s{};
  s.B = B; s.ctx = ctx; s.page = page;
  s.pages_per_seq = (ctx + page - 1) / page;
  s.fp4_bytes = size_t(B) * kHkv * ctx * 2 * (kD / 2 + kD / 16);
  s.sets = std::max<int>(2, int((size_t(180) << 20) / s.fp4_bytes) + 1);
  const size_t pages = size_t(s.pages_per_seq) * B * s.sets;
  const size_t data_bytes = pages * kHkv * page * (kD / 2), scale_bytes = pages * kHkv * page * (kD / 16);
  CK(cudaMalloc(&s.kd, data_bytes)); CK(cudaMalloc(&s.vd, data_bytes));
  CK(cudaMalloc(&s.ks, scale_bytes)); CK(cudaMalloc(&s.vs, scale_bytes));
  fill_random<<<1024, 256>>>(s.kd, data_bytes, 1, 0, 0);
  fill_random<<<1024, 256>>>(s.vd, data_bytes, 2, 0, 0);
  fill_random<<<1024, 256>>>(s.ks, scale_bytes, 3, 0x28, 0x08);  // E4M3 0.25 .. 0.47: values ~ unit variance
  fill_random<<<1024, 256>>>(s.vs, scale_bytes, 4, 0x28, 0x08);
  std::vector<int32_t> perm(pages);
  for (size_t i = 0; i < pages; ++i) perm[i] = int32_t(i);
  srand(7);
  for (size_t i = pages - 1; i > 0; --i) std::swap(perm[i], perm[size_t(rand()) % (i + 1)]);
  for (int st = 0; st < s.sets; ++st) {
    int32_t* t;
    CK(cudaMalloc(&t, sizeof(int32_t) * B * s.pages_per_seq));
    CK(cudaMemcpy(t, perm.data() + size_t(st) * B * s.pages_per_seq, sizeof(int32_t) * B * s.pages_per_seq,
                  cudaMemcpyHostToDevice));
    s.tables.push_back(t);
    uint16_t* q;
    CK(cudaMalloc(&q, 2 * size_t(B) * kHq * kD));
    fill_q<<<64, 256>>>(q, size_t(B) * kHq * kD, 100 + st);
    s.qs.push_back(q);
  }
  std::vector<int32_t> lens(B, ctx);
  CK(cudaMalloc(&s.lens, sizeof(int32_t) * B));
  CK(cudaMemcpy(s.lens, lens.data(), sizeof(int32_t) * B, cudaMemcpyHostToDevice));
  CK(cudaMalloc(&s.out, 2 * size_t(B) * kHq * kD));
  int split_keys;
  int splits = choose_splits(B, ctx, sms, bps, &split_keys);
  if (force_splits > 0) {
    split_keys = ((ctx + force_splits - 1) / force_splits + kCtaStepKeys - 1) / kCtaStepKeys * kCtaStepKeys;
    splits = (ctx + split_keys - 1) / split_keys;
  }
  const size_t prow = size_t(B) * kHkv * (2 * splits + 2) * kRows;  // the check below doubles splits
  CK(cudaMalloc(&s.part_o, prow * kD * 4));
  CK(cudaMalloc(&s.part_ml, prow * 2 * 4));

  cudaStream_t st;
  CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
  // Check: two split counts give the same output (anchored P), and the output is finite.
  std::vector<uint16_t> o1(size_t(B) * kHq * kD), o2(o1.size());
  CK(launch_decode(params(s, 0, splits, split_keys), B, false, st));
  CK(cudaMemcpyAsync(o1.data(), s.out, o1.size() * 2, cudaMemcpyDeviceToHost, st));
  const int sk2 = std::max(kCtaStepKeys, (split_keys / 2 + kCtaStepKeys - 1) / kCtaStepKeys * kCtaStepKeys);
  CK(launch_decode(params(s, 0, (ctx + sk2 - 1) / sk2, sk2), B, false, st));
  CK(cudaMemcpyAsync(o2.data(), s.out, o2.size() * 2, cudaMemcpyDeviceToHost, st));
  CK(cudaStreamSynchronize(st));
  if (const char* dump = std::getenv("PROBE_DUMP")) {  // the output of set 0, for an A/B compare
    FILE* f = std::fopen(dump, "wb");
    std::fwrite(o1.data(), 2, o1.size(), f);
    std::fclose(f);
  }
  double max_rel = 0, norm = 0;
  int nonfinite = 0;
  for (size_t i = 0; i < o1.size(); ++i) {
    const float a = bf16_to_float(o1[i]), b = bf16_to_float(o2[i]);
    if (!std::isfinite(a)) ++nonfinite;
    norm = std::max(norm, double(std::fabs(a)));
    max_rel = std::max(max_rel, double(std::fabs(a - b)));
  }

  const double us = graph_us(st, s.sets, reps, [&](int i) {
    CK(launch_decode(params(s, i, splits, split_keys), B, false, st));
  });
  const double gbs = s.fp4_bytes / (us * 1e-6) / 1e9;
  // The split kernel alone (no combine; the output is not the answer when splits > 1): how much
  // of the time the combine step adds.
  double split_only_us = 0;
  auto split_only = [&](auto kernel, int smem) {
    CK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    return graph_us(st, s.sets, reps, [&](int i) {
      kernel<<<dim3(splits, kHkv, B), kThreads, smem, st>>>(params(s, i, splits, split_keys));
    });
  };
  if (splits > 1)
    split_only_us = kD == 64 ? split_only(decode_kernel<64, false, true, attnqat::PQuant::kAnchored>, Layout<64>::kSmemBytes)
                             : split_only(decode_kernel<128, false, true, attnqat::PQuant::kAnchored>, Layout<128>::kSmemBytes);
  std::printf("B=%-3d ctx=%-7d page=%-4d splits=%-4d split_keys=%-6d  %9.1f us  %7.0f GB/s  %5.1f%% of copy"
              "  (split kernel alone %.1f us) | split-invariance max|diff| %.3g (max|o| %.3g, nonfinite %d)\n",
              B, ctx, page, splits, split_keys, us, gbs, 100 * gbs / copy, split_only_us, max_rel, norm, nonfinite);
  for (auto* p : s.tables) CK(cudaFree(p));
  for (auto* p : s.qs) CK(cudaFree(p));
  for (void* p : {static_cast<void*>(s.kd), static_cast<void*>(s.vd), static_cast<void*>(s.ks), static_cast<void*>(s.vs),
                  static_cast<void*>(s.lens), static_cast<void*>(s.out), static_cast<void*>(s.part_o),
                  static_cast<void*>(s.part_ml)})
    CK(cudaFree(p));
  CK(cudaStreamDestroy(st));
}

}  // namespace

int main(int argc, char** argv) {
  int sms;
  CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  int bps;
  if (const char* d = std::getenv("PROBE_D")) kD = std::atoi(d);
  CK(decode_occupancy(false, kD, &bps));
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  const double copy = copy_gbs();
  std::printf("%s, %d SMs, head dim %d, %d decode CTAs/SM, copy %.0f GB/s (read + write)\n", prop.name, sms, kD, bps, copy);
  if (argc >= 2 && std::strcmp(argv[1], "floor") == 0) {  // the read-only floor of the benchmark's grid
    for (int B : {1, 8, 32})
      for (int ctx : {8192, 32768, 131072}) floors(size_t(B) * kHkv * ctx * 2 * (kD / 2 + kD / 16), copy);
    return 0;
  }
  if (argc >= 3) {
    run(std::atoi(argv[1]), std::atoi(argv[2]), argc > 3 ? std::atoi(argv[3]) : 256, argc > 4 ? std::atoi(argv[4]) : 20,
        copy, sms, bps, argc > 5 ? std::atoi(argv[5]) : 0);
    return 0;
  }
  for (int B : {1, 8, 32})
    for (int ctx : {8192, 32768, 131072}) run(B, ctx, 256, 20, copy, sms, bps);
  return 0;
}
