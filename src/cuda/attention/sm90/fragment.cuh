// src/cuda/attention/sm90/fragment.cuh — steps on one thread's fragment of a wgmma accumulator tile
// that the forward and the backward share (layout: common/wgmma.cuh; s[i] is row
// 16w + g + 8*((i>>1)&1), column 8*(i>>2) + 2t + (i&1)):
//   apply_mask   scores of keys outside a row's visible range become -inf (so that p~ = 0: a
//                zero element of its 16-key P block). Which tiles need it, and each row's range,
//                come from the mask policy (src/common/mask.h: keys_need_mask, Mask::keys).
//   store_rows   the thread's two rows of a [64, d] accumulator, scaled per row and rounded to
//                the element type, into a contiguous tensor (O, O', dK, dV).
#pragma once

#include <cmath>

#include "common/mask.h"
#include "cuda/common/ptx.cuh"

namespace attnqat::sm90 {

// s: a [64, kN] tile whose column 0 is key key0; keys0 / keys1 the visible key ranges of the
// thread's rows g and g + 8.
template <int kN>
__device__ __forceinline__ void apply_mask(float (&s)[kN / 2], int key0, IndexRange keys0,
                                           IndexRange keys1) {
  const int col = key0 + 2 * (threadIdx.x % 4);
#pragma unroll
  for (int i = 0; i < kN / 2; ++i) {
    const int key = col + 8 * (i >> 2) + (i & 1);
    const IndexRange& r = ((i >> 1) & 1) ? keys1 : keys0;
    if (key < r.begin || key >= r.end) s[i] = -INFINITY;
  }
}

// Rows row0 and row0 + 8 of a [64, kD] accumulator as 4-byte pairs into rows of `cols`
// contiguous elements (cols <= kD, a multiple of 16: the tensor's head dim, which the tile may
// exceed, attn_params.h), row0's first at element `row_offset0`, the rows `row_stride` elements
// apart (even, as row_offset0): element x of row h is RN16(RN(x mult[h])),
// or +0 where zero[h] (an empty row, whose accumulator may hold 0 * NaN from a masked position).
// Rows that are not valid (padding past the tensor's end) and columns from `cols` on are skipped.
template <bool kF16, int kD>
__device__ __forceinline__ void store_rows(void* out, int64_t row_offset0, int64_t row_stride,
                                           int cols, bool valid0, bool valid1,
                                           const float (&acc)[kD / 2], const float (&mult)[2],
                                           const bool (&zero)[2]) {
  uint32_t* base = static_cast<uint32_t*>(out);  // pairs of 16-bit elements
  const int t = threadIdx.x % 4;
#pragma unroll
  for (int k = 0; k < kD / 8; ++k) {
    if (8 * k >= cols) break;  // cols is a multiple of 16: a pair is wholly in or out
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      if (!(h ? valid1 : valid0)) continue;
      const float lo = zero[h] ? 0.0f : __fmul_rn(acc[4 * k + 2 * h], mult[h]);
      const float hi = zero[h] ? 0.0f : __fmul_rn(acc[4 * k + 2 * h + 1], mult[h]);
      const int64_t elem = row_offset0 + 8 * h * row_stride + 8 * k + 2 * t;
      base[elem / 2] = cuda::pack_rn<kF16>(lo, hi);
    }
  }
}

}  // namespace attnqat::sm90
