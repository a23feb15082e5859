// src/cuda/decode/decode_kernel.cuh — split-KV decode attention over a packed FP4 paged KV cache.
//
// Computes, for every sequence b and KV head, the `fp4`-mode forward of its group of query heads
// (GQA: the group's query rows share one read of K and V) and its nq new query tokens (causal
// among themselves, bottom-right) over the keys [0, seq_lens[b]) of the cache, or with a sliding
// window (p.window_left >= 0) over the keys of the window of each query token. Must match
// attnqat::reference::decode_attention (src/reference/decode.cpp), i.e. the reference forward of
// mode fp4 over the dequantized cache, up to fp32 summation order and ex2.approx (tolerances in
// tests/cpp/cuda_decode).
//
// Arch: portable sm_89+ (mma.sync m16n8k16 f16, movmatrix, cp.async, the E4M3 converts); built
// for 90a;100a;120a, tested on sm_90. Head dims D = 128 and 64 (template parameter; the numbers
// below are for 128, Layout<D> has both).
//
// Work decomposition. CTA = 4 warps = one (split, KV head, row group, sequence). A row group is up
// to kRows = 8 query rows (the n8 of the MMAs): row R = head_in_group * nq + query index. A split
// is `split_keys` keys (a multiple of 128); warp w takes the 32-key steps w, w + 4, ... of it.
//
// Orientation (transposed, so that the few query rows are the MMA's n = 8 and no M is wasted on
// padding rows):  S^T [16 keys x 8 rows] = K [16 x 128] . Q^T [128 x 8]   (8 k16 MMAs per tile)
//                 O^T [128 x 8]        += V^T [128 x 16] . P^T [16 x 8] (8 m16 MMAs per tile)
// Operands are fp16: Q^, K^, V^ = E2M1 value * E4M3 scale (g = 1) have at most 6 significant
// bits and lie in [2^-10, 2688], so they are exact in fp16; P^ = E2M1 value * s * g_p is exact
// in fp16 too (the sm90 forward's argument, p_quant.cuh), subnormal fp16 included. Accumulation
// fp32.
//
// Channel permutations. A dot product does not depend on the order of its terms, so the QK MMA
// uses a channel order in which each thread's 16 bytes of a key (channels [32t, 32t+32); D = 64:
// 8 bytes, [16t, 16t+16)) become its A fragments with no data movement (k-step s, fragment half
// r, element h: channel (D/4) t + 8(s>>1) + 4(s&1) + 2r + h); Q^T's B fragments are built with the
// same order. For PV, the output channel order is permuted likewise (thread g reads channels
// [16g, 16g+16), one NVFP4 block, of four keys; D = 64: [8g, 8g+8), half a block): m-tile c, half
// hf holds channel (D/8) g + 8(c>>2) + (c&3) + 4hf; the
// epilogue writes each channel where it belongs.
//
// FP4 decode to fp16 (per 8 codes, no tables in memory; cuda/common/fp4_unpack.cuh): PRMT looks the 3-bit
// magnitudes up in an 8-byte table of fp16 high bytes (0, .5, 1, 1.5, 2, 3, 4, 6 are
// 0x00,38,3C,3E,40,42,44,46 with zero low bytes), a second PRMT gathers the sign bits into bit 7
// of each byte and a LOP3 merges them; one PRMT per fp16x2 word places two signed bytes over zero
// low bytes, and one HMUL2 applies the block scale (E4M3 -> fp16 exactly with
// cvt.rn.f16x2.e4m3x2). All exact. 17 instructions per 8 codes, 12 of them on the ALU pipe, which
// runs at half the issue rate: with the P quantizer's and the softmax's ALU work, the ALU pipe
// bounds the loop (ncu: "math pipe throttle" is the first stall reason).
//
// Packed rows (kPack, rows <= 4: GQA <= 4 with one query token, the common serving case). With
// 4 rows, half of the n8 columns would be padding and half the softmax/P work wasted. Instead
// the Q^T fragments repeat rows 0-3 in columns 4-7, both tiles of a step are multiplied as usual,
// and lanes t < 2 keep tile 0's columns 0-3 while lanes t >= 2 keep tile 1's columns 4-7: one set
// of 4 scores per thread, each column a (row, tile) pair. The row max also reduces across t ^ 2;
// a P block (16 keys of one row) is still one column. In PV, tile 0's B fragment keeps columns
// 0-3 (tile 1's 4-7) and zeroes the rest, so O^T column c accumulates tile (c >= 4)'s keys of row
// c & 3; the epilogue adds columns r and r + 4 (same m_ref, so no rescale).
//
// P^ per the spec: p~ = exp2(S2 - m_ref) (fused: ex2(fma(S, c2, -m_ref))); one NVFP4 block = 16
// keys of one row = one S^T tile column, held by the 8 lanes with the same t (keys g and g+8):
// amax by three xor-shuffles; the block scale steps are codec.cuh's fast exact primitives (the
// sm90 forward's P quantizer, in this layout). P^T reaches the PV MMA's B fragment through
// movmatrix (transpose of the 8x8 fp16 tiles).
//
// Online softmax per 32-key step. anchored: m_ref = ceil(m), rescales are exact powers of two,
// and the quantized P does not depend on where splits and steps start (numerics section 4), so
// every warp keeps its own state and the splits are merged at the end (exact power-of-two
// weights). paper: m_ref = m of 128-key tiles starting at key 0, exactly the reference's
// kv_tile = 128: the 4 warps handle the 4 steps of a tile and exchange their step maxima through
// shared memory (one barrier per tile); the host launches one split.
//
// Loads: each warp streams its steps through a private 2-step cp.async ring in shared memory
// (16-byte copies, coalesced; K and V rows swizzled so that the fragment reads are free of bank
// conflicts, see smem_row / smem_chunk_xor). Keys past the sequence end are masked (scores -inf,
// V scales 0 so that stale shared memory can never inject NaN). The first steps' loads are issued
// before Q is quantized, so that small batches (one or two steps per warp) overlap the two.
//
// Sliding window (mask.h's LocalMask with window (window_left, 0), Nq = nq, Nk = L). The splits
// start at the step (anchored) or 128-key tile (paper: tiles stay at multiples of 128 from key 0)
// that holds the first key of query token 0's window, so the keys before it are never visited and
// their pages never read; the host sizes the splits on the window, not the context. In a visited
// step, keys before a row's window are masked like keys past the end (scores -inf), tiles wholly
// before the first visible key are not loaded, and keys before it get V scale 0 as well.
#pragma once

#include <cuda_fp16.h>

#include <cstdint>

