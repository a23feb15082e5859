// Stream-ordered scratch memory for the CUDA entry points (e.g. the fake-quantized copies of
// q, k, v that an attention call makes when it gets raw inputs).
//
// Outside graph capture, allocations come from a memory pool that attnqat owns per device, whose
// release threshold is unlimited: freed memory stays in the pool for the next call instead of
// going back to the driver at every synchronization (the default pool's behaviour, which costs
// ~1 ms per call for a few hundred MB). During stream capture, plain cudaMallocAsync /
// cudaFreeAsync are used, which become graph memory nodes. Nothing here synchronizes.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>

#include "attnqat/tensor.h"

namespace attnqat::cuda {

// A scratch buffer freed (stream-ordered) when it goes out of scope.
class Workspace {
 public:
  Workspace() = default;
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;
  ~Workspace();

  // Allocates `bytes` on the current device, ordered on `stream`.
  Status allocate(size_t bytes, cudaStream_t stream);
  void* data() const { return data_; }

 private:
  void* data_ = nullptr;
  cudaStream_t stream_ = nullptr;
};

}  // namespace attnqat::cuda
