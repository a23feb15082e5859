// tests/cpp/cuda_attention/test_sm90_units.cpp — unit tests of single device steps of the sm90
// forward kernel (sm90_test_kernels.h):
//  - PQuant*: the in-register P pipeline (mask, online softmax, ex2, NVFP4 quantization of P in
//    the accumulator layout) against the host: exp2f and attnqat::fake_quantize_block_nv.
//  - Softcap*: the softcap's tanh and slope (softcap.cuh) against tanh in double.
//  - GemmLayout*: TMA + 128B swizzle + wgmma descriptors + accumulator / A-fragment layouts of the
//    two GEMMs, exactly (small integers: every product and sum is exact in fp32).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <sstream>
#include <vector>

#include "attnqat/formats.h"
#include "gpu_util.h"
#include "sm90_test_kernels.h"

namespace attnqat::gpu_test {
namespace {

constexpr float kLog2e = 1.44269504088896340736f;
constexpr int kRows = kTileRows, kKeys = kTileKeys;

bool same_value(float a, float b) {
  if (std::isnan(a) || std::isnan(b)) return std::isnan(a) && std::isnan(b);
  uint32_t x, y;
  std::memcpy(&x, &a, 4);
  std::memcpy(&y, &b, 4);
  return x == y || (a == 0.0f && b == 0.0f);
}

// What the kernel's P pipeline must compute for one tile, on the host (numerics 4 / 9.1).
struct HostP {
  std::vector<float> p_tilde, p_hat, m_ref;
};

HostP host_p(const std::vector<float>& s, const std::vector<int>& key_end, float c2,
             bool anchored) {
  HostP h;
  h.p_tilde.assign(kRows * kKeys, 0.0f);
  h.p_hat.assign(kRows * kKeys, 0.0f);
  h.m_ref.assign(kRows, -std::numeric_limits<float>::infinity());
  const float g = anchored ? kAnchoredPScale : 1.0f;
  for (int r = 0; r < kRows; ++r) {
    float m = -std::numeric_limits<float>::infinity();
    for (int c = 0; c < key_end[r]; ++c) m = std::fmax(m, c2 * s[r * kKeys + c]);
    if (key_end[r] == 0) continue;
    const float ref = anchored ? std::ceil(m) : m;
    h.m_ref[r] = ref;
    for (int c = 0; c < key_end[r]; ++c)
      h.p_tilde[r * kKeys + c] = std::exp2(c2 * s[r * kKeys + c] - ref);
    for (int b = 0; b < kKeys; b += kNvBlock) {
      float blk[kNvBlock];
      for (int i = 0; i < kNvBlock; ++i) blk[i] = h.p_tilde[r * kKeys + b + i];
      fake_quantize_block_nv(blk, g);
      for (int i = 0; i < kNvBlock; ++i) h.p_hat[r * kKeys + b + i] = blk[i];
    }
  }
  return h;
}

// Host phi_nv of the GPU's own p~, block by block: must equal the GPU's P^ bit for bit (this
// isolates the quantizer from the approximate exp2).
std::vector<float> host_quantize(const std::vector<float>& p_tilde, bool anchored) {
  std::vector<float> out(p_tilde);
  for (size_t b = 0; b < out.size(); b += kNvBlock)
    fake_quantize_block_nv(&out[b], anchored ? kAnchoredPScale : 1.0f);
  return out;
}

struct Mismatches {
  int64_t count = 0;
  std::string first;
};

Mismatches diff(const std::vector<float>& got, const std::vector<float>& want,
                const std::vector<float>& p_tilde) {
  Mismatches m;
  std::ostringstream os;
  for (int i = 0; i < kRows * kKeys; ++i) {
    if (same_value(got[i], want[i])) continue;
    if (m.count++ < 8)
      os << "\n    row " << i / kKeys << " key " << i % kKeys << " (block " << (i % kKeys) / 16
         << "): got " << got[i] << " want " << want[i] << " (p~ " << p_tilde[i] << ")";
  }
  m.first = os.str();
  return m;
}

// Masks that cover: full rows, partial blocks, a row with one key, a fully masked row.
std::vector<int> key_ends() {
  std::vector<int> e(kRows, kKeys);
  for (int r = 0; r < kRows; ++r)
    if (r % 7 == 3) e[r] = kKeys - (r * 5 % 100) - 1;
  e[5] = 0;
  e[6] = 1;
  e[40] = 17;
  return e;
}

struct PQuantCase {
  bool f16, anchored, integer_scores;
};

class PQuant : public Sm90Test, public ::testing::WithParamInterface<PQuantCase> {};

TEST_P(PQuant, MatchesHostQuantizer) {
  const PQuantCase pc = GetParam();
  std::mt19937 rng(1234 + pc.f16 * 2 + pc.anchored);
  std::vector<float> s(kRows * kKeys);
  float c2;
  if (pc.integer_scores) {
    // c2 = 1 and integer scores: S2 - m_ref is an integer, p~ a power of two (ex2.approx is exact
    // on integers), so every P^ must match exactly.
    std::uniform_int_distribution<int> u(-24, 0);
    for (auto& x : s) x = static_cast<float>(u(rng));
    c2 = 1.0f;
  } else {
    // Spread S2 over ~[-25, 5] so blocks get every kind of scale, subnormal E4M3 ones included.
    std::normal_distribution<float> n(0.0f, 24.0f);
    for (auto& x : s) x = n(rng);
    c2 = 0.125f * kLog2e;
    s[9 * kKeys + 37] = std::numeric_limits<float>::quiet_NaN();  // poisons row 9, block 2
  }
  const std::vector<int> ends = key_ends();
  PQuantResult gpu;
  const Status st = run_p_quant(pc.f16, pc.anchored, c2, s, ends, &gpu);
  ASSERT_TRUE(st.ok()) << st.message();
  const HostP ref = host_p(s, ends, c2, pc.anchored);

  // 1. The quantizer itself: host phi_nv of the GPU's p~ == the GPU's P^, exactly.
  const Mismatches self = diff(gpu.p_hat, host_quantize(gpu.p_tilde, pc.anchored), gpu.p_tilde);
  EXPECT_EQ(self.count, 0) << "P^ differs from fake_quantize_block_nv(the GPU's own p~) in "
                           << self.count << " of " << kRows * kKeys << " elements:" << self.first;

  // 2. p~ against exp2f (ex2.approx + one fused rounding: relative error well below 1e-5).
  int64_t bad_p = 0;
  std::ostringstream first_p;
  for (int i = 0; i < kRows * kKeys; ++i) {
    const float g = gpu.p_tilde[i], w = ref.p_tilde[i];
    if (std::isnan(w) && std::isnan(g)) continue;
    const bool ok = pc.integer_scores ? same_value(g, w) : std::fabs(g - w) <= 1e-5f * w + 1e-37f;
    if (!ok && bad_p++ < 8)
      first_p << "\n    row " << i / kKeys << " key " << i % kKeys << ": got " << g << " want "
              << w;
  }
  EXPECT_EQ(bad_p, 0) << "p~ out of tolerance in " << bad_p << " elements:" << first_p.str();

  // 3. P^ against the host pipeline: exact for integer scores; otherwise an element whose p~ sits
  // at an E2M1 (or E4M3 scale) boundary may round the other way after the approximate exp2.
  const Mismatches vs_host = diff(gpu.p_hat, ref.p_hat, gpu.p_tilde);
  const double rate = static_cast<double>(vs_host.count) / (kRows * kKeys);
  if (pc.integer_scores)
    EXPECT_EQ(vs_host.count, 0) << "P^ differs from the host pipeline:" << vs_host.first;
  else
    EXPECT_LE(rate, 1e-3) << "P^ differs from the host pipeline in " << vs_host.count
                          << " elements (rate " << rate << "):" << vs_host.first;
  std::printf("[ p_quant ] %s %s %s scores: P^ mismatches vs host %lld (rate %.2e)\n",
              pc.f16 ? "fp16" : "bf16", pc.anchored ? "anchored" : "paper",
              pc.integer_scores ? "integer" : "random", static_cast<long long>(vs_host.count),
              rate);

  // 4. Row statistics: m_ref exact (both are RN(c2 max s), then ceil), l to 1e-5.
  for (int r = 0; r < kRows; ++r) {
    EXPECT_TRUE(same_value(gpu.m_ref[r], ref.m_ref[r]))
        << "m_ref row " << r << ": got " << gpu.m_ref[r] << " want " << ref.m_ref[r];
    double l_ref = 0;
    for (int c = 0; c < kKeys; ++c) l_ref += ref.p_tilde[r * kKeys + c];
    if (std::isnan(l_ref)) continue;  // the poisoned row
    EXPECT_NEAR(gpu.l[r], l_ref, 1e-5 * l_ref) << "l row " << r;
  }
}

INSTANTIATE_TEST_SUITE_P(
    Sm90, PQuant,
    ::testing::Values(PQuantCase{false, false, false}, PQuantCase{false, true, false},
                      PQuantCase{true, false, false}, PQuantCase{true, true, false},
                      PQuantCase{false, false, true}, PQuantCase{false, true, true},
                      PQuantCase{true, false, true}, PQuantCase{true, true, true}),
    [](const ::testing::TestParamInfo<PQuantCase>& i) {
      return std::string(i.param.f16 ? "fp16_" : "bf16_") +
             (i.param.anchored ? "anchored_" : "paper_") +
             (i.param.integer_scores ? "integer" : "random");
    });

// ---- Softcap (numerics 9.9) ---------------------------------------------------------------------

class Softcap : public Sm90Test {};

// The kernels' tanh (sm90/softcap.cuh: 1 - 2 / (1 + 2^(2 log2(e) |x|)) with ex2.approx and
// rcp.approx) against tanh in double on x = RN(a s): within 5e-7 absolute (its analysis: ~2.4e-7,
// ex2.approx's 2^-22 relative plus the fp32 roundings of 1 + e and 1 - 2r, which cancel near 0),
// never above 1 in magnitude (|S2| <= b), odd; special values as IEEE tanh: +-inf -> +-1,
// NaN -> NaN, +-0 -> +-0. The slope 1 - t^2 within 1e-6 of 1 - tanh^2 (two more roundings).
TEST_F(Softcap, TanhAndSlopeMatchDouble) {
  const float a = 0.08838835f / 30.0f;  // c / softcap for d = 128, softcap 30
  std::vector<float> s;
  for (int i = -200000; i <= 200000; ++i) s.push_back(static_cast<float>(i) * 0.1f);  // x in [-59, 59]
  for (int e = -40; e <= 10; ++e)
    for (const float m : {1.0f, 1.37f, 1.99f}) {
      s.push_back(std::ldexp(m, e) / a);
      s.push_back(-std::ldexp(m, e) / a);
    }
  const float inf = std::numeric_limits<float>::infinity();
  const std::vector<float> special = {inf, -inf, std::numeric_limits<float>::quiet_NaN(), 0.0f, -0.0f};
  s.insert(s.end(), special.begin(), special.end());
  std::vector<float> t, slope;
  const Status st = run_softcap(a, s, &t, &slope);
  ASSERT_TRUE(st.ok()) << st.message();
  double worst = 0, worst_slope = 0;
  int64_t bad = 0;
  std::ostringstream first;
  const size_t n_finite = s.size() - special.size();
  for (size_t i = 0; i < n_finite; ++i) {
    const float x = a * s[i];  // RN(a s), as the kernel forms it
    const double want = std::tanh(static_cast<double>(x));
    const double err = std::fabs(t[i] - want), err_slope = std::fabs(slope[i] - (1 - want * want));
    worst = std::max(worst, err);
    worst_slope = std::max(worst_slope, err_slope);
    if (!(err <= 5e-7 && err_slope <= 1e-6 && std::fabs(t[i]) <= 1.0f) && bad++ < 8)
      first << "\n    x " << x << ": t " << t[i] << " (want " << want << "), slope " << slope[i];
  }
  std::printf("[ softcap ] tanh max abs error %.3e, slope %.3e\n", worst, worst_slope);
  EXPECT_EQ(bad, 0) << bad << " elements out of tolerance:" << first.str();
  const size_t k = n_finite;
  EXPECT_EQ(t[k], 1.0f);
  EXPECT_EQ(t[k + 1], -1.0f);
  EXPECT_TRUE(std::isnan(t[k + 2]));
  EXPECT_TRUE(t[k + 3] == 0.0f && !std::signbit(t[k + 3]));
  EXPECT_TRUE(t[k + 4] == 0.0f && std::signbit(t[k + 4]));
  EXPECT_EQ(slope[k], 0.0f);
  EXPECT_EQ(slope[k + 3], 1.0f);
}

// ---- GEMM layouts ------------------------------------------------------------------------------

struct GemmCase {
  bool f16;
  int d;
};

class GemmLayout : public Sm90Test, public ::testing::WithParamInterface<GemmCase> {};

std::vector<double> matmul_nt(const std::vector<float>& a, const std::vector<float>& b, int m,
                              int n, int k) {  // a [m, k] b [n, k] -> [m, n]
  std::vector<double> c(static_cast<size_t>(m) * n, 0.0);
  for (int i = 0; i < m; ++i)
    for (int j = 0; j < n; ++j)
      for (int x = 0; x < k; ++x) c[i * n + j] += static_cast<double>(a[i * k + x]) * b[j * k + x];
  return c;
}

// Compares exactly; on failure lists the first wrong positions. With `decode`, S = r + 256 c
// and the message also says which (r, c) the wrong value belongs to.
::testing::AssertionResult exact(const char* what, const std::vector<float>& got,
                                 const std::vector<double>& want, int cols, bool decode) {
  int64_t bad = 0;
  std::ostringstream os;
  for (size_t i = 0; i < got.size(); ++i) {
    if (static_cast<double>(got[i]) == want[i]) continue;
    if (bad++ < 10) {
      os << "\n    [" << i / cols << ", " << i % cols << "] got " << got[i] << " want " << want[i];
      if (decode && std::isfinite(got[i]) && got[i] >= 0)
        os << " (= the value of [" << static_cast<int64_t>(got[i]) % 256 << ", "
           << static_cast<int64_t>(got[i]) / 256 << "])";
    }
  }
  if (bad == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << what << ": " << bad << " of " << got.size()
                                       << " elements wrong (rows: query rows of the CTA, 0-63 "
                                          "warpgroup 0, 64-127 warpgroup 1):"
                                       << os.str();
}

TEST_P(GemmLayout, EncodedPositions) {
  // Q[r][d0] = r, Q[r][d1] = 1; K[c][d0] = 1, K[c][d1] = 256 c: S[r][c] = r + 256 c names its
  // own position. d0 in the last 16-column slab, d1 in the second: two different k16 steps (and
  // two chunks at d = 128). P[r][c] = 1 iff c = (3r + 1) % 128, V[c][d] = c % 16 + 16 (d % 8).
  const GemmCase gc = GetParam();
  const int d = gc.d, n = 128, d0 = d - 1, d1 = 17;
  std::vector<float> q(n * d, 0.0f), k(n * d, 0.0f), v(n * d), p(n * n, 0.0f);
  for (int r = 0; r < n; ++r) {
    q[r * d + d0] = static_cast<float>(r);
    q[r * d + d1] = 1.0f;
    k[r * d + d0] = 1.0f;
    k[r * d + d1] = 256.0f * r;
    p[r * n + (3 * r + 1) % n] = 1.0f;
    for (int x = 0; x < d; ++x) v[r * d + x] = static_cast<float>(r % 16 + 16 * (x % 8));
  }
  GemmResult res;
  const Status st = run_gemm_layout(gc.f16, d, q, k, v, p, &res);
  ASSERT_TRUE(st.ok()) << st.message();
  EXPECT_TRUE(exact("S = Q K^T", res.s, matmul_nt(q, k, n, n, d), n, true));
  std::vector<float> vt(d * n);
  for (int r = 0; r < n; ++r)
    for (int x = 0; x < d; ++x) vt[x * n + r] = v[r * d + x];
  EXPECT_TRUE(exact("O = P V", res.o, matmul_nt(p, vt, n, d, n), d, false));
}

TEST_P(GemmLayout, RandomIntegers) {
  // Every element of Q, K, V in {-2..2} and P in {-1..2}: all sums exact in fp32.
  const GemmCase gc = GetParam();
  const int d = gc.d, n = 128;
  std::mt19937 rng(7 + d + gc.f16);
  std::uniform_int_distribution<int> u(-2, 2), up(-1, 2);
  std::vector<float> q(n * d), k(n * d), v(n * d), p(n * n);
  for (auto* t : {&q, &k, &v})
    for (auto& x : *t) x = static_cast<float>(u(rng));
  for (auto& x : p) x = static_cast<float>(up(rng));
  GemmResult res;
  const Status st = run_gemm_layout(gc.f16, d, q, k, v, p, &res);
  ASSERT_TRUE(st.ok()) << st.message();
  EXPECT_TRUE(exact("S = Q K^T", res.s, matmul_nt(q, k, n, n, d), n, false));
  std::vector<float> vt(d * n);
  for (int r = 0; r < n; ++r)
    for (int x = 0; x < d; ++x) vt[x * n + r] = v[r * d + x];
  EXPECT_TRUE(exact("O = P V", res.o, matmul_nt(p, vt, n, d, n), d, false));
}

INSTANTIATE_TEST_SUITE_P(Sm90, GemmLayout,
                         ::testing::Values(GemmCase{false, 64}, GemmCase{false, 128},
                                           GemmCase{true, 64}, GemmCase{true, 128}),
                         [](const ::testing::TestParamInfo<GemmCase>& i) {
                           return std::string(i.param.f16 ? "fp16" : "bf16") + "_d" +
                                  std::to_string(i.param.d);
                         });

}  // namespace
}  // namespace attnqat::gpu_test
