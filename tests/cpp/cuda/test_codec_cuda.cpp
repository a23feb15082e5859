// GPU tests of the device codec (src/cuda/common/codec.cuh) against the CPU reference codec
// (attnqat/formats.h, src/reference/codec.cpp), bit for bit: every bf16 and every finite fp32
// through the E2M1 rounding, every E4M3 byte and E8M0 code, E4M3 encoding at ties, saturation,
// Inf and NaN, the block-scale division and reciprocal for every E4M3 scale, the global scale and
// the MX scale. On sm_100a/sm_120a the dispatching entry points use the hardware E2M1 convert;
// the *_sw ones are the software path, tested on every GPU.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "attnqat/formats.h"
#include "codec_kernels.h"
#include "common/host_convert.h"
#include "cuda_test_util.h"

namespace attnqat::cuda_test {
namespace {

std::vector<uint8_t> float_bytes(const std::vector<float>& v) {
  std::vector<uint8_t> b(v.size() * 4);
  std::memcpy(b.data(), v.data(), b.size());
  return b;
}

// Every finite bf16 value (both signs), as fp32.
std::vector<float> every_finite_bf16() {
  std::vector<float> v;
  for (uint32_t h = 0; h < 0x10000; ++h) {
    const float f = bf16_to_float(static_cast<uint16_t>(h));
    if (std::isfinite(f)) v.push_back(f);
  }
  return v;
}

// Random finite fp32 with exponents spread over [lo, hi] (biased), both signs.
std::vector<float> random_fp32(size_t n, uint32_t seed, int lo = 1, int hi = 254) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<uint32_t> mant(0, 0x7FFFFF), sign(0, 1);
  std::uniform_int_distribution<int> expo(lo, hi);
  std::vector<float> v(n);
  for (float& f : v) f = float_of((sign(rng) << 31) | (static_cast<uint32_t>(expo(rng)) << 23) | mant(rng));
  return v;
}

// x and its neighbours one and two ulps away on both sides.
void push_with_neighbours(std::vector<float>& v, float x) {
  float lo = x, hi = x;
  v.push_back(x);
  for (int k = 0; k < 2; ++k) {
    lo = std::nextafter(lo, -INFINITY);
    hi = std::nextafter(hi, INFINITY);
    v.push_back(lo);
    v.push_back(hi);
  }
}

class CodecCuda : public CudaTest {};

TEST_F(CodecCuda, E2M1EveryBf16MatchesReference) {
  const std::vector<float> y = every_finite_bf16();
  const E2M1Results r = e2m1_on_device(y);
  std::vector<float> want_round(y.size()), want_abs(y.size()), want_decode(y.size());
  std::vector<uint8_t> want_code(y.size());
  for (size_t i = 0; i < y.size(); ++i) {
    want_round[i] = e2m1_round(y[i]);
    want_abs[i] = e2m1_round(std::fabs(y[i]));
    want_code[i] = e2m1_encode(y[i]);
    want_decode[i] = e2m1_decode(want_code[i]);
  }
  EXPECT_TRUE(same_elements("e2m1_round_sw", DType::kFloat32, float_bytes(r.round_sw), float_bytes(want_round)));
  EXPECT_TRUE(same_elements("e2m1_round", DType::kFloat32, float_bytes(r.round), float_bytes(want_round)));
  EXPECT_TRUE(same_elements("e2m1_round_abs_sw", DType::kFloat32, float_bytes(r.round_abs_sw), float_bytes(want_abs)));
  EXPECT_TRUE(same_elements("e2m1_round_abs", DType::kFloat32, float_bytes(r.round_abs), float_bytes(want_abs)));
  EXPECT_TRUE(same_elements("e2m1_encode", DType::kUInt8, r.encode, want_code));
  EXPECT_TRUE(same_elements("e2m1_decode", DType::kFloat32, float_bytes(r.decode_of_encode), float_bytes(want_decode)));
}

TEST_F(CodecCuda, SpecTableTranscriptionMatchesReference) {
  // The device transcription of the spec table that the all-fp32 sweep compares against must
  // itself be the reference: check it on every bf16, every threshold +-2 ulps and random fp32.
  std::vector<float> y = every_finite_bf16();
  for (float t : {0.25f, 0.75f, 1.25f, 1.75f, 2.5f, 3.5f, 5.0f, 6.0f, 0.0f}) {
    push_with_neighbours(y, t);
    push_with_neighbours(y, -t);
  }
  const std::vector<float> rnd = random_fp32(1 << 20, 11, 100, 140);
  y.insert(y.end(), rnd.begin(), rnd.end());
  const std::vector<uint8_t> got = spec_e2m1_code_on_device(y);
  std::vector<uint8_t> want(y.size());
  for (size_t i = 0; i < y.size(); ++i) want[i] = e2m1_encode(y[i]);
  EXPECT_TRUE(same_elements("spec_e2m1_code", DType::kUInt8, got, want));
}

TEST_F(CodecCuda, E2M1EveryFiniteFp32MatchesSpecTable) {
  // 2^32 - 2^24 inputs (every finite fp32 of both signs, so all of [0, 16] too), each through
  // e2m1_round_sw, e2m1_round, e2m1_round_abs_sw, e2m1_round_abs, e2m1_encode, e2m1_decode and
  // both packers, compared on the GPU.
  const SweepResult r = e2m1_sweep_all_fp32();
  EXPECT_EQ(r.checked, (1ull << 32) - (1ull << 24));
  std::ostringstream examples;
  for (size_t i = 0; i < r.examples.size(); ++i)
    examples << "\n  y = 0x" << std::hex << r.examples[i] << " (" << float_of(r.examples[i])
             << ") failed checks 0x" << r.checks[i] << std::dec
             << " (1 round_sw, 2 round, 4 abs_sw, 8 abs, 16 encode, 32 decode, 64 pack_sw, 128 pack)";
  EXPECT_EQ(r.mismatches, 0u) << r.mismatches << " of " << r.checked << " inputs differ; first:"
                              << examples.str();
}

TEST_F(CodecCuda, E2M1Pack8MatchesPackCodes) {
  // Groups of 8 with mixed signs, zeros of both signs and values on every threshold, so that the
  // per-nibble sign fix-up sees every neighbour combination.
  std::mt19937 rng(21);
  const std::vector<float> pool = {0.0f, -0.0f, 0.1f, -0.1f, 0.25f, -0.25f, 0.26f, -0.74f, 0.75f,
                                   -1.25f, 1.3f, -1.75f, 2.5f, -2.6f, 3.5f, -3.49f, 5.0f, -5.01f,
                                   6.0f, -7.0f, 1e9f, -1e-30f, 4.0f, -0.5f};
  std::uniform_int_distribution<size_t> pick(0, pool.size() - 1);
  std::vector<float> y(8 * 200000);
  for (float& v : y) v = pool[pick(rng)];
  std::vector<uint32_t> sw, hw;
  e2m1_pack8_on_device(y, sw, hw);
  std::vector<uint32_t> want(y.size() / 8, 0);
  for (size_t g = 0; g < want.size(); ++g)
    for (int k = 0; k < 8; ++k) want[g] |= static_cast<uint32_t>(e2m1_encode(y[8 * g + k])) << (4 * k);
  auto bytes = [](const std::vector<uint32_t>& v) {
    std::vector<uint8_t> b(v.size() * 4);
    std::memcpy(b.data(), v.data(), b.size());
    return b;
  };
  EXPECT_TRUE(same_elements("e2m1_pack8_sw (as bytes)", DType::kUInt8, bytes(sw), bytes(want)));
  EXPECT_TRUE(same_elements("e2m1_pack8 (as bytes)", DType::kUInt8, bytes(hw), bytes(want)));
}

TEST_F(CodecCuda, E4M3DecodeEveryByte) {
  std::vector<uint8_t> bytes(256);
  for (int i = 0; i < 256; ++i) bytes[i] = static_cast<uint8_t>(i);
  const std::vector<float> got = e4m3_decode_on_device(bytes);
  std::vector<float> want(256);
  for (int i = 0; i < 256; ++i) want[i] = e4m3_decode(bytes[i]);
  EXPECT_TRUE(same_elements("e4m3_decode", DType::kFloat32, float_bytes(got), float_bytes(want)));
  EXPECT_TRUE(std::isnan(got[0x7F]));
  EXPECT_TRUE(std::isnan(got[0xFF]));
  EXPECT_EQ(got[0x7E], 448.0f);
  EXPECT_EQ(got[0x01], std::ldexp(1.0f, -9));  // smallest subnormal, no flush
}

TEST_F(CodecCuda, E4M3EncodeTiesSaturationInfNaN) {
  std::vector<float> t;
  // Every E4M3 magnitude, the midpoints between neighbours (ties), +-2 ulps around each.
  for (int b = 0; b <= 0x7E; ++b) {
    const float v = e4m3_decode(static_cast<uint8_t>(b));
    push_with_neighbours(t, v);
    push_with_neighbours(t, -v);
    if (b < 0x7E) {
      const float mid = 0.5f * (v + e4m3_decode(static_cast<uint8_t>(b + 1)));
      push_with_neighbours(t, mid);
      push_with_neighbours(t, -mid);
    }
  }
  for (float v : {448.0f, 460.0f, 464.0f, 470.0f, 480.0f, 1e5f, 3.0e38f,
                  std::numeric_limits<float>::max(), INFINITY, std::ldexp(1.0f, -10),
                  std::ldexp(3.0f, -10), std::ldexp(1.0f, -11), 1e-30f, 1e-45f, 0.0f}) {
    push_with_neighbours(t, v);
    push_with_neighbours(t, -v);
  }
  t.push_back(INFINITY);
  t.push_back(-INFINITY);
  t.push_back(std::numeric_limits<float>::quiet_NaN());
  t.push_back(-std::numeric_limits<float>::quiet_NaN());
  t.push_back(float_of(0x7F800001u));  // signalling NaN pattern
  t.push_back(float_of(0xFFFFFFFFu));
  for (uint32_t h = 0; h < 0x10000; ++h) t.push_back(bf16_to_float(static_cast<uint16_t>(h)));  // incl. Inf, NaN
  const std::vector<float> rnd = random_fp32(1 << 20, 12, 110, 140);
  t.insert(t.end(), rnd.begin(), rnd.end());
  const std::vector<uint8_t> got = e4m3_encode_on_device(t);
  std::vector<uint8_t> want(t.size());
  for (size_t i = 0; i < t.size(); ++i) want[i] = e4m3_encode(t[i]);
  EXPECT_TRUE(same_elements("e4m3_encode", DType::kUInt8, got, want));
}

TEST_F(CodecCuda, E8M0DecodeEveryCode) {
  std::vector<uint8_t> codes(256);
  for (int i = 0; i < 256; ++i) codes[i] = static_cast<uint8_t>(i);
  const std::vector<float> got = e8m0_decode_on_device(codes);
  std::vector<float> want(256);
  for (int i = 0; i < 256; ++i) want[i] = e8m0_decode(codes[i]);
  EXPECT_TRUE(same_elements("e8m0_decode", DType::kFloat32, float_bytes(got), float_bytes(want)));
  EXPECT_TRUE(std::isnan(got[255]));
}

// The second-level scales the tests use for the block scale (powers of two, incl. the clamps).
std::vector<float> test_global_scales() {
  std::vector<float> g;
  for (int k : {0, -11, -100, 100, -50, 20, -1, 1, 7, -126 + 30}) g.push_back(std::ldexp(1.0f, k));
  return g;
}

TEST_F(CodecCuda, NvBlockScaleDivisionAndReciprocal) {
  // amax candidates: every non-negative finite bf16, Inf, NaN, and for every E4M3 value s the
  // amax 6*g*s (+-2 ulps) and the amax at the midpoint to the next scale (E4M3 ties).
  std::vector<float> base;
  for (uint32_t h = 0; h < 0x8000; ++h) base.push_back(bf16_to_float(static_cast<uint16_t>(h)));
  const std::vector<float> rnd = random_fp32(1 << 16, 13, 80, 170);
  for (float v : rnd) base.push_back(std::fabs(v));
  std::vector<float> amax, g;
  for (float gv : test_global_scales()) {
    std::vector<float> a = base;
    for (int b = 0; b <= 0x7E; ++b) {
      const float s = e4m3_decode(static_cast<uint8_t>(b));
      push_with_neighbours(a, 6.0f * gv * s);
      if (b < 0x7E) push_with_neighbours(a, 6.0f * gv * 0.5f * (s + e4m3_decode(static_cast<uint8_t>(b + 1))));
    }
    for (float& v : a) v = std::fabs(v);
    amax.insert(amax.end(), a.begin(), a.end());
    g.insert(g.end(), a.size(), gv);
  }
  const NvScaleResults r = nv_scale_on_device(amax, g);
  std::vector<float> want_q(amax.size()), want_inv(amax.size());
  std::vector<uint8_t> want_s(amax.size());
  size_t fast_domain = 0, fast_byte_off = 0;
  for (size_t i = 0; i < amax.size(); ++i) {
    const float six_g = 6.0f * g[i];
    want_q[i] = amax[i] / six_g;
    float block[kNvBlock] = {};
    block[0] = amax[i];
    uint8_t codes[kNvBlock];
    want_s[i] = quantize_block_nv(block, g[i], codes);
    const float s = e4m3_decode(want_s[i]);
    want_inv[i] = (std::isfinite(amax[i]) && s != 0.0f) ? 1.0f / (s * g[i]) : 0.0f;
    // The fast quotient gives the same E4M3 byte wherever the quotient does not overflow.
    if (std::isfinite(amax[i]) && std::isfinite(want_q[i]) && want_q[i] < std::ldexp(1.0f, 127)) {
      ++fast_domain;
      if (e4m3_encode(r.quotient_fast[i]) != e4m3_encode(want_q[i])) {
        if (fast_byte_off < 5)
          ADD_FAILURE() << "fast quotient: a = " << amax[i] << ", g = " << g[i] << ": t = "
                        << r.quotient_fast[i] << ", IEEE " << want_q[i];
        ++fast_byte_off;
      }
    }
  }
  EXPECT_TRUE(same_elements("RN(a / RN(6g))", DType::kFloat32, float_bytes(r.quotient), float_bytes(want_q)));
  EXPECT_TRUE(same_elements("scale byte", DType::kUInt8, r.s_bits, want_s));
  EXPECT_TRUE(same_elements("RN(1 / RN(s*g))", DType::kFloat32, float_bytes(r.inv), float_bytes(want_inv)));
  EXPECT_EQ(fast_byte_off, 0u) << "of " << fast_domain;
}

TEST_F(CodecCuda, FastQuotientEveryFp32InZeroOne) {
  for (float g : {1.0f, kAnchoredPScale}) {
    const QuotientSweep r = fast_quotient_sweep(g);
    EXPECT_EQ(r.checked, 0x3F800001ull);
    std::ostringstream ex;
    for (uint32_t b : r.examples) ex << " 0x" << std::hex << b;
    EXPECT_EQ(r.byte_mismatches, 0u) << "g = " << g << ", first a:" << ex.str();
    EXPECT_EQ(r.bit_mismatches, 0u) << "g = " << g << ", first a:" << ex.str();
  }
}

TEST_F(CodecCuda, ReciprocalOfEveryScaleTimesG) {
  // d = s * g for the 126 positive finite E4M3 scales and g = 2^k, k = -100..100.
  std::vector<float> d;
  for (int k = -100; k <= 100; ++k)
    for (int b = 1; b <= 0x7E; ++b) d.push_back(e4m3_decode(static_cast<uint8_t>(b)) * std::ldexp(1.0f, k));
  std::vector<float> ieee, fast;
  rcp_on_device(d, ieee, fast);
  std::vector<float> want(d.size());
  for (size_t i = 0; i < d.size(); ++i) want[i] = 1.0f / d[i];
  EXPECT_TRUE(same_elements("rcp_rn", DType::kFloat32, float_bytes(ieee), float_bytes(want)));
  EXPECT_TRUE(same_elements("rcp_rn_fast", DType::kFloat32, float_bytes(fast), float_bytes(want)));
}

TEST_F(CodecCuda, GlobalScaleMatchesReference) {
  std::vector<float> amax;
  for (uint32_t h = 0; h < 0x10000; ++h) amax.push_back(bf16_to_float(static_cast<uint16_t>(h)));
  for (int k = -160; k <= 140; ++k) {  // the boundaries 2688 * 2^k (+-2 ulps)
    const float b = std::ldexp(2688.0f, k);
    if (std::isfinite(b) && b > 0.0f) push_with_neighbours(amax, b);
  }
  for (float v : {1e-45f, 1e-40f, std::numeric_limits<float>::min(), std::numeric_limits<float>::max(),
                  INFINITY, -INFINITY, std::numeric_limits<float>::quiet_NaN(), 0.0f, -0.0f, -1.0f})
    amax.push_back(v);
  const std::vector<float> rnd = random_fp32(1 << 18, 14);
  for (float v : rnd) amax.push_back(std::fabs(v));
  const std::vector<float> got = global_scale_on_device(amax);
  std::vector<float> want(amax.size());
  for (size_t i = 0; i < amax.size(); ++i) want[i] = nvfp4_global_scale(amax[i]);
  EXPECT_TRUE(same_elements("nvfp4_global_scale", DType::kFloat32, float_bytes(got), float_bytes(want)));

  // The bits version the amax pass uses: non-negative patterns, NaN and Inf patterns included.
  std::vector<uint32_t> bits;
  std::vector<float> want_bits;
  for (float a : amax) {
    const uint32_t b = bits_of(a) & 0x7FFFFFFFu;
    bits.push_back(b);
    want_bits.push_back(nvfp4_global_scale(float_of(b)));
  }
  const std::vector<float> got_bits = global_scale_from_bits_on_device(bits);
  EXPECT_TRUE(same_elements("nvfp4_global_scale_from_bits", DType::kFloat32, float_bytes(got_bits),
                            float_bytes(want_bits)));
}

TEST_F(CodecCuda, MxScaleCodeMatchesReference) {
  std::vector<float> amax;
  for (uint32_t h = 0; h < 0x8000; ++h) amax.push_back(bf16_to_float(static_cast<uint16_t>(h)));  // incl. +Inf, NaN
  for (int k = -149; k <= 127; ++k) push_with_neighbours(amax, std::ldexp(1.0f, k));
  const std::vector<float> rnd = random_fp32(1 << 16, 15);
  for (float v : rnd) amax.push_back(std::fabs(v));
  for (float& v : amax) v = std::fabs(v);
  const std::vector<uint8_t> got = mx_scale_code_on_device(amax);
  std::vector<uint8_t> want(amax.size());
  for (size_t i = 0; i < amax.size(); ++i) {
    float block[kMxBlock] = {};
    block[0] = amax[i];
    uint8_t codes[kMxBlock];
    want[i] = quantize_block_mx(block, codes);
  }
  EXPECT_TRUE(same_elements("mx scale code", DType::kUInt8, got, want));
}

TEST_F(CodecCuda, ReportsWhichE2M1PathRuns) {
  // Not a check: records whether this GPU ran the hardware convert (sm_100a/sm_120a) or the
  // software rounding (sm_90a) in the tests above.
  const bool hw = device_uses_hw_e2m1();
  RecordProperty("e2m1_path", hw ? "hardware cvt.rn.satfinite.e2m1x2" : "software (candidate A)");
  SUCCEED() << (hw ? "hardware E2M1 convert" : "software E2M1 rounding");
}

}  // namespace
}  // namespace attnqat::cuda_test
