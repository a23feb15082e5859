// Packed sequences (varlen) on the sm90 kernels: one call over S sequences of mixed lengths must
// give, row for row, the bits of S separate dense calls on each sequence's rows (same kernels,
// same per-sequence tiles: only the padding rows of a tile differ — the next sequence's rows
// instead of zeros — and those are masked keys, which contribute exact zeros, or query rows that
// are never written). The dense calls are themselves tested against the CPU reference
// (test_attention_fwd.cpp, ../cuda_attention_bwd). The backward is compared bit for bit in the
// deterministic mode; with the default bulk reduce-add of dQ only dK and dV are ordered, and dQ
// is compared to within the rounding of a different summation order. With attention sinks
// (numerics 9.10, 9.11) the sinks' gradient of the varlen call is the sum over the sequences of
// the dense calls' dsinks, within the rounding of another fp32 summation order (see below).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "attention_util.h"
#include "gpu_util.h"

namespace attnqat::gpu_test {
namespace {

struct VarlenCase {
  const char* name;
  Mode mode;
  PQuant pq;
  test::CaseMask mask;
  DType dt;
  int64_t D, Hq, Hkv;
  std::vector<int> lens_q, lens_k;  // lens_k empty: the lengths of q
  bool deterministic = false;
  std::vector<int> used_k;  // seqused_k (empty: none): sequence s uses its first used_k[s] keys
  float softcap = 0.0f;     // numerics 9.9 (0: off)
  int sinks = -1;           // numerics 9.10: sink_values(sinks, Hq) (gpu_util.h); -1: no sinks
};

using Bits = std::vector<uint16_t>;

std::vector<int> offsets(const std::vector<int>& lens) {
  std::vector<int> cu(1, 0);
  for (int n : lens) cu.push_back(cu.back() + n);
  return cu;
}

Bits random_bits(int64_t n, DType dt, std::mt19937& rng, double scale) {
  std::normal_distribution<double> d(0.0, scale);
  Bits b(static_cast<size_t>(n));
  for (auto& x : b) x = to_half_bits(static_cast<float>(d(rng)), dt);
  return b;
}

// Device copies of host data, and views of them.
struct Dev {
  std::vector<DeviceBuffer> bufs;
  TensorView put(const Bits& host, DType dt, std::initializer_list<int64_t> shape, const char* name) {
    bufs.emplace_back(std::max<size_t>(host.size() * 2, 16));
    bufs.back().upload(host.data(), host.size() * 2);
    return cuda_view(bufs.back().get(), dt, shape, name);
  }
  TensorView out(DType dt, std::initializer_list<int64_t> shape, const char* name) {
    int64_t n = 1;
    for (int64_t s : shape) n *= s;
    bufs.emplace_back(std::max<size_t>(static_cast<size_t>(n) * dtype_size(dt), 16));
    bufs.back().fill(0xAB);
    return cuda_view(bufs.back().get(), dt, shape, name);
  }
  IndexView index(const std::vector<int>& host, const char* name) {
    bufs.emplace_back(host.size() * 4);
    bufs.back().upload(host.data(), host.size() * 4);
    IndexView v;
    v.data = static_cast<const int32_t*>(bufs.back().get());
    v.device = Device::kCUDA;
    v.ndim = 1;
    v.shape[0] = static_cast<int64_t>(host.size());
    v.stride[0] = 1;
    v.name = name;
    return v;
  }
};

template <typename T>
std::vector<T> fetch(const TensorView& t) {
  std::vector<T> host(static_cast<size_t>(t.numel()));
  cuda_check(cudaMemcpy(host.data(), t.data, host.size() * sizeof(T), cudaMemcpyDeviceToHost), "download");
  return host;
}

// Rows [r0, r0 + n) of a packed [total, H, D] host tensor as a dense [1, H, n, D] one.
Bits dense_rows(const Bits& x, int64_t r0, int64_t n, int64_t H, int64_t D) {
  Bits out(static_cast<size_t>(H * n * D));
  for (int64_t h = 0; h < H; ++h)
    for (int64_t i = 0; i < n; ++i)
      std::copy_n(x.begin() + ((r0 + i) * H + h) * D, D, out.begin() + (h * n + i) * D);
  return out;
}

class AttentionVarlen : public Sm90Test, public ::testing::WithParamInterface<VarlenCase> {};

TEST_P(AttentionVarlen, EqualsOneDenseCallPerSequence) {
  const VarlenCase& c = GetParam();
  const std::vector<int>& lens_k = c.lens_k.empty() ? c.lens_q : c.lens_k;
  const std::vector<int> cu_q = offsets(c.lens_q), cu_k = offsets(lens_k);
  const int64_t tq = cu_q.back(), tk = cu_k.back(), S = static_cast<int64_t>(c.lens_q.size());
  const int64_t max_q = *std::max_element(c.lens_q.begin(), c.lens_q.end());
  const int64_t max_k = *std::max_element(lens_k.begin(), lens_k.end());
  std::mt19937 rng(7);
  const Bits q = random_bits(tq * c.Hq * c.D, c.dt, rng, 1.0), k = random_bits(tk * c.Hkv * c.D, c.dt, rng, 1.0);
  const Bits v = random_bits(tk * c.Hkv * c.D, c.dt, rng, 1.0), dout = random_bits(tq * c.Hq * c.D, c.dt, rng, 1.0);

  AttentionOptions opts = test::options(c.mode, c.pq, c.mask);
  opts.deterministic = c.deterministic;
  opts.softcap = c.softcap;
  const std::vector<float> sink_host = sink_values(c.sinks, c.Hq);
  const bool with_sinks = !sink_host.empty();
  const bool with_hp = c.mode == Mode::kAttnQAT, with_ml = c.pq == PQuant::kAnchored;
  const bool train = c.mode != Mode::kFP4;

  // One varlen call.
  Dev dv;
  if (with_sinks) {
    dv.bufs.emplace_back(sink_host.size() * 4);
    dv.bufs.back().upload(sink_host);
    opts.sinks = cuda_view(dv.bufs.back().get(), DType::kFloat32, {c.Hq}, "sinks");
  }
  const TensorView q3 = dv.put(q, c.dt, {tq, c.Hq, c.D}, "q"), k3 = dv.put(k, c.dt, {tk, c.Hkv, c.D}, "k");
  const TensorView v3 = dv.put(v, c.dt, {tk, c.Hkv, c.D}, "v"), do3 = dv.put(dout, c.dt, {tq, c.Hq, c.D}, "dout");
  ForwardOutputs out{dv.out(c.dt, {tq, c.Hq, c.D}, "o"), {}, dv.out(DType::kFloat32, {c.Hq, tq}, "lse"), {}, {}};
  if (with_hp) out.o_hp = dv.out(c.dt, {tq, c.Hq, c.D}, "o_hp");
  if (with_ml) {
    out.m_ref = dv.out(DType::kFloat32, {c.Hq, tq}, "m_ref");
    out.l = dv.out(DType::kFloat32, {c.Hq, tq}, "l");
  }
  VarlenSeqs seqs{dv.index(cu_q, "cu_seqlens_q"), dv.index(cu_k, "cu_seqlens_k"), max_q, max_k, {}};
  if (!c.used_k.empty()) seqs.seqused_k = dv.index(c.used_k, "seqused_k");
  Status st = attention_forward_varlen(q3, k3, v3, seqs, opts, out);
  ASSERT_TRUE(st.ok()) << st.message();
  BackwardOutputs grads{dv.out(c.dt, {tq, c.Hq, c.D}, "dq"), dv.out(c.dt, {tk, c.Hkv, c.D}, "dk"),
                        dv.out(c.dt, {tk, c.Hkv, c.D}, "dv"), {}};
  if (with_sinks) grads.dsinks = dv.out(DType::kFloat32, {c.Hq}, "dsinks");
  if (train) {
    st = attention_backward_varlen(do3, q3, k3, v3, seqs,
                                   ForwardState{out.o, out.o_hp, out.lse, out.m_ref, out.l}, opts, grads);
    ASSERT_TRUE(st.ok()) << st.message();
  }
  cuda_check(cudaDeviceSynchronize(), "varlen");
  const Bits o = fetch<uint16_t>(out.o), dq = train ? fetch<uint16_t>(grads.dq) : Bits{};
  const Bits dk = train ? fetch<uint16_t>(grads.dk) : Bits{}, dvv = train ? fetch<uint16_t>(grads.dv) : Bits{};
  const std::vector<float> lse = fetch<float>(out.lse);
  const std::vector<float> dsinks = train && with_sinks ? fetch<float>(grads.dsinks) : std::vector<float>{};
  // The dense calls' dsinks, summed over the sequences (and their magnitudes, for the bound).
  std::vector<double> dsinks_sum(c.Hq, 0.0), dsinks_abs(c.Hq, 0.0);

  int64_t bad_o = 0, bad_lse = 0, bad_dkv = 0, bad_dq = 0;
  double worst_dq = 0;
  for (int64_t s = 0; s < S; ++s) {
    // With seqused_k the sequence is its first used_k[s] keys; the rest of its key rows are
    // padding whose dK, dV must be exactly 0 (the outputs start as 0xABAB...: an unwritten row shows).
    const int64_t nq = c.lens_q[s], nk = c.used_k.empty() ? lens_k[s] : c.used_k[s];
    if (train)
      for (int64_t j = nk; j < lens_k[s]; ++j)
        for (int64_t e = 0; e < c.Hkv * c.D; ++e) {
          const int64_t a = (cu_k[s] + j) * c.Hkv * c.D + e;
          bad_dkv += (dk[a] != 0) + (dvv[a] != 0);
        }
    if (nq == 0) continue;
    Dev dd;
    const TensorView qs = dd.put(dense_rows(q, cu_q[s], nq, c.Hq, c.D), c.dt, {1, c.Hq, nq, c.D}, "q");
    const TensorView ks = dd.put(dense_rows(k, cu_k[s], nk, c.Hkv, c.D), c.dt, {1, c.Hkv, nk, c.D}, "k");
    const TensorView vs = dd.put(dense_rows(v, cu_k[s], nk, c.Hkv, c.D), c.dt, {1, c.Hkv, nk, c.D}, "v");
    const TensorView dos = dd.put(dense_rows(dout, cu_q[s], nq, c.Hq, c.D), c.dt, {1, c.Hq, nq, c.D}, "dout");
    ForwardOutputs o1{dd.out(c.dt, {1, c.Hq, nq, c.D}, "o"), {}, dd.out(DType::kFloat32, {1, c.Hq, nq}, "lse"), {}, {}};
    if (with_hp) o1.o_hp = dd.out(c.dt, {1, c.Hq, nq, c.D}, "o_hp");
    if (with_ml) {
      o1.m_ref = dd.out(DType::kFloat32, {1, c.Hq, nq}, "m_ref");
      o1.l = dd.out(DType::kFloat32, {1, c.Hq, nq}, "l");
    }
    st = attention_forward(qs, ks, vs, opts, o1);
    ASSERT_TRUE(st.ok()) << st.message();
    BackwardOutputs g1{dd.out(c.dt, {1, c.Hq, nq, c.D}, "dq"), dd.out(c.dt, {1, c.Hkv, nk, c.D}, "dk"),
                       dd.out(c.dt, {1, c.Hkv, nk, c.D}, "dv"), {}};
    if (with_sinks) g1.dsinks = dd.out(DType::kFloat32, {c.Hq}, "dsinks");
    if (train && nk > 0) {  // (nk = 0: every row is empty and adds nothing to dsinks)
      st = attention_backward(dos, qs, ks, vs, ForwardState{o1.o, o1.o_hp, o1.lse, o1.m_ref, o1.l}, opts, g1);
      ASSERT_TRUE(st.ok()) << st.message();
    }
    cuda_check(cudaDeviceSynchronize(), "dense");
    const Bits o_ref = fetch<uint16_t>(o1.o);
    const std::vector<float> lse_ref = fetch<float>(o1.lse);
    for (int64_t h = 0; h < c.Hq; ++h)
      for (int64_t i = 0; i < nq; ++i) {
        for (int64_t d = 0; d < c.D; ++d)
          bad_o += o[((cu_q[s] + i) * c.Hq + h) * c.D + d] != o_ref[(h * nq + i) * c.D + d];
        const float a = lse[h * tq + cu_q[s] + i], b = lse_ref[h * nq + i];
        bad_lse += !(a == b || (std::isnan(a) && std::isnan(b)));
      }
    if (!train) continue;
    if (with_sinks && nk > 0) {
      const std::vector<float> ds1 = fetch<float>(g1.dsinks);
      for (int64_t h = 0; h < c.Hq; ++h) {
        dsinks_sum[h] += ds1[h];
        dsinks_abs[h] += std::fabs(ds1[h]);
      }
    }
    const Bits dq_ref = nk > 0 ? fetch<uint16_t>(g1.dq) : Bits(static_cast<size_t>(c.Hq * nq * c.D), 0);
    for (int64_t h = 0; h < c.Hq; ++h)
      for (int64_t i = 0; i < nq; ++i)
        for (int64_t d = 0; d < c.D; ++d) {
          const uint16_t a = dq[((cu_q[s] + i) * c.Hq + h) * c.D + d], b = dq_ref[(h * nq + i) * c.D + d];
          if (c.deterministic) {
            bad_dq += a != b;
          } else {
            const double x = from_half_bits(a, c.dt), y = from_half_bits(b, c.dt);
            worst_dq = std::max(worst_dq, std::fabs(x - y) / std::max(1e-2, std::fabs(y)));
          }
        }
    if (nk == 0) continue;
    const Bits dk_ref = fetch<uint16_t>(g1.dk), dv_ref = fetch<uint16_t>(g1.dv);
    for (int64_t h = 0; h < c.Hkv; ++h)
      for (int64_t j = 0; j < nk; ++j)
        for (int64_t d = 0; d < c.D; ++d) {
          const int64_t a = ((cu_k[s] + j) * c.Hkv + h) * c.D + d, b = (h * nk + j) * c.D + d;
          bad_dkv += (dk[a] != dk_ref[b]) + (dvv[a] != dv_ref[b]);
        }
  }
  EXPECT_EQ(bad_o, 0) << "O elements that differ from the dense call on the sequence";
  EXPECT_EQ(bad_lse, 0) << "LSE rows that differ";
  EXPECT_EQ(bad_dkv, 0) << "dK/dV elements that differ (the key blocks' sums are ordered)";
  EXPECT_EQ(bad_dq, 0) << "dQ elements that differ (deterministic mode: ordered)";
  // Default mode: the dQ pieces are added in L2 in any order; ~3 bf16 ulps of the larger of
  // |dq| and 0.01 cover a different fp32 summation order rounded to 16 bits.
  EXPECT_LE(worst_dq, 3 * (c.dt == DType::kBFloat16 ? 0x1p-8 : 0x1p-11));
  // dsinks: the varlen call sums every row's term in one fixed order (bwd_aux.cu), the dense calls
  // each their own rows; fp32 sums of terms of random sign differ by ~sqrt(rows) 2^-24 of the
  // terms' scale (~4e-6 for 4096 rows): 1e-4 of the sum of the sequences' |dsinks| is 10x that.
  if (train && with_sinks) {
    int64_t bad_ds = 0;
    double norm = 0;
    for (int64_t h = 0; h < c.Hq; ++h) {
      norm += dsinks_abs[h];
      if (!(std::fabs(dsinks[h] - dsinks_sum[h]) <= 1e-4 * dsinks_abs[h]) && bad_ds++ < 4)
        ADD_FAILURE() << "dsinks head " << h << ": varlen " << dsinks[h] << ", sum of the dense calls "
                      << dsinks_sum[h];
    }
    EXPECT_EQ(bad_ds, 0);
    EXPECT_GT(norm, 0.0) << "dsinks is zero";
  }
}

const std::vector<int> kMix = {1, 15, 16, 17, 127, 128, 129, 4095};
const std::vector<int> kMixK = {300, 16, 0, 17, 1, 128, 1000, 4095};  // cross-attention-like
const std::vector<int> kSmall = {17, 0, 129, 64, 1, 200};

// clang-format off
const VarlenCase kCases[] = {
  {"attnqat_paper_bf16_d128_causal_gqa4", Mode::kAttnQAT, PQuant::kPaper, true, DType::kBFloat16, 128, 4, 1, kMix},
  {"attnqat_anchored_bf16_d64_gqa8", Mode::kAttnQAT, PQuant::kAnchored, false, DType::kBFloat16, 64, 8, 1, kMix},
  {"fp4_paper_fp16_d128_cross", Mode::kFP4, PQuant::kPaper, false, DType::kFloat16, 128, 2, 2, kMix, kMixK},
  {"bf16_bf16_d64_causal_cross", Mode::kBF16, PQuant::kPaper, true, DType::kBFloat16, 64, 2, 1, kMix, kMixK},
  {"attnqat_paper_bf16_d128_window128_0", Mode::kAttnQAT, PQuant::kPaper, test::window(128, 0), DType::kBFloat16, 128, 2, 2, kMix},
  {"dropin_paper_bf16_d64_causal", Mode::kDropInQAT, PQuant::kPaper, true, DType::kBFloat16, 64, 2, 2, kSmall},
  {"deterministic_attnqat_paper_bf16_d128_causal_gqa2", Mode::kAttnQAT, PQuant::kPaper, true, DType::kBFloat16, 128, 4, 2, kSmall, {}, true},
  {"deterministic_bf16_fp16_d64_window1_1", Mode::kBF16, PQuant::kPaper, test::window(1, 1), DType::kFloat16, 64, 2, 1, kSmall, {}, true},
  {"attnqat_anchored_bf16_d96_causal_gqa2", Mode::kAttnQAT, PQuant::kAnchored, true, DType::kBFloat16, 96, 4, 2, kSmall},
  // seqused_k: a padded batch of text keys (cross-attention with a key-padding mask), and a
  // causal packed batch whose key ranges end in padding (alignment to the used length).
  {"seqused_attnqat_paper_bf16_d128_text_mask", Mode::kAttnQAT, PQuant::kPaper, false, DType::kBFloat16, 128, 4, 4,
   {300, 300, 300}, {512, 512, 512}, false, {512, 77, 0}},
  {"seqused_fp4_anchored_fp16_d64_causal", Mode::kFP4, PQuant::kAnchored, true, DType::kFloat16, 64, 2, 1, kSmall,
   {20, 0, 300, 64, 129, 256}, false, {17, 0, 129, 1, 128, 200}},
  {"seqused_deterministic_bf16_bf16_d64_causal", Mode::kBF16, PQuant::kPaper, true, DType::kBFloat16, 64, 2, 2,
   kSmall, {20, 0, 300, 64, 129, 256}, true, {17, 0, 129, 1, 128, 200}},
  // Softcap and sinks (numerics 9.9, 9.10, 9.11): one sink per head shared by every sequence; a
  // sequence with queries and no keys (kMixK's 0: its rows are the sink's), causal sequences with
  // rows without keys, seqused_k.
  {"sinks_attnqat_paper_bf16_d128_causal_gqa4", Mode::kAttnQAT, PQuant::kPaper, true, DType::kBFloat16, 128, 4, 1, kMix,
   {}, false, {}, 0.0f, 0},
  {"softcap5_sinks_attnqat_anchored_bf16_d64_cross", Mode::kAttnQAT, PQuant::kAnchored, false, DType::kBFloat16, 64, 8, 2,
   kMix, kMixK, false, {}, 5.0f, 2},
  {"softcap30_sinks_deterministic_bf16_fp16_d64_causal", Mode::kBF16, PQuant::kPaper, true, DType::kFloat16, 64, 4, 2,
   kSmall, {20, 0, 300, 64, 129, 256}, true, {17, 0, 129, 1, 128, 200}, 30.0f, 0},
  {"softcap30_sinks_dropin_paper_bf16_d128_causal", Mode::kDropInQAT, PQuant::kPaper, true, DType::kBFloat16, 128, 4, 2,
   kSmall, {}, false, {}, 30.0f, 4},
  {"softcap5_sinks_fp4_anchored_fp16_d128_window128_0", Mode::kFP4, PQuant::kAnchored, test::window(128, 0), DType::kFloat16,
   128, 4, 2, kMix, {}, false, {}, 5.0f, 5},
};
// clang-format on

INSTANTIATE_TEST_SUITE_P(Sm90, AttentionVarlen, ::testing::ValuesIn(kCases),
                         [](const ::testing::TestParamInfo<VarlenCase>& i) { return std::string(i.param.name); });

}  // namespace
}  // namespace attnqat::gpu_test
