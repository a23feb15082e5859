// attnqat/attnqat.h — the public C++ API of attnqat.
//
// Every entry point validates its arguments first (src/common/validate.cpp, shared by all
// backends, the one check of every option struct below) and returns a Status. The Python
// binding exposes the option structs as classes with the same fields (attnqat._C.AttentionOptions,
// DecodeOptions, QuantizeOptions), named as the Python keyword arguments. Tensors on the CPU run the reference (src/reference); tensors on
// a CUDA device run the kernels when the library was built with CUDA (build_info()). `stream` is
// a cudaStream_t passed as void* (ignored on the CPU); nothing here synchronizes the device.
#pragma once

#include <string>

#include "attnqat/formats.h"
#include "attnqat/tensor.h"

namespace attnqat {

// ---- Build information ---------------------------------------------------------------------

struct BuildInfo {
  std::string version;
  bool cuda = false;           // CUDA kernels compiled in
  std::string cuda_archs;      // e.g. "90a"
  std::string cuda_version;    // toolkit used to build, e.g. "13.0"
};
BuildInfo build_info();

// ---- Quantization (numerics sections 2, 3, 7) ----------------------------------------------

enum class Format : uint8_t { kNVFP4, kMXFP4 };

// Which axis the blocks run along.
//  kLast:  the last axis (Q, K, V with channel blocks). x [..., L]: data [..., L/2],
//          scales [..., L/block]. L must be a multiple of the block size.
//  kToken: the second-to-last axis of x [..., N, D] (V with token blocks): blocks of 16
//          consecutive tokens per channel, the last one zero-padded. data [..., D, ceil(N/16)*8],
//          scales [..., D, ceil(N/16)]. NVFP4 only.
enum class BlockAxis : uint8_t { kLast, kToken };

struct QuantizeOptions {
  Format format = Format::kNVFP4;
  BlockAxis axis = BlockAxis::kLast;
  // NVFP4 second-level scale g: a one-element fp32 tensor on the device of x. When
  // `compute_global_scale` is true the op first writes nvfp4_global_scale(amax(x)) into it;
  // otherwise it reads it (a positive power of two). Unused (may be undefined) for MXFP4.
  bool compute_global_scale = false;
};

// x (fp32/fp16/bf16, last axis contiguous) -> packed codes (uint8) and scales (uint8).
Status quantize(const TensorView& x, const TensorView& data, const TensorView& scales,
                const TensorView& global_scale, const QuantizeOptions& opts, void* stream = nullptr);
// packed codes + scales -> out (fp32/fp16/bf16, shape of the original x). Exact.
Status dequantize(const TensorView& data, const TensorView& scales, const TensorView& global_scale,
                  const TensorView& out, const QuantizeOptions& opts, void* stream = nullptr);
// out = dequantize(quantize(x)), same shape; out may alias x.
Status fake_quantize(const TensorView& x, const TensorView& out, const TensorView& global_scale,
                     const QuantizeOptions& opts, void* stream = nullptr);

// ---- Attention (numerics sections 3-6) -----------------------------------------------------

enum class Mode : uint8_t { kBF16, kFP4, kDropInQAT, kAttnQAT };
enum class PQuant : uint8_t { kPaper, kAnchored };
enum class VBlocks : uint8_t { kChannel, kToken };

const char* mode_name(Mode m);

// The ablation switches of numerics section 6. attn_qat: all on; drop_in_qat: all off.
struct BackwardSwitches {
  bool quantized_qkv = true;      // recompute S from the quantized Q, K, V
  bool quant_p = true;            // use P_F (quantized P) for dV
  bool high_precision_o = true;   // D = rowsum(dO * O') instead of rowsum(dO * O)
};
BackwardSwitches default_switches(Mode m);

// Arithmetic of the CPU reference. kFloat32 is the contract; kFloat64 accumulates (dot
// products, exp2, row sums, outputs) in double for tests; kBF16Operands rounds the operands of
// the P.V products (P~, and P in bf16 mode) and of the backward's dS/P products to bf16 before
// multiplying, as tensor cores do — the "low-precision emulation" the tolerances are built on.
enum class Precision : uint8_t { kFloat32, kFloat64, kBF16Operands };

struct AttentionOptions {
  Mode mode = Mode::kAttnQAT;
  PQuant p_quant = PQuant::kPaper;
  VBlocks v_blocks = VBlocks::kChannel;
  bool causal = false;           // bottom-right aligned
  // Sliding window (numerics section 3), bottom-right aligned like causal: query row i, with
  // d = i + Nk - Nq, sees keys d - window_left <= j <= d + window_right; -1 leaves that side
  // unbounded ((-1, -1): no window). With causal, window_right is 0 (FlashAttention's
  // window_size with causal=True), so (-1, 0) and causal are the same mask. CPU reference only:
  // the CUDA kernels return NotImplemented for a window that is neither causal nor no mask.
  int window_left = -1;
  int window_right = -1;
  float softmax_scale = 0.0f;    // c > 0; 0 means 1/sqrt(D)
  // Logit soft-capping (Gemma 2; numerics 9.9): the scores s = c * q_hat.k_hat become
  // softcap * tanh(s / softcap) before the softmax. 0: off; otherwise a positive finite number.
  float softcap = 0.0f;
  // Attention sinks (GPT-OSS; numerics 9.10): one logit per query head, a float32 tensor [Hq] on
  // the device of q, that takes probability mass in the softmax but has no value row. Undefined
  // (data == nullptr): no sinks; a head whose sink is -inf has none. NaN and +inf are errors.
  // The one tensor among the options: the Python binding takes it as an argument of
  // attention_forward/attention_backward (keyword `sinks`), not as an attribute.
  // softcap and sinks run on the CPU reference and in the CUDA attention kernels (not in the
  // FP4 decode).
  TensorView sinks{};
  int kv_tile = 128;             // keys per tile of the online softmax (matters for "paper")
  BackwardSwitches bwd{};        // used by the backward (and to decide whether O' is needed)
  Precision precision = Precision::kFloat32;  // CPU reference only
  // q, k, v are already fake-quantized as numerics section 3 says (e.g. by fake_quantize(), with
  // v_blocks' axis): the call skips their quantization. The PyTorch front end quantizes once,
  // keeps Q^, K^, V^ for the backward, and sets this. Ignored in bf16 mode.
  bool inputs_quantized = false;
  // Backward: the same bits on every run (no floating-point atomics). The CPU reference always
  // is; the CUDA backward pays for it in speed (docs/results.md).
  bool deterministic = false;
};

// Forward outputs. q [B, Hq, Nq, D]; k, v [B, Hkv, Nk, D].
//  o     [B, Hq, Nq, D]  dtype of q
//  o_hp  [B, Hq, Nq, D]  O' (high-precision output); leave undefined (data == nullptr) to skip
//  lse   [B, Hq, Nq]     fp32, natural log; -inf for rows that see no key
//  m_ref [B, Hq, Nq]     fp32, the final reference max of each row (log2 units)    } optional:
//  l     [B, Hq, Nq]     fp32, the final row sum of the unquantized p~            } both or none
struct ForwardOutputs {
  TensorView o, o_hp, lse, m_ref, l;
};

Status attention_forward(const TensorView& q, const TensorView& k, const TensorView& v,
                         const AttentionOptions& opts, const ForwardOutputs& out,
                         void* stream = nullptr);

// What the backward reads from the forward: o (needed when D uses O), o_hp (when D uses O'),
// lse, and m_ref + l (anchored mode).
struct ForwardState {
  TensorView o, o_hp, lse, m_ref, l;
};
struct BackwardOutputs {
  TensorView dq, dk, dv;  // shapes and dtypes of q, k, v
  // The gradient of opts.sinks: float32 [Hq]. Optional (leave undefined when the sinks need no
  // gradient); an error without opts.sinks.
  TensorView dsinks;
};

Status attention_backward(const TensorView& dout, const TensorView& q, const TensorView& k,
                          const TensorView& v, const ForwardState& saved,
                          const AttentionOptions& opts, const BackwardOutputs& grads,
                          void* stream = nullptr);

// A non-owning view of an int32 tensor of at most 2 dimensions (sequence offsets, page tables,
// lengths). TensorView has no integer dtypes; the binding checks the dtype before it builds one
// of these.
struct IndexView {
  const int32_t* data = nullptr;
  Device device = Device::kCPU;
  int device_id = 0;
  int ndim = 0;
  int64_t shape[2] = {};
  int64_t stride[2] = {};  // in elements
  const char* name = "index";
  int64_t numel() const { return ndim == 0 ? 1 : ndim == 1 ? shape[0] : shape[0] * shape[1]; }
};

// ---- Packed sequences (varlen) --------------------------------------------------------------
//
// S sequences of different lengths in one call, without padding (the layout of FlashAttention's
// varlen functions): q [total_q, Hq, D], k and v [total_k, Hkv, D] (last dim contiguous);
// sequence s owns the rows [cu_seqlens_q[s], cu_seqlens_q[s + 1]) of q and [cu_seqlens_k[s],
// cu_seqlens_k[s + 1]) of k and v, and attends only to its own keys, exactly as a separate call
// on its rows would (masks, windows and P's key tiles are per sequence; numerics section 3).
// cu_seqlens_*: int32 [S + 1] on the tensors' device, cu[0] = 0, non-decreasing, cu[S] = total.
// max_seqlen_*: at least every sequence's length (the CUDA grid's extent; the CPU checks the
// offsets, CUDA reads them only on the device and trusts them, as FlashAttention does).
// v_blocks must be 'channel' (a 16-token V block would straddle sequences).
// seqused_k (optional, int32 [S], FlashAttention's seqused_k): sequence s has only the first
// seqused_k[s] keys of its rows (0 .. its range's length; CUDA clamps, the CPU checks); the rest
// are padding that no query sees (masks align to the used length) and whose dK, dV are 0; the
// CUDA kernels read the padding rows of the key tile that holds a sequence's last used key (with
// probability 0: keep them finite, numerics 9.7). With
// it a padded batch [B, Nk] of key-padding masks (e.g. a text encoder's) runs as one call:
// cu_seqlens_k = 0, Nk, 2 Nk, ..., seqused_k = the valid lengths.
// Outputs: o, o_hp [total_q, Hq, D] and dq [total_q, Hq, D], dk, dv [total_k, Hkv, D]
// (contiguous); lse, m_ref, l [Hq, total_q] fp32 (contiguous); dout like o (last dim contiguous).
struct VarlenSeqs {
  IndexView cu_seqlens_q, cu_seqlens_k;
  int64_t max_seqlen_q = 0, max_seqlen_k = 0;
  IndexView seqused_k;  // optional (data == nullptr: every key of a sequence's range is used)
};

Status attention_forward_varlen(const TensorView& q, const TensorView& k, const TensorView& v,
                                const VarlenSeqs& seqs, const AttentionOptions& opts,
                                const ForwardOutputs& out, void* stream = nullptr);

Status attention_backward_varlen(const TensorView& dout, const TensorView& q, const TensorView& k,
                                 const TensorView& v, const VarlenSeqs& seqs,
                                 const ForwardState& saved, const AttentionOptions& opts,
                                 const BackwardOutputs& grads, void* stream = nullptr);

}  // namespace attnqat

