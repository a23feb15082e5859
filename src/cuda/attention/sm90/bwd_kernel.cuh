// src/cuda/attention/sm90/bwd_kernel.cuh — the sm_90a backward kernel of numerics section 5
// (FlashAttention-3's structure, docs/hopper.md, section 8, with the Attn-QAT P_F and the ablation
// switches as runtime flags). Must match reference::attention_backward (src/reference/
// attention.cpp, backward_impl): dQ, dK, dV of
//   P = exp2(S2 - LSE / ln 2), P_F = phi_nv(P; 1) ("paper") or phi_nv(exp2(S2 - m_ref); 2^-11) / l
//   ("anchored") or P (quant_p off), dV += P_F^T dO, dP = dO V^T, dS = P (dP - D),
//   dK = c dS^T Q, dQ = c dS K   (the postprocess applies dQ's c).
// Softcap (numerics 9.9): the scores are t = tanh(a S) (softcap.cuh) with c2 = b, and
// dS = P (dP - D) (1 - t^2), computed as RN(RN(P (1 - t^2)) (dP - D)) (the reference multiplies
// in the other order: one fp32 rounding apart, before dS is rounded to 16 bits). Sinks (9.10)
// need nothing here: LSE, m_ref and l include the sink, and dsinks comes from the preprocess.
// The row statistics (-LSE/ln 2, D, -m_ref, 1/l) come precomputed per query row (bwd_aux.cu).
//
// Grid (ceil(Nk / 128), Hkv, B), 384 threads, one CTA per SM. Configuration, roles and the
// shared-memory map: bwd_config.h. Per iteration (query head h of the group, query block m), a
// consumer warpgroup w (keys [64 w, 64 w + 64) of the block) does:
//   1. wait Q[m], dO[m], stats[m] (TMA ring);  S = Q K_w^T, dP = dO V_w^T (two commit groups)
//   2. wait S; [softcap: t]; mask; P (in place of S), P_F -> P tile in shared memory; [softcap:
//      P (1 - t^2) in place of P]; fence; warpgroup barrier
//   3. dV += P_F^T dO (issued, runs while 4 computes)
//   4. wait dP; dS = P (dP - D) -> dS tile (double-buffered); fence; barrier (d = 128: both
//      warpgroups, because each one's dQ piece reads both dS halves)
//   5. dK += dS^T Q; dQ piece = dS K (one commit group); wait all; release the Q/dO stage
//   6. dQ piece -> dQaccum: bulk reduce-add from a staging tile, or (deterministic) ordered
//      read-add-write behind a per-piece semaphore.
// After the loop: dK * c and dV, rounded to the input dtype, straight from the registers.
//
// Shared-memory hazards (who waits for whom):
//  - P tile: read only by its warpgroup's dV GEMM, which completed (wait_group 0, step 5)
//    before the next iteration writes it.
//  - dS tiles: with d = 128 the other warpgroup's dQ GEMM reads them, so they alternate between
//    two buffers: a warpgroup writes buffer (it & 1) only after passing the step-4 barrier of
//    iteration it - 1, which the other warpgroup reaches only after its step 5 of it - 2, the
//    last reader of that buffer.
//  - Staging tile: the leader waits until the previous bulk reduce has read it, then a barrier.
//  - Q/dO/stats stage: released (q_empty, 256 arrivals) after every GEMM that reads it completed
//    and the stats were read.
#pragma once

#include <cmath>
#include <cstdint>

#include "cuda/attention/sm90/bwd_config.h"
#include "cuda/attention/sm90/bwd_params.h"
#include "cuda/attention/sm90/fragment.cuh"
#include "cuda/attention/sm90/softcap.cuh"
#include "cuda/common/ptx_sm90.cuh"
#include "cuda/common/wgmma.cuh"
#include "common/mask.h"
#include "cuda/common/ptx.cuh"
#include "cuda/common/codec.cuh"

namespace attnqat::sm90 {

// ---- Shared-memory addresses ------------------------------------------------------------------

template <class Cfg>
struct BwdSmem {
  uint32_t base;  // 1024-byte aligned