#include "common/mask.h"
#include "cuda/common/codec.cuh"
#include "cuda/common/fp4_unpack.cuh"
#include "cuda/common/p_quant.cuh"
#include "cuda/common/ptx.cuh"
#include "cuda/decode/params.h"

namespace attnqat::decode {

// ---- Configuration -------------------------------------------------------------------------------

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kRows = 8;                            // query rows per CTA: the n8 of the MMAs
constexpr int kTileKeys = 16;                       // one m16 MMA tile = one P block per row
constexpr int kStepKeys = 32;                       // keys per warp step (2 tiles)
constexpr int kCtaStepKeys = kWarps * kStepKeys;    // 128: the paper-mode tile
constexpr int kStages = 2;                          // steps in a warp's cp.async ring
// 4 CTAs (16 warps) per SM: registers <= 128 per thread.
constexpr int kMinBlocksPerSm = 4;
static_assert(kCtaStepKeys == 128, "paper mode needs the reference's 128-key tiles");

// The layout of one head dim D (64 or 128). Per key: D/2 bytes of codes, D/16 E4M3 scales. In QK,
// thread t of a quad owns channels [t D/4, (t+1) D/4) of a key: kQWords = D/32 words of codes
// (NVFP4 blocks 2t and 2t+1 at D = 128, block t at D = 64); in PV, thread g owns channels
// [g D/8, (g+1) D/8) of 4 keys: kVWords = D/64 words per key (block g at D = 128, half of block
// g/2 at D = 64).
template <int D>
struct Layout {
  static_assert(D == 64 || D == 128, "the decode kernel is built for head dims 64 and 128");
  static constexpr int kKeyBytes = D / 2;                        // codes of one key
  static constexpr int kKeyScaleBytes = D / 16;                  // E4M3 scales of one key
  static constexpr int kQWords = D / 32;                         // QK: words per key per thread
  static constexpr int kVWords = D / 64;                         // PV: words per key per thread
  static constexpr int kKSteps = D / 16;                         // QK: k16 MMAs per tile
  static constexpr int kMTiles = D / 16;                         // PV: m16 MMAs per tile
  static constexpr int kTileDataBytes = kTileKeys * kKeyBytes;   // 1024 / 512
  static constexpr int kTileScaleBytes = kTileKeys * kKeyScaleBytes;  // 128 / 64
  static constexpr int kScaleChunks = kTileScaleBytes / 16;      // 16-byte copies of one scale run
  // One tile in shared memory: K codes, V codes, K scales, V scales.
  static constexpr int kOffKData = 0;
  static constexpr int kOffVData = kTileDataBytes;
  static constexpr int kOffKScales = 2 * kTileDataBytes;
  static constexpr int kOffVScales = kOffKScales + kTileScaleBytes;
  static constexpr int kTileBytes = kOffVScales + kTileScaleBytes;  // 2304 / 1152
  static constexpr int kStepBytes = 2 * kTileBytes;
  static constexpr int kWarpRingBytes = kStages * kStepBytes;      // 9,216 / 4,608
  static constexpr int kOffRing = 0;
  static constexpr int kOffQ = kOffRing + kWarps * kWarpRingBytes;  // Q^ [kRows, D] fp16
  static constexpr int kOffRed = kOffQ + kRows * D * 2;           // paper: [2][kWarps][kRows] floats
  static constexpr int kSmemBytes = kOffRed + 2 * kWarps * kRows * 4;
  // The end-of-CTA merge reuses the ring: per warp [kRows][kOPitch] floats (columns swizzled,
  // merge_col), then m_ref and l.
  static constexpr int kOPitch = D;
  static constexpr int kMergeBytes = kWarps * kRows * kOPitch * 4 + 2 * kWarps * kRows * 4;
  static_assert(kMergeBytes <= kWarps * kWarpRingBytes, "the merge buffers must fit in the ring");
  static_assert(kTileBytes % 16 == 0 && kWarpRingBytes % 16 == 0, "16-byte cp.async alignment");
  static_assert(kTileDataBytes / 16 % 32 == 0, "whole warps of 16-byte copies per tile");
};

constexpr float kLn2 = 0.693147180559945309417f;
constexpr uint32_t kNegInfBits = 0xff800000u;

// ---- Small helpers ------------------------------------------------------------------------------

__device__ __forceinline__ float neg_inf() { return __uint_as_float(kNegInfBits); }

// ---- FP4 -> fp16 -------------------------------------------------------------------------------

using cuda::fp4_signed_bytes;
using cuda::hmul2;
using cuda::pinned_lut0;
using cuda::prmt;
using cuda::spread;

// One key's word of 8 codes (channels base + j, j = 0..7) -> 4 fp16x2 words, out[k] = channels
// (base + 2k, base + 2k + 1), times `scale` (the block's scale in both halves). 17 instructions.
__device__ __forceinline__ void fp4_word_to_f16x2(uint32_t w, uint32_t scale, uint32_t lut0,
                                                  uint32_t (&out)[4]) {
  uint32_t lo, hi;
  fp4_signed_bytes(w, lut0, lo, hi);
  out[0] = hmul2(spread<0, 1>(lo), scale);
  out[1] = hmul2(spread<2, 3>(lo), scale);
  out[2] = hmul2(spread<0, 1>(hi), scale);
  out[3] = hmul2(spread<2, 3>(hi), scale);
}

// A pair of keys' words (same channels base + j): out[j] = (V[key a][base + j], V[key b][..]),
// times (scale.lo, scale.hi). The words are first interleaved by bytes ({a0, b0, a1, b1} and
// {a2, b2, a3, b3}: nibbles a_2i, a_2i+1, b_2i, b_2i+1 per 16 bits), so that each signed-byte
// word holds both keys and one PRMT per output pairs them. 36 instructions for 16 codes.
__device__ __forceinline__ void fp4_pair_to_f16x2(uint32_t wa, uint32_t wb, uint32_t scale,
                                                  uint32_t lut0, uint32_t (&out)[8]) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    uint32_t lo, hi;  // lo: {a_4h, a_4h+1, b_4h, b_4h+1}, hi: {a_4h+2, a_4h+3, b_4h+2, b_4h+3}
    fp4_signed_bytes(prmt(wa, wb, h == 0 ? 0x5140u : 0x7362u), lut0, lo, hi);
    out[4 * h + 0] = hmul2(spread<0, 2>(lo), scale);
    out[4 * h + 1] = hmul2(spread<1, 3>(lo), scale);
    out[4 * h + 2] = hmul2(spread<0, 2>(hi), scale);
    out[4 * h + 3] = hmul2(spread<1, 3>(hi), scale);
  }
}

