// Logit soft-capping and attention sinks in the CPU reference (docs/numerics.md 9.9, 9.10): a
// dense fp64 softmax with the cap and the sink written out here, naive versions (one key tile, no
// online softmax) of the quantized forward and of the backward under every switch setting,
// finite differences (dsinks included), the edge cases (a -inf sink is no sink, a huge sink
// empties O, a huge cap is no cap, rows without keys) and the validation.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "attention_util.h"
#include "attnqat/attnqat.h"
#include "attnqat/formats.h"
#include "common/mask.h"
#include "common/validate.h"

namespace attnqat {
namespace {

using test::forward;
using test::fq_row;
using test::Fwd;
using test::options;
using test::Problem;
using test::quantize_p;
using test::random_problem;
using test::rel_err;
using ::testing::HasSubstr;

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kLog2eD = 1.4426950408889634074;
constexpr float kLog2eF = 1.44269504088896340736f;
constexpr double kLn2D = 0.69314718055994530942;

// The options with a softcap and the sinks of `sinks` (none when null).
AttentionOptions with_extras(AttentionOptions o, float softcap, std::vector<float>* sinks) {
  o.softcap = softcap;
  if (sinks != nullptr)
    o.sinks = make_view(sinks->data(), DType::kFloat32, {static_cast<int64_t>(sinks->size())}, "sinks");
  return o;
}

// The keys [begin, end) of row i under the options' mask (the library's mask policy, tested in
// test_mask.cpp; what is under test here is the softmax).
IndexRange row_keys(const AttentionOptions& o, int64_t i, int64_t nq, int64_t nk) {
  return visible_keys(attention_mask_kind(o), static_cast<int>(i), attention_seq(o, nq, nk));
}

template <typename T>
std::vector<T> random_vector(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> n01;
  std::vector<T> x(n);
  for (auto& e : x) e = static_cast<T>(n01(rng));
  return x;
}

// The backward through the public API with the sinks' gradient (attention_util.h's backward()
// leaves dsinks undefined).
template <typename T>
struct GradsS {
  std::vector<T> dq, dk, dv;
  std::vector<float> dsinks;
};

template <typename T>
GradsS<T> backward_s(Problem<T>& p, Fwd<T>& f, std::vector<T>& dout, const AttentionOptions& opts) {
  GradsS<T> g;
  g.dq.assign(p.q.size(), T(NAN));
  g.dk.assign(p.k.size(), T(NAN));
  g.dv.assign(p.v.size(), T(NAN));
  g.dsinks.assign(p.Hq, NAN);
  const DType dt = test::dtype_of<T>();
  ForwardState s;
  s.o = make_view(f.o.data(), dt, {p.B, p.Hq, p.Nq, p.D}, "o");
  if (!f.o_hp.empty()) s.o_hp = make_view(f.o_hp.data(), dt, {p.B, p.Hq, p.Nq, p.D}, "o_hp");
  s.lse = make_view(f.lse.data(), DType::kFloat32, {p.B, p.Hq, p.Nq}, "lse");
  s.m_ref = make_view(f.m_ref.data(), DType::kFloat32, {p.B, p.Hq, p.Nq}, "m_ref");
  s.l = make_view(f.l.data(), DType::kFloat32, {p.B, p.Hq, p.Nq}, "l");
  BackwardOutputs out;
  out.dq = make_view(g.dq.data(), dt, {p.B, p.Hq, p.Nq, p.D}, "dq");
  out.dk = make_view(g.dk.data(), dt, {p.B, p.Hkv, p.Nk, p.D}, "dk");
  out.dv = make_view(g.dv.data(), dt, {p.B, p.Hkv, p.Nk, p.D}, "dv");
  if (has_sinks(opts)) out.dsinks = make_view(g.dsinks.data(), DType::kFloat32, {p.Hq}, "dsinks");
  const Status st = attention_backward(make_view(dout.data(), dt, {p.B, p.Hq, p.Nq, p.D}, "dout"),
                                       make_view(p.q.data(), dt, {p.B, p.Hq, p.Nq, p.D}, "q"),
                                       make_view(p.k.data(), dt, {p.B, p.Hkv, p.Nk, p.D}, "k"),
                                       make_view(p.v.data(), dt, {p.B, p.Hkv, p.Nk, p.D}, "v"), s, opts, out);
  EXPECT_TRUE(st.ok()) << st.message();
  return g;
}

// ---- bf16 mode: the softmax over the capped scores and the sink, dense in fp64 ------------------

struct Dense {
  std::vector<double> o, lse, dq, dk, dv, dsinks;
};

// softmax([cap tanh(s_j / cap) for visible j] ++ [z_h]) with s = c q.k; the sink's column has no
// value. Gradients of sum(dout * O) by the chain rule written out (D = dout . O).
Dense dense_fp64(const Problem<double>& p, const AttentionOptions& o, const std::vector<float>& sinks,
                 const std::vector<double>& dout) {
  const int64_t D = p.D, grp = p.Hq / p.Hkv;
  const double c = static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)));
  const double cap = o.softcap;
  Dense r;
  r.o.assign(p.q.size(), 0);
  r.lse.assign(p.B * p.Hq * p.Nq, -kInf);
  r.dq.assign(p.q.size(), 0);
  r.dk.assign(p.k.size(), 0);
  r.dv.assign(p.v.size(), 0);
  r.dsinks.assign(p.Hq, 0);
  for (int64_t b = 0; b < p.B; ++b)
    for (int64_t h = 0; h < p.Hq; ++h)
      for (int64_t i = 0; i < p.Nq; ++i) {
        const int64_t row = (b * p.Hq + h) * p.Nq + i, hk = h / grp;
        const IndexRange rk = row_keys(o, i, p.Nq, p.Nk);
        const double z = sinks.empty() ? -kInf : sinks[h];
        if (rk.empty() && z == -kInf) continue;  // no key, no sink: O = 0, LSE = -inf
        const int64_t n = rk.empty() ? 0 : rk.end - rk.begin;
        std::vector<double> s(n), slope(n, 1.0);
        double m = z;
        for (int64_t j = 0; j < n; ++j) {
          const int64_t kr = ((b * p.Hkv + hk) * p.Nk + rk.begin + j) * D;
          double dot = 0;
          for (int64_t d = 0; d < D; ++d) dot += p.q[row * D + d] * p.k[kr + d];
          s[j] = c * dot;
          if (cap > 0) {
            const double t = std::tanh(s[j] / cap);
            s[j] = cap * t;
            slope[j] = 1 - t * t;
          }
          m = std::max(m, s[j]);
        }
        double sum = z == -kInf ? 0.0 : std::exp(z - m);
        for (double x : s) sum += std::exp(x - m);
        r.lse[row] = m + std::log(sum);
        if (n == 0) continue;  // a sink but no key: O = 0 and no gradient
        std::vector<double> P(n);
        for (int64_t j = 0; j < n; ++j) P[j] = std::exp(s[j] - r.lse[row]);
        for (int64_t j = 0; j < n; ++j)
          for (int64_t d = 0; d < D; ++d)
            r.o[row * D + d] += P[j] * p.v[((b * p.Hkv + hk) * p.Nk + rk.begin + j) * D + d];
        double delta = 0;
        for (int64_t d = 0; d < D; ++d) delta += dout[row * D + d] * r.o[row * D + d];
        for (int64_t j = 0; j < n; ++j) {
          const int64_t kr = ((b * p.Hkv + hk) * p.Nk + rk.begin + j) * D;
          double dp = 0;
          for (int64_t d = 0; d < D; ++d) dp += dout[row * D + d] * p.v[kr + d];
          const double ds = P[j] * (dp - delta) * slope[j];
          for (int64_t d = 0; d < D; ++d) {
            r.dq[row * D + d] += c * ds * p.k[kr + d];
            r.dk[kr + d] += c * ds * p.q[row * D + d];
            r.dv[kr + d] += P[j] * dout[row * D + d];
          }
        }
        if (z != -kInf) r.dsinks[h] -= std::exp(z - r.lse[row]) * delta;
      }
  return r;
}

