// src/cuda/attention/sm90/fwd_mainloop.cuh — what one consumer warpgroup (64 query rows) does
// over the key tiles, in the order of the reference (ascending keys): consumer_mainloop (configs
// with O', below) and consumer_mainloop_overlap (configs without O', at the end of the file).
//
// Per tile n (docs/hopper.md, section 2: Br = Bc = 128, ping-pong, no intra-warpgroup overlap):
//   wait S_n (issued in the previous critical section); release K[n]
//   [softcap: cap_scores] -> apply_mask (tiles crossing Nk or the causal diagonal) ->
//   online_softmax -> p~
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
// Register discipline (docs/hopper.md, section 4): reg_fence() on every operand before
// wgmma_fence() (so the compiler finishes writing P and O first) and after wgmma_wait() (so it
// neither reads accumulators nor reuses P's registers before the wait).
#pragma once

#include "cuda/attention/sm90/fwd_epilogue.cuh"
#include "cuda/attention/sm90/fwd_gemm.cuh"
#include "cuda/attention/sm90/fwd_params.h"
#include "cuda/attention/sm90/fwd_smem.cuh"
#include "cuda/attention/sm90/fwd_softmax.cuh"
#include "cuda/attention/sm90/fragment.cuh"
#include "cuda/attention/sm90/softcap.cuh"
#include "common/mask.h"
#include "cuda/common/p_quant.cuh"
#include "cuda/common/ptx.cuh"
#include "cuda/common/ptx_sm90.cuh"

