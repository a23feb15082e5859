// Fuzz target: argument validation on arbitrary shapes, strides, dtypes, devices and options.
//
// 1. Every validate_*() returns a Status for any view and any option value, enums out of range
//    included (never crashes or hangs). These views carry a dummy data pointer, which validation
//    must never dereference.
// 2. CPU views over real buffers, each allocated for exactly the elements its shape and strides
//    address (negative, zero and overlapping strides included): whenever validation accepts them,
//    the public entry point runs the reference on them, and AddressSanitizer (the `fuzz` preset)
//    reports any read or write outside those buffers.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "attnqat/attnqat.h"
#include "common/validate.h"

using namespace attnqat;

namespace {

struct Reader {
  const uint8_t* p;
  size_t n;
  uint8_t byte() {
    if (n == 0) return 0;
    --n;
    return *p++;
  }
  int64_t small() { return static_cast<int64_t>(byte() % 70) - 3; }  // includes negatives and 0
};

// ---- 1. Arbitrary views, validation only ------------------------------------------------------

TensorView random_view(Reader& r, const char* name) {
  static char dummy[16];
  TensorView t;
  t.name = name;
  t.data = (r.byte() % 8) ? dummy : nullptr;
  t.dtype = static_cast<DType>(r.byte() % 5);
  t.device = (r.byte() % 4) ? Device::kCPU : Device::kCUDA;
  t.ndim = r.byte() % (kMaxDims + 2) - (r.byte() % 16 == 0 ? 1 : 0);  // -1 .. kMaxDims + 1
  for (int i = 0; i < std::clamp(t.ndim, 0, kMaxDims); ++i) {
    const int64_t s = r.small();
    t.shape[i] = s < 0 ? s * (r.byte() % 2) : s * (r.byte() % 2 ? 16 : 1);  // some negative sizes
    t.stride[i] = r.small();
  }
  if (t.ndim > kMaxDims) t.ndim = kMaxDims + 1;  // shape/stride beyond kMaxDims are never read
  return t;
}

AttentionOptions random_options(Reader& r) {
  AttentionOptions o;
  o.mode = static_cast<Mode>(r.byte() % 5);  // 4: out of range
  o.p_quant = static_cast<PQuant>(r.byte() % 3);
  o.v_blocks = static_cast<VBlocks>(r.byte() % 3);
  o.precision = static_cast<Precision>(r.byte() % 4);
  o.causal = r.byte() % 2;
  o.kv_tile = static_cast<int>(r.small()) * ((r.byte() % 4) ? 16 : 1);
  const uint8_t s = r.byte();
  o.softmax_scale = s == 255 ? NAN : s == 254 ? INFINITY : static_cast<float>(static_cast<int>(s) - 20) / 7.0f;
  o.bwd = BackwardSwitches{r.byte() % 2 == 0, r.byte() % 2 == 0, r.byte() % 2 == 0};
  o.inputs_quantized = r.byte() % 2;
  return o;
}

void validate_only(Reader& r) {
  TensorView a = random_view(r, "q"), b = random_view(r, "k"), c = random_view(r, "v");
  TensorView d = random_view(r, "o"), e = random_view(r, "lse");
  const AttentionOptions o = random_options(r);
  ForwardOutputs out;
  out.o = d;
  out.lse = e;
  (void)validate_attention_options(o);
  (void)validate_attention_forward(a, b, c, o, out);
  ForwardState s;
  s.o = d;
  s.o_hp = d;
  s.lse = e;
  BackwardOutputs g;
  g.dq = a;
  g.dk = b;
  g.dv = c;
  (void)validate_attention_backward(a, a, b, c, s, o, g);
  QuantizeOptions qo;
  qo.format = static_cast<Format>(r.byte() % 3);
  qo.axis = static_cast<BlockAxis>(r.byte() % 3);
  qo.compute_global_scale = r.byte() % 2;
  (void)validate_quantize(a, b, c, d, qo);
  (void)validate_dequantize(a, b, c, d, qo);
  (void)validate_fake_quantize(a, b, c, qo);
  DecodeOptions dop;
  dop.softmax_scale = o.softmax_scale;
  dop.p_quant = o.p_quant;
  dop.num_splits = static_cast<int>(r.small());
  dop.max_seq_len = static_cast<int>(r.small());
  PagedKVCache cache{b, c, d, e};
  KVCacheDims dims;
  (void)validate_kv_cache(cache, &dims);
}

// ---- 2. Real CPU buffers: accepted inputs run the reference ------------------------------------

// A CPU tensor whose buffer holds exactly the elements its view addresses.
struct Buffer {
  std::unique_ptr<uint8_t[]> bytes;
  TensorView view;
};

// Shape from `dims`; strides: contiguous, or (mode != 0) arbitrary in [-2 * extent, 2 * extent],
// zero and negative included. The buffer spans [min offset, max offset] of the view.
Buffer make_buffer(Reader& r, const char* name, DType dtype, std::initializer_list<int64_t> dims,
                   bool random_strides) {
  Buffer b;
  TensorView& t = b.view;
  t.name = name;
  t.dtype = dtype;
  t.ndim = static_cast<int>(dims.size());
  int i = 0;
  for (int64_t s : dims) t.shape[i++] = s;
  int64_t stride = 1;
  for (int d = t.ndim - 1; d >= 0; --d) {
    t.stride[d] = stride;
    stride *= std::max<int64_t>(t.shape[d], 1);
  }
  if (random_strides) {
    for (int d = 0; d < t.ndim; ++d)
      if (r.byte() % 3 == 0) t.stride[d] = static_cast<int64_t>(r.byte() % 9) - 4 + ((r.byte() % 2) ? t.stride[d] : 0);
  }
  int64_t lo = 0, hi = 0;
  bool empty = false;
  for (int d = 0; d < t.ndim; ++d) {
    if (t.shape[d] == 0) empty = true;
    const int64_t span = (t.shape[d] - 1) * t.stride[d];
    (span < 0 ? lo : hi) += span;
  }
  const int64_t elems = empty ? 0 : hi - lo + 1;
  const int64_t size = dtype_size(dtype);
  b.bytes.reset(new uint8_t[static_cast<size_t>(std::max<int64_t>(elems, 1) * size)]);
  // Contents from a generator seeded by one input byte (the input drives shapes and options).
  uint32_t state = 0x9E3779B9u * (1u + r.byte());
  for (int64_t k = 0; k < std::max<int64_t>(elems, 1) * size; ++k) {
    state = state * 1664525u + 1013904223u;
    b.bytes[k] = static_cast<uint8_t>((state >> 24) & 0x3F);  // moderate magnitudes in every dtype
  }
  t.data = elems == 0 ? nullptr : b.bytes.get() - lo * size;
  return b;
}

// A size in [1, n] mostly, 0 one time in eight (an exhausted input gives 1).
int64_t size(Reader& r, int n) {
  const uint8_t b = r.byte();
  return b % 8 == 7 ? 0 : 1 + (b / 8) % n;
}

DType float_dtype(Reader& r) {
  switch (r.byte() % 6) {
    case 0: return DType::kFloat16;
    case 1: return DType::kBFloat16;
    case 2: return DType::kFloat64;
    case 3: return DType::kUInt8;
    default: return DType::kFloat32;
  }
}

void run_attention(Reader& r) {
  const int64_t B = size(r, 2), Hkv = size(r, 2), group = 1 + r.byte() % 3, Nq = size(r, 24),
                Nk = size(r, 40);
  const uint8_t dsel = r.byte();
  const int64_t D = dsel % 16 == 15 ? 24 : dsel % 16 == 14 ? 0 : 16 * (1 + dsel % 3);
  const int64_t Hq = Hkv * group + (r.byte() % 8 == 0 ? 1 : 0);  // sometimes not a multiple
  const DType dt = float_dtype(r);
  const bool strided = r.byte() % 2;
  AttentionOptions o = random_options(r);
  o.precision = static_cast<Precision>(r.byte() % 3);
  Buffer q = make_buffer(r, "q", dt, {B, Hq, Nq, D}, strided);
  Buffer k = make_buffer(r, "k", r.byte() % 16 ? dt : float_dtype(r), {B, Hkv, Nk, D}, strided);
  Buffer v = make_buffer(r, "v", dt, {B, Hkv, Nk + (r.byte() % 16 == 0 ? 1 : 0), D}, strided);
  const DType odt = r.byte() % 8 ? dt : float_dtype(r);
  Buffer out_o = make_buffer(r, "o", odt, {B, Hq, Nq, D}, r.byte() % 8 == 0);
  Buffer o_hp = make_buffer(r, "o_hp", odt, {B, Hq, Nq, D}, false);
  Buffer lse = make_buffer(r, "lse", DType::kFloat32, {B, Hq, Nq + (r.byte() % 16 == 0 ? 1 : 0)}, false);
  Buffer m_ref = make_buffer(r, "m_ref", DType::kFloat32, {B, Hq, Nq}, false);
  Buffer l = make_buffer(r, "l", DType::kFloat32, {B, Hq, Nq}, false);
  ForwardOutputs fo;
  fo.o = out_o.view;
  fo.lse = lse.view;
  const bool want_hp = needs_o_hp(o) && r.byte() % 4;
  if (want_hp) fo.o_hp = o_hp.view;
  if (r.byte() % 2) {
    fo.m_ref = m_ref.view;
    fo.l = l.view;
  }
  // attention_forward validates first, then runs the reference on what it accepted.
  if (!attention_forward(q.view, k.view, v.view, o, fo).ok()) return;
  if (o.mode == Mode::kFP4) return;
  Buffer dout = make_buffer(r, "dout", dt, {B, Hq, Nq, D}, strided);
  Buffer dq = make_buffer(r, "dq", dt, {B, Hq, Nq, D}, false);
  Buffer dk = make_buffer(r, "dk", dt, {B, Hkv, Nk, D}, false);
  Buffer dv = make_buffer(r, "dv", dt, {B, Hkv, Nk, D}, false);
  ForwardState s;
  s.o = fo.o;
  s.o_hp = fo.o_hp;
  s.lse = fo.lse;
  s.m_ref = fo.m_ref;
  s.l = fo.l;
  BackwardOutputs g;
  g.dq = dq.view;
  g.dk = dk.view;
  g.dv = dv.view;
  (void)attention_backward(dout.view, q.view, k.view, v.view, s, o, g);
}

void run_quantize(Reader& r) {
  const uint8_t lsel = r.byte();
  const int64_t rows = size(r, 4), n = size(r, 40), len = lsel % 16 == 15 ? 24 : 16 * (lsel % 4);
  const DType dt = float_dtype(r);
  Buffer x = make_buffer(r, "x", dt, {rows, n, len}, r.byte() % 2);
  QuantizeOptions qo;
  qo.format = static_cast<Format>(r.byte() % 2);
  qo.axis = static_cast<BlockAxis>(r.byte() % 2);
  qo.compute_global_scale = r.byte() % 2;
  TensorView shape_of_x = x.view;
  shape_of_x.ndim = 3;
  const bool divisible = qo.axis == BlockAxis::kToken || len % (qo.format == Format::kNVFP4 ? 16 : 32) == 0;
  const PackedShapes p = packed_shapes(shape_of_x, qo);
  const int64_t d2 = divisible ? p.data[2] : 1, s2 = divisible ? p.scales[2] : 1;
  Buffer data = make_buffer(r, "data", DType::kUInt8, {p.data[0], p.data[1], d2 + (r.byte() % 16 == 0)}, false);
  Buffer scales = make_buffer(r, "scales", DType::kUInt8, {p.scales[0], p.scales[1], s2}, false);
  float g = (r.byte() % 4) ? 1.0f : 0.75f;
  TensorView gv = make_view(&g, DType::kFloat32, {1}, "global_scale");
  if (!quantize(x.view, data.view, scales.view, gv, qo).ok()) return;
  Buffer out = make_buffer(r, "out", dt, {rows, n, len}, false);
  qo.compute_global_scale = false;
  (void)dequantize(data.view, scales.view, gv, out.view, qo);
  (void)fake_quantize(x.view, out.view, gv, qo);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  Reader r{data, size};
  switch (r.byte() % 3) {
    case 0: validate_only(r); break;
    case 1: run_attention(r); break;
    default: run_quantize(r); break;
  }
  return 0;
}
