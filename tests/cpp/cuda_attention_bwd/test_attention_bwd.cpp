// tests/cpp/cuda_attention_bwd/test_attention_bwd.cpp — the sm90 backward through the public API
// (attnqat::attention_backward with CUDA views) against the CPU reference backward (the same call
// with CPU views), on the same inputs and the same saved forward state.
//
// Inputs: Q, K, V, dO drawn at random in the input dtype. The forward state (O, O', LSE, m_ref, l)
// comes from the CPU reference forward (fp32 contract, kv_tile 128) or, for the cases marked
// `gpu_fwd`, from the GPU forward; the backward gets what the Python front end passes: the
// fake-quantized Q^, K^, V^ with inputs_quantized = true when bwd_quantized_qkv applies (or the
// raw inputs with inputs_quantized = false for the `raw` cases, which makes the backward quantize
// them itself), and the raw inputs otherwise (drop_in_qat's backward).
//
// Tolerances (numerics section 8), per gradient dQ, dK, dV: relative L2 error against the fp64
// reference (Precision::kFloat64 on float64 copies of the same values) at most twice the error of
// the low-precision emulation (Precision::kBF16Operands in the input dtype: bf16 operands of the
// dS and dV products, outputs rounded like the kernel's) against fp64, plus a floor:
//  - kFloorQuantP (dV when P_F is quantized): ex2.approx (relative error ~2^-22) moves the rare P
//    element that sits within ~1e-7 of an E2M1 or E4M3 boundary to the other side; each flip is
//    worth a whole E2M1 step (up to 1/3 of the element) of one P_F element, and paper mode's
//    flush (blocks whose max is near 6 * 2^-10) can flip a whole block between 0 and the smallest
//    scale. The emulation's own error is mostly bf16 rounding, so the floor keeps a handful of
//    flips in a short row from failing the test: 2e-3.
//  - kFloor (everything else): ex2.approx, the fp32 summation order of the tensor cores and
//    the statistics pass of drop_in_qat (a GPU forward in fp32 against the reference's fp64
//    recomputation) are ~1e-6 relative per element; 2e-4 is far above them and far below the
//    emulation's ~3e-3 (bf16) / ~3e-3 (fp16, bf16 operands in the emulation).
// A second, sharper bound (check()): err <= 1.1 x the emulation's error + the same floor. The
// emulation rounds what the kernel's tensor cores see, so in bf16 the two errors agree to 3
// digits (measured on H200, every case: ratio 0.999-1.001); in fp16 the kernel is 5-7x better
// than the emulation (whose operands are bf16), except dV with P_F (exact operands: ratio 1).
// Floors, measured: no case needed any part of them (the kernel's error never exceeded the
// emulation's by more than 1e-6).
// Outputs are poisoned (NaN) before every GPU run: a NaN left is an unwritten element. On failure
// the messages give the error norms and the worst elements (batch, head, row, column).
// Deterministic mode: three runs must give the same bits in dQ, dK and dV (and dsinks).
// Softcap (numerics 9.9) keeps these bounds: the kernel's tanh (sm90/softcap.cuh, ~2.4e-7
// absolute) moves P by at most softcap * log2(e) * 2.4e-7 * ln 2 relative (1.2e-5 at softcap 50)
// and the slope 1 - t^2 by ~1e-6, two orders below the bf16 operand rounding that the emulation
// shares with the kernel; dS = RN(RN(P (1 - t^2)) (dP - D)) against the reference's
// RN(RN(P (dP - D)) (1 - t^2)) is one fp32 rounding apart before the 16-bit rounding. Sinks
// (9.10) change nothing in the kernel (LSE, m_ref, l include them); dsinks: check_dsinks.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "attention_util.h"
#include "attnqat/attnqat.h"
#include "gpu_util.h"

