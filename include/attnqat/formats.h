// attnqat/formats.h — the FP4 formats of docs/numerics.md sections 1-2, as scalar host code.
//
// This is the reference codec: readable, exact, and the one every kernel is tested against
// (src/cuda/common/codec.cuh is its device twin). Everything is fp32 round-to-nearest-even.
#pragma once

#include <cstdint>

namespace attnqat {

// ---- Element and scale formats (numerics section 1) ----------------------------------------

constexpr int kNvBlock = 16;          // NVFP4 block size (elements per E4M3 scale)
constexpr int kMxBlock = 32;          // MXFP4 block size (elements per E8M0 scale)
constexpr float kE2M1Max = 6.0f;      // largest E2M1 magnitude
constexpr float kE4M3Max = 448.0f;    // largest finite E4M3 magnitude
constexpr uint8_t kE4M3NaN = 0x7F;    // the E4M3 NaN pattern written for poisoned blocks
constexpr uint8_t kE8M0NaN = 0xFF;    // the E8M0 NaN code
constexpr float kAnchoredPScale = 1.0f / 2048.0f;  // g = 2^-11 for P in p_quant="anchored"

// e2m1(y): nearest E2M1 value of a finite fp32 y, ties to the even code, saturating at 6.
// The sign is kept; a zero result is +0.
float e2m1_round(float y);
// The 4-bit code (bit 3 = sign, bits 0-2 = magnitude index) of e2m1_round(y). Zero is code 0.
uint8_t e2m1_encode(float y);
// The value of a 4-bit code (only the low nibble is read).
float e2m1_decode(uint8_t code);

// e4m3(t): OCP E4M3FN byte of t, round to nearest even, satfinite (finite values above 448 and
// +-Inf give +-448); NaN gives 0x7F.
uint8_t e4m3_encode(float t);
float e4m3_decode(uint8_t bits);  // 0x7F / 0xFF decode to NaN

// E8M0: 2^(code - 127); code 255 is NaN.
float e8m0_decode(uint8_t code);

// ---- Block quantizers (numerics section 2) -----------------------------------------------

// phi_nv on one block of kNvBlock values with second-level decode scale g (a power of two).
// Writes the 16 codes (one per byte, unpacked) and returns the E4M3 scale byte.
// Poisoned blocks (any NaN/Inf) return kE4M3NaN and codes 0.
uint8_t quantize_block_nv(const float* x, float g, uint8_t* codes);
// Decodes one NVFP4 element: value(code) * s * g (NaN if the scale is NaN).
float dequantize_nv(uint8_t code, uint8_t scale, float g);

// phi_mx on one block of kMxBlock values. Returns the E8M0 scale code; poisoned: kE8M0NaN.
uint8_t quantize_block_mx(const float* x, uint8_t* codes);
float dequantize_mx(uint8_t code, uint8_t scale);

// Fake quantization of one block, in place (phi^-1(phi(x))).
void fake_quantize_block_nv(float* x, float g);
void fake_quantize_block_mx(float* x);

// The per-tensor second-level scale chosen from a tensor's amax (docs/numerics.md 2.1):
// the smallest power of two g with amax <= 6 * 448 * g, clamped to [2^-100, 2^100];
// 1 when amax is 0 or not finite.
float nvfp4_global_scale(float amax);

// True when g is a positive, finite power of two (the only second-level scales accepted).
bool is_power_of_two(float g);

// Packing: two codes per byte, element 2i in the low nibble.
inline uint8_t pack_codes(uint8_t even, uint8_t odd) {
  return static_cast<uint8_t>((even & 0xF) | ((odd & 0xF) << 4));
}
inline uint8_t unpack_code(uint8_t byte, int index) {
  return static_cast<uint8_t>((index & 1) ? (byte >> 4) : (byte & 0xF));
}

}  // namespace attnqat
