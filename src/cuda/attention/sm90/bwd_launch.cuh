// src/cuda/attention/sm90/bwd_launch.cuh — launch_bwd (bwd_launch.h): tensor maps, parameters,
// grid and shared memory of bwd_kernel, beside the kernel's config. Included only by the
// instantiation files bwd_*.cu. Never synchronizes; errors come back as Status.
#pragma once

#include <cuda_runtime_api.h>

#include <string>

#include "cuda/attention/sm90/bwd_kernel.cuh"
#include "cuda/attention/sm90/bwd_launch.h"
#include "cuda/attention/sm90/tma_host.h"
#include "cuda/common/launch.cuh"

namespace attnqat::sm90 {

template <class Cfg, class Mask>
Status launch_bwd(const BwdArgs& a) {
  const int64_t batch = num_sequences(a.q, a.varlen), heads_kv = a.k.shape[1];
  ATTNQAT_RETURN_IF_ERROR(check_grid_limits("attention_backward", "KV heads", heads_kv,
                                            int64_t{1} << 30, "up to 2^30", a.q, a.k));
  BwdParams p{};
  static_cast<AttnParams&>(p) = attn_params(a.q, a.k, a.c2, a.p_quant, a.seq, a.varlen);
  p.extras = a.extras;
  const int64_t n_blocks = (p.seqlen_k + Cfg::kBlockN - 1) / Cfg::kBlockN;
  const int64_t m_blocks = (p.seqlen_q + Cfg::kBlockM - 1) / Cfg::kBlockM;
  ATTNQAT_RETURN_IF_ERROR(make_tma_bhsd(&p.tma_q, a.q, Cfg::kBlockM));
  ATTNQAT_RETURN_IF_ERROR(make_tma_bhsd(&p.tma_do, a.dout, Cfg::kBlockM));
  ATTNQAT_RETURN_IF_ERROR(make_tma_bhsd(&p.tma_k, a.k, Cfg::kBlockN));
  ATTNQAT_RETURN_IF_ERROR(make_tma_bhsd(&p.tma_v, a.v, Cfg::kBlockN));
  p.stats = a.stats;
  p.dq_accum = a.dq_accum;
  p.dq_sem = a.dq_sem;
  p.dkv_str = row_strides(a.dk);
  p.dk = a.dk.data;
  p.dv = a.dv.data;
  p.m_blocks = static_cast<int>(m_blocks);
  p.scale = a.scale;
  p.quant_p = a.quant_p;
  p.deterministic = a.deterministic;

  return cuda::launch_attention_kernel<Cfg, Mask>(bwd_kernel<Cfg, Mask>, p, n_blocks, heads_kv, batch, a.stream,
                                                 "attention_backward");
}

}  // namespace attnqat::sm90