TEST(SoftcapSinksBf16, MatchesDenseFp64SoftmaxAndItsGradients) {
  // fp64 inputs run the fp64 reference: only the order of sums and the fp32 LSE the backward
  // normalizes with differ from the dense formula, ~1e-7 relative on the gradients.
  Problem<double> p = random_problem<double>(2, 4, 2, 13, 37, 32, 31, 2.0);
  std::vector<float> sinks = {2.5f, -1.0f, 4.0f, -std::numeric_limits<float>::infinity()};
  const auto dout = random_vector<double>(p.q.size(), 32);
  struct Case {
    bool causal;
    int left, right;
    float cap;
    bool use_sinks;
  };
  for (const Case& cs : {Case{false, -1, -1, 1.5f, true}, Case{true, -1, -1, 1.5f, true}, Case{false, -1, -1, 0.7f, false},
                         Case{true, -1, -1, 0.0f, true}, Case{false, 3, 2, 2.0f, true}}) {
    auto opts = options(Mode::kBF16, PQuant::kPaper, cs.causal);
    opts.window_left = cs.left;
    opts.window_right = cs.right;
    opts = with_extras(opts, cs.cap, cs.use_sinks ? &sinks : nullptr);
    auto f = forward(p, opts);
    std::vector<double> d = dout;
    auto g = backward_s(p, f, d, opts);
    const Dense ref = dense_fp64(p, opts, cs.use_sinks ? sinks : std::vector<float>{}, dout);
    EXPECT_LT(rel_err(f.o, ref.o), 1e-12);
    EXPECT_LT(rel_err(f.lse, ref.lse), 1e-7);
    EXPECT_LT(rel_err(g.dq, ref.dq), 1e-6);
    EXPECT_LT(rel_err(g.dk, ref.dk), 1e-6);
    EXPECT_LT(rel_err(g.dv, ref.dv), 1e-6);
    if (cs.use_sinks) {
      EXPECT_LT(rel_err(g.dsinks, ref.dsinks), 1e-6);
      EXPECT_EQ(g.dsinks[3], 0.0f);  // the -inf sink
    }
    // The cap and the sinks change the result: the formula without them is far away (> 1e10
    // times the tolerance above).
    AttentionOptions plain_opts = opts;
    plain_opts.softcap = 0;
    plain_opts.sinks = {};
    EXPECT_GT(rel_err(f.o, dense_fp64(p, plain_opts, {}, dout).o), 0.01);
  }
}

