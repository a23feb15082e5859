// src/cuda/attention/sm90/p_quant.cuh — the P quantizer of the forward, in registers:
// p~ (fp32 accumulator fragment of a [64, kN] tile) -> the A fragments of the PV GEMM:
//   quantize_p_slab:   P^ = phi_nv(p~; g) per 16 consecutive keys of a row (numerics sections
//                      2, 4), decoded (value(q) * s * g, exact in bf16 and fp16) straight into
//                      bf16x2 / f16x2
//   quantize_p_slab_table: the same, bit for bit, with the block scale's inv and d read from a
//                      shared-memory table (the forward's path)
//   pack_p_tilde_slab: P~ = p~ rounded to the input dtype (the operand of O' = p~ V, and of O
//                      in mode bf16)
//   convert_p:         both over a tile
// Layout (docs/hopper.md, sections 5.1-5.2): 16-key slab j of the tile is the A fragment a[j][0..3]:
//   a[j][0] = (p[8j],   p[8j+1])  row g,   keys 16j + 2t, +1
//   a[j][1] = (p[8j+2], p[8j+3])  row g+8, keys 16j + 2t, +1
//   a[j][2] = (p[8j+4], p[8j+5])  row g,   keys 16j + 8 + 2t, +1
//   a[j][3] = (p[8j+6], p[8j+7])  row g+8, keys 16j + 8 + 2t, +1
// (low half = first element). An NVFP4 P block (row r, slab j) is held by the 4 lanes of a quad,
// 4 elements each: the block amax is an in-thread max plus two xor-shuffles (lane bits 0, 1).
//
// Must match, per block, attnqat::fake_quantize_block_nv(p~, g) (src/reference/codec.cpp) bit
// for bit for the same fp32 p~; tests/cpp/cuda_attention/sm90_test_kernels.cu checks this with
// the same functions. Every scalar step is a codec.cuh primitive (src/cuda/common/codec.cuh, THE
// device codec):
//   a = max.NaN of the block (a NaN p~ poisons it)         max_nan
//   t = RN(a / RN(6g))      3 instructions, exact           nv_scale_quotient_fast
//   s = e4m3(t)             one cvt for the thread's two blocks (e4m3x2_bytes below)
//   d = RN(s g); inv = RN(1/d), 0 when s = 0                p_block_scale (e4m3_decode's bit
//                                                           trick folded with g), rcp_rn_fast:
//                           computed once per CTA into a 256-entry shared-memory table
//                           {inv, (d, d)} indexed by the E4M3 byte (fill_p_scale_entry), so
//                           a block pays one LDS.64 instead of ~11 instructions and a MUFU
//   v = e2m1(RN(p~ inv))                                    mul_rn, e2m1_round_abs_unsat +
//                           the saturation min(., 6) done on the packed pair (one HMNMX2 per
//                           two elements)
//   P^ = v * d              one packed 16-bit multiply, exact (below)
// A block whose amax is NaN is poisoned through the table: its quotient is NaN, its E4M3 byte a
// NaN (0x7F or 0xFF), whose entries are {NaN, (NaN, NaN)}; every RN(p~ inv) is then NaN, which
// e2m1_round_abs_unsat and the NaN-keeping packed min carry into every decoded element.
// p~ is in [0, 1] (or NaN), so a/(6g) <= 2^11/6 < 448: the E4M3 scale never saturates, and
// nv_scale_quotient_fast's domain (a/(6g) < 2^127) holds.
#pragma once

#include <cstdint>

#include "cuda/attention/sm90/fwd_params.h"
#include "cuda/attention/sm90/ptx.cuh"
#include "cuda/common/codec.cuh"

namespace attnqat::sm90 {

// The E4M3 bytes of two non-negative quotients, t_lo in bits 0-7 and t_hi in bits 8-15, with one
// cvt.rn.satfinite.e4m3x2.f32: the pair form of codec.cuh's e4m3_encode_nonneg (same clamp to
// 448 first, because the convert's handling of Inf is not documented). A NaN quotient gives
// 448 here; callers poison NaN blocks through the amax (p_block_scale).
__device__ __forceinline__ uint32_t e4m3x2_encode_nonneg(float t_lo, float t_hi) {
  const float lo = fminf(t_lo, kE4M3Max), hi = fminf(t_hi, kE4M3Max);
  uint16_t pair;
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(pair) : "f"(hi), "f"(lo));
  return pair;
}

