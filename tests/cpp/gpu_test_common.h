// tests/cpp/gpu_test_common.h — what every GPU test binary shares: a CUDA error check that
// throws, the base fixture that fails (never skips) without a GPU, and a device buffer.
#pragma once

#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace attnqat::gpu_common {

inline void cuda_check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string(what) + ": " + cudaGetErrorName(err) + " (" +
                             cudaGetErrorString(err) + ")");
}

// Every test of the `cuda` label derives from this: no GPU (or no driver) is a failure with a
// message, not a skip — these tests only run where a GPU is expected.
class CudaTest : public ::testing::Test {
 protected:
  void SetUp() override {
    int count = 0;
    const cudaError_t err = cudaGetDeviceCount(&count);
    ASSERT_TRUE(err == cudaSuccess && count > 0)
        << "no usable CUDA device (cudaGetDeviceCount: " << cudaGetErrorString(err) << ", count "
        << count << "): the cuda-labelled tests need a GPU (sm_90a; see attnqat::build_info())";
    cudaGetLastError();  // clear anything a previous test left
  }
};

// A device allocation of raw bytes, freed on destruction.
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
  uint8_t* bytes_ptr() const { return static_cast<uint8_t*>(ptr_); }
  size_t size() const { return bytes_; }

  void upload(const void* host, size_t bytes, size_t offset = 0) {
    if (bytes) cuda_check(cudaMemcpy(bytes_ptr() + offset, host, bytes, cudaMemcpyHostToDevice), "upload");
  }
  template <typename T>
  void upload(const std::vector<T>& host) { upload(host.data(), host.size() * sizeof(T)); }
  void download(void* host, size_t bytes) const {
    if (bytes) cuda_check(cudaMemcpy(host, ptr_, bytes, cudaMemcpyDeviceToHost), "download");
  }
  std::vector<uint8_t> download(size_t bytes, size_t offset = 0) const {
    std::vector<uint8_t> host(bytes);
    if (bytes)
      cuda_check(cudaMemcpy(host.data(), bytes_ptr() + offset, bytes, cudaMemcpyDeviceToHost), "download");
    return host;
  }
  std::vector<uint8_t> download() const { return download(bytes_); }
  // Fills with a byte: 0xAB makes every unwritten output element a recognizable non-NaN value.
  void fill(uint8_t byte) {
    if (bytes_) cuda_check(cudaMemset(ptr_, byte, bytes_), "cudaMemset");
  }
  // 0xFF bytes: every float, bf16 and fp16 element reads as NaN (catches unwritten outputs).
  void poison() { fill(0xFF); }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

}  // namespace attnqat::gpu_common
