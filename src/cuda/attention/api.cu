// src/cuda/attention/api.cu — host entry points of the CUDA attention forward and backward
// (attnqat::cuda::attention_forward / attention_backward, declared in api.h), called by
// src/api.cpp after validate_attention_forward() / validate_attention_backward(), and the sm90
// forward that packed.cu runs on packed NVFP4 operands (sm90_forward). Here: what only the
// kernels need checked (device arch, dtype, head dim, the 128-key tile of "paper" mode, TMA
// alignment), the quantization of q, k, v into stream-ordered temporaries when the caller passes
// raw inputs, and the dispatch — the one place where runtime values become template arguments
// (with_dtype, with_head_dim, with_o_hp, with_mask).
//
// Contract: nothing synchronizes; every launch and allocation is on `stream` (cudaMallocAsync /
// cudaFreeAsync for the temporaries, through Workspace in cuda/common/host.h), so a call can be
// captured in a CUDA graph. Errors are returned as Status, never thrown or printed. If the
// tensors live on another device than the current one, it is made current for the call (and
// restored).
#include <cuda_runtime_api.h>

#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>

#include "attnqat/attnqat.h"
#include "common/mask.h"
#include "common/validate.h"
#include "cuda/attention/api.h"
#include "cuda/attention/sm90/bwd_launch.h"
#include "cuda/attention/sm90/fwd_launch.h"
#include "cuda/common/host.h"

namespace attnqat::cuda {
namespace {

using sm90::kLog2e;  // RN(log2 e)
static_assert(sm90::FwdConfig<false, 64, false>::kBlockN == kKernelKvTile &&
                  sm90::FwdConfig<false, 128, false>::kBlockN == kKernelKvTile,
              "check_paper_kv_tile() (common/validate.h) assumes the kernels' key tile");

// Entry-point names in messages. The backward words the device check and the copies of q, k, v
// with kFwdOp, like the forward (its messages are kept as they are).
constexpr const char* kFwdOp = "attention_forward";
constexpr const char* kBwdOp = "attention_backward";
// What DeviceGuard::select names: "<op>: selecting the tensors' device failed: ...".
constexpr const char* kTensorsDevice = "the tensors' device";

// ---- Dispatch: runtime values -> template arguments --------------------------------------------

template <class F>
Status with_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kBFloat16:
      return f(std::false_type{});
    case DType::kFloat16:
      return f(std::true_type{});
    default:
      return Status::NotImplemented(std::string("q: the CUDA attention kernel takes bfloat16 or "
                                                "float16 inputs, got ") +
                                    dtype_name(dtype));
  }
}

// The kernel tile that runs head dim d (sm90::kernel_tile_head_dim: 16..64 in the 64-column
// tile, 80..128 in the 128-column one, the columns past d read as zeros; attn_params.h).
template <class F>
Status with_head_dim(int64_t head_dim, F&& f) {
  switch (sm90::kernel_tile_head_dim(head_dim)) {
    case 64:
      return f(std::integral_constant<int, 64>{});
    case 128:
      return f(std::integral_constant<int, 128>{});
    default:
      return Status::NotImplemented(
          "q: the CUDA attention kernel supports head dims 16, 32, ..., 128 (multiples of 16 up to "
          "128), got " +
          std::to_string(head_dim) +
          (head_dim > 128 ? " (larger head dims need a split-V kernel, not implemented yet)" : "") +
          "; run on CPU tensors (the reference) for other head dims");
  }
}

template <class F>
Status with_o_hp(bool with, F&& f) {
  return with ? f(std::true_type{}) : f(std::false_type{});
}

// Every mask policy of common/mask.h has its kernels (a window that comes out as (-1, 0) is
// causal, (-1, -1) no mask: attention_mask_kind, common/validate.h; the window's sizes are
// runtime values of LocalMask).
template <class F>
Status with_mask(MaskKind kind, F&& f) {
  return with_mask_policy(kind, std::forward<F>(f));
}

// What the kernels refuse, checked before anything runs (temporaries, zeroed gradients): the
// forward (plain and packed) and the backward call it first. "paper" P quantization depends on
// the key tile, and the kernels' tile is kKernelKvTile keys. (Logit soft-capping and attention
// sinks, numerics 9.9 and 9.10, run in every kernel: score_consts below.)
Status check_kernel_options(const AttentionOptions& opts) { return check_paper_kv_tile(opts); }

