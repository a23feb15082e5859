// Formats and block quantizers (docs/numerics.md sections 1-2) against independent brute-force
// implementations: nearest value by exhaustive search, in double precision.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "attnqat/formats.h"
#include "common/host_convert.h"

namespace attnqat {
namespace {

constexpr double kE2M1[8] = {0, 0.5, 1, 1.5, 2, 3, 4, 6};

// Nearest E2M1 value by exhaustive search; ties go to the even code; sign kept; zero is +0.
uint8_t brute_e2m1(float y) {
  const double a = std::fabs(static_cast<double>(y));
  // Values are increasing, so a is nearer to candidate c than to the current best exactly when
  // it lies above their midpoint (an exact comparison: no subtraction of large numbers).
  int best = 0;
  for (int c = 1; c < 8; ++c) {
    const double mid = (kE2M1[best] + kE2M1[c]) / 2;
    if (a > mid || (a == mid && c % 2 == 0)) best = c;
  }
  if (best == 0) return 0;
  return static_cast<uint8_t>(best | (std::signbit(y) ? 8 : 0));
}

// The 127 non-negative finite E4M3 values by code, from the bit-field definition.
double e4m3_value_of(int code) {
  const int e = (code >> 3) & 0xF, m = code & 7;
  return e == 0 ? std::ldexp(m, -9) : std::ldexp(1.0 + m / 8.0, e - 7);
}

// Nearest E4M3 by exhaustive search (ties to even code), satfinite, NaN -> 0x7F.
uint8_t brute_e4m3(float t) {
  if (std::isnan(t)) return 0x7F;
  const double a = std::fabs(static_cast<double>(t));
  int best = 0;
  for (int c = 1; c <= 0x7E; ++c) {
    const double mid = (e4m3_value_of(best) + e4m3_value_of(c)) / 2;
    if (a > mid || (a == mid && c % 2 == 0)) best = c;
  }
  return static_cast<uint8_t>(best | (std::signbit(t) ? 0x80 : 0));
}

TEST(E2M1, EveryBf16ValueMatchesBruteForce) {
  int checked = 0, mismatches = 0;
  for (uint32_t h = 0; h < 65536; ++h) {
    const float y = bf16_to_float(static_cast<uint16_t>(h));
    if (!std::isfinite(y)) continue;
    const uint8_t got = e2m1_encode(y), want = brute_e2m1(y);
    if (got != want && mismatches++ < 10)
      ADD_FAILURE() << "bf16 0x" << std::hex << h << " = " << y << ": got code " << int(got)
                    << ", want " << int(want);
    EXPECT_EQ(e2m1_round(y), static_cast<float>(e2m1_decode(want)));
    ++checked;
  }
  EXPECT_EQ(mismatches, 0);
  EXPECT_EQ(checked, 65536 - 256);  // all but the 256 NaN/Inf patterns (exponent all ones)
}

TEST(E2M1, DenseSweepAroundEveryRoundingBoundary) {
  const float boundaries[] = {0.25f, 0.75f, 1.25f, 1.75f, 2.5f, 3.5f, 5.0f, 6.0f};
  int mismatches = 0;
  for (float b : boundaries) {
    for (float sign : {1.0f, -1.0f}) {
      float y = sign * b;
      for (int i = 0; i < 2000; ++i) y = std::nextafter(y, 0.0f);
      for (int i = 0; i < 4000; ++i, y = std::nextafter(y, sign * INFINITY))
        if (e2m1_encode(y) != brute_e2m1(y)) ++mismatches;
    }
  }
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> dist(-16.0f, 16.0f);
  for (int i = 0; i < 1000000; ++i) {
    const float y = dist(rng);
    if (e2m1_encode(y) != brute_e2m1(y)) ++mismatches;
  }
  EXPECT_EQ(mismatches, 0);
}

TEST(E2M1, TiesAndSaturationAsTheTableSays) {
  // Ties go to the even code: 0.25->0, 0.75->1, 1.25->1, 1.75->2, 2.5->2, 3.5->4, 5->4.
  EXPECT_EQ(e2m1_round(0.25f), 0.0f);
  EXPECT_EQ(e2m1_round(0.75f), 1.0f);
  EXPECT_EQ(e2m1_round(1.25f), 1.0f);
  EXPECT_EQ(e2m1_round(1.75f), 2.0f);
  EXPECT_EQ(e2m1_round(2.5f), 2.0f);
  EXPECT_EQ(e2m1_round(3.5f), 4.0f);
  EXPECT_EQ(e2m1_round(5.0f), 4.0f);
  EXPECT_EQ(e2m1_round(5.0001f), 6.0f);
  EXPECT_EQ(e2m1_round(1e30f), 6.0f);
  EXPECT_EQ(e2m1_round(-1e30f), -6.0f);
  EXPECT_EQ(e2m1_encode(-0.1f), 0);  // a zero result is +0
  EXPECT_FALSE(std::signbit(e2m1_round(-0.1f)));
}

TEST(E2M1, DecodeAllSixteenCodes) {
  for (int c = 0; c < 16; ++c) {
    const double want = (c & 8 ? -1 : 1) * kE2M1[c & 7];
    EXPECT_EQ(e2m1_decode(static_cast<uint8_t>(c)), want) << "code " << c;
  }
}

TEST(E4M3, All256Codes) {
  for (int c = 0; c < 256; ++c) {
    const float v = e4m3_decode(static_cast<uint8_t>(c));
    if ((c & 0x7F) == 0x7F) {
      EXPECT_TRUE(std::isnan(v)) << "code " << c;
      continue;
    }
    const double want = (c & 0x80 ? -1 : 1) * e4m3_value_of(c & 0x7F);
    EXPECT_EQ(v, want) << "code " << c;
    EXPECT_EQ(e4m3_encode(v), c) << "round trip of code " << c;  // -0 keeps its sign bit too
  }
  EXPECT_EQ(e4m3_decode(0x7E), 448.0f);
  EXPECT_EQ(e4m3_decode(0x01), std::ldexp(1.0f, -9));
}

TEST(E4M3, EncodeMatchesBruteForce) {
  int mismatches = 0;
  // Every midpoint between neighbours (the ties), and one ulp either side of it.
  for (int c = 0; c < 0x7E; ++c) {
    const float mid = static_cast<float>((e4m3_value_of(c) + e4m3_value_of(c + 1)) / 2);
    for (float t : {mid, std::nextafter(mid, 0.0f), std::nextafter(mid, 1e9f), -mid})
      if (e4m3_encode(t) != brute_e4m3(t)) ++mismatches;
  }
  std::mt19937 rng(11);
  std::uniform_real_distribution<float> expo(-14.0f, 10.0f);
  for (int i = 0; i < 200000; ++i) {
    const float t = std::exp2(expo(rng)) * (i % 2 ? -1.0f : 1.0f);
    if (e4m3_encode(t) != brute_e4m3(t)) ++mismatches;
  }
  EXPECT_EQ(mismatches, 0);
  // satfinite
  EXPECT_EQ(e4m3_encode(464.0f), 0x7E);
  EXPECT_EQ(e4m3_encode(1e30f), 0x7E);
  EXPECT_EQ(e4m3_encode(INFINITY), 0x7E);
  EXPECT_EQ(e4m3_encode(-INFINITY), 0xFE);
  EXPECT_EQ(e4m3_encode(NAN), 0x7F);
}

TEST(E8M0, AllCodes) {
  for (int c = 0; c < 255; ++c) EXPECT_EQ(e8m0_decode(static_cast<uint8_t>(c)), std::ldexp(1.0, c - 127));
  EXPECT_TRUE(std::isnan(e8m0_decode(255)));
}

TEST(Packing, RoundTripsEveryByte) {
  for (int b = 0; b < 256; ++b) {
    const uint8_t byte = static_cast<uint8_t>(b);
    EXPECT_EQ(pack_codes(unpack_code(byte, 0), unpack_code(byte, 1)), byte);
  }
  EXPECT_EQ(pack_codes(0x3, 0xA), 0xA3);  // element 2i in the low nibble
}

// ---- NVFP4 blocks ----------------------------------------------------------------------------

std::vector<float> nv_roundtrip(std::vector<float> x, float g = 1.0f) {
  fake_quantize_block_nv(x.data(), g);
  return x;
}

TEST(NvBlock, AllZeros) {
  float x[16] = {};
  uint8_t codes[16];
  EXPECT_EQ(quantize_block_nv(x, 1.0f, codes), 0);
  for (uint8_t c : codes) EXPECT_EQ(c, 0);
}

TEST(NvBlock, OneNonzeroElement) {
  std::vector<float> x(16, 0.0f);
  x[5] = 3.0f;  // s = e4m3(3/6) = 0.5, d = 0.5, 3 * 2 = 6 -> code 7 exactly
  uint8_t codes[16];
  EXPECT_EQ(e4m3_decode(quantize_block_nv(x.data(), 1.0f, codes)), 0.5f);
  EXPECT_EQ(codes[5], 7);
  EXPECT_EQ(nv_roundtrip(x)[5], 3.0f);
}

TEST(NvBlock, TiesRoundToEvenCodes) {
  // amax 6 -> s = 1, d = 1, inv = 1: the elements are the E2M1 ties themselves.
  std::vector<float> x = {6, 0.25f, 0.75f, 1.25f, 1.75f, 2.5f, 3.5f, 5, -0.25f, -0.75f, -5, 0, 0, 0, 0, 0};
  const std::vector<float> want = {6, 0, 1, 1, 2, 2, 4, 4, 0, -1, -4, 0, 0, 0, 0, 0};
  EXPECT_EQ(nv_roundtrip(x), want);
}

TEST(NvBlock, AmaxAtTheE4M3Limits) {
  std::vector<float> x(16, 1.0f);
  x[0] = 2688.0f;  // 6 * 448: s = 448 exactly
  uint8_t codes[16];
  EXPECT_EQ(quantize_block_nv(x.data(), 1.0f, codes), 0x7E);
  EXPECT_EQ(codes[0], 7);
  // Saturation: amax beyond 6 * 448 keeps s = 448 and the large elements saturate at 6 * 448.
  x[0] = 1e6f;
  x[1] = -5000.0f;
  EXPECT_EQ(quantize_block_nv(x.data(), 1.0f, codes), 0x7E);
  const auto y = nv_roundtrip(x);
  EXPECT_EQ(y[0], 2688.0f);
  EXPECT_EQ(y[1], -2688.0f);
}

TEST(NvBlock, SubnormalScales) {
  std::vector<float> x(16, 0.0f);
  x[0] = 6.0f * std::ldexp(1.0f, -9);  // s = 2^-9, the smallest subnormal E4M3
  uint8_t codes[16];
  EXPECT_EQ(quantize_block_nv(x.data(), 1.0f, codes), 0x01);
  EXPECT_EQ(codes[0], 7);
  x[0] = 6.0f * 3 * std::ldexp(1.0f, -9);  // s = 3 * 2^-9 (subnormal code 3)
  EXPECT_EQ(quantize_block_nv(x.data(), 1.0f, codes), 0x03);
  // a/6 = 2^-10 is the tie between 0 and 2^-9: rounds to even (0), the block flushes to zero.
  x[0] = 6.0f * std::ldexp(1.0f, -10);
  EXPECT_EQ(quantize_block_nv(x.data(), 1.0f, codes), 0x00);
  for (float v : nv_roundtrip(x)) EXPECT_EQ(v, 0.0f);
  // Just above the tie: s = 2^-9, and x * inv = 6 * 2^-10 * 2^9 = 3.00..., code 5.
  x[0] = std::nextafter(6.0f * std::ldexp(1.0f, -10), 1.0f);
  EXPECT_EQ(quantize_block_nv(x.data(), 1.0f, codes), 0x01);
  EXPECT_EQ(codes[0], 5);
}

TEST(NvBlock, PoisonedBlocks) {
  for (float bad : {NAN, INFINITY, -INFINITY}) {
    std::vector<float> x(16, 1.0f);
    x[9] = bad;
    uint8_t codes[16];
    EXPECT_EQ(quantize_block_nv(x.data(), 1.0f, codes), kE4M3NaN);
    for (float v : nv_roundtrip(x)) EXPECT_TRUE(std::isnan(v)) << "non-finite input must decode to NaN";
  }
}

TEST(NvBlock, SecondLevelScaleCommutesWithPowersOfTwo) {
  std::mt19937 rng(3);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  for (int t = 0; t < 1000; ++t) {
    std::vector<float> x(16), xs(16);
    for (int i = 0; i < 16; ++i) {
      x[i] = dist(rng);
      xs[i] = std::ldexp(x[i], -11);
    }
    uint8_t c1[16], c2[16];
    EXPECT_EQ(quantize_block_nv(x.data(), 1.0f, c1), quantize_block_nv(xs.data(), kAnchoredPScale, c2));
    EXPECT_EQ(std::memcmp(c1, c2, 16), 0);
  }
}

TEST(NvBlock, MatchesTheSpecStepByStep) {
  // An independent transcription of numerics 2 in double for random blocks (all steps are exact
  // in double except the RN points, which are reproduced with float casts).
  std::mt19937 rng(5);
  std::lognormal_distribution<float> mag(0.0f, 3.0f);
  int mismatches = 0;
  for (int t = 0; t < 20000; ++t) {
    float x[16];
    for (float& v : x) v = mag(rng) * (rng() % 2 ? 1.0f : -1.0f);
    const float g = std::ldexp(1.0f, static_cast<int>(rng() % 9) - 4);
    double a = 0;
    for (float v : x) a = std::max(a, std::fabs(static_cast<double>(v)));
    const uint8_t s_bits = brute_e4m3(static_cast<float>(a / static_cast<float>(6.0 * g)));
    const double s = e4m3_value_of(s_bits & 0x7F);
    uint8_t codes[16];
    if (quantize_block_nv(x, g, codes) != s_bits) ++mismatches;
    if (s == 0) continue;
    const float inv = static_cast<float>(1.0 / static_cast<float>(s * g));
    for (int i = 0; i < 16; ++i)
      if (codes[i] != brute_e2m1(static_cast<float>(static_cast<double>(x[i]) * inv))) ++mismatches;
  }
  EXPECT_EQ(mismatches, 0);
}

// ---- MXFP4 blocks ----------------------------------------------------------------------------

TEST(MxBlock, ScalesAndCodes) {
  std::vector<float> x(32, 0.0f);
  uint8_t codes[32];
  EXPECT_EQ(quantize_block_mx(x.data(), codes), 0);  // all zeros: scale code 0
  for (uint8_t c : codes) EXPECT_EQ(c, 0);
  x[0] = 6.0f;  // floor(log2 6) - 2 = 0: scale 2^0
  x[1] = 1.25f;
  x[2] = 7.0f;  // amax 7: e = 0, 7 saturates to 6
  EXPECT_EQ(quantize_block_mx(x.data(), codes), 127);
  EXPECT_EQ(codes[0], 7);
  EXPECT_EQ(codes[1], 2);  // tie 1.25 -> 1
  EXPECT_EQ(codes[2], 7);
  x.assign(32, 0.0f);
  x[3] = 1.0f;  // e = -2, scale 2^-2, 1 * 4 = 4 -> code 6
  EXPECT_EQ(quantize_block_mx(x.data(), codes), 125);
  EXPECT_EQ(codes[3], 6);
  EXPECT_EQ(dequantize_mx(codes[3], 125), 1.0f);
  x[3] = std::numeric_limits<float>::denorm_min();  // e clamps to -127
  EXPECT_EQ(quantize_block_mx(x.data(), codes), 0);
  x[4] = NAN;
  EXPECT_EQ(quantize_block_mx(x.data(), codes), kE8M0NaN);
  EXPECT_TRUE(std::isnan(dequantize_mx(0, kE8M0NaN)));
}

TEST(MxBlock, RandomBlocksMatchBruteForce) {
  std::mt19937 rng(9);
  std::lognormal_distribution<float> mag(0.0f, 4.0f);
  int mismatches = 0;
  for (int t = 0; t < 20000; ++t) {
    float x[32];
    for (float& v : x) v = mag(rng) * (rng() % 2 ? 1.0f : -1.0f);
    double a = 0;
    for (float v : x) a = std::max(a, std::fabs(static_cast<double>(v)));
    const int e = static_cast<int>(std::floor(std::log2(a))) - 2;
    uint8_t codes[32];
    if (quantize_block_mx(x, codes) != e + 127) ++mismatches;
    for (int i = 0; i < 32; ++i)
      if (codes[i] != brute_e2m1(static_cast<float>(std::ldexp(static_cast<double>(x[i]), -e)))) ++mismatches;
  }
  EXPECT_EQ(mismatches, 0);
}

TEST(GlobalScale, SmallestPowerOfTwoThatAvoidsSaturation) {
  EXPECT_EQ(nvfp4_global_scale(2688.0f), 1.0f);
  EXPECT_EQ(nvfp4_global_scale(std::nextafter(2688.0f, 1e9f)), 2.0f);
  EXPECT_EQ(nvfp4_global_scale(1.0f), std::ldexp(1.0f, -11));
  EXPECT_EQ(nvfp4_global_scale(0.0f), 1.0f);
  EXPECT_EQ(nvfp4_global_scale(INFINITY), 1.0f);
  EXPECT_EQ(nvfp4_global_scale(NAN), 1.0f);
  EXPECT_EQ(nvfp4_global_scale(1e-38f), std::ldexp(1.0f, -100));  // clamped
  std::mt19937 rng(1);
  std::uniform_real_distribution<float> expo(-60.0f, 60.0f);
  for (int t = 0; t < 10000; ++t) {
    const float a = std::exp2(expo(rng));
    const float g = nvfp4_global_scale(a);
    EXPECT_TRUE(is_power_of_two(g));
    EXPECT_LE(static_cast<double>(a), 2688.0 * g);
    EXPECT_GT(static_cast<double>(a), 1344.0 * g);
  }
  EXPECT_FALSE(is_power_of_two(3.0f));
  EXPECT_FALSE(is_power_of_two(0.0f));
  EXPECT_FALSE(is_power_of_two(-2.0f));
  EXPECT_TRUE(is_power_of_two(0.125f));
}

}  // namespace
}  // namespace attnqat