// The decode scale d = RN(s g) and the element multiplier inv = RN(1/d) of one P block, from
// its amax a and its E4M3 byte (bits 0-6: the quotient is >= 0, so the sign bit is 0).
// d in one multiply: (byte << 20) is the fp32 pattern of s * 2^-120 for normal and subnormal
// E4M3 alike (codec.cuh e4m3_decode), and s * 2^-120 * (2^120 g) = s g exactly (>= 2^-20, a
// normal fp32), so d = RN(s g) = RN(bits * two120_g) with two120_g = 2^120 g exact.
// Poisoned (a NaN or Inf): d = NaN, so every decoded element is NaN (inv is then NaN too, and e2m1
// of NaN gives 6: 6 * NaN = NaN). s = 0: d = inv = 0, so every element decodes to +0.
struct PBlockScale {
  float d;
  float inv;
};

__device__ __forceinline__ PBlockScale p_block_scale(float amax, uint32_t s_byte, float two120_g) {
  const float d = cuda::is_nonfinite_amax(amax)
                      ? __uint_as_float(cuda::kCanonicalNaN)
                      : cuda::mul_rn(cuda::float_of((s_byte & 0x7Fu) << 20), two120_g);
  return PBlockScale{d, d == 0.0f ? 0.0f : cuda::rcp_rn_fast(d)};
}

// Two 16-bit values (lo, hi) that are exact in the element type, packed. bf16: the upper halves
// of the fp32 patterns (one PRMT); fp16: a convert (exact, subnormals kept).
template <bool kF16>
__device__ __forceinline__ uint32_t pack_exact(float lo, float hi) {
  if constexpr (kF16)
    return pack_rn_f16x2(lo, hi);
  else
    return pack_exact_bf16x2(lo, hi);
}

// v0, v1 (E2M1 values, fp32) times d, as a packed pair. Exact: v has <= 2 significant bits and
// d = s g <= 4, so v d has <= 6 (bf16 keeps 8, fp16 11); every d >= 2^-20 and v d >= 2^-21 is a
// multiple of 2^-24, so fp16 subnormals hold them exactly too.
template <bool kF16>
__device__ __forceinline__ uint32_t decode_pair(float v0, float v1, uint32_t dd) {
  if constexpr (kF16)
    return mul_f16x2(pack_exact<true>(v0, v1), dd);
  else
    return mul_bf16x2(pack_exact<false>(v0, v1), dd);
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
    const float nan = __uint_as_float(cuda::kCanonicalNaN);
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

// The two E4M3 bytes of two non-negative quotients (t_lo in bits 0-7, t_hi in 8-15), one cvt.
// Unlike e4m3x2_encode_nonneg there is no clamp to 448 first: for P the quotient a/(6g) is at
// most (1 + 2^-22) * 2^11 / 6 < 342 (p~ <= 1 up to the rounding of the exp2 argument; a is never
// Inf), so the clamp never acts; a NaN quotient gives a NaN byte (quantize_p_slab_table).
__device__ __forceinline__ uint32_t e4m3x2_bytes(float t_lo, float t_hi) {
  uint16_t pair;
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(pair) : "f"(t_hi), "f"(t_lo));
  return pair;
}

