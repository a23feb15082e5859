// Reference attention: analytic cases, naive independent implementations of numerics
// sections 4-6 (written here from the spec, row by row, without tiles), finite differences,
// GQA, causal masking with Nq != Nk, tile-size (in)dependence and the paper-mode flush.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>

#include "attention_util.h"
#include "common/mask.h"
#include "attnqat/attnqat.h"
#include "attnqat/formats.h"

namespace attnqat {
namespace {

using test::backward;
using test::fq_row;
using test::forward;
using test::options;
using test::Problem;
using test::quantize_p;
using test::random_problem;
using test::rel_err;

constexpr double kInf = std::numeric_limits<double>::infinity();

// The number of keys row i sees (its range begins at key 0): the mask policy of
// src/common/mask.h, which the kernels and the reference use.
int64_t visible_count(int64_t i, int64_t nq, int64_t nk, bool causal) {
  return visible_keys(causal ? MaskKind::kCausal : MaskKind::kNone, static_cast<int>(i),
                      SeqInfo{static_cast<int>(nq), static_cast<int>(nk)})
      .end;
}

// The keys [begin, end) row i sees under causal and a sliding window (left, right), numerics
// section 3 written out here: d = i + nk - nq, keys d - left <= j <= d + right (-1: unbounded),
// causal clamps right to 0.
std::pair<int64_t, int64_t> window_keys(int64_t i, int64_t nq, int64_t nk, bool causal, int left, int right) {
  if (causal) right = 0;
  const int64_t d = i + nk - nq;
  const int64_t begin = left < 0 ? 0 : std::clamp<int64_t>(d - left, 0, nk);
  const int64_t end = right < 0 ? nk : std::clamp<int64_t>(d + right + 1, 0, nk);
  return {begin, std::max(begin, end)};
}

AttentionOptions with_window(AttentionOptions o, int left, int right) {
  o.window_left = left;
  o.window_right = right;
  return o;
}

// ---- Analytic cases --------------------------------------------------------------------------

TEST(AttentionAnalytic, ZeroScoresGiveTheMeanOfVAndLogN) {
  // Q = K = 0: every visible key has p~ = 1, LSE = ln(#visible). In bf16 mode V = 1 gives O = 1.
  // In the quantized modes V = 6 fake-quantizes to exactly 6 (s = 1), O' = 6, and every P block
  // of ones quantizes to 1.03125 (s = e4m3(1/6) = 0.171875, 1/s rounds to code 7: 6 s), so
  // O = 6 * 1.03125 (anchored: the same, s = e4m3(2^11/6) 2^-11).
  for (Mode mode : {Mode::kBF16, Mode::kFP4, Mode::kDropInQAT, Mode::kAttnQAT}) {
    for (bool causal : {false, true}) {
      for (PQuant pq : {PQuant::kPaper, PQuant::kAnchored}) {
        Problem<float> p = random_problem<float>(2, 4, 2, 37, 53, 32, 1);
        std::fill(p.q.begin(), p.q.end(), 0.0f);
        std::fill(p.k.begin(), p.k.end(), 0.0f);
        const float vval = mode == Mode::kBF16 ? 1.0f : 6.0f;
        std::fill(p.v.begin(), p.v.end(), vval);
        auto f = forward(p, options(mode, pq, causal));
        const double want_o = mode == Mode::kBF16 ? 1.0 : 6.0 * 1.03125;
        for (int64_t r = 0; r < p.B * p.Hq * p.Nq; ++r) {
          const int64_t i = r % p.Nq, n = visible_count(i, p.Nq, p.Nk, causal);
          ASSERT_NEAR(f.lse[r], std::log(static_cast<double>(n)), 2e-6) << mode_name(mode) << " row " << r;
          for (int64_t d = 0; d < p.D; ++d) {
            ASSERT_NEAR(f.o[r * p.D + d], want_o, 1e-5) << mode_name(mode);
            ASSERT_NEAR(f.o_hp[r * p.D + d], vval, 1e-5) << mode_name(mode);
          }
        }
      }
    }
  }
}

TEST(AttentionAnalytic, RowsThatSeeNoKeyReturnZeroAndMinusInf) {
  // Causal with Nq > Nk: query i sees keys j <= i + Nk - Nq, so the first Nq - Nk rows see none.
  Problem<float> p = random_problem<float>(1, 2, 1, 20, 8, 16, 2);
  for (Mode mode : {Mode::kBF16, Mode::kAttnQAT}) {
    auto f = forward(p, options(mode, PQuant::kAnchored, /*causal=*/true));
    for (int64_t h = 0; h < 2; ++h) {
      for (int64_t i = 0; i < 20; ++i) {
        const int64_t r = h * 20 + i;
        if (i < 12) {
          EXPECT_EQ(f.lse[r], -kInf);
          EXPECT_EQ(f.l[r], 0.0f);
          for (int64_t d = 0; d < 16; ++d) EXPECT_EQ(f.o[r * 16 + d], 0.0f);
        } else {
          EXPECT_TRUE(std::isfinite(f.lse[r]));
        }
      }
    }
    std::vector<float> dout(p.q.size(), 1.0f);
    auto g = backward(p, f, dout, options(mode, PQuant::kAnchored, true));
    for (float x : g.dq) ASSERT_FALSE(std::isnan(x));
    for (float x : g.dk) ASSERT_FALSE(std::isnan(x));
  }
  // No keys at all.
  Problem<float> e = random_problem<float>(1, 1, 1, 4, 0, 16, 3);
  auto f = forward(e, options(Mode::kAttnQAT));
  for (float x : f.o) EXPECT_EQ(x, 0.0f);
  for (float x : f.lse) EXPECT_EQ(x, -kInf);
}

// ---- bf16 mode is ordinary attention -------------------------------------------------------

TEST(AttentionBf16, MatchesNaiveFp64Softmax) {
  for (bool causal : {false, true}) {
    Problem<float> p = random_problem<float>(2, 8, 2, 45, 77, 64, 4);
    auto f = forward(p, options(Mode::kBF16, PQuant::kPaper, causal));
    std::vector<double> o_ref(f.o.size()), lse_ref(f.lse.size());
    const double c = 1.0 / std::sqrt(64.0);
    for (int64_t b = 0; b < p.B; ++b)
      for (int64_t h = 0; h < p.Hq; ++h)
        for (int64_t i = 0; i < p.Nq; ++i) {
          const int64_t hk = h / 4, n = visible_count(i, p.Nq, p.Nk, causal);
          const float* q = &p.q[((b * p.Hq + h) * p.Nq + i) * 64];
          std::vector<double> s(n);
          double m = -kInf;
          for (int64_t j = 0; j < n; ++j) {
            const float* k = &p.k[((b * p.Hkv + hk) * p.Nk + j) * 64];
            double dot = 0;
            for (int d = 0; d < 64; ++d) dot += static_cast<double>(q[d]) * k[d];
            s[j] = c * dot;
            m = std::max(m, s[j]);
          }
          double l = 0;
          for (auto& x : s) l += (x = std::exp(x - m));
          const int64_t r = (b * p.Hq + h) * p.Nq + i;
          lse_ref[r] = m + std::log(l);
          for (int d = 0; d < 64; ++d) {
            double acc = 0;
            for (int64_t j = 0; j < n; ++j) acc += s[j] * p.v[((b * p.Hkv + hk) * p.Nk + j) * 64 + d];
            o_ref[r * 64 + d] = acc / l;
          }
        }
    // fp32 accumulation over <= 77 keys and 64 channels: ~1e-7 relative; 1e-5 leaves room.
    EXPECT_LT(rel_err(f.o, o_ref), 1e-5);
    EXPECT_LT(rel_err(f.lse, lse_ref), 1e-6);
  }
}

TEST(AttentionBf16, GradientsMatchFiniteDifferences) {
  // fp64 inputs run the fp64 reference; central differences with h = 1e-6 are accurate to
  // ~1e-9 relative here, so 1e-6 separates a wrong formula (errors of order 1) from rounding.
  // (causal, window left, window right): the masks, and windows that cut both sides.
  const int masks[][3] = {{0, -1, -1}, {1, -1, -1}, {0, 1, 1}, {0, 0, 0}, {1, 2, 5}, {0, 3, -1}};
  for (const auto& mk : masks) {
    const bool causal = mk[0] != 0;
    Problem<double> p = random_problem<double>(1, 2, 1, 5, 7, 16, 5);
    auto opts = with_window(options(Mode::kBF16, PQuant::kPaper, causal), mk[1], mk[2]);
    std::mt19937 rng(6);
    std::normal_distribution<double> n01;
    std::vector<double> w(p.q.size());
    for (auto& x : w) x = n01(rng);
    auto f = forward(p, opts);
    auto g = backward(p, f, w, opts);
    auto loss = [&](Problem<double>& pp) {
      auto ff = forward(pp, opts);
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
        const double lp = loss(p);
        (*x)[i] = x0 - h;
        const double lm = loss(p);
        (*x)[i] = x0;
        num[i] = (lp - lm) / (2 * h);
      }
      EXPECT_LT(rel_err(*grad, num), 1e-6) << (causal ? "causal" : "full") << " window " << mk[1] << ", " << mk[2];
    }
  }
}

// ---- Quantized forward: numerics section 4, written naively -----------------------------

struct NaiveFwd {
  std::vector<double> o, o_hp, lse;
};

// One key tile covering the whole row: S in fp32 (the reference's order: sum over d from 0),
// p~ = exp2f(S2 - m_ref) in fp32, so the quantized P is bit-identical to the reference's.
// With a window, masked keys before the row's first visible key are p~ = 0 in the P blocks,
// which start at key 0.
NaiveFwd naive_forward(const Problem<float>& p, PQuant pq, bool causal, VBlocks vb, int left = -1,
                       int right = -1) {
  NaiveFwd r;
  const int64_t D = p.D, rows = p.B * p.Hq * p.Nq;
  r.o.resize(rows * D);
  r.o_hp.resize(rows * D);
  r.lse.resize(rows);
  const float c2 = static_cast<float>(1.0 / std::sqrt(static_cast<double>(D))) * 1.44269504088896340736f;
  const float g = pq == PQuant::kAnchored ? kAnchoredPScale : 1.0f;
  // V fake-quantized per token (channel blocks) or per channel (token blocks).
  std::vector<double> vq(p.v.size());
  for (int64_t hk = 0; hk < p.B * p.Hkv; ++hk) {
    if (vb == VBlocks::kChannel) {
      for (int64_t j = 0; j < p.Nk; ++j) {
        auto row = fq_row(&p.v[(hk * p.Nk + j) * D], D, true);
        std::copy(row.begin(), row.end(), &vq[(hk * p.Nk + j) * D]);
      }
    } else {
      for (int64_t d = 0; d < D; ++d) {
        std::vector<double> col(p.Nk);
        for (int64_t j = 0; j < p.Nk; ++j) col[j] = p.v[(hk * p.Nk + j) * D + d];
        auto qc = quantize_p(col, 1.0f);  // the same blockwise quantizer, along tokens
        for (int64_t j = 0; j < p.Nk; ++j) vq[(hk * p.Nk + j) * D + d] = qc[j];
      }
    }
  }
  for (int64_t b = 0; b < p.B; ++b)
    for (int64_t h = 0; h < p.Hq; ++h)
      for (int64_t i = 0; i < p.Nq; ++i) {
        const auto [j_begin, n] = window_keys(i, p.Nq, p.Nk, causal, left, right);
        const int64_t hk = h / (p.Hq / p.Hkv);
        const int64_t row = (b * p.Hq + h) * p.Nq + i;
        auto q = fq_row(&p.q[row * D], D, true);
        std::vector<float> s2(n);
        float m = -INFINITY;
        for (int64_t j = j_begin; j < n; ++j) {
          auto k = fq_row(&p.k[((b * p.Hkv + hk) * p.Nk + j) * D], D, true);
          float dot = 0.0f;
          for (int64_t d = 0; d < D; ++d) dot += static_cast<float>(q[d]) * static_cast<float>(k[d]);
          s2[j] = c2 * dot;
          m = std::max(m, s2[j]);
        }
        const float m_ref = pq == PQuant::kAnchored ? std::ceil(m) : m;
        std::vector<double> pt(n, 0.0);
        double l = 0;
        for (int64_t j = j_begin; j < n; ++j) l += (pt[j] = std::exp2(s2[j] - m_ref));
        auto ph = quantize_p(pt, g);
        for (int64_t d = 0; d < D; ++d) {
          double o = 0, ohp = 0;
          for (int64_t j = j_begin; j < n; ++j) {
            const double vj = vq[((b * p.Hkv + hk) * p.Nk + j) * D + d];
            o += ph[j] * vj;
            ohp += pt[j] * vj;
          }
          r.o[row * D + d] = o / l;
          r.o_hp[row * D + d] = ohp / l;
        }
        r.lse[row] = std::log(2.0) * (m_ref + std::log2(l));
      }
  return r;
}

TEST(AttentionFp4, ForwardMatchesNaiveSection4) {
  for (PQuant pq : {PQuant::kPaper, PQuant::kAnchored}) {
    for (bool causal : {false, true}) {
      for (VBlocks vb : {VBlocks::kChannel, VBlocks::kToken}) {
        if (causal && vb == VBlocks::kToken) continue;
        Problem<float> p = random_problem<float>(2, 4, 2, 33, 71, 32, 7);
        auto opts = options(Mode::kAttnQAT, pq, causal);
        opts.v_blocks = vb;
        opts.kv_tile = 80;  // one tile covers every row: the naive version has no tiles
        auto f = forward(p, opts);
        auto ref = naive_forward(p, pq, causal, vb);
        // Same quantized P bit for bit; only the order of fp32 sums differs (~1e-7).
        EXPECT_LT(rel_err(f.o, ref.o), 1e-5);
        EXPECT_LT(rel_err(f.o_hp, ref.o_hp), 1e-5);
        EXPECT_LT(rel_err(f.lse, ref.lse), 1e-6);
        // fp4 and drop_in_qat share the forward; O does not depend on whether O' is made.
        auto f4 = forward(p, [&] { auto o = opts; o.mode = Mode::kFP4; return o; }(), false);
        EXPECT_EQ(f4.o, f.o);
      }
    }
  }
}

TEST(AttentionFp4, QuantizationChangesTheOutput) {
  // Guards against a forward that silently skips quantization: O differs from bf16 mode by the
  // FP4 error (several percent), O' less (no P quantization).
  Problem<float> p = random_problem<float>(1, 2, 2, 64, 64, 64, 8);
  auto fb = forward(p, options(Mode::kBF16));
  auto fq = forward(p, options(Mode::kAttnQAT));
  const double e_o = rel_err(fq.o, fb.o), e_hp = rel_err(fq.o_hp, fb.o);
  std::printf("fp4 vs bf16 attention: O rel. error %.4f, O' rel. error %.4f\n", e_o, e_hp);
  EXPECT_GT(e_o, 0.01);
  EXPECT_LT(e_o, 0.5);
  EXPECT_LT(e_hp, e_o);
}

TEST(AttentionFp4, AnchoredForwardDoesNotDependOnTheKeyTile) {
  Problem<float> p = random_problem<float>(1, 4, 4, 300, 300, 64, 9);
  auto base_a = forward(p, [&] { auto o = options(Mode::kAttnQAT, PQuant::kAnchored); o.kv_tile = 512; return o; }());
  auto base_p = forward(p, [&] { auto o = options(Mode::kAttnQAT, PQuant::kPaper); o.kv_tile = 512; return o; }());
  for (int tile : {16, 48, 128}) {
    auto a = forward(p, [&] { auto o = options(Mode::kAttnQAT, PQuant::kAnchored); o.kv_tile = tile; return o; }());
    auto q = forward(p, [&] { auto o = options(Mode::kAttnQAT, PQuant::kPaper); o.kv_tile = tile; return o; }());
    const double ea = rel_err(a.o, base_a.o), ep = rel_err(q.o, base_p.o);
    std::printf("kv_tile %3d vs 512: anchored O diff %.2e, paper O diff %.2e\n", tile, ea, ep);
    // Anchored: tile-independent up to fp32 rounding (an element now and then crossing an E2M1
    // boundary: numerics section 4); paper: the running max changes P's scale per tile.
    EXPECT_LT(ea, 1e-4);
    EXPECT_GT(ep, 10 * ea);
  }
}

// ---- Backward: numerics sections 5-6, written naively (fp64) ------------------------------

struct NaiveGrads {
  std::vector<double> dq, dk, dv;
};

// The backward of the spec for any switch setting, dense and in fp64, from the forward's
// outputs. P_F blocks are quantized from float(P) exactly as the fp64 reference does.
NaiveGrads naive_backward(const Problem<double>& p, const test::Fwd<double>& f,
                          const std::vector<double>& dout, Mode mode, PQuant pq, bool causal,
                          BackwardSwitches sw) {
  const bool quant = mode != Mode::kBF16;
  if (!quant) sw = {false, false, false};
  const int64_t D = p.D;
  // The softmax scale is an fp32 value (1/sqrt(D) rounded), then widened.
  const double c = static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)));
  const double c2 = c * 1.4426950408889634074;
  const double ln2 = 0.69314718055994530942;
  NaiveGrads g;
  g.dq.assign(p.q.size(), 0);
  g.dk.assign(p.k.size(), 0);
  g.dv.assign(p.v.size(), 0);
  const int64_t grp = p.Hq / p.Hkv;
  for (int64_t b = 0; b < p.B; ++b)
    for (int64_t h = 0; h < p.Hq; ++h)
      for (int64_t i = 0; i < p.Nq; ++i) {
        const int64_t hk = h / grp, n = visible_count(i, p.Nq, p.Nk, causal);
        const int64_t row = (b * p.Hq + h) * p.Nq + i;
        if (n == 0) continue;
        auto q = fq_row(&p.q[row * D], D, sw.quantized_qkv);
        std::vector<std::vector<double>> k(n), v(n);
        std::vector<double> s2(n);
        for (int64_t j = 0; j < n; ++j) {
          const int64_t kr = ((b * p.Hkv + hk) * p.Nk + j) * D;
          k[j] = fq_row(&p.k[kr], D, sw.quantized_qkv);
          v[j] = fq_row(&p.v[kr], D, sw.quantized_qkv);
          double dot = 0;
          for (int64_t d = 0; d < D; ++d) dot += q[d] * k[j][d];
          s2[j] = c2 * dot;
        }
        // Row statistics: the forward's, or recomputed from the scores seen here (drop-in).
        double lse2, m_ref, l;
        if (!quant || sw.quantized_qkv) {
          lse2 = static_cast<double>(f.lse[row]) / ln2;
          m_ref = f.m_ref[row];
          l = f.l[row];
        } else {
          double m = -kInf;
          for (double x : s2) m = std::max(m, x);
          m_ref = pq == PQuant::kAnchored ? std::ceil(m) : m;
          l = 0;
          for (double x : s2) l += std::exp2(x - m_ref);
          lse2 = m_ref + std::log2(l);
        }
        std::vector<double> P(n), pf;
        for (int64_t j = 0; j < n; ++j) P[j] = std::exp2(s2[j] - lse2);
        if (quant && sw.quant_p && pq == PQuant::kPaper) {
          pf = quantize_p(P, 1.0f);
        } else if (quant && sw.quant_p) {
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
          const double ds = P[j] * (dp - delta);
          const int64_t kr = ((b * p.Hkv + hk) * p.Nk + j) * D;
          for (int64_t d = 0; d < D; ++d) {
            g.dv[kr + d] += pf[j] * dor[d];
            g.dq[row * D + d] += c * ds * k[j][d];
            g.dk[kr + d] += c * ds * q[d];
          }
        }
      }
  return g;
}