TEST(SoftcapSinksBf16, GradientsMatchFiniteDifferences) {
  // Central differences of sum(w * O) in fp64: h = 1e-6 for Q, K, V (~1e-9 accurate); the sinks
  // are fp32, so they move by h = 2^-10, exact in fp32, with an O(h^2) error of ~1e-7. The
  // analytic gradients normalize with the fp32 LSE (~1e-7): 1e-5 separates a wrong formula.
  for (bool causal : {false, true}) {
    Problem<double> p = random_problem<double>(1, 2, 1, 6, 9, 16, 33, 2.0);
    std::vector<float> sinks = {1.25f, -0.5f};
    const auto opts = with_extras(options(Mode::kBF16, PQuant::kPaper, causal), 1.25f, &sinks);
    const auto w = random_vector<double>(p.q.size(), 34);
    auto f = forward(p, opts);
    std::vector<double> wd = w;
    auto g = backward_s(p, f, wd, opts);
    auto loss = [&]() {
      auto ff = forward(p, opts);
      double s = 0;
      for (size_t i = 0; i < w.size(); ++i) s += w[i] * ff.o[i];
      return s;
    };
    const double h = 1e-6;
    for (auto [x, grad] : {std::pair{&p.q, &g.dq}, std::pair{&p.k, &g.dk}, std::pair{&p.v, &g.dv}}) {
      std::vector<double> num(x->size());
      for (size_t i = 0; i < x->size(); ++i) {
        const double x0 = (*x)[i];
        (*x)[i] = x0 + h;
        const double lp = loss();
        (*x)[i] = x0 - h;
        const double lm = loss();
        (*x)[i] = x0;
        num[i] = (lp - lm) / (2 * h);
      }
      EXPECT_LT(rel_err(*grad, num), 1e-5) << (causal ? "causal" : "full");
    }
    const float hs = 1.0f / 1024;
    std::vector<double> num(sinks.size());
    for (size_t i = 0; i < sinks.size(); ++i) {
      const float z0 = sinks[i];
      sinks[i] = z0 + hs;
      const double lp = loss();
      sinks[i] = z0 - hs;
      const double lm = loss();
      sinks[i] = z0;
      num[i] = (lp - lm) / (2 * static_cast<double>(hs));
    }
    EXPECT_LT(rel_err(g.dsinks, num), 1e-5) << (causal ? "causal" : "full");
  }
}

// ---- Quantized modes: numerics sections 4-6 with 9.9 and 9.10, written naively -----------------

struct NaiveFwd {
  std::vector<double> o, o_hp, lse;
};

