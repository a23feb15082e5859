// tests/cpp/cuda_attention/test_attention_fwd.cpp — the sm90 forward kernel through the public
// API (attnqat::attention_forward with CUDA views) against the CPU reference (the same call with
// CPU views, kv_tile = 128), on the same fake-quantized bf16/fp16 inputs (quantized on the CPU,
// copied to the GPU: bit-identical Q^, K^, V^).
//
// Tolerances (numerics section 8), per output:
//  - O, O': relative L2 error against the fp64 reference (Precision::kFloat64, float64 inputs)
//    at most 2x the error of the low-precision emulation (Precision::kBF16Operands, run in the
//    input dtype, so its outputs are rounded like the kernel's) against fp64, plus a floor.
//    Floors: O in the quantized modes 1e-3 — ex2.approx moves the few P elements that sit within
//    ~1e-7 of an E2M1 (or E4M3 scale) boundary to the other side, each flip worth a whole E2M1
//    step of that element; the emulation's own error is mostly the output rounding, so without
//    a floor a handful of flips in a short row could fail the test. O' and bf16 mode 2e-4 (no
//    quantization boundary: only ex2 and summation order).
//  - LSE: |GPU - fp64| <= 1e-5 max(1, |LSE|) (ex2.approx is good to ~2^-22 per term).
//  - m_ref: anchored: exact, except at most 0.1% of rows where m sits within fp32 rounding of an
//    integer (then off by exactly 1); paper: within 1e-4 max(1, |m|) (the dot products'
//    fp32 summation order differs from the reference's).
//  - l: where m_ref agrees, relative 1e-5 (anchored) or 1e-4 (paper: l carries exp2 of m's error).
//  - Rows that see no key: O = O' = 0 exactly, LSE = m_ref = -inf, l = 0; with a sink (numerics
//    9.10) O = O' = 0 exactly and LSE, m_ref, l as above (the sink's start state).
//  - Outputs are poisoned (NaN) before each GPU run: any NaN left is an unwritten element.
// Softcap (numerics 9.9) needs no other tolerance: the kernels' tanh (sm90/softcap.cuh) is good to
// ~2.4e-7 absolute, an error of softcap * log2(e) * 2.4e-7 * ln 2 relative in p~ (5e-6 at softcap
// 30, 1e-5 at 50): 50x ex2.approx's, still ~1e-6 relative in O and O' (under the 2e-4 floor) and
// far inside the LSE's 1e-5; the E2M1 boundary flips it adds are as rare as a relative error of
// 5e-6 makes them (a P element within 5e-6 of a boundary: ~1 in 10^4), each worth what the 1e-3
// floor of the quantized O already allows for.
// On failure the messages give the error norms, the worst elements (batch, head, row, column),
// the worst rows and the per-warpgroup (64-row) error split.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include "common/mask.h"
#include "common/validate.h"
#include "attention_util.h"
#include "attnqat/attnqat.h"
#include "gpu_util.h"

namespace attnqat::gpu_test {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

enum class Layout { kBHSD, kBSHD };  // BSHD: [B, N, H, D] memory, viewed as [B, H, N, D]

struct Case {
  const char* name;
  Mode mode;
  PQuant pq;
  test::CaseMask mask;
  DType dt;
  int64_t D, B, Hq, Hkv, Nq, Nk;
  VBlocks vb = VBlocks::kChannel;
  Layout layout = Layout::kBHSD;
  float softcap = 0.0f;  // numerics 9.9 (0: off)
  int sinks = -1;        // numerics 9.10: sink_values(sinks, Hq) (gpu_util.h); -1: no sinks
};

bool quantizes(Mode m) { return m != Mode::kBF16; }
bool wants_o_hp(Mode m) { return m == Mode::kAttnQAT; }

// How many keys row i sees: the mask policy (src/common/mask.h) that the kernels and the
// reference use (test_mask checks it against the definition by brute force).
int64_t visible(int64_t i, const Case& c) {
  const AttentionOptions o = test::options(c.mode, c.pq, c.mask);
  const IndexRange r = visible_keys(attention_mask_kind(o), static_cast<int>(i),
                                    attention_seq(o, c.Nq, c.Nk));
  return r.empty() ? 0 : r.end - r.begin;
}

// Q^, K^, V^ in the input dtype (16-bit patterns), contiguous [B, H, N, D].
struct Inputs {
  std::vector<uint16_t> q, k, v;
};

Inputs make_inputs(const Case& c, uint32_t seed) {
  auto prob = test::random_problem<float>(c.B, c.Hq, c.Hkv, c.Nq, c.Nk, c.D, seed);
  Inputs in{to_half(prob.q, c.dt), to_half(prob.k, c.dt), to_half(prob.v, c.dt)};
  if (!quantizes(c.mode)) return in;
  float one = 1.0f;
  const TensorView g = make_view(&one, DType::kFloat32, {1}, "g");
  QuantizeOptions qo;
  auto fq = [&](std::vector<uint16_t>& x, int64_t h, int64_t n, BlockAxis axis) {
    qo.axis = axis;
    const TensorView t = make_view(x.data(), c.dt, {c.B, h, n, c.D}, "x");
    const Status st = fake_quantize(t, t, g, qo);
    ASSERT_TRUE(st.ok()) << st.message();
  };
  fq(in.q, c.Hq, c.Nq, BlockAxis::kLast);
  fq(in.k, c.Hkv, c.Nk, BlockAxis::kLast);
  fq(in.v, c.Hkv, c.Nk, c.vb == VBlocks::kToken ? BlockAxis::kToken : BlockAxis::kLast);
  return in;
}

AttentionOptions options_of(const Case& c) {
  AttentionOptions o = test::options(c.mode, c.pq, c.mask);
  o.v_blocks = c.vb;
  o.kv_tile = 128;
  o.inputs_quantized = true;
  o.softcap = c.softcap;
  return o;
}

// ---- GPU run ----------------------------------------------------------------------------------

struct GpuOut {
  std::vector<float> o, o_hp, lse, m_ref, l;
};

// Uploads x [B, H, N, D] in the case's layout and returns the view.
TensorView upload(DeviceBuffer& buf, const std::vector<uint16_t>& x, const Case& c, int64_t h,
                  int64_t n, const char* name) {
  std::vector<uint16_t> mem(x.size());
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t hh = 0; hh < h; ++hh)
      for (int64_t i = 0; i < n; ++i)
        for (int64_t d = 0; d < c.D; ++d) {
          const int64_t src = ((b * h + hh) * n + i) * c.D + d;
          const int64_t dst = c.layout == Layout::kBHSD ? src : ((b * n + i) * h + hh) * c.D + d;
          mem[dst] = x[src];
        }
  buf = DeviceBuffer(std::max<size_t>(mem.size() * 2, 16));
  buf.upload(mem.data(), mem.size() * 2);
  TensorView t = cuda_view(buf.get(), c.dt, {c.B, h, n, c.D}, name);
  if (c.layout == Layout::kBSHD) {
    t.stride[0] = n * h * c.D;
    t.stride[1] = c.D;
    t.stride[2] = h * c.D;
    t.stride[3] = 1;
  }
  return t;
}

