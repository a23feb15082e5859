// src/cuda/attention/api.cu — host entry points of the CUDA attention forward and backward
// (attnqat::cuda::attention_forward / attention_backward, declared in api.h), called by
// src/api.cpp after validate_attention_forward() / validate_attention_backward(). Here: what
// only the kernels need checked (device arch, dtype, head dim, the 128-key tile of "paper"
// mode, TMA alignment), the quantization of q, k, v into
// stream-ordered temporaries when the caller passes raw inputs, and the dispatch — the one place
// where runtime values become template arguments (with_dtype, with_head_dim, with_o_hp,
// with_mask).
//
// Contract: nothing synchronizes; every launch and allocation is on `stream` (cudaMallocAsync /
// cudaFreeAsync for the temporaries, through cuda/common/workspace.h), so a call can be captured in a CUDA graph. Errors are
// returned as Status, never thrown or printed. If the tensors live on another device than the
// current one, it is made current for the call (and restored).
#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>

#include "cuda/common/device_guard.h"
#include "attnqat/attnqat.h"
#include "cuda/common/workspace.h"
#include "common/mask.h"
#include "common/validate.h"
#include "cuda/attention/api.h"
#include "cuda/attention/sm90/bwd_launch.h"
#include "cuda/attention/sm90/fwd_launch.h"

