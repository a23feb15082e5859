// src/cuda/common/codec.cuh — THE device codec: E2M1, E4M3, E8M0 and the NVFP4 / MXFP4 block
// scale rules of docs/numerics.md sections 1-2, as __device__ __forceinline__ functions.
//
// Bit-exact twin of src/reference/codec.cpp (each function names the reference function it must
// match); tests/cpp/cuda/codec_kernels.cu checks every one of them against the reference on the
// GPU (every finite fp32 for the element rounding, every E4M3 byte, ...). Used by the quantize
// kernels (src/cuda/quantize) and the attention and decode kernels.
//
// Arch: sm_89+ (the E4M3 convert `cvt.rn.satfinite.e4m3x2.f32`); the project builds sm_90a,
// sm_100a and sm_120a. On sm_100a/sm_120a (family-specific targets 10x/11x/12x) the E2M1
// rounding uses the hardware convert `cvt.rn.satfinite.e2m1x2.f32` (RNE + satfinite, identical
// results by construction); that path is compiled in CI but cannot run on the Hopper test
// machines. Everywhere else it is the exact software rounding of
// docs/hopper.md, section 5.4.
//
// Numerics hygiene (docs/hopper.md, section 4): every rounding step that the spec names is a single
// IEEE fp32 operation. mul_rn / fma_rn are inline PTX without `.ftz`, so they are never contracted
// with a neighbour, never flushed (the E4M3 and E8M0 decodes and the E2M1 code extraction go
// through fp32 subnormals on purpose), whatever the compile flags. The amax uses `max.NaN` so a
// NaN element cannot disappear (fminf/fmaxf return the non-NaN operand). Never compile this
// with --use_fast_math or -ftz=true: __fdiv_rn / __frcp_rn and fminf/fmaxf would then flush.
#pragma once

#include <cstdint>

#include "attnqat/formats.h"

// The hardware E2M1 convert exists on the family-specific Blackwell targets (sm_100a/f, sm_103,
// sm_110, sm_120a/f, sm_121); the same condition as cuda_fp8.h's
// __CUDA_FP8_INTERNAL_CAN_RELY_ON_PTX_FOR_SHORTTYPESCVT__ in CUDA 13.0.
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FAMILY_SPECIFIC__) && \
    (__CUDA_ARCH_FAMILY_SPECIFIC__ >= 1000) && (__CUDA_ARCH_FAMILY_SPECIFIC__ < 1300)
#define ATTNQAT_HW_E2M1 1
#else
#define ATTNQAT_HW_E2M1 0
#endif

namespace attnqat::cuda {

// ---- Constants --------------------------------------------------------------------------------

constexpr float kFloatMax = 3.40282346638528859812e+38f;  // largest finite fp32
constexpr float kTwo22 = 4194304.0f;                      // 2^22: the magic of the E2M1 rounding
constexpr float kTwoM126 = 1.17549435082228750797e-38f;   // 2^-126 (smallest normal fp32)
constexpr float kTwo126 = 8.50705917302346158658e+37f;    // 2^126
constexpr float kTwo120 = 1.32922799578491587290e+36f;    // 2^120
constexpr uint32_t kExpMask = 0x7F800000u;
constexpr uint32_t kSignMask = 0x80000000u;
constexpr uint32_t kCanonicalNaN = 0x7FFFFFFFu;           // what the GPU's own NaNs look like
constexpr int kGlobalScaleMinExp = -100;                  // nvfp4_global_scale's clamp
constexpr int kGlobalScaleMaxExp = 100;

// ---- Exact fp32 primitives --------------------------------------------------------------------

__device__ __forceinline__ uint32_t bits_of(float x) { return __float_as_uint(x); }
__device__ __forceinline__ float float_of(uint32_t u) { return __uint_as_float(u); }

// RN(a * b), subnormals kept (no .ftz), never fused with a neighbouring add.
__device__ __forceinline__ float mul_rn(float a, float b) {
  float d;
  asm("mul.rn.f32 %0, %1, %2;" : "=f"(d) : "f"(a), "f"(b));
  return d;
}
// RN(a * b + c) with a single rounding, subnormals kept.
__device__ __forceinline__ float fma_rn(float a, float b, float c) {
  float d;
  asm("fma.rn.f32 %0, %1, %2, %3;" : "=f"(d) : "f"(a), "f"(b), "f"(c));
  return d;
}
// max(a, b) that returns NaN if either is NaN (fmaxf would drop it).
__device__ __forceinline__ float max_nan(float a, float b) {
  float d;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(d) : "f"(a), "f"(b));
  return d;
}
// True for NaN and +-Inf (an amax that poisons its block, numerics 2 rule 1).
__device__ __forceinline__ bool is_nonfinite_amax(float amax) { return !(amax <= kFloatMax); }

