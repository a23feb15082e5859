// src/cuda/attention/sm90/bwd_aux.cu — the backward's two small kernels around bwd_kernel
// (FlashAttention-3's preprocess and postprocess, docs/hopper.md, section 8):
//   bwd_preprocess:  per query row, D = rowsum(dO * O') (Attn-QAT) or rowsum(dO * O) in fp32,
//                    and the statistics the main kernel normalizes with, packed as one float4
//                    {-LSE/ln 2, D, -m_ref, 1/l} (bwd_params.h). Must match backward_impl's
//                    `delta` and RowStats: lse2 = LSE / ln 2 is the same IEEE division; D sums
//                    in another order (fp32, allowed by numerics section 8).
//   bwd_postprocess: dQ = RN(c * dQaccum) in the input dtype, undoing the fragment order of the
//                    dQaccum pieces (which span the kernel's tile head dim; columns from the
//                    tensor's head dim on are dropped, attn_params.h).
// Plain CUDA (no sm_90 features); memory-bound, a small share of the backward's time.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cmath>
#include <string>

#include "cuda/attention/sm90/bwd_launch.h"

namespace attnqat::sm90 {
namespace {

constexpr float kLn2 = 0.693147180559945309417f;  // RN(ln 2)
constexpr int kRowsPerBlock = 8;                  // one warp per query row
constexpr int kPieceRows = 64, kPieceCols = 64;   // a dQaccum piece (bwd_params.h)

template <bool kF16>
__device__ __forceinline__ float load16(const void* base, int64_t index) {
  if constexpr (kF16)
    return __half2float(static_cast<const __half*>(base)[index]);
  else
    return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[index]);
}

// Sequence s's first row and length: dense (cu == nullptr) rows [0, rows) of batch entry s;
// packed sequences rows [cu[s], cu[s + 1]) of batch entry 0 (attn_params.h's seq_span: clamped
// to the tensor's rows and to max_len).
struct SeqSpan {
  int b, row0, len;
};
__device__ __forceinline__ SeqSpan seq_span_of(const int* cu, int s, int rows, int max_len) {
  if (cu == nullptr) return SeqSpan{s, 0, rows};
  const IndexRange r = seq_span(cu, s, rows, max_len);
  return SeqSpan{0, r.begin, r.end - r.begin};
}

struct PreParams {
  const void* dout;
  const void* o;
  RowStrides do_str, o_str, stat_str;  // elements; the last dims are contiguous
  const float* lse;
  const float* m_ref;
  const float* l;
  float4* stats;
  const int* cu_seqlens_q;  // packed sequences, else nullptr
  int heads, seqlen_q, rows_pad, head_dim;  // rows_pad = m_blocks * 64 per (sequence, head)
  int64_t total_rows;                       // S * Hq * rows_pad
};

template <bool kF16>
__global__ void bwd_preprocess_kernel(const PreParams p) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= p.total_rows) return;
  const int64_t sh = row / p.rows_pad;
  const int i = static_cast<int>(row % p.rows_pad);
  const int h = static_cast<int>(sh % p.heads);
  const SeqSpan sp = seq_span_of(p.cu_seqlens_q, static_cast<int>(sh / p.heads), p.seqlen_q,
                                 p.rows_pad);
  float4 st = make_float4(-INFINITY, 0.0f, -INFINITY, 0.0f);
  if (i < sp.len) {
    const int64_t do_base = p.do_str.at(sp.b, h, sp.row0 + i);
    const int64_t o_base = p.o_str.at(sp.b, h, sp.row0 + i);
    float sum = 0.0f;
    for (int c = lane; c < p.head_dim; c += 32)
      sum = __fmaf_rn(load16<kF16>(p.dout, do_base + c), load16<kF16>(p.o, o_base + c), sum);
#pragma unroll
    for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
    const int64_t r = p.stat_str.at(sp.b, h, sp.row0 + i);
    const float lse = p.lse[r];
    // LSE = -inf only for a row that the mask leaves without keys: it keeps P = 0 (and D = 0,
    // its O is 0). Every other row takes its statistics as they are, so a poisoned row (LSE,
    // m_ref, l NaN) gives NaN probabilities and NaN gradients, never zeros.
    if (lse != -INFINITY) {
      st.x = -__fdiv_rn(lse, kLn2);
      st.y = sum;
      if (p.m_ref != nullptr) {
        st.z = -p.m_ref[r];
        st.w = __frcp_rn(p.l[r]);
      }
    }
  }
  if (lane == 0) p.stats[row] = st;
}

template <bool kF16>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (kF16) {
    const __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  } else {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
}

