// DeviceGuard: makes a tensor's device current for the duration of a host entry point and
// restores the caller's device afterwards. Host-only; shared by every CUDA entry point.
#pragma once

#include <cuda_runtime_api.h>

namespace attnqat::cuda {

class DeviceGuard {
 public:
  DeviceGuard() = default;
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;
  ~DeviceGuard() {
    if (switched_) cudaSetDevice(previous_);
  }
  // Makes `device` current (a no-op when it already is).
  cudaError_t set(int device) {
    cudaError_t err = cudaGetDevice(&previous_);
    if (err != cudaSuccess || previous_ == device) return err;
    err = cudaSetDevice(device);
    switched_ = err == cudaSuccess;
    return err;
  }

 private:
  int previous_ = 0;
  bool switched_ = false;
};

}  // namespace attnqat::cuda