// ---- P quantizer (numerics sections 2, 4) in this kernel's layout ------------------------------
// The scalar steps are the shared P quantizer's (src/cuda/common/p_quant.cuh); only the block
// reduction and the fragment shuffles are this kernel's.

// The block amax over the 8 lanes that share t (lane bits 2-4), NaN-propagating.
__device__ __forceinline__ float amax_over_keys(float a) {
  a = cuda::max_nan(a, __shfl_xor_sync(0xffffffffu, a, 4));
  a = cuda::max_nan(a, __shfl_xor_sync(0xffffffffu, a, 8));
  return cuda::max_nan(a, __shfl_xor_sync(0xffffffffu, a, 16));
}

// P^ of one 16-key tile, as the two fp16x2 B-operand words of the PV MMA (after the transpose):
// input p[0..3] = p~ at (key g, row 2t), (key g, row 2t+1), (key g+8, row 2t), (key g+8, row 2t+1).
__device__ __forceinline__ void quantize_p_tile(const float (&p)[4], const cuda::PQuantConsts& pc,
                                                uint32_t& b0, uint32_t& b1) {
  const float a0 = amax_over_keys(cuda::max_nan(p[0], p[2]));  // block (row 2t)
  const float a1 = amax_over_keys(cuda::max_nan(p[1], p[3]));  // block (row 2t+1)
  const uint32_t bytes = cuda::p_scale_bytes(a0, a1, pc);
  const cuda::PBlockScale s0 = cuda::p_block_scale(a0, bytes, pc.two120_g);
  const cuda::PBlockScale s1 = cuda::p_block_scale(a1, bytes >> 8, pc.two120_g);
  const uint32_t dd = cuda::pack_rn_f16x2(s0.d, s1.d);
  const float v0 = cuda::e2m1_round_abs(cuda::mul_rn(p[0], s0.inv));
  const float v1 = cuda::e2m1_round_abs(cuda::mul_rn(p[1], s1.inv));
  const float v2 = cuda::e2m1_round_abs(cuda::mul_rn(p[2], s0.inv));
  const float v3 = cuda::e2m1_round_abs(cuda::mul_rn(p[3], s1.inv));
  // (key g; rows 2t, 2t+1) and (key g+8; ...) -> transposed: (keys 2t, 2t+1; row g), (+8).
  b0 = cuda::movmatrix_trans(hmul2(cuda::pack_rn_f16x2(v0, v1), dd));
  b1 = cuda::movmatrix_trans(hmul2(cuda::pack_rn_f16x2(v2, v3), dd));
}

// ---- Shared-memory layout of a tile's K/V codes ------------------------------------------------
//
// Key k's D/2 bytes go to row smem_row(k), its 16-byte chunk c to chunk c ^ smem_chunk_xor(k).
// D = 128 (64-byte rows). Reads: K — lane (g, t) reads chunk t of keys g and g+8 (quarter-warp
// phases hit 2 rows of different parity: conflict-free); V — lane (g, t) reads 8 bytes (chunk
// g/2, half g%2) of keys 2t, 2t+1, 2t+8, 2t+9: keys {0,2,4,6} land on rows {0,2,5,7} (two of
// each parity) with the chunk XOR separating rows 0 and 2: the 16 lanes of a phase hit 32
// distinct banks.
// D = 64 (32-byte rows, no chunk XOR). K — lane (g, t) reads bytes [8t, 8t+8) of keys g and g+8:
// each half-warp phase reads rows {0..3} or {4..7} (+8), 128 contiguous bytes; V — lane (g, t)
// reads bytes [4g, 4g+4) of keys 2t, 2t+1, 2t+8, 2t+9: keys {0,2,4,6} land on rows {0,2,5,7},
// bank groups {0,16,8,24}, so the 32 lanes hit 32 distinct banks (likewise the other key sets).
__device__ __forceinline__ int smem_row(int k) { return k ^ ((k >> 2) & 1); }
template <int D>
__device__ __forceinline__ int smem_chunk_xor(int k) { return D == 128 ? 2 * ((k >> 1) & 1) : 0; }

// Column of channel ch of row `row` in the end-of-CTA merge buffer (rows of D floats). Writes: a
// warp stores one (m-tile, element) of o_acc at a time, lane (g, t) channel (D/8) g + k of row
// 2t + e, so unswizzled the 8 values of g would hit 2 (D = 128) or 4 (D = 64) banks; XOR-ing the
// low 4 bits with 4 (ch >> 5) and with t spreads the 32 lanes over 32 banks. Reads (32
// consecutive channels of one row per warp) stay conflict-free: within a 32-channel block the
// XOR is a constant.
__device__ __forceinline__ int merge_col(int row, int ch) {
  return ch ^ (((ch >> 5) & 3) << 2) ^ ((row >> 1) & 3);
}

// ---- The kernel --------------------------------------------------------------------------------

template <bool kF16In>
__device__ __forceinline__ float load_half(const void* base, int64_t idx) {
  const uint16_t bits = static_cast<const uint16_t*>(base)[idx];
  if constexpr (kF16In) return __half2float(__ushort_as_half(bits));
  else return __uint_as_float(static_cast<uint32_t>(bits) << 16);
}

template <bool kF16Out>
__device__ __forceinline__ uint16_t to_half_bits(float x) {
  if constexpr (kF16Out) return __half_as_ushort(__float2half_rn(x));
  else {
    const uint32_t u = __float_as_uint(x);
    if (x != x) return static_cast<uint16_t>((u >> 16) | 0x40u);
    return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  }
}

// A power of two 2^e for an integer-valued e <= 0 (exact; 0 below 2^-126), for anchored rescales.
__device__ __forceinline__ float exact_pow2(float e) {
  const int ei = static_cast<int>(e);
  return ei < -126 ? 0.0f : __int_as_float((127 + ei) << 23);
}

