// src/cuda/attention/sm90/fwd_params.h — the forward kernel's parameters (one struct, passed by
// value as a __grid_constant__ kernel parameter so that the TMA descriptors inside it can be
// addressed by cp.async.bulk.tensor), and the constants of the P quantizer. Host and device.
#pragma once

#include <cuda.h>  // CUtensorMap (the type only: the encoder is reached through the runtime)

#include <cstdint>

#include "cuda/attention/sm90/attn_params.h"

namespace attnqat::sm90 {

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

// Shapes, c2 and the P quantization: AttnParams.
struct FwdParams : AttnParams {
  // q [B, Hq, Nq, d], k and v [B, Hkv, Nk, d]: 4-D maps (d, N, H, B), boxes of 64 columns by
  // kBlockM (q) or kBlockN (k, v) rows, 128-byte swizzle, out-of-bounds rows read as zeros.
  CUtensorMap tma_q;
  CUtensorMap tma_k;
  CUtensorMap tma_v;

  // Outputs: o, o_hp [B, Hq, Nq, d] in the input dtype (o_hp only when the config has
  // kWithOHp), both with the strides o_str; lse, m_ref, l [B, Hq, Nq] fp32 with the strides
  // stat_str (m_ref and l may be null: both or neither). The last dims are contiguous.
  RowStrides o_str, stat_str;
  void* o;
  void* o_hp;
  float* lse;
  float* m_ref;
  float* l;

  bool quantize_p;  // false in mode bf16: P = p~ rounded to the input dtype

  // Configs with kPacked only: the packed Q, K, V. kv_tma: only Q is decoded in the kernel; K and
  // V (already decoded, bf16/fp16) come through tma_k / tma_v as in the other configs.
  PackedOperand pk_q, pk_k, pk_v;
  bool kv_tma;
};

}  // namespace attnqat::sm90
