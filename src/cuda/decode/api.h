// Host entry points of the CUDA FP4 inference paths (src/cuda/decode/*.cu), called by
// src/api.cpp after validation. Only built with CUDA.
#pragma once

#include "attnqat/attnqat.h"
#include "common/validate.h"

namespace attnqat::cuda {

// Packed NVFP4 Q, K, V -> the sm90 forward that decodes them in-kernel, or dequantize (exact)
// into stream-ordered bf16/fp16 temporaries -> the sm90 forward with inputs_quantized (the
// operands bit for bit either way); `decode` chooses (attnqat.h).
Status attention_forward_packed(const PackedTensor& q, const PackedTensor& k, const PackedTensor& v,
                                const AttentionOptions& opts, const ForwardOutputs& out,
                                void* stream, PackedUnpack unpack);

Status kv_cache_append(const PagedKVCache& cache, const KVCacheDims& dims, const TensorView& k_new,
                       const TensorView& v_new, const IndexView& page_table,
                       const IndexView& start, void* stream);

Status decode_attention(const TensorView& q, const PagedKVCache& cache, const KVCacheDims& dims,
                        const IndexView& page_table, const IndexView& seq_lens,
                        const DecodeOptions& opts, const TensorView& out, const TensorView& lse,
                        void* stream);

}  // namespace attnqat::cuda
