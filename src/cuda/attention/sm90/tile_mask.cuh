// src/cuda/attention/sm90/tile_mask.cuh — element masking of one wgmma accumulator tile, for the
// forward and the backward: scores of keys outside a row's visible range become -inf (so that
// p~ = 0: a zero element of its 16-key P block). Which tiles need it, and each row's range, come
// from the mask policy (src/common/mask.h: keys_need_mask, Mask::keys).
#pragma once

#include <cmath>

#include "common/mask.h"

namespace attnqat::sm90 {

// s: one thread's fragment of a [64, kN] accumulator tile (s[i] is row 16w + g + 8*((i>>1)&1),
// column 8*(i>>2) + 2t + (i&1); common/wgmma.cuh) whose column 0 is key key0; keys0 / keys1 the
// visible key ranges of the thread's rows g and g + 8.
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

}  // namespace attnqat::sm90
