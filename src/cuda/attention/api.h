// Host entry points of the CUDA attention kernels (src/cuda/attention/*.cu), called by
// src/api.cpp after validate_attention_*(). Only built with CUDA.
#pragma once

#include "attnqat/attnqat.h"

namespace attnqat::cuda {

// Forward of numerics section 4 on CUDA tensors. When opts.inputs_quantized is false and the
// mode quantizes, q, k, v are first fake-quantized into stream-ordered temporaries.
Status attention_forward(const TensorView& q, const TensorView& k, const TensorView& v,
                         const AttentionOptions& opts, const ForwardOutputs& out, void* stream);

}  // namespace attnqat::cuda