Status run_gpu(const Case& c, const Inputs& in, const AttentionOptions& opts, GpuOut* out,
               const Inputs* raw_override = nullptr) {
  DeviceBuffer dq, dk, dv;
  const Inputs& src = raw_override ? *raw_override : in;
  const TensorView q = upload(dq, src.q, c, c.Hq, c.Nq, "q");
  const TensorView k = upload(dk, src.k, c, c.Hkv, c.Nk, "k");
  const TensorView v = upload(dv, src.v, c, c.Hkv, c.Nk, "v");
  const int64_t rows = c.B * c.Hq * c.Nq;
  DeviceBuffer o(rows * c.D * 2 + 16), o_hp(rows * c.D * 2 + 16), lse(rows * 4 + 16),
      m_ref(rows * 4 + 16), l(rows * 4 + 16);
  for (DeviceBuffer* b : {&o, &o_hp, &lse, &m_ref, &l}) b->poison();
  ForwardOutputs fo;
  fo.o = cuda_view(o.get(), c.dt, {c.B, c.Hq, c.Nq, c.D}, "o");
  if (wants_o_hp(c.mode)) fo.o_hp = cuda_view(o_hp.get(), c.dt, {c.B, c.Hq, c.Nq, c.D}, "o_hp");
  fo.lse = cuda_view(lse.get(), DType::kFloat32, {c.B, c.Hq, c.Nq}, "lse");
  fo.m_ref = cuda_view(m_ref.get(), DType::kFloat32, {c.B, c.Hq, c.Nq}, "m_ref");
  fo.l = cuda_view(l.get(), DType::kFloat32, {c.B, c.Hq, c.Nq}, "l");
  CaseSinks sinks(c, Device::kCUDA);  // unless the caller attached its own
  const Status st = attention_forward(q, k, v, has_sinks(opts) ? opts : sinks.attach(opts), fo);
  if (!st.ok()) return st;
  cuda_check(cudaDeviceSynchronize(), "attention_forward kernel");
  std::vector<uint16_t> h(rows * c.D);
  o.download(h.data(), h.size() * 2);
  out->o = from_half(h, c.dt);
  if (wants_o_hp(c.mode)) {
    o_hp.download(h.data(), h.size() * 2);
    out->o_hp = from_half(h, c.dt);
  }
  out->lse.resize(rows);
  out->m_ref.resize(rows);
  out->l.resize(rows);
  lse.download(out->lse.data(), rows * 4);
  m_ref.download(out->m_ref.data(), rows * 4);
  l.download(out->l.data(), rows * 4);
  return Status::Ok();
}

// ---- CPU references ---------------------------------------------------------------------------

struct RefOut {
  std::vector<double> o, o_hp;
  std::vector<float> lse, m_ref, l;
};

// precision kFloat64 with float64 inputs, or kBF16Operands in the input dtype.
RefOut run_ref(const Case& c, const Inputs& in, Precision precision) {
  AttentionOptions opts = options_of(c);
  opts.precision = precision;
  const bool f64 = precision == Precision::kFloat64;
  const DType dt = f64 ? DType::kFloat64 : c.dt;
  auto as_f64 = [&](const std::vector<uint16_t>& x) {
    std::vector<double> d(x.size());
    for (size_t i = 0; i < x.size(); ++i) d[i] = from_half_bits(x[i], c.dt);
    return d;
  };
  std::vector<double> q64, k64, v64;
  std::vector<uint16_t> q16 = in.q, k16 = in.k, v16 = in.v;
  if (f64) q64 = as_f64(in.q), k64 = as_f64(in.k), v64 = as_f64(in.v);
  void* qp = f64 ? static_cast<void*>(q64.data()) : q16.data();
  void* kp = f64 ? static_cast<void*>(k64.data()) : k16.data();
  void* vp = f64 ? static_cast<void*>(v64.data()) : v16.data();
  const int64_t rows = c.B * c.Hq * c.Nq;
  std::vector<double> o64(f64 ? rows * c.D : 0), ohp64(f64 ? rows * c.D : 0);
  std::vector<uint16_t> o16(f64 ? 0 : rows * c.D), ohp16(f64 ? 0 : rows * c.D);
  RefOut r;
  r.lse.resize(rows);
  r.m_ref.resize(rows);
  r.l.resize(rows);
  ForwardOutputs fo;
  fo.o =
      make_view(f64 ? static_cast<void*>(o64.data()) : o16.data(), dt, {c.B, c.Hq, c.Nq, c.D}, "o");
  if (wants_o_hp(c.mode))
    fo.o_hp = make_view(f64 ? static_cast<void*>(ohp64.data()) : ohp16.data(), dt,
                        {c.B, c.Hq, c.Nq, c.D}, "o_hp");
  fo.lse = make_view(r.lse.data(), DType::kFloat32, {c.B, c.Hq, c.Nq}, "lse");
  fo.m_ref = make_view(r.m_ref.data(), DType::kFloat32, {c.B, c.Hq, c.Nq}, "m_ref");
  fo.l = make_view(r.l.data(), DType::kFloat32, {c.B, c.Hq, c.Nq}, "l");
  CaseSinks sinks(c, Device::kCPU);
  const Status st = attention_forward(make_view(qp, dt, {c.B, c.Hq, c.Nq, c.D}, "q"),
                                      make_view(kp, dt, {c.B, c.Hkv, c.Nk, c.D}, "k"),
                                      make_view(vp, dt, {c.B, c.Hkv, c.Nk, c.D}, "v"),
                                      sinks.attach(opts), fo);
  EXPECT_TRUE(st.ok()) << "reference: " << st.message();
  if (f64) {
    r.o = o64;
    if (wants_o_hp(c.mode)) r.o_hp = ohp64;
  } else {
    r.o.resize(o16.size());
    for (size_t i = 0; i < o16.size(); ++i) r.o[i] = from_half_bits(o16[i], c.dt);
    if (wants_o_hp(c.mode)) {
      r.o_hp.resize(ohp16.size());
      for (size_t i = 0; i < ohp16.size(); ++i) r.o_hp[i] = from_half_bits(ohp16[i], c.dt);
    }
  }
  return r;
}

