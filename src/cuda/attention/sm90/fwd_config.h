// src/cuda/attention/sm90/fwd_config.h — compile-time configuration of the sm90 forward kernel:
// tile sizes, roles, register budget and the shared-memory map, with the static_asserts that
// keep them consistent. Host and device code (the launcher reads kThreads and kSmemAlloc).
//
// Why these numbers (docs/hopper.md, section 3):
//  - kBlockM = 128 query rows per CTA: two consumer warpgroups, each owning 64 rows (one m64
//    wgmma). Ping-pong between them hides one's softmax + P quantization behind the other's GEMMs.
//  - kBlockN = 128 keys per tile, for both head dims: p_quant="paper" quantizes p~ relative to
//    the running max, which depends on the tile, so the kernel's tile must be the reference's
//    default kv_tile (128). Bc/16 = 8 NVFP4 P blocks per row and tile, blocks start at key 0.
//  - 2 stages for K and for V (FA3 sm90): the other warpgroup hides the TMA latency.
//  - Intra-warpgroup overlap of the softmax with the warpgroup's own PV GEMM only without O'
//    (fp4, bf16): with O' (attn_qat) S + O + O' + P fragments would not fit 240.
//  - Registers: producer 24, consumers 240 (setmaxnreg): 128*24 + 256*240 = 64,512, the CTA's
//    launch allocation (384 * 168). setmaxnreg only moves registers within that allocation: a
//    sum above it leaves the consumers' setmaxnreg.inc waiting forever.
//  - kPacked (attention from packed NVFP4 Q, K, V, fwd_packed.cuh): the whole producer
//    warpgroup copies packed tiles into a staging ring (cp.async) and decodes them into the same
//    swizzled tiles that TMA writes otherwise. Producer 88, consumers 208 (mode fp4 has no O':
//    no spills): the unpacking needs loads in flight (the measurements behind 88: docs/hopper.md,
//    section 10).
#pragma once

#include <cstdint>

namespace attnqat::sm90 {

template <bool kIsF16, int kHeadDimT, bool kWithOHpT, bool kPackedT = false>
struct FwdConfig {
  static constexpr bool kF16 = kIsF16;         // fp16 inputs/outputs (else bf16)
  static constexpr int kHeadDim = kHeadDimT;   // d
  static constexpr bool kWithOHp = kWithOHpT;  // also accumulate O' = p~ V (attn_qat)
  static constexpr bool kPacked = kPackedT;    // Q, K, V arrive as packed NVFP4 (fwd_packed.cuh)

  // ---- Roles and tiles ------------------------------------------------------------------------
  static constexpr int kConsumerWGs = 2;
  static constexpr int kThreads = 128 * (1 + kConsumerWGs);  // warpgroup 0 = producer
  static constexpr int kBlockM = 64 * kConsumerWGs;          // query rows per CTA
  static constexpr int kBlockN = 128;                        // keys per tile (== reference kv_tile)
  static constexpr int kStages = 2;                          // K and V ring depth
  static constexpr int kProducerRegs = kPacked ? 88 : 24;
  static constexpr int kConsumerRegs = kPacked ? 208 : 240;

  // ---- Shared memory --------------------------------------------------------------------------
  // Every tile is stored as kChunks column chunks of 64 elements (128 bytes, the TMA box width
  // for SWIZZLE_128B); chunk c of a [rows, d] tile is [rows, 64] at byte c * rows * 128, each
  // row 128 bytes with the 16-byte units XOR-swizzled by (row % 8). This is both what TMA
  // writes with CU_TENSOR_MAP_SWIZZLE_128B and the canonical 128B-swizzle layout of the wgmma
  // descriptors (common/wgmma.cuh): K-major for Q and K, MN-major for V.
  static constexpr int kElemBytes = 2;
  static constexpr int kRowBytes = 128;
  static constexpr int kChunkCols = kRowBytes / kElemBytes;  // 64
  static constexpr int kChunks = kHeadDim / kChunkCols;
  static constexpr int kQChunkBytes = kBlockM * kRowBytes;   // [128, 64] of Q
  static constexpr int kKVChunkBytes = kBlockN * kRowBytes;  // [128, 64] of K or V
  static constexpr int kQBytes = kQChunkBytes * kChunks;     // [kBlockM, d]
  static constexpr int kKVBytes = kKVChunkBytes * kChunks;   // [kBlockN, d]
  static constexpr int kWgQRowsBytes = 64 * kRowBytes;       // a consumer's 64 rows in a chunk

