// src/cuda/attention/sm90/fwd_launch.cuh — launch_fwd (fwd_launch.h): tensor maps, parameters,
// grid and shared memory of fwd_kernel, beside the kernel's config. Included only by the
// instantiation files fwd_*.cu. Never synchronizes; errors come back as Status.
#pragma once

#include <cuda_runtime_api.h>

#include <string>

#include "cuda/attention/sm90/fwd_kernel.cuh"
#include "cuda/attention/sm90/fwd_launch.h"
#include "cuda/attention/sm90/tma_host.h"
#include "cuda/common/launch.cuh"

namespace attnqat::sm90 {

// The kernel's view of a packed operand (uint8 strides are byte strides).
inline PackedOperand packed_operand(const PackedTensor& t) {
  PackedOperand o{};
  o.data = static_cast<const uint8_t*>(t.data.data);
  o.scales = static_cast<const uint8_t*>(t.scales.data);
  o.g = static_cast<const float*>(t.global_scale.data);
  for (int i = 0; i < 3; ++i) {
    o.data_stride[i] = t.data.stride[i];
    o.scale_stride[i] = t.scales.stride[i];
  }
  o.rows = static_cast<int>(t.data.shape[2]);
  return o;
}

template <class Cfg, class Mask>
Status launch_fwd(const FwdArgs& a) {
  const int64_t batch = num_sequences(a.q, a.varlen), heads_q = a.q.shape[1];
  const int64_t seqlen_k = a.k.shape[2];
  ATTNQAT_RETURN_IF_ERROR(check_grid_limits("attention_forward", "heads", heads_q,
                                            (int64_t{1} << 31) - Cfg::kBlockM, "below 2^31", a.q,
                                            a.k));
  FwdParams p{};
  static_cast<AttnParams&>(p) = attn_params(a.q, a.k, a.c2, a.p_quant, a.seq, a.varlen);
  p.extras = a.extras;
  const int64_t m_blocks = (p.seqlen_q + Cfg::kBlockM - 1) / Cfg::kBlockM;
  if constexpr (Cfg::kPacked) {
    p.pk_q = packed_operand(a.pq);
    p.kv_tma = a.kv_tma;
    if (!a.kv_tma) {
      p.pk_k = packed_operand(a.pk);
      p.pk_v = packed_operand(a.pv);
    }
  } else {
    ATTNQAT_RETURN_IF_ERROR(make_tma_bhsd(&p.tma_q, a.q, Cfg::kBlockM));
  }
  if ((!Cfg::kPacked || a.kv_tma) && seqlen_k > 0) {  // Nk = 0: no tile is loaded; a map needs dims > 0
    ATTNQAT_RETURN_IF_ERROR(make_tma_bhsd(&p.tma_k, a.k, Cfg::kBlockN));
    ATTNQAT_RETURN_IF_ERROR(make_tma_bhsd(&p.tma_v, a.v, Cfg::kBlockN));
  }
  p.o_str = row_strides(a.out.o);
  p.stat_str = row_strides(a.out.lse);
  p.o = a.out.o.data;
  p.o_hp = Cfg::kWithOHp ? a.out.o_hp.data : nullptr;
  p.lse = static_cast<float*>(a.out.lse.data);
  p.m_ref = static_cast<float*>(a.out.m_ref.data);
  p.l = static_cast<float*>(a.out.l.data);
  p.quantize_p = a.quantize_p;

  return cuda::launch_attention_kernel<Cfg, Mask>(fwd_kernel<Cfg, Mask>, p, m_blocks, heads_q, batch, a.stream,
                                                 "attention_forward");
}

}  // namespace attnqat::sm90