// The kernels' score constants (numerics 9.1, 9.9; attn_params.h, SoftcapSinks): c2 = RN(c
// RN(log2 e)), or with a softcap c2 = b = RN(softcap RN(log2 e)) and cap_a = RN(c / softcap)
// (validate_attention_* checked that both are normal fp32 numbers); the sinks' device pointer.
struct ScoreConsts {
  float c2;
  sm90::SoftcapSinks extras;
};
ScoreConsts score_consts(const AttentionOptions& opts, int64_t head_dim) {
  const float c = resolve_softmax_scale(opts, head_dim);
  ScoreConsts sc{c * kLog2e, {}};
  if (opts.softcap != 0.0f) {
    sc.c2 = opts.softcap * kLog2e;
    sc.extras.cap_a = c / opts.softcap;
  }
  if (has_sinks(opts)) {
    sc.extras.sinks = static_cast<const float*>(opts.sinks.data);
    sc.extras.sinks_stride = opts.sinks.stride[0];
  }
  return sc;
}

Status dispatch(const sm90::FwdArgs& args) {
  const MaskKind mask = args.mask;
  return with_dtype(args.q.dtype, [&](auto f16) {
    return with_head_dim(args.q.shape[3], [&](auto head_dim) {
      return with_o_hp(args.out.o_hp.data != nullptr, [&](auto o_hp) {
        return with_mask(mask, [&](auto mask_policy) {
          using Cfg = sm90::FwdConfig<decltype(f16)::value, decltype(head_dim)::value,
                                      decltype(o_hp)::value>;
          return sm90::launch_fwd<Cfg, decltype(mask_policy)>(args);
        });
      });
    });
  });
}

Status dispatch_packed(const sm90::FwdArgs& args) {
  const MaskKind mask = args.mask;
  // Head dims 64 and 128 only: the in-kernel unpacking reads whole rows of d / 2 code bytes, and
  // packed.cu (operand_unpacks_in_kernel) sends no other head dim here.
  return with_dtype(args.q.dtype, [&](auto f16) {
    return with_head_dim(args.q.shape[3], [&](auto head_dim) {
      return with_mask(mask, [&](auto mask_policy) {
        using Cfg = sm90::FwdConfig<decltype(f16)::value, decltype(head_dim)::value, false, true>;
        return sm90::launch_fwd<Cfg, decltype(mask_policy)>(args);
      });
    });
  });
}

// ---- Checks and arguments of the forward ------------------------------------------------------

Status check_output_alignment(const TensorView& t, const char* name) {
  // O and O' are written as pairs of 16-bit elements (4-byte stores).
  if (t.data != nullptr && reinterpret_cast<uintptr_t>(t.data) % 4 != 0)
    return Status::Invalid(std::string(name) +
                           ": the CUDA attention kernel writes it in 4-byte "
                           "pairs and needs a 4-byte aligned data pointer");
  return Status::Ok();
}

// What every forward checks before any launch: check_kernel_options, output alignment.
Status check_forward_options(const AttentionOptions& opts, const ForwardOutputs& out) {
  ATTNQAT_RETURN_IF_ERROR(check_kernel_options(opts));
  ATTNQAT_RETURN_IF_ERROR(check_output_alignment(out.o, "o"));
  return check_output_alignment(out.o_hp, "o_hp");
}

sm90::FwdArgs forward_args(const TensorView& q, const TensorView& k, const TensorView& v,
                           const AttentionOptions& opts, const ForwardOutputs& out,
                           bool quantized_mode, cudaStream_t stream) {
  sm90::FwdArgs args;
  args.q = q;
  args.k = k;
  args.v = v;
  args.out = out;
  const ScoreConsts sc = score_consts(opts, q.shape[3]);
  args.c2 = sc.c2;
  args.extras = sc.extras;
  args.quantize_p = quantized_mode;
  args.p_quant = opts.p_quant;
  args.mask = attention_mask_kind(opts);
  args.seq = attention_seq(opts, q.shape[2], k.shape[2]);
  args.stream = stream;
  return args;
}

