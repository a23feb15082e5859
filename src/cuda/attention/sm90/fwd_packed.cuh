// src/cuda/attention/sm90/fwd_packed.cuh — the producer of the forward from packed NVFP4 Q, K, V
// (FwdConfig::kPacked): the operands are unpacked inside the kernel, exactly, into the same
// swizzled bf16/fp16 tiles that TMA writes for the other configs, so the consumers (and hence
// the numerics) are those of mode fp4 on the dequantized tensors, bit for bit.
//
// Roles: the whole producer warpgroup (128 threads, 88 registers each: FwdConfig) runs this loop.
//   staging: packed tiles (codes [rows, d/2] and E4M3 scales [rows, d/16], as in global memory)
//            go into a 2-stage ring by cp.async (16-byte copies for codes, one d/16-byte copy per
//            row for scales; rows past the tensor's end are zero-filled), one tile ahead;
//   unpack:  each thread turns 32-bit words of 8 codes into 16-byte units of the tile (one
//            st.shared.v4 each, conflict-free: the 8 threads of a quarter-warp write one row's 8
//            units, which the 128B swizzle spreads over all banks), then fences the generic-proxy
//            writes for the async proxy (wgmma) and arrives on the tile's `full` barrier
//            (128 arrivals instead of TMA's one expect_tx).
// Order: Q; then per tile n, K[n] and V[n] after their `empty` waits (fwd_load.cuh's protocol).
// With p.kv_tma only Q is packed: thread 0 issues the first pass of TMA K/V tiles (fwd_load.cuh,
// non-blocking), the warpgroup unpacks Q, then thread 0 runs the rest of the K/V loop (which
// waits for the consumers, hence after Q).
//
// Exactness. dequantize() computes RN_out(RN(RN(e2m1(c) * s) * g)) (numerics section 7).
// Fast path: e2m1(c) as a 16-bit float (fp4_unpack.cuh) times the unpack table's sg = RN_out(s *
// g) in one mul.rn.{f16,bf16}x2. When g is a power of two in [2^-14, 2^4] (fp16) or
// [2^-116, 2^116] (bf16), s * g and e2m1(c) * s * g are exactly representable in the output type
// (at most 6 significant bits, all multiples of 2^-24 resp. at least 2^-126, no overflow), so
// every rounding above is exact and both computations give the same bits (NaN scales -> NaN).
// Any other g (read on the device, one uniform branch per operand) takes the exact path: the
// dequantize kernel's own per-element arithmetic (codec.cuh nv_dequant_element) in fp32.
#pragma once

#include <cstdint>

#include "cuda/attention/sm90/fwd_load.cuh"
#include "cuda/attention/sm90/fwd_params.h"
#include "cuda/attention/sm90/fwd_smem.cuh"
#include "cuda/common/ptx.cuh"
#include "cuda/common/ptx_sm90.cuh"
#include "cuda/common/codec.cuh"
#include "cuda/common/fp4_unpack.cuh"