// ---- E2M1 element rounding (numerics section 1) -----------------------------------------------
//
// The spec's table is "round to the nearest multiple of the binade's step (0.5 below 2, 1 in
// [2, 4), 2 from 4), ties to even, saturate at 6". The magic-add rounding (docs/hopper.md, section 5.4): with yc = min(a, 6)
// and P = 2^max(floor(log2 yc), 0) (the exponent bits of max(yc, 1)), M = P * 2^22 is a power of
// two >= 2^22 > yc, so yc + M lies in [M, 2M) where the fp32 spacing is ulp(M) = P/2 = the step:
// t = RN(yc + M) (one FMA; P * 2^22 is exact) rounds yc to the step with ties to even, and
// t - M is exact. Checked on every finite fp32 against the reference (tests/cpp/cuda).

// e2m1(a) for a >= 0 (or -0); software path. 5 instructions (2 FMNMX, LOP3, 2 FFMA).
// NaN gives 6 (min returns the non-NaN operand); callers never pass NaN into a kept result.
__device__ __forceinline__ float e2m1_round_abs_sw(float a) {
  const float yc = fminf(a, kE2M1Max);
  const float p = float_of(bits_of(fmaxf(yc, 1.0f)) & kExpMask);
  const float t = fma_rn(p, kTwo22, yc);
  return fma_rn(p, -kTwo22, t);
}

// e2m1(y) for a finite y, sign kept, zero result +0: twin of attnqat::e2m1_round().
// fma(v, +-1, +0) restores the sign and turns -0 into +0 (-0 + +0 = +0 under RN). 7 instructions
// when the 1.0 constant sits in a register (in a loop), 8 in isolation (sm_90a SASS, CUDA 13.0).
__device__ __forceinline__ float e2m1_round_sw(float y) {
  const float v = e2m1_round_abs_sw(fabsf(y));
  const float sign_one = float_of((bits_of(y) & kSignMask) | 0x3F800000u);
  return fma_rn(v, sign_one, 0.0f);
}

// Magnitude code (0..7) of an E2M1 value v >= 0: the fp32 pattern of v * 2^-126 is exactly
// (code << 22) for all eight magnitudes (0.5 * 2^-126 = 2^-127 is the subnormal 0x00400000,
// 1 * 2^-126 is the smallest normal 0x00800000, ..., 6 * 2^-126 = 0x01C00000). The product is
// exact, so it needs a multiply that keeps subnormals (mul_rn).
__device__ __forceinline__ uint32_t e2m1_value_to_code_shifted(float v) {
  return bits_of(mul_rn(v, kTwoM126));  // == code << 22
}

// Eight codes of e2m1(y[0..7]) packed into 32 bits, element i in bits [4i, 4i+4) (element 2k
// in the low nibble of byte k, as pack_codes()); software path. A NaN y gives an unspecified
// code (callers mask the codes of poisoned blocks).
__device__ __forceinline__ uint32_t e2m1_pack8_sw(const float* y) {
  uint32_t mags = 0, signs = 0;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const uint32_t shifted = e2m1_value_to_code_shifted(e2m1_round_abs_sw(fabsf(y[i])));
    mags += (4 * i <= 22) ? (shifted >> (22 - 4 * i)) : (shifted << (4 * i - 22));
    signs |= (bits_of(y[i]) >> (28 - 4 * i)) & (0x8u << (4 * i));  // sign bit -> bit 4i+3
  }
  // Keep a sign only where the magnitude is non-zero (a zero result is code 0, +0): per nibble,
  // mag + 7 has bit 3 set iff mag >= 1 (no carry between nibbles: 7 + 7 < 16).
  const uint32_t nonzero = (mags + 0x77777777u) & 0x88888888u;
  return mags | (signs & nonzero);
}

