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
#include "../gpu_test_common.h"

namespace attnqat::cuda_test {

using gpu_common::cuda_check;
using gpu_common::CudaTest;
using gpu_common::DeviceBuffer;

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
