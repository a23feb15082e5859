// src/cuda/attention/sm90/bwd_params.h — the backward kernels' parameters and the layouts of
// their scratch buffers. Host and device.
//
// Scratch (one stream-ordered workspace per call, src/cuda/attention/api.cu):
//   stats     float4 [B, Hq, Nq_pad]  per query row {-lse2, delta, -m_ref, 1/l} (bwd_aux.cu):
//             lse2 = LSE / ln 2 (log2 units), delta = D_i = rowsum(dO * O') or rowsum(dO * O),
//             m_ref and l the anchored P_F's forward statistics. Rows without keys and padding
//             rows (i >= Nq) hold {-inf, 0, -inf, 0}: every P of theirs is exp2(-inf) = 0
//             (a row without keys but with a sink, numerics 9.10, holds its finite statistics;
//             the mask keeps its P = 0).
//             Nq_pad = m_blocks * 64 (the kernel reads whole 64-row blocks with one bulk copy).
//   dq_accum  fp32 [B, Hq, m_blocks, d / 64, 4096]: one [64 rows, 64 columns] piece per query
//             block and column chunk, in the consumer's *fragment order*: element (r, c) of a
//             piece is register i = 4 (c / 8) + 2 ((r % 16) / 8) + c % 2 of thread
//             T = 32 (r / 16) + 4 (r % 8) + (c % 8) / 2, stored at float index
//             (i / 2 * 128 + T) * 2 + i % 2. A warp's stores are then 256 contiguous bytes (no
//             shared-memory bank conflicts in the staging tile, coalesced in global memory);
//             bwd_postprocess undoes the permutation. Zeroed before the kernel.
//   dq_sem    int [B, Hq, m_blocks, d / 64]: deterministic mode only, zeroed: how many writers
//             have added their partial to the piece (bwd_kernel.cuh, store_dq_ordered).
#pragma once

#include <cuda.h>  // CUtensorMap

#include <cstdint>

#include "cuda/attention/sm90/attn_params.h"

namespace attnqat::sm90 {

// Shapes, c2 and the P quantization: AttnParams.
struct BwdParams : AttnParams {
  // q, dout [B, Hq, Nq, d]: boxes of 64 columns x 64 rows; k, v [B, Hkv, Nk, d]: 64 x 128 rows;
  // 128-byte swizzle, out-of-bounds rows read as zeros (tma_host.h).
  CUtensorMap tma_q;
  CUtensorMap tma_k;
  CUtensorMap tma_v;
  CUtensorMap tma_do;

  const float4* stats;  // see above
  float* dq_accum;
  int* dq_sem;
  void* dk;  // [B, Hkv, Nk, d], input dtype, strides dkv_str (both), the last dim contiguous
  void* dv;
  RowStrides dkv_str;

  int m_blocks;  // ceil(Nq / 64) (packed sequences: of the longest)
  float scale;   // c: dK = c * dS^T Q (dQ's c is applied by the postprocess)
  bool quant_p;        // dV uses P_F (quantized) instead of P: phi_nv(exp2(S2 - m_ref); 2^-11) / l
                       // (anchored) or phi_nv(P; 1) (paper)
  bool deterministic;  // dQ by ordered read-add-write instead of bulk reduce-add
};

}  // namespace attnqat::sm90
