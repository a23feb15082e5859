// tests/cpp/cuda_attention/sm90_test_kernels.cu — the kernels of sm90_test_kernels.h. They call
// exactly the device functions of the forward kernel (same headers, same template arguments).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <string>

#include "cuda/attention/sm90/fwd_config.h"
#include "cuda/attention/sm90/fwd_gemm.cuh"
#include "cuda/attention/sm90/fwd_load.cuh"
#include "cuda/attention/sm90/fwd_smem.cuh"
#include "cuda/attention/sm90/fwd_softmax.cuh"
#include "cuda/attention/sm90/fragment.cuh"
#include "cuda/attention/sm90/softcap.cuh"
#include "cuda/common/p_quant.cuh"
#include "cuda/common/ptx.cuh"
#include "cuda/common/ptx_sm90.cuh"
#include "cuda/attention/sm90/tma_host.h"
#include "gpu_util.h"
#include "sm90_test_kernels.h"

namespace attnqat::gpu_test {
namespace {

using namespace attnqat::sm90;

// Row and column of accumulator element i of this thread in its warpgroup's [64, N] tile.
__device__ __forceinline__ int frag_row(int i) {
  return 16 * ((threadIdx.x / 32) % 4) + (threadIdx.x % 32) / 4 + 8 * ((i >> 1) & 1);
}
__device__ __forceinline__ int frag_col(int i) {
  return 8 * (i >> 2) + 2 * (threadIdx.x % 4) + (i & 1);
}

template <bool kF16>
__device__ __forceinline__ float half_to_float(uint32_t h) {
  if constexpr (kF16)
    return __half2float(__ushort_as_half(static_cast<unsigned short>(h)));
  else
    return __uint_as_float(h << 16);
}

struct PQuantParams {
  const float* scores;
  const int* key_end;
  float c2;
  bool anchored;
  float* p_tilde;
  float* p_hat;
  float* m_ref;
  float* l;
};

template <bool kF16>
__global__ void __launch_bounds__(128) p_quant_kernel(const PQuantParams p) {
  constexpr int kN = kTileKeys;
  float x[kN / 2];
#pragma unroll
  for (int i = 0; i < kN / 2; ++i) x[i] = p.scores[frag_row(i) * kN + frag_col(i)];
  const int row0 = frag_row(0);
  apply_mask<kN>(x, 0, IndexRange{0, p.key_end[row0]}, IndexRange{0, p.key_end[row0 + 8]});
  const PQuant p_quant = p.anchored ? PQuant::kAnchored : PQuant::kPaper;
  RowState st = row_state_init(-INFINITY, p_quant);  // no sink
  float f[2];
  online_softmax<kN>(x, st, p.c2, p_quant, f);
  // The forward's P scale table, filled and published as fwd_kernel does.
  __shared__ __align__(16) uint8_t table[cuda::kPScaleTableBytes];
  const cuda::PQuantConsts qc = cuda::p_quant_consts(p_quant);
  for (uint32_t e = threadIdx.x; e < cuda::kPScaleTableEntries; e += blockDim.x)
    cuda::fill_p_scale_entry<kF16>(cuda::smem_u32(table), e, qc.two120_g);
  __syncthreads();
  uint32_t p_hat[kN / 16][4], p_tilde[kN / 16][4];
  cuda::convert_p<kF16, kN, false>(x, true, qc, cuda::smem_u32(table), p_hat, p_tilde);
#pragma unroll
  for (int i = 0; i < kN / 2; ++i) {
    const int at = frag_row(i) * kN + frag_col(i);
    p.p_tilde[at] = x[i];
    const uint32_t pair = p_hat[i / 8][(i % 8) / 2];  // a[j][r] holds elements 8j + 2r, +1
    p.p_hat[at] = half_to_float<kF16>((i & 1) ? pair >> 16 : pair & 0xFFFFu);
  }
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float l = st.l[h] + __shfl_xor_sync(0xffffffffu, st.l[h], 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    if (threadIdx.x % 4 == 0) {
      p.m_ref[row0 + 8 * h] = st.m_ref[h];
      p.l[row0 + 8 * h] = l;
    }
  }
}

// t = tanh(RN(a x)) and 1 - t^2 as the kernels form them (softcap.cuh), one element per thread.
__global__ void softcap_kernel(const float* x, int n, float a, float* t, float* slope) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  float frag[1] = {x[i]};
  cap_scores<2>(frag, a);
  t[i] = frag[0];
  slope[i] = cap_slope(frag[0]);
}

struct GemmParams {
  CUtensorMap q, k, v;
  const float* p;
  float* s;
  float* o;
};

template <class Cfg>
__global__ void __launch_bounds__(256, 1) gemm_layout_kernel(const __grid_constant__ GemmParams p) {
  extern __shared__ uint8_t smem_raw[];
  const SmemMap<Cfg> sm{(cuda::smem_u32(smem_raw) + Cfg::kSmemAlign - 1) & ~(Cfg::kSmemAlign - 1u)};
  if (threadIdx.x == 0) {
    cuda::mbar_init(sm.q_full(), 1);
    cuda::mbar_init(sm.k_full(0), 1);
    cuda::mbar_init(sm.v_full(0), 1);
    cuda::fence_barrier_init();
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    load_q<Cfg>(&p.q, sm.q(), sm.q_full(), 0, 0, 0);
    load_kv_tile<Cfg>(&p.k, sm.k(0), sm.k_full(0), 0, 0, 0);
    load_kv_tile<Cfg>(&p.v, sm.v(0), sm.v_full(0), 0, 0, 0);
  }
  cuda::mbar_wait(sm.q_full(), 0);
  cuda::mbar_wait(sm.k_full(0), 0);
  cuda::mbar_wait(sm.v_full(0), 0);
  const int wg = threadIdx.x / 128;

  float s[Cfg::kAccS];
  cuda::reg_fence(s);
  cuda::wgmma_fence();
  qk_gemm<Cfg>(s, sm.q() + wg * Cfg::kWgQRowsBytes, sm.k(0));
  cuda::wgmma_commit();
  cuda::wgmma_wait<0>();
  cuda::reg_fence(s);
#pragma unroll
  for (int i = 0; i < Cfg::kAccS; ++i)
    p.s[(64 * wg + frag_row(i)) * Cfg::kBlockN + frag_col(i)] = s[i];

  float pv[Cfg::kAccS];  // P in the accumulator layout, then A fragments (exact values)
#pragma unroll
  for (int i = 0; i < Cfg::kAccS; ++i)
    pv[i] = p.p[(64 * wg + frag_row(i)) * Cfg::kBlockN + frag_col(i)];
  uint32_t frag[Cfg::kSlabs][4];
#pragma unroll
  for (int j = 0; j < Cfg::kSlabs; ++j) cuda::pack_p_tilde_slab<Cfg::kF16>(&pv[8 * j], frag[j]);
  float o[Cfg::kAccO];
#pragma unroll
  for (int i = 0; i < Cfg::kAccO; ++i) o[i] = 0.0f;
  cuda::reg_fence(o);
  cuda::reg_fence(frag);
  cuda::wgmma_fence();
  pv_gemm<Cfg>(o, frag, sm.v(0));
  cuda::wgmma_commit();
  cuda::wgmma_wait<0>();
  cuda::reg_fence(o);
  cuda::reg_fence(frag);
#pragma unroll
  for (int i = 0; i < Cfg::kAccO; ++i)
    p.o[(64 * wg + frag_row(i)) * Cfg::kHeadDim + frag_col(i)] = o[i];
}

template <class Cfg>
Status launch_gemm_layout(const std::vector<float>& q, const std::vector<float>& k,
                          const std::vector<float>& v, const std::vector<float>& pm,
                          GemmResult* out) {
  constexpr int kD = Cfg::kHeadDim, kRows = 128;
  const DType dt = Cfg::kF16 ? DType::kFloat16 : DType::kBFloat16;
  DeviceBuffer dq(kRows * kD * 2), dk(kRows * kD * 2), dv(kRows * kD * 2);
  DeviceBuffer dp(kRows * kRows * 4), ds(kRows * kRows * 4), dout(kRows * kD * 4);
  dq.upload(to_half(q, dt).data(), kRows * kD * 2);
  dk.upload(to_half(k, dt).data(), kRows * kD * 2);
  dv.upload(to_half(v, dt).data(), kRows * kD * 2);
  dp.upload(pm.data(), kRows * kRows * 4);
  ds.poison();
  dout.poison();
  GemmParams params{};
  ATTNQAT_RETURN_IF_ERROR(
      make_tma_bhsd(&params.q, cuda_view(dq.get(), dt, {1, 1, kRows, kD}, "q"), Cfg::kBlockM));
  ATTNQAT_RETURN_IF_ERROR(
      make_tma_bhsd(&params.k, cuda_view(dk.get(), dt, {1, 1, kRows, kD}, "k"), Cfg::kBlockN));
  ATTNQAT_RETURN_IF_ERROR(
      make_tma_bhsd(&params.v, cuda_view(dv.get(), dt, {1, 1, kRows, kD}, "v"), Cfg::kBlockN));
  params.p = static_cast<const float*>(dp.get());
  params.s = static_cast<float*>(ds.get());
  params.o = static_cast<float*>(dout.get());
  auto* kernel = gemm_layout_kernel<Cfg>;
  cuda_check(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemAlloc),
      "cudaFuncSetAttribute");
  kernel<<<1, 256, Cfg::kSmemAlloc>>>(params);
  cuda_check(cudaGetLastError(), "gemm_layout_kernel launch");
  cuda_check(cudaDeviceSynchronize(), "gemm_layout_kernel");
  out->s.resize(kRows * kRows);
  out->o.resize(kRows * kD);
  ds.download(out->s.data(), out->s.size() * 4);
  dout.download(out->o.data(), out->o.size() * 4);
  return Status::Ok();
}

}  // namespace

