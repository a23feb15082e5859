// attnqat._C — the Python binding of the C++ API (include/attnqat/attnqat.h).
//
// Every array argument is an nb::ndarray (numpy arrays, torch tensors, anything with
// __dlpack__), converted to a non-owning TensorView; the options of a call are one object, the
// C++ option struct bound as a class (AttentionOptions, DecodeOptions, QuantizeOptions). Outputs are allocated by the Python layer
// and passed in. The GIL is released while the C++ code runs. A non-OK Status becomes
// ValueError (bad argument), NotImplementedError or RuntimeError (CUDA error).
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>

#include "attnqat/attnqat.h"
#include "common/validate.h"

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

// ---- Options ------------------------------------------------------------------------------------
//
// The option structs of the C++ API (AttentionOptions with its BackwardSwitches, DecodeOptions,
// QuantizeOptions) are bound as classes whose attributes are named as the Python keyword
// arguments. Enums read and write as strings, converted in one place (parse_choice); softmax_scale
// reads and writes as None (1/sqrt(head_dim)) or a number. Every value is checked by
// src/common/validate.cpp: validate_*_options(), which the _C functions run before touching data
// and which attnqat._C.validate_*_options() runs on an object without tensors.

template <typename E>
struct Choice {
  const char* text;
  E value;
};

constexpr Choice<Format> kFormats[] = {{"nvfp4", Format::kNVFP4}, {"mxfp4", Format::kMXFP4}};
constexpr Choice<BlockAxis> kAxes[] = {{"last", BlockAxis::kLast}, {"token", BlockAxis::kToken}};
constexpr Choice<Mode> kModes[] = {{"bf16", Mode::kBF16}, {"fp4", Mode::kFP4},
                                   {"drop_in_qat", Mode::kDropInQAT}, {"attn_qat", Mode::kAttnQAT}};
constexpr Choice<PQuant> kPQuants[] = {{"paper", PQuant::kPaper}, {"anchored", PQuant::kAnchored}};
constexpr Choice<VBlocks> kVBlocks[] = {{"channel", VBlocks::kChannel}, {"token", VBlocks::kToken}};
constexpr Choice<Precision> kPrecisions[] = {{"fp32", Precision::kFloat32}, {"fp64", Precision::kFloat64},
                                             {"bf16_operands", Precision::kBF16Operands}};
constexpr Choice<PackedUnpack> kUnpacks[] = {{"auto", PackedUnpack::kAuto}, {"kernel", PackedUnpack::kInKernel},
                                             {"temporary", PackedUnpack::kTemporary}};

// The one conversion of option strings to enums: `value` must be one of `choices` (a str); the
// message lists them ("'a' or 'b'", "one of 'a', 'b', 'c'") and shows what came (its repr).
template <typename E, size_t N>
E parse_choice(const char* name, nb::handle value, const Choice<E> (&choices)[N]) {
  if (nb::isinstance<nb::str>(value)) {
    const char* s = nb::borrow<nb::str>(value).c_str();
    for (const auto& c : choices)
      if (std::strcmp(s, c.text) == 0) return c.value;
  }
  std::string list = N > 2 ? "one of " : "";
  for (size_t i = 0; i < N; ++i)
    list += std::string(i == 0 ? "" : (N == 2 ? " or " : ", ")) + "'" + choices[i].text + "'";
  throw nb::value_error((std::string(name) + ": expected " + list + ", got " +
                         nb::repr(value).c_str()).c_str());
}

template <typename E, size_t N>
const char* choice_text(E value, const Choice<E> (&choices)[N]) {
  for (const auto& c : choices)
    if (c.value == value) return c.text;
  return "?";
}

// A string-valued attribute for an enum field reached by `field` (a member pointer or a lambda).
template <typename T, typename E, size_t N, typename Field>
void choice_attr(nb::class_<T>& cls, const char* name, Field field, const Choice<E> (&choices)[N]) {
  cls.def_prop_rw(
      name, [field, &choices](T& o) { return choice_text(std::invoke(field, o), choices); },
      [name, field, &choices](T& o, nb::handle v) { std::invoke(field, o) = parse_choice(name, v, choices); },
      nb::for_setter(nb::arg("value").none()));
}