namespace attnqat::cuda {
namespace {

constexpr float kLog2e = 1.44269504088896340736f;  // RN(log2 e)
constexpr int kKernelKeyTile = 128;                // sm90::FwdConfig::kBlockN
constexpr size_t kTempAlign = 256;                 // byte alignment of each temporary

Status cuda_error(const char* what, cudaError_t err) {
  return Status::Cuda(std::string("attention_forward: ") + what +
                      " failed: " + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")");
}

// The sm90 kernel runs on compute capability 9.0 only (wgmma, setmaxnreg: sm_90a).
Status check_device(int device) {
  int major = 0, minor = 0;
  cudaError_t err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (err == cudaSuccess)
    err = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  if (err != cudaSuccess) return cuda_error("querying the device", err);
  if (major != 9 || minor != 0)
    return Status::NotImplemented(
        "attention_forward: the CUDA attention kernel is built for sm_90a (Hopper: H100, H200); "
        "this device is sm_" +
        std::to_string(major) + std::to_string(minor) +
        "; run on CPU tensors (the reference) instead");
  return Status::Ok();
}

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

template <class F>
Status with_head_dim(int64_t head_dim, F&& f) {
  switch (head_dim) {
    case 64:
      return f(std::integral_constant<int, 64>{});
    case 128:
      return f(std::integral_constant<int, 128>{});
    default:
      return Status::NotImplemented(
          "q: the CUDA attention kernel supports head_dim 64 and 128, got " +
          std::to_string(head_dim) +
          (head_dim == 256 ? " (256 with O' needs a split-V kernel, not implemented yet)" : "") +
          "; run on CPU tensors (the reference) for other head dims");
  }
}

template <class F>
Status with_o_hp(bool with, F&& f) {
  return with ? f(std::true_type{}) : f(std::false_type{});
}

template <class F>
Status with_mask(MaskKind kind, F&& f) {
  switch (kind) {
    case MaskKind::kCausal:
      return f(CausalMask{});
    default:
      return f(NoMask{});
  }
}

MaskKind mask_kind(const AttentionOptions& opts) {
  return opts.causal ? MaskKind::kCausal : MaskKind::kNone;
}

Status dispatch(const sm90::FwdArgs& args, MaskKind mask) {
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

Status dispatch_packed(const sm90::FwdArgs& args, MaskKind mask) {
  return with_dtype(args.q.dtype, [&](auto f16) {
    return with_head_dim(args.q.shape[3], [&](auto head_dim) {
      return with_mask(mask, [&](auto mask_policy) {
        using Cfg = sm90::FwdConfig<decltype(f16)::value, decltype(head_dim)::value, false, true>;
        return sm90::launch_fwd<Cfg, decltype(mask_policy)>(args);
      });
    });
  });
}

// ---- Temporaries for the fake-quantized inputs ------------------------------------------------

__global__ void fill_one_kernel(float* g) { *g = 1.0f; }

size_t round_up(size_t bytes) { return (bytes + kTempAlign - 1) / kTempAlign * kTempAlign; }

TensorView contiguous_like(void* data, const TensorView& t, const char* name) {
  TensorView v = make_view(data, t.dtype, {t.shape[0], t.shape[1], t.shape[2], t.shape[3]}, name,
                           Device::kCUDA);
  v.device_id = t.device_id;
  return v;
}

// q^, k^, v^ = fake_quantize(q, k, v) (numerics section 3: NVFP4 with g = 1 along the head dim;
// v along the tokens when v_blocks = token) into one stream-ordered allocation, through the
// public API (the quantization kernels of src/cuda/quantize).
class QuantizedInputs {
 public:
  Status make(const TensorView& q, const TensorView& k, const TensorView& v, VBlocks v_blocks,
              cudaStream_t stream) {
    const size_t esize = static_cast<size_t>(dtype_size(q.dtype));
    const size_t q_bytes = round_up(q.numel() * esize), k_bytes = round_up(k.numel() * esize);
    const size_t v_bytes = round_up(v.numel() * esize);
    ATTNQAT_RETURN_IF_ERROR(buffer_.allocate(q_bytes + k_bytes + v_bytes + kTempAlign, stream));
    uint8_t* base = static_cast<uint8_t*>(buffer_.data());
    q_ = contiguous_like(base, q, "q (fake-quantized copy)");
    k_ = contiguous_like(base + q_bytes, k, "k (fake-quantized copy)");
    v_ = contiguous_like(base + q_bytes + k_bytes, v, "v (fake-quantized copy)");
    float* g = reinterpret_cast<float*>(base + q_bytes + k_bytes + v_bytes);
    fill_one_kernel<<<1, 1, 0, stream>>>(g);
    cudaError_t err;
    if ((err = cudaGetLastError()) != cudaSuccess) return cuda_error("writing g = 1", err);
    TensorView g_view = make_view(g, DType::kFloat32, {1}, "g", Device::kCUDA);
    g_view.device_id = q.device_id;

    QuantizeOptions qo;  // NVFP4, blocks along the head dim, g read from g_view (= 1)
    ATTNQAT_RETURN_IF_ERROR(::attnqat::fake_quantize(q, q_, g_view, qo, stream));
    ATTNQAT_RETURN_IF_ERROR(::attnqat::fake_quantize(k, k_, g_view, qo, stream));
    qo.axis = v_blocks == VBlocks::kToken ? BlockAxis::kToken : BlockAxis::kLast;
    return ::attnqat::fake_quantize(v, v_, g_view, qo, stream);
  }

  const TensorView& q() const { return q_; }
  const TensorView& k() const { return k_; }
  const TensorView& v() const { return v_; }

 private:
  Workspace buffer_;  // freed stream-ordered after the kernel that reads it
  TensorView q_, k_, v_;
};

Status check_output_alignment(const TensorView& t, const char* name) {
  // O and O' are written as pairs of 16-bit elements (4-byte stores).
  if (t.data != nullptr && reinterpret_cast<uintptr_t>(t.data) % 4 != 0)
    return Status::Invalid(std::string(name) +
                           ": the CUDA attention kernel writes it in 4-byte "
                           "pairs and needs a 4-byte aligned data pointer");
  return Status::Ok();
}

// What both forwards check before any launch: the 128-key tile of "paper" mode, output alignment.
Status check_forward_options(const AttentionOptions& opts, const ForwardOutputs& out,
                             bool quantized_mode) {
  if (quantized_mode && opts.p_quant == PQuant::kPaper && opts.kv_tile != kKernelKeyTile)
    return Status::Invalid(
        "kv_tile: the CUDA kernels use 128-key tiles (p_quant='paper' depends "
        "on the tile), got " +
        std::to_string(opts.kv_tile));
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
  args.c2 = resolve_softmax_scale(opts, q.shape[3]) * kLog2e;
  args.quantize_p = quantized_mode;
  args.p_quant = opts.p_quant;
  args.stream = stream;
  return args;
}

// ---- Backward -----------------------------------------------------------------------------------

Status bwd_error(const char* what, cudaError_t err) {
  return Status::Cuda(std::string("attention_backward: ") + what +
                      " failed: " + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")");
}

Status dispatch_bwd(const sm90::BwdArgs& args, MaskKind mask) {
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
  return err == cudaSuccess ? Status::Ok() : bwd_error("cudaMemsetAsync", err);
}

// The row statistics of the unquantized scores (numerics 9.4: bwd_quantized_qkv off), from the
// forward kernel in bf16 mode (no P quantization) on the backward's operands: its LSE, m_ref and
// l (anchored: m_ref = ceil(m)). Costs one bf16 forward pass, including an O that is dropped.
class RecomputedStats {
 public:
  Status make(const TensorView& q, const TensorView& k, const TensorView& v, float c2, MaskKind mask,
              PQuant p_quant, cudaStream_t stream) {
    const int64_t rows = q.shape[0] * q.shape[1] * q.shape[2];
    const size_t o_bytes = round_up(static_cast<size_t>(q.numel()) * dtype_size(q.dtype));
    const size_t row_bytes = round_up(static_cast<size_t>(rows) * sizeof(float));
    ATTNQAT_RETURN_IF_ERROR(buffer_.allocate(o_bytes + 3 * row_bytes, stream));
    uint8_t* base = static_cast<uint8_t*>(buffer_.data());
    const int64_t B = q.shape[0], H = q.shape[1], N = q.shape[2];
    auto row_view = [&](size_t offset, const char* name) {
      TensorView t = make_view(base + offset, DType::kFloat32, {B, H, N}, name, Device::kCUDA);
      t.device_id = q.device_id;
      return t;
    };
    sm90::FwdArgs args;
    args.q = q;
    args.k = k;
    args.v = v;
    args.out.o = contiguous_like(base, q, "o (statistics pass)");
    args.out.lse = lse_ = row_view(o_bytes, "lse (recomputed)");
    args.out.m_ref = m_ref_ = row_view(o_bytes + row_bytes, "m_ref (recomputed)");
    args.out.l = l_ = row_view(o_bytes + 2 * row_bytes, "l (recomputed)");
    args.c2 = c2;
    args.quantize_p = false;
    args.p_quant = p_quant;
    args.stream = stream;
    return dispatch(args, mask);
  }
  const float* lse() const { return static_cast<const float*>(lse_.data); }
  const float* m_ref() const { return static_cast<const float*>(m_ref_.data); }
  const float* l() const { return static_cast<const float*>(l_.data); }

 private:
  Workspace buffer_;
  TensorView lse_, m_ref_, l_;
};

}  // namespace

Status attention_forward(const TensorView& q, const TensorView& k, const TensorView& v,
                         const AttentionOptions& opts, const ForwardOutputs& out, void* stream) {
  const bool quantized_mode = opts.mode != Mode::kBF16;
  if (q.dtype != DType::kBFloat16 && q.dtype != DType::kFloat16)
    return with_dtype(q.dtype, [](auto) { return Status::Ok(); });  // the dtype error
  if (q.shape[3] != 64 && q.shape[3] != 128)
    return with_head_dim(q.shape[3], [](auto) { return Status::Ok(); });  // the head-dim error
  ATTNQAT_RETURN_IF_ERROR(check_forward_options(opts, out, quantized_mode));
  if (q.numel() == 0) return Status::Ok();  // no query row: nothing to write

  DeviceGuard guard;
  if (const cudaError_t err = guard.set(q.device_id); err != cudaSuccess)
    return cuda_error("selecting the tensors' device", err);
  ATTNQAT_RETURN_IF_ERROR(check_device(q.device_id));
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  sm90::FwdArgs args = forward_args(q, k, v, opts, out, quantized_mode, s);

  QuantizedInputs temps;  // freed (stream-ordered) when this returns
  if (quantized_mode && !opts.inputs_quantized) {
    ATTNQAT_RETURN_IF_ERROR(temps.make(q, k, v, opts.v_blocks, s));
    args.q = temps.q();
    args.k = temps.k();
    args.v = temps.v();
  }
  return dispatch(args, mask_kind(opts));
}

// The packed producer (sm90/fwd_packed.cuh) copies rows of codes with 16-byte cp.async and rows
// of scales with one d/16-byte cp.async: each row's bytes contiguous, rows and bases aligned.
bool packed_operand_fusable(const PackedTensor& t, const TensorView& o) {
  const int64_t d = t.data.shape[3] * 2;
  if (d != 64 && d != 128) return false;
  if (o.dtype != DType::kBFloat16 && o.dtype != DType::kFloat16) return false;
  const int64_t scale_row = d / 16;
  if (t.data.stride[3] != 1 || t.scales.stride[3] != 1) return false;
  if (reinterpret_cast<uintptr_t>(t.data.data) % 16 != 0 ||
      reinterpret_cast<uintptr_t>(t.scales.data) % scale_row != 0)
    return false;
  for (int i = 0; i < 3; ++i)
    if (t.data.stride[i] % 16 != 0 || t.scales.stride[i] % scale_row != 0) return false;
  return true;
}

bool packed_forward_fusable(const PackedTensor& q, const PackedTensor& k, const PackedTensor& v,
                            const AttentionOptions& opts, const TensorView& o) {
  return opts.v_blocks == VBlocks::kChannel && packed_operand_fusable(q, o) &&
         packed_operand_fusable(k, o) && packed_operand_fusable(v, o);
}

Status attention_forward_from_packed(const PackedTensor& q, const PackedTensor& k,
                                     const PackedTensor& v, const TensorView& lq,
                                     const TensorView& lk, const TensorView& lv,
                                     const AttentionOptions& opts, const ForwardOutputs& out,
                                     void* stream, bool kv_decoded) {
  ATTNQAT_RETURN_IF_ERROR(check_forward_options(opts, out, true));
  if (lq.numel() == 0) return Status::Ok();  // no query row: nothing to write

  DeviceGuard guard;
  if (const cudaError_t err = guard.set(lq.device_id); err != cudaSuccess)
    return cuda_error("selecting the tensors' device", err);
  ATTNQAT_RETURN_IF_ERROR(check_device(lq.device_id));
  sm90::FwdArgs args = forward_args(lq, lk, lv, opts, out, true, static_cast<cudaStream_t>(stream));
  args.pq = q;
  args.pk = k;
  args.pv = v;
  args.kv_tma = kv_decoded;
  return dispatch_packed(args, mask_kind(opts));
}

// Backward of numerics section 5 (switches: section 6 and 9.4). Steps, all on `stream`:
//   [fake-quantize q, k, v]  when bwd_quantized_qkv is on and the inputs are raw
//   [statistics pass]        when the backward's scores are not the forward's (9.4)
//   preprocess               stats = {-LSE/ln 2, D, -m_ref, 1/l} per query row
//   memset                   dQaccum (and the deterministic mode's semaphores)
//   main kernel              dK, dV (final), dQaccum
//   postprocess              dQ = c * dQaccum
Status attention_backward(const TensorView& dout, const TensorView& q, const TensorView& k,
                          const TensorView& v, const ForwardState& saved,
                          const AttentionOptions& opts, const BackwardOutputs& grads,
                          void* stream) {
  if (q.dtype != DType::kBFloat16 && q.dtype != DType::kFloat16)
    return with_dtype(q.dtype, [](auto) { return Status::Ok(); });  // the dtype error
  if (q.shape[3] != 64 && q.shape[3] != 128)
    return with_head_dim(q.shape[3], [](auto) { return Status::Ok(); });  // the head-dim error
  const bool quantized_mode = opts.mode != Mode::kBF16;
  // The switches that apply (bf16 mode: none, the ordinary backward).
  const BackwardSwitches sw = quantized_mode ? opts.bwd : BackwardSwitches{false, false, false};
  const bool anchored = opts.p_quant == PQuant::kAnchored;
  const bool need_m_l = sw.quant_p && anchored;

  DeviceGuard guard;
  if (const cudaError_t err = guard.set(q.device_id); err != cudaSuccess)
    return bwd_error("selecting the tensors' device", err);
  ATTNQAT_RETURN_IF_ERROR(check_device(q.device_id));
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (q.numel() == 0 || k.numel() == 0) {  // no query row or no key: every gradient is 0
    ATTNQAT_RETURN_IF_ERROR(zero_async(grads.dq, s));
    ATTNQAT_RETURN_IF_ERROR(zero_async(grads.dk, s));
    return zero_async(grads.dv, s);
  }

  const float scale = resolve_softmax_scale(opts, q.shape[3]);
  const float c2 = scale * kLog2e;
  QuantizedInputs temps;  // freed (stream-ordered) when this returns
  TensorView oq = q, ok = k, ov = v;
  if (sw.quantized_qkv && !opts.inputs_quantized) {
    ATTNQAT_RETURN_IF_ERROR(temps.make(q, k, v, opts.v_blocks, s));
    oq = temps.q();
    ok = temps.k();
    ov = temps.v();
  }
  const float* lse = static_cast<const float*>(saved.lse.data);
  const float* m_ref = need_m_l ? static_cast<const float*>(saved.m_ref.data) : nullptr;
  const float* l = need_m_l ? static_cast<const float*>(saved.l.data) : nullptr;
  RecomputedStats recomputed;
  if (quantized_mode && !sw.quantized_qkv) {
    ATTNQAT_RETURN_IF_ERROR(recomputed.make(oq, ok, ov, c2, mask_kind(opts), opts.p_quant, s));
    lse = recomputed.lse();
    if (need_m_l) m_ref = recomputed.m_ref(), l = recomputed.l();
  }

  // Scratch: stats [B, Hq, Nq_pad] float4, dQaccum [B, Hq, Nq_pad, d] fp32, semaphores.
  const int64_t B = q.shape[0], Hq = q.shape[1], Nq = q.shape[2], d = q.shape[3];
  const int64_t m_blocks = (Nq + 63) / 64;
  const int64_t rows_pad = B * Hq * m_blocks * 64;
  const size_t stats_bytes = round_up(static_cast<size_t>(rows_pad) * sizeof(float4));
  const size_t accum_bytes = round_up(static_cast<size_t>(rows_pad * d) * sizeof(float));
  const size_t sem_bytes = opts.deterministic
                               ? round_up(static_cast<size_t>(B * Hq * m_blocks * (d / 64)) * sizeof(int))
                               : 0;
  Workspace scratch;
  ATTNQAT_RETURN_IF_ERROR(scratch.allocate(stats_bytes + accum_bytes + sem_bytes, s));
  uint8_t* base = static_cast<uint8_t*>(scratch.data());
  float4* stats = reinterpret_cast<float4*>(base);
  float* dq_accum = reinterpret_cast<float*>(base + stats_bytes);
  int* dq_sem = opts.deterministic ? reinterpret_cast<int*>(base + stats_bytes + accum_bytes) : nullptr;
  cudaError_t err = cudaMemsetAsync(dq_accum, 0, accum_bytes + sem_bytes, s);
  if (err != cudaSuccess) return bwd_error("cudaMemsetAsync (dQaccum)", err);

  sm90::BwdPreArgs pre;
  pre.dout = dout;
  pre.o = sw.high_precision_o ? saved.o_hp : saved.o;
  pre.lse = lse;
  pre.m_ref = m_ref;
  pre.l = l;
  pre.stats = stats;
  pre.m_blocks = static_cast<int>(m_blocks);
  pre.stream = s;
  ATTNQAT_RETURN_IF_ERROR(sm90::launch_bwd_preprocess(pre));

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
  args.c2 = c2;
  args.scale = scale;
  args.quant_p = sw.quant_p;
  args.p_quant = opts.p_quant;
  args.deterministic = opts.deterministic;
  args.stream = s;
  ATTNQAT_RETURN_IF_ERROR(dispatch_bwd(args, mask_kind(opts)));
  return sm90::launch_bwd_postprocess(dq_accum, grads.dq, static_cast<int>(m_blocks), scale, s);
}

}  // namespace attnqat::cuda
