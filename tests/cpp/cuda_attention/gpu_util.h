// tests/cpp/cuda_attention/gpu_util.h — helpers of the attention GPU tests: the fixture that
// fails (never skips) without an sm_90 GPU, a device buffer, and 16-bit host conversions.
#pragma once

#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "attnqat/attnqat.h"
#include "common/host_convert.h"

namespace attnqat::gpu_test {

inline void cuda_check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string(what) + ": " + cudaGetErrorName(err) + " (" +
                             cudaGetErrorString(err) + ")");
}

// Every test of this binary derives from it: no GPU, or not a Hopper (sm_90) one, is a failure
// with a message — these tests run only where such a GPU is expected (label `cuda`).
class Sm90Test : public ::testing::Test {
 protected:
  void SetUp() override {
    int count = 0;
    const cudaError_t err = cudaGetDeviceCount(&count);
    ASSERT_TRUE(err == cudaSuccess && count > 0)
        << "no usable CUDA device (cudaGetDeviceCount: " << cudaGetErrorString(err) << ", count "
        << count << "): the attention GPU tests need an sm_90 GPU (H100/H200)";
    int major = 0, minor = 0;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0);
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, 0);
    ASSERT_TRUE(major == 9 && minor == 0)
        << "device 0 is sm_" << major << minor << ": the sm90 attention kernel needs sm_90";
    cudaGetLastError();  // clear what an earlier test may have left
  }
};

class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t bytes) : bytes_(bytes) {
    if (bytes_) cuda_check(cudaMalloc(&ptr_, bytes_), "cudaMalloc");
  }
  ~DeviceBuffer() {
    if (ptr_) cudaFree(ptr_);
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& o) noexcept : ptr_(o.ptr_), bytes_(o.bytes_) {
    o.ptr_ = nullptr;
    o.bytes_ = 0;
  }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    std::swap(ptr_, o.ptr_);
    std::swap(bytes_, o.bytes_);
    return *this;
  }
  void* get() const { return ptr_; }
  size_t size() const { return bytes_; }
  void upload(const void* host, size_t bytes) {
    if (bytes) cuda_check(cudaMemcpy(ptr_, host, bytes, cudaMemcpyHostToDevice), "upload");
  }
  void download(void* host, size_t bytes) const {
    if (bytes) cuda_check(cudaMemcpy(host, ptr_, bytes, cudaMemcpyDeviceToHost), "download");
  }
  // 0xFF bytes: every float, bf16 and fp16 element reads as NaN (catches unwritten outputs).
  void poison() {
    if (bytes_) cuda_check(cudaMemset(ptr_, 0xFF, bytes_), "cudaMemset");
  }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

inline uint16_t to_half_bits(float x, DType dt) {
  return dt == DType::kBFloat16 ? float_to_bf16(x) : float_to_fp16(x);
}
inline float from_half_bits(uint16_t h, DType dt) {
  return dt == DType::kBFloat16 ? bf16_to_float(h) : fp16_to_float(h);
}
inline std::vector<uint16_t> to_half(const std::vector<float>& v, DType dt) {
  std::vector<uint16_t> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = to_half_bits(v[i], dt);
  return out;
}
inline std::vector<float> from_half(const std::vector<uint16_t>& v, DType dt) {
  std::vector<float> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = from_half_bits(v[i], dt);
  return out;
}

inline TensorView cuda_view(void* data, DType dt, std::initializer_list<int64_t> shape,
                            const char* name) {
  return make_view(data, dt, shape, name, Device::kCUDA);
}

}  // namespace attnqat::gpu_test