#if ATTNQAT_HW_E2M1
// Hardware path: cvt.rn.satfinite.e2m1x2.f32 d, a, b puts e2m1(a) in the high nibble of the
// byte d and e2m1(b) in the low nibble (RNE, saturating to +-6 like the spec's table). The
// convert keeps the sign of a zero result (code 0x8); the spec stores +0, so clear those.
// Compiled for sm_100a/sm_120a in CI, not runnable on the Hopper test machines.
__device__ __forceinline__ uint32_t e2m1_pack8_hw(const float* y) {
  uint32_t w;
  asm("{\n"
      ".reg .b8 b0, b1, b2, b3;\n"
      "cvt.rn.satfinite.e2m1x2.f32 b0, %2, %1;\n"
      "cvt.rn.satfinite.e2m1x2.f32 b1, %4, %3;\n"
      "cvt.rn.satfinite.e2m1x2.f32 b2, %6, %5;\n"
      "cvt.rn.satfinite.e2m1x2.f32 b3, %8, %7;\n"
      "mov.b32 %0, {b0, b1, b2, b3};\n"
      "}"
      : "=r"(w)
      : "f"(y[0]), "f"(y[1]), "f"(y[2]), "f"(y[3]), "f"(y[4]), "f"(y[5]), "f"(y[6]), "f"(y[7]));
  const uint32_t nonzero = ((w & 0x77777777u) + 0x77777777u) & 0x88888888u;
  return w & (0x77777777u | nonzero);
}
#endif

// The dispatching versions: hardware convert where it exists, else the software rounding.
__device__ __forceinline__ uint32_t e2m1_pack8(const float* y) {
#if ATTNQAT_HW_E2M1
  return e2m1_pack8_hw(y);
#else
  return e2m1_pack8_sw(y);
#endif
}

// Value of a 4-bit code (low nibble read): twin of attnqat::e2m1_decode(). The magnitude is
// float_of(code << 22) * 2^126 (see e2m1_value_to_code_shifted), exact through a subnormal.
__device__ __forceinline__ float e2m1_decode(uint32_t code) {
  const float mag = mul_rn(float_of((code & 0x7u) << 22), kTwo126);
  return float_of(bits_of(mag) | ((code & 0x8u) << 28));
}

#if ATTNQAT_HW_E2M1
// The 4-bit code of e2m1(a) by the hardware convert (low nibble of the converted byte; a zero
// result keeps a's sign, code 0x8 for -0). Compiled for sm_100a/sm_120a in CI.
__device__ __forceinline__ uint32_t e2m1_code_hw(float a) {
  uint16_t pair;
  asm("{\n"
      ".reg .b8 b0;\n"
      "cvt.rn.satfinite.e2m1x2.f32 b0, %2, %1;\n"
      "mov.b16 %0, {b0, 0};\n"
      "}"
      : "=h"(pair)
      : "f"(a), "f"(0.0f));
  return pair & 0xFu;
}
#endif

// e2m1(a) for a finite a >= 0 (or -0), as a value: the hardware convert on Blackwell (the sign
// is dropped with the & 0x7), else the software rounding.
__device__ __forceinline__ float e2m1_round_abs(float a) {
#if ATTNQAT_HW_E2M1
  return e2m1_decode(e2m1_code_hw(a) & 0x7u);
#else
  return e2m1_round_abs_sw(a);
#endif
}

// The 4-bit code of e2m1(y) (zero is code 0): twin of attnqat::e2m1_encode(). y finite.
__device__ __forceinline__ uint32_t e2m1_encode(float y) {
#if ATTNQAT_HW_E2M1
  const uint32_t code = e2m1_code_hw(y);
  return (code & 0x7u) ? code : 0u;
#else
  const uint32_t mag = e2m1_value_to_code_shifted(e2m1_round_abs_sw(fabsf(y))) >> 22;
  return mag == 0 ? 0u : mag | ((bits_of(y) >> 28) & 0x8u);
#endif
}

