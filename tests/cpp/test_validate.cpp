// One test per class of bad input: each returns an error whose message names the argument,
// what was expected and what came. Validation runs before any data is touched, so CUDA-device
// views with dummy pointers are safe here.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "attnqat/attnqat.h"
#include "common/validate.h"

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
  EXPECT_THAT(fwd_error(), HasSubstr("q: expected head_dim a positive multiple of 16 up to 256 (the NVFP4 block; "
                                     "CPU reference: 16, 32, ..., 256; CUDA kernels: 16, 32, ..., 128), got 24"));
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
  EXPECT_THAT(fwd_error(), HasSubstr("expected head_dim a positive multiple of 16 up to 256 (the NVFP4 block; "));
  EXPECT_THAT(fwd_error(), HasSubstr("got 0"));
  q = make_view(nullptr, DType::kFloat32, {2, 4, 0, 32}, "q");
  out.o = make_view(nullptr, DType::kFloat32, {2, 4, 0, 32}, "o");
  out.lse = make_view(nullptr, DType::kFloat32, {2, 4, 0}, "lse");
  EXPECT_TRUE(attention_forward(q, k, v, {}, out).ok());
}

TEST_F(AttentionArgs, EmptyTensorsAcceptAnyStrides) {
  // torch hands the backward an expanded (stride 0) gradient of an empty output: nothing is
  // addressed, so the strides must not matter.
  q = make_view(nullptr, DType::kFloat32, {2, 4, 0, 32}, "q");
  q.stride[3] = 0;
  out.o = make_view(nullptr, DType::kFloat32, {2, 4, 0, 32}, "o");
  out.lse = make_view(nullptr, DType::kFloat32, {2, 4, 0}, "lse");
  EXPECT_TRUE(attention_forward(q, k, v, {}, out).ok());
}

TEST_F(AttentionArgs, NegativeSizesAndTooManyDims) {
  q.shape[2] = -8;
  EXPECT_THAT(fwd_error(), HasSubstr("q: expected non-negative sizes, got shape [2, 4, -8, 32]"));
  q.shape[2] = 8;
  q.ndim = 9;
  EXPECT_THAT(fwd_error(), HasSubstr("q: expected 0 to 6 dimensions, got 9"));
}

TEST_F(AttentionArgs, OptionEnumsOutOfRange) {
  AttentionOptions opts;
  opts.mode = static_cast<Mode>(7);
  EXPECT_THAT(fwd_error(opts), HasSubstr("mode: expected one of bf16, fp4, drop_in_qat, attn_qat; got enum value 7"));
  opts = {};
  opts.p_quant = static_cast<PQuant>(5);
  EXPECT_THAT(fwd_error(opts), HasSubstr("p_quant: expected paper or anchored, got enum value 5"));
  opts = {};
  opts.v_blocks = static_cast<VBlocks>(2);
  EXPECT_THAT(fwd_error(opts), HasSubstr("v_blocks: expected channel or token, got enum value 2"));
  opts = {};
  opts.precision = static_cast<Precision>(3);
  EXPECT_THAT(fwd_error(opts), HasSubstr("precision: expected fp32, fp64 or bf16_operands, got enum value 3"));
}

TEST_F(AttentionArgs, SoftmaxScaleIsCheckedOnceForEveryEntryPoint) {
  // The same check (validate_attention_options -> check_softmax_scale) for forward and backward.
  AttentionOptions opts;
  opts.softmax_scale = std::nanf("");
  EXPECT_THAT(fwd_error(opts), HasSubstr("softmax_scale: expected a positive finite number (or 0 for 1/sqrt(head_dim)), got nan"));
  opts.softmax_scale = INFINITY;
  EXPECT_THAT(fwd_error(opts), HasSubstr("got inf"));
  opts.mode = Mode::kBF16;
  BackwardOutputs g;
  ForwardState s;
  EXPECT_THAT(attention_backward(q, q, k, v, s, opts, g).message(), HasSubstr("softmax_scale: expected a positive finite number"));
  EXPECT_TRUE(validate_attention_options(AttentionOptions{}).ok());
  opts = {};
  opts.kv_tile = 8192;
  EXPECT_THAT(validate_attention_options(opts).message(), HasSubstr("kv_tile: expected a positive multiple of 16 up to 4096, got 8192"));
}

TEST(OptionArgs, EachStructHasOneCheckerWithoutTensors) {
  // validate_attention_options() holds every rule between options (attnqat._C exposes it).
  AttentionOptions opts;
  opts.causal = true;
  opts.v_blocks = VBlocks::kToken;
  EXPECT_THAT(validate_attention_options(opts).message(), HasSubstr("v_blocks: 'token' cannot be used with causal attention"));
  opts.mode = Mode::kBF16;  // nothing is quantized
  EXPECT_TRUE(validate_attention_options(opts).ok());
  DecodeOptions d;
  EXPECT_TRUE(validate_decode_options(d).ok());
  d.num_splits = -1;
  EXPECT_THAT(validate_decode_options(d).message(), HasSubstr("num_splits, max_seq_len: expected non-negative values"));
  QuantizeOptions qo;
  qo.axis = static_cast<BlockAxis>(4);
  EXPECT_THAT(validate_quantize_options(qo).message(), HasSubstr("axis: expected last or token, got enum value 4"));
}