// kPack (rows <= 4, e.g. GQA 4 with one query token): the n8 columns of the MMAs hold the 4
// rows twice — columns 0-3 carry the step's first 16-key tile, columns 4-7 its second — so that
// the softmax and the P quantization run on 4 values per thread per step instead of 8 (half of
// them padding rows otherwise). See "Packed rows" in the file comment.
// kPQuant: p.p_quant (the launcher instantiates paper without kPack).
template <int D, bool kF16In, bool kPack, PQuant kPQuant>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm) decode_kernel(const DecodeParams p) {
  constexpr bool kPaper = kPQuant == PQuant::kPaper;
  using Lay = Layout<D>;
  constexpr int kKeyBytes = Lay::kKeyBytes, kKeyScaleBytes = Lay::kKeyScaleBytes, kTileBytes = Lay::kTileBytes;
  constexpr int kOffKData = Lay::kOffKData, kOffVData = Lay::kOffVData, kOffKScales = Lay::kOffKScales,
                kOffVScales = Lay::kOffVScales, kStepBytes = Lay::kStepBytes, kOPitch = Lay::kOPitch;
  extern __shared__ __align__(128) uint8_t smem[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
  const int split = blockIdx.x;
  const int rg = blockIdx.y % p.row_groups, kvh = blockIdx.y / p.row_groups, b = blockIdx.z;
  const int capacity = p.pages_per_seq * p.page_size;
  const int32_t* table = p.page_table + b * p.pt_stride_b;
  auto page_index = [&](int key) { return p.page_shift >= 0 ? key >> p.page_shift : key / p.page_size; };
  // Without a window the page id of this warp's first step does not depend on the sequence
  // length: it is read before the length, so that the two global loads overlap instead of
  // following each other (the copies of the first step wait for both; small batches are
  // latency-bound). The table row is pages_per_seq long, so the read stays inside it; the id is
  // only used when the step is in the sequence. With a window the steps start where the window
  // does, known after the length: no early read (first_pidx -1 matches no key).
  const bool windowed = p.window_left >= 0;
  const int first_pidx = windowed ? -1 : page_index(split * p.split_keys + kStepKeys * warp);
  const int first_page = !windowed && first_pidx < p.pages_per_seq ? table[first_pidx * p.pt_stride_p] : -1;
  const int L = max(0, min(p.seq_lens[b * p.lens_stride], capacity));
  // The query tokens see the cache causally, bottom-right, cut to the window: the dense mask with
  // window (window_left, 0) ((-1, 0) is the causal mask).
  const SeqInfo seq{p.nq, L, p.window_left, 0};
  // The first key any query row sees (query token 0's window starts first; 0 without a window).
  // The splits cover [key_base, L): key_base is it rounded down to a step, or for paper to a
  // 128-key tile, so that steps and tiles keep their alignment from key 0.
  const int window_begin = LocalMask::keys(0, seq).begin;
  constexpr int kBaseAlign = kPaper ? kCtaStepKeys : kStepKeys;
  const int key_base = window_begin / kBaseAlign * kBaseAlign;
  const int k_begin = key_base + split * p.split_keys;
  const int k_end = min(k_begin + p.split_keys, L);

  cuda::griddep_launch_dependents();

  // ---- Per-warp loads: a cp.async ring of steps ----------------------------------------------------
  const int n_steps = k_end > k_begin ? (k_end - k_begin + kStepKeys - 1) / kStepKeys : 0;
  // paper: every warp runs every 128-key tile (barriers); anchored: only its own steps.
  const int n_iter = kPaper ? (n_steps + kWarps - 1) / kWarps
                             : (n_steps > warp ? (n_steps - warp + kWarps - 1) / kWarps : 0);
  uint8_t* ring = smem + Lay::kOffRing + warp * Lay::kWarpRingBytes;
  const uint32_t ring_u32 = cuda::smem_u32(ring);

  auto step_key0 = [&](int it) { return k_begin + kStepKeys * (warp + kWarps * it); };

  // Issues the cp.async copies of step `it` into its ring slot (tiles past k_end or wholly before
  // window_begin are skipped: they are masked), then commits a group (possibly empty: the group
  // count stays uniform).
  // Per tile, lane l copies 16-byte chunks l (and l + 32 at D = 128) of the K codes and of the V
  // codes (key l / kChunks, chunk l % kChunks: the second pass lands 512 bytes further in both),
  // and lanes below 2 kScaleChunks the K and V scales (contiguous in the tile). All per-lane
  // offsets are loop constants. Steps start at multiples of 32 keys, so when page_size is a
  // multiple of 32 both tiles of a step lie in one page: one page-table read and one address
  // computation per step (the second tile is 16 rows further); otherwise one per tile.
  constexpr int kChunks = kKeyBytes / 16;           // 16-byte chunks per key
  constexpr int kPasses = Lay::kTileDataBytes / 512;  // warp-wide 16-byte copies per tile
  const int copy_key = lane / kChunks, copy_chunk = lane % kChunks;
  const uint32_t lane_dst = smem_row(copy_key) * kKeyBytes + ((copy_chunk ^ smem_chunk_xor<D>(copy_key)) * 16);
  const uint32_t lane_src = lane * 16;
  const uint8_t* scale_base = lane < Lay::kScaleChunks ? p.k_scales : p.v_scales;
  const uint32_t scale_src = (lane % Lay::kScaleChunks) * 16;
  const bool step_in_page = (p.page_size & 31) == 0;
  // The cp.async copies of tile `tt` of the step whose first key sits in cache row row0.
  auto copy_tile = [&](uint32_t slot_u32, int tt, int64_t row0) {
    const uint32_t tile = slot_u32 + tt * kTileBytes;
    const uint8_t* kp = p.k_data + row0 * kKeyBytes + lane_src;
    const uint8_t* vp = p.v_data + row0 * kKeyBytes + lane_src;
#pragma unroll
    for (int pass = 0; pass < kPasses; ++pass) {
      cuda::cp_async16(tile + kOffKData + lane_dst + pass * 512, kp + pass * 512);
      cuda::cp_async16(tile + kOffVData + lane_dst + pass * 512, vp + pass * 512);
    }
    static_assert(Lay::kOffVScales == Lay::kOffKScales + Lay::kScaleChunks * 16, "K then V scales");
    if (lane < 2 * Lay::kScaleChunks)
      cuda::cp_async16(tile + kOffKScales + lane * 16, scale_base + row0 * kKeyScaleBytes + scale_src);
  };
  // Cache row of key `key` (page lookup; it == 0: the page id read above), or -1 for a page id
  // out of range (never dereferenced, see api.cu).
  auto cache_row = [&](int key, int it) -> int64_t {
    const int pidx = page_index(key);
    const int page = it == 0 && pidx == first_pidx ? first_page : table[pidx * p.pt_stride_p];
    if (page < 0 || page >= p.num_pages) return -1;
    return (static_cast<int64_t>(page) * p.heads_kv + kvh) * p.page_size + (key - pidx * p.page_size);
  };
  auto load_step = [&](int it) {
    if (it < n_iter) {
      const uint32_t slot_u32 = ring_u32 + (it % kStages) * kStepBytes;
      const int key0 = step_key0(it);
      if (step_in_page) {
        if (key0 < k_end && key0 + kStepKeys > window_begin) {
          const int64_t row0 = cache_row(key0, it);
          if (row0 >= 0) {
            if (key0 + kTileKeys > window_begin) copy_tile(slot_u32, 0, row0);
            if (key0 + kTileKeys < k_end) copy_tile(slot_u32, 1, row0 + kTileKeys);
          }
        }
      } else {
#pragma unroll
        for (int tt = 0; tt < 2; ++tt) {
          const int key = key0 + kTileKeys * tt;
          if (key >= k_end || key + kTileKeys <= window_begin) continue;
          const int64_t row0 = cache_row(key, it);
          if (row0 >= 0) copy_tile(slot_u32, tt, row0);
        }
      }
    }
    cuda::cp_async_commit();
  };

  // The first steps' loads go out before the Q^ work below, which overlaps their latency.
#pragma unroll
  for (int i = 0; i < kStages - 1; ++i) load_step(i);

  // ---- Q^ = phi_nv(q; 1) per 16 channels into shared memory (fp16, exact) -----------------------
  __half* s_q = reinterpret_cast<__half*>(smem + Lay::kOffQ);  // [kRows, D]
  if (threadIdx.x < kRows * (D / 16)) {
    const int r = threadIdx.x / (D / 16), blk = threadIdx.x % (D / 16);
    const int R = rg * kRows + r;
    float x[16];
    if (R < p.rows) {
      const int h = kvh * p.group + R / p.nq, qi = R % p.nq;
      const int64_t base = b * p.q_stride_b + h * p.q_stride_h + qi * p.q_stride_i + blk * 16;
#pragma unroll
      for (int e = 0; e < 16; ++e) x[e] = load_half<kF16In>(p.q, base + e);
      const cuda::NvBlockScale sc = cuda::nv_block_scale(cuda::block_amax<16>(x), 1.0f);
#pragma unroll
      for (int e = 0; e < 16; ++e) x[e] = cuda::nv_fake_element(x[e], sc, 1.0f);
    } else {
#pragma unroll
      for (int e = 0; e < 16; ++e) x[e] = 0.0f;
    }
#pragma unroll
    for (int e = 0; e < 16; ++e) s_q[r * D + blk * 16 + e] = __float2half_rn(x[e]);
  }
  __syncthreads();

  // Q^T B fragments of the D/16 k-steps: step s, half r, element h = channel (D/4) t + 8(s>>1) +
  // 4(s&1) + 2r + h of row g (kPack: of row g & 3, so columns 4-7 repeat rows 0-3).
  uint32_t qb[Lay::kKSteps][2];
  {
    const uint32_t* qrow = reinterpret_cast<const uint32_t*>(s_q + (kPack ? g & 3 : g) * D + (D / 4) * t);
#pragma unroll
    for (int s = 0; s < Lay::kKSteps; ++s)
#pragma unroll
      for (int r = 0; r < 2; ++r) qb[s][r] = qrow[(8 * (s >> 1) + 4 * (s & 1) + 2 * r) / 2];
  }

  // This thread's two accumulator columns 2t, 2t+1 hold rows row_of[0..1] (kPack: columns 4-7
  // repeat rows 0-3). Visible keys of those rows: lo <= j < lim. Rows past `rows` are padding
  // (their results are dropped); they get [window_begin, L) so that they never force masking
  // and never see a key that was not loaded.
  int row_of[2], lo[2], lim[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    row_of[i] = kPack ? (2 * t + i) & 3 : 2 * t + i;
    const int R = rg * kRows + row_of[i];
    const IndexRange keys = R < p.rows ? LocalMask::keys(R % p.nq, seq) : IndexRange{window_begin, L};
    lo[i] = keys.begin;
    lim[i] = keys.end;
  }
  // Steps that need masking: those not inside the range every query token sees.
  const IndexRange seen_by_all = keys_seen_by_rows<LocalMask>(0, p.nq - 1, seq);

  // Fragment read offsets (bytes within a tile), constant per thread.
  // D = 128: 16 bytes (chunk t) of key g; D = 64: 8 bytes [8t, 8t+8).
  const int off_k0 = smem_row(g) * kKeyBytes + (D == 128 ? ((t ^ smem_chunk_xor<D>(g)) * 16) : 8 * t);
  const int off_k1 = off_k0 + 8 * kKeyBytes;  // key g + 8: same row pattern, 8 rows further
  int off_v[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int k = 2 * t + i;
    // D = 128: 8 bytes (chunk g/2, half g%2) of key k; D = 64: 4 bytes [4g, 4g+4).
    off_v[i] = smem_row(k) * kKeyBytes + (D == 128 ? (((g >> 1) ^ smem_chunk_xor<D>(k)) * 16) + (g & 1) * 8 : 4 * g);
  }

  const cuda::PQuantConsts pc = cuda::p_quant_consts(kPQuant);
  const float c2 = p.c2;
  float o_acc[Lay::kMTiles][4];  // O^T m-tile c: (ch pi(c, g), rows 2t, 2t+1), (ch pi(c, g+8), ...)
#pragma unroll
  for (int c = 0; c < Lay::kMTiles; ++c)
#pragma unroll
    for (int e = 0; e < 4; ++e) o_acc[c][e] = 0.0f;
  float m[2] = {neg_inf(), neg_inf()}, m_ref[2] = {neg_inf(), neg_inf()}, l[2] = {0.0f, 0.0f};
  float* red = reinterpret_cast<float*>(smem + Lay::kOffRed);  // paper: [2][kWarps][kRows]

  const uint32_t lut0 = pinned_lut0(static_cast<uint32_t>(p.heads_kv) >> 31);  // heads_kv >= 0
  for (int it = 0; it < n_iter; ++it) {
    load_step(it + kStages - 1);
    cuda::cp_async_wait<kStages - 1>();
    __syncwarp();
    const uint8_t* step = ring + (it % kStages) * kStepBytes;
    const int key0 = step_key0(it);
    const bool masked = keys_need_mask(key0, kStepKeys, seen_by_all);

    // S^T = K Q^T for the step's two tiles.
    float s[2][4];
#pragma unroll
    for (int tt = 0; tt < 2; ++tt) {
      const uint8_t* tile = step + tt * kTileBytes;
      uint32_t w0[Lay::kQWords], w1[Lay::kQWords], ks0, ks1;
      if constexpr (D == 128) {
        const uint4 kw0 = *reinterpret_cast<const uint4*>(tile + kOffKData + off_k0);
        const uint4 kw1 = *reinterpret_cast<const uint4*>(tile + kOffKData + off_k1);
        w0[0] = kw0.x, w0[1] = kw0.y, w0[2] = kw0.z, w0[3] = kw0.w;
        w1[0] = kw1.x, w1[1] = kw1.y, w1[2] = kw1.z, w1[3] = kw1.w;
        // The scales of blocks 2t, 2t+1 of keys g and g+8.
        ks0 = *reinterpret_cast<const uint16_t*>(tile + kOffKScales + g * kKeyScaleBytes + 2 * t);
        ks1 = *reinterpret_cast<const uint16_t*>(tile + kOffKScales + (g + 8) * kKeyScaleBytes + 2 * t);
      } else {
        const uint2 kw0 = *reinterpret_cast<const uint2*>(tile + kOffKData + off_k0);
        const uint2 kw1 = *reinterpret_cast<const uint2*>(tile + kOffKData + off_k1);
        w0[0] = kw0.x, w0[1] = kw0.y;
        w1[0] = kw1.x, w1[1] = kw1.y;
        // The scale of block t of keys g and g+8.
        ks0 = tile[kOffKScales + g * kKeyScaleBytes + t];
        ks1 = tile[kOffKScales + (g + 8) * kKeyScaleBytes + t];
      }
      const uint32_t ss0 = cuda::e4m3x2_to_f16x2(ks0), ss1 = cuda::e4m3x2_to_f16x2(ks1);
      float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
      for (int i = 0; i < Lay::kQWords; ++i) {
        // D = 128: words 0-1 are channels [32t, 32t+16): block 2t; words 2-3: block 2t+1.
        // D = 64: words 0-1 are block t.
        const uint32_t sel = i < 2 ? 0x1010u : 0x3232u;
        uint32_t a[4], bk[4];
        fp4_word_to_f16x2(w0[i], prmt(ss0, ss0, sel), lut0, a);
        fp4_word_to_f16x2(w1[i], prmt(ss1, ss1, sel), lut0, bk);
        cuda::mma_m16n8k16_f16(acc, a[0], bk[0], a[1], bk[1], qb[2 * i][0], qb[2 * i][1]);
        cuda::mma_m16n8k16_f16(acc, a[2], bk[2], a[3], bk[3], qb[2 * i + 1][0], qb[2 * i + 1][1]);
      }
#pragma unroll
      for (int e = 0; e < 4; ++e) s[tt][e] = acc[e];
      if (masked) {
        const int kg = key0 + kTileKeys * tt + g;
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int key = kg + ((e >> 1) << 3);
          if (key < lo[e & 1] || key >= lim[e & 1]) s[tt][e] = neg_inf();
        }
      }
    }

    // The values that go through the softmax: kPack keeps tile 0's columns 0-3 and tile 1's
    // columns 4-7 (lanes t < 2 and t >= 2), one set of 4 per thread; otherwise both tiles.
    constexpr int kSets = kPack ? 1 : 2;
    float sv[kSets][4];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      if constexpr (kPack) {
        sv[0][e] = t < 2 ? s[0][e] : s[1][e];
      } else {
        sv[0][e] = s[0][e];
        sv[1][e] = s[1][e];
      }
    }

    // Row maxima of the step (rows row_of[0..1]), over the 8 lanes that share t (kPack: and
    // over the lanes t ^ 2, which hold the same rows' other tile).
    float mx[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      float v = fmaxf(sv[0][i], sv[0][i + 2]);
      if constexpr (!kPack) v = fmaxf(v, fmaxf(sv[1][i], sv[1][i + 2]));
      v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 4));
      v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 8));
      v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 16));
      if constexpr (kPack) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
      mx[i] = v;
    }
    if constexpr (kPaper) {
      // The 128-key tile's maximum: exchange the 4 warps' step maxima. Double-buffered by the
      // tile's parity, so one barrier per tile orders both the writes and the next overwrite.
      float* buf = red + (it & 1) * kWarps * kRows;
      if (g == 0) {  // kPack: lanes t and t ^ 2 write the same value to the same slot
        buf[warp * kRows + row_of[0]] = mx[0];
        buf[warp * kRows + row_of[1]] = mx[1];
      }
      __syncthreads();
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        float v = buf[row_of[i]];
#pragma unroll
        for (int w = 1; w < kWarps; ++w) v = fmaxf(v, buf[w * kRows + row_of[i]]);
        mx[i] = v;
      }
    }

    // New reference maxima and the rescale of O and l (skipped when no row of the warp changed:
    // then every factor is exactly 1).
    float m_use[2];
    bool changed = false;
    float f[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const float m_new = fmaxf(m[i], cuda::mul_rn(mx[i], c2));
      const float r_new = kPaper ? m_new : ceilf(m_new);
      f[i] = 1.0f;
      if (r_new != m_ref[i]) {
        changed = true;
        if (m_ref[i] == neg_inf()) f[i] = 0.0f;
        else f[i] = kPaper ? cuda::ex2_approx(m_ref[i] - r_new) : exact_pow2(m_ref[i] - r_new);
      }
      m[i] = m_new;
      m_ref[i] = r_new;
      m_use[i] = r_new == neg_inf() ? 0.0f : r_new;  // a row with no visible key yet: p~ = 0
    }
    if (__any_sync(0xffffffffu, changed)) {
#pragma unroll
      for (int c = 0; c < 8; ++c)
#pragma unroll
        for (int e = 0; e < 4; ++e) o_acc[c][e] *= f[e & 1];
      l[0] *= f[0];
      l[1] *= f[1];
    }

    // p~ and P^ (as the PV MMA's B fragments, column g), per set.
    uint32_t pb[2][2];
