// CPU tests of the FP4 inference paths, label cpu: the paged FP4 KV cache append
// (codes and scales bit-exact against quantize()), the decode reference (bit-identical to the
// mode-fp4 forward on the raw K, V: the same operands and the same arithmetic; with a sliding
// window, to the forward with window (window_left, 0)), attention from
// packed tensors (bit-identical to the forward on the fake-quantized tensors), and the errors
// of bad input. The GPU kernels are compared with these references in tests/cpp/cuda_decode.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "attention_util.h"
#include "attnqat/attnqat.h"
#include "common/validate.h"
#include "decode_util.h"

namespace attnqat {
namespace {

using test::HostCache;
using test::index_view;

// Reference quantize() of one row [D] -> (codes D/2, scales D/16).
void quantize_row(const float* x, int64_t D, uint8_t* codes, uint8_t* scales) {
  std::vector<float> row(x, x + D);
  float g = 1.0f;
  const Status st = quantize(make_view(row.data(), DType::kFloat32, {D}, "x"),
                             make_view(codes, DType::kUInt8, {D / 2}, "data"),
                             make_view(scales, DType::kUInt8, {D / 16}, "scales"),
                             make_view(&g, DType::kFloat32, {1}, "g"), QuantizeOptions{});
  ASSERT_TRUE(st.ok()) << st.message();
}

struct AppendCase {
  int64_t page_size, len, chunk, D;
};

class DecodeAppend : public ::testing::TestWithParam<AppendCase> {};

TEST_P(DecodeAppend, CodesAndScalesBitExact) {
  const AppendCase c = GetParam();
  const int64_t H = 2, B = 2;
  const std::vector<int64_t> lens = {c.len, c.len / 2 + 1};
  HostCache cache(B, c.len, H, c.D, c.page_size, 7);
  const test::SeqKV seqs = test::random_seqs(lens, H, c.D, 11);
  test::fill_cache(cache, seqs, lens, c.chunk);
  std::vector<uint8_t> codes(c.D / 2), scales(c.D / 16);
  int64_t mismatches = 0;
  for (int64_t b = 0; b < B; ++b) {
    EXPECT_EQ(cache.lens[b], lens[b]);
    for (int64_t h = 0; h < H; ++h)
      for (int64_t t = 0; t < lens[b]; ++t) {
        for (int kv = 0; kv < 2; ++kv) {
          const std::vector<float>& src = kv ? seqs.v[b] : seqs.k[b];
          quantize_row(&src[(h * lens[b] + t) * c.D], c.D, codes.data(), scales.data());
          const int64_t page = cache.page_table[b * cache.pages_per_seq + t / c.page_size];
          const int64_t row = (page * H + h) * c.page_size + t % c.page_size;
          const uint8_t* dc = (kv ? cache.v_data : cache.k_data).data() + row * c.D / 2;
          const uint8_t* ds = (kv ? cache.v_scales : cache.k_scales).data() + row * c.D / 16;
          mismatches += std::memcmp(dc, codes.data(), codes.size()) != 0;
          mismatches += std::memcmp(ds, scales.data(), scales.size()) != 0;
        }
      }
  }
  EXPECT_EQ(mismatches, 0) << "rows whose codes or scales differ from quantize()";
}

INSTANTIATE_TEST_SUITE_P(Cases, DecodeAppend,
                         ::testing::Values(AppendCase{16, 1, 1, 128}, AppendCase{16, 37, 5, 64},
                                           AppendCase{48, 100, 16, 128}, AppendCase{64, 130, 33, 32}));

TEST(DecodeAppend, PoisonedBlockStoresNaNScaleAndZeroCodes) {
  HostCache cache(1, 16, 1, 32, 16, 3);
  std::vector<float> k(32, 1.0f), v(32, 2.0f);
  k[5] = NAN;
  cache.append(k, v, 1);
  const int64_t page = cache.page_table[0];
  EXPECT_EQ(cache.k_scales[page * 16 * 2 + 0], kE4M3NaN);
  EXPECT_EQ(cache.k_data[page * 16 * 16 + 0], 0);
  EXPECT_NE(cache.k_scales[page * 16 * 2 + 1], kE4M3NaN);
}

// ---- Decode reference == the mode-fp4 forward on the raw K and V -------------------------------

struct DecodeCase {
  const char* name;
  int64_t group, nq, page_size;
  std::vector<int64_t> lens;
  PQuant pq;
  int window_left = -1;  // DecodeOptions::window_left; the forward gets window (window_left, 0)
};

class DecodeReference : public ::testing::TestWithParam<DecodeCase> {};

TEST_P(DecodeReference, MatchesFp4ForwardBitForBit) {
  const DecodeCase c = GetParam();
  const int64_t H = 2, D = 64, Hq = H * c.group, nq = c.nq;
  const int64_t B = static_cast<int64_t>(c.lens.size());
  int64_t max_len = 0;
  for (int64_t l : c.lens) max_len = std::max(max_len, l);
  HostCache cache(B, max_len, H, D, c.page_size, 5);
  const test::SeqKV seqs = test::random_seqs(c.lens, H, D, 13);
  test::fill_cache(cache, seqs, c.lens, 7);
  auto qp = test::random_problem<float>(B, Hq, H, nq, 1, D, 17);
  std::vector<float> out(B * Hq * nq * D, NAN), lse(B * Hq * nq, NAN);
  DecodeOptions opts;
  opts.p_quant = c.pq;
  opts.window_left = c.window_left;
  const TensorView qv = make_view(qp.q.data(), DType::kFloat32, {B, Hq, nq, D}, "q");
  Status st = decode_attention(qv, cache.view(), cache.table_view(), cache.lens_view(), opts,
                               make_view(out.data(), DType::kFloat32, {B, Hq, nq, D}, "out"),
                               make_view(lse.data(), DType::kFloat32, {B, Hq, nq}, "lse"));
  ASSERT_TRUE(st.ok()) << st.message();
  for (int64_t b = 0; b < B; ++b) {
    const int64_t L = c.lens[b];
    std::vector<float> q(qp.q.begin() + b * Hq * nq * D, qp.q.begin() + (b + 1) * Hq * nq * D);
    std::vector<float> k = seqs.k[b], v = seqs.v[b];
    std::vector<float> o(Hq * nq * D, NAN), l2(Hq * nq, NAN);
    // The dense call the decode must equal: window (window_left, 0) over the sequence's keys
    // ((-1, 0) is the causal mask).
    AttentionOptions ao;
    ao.mode = Mode::kFP4;
    ao.p_quant = c.pq;
    ao.window_left = c.window_left;
    ao.window_right = 0;
    ForwardOutputs fo;
    fo.o = make_view(o.data(), DType::kFloat32, {1, Hq, nq, D}, "o");
    fo.lse = make_view(l2.data(), DType::kFloat32, {1, Hq, nq}, "lse");
    st = attention_forward(make_view(q.data(), DType::kFloat32, {1, Hq, nq, D}, "q"),
                           make_view(k.data(), DType::kFloat32, {1, H, L, D}, "k"),
                           make_view(v.data(), DType::kFloat32, {1, H, L, D}, "v"), ao, fo);
    ASSERT_TRUE(st.ok()) << st.message();
    for (int64_t i = 0; i < Hq * nq * D; ++i)
      ASSERT_EQ(std::memcmp(&o[i], &out[b * Hq * nq * D + i], 4), 0)
          << c.name << ": sequence " << b << " element " << i << ": " << out[b * Hq * nq * D + i]
          << " vs " << o[i];
    for (int64_t i = 0; i < Hq * nq; ++i)
      ASSERT_EQ(std::memcmp(&l2[i], &lse[b * Hq * nq + i], 4), 0) << c.name << ": lse " << i;
  }
}

INSTANTIATE_TEST_SUITE_P(
    Cases, DecodeReference,
    ::testing::Values(DecodeCase{"len1_gqa1", 1, 1, 16, {1}, PQuant::kAnchored},
                      DecodeCase{"len15_gqa4", 4, 1, 16, {15}, PQuant::kAnchored},
                      DecodeCase{"len16_gqa8", 8, 1, 32, {16}, PQuant::kAnchored},
                      DecodeCase{"len17_nq3", 4, 3, 16, {17}, PQuant::kAnchored},
                      DecodeCase{"mixed_paper", 4, 2, 48, {300, 1, 129, 64}, PQuant::kPaper},
                      DecodeCase{"mixed_anchored", 4, 1, 64, {300, 2, 129, 64}, PQuant::kAnchored},
                      DecodeCase{"nq_beyond_len", 1, 4, 16, {2}, PQuant::kAnchored},
                      // Sliding windows: only the diagonal key (0), windows that begin mid-tile and
                      // mid-page, at a tile edge (127, 128), wider than every sequence (4096), nq > 1
                      // (each query row its own window), paper (128-key tiles from key 0).
                      DecodeCase{"window0", 4, 1, 16, {300, 1, 17}, PQuant::kAnchored, 0},
                      DecodeCase{"window5_nq3", 4, 3, 16, {17, 2, 129}, PQuant::kAnchored, 5},
                      DecodeCase{"window127_paper", 2, 2, 48, {300, 129, 64, 1}, PQuant::kPaper, 127},
                      DecodeCase{"window128", 4, 1, 64, {300, 2, 129, 128}, PQuant::kAnchored, 128},
                      DecodeCase{"window20_paper_nq4", 1, 4, 16, {260, 3}, PQuant::kPaper, 20},
                      DecodeCase{"window4096", 4, 2, 32, {300, 5}, PQuant::kAnchored, 4096}),
    [](const auto& info) { return std::string(info.param.name); });

// ---- Attention from packed tensors == the forward on the fake-quantized tensors ----------------

TEST(AttentionPacked, MatchesForwardOnDecodedTensorsBitForBit) {
  const int64_t B = 2, Hq = 4, Hkv = 2, Nq = 33, Nk = 70, D = 64;
  for (const bool causal : {false, true})
    for (const PQuant pq : {PQuant::kPaper, PQuant::kAnchored}) {
      auto p = test::random_problem<float>(B, Hq, Hkv, Nq, Nk, D, 23);
      float g = 1.0f;
      const TensorView gv = make_view(&g, DType::kFloat32, {1}, "g");
      auto pack = [&](std::vector<float>& x, int64_t h, int64_t n, std::vector<uint8_t>& d,
                      std::vector<uint8_t>& s) {
        d.resize(B * h * n * D / 2);
        s.resize(B * h * n * D / 16);
        PackedTensor t{make_view(d.data(), DType::kUInt8, {B, h, n, D / 2}, "data"),
                       make_view(s.data(), DType::kUInt8, {B, h, n, D / 16}, "scales"), gv};
        const Status st = quantize(make_view(x.data(), DType::kFloat32, {B, h, n, D}, "x"), t.data,
                                   t.scales, gv, QuantizeOptions{});
        EXPECT_TRUE(st.ok()) << st.message();
        return t;
      };
      std::vector<uint8_t> qd, qs, kd, ks, vd, vs;
      const PackedTensor q = pack(p.q, Hq, Nq, qd, qs), k = pack(p.k, Hkv, Nk, kd, ks),
                         v = pack(p.v, Hkv, Nk, vd, vs);
      AttentionOptions opts = test::options(Mode::kFP4, pq, causal);
      std::vector<float> o(B * Hq * Nq * D, NAN), lse(B * Hq * Nq, NAN);
      ForwardOutputs out;
      out.o = make_view(o.data(), DType::kFloat32, {B, Hq, Nq, D}, "o");
      out.lse = make_view(lse.data(), DType::kFloat32, {B, Hq, Nq}, "lse");
      const Status st = attention_forward_packed(q, k, v, opts, out);
      ASSERT_TRUE(st.ok()) << st.message();
      auto f = test::forward(p, opts, /*with_hp=*/false);  // quantizes the raw tensors itself
      for (size_t i = 0; i < o.size(); ++i) ASSERT_EQ(std::memcmp(&o[i], &f.o[i], 4), 0) << i;
      for (size_t i = 0; i < lse.size(); ++i) ASSERT_EQ(std::memcmp(&lse[i], &f.lse[i], 4), 0) << i;
    }
}

// ---- Bad input ----------------------------------------------------------------------------------

class DecodeArgs : public ::testing::Test {
 protected:
  HostCache cache{2, 40, 2, 32, 16, 9};
  std::vector<float> q = std::vector<float>(2 * 4 * 1 * 32, 0.5f), out = q, lse = std::vector<float>(8);
  DecodeArgs() {
    std::vector<float> k(2 * 2 * 20 * 32, 1.0f), v = k;
    cache.append(k, v, 20);
  }
  Status decode(const IndexView& table, const IndexView& lens) {
    return decode_attention(make_view(q.data(), DType::kFloat32, {2, 4, 1, 32}, "q"), cache.view(), table, lens,
                            DecodeOptions{}, make_view(out.data(), DType::kFloat32, {2, 4, 1, 32}, "out"),
                            make_view(lse.data(), DType::kFloat32, {2, 4, 1}, "lse"));
  }
};

TEST_F(DecodeArgs, ValidCallSucceeds) { EXPECT_TRUE(decode(cache.table_view(), cache.lens_view()).ok()); }

TEST_F(DecodeArgs, WindowLeftBelowMinusOne) {
  DecodeOptions opts;
  opts.window_left = -2;
  const Status st = decode_attention(make_view(q.data(), DType::kFloat32, {2, 4, 1, 32}, "q"), cache.view(),
                                     cache.table_view(), cache.lens_view(), opts,
                                     make_view(out.data(), DType::kFloat32, {2, 4, 1, 32}, "out"), TensorView{});
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("window_left: expected -1 (no window) or a number of keys >= 0"), std::string::npos)
      << st.message();
  EXPECT_NE(st.message().find("got -2"), std::string::npos) << st.message();
  EXPECT_EQ(validate_decode_options(opts).code(), StatusCode::kInvalidArgument);
  opts.window_left = 0;
  EXPECT_TRUE(validate_decode_options(opts).ok());
}

TEST_F(DecodeArgs, PageIdOutOfRange) {
  cache.page_table[1] = static_cast<int32_t>(cache.num_pages);  // sequence 0, its second page
  const Status st = decode(cache.table_view(), cache.lens_view());
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("page_table[0, 1]: page id"), std::string::npos) << st.message();
  EXPECT_NE(st.message().find("out of range"), std::string::npos) << st.message();
}

