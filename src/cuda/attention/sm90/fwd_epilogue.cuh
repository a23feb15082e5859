// src/cuda/attention/sm90/fwd_epilogue.cuh — store_o: the last step of a consumer warpgroup.
// Reduces the row sums over the quad, normalizes O (and O') by 1/l, and writes O, O' (input
// dtype) and the row statistics LSE, m_ref, l (fp32) of numerics 4 and 9.3:
//   O = O_acc / l (as O_acc * RN(1/l), numerics 9.1), LSE = RN(RN(ln 2) * RN(m_ref + log2 l));
//   a row that the mask leaves without keys: O = O' = 0, LSE = m_ref = -inf, l = 0 (with a sink,
//   numerics 9.10: O = O' = 0 and LSE, m_ref, l of the sink's start state, LSE = z up to
//   rounding); a row
//   that sees keys but whose sum is not positive (NaN, from a non-finite score, or 0 when every
//   visible score is -inf) is poisoned: O, O' and LSE are NaN (numerics section 3). Emptiness
//   comes from the mask, never from l, so a NaN row cannot pass for an empty one.
// Direct 4-byte stores from the accumulator fragment (row 16w + g (+8), columns 8k + 2t, +1)
// at the outputs' strides (o_str, stat_str); rows past the sequence's end are padding and are
// not written.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/mask.h"
#include "cuda/attention/sm90/fragment.cuh"
#include "cuda/attention/sm90/fwd_params.h"
#include "cuda/attention/sm90/fwd_softmax.cuh"
#include "cuda/common/p_quant.cuh"

namespace attnqat::sm90 {

constexpr float kLn2 = 0.693147180559945309417f;  // RN(ln 2)

// row0: the thread's first query row (16w + g of its warpgroup's 64); the second is row0 + 8.
template <class Cfg, class Mask>
__device__ __forceinline__ void store_o(const FwdParams& p, const float (&o)[Cfg::kAccO],
                                        const float (&o_hp)[Cfg::kWithOHp ? Cfg::kAccO : 1],
                                        RowState st, const SeqRows& sr, int h, int row0) {
  float l[2], inv_l[2];
  bool empty[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] = st.l[r] + __shfl_xor_sync(0xffffffffu, st.l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
    empty[r] = Mask::keys(row0 + 8 * r, sr.info).empty();
    inv_l[r] = l[r] > 0.0f ? __frcp_rn(l[r]) : __int_as_float(0x7fffffff);  // NaN: poisoned
  }
  const bool valid0 = row0 < sr.info.len_q, valid1 = row0 + 8 < sr.info.len_q;
  const int64_t o0 = p.o_str.at(sr.b, h, sr.q0 + row0);
  store_rows<Cfg::kF16, Cfg::kHeadDim>(p.o, o0, p.o_str.n, p.head_dim, valid0, valid1, o, inv_l,
                                       empty);
  if constexpr (Cfg::kWithOHp)
    store_rows<Cfg::kF16, Cfg::kHeadDim>(p.o_hp, o0, p.o_str.n, p.head_dim, valid0, valid1, o_hp,
                                         inv_l, empty);
  if (threadIdx.x % 4 != 0) return;  // one lane per quad writes the row statistics
  // With a sink a row has probability mass even without keys (its LSE is the sink's).
  const bool sink = p.extras.sink2(h) != -INFINITY;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (!(r ? valid1 : valid0)) continue;
    const int64_t row = p.stat_str.at(sr.b, h, sr.q0 + row0 + 8 * r);
    const float nan = __int_as_float(0x7fffffff);
    const bool no_mass = empty[r] && !sink;
    p.lse[row] = no_mass       ? -INFINITY
                 : l[r] > 0.0f ? __fmul_rn(kLn2, __fadd_rn(st.m_ref[r], log2f(l[r])))
                               : nan;
    if (p.m_ref != nullptr) {
      p.m_ref[row] = no_mass ? -INFINITY : l[r] > 0.0f ? st.m_ref[r] : nan;
      p.l[row] = no_mass ? 0.0f : l[r];
    }
  }
}

}  // namespace attnqat::sm90