// ---- Backward -----------------------------------------------------------------------------------

Status dispatch_bwd(const sm90::BwdArgs& args) {
  const MaskKind mask = args.mask;
  return with_dtype(args.q.dtype, [&](auto f16) {
    return with_head_dim(args.q.shape[3], [&](auto head_dim) {
      return with_mask(mask, [&](auto mask_policy) {
        using Cfg = sm90::BwdConfig<decltype(f16)::value, decltype(head_dim)::value>;
        return sm90::launch_bwd<Cfg, decltype(mask_policy)>(args);
      });
    });
  });
}

Status zero_async(const TensorView& t, cudaStream_t stream) {
  if (t.numel() == 0) return Status::Ok();
  const cudaError_t err =
      cudaMemsetAsync(t.data, 0, static_cast<size_t>(t.numel()) * dtype_size(t.dtype), stream);
  return err == cudaSuccess ? Status::Ok() : cuda_error(kBwdOp, "cudaMemsetAsync", err);
}

// The row statistics of the unquantized scores (numerics 9.4: bwd_quantized_qkv off), from the
// forward kernel in bf16 mode (no P quantization) on the backward's operands: its LSE, m_ref and
// l (anchored: m_ref = ceil(m)). Costs one bf16 forward pass, including an O that is dropped.
class RecomputedStats {
 public:
  Status make(const TensorView& q, const TensorView& k, const TensorView& v, const ScoreConsts& sc,
              const AttentionOptions& opts, const sm90::VarlenArgs& varlen, cudaStream_t stream) {
    const int64_t rows = q.shape[0] * q.shape[1] * q.shape[2];
    const size_t o_bytes = round_up(static_cast<size_t>(q.numel()) * dtype_size(q.dtype));
    const size_t row_bytes = round_up(static_cast<size_t>(rows) * sizeof(float));
    ATTNQAT_RETURN_IF_ERROR(buffer_.allocate(o_bytes + 3 * row_bytes, stream));
    uint8_t* base = static_cast<uint8_t*>(buffer_.data());
    const int64_t B = q.shape[0], H = q.shape[1], N = q.shape[2];
    auto row_view = [&](size_t offset, const char* name) {
      return device_view(base + offset, DType::kFloat32, {B, H, N}, name, q.device_id);
    };
    sm90::FwdArgs args;
    args.q = q;
    args.k = k;
    args.v = v;
    args.out.o = contiguous_like(base, q, "o (statistics pass)");
    args.out.lse = lse_ = row_view(o_bytes, "lse (recomputed)");
    args.out.m_ref = m_ref_ = row_view(o_bytes + row_bytes, "m_ref (recomputed)");
    args.out.l = l_ = row_view(o_bytes + 2 * row_bytes, "l (recomputed)");
    args.c2 = sc.c2;
    args.extras = sc.extras;  // the cap and the sinks, as the forward (numerics 9.9, 9.10)
    args.quantize_p = false;
    args.p_quant = opts.p_quant;
    args.mask = attention_mask_kind(opts);
    args.seq = attention_seq(opts, q.shape[2], k.shape[2]);
    args.varlen = varlen;
    args.stream = stream;
    return dispatch(args);
  }
  const float* lse() const { return static_cast<const float*>(lse_.data); }
  const float* m_ref() const { return static_cast<const float*>(m_ref_.data); }
  const float* l() const { return static_cast<const float*>(l_.data); }

 private:
  Workspace buffer_;
  TensorView lse_, m_ref_, l_;
};

// What the kernels take, before anything runs: check_kernel_options, the dtype, the head dim.
Status check_kernel_inputs(const TensorView& q, const AttentionOptions& opts) {
  ATTNQAT_RETURN_IF_ERROR(check_kernel_options(opts));
  if (q.dtype != DType::kBFloat16 && q.dtype != DType::kFloat16)
    return with_dtype(q.dtype, [](auto) { return Status::Ok(); });  // the dtype error
  if (sm90::kernel_tile_head_dim(q.size(-1)) == 0)
    return with_head_dim(q.size(-1), [](auto) { return Status::Ok(); });  // the head-dim error
  return Status::Ok();
}