namespace attnqat::sm90 {

// The ping-pong token (named barriers kBarSched + w; see below).
template <class Cfg>
__device__ __forceinline__ void sched_sync(uint32_t id) {
  cuda::named_bar_sync(id, Cfg::kSchedThreads);
}
template <class Cfg>
__device__ __forceinline__ void sched_arrive(uint32_t id) {
  cuda::named_bar_arrive(id, Cfg::kSchedThreads);
}

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

// What a consumer thread knows of the mask: the key ranges of its two rows, and the range that
// every row of its warpgroup sees (a tile inside it needs no element masking).
struct RowKeys {
  IndexRange row0, row1, all;
};

// The start of both mainloops: zeroed accumulators and row state, this thread's first row (the
// other is row + 8), its key ranges, and the warpgroup's 64 rows of the Q tile (q_rows). When the
// CTA visits no key tile (n_tiles = 0: no row sees a key) it also stores O = 0, LSE = -inf (or
// the sink's, numerics 9.10), and the caller returns (no barrier is used).
struct ConsumerStart {
  int row;
  RowKeys keys;
  uint32_t q_rows;
};

template <class Cfg, class Mask>
__device__ __forceinline__ ConsumerStart consumer_start(const FwdParams& p, const SmemMap<Cfg>& sm,
                                                        ConsumerState<Cfg>& cs, int wg, int m_block,
                                                        int h, const SeqRows& sr, int n_tiles) {
  const int warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
  const int wg_row0 = m_block * Cfg::kBlockM + 64 * wg;
  const int row = wg_row0 + 16 * warp + lane / 4;
#pragma unroll
  for (int i = 0; i < Cfg::kAccO; ++i) cs.o[i] = 0.0f;
#pragma unroll
  for (int i = 0; i < (Cfg::kWithOHp ? Cfg::kAccO : 1); ++i) cs.o_hp[i] = 0.0f;
  cs.rows = row_state_init(p.extras.sink2(h), p.p_quant);  // sinks: the sink's state
  if (n_tiles == 0) store_o<Cfg, Mask>(p, cs.o, cs.o_hp, cs.rows, sr, h, row);
  const SeqInfo seq = sr.info;
  const int wg_last = min(wg_row0 + 63, seq.len_q - 1);
  const RowKeys keys{Mask::keys(row, seq), Mask::keys(row + 8, seq),
                     keys_seen_by_rows<Mask>(wg_row0, wg_last, seq)};
  // redux.sync puts the (warp-uniform) warpgroup index into a uniform register, so that the
  // compiler keeps the Q descriptors there too (otherwise: an R2UR pair per wgmma).
  const uint32_t q_rows =
      sm.q() + static_cast<uint32_t>(__reduce_max_sync(0xffffffffu, static_cast<unsigned>(wg))) *
                   Cfg::kWgQRowsBytes;
  return ConsumerStart{row, keys, q_rows};
}

// Tile n of a consumer warpgroup (see the file header). last: no K[n+1] to wait for (the QK^T
// is issued anyway and dropped).
template <class Cfg, class Mask>
__device__ __forceinline__ void consumer_tile(const FwdParams& p, const SmemMap<Cfg>& sm,
                                              ConsumerState<Cfg>& cs, int wg, int n, bool last,
                                              int n_begin, const RowKeys& keys, uint32_t q_rows) {
  const int stage = n % Cfg::kStages;
  const int next = (n + 1) % Cfg::kStages;
  const uint32_t my_token = Cfg::kBarSched + wg, other_token = Cfg::kBarSched + (wg ^ 1);
  cuda::wgmma_wait<0>();  // S_n
  cuda::reg_fence(cs.s);
  cuda::mbar_arrive(sm.k_empty(stage));  // K[n] no longer read

  const int key0 = (n_begin + n) * Cfg::kBlockN;
  if (p.extras.capped()) cap_scores<Cfg::kBlockN>(cs.s, p.extras.cap_a);  // softcap: t, before the mask
  if (keys_need_mask(key0, Cfg::kBlockN, keys.all)) apply_mask<Cfg::kBlockN>(cs.s, key0, keys.row0, keys.row1);
  float f[2];
  online_softmax<Cfg::kBlockN>(cs.s, cs.rows, p.c2, p.p_quant, f);
  cuda::convert_p<Cfg::kF16, Cfg::kBlockN, Cfg::kTightRegs>(cs.s, p.quantize_p, p.pq,
                                                      sm.p_scale_table(), cs.p_hat, cs.p_tilde);
  // Skip the rescale when no row of the warp changed its reference (f == 1 exactly: bit-identical).
  if (__any_sync(0xffffffffu, f[0] != 1.0f || f[1] != 1.0f)) {
    rescale_o<Cfg::kHeadDim>(cs.o, f);
    if constexpr (Cfg::kWithOHp) rescale_o<Cfg::kHeadDim>(cs.o_hp, f);
  }

  cuda::mbar_wait(sm.v_full(stage), (n / Cfg::kStages) & 1);
  if (!last) cuda::mbar_wait(sm.k_full(next), ((n + 1) / Cfg::kStages) & 1);
  sched_sync<Cfg>(my_token);  // ---- critical section ----
  cuda::reg_fence(cs.o);
  cuda::reg_fence(cs.o_hp);
  cuda::reg_fence(cs.p_hat);
  cuda::reg_fence(cs.p_tilde);
  cuda::wgmma_fence();
  pv_gemm<Cfg>(cs.o, cs.p_hat, sm.v(stage));
  if constexpr (Cfg::kWithOHp) pv_gemm<Cfg>(cs.o_hp, cs.p_tilde, sm.v(stage));
  cuda::wgmma_commit();
  cuda::wgmma_wait<0>();
  cuda::reg_fence(cs.o);
  cuda::reg_fence(cs.o_hp);
  cuda::reg_fence(cs.p_hat);
  cuda::reg_fence(cs.p_tilde);
  cuda::mbar_arrive(sm.v_empty(stage));  // V[n] no longer read
  cuda::reg_fence(cs.s);
  cuda::wgmma_fence();
  qk_gemm<Cfg>(cs.s, q_rows, sm.k(next));  // S_{n+1}, waited for at the next tile (or dropped)
  cuda::wgmma_commit();
  if (!last || wg == 0) sched_arrive<Cfg>(other_token);  // ---- end ----
}

// wg: 0 or 1, this consumer warpgroup; its rows are m_block * kBlockM + 64 wg + [0, 64).
template <class Cfg, class Mask>
__device__ __forceinline__ void consumer_mainloop(const FwdParams& p, const SmemMap<Cfg>& sm,
                                                  int wg, int m_block, int h, const SeqRows& sr,
                                                  int n_begin, int n_tiles) {
  ConsumerState<Cfg> cs;
  const ConsumerStart start = consumer_start<Cfg, Mask>(p, sm, cs, wg, m_block, h, sr, n_tiles);
  if (n_tiles == 0) return;
  const uint32_t q_rows = start.q_rows;

  // Prologue: the first critical section issues S_0 = Q K[0]^T.
  if (wg == 1) sched_arrive<Cfg>(Cfg::kBarSched + 0);  // wg 0 goes first
  cuda::mbar_wait(sm.q_full(), 0);
  cuda::mbar_wait(sm.k_full(0), 0);
  sched_sync<Cfg>(Cfg::kBarSched + wg);
  cuda::reg_fence(cs.s);
  cuda::wgmma_fence();
  qk_gemm<Cfg>(cs.s, q_rows, sm.k(0));
  cuda::wgmma_commit();
  sched_arrive<Cfg>(Cfg::kBarSched + (wg ^ 1));

  for (int n = 0; n < n_tiles; ++n)
    consumer_tile<Cfg, Mask>(p, sm, cs, wg, n, n + 1 == n_tiles, n_begin, start.keys, q_rows);
  cuda::wgmma_wait<0>();  // the dropped QK^T: its registers must not be reused while it runs
  cuda::reg_fence(cs.s);
  store_o<Cfg, Mask>(p, cs.o, cs.o_hp, cs.rows, sr, h, start.row);
}

// ---- Intra-warpgroup overlap (configs without O': fp4, bf16) ---------------------------------
// FlashAttention-3's fwd_step (docs/hopper.md, section 2) in ascending key order. Per tile n >= 1 of a
// consumer warpgroup:
//   wait K[n] and V[n-1] full
//   -- critical section (ping-pong token) --
//   S_n = Q K[n]^T (commit group 1); O += P_{n-1} V[n-1] (commit group 2)
//   -- pass the token --
//   wait_group 1: S_n done (PV still running); release K[n]
//   apply_mask -> online_softmax on S_n                   <- overlaps this warpgroup's own PV
//   wait_group 0: PV done; release V[n-1]
//   convert_p -> P_n (into P_{n-1}'s registers, free now); O *= f_n (skipped when f == 1)
// Prologue: S_0 and its softmax/conversion; epilogue: the last PV alone. Every wgmma sits in
// straight-line code (the loop body always issues both GEMMs), so ptxas never sees a wgmma under
// a data-dependent branch, and no QK^T is issued for nothing. Tensor work per critical section
// is the same as without overlap (QK + PV), but a warpgroup now waits only for its QK^T before
// its softmax, not for QK^T and PV: its instruction stream (issue-bound for fp4, docs/hopper.md, section 7) runs
// alongside the other warpgroup's for longer. Registers: S (Bc/2) + P (Bc/4) + O (d/2) live
// during the PV: 64 + 32 + 64 at d = 128 (docs/hopper.md, section 3: fits 240; would not with O').
// Token accounting as in consumer_mainloop: T + 1 critical sections per warpgroup (prologue,
// T - 1 loop steps, epilogue); warpgroup 1 arrives once at the start and after every section but
// the last, warpgroup 0 after every section.

// softmax of key block n on S (masked if the block is not inside every row's range), p~ in
// place; f: rescale factors.
template <class Cfg, class Mask>
__device__ __forceinline__ void overlap_softmax(const FwdParams& p, ConsumerState<Cfg>& cs, int n,
                                                const RowKeys& keys, float (&f)[2]) {
  const int key0 = n * Cfg::kBlockN;
  if (p.extras.capped()) cap_scores<Cfg::kBlockN>(cs.s, p.extras.cap_a);  // softcap: t, before the mask
  if (keys_need_mask(key0, Cfg::kBlockN, keys.all)) apply_mask<Cfg::kBlockN>(cs.s, key0, keys.row0, keys.row1);
  online_softmax<Cfg::kBlockN>(cs.s, cs.rows, p.c2, p.p_quant, f);
}

template <class Cfg, class Mask>
__device__ __forceinline__ void consumer_mainloop_overlap(const FwdParams& p,
                                                          const SmemMap<Cfg>& sm, int wg,
                                                          int m_block, int h, const SeqRows& sr,
                                                          int n_begin, int n_tiles) {
  static_assert(!Cfg::kWithOHp, "the overlapped mainloop has no O' (registers, docs/hopper.md, section 3)");
  ConsumerState<Cfg> cs;
  const ConsumerStart start = consumer_start<Cfg, Mask>(p, sm, cs, wg, m_block, h, sr, n_tiles);
  if (n_tiles == 0) return;
  const uint32_t q_rows = start.q_rows;
  const uint32_t my_token = Cfg::kBarSched + wg, other_token = Cfg::kBarSched + (wg ^ 1);
  const uint32_t table = sm.p_scale_table();
  float f[2];

  // Prologue: S_0, its softmax and P_0 (O is still zero: no rescale).
  if (wg == 1) sched_arrive<Cfg>(Cfg::kBarSched + 0);  // wg 0 goes first
  cuda::mbar_wait(sm.q_full(), 0);
  cuda::mbar_wait(sm.k_full(0), 0);
  sched_sync<Cfg>(my_token);
  cuda::reg_fence(cs.s);
  cuda::wgmma_fence();
  qk_gemm<Cfg>(cs.s, q_rows, sm.k(0));
  cuda::wgmma_commit();
  sched_arrive<Cfg>(other_token);
  cuda::wgmma_wait<0>();
  cuda::reg_fence(cs.s);
  cuda::mbar_arrive(sm.k_empty(0));
  overlap_softmax<Cfg, Mask>(p, cs, n_begin, start.keys, f);
  cuda::convert_p<Cfg::kF16, Cfg::kBlockN, Cfg::kTightRegs>(cs.s, p.quantize_p, p.pq, table, cs.p_hat,
                                                      cs.p_tilde);

  for (int n = 1; n < n_tiles; ++n) {
    const int stage = n % Cfg::kStages, prev = (n - 1) % Cfg::kStages;
    cuda::mbar_wait(sm.k_full(stage), (n / Cfg::kStages) & 1);
    cuda::mbar_wait(sm.v_full(prev), ((n - 1) / Cfg::kStages) & 1);
    sched_sync<Cfg>(my_token);  // ---- critical section ----
    cuda::reg_fence(cs.s);
    cuda::reg_fence(cs.o);
    cuda::reg_fence(cs.p_hat);
    cuda::wgmma_fence();
    qk_gemm<Cfg>(cs.s, q_rows, sm.k(stage));  // S_n
    cuda::wgmma_commit();
    pv_gemm<Cfg>(cs.o, cs.p_hat, sm.v(prev));  // O += P_{n-1} V[n-1]
    cuda::wgmma_commit();
    sched_arrive<Cfg>(other_token);  // ---- end ----
    cuda::wgmma_wait<1>();  // S_n
    cuda::reg_fence(cs.s);
    cuda::mbar_arrive(sm.k_empty(stage));  // K[n] no longer read
    // ptxas schedules a wgmma wait as early as its basic block allows, which would put the wait
    // below before the softmax (and nothing would overlap the PV). The softmax therefore sits in
    // a block of its own: a branch that is always taken (tile n holds keys < Nk, or it would not
    // be visited) and that the compiler cannot remove. (A conditional wait instead made ptxas
    // serialize every wgmma: a DEPBAR after each one.)
    f[0] = f[1] = 1.0f;
    if ((n_begin + n) * Cfg::kBlockN < sr.info.len_k)
      overlap_softmax<Cfg, Mask>(p, cs, n_begin + n, start.keys, f);
    cuda::reg_fence(cs.s);
    cuda::reg_fence(f);
    cuda::wgmma_wait<0>();  // PV_{n-1}
    cuda::reg_fence(cs.o);
    cuda::reg_fence(cs.p_hat);
    cuda::mbar_arrive(sm.v_empty(prev));  // V[n-1] no longer read
    // P_n only after the wait: ptxas does not keep the register-A operand of an in-flight wgmma
    // alive (building P_n into fresh registers before the wait, tried, was coalesced into
    // P_{n-1}'s registers: writes under a running PV, with no diagnostic).
    cuda::convert_p<Cfg::kF16, Cfg::kBlockN, Cfg::kTightRegs>(cs.s, p.quantize_p, p.pq, table,
                                                        cs.p_hat, cs.p_tilde);
    // Skip the rescale when no row of the warp changed its reference (f == 1: bit-identical).
    if (__any_sync(0xffffffffu, f[0] != 1.0f || f[1] != 1.0f)) rescale_o<Cfg::kHeadDim>(cs.o, f);
  }

  // Epilogue: O += P_{T-1} V[T-1].
  const int last = (n_tiles - 1) % Cfg::kStages;
  cuda::mbar_wait(sm.v_full(last), ((n_tiles - 1) / Cfg::kStages) & 1);
  sched_sync<Cfg>(my_token);
  cuda::reg_fence(cs.o);
  cuda::reg_fence(cs.p_hat);
  cuda::wgmma_fence();
  pv_gemm<Cfg>(cs.o, cs.p_hat, sm.v(last));
  cuda::wgmma_commit();
  if (wg == 0) sched_arrive<Cfg>(other_token);
  cuda::wgmma_wait<0>();
  cuda::reg_fence(cs.o);
  cuda::reg_fence(cs.p_hat);
  cuda::mbar_arrive(sm.v_empty(last));
  store_o<Cfg, Mask>(p, cs.o, cs.o_hp, cs.rows, sr, h, start.row);
}

}  // namespace attnqat::sm90
