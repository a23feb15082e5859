// src/cuda/attention/sm90/fwd_mainloop.cuh — consumer_mainloop: what one consumer warpgroup
// (64 query rows) does over the key tiles, in the order of the reference (ascending keys).
//
// Per tile n (design note 2.4: Br = Bc = 128, ping-pong, no intra-warpgroup overlap):
//   wait S_n (issued in the previous critical section); release K[n]
//   apply_mask (tiles crossing Nk or the causal diagonal) -> online_softmax -> p~
//   convert_p -> P^ and P~ fragments; O, O' *= f (skipped when no row of the warp changed
//   its reference: then f = 1 exactly)
//   wait V[n] and K[n+1] full
//   -- critical section (ping-pong token) --
//   O += P^ V[n]; O' += P~ V[n]; wait; release V[n]; S_{n+1} = Q K[n+1]^T (not waited for)
//   -- pass the token --
// The QK^T of the last tile is issued too (on the other K stage, which holds K[n-1] or
// never-written shared memory and is not being loaded), and its result is dropped: a wgmma under
// a data-dependent branch, or a peeled last iteration, made ptxas serialize every wgmma (C7518,
// "WG.DP in divergent path") or spill (d = 128 with O'). Cost: one QK^T per CTA, 1/(3T) of the
// tensor work of attn_qat with T key tiles (4% at Nk = 1024, 1% at 4096).
// The two warpgroups' critical sections alternate (named barriers kBarSched + w, FA3's
// WarpSchedulerWG1/WG2): while one runs its GEMMs on the tensor cores, the other runs its
// softmax and P quantization. Token accounting, with T = n_tiles: each warpgroup has T + 1
// critical sections (the prologue's QK plus one per tile) and syncs on its own barrier before
// each. Warpgroup 1 arrives at warpgroup 0's barrier once at the start (warpgroup 0 goes first)
// and after each of its sections but the last; warpgroup 0 arrives at warpgroup 1's barrier
// after each of its sections. Both sides count T + 1, so nothing is left pending at exit.
//
// Register discipline (note 6, "wgmma ordering"): reg_fence() on every operand before
// wgmma_fence() (so the compiler finishes writing P and O first) and after wgmma_wait() (so it
// neither reads accumulators nor reuses P's registers before the wait).
#pragma once

#include "cuda/attention/sm90/fwd_epilogue.cuh"
#include "cuda/attention/sm90/fwd_gemm.cuh"
#include "cuda/attention/sm90/fwd_params.h"
#include "cuda/attention/sm90/fwd_smem.cuh"
#include "cuda/attention/sm90/fwd_softmax.cuh"
#include "cuda/attention/sm90/mask.cuh"
#include "cuda/attention/sm90/p_quant.cuh"
#include "cuda/attention/sm90/ptx.cuh"