// ---- Comparisons with diagnostics -------------------------------------------------------------

template <typename T>
double rel_l2(const std::vector<T>& got, const std::vector<double>& want) {
  double num = 0, den = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double g = static_cast<double>(got[i]);
    if (std::isnan(g)) return kInf;
    num += (g - want[i]) * (g - want[i]);
    den += want[i] * want[i];
  }
  return den == 0 ? std::sqrt(num) : std::sqrt(num / den);
}

std::string where(const Case& c, int64_t row_index) {
  std::ostringstream os;
  const int64_t i = row_index % c.Nq, bh = row_index / c.Nq;
  os << "(b " << bh / c.Hq << ", h " << bh % c.Hq << ", row " << i << " [CTA " << i / 128 << ", wg "
     << (i % 128) / 64 << "], sees " << visible(i, c) << " keys)";
  return os.str();
}

// The worst elements and rows, the NaN count and the error per 64-row warpgroup slot.
std::string explain(const Case& c, const std::vector<float>& got, const std::vector<double>& want) {
  std::ostringstream os;
  const int64_t rows = c.B * c.Hq * c.Nq;
  int64_t nans = 0, first_nan = -1;
  std::vector<std::pair<double, int64_t>> elems, row_err;
  double wg_num[2] = {0, 0}, wg_den[2] = {0, 0};
  for (int64_t r = 0; r < rows; ++r) {
    double num = 0, den = 0;
    for (int64_t d = 0; d < c.D; ++d) {
      const int64_t i = r * c.D + d;
      if (std::isnan(got[i])) {
        if (nans++ == 0) first_nan = i;
        continue;
      }
      const double e = std::fabs(got[i] - want[i]);
      elems.push_back({e, i});
      num += e * e;
      den += want[i] * want[i];
    }
    row_err.push_back({den > 0 ? std::sqrt(num / den) : std::sqrt(num), r});
    wg_num[(r % c.Nq % 128) / 64] += num;
    wg_den[(r % c.Nq % 128) / 64] += den;
  }
  if (nans)
    os << "\n  " << nans << " NaN elements (unwritten or poisoned), first at row "
       << where(c, first_nan / c.D) << " col " << first_nan % c.D;
  const size_t k = std::min<size_t>(5, elems.size());
  std::partial_sort(elems.begin(), elems.begin() + k, elems.end(), std::greater<>());
  for (size_t j = 0; j < k; ++j)
    os << "\n  |diff| " << elems[j].first << " at " << where(c, elems[j].second / c.D) << " col "
       << elems[j].second % c.D << ": got " << got[elems[j].second] << " want "
       << want[elems[j].second];
  const size_t kr = std::min<size_t>(3, row_err.size());
  std::partial_sort(row_err.begin(), row_err.begin() + kr, row_err.end(), std::greater<>());
  for (size_t j = 0; j < kr; ++j)
    os << "\n  worst row rel err " << row_err[j].first << " at " << where(c, row_err[j].second);
  for (int w = 0; w < 2; ++w)
    if (wg_den[w] > 0)
      os << "\n  rows of warpgroup slot " << w << ": rel err " << std::sqrt(wg_num[w] / wg_den[w]);
  return os.str();
}

void check_output(const Case& c, const char* name, const std::vector<float>& gpu,
                  const std::vector<double>& ref64, const std::vector<double>& ref_lp,
                  double floor) {
  const double err = rel_l2(gpu, ref64), base = rel_l2(ref_lp, ref64);
  const double bound = 2 * base + floor;
  std::printf("[ %-28s ] %-4s rel L2 err %.3e (low-precision reference %.3e, bound %.3e)\n", c.name,
              name, err, base, bound);
  EXPECT_LE(err, bound) << c.name << " " << name << ": rel L2 error " << err << " > 2 x " << base
                        << " + " << floor << explain(c, gpu, ref64);
}

