// Reference codec: E2M1, E4M3, E8M0 and the NVFP4 / MXFP4 block quantizers of
// docs/numerics.md sections 1-2, written as a literal transcription of the spec. Every fp32
// operation here is a single IEEE operation (the build uses -ffp-contract=off), so the results
// are the spec's RN results. Speed does not matter here; clarity does.
#include <cmath>
#include <cstring>
#include <limits>

#include "attnqat/formats.h"

namespace attnqat {
namespace {

// E2M1 magnitudes by code (0..7).
constexpr float kE2M1Values[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};

// Magnitude code of e2m1(|y|), straight from the table in numerics section 1.
uint8_t e2m1_magnitude_code(float a) {
  if (a <= 0.25f) return 0;   // 0
  if (a < 0.75f) return 1;    // 0.5
  if (a <= 1.25f) return 2;   // 1
  if (a < 1.75f) return 3;    // 1.5
  if (a <= 2.5f) return 4;    // 2
  if (a < 3.5f) return 5;     // 3
  if (a <= 5.0f) return 6;    // 4
  return 7;                   // 6
}

}  // namespace

uint8_t e2m1_encode(float y) {
  const uint8_t mag = e2m1_magnitude_code(std::fabs(y));
  if (mag == 0) return 0;  // zero is stored as +0
  return static_cast<uint8_t>(mag | (std::signbit(y) ? 0x8 : 0x0));
}

float e2m1_decode(uint8_t code) {
  const float v = kE2M1Values[code & 0x7];
  return (code & 0x8) ? -v : v;
}

float e2m1_round(float y) { return e2m1_decode(e2m1_encode(y)); }

uint8_t e4m3_encode(float t) {
  if (std::isnan(t)) return kE4M3NaN;
  const uint8_t sign = std::signbit(t) ? 0x80 : 0x00;
  const float a = std::fabs(t);
  if (a >= kE4M3Max) return sign | 0x7E;  // satfinite: 448 (and +-Inf) -> 448
  constexpr float kMinNormal = 0.015625f;  // 2^-6
  if (a < kMinNormal) {
    // Subnormal range: multiples of 2^-9. a * 2^9 is exact; rint rounds half to even.
    const float m = std::nearbyint(std::ldexp(a, 9));  // 0..8; 8 is the smallest normal (0x08)
    return sign | static_cast<uint8_t>(m);
  }
  int e;
  std::frexp(a, &e);  // a = f * 2^e, f in [0.5, 1)
  e -= 1;             // a = 1.xxx * 2^e, e in [-6, 8]
  // Round the significand to 3 fraction bits: q in [8, 16], exact scaling by a power of two.
  float q = std::nearbyint(std::ldexp(a, 3 - e));
  if (q == 16.0f) {
    q = 8.0f;
    e += 1;
  }
  const int exp_field = e + 7;
  const int man_field = static_cast<int>(q) - 8;
  if (exp_field > 15 || (exp_field == 15 && man_field == 7)) return sign | 0x7E;  // rounds above 448
  return sign | static_cast<uint8_t>((exp_field << 3) | man_field);
}

float e4m3_decode(uint8_t bits) {
  const int exp_field = (bits >> 3) & 0xF;
  const int man_field = bits & 0x7;
  if (exp_field == 15 && man_field == 7) return std::numeric_limits<float>::quiet_NaN();
  const float mag = exp_field == 0 ? std::ldexp(static_cast<float>(man_field), -9)
                                   : std::ldexp(1.0f + man_field / 8.0f, exp_field - 7);
  return (bits & 0x80) ? -mag : mag;
}

float e8m0_decode(uint8_t code) {
  if (code == kE8M0NaN) return std::numeric_limits<float>::quiet_NaN();
  return std::ldexp(1.0f, static_cast<int>(code) - 127);
}

bool is_power_of_two(float g) {
  if (!(g > 0.0f) || !std::isfinite(g)) return false;
  int e;
  return std::frexp(g, &e) == 0.5f;
}

float nvfp4_global_scale(float amax) {
  if (!(amax > 0.0f) || !std::isfinite(amax)) return 1.0f;
  // Smallest e with amax <= 2688 * 2^e (2688 = 6 * 448). amax = f * 2^ex, f in [0.5, 1), and
  // 2688 = 0.65625 * 2^12, so e = ex - 12 when f <= 0.65625, else ex - 11.
  int ex;
  const float f = std::frexp(amax, &ex);
  int e = (f <= 0.65625f) ? ex - 12 : ex - 11;
  constexpr int kMinExp = -100, kMaxExp = 100;  // keeps d = s*g and 1/d normal fp32 values
  if (e < kMinExp) e = kMinExp;
  if (e > kMaxExp) e = kMaxExp;
  return std::ldexp(1.0f, e);
}

// ---- NVFP4 block quantizer, numerics section 2 --------------------------------------------

uint8_t quantize_block_nv(const float* x, float g, uint8_t* codes) {
  float a = 0.0f;
  for (int i = 0; i < kNvBlock; ++i) {
    if (!std::isfinite(x[i])) {  // 1. poisoned block
      std::memset(codes, 0, kNvBlock);
      return kE4M3NaN;
    }
    a = std::fmax(a, std::fabs(x[i]));  // 2. amax
  }
  const float six_g = 6.0f * g;                 // RN(6 * g)
  const uint8_t s_bits = e4m3_encode(a / six_g);  // 3. s = e4m3(a / RN(6g))
  const float s = e4m3_decode(s_bits);
  if (s == 0.0f) {                              // 4. zero scale: the block decodes to zeros
    std::memset(codes, 0, kNvBlock);
    return s_bits;
  }
  const float d = s * g;                        // 5. d = RN(s * g)
  const float inv = 1.0f / d;                   //    inv = RN(1 / d)
  for (int i = 0; i < kNvBlock; ++i) codes[i] = e2m1_encode(x[i] * inv);
  return s_bits;
}

float dequantize_nv(uint8_t code, uint8_t scale, float g) {
  // 6. value(q) * s * g: exact, since every E2M1 value times every E4M3 value has at most 8
  // significant bits and g is a power of two.
  return e2m1_decode(code) * e4m3_decode(scale) * g;
}

// ---- MXFP4 block quantizer (OCP MX v1.0), numerics section 2 ------------------------------

uint8_t quantize_block_mx(const float* x, uint8_t* codes) {
  float a = 0.0f;
  for (int i = 0; i < kMxBlock; ++i) {
    if (!std::isfinite(x[i])) {
      std::memset(codes, 0, kMxBlock);
      return kE8M0NaN;
    }
    a = std::fmax(a, std::fabs(x[i]));
  }
  if (a == 0.0f) {
    std::memset(codes, 0, kMxBlock);
    return 0;
  }
  int ex;
  std::frexp(a, &ex);  // floor(log2(a)) = ex - 1, exactly
  int e = (ex - 1) - 2;
  if (e < -127) e = -127;
  if (e > 127) e = 127;
  for (int i = 0; i < kMxBlock; ++i) codes[i] = e2m1_encode(std::ldexp(x[i], -e));
  return static_cast<uint8_t>(e + 127);
}

float dequantize_mx(uint8_t code, uint8_t scale) {
  return e2m1_decode(code) * e8m0_decode(scale);
}

void fake_quantize_block_nv(float* x, float g) {
  uint8_t codes[kNvBlock];
  const uint8_t s = quantize_block_nv(x, g, codes);
  for (int i = 0; i < kNvBlock; ++i) x[i] = dequantize_nv(codes[i], s, g);
}

void fake_quantize_block_mx(float* x) {
  uint8_t codes[kMxBlock];
  const uint8_t s = quantize_block_mx(x, codes);
  for (int i = 0; i < kMxBlock; ++i) x[i] = dequantize_mx(codes[i], s);
}

}  // namespace attnqat