// ---- FP4 inference: packed NVFP4 attention and the paged FP4 KV cache ----------------------
//
// docs/decode.md describes the layouts and the numerics; every path below reproduces mode `fp4`
// (numerics sections 3-4) on the same quantized operands.

namespace attnqat {

// A packed NVFP4 tensor as quantize() produces it (numerics section 7): data uint8 [..., L/2]
// (two E2M1 codes per byte, element 2i in the low nibble), scales uint8 [..., L/16] (E4M3 bits),
// global_scale a one-element fp32 tensor (g, a positive power of two) on the device of data.
struct PackedTensor {
  TensorView data, scales, global_scale;
};

// Attention in mode `fp4` from packed NVFP4 Q, K, V [B, H, N, D] (channel blocks along D; V along
// the tokens when opts.v_blocks == kToken: data [B, Hkv, D, ceil(Nk/16)*8]). The packed tensors
// are decoded exactly (no re-quantization) and the forward runs on them: the result is
// attention_forward(dequantize(q), dequantize(k), dequantize(v)) with inputs_quantized = true.
// opts.mode must be kFP4. out.o (bf16 or fp16; fp32 on the CPU too) fixes the dtype the
// operands are decoded to; lse [B, Hq, Nq] fp32; o_hp must be undefined; m_ref/l optional.
//
// CUDA: where the operands are unpacked, FP4 codes -> values (the result is the same, bit for bit;
// Python: unpack="kernel" | "temporary" | "auto"):
//   kInKernel  inside the sm90 forward kernel: no 16-bit copies of Q, K, V in memory. Channel
//              blocks only (not v_blocks == kToken), rows 16-byte aligned (any quantize() output
//              and slices of it along B, H, N). Each CTA decodes the K/V tiles it reads, so the
//              decode work grows with the number of 128-row query blocks per KV head.
//   kTemporary into stream-ordered 16-bit temporaries (one pass), then the forward.
//   kAuto      kInKernel where it is the faster one (few query blocks per KV head, see
//              docs/decode.md), kTemporary otherwise.
// Ignored on the CPU.
enum class PackedUnpack : uint8_t { kAuto, kInKernel, kTemporary };

Status attention_forward_packed(const PackedTensor& q, const PackedTensor& k, const PackedTensor& v,
                                const AttentionOptions& opts, const ForwardOutputs& out,
                                void* stream = nullptr, PackedUnpack unpack = PackedUnpack::kAuto);

// A paged FP4 KV cache (one layer). Pages hold `page_size` tokens (a multiple of 16) of every KV
// head; K and V are stored as packed NVFP4 with channel blocks (16 channels per E4M3 scale, g = 1
// as mode `fp4` quantizes them), so appending a token never touches older ones:
//   k_data, v_data     uint8 [num_pages, Hkv, page_size, D/2]
//   k_scales, v_scales uint8 [num_pages, Hkv, page_size, D/16]
// all contiguous, on one device. A sequence's tokens live in the pages its row of a page table
// (int32 [B, max_pages_per_seq]) names, token t at page table[b][t / page_size], slot
// t % page_size.
struct PagedKVCache {
  TensorView k_data, k_scales, v_data, v_scales;
};

// Quantizes new tokens k_new, v_new [B, Hkv, n_new, D] (fp32/fp16/bf16, last dim contiguous)
// straight into their pages: token i of sequence b goes to position start[b] + i (start: int32
// [B], the lengths before the append). Codes and scales are those of quantize() bit for bit.
// CPU tensors: page ids and capacities are checked (a clear error); CUDA tensors: their values
// live on the device and are not read by the host (the Python FP4KVCache checks them on its
// host copy); the kernel never writes outside the cache (out-of-range pages are skipped).
Status kv_cache_append(const PagedKVCache& cache, const TensorView& k_new, const TensorView& v_new,
                       const IndexView& page_table, const IndexView& start, void* stream = nullptr);

struct DecodeOptions {
  float softmax_scale = 0.0f;          // c > 0; 0 means 1/sqrt(D)
  PQuant p_quant = PQuant::kAnchored;  // anchored: split-KV; paper: one pass in 128-key tiles
  int num_splits = 0;                  // split-KV partitions (0: chosen from the device and shape)
  int max_seq_len = 0;                 // host bound on seq_lens (0: the page table's capacity)
  // Sliding window (numerics section 3): -1 unbounded; >= 0: query i of sequence b also needs
  // j >= seq_lens[b] - nq + i - window_left, i.e. the dense attention mask with window
  // (window_left, 0), Nq = nq and Nk = seq_lens[b]. The CUDA kernel visits only the keys some
  // row of the sequence sees.
  int window_left = -1;
};

// Decode attention over the cache: q [B, Hq, nq, D] (bf16 or fp16 on CUDA; any float on the
// CPU), seq_lens int32 [B] (lengths including the nq new tokens, already appended). Query i of
// sequence b sees keys j <= seq_lens[b] - nq + i (bottom-right causal), and with
// opts.window_left >= 0 only j >= seq_lens[b] - nq + i - window_left. Numerics: mode `fp4` —
// Q quantized per 16 channels (g = 1), P per 16 keys — over the dequantized cache; p_quant
// anchored is tile-size independent, so the CUDA kernel splits the keys; paper runs one pass in
// 128-key tiles (the reference's kv_tile). out [B, Hq, nq, D] (dtype of q), lse [B, Hq, nq] fp32
// (optional, natural log, -inf for a row that sees no key).
Status decode_attention(const TensorView& q, const PagedKVCache& cache,
                        const IndexView& page_table, const IndexView& seq_lens,
                        const DecodeOptions& opts, const TensorView& out, const TensorView& lse,
                        void* stream = nullptr);

}  // namespace attnqat