void check_stats(const Case& c, const GpuOut& g, const RefOut& r) {
  const int64_t rows = c.B * c.Hq * c.Nq;
  const bool anchored = c.pq == PQuant::kAnchored && quantizes(c.mode);
  const CaseSinks sinks(c, Device::kCPU);
  int64_t bad_lse = 0, m_off = 0, bad_m = 0, bad_l = 0, bad_empty = 0;
  std::ostringstream os;
  auto note = [&](int64_t& counter, int64_t row, const std::string& what) {
    if (counter++ < 5) os << "\n  " << what << " at " << where(c, row);
  };
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t i = row % c.Nq;
    const bool sink = sinks.has(row / c.Nq % c.Hq);
    if (visible(i, c) == 0 && sink) {
      // With a sink: O = O' = 0 exactly; LSE (= the sink), m_ref and l are checked below.
      bool ok = true;
      for (int64_t d = 0; d < c.D; ++d) {
        ok = ok && g.o[row * c.D + d] == 0.0f;
        if (!g.o_hp.empty()) ok = ok && g.o_hp[row * c.D + d] == 0.0f;
      }
      if (!ok) note(bad_empty, row, "row with no key but a sink: want O = O' = 0");
    } else if (visible(i, c) == 0) {
      bool ok = g.lse[row] == -INFINITY && g.m_ref[row] == -INFINITY && g.l[row] == 0.0f;
      for (int64_t d = 0; d < c.D; ++d) {
        ok = ok && g.o[row * c.D + d] == 0.0f;
        if (!g.o_hp.empty()) ok = ok && g.o_hp[row * c.D + d] == 0.0f;
      }
      if (!ok)
        note(bad_empty, row,
             "row with no key: want O = O' = 0, LSE = m_ref = -inf, l = 0; got LSE " +
                 std::to_string(g.lse[row]) + " m_ref " + std::to_string(g.m_ref[row]) + " l " +
                 std::to_string(g.l[row]));
      continue;
    }
    const double lse_tol = 1e-5 * std::max(1.0, std::fabs(static_cast<double>(r.lse[row])));
    if (!(std::fabs(static_cast<double>(g.lse[row]) - r.lse[row]) <= lse_tol))
      note(bad_lse, row,
           "LSE got " + std::to_string(g.lse[row]) + " want " + std::to_string(r.lse[row]));
    bool m_same;
    if (anchored) {
      m_same = g.m_ref[row] == r.m_ref[row];
      if (!m_same) {
        if (std::fabs(g.m_ref[row] - r.m_ref[row]) == 1.0f)
          ++m_off;
        else
          note(bad_m, row,
               "m_ref got " + std::to_string(g.m_ref[row]) + " want " +
                   std::to_string(r.m_ref[row]));
      }
    } else {
      m_same =
          std::fabs(g.m_ref[row] - r.m_ref[row]) <= 1e-4 * std::max(1.0f, std::fabs(r.m_ref[row]));
      if (!m_same)
        note(bad_m, row,
             "m_ref got " + std::to_string(g.m_ref[row]) + " want " + std::to_string(r.m_ref[row]));
    }
    const double l_tol = anchored ? 1e-5 : 1e-4;
    if (m_same && !(std::fabs(g.l[row] - r.l[row]) <= l_tol * r.l[row]))
      note(bad_l, row, "l got " + std::to_string(g.l[row]) + " want " + std::to_string(r.l[row]));
  }
  EXPECT_EQ(bad_empty, 0) << c.name << ": rows that see no key are wrong" << os.str();
  EXPECT_EQ(bad_lse, 0) << c.name << ": LSE out of tolerance in " << bad_lse << " rows" << os.str();
  EXPECT_EQ(bad_m, 0) << c.name << ": m_ref wrong in " << bad_m << " rows" << os.str();
  EXPECT_LE(m_off, std::max<int64_t>(1, rows / 1000))
      << c.name << ": anchored m_ref off by one in " << m_off
      << " rows (m at an integer boundary?)";
  EXPECT_EQ(bad_l, 0) << c.name << ": l out of tolerance in " << bad_l << " rows" << os.str();
}

// ---- The grid -----------------------------------------------------------------------------------

constexpr Mode kQat = Mode::kAttnQAT, kFp4 = Mode::kFP4, kBf16 = Mode::kBF16;
constexpr PQuant kPaper = PQuant::kPaper, kAnch = PQuant::kAnchored;
constexpr DType kBf = DType::kBFloat16, kHf = DType::kFloat16;
constexpr VBlocks kChan = VBlocks::kChannel, kTok = VBlocks::kToken;