  __device__ __forceinline__ uint32_t k() const { return base + Cfg::kOffK; }  // [128, d]
  __device__ __forceinline__ uint32_t v() const { return base + Cfg::kOffV; }  // [128, d]
  __device__ __forceinline__ uint32_t q(int s) const { return base + Cfg::kOffQ + s * Cfg::kQBytes; }
  __device__ __forceinline__ uint32_t dout(int s) const {
    return base + Cfg::kOffDO + s * Cfg::kQBytes;
  }
  // [64 queries, 64 keys] 16-bit: warpgroup w's P_F.
  __device__ __forceinline__ uint32_t p(int w) const {
    return base + Cfg::kOffP + w * Cfg::kPTileBytes;
  }
  // dS buffer `buf`: [64 queries, 128 keys] as two chunks of 64 keys (chunk w written by
  // warpgroup w) — a K-major A operand for dQ, each chunk an MN-major A operand for dK.
  __device__ __forceinline__ uint32_t ds(int buf) const {
    return base + Cfg::kOffDS + buf * Cfg::kConsumerWGs * Cfg::kPTileBytes;
  }
  __device__ __forceinline__ uint32_t staging(int w) const {
    return base + Cfg::kOffStage + w * Cfg::kPieceBytes;
  }
  __device__ __forceinline__ uint32_t stats(int s) const {
    return base + Cfg::kOffStats + s * Cfg::kStatsBytes;
  }
  __device__ __forceinline__ uint32_t bar(int i) const { return base + Cfg::kOffBar + 8 * i; }
  __device__ __forceinline__ uint32_t kv_full() const { return bar(Cfg::kBarKV); }
  __device__ __forceinline__ uint32_t q_full(int s) const { return bar(Cfg::kBarQFull + s); }
  __device__ __forceinline__ uint32_t q_empty(int s) const { return bar(Cfg::kBarQEmpty + s); }
};

// Writes the 16-bit A fragment of slab j (p_quant.cuh's layout: a[0], a[1] rows g, g + 8 at
// keys 16 j + 2t, +1; a[2], a[3] the same at keys 16 j + 8 + 2t, +1) into a [64, 64] tile with
// 128-byte rows and the 128B swizzle (16-byte unit u of row r at u ^ (r % 8)). For a fixed
// register the 32 lanes hit 8 distinct units x 4 words: no bank conflict.
__device__ __forceinline__ void store_slab(uint32_t tile, int j, const uint32_t (&a)[4]) {
  const int lane = threadIdx.x % 32, warp = (threadIdx.x / 32) % 4;
  const int g = lane / 4, t = lane % 4;
  const uint32_t row_addr = tile + (16 * warp + g) * 128 + 4 * t;
#pragma unroll
  for (int r = 0; r < 4; ++r)
    cuda::st_shared_b32(row_addr + ((r & 1) ? 8 * 128 : 0) + (((2 * j + (r >> 1)) ^ g) << 4), a[r]);
}

// ---- GEMMs (asynchronous wgmma; the caller fences, commits and waits) --------------------------

// acc[64 queries, 64 keys] = A[64, d] B[64, d]^T: A = the Q or dO tile, B = rows [64 w, 64 w + 64)
// of the K or V tile (b_rows points at them in chunk 0); both K-major (k = d along the rows).
template <class Cfg>
__device__ __forceinline__ void gemm_qk(float (&acc)[Cfg::kAccS], uint32_t a_tile, uint32_t b_rows) {
#pragma unroll
  for (int kk = 0; kk < Cfg::kHeadDim / 16; ++kk) {
    const uint32_t in_row = 32 * (kk % 4);
    const uint64_t da = cuda::desc_kmajor_sw128(a_tile + (kk / 4) * Cfg::kQChunkBytes + in_row);
    const uint64_t db = cuda::desc_kmajor_sw128(b_rows + (kk / 4) * Cfg::kKVChunkBytes + in_row);
    cuda::wgmma_ss<Cfg::kF16, Cfg::kWgKeys, 0, 0>(acc, da, db, kk > 0 ? 1 : 0);
  }
}

// acc[64 keys, d] += X^T Y: X = a [64 queries, 64 keys] tile (P_F or dS; MN-major A: keys run
// along its rows), Y = the [64 queries, d] Q or dO tile (MN-major B: d along its rows, the two
// 64-column chunks LBO = kQChunkBytes apart). k16 step kk = queries 16 kk .. 16 kk + 15.
template <class Cfg>
__device__ __forceinline__ void gemm_keys(float (&acc)[Cfg::kAccKV], uint32_t x_tile, uint32_t y_tile) {
  constexpr uint32_t kSlabBytes = 16 * Cfg::kRowBytes;
#pragma unroll
  for (int kk = 0; kk < Cfg::kBlockM / 16; ++kk) {
    const uint64_t da = cuda::desc_mnmajor_sw128(x_tile + kk * kSlabBytes, Cfg::kPTileBytes);
    const uint64_t db = cuda::desc_mnmajor_sw128(y_tile + kk * kSlabBytes, Cfg::kQChunkBytes);
    cuda::wgmma_ss<Cfg::kF16, Cfg::kHeadDim, 1, 1>(acc, da, db, 1);
  }
}

// The warpgroup's dQ piece [64 queries, 64 columns] = dS[:, keys] K[keys, chunk]: A = the dS
// buffer (K-major: key slab s is chunk s / 4 at byte 32 (s % 4) of each row), B = one 64-column
// chunk of the K tile (MN-major). d = 128: all 8 key slabs, chunk w; d = 64: the warpgroup's 4.
template <class Cfg>
__device__ __forceinline__ void gemm_dq(float (&acc)[Cfg::kAccDq], uint32_t ds_buf,
                                        uint32_t k_chunk, int wg) {
  constexpr uint32_t kSlabBytes = 16 * Cfg::kRowBytes;
#pragma unroll
  for (int kk = 0; kk < Cfg::kDqKeySlabs; ++kk) {
    const int slab = Cfg::kHeadDim == 128 ? kk : Cfg::kDqKeySlabs * wg + kk;
    const uint64_t da =
        cuda::desc_kmajor_sw128(ds_buf + (slab / 4) * Cfg::kPTileBytes + 32 * (slab % 4));
    const uint64_t db = cuda::desc_mnmajor_sw128(k_chunk + slab * kSlabBytes, Cfg::kKVChunkBytes);
    cuda::wgmma_ss<Cfg::kF16, 64, 0, 1>(acc, da, db, kk > 0 ? 1 : 0);
  }
}

// ---- Producer ---------------------------------------------------------------------------------

// Run by one thread: K and V of the block once, then per iteration Q, dO (TMA) and the 64 rows of
// statistics (1-D bulk copy) into stage it % kStages, after the consumers released it.
template <class Cfg>
__device__ __forceinline__ void bwd_producer(const BwdParams& p, const BwdSmem<Cfg>& sm, int n_block,
                                             int h_kv, const SeqRows& sr, int seq_idx,
                                             int m_begin, int m_end) {
  cuda::mbar_arrive_expect_tx(sm.kv_full(), 2 * Cfg::kKVBytes);
#pragma unroll
  for (int c = 0; c < Cfg::kChunks; ++c) {
    cuda::tma_load_4d(sm.k() + c * Cfg::kKVChunkBytes, &p.tma_k, sm.kv_full(), c * Cfg::kChunkCols,
                sr.k0 + n_block * Cfg::kBlockN, h_kv, sr.b);
    cuda::tma_load_4d(sm.v() + c * Cfg::kKVChunkBytes, &p.tma_v, sm.kv_full(), c * Cfg::kChunkCols,
                sr.k0 + n_block * Cfg::kBlockN, h_kv, sr.b);
  }
  int it = 0;
  for (int hg = 0; hg < p.group; ++hg) {
    const int h = h_kv * p.group + hg;
    for (int m = m_begin; m < m_end; ++m, ++it) {
      const int stage = it % Cfg::kStages;
      cuda::mbar_wait(sm.q_empty(stage), ((it / Cfg::kStages) & 1) ^ 1);
      cuda::mbar_arrive_expect_tx(sm.q_full(stage), 2 * Cfg::kQBytes + Cfg::kStatsBytes);
#pragma unroll
      for (int c = 0; c < Cfg::kChunks; ++c) {
        cuda::tma_load_4d(sm.q(stage) + c * Cfg::kQChunkBytes, &p.tma_q, sm.q_full(stage),
                    c * Cfg::kChunkCols, sr.q0 + m * Cfg::kBlockM, h, sr.b);
        cuda::tma_load_4d(sm.dout(stage) + c * Cfg::kQChunkBytes, &p.tma_do, sm.q_full(stage),
                    c * Cfg::kChunkCols, sr.q0 + m * Cfg::kBlockM, h, sr.b);
      }
      const int64_t row0 =
          (static_cast<int64_t>(seq_idx) * p.heads_q + h) * p.m_blocks * Cfg::kBlockM +
          m * Cfg::kBlockM;
      cuda::bulk_load(sm.stats(stage), p.stats + row0, Cfg::kStatsBytes, sm.q_full(stage));
    }
  }
}

// ---- dQ piece out -----------------------------------------------------------------------------

// Fast path: the piece goes to the warpgroup's staging tile in fragment order (bwd_params.h),
// and the leader adds it to dQaccum with one bulk reduce-add (fp32, performed in L2).
template <class Cfg>
__device__ __forceinline__ void store_dq_reduce(const float (&dq)[Cfg::kAccDq], uint32_t staging,
                                                float* g_piece, uint32_t bar_wg, bool leader) {
  const int tid = threadIdx.x % 128;
  if (leader) cuda::bulk_wait_read_all();  // the previous piece has left the staging tile
  cuda::named_bar_sync(bar_wg, 128);
#pragma unroll
  for (int i = 0; i < Cfg::kAccDq / 2; ++i)
    cuda::st_shared_v2f(staging + (i * 128 + tid) * 8, dq[2 * i], dq[2 * i + 1]);
  cuda::fence_proxy_async_smem();  // generic writes -> the bulk copy engine's reads
  cuda::named_bar_sync(bar_wg, 128);
  if (leader) {
    cuda::bulk_reduce_add_f32(g_piece, staging, Cfg::kPieceBytes);
    cuda::bulk_commit();
  }
}

// Deterministic path: the writers of a piece take turns in a fixed order, each a plain
// read-add-write of its registers; `turn` is this writer's position (dq_turn), the semaphore
// counts the writers done. The order is descending key block, then warpgroup when two share the
// piece. The query blocks a key block contributes to are a range [m_begin(n), m_end(n)) with
// both ends non-decreasing in n (monotone mask policies), so the writers of query block m are
// the key blocks n_first(m) .. n_last(m), and block n waits only for blocks > n. In this mode
// the grid runs key blocks in descending order (bwd_kernel), so those were scheduled before it
// (lower linear block index): no deadlock. And under the causal mask block n + 1 starts at a later query block and has less
// work, so it is ahead of block n at every query block: the turns cost almost no waiting.
template <class Cfg>
__device__ __forceinline__ void store_dq_ordered(const float (&dq)[Cfg::kAccDq], float* g_piece,
                                                 int* sem, int turn, uint32_t bar_wg, bool leader) {
  const int tid = threadIdx.x % 128;
  if (leader)
    while (cuda::ld_acquire_gpu(sem) != turn) {
    }
  cuda::named_bar_sync(bar_wg, 128);  // the warpgroup reads after the leader's acquire
  float2* g = reinterpret_cast<float2*>(g_piece);
#pragma unroll
  for (int i = 0; i < Cfg::kAccDq / 2; ++i) {
    float2 a = __ldcg(g + i * 128 + tid);  // L2: never a stale L1 line
    a.x += dq[2 * i];
    a.y += dq[2 * i + 1];
    __stcg(g + i * 128 + tid, a);
  }
  __threadfence();              // this thread's adds are visible device-wide ...
  cuda::named_bar_sync(bar_wg, 128);  // ... for every thread of the warpgroup ...
  if (leader) atomicAdd(sem, 1);  // ... before the next writer's turn
}

// This writer's turn at query block m (see store_dq_ordered): key blocks n_last(m) down to
// n_first(m), kDqWriters warpgroups each.
template <class Cfg, class Mask>
__device__ __forceinline__ int dq_turn(const SeqInfo& seq, int m, int n_block, int wg) {
  const int last_row = min((m + 1) * Cfg::kBlockM, seq.len_q) - 1;
  const int n_last = (Mask::keys(last_row, seq).end - 1) / Cfg::kBlockN;
  return (n_last - n_block) * Cfg::kDqWriters + (Cfg::kDqWriters == 2 ? wg : 0);
}

// ---- dK, dV out -------------------------------------------------------------------------------

// ---- Consumer ---------------------------------------------------------------------------------

template <class Cfg, class Mask>
__device__ __forceinline__ void bwd_consumer(const BwdParams& p, const BwdSmem<Cfg>& sm, int wg,
                                             int n_block, int h_kv, const SeqRows& sr,
                                             int seq_idx, int m_begin, int m_end, int n_iters) {
  constexpr bool kF16 = Cfg::kF16;
  const int tid = threadIdx.x % 128, warp = tid / 32, g = (tid % 32) / 4;
  const int key0 = n_block * Cfg::kBlockN + Cfg::kWgKeys * wg;  // this warpgroup's first key
  const SeqInfo seq = sr.info;
  const uint32_t bar_wg = Cfg::kBarWg + wg;
  const bool leader = tid == 0;

  float dk[Cfg::kAccKV], dv[Cfg::kAccKV];
#pragma unroll
  for (int i = 0; i < Cfg::kAccKV; ++i) dk[i] = dv[i] = 0.0f;

  if (n_iters > 0) {
    cuda::mbar_wait(sm.kv_full(), 0);
    const uint32_t k_rows = sm.k() + wg * Cfg::kWgKeys * Cfg::kRowBytes;
    const uint32_t v_rows = sm.v() + wg * Cfg::kWgKeys * Cfg::kRowBytes;
    const int dq_chunk = Cfg::kHeadDim == 128 ? wg : 0;
    const uint32_t k_dq_chunk = sm.k() + dq_chunk * Cfg::kKVChunkBytes;
    const uint32_t p_tile = sm.p(wg);
    int it = 0;
    for (int hg = 0; hg < p.group; ++hg) {
      const int h = h_kv * p.group + hg;
      for (int m = m_begin; m < m_end; ++m, ++it) {
        const int stage = it % Cfg::kStages;
        const uint32_t q_tile = sm.q(stage), do_tile = sm.dout(stage);
        cuda::mbar_wait(sm.q_full(stage), (it / Cfg::kStages) & 1);

        // 1. S = Q K_w^T and dP = dO V_w^T.
        float s[Cfg::kAccS], dp[Cfg::kAccS];
        cuda::reg_fence(s);
        cuda::reg_fence(dp);
        cuda::wgmma_fence();
        gemm_qk<Cfg>(s, q_tile, k_rows);
        cuda::wgmma_commit();
        gemm_qk<Cfg>(dp, do_tile, v_rows);
        cuda::wgmma_commit();
        cuda::wgmma_wait<1>();  // S
        cuda::reg_fence(s);

        // 2. P (in place of S) and P_F. Row statistics of the thread's rows r0 = 16 warp + g and
        // r0 + 8: {-lse2, D, -m_ref, 1/l}.
        const uint32_t st_addr = sm.stats(stage) + (16 * warp + g) * 16;
        const float4 st0 = cuda::ld_shared_v4f(st_addr), st1 = cuda::ld_shared_v4f(st_addr + 8 * 16);
        const int row0 = m * Cfg::kBlockM + 16 * warp + g;
        if (p.extras.capped()) cap_scores<Cfg::kWgKeys>(s, p.extras.cap_a);  // t, before the mask
        if (keys_need_mask(key0, Cfg::kWgKeys, keys_seen_by_all<Mask>(m, Cfg::kBlockM, seq)))
          apply_mask<Cfg::kWgKeys>(s, key0, Mask::keys(row0, seq), Mask::keys(row0 + 8, seq));
#pragma unroll
        for (int j = 0; j < Cfg::kSlabs; ++j) {
          float* x = &s[8 * j];
          uint32_t frag[4];
          float slope[8];  // softcap: 1 - t^2 of each element, taken before x turns into P
          if (p.extras.capped()) {
#pragma unroll
            for (int e = 0; e < 8; ++e) slope[e] = cap_slope(x[e]);
          }
          if (p.quant_p && p.p_quant == PQuant::kAnchored) {
            // The forward's P blocks: phi_nv(p~; 2^-11) of p~ = exp2(S2 - m_ref), then / l
            // (p~ formed exactly as the forward forms it: ex2.approx of fma(s, c2, -m_ref)).
            float pt[8];
#pragma unroll
            for (int e = 0; e < 8; ++e)
              pt[e] = cuda::ex2_approx(__fmaf_rn(x[e], p.c2, ((e >> 1) & 1) ? st1.z : st0.z));
            cuda::quantize_p_slab_scaled<kF16>(pt, p.pq, st0.w, st1.w, frag);
          }
#pragma unroll
          for (int e = 0; e < 8; ++e)
            x[e] = cuda::ex2_approx(__fmaf_rn(x[e], p.c2, ((e >> 1) & 1) ? st1.x : st0.x));  // P
          if (!p.quant_p) {
#pragma unroll
            for (int r = 0; r < 4; ++r) frag[r] = cuda::pack_rn<kF16>(x[2 * r], x[2 * r + 1]);
          } else if (p.p_quant == PQuant::kPaper) {
            cuda::quantize_p_slab_scaled<kF16>(x, p.pq, 1.0f, 1.0f, frag);  // phi_nv(P; 1)
          }
          store_slab(p_tile, j, frag);
          // Softcap: from here x only feeds dS = P (dP - D) (1 - t^2) (step 4): fold the slope in.
          if (p.extras.capped()) {
#pragma unroll
            for (int e = 0; e < 8; ++e) x[e] = __fmul_rn(x[e], slope[e]);
          }
        }
        cuda::fence_proxy_async_smem();
        cuda::named_bar_sync(bar_wg, 128);

        // 3. dV += P_F^T dO.
        cuda::reg_fence(dv);
        cuda::wgmma_fence();
        gemm_keys<Cfg>(dv, p_tile, do_tile);
        cuda::wgmma_commit();

        // 4. dS = P (dP - D).
        cuda::wgmma_wait<1>();  // dP (dV may still run)
        cuda::reg_fence(dp);
        const uint32_t ds_buf = sm.ds(it & 1);
#pragma unroll
        for (int j = 0; j < Cfg::kSlabs; ++j) {
          uint32_t frag[4];
#pragma unroll
          for (int r = 0; r < 4; ++r) {
            const int i = 8 * j + 2 * r;
            const float delta = (r & 1) ? st1.y : st0.y;
            frag[r] = cuda::pack_rn<kF16>(s[i] * (dp[i] - delta), s[i + 1] * (dp[i + 1] - delta));
          }
          store_slab(ds_buf + wg * Cfg::kPTileBytes, j, frag);
        }
        cuda::fence_proxy_async_smem();
        if constexpr (Cfg::kHeadDim == 128)
          cuda::named_bar_sync(Cfg::kBarDsReady, 256);  // dQ reads both warpgroups' dS
        else
          cuda::named_bar_sync(bar_wg, 128);

        // 5. dK += dS^T Q; dQ piece = dS K.
        float dq[Cfg::kAccDq];
        cuda::reg_fence(dk);
        cuda::reg_fence(dq);
        cuda::wgmma_fence();
        gemm_keys<Cfg>(dk, ds_buf + wg * Cfg::kPTileBytes, q_tile);
        gemm_dq<Cfg>(dq, ds_buf, k_dq_chunk, wg);
        cuda::wgmma_commit();
        cuda::wgmma_wait<0>();
        cuda::reg_fence(dk);
        cuda::reg_fence(dv);
        cuda::reg_fence(dq);
        cuda::mbar_arrive(sm.q_empty(stage));  // Q, dO and stats of this stage are no longer read

        // 6. dQ piece -> dQaccum.
        const int64_t piece =
            ((static_cast<int64_t>(seq_idx) * p.heads_q + h) * p.m_blocks + m) * Cfg::kChunks +
            dq_chunk;
        float* g_piece = p.dq_accum + piece * Cfg::kPieceFloats;
        if (p.deterministic)
          store_dq_ordered<Cfg>(dq, g_piece, p.dq_sem + piece,
                                dq_turn<Cfg, Mask>(seq, m, n_block, wg), bar_wg, leader);
        else
          store_dq_reduce<Cfg>(dq, sm.staging(wg), g_piece, bar_wg, leader);
      }
    }
    if (leader && !p.deterministic) cuda::bulk_wait_all();  // the last reduce-add left shared memory
  }

  // dK = c dS^T Q, dV: keys key0 + 16 warp + g (+ 8); keys past the sequence's rows are not
  // its own, and its seqused_k padding keys get 0.
  const int key_row0 = key0 + 16 * warp + g;
  const int64_t offset0 = p.dkv_str.at(sr.b, h_kv, sr.k0 + key_row0);
  const bool valid0 = key_row0 < sr.k_rows, valid1 = key_row0 + 8 < sr.k_rows;
  const bool padding[2] = {key_row0 >= seq.len_k, key_row0 + 8 >= seq.len_k};
  store_rows<kF16, Cfg::kHeadDim>(p.dk, offset0, p.dkv_str.n, p.head_dim, valid0, valid1, dk,
                                  {p.scale, p.scale}, padding);
  store_rows<kF16, Cfg::kHeadDim>(p.dv, offset0, p.dkv_str.n, p.head_dim, valid0, valid1, dv,
                                  {1.0f, 1.0f}, padding);
}

// ---- The kernel -------------------------------------------------------------------------------

template <class Cfg, class Mask>
__global__ void __launch_bounds__(Cfg::kThreads, 1) bwd_kernel(const __grid_constant__ BwdParams p) {
  extern __shared__ uint8_t smem_raw[];
  const BwdSmem<Cfg> sm{(cuda::smem_u32(smem_raw) + Cfg::kSmemAlign - 1) & ~(Cfg::kSmemAlign - 1u)};
  // Key blocks in ascending order (the causal mask's longest first); the deterministic mode
  // takes them descending, the order of its dQ turns (store_dq_ordered).
  const int n_block = p.deterministic ? static_cast<int>(gridDim.x - 1 - blockIdx.x)
                                      : static_cast<int>(blockIdx.x);
  const int h_kv = blockIdx.y, seq_idx = blockIdx.z;  // the sequence (dense: the batch entry)
  const SeqRows sr = p.seq_rows(seq_idx);
  // Packed sequences: the grid covers the longest one; a CTA past its sequence's key rows returns
  // (all threads, before any barrier is set up). It has no query block to write to, so the
  // deterministic dQ turns (dq_turn) never count it. A block of seqused_k padding rows only goes
  // on with no query block and writes its zero dK, dV.
  if (n_block * Cfg::kBlockN >= sr.k_rows) return;
  // The query blocks that meet this key block, [m_begin, m_end) (src/common/mask.h); none for a
  // block of seqused_k padding only, which just writes its zero dK, dV.
  const bool used_keys = n_block * Cfg::kBlockN < sr.info.len_k;
  const IndexRange qb = used_keys ? query_blocks<Mask>(n_block, Cfg::kBlockN, Cfg::kBlockM, sr.info)
                                  : IndexRange{0, 0};
  const int m_begin = qb.empty() ? 0 : qb.begin, m_end = qb.empty() ? 0 : qb.end;
  const int n_iters = p.group * (m_end - m_begin);

  if (threadIdx.x == 0) {
    cuda::mbar_init(sm.kv_full(), 1);
    for (int s = 0; s < Cfg::kStages; ++s) {
      cuda::mbar_init(sm.q_full(s), 1);
      cuda::mbar_init(sm.q_empty(s), 128 * Cfg::kConsumerWGs);
    }
    cuda::fence_barrier_init();
  }
  __syncthreads();  // barriers initialized before anyone waits on or arrives at them

  cuda::split_warpgroups<Cfg::kProducerRegs, Cfg::kConsumerRegs>(
      [&] {
        if (threadIdx.x == 0 && n_iters > 0) {
          cuda::prefetch_tma_descriptors(&p.tma_q, &p.tma_k, &p.tma_v, &p.tma_do);
          bwd_producer<Cfg>(p, sm, n_block, h_kv, sr, seq_idx, m_begin, m_end);
        }
      },
      [&](int wg) {
        bwd_consumer<Cfg, Mask>(p, sm, wg, n_block, h_kv, sr, seq_idx, m_begin, m_end, n_iters);
      });
}

}  // namespace attnqat::sm90