// Packed sequences as the launchers take them.
sm90::VarlenArgs varlen_args(const VarlenSeqs& seqs) {
  sm90::VarlenArgs a;
  a.cu_seqlens_q = seqs.cu_seqlens_q.data;
  a.cu_seqlens_k = seqs.cu_seqlens_k.data;
  a.seqused_k = seqs.seqused_k.data;
  a.num_seqs = static_cast<int>(seqs.cu_seqlens_q.shape[0] - 1);
  a.max_seqlen_q = static_cast<int>(seqs.max_seqlen_q);
  a.max_seqlen_k = static_cast<int>(seqs.max_seqlen_k);
  return a;
}

ForwardOutputs varlen_outputs(const ForwardOutputs& o) {
  return ForwardOutputs{varlen_view(o.o), varlen_view(o.o_hp), varlen_view(o.lse),
                        varlen_view(o.m_ref), varlen_view(o.l)};
}

}  // namespace

Status attention_forward(const TensorView& q, const TensorView& k, const TensorView& v,
                         const AttentionOptions& opts, const ForwardOutputs& out, void* stream) {
  ATTNQAT_RETURN_IF_ERROR(check_kernel_inputs(q, opts));
  return sm90_forward(q, k, v, opts, out, stream, nullptr);
}

Status attention_forward_varlen(const TensorView& q, const TensorView& k, const TensorView& v,
                                const VarlenSeqs& seqs, const AttentionOptions& opts,
                                const ForwardOutputs& out, void* stream) {
  ATTNQAT_RETURN_IF_ERROR(check_kernel_inputs(q, opts));
  const sm90::VarlenArgs varlen = varlen_args(seqs);
  if (varlen.max_seqlen_q == 0) return Status::Ok();  // no sequence has a query row
  return sm90_forward(varlen_view(q), varlen_view(k), varlen_view(v), opts, varlen_outputs(out),
                      stream, nullptr, &varlen);
}

Status sm90_forward(const TensorView& q, const TensorView& k, const TensorView& v,
                    const AttentionOptions& opts, const ForwardOutputs& out, void* stream,
                    const PackedOperands* packed, const sm90::VarlenArgs* varlen) {
  const bool quantized_mode = opts.mode != Mode::kBF16;
  ATTNQAT_RETURN_IF_ERROR(check_forward_options(opts, out));
  if (q.numel() == 0) return Status::Ok();  // no query row: nothing to write

  DeviceGuard guard;
  ATTNQAT_RETURN_IF_ERROR(guard.select(q.device_id, kFwdOp, kTensorsDevice));
  ATTNQAT_RETURN_IF_ERROR(check_device(kFwdOp, q.device_id, DeviceNeed::kSm90a));
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  sm90::FwdArgs args = forward_args(q, k, v, opts, out, quantized_mode, s);
  if (varlen != nullptr) args.varlen = *varlen;
  if (packed != nullptr) {
    args.pq = *packed->q;
    args.pk = *packed->k;
    args.pv = *packed->v;
    args.kv_tma = packed->kv_unpacked;
    return dispatch_packed(args);
  }

  QuantizedInputs temps;  // freed (stream-ordered) when this returns
  if (quantized_mode && !opts.inputs_quantized) {
    ATTNQAT_RETURN_IF_ERROR(temps.make(q, k, v, opts.v_blocks, s, kFwdOp));
    args.q = temps.q();
    args.k = temps.k();
    args.v = temps.v();
  }
  return dispatch(args);
}