#pragma unroll
    for (int set = 0; set < kSets; ++set) {
      float pt[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) pt[e] = cuda::ex2_approx(fmaf(sv[set][e], c2, -m_use[e & 1]));
      l[0] += pt[0] + pt[2];
      l[1] += pt[1] + pt[3];
      quantize_p_tile(pt, pc, pb[set][0], pb[set][1]);
    }
    if constexpr (kPack) {
      // Tile 0's PV takes columns 0-3 (lanes g < 4), tile 1's columns 4-7; the other columns
      // are zero, so each O^T column accumulates the keys of one tile only.
      const bool first = g < 4;
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        pb[1][j] = first ? 0u : pb[0][j];
        pb[0][j] = first ? pb[0][j] : 0u;
      }
    }

    // O^T += V^T P^T, tile by tile.
#pragma unroll
    for (int tt = 0; tt < 2; ++tt) {
      const uint8_t* tile = step + tt * kTileBytes;
      const uint32_t pb0 = pb[tt][0], pb1 = pb[tt][1];

      // V of keys 2t, 2t+1 (pair a) and 2t+8, 2t+9 (pair b), channels [(D/8) g, (D/8)(g+1)):
      // block g (D = 128) or half of block g/2 (D = 64).
      uint32_t wa0[Lay::kVWords], wa1[Lay::kVWords], wb0[Lay::kVWords], wb1[Lay::kVWords];
      if constexpr (D == 128) {
        const uint2 va0 = *reinterpret_cast<const uint2*>(tile + kOffVData + off_v[0]);
        const uint2 va1 = *reinterpret_cast<const uint2*>(tile + kOffVData + off_v[1]);
        const uint2 vb0 = *reinterpret_cast<const uint2*>(tile + kOffVData + off_v[0] + 8 * kKeyBytes);
        const uint2 vb1 = *reinterpret_cast<const uint2*>(tile + kOffVData + off_v[1] + 8 * kKeyBytes);
        wa0[0] = va0.x, wa0[1] = va0.y, wa1[0] = va1.x, wa1[1] = va1.y;
        wb0[0] = vb0.x, wb0[1] = vb0.y, wb1[0] = vb1.x, wb1[1] = vb1.y;
      } else {
        wa0[0] = *reinterpret_cast<const uint32_t*>(tile + kOffVData + off_v[0]);
        wa1[0] = *reinterpret_cast<const uint32_t*>(tile + kOffVData + off_v[1]);
        wb0[0] = *reinterpret_cast<const uint32_t*>(tile + kOffVData + off_v[0] + 8 * kKeyBytes);
        wb1[0] = *reinterpret_cast<const uint32_t*>(tile + kOffVData + off_v[1] + 8 * kKeyBytes);
      }
      const uint8_t* vs = tile + kOffVScales + (g * D) / 128;  // this thread's block
      uint32_t sa0 = vs[(2 * t) * kKeyScaleBytes], sa1 = vs[(2 * t + 1) * kKeyScaleBytes];
      uint32_t sb0 = vs[(2 * t + 8) * kKeyScaleBytes], sb1 = vs[(2 * t + 9) * kKeyScaleBytes];
      if (masked) {  // keys no row sees (past the sequence, before the window): scale 0, so
                     // stale or non-finite codes decode to 0 (never NaN)
        const int kt = key0 + kTileKeys * tt + 2 * t;
        auto seen = [&](int key) { return key >= window_begin && key < L; };
        sa0 = seen(kt) ? sa0 : 0u;
        sa1 = seen(kt + 1) ? sa1 : 0u;
        sb0 = seen(kt + 8) ? sb0 : 0u;
        sb1 = seen(kt + 9) ? sb1 : 0u;
      }
      const uint32_t ssa = cuda::e4m3x2_to_f16x2(sa0 | (sa1 << 8));
      const uint32_t ssb = cuda::e4m3x2_to_f16x2(sb0 | (sb1 << 8));
#pragma unroll
      for (int i = 0; i < Lay::kVWords; ++i) {
        uint32_t va[8], vb[8];
        fp4_pair_to_f16x2(wa0[i], wa1[i], ssa, lut0, va);
        fp4_pair_to_f16x2(wb0[i], wb1[i], ssb, lut0, vb);
#pragma unroll
        for (int c4 = 0; c4 < 4; ++c4)
          cuda::mma_m16n8k16_f16(o_acc[4 * i + c4], va[c4], va[c4 + 4], vb[c4], vb[c4 + 4], pb0, pb1);
      }
    }
    __syncwarp();  // every lane is done with this slot before the next iteration refills it
  }
  cuda::cp_async_wait<0>();

  // Column sums over the 8 lanes that share t (kPack: columns c and c + 4 are added in the merge).
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    l[i] += __shfl_xor_sync(0xffffffffu, l[i], 4);
    l[i] += __shfl_xor_sync(0xffffffffu, l[i], 8);
    l[i] += __shfl_xor_sync(0xffffffffu, l[i], 16);
  }

  // ---- Merge the 4 warps (shared memory), then write the output or the split's partial --------
  __syncthreads();  // every warp is done with its ring: reuse it
  float* s_o = reinterpret_cast<float*>(smem + Lay::kOffRing);  // [kWarps][kRows][kOPitch]
  float* s_m = s_o + kWarps * kRows * kOPitch;                   // [kWarps][kRows]
  float* s_l = s_m + kWarps * kRows;