namespace attnqat::gpu_test {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kFloor = 2e-4;
constexpr double kFloorQuantP = 2e-3;

// -1: the mode's default; 0 / 1: the switch off / on (the ablations).
struct Switches {
  int qkv = -1, quant_p = -1, hp_o = -1;
};

struct Case {
  const char* name;
  Mode mode;
  PQuant pq;
  test::CaseMask mask;
  DType dt;
  int64_t D, B, Hq, Hkv, Nq, Nk;
  Switches sw = {};
  bool raw = false;      // bwd_quantized_qkv on, but the backward gets the raw inputs
  bool gpu_fwd = false;  // the saved state comes from the GPU forward
  bool deterministic = false;
  float softcap = 0.0f;  // numerics 9.9 (0: off)
  int sinks = -1;        // numerics 9.10: sink_values(sinks, Hq) (gpu_util.h); -1: no sinks
};

bool quantizes(Mode m) { return m != Mode::kBF16; }

AttentionOptions options_of(const Case& c) {
  AttentionOptions o = test::options(c.mode, c.pq, c.mask);
  if (c.sw.qkv >= 0) o.bwd.quantized_qkv = c.sw.qkv;
  if (c.sw.quant_p >= 0) o.bwd.quant_p = c.sw.quant_p;
  if (c.sw.hp_o >= 0) o.bwd.high_precision_o = c.sw.hp_o;
  o.kv_tile = 128;
  o.deterministic = c.deterministic;
  o.softcap = c.softcap;
  return o;
}

bool eff_qkv(const Case& c) { return quantizes(c.mode) && options_of(c).bwd.quantized_qkv; }
bool eff_quant_p(const Case& c) { return quantizes(c.mode) && options_of(c).bwd.quant_p; }

using Bits = std::vector<uint16_t>;  // 16-bit patterns of the input dtype

struct Problem {
  Bits q, k, v, dout;        // raw
  Bits q_hat, k_hat, v_hat;  // fake-quantized (== raw in mode bf16)
};

Problem make_problem(const Case& c, uint32_t seed) {
  auto prob = test::random_problem<float>(c.B, c.Hq, c.Hkv, c.Nq, c.Nk, c.D, seed);
  Problem p;
  p.q = to_half(prob.q, c.dt);
  p.k = to_half(prob.k, c.dt);
  p.v = to_half(prob.v, c.dt);
  std::mt19937 rng(seed + 1);
  std::normal_distribution<float> n01(0.0f, 1.0f);
  std::vector<float> dout(p.q.size());
  for (float& x : dout) x = n01(rng);
  p.dout = to_half(dout, c.dt);
  p.q_hat = p.q, p.k_hat = p.k, p.v_hat = p.v;
  if (!quantizes(c.mode)) return p;
  float one = 1.0f;
  const TensorView g = make_view(&one, DType::kFloat32, {1}, "g");
  QuantizeOptions qo;
  auto fq = [&](Bits& x, int64_t h, int64_t n) {
    const TensorView t = make_view(x.data(), c.dt, {c.B, h, n, c.D}, "x");
    const Status st = fake_quantize(t, t, g, qo);
    EXPECT_TRUE(st.ok()) << st.message();
  };
  fq(p.q_hat, c.Hq, c.Nq);
  fq(p.k_hat, c.Hkv, c.Nk);
  fq(p.v_hat, c.Hkv, c.Nk);
  return p;
}

// ---- The saved forward state ------------------------------------------------------------------

struct State {
  Bits o, o_hp;
  std::vector<float> lse, m_ref, l;
};

State forward_state(const Case& c, const Problem& p) {
  CaseSinks sinks(c, c.gpu_fwd ? Device::kCUDA : Device::kCPU);
  AttentionOptions opts = sinks.attach(options_of(c));
  opts.inputs_quantized = true;  // Q^, K^, V^ (== raw in mode bf16)
  const int64_t rows = c.B * c.Hq * c.Nq, n = rows * c.D;
  State s;
  s.o.assign(n, 0);
  s.o_hp.assign(n, 0);
  s.lse.assign(rows, 0);
  s.m_ref.assign(rows, 0);
  s.l.assign(rows, 0);
  const bool want_hp = quantizes(c.mode);
  if (!c.gpu_fwd) {
    Bits q = p.q_hat, k = p.k_hat, v = p.v_hat;
    ForwardOutputs fo;
    fo.o = make_view(s.o.data(), c.dt, {c.B, c.Hq, c.Nq, c.D}, "o");
    if (want_hp) fo.o_hp = make_view(s.o_hp.data(), c.dt, {c.B, c.Hq, c.Nq, c.D}, "o_hp");
    fo.lse = make_view(s.lse.data(), DType::kFloat32, {c.B, c.Hq, c.Nq}, "lse");
    fo.m_ref = make_view(s.m_ref.data(), DType::kFloat32, {c.B, c.Hq, c.Nq}, "m_ref");
    fo.l = make_view(s.l.data(), DType::kFloat32, {c.B, c.Hq, c.Nq}, "l");
    const Status st = attention_forward(make_view(q.data(), c.dt, {c.B, c.Hq, c.Nq, c.D}, "q"),
                                        make_view(k.data(), c.dt, {c.B, c.Hkv, c.Nk, c.D}, "k"),
                                        make_view(v.data(), c.dt, {c.B, c.Hkv, c.Nk, c.D}, "v"),
                                        opts, fo);
    EXPECT_TRUE(st.ok()) << "reference forward: " << st.message();
    return s;
  }
  DeviceBuffer dq(p.q_hat.size() * 2 + 16), dk(p.k_hat.size() * 2 + 16), dv(p.v_hat.size() * 2 + 16);
  dq.upload(p.q_hat.data(), p.q_hat.size() * 2);
  dk.upload(p.k_hat.data(), p.k_hat.size() * 2);
  dv.upload(p.v_hat.data(), p.v_hat.size() * 2);
  DeviceBuffer o(n * 2 + 16), o_hp(n * 2 + 16), lse(rows * 4 + 16), m(rows * 4 + 16), l(rows * 4 + 16);
  ForwardOutputs fo;
  fo.o = cuda_view(o.get(), c.dt, {c.B, c.Hq, c.Nq, c.D}, "o");
  if (want_hp) fo.o_hp = cuda_view(o_hp.get(), c.dt, {c.B, c.Hq, c.Nq, c.D}, "o_hp");
  fo.lse = cuda_view(lse.get(), DType::kFloat32, {c.B, c.Hq, c.Nq}, "lse");
  fo.m_ref = cuda_view(m.get(), DType::kFloat32, {c.B, c.Hq, c.Nq}, "m_ref");
  fo.l = cuda_view(l.get(), DType::kFloat32, {c.B, c.Hq, c.Nq}, "l");
  const Status st = attention_forward(cuda_view(dq.get(), c.dt, {c.B, c.Hq, c.Nq, c.D}, "q"),
                                      cuda_view(dk.get(), c.dt, {c.B, c.Hkv, c.Nk, c.D}, "k"),
                                      cuda_view(dv.get(), c.dt, {c.B, c.Hkv, c.Nk, c.D}, "v"),
                                      opts, fo);
  EXPECT_TRUE(st.ok()) << "GPU forward: " << st.message();
  cuda_check(cudaDeviceSynchronize(), "GPU forward");
  o.download(s.o.data(), n * 2);
  if (want_hp) o_hp.download(s.o_hp.data(), n * 2);
  lse.download(s.lse.data(), rows * 4);
  m.download(s.m_ref.data(), rows * 4);
  l.download(s.l.data(), rows * 4);
  return s;
}

// ---- Backward runs ----------------------------------------------------------------------------

struct Grads {
  std::vector<double> dq, dk, dv;
  std::vector<double> dsinks;  // [Hq], cases with sinks
};

// The backward's q, k, v (see the file header) and its inputs_quantized.
const Bits& bwd_q(const Case& c, const Problem& p) { return eff_qkv(c) && !c.raw ? p.q_hat : p.q; }
const Bits& bwd_k(const Case& c, const Problem& p) { return eff_qkv(c) && !c.raw ? p.k_hat : p.k; }
const Bits& bwd_v(const Case& c, const Problem& p) { return eff_qkv(c) && !c.raw ? p.v_hat : p.v; }
AttentionOptions bwd_options(const Case& c) {
  AttentionOptions o = options_of(c);
  o.inputs_quantized = eff_qkv(c) && !c.raw;
  return o;
}

Grads run_gpu(const Case& c, const Problem& p, const State& s, Status* status,
              const Bits* dout_override = nullptr) {
  const int64_t rows = c.B * c.Hq * c.Nq, nq = rows * c.D, nk = c.B * c.Hkv * c.Nk * c.D;
  auto up = [](const Bits& x) {
    DeviceBuffer b(x.size() * 2 + 16);
    b.upload(x.data(), x.size() * 2);
    return b;
  };
  auto upf = [](const std::vector<float>& x) {
    DeviceBuffer b(x.size() * 4 + 16);
    b.upload(x.data(), x.size() * 4);
    return b;
  };
  DeviceBuffer q = up(bwd_q(c, p)), k = up(bwd_k(c, p)), v = up(bwd_v(c, p));
  DeviceBuffer dout = up(dout_override != nullptr ? *dout_override : p.dout);
  DeviceBuffer o = up(s.o), o_hp = up(s.o_hp), lse = upf(s.lse), m = upf(s.m_ref), l = upf(s.l);
  DeviceBuffer dq(nq * 2 + 16), dk(nk * 2 + 16), dv(nk * 2 + 16);
  for (DeviceBuffer* b : {&dq, &dk, &dv}) b->poison();
  ForwardState fs;
  fs.o = cuda_view(o.get(), c.dt, {c.B, c.Hq, c.Nq, c.D}, "o");
  if (quantizes(c.mode)) fs.o_hp = cuda_view(o_hp.get(), c.dt, {c.B, c.Hq, c.Nq, c.D}, "o_hp");
  fs.lse = cuda_view(lse.get(), DType::kFloat32, {c.B, c.Hq, c.Nq}, "lse");
  fs.m_ref = cuda_view(m.get(), DType::kFloat32, {c.B, c.Hq, c.Nq}, "m_ref");
  fs.l = cuda_view(l.get(), DType::kFloat32, {c.B, c.Hq, c.Nq}, "l");
  BackwardOutputs g;
  g.dq = cuda_view(dq.get(), c.dt, {c.B, c.Hq, c.Nq, c.D}, "dq");
  g.dk = cuda_view(dk.get(), c.dt, {c.B, c.Hkv, c.Nk, c.D}, "dk");
  g.dv = cuda_view(dv.get(), c.dt, {c.B, c.Hkv, c.Nk, c.D}, "dv");
  CaseSinks sinks(c, Device::kCUDA);
  DeviceBuffer dsinks(c.Hq * 4 + 16);
  dsinks.poison();
  if (sinks.any()) g.dsinks = cuda_view(dsinks.get(), DType::kFloat32, {c.Hq}, "dsinks");
  *status = attention_backward(cuda_view(dout.get(), c.dt, {c.B, c.Hq, c.Nq, c.D}, "dout"),
                               cuda_view(q.get(), c.dt, {c.B, c.Hq, c.Nq, c.D}, "q"),
                               cuda_view(k.get(), c.dt, {c.B, c.Hkv, c.Nk, c.D}, "k"),
                               cuda_view(v.get(), c.dt, {c.B, c.Hkv, c.Nk, c.D}, "v"), fs,
                               sinks.attach(bwd_options(c)), g);
  Grads r;
  if (!status->ok()) return r;
  cuda_check(cudaDeviceSynchronize(), "attention_backward kernels");
  auto down = [&](const DeviceBuffer& b, int64_t n) {
    Bits h(n);
    b.download(h.data(), n * 2);
    std::vector<double> d(n);
    for (int64_t i = 0; i < n; ++i) d[i] = from_half_bits(h[i], c.dt);
    return d;
  };
  r.dq = down(dq, nq);
  r.dk = down(dk, nk);
  r.dv = down(dv, nk);
  if (sinks.any()) {
    std::vector<float> h(c.Hq);
    dsinks.download(h.data(), h.size() * 4);
    r.dsinks.assign(h.begin(), h.end());
  }
  return r;
}

// precision kFloat64 (float64 copies of every input) or kBF16Operands (the input dtype).
Grads run_ref(const Case& c, const Problem& p, const State& s, Precision precision,
              const Bits* dout_override = nullptr) {
  AttentionOptions opts = bwd_options(c);
  opts.precision = precision;
  const bool f64 = precision == Precision::kFloat64;
  const DType dt = f64 ? DType::kFloat64 : c.dt;
  const int64_t nq = c.B * c.Hq * c.Nq * c.D, nk = c.B * c.Hkv * c.Nk * c.D;
  // Every 4-D input as a buffer of `dt`: 16-bit copies or float64 conversions.
  std::vector<std::vector<double>> d64;
  std::vector<Bits> b16;
  d64.reserve(8);
  b16.reserve(8);
  auto in = [&](const Bits& x) -> void* {
    if (!f64) {
      b16.push_back(x);
      return b16.back().data();
    }
    std::vector<double> d(x.size());
    for (size_t i = 0; i < x.size(); ++i) d[i] = from_half_bits(x[i], c.dt);
    d64.push_back(std::move(d));
    return d64.back().data();
  };
  void* q = in(bwd_q(c, p));
  void* k = in(bwd_k(c, p));
  void* v = in(bwd_v(c, p));
  void* dout = in(dout_override != nullptr ? *dout_override : p.dout);
  void* o = in(s.o);
  void* o_hp = in(s.o_hp);
  std::vector<float> lse = s.lse, m = s.m_ref, l = s.l;
  ForwardState fs;
  fs.o = make_view(o, dt, {c.B, c.Hq, c.Nq, c.D}, "o");
  if (quantizes(c.mode)) fs.o_hp = make_view(o_hp, dt, {c.B, c.Hq, c.Nq, c.D}, "o_hp");
  fs.lse = make_view(lse.data(), DType::kFloat32, {c.B, c.Hq, c.Nq}, "lse");
  fs.m_ref = make_view(m.data(), DType::kFloat32, {c.B, c.Hq, c.Nq}, "m_ref");
  fs.l = make_view(l.data(), DType::kFloat32, {c.B, c.Hq, c.Nq}, "l");
  std::vector<double> dq64(f64 ? nq : 0), dk64(f64 ? nk : 0), dv64(f64 ? nk : 0);
  Bits dq16(f64 ? 0 : nq), dk16(f64 ? 0 : nk), dv16(f64 ? 0 : nk);
  BackwardOutputs g;
  g.dq = make_view(f64 ? static_cast<void*>(dq64.data()) : dq16.data(), dt, {c.B, c.Hq, c.Nq, c.D}, "dq");
  g.dk = make_view(f64 ? static_cast<void*>(dk64.data()) : dk16.data(), dt, {c.B, c.Hkv, c.Nk, c.D}, "dk");
  g.dv = make_view(f64 ? static_cast<void*>(dv64.data()) : dv16.data(), dt, {c.B, c.Hkv, c.Nk, c.D}, "dv");
  CaseSinks sinks(c, Device::kCPU);
  std::vector<float> dsinks(c.Hq, NAN);
  if (sinks.any()) g.dsinks = make_view(dsinks.data(), DType::kFloat32, {c.Hq}, "dsinks");
  const Status st = attention_backward(make_view(dout, dt, {c.B, c.Hq, c.Nq, c.D}, "dout"),
                                       make_view(q, dt, {c.B, c.Hq, c.Nq, c.D}, "q"),
                                       make_view(k, dt, {c.B, c.Hkv, c.Nk, c.D}, "k"),
                                       make_view(v, dt, {c.B, c.Hkv, c.Nk, c.D}, "v"), fs,
                                       sinks.attach(opts), g);
  EXPECT_TRUE(st.ok()) << "reference backward: " << st.message();
  Grads r;
  if (sinks.any()) r.dsinks.assign(dsinks.begin(), dsinks.end());
  if (f64) {
    r.dq = dq64, r.dk = dk64, r.dv = dv64;
    return r;
  }
  auto widen = [&](const Bits& x) {
    std::vector<double> d(x.size());
    for (size_t i = 0; i < x.size(); ++i) d[i] = from_half_bits(x[i], c.dt);
    return d;
  };
  r.dq = widen(dq16), r.dk = widen(dk16), r.dv = widen(dv16);
  return r;
}

// ---- Comparisons ------------------------------------------------------------------------------

double rel_l2(const std::vector<double>& got, const std::vector<double>& want) {
  double num = 0, den = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (std::isnan(got[i])) return kInf;
    num += (got[i] - want[i]) * (got[i] - want[i]);
    den += want[i] * want[i];
  }
  return den == 0 ? std::sqrt(num) : std::sqrt(num / den);
}