TEST_F(DecodeArgs, LengthBeyondCapacity) {
  cache.lens[1] = static_cast<int32_t>(cache.pages_per_seq * cache.page_size + 1);
  const Status st = decode(cache.table_view(), cache.lens_view());
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("beyond the capacity"), std::string::npos) << st.message();
}

TEST_F(DecodeArgs, AppendBeyondCapacity) {
  std::vector<float> k(2 * 2 * 30 * 32, 1.0f), v = k;
  const Status st = kv_cache_append(cache.view(), make_view(k.data(), DType::kFloat32, {2, 2, 30, 32}, "k_new"),
                                    make_view(v.data(), DType::kFloat32, {2, 2, 30, 32}, "v_new"),
                                    cache.table_view(), cache.lens_view());
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("beyond the capacity"), std::string::npos) << st.message();
}

TEST_F(DecodeArgs, WrongDtypes) {
  std::vector<uint8_t> k(2 * 2 * 1 * 32), v = k;
  Status st = kv_cache_append(cache.view(), make_view(k.data(), DType::kUInt8, {2, 2, 1, 32}, "k_new"),
                              make_view(v.data(), DType::kUInt8, {2, 2, 1, 32}, "v_new"), cache.table_view(),
                              cache.lens_view());
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("k_new: expected dtype float32, float16 or bfloat16"), std::string::npos)
      << st.message();
  PagedKVCache bad = cache.view();
  bad.k_scales.dtype = DType::kFloat16;
  st = decode_attention(make_view(q.data(), DType::kFloat32, {2, 4, 1, 32}, "q"), bad, cache.table_view(),
                        cache.lens_view(), DecodeOptions{}, make_view(out.data(), DType::kFloat32, {2, 4, 1, 32}, "out"),
                        TensorView{});
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("k_scales: expected dtype uint8"), std::string::npos) << st.message();
}