// e2m1(y) before the saturation at 6, for y >= 0 or NaN: codec.cuh's candidate A with the
// min(y, 6) left out. Checked exhaustively on the CPU for every fp32 y in [0, 1024]:
// min(e2m1_round_abs_unsat(y), 6) == e2m1_round_abs_sw(y) bit for bit (for y in [7, 16) the
// unsaturated value is 8, 12 or 16, which the min turns into 6). Here y <= 9 (6 * 1.5 for a
// subnormal E4M3 scale). NaN stays NaN (the FMNMX against 1 gives 1, the FFMAs carry the NaN).
// 4 instructions (FMNMX, LOP3, 2 FFMA).
__device__ __forceinline__ float e2m1_round_abs_unsat(float y) {
  const float p = cuda::float_of(cuda::bits_of(fmaxf(y, 1.0f)) & 0x7F800000u);
  const float t = cuda::fma_rn(p, 4194304.0f, y);  // 2^22
  return cuda::fma_rn(p, -4194304.0f, t);
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

// min(v0, 6), min(v1, 6) (E2M1 values, fp32, unsaturated) times d, as a packed pair. Exact: v has
// <= 2 significant bits and d = s g <= 4, so v d has <= 6 (bf16 keeps 8, fp16 11); every d >= 2^-20
// and v d >= 2^-21 is a multiple of 2^-24, so fp16 subnormals hold them exactly too. v itself
// (<= 16 before the min) is exact in both types.
template <bool kF16>
__device__ __forceinline__ uint32_t decode_pair_sat(float v0, float v1, uint32_t dd) {
  const uint32_t v = sat6_pair<kF16>(pack_exact<kF16>(v0, v1));
  if constexpr (kF16)
    return mul_f16x2(v, dd);
  else
    return mul_bf16x2(v, dd);
}

// P^ fragment of one 16-key slab (the A fragment of one k16 step of the PV GEMM) from the
// slab's eight p~ values x = p + 8 j (see the file header for their positions).
// Arithmetic scale path (no table): the table-free twin of quantize_p_slab_table, with no caller
// in the kernels today (the backward has its own variant, quantize_pf_slab in bwd_kernel.cuh,
// which also multiplies by 1/l).
template <bool kF16>
__device__ __forceinline__ void quantize_p_slab(const float* x, const PQuantConsts& qc,
                                                uint32_t (&p_hat)[4]) {
  // Block amax of row g (half 0) and row g + 8 (half 1); p~ >= 0, so max = max |.|.
  float a0 = cuda::max_nan(cuda::max_nan(x[0], x[1]), cuda::max_nan(x[4], x[5]));
  float a1 = cuda::max_nan(cuda::max_nan(x[2], x[3]), cuda::max_nan(x[6], x[7]));
  a0 = cuda::max_nan(a0, __shfl_xor_sync(0xffffffffu, a0, 1));
  a1 = cuda::max_nan(a1, __shfl_xor_sync(0xffffffffu, a1, 1));
  a0 = cuda::max_nan(a0, __shfl_xor_sync(0xffffffffu, a0, 2));
  a1 = cuda::max_nan(a1, __shfl_xor_sync(0xffffffffu, a1, 2));
  const uint32_t bytes =
      e4m3x2_encode_nonneg(cuda::nv_scale_quotient_fast(a0, qc.six_g, qc.rcp_six_g),
                           cuda::nv_scale_quotient_fast(a1, qc.six_g, qc.rcp_six_g));
  const PBlockScale b0 = p_block_scale(a0, bytes, qc.two120_g);
  const PBlockScale b1 = p_block_scale(a1, bytes >> 8, qc.two120_g);
  const uint32_t dd0 = pack_exact<kF16>(b0.d, b0.d);
  const uint32_t dd1 = pack_exact<kF16>(b1.d, b1.d);
  float v[8];
#pragma unroll
  for (int e = 0; e < 8; ++e)
    v[e] = cuda::e2m1_round_abs(cuda::mul_rn(x[e], ((e >> 1) & 1) ? b1.inv : b0.inv));
  p_hat[0] = decode_pair<kF16>(v[0], v[1], dd0);
  p_hat[1] = decode_pair<kF16>(v[2], v[3], dd1);
  p_hat[2] = decode_pair<kF16>(v[4], v[5], dd0);
  p_hat[3] = decode_pair<kF16>(v[6], v[7], dd1);
}

// The same P^ fragment through the scale table (the forward): bit-identical to quantize_p_slab
// for every p~ (table entries are p_block_scale's values; see the file header for the poison and
// the saturation). table: the shared-memory scale table (fill_p_scale_entry).
template <bool kF16>
__device__ __forceinline__ void quantize_p_slab_table(const float* x, const PQuantConsts& qc,
                                                      uint32_t table, uint32_t (&p_hat)[4]) {
  // Block amax of row g (half 0) and row g + 8 (half 1); p~ >= 0, so max = max |.|.
  float a0 = cuda::max_nan(cuda::max_nan(x[0], x[1]), cuda::max_nan(x[4], x[5]));
  float a1 = cuda::max_nan(cuda::max_nan(x[2], x[3]), cuda::max_nan(x[6], x[7]));
  a0 = cuda::max_nan(a0, __shfl_xor_sync(0xffffffffu, a0, 1));
  a1 = cuda::max_nan(a1, __shfl_xor_sync(0xffffffffu, a1, 1));
  a0 = cuda::max_nan(a0, __shfl_xor_sync(0xffffffffu, a0, 2));
  a1 = cuda::max_nan(a1, __shfl_xor_sync(0xffffffffu, a1, 2));
  const uint32_t bytes =
      e4m3x2_bytes(cuda::nv_scale_quotient_fast(a0, qc.six_g, qc.rcp_six_g),
                   cuda::nv_scale_quotient_fast(a1, qc.six_g, qc.rcp_six_g));
  // A NaN amax (the only non-finite one: p~ <= 1 or NaN) gives a NaN quotient, which the convert
  // turns into an E4M3 NaN byte (0x7F or 0xFF: the PTX ISA specifies NaN -> NaN for .satfinite,
  // not the sign), and both table entries are NaN: the block is poisoned.
  const PScaleEntry b0 = lookup_p_scale(table, bytes & 0xFFu);
  const PScaleEntry b1 = lookup_p_scale(table, (bytes >> 8) & 0xFFu);
  float v[8];
#pragma unroll
  for (int e = 0; e < 8; ++e)
    v[e] = e2m1_round_abs_unsat(cuda::mul_rn(x[e], ((e >> 1) & 1) ? b1.inv : b0.inv));
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
    frag[r] = kF16 ? pack_rn_f16x2(x[2 * r], x[2 * r + 1]) : pack_rn_bf16x2(x[2 * r], x[2 * r + 1]);
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

}  // namespace attnqat::sm90
