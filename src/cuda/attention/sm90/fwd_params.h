// src/cuda/attention/sm90/fwd_params.h — the forward kernel's parameters (one struct, passed by
// value as a __grid_constant__ kernel parameter so that the TMA descriptors inside it can be
// addressed by cp.async.bulk.tensor), and the constants of the P quantizer. Host and device.
#pragma once

#include <cuda.h>  // CUtensorMap (the type only: the encoder is reached through the runtime)

#include <cstdint>

#include "attnqat/formats.h"

namespace attnqat::sm90 {

// Constants of phi_nv(p~; g) for P (numerics section 4): g = 1 ("paper") or 2^-11 ("anchored").
// six_g = RN(6 g) and rcp_six_g = RN(1 / (6 g)) feed codec.cuh's nv_scale_quotient_fast; g is a
// power of two, so both are exact scalings of 6 and RN(1/6).
// two120_g = 2^120 g folds the E4M3 decode and the product with g into one multiply (p_quant.cuh).
struct PQuantConsts {
  float g;
  float six_g;
  float rcp_six_g;
  float two120_g;
};

__host__ __device__ inline PQuantConsts p_quant_consts(bool anchored) {
  constexpr float kTwo120 = 1.32922799578491587290e+36f;  // 2^120
  const float g = anchored ? kAnchoredPScale : 1.0f;
  return PQuantConsts{g, 6.0f * g, (1.0f / 6.0f) / g, kTwo120 * g};
}

// One packed NVFP4 operand (attention from packed tensors, fwd_packed.cuh): codes [B, H, N, d/2]
// and E4M3 scales [B, H, N, d/16] (uint8, each row contiguous), strides in bytes; g: the
// operand's global scale (one fp32 on the device).
struct PackedOperand {
  const uint8_t* data;
  const uint8_t* scales;
  const float* g;
  int64_t data_stride[3];   // b, h, n
  int64_t scale_stride[3];  // b, h, n
  int rows;                 // N
};

struct FwdParams {
  // q [B, Hq, Nq, d], k and v [B, Hkv, Nk, d]: 4-D maps (d, N, H, B), boxes of 64 columns by
  // kBlockM (q) or kBlockN (k, v) rows, 128-byte swizzle, out-of-bounds rows read as zeros.
  CUtensorMap tma_q;
  CUtensorMap tma_k;
  CUtensorMap tma_v;

  // Outputs, contiguous (validate() checks): o, o_hp [B, Hq, Nq, d] in the input dtype
  // (o_hp only when the config has kWithOHp); lse, m_ref, l [B, Hq, Nq] fp32 (m_ref and l may
  // be null: both or neither).
  void* o;
  void* o_hp;
  float* lse;
  float* m_ref;
  float* l;

  int heads_q;
  int group;        // Hq / Hkv: query head h reads key/value head h / group
  int seqlen_q;     // Nq
  int seqlen_k;     // Nk
  float c2;         // RN(c * RN(log2 e)): S2 = c2 * (q . k), log2 units
  bool quantize_p;  // false in mode bf16: P = p~ rounded to the input dtype
  bool anchored;    // p_quant: m_ref = ceil(m) and g = 2^-11 (else m_ref = m, g = 1)
  PQuantConsts pq;

  // Configs with kPacked only: the packed Q, K, V. kv_tma: only Q is decoded in the kernel; K and
  // V (already decoded, bf16/fp16) come through tma_k / tma_v as in the other configs.
  PackedOperand pk_q, pk_k, pk_v;
  bool kv_tma;
};

}  // namespace attnqat::sm90
