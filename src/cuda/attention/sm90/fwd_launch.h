// src/cuda/attention/sm90/fwd_launch.h — the launcher of the sm90 forward kernel, declared for
// the dispatch (src/cuda/attention/api.cu) and explicitly instantiated once per .cu file in this
// directory (fwd_<dtype>_d<head dim>_<mask>[_ohp|_packed].cu): 2 dtypes x 2 head dims x 2 masks x
// {plain, O', packed} = 24 instantiations. Everything else (paper/anchored, quantized or bf16 mode) is a runtime flag.
#pragma once

#include <cuda_runtime_api.h>

#include "attnqat/attnqat.h"
#include "cuda/attention/sm90/fwd_config.h"
#include "common/mask.h"

namespace attnqat::sm90 {

struct FwdArgs {
  TensorView q, k, v;  // CUDA, bf16 or fp16, already fake-quantized (or mode bf16); with a
                       // kPacked config only their shapes and dtype count (the logical tensors)
  PackedTensor pq, pk, pv;  // kPacked configs: the packed NVFP4 operands (fwd_packed.cuh)
  bool kv_tma = false;      // kPacked: K and V are the decoded tensors k, v (TMA); only Q packed
  ForwardOutputs out;  // validated: contiguous, o_hp used iff the config has kWithOHp
  float c2;            // RN(c * RN(log2 e))
  bool quantize_p;     // mode != bf16
  PQuant p_quant;      // paper or anchored (quantized modes)
  cudaStream_t stream;
};

// Builds the tensor maps and parameters and launches fwd_kernel<Cfg, Mask> on a.stream.
template <class Cfg, class Mask>
Status launch_fwd(const FwdArgs& a);

#define ATTNQAT_SM90_FWD_INSTANCES(X)                                                           \
  X(false, 64, false, NoMask)                                                                   \
  X(false, 64, false, CausalMask) X(false, 64, true, NoMask) X(false, 64, true, CausalMask)     \
      X(false, 128, false, NoMask) X(false, 128, false, CausalMask) X(false, 128, true, NoMask) \
          X(false, 128, true, CausalMask) X(true, 64, false, NoMask)                            \
              X(true, 64, false, CausalMask) X(true, 64, true, NoMask)                          \
                  X(true, 64, true, CausalMask) X(true, 128, false, NoMask)                     \
                      X(true, 128, false, CausalMask) X(true, 128, true, NoMask)                \
                          X(true, 128, true, CausalMask)

#define ATTNQAT_SM90_FWD_EXTERN(F16, D, OHP, MASK) \
  extern template Status launch_fwd<FwdConfig<F16, D, OHP>, MASK>(const FwdArgs&);
ATTNQAT_SM90_FWD_INSTANCES(ATTNQAT_SM90_FWD_EXTERN)
#undef ATTNQAT_SM90_FWD_EXTERN

// Attention from packed NVFP4 tensors (mode fp4, no O'): 2 dtypes x 2 head dims x 2 masks, files
// fwd_<dtype>_d<head dim>_<mask>_packed.cu.
#define ATTNQAT_SM90_FWD_PACKED_INSTANCES(X)                                            \
  X(false, 64, NoMask) X(false, 64, CausalMask) X(false, 128, NoMask)                   \
      X(false, 128, CausalMask) X(true, 64, NoMask) X(true, 64, CausalMask)             \
          X(true, 128, NoMask) X(true, 128, CausalMask)

#define ATTNQAT_SM90_FWD_PACKED_EXTERN(F16, D, MASK) \
  extern template Status launch_fwd<FwdConfig<F16, D, false, true>, MASK>(const FwdArgs&);
ATTNQAT_SM90_FWD_PACKED_INSTANCES(ATTNQAT_SM90_FWD_PACKED_EXTERN)
#undef ATTNQAT_SM90_FWD_PACKED_EXTERN

}  // namespace attnqat::sm90
