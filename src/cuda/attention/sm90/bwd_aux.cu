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
//   dsinks (numerics 9.10), deterministic, in two steps: the preprocess writes each row's
//                    p_sink * D = exp2(z2 - LSE / ln 2) * D (0 for rows that see no key, padding
//                    rows and heads without a sink) into a scratch [Hq, S, rows_pad]; then
//                    dsinks_reduce_kernel, one block per head, sums them in a fixed order (each
//                    thread a fixed strided subset in order, then a fixed tree) and writes -sum.
//                    The reference sums over the batch, then the rows, sequentially: another
//                    fp32 order, and exp2f here against std::exp2 (both within 2 ulp).
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
  // dsinks only (dsink_rows != nullptr): [Hq, S, rows_pad] per-row terms; the sinks, and the
  // call's sequences and mask to tell the rows that see no key.
  float* dsink_rows;
  int num_seqs;
  AttnParams attn;
  MaskKind mask;
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
  float sink_term = 0.0f;
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
    // LSE = -inf only for a row that the mask leaves without keys (and has no sink): it keeps
    // P = 0 (and D = 0, its O is 0). Every other row takes its statistics as they are, so a
    // poisoned row (LSE, m_ref, l NaN) gives NaN probabilities and NaN gradients, never zeros;
    // a row without keys but with a sink has a finite LSE, and the mask keeps its P = 0.
    if (lse != -INFINITY) {
      st.x = -__fdiv_rn(lse, kLn2);
      st.y = sum;
      if (p.m_ref != nullptr) {
        st.z = -p.m_ref[r];
        st.w = __frcp_rn(p.l[r]);
      }
    }
    // dsinks: p_sink * D with p_sink = exp2(z2 - lse2); a row without keys adds nothing (its O is
    // 0, but dO may hold anything), and a poisoned row (LSE NaN) poisons the head's dsinks.
    if (p.dsink_rows != nullptr) {
      const float z2 = p.attn.extras.sink2(h);
      const int s = static_cast<int>(sh / p.heads);
      if (z2 != -INFINITY && !visible_keys(p.mask, i, p.attn.seq_rows(s).info).empty())
        sink_term = exp2f(__fadd_rn(z2, st.x)) * sum;
    }
  }
  if (lane == 0) {
    p.stats[row] = st;
    if (p.dsink_rows != nullptr)
      p.dsink_rows[(static_cast<int64_t>(h) * p.num_seqs + sh / p.heads) * p.rows_pad + i] = sink_term;
  }
}

// dsinks[h] = -(sum of head h's row terms), one block of kReduceThreads per head (see the file
// header): the same order on every run.
constexpr int kReduceThreads = 256;
__global__ void dsinks_reduce_kernel(const float* rows, int64_t rows_per_head, float* dsinks,
                                     int64_t dsinks_stride) {
  __shared__ float part[kReduceThreads];
  const int h = blockIdx.x, t = threadIdx.x;
  const float* r = rows + h * rows_per_head;
  float acc = 0.0f;
  for (int64_t i = t; i < rows_per_head; i += kReduceThreads) acc += r[i];
  part[t] = acc;
  __syncthreads();
#pragma unroll
  for (int w = kReduceThreads / 2; w > 0; w /= 2) {
    if (t < w) part[t] += part[t + w];
    __syncthreads();
  }
  if (t == 0) dsinks[h * dsinks_stride] = -part[0];
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
  p.num_seqs = static_cast<int>(num_sequences(a.dout, a.varlen));
  p.total_rows = p.num_seqs * a.dout.shape[1] * p.rows_pad;
  p.dsink_rows = a.dsink_rows;
  p.attn = a.attn;
  p.mask = a.mask;
  const int64_t blocks = (p.total_rows + kRowsPerBlock - 1) / kRowsPerBlock;
  if (blocks == 0) return Status::Ok();
  if (a.dout.dtype == DType::kFloat16)
    bwd_preprocess_kernel<true><<<static_cast<unsigned>(blocks), 32 * kRowsPerBlock, 0, a.stream>>>(p);
  else
    bwd_preprocess_kernel<false><<<static_cast<unsigned>(blocks), 32 * kRowsPerBlock, 0, a.stream>>>(p);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? Status::Ok() : launch_error("the preprocess kernel", err);
}

Status launch_dsinks_reduce(const float* dsink_rows, int64_t rows_per_head, const TensorView& dsinks,
                           cudaStream_t stream) {
  const int64_t heads = dsinks.shape[0];
  if (heads == 0) return Status::Ok();
  dsinks_reduce_kernel<<<static_cast<unsigned>(heads), kReduceThreads, 0, stream>>>(
      dsink_rows, rows_per_head, static_cast<float*>(dsinks.data), dsinks.stride[0]);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? Status::Ok() : launch_error("the dsinks reduction kernel", err);
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
