// src/cuda/attention/sm90/attn_params.h — what the forward and the backward kernels share of one
// call (FwdParams and BwdParams derive from it): head counts, sequence lengths (dense or packed
// sequences), the softmax scale in log2 units and the P quantization. Host and device.
//
// Dense: q [B, Hq, Nq, d], k, v [B, Hkv, Nk, d]; grid z = B and every sequence has Nq queries
// and Nk keys. Packed sequences (varlen): the tensors are [1, H, total, d] views of
// [total, H, d] and cu_seqlens_q/k (int32 [S + 1], prefix sums) say that sequence s owns rows
// [cu[s], cu[s + 1]); grid z = S, seqlen_q/k are the longest sequences (the grid's extent), and
// a CTA past its sequence's end returns at once. Either way a CTA asks seq_rows(blockIdx.z)
// where its rows are. seqused_k (packed only, optional, int32 [S]): sequence s uses only the
// first seqused_k[s] keys of its rows; its other key rows (to the range's end) are padding,
// seen by no query, whose dK, dV the backward writes as 0.
//
// Head dims: the kernels are built for tiles of 64 and 128 columns (kernel_tile_head_dim). A
// head dim d < tile (a multiple of 16) runs in the next wider tile: the tensor maps have d
// columns, so TMA fills the columns [d, tile) of every Q, K, V (and dO) tile with zeros, which
// add nothing to Q K^T, dP or the row sums; the accumulator columns from d on are not stored
// (head_dim), and the backward's dQ pieces cover the tile (bwd_params.h).
#pragma once

#include <cmath>
#include <cstdint>
#include <string>

#include "attnqat/attnqat.h"
#include "common/mask.h"
#include "cuda/common/p_quant.cuh"

namespace attnqat::sm90 {

struct SeqRows;

constexpr float kLog2e = 1.44269504088896340736f;  // RN(log2 e)

// Logit soft-capping and attention sinks (numerics 9.9, 9.10): runtime values of every kernel
// (no template argument; a call without them leaves the defaults and runs the same code with
// two uniform branches not taken).
//  - cap_a = RN(c / softcap), 0 without a cap. With a cap, the kernels replace each raw score s
//    (fp32 dot product) by t = tanh(RN(cap_a * s)) before the mask (masked keys stay -inf, never
//    -softcap), and AttnParams::c2 holds b = RN(softcap * RN(log2 e)) instead of
//    RN(c * RN(log2 e)): every later step forms S2 = RN(c2 * t) exactly as it forms RN(c2 * s)
//    without a cap (b > 0, so the row max of S2 is still c2 times the row max of t).
//  - sinks: one natural-log logit per query head, fp32 on the device at sinks[h * sinks_stride];
//    nullptr: no sinks. The forward starts each row's state at the sink (sm90/fwd_softmax.cuh);
//    the backward's preprocess computes dsinks (bwd_aux.cu).
struct SoftcapSinks {
  float cap_a = 0.0f;
  const float* sinks = nullptr;
  int64_t sinks_stride = 0;

  __host__ __device__ bool capped() const { return cap_a != 0.0f; }
  // Head h's sink in log2 units, z2 = RN(z_h * RN(log2 e)); -inf when the call has no sinks or
  // the head's sink is -inf (no sink). NaN or +inf (which the CPU validation refuses and the
  // device's is not read for) come out NaN / +inf and poison the head's rows, never ignored.
  __device__ __forceinline__ float sink2(int h) const {
    return sinks == nullptr ? -INFINITY : __fmul_rn(sinks[h * sinks_stride], kLog2e);
  }
};

// The tile head dim that runs head dim d (see the file header): 64 for d <= 64, 128 for
// 64 < d <= 128, 0 where no kernel does (d not a positive multiple of 16, or above 128).
constexpr int kernel_tile_head_dim(int64_t d) {
  return d <= 0 || d % 16 != 0 || d > 128 ? 0 : d <= 64 ? 64 : 128;
}

struct AttnParams {
  int heads_q;
  int heads_kv;
  int group;               // Hq / Hkv: query head h reads key/value head h / group
  int seqlen_q;            // Nq
  int seqlen_k;            // Nk
  int head_dim;            // d of the tensors; the kernel's tile (Cfg::kHeadDim) may be wider
  int window_left;         // LocalMask's window (-1: unbounded side; src/common/mask.h)
  int window_right;
  float c2;                // RN(c * RN(log2 e)): S2 = c2 * (q . k), log2 units (softcap: b)
  SoftcapSinks extras;     // softcap and sinks (above); the launchers set it after attn_params()
  PQuant p_quant;          // anchored: m_ref = ceil(m), g = 2^-11; paper: m_ref = m, g = 1
  cuda::PQuantConsts pq;   // the constants of phi_nv(.; g) for p_quant
  const int* cu_seqlens_q;  // packed sequences: [S + 1] row offsets (device); nullptr: dense
  const int* cu_seqlens_k;
  const int* seqused_k;     // packed sequences: [S] used keys per sequence (device); nullptr: all
  int total_q, total_k;     // rows of the tensors (dense: Nq, Nk)