// e2m1(y), sign kept, zero +0: twin of attnqat::e2m1_round(). y finite.
__device__ __forceinline__ float e2m1_round(float y) {
  const float v = e2m1_round_abs(fabsf(y));
  return fma_rn(v, float_of((bits_of(y) & kSignMask) | 0x3F800000u), 0.0f);
}

// ---- E4M3 (numerics section 1) ----------------------------------------------------------------

// e4m3(t): twin of attnqat::e4m3_encode(). RNE through the hardware convert
// cvt.rn.satfinite.e4m3x2.f32 (sm_89+). The reference maps |t| >= 448 and +-Inf to +-448 and
// NaN to 0x7F. CUDA documents .satfinite as "inputs larger than MAXNORM round to MAXNORM of the
// same sign" and NaN -> NaN, but the sign of a converted NaN and the handling of Inf are not
// spelled out in the PTX ISA, so neither is relied on: |t| is clamped to 448 first (which also
// covers Inf), and NaN is selected explicitly. One FMNMX pair + select per scale, negligible.
__device__ __forceinline__ uint32_t e4m3_encode(float t) {
  const float c = fminf(fmaxf(t, -kE4M3Max), kE4M3Max);
  uint16_t pair;
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(pair) : "f"(0.0f), "f"(c));
  return (t != t) ? uint32_t{kE4M3NaN} : uint32_t{pair & 0xFFu};
}

// e4m3(t) for t >= 0 or +Inf (never NaN): the block-scale case.
__device__ __forceinline__ uint32_t e4m3_encode_nonneg(float t) {
  const float c = fminf(t, kE4M3Max);
  uint16_t pair;
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(pair) : "f"(0.0f), "f"(c));
  return pair & 0xFFu;
}

// Value of an E4M3 byte, exact: twin of attnqat::e4m3_decode(). (byte & 0x7F) << 20 is the fp32
// pattern of |s| * 2^-120 for normal and subnormal E4M3 alike (exponent field -> fp32 exponent
// bits 23-26, mantissa -> bits 20-22; an E4M3 subnormal becomes an fp32 subnormal), so one
// multiply by 2^120 that keeps subnormals gives |s| exactly. 0x7F / 0xFF are NaN.
__device__ __forceinline__ float e4m3_decode(uint32_t byte) {
  const uint32_t mag = byte & 0x7Fu;
  const float v = mul_rn(float_of((mag << 20) | ((byte & 0x80u) << 24)), kTwo120);
  return mag == 0x7Fu ? float_of(kCanonicalNaN) : v;
}

// ---- E8M0 (numerics section 1) ----------------------------------------------------------------

// 2^(code - 127), code 255 NaN: twin of attnqat::e8m0_decode(). Code 0 is the fp32 subnormal
// 2^-127 (0x00400000).
__device__ __forceinline__ float e8m0_decode(uint32_t code) {
  code &= 0xFFu;
  if (code == kE8M0NaN) return float_of(kCanonicalNaN);
  return float_of(code == 0 ? 0x00400000u : code << 23);
}

// ---- Divisions of the block scale (numerics 2, steps 3 and 5) ---------------------------------

// t = RN(a / RN(6g)) for any a, g: the IEEE division (correctly rounded by definition, ~10
// instructions plus a slow path for extreme operands), exact for any g; the GPU tests
// (tests/cpp/cuda) hold the fast variant below against it.
__device__ __forceinline__ float nv_scale_quotient(float a, float g) {
  return __fdiv_rn(a, mul_rn(6.0f, g));
}

// inv = RN(1 / d) for any d: the IEEE reciprocal.
__device__ __forceinline__ float rcp_rn(float d) { return __frcp_rn(d); }

