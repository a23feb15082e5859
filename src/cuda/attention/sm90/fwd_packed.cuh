// src/cuda/attention/sm90/fwd_packed.cuh — the producer of the forward from packed NVFP4 Q, K, V
// (FwdConfig::kPacked): the operands are decoded inside the kernel, exactly, into the same
// swizzled bf16/fp16 tiles that TMA writes for the other configs, so the consumers (and hence
// the numerics) are those of mode fp4 on the dequantized tensors, bit for bit.
//
// Roles: the whole producer warpgroup (128 threads, 88 registers each: FwdConfig) runs this loop.
//   staging: packed tiles (codes [rows, d/2] and E4M3 scales [rows, d/16], as in global memory)
//            go into a 2-stage ring by cp.async (16-byte copies for codes, one d/16-byte copy per
//            row for scales; rows past the tensor's end are zero-filled), one tile ahead;
//   decode:  each thread turns 32-bit words of 8 codes into 16-byte units of the tile (one
//            st.shared.v4 each, conflict-free: the 8 threads of a quarter-warp write one row's 8
//            units, which the 128B swizzle spreads over all banks), then fences the generic-proxy
//            writes for the async proxy (wgmma) and arrives on the tile's `full` barrier
//            (128 arrivals instead of TMA's one expect_tx).
// Order: Q; then per tile n, K[n] and V[n] after their `empty` waits (fwd_load.cuh's protocol).
// With p.kv_tma only Q is packed: thread 0 issues the first pass of TMA K/V tiles (fwd_load.cuh,
// non-blocking), the warpgroup decodes Q, then thread 0 runs the rest of the K/V loop (which
// waits for the consumers, hence after Q).
//
// Exactness. dequantize() computes RN_out(RN(RN(e2m1(c) * s) * g)) (numerics section 7).
// Fast path: e2m1(c) as a 16-bit float (fp4_unpack.cuh) times the decode table's sg = RN_out(s *
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
#include "cuda/attention/sm90/ptx.cuh"
#include "cuda/common/codec.cuh"
#include "cuda/common/fp4_unpack.cuh"

namespace attnqat::sm90 {

// Named barrier of the producer warpgroup (ids 1, 2 are the consumers' kBarSched + w).
constexpr uint32_t kBarProducer = 3;

// ---- Small PTX wrappers ------------------------------------------------------------------------

// 16-byte copy global -> shared; zero-filled when !valid (src is then not read).
__device__ __forceinline__ void cp_async16_zfill(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src),
               "r"(valid ? 16 : 0)
               : "memory");
}
template <int kBytes>  // 4 or 8
__device__ __forceinline__ void cp_async_small_zfill(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;" ::"r"(dst), "l"(src), "n"(kBytes),
               "r"(valid ? kBytes : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit_group() {
  asm volatile("cp.async.commit_group;" ::: "memory");
}
template <int kPending>
__device__ __forceinline__ void cp_async_wait_group() {
  asm volatile("cp.async.wait_group %0;" ::"n"(kPending) : "memory");
}
__device__ __forceinline__ uint32_t lds_u32(uint32_t a) {
  uint32_t v;
  asm volatile("ld.shared.u32 %0, [%1];" : "=r"(v) : "r"(a) : "memory");
  return v;
}
__device__ __forceinline__ uint32_t lds_u8(uint32_t a) {
  uint16_t v;
  asm volatile("ld.shared.u8 %0, [%1];" : "=h"(v) : "r"(a) : "memory");
  return v;
}
__device__ __forceinline__ void sts_u32(uint32_t a, uint32_t v) {
  asm volatile("st.shared.u32 [%0], %1;" ::"r"(a), "r"(v) : "memory");
}
__device__ __forceinline__ void sts_v4(uint32_t a, const uint32_t (&v)[4]) {
  asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};" ::"r"(a), "r"(v[0]), "r"(v[1]),
               "r"(v[2]), "r"(v[3])
               : "memory");
}
// Generic-proxy shared-memory writes -> visible to the async proxy (wgmma operand reads).
__device__ __forceinline__ void fence_proxy_async_shared() {
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}

// ---- Decode tables and the fast-path condition ---------------------------------------------------

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
  return kF16 ? pack_rn_f16x2(sg, sg) : pack_rn_bf16x2(sg, sg);
}