// softmax_scale as Python spells it: None (1/sqrt(head_dim), the structs' 0) or a number.
template <typename T>
void softmax_scale_attr(nb::class_<T>& cls) {
  cls.def_prop_rw(
      "softmax_scale",
      [](T& o) -> std::optional<double> {
        if (o.softmax_scale == 0.0f) return std::nullopt;
        return o.softmax_scale;
      },
      [](T& o, std::optional<double> v) {
        if (!v) {
          o.softmax_scale = 0.0f;
          return;
        }
        check(softmax_scale_from_double(*v, &o.softmax_scale));
      },
      nb::for_setter(nb::arg("value").none()));
}

// Keyword construction, e.g. AttentionOptions(mode="fp4", causal=True): each keyword sets the
// attribute of that name; an unknown one is a TypeError that lists the attributes.
template <typename T>
void kwargs_init(nb::class_<T>& cls, const char* fields) {
  cls.def("__init__", [fields](nb::pointer_and_handle<T> self, nb::kwargs kwargs) {
    new (self.p) T();
    nb::inst_mark_ready(self.h);  // so that the attributes' setters below may run
    for (auto [key, value] : kwargs) {
      if (!nb::hasattr(self.h.type(), key))
        throw nb::type_error((std::string(nb::type_name(self.h.type()).c_str()) + ": unknown option " +
                              nb::repr(key).c_str() + "; expected one of " + fields).c_str());
      nb::setattr(self.h, key, value);
    }
  });
}

template <typename T>
void bind_repr(nb::class_<T>& cls, const char* fields) {
  cls.def("__repr__", [fields](nb::handle self) {
    std::string out = std::string(nb::type_name(self.type()).c_str()) + "(";
    std::string names = fields;
    size_t pos = 0;
    bool first = true;
    while (pos < names.size()) {
      const size_t end = std::min(names.find(", ", pos), names.size());
      const std::string n = names.substr(pos, end - pos);
      out += (first ? "" : ", ") + n + "=" + nb::repr(nb::getattr(self, n.c_str())).c_str();
      first = false;
      pos = end + 2;
    }
    return out + ")";
  });
}

