// src/cuda/attention/sm90/fwd_launch.h — the launcher of the sm90 forward kernel, declared for
// the dispatch (src/cuda/attention/api.cu) and explicitly instantiated once per generated .cu
// file (src/cuda/attention/CMakeLists.txt writes them from sm90/fwd_instance.cu.in): 2 dtypes x
// 2 head dims x 3 masks (none, causal, local) x {plain, O', packed} = 36 instantiations.
// Everything else (paper/anchored, quantized or bf16 mode, the window's sizes) is a runtime value.
#pragma once

#include <cuda_runtime_api.h>

#include "attnqat/attnqat.h"
#include "cuda/attention/sm90/attn_params.h"
#include "cuda/attention/sm90/fwd_config.h"
#include "common/mask.h"

namespace attnqat::sm90 {

struct FwdArgs {
  TensorView q, k, v;  // CUDA, bf16 or fp16, already fake-quantized (or mode bf16); with a
                       // kPacked config only their shapes and dtype count (the logical tensors)
  PackedTensor pq, pk, pv;  // kPacked configs: the packed NVFP4 operands (fwd_packed.cuh)
  bool kv_tma = false;      // kPacked: K and V are the decoded tensors k, v (TMA); only Q packed
  ForwardOutputs out;  // validated: contiguous, o_hp used iff the config has kWithOHp
  float c2;            // RN(c * RN(log2 e)); with a softcap b = RN(softcap * RN(log2 e))
  SoftcapSinks extras;  // softcap and sinks (attn_params.h)
  bool quantize_p;     // mode != bf16
  PQuant p_quant;      // paper or anchored (quantized modes)
  MaskKind mask;       // the policy the dispatch instantiates (api.cu with_mask)
  SeqInfo seq;         // the window of LocalMask (attention_seq, common/validate.h)
  VarlenArgs varlen;   // packed sequences (attn_params.h); q, k, v, out are [1, H, total, ...]
  cudaStream_t stream;
};

// Builds the tensor maps and parameters and launches fwd_kernel<Cfg, Mask> on a.stream.
template <class Cfg, class Mask>
Status launch_fwd(const FwdArgs& a);

}  // namespace attnqat::sm90