// Sequence lengths 1, 17, 127, 129, 300, 1013 against 17 .. 1024 and 4096; GQA 1, 2, 4, 8;
// causal with Nq < Nk and Nq > Nk (rows and whole CTAs that see no key); v_blocks token; a
// [B, N, H, D] memory layout (strided views).
// clang-format off
const Case kCases[] = {
  // name                                     mode  p_quant causal dtype  D  B Hq Hkv   Nq    Nk
  {"attnqat_paper_bf16_d128",               kQat, kPaper, false, kBf, 128, 1, 2, 2, 1013, 1024},
  {"attnqat_anchored_bf16_d128_causal_gqa4",kQat, kAnch,  true,  kBf, 128, 1, 4, 1, 1013, 1024},
  {"attnqat_paper_fp16_d64_causal_nq_gt_nk",kQat, kPaper, true,  kHf, 64,  2, 2, 2, 1024, 1013},
  {"fp4_paper_bf16_d64_gqa8",               kFp4, kPaper, false, kBf, 64,  1, 8, 1, 129,  1024},
  {"fp4_anchored_fp16_d128_causal_gqa4",    kFp4, kAnch,  true,  kHf, 128, 2, 4, 1, 127,  1024},
  {"bf16_bf16_d128_q17",                    kBf16, kPaper, false, kBf, 128, 1, 2, 1, 17,  1024},
  {"bf16_fp16_d64_causal_4096",             kBf16, kPaper, true, kHf, 64,  1, 1, 1, 4096, 4096},
  {"attnqat_anchored_fp16_d128_4096",       kQat, kAnch,  false, kHf, 128, 1, 1, 1, 4096, 4096},
  {"attnqat_anchored_bf16_d64_vtoken_q1",   kQat, kAnch,  false, kBf, 64,  1, 2, 2, 1, 1024, kTok},
  {"attnqat_paper_fp16_d128_vtoken",        kQat, kPaper, false, kHf, 128, 1, 2, 1, 300, 333, kTok},
  {"fp4_paper_bf16_d128_causal_nk17",       kFp4, kPaper, true,  kBf, 128, 1, 2, 2, 300,  17},
  {"attnqat_paper_bf16_d64_bshd",           kQat, kPaper, false, kBf, 64,  2, 4, 2, 200, 333, kChan,
   Layout::kBSHD},
  {"attnqat_anchored_bf16_d128_causal_bshd", kQat, kAnch, true,  kBf, 128, 2, 2, 2, 129, 257, kChan,
   Layout::kBSHD},
  {"attnqat_paper_fp16_d64_seq1",           kQat, kPaper, false, kHf, 64,  3, 2, 1, 1,    1},
  // Sliding windows (LocalMask): left/right 0, 1, 127, 128, 4096, one side unbounded, with
  // causal, Nq > Nk (rows that see no key), rows whose first visited tile has none of their keys.
  {"attnqat_paper_bf16_d128_window128_0",   kQat, kPaper, test::window(128, 0), kBf, 128, 1, 2, 2, 1013, 1024},
  {"fp4_anchored_fp16_d64_window1_1_gqa4",  kFp4, kAnch,  test::window(1, 1), kHf, 64, 1, 4, 1, 300, 300},
  {"attnqat_anchored_bf16_d64_window127_right_open", kQat, kAnch, test::window(127, -1), kBf, 64, 2, 2, 2, 129, 1024},
  {"bf16_bf16_d128_window0_127",            kBf16, kPaper, test::window(0, 127), kBf, 128, 1, 2, 1, 129, 1024},
  {"attnqat_paper_bf16_d64_window0_0_nq_gt_nk", kQat, kPaper, test::window(0, 0), kBf, 64, 1, 2, 2, 300, 200},
  {"attnqat_paper_fp16_d128_window4096_causal", kQat, kPaper, test::window(4096, -1, true), kHf, 128, 1, 2, 2, 1013, 1024},
  {"attnqat_anchored_bf16_d128_window127_127_bshd", kQat, kAnch, test::window(127, 127), kBf, 128, 2, 2, 2, 700, 700, kChan,
   Layout::kBSHD},
  // Head dims between the tiles (the next wider tile, columns past d read as zeros and never
  // stored: the poisoned outputs would show an unwritten or a stray column).
  {"attnqat_paper_bf16_d96_causal",          kQat, kPaper, true,  kBf, 96,  1, 2, 2, 1013, 1024},
  {"attnqat_anchored_fp16_d80_gqa4",         kQat, kAnch,  false, kHf, 80,  1, 4, 1, 300,  333},
  {"fp4_paper_bf16_d112_nk17",               kFp4, kPaper, false, kBf, 112, 2, 2, 2, 129,  17},
  {"bf16_fp16_d96_causal_bshd",              kBf16, kPaper, true, kHf, 96,  2, 2, 1, 200,  257, kChan,
   Layout::kBSHD},
  {"attnqat_paper_bf16_d32_window127_0",     kQat, kPaper, test::window(127, 0), kBf, 32, 1, 2, 2, 700, 700},
  {"fp4_anchored_bf16_d16",                  kFp4, kAnch,  false, kBf, 16,  1, 2, 1, 129,  300},
  {"attnqat_anchored_fp16_d48_vtoken",       kQat, kAnch,  false, kHf, 48,  1, 2, 1, 300,  333, kTok},
  // Logit soft-capping (numerics 9.9): caps 30 (Gemma-2-like, mostly linear on these scores) and 5
  // (saturating), every mode and both mainloops (O': attn_qat; overlap: fp4, bf16), both
  // p_quant, causal or not, a window, d 64 / 128 / 96, bf16 and fp16.
  {"softcap30_attnqat_paper_bf16_d128",      kQat, kPaper, false, kBf, 128, 1, 2, 2, 1013, 1024, kChan, Layout::kBHSD, 30.0f},
  {"softcap5_attnqat_anchored_fp16_d64_causal_gqa4", kQat, kAnch, true, kHf, 64, 1, 4, 1, 300, 333, kChan, Layout::kBHSD, 5.0f},
  {"softcap5_fp4_paper_bf16_d128_causal",    kFp4, kPaper, true,  kBf, 128, 2, 2, 1, 129,  1024, kChan, Layout::kBHSD, 5.0f},
  {"softcap30_fp4_anchored_fp16_d64",        kFp4, kAnch,  false, kHf, 64,  1, 2, 2, 300,  1024, kChan, Layout::kBHSD, 30.0f},
  {"softcap5_bf16_fp16_d128_causal_4096",    kBf16, kPaper, true, kHf, 128, 1, 1, 1, 4096, 4096, kChan, Layout::kBHSD, 5.0f},
  {"softcap30_bf16_bf16_d64_window127_0",    kBf16, kPaper, test::window(127, 0), kBf, 64, 1, 2, 1, 700, 700, kChan, Layout::kBHSD, 30.0f},
  {"softcap5_attnqat_anchored_bf16_d96_vtoken", kQat, kAnch, false, kBf, 96, 1, 2, 1, 300, 333, kTok, Layout::kBHSD, 5.0f},
  // Attention sinks (numerics 9.10; the values: kSinkPattern, gpu_util.h): finite, dominant (12),
  // all the mass (60), -inf (no sink) per head; rows without keys (causal with Nq > Nk, a window
  // that leaves rows empty, Nk = 0: their LSE is the sink's), whole CTAs without keys.
  {"sinks_attnqat_paper_bf16_d128_causal_nq_gt_nk", kQat, kPaper, true, kBf, 128, 1, 4, 2, 1024, 700, kChan, Layout::kBHSD, 0.0f, 0},
  {"sinks_attnqat_anchored_fp16_d64_gqa4",   kQat, kAnch,  false, kHf, 64,  2, 4, 1, 300,  1024, kChan, Layout::kBHSD, 0.0f, 2},
  {"sinks_attnqat_anchored_bf16_d64_window0_0_nq_gt_nk", kQat, kAnch, test::window(0, 0), kBf, 64, 1, 8, 2, 300, 200, kChan, Layout::kBHSD, 0.0f, 0},
  {"sinks_fp4_paper_bf16_d64_gqa8",          kFp4, kPaper, false, kBf, 64,  1, 8, 1, 129,  1024, kChan, Layout::kBHSD, 0.0f, 0},
  {"sinks_fp4_anchored_fp16_d128_causal_nk17", kFp4, kAnch, true,  kHf, 128, 1, 4, 2, 300,  17, kChan, Layout::kBHSD, 0.0f, 4},
  {"sinks_bf16_bf16_d128_causal_nq_gt_nk_gqa4", kBf16, kPaper, true, kBf, 128, 1, 8, 2, 300, 129, kChan, Layout::kBHSD, 0.0f, 0},
  {"sinks_attnqat_paper_bf16_d64_nk0",       kQat, kPaper, false, kBf, 64,  1, 4, 2, 129,  0, kChan, Layout::kBHSD, 0.0f, 1},
  {"sinks_attnqat_anchored_bf16_d128_bshd",  kQat, kAnch,  false, kBf, 128, 2, 4, 2, 200,  333, kChan, Layout::kBSHD, 0.0f, 5},
  // Both.
  {"softcap5_sinks_attnqat_anchored_bf16_d128_causal", kQat, kAnch, true, kBf, 128, 1, 4, 2, 1013, 1024, kChan, Layout::kBHSD, 5.0f, 0},
  {"softcap30_sinks_fp4_paper_fp16_d64_causal_nq_gt_nk", kFp4, kPaper, true, kHf, 64, 1, 8, 2, 300, 200, kChan, Layout::kBHSD, 30.0f, 0},
  {"softcap50_sinks_bf16_bf16_d128_window128_0", kBf16, kPaper, test::window(128, 0), kBf, 128, 1, 4, 1, 1013, 1024, kChan, Layout::kBHSD, 50.0f, 2},
};
// clang-format on