// One block of 128 threads per piece; thread T handles the 32 elements that consumer thread T
// accumulated (bwd_params.h): pair i of thread T is at float2 index i * 128 + T.
template <bool kF16>
__global__ void bwd_postprocess_kernel(const float* dq_accum, void* dq, RowStrides dq_str,
                                       const int* cu_seqlens_q, int heads, int seqlen_q,
                                       int m_blocks, int chunks, int head_dim, float scale) {
  const int64_t piece = blockIdx.x;
  const int chunk = static_cast<int>(piece % chunks);
  const int64_t mb = piece / chunks;
  const int m = static_cast<int>(mb % m_blocks);
  const int64_t sh = mb / m_blocks;
  const int h = static_cast<int>(sh % heads);
  const SeqSpan sp =
      seq_span_of(cu_seqlens_q, static_cast<int>(sh / heads), seqlen_q, m_blocks * kPieceRows);
  const int T = threadIdx.x, w = T / 32, g = (T % 32) / 4, t = T % 4;
  const float2* src = reinterpret_cast<const float2*>(dq_accum + piece * kPieceRows * kPieceCols);
  uint32_t* out = static_cast<uint32_t*>(dq);
#pragma unroll
  for (int i = 0; i < kPieceRows * kPieceCols / 256; ++i) {
    const float2 v = src[i * 128 + T];
    const int row = m * kPieceRows + 16 * w + g + 8 * (i & 1);
    const int col = chunk * kPieceCols + 8 * (i >> 1) + 2 * t;
    if (row < sp.len && col < head_dim)
      out[(dq_str.at(sp.b, h, sp.row0 + row) + col) / 2] =
          pack2<kF16>(__fmul_rn(v.x, scale), __fmul_rn(v.y, scale));
  }
}

Status launch_error(const char* what, cudaError_t err) {
  return Status::Cuda(std::string("attention_backward: launching ") + what + " failed: " +
                      cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")");
}

}  // namespace

Status launch_bwd_preprocess(const BwdPreArgs& a) {
  PreParams p{};
  p.dout = a.dout.data;
  p.o = a.o.data;
  p.do_str = row_strides(a.dout);
  p.o_str = row_strides(a.o);
  p.stat_str = a.stat_str;
  p.cu_seqlens_q = a.varlen.cu_seqlens_q;
  p.lse = a.lse;
  p.m_ref = a.m_ref;
  p.l = a.l;
  p.stats = a.stats;
  p.heads = static_cast<int>(a.dout.shape[1]);
  p.seqlen_q = static_cast<int>(a.dout.shape[2]);
  p.head_dim = static_cast<int>(a.dout.shape[3]);
  p.rows_pad = a.m_blocks * kPieceRows;
  p.total_rows = num_sequences(a.dout, a.varlen) * a.dout.shape[1] * p.rows_pad;
  const int64_t blocks = (p.total_rows + kRowsPerBlock - 1) / kRowsPerBlock;
  if (blocks == 0) return Status::Ok();
  if (a.dout.dtype == DType::kFloat16)
    bwd_preprocess_kernel<true><<<static_cast<unsigned>(blocks), 32 * kRowsPerBlock, 0, a.stream>>>(p);
  else
    bwd_preprocess_kernel<false><<<static_cast<unsigned>(blocks), 32 * kRowsPerBlock, 0, a.stream>>>(p);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? Status::Ok() : launch_error("the preprocess kernel", err);
}

Status launch_bwd_postprocess(const float* dq_accum, const TensorView& dq, const VarlenArgs& varlen,
                              int m_blocks, float scale, cudaStream_t stream) {
  const int head_dim = static_cast<int>(dq.shape[3]);
  const int chunks = kernel_tile_head_dim(head_dim) / kPieceCols;
  const int heads = static_cast<int>(dq.shape[1]);
  const int64_t pieces = num_sequences(dq, varlen) * heads * m_blocks * chunks;
  if (pieces == 0) return Status::Ok();
  const int seqlen_q = static_cast<int>(dq.shape[2]);
  const RowStrides str = row_strides(dq);
  if (dq.dtype == DType::kFloat16)
    bwd_postprocess_kernel<true><<<static_cast<unsigned>(pieces), 128, 0, stream>>>(
        dq_accum, dq.data, str, varlen.cu_seqlens_q, heads, seqlen_q, m_blocks, chunks,
        head_dim, scale);
  else
    bwd_postprocess_kernel<false><<<static_cast<unsigned>(pieces), 128, 0, stream>>>(
        dq_accum, dq.data, str, varlen.cu_seqlens_q, heads, seqlen_q, m_blocks, chunks,
        head_dim, scale);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? Status::Ok() : launch_error("the postprocess kernel", err);
}

}  // namespace attnqat::sm90
