// src/cuda/attention/sm90/fwd_gemm.cuh — the two GEMMs of a consumer warpgroup, issued as
// asynchronous wgmma (the caller fences, commits and waits; see fwd_mainloop.cuh):
//   qk_gemm  S[64, kBlockN]  = Q[64, d] K[kBlockN, d]^T   (SS: both from shared memory)
//   pv_gemm  O[64, d]       += P[64, kBlockN] V[kBlockN, d] (RS: P from registers)
// Shared-memory tiles (fwd_config.h): [rows, d] as d/64 chunks of [rows, 64], 128-byte rows,
// 128B swizzle. Q and K are K-major operands (k = d runs along the rows): the k16 step kk reads
// chunk kk / 4 at byte offset 32 * (kk % 4) in each row. V is the MN-major B operand of the PV
// GEMM (n = d along the rows, k = keys across rows): the k16 slab j starts at row 16 j
// (16 * 128 bytes further), its two 8-key halves one atom (SBO = 1024 bytes) apart, and the
// second 64-column chunk of d is LBO = kKVChunkBytes further.
#pragma once

#include <cstdint>

#include "cuda/common/wgmma.cuh"

namespace attnqat::sm90 {

// q_rows: this warpgroup's 64 rows of the Q tile in chunk 0 (q + 64 * 128 * warpgroup).
template <class Cfg>
__device__ __forceinline__ void qk_gemm(float (&s)[Cfg::kAccS], uint32_t q_rows, uint32_t k_tile) {
  static_assert(Cfg::kBlockN == 128, "qk_gemm issues m64n128k16");
  const uint64_t desc_q0 = cuda::desc_kmajor_sw128(q_rows);
  const uint64_t desc_k0 = cuda::desc_kmajor_sw128(k_tile);
#pragma unroll
  for (int kk = 0; kk < Cfg::kHeadDim / 16; ++kk) {
    const uint32_t offset_in_row = 32 * (kk % 4);
    const uint64_t desc_q = cuda::desc_add(desc_q0, (kk / 4) * Cfg::kQChunkBytes + offset_in_row);
    const uint64_t desc_k = cuda::desc_add(desc_k0, (kk / 4) * Cfg::kKVChunkBytes + offset_in_row);
    cuda::wgmma_ss<Cfg::kF16, 128, 0, 0>(s, desc_q, desc_k, kk > 0 ? 1 : 0);  // kk = 0: S = Q K^T
  }
}

template <class Cfg>
__device__ __forceinline__ void pv_gemm(float (&o)[Cfg::kAccO], const uint32_t (&p)[Cfg::kSlabs][4],
                                        uint32_t v_tile) {
  constexpr uint32_t kSlabBytes = 16 * Cfg::kRowBytes;
  const uint64_t desc_v0 = cuda::desc_mnmajor_sw128(v_tile, Cfg::kKVChunkBytes);
#pragma unroll
  for (int j = 0; j < Cfg::kSlabs; ++j) {
    const uint64_t desc_v = cuda::desc_add(desc_v0, j * kSlabBytes);
    if constexpr (Cfg::kHeadDim == 128)
      cuda::wgmma_rs<Cfg::kF16, 128, 1>(o, p[j], desc_v, 1);
    else
      cuda::wgmma_rs<Cfg::kF16, 64, 1>(o, p[j], desc_v, 1);
  }
}

}  // namespace attnqat::sm90
