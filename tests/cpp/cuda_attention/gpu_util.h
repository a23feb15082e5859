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
#include "../gpu_test_common.h"

namespace attnqat::gpu_test {

using gpu_common::cuda_check;
using gpu_common::DeviceBuffer;

// Every test of this binary derives from it: no GPU, or not a Hopper (sm_90) one, is a failure
// with a message — these tests run only where such a GPU is expected (label `cuda`).
class Sm90Test : public gpu_common::CudaTest {
 protected:
  void SetUp() override {
    gpu_common::CudaTest::SetUp();
    if (HasFatalFailure()) return;
    int major = 0, minor = 0;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0);
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, 0);
    ASSERT_TRUE(major == 9 && minor == 0)
        << "device 0 is sm_" << major << minor << ": the sm90 attention kernel needs sm_90";
  }
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
