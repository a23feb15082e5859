// src/cuda/decode/decode.cu — the launcher of the FP4 decode kernels (decode_kernel.cuh): two
// instantiations each (bf16 and fp16 queries/outputs). Portable (sm_89+): built for every
// target of ATTNQAT_CUDA_ARCHS.
#include "cuda/decode/decode_kernel.cuh"
#include "cuda/decode/launch.h"

namespace attnqat::decode {
namespace {

template <bool kF16>
cudaError_t launch_typed(const DecodeParams& p, int batch, cudaStream_t stream) {
  // Above 48 KB of dynamic shared memory a kernel must opt in (idempotent, cheap).
  cudaError_t err = cudaFuncSetAttribute(decode_kernel<kF16>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         kSmemBytes);
  if (err != cudaSuccess) return err;
  const dim3 grid(p.num_splits, p.heads_kv * p.row_groups, batch);
  decode_kernel<kF16><<<grid, kThreads, kSmemBytes, stream>>>(p);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  if (p.num_splits > 1) {
    const dim3 cgrid(batch * p.heads_kv * p.row_groups, kRows);
    combine_kernel<kF16><<<cgrid, kHeadDim, 0, stream>>>(p);
    err = cudaGetLastError();
  }
  return err;
}

}  // namespace

int decode_smem_bytes() { return kSmemBytes; }

cudaError_t decode_occupancy(bool f16, int* blocks_per_sm) {
  cudaError_t err;
  if (f16) {
    err = cudaFuncSetAttribute(decode_kernel<true>, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
    if (err == cudaSuccess)
      err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks_per_sm, decode_kernel<true>, kThreads, kSmemBytes);
  } else {
    err = cudaFuncSetAttribute(decode_kernel<false>, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
    if (err == cudaSuccess)
      err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks_per_sm, decode_kernel<false>, kThreads, kSmemBytes);
  }
  return err;
}

cudaError_t launch_decode(const DecodeParams& p, int batch, bool f16, cudaStream_t stream) {
  return f16 ? launch_typed<true>(p, batch, stream) : launch_typed<false>(p, batch, stream);
}

}  // namespace attnqat::decode
