// Host entry points of the CUDA attention kernels (src/cuda/attention/*.cu), called by
// src/api.cpp after validate_attention_*(). Only built with CUDA.
#pragma once

#include "attnqat/attnqat.h"

namespace attnqat::cuda {

// Forward of numerics section 4 on CUDA tensors. When opts.inputs_quantized is false and the
// mode quantizes, q, k, v are first fake-quantized into stream-ordered temporaries.
Status attention_forward(const TensorView& q, const TensorView& k, const TensorView& v,
                         const AttentionOptions& opts, const ForwardOutputs& out, void* stream);

// Backward of numerics section 5 on CUDA tensors (sm90), with the switches of section 6 and the
// row statistics of 9.4. When bwd_quantized_qkv applies and opts.inputs_quantized is false, q, k,
// v are fake-quantized into stream-ordered temporaries; when it does not (drop_in_qat), the row
// statistics are recomputed from the unquantized scores by a bf16 forward pass. Deterministic
// mode: no floating-point atomics (ordered dQ accumulation).
Status attention_backward(const TensorView& dout, const TensorView& q, const TensorView& k,
                          const TensorView& v, const ForwardState& saved,
                          const AttentionOptions& opts, const BackwardOutputs& grads, void* stream);

// Forward of mode fp4 from packed NVFP4 q, k, v, decoded inside the sm90 kernel (exact; the
// same result as attention_forward on the dequantized tensors, bit for bit). lq, lk, lv: the
// logical [B, H, N, d] views (shapes and the output dtype). Only for the layouts that
// packed_forward_fusable() accepts; src/cuda/decode/api.cu decodes the others into temporaries.
// packed_operand_fusable: one operand's layout (rows of codes and scales contiguous and aligned)
// and head dim (64, 128) suit the in-kernel decode, for an output o of bf16/fp16.
// kv_decoded: only q is decoded in the kernel; lk, lv are the decoded K, V (k, v unused).
bool packed_operand_fusable(const PackedTensor& t, const TensorView& o);
bool packed_forward_fusable(const PackedTensor& q, const PackedTensor& k, const PackedTensor& v,
                            const AttentionOptions& opts, const TensorView& o);
Status attention_forward_from_packed(const PackedTensor& q, const PackedTensor& k,
                                     const PackedTensor& v, const TensorView& lq,
                                     const TensorView& lk, const TensorView& lv,
                                     const AttentionOptions& opts, const ForwardOutputs& out,
                                     void* stream, bool kv_decoded = false);

}  // namespace attnqat::cuda
