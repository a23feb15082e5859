// Reference (CPU) implementations of the FP4 inference entry points: attention from
// packed NVFP4 tensors, the paged FP4 KV cache append, and decode attention over the cache.
// Arguments are validated by the caller (src/api.cpp); these assume valid input.
//
// All three are compositions of the reference's own pieces, so that their numerics are those of
// mode `fp4` by construction:
//   packed forward = dequantize (exact) + attention_forward(inputs_quantized)
//   append         = quantize_block_nv (g = 1) of each 16-channel block, packed into its page
//   decode         = gather + dequantize the cache (exact), fake-quantize Q (g = 1), then
//                    attention_forward(mode fp4, causal bottom-right with the window
//                    (window_left, 0), kv_tile 128, inputs_quantized) per sequence
#pragma once

#include <vector>

#include "attnqat/attnqat.h"
#include "common/validate.h"

namespace attnqat::reference {

Status attention_forward_packed(const PackedTensor& q, const PackedTensor& k, const PackedTensor& v,
                                const AttentionOptions& opts, const ForwardOutputs& out);

Status kv_cache_append(const PagedKVCache& cache, const KVCacheDims& dims, const TensorView& k_new,
                       const TensorView& v_new, const IndexView& page_table,
                       const IndexView& start);

// `base` supplies what DecodeOptions does not (precision: kFloat64 / kBF16Operands give the
// tests' high-precision reference and low-precision emulation); its mode, causality, window, tile
// and p_quant are overwritten from the decode semantics and `opts`.
Status decode_attention(const TensorView& q, const PagedKVCache& cache, const KVCacheDims& dims,
                        const IndexView& page_table, const IndexView& seq_lens,
                        const DecodeOptions& opts, const TensorView& out, const TensorView& lse,
                        const AttentionOptions& base = AttentionOptions{});

// K^ or V^ of one sequence, dequantized from the cache: [Hkv, len, D] fp32, contiguous.
std::vector<float> gather_cache(const TensorView& data, const TensorView& scales,
                                const KVCacheDims& dims, const IndexView& page_table, int64_t b,
                                int64_t len);

}  // namespace attnqat::reference
