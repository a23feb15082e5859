// Tensor-level quantize / dequantize / fake_quantize through the public API (CPU reference):
// block placement, packing, the token axis with padding, strided inputs, the global scale.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "attnqat/attnqat.h"
#include "common/host_convert.h"

namespace attnqat {
namespace {

std::vector<float> randn(size_t n, uint32_t seed, float scale = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

TensorView scalar_view(float* g) { return make_view(g, DType::kFloat32, {1}, "global_scale"); }

TEST(Quantize, LastAxisMatchesBlockCodec) {
  const int64_t R = 15, L = 48;
  auto x = randn(R * L, 1);
  std::vector<uint8_t> data(R * L / 2), scales(R * L / 16);
  float g = 1.0f;
  QuantizeOptions opts;
  ASSERT_TRUE(quantize(make_view(x.data(), DType::kFloat32, {3, 5, L}, "x"),
                       make_view(data.data(), DType::kUInt8, {3, 5, L / 2}, "data"),
                       make_view(scales.data(), DType::kUInt8, {3, 5, L / 16}, "scales"),
                       scalar_view(&g), opts).ok());
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t b = 0; b < L / 16; ++b) {
      uint8_t codes[16];
      EXPECT_EQ(scales[r * 3 + b], quantize_block_nv(&x[r * L + b * 16], 1.0f, codes));
      for (int i = 0; i < 16; ++i) EXPECT_EQ(unpack_code(data[(r * L + b * 16 + i) / 2], i), codes[i]);
    }
  }
  // dequantize(quantize(x)) == fake_quantize(x)
  std::vector<float> deq(R * L), fq(R * L);
  ASSERT_TRUE(dequantize(make_view(data.data(), DType::kUInt8, {3, 5, L / 2}, "data"),
                         make_view(scales.data(), DType::kUInt8, {3, 5, L / 16}, "scales"),
                         scalar_view(&g), make_view(deq.data(), DType::kFloat32, {3, 5, L}, "out"), opts).ok());
  ASSERT_TRUE(fake_quantize(make_view(x.data(), DType::kFloat32, {3, 5, L}, "x"),
                            make_view(fq.data(), DType::kFloat32, {3, 5, L}, "out"), scalar_view(&g), opts).ok());
  EXPECT_EQ(deq, fq);
}

TEST(Quantize, TokenAxisPadsTheLastBlockWithZeros) {
  const int64_t N = 37, D = 32, nb = 3;
  auto x = randn(N * D, 2);
  std::vector<uint8_t> data(D * nb * 8), scales(D * nb);
  float g = 1.0f;
  QuantizeOptions opts;
  opts.axis = BlockAxis::kToken;
  ASSERT_TRUE(quantize(make_view(x.data(), DType::kFloat32, {1, N, D}, "v"),
                       make_view(data.data(), DType::kUInt8, {1, D, nb * 8}, "data"),
                       make_view(scales.data(), DType::kUInt8, {1, D, nb}, "scales"), scalar_view(&g), opts).ok());
  for (int64_t c = 0; c < D; ++c) {
    for (int64_t b = 0; b < nb; ++b) {
      float blk[16];
      for (int i = 0; i < 16; ++i) blk[i] = b * 16 + i < N ? x[(b * 16 + i) * D + c] : 0.0f;
      uint8_t codes[16];
      EXPECT_EQ(scales[c * nb + b], quantize_block_nv(blk, 1.0f, codes));
      for (int i = 0; i < 16; ++i) EXPECT_EQ(unpack_code(data[c * nb * 8 + b * 8 + i / 2], i), codes[i]);
    }
  }
  std::vector<float> deq(N * D, NAN), fq(N * D, NAN);
  ASSERT_TRUE(dequantize(make_view(data.data(), DType::kUInt8, {1, D, nb * 8}, "data"),
                         make_view(scales.data(), DType::kUInt8, {1, D, nb}, "scales"), scalar_view(&g),
                         make_view(deq.data(), DType::kFloat32, {1, N, D}, "out"), opts).ok());
  ASSERT_TRUE(fake_quantize(make_view(x.data(), DType::kFloat32, {1, N, D}, "v"),
                            make_view(fq.data(), DType::kFloat32, {1, N, D}, "out"), scalar_view(&g), opts).ok());
  EXPECT_EQ(deq, fq);
  for (float v : deq) EXPECT_FALSE(std::isnan(v));  // every element written
}

TEST(Quantize, StridedLeadingDimsGiveTheSameBitsAsContiguous) {
  // x is a [4, 6, 32] view of a [6, 4, 32] buffer (leading dims transposed).
  const int64_t A = 4, Bd = 6, L = 32;
  auto buf = randn(A * Bd * L, 3);
  TensorView xs = make_view(buf.data(), DType::kFloat32, {A, Bd, L}, "x");
  xs.stride[0] = L;
  xs.stride[1] = A * L;
  std::vector<float> contig(A * Bd * L);
  for (int64_t a = 0; a < A; ++a)
    for (int64_t b = 0; b < Bd; ++b)
      for (int64_t l = 0; l < L; ++l) contig[(a * Bd + b) * L + l] = buf[(b * A + a) * L + l];
  std::vector<uint8_t> d1(A * Bd * L / 2), s1(A * Bd * L / 16), d2(d1.size()), s2(s1.size());
  float g = 1.0f;
  QuantizeOptions opts;
  ASSERT_TRUE(quantize(xs, make_view(d1.data(), DType::kUInt8, {A, Bd, L / 2}, "data"),
                       make_view(s1.data(), DType::kUInt8, {A, Bd, L / 16}, "scales"), scalar_view(&g), opts).ok());
  ASSERT_TRUE(quantize(make_view(contig.data(), DType::kFloat32, {A, Bd, L}, "x"),
                       make_view(d2.data(), DType::kUInt8, {A, Bd, L / 2}, "data"),
                       make_view(s2.data(), DType::kUInt8, {A, Bd, L / 16}, "scales"), scalar_view(&g), opts).ok());
  EXPECT_EQ(d1, d2);
  EXPECT_EQ(s1, s2);
}

TEST(Quantize, Bf16InputsAndOutputsAreExact) {
  const int64_t L = 64;
  auto xf = randn(L, 4, 3.0f);
  std::vector<uint16_t> xb(L), ob(L);
  for (int64_t i = 0; i < L; ++i) xb[i] = float_to_bf16(xf[i]);
  float g = 1.0f;
  ASSERT_TRUE(fake_quantize(make_view(xb.data(), DType::kBFloat16, {L}, "x"),
                            make_view(ob.data(), DType::kBFloat16, {L}, "out"), scalar_view(&g), {}).ok());
  for (int64_t b = 0; b < L / 16; ++b) {
    float blk[16];
    for (int i = 0; i < 16; ++i) blk[i] = bf16_to_float(xb[b * 16 + i]);
    fake_quantize_block_nv(blk, 1.0f);
    for (int i = 0; i < 16; ++i) EXPECT_EQ(bf16_to_float(ob[b * 16 + i]), blk[i]);  // exact in bf16
  }
}

TEST(Quantize, ComputedGlobalScale) {
  auto x = randn(64, 5, 1000.0f);
  x[7] = 123456.0f;
  std::vector<uint8_t> data(32), scales(4);
  float g = -1.0f;
  QuantizeOptions opts;
  opts.compute_global_scale = true;
  ASSERT_TRUE(quantize(make_view(x.data(), DType::kFloat32, {64}, "x"), make_view(data.data(), DType::kUInt8, {32}, "data"),
                       make_view(scales.data(), DType::kUInt8, {4}, "scales"), scalar_view(&g), opts).ok());
  EXPECT_EQ(g, nvfp4_global_scale(123456.0f));
  uint8_t codes[16];
  EXPECT_EQ(scales[0], quantize_block_nv(x.data(), g, codes));
  EXPECT_NE(scales[0], 0x7E);  // no saturation with the computed scale
}

TEST(Quantize, EmptyTensorsAreANoOp) {
  float g = 1.0f;
  EXPECT_TRUE(quantize(make_view(nullptr, DType::kFloat32, {0, 16}, "x"), make_view(nullptr, DType::kUInt8, {0, 8}, "data"),
                       make_view(nullptr, DType::kUInt8, {0, 1}, "scales"), scalar_view(&g), {}).ok());
  QuantizeOptions tok;
  tok.axis = BlockAxis::kToken;
  EXPECT_TRUE(quantize(make_view(nullptr, DType::kFloat32, {0, 16}, "x"), make_view(nullptr, DType::kUInt8, {16, 0}, "data"),
                       make_view(nullptr, DType::kUInt8, {16, 0}, "scales"), scalar_view(&g), tok).ok());
}

TEST(Quantize, Mxfp4Tensor) {
  const int64_t L = 64;
  auto x = randn(2 * L, 6);
  std::vector<uint8_t> data(L), scales(4);
  QuantizeOptions opts;
  opts.format = Format::kMXFP4;
  ASSERT_TRUE(quantize(make_view(x.data(), DType::kFloat32, {2, L}, "x"), make_view(data.data(), DType::kUInt8, {2, L / 2}, "data"),
                       make_view(scales.data(), DType::kUInt8, {2, L / 32}, "scales"), TensorView{}, opts).ok());
  for (int b = 0; b < 4; ++b) {
    uint8_t codes[32];
    EXPECT_EQ(scales[b], quantize_block_mx(&x[b * 32], codes));
    for (int i = 0; i < 32; ++i) EXPECT_EQ(unpack_code(data[b * 16 + i / 2], i), codes[i]);
  }
}

}  // namespace
}  // namespace attnqat
