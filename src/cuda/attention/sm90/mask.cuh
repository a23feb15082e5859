// src/cuda/attention/sm90/mask.cuh — the attention masks as policy types (numerics section 3).
//
// A policy gives key_end(row): the exclusive end of the keys that query row `row` sees. Keys at
// or past it are masked (-inf, so p~ = 0: a zero element of its 16-key P block). Both policies
// also mask keys >= Nk, which matters because TMA fills out-of-bounds K rows with zeros (S = 0,
// not -inf). Causal masking is bottom-right aligned: row i sees keys j <= i + Nk - Nq, so rows
// i < Nq - Nk see no key at all (O = 0, LSE = -inf).
#pragma once

#include <cstdint>

namespace attnqat::sm90 {

struct NoMask {
  static constexpr bool kCausal = false;
  static constexpr const char* kName = "none";
  __host__ __device__ static int key_end(int /*row*/, int /*seqlen_q*/, int seqlen_k) {
    return seqlen_k;
  }
};

struct CausalMask {
  static constexpr bool kCausal = true;
  static constexpr const char* kName = "causal";
  __host__ __device__ static int key_end(int row, int seqlen_q, int seqlen_k) {
    const int64_t end = static_cast<int64_t>(row) + seqlen_k - seqlen_q + 1;
    return end < 0 ? 0 : (end > seqlen_k ? seqlen_k : static_cast<int>(end));
  }
};

// Key tiles a CTA of query rows [m_block * block_m, ...) must visit: those holding any key its
// last (widest) row sees. 0 when no row of the CTA sees a key.
template <class Mask>
__host__ __device__ inline int num_key_tiles(int m_block, int block_m, int block_n, int seqlen_q,
                                             int seqlen_k) {
  const int64_t last = static_cast<int64_t>(m_block + 1) * block_m;
  const int last_row = static_cast<int>((last < seqlen_q ? last : seqlen_q) - 1);
  const int end = Mask::key_end(last_row, seqlen_q, seqlen_k);
  return (end + block_n - 1) / block_n;
}

}  // namespace attnqat::sm90