  static constexpr int kOffQ = 0;
  static constexpr int kOffK = kOffQ + kQBytes;               // kStages x [kBlockN, d]
  static constexpr int kOffV = kOffK + kStages * kKVBytes;    // kStages x [kBlockN, d]
  static constexpr int kOffBar = kOffV + kStages * kKVBytes;  // mbarriers (8 bytes each)
  // mbarriers: Q full; K full/empty and V full/empty per stage.
  static constexpr int kBarQ = 0;
  static constexpr int kBarKFull = 1;
  static constexpr int kBarKEmpty = kBarKFull + kStages;
  static constexpr int kBarVFull = kBarKEmpty + kStages;
  static constexpr int kBarVEmpty = kBarVFull + kStages;
  static constexpr int kNumBars = kBarVEmpty + kStages;
  // The P scale table (common/p_quant.cuh): 256 entries of 8 bytes, filled once per CTA.
  static constexpr int kOffPScale = (kOffBar + 8 * kNumBars + 15) / 16 * 16;
  static constexpr int kPScaleBytes = 256 * 8;
  // kPacked: the staging ring of packed tiles (kStages x {K codes, K scales, V codes, V scales},
  // rows of d/2 and d/16 bytes as in global memory; Q is staged in stage 1's K part before the
  // first K/V tiles land there), then 3 unpack tables of 256 words (Q, K, V: E4M3 byte -> the
  // scale times g in the tile dtype, both halves) and the 3 global scales g.
  static constexpr int kCodeBytes = kBlockN * kHeadDim / 2;
  static constexpr int kScaleBytes = kBlockN * kHeadDim / 16;
  static constexpr int kStageKBytes = kCodeBytes + kScaleBytes;
  static constexpr int kStageBytes = 2 * kStageKBytes;
  static constexpr int kOffStage = (kOffPScale + kPScaleBytes + 127) / 128 * 128;
  static constexpr int kOffTables = kOffStage + (kPacked ? kStages * kStageBytes : 0);
  static constexpr int kTableBytes = kPacked ? 3 * 256 * 4 + 16 : 0;  // + the 3 g values
  static constexpr int kSmemBytes = kPacked ? kOffTables + kTableBytes : kOffPScale + kPScaleBytes;
  static constexpr int kSmemAlign = 1024;                     // 128B-swizzle atoms
  static constexpr int kSmemAlloc = kSmemBytes + kSmemAlign;  // + slack to align the base
  static constexpr int kSmemLimit = 227 * 1024;               // sm_90 opt-in maximum per CTA

  // ---- Named barriers (id 0 is __syncthreads) --------------------------------------------------
  // kBarSched + w: consumer warpgroup w may issue its GEMMs (the ping-pong token, FA3's
  // WarpSchedulerWG1/WG2). Synced by w, arrived at by the other consumer warpgroup: 256 threads.
  static constexpr uint32_t kBarSched = 1;
  static constexpr uint32_t kSchedThreads = 256;

  // ---- Registers per consumer thread (docs/hopper.md, section 3) -------------------------------
  static constexpr int kAccS = kBlockN / 2;       // S / p~ fp32 accumulator fragment
  static constexpr int kAccO = kHeadDim / 2;      // O (and O') fp32 accumulator fragment
  static constexpr int kPFragRegs = kBlockN / 4;  // one bf16/fp16 A-fragment set of P
  static constexpr int kSlabs = kBlockN / 16;     // k16 slabs of the PV GEMM = NVFP4 P blocks
  // Peak: max(S, P_hat + P~) + O (+ O') + ~30 for row statistics, masks, addresses and loop state.
  static constexpr int kRegPeak =
      (kAccS > 2 * kPFragRegs ? kAccS : 2 * kPFragRegs) + kAccO * (kWithOHp ? 2 : 1) + 30;

  // d = 128 with O': register-bound; the P conversion then keeps its slabs apart (convert_p).
  static constexpr bool kTightRegs = kRegPeak > 200;

  // Intra-warpgroup overlap of the softmax with the warpgroup's own PV GEMM (fwd_mainloop.cuh,
  // consumer_mainloop_overlap): S + P + O live at once, which fits without O' only
  // (docs/hopper.md, sections 3 and 10).
  static constexpr bool kOverlap = !kWithOHp;

  static_assert(kHeadDim == 64 || kHeadDim == 128,
                "head dims 64 and 128 (256 needs a split-V design)");
  static_assert(kBlockN == 128, "paper mode matches the reference only with 128-key tiles");
  static_assert(kBlockN % 16 == 0, "NVFP4 P blocks of 16 keys must tile a key tile");
  static_assert(kSmemBytes <= kSmemLimit - kSmemAlign, "shared memory over the sm_90 limit");
  static_assert(kOffK % kSmemAlign == 0 && kOffV % kSmemAlign == 0 && kKVBytes % kSmemAlign == 0,
                "tiles must start on 1024-byte (swizzle atom) boundaries");
  // setmaxnreg moves registers within the CTA's launch allocation (launch bounds (384, 1): 168
  // per thread); an .inc beyond what the .dec released never returns.
  static_assert(128 * kProducerRegs + 128 * kConsumerWGs * kConsumerRegs <= kThreads * 168,
                "setmaxnreg budget over the CTA's register allocation");
  static_assert(kRegPeak <= kConsumerRegs, "consumer fragments do not fit the setmaxnreg budget");
  static_assert(!kPacked || (kBlockM == kBlockN && !kWithOHp),
                "packed: Q is staged like a K tile; mode fp4 has no O'");
};

}  // namespace attnqat::sm90
