// Host-side helpers of the CUDA entry points (src/cuda/attention/api.cu, packed.cu,
// src/cuda/decode/api.cu, src/cuda/quantize/api.cu through device_guard.h): the Status of a CUDA
// runtime error, the device guard and the device check, stream-ordered scratch memory, views of
// temporaries, and the fake-quantized copies of q, k, v. Host-only; definitions in host.cu.
//
// Scratch memory (Workspace): outside graph capture, allocations come from a memory pool that
// attnqat owns per device, whose release threshold is unlimited: freed memory stays in the pool
// for the next call instead of going back to the driver at every synchronization (the default
// pool's behaviour, which makes every call map its scratch memory again). During stream capture,
// plain cudaMallocAsync / cudaFreeAsync are used, which become graph memory nodes. Nothing here
// synchronizes, so every entry point built on these helpers can be captured in a CUDA graph.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <initializer_list>

#include "attnqat/attnqat.h"

namespace attnqat::cuda {

// ---- Errors and devices --------------------------------------------------------------------

// The Status of a failed CUDA runtime call or launch of entry point `op`:
// "<op>: <what> failed: <cudaErrorName> (<description>)".
Status cuda_error(const char* op, const char* what, cudaError_t err);

// What the kernels of an entry point need of the device.
enum class DeviceNeed {
  kSm90a,  // the sm90 attention kernels (wgmma, setmaxnreg): compute capability 9.0 exactly
  kSm89,   // the portable FP4 kernels of the KV cache and decode (E4M3 converts): 8.9 or newer
};

// kNotImplemented, naming `op` and the device's compute capability, when `device` cannot run the
// kernels of `need`; kCudaError when it cannot be queried.
Status check_device(const char* op, int device, DeviceNeed need);

// Makes a tensor's device current for the duration of a host entry point and restores the
// caller's device afterwards.
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
  // set(device) as a Status: "<op>: selecting <which> failed: ..." (which: e.g. "the device").
  Status select(int device, const char* op, const char* which);

 private:
  int previous_ = 0;
  bool switched_ = false;
};

// ---- Stream-ordered scratch memory ---------------------------------------------------------

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

// Byte alignment of each temporary carved out of one Workspace.
constexpr size_t kTempAlign = 256;
constexpr size_t round_up(size_t bytes) { return (bytes + kTempAlign - 1) / kTempAlign * kTempAlign; }

// A contiguous CUDA tensor of `shape` at `data` (a piece of a Workspace) on device `device_id`.
TensorView device_view(void* data, DType dtype, std::initializer_list<int64_t> shape,
                       const char* name, int device_id);
// A contiguous temporary with the dtype, 4-D shape and device of t.
TensorView contiguous_like(void* data, const TensorView& t, const char* name);

// The strides of the batch, head and token dimensions of a [B, H, N, D] tensor.
inline void token_strides(const TensorView& t, int64_t* b, int64_t* h, int64_t* i) {
  *b = t.stride[0];
  *h = t.stride[1];
  *i = t.stride[2];
}

// ---- Fake-quantized copies of the attention inputs -----------------------------------------

// q^, k^, v^ = fake_quantize(q, k, v) (numerics section 3: NVFP4 with g = 1 along the head dim;
// v along the tokens when v_blocks = token) into one stream-ordered allocation, by the
// quantization kernels of src/cuda/quantize (attnqat::cuda::fake_quantize). Each call is checked
// by validate_fake_quantize() first, as the public fake_quantize() would check it.
class QuantizedInputs {
 public:
  // `op` names the entry point in the messages of CUDA errors.
  Status make(const TensorView& q, const TensorView& k, const TensorView& v, VBlocks v_blocks,
              cudaStream_t stream, const char* op);

  const TensorView& q() const { return q_; }
  const TensorView& k() const { return k_; }
  const TensorView& v() const { return v_; }

 private:
  Workspace buffer_;  // freed stream-ordered after the kernel that reads it
  TensorView q_, k_, v_;
};

}  // namespace attnqat::cuda
