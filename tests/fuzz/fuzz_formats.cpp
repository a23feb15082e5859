// Fuzz target: the codecs and block quantizers on arbitrary bit patterns and second-level
// scales. Besides the sanitizers' checks it asserts the format invariants of docs/numerics.md:
// codes in range, poisoned exactly when the input is not finite, every decoded value within
// 6 * s * g, NVFP4 decode == fake quantization, tensor quantize == block quantize.
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "attnqat/attnqat.h"

using namespace attnqat;

namespace {

void require(bool ok) {
  if (!ok) std::abort();  // libFuzzer reports the crashing input
}

void check_nv_block(const float* x, float g) {
  uint8_t codes[kNvBlock];
  const uint8_t s = quantize_block_nv(x, g, codes);
  bool finite = true;
  for (int i = 0; i < kNvBlock; ++i) finite = finite && std::isfinite(x[i]);
  require((s == kE4M3NaN) == !finite);
  float y[kNvBlock];
  std::memcpy(y, x, sizeof y);
  fake_quantize_block_nv(y, g);
  for (int i = 0; i < kNvBlock; ++i) {
    require(codes[i] < 16);
    const float d = dequantize_nv(codes[i], s, g);
    require(std::memcmp(&d, &y[i], sizeof d) == 0 || (std::isnan(d) && std::isnan(y[i])));
    if (finite) require(std::fabs(d) <= 6.0f * e4m3_decode(s) * g);
    else require(std::isnan(d));
  }
}

void check_mx_block(const float* x) {
  uint8_t codes[kMxBlock];
  const uint8_t s = quantize_block_mx(x, codes);
  bool finite = true;
  for (int i = 0; i < kMxBlock; ++i) finite = finite && std::isfinite(x[i]);
  require((s == kE8M0NaN) == !finite);
  for (int i = 0; i < kMxBlock; ++i) {
    require(codes[i] < 16);
    if (finite) require(std::fabs(dequantize_mx(codes[i], s)) <= 6.0f * e8m0_decode(s));
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  // Scalar codecs on every 4-byte word.
  for (size_t off = 1; off + 4 <= size; off += 4) {
    float y;
    std::memcpy(&y, data + off, 4);
    if (std::isfinite(y)) {
      const uint8_t c = e2m1_encode(y);
      require(c < 16);
      require(std::fabs(e2m1_decode(c)) <= 6.0f);
    }
    const uint8_t e = e4m3_encode(y);
    require(std::isnan(y) ? (e & 0x7F) == 0x7F : std::fabs(e4m3_decode(e)) <= 448.0f);
  }
  // Block quantizers: values from the input, g = 2^k with k from the first byte.
  const float g = std::ldexp(1.0f, static_cast<int>(data[0] % 64) - 32);
  float block[kMxBlock] = {};
  const size_t n = std::min<size_t>((size - 1) / 4, kMxBlock);
  std::memcpy(block, data + 1, n * 4);
  check_nv_block(block, g);
  check_nv_block(block + kNvBlock, 1.0f);
  check_mx_block(block);
  // The tensor path (one row of 32) agrees with the block path.
  uint8_t packed[16], scales[2];
  float gv = g;
  QuantizeOptions opts;
  if (quantize(make_view(block, DType::kFloat32, {32}, "x"), make_view(packed, DType::kUInt8, {16}, "data"),
               make_view(scales, DType::kUInt8, {2}, "scales"), make_view(&gv, DType::kFloat32, {1}, "g"), opts).ok()) {
    uint8_t codes[kNvBlock];
    require(scales[0] == quantize_block_nv(block, g, codes));
    for (int i = 0; i < kNvBlock; ++i) require(unpack_code(packed[i / 2], i) == codes[i]);
  }
  return 0;
}
