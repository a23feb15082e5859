// Argument validation shared by every backend. See validate.h.
#include "common/validate.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <sstream>
#include <string>
#include <tuple>
#include <utility>

namespace attnqat {
namespace {

// The range of second-level scales (numerics 9.2): what nvfp4_global_scale() produces.
constexpr float kMinGlobalScale = 7.8886090522101181e-31f;  // 2^-100
constexpr float kMaxGlobalScale = 1.2676506002282294e+30f;  // 2^100

std::string device_str(const TensorView& t) {
  return t.device == Device::kCPU ? std::string("cpu") : "cuda:" + std::to_string(t.device_id);
}

// A view whose dimensions make sense (from any caller of the C++ API: the binding builds only
// such views, but a hand-made one may not).
Status check_dims(const TensorView& t) {
  if (t.ndim < 0 || t.ndim > kMaxDims)
    return Status::Invalid(std::string(t.name) + ": expected 0 to " + std::to_string(kMaxDims) +
                           " dimensions, got " + std::to_string(t.ndim));
  for (int i = 0; i < t.ndim; ++i)
    if (t.shape[i] < 0)
      return Status::Invalid(std::string(t.name) + ": expected non-negative sizes, got shape " +
                             t.shape_str());
  return Status::Ok();
}

Status check_present(const TensorView& t) {
  ATTNQAT_RETURN_IF_ERROR(check_dims(t));
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
  // An empty tensor addresses nothing: any strides will do (torch gives expanded gradients of
  // empty outputs stride 0).
  if (t.ndim > 0 && t.size(-1) > 1 && t.stride_of(-1) != 1 && t.numel() != 0)
    return Status::Invalid(std::string(t.name) + ": expected the last dimension to be contiguous "
                           "(stride 1), got stride " + std::to_string(t.stride_of(-1)) +
                           "; call .contiguous() first");
  return Status::Ok();
}

Status check_output(const TensorView& t, const TensorView& ref_device, DType dtype, int ndim,
                    const int64_t* shape) {
  ATTNQAT_RETURN_IF_ERROR(check_dims(t));
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
    if (!is_power_of_two(gv) || gv < kMinGlobalScale || gv > kMaxGlobalScale) {
      std::ostringstream os;
      os << g.name << ": expected a power of two in [2^-100, 2^100] (so that decoded values are "
         << "exact), got " << gv;
      return Status::Invalid(os.str());
    }
  }
  return Status::Ok();
}

}  // namespace

Status validate_quantize_options(const QuantizeOptions& opts) {
  if (opts.format != Format::kNVFP4 && opts.format != Format::kMXFP4)
    return Status::Invalid("format: expected NVFP4 or MXFP4, got enum value " +
                           std::to_string(static_cast<int>(opts.format)));
  if (opts.axis != BlockAxis::kLast && opts.axis != BlockAxis::kToken)
    return Status::Invalid("axis: expected last or token, got enum value " +
                           std::to_string(static_cast<int>(opts.axis)));
  return Status::Ok();
}