// One key tile covering each row, in the reference's fp32 operations up to P's quantization
// (S in order over d, S2 = b tanh(a S) or c2 S, z2 = z RN(log2 e), m = max(z2, S2),
// p~ = exp2f(S2 - m_ref)), so the quantized P is the reference's bit for bit; the sums in fp64.
NaiveFwd naive_forward(const Problem<float>& p, const AttentionOptions& o, const std::vector<float>& sinks) {
  const int64_t D = p.D, grp = p.Hq / p.Hkv, rows = p.B * p.Hq * p.Nq;
  const bool anchored = o.p_quant == PQuant::kAnchored;
  const float c = static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)));
  const float c2 = c * kLog2eF, a = o.softcap > 0 ? c / o.softcap : 0.0f, bcap = o.softcap * kLog2eF;
  NaiveFwd r;
  r.o.assign(rows * D, 0);
  r.o_hp.assign(rows * D, 0);
  r.lse.assign(rows, -kInf);
  for (int64_t b = 0; b < p.B; ++b)
    for (int64_t h = 0; h < p.Hq; ++h)
      for (int64_t i = 0; i < p.Nq; ++i) {
        const int64_t row = (b * p.Hq + h) * p.Nq + i, hk = h / grp;
        const int64_t n = row_keys(o, i, p.Nq, p.Nk).end;  // no mask or causal: keys [0, n)
        const float z2 = sinks.empty() ? -INFINITY : sinks[h] * kLog2eF;
        if (n == 0 && z2 == -INFINITY) continue;
        const auto q = fq_row(&p.q[row * D], D, true);
        std::vector<float> s2(n);
        float m = z2;
        for (int64_t j = 0; j < n; ++j) {
          const auto k = fq_row(&p.k[((b * p.Hkv + hk) * p.Nk + j) * D], D, true);
          float dot = 0.0f;
          for (int64_t d = 0; d < D; ++d) dot += static_cast<float>(q[d]) * static_cast<float>(k[d]);
          s2[j] = o.softcap > 0 ? bcap * std::tanh(a * dot) : c2 * dot;
          m = std::max(m, s2[j]);
        }
        const float m_ref = anchored ? std::ceil(m) : m;
        std::vector<double> pt(n);
        double l = z2 == -INFINITY ? 0.0 : std::exp2(z2 - m_ref);
        for (int64_t j = 0; j < n; ++j) l += (pt[j] = std::exp2(s2[j] - m_ref));
        const auto ph = quantize_p(pt, anchored ? kAnchoredPScale : 1.0f);
        for (int64_t j = 0; j < n; ++j) {
          const auto v = fq_row(&p.v[((b * p.Hkv + hk) * p.Nk + j) * D], D, true);
          for (int64_t d = 0; d < D; ++d) {
            r.o[row * D + d] += ph[j] * v[d] / l;
            r.o_hp[row * D + d] += pt[j] * v[d] / l;
          }
        }
        r.lse[row] = kLn2D * (m_ref + std::log2(l));
      }
  return r;
}

TEST(SoftcapSinksFp4, ForwardMatchesNaiveSections4And9) {
  // Sinks 6 and 8 dominate most rows (their probability is most of the mass, and in "paper" they
  // set the max m that P is quantized against); 0.5 is below the scores; -inf is none.
  Problem<float> p = random_problem<float>(2, 4, 2, 33, 71, 32, 35, 2.0);
  std::vector<float> sinks = {6.0f, 0.5f, 8.0f, -std::numeric_limits<float>::infinity()};
  for (PQuant pq : {PQuant::kPaper, PQuant::kAnchored}) {
    for (bool causal : {false, true}) {
      for (float cap : {0.0f, 1.5f}) {
        auto base = options(Mode::kAttnQAT, pq, causal);
        base.kv_tile = 80;  // one tile per row: the naive version has no tiles
        const auto opts = with_extras(base, cap, &sinks);
        auto f = forward(p, opts);
        const NaiveFwd ref = naive_forward(p, opts, sinks);
        // The same quantized P bit for bit; fp32 against fp64 sums: 1e-5.
        EXPECT_LT(rel_err(f.o, ref.o), 1e-5) << "cap " << cap;
        EXPECT_LT(rel_err(f.o_hp, ref.o_hp), 1e-5) << "cap " << cap;
        EXPECT_LT(rel_err(f.lse, ref.lse), 1e-6) << "cap " << cap;
        // The sinks and the cap are applied: without them O moves by far more than rounding.
        auto f0 = forward(p, base);
        EXPECT_GT(rel_err(f.o, f0.o), 0.05) << "cap " << cap;
        if (cap > 0) {
          auto f_nocap = forward(p, with_extras(base, 0.0f, &sinks));
          EXPECT_GT(rel_err(f.o, f_nocap.o), 0.05);
        }
        // fp4 and drop_in_qat share this forward.
        auto f4 = forward(p, with_extras([&] { auto o = base; o.mode = Mode::kFP4; return o; }(), cap, &sinks), false);
        EXPECT_EQ(f4.o, f.o);
      }
    }
  }
}