TEST(AttentionBackward, EverySwitchSettingFollowsSection5) {
  // All 8 switch settings (attn_qat = all on, drop_in_qat = all off, the ablations between),
  // both P quantizations, causal (Nq != Nk) and not, GQA 2. Same P_F bits as the reference, so
  // only the order of fp64 sums differs: 1e-9.
  Problem<double> p = random_problem<double>(1, 4, 2, 21, 40, 32, 10);
  std::mt19937 rng(11);
  std::normal_distribution<double> n01;
  std::vector<double> dout(p.q.size());
  for (auto& x : dout) x = n01(rng);
  for (PQuant pq : {PQuant::kPaper, PQuant::kAnchored}) {
    for (bool causal : {false, true}) {
      auto fopts = options(Mode::kAttnQAT, pq, causal);
      auto f = forward(p, fopts);
      NaiveGrads all_on;
      for (int bits = 0; bits < 8; ++bits) {
        const BackwardSwitches sw{(bits & 1) != 0, (bits & 2) != 0, (bits & 4) != 0};
        auto opts = fopts;
        opts.mode = bits == 0 ? Mode::kDropInQAT : Mode::kAttnQAT;
        opts.bwd = sw;
        auto g = backward(p, f, dout, opts);
        auto n = naive_backward(p, f, dout, Mode::kAttnQAT, pq, causal, sw);
        EXPECT_LT(rel_err(g.dq, n.dq), 1e-9) << "switches " << bits;
        EXPECT_LT(rel_err(g.dk, n.dk), 1e-9) << "switches " << bits;
        EXPECT_LT(rel_err(g.dv, n.dv), 1e-9) << "switches " << bits;
        if (bits == 7) all_on = n;
      }
      // The switches matter: drop-in's gradients are not attn_qat's.
      auto drop = naive_backward(p, f, dout, Mode::kAttnQAT, pq, causal, {false, false, false});
      EXPECT_GT(rel_err(drop.dq, all_on.dq), 1e-3);
    }
  }
}

