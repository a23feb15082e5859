// tests/cpp/cuda_decode/test_decode_cuda.cpp — the CUDA FP4 inference paths against the CPU
// reference (label cuda):
//  - kv_cache_append on the GPU writes the same bytes as the CPU append (codes and scales bit
//    for bit; slots nobody wrote keep their poison pattern), from strided bf16/fp16/fp32 inputs;
//  - decode_attention on the GPU against reference::decode_attention (the mode-fp4 forward over
//    the dequantized cache) on the same cache bytes and the same 16-bit queries; with sliding
//    windows, the K and V scales of the tokens that no query row sees are poisoned (E4M3 NaN)
//    after the append: the reference never reads them, and they must not reach the kernel's
//    output either;
//  - attention_forward_packed on the GPU is bit-identical to attention_forward on the GPU with the
//    decoded tensors (it is that forward, after an exact decode).
//
// Decode tolerances (numerics section 8), per output:
//  - O: relative L2 error against the fp64 reference (Precision::kFloat64; fp32 output) at most
//    2x the error of the fp32 reference rounded to the output dtype (the contract's arithmetic,
//    the same output rounding as the kernel) plus a floor of 2e-3. Why a floor: ex2.approx and
//    the fused exponent FMA move the P elements that sit within ~1e-7 of an E2M1 or E4M3
//    boundary to the other side, each flip worth a whole E2M1 step of that element (the sm90
//    forward tests use 1e-3; decode rows are single query rows, so a flip weighs more).
//  - LSE: |GPU - fp64| <= 2e-5 max(1, |LSE|) (ex2.approx / lg2.approx, ~2^-22 each).
//  - Rows that see no key: O = 0 exactly, LSE = -inf. Outputs are poisoned (NaN) before the run.
// On failure: the error norms, the worst element (sequence, head, query, channel).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <deque>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "attention_util.h"
#include "attnqat/attnqat.h"
#include "common/validate.h"
#include "decode_util.h"
#include "gpu_util.h"
#include "reference/decode.h"

