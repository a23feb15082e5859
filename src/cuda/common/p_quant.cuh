// src/cuda/common/p_quant.cuh — THE P quantizer of every attention kernel (forward, backward,
// decode): phi_nv(p~; g) of numerics sections 2 and 4 on 16-key blocks of P held in registers,
// built from codec.cuh's exact primitives, so that every kernel's quantized P is bit-identical
// to attnqat::fake_quantize_block_nv (src/reference/codec.cpp) for the same fp32 p~.
//
// Per block (16 consecutive keys of one query row), for g = 1 ("paper") or 2^-11 ("anchored"):
//   a   = max.NaN of the block (a NaN p~ poisons it)       the caller's layout, or slab_block_amax
//   t   = RN(a / RN(6g))        3 instructions, exact        nv_scale_quotient_fast
//   s   = e4m3(t)               one cvt for two blocks       p_scale_bytes
//   d   = RN(s g), inv = RN(1/d) (0 when s = 0)              p_block_scale, or the forward's
//                                                            shared-memory table of (inv, d d)
//   v   = e2m1(RN(p~ inv))                                   mul_rn + e2m1_round_abs
//   P^  = v d                   exact in bf16 and fp16 (below)
// p~ is in [0, 1] up to the rounding of exp2 (or NaN), so t <= (1 + 2^-22) 2^11 / 6 < 342: the
// E4M3 scale never saturates, and nv_scale_quotient_fast's domain (t < 2^127) holds. Exactness of
// v d: v has <= 2 significant bits and d = s g <= 4, so v d has <= 6 (bf16 keeps 8, fp16 11); every
// d >= 2^-20 and v d >= 2^-21 is a multiple of 2^-24, so fp16 subnormals hold them exactly too.
// Poison: a NaN or Inf amax gives d = NaN (p_block_scale), so every element of the block is NaN.
//
// Layouts. The forward and the backward hold P as wgmma accumulator fragments (docs/hopper.md,
// sections 5.1-5.2): 16-key slab j of a tile is the A fragment a[j][0..3] of the thread's eight
// values x[0..7] = p[8j .. 8j+7]:
//   a[0] = (x[0], x[1])  row g,   keys 16j + 2t, +1      a[1] = (x[2], x[3])  row g+8, same keys
//   a[2] = (x[4], x[5])  row g,   keys 16j + 8 + 2t, +1  a[3] = (x[6], x[7])  row g+8, same keys
// (low half = first element): a block (row, slab) lives in the 4 lanes of a quad, 4 elements
// each, and its amax is an in-thread max plus two xor-shuffles (slab_block_amax). The decode
// kernel's transposed mma.sync layout reduces its blocks itself and uses the scalar steps.
//
// The forward's conversion of a whole tile (P^ and P~ for the PV GEMMs) is convert_p, at the end.
// Checked on the GPU against the reference codec by tests/cpp/cuda_attention (sm90_test_kernels.cu).
#pragma once

#include <cstdint>

#include "attnqat/attnqat.h"
#include "cuda/common/codec.cuh"
#include "cuda/common/ptx.cuh"

namespace attnqat::cuda {

// The constants of phi_nv(.; g): g = 1 (paper) or 2^-11 (anchored). six_g = RN(6 g) and
// rcp_six_g = RN(1 / (6 g)) feed nv_scale_quotient_fast; g is a power of two, so both are exact
// scalings of 6 and RN(1/6). two120_g = 2^120 g folds the E4M3 decode and the product with g into
// one multiply (p_block_scale).
struct PQuantConsts {
  float six_g;
  float rcp_six_g;
  float two120_g;
};

__host__ __device__ inline PQuantConsts p_quant_consts(PQuant p_quant) {
  constexpr float kTwo120 = 1.32922799578491587290e+36f;  // 2^120
  const float g = p_quant == PQuant::kAnchored ? kAnchoredPScale : 1.0f;
  return PQuantConsts{6.0f * g, (1.0f / 6.0f) / g, kTwo120 * g};
}

// The E4M3 bytes of two blocks (amax a_lo in bits 0-7, a_hi in 8-15), one
// cvt.rn.satfinite.e4m3x2.f32. No clamp to 448 is needed: for P the quotient is below 342 (file
// header); a NaN quotient gives a NaN byte (0x7F or 0xFF: the PTX ISA specifies NaN -> NaN for
// .satfinite, not the sign). An Inf amax has no meaningful byte: p_block_scale poisons it.
__device__ __forceinline__ uint32_t p_scale_bytes(float a_lo, float a_hi, const PQuantConsts& qc) {
  const float t_lo = nv_scale_quotient_fast(a_lo, qc.six_g, qc.rcp_six_g);
  const float t_hi = nv_scale_quotient_fast(a_hi, qc.six_g, qc.rcp_six_g);
  uint16_t pair;
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(pair) : "f"(t_hi), "f"(t_lo));
  return pair;
}

