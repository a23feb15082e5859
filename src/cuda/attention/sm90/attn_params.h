// src/cuda/attention/sm90/attn_params.h — what the forward and the backward kernels share of one
// call (FwdParams and BwdParams derive from it): head counts, sequence lengths, the softmax scale
// in log2 units and the P quantization. Host and device.
#pragma once

#include <cstdint>
#include <string>

#include "attnqat/attnqat.h"
#include "common/mask.h"
#include "cuda/common/p_quant.cuh"

namespace attnqat::sm90 {

struct AttnParams {
  int heads_q;
  int heads_kv;
  int group;               // Hq / Hkv: query head h reads key/value head h / group
  int seqlen_q;            // Nq
  int seqlen_k;            // Nk
  int window_left;         // LocalMask's window (-1: unbounded side; src/common/mask.h)
  int window_right;
  float c2;                // RN(c * RN(log2 e)): S2 = c2 * (q . k), log2 units
  PQuant p_quant;          // anchored: m_ref = ceil(m), g = 2^-11; paper: m_ref = m, g = 1
  cuda::PQuantConsts pq;   // the constants of phi_nv(.; g) for p_quant

  // The sequence as the mask policy sees it (src/common/mask.h).
  __host__ __device__ SeqInfo seq() const {
    return SeqInfo{seqlen_q, seqlen_k, window_left, window_right};
  }
};

// From the logical q [B, Hq, Nq, d] and k [B, Hkv, Nk, d] (the launchers check the ranges) and
// the call's window (attention_seq, common/validate.h; only LocalMask reads it).
inline AttnParams attn_params(const TensorView& q, const TensorView& k, float c2, PQuant p_quant,
                              SeqInfo window) {
  AttnParams a;
  a.heads_q = static_cast<int>(q.shape[1]);
  a.heads_kv = static_cast<int>(k.shape[1]);
  a.group = static_cast<int>(q.shape[1] / k.shape[1]);
  a.seqlen_q = static_cast<int>(q.shape[2]);
  a.seqlen_k = static_cast<int>(k.shape[2]);
  a.window_left = window.window_left;
  a.window_right = window.window_right;
  a.c2 = c2;
  a.p_quant = p_quant;
  a.pq = cuda::p_quant_consts(p_quant);
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
