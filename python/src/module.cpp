// attnqat._C — the Python binding of the C++ API (include/attnqat/attnqat.h).
//
// Every array argument is an nb::ndarray (numpy arrays, torch tensors, anything with
// __dlpack__), converted to a non-owning TensorView. Outputs are allocated by the Python layer
// and passed in. The GIL is released while the C++ code runs. A non-OK Status becomes
// ValueError (bad argument), NotImplementedError or RuntimeError (CUDA error).
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>

#include "attnqat/attnqat.h"

namespace nb = nanobind;
using namespace attnqat;

namespace {

using AnyArray = nb::ndarray<>;
using OptArray = std::optional<AnyArray>;

// The DLPack dtype of an array as numpy/torch spell it ("int32", "bool", "complex64", ...).
std::string dlpack_dtype_name(const nb::dlpack::dtype& dt) {
  using nb::dlpack::dtype_code;
  std::string base;
  switch (dt.code) {
    case static_cast<uint8_t>(dtype_code::Int): base = "int"; break;
    case static_cast<uint8_t>(dtype_code::UInt): base = "uint"; break;
    case static_cast<uint8_t>(dtype_code::Float): base = "float"; break;
    case static_cast<uint8_t>(dtype_code::Bfloat): base = "bfloat"; break;
    case static_cast<uint8_t>(dtype_code::Complex): base = "complex"; break;
    case static_cast<uint8_t>(dtype_code::Bool): return dt.lanes == 1 ? "bool" : "bool vector";
    default:
      return "an unsupported DLPack type (code " + std::to_string(dt.code) + ", " +
             std::to_string(dt.bits) + " bits)";
  }
  std::string name = base + std::to_string(dt.bits);
  if (dt.lanes != 1) name += " x" + std::to_string(dt.lanes);
  return name;
}

// What an argument accepts, for the message of a dtype that has no DType at all (int32, bool,
// ...). Dtypes that do have one (e.g. uint8 where a float is expected) reach the validation of
// src/common/validate.cpp, which words its message the same way.
enum class Accepts { kFloat, kFloat32, kUInt8 };

const char* accepted_dtypes(Accepts a) {
  switch (a) {
    case Accepts::kFloat32: return "float32";
    case Accepts::kUInt8: return "uint8";
    default: return "float32, float16 or bfloat16 (or float64 on the CPU)";
  }
}

DType dtype_of(const AnyArray& a, const char* name, Accepts accepts) {
  const nb::dlpack::dtype dt = a.dtype();
  using nb::dlpack::dtype_code;
  if (dt.lanes == 1) {
    if (dt.code == static_cast<uint8_t>(dtype_code::Float)) {
      if (dt.bits == 32) return DType::kFloat32;
      if (dt.bits == 16) return DType::kFloat16;
      if (dt.bits == 64) return DType::kFloat64;
    }
    if (dt.code == static_cast<uint8_t>(dtype_code::Bfloat) && dt.bits == 16) return DType::kBFloat16;
    if (dt.code == static_cast<uint8_t>(dtype_code::UInt) && dt.bits == 8) return DType::kUInt8;
  }
  throw nb::value_error((std::string(name) + ": expected dtype " + accepted_dtypes(accepts) + ", got " +
                         dlpack_dtype_name(dt)).c_str());
}

Device device_of(int dev, const char* name) {
  if (dev == nb::device::cpu::value) return Device::kCPU;
  if (dev == nb::device::cuda::value) return Device::kCUDA;
  throw nb::value_error((std::string(name) + ": expected a CPU or CUDA tensor, got DLPack device type " +
                         std::to_string(dev)).c_str());
}

TensorView to_view(const AnyArray& a, const char* name, Accepts accepts = Accepts::kFloat) {
  TensorView t;
  t.name = name;
  if (a.ndim() > static_cast<size_t>(kMaxDims))
    throw nb::value_error((std::string(name) + ": expected at most " + std::to_string(kMaxDims) +
                           " dimensions, got " + std::to_string(a.ndim())).c_str());
  t.data = a.data();
  t.dtype = dtype_of(a, name, accepts);
  t.device = device_of(a.device_type(), name);
  t.device_id = a.device_id();
  t.ndim = static_cast<int>(a.ndim());
  for (int i = 0; i < t.ndim; ++i) {
    t.shape[i] = static_cast<int64_t>(a.shape(i));
    t.stride[i] = static_cast<int64_t>(a.stride(i));
  }
  return t;
}

TensorView opt_view(const OptArray& a, const char* name, Accepts accepts = Accepts::kFloat) {
  if (!a) {
    TensorView t;
    t.name = name;
    return t;
  }
  return to_view(*a, name, accepts);
}

void check(const Status& st) {
  if (st.ok()) return;
  switch (st.code()) {
    case StatusCode::kInvalidArgument: throw nb::value_error(st.message().c_str());
    case StatusCode::kNotImplemented:
      PyErr_SetString(PyExc_NotImplementedError, st.message().c_str());
      throw nb::python_error();
    default: throw std::runtime_error(st.message());
  }
}

// The one conversion of option strings to enums: `s` must be one of `choices`; the message lists
// them. (Types and values of the options are checked by the Python front end and, for every
// caller of the C++ API, by validate_attention_options() in src/common/validate.cpp.)
template <typename E>
E parse_choice(const char* name, const std::string& s,
               std::initializer_list<std::pair<const char*, E>> choices) {
  for (const auto& [text, value] : choices)
    if (s == text) return value;
  std::string list;
  size_t i = 0;
  for (const auto& c : choices) {
    list += (i == 0 ? "" : (i + 1 == choices.size() ? (choices.size() == 2 ? " or " : ", or ") : ", "));
    list += "'" + std::string(c.first) + "'";
    ++i;
  }
  throw nb::value_error((std::string(name) + ": expected " + (choices.size() > 2 ? "one of " : "") +
                         list + ", got '" + s + "'").c_str());
}

Format parse_format(const std::string& s) {
  return parse_choice<Format>("format", s, {{"nvfp4", Format::kNVFP4}, {"mxfp4", Format::kMXFP4}});
}
BlockAxis parse_axis(const std::string& s) {
  return parse_choice<BlockAxis>("axis", s, {{"last", BlockAxis::kLast}, {"token", BlockAxis::kToken}});
}
PQuant parse_p_quant(const std::string& s) {
  return parse_choice<PQuant>("p_quant", s, {{"paper", PQuant::kPaper}, {"anchored", PQuant::kAnchored}});
}
VBlocks parse_v_blocks(const std::string& s) {
  return parse_choice<VBlocks>("v_blocks", s, {{"channel", VBlocks::kChannel}, {"token", VBlocks::kToken}});
}

QuantizeOptions quant_opts(const std::string& format, const std::string& axis, bool compute) {
  QuantizeOptions o;
  o.format = parse_format(format);
  o.axis = parse_axis(axis);
  o.compute_global_scale = compute;
  return o;
}

AttentionOptions attn_opts(const std::string& mode, const std::string& p_quant,
                           const std::string& v_blocks, bool causal, float softmax_scale,
                           int kv_tile, bool bwd_quantized_qkv, bool bwd_quant_p,
                           bool bwd_high_precision_o, const std::string& precision,
                           bool inputs_quantized, bool deterministic) {
  AttentionOptions o;
  o.mode = parse_choice<Mode>("mode", mode, {{"bf16", Mode::kBF16}, {"fp4", Mode::kFP4},
                                             {"drop_in_qat", Mode::kDropInQAT}, {"attn_qat", Mode::kAttnQAT}});
  o.p_quant = parse_p_quant(p_quant);
  o.v_blocks = parse_v_blocks(v_blocks);
  o.causal = causal;
  o.softmax_scale = softmax_scale;
  o.kv_tile = kv_tile;
  o.bwd = BackwardSwitches{bwd_quantized_qkv, bwd_quant_p, bwd_high_precision_o};
  o.precision = parse_choice<Precision>("precision", precision,
                                        {{"fp32", Precision::kFloat32}, {"fp64", Precision::kFloat64},
                                         {"bf16_operands", Precision::kBF16Operands}});
  o.inputs_quantized = inputs_quantized;
  o.deterministic = deterministic;
  return o;
}

void* stream_ptr(uintptr_t s) { return reinterpret_cast<void*>(s); }

// An int32 tensor (page table, lengths) as an IndexView; any other dtype is a ValueError.
IndexView to_index(const AnyArray& a, const char* name) {
  const nb::dlpack::dtype dt = a.dtype();
  if (!(dt.code == static_cast<uint8_t>(nb::dlpack::dtype_code::Int) && dt.bits == 32 && dt.lanes == 1))
    throw nb::value_error((std::string(name) + ": expected dtype int32, got " + dlpack_dtype_name(dt)).c_str());
  if (a.ndim() < 1 || a.ndim() > 2)
    throw nb::value_error((std::string(name) + ": expected 1 or 2 dimensions, got " +
                           std::to_string(a.ndim())).c_str());
  IndexView v;
  v.name = name;
  v.data = static_cast<const int32_t*>(a.data());
  v.device = device_of(a.device_type(), name);
  v.device_id = a.device_id();
  v.ndim = static_cast<int>(a.ndim());
  for (int i = 0; i < v.ndim; ++i) {
    v.shape[i] = static_cast<int64_t>(a.shape(i));
    v.stride[i] = static_cast<int64_t>(a.stride(i));
  }
  return v;
}

PagedKVCache to_cache(const AnyArray& kd, const AnyArray& ks, const AnyArray& vd, const AnyArray& vs) {
  PagedKVCache c;
  c.k_data = to_view(kd, "k_data", Accepts::kUInt8);
  c.k_scales = to_view(ks, "k_scales", Accepts::kUInt8);
  c.v_data = to_view(vd, "v_data", Accepts::kUInt8);
  c.v_scales = to_view(vs, "v_scales", Accepts::kUInt8);
  return c;
}

}  // namespace

