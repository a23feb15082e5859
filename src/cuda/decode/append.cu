// src/cuda/decode/append.cu — quantizes new K/V tokens straight into their pages of the paged
// FP4 KV cache (kv_cache_append). One thread per NVFP4 block (16 channels of one token of one
// head): amax -> the codec's block scale (g = 1, the exact IEEE path of the quantize kernels)
// -> 8 bytes of codes + 1 scale byte, written at page table[b][pos / page_size], slot
// pos % page_size. Bit-exact twin of attnqat::reference::kv_cache_append (quantize_block_nv).
// Memory-bound and small (a few tokens per call in decode); portable, every target.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda/common/codec.cuh"
#include "cuda/decode/launch.h"

namespace attnqat::decode {
namespace {

constexpr int kAppendThreads = 128;

template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

// blockIdx.y: 0 = K, 1 = V. Thread index over (b, h, i, block).
template <typename T>
__global__ void __launch_bounds__(kAppendThreads) append_kernel(const AppendParams p) {
  const int nblk = p.head_dim / 16;
  const int64_t total = static_cast<int64_t>(p.batch) * p.heads * p.n_new * nblk;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * kAppendThreads + threadIdx.x;
  if (idx >= total) return;
  const bool is_v = blockIdx.y == 1;
  const int blk = static_cast<int>(idx % nblk);
  const int i = static_cast<int>((idx / nblk) % p.n_new);
  const int h = static_cast<int>((idx / (static_cast<int64_t>(nblk) * p.n_new)) % p.heads);
  const int b = static_cast<int>(idx / (static_cast<int64_t>(nblk) * p.n_new * p.heads));
  const int64_t pos = static_cast<int64_t>(p.start[b * p.start_stride]) + i;
  if (pos < 0 || pos >= static_cast<int64_t>(p.pages_per_seq) * p.page_size) return;
  const int page = p.page_table[b * p.pt_stride_b + (pos / p.page_size) * p.pt_stride_p];
  if (page < 0 || page >= p.num_pages) return;  // never written outside the cache
  const T* src = static_cast<const T*>(is_v ? p.v_new : p.k_new) +
                 (is_v ? b * p.v_stride_b + h * p.v_stride_h + i * p.v_stride_i
                       : b * p.stride_b + h * p.stride_h + i * p.stride_i) +
                 blk * 16;
  float x[16];
#pragma unroll
  for (int e = 0; e < 16; ++e) x[e] = to_float<T>(src[e]);
  const cuda::NvBlockScale sc = cuda::nv_block_scale(cuda::block_amax<16>(x), 1.0f);
  uint2 codes;
  codes.x = cuda::nv_pack8(x, sc);
  codes.y = cuda::nv_pack8(x + 8, sc);
  const int64_t row = (static_cast<int64_t>(page) * p.heads + h) * p.page_size + pos % p.page_size;
  uint8_t* data = is_v ? p.v_data : p.k_data;
  uint8_t* scales = is_v ? p.v_scales : p.k_scales;
  *reinterpret_cast<uint2*>(data + row * (p.head_dim / 2) + blk * 8) = codes;
  scales[row * nblk + blk] = static_cast<uint8_t>(sc.s_bits);
}

}  // namespace

cudaError_t launch_append(const AppendParams& p, int dtype, cudaStream_t stream) {
  const int64_t total = static_cast<int64_t>(p.batch) * p.heads * p.n_new * (p.head_dim / 16);
  if (total == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>((total + kAppendThreads - 1) / kAppendThreads), 2);
  switch (dtype) {
    case 0: append_kernel<float><<<grid, kAppendThreads, 0, stream>>>(p); break;
    case 1: append_kernel<__half><<<grid, kAppendThreads, 0, stream>>>(p); break;
    default: append_kernel<__nv_bfloat16><<<grid, kAppendThreads, 0, stream>>>(p); break;
  }
  return cudaGetLastError();
}

}  // namespace attnqat::decode