TEST(SoftcapSinksFp4, AnchoredStaysIndependentOfTheKeyTile) {
  // The sink is the initial state of the online softmax: with the anchored P every rescale stays a
  // power of two, so O does not depend on the key tile (up to fp32 rounding, numerics section 4).
  Problem<float> p = random_problem<float>(1, 2, 2, 200, 300, 64, 36, 2.0);
  std::vector<float> sinks = {4.0f, 9.0f};
  auto with_tile = [&](int tile) {
    auto o = with_extras(options(Mode::kAttnQAT, PQuant::kAnchored), 2.0f, &sinks);
    o.kv_tile = tile;
    return o;
  };
  auto base = forward(p, with_tile(512));
  for (int tile : {16, 48, 128}) EXPECT_LT(rel_err(forward(p, with_tile(tile)).o, base.o), 1e-4) << tile;
}

struct NaiveGrads {
  std::vector<double> dq, dk, dv, dsinks;
};

// Sections 5-6 and 9.4 with the cap's slope and the sink (9.9, 9.10), dense, fp64, from the
// forward's outputs; P_F from float(P) as the fp64 reference quantizes it.
NaiveGrads naive_backward(const Problem<double>& p, const Fwd<double>& f, const std::vector<double>& dout,
                          const AttentionOptions& o, const std::vector<float>& sinks) {
  const BackwardSwitches sw = o.bwd;
  const bool anchored = o.p_quant == PQuant::kAnchored;
  const int64_t D = p.D, grp = p.Hq / p.Hkv;
  const double c = static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)));
  const double cap = o.softcap, a = cap > 0 ? c / cap : 0, bcap = cap * kLog2eD, c2 = c * kLog2eD;
  NaiveGrads g;
  g.dq.assign(p.q.size(), 0);
  g.dk.assign(p.k.size(), 0);
  g.dv.assign(p.v.size(), 0);
  g.dsinks.assign(p.Hq, 0);
  for (int64_t b = 0; b < p.B; ++b)
    for (int64_t h = 0; h < p.Hq; ++h)
      for (int64_t i = 0; i < p.Nq; ++i) {
        const int64_t row = (b * p.Hq + h) * p.Nq + i, hk = h / grp;
        const int64_t n = row_keys(o, i, p.Nq, p.Nk).end;
        if (n == 0) continue;  // O = 0 whatever the sink: no gradient
        const double z2 = sinks.empty() ? -kInf : static_cast<double>(sinks[h]) * kLog2eD;
        const auto q = fq_row(&p.q[row * D], D, sw.quantized_qkv);
        std::vector<std::vector<double>> k(n), v(n);
        std::vector<double> s2(n), slope(n, 1.0);
        for (int64_t j = 0; j < n; ++j) {
          const int64_t kr = ((b * p.Hkv + hk) * p.Nk + j) * D;
          k[j] = fq_row(&p.k[kr], D, sw.quantized_qkv);
          v[j] = fq_row(&p.v[kr], D, sw.quantized_qkv);
          double dot = 0;
          for (int64_t d = 0; d < D; ++d) dot += q[d] * k[j][d];
          if (cap > 0) {
            const double t = std::tanh(a * dot);
            s2[j] = bcap * t;
            slope[j] = 1 - t * t;
          } else {
            s2[j] = c2 * dot;
          }
        }
        double lse2, m_ref, l;
        if (sw.quantized_qkv) {  // the forward's statistics
          lse2 = static_cast<double>(f.lse[row]) / kLn2D;
          m_ref = f.m_ref[row];
          l = f.l[row];
        } else {  // recomputed from these scores, the sink included
          double m = z2;
          for (double x : s2) m = std::max(m, x);
          m_ref = anchored ? std::ceil(m) : m;
          l = z2 == -kInf ? 0.0 : std::exp2(z2 - m_ref);
          for (double x : s2) l += std::exp2(x - m_ref);
          lse2 = m_ref + std::log2(l);
        }
        std::vector<double> P(n), pf;
        for (int64_t j = 0; j < n; ++j) P[j] = std::exp2(s2[j] - lse2);
        if (sw.quant_p && !anchored) {
          pf = quantize_p(P, 1.0f);
        } else if (sw.quant_p) {
          std::vector<double> pt(n);
          for (int64_t j = 0; j < n; ++j) pt[j] = std::exp2(s2[j] - m_ref);
          pf = quantize_p(pt, kAnchoredPScale);
          for (auto& x : pf) x /= l;
        } else {
          pf = P;
        }
        const double* o_src = (sw.high_precision_o ? f.o_hp : f.o).data() + row * D;
        const double* dor = &dout[row * D];
        double delta = 0;
        for (int64_t d = 0; d < D; ++d) delta += dor[d] * o_src[d];
        for (int64_t j = 0; j < n; ++j) {
          double dp = 0;
          for (int64_t d = 0; d < D; ++d) dp += dor[d] * v[j][d];
          const double ds = P[j] * (dp - delta) * slope[j];
          const int64_t kr = ((b * p.Hkv + hk) * p.Nk + j) * D;
          for (int64_t d = 0; d < D; ++d) {
            g.dv[kr + d] += pf[j] * dor[d];
            g.dq[row * D + d] += c * ds * k[j][d];
            g.dk[kr + d] += c * ds * q[d];
          }
        }
        if (z2 != -kInf) g.dsinks[h] -= std::exp2(z2 - lse2) * delta;
      }
  return g;
}