#pragma unroll
  for (int c = 0; c < Lay::kMTiles; ++c)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int ch = (D / 8) * g + 8 * (c >> 2) + (c & 3) + 4 * (e >> 1);
      const int row = 2 * t + (e & 1);
      s_o[(warp * kRows + row) * kOPitch + merge_col(row, ch)] = o_acc[c][e];
    }
  if (g == 0) {  // per column (kPack: columns c and c + 4 share m_ref)
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      // Non-finite inputs (numerics 9.7): the row maxima drop NaN scores (fmaxf), so a warp that
      // saw only NaN scores of a row has m_ref = -inf but l = NaN. It must not pass for a warp
      // with no visible key (l = 0), which the merges skip: it is stored with reference 0, so its
      // NaN l and O flow into every merge (NaN times any weight is NaN).
      s_m[warp * kRows + 2 * t + i] = m_ref[i] == neg_inf() && l[i] != 0.0f ? 0.0f : m_ref[i];
      s_l[warp * kRows + 2 * t + i] = l[i];
    }
  }
  __syncthreads();

  // One output channel per thread, kThreads / D rows at a time (a loop of constant trip count).
  constexpr int kRowsAtOnce = kThreads / D;
  const int d = threadIdx.x % D;
  const int unit = (b * p.heads_kv + kvh) * p.row_groups + rg;
  // Rows past `rows` are skipped by a predicate (not a break), so that the unrolled rows' shared
  // loads overlap.