TEST_F(DecodeArgs, ShapesAndPageSize) {
  // Query heads not a multiple of the kv heads.
  Status st = decode_attention(make_view(q.data(), DType::kFloat32, {2, 3, 1, 32}, "q"), cache.view(),
                               cache.table_view(), cache.lens_view(), DecodeOptions{},
                               make_view(out.data(), DType::kFloat32, {2, 3, 1, 32}, "out"), TensorView{});
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("multiple of the cache's kv heads"), std::string::npos) << st.message();
  // A page size that is not a multiple of 16.
  PagedKVCache bad = cache.view();
  for (TensorView* t : {&bad.k_data, &bad.k_scales, &bad.v_data, &bad.v_scales}) {
    t->shape[2] = 8;
    t->shape[0] *= 2;
    for (int i = 3; i >= 0; --i) t->stride[i] = i == 3 ? 1 : t->stride[i + 1] * t->shape[i + 1];
  }
  st = decode_attention(make_view(q.data(), DType::kFloat32, {2, 4, 1, 32}, "q"), bad, cache.table_view(),
                        cache.lens_view(), DecodeOptions{}, make_view(out.data(), DType::kFloat32, {2, 4, 1, 32}, "out"),
                        TensorView{});
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("multiple of 16"), std::string::npos) << st.message();
  // A page table row count that is not the batch.
  st = decode(index_view(cache.page_table, 1, cache.pages_per_seq, "page_table"), cache.lens_view());
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("one row per sequence"), std::string::npos) << st.message();
}

