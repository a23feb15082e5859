// src/cuda/attention/sm90/fwd_kernel.cuh — the sm_90a forward kernel of numerics section 4
// (FlashAttention-3 structure with NVFP4 quantization of P in registers). Must match
// reference::attention_forward (src/reference/attention.cpp) run with kv_tile = 128.
//
// Grid (ceil(Nq / 128), Hq, B), 384 threads, one CTA per SM (launch bounds (384, 1)):
//   warpgroup 0: producer (setmaxnreg.dec to 24); one thread issues the TMA loads of Q and of
//                the K/V rings (fwd_load.cuh);
//   warpgroups 1, 2: consumers (setmaxnreg.inc to 240), 64 query rows each (fwd_mainloop.cuh).
// Blocks are taken in reverse m order so that, with the causal mask, the CTAs with the most key
// tiles start first.
#pragma once

#include "cuda/attention/sm90/fwd_config.h"
#include "cuda/attention/sm90/fwd_load.cuh"
#include "cuda/attention/sm90/fwd_mainloop.cuh"
#include "cuda/attention/sm90/fwd_params.h"
#include "cuda/attention/sm90/fwd_smem.cuh"
#include "cuda/attention/sm90/mask.cuh"
#include "cuda/attention/sm90/ptx.cuh"

namespace attnqat::sm90 {

template <class Cfg, class Mask>
__global__ void __launch_bounds__(Cfg::kThreads, 1)
    fwd_kernel(const __grid_constant__ FwdParams p) {
  extern __shared__ uint8_t smem_raw[];
  const SmemMap<Cfg> sm{(smem_u32(smem_raw) + Cfg::kSmemAlign - 1) & ~(Cfg::kSmemAlign - 1u)};
  const int m_block = static_cast<int>(gridDim.x - 1 - blockIdx.x);
  const int h = blockIdx.y, b = blockIdx.z;
  const int n_tiles =
      num_key_tiles<Mask>(m_block, Cfg::kBlockM, Cfg::kBlockN, p.seqlen_q, p.seqlen_k);

  if (threadIdx.x == 0) {
    mbar_init(sm.q_full(), 1);
    for (int s = 0; s < Cfg::kStages; ++s) {
      mbar_init(sm.k_full(s), 1);
      mbar_init(sm.v_full(s), 1);
      mbar_init(sm.k_empty(s), 128 * Cfg::kConsumerWGs);
      mbar_init(sm.v_empty(s), 128 * Cfg::kConsumerWGs);
    }
    fence_barrier_init();
  }
  __syncthreads();  // barriers initialized before anyone waits on or arrives at them

  const int warpgroup = threadIdx.x / 128;
  if (warpgroup == 0) {
    setmaxnreg_dec<Cfg::kProducerRegs>();
    if (threadIdx.x == 0 && n_tiles > 0) {
      prefetch_tma_descriptor(&p.tma_q);
      prefetch_tma_descriptor(&p.tma_k);
      prefetch_tma_descriptor(&p.tma_v);
      producer_mainloop<Cfg>(p, sm, m_block, h, b, n_tiles);
    }
  } else {
    setmaxnreg_inc<Cfg::kConsumerRegs>();
    consumer_mainloop<Cfg, Mask>(p, sm, warpgroup - 1, m_block, h, b, n_tiles);
  }
}

}  // namespace attnqat::sm90