class AttentionFwd : public Sm90Test, public ::testing::WithParamInterface<Case> {};

TEST_P(AttentionFwd, MatchesReference) {
  const Case& c = GetParam();
  const Inputs in = make_inputs(c, 42);
  GpuOut gpu;
  const Status st = run_gpu(c, in, options_of(c), &gpu);
  ASSERT_TRUE(st.ok()) << st.message();
  const RefOut ref64 = run_ref(c, in, Precision::kFloat64);
  const RefOut ref_lp = run_ref(c, in, Precision::kBF16Operands);
  const double floor_o = quantizes(c.mode) ? 1e-3 : 2e-4;
  check_output(c, "O", gpu.o, ref64.o, ref_lp.o, floor_o);
  if (wants_o_hp(c.mode)) check_output(c, "O'", gpu.o_hp, ref64.o_hp, ref_lp.o_hp, 2e-4);
  check_stats(c, gpu, ref64);
}

INSTANTIATE_TEST_SUITE_P(Sm90, AttentionFwd, ::testing::ValuesIn(kCases),
                         [](const ::testing::TestParamInfo<Case>& i) {
                           return std::string(i.param.name);
                         });

// ---- Analytic case --------------------------------------------------------------------------

class AttentionFwdAnalytic : public Sm90Test, public ::testing::WithParamInterface<PQuant> {};

TEST_P(AttentionFwdAnalytic, ZeroScoresGiveExactValues) {
  // Q = K = 0, V = 6: every visible key has p~ = 1; a block of ones (and masked zeros) quantizes
  // to 1.03125 (s = e4m3(1/6) = 0.171875, 1/s rounds to code 6): O = 6.1875, O' = 6 exactly,
  // LSE = ln(#visible). Causal with Nq > Nk: rows 0..49 see no key; a partial last tile.
  const Case c{"analytic", Mode::kAttnQAT, GetParam(), true, DType::kBFloat16, 128, 1, 2, 1, 200,
               150};
  Inputs in;
  in.q.assign(c.B * c.Hq * c.Nq * c.D, to_half_bits(0.0f, c.dt));
  in.k.assign(c.B * c.Hkv * c.Nk * c.D, to_half_bits(0.0f, c.dt));
  in.v.assign(c.B * c.Hkv * c.Nk * c.D, to_half_bits(6.0f, c.dt));
  GpuOut g;
  const Status st = run_gpu(c, in, options_of(c), &g);
  ASSERT_TRUE(st.ok()) << st.message();
  int64_t bad = 0;
  std::ostringstream os;
  for (int64_t row = 0; row < c.B * c.Hq * c.Nq; ++row) {
    const int64_t n = visible(row % c.Nq, c);
    const float want_o = n ? 6.1875f : 0.0f, want_hp = n ? 6.0f : 0.0f;
    const double want_lse = n ? std::log(static_cast<double>(n)) : -kInf;
    bool ok = n ? std::fabs(g.lse[row] - want_lse) <= 2e-6 : g.lse[row] == -INFINITY;
    for (int64_t d = 0; d < c.D; ++d)
      ok = ok && g.o[row * c.D + d] == want_o && g.o_hp[row * c.D + d] == want_hp;
    if (!ok && bad++ < 5)
      os << "\n  " << where(c, row) << ": O[0] " << g.o[row * c.D] << " (want " << want_o
         << "), O'[0] " << g.o_hp[row * c.D] << " (want " << want_hp << "), LSE " << g.lse[row]
         << " (want " << want_lse << ")";
  }
  EXPECT_EQ(bad, 0) << bad << " rows wrong:" << os.str();
}

INSTANTIATE_TEST_SUITE_P(Sm90, AttentionFwdAnalytic,
                         ::testing::Values(PQuant::kPaper, PQuant::kAnchored),
                         [](const ::testing::TestParamInfo<PQuant>& i) {
                           return std::string(i.param == PQuant::kPaper ? "paper" : "anchored");
                         });

// ---- Raw inputs: the kernel quantizes them itself (stream-ordered temporaries) ----------------

class AttentionFwdRawInputs : public Sm90Test {};