void bind_options(nb::module_& m) {
  static constexpr const char* kAttentionFields =
      "mode, p_quant, v_blocks, causal, window_left, window_right, softmax_scale, softcap, kv_tile, bwd_quantized_qkv, "
      "bwd_quant_p, bwd_high_precision_o, precision, inputs_quantized, deterministic";
  nb::class_<AttentionOptions> attn(m, "AttentionOptions",
                                    "The options of attention_forward/attention_backward (attnqat.h).");
  kwargs_init(attn, kAttentionFields);
  choice_attr(attn, "mode", &AttentionOptions::mode, kModes);
  choice_attr(attn, "p_quant", &AttentionOptions::p_quant, kPQuants);
  choice_attr(attn, "v_blocks", &AttentionOptions::v_blocks, kVBlocks);
  attn.def_rw("causal", &AttentionOptions::causal);
  attn.def_rw("window_left", &AttentionOptions::window_left);
  attn.def_rw("window_right", &AttentionOptions::window_right);
  softmax_scale_attr(attn);
  attn.def_rw("softcap", &AttentionOptions::softcap);  // checked by validate_attention_options
  attn.def_rw("kv_tile", &AttentionOptions::kv_tile);
  attn.def_prop_rw("bwd_quantized_qkv", [](AttentionOptions& o) { return o.bwd.quantized_qkv; },
                   [](AttentionOptions& o, bool v) { o.bwd.quantized_qkv = v; });
  attn.def_prop_rw("bwd_quant_p", [](AttentionOptions& o) { return o.bwd.quant_p; },
                   [](AttentionOptions& o, bool v) { o.bwd.quant_p = v; });
  attn.def_prop_rw("bwd_high_precision_o", [](AttentionOptions& o) { return o.bwd.high_precision_o; },
                   [](AttentionOptions& o, bool v) { o.bwd.high_precision_o = v; });
  choice_attr(attn, "precision", &AttentionOptions::precision, kPrecisions);
  attn.def_rw("inputs_quantized", &AttentionOptions::inputs_quantized);
  attn.def_rw("deterministic", &AttentionOptions::deterministic);
  attn.def_prop_ro("needs_o_hp", [](const AttentionOptions& o) { return needs_o_hp(o); });
  bind_repr(attn, kAttentionFields);

  static constexpr const char* kDecodeFields = "softmax_scale, p_quant, num_splits, max_seq_len, window_left";
  nb::class_<DecodeOptions> dec(m, "DecodeOptions", "The options of decode_attention (attnqat.h).");
  kwargs_init(dec, kDecodeFields);
  softmax_scale_attr(dec);
  choice_attr(dec, "p_quant", &DecodeOptions::p_quant, kPQuants);
  dec.def_rw("num_splits", &DecodeOptions::num_splits);
  dec.def_rw("max_seq_len", &DecodeOptions::max_seq_len);
  dec.def_rw("window_left", &DecodeOptions::window_left);  // checked by validate_decode_options
  bind_repr(dec, kDecodeFields);

  static constexpr const char* kQuantizeFields = "format, axis, compute_global_scale";
  nb::class_<QuantizeOptions> quant(m, "QuantizeOptions", "The options of quantize/dequantize/fake_quantize.");
  kwargs_init(quant, kQuantizeFields);
  choice_attr(quant, "format", &QuantizeOptions::format, kFormats);
  choice_attr(quant, "axis", &QuantizeOptions::axis, kAxes);
  quant.def_rw("compute_global_scale", &QuantizeOptions::compute_global_scale);
  bind_repr(quant, kQuantizeFields);

  m.def("validate_attention_options", [](const AttentionOptions& o) { check(validate_attention_options(o)); },
        nb::arg("options"), "Raises ValueError naming the option when `options` are not valid.");
  m.def("validate_decode_options", [](const DecodeOptions& o) { check(validate_decode_options(o)); },
        nb::arg("options"));
  m.def("check_paper_kv_tile", [](const AttentionOptions& o) { check(check_paper_kv_tile(o)); },
        nb::arg("options"),
        "Raises ValueError unless the options run on a fixed 128-key tile (p_quant 'paper', quantized).");
}

void* stream_ptr(uintptr_t s) { return reinterpret_cast<void*>(s); }

// Runs a call of the C++ API without the GIL; a non-OK Status raises (check()).
template <typename F>
void run(F&& call) {
  Status st;
  {
    nb::gil_scoped_release release;
    st = call();
  }
  check(st);
}

// ForwardOutputs or ForwardState: the same five tensors of a forward (o_hp, m_ref, l optional).
template <typename S>
S forward_tensors(const OptArray& o, const OptArray& o_hp, const AnyArray& lse, const OptArray& m_ref,
                  const OptArray& l) {
  S out;
  out.o = opt_view(o, "o");
  out.o_hp = opt_view(o_hp, "o_hp");
  out.lse = to_view(lse, "lse", Accepts::kFloat32);
  out.m_ref = opt_view(m_ref, "m_ref", Accepts::kFloat32);
  out.l = opt_view(l, "l", Accepts::kFloat32);
  return out;
}

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

