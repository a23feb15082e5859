// Host entry points of the CUDA attention kernels (src/cuda/attention/api.cu, packed.cu), called
// by src/api.cpp after validate_attention_*(). Only built with CUDA.
#pragma once

#include "attnqat/attnqat.h"

namespace attnqat::sm90 {
struct VarlenArgs;  // attn_params.h
}  // namespace attnqat::sm90

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

// The same on packed sequences (attnqat.h, VarlenSeqs): one launch for every sequence's tiles.
Status attention_forward_varlen(const TensorView& q, const TensorView& k, const TensorView& v,
                                const VarlenSeqs& seqs, const AttentionOptions& opts,
                                const ForwardOutputs& out, void* stream);
Status attention_backward_varlen(const TensorView& dout, const TensorView& q, const TensorView& k,
                                 const TensorView& v, const VarlenSeqs& seqs,
                                 const ForwardState& saved, const AttentionOptions& opts,
                                 const BackwardOutputs& grads, void* stream);

// Forward of mode fp4 from packed NVFP4 q, k, v (packed.cu): the sm90 forward unpacks them in
// the kernel, or they are dequantized (exact) into stream-ordered bf16/fp16 temporaries that the
// forward reads with inputs_quantized; the operands are the same bit for bit either way. `unpack`
// chooses (attnqat.h: PackedUnpack).
Status attention_forward_packed(const PackedTensor& q, const PackedTensor& k, const PackedTensor& v,
                                const AttentionOptions& opts, const ForwardOutputs& out,
                                void* stream, PackedUnpack unpack);

// ---- Inside the backend: the sm90 forward of api.cu, run by packed.cu ----------------------

// The NVFP4 operands that the sm90 forward unpacks in the kernel (sm90/fwd_packed.cuh).
struct PackedOperands {
  const PackedTensor* q;
  const PackedTensor* k;
  const PackedTensor* v;
  bool kv_unpacked;  // only q is unpacked in the kernel; k, v are read from the 16-bit views
};

// The sm90 forward on q, k, v after the checks that only the kernel needs (the key tile of
// p_quant 'paper', output alignment, the device). packed == nullptr: the ordinary forward
// (fake-quantizing q, k, v into temporaries when the mode quantizes and !opts.inputs_quantized);
// otherwise q, k, v are the logical [B, H, N, d] views of the packed operands (their shapes and
// dtype; the data of k, v is read only with kv_unpacked) and the dtype and head dim are supported
// (bfloat16/float16, 64/128). varlen: packed sequences, q, k, v and out being the [1, H, total,
// ...] views (nullptr: dense).
Status sm90_forward(const TensorView& q, const TensorView& k, const TensorView& v,
                    const AttentionOptions& opts, const ForwardOutputs& out, void* stream,
                    const PackedOperands* packed, const sm90::VarlenArgs* varlen = nullptr);

}  // namespace attnqat::cuda