  // The sequence as the mask policy sees it (src/common/mask.h).
  __host__ __device__ SeqInfo seq() const {
    return SeqInfo{seqlen_q, seqlen_k, window_left, window_right};
  }
  // Where sequence s's rows are (see the file header).
  __device__ __forceinline__ SeqRows seq_rows(int s) const;
};

// One sequence of a call: the batch coordinate of its rows in the tensor maps and output
// strides, the row of its first query and key there, and its lengths and window.
struct SeqRows {
  int b;       // batch coordinate (dense: the sequence; packed: 0)
  int q0, k0;  // first query row, first key row (dense: 0)
  SeqInfo info;
  int k_rows;  // key rows of the sequence in the tensors: info.len_k used + padding (seqused_k)
};

// Sequence s's rows [cu[s], cu[s + 1]), clamped to [0, total) and to max_len rows: offsets that
// break the contract (attnqat.h) give wrong rows, never a read or write outside the tensors.
__device__ __forceinline__ IndexRange seq_span(const int* cu, int s, int total, int max_len) {
  const int begin = min(max(cu[s], 0), total);
  return IndexRange{begin, begin + min(max(cu[s + 1] - begin, 0), min(total - begin, max_len))};
}

__device__ __forceinline__ SeqRows AttnParams::seq_rows(int s) const {
  if (cu_seqlens_q == nullptr) return SeqRows{s, 0, 0, seq(), seqlen_k};
  const IndexRange q = seq_span(cu_seqlens_q, s, total_q, seqlen_q);
  const IndexRange k = seq_span(cu_seqlens_k, s, total_k, seqlen_k);
  const int k_rows = k.end - k.begin;
  const int used = seqused_k == nullptr ? k_rows : min(max(seqused_k[s], 0), k_rows);
  return SeqRows{0, q.begin, k.begin, SeqInfo{q.end - q.begin, used, window_left, window_right},
                 k_rows};
}

// Element strides of a [B, H, N, ...] output over batch, head and row (the last dim contiguous).
struct RowStrides {
  int64_t b, h, n;
  __host__ __device__ int64_t at(int batch, int head, int64_t row) const {
    return batch * b + head * h + row * n;
  }
};
inline RowStrides row_strides(const TensorView& t) {
  return RowStrides{t.stride[0], t.stride[1], t.stride[2]};
}

// Packed sequences as the launchers take them (the file header); cu_seqlens_q == nullptr: dense.
struct VarlenArgs {
  const int* cu_seqlens_q = nullptr;  // device, int32 [num_seqs + 1]
  const int* cu_seqlens_k = nullptr;
  const int* seqused_k = nullptr;  // device, int32 [num_seqs], optional
  int num_seqs = 0;
  int max_seqlen_q = 0;  // host bounds on the lengths (the grid's extent)
  int max_seqlen_k = 0;
  bool packed() const { return cu_seqlens_q != nullptr; }
};

// The grid's batch extent: the sequences.
inline int64_t num_sequences(const TensorView& q, const VarlenArgs& v) {
  return v.packed() ? v.num_seqs : q.shape[0];
}

// From the logical q [B, Hq, Nq, d] and k [B, Hkv, Nk, d] (the launchers check the ranges), the
// call's window (attention_seq, common/validate.h; only LocalMask reads it) and packed sequences.
inline AttnParams attn_params(const TensorView& q, const TensorView& k, float c2, PQuant p_quant,
                              SeqInfo window, const VarlenArgs& varlen) {
  AttnParams a;
  a.heads_q = static_cast<int>(q.shape[1]);
  a.heads_kv = static_cast<int>(k.shape[1]);
  a.group = static_cast<int>(q.shape[1] / k.shape[1]);
  a.seqlen_q = static_cast<int>(q.shape[2]);
  a.seqlen_k = static_cast<int>(k.shape[2]);
  a.head_dim = static_cast<int>(q.shape[3]);
  a.total_q = a.seqlen_q;
  a.total_k = a.seqlen_k;
  a.window_left = window.window_left;
  a.window_right = window.window_right;
  a.c2 = c2;
  a.p_quant = p_quant;
  a.pq = cuda::p_quant_consts(p_quant);
  a.cu_seqlens_q = varlen.cu_seqlens_q;
  a.cu_seqlens_k = varlen.cu_seqlens_k;
  a.seqused_k = varlen.seqused_k;
  if (varlen.packed()) {
    a.seqlen_q = varlen.max_seqlen_q;
    a.seqlen_k = varlen.max_seqlen_k;
  }
  return a;
}

// The limits a launch's grid puts on a call: `heads` (grid y: query heads in the forward, KV
// heads in the backward) and the batch (grid z) at most 65535, both sequence lengths at most
// max_seq (seq_text says it in the message).
inline Status check_grid_limits(const char* op, const char* heads_name, int64_t heads,
                                int64_t max_seq, const char* seq_text, const TensorView& q,
                                const TensorView& k) {
  constexpr int64_t kMaxGridYZ = 65535;
  if (heads <= kMaxGridYZ && q.shape[0] <= kMaxGridYZ && q.shape[2] <= max_seq &&
      k.shape[2] <= max_seq)
    return Status::Ok();
  return Status::NotImplemented(std::string(op) + ": the sm90 kernel supports up to 65535 " +
                                heads_name + " and batches and sequences " + seq_text + ", got q " +
                                q.shape_str() + ", k " + k.shape_str());
}

}  // namespace attnqat::sm90