// The decode scale d = RN(s g) and the element multiplier inv = RN(1/d) of one block, from its
// amax and its E4M3 byte (bits 0-6: the quotient is >= 0, so the sign bit is 0). d in one
// multiply: (byte << 20) is the fp32 pattern of s * 2^-120 for normal and subnormal E4M3 alike
// (codec.cuh e4m3_decode), and s * 2^-120 * (2^120 g) = s g exactly (>= 2^-20, a normal fp32).
// Poisoned (amax NaN or Inf): d = NaN (inv too). s = 0: d = inv = 0, every element decodes to +0.
struct PBlockScale {
  float d;
  float inv;
};

__device__ __forceinline__ PBlockScale p_block_scale(float amax, uint32_t s_byte, float two120_g) {
  const float d = is_nonfinite_amax(amax) ? __uint_as_float(kCanonicalNaN)
                                          : mul_rn(float_of((s_byte & 0x7Fu) << 20), two120_g);
  return PBlockScale{d, d == 0.0f ? 0.0f : rcp_rn_fast(d)};
}

// The amaxes of the thread's two blocks of one slab (rows g and g + 8; see the file header),
// NaN-propagating; p~ >= 0, so max = max |.|.
__device__ __forceinline__ void slab_block_amax(const float* x, float& a0, float& a1) {
  a0 = max_nan(max_nan(x[0], x[1]), max_nan(x[4], x[5]));
  a1 = max_nan(max_nan(x[2], x[3]), max_nan(x[6], x[7]));
  a0 = max_nan(a0, __shfl_xor_sync(0xffffffffu, a0, 1));
  a1 = max_nan(a1, __shfl_xor_sync(0xffffffffu, a1, 1));
  a0 = max_nan(a0, __shfl_xor_sync(0xffffffffu, a0, 2));
  a1 = max_nan(a1, __shfl_xor_sync(0xffffffffu, a1, 2));
}

// P_F fragment of one slab with a per-row factor: RN16(RN(e2m1(RN(x inv)) d) f), f0 / f1 the
// factors of rows g / g + 8 (the backward: f = 1/l for anchored P, 1 for paper P, where the
// multiply is exact). frag: the slab's 16-bit A-fragment words (file header layout).
template <bool kF16>
__device__ __forceinline__ void quantize_p_slab_scaled(const float* x, const PQuantConsts& qc,
                                                       float f0, float f1, uint32_t (&frag)[4]) {
  float a0, a1;
  slab_block_amax(x, a0, a1);
  const uint32_t bytes = p_scale_bytes(a0, a1, qc);
  const PBlockScale b0 = p_block_scale(a0, bytes, qc.two120_g);
  const PBlockScale b1 = p_block_scale(a1, bytes >> 8, qc.two120_g);
  float y[8];
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    const bool second = (e >> 1) & 1;
    const float v = e2m1_round_abs(mul_rn(x[e], second ? b1.inv : b0.inv));
    y[e] = mul_rn(mul_rn(v, second ? b1.d : b0.d), second ? f1 : f0);
  }
#pragma unroll
  for (int r = 0; r < 4; ++r) frag[r] = pack_rn<kF16>(y[2 * r], y[2 * r + 1]);
}