// The worst elements as (batch, head, row, column) of a [B, H, N, D] tensor, and the NaN count.
std::string explain(const std::vector<double>& got, const std::vector<double>& want, int64_t H,
                    int64_t N, int64_t D) {
  std::ostringstream os;
  int64_t nans = 0;
  std::vector<std::pair<double, int64_t>> e;
  for (size_t i = 0; i < got.size(); ++i) {
    if (std::isnan(got[i])) {
      ++nans;
      continue;
    }
    e.push_back({std::fabs(got[i] - want[i]), static_cast<int64_t>(i)});
  }
  if (nans) os << "\n  " << nans << " NaN elements (unwritten?)";
  const size_t k = std::min<size_t>(6, e.size());
  std::partial_sort(e.begin(), e.begin() + k, e.end(), std::greater<>());
  for (size_t j = 0; j < k; ++j) {
    const int64_t i = e[j].second;
    os << "\n  |diff| " << e[j].first << " at (b " << i / (H * N * D) << ", h " << (i / (N * D)) % H
       << ", row " << (i / D) % N << ", col " << i % D << "): got " << got[i] << " want " << want[i];
  }
  return os.str();
}

// Two bounds: the rule of numerics section 8 (2 x the emulation's error + floor), and a sharper
// one, 1.1 x the emulation's error + floor: the emulation rounds exactly what the kernel's tensor
// cores see (bf16 dS and dV operands, bf16 outputs), so in bf16 the kernel's error equals it to
// 3 digits (measured); in fp16 the kernel is better than the emulation (fp16 operands are finer
// than the emulation's bf16). The output rounding alone (the fp64 reference rounded to the dtype)
// is printed for scale.
void check(const Case& c, const char* name, const std::vector<double>& gpu,
           const std::vector<double>& ref64, const std::vector<double>& ref_lp, double floor,
           int64_t H, int64_t N) {
  std::vector<double> rounded(ref64.size());
  for (size_t i = 0; i < ref64.size(); ++i)
    rounded[i] = from_half_bits(to_half_bits(static_cast<float>(ref64[i]), c.dt), c.dt);
  const double err = rel_l2(gpu, ref64), base = rel_l2(ref_lp, ref64);
  const double r0 = rel_l2(rounded, ref64);
  const double bound = 2 * base + floor, sharp = 1.1 * base + floor;
  std::printf("[ %-44s ] %-2s rel L2 err %.3e (low-precision reference %.3e, bound %.3e; "
              "sharp bound %.3e; output rounding alone %.3e)\n",
              c.name, name, err, base, bound, sharp, r0);
  EXPECT_LE(err, bound) << c.name << " " << name << ": rel L2 error " << err << " > 2 x " << base
                        << " + " << floor << explain(gpu, ref64, H, N, c.D);
  EXPECT_LE(err, sharp) << c.name << " " << name << ": rel L2 error " << err << " > 1.1 x " << base
                        << " + " << floor << explain(gpu, ref64, H, N, c.D);
}

