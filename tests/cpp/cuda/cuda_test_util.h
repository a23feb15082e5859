// tests/cpp/cuda/cuda_test_util.h — helpers of the GPU tests: the fixture that fails (never
// skips) when no GPU is present, device buffers, dtype conversion of host data, and bit-exact
// comparisons that report the mismatch count and the first mismatches.
#pragma once

#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "attnqat/attnqat.h"
#include "common/host_convert.h"

namespace attnqat::cuda_test {

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

  void* get() const { return ptr_; }
  uint8_t* bytes_ptr() const { return static_cast<uint8_t*>(ptr_); }
  size_t size() const { return bytes_; }

  void upload(const void* host, size_t bytes, size_t offset = 0) {
    if (bytes) cuda_check(cudaMemcpy(bytes_ptr() + offset, host, bytes, cudaMemcpyHostToDevice), "upload");
  }
  template <typename T>
  void upload(const std::vector<T>& host) { upload(host.data(), host.size() * sizeof(T)); }
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

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

constexpr uint8_t kPoisonByte = 0xAB;

// ---- host data in a dtype ---------------------------------------------------------------------

// Host values converted to the dtype's bytes (round to nearest even, as the reference does).
inline std::vector<uint8_t> to_dtype_bytes(const std::vector<float>& v, DType dtype) {
  std::vector<uint8_t> out(v.size() * dtype_size(dtype));
  for (size_t i = 0; i < v.size(); ++i) {
    if (dtype == DType::kFloat32) {
      std::memcpy(out.data() + 4 * i, &v[i], 4);
    } else {
      const uint16_t h = dtype == DType::kBFloat16 ? float_to_bf16(v[i]) : float_to_fp16(v[i]);
      std::memcpy(out.data() + 2 * i, &h, 2);
    }
  }
  return out;
}

inline float element_as_float(const uint8_t* bytes, size_t i, DType dtype) {
  if (dtype == DType::kFloat32) {
    float f;
    std::memcpy(&f, bytes + 4 * i, 4);
    return f;
  }
  uint16_t h;
  std::memcpy(&h, bytes + 2 * i, 2);
  return dtype == DType::kBFloat16 ? bf16_to_float(h) : fp16_to_float(h);
}

inline uint32_t element_bits(const uint8_t* bytes, size_t i, int esize) {
  uint32_t b = 0;
  std::memcpy(&b, bytes + static_cast<size_t>(esize) * i, static_cast<size_t>(esize));
  return b;
}

// ---- comparisons ------------------------------------------------------------------------------

// got and want hold `count` elements of `dtype`; equal means identical bits, except that any
// two NaNs are equal for the float dtypes (the GPU's NaN payloads are not the host's). On
// failure: the mismatch count and rate and the first 10 mismatches.
inline ::testing::AssertionResult same_elements(const std::string& what, DType dtype,
                                                const std::vector<uint8_t>& got,
                                                const std::vector<uint8_t>& want) {
  const int esize = dtype_size(dtype);
  if (got.size() != want.size())
    return ::testing::AssertionFailure() << what << ": sizes differ, got " << got.size()
                                         << " bytes, want " << want.size();
  const size_t count = got.size() / static_cast<size_t>(esize);
  const bool is_float = dtype != DType::kUInt8;
  size_t mismatches = 0;
  std::ostringstream first;
  for (size_t i = 0; i < count; ++i) {
    const uint32_t g = element_bits(got.data(), i, esize), w = element_bits(want.data(), i, esize);
    if (g == w) continue;
    if (is_float && std::isnan(element_as_float(got.data(), i, dtype)) &&
        std::isnan(element_as_float(want.data(), i, dtype)))
      continue;
    if (mismatches < 10) {
      first << "\n  [" << i << "] got 0x" << std::hex << g << " want 0x" << w << std::dec;
      if (is_float)
        first << " (" << element_as_float(got.data(), i, dtype) << " vs "
              << element_as_float(want.data(), i, dtype) << ")";
    }
    ++mismatches;
  }
  if (mismatches == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << what << ": " << mismatches << " of " << count << " elements differ ("
         << 100.0 * static_cast<double>(mismatches) / static_cast<double>(count)
         << "%), first ones:" << first.str();
}

}  // namespace attnqat::cuda_test