NB_MODULE(_C, m) {
  m.doc() = "attnqat C++ core (reference + CUDA kernels). Use the `attnqat` package, not this.";

  m.def("build_info", [] {
    const BuildInfo b = build_info();
    nb::dict d;
    d["version"] = b.version;
    d["cuda"] = b.cuda;
    d["cuda_archs"] = b.cuda_archs;
    d["cuda_version"] = b.cuda_version;
    return d;
  });

  m.def("quantize",
        [](AnyArray x, AnyArray data, AnyArray scales, OptArray g, const std::string& format,
           const std::string& axis, bool compute_g, uintptr_t stream) {
          const TensorView xv = to_view(x, "x"), dv = to_view(data, "data", Accepts::kUInt8),
                           sv = to_view(scales, "scales", Accepts::kUInt8),
                           gv = opt_view(g, "global_scale", Accepts::kFloat32);
          const QuantizeOptions o = quant_opts(format, axis, compute_g);
          Status st;
          {
            nb::gil_scoped_release release;
            st = quantize(xv, dv, sv, gv, o, stream_ptr(stream));
          }
          check(st);
        },
        nb::arg("x"), nb::arg("data"), nb::arg("scales"), nb::arg("global_scale").none(),
        nb::arg("format"), nb::arg("axis"), nb::arg("compute_global_scale"), nb::arg("stream") = 0);

  m.def("dequantize",
        [](AnyArray data, AnyArray scales, OptArray g, AnyArray out, const std::string& format,
           const std::string& axis, uintptr_t stream) {
          const TensorView dv = to_view(data, "data", Accepts::kUInt8),
                           sv = to_view(scales, "scales", Accepts::kUInt8),
                           gv = opt_view(g, "global_scale", Accepts::kFloat32), ov = to_view(out, "out");
          const QuantizeOptions o = quant_opts(format, axis, false);
          Status st;
          {
            nb::gil_scoped_release release;
            st = dequantize(dv, sv, gv, ov, o, stream_ptr(stream));
          }
          check(st);
        },
        nb::arg("data"), nb::arg("scales"), nb::arg("global_scale").none(), nb::arg("out"),
        nb::arg("format"), nb::arg("axis"), nb::arg("stream") = 0);

  m.def("fake_quantize",
        [](AnyArray x, AnyArray out, OptArray g, const std::string& format, const std::string& axis,
           bool compute_g, uintptr_t stream) {
          const TensorView xv = to_view(x, "x"), ov = to_view(out, "out"),
                           gv = opt_view(g, "global_scale", Accepts::kFloat32);
          const QuantizeOptions o = quant_opts(format, axis, compute_g);
          Status st;
          {
            nb::gil_scoped_release release;
            st = fake_quantize(xv, ov, gv, o, stream_ptr(stream));
          }
          check(st);
        },
        nb::arg("x"), nb::arg("out"), nb::arg("global_scale").none(), nb::arg("format"),
        nb::arg("axis"), nb::arg("compute_global_scale"), nb::arg("stream") = 0);

  m.def("attention_forward",
        [](AnyArray q, AnyArray k, AnyArray v, AnyArray o, OptArray o_hp, AnyArray lse, OptArray m_ref,
           OptArray l, const std::string& mode, const std::string& p_quant, const std::string& v_blocks,
           bool causal, float softmax_scale, int kv_tile, bool bwd_quantized_qkv, bool bwd_quant_p,
           bool bwd_high_precision_o, const std::string& precision, bool inputs_quantized,
           bool deterministic, uintptr_t stream) {
          const AttentionOptions opts = attn_opts(mode, p_quant, v_blocks, causal, softmax_scale, kv_tile,
                                                  bwd_quantized_qkv, bwd_quant_p, bwd_high_precision_o, precision,
                                                  inputs_quantized, deterministic);
          const TensorView qv = to_view(q, "q"), kv = to_view(k, "k"), vv = to_view(v, "v");
          ForwardOutputs out;
          out.o = to_view(o, "o");
          out.o_hp = opt_view(o_hp, "o_hp");
          out.lse = to_view(lse, "lse", Accepts::kFloat32);
          out.m_ref = opt_view(m_ref, "m_ref", Accepts::kFloat32);
          out.l = opt_view(l, "l", Accepts::kFloat32);
          Status st;
          {
            nb::gil_scoped_release release;
            st = attention_forward(qv, kv, vv, opts, out, stream_ptr(stream));
          }
          check(st);
        },
        nb::arg("q"), nb::arg("k"), nb::arg("v"), nb::arg("o"), nb::arg("o_hp").none(), nb::arg("lse"),
        nb::arg("m_ref").none(), nb::arg("l").none(), nb::arg("mode"), nb::arg("p_quant"),
        nb::arg("v_blocks"), nb::arg("causal"), nb::arg("softmax_scale"), nb::arg("kv_tile"),
        nb::arg("bwd_quantized_qkv"), nb::arg("bwd_quant_p"), nb::arg("bwd_high_precision_o"),
        nb::arg("precision") = "fp32", nb::arg("inputs_quantized") = false, nb::arg("deterministic") = false, nb::arg("stream") = 0);

  m.def("attention_backward",
        [](AnyArray dout, AnyArray q, AnyArray k, AnyArray v, OptArray o, OptArray o_hp, AnyArray lse,
           OptArray m_ref, OptArray l, AnyArray dq, AnyArray dk, AnyArray dv, const std::string& mode,
           const std::string& p_quant, const std::string& v_blocks, bool causal, float softmax_scale,
           int kv_tile, bool bwd_quantized_qkv, bool bwd_quant_p, bool bwd_high_precision_o,
           const std::string& precision, bool inputs_quantized, bool deterministic, uintptr_t stream) {
          const AttentionOptions opts = attn_opts(mode, p_quant, v_blocks, causal, softmax_scale, kv_tile,
                                                  bwd_quantized_qkv, bwd_quant_p, bwd_high_precision_o, precision,
                                                  inputs_quantized, deterministic);
          const TensorView dov = to_view(dout, "dout"), qv = to_view(q, "q"), kv = to_view(k, "k"),
                           vv = to_view(v, "v");
          ForwardState s;
          s.o = opt_view(o, "o");
          s.o_hp = opt_view(o_hp, "o_hp");
          s.lse = to_view(lse, "lse", Accepts::kFloat32);
          s.m_ref = opt_view(m_ref, "m_ref", Accepts::kFloat32);
          s.l = opt_view(l, "l", Accepts::kFloat32);
          BackwardOutputs g;
          g.dq = to_view(dq, "dq");
          g.dk = to_view(dk, "dk");
          g.dv = to_view(dv, "dv");
          Status st;
          {
            nb::gil_scoped_release release;
            st = attention_backward(dov, qv, kv, vv, s, opts, g, stream_ptr(stream));
          }
          check(st);
        },
        nb::arg("dout"), nb::arg("q"), nb::arg("k"), nb::arg("v"), nb::arg("o").none(), nb::arg("o_hp").none(),
        nb::arg("lse"), nb::arg("m_ref").none(), nb::arg("l").none(), nb::arg("dq"), nb::arg("dk"),
        nb::arg("dv"), nb::arg("mode"), nb::arg("p_quant"), nb::arg("v_blocks"), nb::arg("causal"),
        nb::arg("softmax_scale"), nb::arg("kv_tile"), nb::arg("bwd_quantized_qkv"), nb::arg("bwd_quant_p"),
        nb::arg("bwd_high_precision_o"), nb::arg("precision") = "fp32", nb::arg("inputs_quantized") = false,
        nb::arg("deterministic") = false, nb::arg("stream") = 0);

  // ---- FP4 inference ------------------------------------------------------------------------------

  m.def("attention_forward_packed",
        [](AnyArray qd, AnyArray qs, AnyArray qg, AnyArray kd, AnyArray ks, AnyArray kg, AnyArray vd,
           AnyArray vs, AnyArray vg, AnyArray o, AnyArray lse, OptArray m_ref, OptArray l,
           const std::string& p_quant, const std::string& v_blocks, bool causal, float softmax_scale,
           int kv_tile, const std::string& decode, uintptr_t stream) {
          const PackedUnpack where = parse_choice<PackedUnpack>(
              "decode", decode, {{"auto", PackedUnpack::kAuto}, {"kernel", PackedUnpack::kInKernel},
                                 {"temporary", PackedUnpack::kTemporary}});
          const auto packed = [](const AnyArray& d, const AnyArray& s, const AnyArray& g, const char* dn,
                                 const char* sn, const char* gn) {
            return PackedTensor{to_view(d, dn, Accepts::kUInt8), to_view(s, sn, Accepts::kUInt8),
                                to_view(g, gn, Accepts::kFloat32)};
          };
          const PackedTensor q = packed(qd, qs, qg, "q.data", "q.scales", "q.global_scale");
          const PackedTensor k = packed(kd, ks, kg, "k.data", "k.scales", "k.global_scale");
          const PackedTensor v = packed(vd, vs, vg, "v.data", "v.scales", "v.global_scale");
          AttentionOptions opts;
          opts.mode = Mode::kFP4;
          opts.p_quant = parse_p_quant(p_quant);
          opts.v_blocks = parse_v_blocks(v_blocks);
          opts.causal = causal;
          opts.softmax_scale = softmax_scale;
          opts.kv_tile = kv_tile;
          ForwardOutputs out;
          out.o = to_view(o, "o");
          out.lse = to_view(lse, "lse", Accepts::kFloat32);
          out.m_ref = opt_view(m_ref, "m_ref", Accepts::kFloat32);
          out.l = opt_view(l, "l", Accepts::kFloat32);
          Status st;
          {
            nb::gil_scoped_release release;
            st = attention_forward_packed(q, k, v, opts, out, stream_ptr(stream), where);
          }
          check(st);
        },
        nb::arg("q_data"), nb::arg("q_scales"), nb::arg("q_global_scale"), nb::arg("k_data"),
        nb::arg("k_scales"), nb::arg("k_global_scale"), nb::arg("v_data"), nb::arg("v_scales"),
        nb::arg("v_global_scale"), nb::arg("o"), nb::arg("lse"), nb::arg("m_ref").none(),
        nb::arg("l").none(), nb::arg("p_quant"), nb::arg("v_blocks"), nb::arg("causal"),
        nb::arg("softmax_scale"), nb::arg("kv_tile"), nb::arg("decode") = "auto", nb::arg("stream") = 0);

  m.def("kv_cache_append",
        [](AnyArray kd, AnyArray ks, AnyArray vd, AnyArray vs, AnyArray k_new, AnyArray v_new,
           AnyArray page_table, AnyArray start, uintptr_t stream) {
          const PagedKVCache cache = to_cache(kd, ks, vd, vs);
          const TensorView kn = to_view(k_new, "k_new"), vn = to_view(v_new, "v_new");
          const IndexView pt = to_index(page_table, "page_table"), st0 = to_index(start, "start");
          Status st;
          {
            nb::gil_scoped_release release;
            st = kv_cache_append(cache, kn, vn, pt, st0, stream_ptr(stream));
          }
          check(st);
        },
        nb::arg("k_data"), nb::arg("k_scales"), nb::arg("v_data"), nb::arg("v_scales"),
        nb::arg("k_new"), nb::arg("v_new"), nb::arg("page_table"), nb::arg("start"),
        nb::arg("stream") = 0);

  m.def("decode_attention",
        [](AnyArray q, AnyArray kd, AnyArray ks, AnyArray vd, AnyArray vs, AnyArray page_table,
           AnyArray seq_lens, AnyArray out, OptArray lse, float softmax_scale,
           const std::string& p_quant, int num_splits, int max_seq_len, uintptr_t stream) {
          const PagedKVCache cache = to_cache(kd, ks, vd, vs);
          const TensorView qv = to_view(q, "q"), ov = to_view(out, "out"),
                           lv = opt_view(lse, "lse", Accepts::kFloat32);
          const IndexView pt = to_index(page_table, "page_table"), sl = to_index(seq_lens, "seq_lens");
          DecodeOptions opts;
          opts.softmax_scale = softmax_scale;
          opts.p_quant = parse_p_quant(p_quant);
          opts.num_splits = num_splits;
          opts.max_seq_len = max_seq_len;
          Status st;
          {
            nb::gil_scoped_release release;
            st = decode_attention(qv, cache, pt, sl, opts, ov, lv, stream_ptr(stream));
          }
          check(st);
        },
        nb::arg("q"), nb::arg("k_data"), nb::arg("k_scales"), nb::arg("v_data"), nb::arg("v_scales"),
        nb::arg("page_table"), nb::arg("seq_lens"), nb::arg("out"), nb::arg("lse").none(),
        nb::arg("softmax_scale"), nb::arg("p_quant"), nb::arg("num_splits") = 0,
        nb::arg("max_seq_len") = 0, nb::arg("stream") = 0);
}