#pragma unroll
  for (int rr = 0; rr < kRows / kRowsAtOnce; ++rr) {
    const int r = kRowsAtOnce == 1 ? rr : rr * kRowsAtOnce + static_cast<int>(threadIdx.x) / D;
    const int R = rg * kRows + r;
    if (R >= p.rows) continue;
    float M = neg_inf();
#pragma unroll
    for (int w = 0; w < kWarps; ++w) M = fmaxf(M, s_m[w * kRows + r]);
    float acc = 0.0f, lsum = 0.0f;
    if (M != neg_inf()) {
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        const float mw = s_m[w * kRows + r];
        if (mw == neg_inf()) continue;
        // anchored: an exact power of two; paper: the warps share m, so the weight is 1.
        const float wgt = mw == M ? 1.0f : exact_pow2(mw - M);
        float ow = s_o[(w * kRows + r) * kOPitch + merge_col(r, d)], lw = s_l[w * kRows + r];
        if constexpr (kPack) {  // row r's other tile: column r + 4
          ow += s_o[(w * kRows + r + 4) * kOPitch + merge_col(r + 4, d)];
          lw += s_l[w * kRows + r + 4];
        }
        acc = fmaf(wgt, ow, acc);
        lsum = fmaf(wgt, lw, lsum);
      }
    }
    const int h = kvh * p.group + R / p.nq, qi = R % p.nq;
    const int64_t row_out = (static_cast<int64_t>(b) * p.heads_q + h) * p.nq + qi;
    if (p.num_splits == 1) {
      // Empty: no warp saw a visible key (l = 0 exactly: FP4 scores are finite or NaN, and the
      // row maximum contributes p~ >= 1/2). A NaN sum is a poisoned row: O and LSE come out NaN.
      const bool empty = lsum == 0.0f;
      const float out = empty ? 0.0f : acc * (1.0f / lsum);
      static_cast<uint16_t*>(p.o)[row_out * D + d] = to_half_bits<kF16In>(out);
      if (p.lse != nullptr && d == 0)
        p.lse[row_out] = empty ? neg_inf() : kLn2 * (M + __log2f(lsum));
    } else {
      const int64_t prow = (static_cast<int64_t>(unit) * p.num_splits + split) * kRows + r;
      p.part_o[prow * D + d] = acc;
      if (d == 0) {
        p.part_ml[2 * prow] = M;
        p.part_ml[2 * prow + 1] = lsum;
      }
    }
  }
}