// Fast variants, used by the block scales of the quantize, attention and decode kernels
// (docs/hopper.md, section 5.3), with their domain:
//
// nv_scale_quotient_fast(a, six_g, rcp_six_g) with six_g = b = 6g and rcp_six_g = y = RN(1/b),
// g a power of two in [2^-100, 2^100] (then y = RN(1/6) / g exactly):
//   q0 = RN(a * y), r = fma(-b, q0, a), t = fma(r, y, q0).
// Why t = RN(a / b) (Markstein's correction step, Markstein 1990; Handbook of Floating-Point
// Arithmetic, division by Newton-Raphson iteration): y = RN(1/b) and q0 = RN(a*y) is within one
// ulp of a/b; then the residual a - b*q0 is exactly representable, so the FMA computes it
// exactly, and RN(q0 + r*y) is the correctly rounded quotient, as long as nothing under- or
// overflows. Exact residual: b = 3 * 2^(k+1) has 2 significant bits, so a - b*q0 is a multiple
// of 2^(ea - 25) (ea = exponent of a) of a few bits, representable when ea >= -124.
// Domain where t is bit-identical to the IEEE quotient: 2^-124 <= a and 2^-126 <= a/b < 2^127.
// Outside it (tiny a or a subnormal quotient) t may differ in its last bits, but then
// a/b < 2^-24 and e4m3(t) = 0 either way; above it the quotient overflows (t = NaN instead of
// Inf). So the E4M3 byte is the reference's for every finite a >= 0 with a/(6g) < 2^127;
// tests/cpp/cuda checks it on the GPU for every fp32 a in [0, 1] with g in {1, 2^-11}.
// 3 instructions instead of ~10 and a branch.
__device__ __forceinline__ float nv_scale_quotient_fast(float a, float six_g, float rcp_six_g) {
  const float q0 = mul_rn(a, rcp_six_g);
  const float r = fma_rn(-six_g, q0, a);
  return fma_rn(r, rcp_six_g, q0);
}

// rcp_rn_fast(d) = RN(1/d) for d = s * g, s a positive finite E4M3 value and g a power of two in
// [2^-100, 2^100] (d normal, four significant bits). r0 = rcp.approx.ftz (max error 1 ulp), one
// Newton correction e = fma(-d, r0, 1), inv = fma(r0, e, r0). Exactness: d = 2^E * (1 + m/8)
// (m = 0..7), every step scales exactly with 2^E, so the 8 mantissas cover all d; tests/cpp/cuda
// checks all 126 scales times g = 2^k, k = -100..100, against the correctly rounded 1/d on the
// GPU.
__device__ __forceinline__ float rcp_rn_fast(float d) {
  float r0;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r0) : "f"(d));
  const float e = fma_rn(-d, r0, 1.0f);
  return fma_rn(r0, e, r0);
}

// ---- Second-level scale (numerics 2.1) --------------------------------------------------------

// nvfp4_global_scale from the bit pattern of a non-negative amax (the atomicMax pass works on
// bits): patterns >= 0x7F800000 are +Inf or NaN (give 1, like a poisoned tensor), 0 gives 1.
// Smallest power of two g with amax <= 2688 * g, exponent clamped to [-100, 100]:
// amax = f * 2^ex with f in [0.5, 1): for a normal amax f = (1 + M/2^23)/2 and ex = E - 126, and
// f <= 0.65625 <=> M <= 0.3125 * 2^23 = 0x280000. A subnormal amax (E = 0) is below 2^-126, so
// its exponent is clamped to -100.
__device__ __forceinline__ float nvfp4_global_scale_from_bits(uint32_t amax_bits) {
  if (amax_bits == 0 || amax_bits >= kExpMask) return 1.0f;
  const int biased = static_cast<int>(amax_bits >> 23);
  const uint32_t mantissa = amax_bits & 0x7FFFFFu;
  int e = biased == 0 ? kGlobalScaleMinExp
                      : (biased - 126) - (mantissa <= 0x280000u ? 12 : 11);
  e = max(kGlobalScaleMinExp, min(kGlobalScaleMaxExp, e));
  return float_of(static_cast<uint32_t>(e + 127) << 23);
}

// Twin of attnqat::nvfp4_global_scale(): 1 when amax is not > 0 or not finite.
__device__ __forceinline__ float nvfp4_global_scale(float amax) {
  if (!(amax > 0.0f) || !(amax <= kFloatMax)) return 1.0f;
  return nvfp4_global_scale_from_bits(bits_of(amax));
}