Status run_p_quant(bool f16, bool anchored, float c2, const std::vector<float>& scores,
                   const std::vector<int>& key_end, PQuantResult* out) {
  const size_t n = kTileRows * kTileKeys;
  DeviceBuffer ds(n * 4), dk(kTileRows * 4), dpt(n * 4), dph(n * 4), dm(kTileRows * 4),
      dl(kTileRows * 4);
  ds.upload(scores.data(), n * 4);
  dk.upload(key_end.data(), kTileRows * 4);
  for (DeviceBuffer* b : {&dpt, &dph, &dm, &dl}) b->poison();
  const PQuantParams p{static_cast<const float*>(ds.get()),
                       static_cast<const int*>(dk.get()),
                       c2,
                       anchored,
                       static_cast<float*>(dpt.get()),
                       static_cast<float*>(dph.get()),
                       static_cast<float*>(dm.get()),
                       static_cast<float*>(dl.get())};
  if (f16)
    p_quant_kernel<true><<<1, 128>>>(p);
  else
    p_quant_kernel<false><<<1, 128>>>(p);
  cuda_check(cudaGetLastError(), "p_quant_kernel launch");
  cuda_check(cudaDeviceSynchronize(), "p_quant_kernel");
  out->p_tilde.resize(n);
  out->p_hat.resize(n);
  out->m_ref.resize(kTileRows);
  out->l.resize(kTileRows);
  dpt.download(out->p_tilde.data(), n * 4);
  dph.download(out->p_hat.data(), n * 4);
  dm.download(out->m_ref.data(), kTileRows * 4);
  dl.download(out->l.data(), kTileRows * 4);
  return Status::Ok();
}

