// src/cuda/attention/sm90/bwd_config.h — compile-time configuration of the sm90 backward kernel
// (numerics section 5): tile sizes, roles, register budget and the shared-memory map, with the
// static_asserts that keep them consistent. Host and device code.
//
// Structure (FlashAttention-3's backward, docs/hopper.md section 8, with SdP_swapAB = false as section 5.2 of it
// recommends, so that the forward's P quantizer is reused unchanged):
//  - One CTA per (key block of kBlockN = 128 keys, KV head, batch). K and V are loaded once; the
//    CTA loops over every query head of the GQA group and every query block of kBlockM = 64 rows
//    that sees a key of the block, so dK and dV are summed over the group in registers (no
//    cross-CTA reduction, deterministic by construction).
//  - Consumer warpgroup w (2 of them) owns keys [64 w, 64 w + 64) of the block: its S and dP
//    tiles are [64 queries, 64 keys] with rows = queries, exactly the forward's fragment layout
//    (16-key NVFP4 P blocks = k16 slabs, reduced over a quad).
//  - dK, dV [64 keys, d] accumulate in the warpgroup's registers over the whole loop.
//  - dQ of a query block is split into two [64, 64] pieces, one per warpgroup: d = 128: the
//    columns [64 w, 64 w + 64) over all 128 keys; d = 64: all columns over the warpgroup's own 64
//    keys (two partial sums of the same piece). Pieces go to an fp32 buffer dQaccum by bulk
//    reduce-add (or, deterministic, by ordered read-add-write), and a postprocess kernel scales
//    by c and converts.
//  - Producer warpgroup: one thread issues the TMA loads (K, V once; per iteration Q, dO and the
//    row statistics into a 2-stage ring).
// Registers: producer 24, consumers 240 (setmaxnreg), as the forward: d = 128 keeps dK + dV
// (128) + S/P (32) + dP (32) + fragments live at the peak.
#pragma once

#include <cstdint>

namespace attnqat::sm90 {

template <bool kIsF16, int kHeadDimT>
struct BwdConfig {
  static constexpr bool kF16 = kIsF16;
  static constexpr int kHeadDim = kHeadDimT;

  // ---- Roles and tiles ------------------------------------------------------------------------
  static constexpr int kConsumerWGs = 2;
  static constexpr int kThreads = 128 * (1 + kConsumerWGs);  // warpgroup 0 = producer
  static constexpr int kBlockM = 64;                         // query rows per iteration
  static constexpr int kBlockN = 128;                        // keys per CTA
  static constexpr int kWgKeys = kBlockN / kConsumerWGs;     // keys per consumer warpgroup
  static constexpr int kStages = 2;                          // Q / dO / stats ring depth
  static constexpr int kProducerRegs = 24;
  static constexpr int kConsumerRegs = 240;

  // ---- Shared memory --------------------------------------------------------------------------
  // 16-bit tiles are stored as column chunks of 64 elements with 128-byte rows, 128B swizzle
  // (the forward's layout, fwd_config.h): chunk c of a [rows, d] tile is [rows, 64] at byte
  // c * rows * 128. TMA writes K, V, Q, dO so; the consumers write P and dS so (st.shared).
  static constexpr int kRowBytes = 128;
  static constexpr int kChunkCols = 64;
  static constexpr int kChunks = kHeadDim / kChunkCols;
  static constexpr int kQChunkBytes = kBlockM * kRowBytes;   // [64, 64] of Q or dO
  static constexpr int kKVChunkBytes = kBlockN * kRowBytes;  // [128, 64] of K or V
  static constexpr int kQBytes = kQChunkBytes * kChunks;     // [64, d]
  static constexpr int kKVBytes = kKVChunkBytes * kChunks;   // [128, d]
  static constexpr int kPTileBytes = kBlockM * kRowBytes;    // [64 queries, 64 keys] 16-bit
  static constexpr int kPieceFloats = 64 * 64;               // one dQ piece, fp32
  static constexpr int kPieceBytes = kPieceFloats * 4;
  static constexpr int kStatsBytes = kBlockM * 16;           // float4 per query row

  static constexpr int kOffK = 0;
  static constexpr int kOffV = kOffK + kKVBytes;
  static constexpr int kOffQ = kOffV + kKVBytes;                         // kStages x [64, d]
  static constexpr int kOffDO = kOffQ + kStages * kQBytes;               // kStages x [64, d]
  static constexpr int kOffP = kOffDO + kStages * kQBytes;               // per WG [64, 64]
  static constexpr int kOffDS = kOffP + kConsumerWGs * kPTileBytes;      // 2 buffers x per WG
  static constexpr int kOffStage = kOffDS + 2 * kConsumerWGs * kPTileBytes;  // per WG piece
  static constexpr int kOffStats = kOffStage + kConsumerWGs * kPieceBytes;  // kStages x stats
  static constexpr int kOffBar = kOffStats + kStages * kStatsBytes;
  // mbarriers: K/V full; Q-stage full and empty per stage.
  static constexpr int kBarKV = 0;
  static constexpr int kBarQFull = 1;
  static constexpr int kBarQEmpty = kBarQFull + kStages;
  static constexpr int kNumBars = kBarQEmpty + kStages;
  static constexpr int kSmemBytes = kOffBar + 8 * kNumBars;
  static constexpr int kSmemAlign = 1024;
  static constexpr int kSmemAlloc = kSmemBytes + kSmemAlign;
  static constexpr int kSmemLimit = 227 * 1024;

  // ---- Named barriers (id 0 is __syncthreads) -------------------------------------------------
  static constexpr uint32_t kBarWg = 1;        // + w: consumer warpgroup w alone (128 threads)
  static constexpr uint32_t kBarDsReady = 3;   // both consumer warpgroups (256 threads)

  // ---- dQ pieces ------------------------------------------------------------------------------
  // d = 128: warpgroup w owns column chunk w of the query block and sums over all 128 keys;
  // d = 64: both own chunk 0, each over its 64 keys (two writers per piece).
  static constexpr int kDqKeySlabs = kHeadDim == 128 ? kBlockN / 16 : kWgKeys / 16;
  static constexpr int kDqWriters = kHeadDim == 128 ? 1 : 2;

  // ---- Registers per consumer thread ----------------------------------------------------------
  static constexpr int kAccS = kWgKeys / 2;     // S / P and dP: [64, 64] fp32 fragments
  static constexpr int kAccKV = kHeadDim / 2;   // dK, dV: [64, d] fp32 fragments
  static constexpr int kAccDq = 64 / 2;         // a [64, 64] dQ piece
  static constexpr int kSlabs = kWgKeys / 16;   // 16-key slabs = NVFP4 P blocks per row

  static_assert(kHeadDim == 64 || kHeadDim == 128, "head dims 64 and 128");
  static_assert(kWgKeys == 64, "the consumer tiles are [64, 64]");
  static_assert(kSmemBytes <= kSmemLimit - kSmemAlign, "shared memory over the sm_90 limit");
  static_assert(kOffV % kSmemAlign == 0 && kOffQ % kSmemAlign == 0 && kOffDO % kSmemAlign == 0 &&
                    kOffP % kSmemAlign == 0 && kOffDS % kSmemAlign == 0 &&
                    kOffStage % kSmemAlign == 0 && kQBytes % kSmemAlign == 0,
                "swizzled tiles must start on 1024-byte (swizzle atom) boundaries");
  static_assert(128 * kProducerRegs + 128 * kConsumerWGs * kConsumerRegs <= 65536,
                "setmaxnreg budget over the register file");
};

}  // namespace attnqat::sm90
