// src/cuda/decode/params.h — parameters of the FP4 decode kernels (decode_kernel.cuh) and the
// append kernel (append.cu). Host and device. Layouts: include/attnqat/attnqat.h (PagedKVCache).
#pragma once

#include <cstdint>

#include "attnqat/attnqat.h"  // PQuant

namespace attnqat::decode {

// The paged cache as the kernels address it: K and V codes [num_pages, Hkv, page_size, D/2] and
// E4M3 scales [.., D/16], contiguous; page_table int32 [B, pages_per_seq] (strides in elements).
// Byte: const uint8_t where the cache is read (decode), uint8_t where it is written (append).
template <class Byte>
struct PagedCacheRef {
  Byte* k_data;
  Byte* k_scales;
  Byte* v_data;
  Byte* v_scales;
  const int32_t* page_table;
  int64_t pt_stride_b, pt_stride_p;
  int pages_per_seq;
  int num_pages;
};

struct DecodeParams : PagedCacheRef<const uint8_t> {
  // q [B, Hq, nq, D] (bf16 or fp16), strides in elements (last one 1).
  const void* q;
  int64_t q_stride_b, q_stride_h, q_stride_i;
  // seq_lens int32 [B] (stride in elements).
  const int32_t* seq_lens;
  int64_t lens_stride;
  int heads_kv;
  int page_size;
  int page_shift;  // log2(page_size) when it is a power of two, else -1
  int group;       // Hq / Hkv
  int nq;          // query tokens per sequence
  int rows;        // group * nq: query rows that share one KV head
  int row_groups;  // ceil(rows / kRows)
  int head_dim;    // D: 64 or 128
  int num_splits;  // CTAs along the keys of one (sequence, KV head, row group)
  int split_keys;  // keys per split, a multiple of kCtaStepKeys
  float c2;        // RN(c * RN(log2 e))
  PQuant p_quant;  // paper (m_ref = m, g = 1, one split) or anchored
  // Sliding window (DecodeOptions::window_left): -1 none; >= 0: query token i also needs
  // j >= L - nq + i - window_left. The splits then cover the keys from the first step (anchored)
  // or 128-key tile (paper) holding query token 0's first visible key, not from key 0.
  int window_left;
  // Outputs: o [B, Hq, nq, D] (dtype of q) and lse [B, Hq, nq] fp32 (may be null), contiguous.
  void* o;
  float* lse;
  int heads_q;
  // Split-KV partials (num_splits > 1): [units, num_splits, kRows] x (D floats of O_acc, then
  // m_ref, l), units = B * Hkv * row_groups.
  float* part_o;
  float* part_ml;
};

struct AppendParams : PagedCacheRef<uint8_t> {
  const void* k_new;  // [B, Hkv, n_new, D], last dim contiguous
  const void* v_new;
  int64_t stride_b, stride_h, stride_i;  // of k_new (v_new has its own)
  int64_t v_stride_b, v_stride_h, v_stride_i;
  const int32_t* start;
  int64_t start_stride;
  int batch, heads, n_new, head_dim, page_size;
};

}  // namespace attnqat::decode