// ---- NVFP4 block scale (numerics 2, phi_nv steps 1-5) -----------------------------------------

// What the elements of one NVFP4 block need, from the block's amax (NaN-propagating max of |x_i|,
// so NaN or +Inf for a poisoned block) and g. Twin of the scale part of quantize_block_nv().
struct NvBlockScale {
  uint32_t s_bits;     // E4M3 scale byte: kE4M3NaN for a poisoned block
  float s;             // its value (NaN for a poisoned block)
  float inv;           // RN(1 / RN(s * g)); 0 when s == 0 or poisoned (then every code is 0)
  uint32_t code_mask;  // 0 for a poisoned block (codes forced to 0), else ~0
};

// g must be a power of two in [2^-100, 2^100]: validate() checks user-given scales, and the amax
// pass produces only such scales. That is the domain of the fast exact division and reciprocal
// above (about 15 instructions and two slow-path branches fewer per block than the IEEE
// routines).
// A quotient that overflows (huge a, small g) comes out NaN and the fminf in
// e4m3_encode_nonneg turns it into 448, as the reference's satfinite does for +Inf.
__device__ __forceinline__ NvBlockScale nv_block_scale(float amax, float g) {
  constexpr float kRcpSix = 0.16666667163372039795f;  // RN(1/6)
  NvBlockScale r;
  const bool poisoned = is_nonfinite_amax(amax);
  const float six_g = mul_rn(6.0f, g);                                  // exact
  const float rcp_six_g = mul_rn(kRcpSix, float_of(0x7F000000u - bits_of(g)));  // RN(1/6) / g, exact
  const float t = nv_scale_quotient_fast(poisoned ? 0.0f : amax, six_g, rcp_six_g);  // 3. RN(a / RN(6g))
  const uint32_t s_bits = e4m3_encode_nonneg(t);                  //    s = e4m3(t)
  const float s = e4m3_decode(s_bits);
  // 4. s == 0: every code 0 (inv = 0 gives y = +-0, code 0). 5. d = RN(s*g), inv = RN(1/d).
  const float inv = s == 0.0f ? 0.0f : rcp_rn_fast(mul_rn(s, g));
  r.s_bits = poisoned ? uint32_t{kE4M3NaN} : s_bits;
  r.s = poisoned ? float_of(kCanonicalNaN) : s;
  r.inv = poisoned ? 0.0f : inv;
  r.code_mask = poisoned ? 0u : ~0u;
  return r;
}

// Packed codes of 8 elements of an NVFP4 block: q_i = e2m1(RN(x_i * inv)), zeroed if poisoned.
__device__ __forceinline__ uint32_t nv_pack8(const float* x, const NvBlockScale& sc) {
  float y[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) y[i] = mul_rn(x[i], sc.inv);  // NaN for a poisoned Inf/NaN x ...
  return e2m1_pack8(y) & sc.code_mask;                        // ... whose codes are masked to 0
}

// Fake-quantized value of one element: value(q) * s * g, rounded as the reference's
// dequantize_nv() (RN(RN(value(q) * s) * g)). value(q) * s is exact (at most 2 + 4 significant
// bits, >= 2^-10), so fma(|v|, +-s, +0) is RN(value(q) * s) with the +0 of a zero code. A poisoned
// block has s = NaN and gives NaN.
__device__ __forceinline__ float nv_fake_element(float x, const NvBlockScale& sc, float g) {
  const float y = mul_rn(x, sc.inv);
  const float v = e2m1_round_abs(fabsf(y));
  const float signed_s = float_of(bits_of(sc.s) | (bits_of(x) & kSignMask));
  return mul_rn(fma_rn(v, signed_s, 0.0f), g);
}

// Dequantized value of one element: twin of attnqat::dequantize_nv() (same operation order).
__device__ __forceinline__ float nv_dequant_element(uint32_t code, float s, float g) {
  return mul_rn(mul_rn(e2m1_decode(code), s), g);
}

// ---- MXFP4 block scale (numerics 2, phi_mx; OCP MX v1.0) --------------------------------------

