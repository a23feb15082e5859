// Host entry points of token-by-token generation on CUDA (src/cuda/decode/*.cu): the paged FP4
// KV cache append and decode attention over the cache. Called by src/api.cpp after validation.
// Only built with CUDA. (Attention from packed NVFP4 tensors: src/cuda/attention/api.h.)
#pragma once

#include "attnqat/attnqat.h"
#include "common/validate.h"

namespace attnqat::cuda {

Status kv_cache_append(const PagedKVCache& cache, const KVCacheDims& dims, const TensorView& k_new,
                       const TensorView& v_new, const IndexView& page_table,
                       const IndexView& start, void* stream);

Status decode_attention(const TensorView& q, const PagedKVCache& cache, const KVCacheDims& dims,
                        const IndexView& page_table, const IndexView& seq_lens,
                        const DecodeOptions& opts, const TensorView& out, const TensorView& lse,
                        void* stream);

}  // namespace attnqat::cuda
