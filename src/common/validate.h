// The one argument validation shared by every backend (CPU reference, CUDA kernels). Each
// public entry point calls the matching validate_*() before it dispatches; a message names the
// argument, what was expected and what came.
#pragma once

#include "attnqat/attnqat.h"
#include "common/mask.h"

namespace attnqat {

// What the backends take (messages list these): head dims, multiples of 16 up to kMaxHeadDim on
// the CPU reference (64 and 128 in the CUDA kernels, which report that themselves), and the
// online softmax's key tile.
constexpr int kMaxHeadDim = 256;
constexpr int kMaxKvTile = 4096;

// The options of an attention call, without tensors: enum values in range, kv_tile,
// softmax_scale, softcap (0 or positive, finite), the window's sides (-1 or >= 0), v_blocks
// 'token' only without the causal mask (or a window whose right side is 0); opts.sinks, a
// tensor, is checked with q by validate_attention_forward/backward. Every validate_attention_* calls
// it, and the Python binding exposes it (attnqat._C.validate_attention_options) so that the
// front end checks a configuration when it resolves one: each option is checked here and
// nowhere else.
Status validate_attention_options(const AttentionOptions& opts);
// The mask of an attention call (numerics section 3): no mask, causal, or a sliding window
// (LocalMask). causal clamps the window's right side to 0; a window that comes out as (-1, 0)
// is kCausal and (-1, -1) kNone, so only a bounded window is kLocal.
MaskKind attention_mask_kind(const AttentionOptions& opts);
// One sequence of that mask: the lengths, and the window (causal-clamped) for kLocal.
SeqInfo attention_seq(const AttentionOptions& opts, int64_t len_q, int64_t len_k);
// The options of decode_attention(): softmax_scale, p_quant, num_splits, max_seq_len, window_left.
Status validate_decode_options(const DecodeOptions& opts);
// QuantizeOptions: format and axis in range.
Status validate_quantize_options(const QuantizeOptions& opts);
// softmax_scale as the structs hold it: finite and >= 0 (0: 1/sqrt(head_dim)).
Status check_softmax_scale(float softmax_scale);
// A softmax scale given explicitly as a number (Python: not None): a positive finite number that
// stays positive and finite in float32 (0 would mean "the default"); *out receives it.
Status softmax_scale_from_double(double value, float* out);

// The key tile of the CUDA kernels and of the FP4 decode (paged cache): 128 keys.
constexpr int kKernelKvTile = 128;
// p_quant 'paper' depends on the key tile; paths with a fixed tile of kKernelKvTile keys (the
// CUDA attention kernels, decode over the FP4 KV cache) call this: in a quantized mode with
// p_quant 'paper', opts.kv_tile must be kKernelKvTile.
Status check_paper_kv_tile(const AttentionOptions& opts);

// Shapes of the packed outputs of quantize() for an input of the given shape.
struct PackedShapes {
  int ndim = 0;
  int64_t data[kMaxDims] = {};
  int64_t scales[kMaxDims] = {};
};
PackedShapes packed_shapes(const TensorView& x, const QuantizeOptions& opts);

Status validate_quantize(const TensorView& x, const TensorView& data, const TensorView& scales,
                         const TensorView& global_scale, const QuantizeOptions& opts);
Status validate_dequantize(const TensorView& data, const TensorView& scales,
                           const TensorView& global_scale, const TensorView& out,
                           const QuantizeOptions& opts);
Status validate_fake_quantize(const TensorView& x, const TensorView& out,
                              const TensorView& global_scale, const QuantizeOptions& opts);

Status validate_attention_forward(const TensorView& q, const TensorView& k, const TensorView& v,
                                  const AttentionOptions& opts, const ForwardOutputs& out);
Status validate_attention_backward(const TensorView& dout, const TensorView& q,
                                   const TensorView& k, const TensorView& v,
                                   const ForwardState& saved, const AttentionOptions& opts,
                                   const BackwardOutputs& grads);

// Packed sequences (attnqat.h, VarlenSeqs): the 3-D/2-D layouts, the offsets (their values on
// the CPU), v_blocks, and every rule of the dense call on the [1, H, total, D] views.
Status validate_attention_varlen_forward(const TensorView& q, const TensorView& k,
                                         const TensorView& v, const VarlenSeqs& seqs,
                                         const AttentionOptions& opts, const ForwardOutputs& out);
Status validate_attention_varlen_backward(const TensorView& dout, const TensorView& q,
                                          const TensorView& k, const TensorView& v,
                                          const VarlenSeqs& seqs, const ForwardState& saved,
                                          const AttentionOptions& opts,
                                          const BackwardOutputs& grads);
// [total, H, D] as the [1, H, total, D] view of the same memory, [H, total] as [1, H, total];
// other ranks unchanged.
TensorView varlen_view(const TensorView& t);

// ---- FP4 inference -------------------------------------------------------------------------

// The logical shape of a packed NVFP4 tensor (what dequantize() would produce), or an error.
// `axis` is the block axis of the packing (kToken only for V with token blocks).
Status packed_logical_shape(const PackedTensor& p, const char* name, BlockAxis axis,
                            int64_t logical[4], int64_t head_dim_hint);
Status validate_attention_forward_packed(const PackedTensor& q, const PackedTensor& k,
                                         const PackedTensor& v, const AttentionOptions& opts,
                                         const ForwardOutputs& out);

// Dimensions of a paged FP4 KV cache, read off its tensors by validate_kv_cache().
struct KVCacheDims {
  int64_t num_pages = 0, heads = 0, page_size = 0, head_dim = 0;
};
Status validate_kv_cache(const PagedKVCache& cache, KVCacheDims* dims);
Status validate_kv_cache_append(const PagedKVCache& cache, const TensorView& k_new,
                                const TensorView& v_new, const IndexView& page_table,
                                const IndexView& start, KVCacheDims* dims);
// CPU index tensors only (the host can read them): every page id that a token in [0, end[b])
// needs lies in [0, num_pages), and end[b] <= the page table's capacity. end = start + n_new for
// an append, seq_lens for the decode.
Status validate_page_values(const IndexView& page_table, const IndexView& lens, int64_t add,
                            const KVCacheDims& dims);
Status validate_decode_attention(const TensorView& q, const PagedKVCache& cache,
                                 const IndexView& page_table, const IndexView& seq_lens,
                                 const DecodeOptions& opts, const TensorView& out,
                                 const TensorView& lse, KVCacheDims* dims);

// True when the forward must produce O' for the backward that the options describe.
bool needs_o_hp(const AttentionOptions& opts);
// The softmax scale c actually used (1/sqrt(D) when opts.softmax_scale <= 0).
float resolve_softmax_scale(const AttentionOptions& opts, int64_t head_dim);
// Whether a view is given (a tensor, possibly empty) rather than left undefined: opts.sinks and
// BackwardOutputs::dsinks are optional.
bool has_sinks_tensor(const TensorView& t);
// Whether the call has attention sinks (opts.sinks given; numerics 9.10).
bool has_sinks(const AttentionOptions& opts);

}  // namespace attnqat