// dsinks [Hq] (numerics 9.10): -sum over the batch and rows of p_sink * D. No tensor-core operand:
// the emulation's error against fp64 is the fp32 reference's own (sequential sums of D over d and
// of the rows' terms, std::exp2), and the kernel's is of the same kind in another order (bwd_aux.cu:
// fp32 D, exp2f, per-row terms summed by a fixed tree), ~sqrt(B Nq) 2^-24 relative for sums of
// terms of random sign: ~1e-5 here. Bound: 2 x the emulation's relative L2 error + 1e-4 (10x
// that), over the heads (heads without a sink: exactly 0 on both sides).
void check_dsinks(const Case& c, const std::vector<double>& gpu, const std::vector<double>& ref64,
                  const std::vector<double>& ref_lp) {
  const double err = rel_l2(gpu, ref64), base = rel_l2(ref_lp, ref64), bound = 2 * base + 1e-4;
  std::printf("[ %-44s ] dsinks rel L2 err %.3e (low-precision reference %.3e, bound %.3e)\n",
              c.name, err, base, bound);
  std::ostringstream os;
  for (size_t h = 0; h < gpu.size(); ++h)
    os << "\n  head " << h << ": got " << gpu[h] << " want " << ref64[h];
  EXPECT_LE(err, bound) << c.name << " dsinks: rel L2 error " << err << os.str();
  // Not vacuous: heads with a finite sink get a gradient.
  double norm = 0;
  for (double x : ref64) norm += x * x;
  EXPECT_GT(norm, 0.0) << c.name << ": dsinks is zero";
}