TEST_F(AttentionFwdRawInputs, SameAsPrequantizedAndQuantizersBitExact) {
  Case c{"raw_inputs", Mode::kAttnQAT, PQuant::kAnchored, false, DType::kBFloat16, 64, 2, 4, 2, 77,
         300,          VBlocks::kToken};
  Case raw_case = c;
  raw_case.mode = Mode::kBF16;  // make_inputs without quantization: the raw bf16 values
  const Inputs raw = make_inputs(raw_case, 7);
  const Inputs quantized = make_inputs(c, 7);

  // 1. The device quantizers (public API, CUDA views) agree bit for bit with the CPU ones.
  auto check_fq = [&](const std::vector<uint16_t>& x, const std::vector<uint16_t>& want, int64_t h,
                      int64_t n, BlockAxis axis, const char* name) {
    DeviceBuffer dx(x.size() * 2), dout(x.size() * 2), dg(4);
    dx.upload(x.data(), x.size() * 2);
    dout.poison();
    const float one = 1.0f;
    dg.upload(&one, 4);
    QuantizeOptions qo;
    qo.axis = axis;
    const Status st = fake_quantize(cuda_view(dx.get(), c.dt, {c.B, h, n, c.D}, name),
                                    cuda_view(dout.get(), c.dt, {c.B, h, n, c.D}, "out"),
                                    cuda_view(dg.get(), DType::kFloat32, {1}, "g"), qo);
    ASSERT_TRUE(st.ok()) << st.message();
    std::vector<uint16_t> got(x.size());
    dout.download(got.data(), got.size() * 2);
    int64_t bad = 0;
    for (size_t i = 0; i < got.size(); ++i) bad += got[i] != want[i];
    EXPECT_EQ(bad, 0) << name << ": GPU fake_quantize differs from the CPU's in " << bad
                      << " elements";
  };
  check_fq(raw.q, quantized.q, c.Hq, c.Nq, BlockAxis::kLast, "q");
  check_fq(raw.k, quantized.k, c.Hkv, c.Nk, BlockAxis::kLast, "k");
  check_fq(raw.v, quantized.v, c.Hkv, c.Nk, BlockAxis::kToken, "v");

  // 2. inputs_quantized = false on the raw inputs == inputs_quantized = true on Q^, K^, V^.
  GpuOut pre, self;
  Status st = run_gpu(c, quantized, options_of(c), &pre);
  ASSERT_TRUE(st.ok()) << st.message();
  AttentionOptions opts = options_of(c);
  opts.inputs_quantized = false;
  st = run_gpu(c, quantized, opts, &self, &raw);
  ASSERT_TRUE(st.ok()) << st.message();
  auto same = [](const std::vector<float>& a, const std::vector<float>& b) {
    int64_t bad = 0;
    for (size_t i = 0; i < a.size(); ++i)
      bad += !(a[i] == b[i] || (std::isnan(a[i]) && std::isnan(b[i])));
    return bad;
  };
  EXPECT_EQ(same(self.o, pre.o), 0) << "O differs between raw and pre-quantized inputs";
  EXPECT_EQ(same(self.o_hp, pre.o_hp), 0) << "O' differs";
  EXPECT_EQ(same(self.lse, pre.lse), 0) << "LSE differs";
  EXPECT_EQ(same(self.l, pre.l), 0) << "l differs";
}

// ---- Sinks and softcap: exact properties ------------------------------------------------------

// Elements whose bits differ (NaN patterns compared too).
int64_t differing_bits(const std::vector<float>& a, const std::vector<float>& b) {
  if (a.size() != b.size()) return static_cast<int64_t>(std::max(a.size(), b.size()));
  int64_t n = 0;
  for (size_t i = 0; i < a.size(); ++i) n += std::memcmp(&a[i], &b[i], sizeof(float)) != 0;
  return n;
}

class AttentionFwdSinks : public Sm90Test {};

// A sink of -inf is no sink (numerics 9.10): every output bit for bit the call's without sinks,
// in both mainloops (O': attn_qat; overlap: fp4), with a cap, rows and a CTA that see no key.
TEST_F(AttentionFwdSinks, MinusInfSinksAreNoSinks) {
  for (const Mode mode : {Mode::kAttnQAT, Mode::kFP4}) {
    const Case c{"minus_inf_sinks", mode, PQuant::kAnchored, true, DType::kBFloat16, 64, 1, 2, 1,
                 300, 129, kChan, Layout::kBHSD, 5.0f};
    const Inputs in = make_inputs(c, 11);
    GpuOut plain, with;
    Status st = run_gpu(c, in, options_of(c), &plain);
    ASSERT_TRUE(st.ok()) << st.message();
    const std::vector<float> none(c.Hq, -INFINITY);
    DeviceBuffer dz(none.size() * 4);
    dz.upload(none);
    AttentionOptions opts = options_of(c);
    opts.sinks = cuda_view(dz.get(), DType::kFloat32, {c.Hq}, "sinks");
    st = run_gpu(c, in, opts, &with);
    ASSERT_TRUE(st.ok()) << st.message();
    const char* m = mode == Mode::kFP4 ? "fp4" : "attn_qat";
    EXPECT_EQ(differing_bits(with.o, plain.o), 0) << m << ": O";
    EXPECT_EQ(differing_bits(with.o_hp, plain.o_hp), 0) << m << ": O'";
    EXPECT_EQ(differing_bits(with.lse, plain.lse), 0) << m << ": LSE";
    EXPECT_EQ(differing_bits(with.m_ref, plain.m_ref), 0) << m << ": m_ref";
    EXPECT_EQ(differing_bits(with.l, plain.l), 0) << m << ": l";
  }
}