TEST(AttentionBackward, DropInIsTheUnquantizedBackwardWithDFromTheFp4Output) {
  Problem<double> p = random_problem<double>(1, 2, 2, 16, 16, 32, 12);
  std::vector<double> dout(p.q.size(), 0.5);
  auto fq = forward(p, options(Mode::kDropInQAT));
  auto fb = forward(p, options(Mode::kBF16));
  auto g_drop = backward(p, fq, dout, options(Mode::kDropInQAT));
  // bf16-mode backward with the FP4 output in place of O is drop-in. They differ only in the
  // LSE: bf16 mode reads the forward's (stored in fp32, ~1e-7 relative), drop-in recomputes it
  // in fp64 from the unquantized scores.
  test::Fwd<double> mixed = fb;
  mixed.o = fq.o;
  auto g_mixed = backward(p, mixed, dout, options(Mode::kBF16));
  EXPECT_LT(rel_err(g_drop.dq, g_mixed.dq), 1e-5);
  EXPECT_LT(rel_err(g_drop.dk, g_mixed.dk), 1e-5);
  EXPECT_LT(rel_err(g_drop.dv, g_mixed.dv), 1e-5);
  auto g_bf16 = backward(p, fb, dout, options(Mode::kBF16));
  EXPECT_GT(rel_err(g_drop.dq, g_bf16.dq), 1e-4);  // D really comes from the FP4 output
}

