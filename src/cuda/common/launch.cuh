// src/cuda/common/launch.cuh — the one way the attention kernels are launched: opt the kernel into
// its dynamic shared memory (above 48 KB a kernel must ask; idempotent and cheap), launch it on
// `stream`, and turn a failure into a Status "<op>: <what> failed: <error>" (host.h cuda_error).
// Nothing synchronizes, so the launch can be captured in a CUDA graph.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <string>

#include "attnqat/attnqat.h"
#include "cuda/common/host.h"

namespace attnqat::cuda {

template <class Params>
Status launch_kernel(void (*kernel)(Params), const Params& params, dim3 grid, int threads,
                     int smem_bytes, cudaStream_t stream, const char* op, const std::string& what) {
  cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
  if (err == cudaSuccess) {
    kernel<<<grid, threads, smem_bytes, stream>>>(params);
    err = cudaGetLastError();
  }
  return err == cudaSuccess ? Status::Ok() : cuda_error(op, what.c_str(), err);
}

// An attention kernel of config Cfg (kThreads, kSmemAlloc, kHeadDim) and mask policy Mask on the
// grid (x, y, z); a failure names the head dim and the mask.
template <class Cfg, class Mask, class Params>
Status launch_attention_kernel(void (*kernel)(Params), const Params& params, int64_t x, int64_t y,
                               int64_t z, cudaStream_t stream, const char* op) {
  const dim3 grid(static_cast<unsigned>(x), static_cast<unsigned>(y), static_cast<unsigned>(z));
  return launch_kernel(kernel, params, grid, Cfg::kThreads, Cfg::kSmemAlloc, stream, op,
                       "launching the sm90 kernel (d = " + std::to_string(Cfg::kHeadDim) +
                           ", mask " + Mask::kName + ")");
}

}  // namespace attnqat::cuda