// ---- Staging ----------------------------------------------------------------------------------

// cp.async of rows [row0, row0 + 128) of operand `op` at (b, h): codes to dst, scales to dst +
// kCodeBytes. Rows past op.rows are zero-filled (codes 0 with scale 0 decode to 0).
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
    cp_async16_zfill(dst + 16 * (tid + 128 * i), row < op.rows ? src : op.data, row < op.rows);
  const int srow = row0 + tid;
  const bool valid = srow < op.rows;
  const uint8_t* scales = op.scales + b * op.scale_stride[0] + h * op.scale_stride[1] +
                          srow * op.scale_stride[2];
  cp_async_small_zfill<kScaleRowBytes>(dst + Cfg::kCodeBytes + kScaleRowBytes * tid,
                                       valid ? scales : op.scales, valid);
}

// ---- Decode of one staged tile into its swizzled 16-bit tile --------------------------------------

// Word i = tid + 128 * pass of the staged codes (8 codes: row i / (d/8), channels 8 (i % (d/8)) +
// 0..7) becomes the 16-byte unit (i % (d/8)) of that row: chunk j / 8, unit j % 8 XOR (row % 8).
// Per thread the unit and (row % 8) are loop constants (128 is a multiple of 8 rows' words).
template <class Cfg, bool kFast>
__device__ __forceinline__ void decode_tile(uint32_t staged, uint32_t tile, uint32_t table, float g,
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
        w[i] = lds_u32(code0 + 512 * (pass + i));
        sg[i] = lds_u8(scale0 + kRowsPerPass * kScaleRowBytes * (pass + i));
      }
#pragma unroll
      for (int i = 0; i < kBatch; ++i) sg[i] = lds_u32(table + 4 * sg[i]);
#pragma unroll
      for (int i = 0; i < kBatch; ++i) {
        uint32_t out[4];
        if constexpr (Cfg::kF16) {
          cuda::fp4_word_to_f16x2_codes(w[i], tab0, out);
#pragma unroll
          for (int k = 0; k < 4; ++k) out[k] = mul_f16x2(out[k], sg[i]);
        } else {
          cuda::fp4_word_to_bf16x2_codes(w[i], tab0, tab1, out);
#pragma unroll
          for (int k = 0; k < 4; ++k) out[k] = mul_bf16x2(out[k], sg[i]);
        }
        sts_v4(dst0 + kRowsPerPass * Cfg::kRowBytes * (pass + i), out);
      }
    }
  } else {
#pragma unroll 1
    for (int pass = 0; pass < kPasses; ++pass) {
      const uint32_t w = lds_u32(code0 + 512 * pass);
      const float s = cuda::e4m3_decode(lds_u8(scale0 + kRowsPerPass * kScaleRowBytes * pass));
      uint32_t out[4];
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const float lo = cuda::nv_dequant_element(w >> (8 * k), s, g);
        const float hi = cuda::nv_dequant_element(w >> (8 * k + 4), s, g);
        out[k] = Cfg::kF16 ? pack_rn_f16x2(lo, hi) : pack_rn_bf16x2(lo, hi);
      }
      sts_v4(dst0 + kRowsPerPass * Cfg::kRowBytes * pass, out);
    }
  }
}

// Decodes operand `op` (0: Q, 1: K, 2: V) from `staged` into `tile`. g comes from shared memory
// and the PRMT tables are pinned here, so that nothing stays live across tiles.
template <class Cfg>
__device__ __forceinline__ void decode_operand(const SmemMap<Cfg>& sm, int op, uint32_t staged,
                                               uint32_t tile, int tid) {
  const float g = __uint_as_float(lds_u32(sm.table(3) + 4 * op));
  const uint32_t table = sm.table(op);
  const uint32_t tab0 = Cfg::kF16 ? cuda::pinned<cuda::kLut0>(0u) : cuda::pinned<cuda::kBf16Hi0>(0u);
  const uint32_t tab1 = Cfg::kF16 ? 0u : cuda::pinned<cuda::kBf16Lo0>(0u);
  if (fast_global_scale<Cfg::kF16>(g))
    decode_tile<Cfg, true>(staged, tile, table, g, tid, tab0, tab1);
  else
    decode_tile<Cfg, false>(staged, tile, table, g, tid, tab0, tab1);
  fence_proxy_async_shared();  // this thread's units, for the consumers' wgmma
}