// Attention from packed NVFP4 tensors (attention_forward_packed: Q, K, V unpacked in the kernel,
// or into temporaries) takes the cap and the sinks like the dense forward (the same consumer
// warpgroups): O and LSE bit for bit those of attention_forward on the dequantized tensors.
TEST_F(AttentionFwdSinks, PackedInputsTakeSoftcapAndSinks) {
  const int64_t B = 1, Hq = 4, Hkv = 2, Nq = 300, Nk = 333, D = 128;
  const DType dt = DType::kBFloat16;
  auto prob = test::random_problem<float>(B, Hq, Hkv, Nq, Nk, D, 21);
  const float one = 1.0f;
  DeviceBuffer g(4);
  g.upload(&one, 4);
  const TensorView gv = cuda_view(g.get(), DType::kFloat32, {1}, "g");
  struct Packed {
    DeviceBuffer x, data, scales, hat;
    PackedTensor t;
    TensorView hat_view;
  };
  auto pack = [&](const std::vector<float>& x, int64_t h, int64_t n) {
    Packed r;
    const std::vector<uint16_t> bits = to_half(x, dt);
    r.x = DeviceBuffer(bits.size() * 2);
    r.x.upload(bits);
    r.data = DeviceBuffer(B * h * n * D / 2);
    r.scales = DeviceBuffer(B * h * n * D / 16);
    r.hat = DeviceBuffer(B * h * n * D * 2);
    r.t = PackedTensor{cuda_view(r.data.get(), DType::kUInt8, {B, h, n, D / 2}, "data"),
                       cuda_view(r.scales.get(), DType::kUInt8, {B, h, n, D / 16}, "scales"), gv};
    QuantizeOptions qo;
    Status st = quantize(cuda_view(r.x.get(), dt, {B, h, n, D}, "x"), r.t.data, r.t.scales, gv, qo);
    EXPECT_TRUE(st.ok()) << st.message();
    r.hat_view = cuda_view(r.hat.get(), dt, {B, h, n, D}, "hat");
    st = dequantize(r.t.data, r.t.scales, gv, r.hat_view, qo);
    EXPECT_TRUE(st.ok()) << st.message();
    return r;
  };
  const Packed q = pack(prob.q, Hq, Nq), k = pack(prob.k, Hkv, Nk), v = pack(prob.v, Hkv, Nk);
  const std::vector<float> z = sink_values(0, Hq);
  DeviceBuffer dz(z.size() * 4);
  dz.upload(z);
  AttentionOptions opts = test::options(Mode::kFP4, PQuant::kAnchored, true);
  opts.softcap = 30.0f;
  opts.sinks = cuda_view(dz.get(), DType::kFloat32, {Hq}, "sinks");
  const int64_t rows = B * Hq * Nq;
  auto run = [&](bool packed, PackedUnpack where, std::vector<uint16_t>* o, std::vector<float>* lse) {
    DeviceBuffer ob(rows * D * 2), lb(rows * 4);
    ob.poison();
    lb.poison();
    ForwardOutputs fo;
    fo.o = cuda_view(ob.get(), dt, {B, Hq, Nq, D}, "o");
    fo.lse = cuda_view(lb.get(), DType::kFloat32, {B, Hq, Nq}, "lse");
    AttentionOptions dense = opts;
    dense.inputs_quantized = true;
    const Status st = packed ? attention_forward_packed(q.t, k.t, v.t, opts, fo, nullptr, where)
                             : attention_forward(q.hat_view, k.hat_view, v.hat_view, dense, fo);
    if (!st.ok()) return st;
    cuda_check(cudaDeviceSynchronize(), "forward");
    o->resize(rows * D);
    lse->resize(rows);
    ob.download(o->data(), o->size() * 2);
    lb.download(lse->data(), lse->size() * 4);
    return Status::Ok();
  };
  std::vector<uint16_t> o_ref, o_pk;
  std::vector<float> lse_ref, lse_pk;
  Status st = run(false, PackedUnpack::kAuto, &o_ref, &lse_ref);
  ASSERT_TRUE(st.ok()) << st.message();
  for (const PackedUnpack where : {PackedUnpack::kInKernel, PackedUnpack::kTemporary}) {
    const char* wname = where == PackedUnpack::kInKernel ? "in-kernel" : "temporary";
    st = run(true, where, &o_pk, &lse_pk);
    ASSERT_TRUE(st.ok()) << wname << ": " << st.message();
    int64_t o_diff = 0;
    for (size_t i = 0; i < o_ref.size(); ++i) o_diff += o_pk[i] != o_ref[i];
    EXPECT_EQ(o_diff, 0) << wname << ": O elements that differ from the forward on the decoded tensors";
    EXPECT_EQ(differing_bits(lse_pk, lse_ref), 0) << wname << ": LSE rows that differ";
  }
}

// ---- Errors
// --------------------------------------------------------------------------------------

class AttentionFwdErrors : public Sm90Test {};

TEST_F(AttentionFwdErrors, ClearStatusForWhatTheKernelCannotDo) {
  DeviceBuffer buf(1 << 20);
  auto run = [&](DType dt, int64_t d, AttentionOptions opts, int64_t q_offset_elems) {
    char* base = static_cast<char*>(buf.get());
    ForwardOutputs fo;
    fo.o = cuda_view(base + (1 << 19), dt, {1, 1, 16, d}, "o");
    fo.lse = cuda_view(base + (3 << 18), DType::kFloat32, {1, 1, 16}, "lse");
    return attention_forward(
        cuda_view(base + q_offset_elems * dtype_size(dt), dt, {1, 1, 16, d}, "q"),
        cuda_view(base + (1 << 17), dt, {1, 1, 16, d}, "k"),
        cuda_view(base + (1 << 18), dt, {1, 1, 16, d}, "v"), opts, fo);
  };
  AttentionOptions opts = test::options(Mode::kFP4, PQuant::kPaper, false);
  opts.kv_tile = 64;
  Status st = run(DType::kBFloat16, 64, opts, 0);
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument) << st.message();
  EXPECT_NE(st.message().find("kv_tile: p_quant='paper' depends on the key tile, and the CUDA kernels"), std::string::npos)
      << st.message();

  opts.kv_tile = 128;
  st = run(DType::kBFloat16, 256, opts, 0);
  EXPECT_EQ(st.code(), StatusCode::kNotImplemented) << st.message();
  EXPECT_NE(st.message().find("head dims 16, 32, ..., 128 (multiples of 16 up to 128), got 256"),
            std::string::npos)
      << st.message();

  st = run(DType::kFloat32, 64, opts, 0);
  EXPECT_EQ(st.code(), StatusCode::kNotImplemented) << st.message();

  opts.inputs_quantized = true;
  st = run(DType::kBFloat16, 64, opts, 1);  // q starts 2 bytes past a 16-byte boundary
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument) << st.message();
  EXPECT_NE(st.message().find("16-byte"), std::string::npos) << st.message();
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
}

}  // namespace
}  // namespace attnqat::gpu_test