// Merges the splits of one (unit, row): O = sum_s 2^(m_s - M) O_s / sum_s 2^(m_s - M) l_s with
// M = max m_s (anchored: every weight an exact power of two). Grid (units, kRows), 128 threads =
// 4 warps. Warp w takes the splits w, w + 4, ...: each lane below D/4 loads the split's m, l and
// 4 channels of O (float4) for up to kCombineBatch splits at once (independent loads: one memory
// latency for a whole batch), then folds them into a running (M, l, O) — rescaling by 2^(M_old -
// M_new) is exact, so the sum is the two-pass sum up to the order of fp32 additions. The 4 warps
// are merged through shared memory the same way. Launched with programmatic dependent launch: its
// CTAs may start while the decode grid drains, and wait for it (griddep_wait) before reading.
constexpr int kMaxSplits = 1024;  // api.cu caps num_splits at this
constexpr int kCombineBatch = 16;

__device__ __forceinline__ void fold_split(float ms, float ls, const float4& os, float& M, float& l,
                                           float4& acc) {
  if (ms == neg_inf()) return;  // an empty split (no visible key) weighs 0
  if (ms > M) {
    const float f = M == neg_inf() ? 0.0f : exact_pow2(M - ms);
    acc.x *= f, acc.y *= f, acc.z *= f, acc.w *= f;
    l *= f;
    M = ms;
  }
  const float w = ms == M ? 1.0f : exact_pow2(ms - M);
  acc.x = fmaf(w, os.x, acc.x), acc.y = fmaf(w, os.y, acc.y), acc.z = fmaf(w, os.z, acc.z),
  acc.w = fmaf(w, os.w, acc.w);
  l = fmaf(w, ls, l);
}

constexpr int kCombineThreads = 128;

template <int D, bool kF16Out>
__global__ void __launch_bounds__(kCombineThreads) combine_kernel(const DecodeParams p) {
  static_assert(D <= 4 * 32, "at most one float4 of channels per lane");
  constexpr int kWarpsC = kCombineThreads / 32;
  __shared__ float4 s_o[kWarpsC][32];
  __shared__ float s_ml[kWarpsC][2];
  const int unit = blockIdx.x, r = blockIdx.y, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int rg = unit % p.row_groups, kvh = (unit / p.row_groups) % p.heads_kv;
  const int b = unit / (p.row_groups * p.heads_kv);
  const int R = rg * kRows + r;
  if (R >= p.rows) return;  // uniform per block
  cuda::griddep_wait();  // the decode grid's partials are complete and visible from here on
  const int64_t prow0 = static_cast<int64_t>(unit) * p.num_splits * kRows + r;
  float M = neg_inf(), l = 0.0f;
  float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  const bool has_channels = lane < D / 4;
  for (int s0 = warp; s0 < p.num_splits; s0 += kWarpsC * kCombineBatch) {
    float ms[kCombineBatch], ls[kCombineBatch];
    float4 os[kCombineBatch];
#pragma unroll
    for (int j = 0; j < kCombineBatch; ++j) {
      const int s = s0 + kWarpsC * j;
      if (s < p.num_splits) {
        const int64_t prow = prow0 + static_cast<int64_t>(s) * kRows;
        ms[j] = p.part_ml[2 * prow];
        ls[j] = p.part_ml[2 * prow + 1];
        os[j] = has_channels ? reinterpret_cast<const float4*>(p.part_o + prow * D)[lane]
                             : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      } else {
        ms[j] = neg_inf();
      }
    }
#pragma unroll
    for (int j = 0; j < kCombineBatch; ++j) fold_split(ms[j], ls[j], os[j], M, l, acc);
  }
  s_o[warp][lane] = acc;
  if (lane == 0) {
    s_ml[warp][0] = M;
    s_ml[warp][1] = l;
  }
  __syncthreads();
  // Thread d finishes channel d: fold the 4 warps' partial sums of its channel.
  const int d = threadIdx.x;
  if (d >= D) return;
  float Mt = neg_inf(), lt = 0.0f;
  float4 at = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll
  for (int w = 0; w < kWarpsC; ++w) {
    const float* ow = reinterpret_cast<const float*>(&s_o[w][0]);
    fold_split(s_ml[w][0], s_ml[w][1], make_float4(ow[d], 0.0f, 0.0f, 0.0f), Mt, lt, at);
  }
  const int h = kvh * p.group + R / p.nq, qi = R % p.nq;
  const int64_t row_out = (static_cast<int64_t>(b) * p.heads_q + h) * p.nq + qi;
  const bool empty = lt == 0.0f;  // as in decode_kernel: a NaN sum is poisoned, not empty
  static_cast<uint16_t*>(p.o)[row_out * D + d] = to_half_bits<kF16Out>(empty ? 0.0f : at.x * (1.0f / lt));
  if (p.lse != nullptr && d == 0) p.lse[row_out] = empty ? neg_inf() : kLn2 * (Mt + __log2f(lt));
}

}  // namespace attnqat::decode