TEST(AttentionBackward, GqaSumsOverTheGroup) {
  Problem<float> p = random_problem<float>(1, 4, 2, 24, 40, 32, 13);
  // The same problem with K, V repeated per query head.
  Problem<float> mha = p;
  mha.Hkv = 4;
  mha.k.clear();
  mha.v.clear();
  for (int64_t h = 0; h < 4; ++h) {
    const int64_t off = (h / 2) * 40 * 32;
    mha.k.insert(mha.k.end(), p.k.begin() + off, p.k.begin() + off + 40 * 32);
    mha.v.insert(mha.v.end(), p.v.begin() + off, p.v.begin() + off + 40 * 32);
  }
  std::vector<float> dout(p.q.size());
  std::mt19937 rng(14);
  std::normal_distribution<float> n01;
  for (auto& x : dout) x = n01(rng);
  for (Mode mode : {Mode::kBF16, Mode::kAttnQAT}) {
    auto opts = options(mode, PQuant::kAnchored, true);
    auto f1 = forward(p, opts), f2 = forward(mha, opts);
    EXPECT_EQ(f1.o, f2.o);
    auto g1 = backward(p, f1, dout, opts), g2 = backward(mha, f2, dout, opts);
    EXPECT_EQ(g1.dq, g2.dq);
    std::vector<double> dk_sum(p.k.size(), 0), dv_sum(p.v.size(), 0);
    for (int64_t h = 0; h < 4; ++h)
      for (int64_t x = 0; x < 40 * 32; ++x) {
        dk_sum[(h / 2) * 40 * 32 + x] += g2.dk[h * 40 * 32 + x];
        dv_sum[(h / 2) * 40 * 32 + x] += g2.dv[h * 40 * 32 + x];
      }
    EXPECT_LT(rel_err(g1.dk, dk_sum), 1e-6);
    EXPECT_LT(rel_err(g1.dv, dv_sum), 1e-6);
  }
}

