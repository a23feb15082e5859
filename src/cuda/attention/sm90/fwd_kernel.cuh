// src/cuda/attention/sm90/fwd_kernel.cuh — the sm_90a forward kernel of numerics section 4
// (FlashAttention-3 structure with NVFP4 quantization of P in registers). Must match
// reference::attention_forward (src/reference/attention.cpp) run with kv_tile = 128.
//
// Grid (ceil(Nq / 128), Hq, B), 384 threads, one CTA per SM (launch bounds (384, 1)):
//   warpgroup 0: producer (setmaxnreg.dec to 24); one thread issues the TMA loads of Q and of
//                the K/V rings (fwd_load.cuh); with kPacked (88 registers) all 128 threads
//                stage and decode packed NVFP4 tiles instead (fwd_packed.cuh);
//   warpgroups 1, 2: consumers (setmaxnreg.inc to 240), 64 query rows each (fwd_mainloop.cuh:
//                consumer_mainloop_overlap without O' (intra-warpgroup overlap of the softmax
//                with the warpgroup's own PV GEMM), consumer_mainloop with O').
// Before the roles split, the first 256 threads fill the P scale table (p_quant.cuh), published
// by the same __syncthreads as the mbarrier initialization.
// Blocks are taken in reverse m order so that, with the causal mask, the CTAs with the most key
// tiles start first.
#pragma once

#include "cuda/attention/sm90/fwd_config.h"
#include "cuda/attention/sm90/fwd_load.cuh"
#include "cuda/attention/sm90/fwd_mainloop.cuh"
#include "cuda/attention/sm90/fwd_packed.cuh"
#include "cuda/attention/sm90/fwd_params.h"
#include "cuda/attention/sm90/fwd_smem.cuh"
#include "common/mask.h"
#include "cuda/common/p_quant.cuh"
#include "cuda/common/ptx.cuh"
#include "cuda/common/ptx_sm90.cuh"

namespace attnqat::sm90 {

template <class Cfg, class Mask>
__global__ void __launch_bounds__(Cfg::kThreads, 1)
    fwd_kernel(const __grid_constant__ FwdParams p) {
  extern __shared__ uint8_t smem_raw[];
  const SmemMap<Cfg> sm{(cuda::smem_u32(smem_raw) + Cfg::kSmemAlign - 1) & ~(Cfg::kSmemAlign - 1u)};
  const int m_block = static_cast<int>(gridDim.x - 1 - blockIdx.x);
  const int h = blockIdx.y;
  const SeqRows sr = p.seq_rows(blockIdx.z);
  // Packed sequences: the grid covers the longest one; a CTA past its own returns (all threads,
  // before any barrier is set up).
  if (m_block * Cfg::kBlockM >= sr.info.len_q) return;
  // The key blocks this CTA visits, [n_begin, n_begin + n_tiles) (src/common/mask.h).
  const IndexRange kb = key_blocks<Mask>(m_block, Cfg::kBlockM, Cfg::kBlockN, sr.info);
  const int n_begin = kb.begin, n_tiles = kb.empty() ? 0 : kb.end - kb.begin;

  // The P scale table: one entry per thread of the first 256 (filled also in mode bf16, where it
  // goes unread: 2 KB and one division-free pass, not worth a branch).
  static_assert(Cfg::kThreads >= cuda::kPScaleTableEntries, "one table entry per thread");
  static_assert(Cfg::kPScaleBytes == cuda::kPScaleTableBytes, "shared-memory map vs p_quant.cuh");
  if (threadIdx.x < cuda::kPScaleTableEntries)
    cuda::fill_p_scale_entry<Cfg::kF16>(sm.p_scale_table(), threadIdx.x, p.pq.two120_g);
  if (threadIdx.x == 0) {
    // `full`: TMA's one expect_tx arrival, or (kPacked) one per producer thread for the tiles
    // it decodes (Q always; K and V unless p.kv_tma).
    const uint32_t q_arrivals = Cfg::kPacked ? 128 : 1;
    const uint32_t kv_arrivals = Cfg::kPacked && !p.kv_tma ? 128 : 1;
    cuda::mbar_init(sm.q_full(), q_arrivals);
    for (int s = 0; s < Cfg::kStages; ++s) {
      cuda::mbar_init(sm.k_full(s), kv_arrivals);
      cuda::mbar_init(sm.v_full(s), kv_arrivals);
      cuda::mbar_init(sm.k_empty(s), 128 * Cfg::kConsumerWGs);
      cuda::mbar_init(sm.v_empty(s), 128 * Cfg::kConsumerWGs);
    }
    cuda::fence_barrier_init();
  }
  __syncthreads();  // barriers initialized and the table written before anyone uses them

  cuda::split_warpgroups<Cfg::kProducerRegs, Cfg::kConsumerRegs>(
      [&] {
        if constexpr (Cfg::kPacked) {
          if (n_tiles > 0) packed_producer_mainloop<Cfg>(p, sm, m_block, h, sr, n_begin, n_tiles);
        } else if (threadIdx.x == 0 && n_tiles > 0) {
          cuda::prefetch_tma_descriptors(&p.tma_q, &p.tma_k, &p.tma_v);
          producer_mainloop<Cfg>(p, sm, m_block, h, sr, n_begin, n_tiles);
        }
      },
      [&](int wg) {
        if constexpr (Cfg::kOverlap)
          consumer_mainloop_overlap<Cfg, Mask>(p, sm, wg, m_block, h, sr, n_begin, n_tiles);
        else
          consumer_mainloop<Cfg, Mask>(p, sm, wg, m_block, h, sr, n_begin, n_tiles);
      });
}

}  // namespace attnqat::sm90
