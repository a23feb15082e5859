// src/cuda/attention/sm90/fwd_load.cuh — the producer's steps: load_q and load_kv_tile (TMA into
// the 128B-swizzled tiles of fwd_config.h) and producer_mainloop (the K/V rings).
//
// Pipelines (one elected thread of the producer warpgroup issues everything):
//   Q: q_full gets one arrive.expect_tx(kQBytes); the TMA copies complete the transaction.
//   K[n], V[n] (n = 0, 1, ... ascending: the reference's order) go to stage n % kStages. Before
//   reusing a stage the producer waits for its `empty` barrier, which each of the 256 consumer
//   threads arrives at once it no longer reads the tile (after the wgmma that read it
//   completed). Pass r = n / kStages over the ring waits for phase parity (r & 1) ^ 1: on the
//   first pass that returns at once (mbar_wait), afterwards it waits for the consumers' r-th
//   release. Consumers wait `full` with parity r & 1.
// Out-of-bounds rows (past Nq or Nk) arrive as zeros and still count their bytes.
#pragma once

#include "cuda/attention/sm90/fwd_params.h"
#include "cuda/attention/sm90/fwd_smem.cuh"
#include "cuda/common/ptx.cuh"
#include "cuda/common/ptx_sm90.cuh"

namespace attnqat::sm90 {

// Rows [row0, row0 + chunk_bytes / 128) of head h, batch b of a tensor map (all d columns): one
// TMA box per 64-column chunk, chunk c at smem + c * chunk_bytes, completing on mbarrier `bar`.
template <class Cfg>
__device__ __forceinline__ void load_rows(const CUtensorMap* tmap, uint32_t smem, uint32_t bar,
                                          int chunk_bytes, int row0, int h, int b) {
  cuda::mbar_arrive_expect_tx(bar, chunk_bytes * Cfg::kChunks);
#pragma unroll
  for (int c = 0; c < Cfg::kChunks; ++c)
    cuda::tma_load_4d(smem + c * chunk_bytes, tmap, bar, c * Cfg::kChunkCols, row0, h, b);
}

// Q rows [row0, row0 + kBlockM) of head h, batch b.
template <class Cfg>
__device__ __forceinline__ void load_q(const CUtensorMap* tmap, uint32_t smem_q, uint32_t bar,
                                       int row0, int h, int b) {
  load_rows<Cfg>(tmap, smem_q, bar, Cfg::kQChunkBytes, row0, h, b);
}

// K or V rows [row0, row0 + kBlockN) of key/value head h_kv.
template <class Cfg>
__device__ __forceinline__ void load_kv_tile(const CUtensorMap* tmap, uint32_t smem_tile,
                                             uint32_t bar, int row0, int h_kv, int b) {
  load_rows<Cfg>(tmap, smem_tile, bar, Cfg::kKVChunkBytes, row0, h_kv, b);
}

// Tiles i in [i_begin, i_end) of the CTA's key blocks (tile i = key block n_begin + i of the
// sequence sr), K[i] and V[i], run by one thread. K before V of the same tile: the consumers need K[i+1] before V[i+1].
// On the first pass over the ring (i < kStages) the `empty` waits return at once, so those tiles
// are issued without blocking.
template <class Cfg>
__device__ __forceinline__ void load_kv_tiles(const FwdParams& p, const SmemMap<Cfg>& sm, int h_kv,
                                              const SeqRows& sr, int n_begin, int i_begin,
                                              int i_end) {
  for (int i = i_begin; i < i_end; ++i) {
    const int stage = i % Cfg::kStages;
    const uint32_t parity = ((i / Cfg::kStages) & 1) ^ 1;
    const int row0 = sr.k0 + (n_begin + i) * Cfg::kBlockN;
    cuda::mbar_wait(sm.k_empty(stage), parity);  // consumers released K[i - kStages]
    load_kv_tile<Cfg>(&p.tma_k, sm.k(stage), sm.k_full(stage), row0, h_kv, sr.b);
    cuda::mbar_wait(sm.v_empty(stage), parity);  // consumers released V[i - kStages]
    load_kv_tile<Cfg>(&p.tma_v, sm.v(stage), sm.v_full(stage), row0, h_kv, sr.b);
  }
}

// Run by one thread.
template <class Cfg>
__device__ __forceinline__ void producer_mainloop(const FwdParams& p, const SmemMap<Cfg>& sm,
                                                  int m_block, int h, const SeqRows& sr,
                                                  int n_begin,
                                                  int n_tiles) {
  load_q<Cfg>(&p.tma_q, sm.q(), sm.q_full(), sr.q0 + m_block * Cfg::kBlockM, h, sr.b);
  load_kv_tiles<Cfg>(p, sm, h / p.group, sr, n_begin, 0, n_tiles);
}

}  // namespace attnqat::sm90