int64_t differing_bits(const std::vector<double>& a, const std::vector<double>& b) {
  int64_t n = 0;
  for (size_t i = 0; i < a.size(); ++i)
    n += std::memcmp(&a[i], &b[i], sizeof(double)) != 0;  // NaN patterns compared too
  return n;
}

// ---- The grid -----------------------------------------------------------------------------------

constexpr Mode kQat = Mode::kAttnQAT, kDrop = Mode::kDropInQAT, kBf16 = Mode::kBF16;
constexpr PQuant kPaper = PQuant::kPaper, kAnch = PQuant::kAnchored;
constexpr DType kBf = DType::kBFloat16, kHf = DType::kFloat16;
constexpr Switches kDefault{}, kNoQkv{0, -1, -1}, kNoQuantP{-1, 0, -1}, kNoHpO{-1, -1, 0};
constexpr Switches kQkvOn{1, -1, -1}, kQuantPOn{-1, 1, -1}, kHpOOn{-1, -1, 1};

// Lengths 1, 17, 127, 129, 1013/1024, 4096; GQA 1/4/8; causal with Nq < Nk and Nq > Nk (rows and
// key blocks that see nothing); d 64 and 128; bf16 and fp16; modes bf16, drop_in_qat, attn_qat;
// each switch flipped alone from both QAT modes; paper and anchored; raw inputs; the GPU
// forward's state; the deterministic mode.
// clang-format off
const Case kCases[] = {
  // name                                        mode  p_quant causal dtype  D  B Hq Hkv  Nq    Nk
  {"attnqat_paper_bf16_d128",                   kQat, kPaper, false, kBf, 128, 1, 2, 2, 1013, 1024},
  {"attnqat_anchored_bf16_d128_causal_gqa4",    kQat, kAnch,  true,  kBf, 128, 1, 4, 1, 1013, 1024},
  {"attnqat_paper_fp16_d64_causal_nq_gt_nk",    kQat, kPaper, true,  kHf, 64,  2, 2, 2, 1024, 1013},
  {"attnqat_anchored_bf16_d64_gqa8",            kQat, kAnch,  false, kBf, 64,  1, 8, 1, 129,  127},
  {"attnqat_anchored_fp16_d128_4096",           kQat, kAnch,  false, kHf, 128, 1, 1, 1, 4096, 4096},
  {"attnqat_paper_bf16_d64_causal_4096_gqa4",   kQat, kPaper, true,  kBf, 64,  1, 4, 1, 4096, 4096},
  {"attnqat_paper_bf16_d64_seq1",               kQat, kPaper, false, kBf, 64,  3, 2, 1, 1,    1},
  {"attnqat_anchored_bf16_d128_causal_q1_k17",  kQat, kAnch,  true,  kBf, 128, 1, 2, 2, 1,    17},
  {"attnqat_paper_fp16_d128_causal_q129_k17",   kQat, kPaper, true,  kHf, 128, 2, 2, 1, 129,  17},
  {"bf16_bf16_d128_q17",                        kBf16, kPaper, false, kBf, 128, 1, 2, 1, 17, 1024},
  {"bf16_fp16_d64_causal_4096",                 kBf16, kPaper, true, kHf, 64,  1, 1, 1, 4096, 4096},
  {"bf16_bf16_d128_causal_nq_gt_nk_gqa4",       kBf16, kPaper, true, kBf, 128, 1, 4, 1, 300,  129},
  {"bf16_fp16_d128_gqa8",                       kBf16, kPaper, false, kHf, 128, 1, 8, 1, 127, 300},
  {"dropin_paper_bf16_d128_causal",             kDrop, kPaper, true, kBf, 128, 1, 4, 2, 257,  300},
  {"dropin_anchored_fp16_d64",                  kDrop, kAnch, false, kHf, 64,  2, 2, 1, 127,  129},
  {"dropin_paper_bf16_d64_causal_nq_gt_nk",     kDrop, kPaper, true, kBf, 64,  1, 2, 2, 1024, 1013},
  // Ablations: one switch off from attn_qat, one switch on from drop_in_qat.
  {"ablate_qat_no_qkv_paper_bf16_d128",         kQat, kPaper, false, kBf, 128, 1, 2, 1, 200, 333, kNoQkv},
  {"ablate_qat_no_qkv_anchored_fp16_d64_causal",kQat, kAnch,  true,  kHf, 64,  1, 2, 2, 333, 200, kNoQkv},
  {"ablate_qat_no_quant_p_paper_bf16_d64_causal",kQat, kPaper, true, kBf, 64,  1, 2, 1, 300, 300, kNoQuantP},
  {"ablate_qat_no_quant_p_anchored_fp16_d128",  kQat, kAnch,  false, kHf, 128, 1, 2, 2, 200, 129, kNoQuantP},
  {"ablate_qat_no_hp_o_anchored_bf16_d128",     kQat, kAnch,  false, kBf, 128, 1, 2, 1, 257, 129, kNoHpO},
  {"ablate_qat_no_hp_o_paper_fp16_d64_causal",  kQat, kPaper, true,  kHf, 64,  1, 4, 4, 129, 257, kNoHpO},
  {"ablate_drop_qkv_on_paper_bf16_d128",        kDrop, kPaper, false, kBf, 128, 1, 2, 2, 200, 257, kQkvOn},
  {"ablate_drop_quant_p_on_anchored_bf16_d64",  kDrop, kAnch,  true,  kBf, 64,  1, 2, 1, 257, 200, kQuantPOn},
  {"ablate_drop_quant_p_on_paper_fp16_d128",    kDrop, kPaper, false, kHf, 128, 1, 2, 2, 129, 333, kQuantPOn},
  {"ablate_drop_hp_o_on_anchored_bf16_d128_causal", kDrop, kAnch, true, kBf, 128, 1, 2, 1, 300, 300, kHpOOn},
  // Raw inputs (the backward fake-quantizes them), the GPU forward's state, deterministic mode.
  {"raw_inputs_anchored_bf16_d64",              kQat, kAnch,  false, kBf, 64,  2, 4, 2, 77,  300, kDefault, true},
  {"gpu_fwd_anchored_bf16_d128_causal",         kQat, kAnch,  true,  kBf, 128, 1, 2, 1, 1013, 1024, kDefault, false, true},
  {"gpu_fwd_paper_fp16_d64",                    kQat, kPaper, false, kHf, 64,  1, 4, 2, 300, 1024, kDefault, false, true},
  {"deterministic_anchored_bf16_d128_gqa4",     kQat, kAnch,  false, kBf, 128, 1, 4, 1, 1013, 1024, kDefault, false, false, true},
  {"deterministic_paper_fp16_d64_causal",       kQat, kPaper, true,  kHf, 64,  2, 2, 2, 1024, 1013, kDefault, false, false, true},
  {"deterministic_bf16_bf16_d128_causal_gqa8",  kBf16, kPaper, true, kBf, 128, 1, 8, 1, 700, 1024, kDefault, false, false, true},
  {"deterministic_small_anchored_bf16_d64_gqa2", kQat, kAnch,  false, kBf, 64,  1, 2, 1, 129, 300, kDefault, false, false, true},
  {"deterministic_small_paper_bf16_d128_causal", kQat, kPaper, true,  kBf, 128, 1, 2, 2, 200, 333, kDefault, false, false, true},
  // Sliding windows (LocalMask): key blocks meet a range [m_begin, m_end) of query blocks; the
  // deterministic dQ turns run from n_last(m) down to n_first(m).
  {"window_attnqat_paper_bf16_d128_128_0",      kQat, kPaper, test::window(128, 0), kBf, 128, 1, 4, 2, 1013, 1024},
  {"window_attnqat_anchored_fp16_d64_1_1_gqa4", kQat, kAnch,  test::window(1, 1), kHf, 64, 1, 4, 1, 300, 333},
  {"window_bf16_bf16_d128_127_127",             kBf16, kPaper, test::window(127, 127), kBf, 128, 1, 2, 2, 700, 700},
  {"window_attnqat_paper_bf16_d64_0_0_nq_gt_nk", kQat, kPaper, test::window(0, 0), kBf, 64, 1, 2, 2, 300, 200},
  {"window_attnqat_anchored_bf16_d128_4096_causal", kQat, kAnch, test::window(4096, -1, true), kBf, 128, 1, 2, 1, 1013, 1024},
  {"window_dropin_paper_bf16_d64_0_127",        kDrop, kPaper, test::window(0, 127), kBf, 64, 1, 2, 2, 129, 1024},
  {"deterministic_window_paper_bf16_d128_128_0", kQat, kPaper, test::window(128, 0), kBf, 128, 1, 2, 2, 1013, 1024, kDefault, false, false, true},
  {"deterministic_window_bf16_fp16_d64_127_127_gqa4", kBf16, kPaper, test::window(127, 127), kHf, 64, 1, 4, 1, 700, 700, kDefault, false, false, true},
  // Head dims between the tiles (the next wider tile; dQ pieces span the tile, columns past d
  // are never stored: the poisoned gradients would show it).
  {"attnqat_paper_bf16_d96_causal",             kQat, kPaper, true,  kBf, 96,  1, 2, 2, 1013, 1024},
  {"attnqat_anchored_fp16_d80_gqa4",            kQat, kAnch,  false, kHf, 80,  1, 4, 1, 300,  333},
  {"bf16_bf16_d112_causal_nq_gt_nk",            kBf16, kPaper, true, kBf, 112, 2, 2, 1, 300,  129},
  {"attnqat_anchored_bf16_d32_window127_0",     kQat, kAnch,  test::window(127, 0), kBf, 32, 1, 2, 2, 700, 700},
  {"dropin_paper_fp16_d48",                     kDrop, kPaper, false, kHf, 48,  1, 2, 1, 129,  257},
  {"deterministic_attnqat_paper_bf16_d96_gqa4", kQat, kPaper, false, kBf, 96,  1, 4, 1, 700, 1024, kDefault, false, false, true},
  {"deterministic_attnqat_anchored_bf16_d16_causal", kQat, kAnch, true, kBf, 16, 1, 2, 2, 200, 333, kDefault, false, false, true},
  // Logit soft-capping (numerics 9.9): caps 30 (Gemma-2-like) and 5 (saturating) and 50; every mode,
  // both p_quant, causal, a window, an ablation, the GPU forward's state, raw inputs.
  {"softcap30_attnqat_paper_bf16_d128",         kQat, kPaper, false, kBf, 128, 1, 2, 2, 1013, 1024, kDefault, false, false, false, 30.0f},
  {"softcap5_attnqat_anchored_fp16_d64_causal_gqa4", kQat, kAnch, true, kHf, 64, 1, 4, 1, 300, 333, kDefault, false, false, false, 5.0f},
  {"softcap5_bf16_bf16_d128_causal",            kBf16, kPaper, true, kBf, 128, 1, 2, 1, 700, 1024, kDefault, false, false, false, 5.0f},
  {"softcap30_dropin_anchored_bf16_d64",        kDrop, kAnch, false, kBf, 64,  2, 2, 1, 257, 300, kDefault, false, false, false, 30.0f},
  {"softcap5_ablate_qat_no_quant_p_paper_fp16_d128", kQat, kPaper, false, kHf, 128, 1, 2, 2, 200, 129, kNoQuantP, false, false, false, 5.0f},
  {"softcap30_window_attnqat_paper_bf16_d64_1_1", kQat, kPaper, test::window(1, 1), kBf, 64, 1, 4, 1, 300, 333, kDefault, false, false, false, 30.0f},
  {"softcap50_gpu_fwd_anchored_bf16_d128_causal", kQat, kAnch, true, kBf, 128, 1, 2, 1, 1013, 1024, kDefault, false, true, false, 50.0f},
  {"softcap5_raw_inputs_paper_bf16_d64",        kQat, kPaper, false, kBf, 64, 2, 4, 2, 77, 300, kDefault, true, false, false, 5.0f},
  // Attention sinks (numerics 9.10; values: kSinkPattern, gpu_util.h) and dsinks: rows without keys
  // (causal with Nq > Nk, a window), every mode, the GPU forward's state, the deterministic mode.
  {"sinks_attnqat_paper_bf16_d128_causal_nq_gt_nk", kQat, kPaper, true, kBf, 128, 1, 4, 2, 1024, 700, kDefault, false, false, false, 0.0f, 0},
  {"sinks_attnqat_anchored_fp16_d64_gqa4",      kQat, kAnch,  false, kHf, 64,  2, 4, 1, 300, 1024, kDefault, false, false, false, 0.0f, 2},
  {"sinks_bf16_bf16_d64_window0_0_nq_gt_nk",    kBf16, kPaper, test::window(0, 0), kBf, 64, 1, 8, 2, 300, 200, kDefault, false, false, false, 0.0f, 0},
  {"sinks_dropin_paper_bf16_d128_causal",       kDrop, kPaper, true, kBf, 128, 1, 4, 2, 257, 300, kDefault, false, false, false, 0.0f, 4},
  {"sinks_gpu_fwd_anchored_bf16_d64_causal_nq_gt_nk", kQat, kAnch, true, kBf, 64, 2, 8, 2, 300, 129, kDefault, false, true, false, 0.0f, 0},
  {"sinks_deterministic_paper_bf16_d128_gqa2",  kQat, kPaper, false, kBf, 128, 1, 4, 2, 700, 1024, kDefault, false, false, true, 0.0f, 5},
  // Both.
  {"softcap5_sinks_attnqat_anchored_bf16_d128_causal", kQat, kAnch, true, kBf, 128, 2, 4, 2, 1013, 1024, kDefault, false, false, false, 5.0f, 0},
  {"softcap30_sinks_dropin_paper_fp16_d64_causal_nq_gt_nk", kDrop, kPaper, true, kHf, 64, 1, 8, 2, 300, 200, kDefault, false, false, false, 30.0f, 0},
  {"softcap50_sinks_deterministic_bf16_bf16_d128_window128_0", kBf16, kPaper, test::window(128, 0), kBf, 128, 1, 4, 1, 1013, 1024, kDefault, false, false, true, 50.0f, 2},
};
// clang-format on