// The offsets and maximum lengths of packed sequences (cu_seqlens_* int32 [S + 1]) and the
// optional used key counts (seqused_k int32 [S]).
VarlenSeqs to_seqs(const AnyArray& cu_q, const AnyArray& cu_k, int64_t max_q, int64_t max_k,
                   const OptArray& seqused_k) {
  VarlenSeqs s{to_index(cu_q, "cu_seqlens_q"), to_index(cu_k, "cu_seqlens_k"), max_q, max_k, {}};
  if (seqused_k) s.seqused_k = to_index(*seqused_k, "seqused_k");
  return s;
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

  bind_options(m);

  m.def("quantize",
        [](AnyArray x, AnyArray data, AnyArray scales, OptArray g, const QuantizeOptions& o, uintptr_t stream) {
          const TensorView xv = to_view(x, "x"), dv = to_view(data, "data", Accepts::kUInt8),
                           sv = to_view(scales, "scales", Accepts::kUInt8),
                           gv = opt_view(g, "global_scale", Accepts::kFloat32);
          run([&] { return quantize(xv, dv, sv, gv, o, stream_ptr(stream)); });
        },
        nb::arg("x"), nb::arg("data"), nb::arg("scales"), nb::arg("global_scale").none(), nb::arg("options"),
        nb::arg("stream") = 0);

  m.def("dequantize",
        [](AnyArray data, AnyArray scales, OptArray g, AnyArray out, const QuantizeOptions& o, uintptr_t stream) {
          const TensorView dv = to_view(data, "data", Accepts::kUInt8),
                           sv = to_view(scales, "scales", Accepts::kUInt8),
                           gv = opt_view(g, "global_scale", Accepts::kFloat32), ov = to_view(out, "out");
          run([&] { return dequantize(dv, sv, gv, ov, o, stream_ptr(stream)); });
        },
        nb::arg("data"), nb::arg("scales"), nb::arg("global_scale").none(), nb::arg("out"), nb::arg("options"),
        nb::arg("stream") = 0);

  m.def("fake_quantize",
        [](AnyArray x, AnyArray out, OptArray g, const QuantizeOptions& o, uintptr_t stream) {
          const TensorView xv = to_view(x, "x"), ov = to_view(out, "out"),
                           gv = opt_view(g, "global_scale", Accepts::kFloat32);
          run([&] { return fake_quantize(xv, ov, gv, o, stream_ptr(stream)); });
        },
        nb::arg("x"), nb::arg("out"), nb::arg("global_scale").none(), nb::arg("options"), nb::arg("stream") = 0);

  // `sinks` (float32 [Hq] or None) is AttentionOptions::sinks, the one tensor among the options:
  // it is set on a copy of `options` for the call. The backward writes its gradient into `dsinks`.
  m.def("attention_forward",
        [](AnyArray q, AnyArray k, AnyArray v, AnyArray o, OptArray o_hp, AnyArray lse, OptArray m_ref,
           OptArray l, const AttentionOptions& opts, uintptr_t stream, OptArray sinks) {
          const TensorView qv = to_view(q, "q"), kv = to_view(k, "k"), vv = to_view(v, "v");
          const ForwardOutputs out = forward_tensors<ForwardOutputs>(o, o_hp, lse, m_ref, l);
          AttentionOptions call = opts;
          call.sinks = opt_view(sinks, "sinks", Accepts::kFloat32);
          run([&] { return attention_forward(qv, kv, vv, call, out, stream_ptr(stream)); });
        },
        nb::arg("q"), nb::arg("k"), nb::arg("v"), nb::arg("o"), nb::arg("o_hp").none(), nb::arg("lse"),
        nb::arg("m_ref").none(), nb::arg("l").none(), nb::arg("options"), nb::arg("stream") = 0,
        nb::arg("sinks").none() = nb::none());

  m.def("attention_backward",
        [](AnyArray dout, AnyArray q, AnyArray k, AnyArray v, OptArray o, OptArray o_hp, AnyArray lse,
           OptArray m_ref, OptArray l, AnyArray dq, AnyArray dk, AnyArray dv, const AttentionOptions& opts,
           uintptr_t stream, OptArray sinks, OptArray dsinks) {
          const TensorView dov = to_view(dout, "dout"), qv = to_view(q, "q"), kv = to_view(k, "k"),
                           vv = to_view(v, "v");
          const ForwardState s = forward_tensors<ForwardState>(o, o_hp, lse, m_ref, l);
          const BackwardOutputs g{to_view(dq, "dq"), to_view(dk, "dk"), to_view(dv, "dv"),
                                  opt_view(dsinks, "dsinks", Accepts::kFloat32)};
          AttentionOptions call = opts;
          call.sinks = opt_view(sinks, "sinks", Accepts::kFloat32);
          run([&] { return attention_backward(dov, qv, kv, vv, s, call, g, stream_ptr(stream)); });
        },
        nb::arg("dout"), nb::arg("q"), nb::arg("k"), nb::arg("v"), nb::arg("o").none(), nb::arg("o_hp").none(),
        nb::arg("lse"), nb::arg("m_ref").none(), nb::arg("l").none(), nb::arg("dq"), nb::arg("dk"),
        nb::arg("dv"), nb::arg("options"), nb::arg("stream") = 0, nb::arg("sinks").none() = nb::none(),
        nb::arg("dsinks").none() = nb::none());

  // Packed sequences: q [total_q, Hq, D], k/v [total_k, Hkv, D], the sequences' offsets
  // cu_seqlens_q/k (int32 [S + 1], on the device of q) and their maximum lengths; lse, m_ref, l
  // [Hq, total_q]. The rest as attention_forward/attention_backward.
  m.def("attention_forward_varlen",
        [](AnyArray q, AnyArray k, AnyArray v, AnyArray cu_q, AnyArray cu_k, int64_t max_q, int64_t max_k,
           AnyArray o, OptArray o_hp, AnyArray lse, OptArray m_ref, OptArray l, const AttentionOptions& opts,
           uintptr_t stream, OptArray sinks, OptArray seqused_k) {
          const TensorView qv = to_view(q, "q"), kv = to_view(k, "k"), vv = to_view(v, "v");
          const VarlenSeqs seqs = to_seqs(cu_q, cu_k, max_q, max_k, seqused_k);
          const ForwardOutputs out = forward_tensors<ForwardOutputs>(o, o_hp, lse, m_ref, l);
          AttentionOptions call = opts;
          call.sinks = opt_view(sinks, "sinks", Accepts::kFloat32);
          run([&] { return attention_forward_varlen(qv, kv, vv, seqs, call, out, stream_ptr(stream)); });
        },
        nb::arg("q"), nb::arg("k"), nb::arg("v"), nb::arg("cu_seqlens_q"), nb::arg("cu_seqlens_k"),
        nb::arg("max_seqlen_q"), nb::arg("max_seqlen_k"), nb::arg("o"), nb::arg("o_hp").none(), nb::arg("lse"),
        nb::arg("m_ref").none(), nb::arg("l").none(), nb::arg("options"), nb::arg("stream") = 0,
        nb::arg("sinks").none() = nb::none(), nb::arg("seqused_k").none() = nb::none());

  m.def("attention_backward_varlen",
        [](AnyArray dout, AnyArray q, AnyArray k, AnyArray v, AnyArray cu_q, AnyArray cu_k, int64_t max_q,
           int64_t max_k, OptArray o, OptArray o_hp, AnyArray lse, OptArray m_ref, OptArray l, AnyArray dq,
           AnyArray dk, AnyArray dv, const AttentionOptions& opts, uintptr_t stream, OptArray sinks,
           OptArray dsinks, OptArray seqused_k) {
          const TensorView dov = to_view(dout, "dout"), qv = to_view(q, "q"), kv = to_view(k, "k"),
                           vv = to_view(v, "v");
          const VarlenSeqs seqs = to_seqs(cu_q, cu_k, max_q, max_k, seqused_k);
          const ForwardState s = forward_tensors<ForwardState>(o, o_hp, lse, m_ref, l);
          const BackwardOutputs g{to_view(dq, "dq"), to_view(dk, "dk"), to_view(dv, "dv"),
                                  opt_view(dsinks, "dsinks", Accepts::kFloat32)};
          AttentionOptions call = opts;
          call.sinks = opt_view(sinks, "sinks", Accepts::kFloat32);
          run([&] {
            return attention_backward_varlen(dov, qv, kv, vv, seqs, s, call, g, stream_ptr(stream));
          });
        },
        nb::arg("dout"), nb::arg("q"), nb::arg("k"), nb::arg("v"), nb::arg("cu_seqlens_q"),
        nb::arg("cu_seqlens_k"), nb::arg("max_seqlen_q"), nb::arg("max_seqlen_k"), nb::arg("o").none(),
        nb::arg("o_hp").none(), nb::arg("lse"), nb::arg("m_ref").none(), nb::arg("l").none(), nb::arg("dq"),
        nb::arg("dk"), nb::arg("dv"), nb::arg("options"), nb::arg("stream") = 0,
        nb::arg("sinks").none() = nb::none(), nb::arg("dsinks").none() = nb::none(),
        nb::arg("seqused_k").none() = nb::none());

  // ---- FP4 inference ------------------------------------------------------------------------------

  m.def("attention_forward_packed",
        [](AnyArray qd, AnyArray qs, AnyArray qg, AnyArray kd, AnyArray ks, AnyArray kg, AnyArray vd,
           AnyArray vs, AnyArray vg, AnyArray o, AnyArray lse, OptArray m_ref, OptArray l,
           const AttentionOptions& opts, nb::handle unpack, uintptr_t stream) {
          const PackedUnpack where = parse_choice("unpack", unpack, kUnpacks);
          const auto packed = [](const AnyArray& d, const AnyArray& s, const AnyArray& g, const char* dn,
                                 const char* sn, const char* gn) {
            return PackedTensor{to_view(d, dn, Accepts::kUInt8), to_view(s, sn, Accepts::kUInt8),
                                to_view(g, gn, Accepts::kFloat32)};
          };
          const PackedTensor q = packed(qd, qs, qg, "q.data", "q.scales", "q.global_scale");
          const PackedTensor k = packed(kd, ks, kg, "k.data", "k.scales", "k.global_scale");
          const PackedTensor v = packed(vd, vs, vg, "v.data", "v.scales", "v.global_scale");
          const ForwardOutputs out = forward_tensors<ForwardOutputs>(o, std::nullopt, lse, m_ref, l);
          run([&] { return attention_forward_packed(q, k, v, opts, out, stream_ptr(stream), where); });
        },
        nb::arg("q_data"), nb::arg("q_scales"), nb::arg("q_global_scale"), nb::arg("k_data"),
        nb::arg("k_scales"), nb::arg("k_global_scale"), nb::arg("v_data"), nb::arg("v_scales"),
        nb::arg("v_global_scale"), nb::arg("o"), nb::arg("lse"), nb::arg("m_ref").none(),
        nb::arg("l").none(), nb::arg("options"), nb::arg("unpack") = "auto", nb::arg("stream") = 0);

  m.def("kv_cache_append",
        [](AnyArray kd, AnyArray ks, AnyArray vd, AnyArray vs, AnyArray k_new, AnyArray v_new,
           AnyArray page_table, AnyArray start, uintptr_t stream) {
          const PagedKVCache cache = to_cache(kd, ks, vd, vs);
          const TensorView kn = to_view(k_new, "k_new"), vn = to_view(v_new, "v_new");
          const IndexView pt = to_index(page_table, "page_table"), st0 = to_index(start, "start");
          run([&] { return kv_cache_append(cache, kn, vn, pt, st0, stream_ptr(stream)); });
        },
        nb::arg("k_data"), nb::arg("k_scales"), nb::arg("v_data"), nb::arg("v_scales"),
        nb::arg("k_new"), nb::arg("v_new"), nb::arg("page_table"), nb::arg("start"),
        nb::arg("stream") = 0);

  m.def("decode_attention",
        [](AnyArray q, AnyArray kd, AnyArray ks, AnyArray vd, AnyArray vs, AnyArray page_table,
           AnyArray seq_lens, AnyArray out, OptArray lse, const DecodeOptions& opts, uintptr_t stream) {
          const PagedKVCache cache = to_cache(kd, ks, vd, vs);
          const TensorView qv = to_view(q, "q"), ov = to_view(out, "out"),
                           lv = opt_view(lse, "lse", Accepts::kFloat32);
          const IndexView pt = to_index(page_table, "page_table"), sl = to_index(seq_lens, "seq_lens");
          run([&] { return decode_attention(qv, cache, pt, sl, opts, ov, lv, stream_ptr(stream)); });
        },
        nb::arg("q"), nb::arg("k_data"), nb::arg("k_scales"), nb::arg("v_data"), nb::arg("v_scales"),
        nb::arg("page_table"), nb::arg("seq_lens"), nb::arg("out"), nb::arg("lse").none(),
        nb::arg("options"), nb::arg("stream") = 0);
}