namespace attnqat::gpu_test {
namespace {

using test::HostCache;
using test::index_view;

constexpr int64_t kD = 128;

struct Case {
  const char* name;
  int64_t hkv, group, nq, page_size;
  std::vector<int64_t> lens;
  PQuant pq = PQuant::kAnchored;
  DType dt = DType::kBFloat16;
  int num_splits = 0;     // 0: automatic
  int64_t chunk = 61;     // tokens per append call
  DType append_dt = DType::kBFloat16;
  int64_t d = kD;         // head dim (the kernel is built for 64 and 128)
  int window_left = -1;   // DecodeOptions::window_left
};

// The device copy of a HostCache: same shapes, same poison pattern.
struct DeviceCache {
  DeviceBuffer k_data, k_scales, v_data, v_scales, table, lens;
  PagedKVCache view;
  explicit DeviceCache(HostCache& h) {
    auto up = [](DeviceBuffer& d, const std::vector<uint8_t>& v) {
      d = DeviceBuffer(v.size());
      d.upload(v.data(), v.size());
    };
    up(k_data, h.k_data);
    up(k_scales, h.k_scales);
    up(v_data, h.v_data);
    up(v_scales, h.v_scales);
    table = DeviceBuffer(h.page_table.size() * 4);
    table.upload(h.page_table.data(), h.page_table.size() * 4);
    lens = DeviceBuffer(h.B * 4);
    view = h.view(Device::kCUDA);
    view.k_data.data = k_data.get();
    view.k_scales.data = k_scales.get();
    view.v_data.data = v_data.get();
    view.v_scales.data = v_scales.get();
  }
  std::vector<uint8_t> download(const DeviceBuffer& d) const {
    std::vector<uint8_t> v(d.size());
    d.download(v.data(), v.size());
    return v;
  }
};

// Stores x (fp32) as `dt` in device memory.
DeviceBuffer upload_as(const std::vector<float>& x, DType dt) {
  DeviceBuffer buf(std::max<size_t>(x.size() * dtype_size(dt), 16));
  if (dt == DType::kFloat32) {
    buf.upload(x.data(), x.size() * 4);
  } else {
    const std::vector<uint16_t> h = to_half(x, dt);
    buf.upload(h.data(), h.size() * 2);
  }
  return buf;
}

// Rounds x to `dt` (what the GPU sees), in place.
void round_to(std::vector<float>& x, DType dt) {
  if (dt == DType::kFloat32) return;
  x = from_half(to_half(x, dt), dt);
}

// Appends every sequence on the GPU with B = 1 calls of `chunk` tokens, from one device copy
// of the whole sequence viewed with strides [H*L*D, L*D, D, 1].
void append_on_gpu(DeviceCache& dc, HostCache& h, const test::SeqKV& seqs, const std::vector<int64_t>& lens,
                   int64_t chunk, DType dt) {
  const int64_t H = h.heads, D = h.D;
  std::vector<int32_t> cur(h.B, 0);
  for (int64_t b = 0; b < h.B; ++b) {
    if (lens[b] == 0) continue;
    const DeviceBuffer kb = upload_as(seqs.k[b], dt), vb = upload_as(seqs.v[b], dt);
    for (int64_t t0 = 0; t0 < lens[b]; t0 += chunk) {
      const int64_t n = std::min(chunk, lens[b] - t0);
      auto strided = [&](const DeviceBuffer& buf, const char* name) {
        TensorView t = cuda_view(static_cast<uint8_t*>(buf.get()) + t0 * D * dtype_size(dt), dt, {1, H, n, D}, name);
        t.stride[0] = H * lens[b] * D;
        t.stride[1] = lens[b] * D;
        return t;
      };
      cuda_check(cudaMemcpy(static_cast<int32_t*>(dc.lens.get()) + b, &cur[b], 4, cudaMemcpyHostToDevice), "lens");
      const IndexView table = index_view(h.page_table, 1, h.pages_per_seq, "page_table", Device::kCUDA,
                                         static_cast<const int32_t*>(dc.table.get()) + b * h.pages_per_seq);
      const IndexView start = index_view(cur, 1, -1, "start", Device::kCUDA,
                                         static_cast<const int32_t*>(dc.lens.get()) + b);
      const Status st = kv_cache_append(dc.view, strided(kb, "k_new"), strided(vb, "v_new"), table, start);
      ASSERT_TRUE(st.ok()) << st.message();
      cur[b] += static_cast<int32_t>(n);
    }
  }
  cuda_check(cudaMemcpy(dc.lens.get(), cur.data(), h.B * 4, cudaMemcpyHostToDevice), "lens");
  cuda_check(cudaDeviceSynchronize(), "append");
}

// Writes the E4M3 NaN scale over the K and V of every token that no query row of its sequence
// sees under the window (those before query token 0's window, t < len - nq - window_left), in
// the host cache and its device copy. Scales only: a NaN scale poisons every value of its block.
void poison_before_window(HostCache& h, DeviceCache& dev, const std::vector<int64_t>& lens, int64_t nq,
                          int window_left) {
  const int64_t nblk = h.D / 16;
  for (int64_t b = 0; b < h.B; ++b)
    for (int64_t t = 0; t < lens[b] - nq - window_left; ++t)
      for (int64_t head = 0; head < h.heads; ++head) {
        const int64_t page = h.page_table[b * h.pages_per_seq + t / h.page_size];
        const int64_t row = (page * h.heads + head) * h.page_size + t % h.page_size;
        for (int64_t j = 0; j < nblk; ++j) h.k_scales[row * nblk + j] = h.v_scales[row * nblk + j] = kE4M3NaN;
      }
  dev.k_scales.upload(h.k_scales.data(), h.k_scales.size());
  dev.v_scales.upload(h.v_scales.data(), h.v_scales.size());
}

double rel_l2(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (std::isnan(a[i]) || std::isnan(b[i])) return std::numeric_limits<double>::infinity();
    num += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
    den += double(b[i]) * b[i];
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

class DecodeCuda : public Sm90Test, public ::testing::WithParamInterface<Case> {};

TEST_P(DecodeCuda, MatchesReference) {
  const Case c = GetParam();
  const int64_t D = c.d;  // this case's head dim
  const int64_t B = static_cast<int64_t>(c.lens.size()), H = c.hkv, Hq = H * c.group, nq = c.nq;
  int64_t max_len = 1;
  for (int64_t l : c.lens) max_len = std::max(max_len, l);
  HostCache host(B, max_len, H, D, c.page_size, 101);
  DeviceCache dev(host);
  test::SeqKV seqs = test::random_seqs(c.lens, H, D, 202);
  for (auto& k : seqs.k) round_to(k, c.append_dt);  // the values the GPU append reads
  for (auto& v : seqs.v) round_to(v, c.append_dt);
  test::fill_cache(host, seqs, c.lens, c.chunk);
  append_on_gpu(dev, host, seqs, c.lens, c.chunk, c.append_dt);
  if (::testing::Test::HasFatalFailure()) return;

  // 1. The cache bytes, bit for bit (written slots and the untouched poison alike).
  for (int i = 0; i < 4; ++i) {
    const std::vector<uint8_t>& want = i == 0 ? host.k_data : i == 1 ? host.k_scales : i == 2 ? host.v_data : host.v_scales;
    const std::vector<uint8_t> got = dev.download(i == 0 ? dev.k_data : i == 1 ? dev.k_scales : i == 2 ? dev.v_data : dev.v_scales);
    int64_t bad = 0, first = -1;
    for (size_t j = 0; j < want.size(); ++j)
      if (want[j] != got[j]) bad++, first = first < 0 ? static_cast<int64_t>(j) : first;
    ASSERT_EQ(bad, 0) << c.name << ": cache tensor " << i << " differs from the CPU append in " << bad
                      << " bytes, first at " << first;
  }
  if (c.window_left >= 0) poison_before_window(host, dev, c.lens, nq, c.window_left);

  // 2. Decode.
  auto qp = test::random_problem<float>(B, Hq, H, nq, 1, D, 303);
  round_to(qp.q, c.dt);
  const DeviceBuffer qd = upload_as(qp.q, c.dt);
  DeviceBuffer od(B * Hq * nq * D * 2), ld(B * Hq * nq * 4);
  od.poison();
  ld.poison();
  DecodeOptions opts;
  opts.p_quant = c.pq;
  opts.num_splits = c.num_splits;
  opts.window_left = c.window_left;
  const IndexView table = index_view(host.page_table, B, host.pages_per_seq, "page_table", Device::kCUDA,
                                     static_cast<const int32_t*>(dev.table.get()));
  const IndexView lens = index_view(host.lens, B, -1, "seq_lens", Device::kCUDA, static_cast<const int32_t*>(dev.lens.get()));
  Status st = decode_attention(cuda_view(qd.get(), c.dt, {B, Hq, nq, D}, "q"), dev.view, table, lens, opts,
                               cuda_view(od.get(), c.dt, {B, Hq, nq, D}, "out"),
                               cuda_view(ld.get(), DType::kFloat32, {B, Hq, nq}, "lse"));
  ASSERT_TRUE(st.ok()) << st.message();
  cuda_check(cudaDeviceSynchronize(), "decode");
  std::vector<uint16_t> o16(B * Hq * nq * D);
  std::vector<float> lse(B * Hq * nq);
  od.download(o16.data(), o16.size() * 2);
  ld.download(lse.data(), lse.size() * 4);
  const std::vector<float> o = from_half(o16, c.dt);

  // References on the CPU cache: fp32 contract rounded to the output dtype, and fp64.
  KVCacheDims dims{host.num_pages, H, c.page_size, D};
  const TensorView q32 = make_view(qp.q.data(), DType::kFloat32, {B, Hq, nq, D}, "q");
  std::vector<uint16_t> r16(o16.size());
  std::vector<float> r64(o16.size()), lse64(lse.size()), lse32(lse.size());
  AttentionOptions base;
  st = reference::decode_attention(q32, host.view(), dims, host.table_view(), host.lens_view(), opts,
                                   make_view(r16.data(), c.dt, {B, Hq, nq, D}, "out"),
                                   make_view(lse32.data(), DType::kFloat32, {B, Hq, nq}, "lse"), base);
  ASSERT_TRUE(st.ok()) << st.message();
  base.precision = Precision::kFloat64;
  st = reference::decode_attention(q32, host.view(), dims, host.table_view(), host.lens_view(), opts,
                                   make_view(r64.data(), DType::kFloat32, {B, Hq, nq, D}, "out"),
                                   make_view(lse64.data(), DType::kFloat32, {B, Hq, nq}, "lse"), base);
  ASSERT_TRUE(st.ok()) << st.message();
  const std::vector<float> r32 = from_half(r16, c.dt);

  const double err_gpu = rel_l2(o, r64), err_ref = rel_l2(r32, r64);
  const double tol = 2 * err_ref + 2e-3;
  size_t worst = 0;
  for (size_t i = 0; i < o.size(); ++i)
    if (!(std::fabs(o[i] - r64[i]) <= std::fabs(o[worst] - r64[worst]))) worst = i;
  EXPECT_LE(err_gpu, tol) << c.name << ": O rel L2 vs fp64 " << err_gpu << " (fp32 reference: " << err_ref
                          << "), GPU vs fp32 reference " << rel_l2(o, r32) << "; worst element (b, h, i, d) = ("
                          << worst / (Hq * nq * D) << ", " << worst / (nq * D) % Hq << ", " << worst / D % nq
                          << ", " << worst % D << "): " << o[worst] << " vs " << r64[worst];
  int64_t lse_bad = 0;
  for (size_t i = 0; i < lse.size(); ++i) {
    if (std::isinf(lse64[i])) {
      lse_bad += !(std::isinf(lse[i]) && lse[i] < 0);
      for (int64_t d = 0; d < D; ++d) lse_bad += o[i * D + d] != 0.0f;
    } else {
      lse_bad += !(std::fabs(lse[i] - lse64[i]) <= 2e-5 * std::max(1.0f, std::fabs(lse64[i])));
    }
  }
  EXPECT_EQ(lse_bad, 0) << c.name << ": rows whose LSE (or empty-row O) is off";
}

std::vector<Case> cases() {
  std::vector<Case> v = {
      {"len1_gqa4", 2, 4, 1, 16, {1}},
      {"len15_gqa4", 2, 4, 1, 16, {15}},
      {"len16_gqa1", 4, 1, 1, 16, {16}},
      {"len17_gqa8", 1, 8, 1, 32, {17}},
      {"len4095_gqa4_ps64", 2, 4, 1, 64, {4095}},
      {"len4095_gqa8_ps48", 2, 8, 1, 48, {4095}},
      {"len100k_gqa4_ps256", 2, 4, 1, 256, {100000}},
      {"mixed_batch_ps16", 2, 4, 1, 16, {4095, 1, 17, 300, 16, 1000, 15, 2048}},
      {"mixed_batch_nq3_fp16", 2, 4, 3, 32, {700, 2, 3, 129}},
      {"nq4_gqa8_two_row_groups", 1, 8, 4, 64, {513, 77}},
      {"gqa16_nq1", 1, 16, 1, 128, {1500}},
      {"paper_mixed", 2, 4, 1, 64, {4095, 17, 300}},
      {"paper_nq2", 2, 4, 2, 16, {1000, 1}},
      {"forced_splits_7", 2, 4, 1, 128, {5000, 900}},
      {"fp32_append_fp16_q", 2, 4, 1, 16, {333}},
      {"gqa2_nq2_packed_rows", 2, 2, 2, 32, {700, 3, 129}},  // rows = 4: the packed-rows kernel, causal
      {"gqa4_fp16_packed_rows", 3, 4, 1, 64, {2500, 31, 64}},
      // Head dim 64 (the Llama-3.2-1B / Qwen2.5-0.5B class): packed rows, plain rows, paper,
      // forced splits, mixed lengths and page sizes, fp16.
      {"d64_len4095_gqa4_ps64", 2, 4, 1, 64, {4095}},
      {"d64_mixed_batch_ps16", 2, 4, 1, 16, {4095, 1, 17, 300, 16, 1000, 15, 2048}},
      {"d64_nq4_gqa8_two_row_groups", 1, 8, 4, 64, {513, 77}},
      {"d64_len17_gqa8_ps48", 1, 8, 1, 48, {17, 4095}},
      {"d64_paper_mixed", 2, 4, 1, 64, {4095, 17, 300}},
      {"d64_forced_splits_7_fp16", 2, 4, 1, 128, {5000, 900}},
      {"d64_len100k_gqa4_ps256", 1, 4, 1, 256, {100000}},
  };
  v[8].dt = DType::kFloat16;
  v[11].pq = PQuant::kPaper;
  v[12].pq = PQuant::kPaper;
  v[13].num_splits = 7;
  v[14].append_dt = DType::kFloat32;
  v[14].dt = DType::kFloat16;
  v[6].chunk = 4096;
  v[16].dt = DType::kFloat16;
  v[7].chunk = 16;
  for (size_t i = 17; i < v.size(); ++i) v[i].d = 64;
  v[21].pq = PQuant::kPaper;
  v[22].num_splits = 7;
  v[22].dt = DType::kFloat16;
  v[23].chunk = 4096;
  // Sliding windows: only the diagonal key (0), one more (1), a tile's worth (127, 128) and
  // wider than most sequences (4096); one query token (GQA 4: packed rows for anchored) and four
  // (GQA 2: 8 rows, each query token its own window); page size 16, both P quantizations, head
  // dims 64 and 128, bf16 and fp16 queries; mixed lengths: shorter than the window, shorter than
  // nq (rows that see no key), windows starting mid-page and mid-tile, long contexts where most
  // pages lie before the window (anchored: the splits cover the window only).
  static const char* const kWindowNames[] = {
      "win0", "win1", "win127", "win128", "win4096"};
  const int kWindows[] = {0, 1, 127, 128, 4096};
  const std::vector<int64_t> window_lens = {4095, 1, 17, 300, 16, 1000, 130, 2048, 9000};
  static std::deque<std::string> names;  // Case::name points into it (a deque never moves them)
  const size_t first_name = names.size();
  for (int w = 0; w < 5; ++w)
    for (const int64_t nq : {1, 4})
      for (const PQuant pq : {PQuant::kAnchored, PQuant::kPaper})
        for (const int64_t d : {128, 64}) {
          names.push_back(std::string(kWindowNames[w]) + "_nq" + std::to_string(nq) +
                          (pq == PQuant::kPaper ? "_paper" : "_anchored") + "_d" + std::to_string(d));
          Case wc{nullptr, 2, nq == 1 ? 4 : 2, nq, 16, window_lens};
          wc.pq = pq;
          wc.d = d;
          wc.window_left = kWindows[w];
          wc.dt = (w + nq) % 2 == 0 ? DType::kFloat16 : DType::kBFloat16;
          wc.chunk = 1000;
          v.push_back(wc);
        }
  for (size_t i = first_name; i < names.size(); ++i) v[v.size() - (names.size() - i)].name = names[i].c_str();
  return v;
}

INSTANTIATE_TEST_SUITE_P(Cases, DecodeCuda, ::testing::ValuesIn(cases()),
                         [](const auto& info) { return std::string(info.param.name); });

// ---- Attention from packed tensors: the CUDA forward on the decoded tensors, bit for bit -------
//
// attention_forward_packed decodes Q, K, V inside the sm90 kernel (fwd_packed.cuh) or into
// temporaries; either way its operands must be exactly dequantize()'s, so its O and LSE must
// equal, bit for bit, those of attention_forward (inputs_quantized) on the dequantized tensors:
// same consumers, same operands. Every case runs both paths (and auto).
// Cases cover both decode paths: the fast one (g = 1 and other powers of two in range) and the
// exact per-element one (g outside the fast range of the dtype: fp16 2^-20 / 2^6, bf16 2^-120),
// key and query tails (N not a multiple of 128), GQA, both masks, both p_quant, d 64 and 128, V
// blocked along the tokens (K, V into temporaries, Q still decoded in the kernel) and Q at an
// address the kernel cannot copy from (everything into temporaries).

struct PackedCase {
  const char* name;
  DType dt;
  int64_t d, nq, nk;
  bool causal;
  PQuant pq;
  float gq, gk, gv;
  bool v_token = false;
  bool q_misaligned = false;  // Q's codes 8 bytes off a 16-byte boundary: no in-kernel unpack
};

class PackedCuda : public Sm90Test, public ::testing::WithParamInterface<PackedCase> {};

TEST_P(PackedCuda, BitIdenticalToForwardOnDecodedTensors) {
  const PackedCase& c = GetParam();
  const int64_t B = 2, Hq = 8, Hkv = 2, D = c.d, Nq = c.nq, Nk = c.nk;
  const size_t es = 2;
  auto p = test::random_problem<float>(B, Hq, Hkv, Nq, Nk, D, 7);
  struct Packed {
    DeviceBuffer x, d, s, g, hat;
    PackedTensor t;
    TensorView hat_view;
  };
  auto pack = [&](std::vector<float>& x, int64_t h, int64_t n, float g, bool token_axis) {
    Packed r;
    // Scale the data with g so that the codes use their range whatever g is.
    for (float& e : x) e *= g;
    r.x = upload_as(x, c.dt);
    r.g = DeviceBuffer(4);
    r.g.upload(&g, 4);
    const TensorView gv = cuda_view(r.g.get(), DType::kFloat32, {1}, "g");
    // Token axis (V): data [B, H, D, ceil(N/16) * 8], scales [B, H, D, ceil(N/16)].
    const int64_t nb = (n + 15) / 16;
    const int64_t dshape2 = token_axis ? D : n, dshape3 = token_axis ? nb * 8 : D / 2;
    const int64_t sshape2 = token_axis ? D : n, sshape3 = token_axis ? nb : D / 16;
    r.d = DeviceBuffer(B * h * dshape2 * dshape3);
    r.s = DeviceBuffer(B * h * sshape2 * sshape3);
    r.hat = DeviceBuffer(B * h * n * D * es);
    r.t = PackedTensor{cuda_view(r.d.get(), DType::kUInt8, {B, h, dshape2, dshape3}, "data"),
                       cuda_view(r.s.get(), DType::kUInt8, {B, h, sshape2, sshape3}, "scales"), gv};
    QuantizeOptions qo;
    if (token_axis) qo.axis = BlockAxis::kToken;
    const TensorView xv = cuda_view(r.x.get(), c.dt, {B, h, n, D}, "x");
    Status st = quantize(xv, r.t.data, r.t.scales, gv, qo);
    EXPECT_TRUE(st.ok()) << st.message();
    r.hat_view = cuda_view(r.hat.get(), c.dt, {B, h, n, D}, "hat");
    st = dequantize(r.t.data, r.t.scales, gv, r.hat_view, qo);
    EXPECT_TRUE(st.ok()) << st.message();
    return r;
  };
  Packed q = pack(p.q, Hq, Nq, c.gq, false), k = pack(p.k, Hkv, Nk, c.gk, false);
  Packed v = pack(p.v, Hkv, Nk, c.gv, c.v_token);
  DeviceBuffer q_moved;
  if (c.q_misaligned) {  // the same bytes at an address that is 8 mod 16
    q_moved = DeviceBuffer(q.d.size() + 16);
    uint8_t* dst = static_cast<uint8_t*>(q_moved.get()) + 8;
    cuda_check(cudaMemcpy(dst, q.d.get(), q.d.size(), cudaMemcpyDeviceToDevice), "copy");
    q.t.data = cuda_view(dst, DType::kUInt8, {B, Hq, Nq, D / 2}, "data");
  }
  AttentionOptions opts = test::options(Mode::kFP4, c.pq, c.causal);
  if (c.v_token) opts.v_blocks = VBlocks::kToken;
  ASSERT_TRUE(q.t.data.data && k.t.data.data && v.t.data.data);
  const int64_t on = B * Hq * Nq;
  // The reference: the forward on the decoded tensors.
  DeviceBuffer o2(on * D * es), l2(on * 4);
  o2.poison();
  l2.poison();
  ForwardOutputs f2;
  f2.o = cuda_view(o2.get(), c.dt, {B, Hq, Nq, D}, "o");
  f2.lse = cuda_view(l2.get(), DType::kFloat32, {B, Hq, Nq}, "lse");
  AttentionOptions opts2 = opts;
  opts2.inputs_quantized = true;
  Status st = attention_forward(q.hat_view, k.hat_view, v.hat_view, opts2, f2);
  ASSERT_TRUE(st.ok()) << st.message();
  std::vector<uint16_t> b(o2.size() / 2);
  std::vector<float> lb(on);
  cuda_check(cudaDeviceSynchronize(), "forward");
  o2.download(b.data(), o2.size());
  l2.download(lb.data(), l2.size());
  // The comparison is not vacuous: O is not all zero (and the outputs below start poisoned).
  int64_t nonzero = 0;
  for (uint16_t x : b) nonzero += (x & 0x7FFF) != 0;
  EXPECT_GT(nonzero, static_cast<int64_t>(b.size()) / 2);

  for (const PackedUnpack where : {PackedUnpack::kInKernel, PackedUnpack::kTemporary, PackedUnpack::kAuto}) {
    const char* wname = where == PackedUnpack::kInKernel ? "in-kernel" : where == PackedUnpack::kTemporary ? "temporary" : "auto";
    DeviceBuffer o1(on * D * es), l1(on * 4);
    o1.poison();
    l1.poison();
    ForwardOutputs f1;
    f1.o = cuda_view(o1.get(), c.dt, {B, Hq, Nq, D}, "o");
    f1.lse = cuda_view(l1.get(), DType::kFloat32, {B, Hq, Nq}, "lse");
    st = attention_forward_packed(q.t, k.t, v.t, opts, f1, nullptr, where);
    if ((c.v_token || c.q_misaligned) && where == PackedUnpack::kInKernel) {  // not fusable
      EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
      EXPECT_NE(st.message().find("in-kernel unpack needs"), std::string::npos) << st.message();
      continue;
    }
    ASSERT_TRUE(st.ok()) << wname << ": " << st.message();
    cuda_check(cudaDeviceSynchronize(), "packed forward");
    std::vector<uint16_t> a(o1.size() / 2);
    std::vector<float> la(on);
    o1.download(a.data(), o1.size());
    l1.download(la.data(), l1.size());
    int64_t o_diff = 0, l_diff = 0, first = -1;
    for (size_t i = 0; i < a.size(); ++i)
      if (a[i] != b[i]) o_diff++, first = first < 0 ? static_cast<int64_t>(i) : first;
    for (int64_t i = 0; i < on; ++i) l_diff += std::memcmp(&la[i], &lb[i], 4) != 0;
    EXPECT_EQ(o_diff, 0) << wname << ": O elements that differ from the forward on the decoded "
                         << "tensors; first at " << first;
    EXPECT_EQ(l_diff, 0) << wname << ": LSE rows that differ";
  }
}

const float kTiny = 1.0f / (1 << 20);  // 2^-20
std::vector<PackedCase> packed_cases() {
  const float two_m120 = std::ldexp(1.0f, -120);
  return {
      {"bf16_d128_g1", DType::kBFloat16, 128, 300, 333, false, PQuant::kAnchored, 1, 1, 1},
      {"bf16_d128_causal_paper", DType::kBFloat16, 128, 300, 333, true, PQuant::kPaper, 1, 1, 1},
      {"bf16_d128_pow2", DType::kBFloat16, 128, 129, 600, true, PQuant::kAnchored, 0.125f, 4.0f, 0.03125f},
      {"bf16_d128_slow_g", DType::kBFloat16, 128, 200, 250, false, PQuant::kPaper, 1, two_m120, 1},
      {"bf16_d64", DType::kBFloat16, 64, 300, 333, true, PQuant::kAnchored, 0.5f, 1, 2},
      {"fp16_d128", DType::kFloat16, 128, 300, 333, false, PQuant::kAnchored, 1, 0.25f, 8},
      {"fp16_d128_slow_g", DType::kFloat16, 128, 100, 400, true, PQuant::kPaper, kTiny, 64.0f, 1},
      {"fp16_d64_causal", DType::kFloat16, 64, 257, 130, true, PQuant::kPaper, 1, 1, 1},
      {"fp16_d64_slow_g", DType::kFloat16, 64, 64, 64, false, PQuant::kAnchored, 1, 1, kTiny},
      {"bf16_d128_short", DType::kBFloat16, 128, 1, 17, false, PQuant::kAnchored, 1, 1, 1},
      {"bf16_d128_v_token", DType::kBFloat16, 128, 100, 320, false, PQuant::kAnchored, 1, 1, 1, true},
      {"fp16_d64_q_misaligned", DType::kFloat16, 64, 150, 200, true, PQuant::kAnchored, 1, 1, 1, false, true},
  };
}

INSTANTIATE_TEST_SUITE_P(Cases, PackedCuda, ::testing::ValuesIn(packed_cases()),
                         [](const auto& info) { return std::string(info.param.name); });

class PackedErrors : public Sm90Test {};

// decode_attention over an empty cache of head dim D, queries and output of `dt`.
Status decode_one(int64_t D, DType dt) {
  HostCache h(1, 16, 1, D, 16, 1);
  DeviceCache dev(h);
  DeviceBuffer q(D * dtype_size(dt)), o(D * dtype_size(dt));
  const IndexView table = index_view(h.page_table, 1, h.pages_per_seq, "page_table", Device::kCUDA,
                                     static_cast<const int32_t*>(dev.table.get()));
  const IndexView lens = index_view(h.lens, 1, -1, "seq_lens", Device::kCUDA, static_cast<const int32_t*>(dev.lens.get()));
  return decode_attention(cuda_view(q.get(), dt, {1, 1, 1, D}, "q"), dev.view, table, lens, DecodeOptions{},
                          cuda_view(o.get(), dt, {1, 1, 1, D}, "out"), TensorView{});
}

TEST_F(PackedErrors, DecodeRejectsFloat32Queries) {
  const Status st = decode_one(kD, DType::kFloat32);
  EXPECT_EQ(st.code(), StatusCode::kNotImplemented);
  EXPECT_NE(st.message().find("bfloat16 or float16"), std::string::npos) << st.message();
}

// Head dims other than 64 and 128: a clear error (the CPU reference takes them).
TEST_F(PackedErrors, DecodeRejectsHeadDim96) {
  const Status st = decode_one(96, DType::kBFloat16);
  EXPECT_EQ(st.code(), StatusCode::kNotImplemented);
  EXPECT_NE(st.message().find("head_dim 64 and 128"), std::string::npos) << st.message();
}

}  // namespace
}  // namespace attnqat::gpu_test