TEST(SoftcapSinksBackward, EverySwitchSettingFollowsSection5) {
  // All 8 switch settings, both P quantizations, causal with Nq < Nk and not, GQA 2, a cap and
  // sinks (one of them -inf). Same P_F bits as the reference: only the order of fp64 sums differs.
  Problem<double> p = random_problem<double>(1, 4, 2, 21, 40, 32, 37, 2.0);
  std::vector<float> sinks = {3.0f, -0.75f, 5.5f, -std::numeric_limits<float>::infinity()};
  const auto dout = random_vector<double>(p.q.size(), 38);
  for (PQuant pq : {PQuant::kPaper, PQuant::kAnchored}) {
    for (bool causal : {false, true}) {
      const auto fopts = with_extras(options(Mode::kAttnQAT, pq, causal), 1.5f, &sinks);
      auto f = forward(p, fopts);
      for (int bits = 0; bits < 8; ++bits) {
        auto opts = fopts;
        opts.bwd = BackwardSwitches{(bits & 1) != 0, (bits & 2) != 0, (bits & 4) != 0};
        opts.mode = bits == 0 ? Mode::kDropInQAT : Mode::kAttnQAT;
        std::vector<double> d = dout;
        auto g = backward_s(p, f, d, opts);
        const NaiveGrads n = naive_backward(p, f, dout, opts, sinks);
        EXPECT_LT(rel_err(g.dq, n.dq), 1e-9) << "switches " << bits;
        EXPECT_LT(rel_err(g.dk, n.dk), 1e-9) << "switches " << bits;
        EXPECT_LT(rel_err(g.dv, n.dv), 1e-9) << "switches " << bits;
        // dsinks is stored in fp32.
        EXPECT_LT(rel_err(g.dsinks, n.dsinks), 1e-6) << "switches " << bits;
        EXPECT_EQ(g.dsinks[3], 0.0f);
        // The cap's slope and the sinks are in the gradient: without them it is far away.
        const NaiveGrads plain = naive_backward(p, f, dout, with_extras([&] {
          auto o = opts;
          o.softcap = 0;
          return o;
        }(), 0.0f, nullptr), {});
        EXPECT_GT(rel_err(g.dq, plain.dq), 1e-2) << "switches " << bits;
      }
    }
  }
}

// ---- Edge cases ---------------------------------------------------------------------------------

TEST(SoftcapSinksEdges, MinusInfSinkIsNoSinkBitForBit) {
  Problem<float> p = random_problem<float>(1, 2, 1, 20, 45, 32, 39);
  std::vector<float> none(2, -std::numeric_limits<float>::infinity());
  std::vector<float> dout = random_vector<float>(p.q.size(), 40);
  for (Mode mode : {Mode::kBF16, Mode::kDropInQAT, Mode::kAttnQAT}) {
    for (PQuant pq : {PQuant::kPaper, PQuant::kAnchored}) {
      const auto base = with_extras(options(mode, pq, true), 2.0f, nullptr);
      const auto with = with_extras(base, 2.0f, &none);
      auto f0 = forward(p, base), f1 = forward(p, with);
      EXPECT_EQ(f0.o, f1.o);
      EXPECT_EQ(f0.lse, f1.lse);
      auto g0 = backward_s(p, f0, dout, base), g1 = backward_s(p, f1, dout, with);
      EXPECT_EQ(g0.dq, g1.dq);
      EXPECT_EQ(g0.dk, g1.dk);
      EXPECT_EQ(g0.dv, g1.dv);
      for (float x : g1.dsinks) EXPECT_EQ(x, 0.0f);
    }
  }
}

TEST(SoftcapSinksEdges, AHugeSinkTakesAllTheMass) {
  // z = 200 against scores of a few units: O ~ exp(-190) (0 in fp32), LSE = z.
  Problem<float> p = random_problem<float>(1, 1, 1, 16, 32, 16, 41);
  std::vector<float> sinks = {200.0f};
  for (Mode mode : {Mode::kBF16, Mode::kAttnQAT}) {
    for (PQuant pq : {PQuant::kPaper, PQuant::kAnchored}) {
      auto f = forward(p, with_extras(options(mode, pq), 0.0f, &sinks));
      for (float x : f.o) EXPECT_LT(std::abs(x), 1e-30f);
      for (float x : f.o_hp) EXPECT_LT(std::abs(x), 1e-30f);
      for (float x : f.lse) EXPECT_NEAR(x, 200.0f, 1e-4f);
    }
  }
}