// ---- Scale table --------------------------------------------------------------------------------
// Entry b (an E4M3 byte) = {inv, (d, d)} of a block whose scale byte is b and whose amax is
// finite: exactly p_block_scale(finite a, b, two120_g) with d packed twice in the element type.
// Bytes >= 0x7F never come from a finite quotient in [0, 448) (0x7F is E4M3 NaN, >= 0x80 a
// negative scale): they read {NaN, (NaN, NaN)}, which poisons a block with a NaN amax.
struct PScaleEntry {
  float inv;
  uint32_t dd;
};
constexpr int kPScaleTableEntries = 256;
constexpr int kPScaleTableBytes = kPScaleTableEntries * 8;

template <bool kF16>
__device__ __forceinline__ PScaleEntry p_scale_entry(uint32_t byte, float two120_g) {
  if (byte >= 0x7Fu) {
    const float nan = __uint_as_float(kCanonicalNaN);
    return PScaleEntry{nan, pack_exact<kF16>(nan, nan)};
  }
  const PBlockScale b = p_block_scale(0.0f, byte, two120_g);
  return PScaleEntry{b.inv, pack_exact<kF16>(b.d, b.d)};
}

// Writes entry `index` (0 .. 255) of the table at shared address `table`; the caller fills all
// entries and synchronizes before any lookup.
template <bool kF16>
__device__ __forceinline__ void fill_p_scale_entry(uint32_t table, uint32_t index, float two120_g) {
  const PScaleEntry e = p_scale_entry<kF16>(index, two120_g);
  asm volatile("st.shared.v2.u32 [%0], {%1, %2};" ::"r"(table + 8 * index),
               "r"(__float_as_uint(e.inv)), "r"(e.dd)
               : "memory");
}

__device__ __forceinline__ PScaleEntry lookup_p_scale(uint32_t table, uint32_t byte) {
  uint32_t inv, dd;
  asm volatile("ld.shared.v2.u32 {%0, %1}, [%2];" : "=r"(inv), "=r"(dd) : "r"(table + 8 * byte));
  return PScaleEntry{__uint_as_float(inv), dd};
}

// e2m1(y) before the saturation at 6, for y >= 0 or NaN: codec.cuh's candidate A with the
// min(y, 6) left out. Checked exhaustively on the CPU for every fp32 y in [0, 1024]:
// min(e2m1_round_abs_unsat(y), 6) == e2m1_round_abs_sw(y) bit for bit (for y in [7, 16) the
// unsaturated value is 8, 12 or 16, which the min turns into 6). Here y <= 9 (6 * 1.5 for a
// subnormal E4M3 scale). NaN stays NaN (the FMNMX against 1 gives 1, the FFMAs carry the NaN).
// 4 instructions (FMNMX, LOP3, 2 FFMA).
__device__ __forceinline__ float e2m1_round_abs_unsat(float y) {
  const float p = float_of(bits_of(fmaxf(y, 1.0f)) & 0x7F800000u);
  const float t = fma_rn(p, 4194304.0f, y);  // 2^22
  return fma_rn(p, -4194304.0f, t);
}

// min.NaN(pair, (6, 6)): the E2M1 saturation of two unsaturated values, NaN kept.
template <bool kF16>
__device__ __forceinline__ uint32_t sat6_pair(uint32_t v) {
  uint32_t r;
  if constexpr (kF16)
    asm("min.NaN.f16x2 %0, %1, %2;" : "=r"(r) : "r"(v), "r"(0x46004600u));
  else
    asm("min.NaN.bf16x2 %0, %1, %2;" : "=r"(r) : "r"(v), "r"(0x40C040C0u));
  return r;
}

// min(v0, 6), min(v1, 6) (E2M1 values, fp32, unsaturated) times d, as a packed pair: exact (file
// header); v itself (<= 16 before the min) is exact in both types.
template <bool kF16>
__device__ __forceinline__ uint32_t decode_pair_sat(float v0, float v1, uint32_t dd) {
  return mul_x2<kF16>(sat6_pair<kF16>(pack_exact<kF16>(v0, v1)), dd);
}

