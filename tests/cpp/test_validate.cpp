// One test per class of bad input: each returns an error whose message names the argument,
// what was expected and what came. Validation runs before any data is touched, so CUDA-device
// views with dummy pointers are safe here.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <vector>

#include "attnqat/attnqat.h"

namespace attnqat {
namespace {

struct Buffers {
  std::vector<float> q, k, v, o, lse;
};

class AttentionArgs : public ::testing::Test {
 protected:
  void SetUp() override {
    b.q.assign(2 * 4 * 8 * 32, 0.1f);
    b.k.assign(2 * 2 * 8 * 32, 0.1f);
    b.v = b.k;
    b.o.assign(b.q.size(), 0);
    b.lse.assign(2 * 4 * 8, 0);
    q = make_view(b.q.data(), DType::kFloat32, {2, 4, 8, 32}, "q");
    k = make_view(b.k.data(), DType::kFloat32, {2, 2, 8, 32}, "k");
    v = make_view(b.v.data(), DType::kFloat32, {2, 2, 8, 32}, "v");
    out.o = make_view(b.o.data(), DType::kFloat32, {2, 4, 8, 32}, "o");
    out.lse = make_view(b.lse.data(), DType::kFloat32, {2, 4, 8}, "lse");
  }
  std::string fwd_error(const AttentionOptions& opts = {}) {
    Status st = attention_forward(q, k, v, opts, out);
    EXPECT_FALSE(st.ok());
    return st.message();
  }
  Buffers b;
  TensorView q, k, v;
  ForwardOutputs out;
};

using ::testing::HasSubstr;

TEST_F(AttentionArgs, ValidCallSucceeds) { EXPECT_TRUE(attention_forward(q, k, v, {}, out).ok()); }

TEST_F(AttentionArgs, WrongDtype) {
  q.dtype = DType::kUInt8;
  EXPECT_THAT(fwd_error(), HasSubstr("q: expected dtype float32, float16 or bfloat16"));
  q.dtype = DType::kFloat32;
  k.dtype = DType::kFloat16;
  EXPECT_THAT(fwd_error(), HasSubstr("expected the dtype of q (float32), got float16"));
}

TEST_F(AttentionArgs, WrongRank) {
  q = make_view(b.q.data(), DType::kFloat32, {8, 8, 32}, "q");
  EXPECT_THAT(fwd_error(), HasSubstr("q: expected a 4-D tensor [batch, heads, seq, head_dim], got shape [8, 8, 32]"));
}

TEST_F(AttentionArgs, ShapeMismatches) {
  k = make_view(b.k.data(), DType::kFloat32, {1, 4, 8, 32}, "k");
  EXPECT_THAT(fwd_error(), HasSubstr("expected batch 2 (the batch of q), got 1"));
  k = make_view(b.k.data(), DType::kFloat32, {2, 2, 8, 32}, "k");
  v = make_view(b.v.data(), DType::kFloat32, {2, 2, 4, 32}, "v");
  EXPECT_THAT(fwd_error(), HasSubstr("v: expected the heads and sequence length of k [2, 2, 8, 32], got [2, 2, 4, 32]"));
  v = make_view(b.v.data(), DType::kFloat32, {2, 2, 8, 32}, "v");
  out.o = make_view(b.o.data(), DType::kFloat32, {2, 4, 8, 16}, "o");
  EXPECT_THAT(fwd_error(), HasSubstr("o: expected shape [2, 4, 8, 32], got [2, 4, 8, 16]"));
}

TEST_F(AttentionArgs, HeadDimNotAMultipleOfTheBlock) {
  q = make_view(b.q.data(), DType::kFloat32, {2, 4, 8, 24}, "q");
  EXPECT_THAT(fwd_error(), HasSubstr("q: expected head_dim a positive multiple of 16 up to 256 (the NVFP4 block), got 24"));
  q = make_view(b.q.data(), DType::kFloat32, {1, 1, 1, 272}, "q");
  EXPECT_THAT(fwd_error(), HasSubstr("got 272"));
}

TEST_F(AttentionArgs, HqNotAMultipleOfHkv) {
  k = make_view(b.k.data(), DType::kFloat32, {2, 3, 8, 32}, "k");
  v = make_view(b.v.data(), DType::kFloat32, {2, 3, 8, 32}, "v");
  EXPECT_THAT(fwd_error(), HasSubstr("expected the number of query heads (4) to be a multiple of the number of key/value heads (3)"));
}

TEST_F(AttentionArgs, CausalWithTokenBlocks) {
  AttentionOptions opts;
  opts.causal = true;
  opts.v_blocks = VBlocks::kToken;
  EXPECT_THAT(fwd_error(opts), HasSubstr("v_blocks: 'token' cannot be used with causal attention"));
}

TEST_F(AttentionArgs, BadKvTileAndScale) {
  AttentionOptions opts;
  opts.kv_tile = 40;
  EXPECT_THAT(fwd_error(opts), HasSubstr("kv_tile: expected a positive multiple of 16 up to 4096, got 40"));
  opts.kv_tile = 128;
  opts.softmax_scale = -1.0f;
  EXPECT_THAT(fwd_error(opts), HasSubstr("softmax_scale: expected a positive finite number"));
}

TEST_F(AttentionArgs, EmptyTensors) {
  // head_dim 0 is an error; zero batch, heads or length are valid and give empty outputs.
  q = make_view(nullptr, DType::kFloat32, {2, 4, 8, 0}, "q");
  EXPECT_THAT(fwd_error(), HasSubstr("expected head_dim a positive multiple of 16 up to 256 (the NVFP4 block), got 0"));
  q = make_view(nullptr, DType::kFloat32, {2, 4, 0, 32}, "q");
  out.o = make_view(nullptr, DType::kFloat32, {2, 4, 0, 32}, "o");
  out.lse = make_view(nullptr, DType::kFloat32, {2, 4, 0}, "lse");
  EXPECT_TRUE(attention_forward(q, k, v, {}, out).ok());
}

TEST_F(AttentionArgs, MismatchedDevices) {
  k.device = Device::kCUDA;
  EXPECT_THAT(fwd_error(), HasSubstr("k: expected a tensor on cpu (the device of q), got one on cuda:0"));
}

TEST_F(AttentionArgs, NonContiguousLastDim) {
  q.stride[3] = 2;
  EXPECT_THAT(fwd_error(), HasSubstr("q: expected the last dimension to be contiguous (stride 1), got stride 2"));
}

TEST_F(AttentionArgs, GradientInFp4Mode) {
  AttentionOptions opts;
  opts.mode = Mode::kFP4;
  BackwardOutputs g;
  ForwardState s;
  const Status st = attention_backward(q, q, k, v, s, opts, g);
  EXPECT_FALSE(st.ok());
  EXPECT_THAT(st.message(), HasSubstr("mode: 'fp4' is the inference forward and has no backward; train with mode='attn_qat'"));
}

TEST_F(AttentionArgs, BackwardWithoutTheForwardState) {
  AttentionOptions opts;  // attn_qat: D needs O'
  BackwardOutputs g;
  ForwardState s;
  s.o = out.o;
  const Status st = attention_backward(q, q, k, v, s, opts, g);
  EXPECT_THAT(st.message(), HasSubstr("o_hp: expected the forward's O' (high-precision output), got none"));
}

// ---- Quantization arguments ----------------------------------------------------------------

TEST(QuantizeArgs, BadInputs) {
  std::vector<float> x(64, 1.0f);
  std::vector<uint8_t> data(32), scales(4);
  float g = 1.0f;
  auto gv = make_view(&g, DType::kFloat32, {1}, "global_scale");
  auto xv = make_view(x.data(), DType::kFloat32, {2, 32}, "x");
  auto dv = make_view(data.data(), DType::kUInt8, {2, 16}, "data");
  auto sv = make_view(scales.data(), DType::kUInt8, {2, 2}, "scales");
  EXPECT_TRUE(quantize(xv, dv, sv, gv, {}).ok());

  auto bad_len = make_view(x.data(), DType::kFloat32, {4, 12}, "x");
  EXPECT_THAT(quantize(bad_len, dv, sv, gv, {}).message(),
              HasSubstr("x: expected the last dimension to be a multiple of 16 (the NVFP4 block), got 12"));
  QuantizeOptions mx;
  mx.format = Format::kMXFP4;
  EXPECT_THAT(quantize(make_view(x.data(), DType::kFloat32, {4, 16}, "x"), dv, sv, gv, mx).message(),
              HasSubstr("multiple of 32 (the MXFP4 block), got 16"));
  auto strided = xv;
  strided.shape[1] = 16;
  strided.stride[1] = 2;
  EXPECT_THAT(quantize(strided, dv, sv, gv, {}).message(), HasSubstr("x: expected the last dimension to be contiguous"));
  EXPECT_THAT(quantize(xv, make_view(data.data(), DType::kUInt8, {2, 8}, "data"), sv, gv, {}).message(),
              HasSubstr("data: expected shape [2, 16], got [2, 8]"));
  auto wrong_dtype = xv;
  wrong_dtype.dtype = DType::kUInt8;
  EXPECT_THAT(quantize(wrong_dtype, dv, sv, gv, {}).message(), HasSubstr("x: expected dtype float32, float16 or bfloat16, got uint8"));
  g = 3.0f;
  EXPECT_THAT(quantize(xv, dv, sv, gv, {}).message(), HasSubstr("global_scale: expected a power of two in [2^-100, 2^100]"));
  g = 0x1p-101f;  // a power of two below the range
  EXPECT_THAT(quantize(xv, dv, sv, gv, {}).message(), HasSubstr("global_scale: expected a power of two in [2^-100, 2^100]"));
  g = 1.0f;
  QuantizeOptions mx_tok;
  mx_tok.format = Format::kMXFP4;
  mx_tok.axis = BlockAxis::kToken;
  EXPECT_THAT(quantize(xv, dv, sv, gv, mx_tok).message(), HasSubstr("token-axis blocks are defined for NVFP4 only"));
  auto on_gpu = dv;
  on_gpu.device = Device::kCUDA;
  EXPECT_THAT(quantize(xv, on_gpu, sv, gv, {}).message(), HasSubstr("data: expected a tensor on cpu (the device of x), got one on cuda:0"));
}

}  // namespace
}  // namespace attnqat
