// Argument validation shared by every backend. See validate.h.
#include "common/validate.h"

#include <cmath>
#include <sstream>
#include <string>

namespace attnqat {
namespace {

std::string device_str(const TensorView& t) {
  return t.device == Device::kCPU ? std::string("cpu") : "cuda:" + std::to_string(t.device_id);
}

Status check_present(const TensorView& t) {
  if (t.data == nullptr && t.numel() != 0)
    return Status::Invalid(std::string(t.name) + ": expected a tensor, got none");
  return Status::Ok();
}

Status check_float_input(const TensorView& t, bool allow_f64) {
  ATTNQAT_RETURN_IF_ERROR(check_present(t));
  const bool ok = t.dtype == DType::kFloat32 || t.dtype == DType::kFloat16 ||
                  t.dtype == DType::kBFloat16 || (allow_f64 && t.dtype == DType::kFloat64);
  if (!ok)
    return Status::Invalid(std::string(t.name) + ": expected dtype float32, float16 or bfloat16" +
                           (allow_f64 ? " (or float64 on the CPU)" : "") + ", got " +
                           dtype_name(t.dtype));
  return Status::Ok();
}

Status check_dtype(const TensorView& t, DType expected) {
  ATTNQAT_RETURN_IF_ERROR(check_present(t));
  if (t.dtype != expected)
    return Status::Invalid(std::string(t.name) + ": expected dtype " + dtype_name(expected) +
                           ", got " + dtype_name(t.dtype));
  return Status::Ok();
}

Status check_shape(const TensorView& t, int ndim, const int64_t* shape) {
  bool ok = t.ndim == ndim;
  for (int i = 0; ok && i < ndim; ++i) ok = t.shape[i] == shape[i];
  if (!ok) {
    TensorView want;
    want.ndim = ndim;
    for (int i = 0; i < ndim; ++i) want.shape[i] = shape[i];
    return Status::Invalid(std::string(t.name) + ": expected shape " + want.shape_str() +
                           ", got " + t.shape_str());
  }
  return Status::Ok();
}

Status check_same_device(const TensorView& ref, const TensorView& t) {
  if (t.data == nullptr && t.numel() == 0) return Status::Ok();
  if (t.device != ref.device || t.device_id != ref.device_id)
    return Status::Invalid(std::string(t.name) + ": expected a tensor on " + device_str(ref) +
                           " (the device of " + ref.name + "), got one on " + device_str(t));
  return Status::Ok();
}

Status check_last_dim_contiguous(const TensorView& t) {
  if (t.ndim > 0 && t.size(-1) > 1 && t.stride_of(-1) != 1)
    return Status::Invalid(std::string(t.name) + ": expected the last dimension to be contiguous "
                           "(stride 1), got stride " + std::to_string(t.stride_of(-1)) +
                           "; call .contiguous() first");
  return Status::Ok();
}

Status check_output(const TensorView& t, const TensorView& ref_device, DType dtype, int ndim,
                    const int64_t* shape) {
  ATTNQAT_RETURN_IF_ERROR(check_dtype(t, dtype));
  ATTNQAT_RETURN_IF_ERROR(check_shape(t, ndim, shape));
  ATTNQAT_RETURN_IF_ERROR(check_same_device(ref_device, t));
  if (!t.is_contiguous())
    return Status::Invalid(std::string(t.name) + ": expected a contiguous output tensor");
  return Status::Ok();
}

Status check_global_scale(const TensorView& g, const TensorView& x, const QuantizeOptions& opts) {
  if (opts.format != Format::kNVFP4) return Status::Ok();
  if (g.data == nullptr)
    return Status::Invalid(std::string(g.name) +
                           ": expected a one-element float32 tensor (the NVFP4 second-level "
                           "scale), got none");
  ATTNQAT_RETURN_IF_ERROR(check_dtype(g, DType::kFloat32));
  if (g.numel() != 1)
    return Status::Invalid(std::string(g.name) + ": expected one element, got shape " +
                           g.shape_str());
  ATTNQAT_RETURN_IF_ERROR(check_same_device(x, g));
  // The value can be read only on the host; device scales come from our own amax pass.
  if (g.device == Device::kCPU && !opts.compute_global_scale) {
    const float gv = *static_cast<const float*>(g.data);
    if (!is_power_of_two(gv)) {
      std::ostringstream os;
      os << g.name << ": expected a positive power of two (so that decoded values are exact), got "
         << gv;
      return Status::Invalid(os.str());
    }
  }
  return Status::Ok();
}

// The block axis of x: its length must be a multiple of the block size (channel blocks).
Status check_block_axis(const TensorView& x, const QuantizeOptions& opts) {
  if (opts.axis == BlockAxis::kToken) {
    if (opts.format != Format::kNVFP4)
      return Status::NotImplemented(std::string(x.name) +
                                    ": token-axis blocks are defined for NVFP4 only, got MXFP4");
    if (x.ndim < 2)
      return Status::Invalid(std::string(x.name) +
                             ": token-axis quantization expects [..., N, D], got shape " +
                             x.shape_str());
    return Status::Ok();
  }
  if (x.ndim < 1)
    return Status::Invalid(std::string(x.name) + ": expected at least one dimension, got a scalar");
  const int block = opts.format == Format::kNVFP4 ? kNvBlock : kMxBlock;
  if (x.size(-1) % block != 0)
    return Status::Invalid(std::string(x.name) + ": expected the last dimension to be a multiple of " +
                           std::to_string(block) + " (the " +
                           (opts.format == Format::kNVFP4 ? "NVFP4" : "MXFP4") +
                           " block), got " + std::to_string(x.size(-1)));
  return Status::Ok();
}

}  // namespace

PackedShapes packed_shapes(const TensorView& x, const QuantizeOptions& opts) {
  PackedShapes p;
  p.ndim = x.ndim;
  for (int i = 0; i < x.ndim; ++i) p.data[i] = p.scales[i] = x.shape[i];
  if (opts.axis == BlockAxis::kToken) {
    // [..., N, D] -> [..., D, ceil(N/16)*8] and [..., D, ceil(N/16)]
    const int64_t n = x.size(-2), d = x.size(-1), nb = (n + kNvBlock - 1) / kNvBlock;
    p.data[x.ndim - 2] = p.scales[x.ndim - 2] = d;
    p.data[x.ndim - 1] = nb * (kNvBlock / 2);
    p.scales[x.ndim - 1] = nb;
  } else {
    const int block = opts.format == Format::kNVFP4 ? kNvBlock : kMxBlock;
    p.data[x.ndim - 1] = x.size(-1) / 2;
    p.scales[x.ndim - 1] = x.size(-1) / block;
  }
  return p;
}

Status validate_quantize(const TensorView& x, const TensorView& data, const TensorView& scales,
                         const TensorView& global_scale, const QuantizeOptions& opts) {
  ATTNQAT_RETURN_IF_ERROR(check_float_input(x, /*allow_f64=*/false));
  ATTNQAT_RETURN_IF_ERROR(check_block_axis(x, opts));
  ATTNQAT_RETURN_IF_ERROR(check_last_dim_contiguous(x));
  const PackedShapes p = packed_shapes(x, opts);
  ATTNQAT_RETURN_IF_ERROR(check_output(data, x, DType::kUInt8, p.ndim, p.data));
  ATTNQAT_RETURN_IF_ERROR(check_output(scales, x, DType::kUInt8, p.ndim, p.scales));
  return check_global_scale(global_scale, x, opts);
}

Status validate_dequantize(const TensorView& data, const TensorView& scales,
                           const TensorView& global_scale, const TensorView& out,
                           const QuantizeOptions& opts) {
  if (opts.compute_global_scale)
    return Status::Invalid("dequantize: compute_global_scale must be false (the scale is an input)");
  ATTNQAT_RETURN_IF_ERROR(check_float_input(out, /*allow_f64=*/false));
  ATTNQAT_RETURN_IF_ERROR(check_block_axis(out, opts));
  if (!out.is_contiguous())
    return Status::Invalid(std::string(out.name) + ": expected a contiguous output tensor");
  const PackedShapes p = packed_shapes(out, opts);
  ATTNQAT_RETURN_IF_ERROR(check_dtype(data, DType::kUInt8));
  ATTNQAT_RETURN_IF_ERROR(check_shape(data, p.ndim, p.data));
  ATTNQAT_RETURN_IF_ERROR(check_same_device(out, data));
  if (!data.is_contiguous())
    return Status::Invalid(std::string(data.name) + ": expected a contiguous tensor");
  ATTNQAT_RETURN_IF_ERROR(check_dtype(scales, DType::kUInt8));
  ATTNQAT_RETURN_IF_ERROR(check_shape(scales, p.ndim, p.scales));
  ATTNQAT_RETURN_IF_ERROR(check_same_device(out, scales));
  if (!scales.is_contiguous())
    return Status::Invalid(std::string(scales.name) + ": expected a contiguous tensor");
  return check_global_scale(global_scale, out, opts);
}

Status validate_fake_quantize(const TensorView& x, const TensorView& out,
                              const TensorView& global_scale, const QuantizeOptions& opts) {
  ATTNQAT_RETURN_IF_ERROR(check_float_input(x, /*allow_f64=*/false));
  ATTNQAT_RETURN_IF_ERROR(check_block_axis(x, opts));
  ATTNQAT_RETURN_IF_ERROR(check_last_dim_contiguous(x));
  ATTNQAT_RETURN_IF_ERROR(check_dtype(out, x.dtype));
  ATTNQAT_RETURN_IF_ERROR(check_shape(out, x.ndim, x.shape));
  ATTNQAT_RETURN_IF_ERROR(check_same_device(x, out));
  ATTNQAT_RETURN_IF_ERROR(check_last_dim_contiguous(out));
  return check_global_scale(global_scale, x, opts);
}

bool needs_o_hp(const AttentionOptions& opts) {
  return opts.mode != Mode::kBF16 && opts.mode != Mode::kFP4 && opts.bwd.high_precision_o;
}

float resolve_softmax_scale(const AttentionOptions& opts, int64_t head_dim) {
  if (opts.softmax_scale > 0.0f) return opts.softmax_scale;
  return static_cast<float>(1.0 / std::sqrt(static_cast<double>(head_dim)));
}

namespace {

constexpr int kMaxHeadDim = 256;

Status check_qkv(const TensorView& q, const TensorView& k, const TensorView& v,
                 const AttentionOptions& opts) {
  for (const TensorView* t : {&q, &k, &v}) {
    ATTNQAT_RETURN_IF_ERROR(check_float_input(*t, q.device == Device::kCPU));
    if (t->ndim != 4)
      return Status::Invalid(std::string(t->name) + ": expected a 4-D tensor [batch, heads, seq, " +
                             "head_dim], got shape " + t->shape_str());
    ATTNQAT_RETURN_IF_ERROR(check_last_dim_contiguous(*t));
  }
  ATTNQAT_RETURN_IF_ERROR(check_same_device(q, k));
  ATTNQAT_RETURN_IF_ERROR(check_same_device(q, v));
  if (k.dtype != q.dtype || v.dtype != q.dtype)
    return Status::Invalid(std::string("k, v: expected the dtype of q (") + dtype_name(q.dtype) +
                           "), got " + dtype_name(k.dtype) + " and " + dtype_name(v.dtype));
  const int64_t d = q.shape[3];
  if (d <= 0 || d % kNvBlock != 0 || d > kMaxHeadDim)
    return Status::Invalid("q: expected head_dim a positive multiple of 16 up to 256 (the NVFP4 "
                           "block), got " + std::to_string(d));
  if (k.shape[0] != q.shape[0] || v.shape[0] != q.shape[0])
    return Status::Invalid("k, v: expected batch " + std::to_string(q.shape[0]) +
                           " (the batch of q), got " + std::to_string(k.shape[0]) + " and " +
                           std::to_string(v.shape[0]));
  if (k.shape[3] != d || v.shape[3] != d)
    return Status::Invalid("k, v: expected head_dim " + std::to_string(d) +
                           " (the head_dim of q), got " + std::to_string(k.shape[3]) + " and " +
                           std::to_string(v.shape[3]));
  if (v.shape[1] != k.shape[1] || v.shape[2] != k.shape[2])
    return Status::Invalid("v: expected the heads and sequence length of k " + k.shape_str() +
                           ", got " + v.shape_str());
  const int64_t hq = q.shape[1], hkv = k.shape[1];
  if (hkv == 0 ? hq != 0 : hq % hkv != 0)
    return Status::Invalid("q, k: expected the number of query heads (" + std::to_string(hq) +
                           ") to be a multiple of the number of key/value heads (" +
                           std::to_string(hkv) + ")");
  if (opts.causal && opts.v_blocks == VBlocks::kToken && opts.mode != Mode::kBF16)
    return Status::Invalid("v_blocks: 'token' cannot be used with causal attention (a token "
                           "block's scale would depend on future tokens); use v_blocks='channel'");
  if (opts.kv_tile <= 0 || opts.kv_tile % kNvBlock != 0 || opts.kv_tile > 4096)
    return Status::Invalid("kv_tile: expected a positive multiple of 16 up to 4096, got " +
                           std::to_string(opts.kv_tile));
  if (!(opts.softmax_scale >= 0.0f) || !std::isfinite(opts.softmax_scale))
    return Status::Invalid("softmax_scale: expected a positive finite number (or 0 for "
                           "1/sqrt(head_dim)), got " + std::to_string(opts.softmax_scale));
  return Status::Ok();
}

Status check_row_stat(const TensorView& t, const TensorView& q) {
  const int64_t shape[3] = {q.shape[0], q.shape[1], q.shape[2]};
  return check_output(t, q, DType::kFloat32, 3, shape);
}

}  // namespace

Status validate_attention_forward(const TensorView& q, const TensorView& k, const TensorView& v,
                                  const AttentionOptions& opts, const ForwardOutputs& out) {
  ATTNQAT_RETURN_IF_ERROR(check_qkv(q, k, v, opts));
  ATTNQAT_RETURN_IF_ERROR(check_output(out.o, q, q.dtype, 4, q.shape));
  ATTNQAT_RETURN_IF_ERROR(check_row_stat(out.lse, q));
  if (out.o_hp.data != nullptr) ATTNQAT_RETURN_IF_ERROR(check_output(out.o_hp, q, q.dtype, 4, q.shape));
  const bool has_m = out.m_ref.data != nullptr, has_l = out.l.data != nullptr;
  if (has_m != has_l)
    return Status::Invalid("m_ref, l: expected both (the row statistics of the anchored backward) "
                           "or neither");
  if (has_m) {
    ATTNQAT_RETURN_IF_ERROR(check_row_stat(out.m_ref, q));
    ATTNQAT_RETURN_IF_ERROR(check_row_stat(out.l, q));
  }
  return Status::Ok();
}

Status validate_attention_backward(const TensorView& dout, const TensorView& q,
                                   const TensorView& k, const TensorView& v,
                                   const ForwardState& saved, const AttentionOptions& opts,
                                   const BackwardOutputs& grads) {
  if (opts.mode == Mode::kFP4)
    return Status::Invalid("mode: 'fp4' is the inference forward and has no backward; train with "
                           "mode='attn_qat' (or 'drop_in_qat', the paper's naive baseline)");
  ATTNQAT_RETURN_IF_ERROR(check_qkv(q, k, v, opts));
  ATTNQAT_RETURN_IF_ERROR(check_float_input(dout, q.device == Device::kCPU));
  ATTNQAT_RETURN_IF_ERROR(check_same_device(q, dout));
  if (dout.dtype != q.dtype)
    return Status::Invalid(std::string("dout: expected dtype ") + dtype_name(q.dtype) + ", got " +
                           dtype_name(dout.dtype));
  ATTNQAT_RETURN_IF_ERROR(check_shape(dout, 4, q.shape));
  ATTNQAT_RETURN_IF_ERROR(check_last_dim_contiguous(dout));
  // What the backward reads depends on the switches (numerics section 5-6).
  const bool quantized = opts.mode != Mode::kBF16;
  const bool d_from_o_hp = quantized && opts.bwd.high_precision_o;
  const TensorView& d_src = d_from_o_hp ? saved.o_hp : saved.o;
  if (d_src.data == nullptr && d_src.numel() != 0)
    return Status::Invalid(std::string(d_from_o_hp ? "o_hp" : "o") +
                           ": expected the forward's " + (d_from_o_hp ? "O' (high-precision output)"
                                                                     : "output O") +
                           ", got none");
  if (d_src.data != nullptr) {
    TensorView named = d_src;
    named.name = d_from_o_hp ? "o_hp" : "o";
    ATTNQAT_RETURN_IF_ERROR(check_dtype(named, q.dtype));
    ATTNQAT_RETURN_IF_ERROR(check_shape(named, 4, q.shape));
    ATTNQAT_RETURN_IF_ERROR(check_same_device(q, named));
    ATTNQAT_RETURN_IF_ERROR(check_last_dim_contiguous(named));
  }
  TensorView lse = saved.lse;
  lse.name = "lse";
  ATTNQAT_RETURN_IF_ERROR(check_row_stat(lse, q));
  if (quantized && opts.p_quant == PQuant::kAnchored && opts.bwd.quant_p && opts.bwd.quantized_qkv) {
    TensorView m = saved.m_ref, l = saved.l;
    m.name = "m_ref";
    l.name = "l";
    ATTNQAT_RETURN_IF_ERROR(check_row_stat(m, q));
    ATTNQAT_RETURN_IF_ERROR(check_row_stat(l, q));
  }
  TensorView dq = grads.dq, dk = grads.dk, dv = grads.dv;
  dq.name = "dq";
  dk.name = "dk";
  dv.name = "dv";
  ATTNQAT_RETURN_IF_ERROR(check_output(dq, q, q.dtype, 4, q.shape));
  ATTNQAT_RETURN_IF_ERROR(check_output(dk, q, q.dtype, 4, k.shape));
  ATTNQAT_RETURN_IF_ERROR(check_output(dv, q, q.dtype, 4, v.shape));
  return Status::Ok();
}

}  // namespace attnqat