// Backward of numerics section 5 (switches: section 6 and 9.4). Steps, all on `stream`:
//   [fake-quantize q, k, v]  when bwd_quantized_qkv is on and the inputs are raw
//   [statistics pass]        when the backward's scores are not the forward's (9.4)
//   preprocess               stats = {-LSE/ln 2, D, -m_ref, 1/l} per query row
//   memset                   dQaccum (and the deterministic mode's semaphores)
//   main kernel              dK, dV (final), dQaccum
//   postprocess              dQ = c * dQaccum
// On [B, H, N, d] views (packed sequences: [1, H, total, d] with `varlen`).
namespace {
Status backward(const TensorView& dout, const TensorView& q, const TensorView& k,
                const TensorView& v, const ForwardState& saved, const AttentionOptions& opts,
                const BackwardOutputs& grads, const sm90::VarlenArgs& varlen, void* stream) {
  const bool quantized_mode = opts.mode != Mode::kBF16;
  // The switches that apply (bf16 mode: none, the ordinary backward).
  const BackwardSwitches sw = quantized_mode ? opts.bwd : BackwardSwitches{false, false, false};
  const bool anchored = opts.p_quant == PQuant::kAnchored;
  const bool need_m_l = sw.quant_p && anchored;

  DeviceGuard guard;
  ATTNQAT_RETURN_IF_ERROR(guard.select(q.device_id, kBwdOp, kTensorsDevice));
  ATTNQAT_RETURN_IF_ERROR(check_device(kFwdOp, q.device_id, DeviceNeed::kSm90a));
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const bool want_dsinks = has_sinks(opts) && has_sinks_tensor(grads.dsinks);
  if (q.numel() == 0 || k.numel() == 0) {  // no query row or no key: every gradient is 0
    ATTNQAT_RETURN_IF_ERROR(zero_async(grads.dq, s));
    ATTNQAT_RETURN_IF_ERROR(zero_async(grads.dk, s));
    if (want_dsinks) ATTNQAT_RETURN_IF_ERROR(zero_async(grads.dsinks, s));
    return zero_async(grads.dv, s);
  }

  const float scale = resolve_softmax_scale(opts, q.shape[3]);
  const ScoreConsts sc = score_consts(opts, q.shape[3]);
  QuantizedInputs temps;  // freed (stream-ordered) when this returns
  TensorView oq = q, ok = k, ov = v;
  if (sw.quantized_qkv && !opts.inputs_quantized) {
    ATTNQAT_RETURN_IF_ERROR(temps.make(q, k, v, opts.v_blocks, s, kFwdOp));
    oq = temps.q();
    ok = temps.k();
    ov = temps.v();
  }
  const float* lse = static_cast<const float*>(saved.lse.data);
  const float* m_ref = need_m_l ? static_cast<const float*>(saved.m_ref.data) : nullptr;
  const float* l = need_m_l ? static_cast<const float*>(saved.l.data) : nullptr;
  RecomputedStats recomputed;
  if (quantized_mode && !sw.quantized_qkv) {
    ATTNQAT_RETURN_IF_ERROR(
        recomputed.make(oq, ok, ov, sc, opts, varlen, s));
    lse = recomputed.lse();
    if (need_m_l) m_ref = recomputed.m_ref(), l = recomputed.l();
  }

  // Scratch: stats [B, Hq, Nq_pad] float4, dQaccum [B, Hq, Nq_pad, d_tile] fp32, semaphores.
  // Per sequence (packed: num_seqs of at most max_seqlen_q rows), whole 64-row blocks; the dQ
  // pieces span the kernel's tile head dim d_tile >= d (attn_params.h).
  const int64_t B = sm90::num_sequences(q, varlen), Hq = q.shape[1], Nq = q.shape[2];
  const int64_t d = sm90::kernel_tile_head_dim(q.shape[3]);
  const int64_t m_blocks = ((varlen.packed() ? varlen.max_seqlen_q : Nq) + 63) / 64;
  const int64_t rows_pad = B * Hq * m_blocks * 64;
  const size_t stats_bytes = round_up(static_cast<size_t>(rows_pad) * sizeof(float4));
  const size_t accum_bytes = round_up(static_cast<size_t>(rows_pad * d) * sizeof(float));
  const size_t sem_bytes = opts.deterministic
                               ? round_up(static_cast<size_t>(B * Hq * m_blocks * (d / 64)) * sizeof(int))
                               : 0;
  // dsinks: one fp32 term per padded row (bwd_aux.cu), after the rest (not zeroed: the
  // preprocess writes every one).
  const size_t sink_bytes = want_dsinks ? round_up(static_cast<size_t>(rows_pad) * sizeof(float)) : 0;
  Workspace scratch;
  ATTNQAT_RETURN_IF_ERROR(scratch.allocate(stats_bytes + accum_bytes + sem_bytes + sink_bytes, s));
  uint8_t* base = static_cast<uint8_t*>(scratch.data());
  float4* stats = reinterpret_cast<float4*>(base);
  float* dq_accum = reinterpret_cast<float*>(base + stats_bytes);
  int* dq_sem = opts.deterministic ? reinterpret_cast<int*>(base + stats_bytes + accum_bytes) : nullptr;
  cudaError_t err = cudaMemsetAsync(dq_accum, 0, accum_bytes + sem_bytes, s);
  if (err != cudaSuccess) return cuda_error(kBwdOp, "cudaMemsetAsync (dQaccum)", err);

  sm90::BwdPreArgs pre;
  pre.dout = dout;
  pre.o = sw.high_precision_o ? saved.o_hp : saved.o;
  pre.lse = lse;
  pre.m_ref = m_ref;
  pre.l = l;
  pre.stat_str = sm90::RowStrides{Hq * Nq, Nq, 1};  // lse, m_ref, l: contiguous [B, Hq, Nq]
  pre.varlen = varlen;
  pre.stats = stats;
  pre.m_blocks = static_cast<int>(m_blocks);
  if (want_dsinks) {
    pre.dsink_rows = reinterpret_cast<float*>(base + stats_bytes + accum_bytes + sem_bytes);
    pre.attn = sm90::attn_params(q, k, sc.c2, opts.p_quant, attention_seq(opts, Nq, k.shape[2]), varlen);
    pre.attn.extras = sc.extras;
    pre.mask = attention_mask_kind(opts);
  }
  pre.stream = s;
  ATTNQAT_RETURN_IF_ERROR(sm90::launch_bwd_preprocess(pre));
  if (want_dsinks)
    ATTNQAT_RETURN_IF_ERROR(sm90::launch_dsinks_reduce(pre.dsink_rows, rows_pad / Hq, grads.dsinks, s));

  sm90::BwdArgs args;
  args.q = oq;
  args.k = ok;
  args.v = ov;
  args.dout = dout;
  args.dk = grads.dk;
  args.dv = grads.dv;
  args.stats = stats;
  args.dq_accum = dq_accum;
  args.dq_sem = dq_sem;
  args.c2 = sc.c2;
  args.extras = sc.extras;
  args.scale = scale;
  args.quant_p = sw.quant_p;
  args.p_quant = opts.p_quant;
  args.deterministic = opts.deterministic;
  args.mask = attention_mask_kind(opts);
  args.seq = attention_seq(opts, Nq, k.shape[2]);
  args.varlen = varlen;
  args.stream = s;
  ATTNQAT_RETURN_IF_ERROR(dispatch_bwd(args));
  return sm90::launch_bwd_postprocess(dq_accum, grads.dq, args.varlen, static_cast<int>(m_blocks),
                                      scale, s);
}
}  // namespace

