// src/cuda/attention/sm90/bwd_launch.h — the launchers of the sm90 backward, declared for the
// host entry point (src/cuda/attention/api.cu):
//   launch_bwd<Cfg, Mask>  the main kernel (bwd_kernel.cuh), explicitly instantiated once per
//                          generated file (CMakeLists.txt, from sm90/bwd_instance.cu.in):
//                          2 dtypes x 2 head dims x 3 masks = 12 instantiations; quant_p,
//                          anchored, deterministic and the window's sizes are runtime values
//   launch_bwd_preprocess  the per-row statistics {-LSE/ln 2, D, -m_ref, 1/l} (bwd_aux.cu), and
//                          the rows' dsinks terms
//   launch_dsinks_reduce   dsinks from those terms (bwd_aux.cu)
//   launch_bwd_postprocess dQ = c * dQaccum, rounded to the input dtype (bwd_aux.cu)
// None synchronizes; errors come back as Status.
#pragma once

#include <cuda_runtime_api.h>
#include <vector_types.h>

#include "attnqat/attnqat.h"
#include "cuda/attention/sm90/attn_params.h"
#include "cuda/attention/sm90/bwd_config.h"
#include "common/mask.h"

namespace attnqat::sm90 {

struct BwdArgs {
  TensorView q, k, v;  // the operands the backward uses (fake-quantized or raw), 16-bit
  TensorView dout;     // [B, Hq, Nq, d], last dim contiguous, TMA-compatible strides
  TensorView dk, dv;   // outputs with equal strides, the last dim contiguous
  const float4* stats;  // [B, Hq, m_blocks * 64] (bwd_params.h)
  float* dq_accum;      // zeroed
  int* dq_sem;          // zeroed (deterministic)
  float c2, scale;      // c2 as the forward's (with a softcap: b); scale = c
  SoftcapSinks extras;  // softcap (the kernel); sinks are the preprocess's (dsinks)
  bool quant_p, deterministic;
  PQuant p_quant;  // paper or anchored (used when quant_p)
  MaskKind mask;   // the policy the dispatch instantiates (api.cu with_mask)
  SeqInfo seq;     // the window of LocalMask (attention_seq, common/validate.h)
  VarlenArgs varlen;  // packed sequences (attn_params.h); q, k, v, dout, dk, dv: [1, H, total, d]
  cudaStream_t stream;
};

template <class Cfg, class Mask>
Status launch_bwd(const BwdArgs& a);

// Per padded query row r of [S, Hq, m_blocks * 64] (S sequences): {-LSE/ln 2, D = rowsum(dout *
// o), -m_ref, 1/l}; rows past the sequence's end and rows without keys (LSE = -inf) get {-inf,
// 0, -inf, 0}. m_ref and l may be null (then -inf and 0: the anchored P_F is not used).
struct BwdPreArgs {
  TensorView dout, o;  // [B, Hq, Nq, d], any strides with the last dim contiguous
  const float* lse;    // [B, Hq, Nq] with the strides stat_str (m_ref, l too)
  RowStrides stat_str;
  VarlenArgs varlen;   // packed sequences: B = 1, Nq = total (attn_params.h)
  const float* m_ref;
  const float* l;
  float4* stats;
  int m_blocks;
  // dsinks (numerics 9.10), optional: with dsink_rows set, each row's term p_sink * D goes to
  // dsink_rows [Hq, S, m_blocks * 64] (0 for rows that see no key, padding rows, heads without a
  // sink), for launch_dsinks_reduce. attn: the call's shapes, sequences and sinks (attn.extras);
  // mask: its policy (which rows see no key).
  float* dsink_rows = nullptr;
  AttnParams attn{};
  MaskKind mask = MaskKind::kNone;
  cudaStream_t stream;
};
Status launch_bwd_preprocess(const BwdPreArgs& a);

// dsinks [Hq] (fp32, any stride) = -(sum of each head's rows_per_head terms in dsink_rows), in a
// fixed order (deterministic; bwd_aux.cu).
Status launch_dsinks_reduce(const float* dsink_rows, int64_t rows_per_head, const TensorView& dsinks,
                            cudaStream_t stream);

// dq [B, Hq, Nq, d] (16-bit, any strides with the last dim contiguous) = RN(scale * dq_accum)
// from the fragment-ordered pieces of each sequence (packed sequences: varlen, B = 1).
Status launch_bwd_postprocess(const float* dq_accum, const TensorView& dq, const VarlenArgs& varlen,
                              int m_blocks, float scale, cudaStream_t stream);

}  // namespace attnqat::sm90