namespace attnqat::sm90 {

// Named barrier of the producer warpgroup (ids 1, 2 are the consumers' kBarSched + w).
constexpr uint32_t kBarProducer = 3;

// ---- Unpack tables and the fast-path condition ---------------------------------------------------

// g is a power of two for which the fast path is exact (see the file comment).
template <bool kF16>
__device__ __forceinline__ bool fast_global_scale(float g) {
  const uint32_t u = __float_as_uint(g);
  const uint32_t e = u >> 23;  // biased exponent; sign 0 required below
  constexpr uint32_t kLo = kF16 ? 127 - 14 : 127 - 116, kHi = kF16 ? 127 + 4 : 127 + 116;
  return (u & 0x007FFFFFu) == 0 && e >= kLo && e <= kHi;
}

// Table entry for E4M3 byte e: RN_out(s(e) * g) in both halves.
template <bool kF16>
__device__ __forceinline__ uint32_t scale_entry(uint32_t e, float g) {
  const float sg = cuda::mul_rn(cuda::e4m3_decode(e), g);
  return kF16 ? cuda::pack_rn_f16x2(sg, sg) : cuda::pack_rn_bf16x2(sg, sg);
}

// ---- Staging ----------------------------------------------------------------------------------

// cp.async of rows [row0, row0 + 128) of operand `op` at (b, h): codes to dst, scales to dst +
// kCodeBytes. Rows past op.rows are zero-filled (codes 0 with scale 0 unpack to 0).
template <class Cfg>
__device__ __forceinline__ void stage_rows(const PackedOperand& op, int b, int h, int row0,
                                           uint32_t dst, int tid) {
  static_assert(Cfg::kBlockN == 128, "one scale row per producer thread");
  constexpr int kRowChunks = Cfg::kHeadDim / 32;  // 16-byte chunks of codes per row
  constexpr int kPerThread = Cfg::kBlockN * kRowChunks / 128;
  constexpr int kScaleRowBytes = Cfg::kHeadDim / 16;
  static_assert(128 % kRowChunks == 0, "each thread copies one column of chunks");
  constexpr int kRowStep = 128 / kRowChunks;  // rows between a thread's chunks
  const int64_t sn = op.data_stride[2];
  int row = row0 + tid / kRowChunks;
  const uint8_t* src = op.data + b * op.data_stride[0] + h * op.data_stride[1] + row * sn +
                       (tid % kRowChunks) * 16;
#pragma unroll
  for (int i = 0; i < kPerThread; ++i, row += kRowStep, src += kRowStep * sn)
    cuda::cp_async16_zfill(dst + 16 * (tid + 128 * i), row < op.rows ? src : op.data, row < op.rows);
  const int srow = row0 + tid;
  const bool valid = srow < op.rows;
  const uint8_t* scales = op.scales + b * op.scale_stride[0] + h * op.scale_stride[1] +
                          srow * op.scale_stride[2];
  cuda::cp_async_small_zfill<kScaleRowBytes>(dst + Cfg::kCodeBytes + kScaleRowBytes * tid,
                                       valid ? scales : op.scales, valid);
}

// ---- Unpacking of one staged tile into its swizzled 16-bit tile --------------------------------------

// Word i = tid + 128 * pass of the staged codes (8 codes: row i / (d/8), channels 8 (i % (d/8)) +
// 0..7) becomes the 16-byte unit (i % (d/8)) of that row: chunk j / 8, unit j % 8 XOR (row % 8).
// Per thread the unit and (row % 8) are loop constants (128 is a multiple of 8 rows' words).
template <class Cfg, bool kFast>
__device__ __forceinline__ void unpack_tile(uint32_t staged, uint32_t tile, uint32_t table, float g,
                                            int tid, uint32_t tab0, uint32_t tab1) {
  constexpr int kD = Cfg::kHeadDim;
  constexpr int kWordsPerRow = kD / 8;
  constexpr int kRowsPerPass = 128 / kWordsPerRow;  // 8 (d = 128) or 16 (d = 64)
  constexpr int kPasses = Cfg::kBlockN / kRowsPerPass;
  constexpr int kScaleRowBytes = kD / 16;
  static_assert(kRowsPerPass % 8 == 0, "row % 8 must be a loop constant");
  const int r0 = tid / kWordsPerRow, j = tid % kWordsPerRow;
  const uint32_t dst0 = tile + (j / 8) * Cfg::kKVChunkBytes + r0 * Cfg::kRowBytes +
                        (((j & 7) ^ (r0 & 7)) * 16);
  const uint32_t code0 = staged + 4 * tid;
  const uint32_t scale0 = staged + Cfg::kCodeBytes + r0 * kScaleRowBytes + j / 2;
  if constexpr (kFast) {
    // Batches of kBatch words: their loads (codes, scale bytes, then the dependent table reads)
    // are issued back to back, so that their latencies overlap (the wrappers are volatile asm:
    // the compiler keeps them in this order, and never moves them across the barriers).
    constexpr int kBatch = kPasses < 16 ? kPasses : 16;
    static_assert(kPasses % kBatch == 0, "whole batches");
#pragma unroll 1
    for (int pass = 0; pass < kPasses; pass += kBatch) {
      uint32_t w[kBatch], sg[kBatch];
#pragma unroll
      for (int i = 0; i < kBatch; ++i) {
        w[i] = cuda::ld_shared_u32(code0 + 512 * (pass + i));
        sg[i] = cuda::ld_shared_u8(scale0 + kRowsPerPass * kScaleRowBytes * (pass + i));
      }
#pragma unroll
      for (int i = 0; i < kBatch; ++i) sg[i] = cuda::ld_shared_u32(table + 4 * sg[i]);
#pragma unroll
      for (int i = 0; i < kBatch; ++i) {
        uint32_t out[4];
        if constexpr (Cfg::kF16) {
          cuda::fp4_word_to_f16x2_codes(w[i], tab0, out);
#pragma unroll
          for (int k = 0; k < 4; ++k) out[k] = cuda::mul_f16x2(out[k], sg[i]);
        } else {
          cuda::fp4_word_to_bf16x2_codes(w[i], tab0, tab1, out);
#pragma unroll
          for (int k = 0; k < 4; ++k) out[k] = cuda::mul_bf16x2(out[k], sg[i]);
        }
        cuda::st_shared_v4(dst0 + kRowsPerPass * Cfg::kRowBytes * (pass + i), out);
      }
    }
  } else {
#pragma unroll 1
    for (int pass = 0; pass < kPasses; ++pass) {
      const uint32_t w = cuda::ld_shared_u32(code0 + 512 * pass);
      const float s = cuda::e4m3_decode(cuda::ld_shared_u8(scale0 + kRowsPerPass * kScaleRowBytes * pass));
      uint32_t out[4];
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const float lo = cuda::nv_dequant_element(w >> (8 * k), s, g);
        const float hi = cuda::nv_dequant_element(w >> (8 * k + 4), s, g);
        out[k] = Cfg::kF16 ? cuda::pack_rn_f16x2(lo, hi) : cuda::pack_rn_bf16x2(lo, hi);
      }
      cuda::st_shared_v4(dst0 + kRowsPerPass * Cfg::kRowBytes * pass, out);
    }
  }
}