struct MxBlockScale {
  uint32_t code;       // E8M0 scale code: kE8M0NaN for a poisoned block
  float mul;           // 2^-e, the element multiplier (always a normal fp32)
  float scale;         // 2^e, the decode scale (NaN for a poisoned block; 2^-127 is subnormal)
  uint32_t code_mask;  // 0 for a poisoned block
};

// Twin of the scale part of quantize_block_mx(). With E the fp32 exponent field of a = amax:
// floor(log2 a) = E - 127 for a normal a, so e = max(E - 129, -127) and the scale code is
// e + 127 = max(E - 2, 0); a subnormal a (E = 0) gives e = -127 (the clamp), and a = 0 gives
// code 0 as the reference's special case. 2^-e = 2^(127 - code) with code in [0, 252], so the
// multiplier is a normal fp32 and x * 2^-e is one correctly rounded multiply, the value of the
// reference's ldexp(x, -e) (also correctly rounded).
__device__ __forceinline__ MxBlockScale mx_block_scale(float amax) {
  MxBlockScale r;
  const bool poisoned = is_nonfinite_amax(amax);
  const int biased = static_cast<int>(bits_of(amax) >> 23) & 0xFF;
  const uint32_t code = static_cast<uint32_t>(max(biased - 2, 0));
  r.code = poisoned ? uint32_t{kE8M0NaN} : code;
  r.mul = poisoned ? 0.0f : float_of((254u - code) << 23);
  r.scale = e8m0_decode(r.code);
  r.code_mask = poisoned ? 0u : ~0u;
  return r;
}

__device__ __forceinline__ uint32_t mx_pack8(const float* x, const MxBlockScale& sc) {
  float y[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) y[i] = mul_rn(x[i], sc.mul);
  return e2m1_pack8(y) & sc.code_mask;
}

// value(q) * 2^e as the reference's dequantize_mx(): RN of the exact product (2^e may be the
// subnormal 2^-127, so the result may round); fma(|v|, +-2^e, +0) is that with +0 for code 0.
__device__ __forceinline__ float mx_fake_element(float x, const MxBlockScale& sc) {
  const float v = e2m1_round_abs(fabsf(mul_rn(x, sc.mul)));
  return fma_rn(v, float_of(bits_of(sc.scale) | (bits_of(x) & kSignMask)), 0.0f);
}

__device__ __forceinline__ float mx_dequant_element(uint32_t code, float scale) {
  return mul_rn(e2m1_decode(code), scale);
}

// ---- Block amax -------------------------------------------------------------------------------

// max_i |x_i| with NaN propagation (a tree; N a power of two from 2 to 32); +Inf stays +Inf.
// Each tree level is its own template instance with a constant trip count, so everything unrolls
// and m stays in registers (a runtime level loop was only partly unrolled and went to local
// memory).
template <int kWidth>
__device__ __forceinline__ void max_nan_fold(float* m) {
#pragma unroll
  for (int i = 0; i < kWidth; ++i) m[i] = max_nan(m[i], m[i + kWidth]);
  if constexpr (kWidth > 1) max_nan_fold<kWidth / 2>(m);
}

template <int N>
__device__ __forceinline__ float block_amax(const float* x) {
  static_assert(N >= 2 && N <= 32 && (N & (N - 1)) == 0, "a power of two up to 32");
  float m[N / 2];
#pragma unroll
  for (int i = 0; i < N / 2; ++i) m[i] = max_nan(fabsf(x[i]), fabsf(x[i + N / 2]));
  if constexpr (N >= 4) max_nan_fold<N / 4>(m);
  return m[0];
}

// The NaN-propagating max over the kLanes lanes (aligned group of a warp) that share a block.
// `mask` holds exactly those lanes (they are always active together).
template <int kLanes>
__device__ __forceinline__ float group_max_nan(float v, unsigned mask) {
#pragma unroll
  for (int offset = kLanes / 2; offset >= 1; offset /= 2)
    v = max_nan(v, __shfl_xor_sync(mask, v, offset, kLanes));
  return v;
}

}  // namespace attnqat::cuda