namespace {

// The block axis of x: its length must be a multiple of the block size (channel blocks).
Status check_block_axis(const TensorView& x, const QuantizeOptions& opts) {
  ATTNQAT_RETURN_IF_ERROR(validate_quantize_options(opts));
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

bool has_sinks_tensor(const TensorView& t) { return t.data != nullptr || t.ndim != 0; }

bool has_sinks(const AttentionOptions& opts) { return has_sinks_tensor(opts.sinks); }

float resolve_softmax_scale(const AttentionOptions& opts, int64_t head_dim) {
  if (opts.softmax_scale > 0.0f) return opts.softmax_scale;
  return static_cast<float>(1.0 / std::sqrt(static_cast<double>(head_dim)));
}

Status check_softmax_scale(float softmax_scale) {
  if (!(softmax_scale >= 0.0f) || !std::isfinite(softmax_scale)) {
    std::ostringstream os;
    os << "softmax_scale: expected a positive finite number (or 0 for 1/sqrt(head_dim)), got "
       << softmax_scale;
    return Status::Invalid(os.str());
  }
  return Status::Ok();
}

namespace {

// A double as Python's repr() writes it (0.0, -1.0, 0.1, 1e-50, nan, inf), for the messages of
// values that came from Python.
std::string repr_double(double v) {
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  char buf[40];
  for (int precision = 1; precision <= 17; ++precision) {
    std::snprintf(buf, sizeof buf, "%.*g", precision, v);
    if (std::strtod(buf, nullptr) == v) break;
  }
  std::string s = buf;
  if (s.find_first_of(".en") == std::string::npos) s += ".0";
  return s;
}

}  // namespace

Status softmax_scale_from_double(double value, float* out) {
  if (!(value > 0.0) || !std::isfinite(value))
    return Status::Invalid("softmax_scale: expected a positive finite number, got " + repr_double(value));
  const float f = static_cast<float>(value);
  if (!(f > 0.0f) || !std::isfinite(f)) {
    std::ostringstream os;
    os << "softmax_scale: expected a positive finite number in float32 range ["
       << std::numeric_limits<float>::min() << ", " << std::numeric_limits<float>::max()
       << "], got " << repr_double(value);
    return Status::Invalid(os.str());
  }
  *out = f;
  return Status::Ok();
}

Status validate_attention_options(const AttentionOptions& opts) {
  const int mode = static_cast<int>(opts.mode), pq = static_cast<int>(opts.p_quant),
            vb = static_cast<int>(opts.v_blocks), pr = static_cast<int>(opts.precision);
  if (mode > static_cast<int>(Mode::kAttnQAT))
    return Status::Invalid("mode: expected one of bf16, fp4, drop_in_qat, attn_qat; got enum value " +
                           std::to_string(mode));
  if (pq > static_cast<int>(PQuant::kAnchored))
    return Status::Invalid("p_quant: expected paper or anchored, got enum value " + std::to_string(pq));
  if (vb > static_cast<int>(VBlocks::kToken))
    return Status::Invalid("v_blocks: expected channel or token, got enum value " + std::to_string(vb));
  if (pr > static_cast<int>(Precision::kBF16Operands))
    return Status::Invalid("precision: expected fp32, fp64 or bf16_operands, got enum value " +
                           std::to_string(pr));
  if (opts.kv_tile <= 0 || opts.kv_tile % kNvBlock != 0 || opts.kv_tile > kMaxKvTile)
    return Status::Invalid("kv_tile: expected a positive multiple of 16 up to " +
                           std::to_string(kMaxKvTile) + ", got " + std::to_string(opts.kv_tile));
  ATTNQAT_RETURN_IF_ERROR(check_softmax_scale(opts.softmax_scale));
  if (!(opts.softcap >= 0.0f) || !std::isfinite(opts.softcap))
    return Status::Invalid("softcap: expected 0 (off) or a positive finite number, got " +
                           repr_double(opts.softcap));
  if (opts.window_left < -1 || opts.window_right < -1) {
    const bool left = opts.window_left < -1;
    return Status::Invalid(std::string(left ? "window_left" : "window_right") +
                           ": expected -1 (unbounded) or a number of keys >= 0, got " +
                           std::to_string(left ? opts.window_left : opts.window_right));
  }
  if (opts.causal && opts.v_blocks == VBlocks::kToken && opts.mode != Mode::kBF16)
    return Status::Invalid("v_blocks: 'token' cannot be used with causal attention (a token "
                           "block's scale would depend on future tokens); use v_blocks='channel'");
  if (opts.window_right == 0 && opts.v_blocks == VBlocks::kToken && opts.mode != Mode::kBF16)
    return Status::Invalid("v_blocks: 'token' cannot be used with a window whose right side is 0 (a token "
                           "block's scale would depend on future tokens); use v_blocks='channel'");
  return Status::Ok();
}

MaskKind attention_mask_kind(const AttentionOptions& opts) {
  const int right = opts.causal ? 0 : opts.window_right;
  if (opts.window_left < 0 && right < 0) return MaskKind::kNone;
  if (opts.window_left < 0 && right == 0) return MaskKind::kCausal;
  return MaskKind::kLocal;
}

SeqInfo attention_seq(const AttentionOptions& opts, int64_t len_q, int64_t len_k) {
  SeqInfo s{static_cast<int>(len_q), static_cast<int>(len_k)};
  if (attention_mask_kind(opts) == MaskKind::kLocal) {
    s.window_left = opts.window_left;
    s.window_right = opts.causal ? 0 : opts.window_right;
  }
  return s;
}

Status validate_decode_options(const DecodeOptions& opts) {
  ATTNQAT_RETURN_IF_ERROR(check_softmax_scale(opts.softmax_scale));
  if (static_cast<int>(opts.p_quant) > static_cast<int>(PQuant::kAnchored))
    return Status::Invalid("p_quant: expected paper or anchored, got enum value " +
                           std::to_string(static_cast<int>(opts.p_quant)));
  if (opts.num_splits < 0 || opts.max_seq_len < 0)
    return Status::Invalid("num_splits, max_seq_len: expected non-negative values (0: automatic), got " +
                           std::to_string(opts.num_splits) + " and " + std::to_string(opts.max_seq_len));
  if (opts.window_left < -1)
    return Status::Invalid("window_left: expected -1 (no window) or a number of keys >= 0 to the left of "
                           "each query's diagonal key, got " + std::to_string(opts.window_left));
  return Status::Ok();
}

Status check_paper_kv_tile(const AttentionOptions& opts) {
  if (opts.mode != Mode::kBF16 && opts.p_quant == PQuant::kPaper && opts.kv_tile != kKernelKvTile)
    return Status::Invalid("kv_tile: p_quant='paper' depends on the key tile, and the CUDA kernels and the "
                           "FP4 KV cache's decode use " + std::to_string(kKernelKvTile) +
                           "-key tiles; got kv_tile=" + std::to_string(opts.kv_tile) +
                           " (use kv_tile=" + std::to_string(kKernelKvTile) + " or p_quant='anchored')");
  return Status::Ok();
}

namespace {

std::string head_dim_message(const char* name, int64_t d) {
  return std::string(name) + ": expected head_dim a positive multiple of 16 up to " +
         std::to_string(kMaxHeadDim) + " (the NVFP4 block; CPU reference: 16, 32, ..., " +
         std::to_string(kMaxHeadDim) + "; CUDA kernels: 16, 32, ..., 128), got " + std::to_string(d);
}

// softcap with the head dim known (numerics 9.9): the scores are b * tanh(a * S) with
// a = c / softcap and b = softcap * log2(e), which must be normal float32 numbers.
Status check_softcap_constants(const AttentionOptions& opts, int64_t head_dim) {
  if (opts.softcap == 0.0f) return Status::Ok();
  const float c = resolve_softmax_scale(opts, head_dim);
  const float a = c / opts.softcap, b = opts.softcap * 1.44269504088896340736f;
  const auto normal = [](float x) { return std::isfinite(x) && x >= std::numeric_limits<float>::min(); };
  if (!normal(a) || !normal(b))
    return Status::Invalid("softcap: softmax_scale / softcap and softcap * log2(e) must be normal float32 "
                           "numbers (the constants of the capped scores), got softcap " +
                           repr_double(opts.softcap) + " with softmax_scale " + repr_double(c));
  return Status::Ok();
}

// The sinks of the query heads (numerics 9.10): float32 [Hq] on the device of q; on the CPU their
// values are read too: NaN and +inf are errors (-inf: that head has no sink).
Status check_sinks(const TensorView& sinks, const TensorView& q) {
  if (!has_sinks_tensor(sinks)) return Status::Ok();
  TensorView named = sinks;
  named.name = "sinks";
  ATTNQAT_RETURN_IF_ERROR(check_dtype(named, DType::kFloat32));
  if (named.ndim != 1 || named.shape[0] != q.shape[1])
    return Status::Invalid("sinks: expected one logit per query head, shape [" + std::to_string(q.shape[1]) +
                           "], got " + named.shape_str());
  ATTNQAT_RETURN_IF_ERROR(check_same_device(q, named));
  if (named.device == Device::kCPU) {
    const float* z = static_cast<const float*>(named.data);
    for (int64_t h = 0; h < named.shape[0]; ++h) {
      const float x = z[h * named.stride[0]];
      if (std::isnan(x) || x == std::numeric_limits<float>::infinity())
        return Status::Invalid("sinks: expected finite logits (or -inf: no sink for that head), got " +
                               repr_double(x) + " at index " + std::to_string(h));
    }
  }
  return Status::Ok();
}

Status check_qkv(const TensorView& q, const TensorView& k, const TensorView& v,
                 const AttentionOptions& opts) {
  ATTNQAT_RETURN_IF_ERROR(validate_attention_options(opts));
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
  if (d <= 0 || d % kNvBlock != 0 || d > kMaxHeadDim) return Status::Invalid(head_dim_message("q", d));
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
  ATTNQAT_RETURN_IF_ERROR(check_softcap_constants(opts, d));
  return check_sinks(opts.sinks, q);
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
  if (has_sinks_tensor(grads.dsinks)) {
    TensorView dsinks = grads.dsinks;
    dsinks.name = "dsinks";
    if (!has_sinks(opts))
      return Status::Invalid("dsinks: the gradient of the sinks, but the call has no sinks");
    const int64_t shape[1] = {q.shape[1]};
    ATTNQAT_RETURN_IF_ERROR(check_output(dsinks, q, DType::kFloat32, 1, shape));
  }
  return Status::Ok();
}

}  // namespace attnqat

// ---- FP4 inference: packed attention, the paged FP4 KV cache, decode ----------------

namespace attnqat {
namespace {

Status check_uint8_tensor(const TensorView& t, int ndim) {
  ATTNQAT_RETURN_IF_ERROR(check_dtype(t, DType::kUInt8));
  if (t.ndim != ndim)
    return Status::Invalid(std::string(t.name) + ": expected a " + std::to_string(ndim) +
                           "-D tensor, got shape " + t.shape_str());
  if (!t.is_contiguous())
    return Status::Invalid(std::string(t.name) + ": expected a contiguous tensor");
  return Status::Ok();
}

Status check_index(const IndexView& t, int ndim, const TensorView& ref) {
  if (t.data == nullptr && t.numel() != 0)
    return Status::Invalid(std::string(t.name) + ": expected an int32 tensor, got none");
  if (t.ndim != ndim)
    return Status::Invalid(std::string(t.name) + ": expected a " + std::to_string(ndim) +
                           "-D int32 tensor, got " + std::to_string(t.ndim) + " dimensions");
  if (t.device != ref.device || t.device_id != ref.device_id)
    return Status::Invalid(std::string(t.name) + ": expected a tensor on " + device_str(ref) +
                           " (the device of " + ref.name + ")");
  if (t.shape[ndim - 1] > 1 && t.stride[ndim - 1] != 1)
    return Status::Invalid(std::string(t.name) + ": expected the last dimension to be contiguous");
  return Status::Ok();
}

// A logical [B, H, N, D] view of a packed tensor (data pointer kept, never dereferenced), in the
// dtype of the output, so that check_qkv's shape rules and messages apply unchanged.
TensorView logical_view(const PackedTensor& p, const char* name, DType dtype, int64_t n_hint,
                        bool token_axis, Status* st) {
  TensorView t;
  t.name = name;
  t.data = p.data.data;
  t.dtype = dtype;
  t.device = p.data.device;
  t.device_id = p.data.device_id;
  t.ndim = 4;
  *st = Status::Ok();
  const TensorView& d = p.data;
  const TensorView& s = p.scales;
  if (d.ndim != 4 || s.ndim != 4) {
    *st = Status::Invalid(std::string(name) + ": expected packed data and scales of 4 dimensions " +
                          "[B, H, N, D/2] and [B, H, N, D/16], got " + d.shape_str() + " and " +
                          s.shape_str());
    return t;
  }
  if (!token_axis) {
    t.shape[0] = d.shape[0];
    t.shape[1] = d.shape[1];
    t.shape[2] = d.shape[2];
    t.shape[3] = d.shape[3] * 2;
    const int64_t want_s[4] = {d.shape[0], d.shape[1], d.shape[2], t.shape[3] / kNvBlock};
    if (t.shape[3] % kNvBlock != 0 || s.shape[0] != want_s[0] || s.shape[1] != want_s[1] ||
        s.shape[2] != want_s[2] || s.shape[3] != want_s[3]) {
      TensorView w;
      w.ndim = 4;
      for (int i = 0; i < 4; ++i) w.shape[i] = want_s[i];
      *st = Status::Invalid(std::string(name) + ": packed data " + d.shape_str() +
                            " needs scales " + w.shape_str() + " (one E4M3 byte per 16 channels), got " +
                            s.shape_str());
    }
  } else {
    // V with token blocks: data [B, H, D, ceil(N/16)*8], scales [B, H, D, ceil(N/16)].
    const int64_t nb = (n_hint + kNvBlock - 1) / kNvBlock;
    t.shape[0] = d.shape[0];
    t.shape[1] = d.shape[1];
    t.shape[2] = n_hint;
    t.shape[3] = d.shape[2];
    if (d.shape[3] != nb * (kNvBlock / 2) || s.shape[0] != d.shape[0] || s.shape[1] != d.shape[1] ||
        s.shape[2] != d.shape[2] || s.shape[3] != nb)
      *st = Status::Invalid(std::string(name) + ": token-axis packing of " + std::to_string(n_hint) +
                            " tokens expects data [B, H, D, " + std::to_string(nb * 8) +
                            "] and scales [B, H, D, " + std::to_string(nb) + "], got " +
                            d.shape_str() + " and " + s.shape_str());
  }
  for (int i = 3; i >= 0; --i) t.stride[i] = i == 3 ? 1 : t.stride[i + 1] * t.shape[i + 1];
  return t;
}

Status check_packed_parts(const PackedTensor& p, const char* name) {
  ATTNQAT_RETURN_IF_ERROR(check_uint8_tensor(p.data, 4));
  ATTNQAT_RETURN_IF_ERROR(check_uint8_tensor(p.scales, 4));
  ATTNQAT_RETURN_IF_ERROR(check_same_device(p.data, p.scales));
  QuantizeOptions qo;  // NVFP4: the global scale must be a one-element fp32 power of two
  return check_global_scale(p.global_scale, p.data, qo);
}

}  // namespace

Status validate_attention_forward_packed(const PackedTensor& q, const PackedTensor& k,
                                         const PackedTensor& v, const AttentionOptions& opts,
                                         const ForwardOutputs& out) {
  if (opts.mode != Mode::kFP4)
    return Status::Invalid(std::string("mode: attention from packed NVFP4 tensors is the inference "
                                       "forward, mode 'fp4'; got '") + mode_name(opts.mode) + "'");
  if (out.o_hp.data != nullptr)
    return Status::Invalid("o_hp: mode 'fp4' has no O' output; leave it undefined");
  ATTNQAT_RETURN_IF_ERROR(check_packed_parts(q, "q"));
  ATTNQAT_RETURN_IF_ERROR(check_packed_parts(k, "k"));
  ATTNQAT_RETURN_IF_ERROR(check_packed_parts(v, "v"));
  ATTNQAT_RETURN_IF_ERROR(check_same_device(q.data, k.data));
  ATTNQAT_RETURN_IF_ERROR(check_same_device(q.data, v.data));
  ATTNQAT_RETURN_IF_ERROR(check_float_input(out.o, out.o.device == Device::kCPU));
  Status st;
  const TensorView lq = logical_view(q, "q", out.o.dtype, 0, false, &st);
  ATTNQAT_RETURN_IF_ERROR(st);
  const TensorView lk = logical_view(k, "k", out.o.dtype, 0, false, &st);
  ATTNQAT_RETURN_IF_ERROR(st);
  const TensorView lv =
      logical_view(v, "v", out.o.dtype, lk.shape[2], opts.v_blocks == VBlocks::kToken, &st);
  ATTNQAT_RETURN_IF_ERROR(st);
  return validate_attention_forward(lq, lk, lv, opts, out);
}

Status validate_kv_cache(const PagedKVCache& cache, KVCacheDims* dims) {
  for (const TensorView* t : {&cache.k_data, &cache.k_scales, &cache.v_data, &cache.v_scales})
    ATTNQAT_RETURN_IF_ERROR(check_uint8_tensor(*t, 4));
  for (const TensorView* t : {&cache.k_scales, &cache.v_data, &cache.v_scales})
    ATTNQAT_RETURN_IF_ERROR(check_same_device(cache.k_data, *t));
  const TensorView& kd = cache.k_data;
  KVCacheDims d;
  d.num_pages = kd.shape[0];
  d.heads = kd.shape[1];
  d.page_size = kd.shape[2];
  d.head_dim = kd.shape[3] * 2;
  if (d.page_size <= 0 || d.page_size % kNvBlock != 0)
    return Status::Invalid(std::string(kd.name) + ": expected a page size (dimension 2) that is a " +
                           "positive multiple of 16 (P blocks of 16 keys never straddle a page), got " +
                           std::to_string(d.page_size));
  if (d.head_dim % kNvBlock != 0 || d.head_dim <= 0 || d.head_dim > kMaxHeadDim)
    return Status::Invalid(std::string(kd.name) + ": expected D/2 bytes per token with D a positive " +
                           "multiple of 16 up to " + std::to_string(kMaxHeadDim) + " (CPU reference; " +
                           "the CUDA decode kernel takes 64 and 128), got " +
                           std::to_string(kd.shape[3]) + " bytes (D = " + std::to_string(d.head_dim) + ")");
  const int64_t sshape[4] = {d.num_pages, d.heads, d.page_size, d.head_dim / kNvBlock};
  ATTNQAT_RETURN_IF_ERROR(check_shape(cache.k_scales, 4, sshape));
  ATTNQAT_RETURN_IF_ERROR(check_shape(cache.v_data, 4, kd.shape));
  ATTNQAT_RETURN_IF_ERROR(check_shape(cache.v_scales, 4, sshape));
  if (d.heads <= 0 || d.num_pages <= 0)
    return Status::Invalid(std::string(kd.name) + ": expected at least one page and one head, got " +
                           kd.shape_str());
  *dims = d;
  return Status::Ok();
}

Status validate_page_values(const IndexView& page_table, const IndexView& lens, int64_t add,
                            const KVCacheDims& dims) {
  const int64_t B = page_table.shape[0], P = page_table.shape[1];
  const int64_t capacity = P * dims.page_size;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t base = lens.data[b * lens.stride[0]];
    const int64_t end = base + add;
    if (base < 0)
      return Status::Invalid(std::string(lens.name) + "[" + std::to_string(b) +
                             "]: expected a non-negative length, got " + std::to_string(base));
    if (end > capacity)
      return Status::Invalid("sequence " + std::to_string(b) + ": length " + std::to_string(end) +
                             " is beyond the capacity of its page table row (" + std::to_string(P) +
                             " pages of " + std::to_string(dims.page_size) + " tokens = " +
                             std::to_string(capacity) + ")");
    const int64_t first = add > 0 ? base : 0;
    const int64_t pages_used_from = first / dims.page_size;
    const int64_t pages_used_to = (end + dims.page_size - 1) / dims.page_size;
    for (int64_t p = pages_used_from; p < pages_used_to; ++p) {
      const int64_t id = page_table.data[b * page_table.stride[0] + p * page_table.stride[1]];
      if (id < 0 || id >= dims.num_pages)
        return Status::Invalid(std::string(page_table.name) + "[" + std::to_string(b) + ", " +
                               std::to_string(p) + "]: page id " + std::to_string(id) +
                               " is out of range [0, " + std::to_string(dims.num_pages) + ")");
    }
  }
  return Status::Ok();
}

namespace {

Status check_page_table(const IndexView& page_table, const IndexView& lens, int64_t batch,
                        const TensorView& ref) {
  ATTNQAT_RETURN_IF_ERROR(check_index(page_table, 2, ref));
  ATTNQAT_RETURN_IF_ERROR(check_index(lens, 1, ref));
  if (page_table.shape[0] != batch)
    return Status::Invalid(std::string(page_table.name) + ": expected one row per sequence (" +
                           std::to_string(batch) + "), got " + std::to_string(page_table.shape[0]));
  if (lens.shape[0] != batch)
    return Status::Invalid(std::string(lens.name) + ": expected one length per sequence (" +
                           std::to_string(batch) + "), got " + std::to_string(lens.shape[0]));
  if (page_table.shape[1] <= 0 && batch > 0)
    return Status::Invalid(std::string(page_table.name) + ": expected at least one page per row");
  return Status::Ok();
}

}  // namespace

Status validate_kv_cache_append(const PagedKVCache& cache, const TensorView& k_new,
                                const TensorView& v_new, const IndexView& page_table,
                                const IndexView& start, KVCacheDims* dims) {
  ATTNQAT_RETURN_IF_ERROR(validate_kv_cache(cache, dims));
  for (const TensorView* t : {&k_new, &v_new}) {
    ATTNQAT_RETURN_IF_ERROR(check_float_input(*t, false));
    if (t->ndim != 4)
      return Status::Invalid(std::string(t->name) + ": expected a 4-D tensor [batch, kv_heads, " +
                             "n_new, head_dim], got shape " + t->shape_str());
    ATTNQAT_RETURN_IF_ERROR(check_last_dim_contiguous(*t));
    ATTNQAT_RETURN_IF_ERROR(check_same_device(cache.k_data, *t));
  }
  if (v_new.dtype != k_new.dtype)
    return Status::Invalid(std::string(v_new.name) + ": expected the dtype of " + k_new.name + " (" +
                           dtype_name(k_new.dtype) + "), got " + dtype_name(v_new.dtype));
  ATTNQAT_RETURN_IF_ERROR(check_shape(v_new, 4, k_new.shape));
  if (k_new.shape[1] != dims->heads || k_new.shape[3] != dims->head_dim)
    return Status::Invalid(std::string(k_new.name) + ": expected [batch, " + std::to_string(dims->heads) +
                           ", n_new, " + std::to_string(dims->head_dim) +
                           "] (the cache's kv heads and head dim), got " + k_new.shape_str());
  ATTNQAT_RETURN_IF_ERROR(check_page_table(page_table, start, k_new.shape[0], cache.k_data));
  if (cache.k_data.device == Device::kCPU)
    return validate_page_values(page_table, start, k_new.shape[2], *dims);
  return Status::Ok();
}

Status validate_decode_attention(const TensorView& q, const PagedKVCache& cache,
                                 const IndexView& page_table, const IndexView& seq_lens,
                                 const DecodeOptions& opts, const TensorView& out,
                                 const TensorView& lse, KVCacheDims* dims) {
  ATTNQAT_RETURN_IF_ERROR(validate_decode_options(opts));
  ATTNQAT_RETURN_IF_ERROR(validate_kv_cache(cache, dims));
  ATTNQAT_RETURN_IF_ERROR(check_float_input(q, q.device == Device::kCPU));
  if (q.ndim != 4)
    return Status::Invalid(std::string(q.name) + ": expected a 4-D tensor [batch, heads, n_query, " +
                           "head_dim], got shape " + q.shape_str());
  ATTNQAT_RETURN_IF_ERROR(check_last_dim_contiguous(q));
  ATTNQAT_RETURN_IF_ERROR(check_same_device(cache.k_data, q));
  if (q.shape[3] != dims->head_dim)
    return Status::Invalid(std::string(q.name) + ": expected head_dim " + std::to_string(dims->head_dim) +
                           " (the cache's), got " + std::to_string(q.shape[3]));
  if (q.shape[1] % dims->heads != 0 || q.shape[1] == 0)
    return Status::Invalid(std::string(q.name) + ": expected the number of query heads (" +
                           std::to_string(q.shape[1]) + ") to be a positive multiple of the cache's " +
                           "kv heads (" + std::to_string(dims->heads) + ")");
  if (q.shape[2] <= 0)
    return Status::Invalid(std::string(q.name) + ": expected at least one query token, got shape " +
                           q.shape_str());
  ATTNQAT_RETURN_IF_ERROR(check_page_table(page_table, seq_lens, q.shape[0], q));
  ATTNQAT_RETURN_IF_ERROR(check_output(out, q, q.dtype, 4, q.shape));
  if (lse.data != nullptr) {
    const int64_t shape[3] = {q.shape[0], q.shape[1], q.shape[2]};
    ATTNQAT_RETURN_IF_ERROR(check_output(lse, q, DType::kFloat32, 3, shape));
  }
  if (q.device == Device::kCPU) return validate_page_values(page_table, seq_lens, 0, *dims);
  return Status::Ok();
}

}  // namespace attnqat

// ---- Packed sequences (varlen) ----------------------------------------------------------------

namespace attnqat {

TensorView varlen_view(const TensorView& t) {
  TensorView v = t;
  if (t.ndim == 3) {  // [total, H, D] -> [1, H, total, D]
    v.ndim = 4;
    const int64_t shape[4] = {1, t.shape[1], t.shape[0], t.shape[2]};
    const int64_t stride[4] = {t.shape[0] * t.stride[0], t.stride[1], t.stride[0], t.stride[2]};
    std::copy(shape, shape + 4, v.shape);
    std::copy(stride, stride + 4, v.stride);
  } else if (t.ndim == 2) {  // [H, total] -> [1, H, total]
    v.ndim = 3;
    const int64_t shape[3] = {1, t.shape[0], t.shape[1]};
    const int64_t stride[3] = {t.shape[0] * t.stride[0], t.stride[0], t.stride[1]};
    std::copy(shape, shape + 3, v.shape);
    std::copy(stride, stride + 3, v.stride);
  }
  return v;
}

namespace {

// The dense validators see the 4-D views with contiguous strides: the varlen checks below have
// already checked the real layouts, and this way every dtype, device, head and option rule (and
// its message) is the dense call's.
TensorView dense_look(const TensorView& t) {
  TensorView v = varlen_view(t);
  if (v.data == nullptr && v.numel() == 0) return v;
  int64_t s = 1;
  for (int i = v.ndim - 1; i >= 0; --i) {
    v.stride[i] = s;
    s *= v.shape[i];
  }
  return v;
}

Status check_varlen_tensor(const TensorView& t, const char* what) {
  if (t.ndim != 3)
    return Status::Invalid(std::string(t.name) + ": expected a 3-D tensor [" + what +
                           ", heads, head_dim] (packed sequences), got shape " + t.shape_str());
  return Status::Ok();
}

// [H, total] fp32 contiguous (lse, m_ref, l of packed sequences).
Status check_varlen_stat(const TensorView& t, const TensorView& q) {
  const int64_t shape[2] = {q.shape[1], q.shape[0]};
  return check_output(t, q, DType::kFloat32, 2, shape);
}

Status check_varlen_seqs(const VarlenSeqs& s, const TensorView& q, const TensorView& k,
                         const AttentionOptions& opts) {
  if (opts.v_blocks == VBlocks::kToken)
    return Status::Invalid("v_blocks: 'token' blocks run 16 tokens along the sequence and would "
                           "straddle packed sequences; packed sequences take 'channel'");
  ATTNQAT_RETURN_IF_ERROR(check_index(s.cu_seqlens_q, 1, q));
  ATTNQAT_RETURN_IF_ERROR(check_index(s.cu_seqlens_k, 1, q));
  const int64_t n = s.cu_seqlens_q.shape[0];
  if (n < 2 || s.cu_seqlens_k.shape[0] != n)
    return Status::Invalid(std::string(s.cu_seqlens_q.name) + ", " + s.cu_seqlens_k.name +
                           ": expected two int32 tensors [num_seqs + 1] of equal length >= 2, "
                           "got " + std::to_string(n) + " and " +
                           std::to_string(s.cu_seqlens_k.shape[0]));
  constexpr int64_t kMaxLen = (int64_t{1} << 31) - 256;
  for (const auto& [name, v] : {std::pair<const char*, int64_t>{"max_seqlen_q", s.max_seqlen_q},
                                std::pair<const char*, int64_t>{"max_seqlen_k", s.max_seqlen_k}})
    if (v < 0 || v > kMaxLen)
      return Status::Invalid(std::string(name) + ": expected a length in [0, 2^31 - 256], got " +
                             std::to_string(v));
  if (q.shape[0] > kMaxLen || k.shape[0] > kMaxLen)
    return Status::Invalid("q, k: packed sequences hold at most 2^31 - 256 tokens, got " +
                           std::to_string(q.shape[0]) + " and " + std::to_string(k.shape[0]));
  if (s.seqused_k.data != nullptr) {
    ATTNQAT_RETURN_IF_ERROR(check_index(s.seqused_k, 1, q));
    if (s.seqused_k.shape[0] != n - 1)
      return Status::Invalid(std::string(s.seqused_k.name) + ": expected an int32 tensor [num_seqs] = [" +
                             std::to_string(n - 1) + "], got " + std::to_string(s.seqused_k.shape[0]));
  }
  if (q.device != Device::kCPU) return Status::Ok();  // on the device: trusted (attnqat.h)
  for (int64_t i = 0; s.seqused_k.data != nullptr && i + 1 < n; ++i) {
    const int32_t* ck = s.cu_seqlens_k.data;
    const int64_t range = static_cast<int64_t>(ck[(i + 1) * s.cu_seqlens_k.stride[0]]) -
                          ck[i * s.cu_seqlens_k.stride[0]];
    const int64_t used = s.seqused_k.data[i * s.seqused_k.stride[0]];
    if (used < 0 || used > range)
      return Status::Invalid(std::string(s.seqused_k.name) + ": sequence " + std::to_string(i) +
                             " uses " + std::to_string(used) + " keys, expected 0 .. " +
                             std::to_string(range) + " (its range in cu_seqlens_k)");
  }
  for (const auto& [cu, total, max_len] :
       {std::tuple<const IndexView*, int64_t, int64_t>{&s.cu_seqlens_q, q.shape[0], s.max_seqlen_q},
        std::tuple<const IndexView*, int64_t, int64_t>{&s.cu_seqlens_k, k.shape[0], s.max_seqlen_k}}) {
    const int32_t* c = cu->data;
    const int64_t st = cu->stride[0];
    if (c[0] != 0 || c[(n - 1) * st] != total)
      return Status::Invalid(std::string(cu->name) + ": expected offsets from 0 to " +
                             std::to_string(total) + " (the tokens of " +
                             (cu == &s.cu_seqlens_q ? "q" : "k") + "), got " +
                             std::to_string(c[0]) + " .. " + std::to_string(c[(n - 1) * st]));
    for (int64_t i = 0; i + 1 < n; ++i) {
      const int64_t len = static_cast<int64_t>(c[(i + 1) * st]) - c[i * st];
      if (len < 0 || len > max_len)
        return Status::Invalid(std::string(cu->name) + ": sequence " + std::to_string(i) +
                               " has length " + std::to_string(len) + ", expected 0 .. " +
                               (cu == &s.cu_seqlens_q ? "max_seqlen_q" : "max_seqlen_k") + " = " +
                               std::to_string(max_len));
    }
  }
  return Status::Ok();
}

}  // namespace

Status validate_attention_varlen_forward(const TensorView& q, const TensorView& k,
                                         const TensorView& v, const VarlenSeqs& seqs,
                                         const AttentionOptions& opts, const ForwardOutputs& out) {
  ATTNQAT_RETURN_IF_ERROR(check_varlen_tensor(q, "total_q"));
  ATTNQAT_RETURN_IF_ERROR(check_varlen_tensor(k, "total_k"));
  ATTNQAT_RETURN_IF_ERROR(check_varlen_tensor(v, "total_k"));
  ATTNQAT_RETURN_IF_ERROR(check_output(out.o, q, q.dtype, 3, q.shape));
  if (out.o_hp.data != nullptr) ATTNQAT_RETURN_IF_ERROR(check_output(out.o_hp, q, q.dtype, 3, q.shape));
  ATTNQAT_RETURN_IF_ERROR(check_varlen_stat(out.lse, q));
  if (out.m_ref.data != nullptr) ATTNQAT_RETURN_IF_ERROR(check_varlen_stat(out.m_ref, q));
  if (out.l.data != nullptr) ATTNQAT_RETURN_IF_ERROR(check_varlen_stat(out.l, q));
  const ForwardOutputs dense{dense_look(out.o), dense_look(out.o_hp), dense_look(out.lse),
                             dense_look(out.m_ref), dense_look(out.l)};
  ATTNQAT_RETURN_IF_ERROR(validate_attention_forward(varlen_view(q), varlen_view(k),
                                                     varlen_view(v), opts, dense));
  return check_varlen_seqs(seqs, q, k, opts);
}

Status validate_attention_varlen_backward(const TensorView& dout, const TensorView& q,
                                          const TensorView& k, const TensorView& v,
                                          const VarlenSeqs& seqs, const ForwardState& saved,
                                          const AttentionOptions& opts,
                                          const BackwardOutputs& grads) {
  ATTNQAT_RETURN_IF_ERROR(check_varlen_tensor(q, "total_q"));
  ATTNQAT_RETURN_IF_ERROR(check_varlen_tensor(k, "total_k"));
  ATTNQAT_RETURN_IF_ERROR(check_varlen_tensor(v, "total_k"));
  ATTNQAT_RETURN_IF_ERROR(check_varlen_tensor(dout, "total_q"));
  for (const TensorView* t : {&saved.o, &saved.o_hp})
    if (t->data != nullptr) ATTNQAT_RETURN_IF_ERROR(check_varlen_tensor(*t, "total_q"));
  for (const TensorView* t : {&saved.lse, &saved.m_ref, &saved.l})
    if (t->data != nullptr) ATTNQAT_RETURN_IF_ERROR(check_varlen_stat(*t, q));
  ATTNQAT_RETURN_IF_ERROR(check_output(grads.dq, q, q.dtype, 3, q.shape));
  ATTNQAT_RETURN_IF_ERROR(check_output(grads.dk, q, q.dtype, 3, k.shape));
  ATTNQAT_RETURN_IF_ERROR(check_output(grads.dv, q, q.dtype, 3, v.shape));
  const ForwardState dense_saved{varlen_view(saved.o), varlen_view(saved.o_hp),
                                 dense_look(saved.lse), dense_look(saved.m_ref),
                                 dense_look(saved.l)};
  const BackwardOutputs dense_grads{dense_look(grads.dq), dense_look(grads.dk),
                                    dense_look(grads.dv), grads.dsinks};
  ATTNQAT_RETURN_IF_ERROR(validate_attention_backward(varlen_view(dout), varlen_view(q),
                                                      varlen_view(k), varlen_view(v), dense_saved,
                                                      opts, dense_grads));
  return check_varlen_seqs(seqs, q, k, opts);
}

}  // namespace attnqat