// Unpacks operand `op` (0: Q, 1: K, 2: V) from `staged` into `tile`. g comes from shared memory
// and the PRMT tables are pinned here, so that nothing stays live across tiles.
template <class Cfg>
__device__ __forceinline__ void unpack_operand(const SmemMap<Cfg>& sm, int op, uint32_t staged,
                                               uint32_t tile, int tid) {
  const float g = __uint_as_float(cuda::ld_shared_u32(sm.table(3) + 4 * op));
  const uint32_t table = sm.table(op);
  const uint32_t tab0 = Cfg::kF16 ? cuda::pinned<cuda::kLut0>(0u) : cuda::pinned<cuda::kBf16Hi0>(0u);
  const uint32_t tab1 = Cfg::kF16 ? 0u : cuda::pinned<cuda::kBf16Lo0>(0u);
  if (fast_global_scale<Cfg::kF16>(g))
    unpack_tile<Cfg, true>(staged, tile, table, g, tid, tab0, tab1);
  else
    unpack_tile<Cfg, false>(staged, tile, table, g, tid, tab0, tab1);
  cuda::fence_proxy_async_smem();  // this thread's units, for the consumers' wgmma
}

// ---- The producer loop (all 128 threads of warpgroup 0) ---------------------------------------

template <class Cfg>
__device__ __forceinline__ void packed_producer_mainloop(const FwdParams& p, const SmemMap<Cfg>& sm,
                                                         int m_block, int h, const SeqRows& sr,
                                                         int n_begin,
                                                         int n_tiles) {
  const int tid = threadIdx.x;  // 0..127
  const int h_kv = h / p.group;
  {
    const float* gp[3] = {p.pk_q.g, p.pk_k.g, p.pk_v.g};
    const int n_ops = p.kv_tma ? 1 : 3;  // kv_tma: only Q is packed
#pragma unroll
    for (int op = 0; op < 3; ++op) {
      if (op >= n_ops) break;
      const float g = *gp[op];
      for (int e = tid; e < 256; e += 128) cuda::st_shared_b32(sm.table(op) + 4 * e, scale_entry<Cfg::kF16>(e, g));
      if (tid == 0) cuda::st_shared_b32(sm.table(3) + 4 * op, __float_as_uint(g));
    }
  }
  auto stage_kv = [&](int n) {  // tile n = key block n_begin + n
    const uint32_t st = sm.stage(n % Cfg::kStages);
    const int row0 = sr.k0 + (n_begin + n) * Cfg::kBlockN;
    stage_rows<Cfg>(p.pk_k, sr.b, h_kv, row0, st, tid);
    stage_rows<Cfg>(p.pk_v, sr.b, h_kv, row0, st + Cfg::kStageKBytes, tid);
  };
  static_assert(Cfg::kStages == 2, "Q borrows stage 1 before K/V tile 1 lands there");
  stage_rows<Cfg>(p.pk_q, sr.b, h, sr.q0 + m_block * Cfg::kBlockM, sm.stage(1), tid);
  cuda::cp_async_commit();
  if (p.kv_tma) {  // only Q is packed; K/V tiles by TMA from thread 0
    const int first = n_tiles < Cfg::kStages ? n_tiles : Cfg::kStages;
    if (tid == 0) {  // the first pass over the ring does not block: issue it before Q's unpacking
      cuda::prefetch_tma_descriptors(&p.tma_k, &p.tma_v);
      load_kv_tiles<Cfg>(p, sm, h_kv, sr, n_begin, 0, first);
    }
    cuda::cp_async_wait<0>();
    cuda::named_bar_sync(kBarProducer, 128);
    unpack_operand<Cfg>(sm, 0, sm.stage(1), sm.q(), tid);
    cuda::mbar_arrive(sm.q_full());
    if (tid == 0) load_kv_tiles<Cfg>(p, sm, h_kv, sr, n_begin, first, n_tiles);  // waits on `empty`
    return;
  }
  stage_kv(0);
  cuda::cp_async_commit();

  cuda::cp_async_wait<1>();                 // this thread's Q copies landed
  cuda::named_bar_sync(kBarProducer, 128);        // everyone's, and the unpack tables
  unpack_operand<Cfg>(sm, 0, sm.stage(1), sm.q(), tid);
  cuda::mbar_arrive(sm.q_full());
  cuda::named_bar_sync(kBarProducer, 128);        // stage 1 is free again
  if (n_tiles > 1) stage_kv(1);
  cuda::cp_async_commit();

  for (int n = 0; n < n_tiles; ++n) {
    const int stage = n % Cfg::kStages;
    const uint32_t parity = ((n / Cfg::kStages) & 1) ^ 1;
    const uint32_t staged = sm.stage(stage);
    cuda::cp_async_wait<1>();               // tile n landed (tile n + 1 may be in flight)
    cuda::named_bar_sync(kBarProducer, 128);
    cuda::mbar_wait(sm.k_empty(stage), parity);   // consumers released K[n - kStages]
    unpack_operand<Cfg>(sm, 1, staged, sm.k(stage), tid);
    cuda::mbar_arrive(sm.k_full(stage));
    cuda::mbar_wait(sm.v_empty(stage), parity);
    unpack_operand<Cfg>(sm, 2, staged + Cfg::kStageKBytes, sm.v(stage), tid);
    cuda::mbar_arrive(sm.v_full(stage));
    cuda::named_bar_sync(kBarProducer, 128);      // staging stage free: tile n + 2 may overwrite it
    if (n + 2 < n_tiles) stage_kv(n + 2);
    cuda::cp_async_commit();
  }
}

}  // namespace attnqat::sm90
