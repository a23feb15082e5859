// Host conversions between fp32 and the 16-bit float formats (bf16, fp16), and a strided
// element loader/storer over TensorView. Round to nearest even everywhere, as on the GPU
// (__float2bfloat16_rn / __float2half_rn). Used by the reference and the host entry points.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "attnqat/tensor.h"

namespace attnqat {

inline uint32_t bits_of(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
}
inline float float_of(uint32_t u) {
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}

inline float bf16_to_float(uint16_t h) { return float_of(static_cast<uint32_t>(h) << 16); }

inline uint16_t float_to_bf16(float x) {
  uint32_t u = bits_of(x);
  if (std::isnan(x)) return static_cast<uint16_t>((u >> 16) | 0x40);  // keep it a (quiet) NaN
  u += 0x7FFF + ((u >> 16) & 1);  // round to nearest even on the dropped 16 bits
  return static_cast<uint16_t>(u >> 16);
}

inline float round_to_bf16(float x) { return bf16_to_float(float_to_bf16(x)); }

inline float fp16_to_float(uint16_t h) {
  const uint32_t sign = (h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1F;
  const uint32_t man = h & 0x3FF;
  if (exp == 0x1F) return float_of(sign | 0x7F800000u | (man << 13));  // Inf / NaN
  if (exp == 0) {                                                      // zero / subnormal
    const float mag = std::ldexp(static_cast<float>(man), -24);
    return sign ? -mag : mag;
  }
  return float_of(sign | ((exp + 112) << 23) | (man << 13));
}

inline uint16_t float_to_fp16(float x) {
  const uint32_t u = bits_of(x);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const float a = std::fabs(x);
  if (std::isnan(x)) return sign | 0x7E00;
  if (a >= 65520.0f) return sign | 0x7C00;  // rounds to Inf (65504 + half an ulp and above)
  if (a < 6.103515625e-05f) {               // below 2^-14: subnormal grid of 2^-24
    const float m = std::nearbyint(std::ldexp(a, 24));
    return sign | static_cast<uint16_t>(m);  // m == 1024 is the smallest normal, encoded right
  }
  int e;
  std::frexp(a, &e);
  e -= 1;  // a = 1.xxx * 2^e, e in [-14, 15]
  float q = std::nearbyint(std::ldexp(a, 10 - e));  // [1024, 2048]
  if (q == 2048.0f) {
    q = 1024.0f;
    e += 1;
  }
  if (e > 15) return sign | 0x7C00;
  return sign | static_cast<uint16_t>(((e + 15) << 10) | (static_cast<int>(q) - 1024));
}

// Element address of a strided view (index given per dimension).
inline int64_t offset_of(const TensorView& t, const int64_t* idx) {
  int64_t off = 0;
  for (int i = 0; i < t.ndim; ++i) off += idx[i] * t.stride[i];
  return off;
}

inline double load_as_double(const TensorView& t, int64_t off) {
  switch (t.dtype) {
    case DType::kFloat32: return static_cast<const float*>(t.data)[off];
    case DType::kFloat64: return static_cast<const double*>(t.data)[off];
    case DType::kBFloat16: return bf16_to_float(static_cast<const uint16_t*>(t.data)[off]);
    case DType::kFloat16: return fp16_to_float(static_cast<const uint16_t*>(t.data)[off]);
    case DType::kUInt8: return static_cast<const uint8_t*>(t.data)[off];
  }
  return 0.0;
}

// Stores a value rounded to the view's dtype (RN; double -> float is RN too).
inline void store_from_double(const TensorView& t, int64_t off, double v) {
  switch (t.dtype) {
    case DType::kFloat32: static_cast<float*>(t.data)[off] = static_cast<float>(v); break;
    case DType::kFloat64: static_cast<double*>(t.data)[off] = v; break;
    case DType::kBFloat16:
      static_cast<uint16_t*>(t.data)[off] = float_to_bf16(static_cast<float>(v));
      break;
    case DType::kFloat16:
      static_cast<uint16_t*>(t.data)[off] = float_to_fp16(static_cast<float>(v));
      break;
    case DType::kUInt8: static_cast<uint8_t*>(t.data)[off] = static_cast<uint8_t>(v); break;
  }
}

}  // namespace attnqat