Status attention_backward(const TensorView& dout, const TensorView& q, const TensorView& k,
                          const TensorView& v, const ForwardState& saved,
                          const AttentionOptions& opts, const BackwardOutputs& grads,
                          void* stream) {
  ATTNQAT_RETURN_IF_ERROR(check_kernel_inputs(q, opts));
  return backward(dout, q, k, v, saved, opts, grads, sm90::VarlenArgs{}, stream);
}

Status attention_backward_varlen(const TensorView& dout, const TensorView& q, const TensorView& k,
                                 const TensorView& v, const VarlenSeqs& seqs,
                                 const ForwardState& saved, const AttentionOptions& opts,
                                 const BackwardOutputs& grads, void* stream) {
  ATTNQAT_RETURN_IF_ERROR(check_kernel_inputs(q, opts));
  const ForwardState st{varlen_view(saved.o), varlen_view(saved.o_hp), varlen_view(saved.lse),
                        varlen_view(saved.m_ref), varlen_view(saved.l)};
  const BackwardOutputs g{varlen_view(grads.dq), varlen_view(grads.dk), varlen_view(grads.dv),
                          grads.dsinks};
  return backward(varlen_view(dout), varlen_view(q), varlen_view(k), varlen_view(v), st, opts, g,
                  varlen_args(seqs), stream);
}

}  // namespace attnqat::cuda