TEST(SoftcapSinksEdges, AHugeCapIsNoCap) {
  // cap tanh(s / cap) = s (1 - (s / cap)^2 / 3 + ...): with cap = 1e4 the difference is a few
  // fp32 roundings of the constants a and b (~1e-7 relative).
  Problem<float> p = random_problem<float>(1, 2, 2, 24, 40, 32, 42);
  auto f0 = forward(p, options(Mode::kBF16));
  auto f1 = forward(p, with_extras(options(Mode::kBF16), 1e4f, nullptr));
  EXPECT_LT(rel_err(f1.o, f0.o), 1e-5);
  EXPECT_LT(rel_err(f1.lse, f0.lse), 1e-6);
}

TEST(SoftcapSinksEdges, RowsWithoutKeysGiveZeroAndTheSinksLse) {
  // Causal with Nq = 20 > Nk = 8: rows 0-11 see no key. With a sink they have O = 0,
  // LSE = ln2 * RN(z * RN(log2 e)) = z up to rounding, zero dQ and no share of dsinks; Nk = 0
  // likewise for every row.
  Problem<float> p = random_problem<float>(1, 2, 1, 20, 8, 16, 43);
  std::vector<float> sinks = {1.5f, -2.0f};
  std::vector<float> dout = random_vector<float>(p.q.size(), 44);
  for (Mode mode : {Mode::kBF16, Mode::kAttnQAT}) {
    const auto opts = with_extras(options(mode, PQuant::kAnchored, true), 3.0f, &sinks);
    auto f = forward(p, opts);
    auto g = backward_s(p, f, dout, opts);
    for (int64_t h = 0; h < 2; ++h)
      for (int64_t i = 0; i < 12; ++i) {
        const int64_t r = h * 20 + i;
        EXPECT_NEAR(f.lse[r], sinks[h], 2e-6);
        for (int64_t d = 0; d < 16; ++d) {
          EXPECT_EQ(f.o[r * 16 + d], 0.0f);
          EXPECT_EQ(g.dq[r * 16 + d], 0.0f);
        }
      }
    // dsinks from the rows with keys only: dout of the empty rows does not matter.
    std::vector<float> dout2 = dout;
    for (size_t x = 0; x < 2 * 20 * 16; ++x)
      if ((x / 16) % 20 < 12) dout2[x] = NAN;
    auto g2 = backward_s(p, f, dout2, opts);
    EXPECT_EQ(g2.dsinks, g.dsinks);
  }
  Problem<float> e = random_problem<float>(1, 2, 1, 4, 0, 16, 45);
  const auto opts = with_extras(options(Mode::kAttnQAT), 0.0f, &sinks);
  auto f = forward(e, opts);
  for (float x : f.o) EXPECT_EQ(x, 0.0f);
  for (int64_t r = 0; r < 8; ++r) EXPECT_NEAR(f.lse[r], sinks[r / 4], 2e-6);
  std::vector<float> de(e.q.size(), 1.0f);
  auto g = backward_s(e, f, de, opts);
  for (float x : g.dsinks) EXPECT_EQ(x, 0.0f);
}

// ---- Validation ---------------------------------------------------------------------------------

class SoftcapSinksArgs : public ::testing::Test {
 protected:
  void SetUp() override {
    p = random_problem<float>(1, 4, 2, 8, 8, 32, 46);
    sinks.assign(4, 0.5f);
    o.assign(p.q.size(), 0);
    lse.assign(32, 0);
    out.o = make_view(o.data(), DType::kFloat32, {1, 4, 8, 32}, "o");
    out.lse = make_view(lse.data(), DType::kFloat32, {1, 4, 8}, "lse");
  }
  Status fwd(const AttentionOptions& opts) {
    return attention_forward(make_view(p.q.data(), DType::kFloat32, {1, 4, 8, 32}, "q"),
                             make_view(p.k.data(), DType::kFloat32, {1, 2, 8, 32}, "k"),
                             make_view(p.v.data(), DType::kFloat32, {1, 2, 8, 32}, "v"), opts, out);
  }
  std::string error(const AttentionOptions& opts) {
    const Status st = fwd(opts);
    EXPECT_FALSE(st.ok());
    return st.message();
  }
  Problem<float> p;
  std::vector<float> sinks, o, lse;
  ForwardOutputs out;
};

