// tests/cpp/cuda_attention/gpu_util.h — helpers of the attention GPU tests: the fixture that
// fails (never skips) without an sm_90 GPU, a device buffer, and 16-bit host conversions.
#pragma once

#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <cmath>
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

// Attention sinks of the test cases (numerics 9.10): head h gets kSinkPattern[(h + offset) % 8],
// a case choosing its offset (-1: no sinks). Against the scores of test::random_problem (c q.k
// with a standard deviation of ~2.4 natural-log units, row LSEs of ~5-10): finite sinks of the
// scores' scale (2.5, -3, 0.25, 7), one that takes most of each row's mass (12), one that takes
// all of it (60: the keys' p~ are ~e^-50, which "paper" mode's P blocks flush to 0), and -inf (no
// sink for that head). No z2 = z log2(e) lies within 0.09 of an integer, so the anchored
// m_ref = ceil(z2) of the fp32 kernel and of the fp64 reference agree.
constexpr float kSinkPattern[8] = {2.5f, -INFINITY, 12.0f, -3.0f, 0.25f, 60.0f, -INFINITY, 7.0f};
inline std::vector<float> sink_values(int offset, int64_t heads) {
  std::vector<float> z;
  if (offset < 0) return z;
  for (int64_t h = 0; h < heads; ++h) z.push_back(kSinkPattern[(h + offset) % 8]);
  return z;
}

// A case's sinks (its `sinks` offset, `Hq` heads): the host values, a device copy when `where` is
// CUDA, and options with them attached.
struct CaseSinks {
  std::vector<float> host;
  DeviceBuffer dev;
  template <class Case>
  CaseSinks(const Case& c, Device where) : host(sink_values(c.sinks, c.Hq)) {
    if (where == Device::kCUDA && !host.empty()) {
      dev = DeviceBuffer(host.size() * 4);
      dev.upload(host);
    }
  }
  bool any() const { return !host.empty(); }
  bool has(int64_t h) const { return any() && host[h] != -INFINITY; }  // head h has a sink
  // opts with the sinks attached (unchanged without).
  AttentionOptions attach(AttentionOptions opts) {
    if (host.empty()) return opts;
    void* data = dev.get() != nullptr ? dev.get() : static_cast<void*>(host.data());
    opts.sinks = make_view(data, DType::kFloat32, {static_cast<int64_t>(host.size())}, "sinks",
                           dev.get() != nullptr ? Device::kCUDA : Device::kCPU);
    return opts;
  }
};

}  // namespace attnqat::gpu_test
