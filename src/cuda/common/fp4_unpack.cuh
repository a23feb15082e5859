// src/cuda/common/fp4_unpack.cuh — E2M1 codes to 16-bit floats with byte permutes (PRMT), no
// tables in memory. Shared by the decode kernel (src/cuda/decode) and the sm90 forward's packed
// producer (src/cuda/attention/sm90/fwd_packed.cuh). Exact: every E2M1 value (0, +-0.5 ... +-6)
// is an fp16 and a bf16. Any arch.
//
// The 8 codes of a 32-bit word are nibbles 0-7 (code 2i is the low nibble of byte i, as the
// packed formats store them, numerics section 7). The magnitude (3 bits) of a code selects a byte
// of an 8-byte table (PRMT's selector nibbles take 3 bits of index); the sign (bit 3) goes to bit
// 7 of the 16-bit float's high byte.
#pragma once

#include <cstdint>

#include "cuda/common/ptx.cuh"

namespace attnqat::cuda {

__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
  uint32_t d;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
  return d;
}
// a * b of two fp16x2 pairs, RN (mul_f16x2 of ptx.cuh; the name the decode kernel uses).
__device__ __forceinline__ uint32_t hmul2(uint32_t a, uint32_t b) { return mul_f16x2(a, b); }

// fp16 high bytes of the E2M1 magnitudes 0, 0.5, 1, 1.5 (kLut0) and 2, 3, 4, 6 (kLut1); the low
// bytes are all zero.
constexpr uint32_t kLut0 = 0x3E3C3800u;
constexpr uint32_t kLut1 = 0x46444240u;
constexpr uint32_t kMagMask = 0x77777777u;
// bf16 of the same magnitudes: 0x0000, 3F00, 3F80, 3FC0, 4000, 4040, 4080, 40C0 — high bytes
// (kBf16Hi0/1) and low bytes (kBf16Lo0/1).
constexpr uint32_t kBf16Hi0 = 0x3F3F3F00u;
constexpr uint32_t kBf16Hi1 = 0x40404040u;
constexpr uint32_t kBf16Lo0 = 0xC0800000u;
constexpr uint32_t kBf16Lo1 = 0xC0804000u;

// `c` in a register that the compiler cannot re-materialize: PRMT takes one table as an
// immediate, the other must be a register, and a plain constant would be rebuilt before every
// PRMT. `zero` must be a runtime 0 (e.g. a non-negative parameter >> 31).
template <uint32_t c>
__device__ __forceinline__ uint32_t pinned(uint32_t zero) {
  uint32_t r;
  asm volatile("xor.b32 %0, %1, %2;" : "=r"(r) : "r"(zero), "n"(c));
  return r;
}
__device__ __forceinline__ uint32_t pinned_lut0(uint32_t zero) { return pinned<kLut0>(zero); }

// The sign bits of nibbles 0-3 (lo) and 4-7 (hi) of w, in bit 7 of bytes 0-3, other bits
// garbage: nibble k's sign bit 4k+3 must land on bit 8k+7. Bytes of w << 4 carry the signs of
// the even nibbles in their bit 7, bytes of w those of the odd ones, so one PRMT gathers them.
__device__ __forceinline__ uint32_t sign_bytes_lo(uint32_t w) { return prmt(w << 4, w, 0x5140u); }
__device__ __forceinline__ uint32_t sign_bytes_hi(uint32_t w) { return prmt(w << 4, w, 0x7362u); }

// The 8 codes of a word -> their signed fp16 high bytes: lo = nibbles 0-3, hi = nibbles 4-7
// (byte k = nibble k, resp. 4 + k). Magnitudes by table (PRMT: the low 16 bits of the selector
// pick 4 bytes of {lut0, kLut1}); signs merged by one LOP3 each. 9 instructions.
__device__ __forceinline__ void fp4_signed_bytes(uint32_t w, uint32_t lut0, uint32_t& lo, uint32_t& hi) {
  const uint32_t mags = w & kMagMask;
  lo = prmt(lut0, kLut1, mags) | (sign_bytes_lo(w) & 0x80808080u);
  hi = prmt(lut0, kLut1, mags >> 16) | (sign_bytes_hi(w) & 0x80808080u);
}

// fp16x2 {byte i of x as the high byte of the low half, byte j of x as that of the high half},
// low bytes zero (PRMT selector 4 = byte 0 of the zero register).
template <int kI, int kJ>
__device__ __forceinline__ uint32_t spread(uint32_t x) {
  return prmt(x, 0u, 0x4u | (static_cast<uint32_t>(kI) << 4) | (0x4u << 8) | (static_cast<uint32_t>(kJ) << 12));
}

// The 8 codes of a word -> 4 fp16x2 words, out[k] = codes (2k, 2k + 1), exact. 13 instructions.
__device__ __forceinline__ void fp4_word_to_f16x2_codes(uint32_t w, uint32_t lut0, uint32_t (&out)[4]) {
  uint32_t lo, hi;
  fp4_signed_bytes(w, lut0, lo, hi);
  out[0] = spread<0, 1>(lo);
  out[1] = spread<2, 3>(lo);
  out[2] = spread<0, 1>(hi);
  out[3] = spread<2, 3>(hi);
}

// The 8 codes of a word -> 4 bf16x2 words, out[k] = codes (2k, 2k + 1), exact. High bytes and low
// bytes by table (hi0 = kBf16Hi0, lo0 = kBf16Lo0 in registers, see pinned), the signs merged into
// the high bytes, then one PRMT per output interleaves {lo byte, hi byte} pairs. 15 instructions.
__device__ __forceinline__ void fp4_word_to_bf16x2_codes(uint32_t w, uint32_t hi0, uint32_t lo0,
                                                         uint32_t (&out)[4]) {
  const uint32_t mags = w & kMagMask, mags_hi = mags >> 16;
  const uint32_t ha = prmt(hi0, kBf16Hi1, mags) | (sign_bytes_lo(w) & 0x80808080u);
  const uint32_t hb = prmt(hi0, kBf16Hi1, mags_hi) | (sign_bytes_hi(w) & 0x80808080u);
  const uint32_t la = prmt(lo0, kBf16Lo1, mags), lb = prmt(lo0, kBf16Lo1, mags_hi);
  out[0] = prmt(la, ha, 0x5140u);
  out[1] = prmt(la, ha, 0x7362u);
  out[2] = prmt(lb, hb, 0x5140u);
  out[3] = prmt(lb, hb, 0x7362u);
}

}  // namespace attnqat::cuda
