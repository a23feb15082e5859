// src/cuda/attention/sm90/fwd_softmax.cuh — device steps of the forward between the two GEMMs:
// online_softmax (row max, reference max, exp2, row sum), rescale_o. They work on
// one consumer thread's accumulator fragment of a [64, kN] tile (wgmma.cuh for the layout):
// s[i] is row 16w + g + 8*((i>>1)&1) and column 8*(i>>2) + 2t + (i&1) of the warpgroup's tile,
// so each thread holds two rows ("half" 0 and 1) and the four lanes of a quad share them.
//
// Must match reference::forward_impl (src/reference/attention.cpp) per key tile, numerics
// section 4 and 9.1/9.3:
//   S2 = RN(c2 * s); m_new = max(m, max S2); m_ref_new = m_new ("paper") or ceil(m_new)
//   ("anchored"); f = exp2(m_ref - m_ref_new); p~ = exp2(S2 - m_ref_new); l = l f + sum p~.
// Differences, all allowed by numerics 9.1: p~ = ex2.approx(fma(s, c2, -m_ref_new)) (one
// rounding instead of two, approximate exp2), and l is summed per thread and quad-reduced once
// at the end (another order). Because c2 > 0, max RN(c2 s) = RN(c2 max s), so only the raw
// maximum is reduced. A row whose reference max is still -inf uses 0 as its reference, so
// exp2(-inf - 0) = 0 and no -inf - (-inf) appears; tiles with no visible key of a row leave its
// state exactly unchanged (f = 1, sum 0).
// Softcap (numerics 9.9): s holds t = tanh(a s) (softcap.cuh) and c2 is b; nothing here changes.
// Sinks (9.10): the row state starts at the sink (row_state_init); nothing here changes either.
#pragma once

#include <cmath>

#include "attnqat/attnqat.h"
#include "cuda/common/ptx.cuh"
#include "cuda/common/ptx_sm90.cuh"

namespace attnqat::sm90 {

// The running statistics of a thread's two rows. l is this thread's partial sum (its 32 keys
// per tile); the quad's four partials add up to the row sum in store_o.
struct RowState {
  float m_ref[2];  // reference max, log2 units (-inf before the first visible key)
  float l[2];      // partial sum of the unquantized p~, relative to m_ref
};

// The state before the first key (numerics 4 and 9.10). Without a sink (z2 = -inf): m_ref = -inf,
// l = 0. With head h's sink z2 (log2 units; SoftcapSinks::sink2): the sink is a key of score z2
// before the first tile, in no P block and with no value row, so m_ref = z2 ("paper") or
// ceil(z2) ("anchored") and l = exp2(z2 - m_ref), counted once per row: by the quad's first lane
// (l is a per-thread partial that store_o sums over the quad). m = z2 itself is not kept: the
// kernel tracks m_ref only (ceil commutes with max).
__device__ __forceinline__ RowState row_state_init(float z2, PQuant p_quant) {
  if (z2 == -INFINITY) return RowState{{-INFINITY, -INFINITY}, {0.0f, 0.0f}};
  const float ref = p_quant == PQuant::kAnchored ? ceilf(z2) : z2;
  const float l = threadIdx.x % 4 == 0 ? cuda::ex2_approx(__fsub_rn(z2, ref)) : 0.0f;
  return RowState{{ref, ref}, {l, l}};
}

// Replaces the scores s (raw q.k, fp32) by p~ = exp2(c2 s - m_ref_new), updates the row state,
// and returns the factors f[half] = exp2(m_ref_old - m_ref_new) that O and O' must be scaled by
// (exactly 1 when a row's reference did not change).
template <int kN>
__device__ __forceinline__ void online_softmax(float (&s)[kN / 2], RowState& st, float c2,
                                               PQuant p_quant, float (&f)[2]) {
  // Row maxima as a tree (per 16-key slab, then pairwise over the slabs): the same maxima as a
  // running max (max is exact and order-free), with a dependency chain of ~log2(kN) FMNMX
  // instead of kN / 4 per row (that chain stalled the warp at the head of every tile).
  float mx[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float part[kN / 16];
#pragma unroll
    for (int j = 0; j < kN / 16; ++j)
      part[j] = fmaxf(fmaxf(s[8 * j + 2 * h], s[8 * j + 2 * h + 1]),
                      fmaxf(s[8 * j + 4 + 2 * h], s[8 * j + 5 + 2 * h]));
#pragma unroll
    for (int w = kN / 32; w >= 1; w /= 2) {
#pragma unroll
      for (int j = 0; j < w; ++j) part[j] = fmaxf(part[j], part[j + w]);
    }
    mx[h] = part[0];
  }
  float neg_ref[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    // The quad (lanes 4g .. 4g+3) holds the row: butterfly over lane bits 0 and 1.
    mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
    mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
    const float tile_max = __fmul_rn(mx[h], c2);  // max S2 of the tile
    const float cand = p_quant == PQuant::kAnchored ? ceilf(tile_max) : tile_max;
    const float m_new = fmaxf(st.m_ref[h], cand);         // ceil commutes with max
    const float ref = m_new == -INFINITY ? 0.0f : m_new;  // safe reference
    f[h] = m_new == st.m_ref[h] ? 1.0f : cuda::ex2_approx(st.m_ref[h] - ref);
    st.m_ref[h] = m_new;
    neg_ref[h] = -ref;
  }
  float sum[2] = {0.0f, 0.0f};
#pragma unroll
  for (int i = 0; i < kN / 2; ++i) {
    const int h = (i >> 1) & 1;
    s[i] = cuda::ex2_approx(__fmaf_rn(s[i], c2, neg_ref[h]));  // p~
    sum[h] += s[i];
  }
#pragma unroll
  for (int h = 0; h < 2; ++h) st.l[h] = __fmaf_rn(st.l[h], f[h], sum[h]);
}

// O *= f per row (O' likewise), on the accumulator fragment of a [64, kD] output.
template <int kD>
__device__ __forceinline__ void rescale_o(float (&o)[kD / 2], const float (&f)[2]) {
#pragma unroll
  for (int i = 0; i < kD / 2; ++i) o[i] *= f[(i >> 1) & 1];
}

}  // namespace attnqat::sm90