TEST(AttentionBackward, PaperModeFlushesDiffuseRows) {
  // Diffuse rows (small Q, 1024 keys): normalized probabilities ~1/1024 sit below
  // 6 * 2^-10 ~ 0.0059, so the paper's backward quantizer (g = 1) flushes whole P blocks to
  // zero and dV loses most of its mass; anchored reproduces the forward's P blocks.
  Problem<float> p = random_problem<float>(1, 1, 1, 64, 1024, 64, 15, /*q_scale=*/0.3);
  std::vector<float> dout(p.q.size());
  std::mt19937 rng(16);
  std::normal_distribution<float> n01;
  for (auto& x : dout) x = n01(rng);
  double cos_paper = 0, cos_anchored = 0;
  for (PQuant pq : {PQuant::kPaper, PQuant::kAnchored}) {
    auto opts = options(Mode::kAttnQAT, pq);
    auto f = forward(p, opts);
    auto g = backward(p, f, dout, opts);
    auto opts_hp = opts;
    opts_hp.bwd.quant_p = false;  // dV from the unquantized P
    auto g_hp = backward(p, f, dout, opts_hp);
    const double cs = test::cosine(g.dv, g_hp.dv);
    (pq == PQuant::kPaper ? cos_paper : cos_anchored) = cs;
    if (pq == PQuant::kPaper) {
      // Fraction of (row, 16-key block) items whose largest normalized P is below 6 * 2^-10.
      int64_t flushed = 0, total = 0;
      const float c2 = 0.125f * 1.44269504088896340736f;
      for (int64_t i = 0; i < 64; ++i) {
        auto q = fq_row(&p.q[i * 64], 64, true);
        for (int64_t j0 = 0; j0 < 1024; j0 += 16, ++total) {
          double amax = 0;
          for (int64_t j = j0; j < j0 + 16; ++j) {
            auto k = fq_row(&p.k[j * 64], 64, true);
            double dot = 0;
            for (int d = 0; d < 64; ++d) dot += q[d] * k[d];
            amax = std::max(amax, std::exp2(c2 * dot - f.lse[i] / std::log(2.0)));
          }
          flushed += amax < 6.0 * std::ldexp(1.0, -10);
        }
      }
      std::printf("paper backward on diffuse rows: %.1f%% of P blocks flushed to zero, "
                  "dV cosine vs unquantized P %.3f\n", 100.0 * flushed / total, cs);
      EXPECT_GT(static_cast<double>(flushed) / total, 0.9);
    }
  }
  std::printf("anchored backward on the same rows: dV cosine %.5f\n", cos_anchored);
  EXPECT_LT(cos_paper, 0.9);
  EXPECT_GT(cos_anchored, 0.99);
}