TEST(AttentionPackedArgs, ModeMustBeFp4) {
  std::vector<uint8_t> d(64 / 2), s(64 / 16);
  float g = 1.0f;
  const TensorView gv = make_view(&g, DType::kFloat32, {1}, "g");
  PackedTensor t{make_view(d.data(), DType::kUInt8, {1, 1, 1, 32}, "data"),
                 make_view(s.data(), DType::kUInt8, {1, 1, 1, 4}, "scales"), gv};
  std::vector<float> o(64), lse(1);
  ForwardOutputs out;
  out.o = make_view(o.data(), DType::kFloat32, {1, 1, 1, 64}, "o");
  out.lse = make_view(lse.data(), DType::kFloat32, {1, 1, 1}, "lse");
  AttentionOptions opts;  // attn_qat
  Status st = attention_forward_packed(t, t, t, opts, out);
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("mode 'fp4'"), std::string::npos) << st.message();
  opts.mode = Mode::kFP4;
  EXPECT_TRUE(attention_forward_packed(t, t, t, opts, out).ok());
  PackedTensor bad = t;
  bad.scales = make_view(s.data(), DType::kUInt8, {1, 1, 1, 2}, "scales");
  st = attention_forward_packed(bad, t, t, opts, out);
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("one E4M3 byte per 16 channels"), std::string::npos) << st.message();
}

}  // namespace
}  // namespace attnqat
