// tests/cpp/cuda_attention/sm90_test_kernels.h — host wrappers of small kernels that run single
// device steps of the sm90 forward kernel (src/cuda/attention/sm90/*.cuh) in isolation:
//  - run_p_quant: apply_mask + online_softmax + convert_p on one warpgroup's [64, 128] tile of
//    scores, returning p~, the decoded P^ fragments, m_ref and l per row;
//  - run_softcap: the softcap's tanh and slope (softcap.cuh) per element;
//  - run_gemm_layout: load_q / load_kv_tile (TMA, 128B swizzle) + qk_gemm + pv_gemm on one CTA's
//    tiles (2 consumer warpgroups), returning S = Q K^T and O = P V as the fragments say.
// Both write every element at the (row, column) the fragment-layout formulas assign to it, so a
// wrong formula, descriptor or swizzle shows up as values at wrong positions.
#pragma once

#include <vector>

#include "attnqat/attnqat.h"

namespace attnqat::gpu_test {

constexpr int kTileRows = 64;   // one consumer warpgroup
constexpr int kTileKeys = 128;  // kBlockN

struct PQuantResult {
  std::vector<float> p_tilde;  // [64, 128]
  std::vector<float> p_hat;    // [64, 128], the P^ fragments decoded (exact)
  std::vector<float> m_ref;    // [64]
  std::vector<float> l;        // [64]
};

// scores: [64, 128] raw q.k values; key_end: [64] (keys >= key_end[r] are masked).
Status run_p_quant(bool f16, bool anchored, float c2, const std::vector<float>& scores,
                   const std::vector<int>& key_end, PQuantResult* out);

// The softcap's device steps (sm90/softcap.cuh) on each element of x: t = tanh(RN(a x)) (cap_scores)
// and 1 - t^2 (cap_slope).
Status run_softcap(float a, const std::vector<float>& x, std::vector<float>* t,
                   std::vector<float>* slope);

struct GemmResult {
  std::vector<float> s;  // [128, 128] = Q K^T
  std::vector<float> o;  // [128, d]   = P V
};

// q, k, v: [128, d] (values exact in the 16-bit type), p: [128, 128] (exact too).
Status run_gemm_layout(bool f16, int d, const std::vector<float>& q, const std::vector<float>& k,
                       const std::vector<float>& v, const std::vector<float>& p, GemmResult* out);

}  // namespace attnqat::gpu_test