TEST(AttentionPrecision, Fp32AndBf16OperandVariantsAgreeWithFp64) {
  Problem<float> p = random_problem<float>(1, 2, 1, 128, 256, 128, 17);
  for (Mode mode : {Mode::kBF16, Mode::kAttnQAT}) {
    auto o32 = options(mode, PQuant::kAnchored), o64 = o32, obf = o32;
    o64.precision = Precision::kFloat64;
    obf.precision = Precision::kBF16Operands;
    auto f32 = forward(p, o32), f64 = forward(p, o64), fbf = forward(p, obf);
    const double e32 = rel_err(f32.o, f64.o), ebf = rel_err(fbf.o_hp, f64.o_hp);
    std::printf("%s: O fp32 vs fp64 %.2e; O' bf16-operands vs fp64 %.2e\n", mode_name(mode), e32, ebf);
    EXPECT_LT(e32, 1e-4);  // rare E2M1 boundary flips between fp32 and fp64 p~ dominate
    EXPECT_LT(ebf, 2e-2);
    EXPECT_GT(ebf, e32);  // the emulation really rounds
  }
}

}  // namespace
}  // namespace attnqat

namespace attnqat {
namespace {

TEST(AttentionPrequantized, SkippingTheInputQuantizationGivesTheSameBits) {
  // Fake-quantizing Q, K, V first (as the PyTorch front end does) and passing
  // inputs_quantized = true gives exactly the forward and backward of the plain call.
  for (VBlocks vb : {VBlocks::kChannel, VBlocks::kToken}) {
    Problem<float> p = random_problem<float>(1, 4, 2, 40, 56, 32, 21);
    auto opts = options(Mode::kAttnQAT, PQuant::kAnchored, false);
    opts.v_blocks = vb;
    Problem<float> pq = p;
    float g = 1.0f;
    QuantizeOptions qo, vo;
    vo.axis = vb == VBlocks::kToken ? BlockAxis::kToken : BlockAxis::kLast;
    auto fq = [&](std::vector<float>& x, int64_t h, int64_t n, const QuantizeOptions& o) {
      ASSERT_TRUE(fake_quantize(make_view(x.data(), DType::kFloat32, {1, h, n, 32}, "x"),
                                make_view(x.data(), DType::kFloat32, {1, h, n, 32}, "out"),
                                make_view(&g, DType::kFloat32, {1}, "g"), o).ok());
    };
    fq(pq.q, 4, 40, qo);
    fq(pq.k, 2, 56, qo);
    fq(pq.v, 2, 56, vo);
    auto pre = opts;
    pre.inputs_quantized = true;
    auto f1 = forward(p, opts), f2 = forward(pq, pre);
    EXPECT_EQ(f1.o, f2.o);
    EXPECT_EQ(f1.o_hp, f2.o_hp);
    EXPECT_EQ(f1.lse, f2.lse);
    std::vector<float> dout(p.q.size(), 0.25f);
    auto g1 = backward(p, f1, dout, opts), g2 = backward(pq, f2, dout, pre);
    EXPECT_EQ(g1.dq, g2.dq);
    EXPECT_EQ(g1.dk, g2.dk);
    EXPECT_EQ(g1.dv, g2.dv);
  }
}

// ---- Non-finite inputs (numerics section 3 and 9.7) ------------------------------------------
// Written from the contract's table, not from the reference: a NaN in Q poisons its row (O and
// LSE NaN, never 0), a NaN in K every row that sees the key, and the backward's dK, dV are NaN
// wherever a poisoned row reaches them (the rows it does not reach stay finite), in every mode.
// These are the checks the reference failed when it called a row with a NaN sum "empty".

bool all_nan(const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (!std::isnan(x[i])) return false;
  return true;
}
bool all_finite(const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (!std::isfinite(x[i])) return false;
  return true;
}

TEST(AttentionNonFinite, NanInQPoisonsItsRowAndTheKeysItSees) {
  constexpr int64_t N = 40, D = 32, i0 = 17;
  for (Mode mode : {Mode::kBF16, Mode::kFP4, Mode::kDropInQAT, Mode::kAttnQAT})
    for (PQuant pq : {PQuant::kPaper, PQuant::kAnchored})
      for (bool causal : {false, true}) {
        SCOPED_TRACE(testing::Message() << "mode " << static_cast<int>(mode) << " pq "
                                        << static_cast<int>(pq) << " causal " << causal);
        Problem<float> p = random_problem<float>(1, 2, 1, N, N, D, 11);
        p.q[(1 * N + i0) * D + 5] = NAN;  // head 1, row i0
        auto opts = options(mode, pq, causal);
        auto f = forward(p, opts);
        for (int64_t h = 0; h < 2; ++h)
          for (int64_t i = 0; i < N; ++i) {
            const int64_t r = h * N + i;
            const bool bad = h == 1 && i == i0;
            EXPECT_EQ(std::isnan(f.lse[r]), bad) << "row " << r;
            if (bad) {
              EXPECT_TRUE(all_nan(&f.o[r * D], D)) << "the NaN row must not be 0";
            } else {
              EXPECT_TRUE(all_finite(&f.o[r * D], D)) << "row " << r;
            }
          }
        if (mode == Mode::kFP4) continue;
        std::vector<float> dout(p.q.size(), 0.5f);
        auto g = backward(p, f, dout, opts);
        const int64_t seen = visible_count(i0, N, N, causal);
        for (int64_t j = 0; j < N; ++j) {
          // dV_j = sum_i P_F_ij dO_i and dK_j both read row i0's P when row i0 sees key j.
          EXPECT_EQ(all_nan(&g.dv[j * D], D), j < seen) << "dv key " << j;
          EXPECT_EQ(all_finite(&g.dv[j * D], D), j >= seen) << "dv key " << j;
          EXPECT_EQ(all_nan(&g.dk[j * D], D), j < seen) << "dk key " << j;
        }
        for (int64_t i = 0; i < N; ++i) {
          EXPECT_EQ(all_nan(&g.dq[(N + i) * D], D), i == i0) << "dq row " << i;
          EXPECT_TRUE(all_finite(&g.dq[i * D], D)) << "dq head 0 row " << i;
        }
      }
}

TEST(AttentionNonFinite, InfInKPoisonsEveryRowThatSeesTheKey) {
  constexpr int64_t N = 48, D = 16, j0 = 30;
  for (Mode mode : {Mode::kFP4, Mode::kAttnQAT})
    for (bool causal : {false, true}) {
      Problem<float> p = random_problem<float>(1, 1, 1, N, N, D, 12);
      p.k[j0 * D + 2] = INFINITY;  // FP4 modes: the block is poisoned, so Inf acts as NaN
      auto f = forward(p, options(mode, PQuant::kAnchored, causal));
      for (int64_t i = 0; i < N; ++i) {
        const bool sees = visible_count(i, N, N, causal) > j0;
        EXPECT_EQ(std::isnan(f.lse[i]), sees) << "row " << i;
        EXPECT_EQ(all_nan(&f.o[i * D], D), sees) << "row " << i;
        if (!sees) {
          EXPECT_TRUE(all_finite(&f.o[i * D], D)) << "row " << i;
        }
      }
    }
}

TEST(AttentionNonFinite, MaskedPositionsAndEmptyRowsNeverPoison) {
  // Causal, Nq = 24 > Nk = 8: rows 0-15 see no key. NaN in an empty row's Q and in a key that
  // only the last row sees: empty rows stay O = 0, LSE = -inf with zero dQ; other rows finite.
  constexpr int64_t Nq = 24, Nk = 8, D = 16;
  Problem<float> p = random_problem<float>(1, 1, 1, Nq, Nk, D, 13);
  p.q[3 * D + 1] = NAN;           // row 3: empty
  p.k[(Nk - 1) * D + 4] = NAN;    // key 7: seen by row 23 only
  auto opts = options(Mode::kAttnQAT, PQuant::kAnchored, true);
  auto f = forward(p, opts);
  for (int64_t i = 0; i < Nq; ++i) {
    if (i < 16) {
      EXPECT_EQ(f.lse[i], -kInf);
      for (int64_t d = 0; d < D; ++d) EXPECT_EQ(f.o[i * D + d], 0.0f);
    } else {
      EXPECT_EQ(std::isnan(f.lse[i]), i == Nq - 1) << "row " << i;
      EXPECT_EQ(all_finite(&f.o[i * D], D), i != Nq - 1) << "row " << i;
    }
  }
  std::vector<float> dout(p.q.size(), 1.0f);
  auto g = backward(p, f, dout, opts);
  for (int64_t i = 0; i < 16; ++i)
    for (int64_t d = 0; d < D; ++d) EXPECT_EQ(g.dq[i * D + d], 0.0f) << "empty row " << i;
  for (int64_t i = 16; i < Nq - 1; ++i) EXPECT_TRUE(all_finite(&g.dq[i * D], D)) << "row " << i;
}

// ---- Sliding windows (numerics section 3) ------------------------------------------------------

TEST(AttentionWindow, UnboundedSidesAreCausalOrNoMaskBitForBit) {
  // (-1, 0) is causal and (-1, -1) no mask; a window wider than the keys on a side cuts nothing,
  // so (4096, 0) runs the window's path (a begin per row) and must give causal's bits too.
  for (auto [nq, nk] : {std::pair<int64_t, int64_t>{45, 77}, {77, 45}}) {
    Problem<float> p = random_problem<float>(1, 4, 2, nq, nk, 32, 21);
    std::vector<float> dout(p.q.size());
    std::mt19937 rng(22);
    std::normal_distribution<float> n01;
    for (auto& x : dout) x = n01(rng);
    for (Mode mode : {Mode::kBF16, Mode::kDropInQAT, Mode::kAttnQAT}) {
      for (PQuant pq : {PQuant::kPaper, PQuant::kAnchored}) {
        for (bool causal : {false, true}) {
          const AttentionOptions base = options(mode, pq, causal);
          auto f0 = forward(p, base);
          auto g0 = backward(p, f0, dout, base);
          const int windows[][2] = {{-1, causal ? 7 : -1}, {4096, causal ? -1 : 4096}, {-1, causal ? 0 : 4096}};
          for (const auto& w : windows) {
            SCOPED_TRACE(testing::Message() << mode_name(mode) << " causal " << causal << " window (" << w[0]
                                            << ", " << w[1] << ") Nq " << nq << " Nk " << nk);
            const AttentionOptions o = with_window(base, w[0], w[1]);
            auto f = forward(p, o);
            auto g = backward(p, f, dout, o);
            EXPECT_EQ(f.o, f0.o);
            EXPECT_EQ(f.o_hp, f0.o_hp);
            EXPECT_EQ(f.lse, f0.lse);
            EXPECT_EQ(g.dq, g0.dq);
            EXPECT_EQ(g.dk, g0.dk);
            EXPECT_EQ(g.dv, g0.dv);
          }
          // And the window (4096, 0) without causal is causal.
          if (causal) {
            auto f = forward(p, with_window(options(mode, pq, false), 4096, 0));
            EXPECT_EQ(f.o, f0.o);
            EXPECT_EQ(f.lse, f0.lse);
          }
        }
      }
    }
  }
}

TEST(AttentionWindow, Bf16MatchesDenseFp64Softmax) {
  // Dense softmax over each row's window in fp64, against the fp64 reference: the same math in
  // another order, ~1e-15 relative before O and LSE are stored in fp32 (q's dtype; LSE is fp32),
  // which leaves ~3e-8; 1e-7 allows that and catches any wrong key (errors of order 1e-2).
  const int windows[][2] = {{3, 2}, {0, 0}, {7, 0}, {0, 5}, {20, -1}, {-1, 9}};
  for (const auto& w : windows) {
    SCOPED_TRACE(testing::Message() << "window (" << w[0] << ", " << w[1] << ")");
    Problem<float> p = random_problem<float>(2, 4, 2, 45, 77, 64, 23);
    auto opts = with_window(options(Mode::kBF16), w[0], w[1]);
    opts.precision = Precision::kFloat64;
    opts.kv_tile = 16;  // many tiles: rows begin past the first
    auto f = forward(p, opts);
    std::vector<double> o_ref(f.o.size()), lse_ref(f.lse.size());
    const double c = 1.0 / std::sqrt(64.0);
    for (int64_t b = 0; b < p.B; ++b)
      for (int64_t h = 0; h < p.Hq; ++h)
        for (int64_t i = 0; i < p.Nq; ++i) {
          const int64_t hk = h / 2, r = (b * p.Hq + h) * p.Nq + i;
          const float* q = &p.q[r * 64];
          std::vector<double> s(p.Nk, -kInf);
          double m = -kInf;
          for (int64_t j = 0; j < p.Nk; ++j) {
            const int64_t d0 = i + p.Nk - p.Nq;
            if ((w[0] >= 0 && j < d0 - w[0]) || (w[1] >= 0 && j > d0 + w[1])) continue;  // masked: -inf
            const float* k = &p.k[((b * p.Hkv + hk) * p.Nk + j) * 64];
            double dot = 0;
            for (int d = 0; d < 64; ++d) dot += static_cast<double>(q[d]) * k[d];
            m = std::max(m, s[j] = c * dot);
          }
          double l = 0;
          for (auto& x : s) l += (x = std::exp(x - m));
          lse_ref[r] = m + std::log(l);
          for (int d = 0; d < 64; ++d) {
            double acc = 0;
            for (int64_t j = 0; j < p.Nk; ++j) acc += s[j] * p.v[((b * p.Hkv + hk) * p.Nk + j) * 64 + d];
            o_ref[r * 64 + d] = acc / l;
          }
        }
    EXPECT_LT(rel_err(f.o, o_ref), 1e-7);
    EXPECT_LT(rel_err(f.lse, lse_ref), 1e-7);
  }
}

TEST(AttentionWindow, QuantizedForwardMatchesNaiveSection4) {
  // P blocks of 16 keys from key 0, keys outside the window p~ = 0 in them; paper: one tile
  // (kv_tile 80) as in the naive version; anchored: any tile.
  for (PQuant pq : {PQuant::kPaper, PQuant::kAnchored}) {
    for (bool causal : {false, true}) {
      for (auto [left, right] : {std::pair{3, 2}, {20, 0}, {0, 0}, {5, -1}, {37, 11}}) {
        for (int tile : {80, 16, 48}) {
          if (pq == PQuant::kPaper && tile != 80) continue;
          SCOPED_TRACE(testing::Message() << (pq == PQuant::kPaper ? "paper" : "anchored") << " causal " << causal
                                          << " window (" << left << ", " << right << ") kv_tile " << tile);
          Problem<float> p = random_problem<float>(2, 4, 2, 33, 71, 32, 24);
          auto opts = with_window(options(Mode::kAttnQAT, pq, causal), left, right);
          opts.kv_tile = tile;
          auto f = forward(p, opts);
          auto ref = naive_forward(p, pq, causal, VBlocks::kChannel, left, right);
          EXPECT_LT(rel_err(f.o, ref.o), 1e-5);
          EXPECT_LT(rel_err(f.o_hp, ref.o_hp), 1e-5);
          EXPECT_LT(rel_err(f.lse, ref.lse), 1e-6);
        }
      }
    }
  }
}

TEST(AttentionWindow, RowsOutsideTheWindowAreEmptyAndMaskedKeysNeverPoison) {
  // Window (1, 0), Nq = 20 > Nk = 8: row i sees keys i - 13 and i - 12 (those >= 0), so rows 0-11
  // see none. NaN in key 0: rows 12 and 13 (which see it) are NaN; rows 14+ finite; empty rows
  // stay O = 0, LSE = -inf with zero dQ.
  constexpr int64_t Nq = 20, Nk = 8, D = 16;
  for (Mode mode : {Mode::kBF16, Mode::kAttnQAT}) {
    for (PQuant pq : {PQuant::kPaper, PQuant::kAnchored}) {
      Problem<float> p = random_problem<float>(1, 1, 1, Nq, Nk, D, 25);
      p.k[0 * D + 4] = NAN;
      const auto opts = with_window(options(mode, pq), 1, 0);
      auto f = forward(p, opts);
      for (int64_t i = 0; i < Nq; ++i) {
        if (i < 12) {
          EXPECT_EQ(f.lse[i], -kInf) << "row " << i;
          for (int64_t d = 0; d < D; ++d) EXPECT_EQ(f.o[i * D + d], 0.0f);
        } else {
          EXPECT_EQ(std::isnan(f.lse[i]), i < 14) << "row " << i;
          EXPECT_EQ(all_finite(&f.o[i * D], D), i >= 14) << "row " << i;
        }
      }
      std::vector<float> dout(p.q.size(), 1.0f);
      auto g = backward(p, f, dout, opts);
      for (int64_t i = 0; i < 12; ++i)
        for (int64_t d = 0; d < D; ++d) EXPECT_EQ(g.dq[i * D + d], 0.0f) << "empty row " << i;
      for (int64_t i = 14; i < Nq; ++i) EXPECT_TRUE(all_finite(&g.dq[i * D], D)) << "row " << i;
      for (int64_t j = 2; j < Nk; ++j) {
        EXPECT_TRUE(all_finite(&g.dk[j * D], D)) << "key " << j;
        EXPECT_TRUE(all_finite(&g.dv[j * D], D)) << "key " << j;
      }
    }
  }
}

}  // namespace
}  // namespace attnqat