// P^ fragment of one 16-key slab (the A fragment of one k16 step of the PV GEMM) from the slab's
// eight p~ values x = p + 8 j, through the scale table (the forward): per block the same value
// as quantize_p_slab_scaled with f = 1 (the table entries are p_block_scale's values; the file
// header explains the poison and the saturation). table: the shared-memory scale table.
template <bool kF16>
__device__ __forceinline__ void quantize_p_slab_table(const float* x, const PQuantConsts& qc,
                                                      uint32_t table, uint32_t (&p_hat)[4]) {
  float a0, a1;
  slab_block_amax(x, a0, a1);
  const uint32_t bytes = p_scale_bytes(a0, a1, qc);
  // A NaN amax (the only non-finite one: p~ <= 1 or NaN) gives a NaN quotient, which the convert
  // turns into an E4M3 NaN byte (0x7F or 0xFF: the PTX ISA specifies NaN -> NaN for .satfinite,
  // not the sign), and both table entries are NaN: the block is poisoned.
  const PScaleEntry b0 = lookup_p_scale(table, bytes & 0xFFu);
  const PScaleEntry b1 = lookup_p_scale(table, (bytes >> 8) & 0xFFu);
  float v[8];
#pragma unroll
  for (int e = 0; e < 8; ++e)
    v[e] = e2m1_round_abs_unsat(mul_rn(x[e], ((e >> 1) & 1) ? b1.inv : b0.inv));
  p_hat[0] = decode_pair_sat<kF16>(v[0], v[1], b0.dd);
  p_hat[1] = decode_pair_sat<kF16>(v[2], v[3], b1.dd);
  p_hat[2] = decode_pair_sat<kF16>(v[4], v[5], b0.dd);
  p_hat[3] = decode_pair_sat<kF16>(v[6], v[7], b1.dd);
}

// P~ fragment of one slab: p~ rounded to nearest even in the element type.
template <bool kF16>
__device__ __forceinline__ void pack_p_tilde_slab(const float* x, uint32_t (&frag)[4]) {
#pragma unroll
  for (int r = 0; r < 4; ++r)
    frag[r] = pack_rn<kF16>(x[2 * r], x[2 * r + 1]);
}

// The PV GEMM's A fragments of a [64, kN] tile of p~, slab by slab (each slab's eight fp32
// registers die as its fragments appear: the peak stays max(S, P^ + P~) + O + O'):
// p_tilde = P~; p_hat = P^ when quantize, else P~ (mode bf16).
// kBranchPerSlab: test `quantize` inside the slab loop, per pair of slabs. That keeps the
// compiler from interleaving more than two slabs, which costs latency but saves the registers
// that the tightest config (d = 128 with O') needs; the others branch once per tile.
template <bool kF16, int kN, bool kBranchPerSlab>
__device__ __forceinline__ void convert_p(const float (&p)[kN / 2], bool quantize,
                                          const PQuantConsts& qc, uint32_t table,
                                          uint32_t (&p_hat)[kN / 16][4],
                                          uint32_t (&p_tilde)[kN / 16][4]) {
  if (kBranchPerSlab || quantize) {
    // kBranchPerSlab: the branch is taken per pair of slabs, so that two slabs' dependency chains
    // (amax shuffles, scale lookup, element path) can interleave while the registers of at most
    // two slabs are in flight.
    constexpr int kGroup = kBranchPerSlab ? 2 : kN / 16;
#pragma unroll
    for (int j0 = 0; j0 < kN / 16; j0 += kGroup) {
#pragma unroll
      for (int j = j0; j < j0 + kGroup; ++j) pack_p_tilde_slab<kF16>(&p[8 * j], p_tilde[j]);
      if (!kBranchPerSlab || quantize) {
#pragma unroll
        for (int j = j0; j < j0 + kGroup; ++j)
          quantize_p_slab_table<kF16>(&p[8 * j], qc, table, p_hat[j]);
      } else {
#pragma unroll
        for (int j = j0; j < j0 + kGroup; ++j) {
#pragma unroll
          for (int r = 0; r < 4; ++r) p_hat[j][r] = p_tilde[j][r];
        }
      }
    }
  } else {
#pragma unroll
    for (int j = 0; j < kN / 16; ++j) {
      pack_p_tilde_slab<kF16>(&p[8 * j], p_tilde[j]);
#pragma unroll
      for (int r = 0; r < 4; ++r) p_hat[j][r] = p_tilde[j][r];
    }
  }
}

}  // namespace attnqat::cuda