TEST(OptionArgs, PaperNeedsTheKernelTile) {
  AttentionOptions opts;
  EXPECT_TRUE(check_paper_kv_tile(opts).ok());
  opts.kv_tile = 64;
  EXPECT_THAT(check_paper_kv_tile(opts).message(),
              HasSubstr("kv_tile: p_quant='paper' depends on the key tile, and the CUDA kernels and the FP4 KV "
                        "cache's decode use 128-key tiles; got kv_tile=64 (use kv_tile=128 or p_quant='anchored')"));
  opts.p_quant = PQuant::kAnchored;  // tile-size independent
  EXPECT_TRUE(check_paper_kv_tile(opts).ok());
  opts.p_quant = PQuant::kPaper;
  opts.mode = Mode::kBF16;  // no P quantization
  EXPECT_TRUE(check_paper_kv_tile(opts).ok());
}

TEST(OptionArgs, ExplicitSoftmaxScaleMustStayPositiveInFloat32) {
  float c = -1.0f;
  EXPECT_TRUE(softmax_scale_from_double(0.125, &c).ok());
  EXPECT_EQ(c, 0.125f);
  EXPECT_THAT(softmax_scale_from_double(0.0, &c).message(), HasSubstr("softmax_scale: expected a positive finite number, got 0.0"));
  EXPECT_THAT(softmax_scale_from_double(-1.0, &c).message(), HasSubstr("got -1.0"));
  EXPECT_THAT(softmax_scale_from_double(NAN, &c).message(), HasSubstr("got nan"));
  EXPECT_THAT(softmax_scale_from_double(1e-50, &c).message(),
              HasSubstr("softmax_scale: expected a positive finite number in float32 range"));
  EXPECT_THAT(softmax_scale_from_double(1e39, &c).message(), HasSubstr("got 1e+39"));
  EXPECT_EQ(c, 0.125f);  // unchanged by the errors
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
  QuantizeOptions bad_format;
  bad_format.format = static_cast<Format>(3);
  EXPECT_THAT(quantize(xv, dv, sv, gv, bad_format).message(), HasSubstr("format: expected NVFP4 or MXFP4, got enum value 3"));
  auto f64 = xv;
  f64.dtype = DType::kFloat64;
  EXPECT_THAT(quantize(f64, dv, sv, gv, {}).message(), HasSubstr("x: expected dtype float32, float16 or bfloat16, got float64"));
}

// ---- The paged FP4 KV cache and decode -----------------------------------------------------

TEST(DecodeCacheArgs, HeadDimAndScale) {
  // head dim 512: D/2 = 256 bytes per token; the reference and attention stop at 256.
  std::vector<uint8_t> kd(1 * 1 * 16 * 256), ks(1 * 1 * 16 * 32);
  PagedKVCache c;
  c.k_data = make_view(kd.data(), DType::kUInt8, {1, 1, 16, 256}, "k_data");
  c.k_scales = make_view(ks.data(), DType::kUInt8, {1, 1, 16, 32}, "k_scales");
  c.v_data = make_view(kd.data(), DType::kUInt8, {1, 1, 16, 256}, "v_data");
  c.v_scales = make_view(ks.data(), DType::kUInt8, {1, 1, 16, 32}, "v_scales");
  KVCacheDims dims;
  EXPECT_THAT(validate_kv_cache(c, &dims).message(),
              HasSubstr("k_data: expected D/2 bytes per token with D a positive multiple of 16 up to 256 (CPU "
                        "reference; the CUDA decode kernel takes 64 and 128), got 256 bytes (D = 512)"));
  std::vector<float> q(64), out(64);
  std::vector<int32_t> pt{0}, lens{1};
  IndexView ptv, lv;
  ptv.data = pt.data();
  ptv.ndim = 2;
  ptv.shape[0] = ptv.shape[1] = 1;
  ptv.stride[0] = ptv.stride[1] = 1;
  ptv.name = "page_table";
  lv.data = lens.data();
  lv.ndim = 1;
  lv.shape[0] = lv.stride[0] = 1;
  lv.name = "seq_lens";
  DecodeOptions o;
  o.softmax_scale = -2.0f;
  const Status st = decode_attention(make_view(q.data(), DType::kFloat32, {1, 1, 1, 64}, "q"), c, ptv, lv, o,
                                     make_view(out.data(), DType::kFloat32, {1, 1, 1, 64}, "out"), TensorView{});
  EXPECT_THAT(st.message(), HasSubstr("softmax_scale: expected a positive finite number (or 0 for 1/sqrt(head_dim)), got -2"));
}

}  // namespace
}  // namespace attnqat
