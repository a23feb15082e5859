// src/cuda/attention/sm90/softcap.cuh — logit soft-capping on a thread's fragment of scores
// (numerics 9.9), shared by the forward (fwd_mainloop.cuh) and the backward (bwd_kernel.cuh):
//   cap_scores  s -> t = tanh(RN(a * s)) on every element, before the mask; the caller's c2 is
//               then b (attn_params.h, SoftcapSinks), so S2 = RN(b * t) as the reference forms it
//   cap_slope   the backward's 1 - t^2 (the cap's derivative), 0 at masked keys (t = -inf)
//
// tanh. The reference uses the C library's fp32 tanh; the kernels use
//   tanh(x) = sign(x) (1 - 2 / (1 + 2^(2 log2(e) |x|)))
// with ex2.approx and rcp.approx: good to ~3e-7 *absolute* (the cancellation near 0 makes the
// relative error large there, but only the absolute error matters: S2 = b t enters p~ = exp2(S2 -
// m_ref), so an error e in t is a relative error of b e ln 2 in p~, e.g. 2e-5 at softcap 50). The
// hardware tanh.approx.f32 (one MUFU op instead of two) is good to 2^-11 *relative*, an error up
// to softcap * 2^-11 in the natural-log scores (2.4% of p~ at softcap 50, near saturation): more
// than the bf16 rounding the outputs are held to (numerics section 8), hence not used.
// Special values: t(+-inf) = +-1 (IEEE tanh, numerics 9.9: an Inf score in mode bf16 is capped to
// +-softcap), t(NaN) = NaN, t(+-0) = +-0.
#pragma once

#include <cmath>
#include <cstdint>

#include "cuda/common/ptx.cuh"

namespace attnqat::sm90 {

__device__ __forceinline__ float rcp_approx(float x) {
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// tanh(x) to ~3e-7 absolute (see the file header).
__device__ __forceinline__ float tanh_abs_accurate(float x) {
  constexpr float kTwoLog2e = 2.88539008177792681472f;  // 2 log2(e)
  const float e = cuda::ex2_approx(__fmul_rn(fabsf(x), kTwoLog2e));  // e^(2|x|); +inf past ~44
  const float r = rcp_approx(__fadd_rn(1.0f, e));                    // 0 when e = +inf
  return copysignf(__fmaf_rn(-2.0f, r, 1.0f), x);
}

// s[i] = tanh(RN(a * s[i])) for a fragment of kN / 2 raw scores (a = SoftcapSinks::cap_a).
template <int kN>
__device__ __forceinline__ void cap_scores(float (&s)[kN / 2], float a) {
#pragma unroll
  for (int i = 0; i < kN / 2; ++i) s[i] = tanh_abs_accurate(__fmul_rn(a, s[i]));
}

// The slope of the cap at t = tanh(a s): 1 - t^2 in [0, 1] (the reference's RN(1 - RN(t t))).
// Masked keys hold t = -inf: 0 there (their P is 0, and 0 * -inf would be NaN). NaN stays NaN
// through P, which the slope multiplies.
__device__ __forceinline__ float cap_slope(float t) {
  return fmaxf(__fsub_rn(1.0f, __fmul_rn(t, t)), 0.0f);
}

}  // namespace attnqat::sm90