TEST_F(SoftcapSinksArgs, Softcap) {
  AttentionOptions opts;
  for (float bad : {-1.0f, NAN, INFINITY}) {
    opts.softcap = bad;
    EXPECT_THAT(error(opts), HasSubstr("softcap: expected 0 (off) or a positive finite number, got"));
    EXPECT_FALSE(validate_attention_options(opts).ok());
  }
  opts.softcap = 1e-40f;  // c / softcap overflows
  EXPECT_THAT(error(opts), HasSubstr("softcap: softmax_scale / softcap and softcap * log2(e) must be normal"));
  opts.softcap = 30.0f;
  EXPECT_TRUE(fwd(opts).ok());
}

TEST_F(SoftcapSinksArgs, Sinks) {
  AttentionOptions opts = with_extras({}, 0.0f, &sinks);
  EXPECT_TRUE(fwd(opts).ok());
  sinks[2] = NAN;
  EXPECT_THAT(error(opts), HasSubstr("sinks: expected finite logits (or -inf: no sink for that head), got nan at index 2"));
  sinks[2] = INFINITY;
  EXPECT_THAT(error(opts), HasSubstr("got inf at index 2"));
  sinks[2] = -INFINITY;
  EXPECT_TRUE(fwd(opts).ok());
  opts.sinks = make_view(sinks.data(), DType::kFloat32, {2, 2}, "sinks");
  EXPECT_THAT(error(opts), HasSubstr("sinks: expected one logit per query head, shape [4], got [2, 2]"));
  opts.sinks = make_view(sinks.data(), DType::kFloat32, {3}, "sinks");
  EXPECT_THAT(error(opts), HasSubstr("shape [4], got [3]"));
  opts.sinks = make_view(sinks.data(), DType::kFloat16, {4}, "sinks");
  EXPECT_THAT(error(opts), HasSubstr("sinks: expected dtype float32, got float16"));
  opts.sinks = make_view(sinks.data(), DType::kFloat32, {4}, "sinks", Device::kCUDA);
  EXPECT_THAT(error(opts), HasSubstr("sinks: expected a tensor on cpu (the device of q), got one on cuda:0"));
}

TEST_F(SoftcapSinksArgs, Dsinks) {
  Fwd<float> f = forward(p, options(Mode::kAttnQAT));
  std::vector<float> dout(p.q.size(), 1.0f), dq(p.q.size()), dk(p.k.size()), dv(p.v.size()), ds(4);
  ForwardState s;
  s.o = make_view(f.o.data(), DType::kFloat32, {1, 4, 8, 32}, "o");
  s.o_hp = make_view(f.o_hp.data(), DType::kFloat32, {1, 4, 8, 32}, "o_hp");
  s.lse = make_view(f.lse.data(), DType::kFloat32, {1, 4, 8}, "lse");
  BackwardOutputs g;
  g.dq = make_view(dq.data(), DType::kFloat32, {1, 4, 8, 32}, "dq");
  g.dk = make_view(dk.data(), DType::kFloat32, {1, 2, 8, 32}, "dk");
  g.dv = make_view(dv.data(), DType::kFloat32, {1, 2, 8, 32}, "dv");
  g.dsinks = make_view(ds.data(), DType::kFloat32, {4}, "dsinks");
  auto run = [&](const AttentionOptions& opts) {
    return attention_backward(make_view(dout.data(), DType::kFloat32, {1, 4, 8, 32}, "dout"),
                              make_view(p.q.data(), DType::kFloat32, {1, 4, 8, 32}, "q"),
                              make_view(p.k.data(), DType::kFloat32, {1, 2, 8, 32}, "k"),
                              make_view(p.v.data(), DType::kFloat32, {1, 2, 8, 32}, "v"), s, opts, g);
  };
  EXPECT_THAT(run(options(Mode::kAttnQAT)).message(),
              HasSubstr("dsinks: the gradient of the sinks, but the call has no sinks"));
  const auto opts = with_extras(options(Mode::kAttnQAT), 0.0f, &sinks);
  g.dsinks = make_view(ds.data(), DType::kFloat32, {2}, "dsinks");
  EXPECT_THAT(run(opts).message(), HasSubstr("dsinks: expected shape [4], got [2]"));
  g.dsinks = make_view(ds.data(), DType::kFloat32, {4}, "dsinks");
  EXPECT_TRUE(run(opts).ok());
  g.dsinks = {};  // optional
  EXPECT_TRUE(run(opts).ok());
}

}  // namespace
}  // namespace attnqat