namespace attnqat::sm90 {

// The per-thread state of a consumer warpgroup (fragments of its [64, .] tiles).
template <class Cfg>
struct ConsumerState {
  float s[Cfg::kAccS];                         // [64, kBlockN] fp32: S, then p~ in place
  uint32_t p_hat[Cfg::kSlabs][4];              // A fragments of P^ (bf16x2 / f16x2)
  uint32_t p_tilde[Cfg::kSlabs][4];            // A fragments of P~
  float o[Cfg::kAccO];                         // [64, d] fp32: O
  float o_hp[Cfg::kWithOHp ? Cfg::kAccO : 1];  // O', same layout
  RowState rows;
};

// Tile n of a consumer warpgroup (see the file header). last: no K[n+1] to wait for (the QK^T
// is issued anyway and dropped).
template <class Cfg, class Mask>
__device__ __forceinline__ void consumer_tile(const FwdParams& p, const SmemMap<Cfg>& sm,
                                              ConsumerState<Cfg>& cs, int wg, int n, bool last,
                                              int wg_end, int end0, int end1, uint32_t q_rows) {
  const int stage = n % Cfg::kStages;
  const int next = (n + 1) % Cfg::kStages;
  const uint32_t my_token = Cfg::kBarSched + wg, other_token = Cfg::kBarSched + (wg ^ 1);
  wgmma_wait<0>();  // S_n
  reg_fence(cs.s);
  mbar_arrive(sm.k_empty(stage));  // K[n] no longer read

  const int key0 = n * Cfg::kBlockN;
  if (wg_end < key0 + Cfg::kBlockN) apply_mask<Cfg::kBlockN>(cs.s, key0, end0, end1);
  float f[2];
  online_softmax<Cfg::kBlockN>(cs.s, cs.rows, p.c2, p.anchored, f);
  convert_p<Cfg::kF16, Cfg::kBlockN, Cfg::kTightRegs>(cs.s, p.quantize_p, p.pq, cs.p_hat,
                                                      cs.p_tilde);
  // Skip the rescale when no row of the warp changed its reference (f == 1 exactly: bit-identical).
  if (__any_sync(0xffffffffu, f[0] != 1.0f || f[1] != 1.0f)) {
    rescale_o<Cfg::kHeadDim>(cs.o, f);
    if constexpr (Cfg::kWithOHp) rescale_o<Cfg::kHeadDim>(cs.o_hp, f);
  }

  mbar_wait(sm.v_full(stage), (n / Cfg::kStages) & 1);
  if (!last) mbar_wait(sm.k_full(next), ((n + 1) / Cfg::kStages) & 1);
  named_bar_sync(my_token, Cfg::kSchedThreads);  // ---- critical section ----
  reg_fence(cs.o);
  reg_fence(cs.o_hp);
  reg_fence(cs.p_hat);
  reg_fence(cs.p_tilde);
  wgmma_fence();
  pv_gemm<Cfg>(cs.o, cs.p_hat, sm.v(stage));
  if constexpr (Cfg::kWithOHp) pv_gemm<Cfg>(cs.o_hp, cs.p_tilde, sm.v(stage));
  wgmma_commit();
  wgmma_wait<0>();
  reg_fence(cs.o);
  reg_fence(cs.o_hp);
  reg_fence(cs.p_hat);
  reg_fence(cs.p_tilde);
  mbar_arrive(sm.v_empty(stage));  // V[n] no longer read
  reg_fence(cs.s);
  wgmma_fence();
  qk_gemm<Cfg>(cs.s, q_rows, sm.k(next));  // S_{n+1}, waited for at the next tile (or dropped)
  wgmma_commit();
  if (!last || wg == 0) named_bar_arrive(other_token, Cfg::kSchedThreads);  // ---- end ----
}

// wg: 0 or 1, this consumer warpgroup; its rows are m_block * kBlockM + 64 wg + [0, 64).
template <class Cfg, class Mask>
__device__ __forceinline__ void consumer_mainloop(const FwdParams& p, const SmemMap<Cfg>& sm,
                                                  int wg, int m_block, int h, int b, int n_tiles) {
  const int warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
  const int wg_row0 = m_block * Cfg::kBlockM + 64 * wg;
  const int row0 = wg_row0 + 16 * warp + lane / 4;  // this thread's rows: row0, row0 + 8
  ConsumerState<Cfg> cs;
#pragma unroll
  for (int i = 0; i < Cfg::kAccO; ++i) cs.o[i] = 0.0f;
#pragma unroll
  for (int i = 0; i < (Cfg::kWithOHp ? Cfg::kAccO : 1); ++i) cs.o_hp[i] = 0.0f;
  cs.rows = row_state_init();
  if (n_tiles == 0) {  // no row of the CTA sees a key: O = 0, LSE = -inf (no barrier is used)
    store_o<Cfg>(p, cs.o, cs.o_hp, cs.rows, b, h, row0);
    return;
  }
  const int end0 = Mask::key_end(row0, p.seqlen_q, p.seqlen_k);
  const int end1 = Mask::key_end(row0 + 8, p.seqlen_q, p.seqlen_k);
  // The smallest key_end of the warpgroup (its first row): tiles reaching past it need the mask.
  const int wg_end = Mask::key_end(wg_row0, p.seqlen_q, p.seqlen_k);
  const uint32_t q_rows = sm.q() + wg * Cfg::kWgQRowsBytes;

  // Prologue: the first critical section issues S_0 = Q K[0]^T.
  if (wg == 1) named_bar_arrive(Cfg::kBarSched + 0, Cfg::kSchedThreads);  // wg 0 goes first
  mbar_wait(sm.q_full(), 0);
  mbar_wait(sm.k_full(0), 0);
  named_bar_sync(Cfg::kBarSched + wg, Cfg::kSchedThreads);
  reg_fence(cs.s);
  wgmma_fence();
  qk_gemm<Cfg>(cs.s, q_rows, sm.k(0));
  wgmma_commit();
  named_bar_arrive(Cfg::kBarSched + (wg ^ 1), Cfg::kSchedThreads);

  for (int n = 0; n < n_tiles; ++n)
    consumer_tile<Cfg, Mask>(p, sm, cs, wg, n, n + 1 == n_tiles, wg_end, end0, end1, q_rows);
  wgmma_wait<0>();  // the dropped QK^T: its registers must not be reused while it runs
  reg_fence(cs.s);
  store_o<Cfg>(p, cs.o, cs.o_hp, cs.rows, b, h, row0);
}

}  // namespace attnqat::sm90