Status run_softcap(float a, const std::vector<float>& x, std::vector<float>* t,
                   std::vector<float>* slope) {
  const int n = static_cast<int>(x.size());
  DeviceBuffer dx(n * 4 + 4), dt(n * 4 + 4), ds(n * 4 + 4);
  dx.upload(x.data(), n * 4);
  dt.poison();
  ds.poison();
  softcap_kernel<<<(n + 255) / 256, 256>>>(static_cast<const float*>(dx.get()), n, a,
                                           static_cast<float*>(dt.get()), static_cast<float*>(ds.get()));
  cuda_check(cudaGetLastError(), "softcap_kernel launch");
  cuda_check(cudaDeviceSynchronize(), "softcap_kernel");
  t->resize(n);
  slope->resize(n);
  dt.download(t->data(), n * 4);
  ds.download(slope->data(), n * 4);
  return Status::Ok();
}

Status run_gemm_layout(bool f16, int d, const std::vector<float>& q, const std::vector<float>& k,
                       const std::vector<float>& v, const std::vector<float>& p, GemmResult* out) {
  if (d == 64)
    return f16 ? launch_gemm_layout<FwdConfig<true, 64, false>>(q, k, v, p, out)
               : launch_gemm_layout<FwdConfig<false, 64, false>>(q, k, v, p, out);
  if (d == 128)
    return f16 ? launch_gemm_layout<FwdConfig<true, 128, false>>(q, k, v, p, out)
               : launch_gemm_layout<FwdConfig<false, 128, false>>(q, k, v, p, out);
  return Status::Invalid("run_gemm_layout: d must be 64 or 128, got " + std::to_string(d));
}

}  // namespace attnqat::gpu_test