class AttentionBwd : public Sm90Test, public ::testing::WithParamInterface<Case> {};

TEST_P(AttentionBwd, MatchesReference) {
  const Case& c = GetParam();
  const Problem p = make_problem(c, 1234);
  const State s = forward_state(c, p);
  Status st;
  const Grads gpu = run_gpu(c, p, s, &st);
  ASSERT_TRUE(st.ok()) << st.message();
  const Grads ref64 = run_ref(c, p, s, Precision::kFloat64);
  const Grads ref_lp = run_ref(c, p, s, Precision::kBF16Operands);
  check(c, "dQ", gpu.dq, ref64.dq, ref_lp.dq, kFloor, c.Hq, c.Nq);
  check(c, "dK", gpu.dk, ref64.dk, ref_lp.dk, kFloor, c.Hkv, c.Nk);
  check(c, "dV", gpu.dv, ref64.dv, ref_lp.dv, eff_quant_p(c) ? kFloorQuantP : kFloor, c.Hkv, c.Nk);
  if (c.sinks >= 0) check_dsinks(c, gpu.dsinks, ref64.dsinks, ref_lp.dsinks);
  if (c.deterministic) {
    for (int run = 0; run < 2; ++run) {
      const Grads again = run_gpu(c, p, s, &st);
      ASSERT_TRUE(st.ok()) << st.message();
      EXPECT_EQ(differing_bits(again.dq, gpu.dq), 0) << c.name << ": dQ differs between runs";
      EXPECT_EQ(differing_bits(again.dk, gpu.dk), 0) << c.name << ": dK differs between runs";
      EXPECT_EQ(differing_bits(again.dv, gpu.dv), 0) << c.name << ": dV differs between runs";
      EXPECT_EQ(differing_bits(again.dsinks, gpu.dsinks), 0) << c.name << ": dsinks differs between runs";
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Sm90, AttentionBwd, ::testing::ValuesIn(kCases),
                         [](const ::testing::TestParamInfo<Case>& i) {
                           return std::string(i.param.name);
                         });

// ---- Sinks: rows without keys -----------------------------------------------------------------

class AttentionBwdSinks : public Sm90Test {};

// Rows that see no key add nothing to dsinks whatever dO holds (numerics 9.10): dO is NaN on every
// such row (causal with Nq > Nk: rows 0 .. Nq - Nk - 1), and dsinks must still be finite and the
// reference's (which skips those rows). dQ, dK, dV are not compared: inside the diagonal tiles a
// NaN dO may reach them (numerics 9.7).
TEST_F(AttentionBwdSinks, RowsWithoutKeysAddNothingToDsinks) {
  for (const Mode mode : {Mode::kAttnQAT, Mode::kBF16}) {
    const Case c{"sinks_empty_rows_nan_dout", mode, PQuant::kAnchored, true, kBf, 64, 2, 4, 2, 300,
                 129, kDefault, false, false, false, 5.0f, 0};
    const Problem p = make_problem(c, 99);
    const State s = forward_state(c, p);
    Bits dout = p.dout;
    const uint16_t nan_bits = to_half_bits(NAN, c.dt);
    for (int64_t bh = 0; bh < c.B * c.Hq; ++bh)
      for (int64_t i = 0; i < c.Nq - c.Nk; ++i)
        for (int64_t d = 0; d < c.D; ++d) dout[(bh * c.Nq + i) * c.D + d] = nan_bits;
    Status st;
    const Grads gpu = run_gpu(c, p, s, &st, &dout);
    ASSERT_TRUE(st.ok()) << st.message();
    const Grads ref64 = run_ref(c, p, s, Precision::kFloat64, &dout);
    const Grads ref_lp = run_ref(c, p, s, Precision::kBF16Operands, &dout);
    for (size_t h = 0; h < gpu.dsinks.size(); ++h)
      EXPECT_TRUE(std::isfinite(gpu.dsinks[h])) << "head " << h << ": dsinks " << gpu.dsinks[h];
    check_dsinks(c, gpu.dsinks, ref64.dsinks, ref_lp.dsinks);
  }
}

// ---- Errors -----------------------------------------------------------------------------------

class AttentionBwdErrors : public Sm90Test {};

TEST_F(AttentionBwdErrors, ClearStatusForWhatTheKernelCannotDo) {
  DeviceBuffer buf(1 << 22);
  auto run = [&](DType dt, int64_t d) {
    char* base = static_cast<char*>(buf.get());
    auto view = [&](int slot, DType t, std::initializer_list<int64_t> shape, const char* name) {
      return cuda_view(base + slot * (1 << 18), t, shape, name);
    };
    ForwardState fs;
    fs.o = view(0, dt, {1, 1, 16, d}, "o");
    fs.o_hp = view(1, dt, {1, 1, 16, d}, "o_hp");
    fs.lse = view(2, DType::kFloat32, {1, 1, 16}, "lse");
    fs.m_ref = view(3, DType::kFloat32, {1, 1, 16}, "m_ref");
    fs.l = view(4, DType::kFloat32, {1, 1, 16}, "l");
    BackwardOutputs g;
    g.dq = view(5, dt, {1, 1, 16, d}, "dq");
    g.dk = view(6, dt, {1, 1, 16, d}, "dk");
    g.dv = view(7, dt, {1, 1, 16, d}, "dv");
    AttentionOptions opts = test::options(Mode::kAttnQAT, PQuant::kPaper, false);
    opts.inputs_quantized = true;
    return attention_backward(view(8, dt, {1, 1, 16, d}, "dout"), view(9, dt, {1, 1, 16, d}, "q"),
                              view(10, dt, {1, 1, 16, d}, "k"), view(11, dt, {1, 1, 16, d}, "v"),
                              fs, opts, g);
  };
  Status st = run(DType::kBFloat16, 256);
  EXPECT_EQ(st.code(), StatusCode::kNotImplemented) << st.message();
  EXPECT_NE(st.message().find("head dims 16, 32, ..., 128 (multiples of 16 up to 128), got 256"),
            std::string::npos)
      << st.message();
  st = run(DType::kFloat32, 64);
  EXPECT_EQ(st.code(), StatusCode::kNotImplemented) << st.message();
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
}

}  // namespace
}  // namespace attnqat::gpu_test
