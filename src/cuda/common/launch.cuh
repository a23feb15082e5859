// src/cuda/common/launch.cuh — the one way the attention kernels are launched: opt the kernel into
// its dynamic shared memory (above 48 KB a kernel must ask; idempotent and cheap), launch it on
// `stream`, and turn a failure into a Status "<op>: <what> failed: <error>" (host.h cuda_error).
// Nothing synchronizes, so the launch can be captured in a CUDA graph.
#pragma once

#include <cuda_runtime_api.h>

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

}  // namespace attnqat::cuda
