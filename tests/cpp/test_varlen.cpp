// Packed sequences (varlen) on the CPU: attention_forward_varlen / attention_backward_varlen
// against (1) softmax attention written out here in fp64, per sequence, with its gradients, and
// (2) one dense call per sequence in the quantized modes (every output, O', m_ref, l and the
// sinks' gradient summed over the sequences), plus the validation of the offsets and layouts.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "attention_util.h"
#include "attnqat/attnqat.h"

namespace attnqat {
namespace {

using ::testing::HasSubstr;

IndexView index_view(const std::vector<int32_t>& v, const char* name) {
  IndexView i;
  i.data = v.data();
  i.ndim = 1;
  i.shape[0] = static_cast<int64_t>(v.size());
  i.stride[0] = 1;
  i.name = name;
  return i;
}

std::vector<int32_t> offsets(const std::vector<int>& lens) {
  std::vector<int32_t> cu(1, 0);
  for (int n : lens) cu.push_back(cu.back() + n);
  return cu;
}

std::vector<double> randn(int64_t n, std::mt19937& rng) {
  std::normal_distribution<double> d(0.0, 1.0);
  std::vector<double> x(static_cast<size_t>(n));
  for (auto& e : x) e = d(rng);
  return x;
}

struct Packed {
  std::vector<int> lens_q, lens_k;
  std::vector<int32_t> cu_q, cu_k;
  int64_t Hq, Hkv, D, tq, tk;
  std::vector<double> q, k, v, dout;  // [total, H, D]
  Packed(std::vector<int> lq, std::vector<int> lk, int64_t hq, int64_t hkv, int64_t d, uint32_t seed)
      : lens_q(lq), lens_k(lk), cu_q(offsets(lq)), cu_k(offsets(lk)), Hq(hq), Hkv(hkv), D(d),
        tq(cu_q.back()), tk(cu_k.back()) {
    std::mt19937 rng(seed);
    q = randn(tq * Hq * D, rng);
    k = randn(tk * Hkv * D, rng);
    v = randn(tk * Hkv * D, rng);
    dout = randn(tq * Hq * D, rng);
  }
  VarlenSeqs seqs() const {
    int64_t mq = 0, mk = 0;
    for (int n : lens_q) mq = std::max<int64_t>(mq, n);
    for (int n : lens_k) mk = std::max<int64_t>(mk, n);
    return VarlenSeqs{index_view(cu_q, "cu_seqlens_q"), index_view(cu_k, "cu_seqlens_k"), mq, mk, {}};
  }
};

// Softmax attention of sequence s written out in fp64: bottom-right causal or not; O, LSE and
// the gradients dq, dk, dv for dout (added into the packed outputs).
void exact(const Packed& p, bool causal, std::vector<double>& o, std::vector<double>& lse,
           std::vector<double>& dq, std::vector<double>& dk, std::vector<double>& dv) {
  const double c = 1.0 / std::sqrt(static_cast<double>(p.D));
  const int64_t g = p.Hq / p.Hkv;
  for (size_t s = 0; s + 1 < p.cu_q.size(); ++s) {
    const int64_t q0 = p.cu_q[s], nq = p.lens_q[s], k0 = p.cu_k[s], nk = p.lens_k[s];
    for (int64_t h = 0; h < p.Hq; ++h)
      for (int64_t i = 0; i < nq; ++i) {
        const int64_t end = causal ? std::min<int64_t>(nk, std::max<int64_t>(0, i + nk - nq + 1)) : nk;
        const double* qi = &p.q[((q0 + i) * p.Hq + h) * p.D];
        auto krow = [&](const std::vector<double>& t, int64_t j) { return &t[((k0 + j) * p.Hkv + h / g) * p.D]; };
        std::vector<double> sc(end), pr(end);
        double m = -std::numeric_limits<double>::infinity(), l = 0;
        for (int64_t j = 0; j < end; ++j) {
          double d = 0;
          for (int64_t e = 0; e < p.D; ++e) d += qi[e] * krow(p.k, j)[e];
          sc[j] = c * d;
          m = std::max(m, sc[j]);
        }
        for (int64_t j = 0; j < end; ++j) l += std::exp(sc[j] - m);
        lse[h * p.tq + q0 + i] = end ? m + std::log(l) : -std::numeric_limits<double>::infinity();
        double* oi = &o[((q0 + i) * p.Hq + h) * p.D];
        for (int64_t j = 0; j < end; ++j) {
          pr[j] = std::exp(sc[j] - m) / l;
          for (int64_t e = 0; e < p.D; ++e) oi[e] += pr[j] * krow(p.v, j)[e];
        }
        const double* doi = &p.dout[((q0 + i) * p.Hq + h) * p.D];
        double delta = 0;
        for (int64_t e = 0; e < p.D; ++e) delta += doi[e] * oi[e];
        for (int64_t j = 0; j < end; ++j) {
          double dp = 0;
          for (int64_t e = 0; e < p.D; ++e) dp += doi[e] * krow(p.v, j)[e];
          const double ds = pr[j] * (dp - delta);
          double* dkj = &dk[((k0 + j) * p.Hkv + h / g) * p.D];
          double* dvj = &dv[((k0 + j) * p.Hkv + h / g) * p.D];
          for (int64_t e = 0; e < p.D; ++e) {
            dq[((q0 + i) * p.Hq + h) * p.D + e] += c * ds * krow(p.k, j)[e];
            dkj[e] += c * ds * qi[e];
            dvj[e] += pr[j] * doi[e];
          }
        }
      }
  }
}

TensorView view3(std::vector<double>& x, int64_t t, int64_t h, int64_t d, const char* name) {
  return make_view(x.data(), DType::kFloat64, {t, h, d}, name);
}

TEST(Varlen, Bf16ModeEqualsSoftmaxAttentionPerSequenceForwardAndBackward) {
  // fp64 inputs run the fp64 reference: equal up to the float32 softmax scale and LSE it keeps
  // (~1e-7 relative); a key of another sequence, or a misplaced row, costs > 1e-2.
  for (bool causal : {false, true}) {
    Packed p({1, 15, 16, 17, 0, 129, 40}, {5, 15, 33, 17, 3, 129, 1}, 4, 2, 32, causal ? 2 : 1);
    std::vector<double> o(p.q.size()), lse(static_cast<size_t>(p.Hq * p.tq)), dq(p.q.size()), dk(p.k.size()),
        dv(p.v.size());
    std::vector<double> o_ref(p.q.size()), lse_ref(lse.size()), dq_ref(p.q.size()), dk_ref(p.k.size()),
        dv_ref(p.v.size());
    exact(p, causal, o_ref, lse_ref, dq_ref, dk_ref, dv_ref);
    AttentionOptions opts = test::options(Mode::kBF16, PQuant::kPaper, causal);
    const ForwardOutputs out{view3(o, p.tq, p.Hq, p.D, "o"), {}, make_view(lse.data(), DType::kFloat64, {p.Hq, p.tq}, "lse"), {}, {}};
    // The row statistics are fp32 by contract.
    std::vector<float> lse32(lse.size());
    ForwardOutputs out32 = out;
    out32.lse = make_view(lse32.data(), DType::kFloat32, {p.Hq, p.tq}, "lse");
    const TensorView q = view3(p.q, p.tq, p.Hq, p.D, "q"), k = view3(p.k, p.tk, p.Hkv, p.D, "k"),
                     v = view3(p.v, p.tk, p.Hkv, p.D, "v"), dout = view3(p.dout, p.tq, p.Hq, p.D, "dout");
    Status st = attention_forward_varlen(q, k, v, p.seqs(), opts, out32);
    ASSERT_TRUE(st.ok()) << st.message();
    EXPECT_LT(test::rel_err(o, o_ref), 1e-7);
    for (size_t i = 0; i < lse32.size(); ++i)
      if (std::isinf(lse_ref[i]))
        EXPECT_EQ(lse32[i], -std::numeric_limits<float>::infinity()) << i;
      else
        EXPECT_NEAR(lse32[i], lse_ref[i], 1e-5 * std::max(1.0, std::fabs(lse_ref[i]))) << i;
    st = attention_backward_varlen(dout, q, k, v, p.seqs(), ForwardState{out32.o, {}, out32.lse, {}, {}}, opts,
                                   BackwardOutputs{view3(dq, p.tq, p.Hq, p.D, "dq"), view3(dk, p.tk, p.Hkv, p.D, "dk"),
                                                   view3(dv, p.tk, p.Hkv, p.D, "dv"), {}});
    ASSERT_TRUE(st.ok()) << st.message();
    EXPECT_LT(test::rel_err(dq, dq_ref), 1e-6);
    EXPECT_LT(test::rel_err(dk, dk_ref), 1e-6);
    EXPECT_LT(test::rel_err(dv, dv_ref), 1e-6);
  }
}

// Rows [r0, r0 + n) of a packed [total, H, D] tensor as a dense [1, H, n, D] one, and back.
std::vector<float> rows(const std::vector<float>& x, int64_t r0, int64_t n, int64_t H, int64_t D) {
  std::vector<float> out(static_cast<size_t>(H * n * D));
  for (int64_t h = 0; h < H; ++h)
    for (int64_t i = 0; i < n; ++i)
      for (int64_t d = 0; d < D; ++d) out[(h * n + i) * D + d] = x[((r0 + i) * H + h) * D + d];
  return out;
}

TEST(Varlen, QuantizedModesEqualOneDenseCallPerSequenceBitForBit) {
  // attn_qat with anchored P (O', m_ref and l saved), a window, and sinks whose gradient sums
  // over the sequences; paper's key tiles start at each sequence's first key.
  Packed p({17, 1, 0, 40, 33}, {17, 70, 5, 40, 1}, 4, 2, 32, 9);
  std::vector<float> q(p.q.begin(), p.q.end()), k(p.k.begin(), p.k.end()), v(p.v.begin(), p.v.end()),
      dout(p.dout.begin(), p.dout.end()), sinks = {0.5f, -1.0f, 2.0f, -0.25f};
  for (PQuant pq : {PQuant::kPaper, PQuant::kAnchored}) {
    AttentionOptions opts = test::options(Mode::kAttnQAT, pq, test::window(7, 3));
    opts.kv_tile = 16;
    opts.sinks = make_view(sinks.data(), DType::kFloat32, {p.Hq}, "sinks");
    const int64_t nq = p.tq * p.Hq * p.D, nk = p.tk * p.Hkv * p.D, ns = p.Hq * p.tq;
    std::vector<float> o(nq), ohp(nq), lse(ns), m(ns), l(ns), dq(nq), dk(nk), dv(nk), ds(p.Hq);
    auto f32 = [](std::vector<float>& x, std::initializer_list<int64_t> shape, const char* n) {
      return make_view(x.data(), DType::kFloat32, shape, n);
    };
    const ForwardOutputs out{f32(o, {p.tq, p.Hq, p.D}, "o"), f32(ohp, {p.tq, p.Hq, p.D}, "o_hp"),
                             f32(lse, {p.Hq, p.tq}, "lse"), f32(m, {p.Hq, p.tq}, "m_ref"), f32(l, {p.Hq, p.tq}, "l")};
    const TensorView tq = f32(q, {p.tq, p.Hq, p.D}, "q"), tk = f32(k, {p.tk, p.Hkv, p.D}, "k"),
                     tv = f32(v, {p.tk, p.Hkv, p.D}, "v"), tdo = f32(dout, {p.tq, p.Hq, p.D}, "dout");
    ASSERT_TRUE(attention_forward_varlen(tq, tk, tv, p.seqs(), opts, out).ok());
    const Status st = attention_backward_varlen(
        tdo, tq, tk, tv, p.seqs(), ForwardState{out.o, out.o_hp, out.lse, out.m_ref, out.l}, opts,
        BackwardOutputs{f32(dq, {p.tq, p.Hq, p.D}, "dq"), f32(dk, {p.tk, p.Hkv, p.D}, "dk"),
                        f32(dv, {p.tk, p.Hkv, p.D}, "dv"), f32(ds, {p.Hq}, "dsinks")});
    ASSERT_TRUE(st.ok()) << st.message();
    std::vector<float> ds_sum(p.Hq, 0.0f);
    for (size_t s = 0; s + 1 < p.cu_q.size(); ++s) {
      const int64_t q0 = p.cu_q[s], lq = p.lens_q[s], k0 = p.cu_k[s], lk = p.lens_k[s];
      if (lq == 0) continue;
      std::vector<float> sq = rows(q, q0, lq, p.Hq, p.D), sk = rows(k, k0, lk, p.Hkv, p.D),
                         sv = rows(v, k0, lk, p.Hkv, p.D), sdo = rows(dout, q0, lq, p.Hq, p.D);
      std::vector<float> so(sq.size()), sh(sq.size()), sl(p.Hq * lq), sm(p.Hq * lq), sll(p.Hq * lq),
          sdq(sq.size()), sdk(sk.size()), sdv(sv.size()), sds(p.Hq);
      const ForwardOutputs o1{f32(so, {1, p.Hq, lq, p.D}, "o"), f32(sh, {1, p.Hq, lq, p.D}, "o_hp"),
                              f32(sl, {1, p.Hq, lq}, "lse"), f32(sm, {1, p.Hq, lq}, "m_ref"), f32(sll, {1, p.Hq, lq}, "l")};
      const TensorView dq4 = f32(sq, {1, p.Hq, lq, p.D}, "q"), dk4 = f32(sk, {1, p.Hkv, lk, p.D}, "k"),
                       dv4 = f32(sv, {1, p.Hkv, lk, p.D}, "v"), do4 = f32(sdo, {1, p.Hq, lq, p.D}, "dout");
      ASSERT_TRUE(attention_forward(dq4, dk4, dv4, opts, o1).ok());
      ASSERT_TRUE(attention_backward(do4, dq4, dk4, dv4, ForwardState{o1.o, o1.o_hp, o1.lse, o1.m_ref, o1.l}, opts,
                                     BackwardOutputs{f32(sdq, {1, p.Hq, lq, p.D}, "dq"), f32(sdk, {1, p.Hkv, lk, p.D}, "dk"),
                                                     f32(sdv, {1, p.Hkv, lk, p.D}, "dv"), f32(sds, {p.Hq}, "dsinks")})
                      .ok());
      EXPECT_EQ(rows(o, q0, lq, p.Hq, p.D), so) << s;
      EXPECT_EQ(rows(ohp, q0, lq, p.Hq, p.D), sh) << s;
      EXPECT_EQ(rows(dq, q0, lq, p.Hq, p.D), sdq) << s;
      if (lk > 0) {
        EXPECT_EQ(rows(dk, k0, lk, p.Hkv, p.D), sdk) << s;
        EXPECT_EQ(rows(dv, k0, lk, p.Hkv, p.D), sdv) << s;
      }
      for (int64_t h = 0; h < p.Hq; ++h) {
        for (int64_t i = 0; i < lq; ++i) {
          EXPECT_EQ(lse[h * p.tq + q0 + i], sl[h * lq + i]);
          EXPECT_EQ(m[h * p.tq + q0 + i], sm[h * lq + i]);
          EXPECT_EQ(l[h * p.tq + q0 + i], sll[h * lq + i]);
        }
        ds_sum[h] += sds[h];
      }
    }
    EXPECT_EQ(ds, ds_sum);  // summed in sequence order, as the varlen reference does
    // The sequence of length 0 keys (k0 = 57 .. 62 for q of length 0) has dk = dv = 0.
    for (int64_t j = p.cu_k[2]; j < p.cu_k[3]; ++j)
      for (int64_t e = 0; e < p.Hkv * p.D; ++e) EXPECT_EQ(dk[j * p.Hkv * p.D + e], 0.0f);
  }
}

TEST(Varlen, SeqUsedKIsTheDenseCallOnTheUsedKeysWithZeroGradientsForThePadding) {
  // A padded batch of text keys (cross-attention with a key-padding mask): every sequence's key
  // range is 12 rows, of which it uses 12, 5 or 0; and a causal case (aligned to the used length).
  Packed p({9, 9, 9}, {12, 12, 12}, 2, 1, 16, 4);
  const std::vector<int32_t> used = {12, 5, 0};
  std::vector<float> q(p.q.begin(), p.q.end()), k(p.k.begin(), p.k.end()), v(p.v.begin(), p.v.end()),
      dout(p.dout.begin(), p.dout.end());
  auto f32 = [](std::vector<float>& x, std::initializer_list<int64_t> shape, const char* n) {
    return make_view(x.data(), DType::kFloat32, shape, n);
  };
  for (bool causal : {false, true}) {
    const AttentionOptions opts = test::options(Mode::kAttnQAT, PQuant::kPaper, causal);
    VarlenSeqs seqs = p.seqs();
    seqs.seqused_k = index_view(used, "seqused_k");
    const int64_t nq = p.tq * p.Hq * p.D, nk = p.tk * p.Hkv * p.D, ns = p.Hq * p.tq;
    std::vector<float> o(nq), ohp(nq), lse(ns), dq(nq), dk(nk, 7.0f), dv(nk, 7.0f);
    const ForwardOutputs out{f32(o, {p.tq, p.Hq, p.D}, "o"), f32(ohp, {p.tq, p.Hq, p.D}, "o_hp"),
                             f32(lse, {p.Hq, p.tq}, "lse"), {}, {}};
    const TensorView tq = f32(q, {p.tq, p.Hq, p.D}, "q"), tk = f32(k, {p.tk, p.Hkv, p.D}, "k"),
                     tv = f32(v, {p.tk, p.Hkv, p.D}, "v"), tdo = f32(dout, {p.tq, p.Hq, p.D}, "dout");
    ASSERT_TRUE(attention_forward_varlen(tq, tk, tv, seqs, opts, out).ok());
    ASSERT_TRUE(attention_backward_varlen(tdo, tq, tk, tv, seqs, ForwardState{out.o, out.o_hp, out.lse, {}, {}}, opts,
                                          BackwardOutputs{f32(dq, {p.tq, p.Hq, p.D}, "dq"),
                                                          f32(dk, {p.tk, p.Hkv, p.D}, "dk"),
                                                          f32(dv, {p.tk, p.Hkv, p.D}, "dv"), {}})
                    .ok());
    for (size_t s = 0; s < used.size(); ++s) {
      const int64_t q0 = p.cu_q[s], lq = p.lens_q[s], k0 = p.cu_k[s], lk = used[s];
      std::vector<float> sq = rows(q, q0, lq, p.Hq, p.D), sk = rows(k, k0, lk, p.Hkv, p.D),
                         sv = rows(v, k0, lk, p.Hkv, p.D), sdo = rows(dout, q0, lq, p.Hq, p.D);
      std::vector<float> so(sq.size()), sh(sq.size()), sl(p.Hq * lq), sdq(sq.size()), sdk(sk.size()), sdv(sv.size());
      const ForwardOutputs o1{f32(so, {1, p.Hq, lq, p.D}, "o"), f32(sh, {1, p.Hq, lq, p.D}, "o_hp"),
                              f32(sl, {1, p.Hq, lq}, "lse"), {}, {}};
      const TensorView q4 = f32(sq, {1, p.Hq, lq, p.D}, "q"), k4 = f32(sk, {1, p.Hkv, lk, p.D}, "k"),
                       v4 = f32(sv, {1, p.Hkv, lk, p.D}, "v"), do4 = f32(sdo, {1, p.Hq, lq, p.D}, "dout");
      ASSERT_TRUE(attention_forward(q4, k4, v4, opts, o1).ok());
      ASSERT_TRUE(attention_backward(do4, q4, k4, v4, ForwardState{o1.o, o1.o_hp, o1.lse, {}, {}}, opts,
                                     BackwardOutputs{f32(sdq, {1, p.Hq, lq, p.D}, "dq"),
                                                     f32(sdk, {1, p.Hkv, lk, p.D}, "dk"),
                                                     f32(sdv, {1, p.Hkv, lk, p.D}, "dv"), {}})
                      .ok());
      EXPECT_EQ(rows(o, q0, lq, p.Hq, p.D), so) << s << " causal " << causal;
      EXPECT_EQ(rows(dq, q0, lq, p.Hq, p.D), sdq) << s;
      EXPECT_EQ(rows(dk, k0, lk, p.Hkv, p.D), sdk) << s;
      EXPECT_EQ(rows(dv, k0, lk, p.Hkv, p.D), sdv) << s;
      for (int64_t j = k0 + lk; j < p.cu_k[s + 1]; ++j)  // the padding keys: no gradient
        for (int64_t e = 0; e < p.Hkv * p.D; ++e) {
          EXPECT_EQ(dk[j * p.Hkv * p.D + e], 0.0f) << s << " key " << j;
          EXPECT_EQ(dv[j * p.Hkv * p.D + e], 0.0f) << s << " key " << j;
        }
    }
    // The sequence without used keys: O = 0, LSE = -inf (an empty row).
    EXPECT_EQ(lse[p.cu_q[2]], -std::numeric_limits<float>::infinity());
  }
}

TEST(Varlen, ValidationNamesTheProblem) {
  Packed p({3, 5}, {4, 6}, 2, 1, 16, 3);
  std::vector<float> q(p.q.begin(), p.q.end()), k(p.k.begin(), p.k.end()), v(p.v.begin(), p.v.end());
  std::vector<float> o(q.size()), lse(p.Hq * p.tq);
  auto f32 = [](std::vector<float>& x, std::initializer_list<int64_t> shape, const char* n) {
    return make_view(x.data(), DType::kFloat32, shape, n);
  };
  const TensorView tq = f32(q, {p.tq, p.Hq, p.D}, "q"), tk = f32(k, {p.tk, p.Hkv, p.D}, "k"), tv = f32(v, {p.tk, p.Hkv, p.D}, "v");
  const ForwardOutputs out{f32(o, {p.tq, p.Hq, p.D}, "o"), {}, f32(lse, {p.Hq, p.tq}, "lse"), {}, {}};
  const AttentionOptions opts = test::options(Mode::kAttnQAT);
  auto run = [&](const VarlenSeqs& s, const AttentionOptions& o = test::options(Mode::kAttnQAT)) {
    return attention_forward_varlen(tq, tk, tv, s, o, out);
  };
  ASSERT_TRUE(run(p.seqs()).ok());
  VarlenSeqs s = p.seqs();
  s.max_seqlen_q = 4;
  EXPECT_THAT(run(s).message(), HasSubstr("cu_seqlens_q: sequence 1 has length 5, expected 0 .. max_seqlen_q = 4"));
  std::vector<int32_t> past_end = {0, 4, 9};  // q has 8 rows
  s = p.seqs();
  s.cu_seqlens_q = index_view(past_end, "cu_seqlens_q");
  EXPECT_THAT(run(s).message(), HasSubstr("cu_seqlens_q: expected offsets from 0 to 8 (the tokens of q), got 0 .. 9"));
  std::vector<int32_t> three = {0, 5, 3, 8};  // 3 sequences against k's 2
  s = p.seqs();
  s.cu_seqlens_q = index_view(three, "cu_seqlens_q");
  EXPECT_THAT(run(s).message(), HasSubstr("expected two int32 tensors [num_seqs + 1] of equal length"));
  std::vector<int32_t> decreasing = {0, 11, 10};
  s = p.seqs();
  s.cu_seqlens_k = index_view(decreasing, "cu_seqlens_k");
  s.max_seqlen_k = 20;
  EXPECT_THAT(run(s).message(), HasSubstr("cu_seqlens_k: sequence 1 has length -1"));
  std::vector<int32_t> long_k = {0, 6, 10};
  s = p.seqs();
  s.cu_seqlens_k = index_view(long_k, "cu_seqlens_k");
  s.max_seqlen_k = 5;
  EXPECT_THAT(run(s).message(), HasSubstr("cu_seqlens_k: sequence 0 has length 6"));
  std::vector<int32_t> used_long = {4, 7}, used_three = {1, 2, 3};
  s = p.seqs();
  s.seqused_k = index_view(used_long, "seqused_k");
  EXPECT_THAT(run(s).message(), HasSubstr("seqused_k: sequence 1 uses 7 keys, expected 0 .. 6 (its range in cu_seqlens_k)"));
  s.seqused_k = index_view(used_three, "seqused_k");
  EXPECT_THAT(run(s).message(), HasSubstr("seqused_k: expected an int32 tensor [num_seqs] = [2], got 3"));
  AttentionOptions tok = opts;
  tok.v_blocks = VBlocks::kToken;
  EXPECT_THAT(run(p.seqs(), tok).message(), HasSubstr("v_blocks: 'token' blocks run 16 tokens along the sequence"));
  const TensorView q4 = make_view(q.data(), DType::kFloat32, {1, p.tq, p.Hq, p.D}, "q");
  EXPECT_THAT(attention_forward_varlen(q4, tk, tv, p.seqs(), opts, out).message(),
              HasSubstr("q: expected a 3-D tensor [total_q, heads, head_dim] (packed sequences)"));
  const ForwardOutputs bad_lse{out.o, {}, f32(lse, {p.tq, p.Hq}, "lse"), {}, {}};
  EXPECT_THAT(attention_forward_varlen(tq, tk, tv, p.seqs(), opts, bad_lse).message(), HasSubstr("lse"));
}

}  // namespace
}  // namespace attnqat