// ---- The producer loop (all 128 threads of warpgroup 0) ---------------------------------------

template <class Cfg>
__device__ __forceinline__ void packed_producer_mainloop(const FwdParams& p, const SmemMap<Cfg>& sm,
                                                         int m_block, int h, int b, int n_tiles) {
  const int tid = threadIdx.x;  // 0..127
  const int h_kv = h / p.group;
  {
    const float* gp[3] = {p.pk_q.g, p.pk_k.g, p.pk_v.g};
    const int n_ops = p.kv_tma ? 1 : 3;  // kv_tma: only Q is packed
#pragma unroll
    for (int op = 0; op < 3; ++op) {
      if (op >= n_ops) break;
      const float g = *gp[op];
      for (int e = tid; e < 256; e += 128) sts_u32(sm.table(op) + 4 * e, scale_entry<Cfg::kF16>(e, g));
      if (tid == 0) sts_u32(sm.table(3) + 4 * op, __float_as_uint(g));
    }
  }
  auto stage_kv = [&](int n) {
    const uint32_t st = sm.stage(n % Cfg::kStages);
    stage_rows<Cfg>(p.pk_k, b, h_kv, n * Cfg::kBlockN, st, tid);
    stage_rows<Cfg>(p.pk_v, b, h_kv, n * Cfg::kBlockN, st + Cfg::kStageKBytes, tid);
  };
  static_assert(Cfg::kStages == 2, "Q borrows stage 1 before K/V tile 1 lands there");
  stage_rows<Cfg>(p.pk_q, b, h, m_block * Cfg::kBlockM, sm.stage(1), tid);
  cp_async_commit_group();
  if (p.kv_tma) {  // only Q is packed; K/V tiles by TMA from thread 0
    const int first = n_tiles < Cfg::kStages ? n_tiles : Cfg::kStages;
    if (tid == 0) {  // the first pass over the ring does not block: issue it before Q's decode
      prefetch_tma_descriptor(&p.tma_k);
      prefetch_tma_descriptor(&p.tma_v);
      load_kv_tiles<Cfg>(p, sm, h_kv, b, 0, first);
    }
    cp_async_wait_group<0>();
    named_bar_sync(kBarProducer, 128);
    decode_operand<Cfg>(sm, 0, sm.stage(1), sm.q(), tid);
    mbar_arrive(sm.q_full());
    if (tid == 0) load_kv_tiles<Cfg>(p, sm, h_kv, b, first, n_tiles);  // waits on `empty`
    return;
  }
  stage_kv(0);
  cp_async_commit_group();

  cp_async_wait_group<1>();                 // this thread's Q copies landed
  named_bar_sync(kBarProducer, 128);        // everyone's, and the decode tables
  decode_operand<Cfg>(sm, 0, sm.stage(1), sm.q(), tid);
  mbar_arrive(sm.q_full());
  named_bar_sync(kBarProducer, 128);        // stage 1 is free again
  if (n_tiles > 1) stage_kv(1);
  cp_async_commit_group();

  for (int n = 0; n < n_tiles; ++n) {
    const int stage = n % Cfg::kStages;
    const uint32_t parity = ((n / Cfg::kStages) & 1) ^ 1;
    const uint32_t staged = sm.stage(stage);
    cp_async_wait_group<1>();               // tile n landed (tile n + 1 may be in flight)
    named_bar_sync(kBarProducer, 128);
    mbar_wait(sm.k_empty(stage), parity);   // consumers released K[n - kStages]
    decode_operand<Cfg>(sm, 1, staged, sm.k(stage), tid);
    mbar_arrive(sm.k_full(stage));
    mbar_wait(sm.v_empty(stage), parity);
    decode_operand<Cfg>(sm, 2, staged + Cfg::kStageKBytes, sm.v(stage), tid);
    mbar_arrive(sm.v_full(stage));
    named_bar_sync(kBarProducer, 128);      // staging stage free: tile n + 2 may overwrite it
    if (n + 2 < n_tiles) stage_kv(n + 2);
    cp_async_commit_group();
  }
}

}  // namespace attnqat::sm90
