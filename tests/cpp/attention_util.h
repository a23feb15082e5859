// Helpers of the attention tests: random problems, calls through the public API, error norms.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "attnqat/attnqat.h"
#include "attnqat/formats.h"

namespace attnqat::test {

template <typename T>
struct Problem {
  int64_t B = 1, Hq = 1, Hkv = 1, Nq = 1, Nk = 1, D = 16;
  std::vector<T> q, k, v;
};

// Gaussian Q, K, V; K gets a few outlier channels (x8), as real attention inputs have.
template <typename T>
Problem<T> random_problem(int64_t B, int64_t Hq, int64_t Hkv, int64_t Nq, int64_t Nk, int64_t D,
                          uint32_t seed, double q_scale = 1.0) {
  Problem<T> p;
  p.B = B, p.Hq = Hq, p.Hkv = Hkv, p.Nq = Nq, p.Nk = Nk, p.D = D;
  std::mt19937 rng(seed);
  std::normal_distribution<double> n01(0.0, 1.0);
  p.q.resize(B * Hq * Nq * D);
  p.k.resize(B * Hkv * Nk * D);
  p.v.resize(B * Hkv * Nk * D);
  for (auto& x : p.q) x = static_cast<T>(q_scale * n01(rng));
  for (size_t i = 0; i < p.k.size(); ++i)
    p.k[i] = static_cast<T>(n01(rng) * ((i % D) % 13 == 3 ? 8.0 : 1.0));
  for (auto& x : p.v) x = static_cast<T>(n01(rng));
  return p;
}

template <typename T>
constexpr DType dtype_of() {
  return sizeof(T) == 8 ? DType::kFloat64 : DType::kFloat32;
}

template <typename T>
struct Fwd {
  std::vector<T> o, o_hp;
  std::vector<float> lse, m_ref, l;
};

template <typename T>
Fwd<T> forward(Problem<T>& p, const AttentionOptions& opts, bool with_hp = true) {
  Fwd<T> f;
  const int64_t rows = p.B * p.Hq * p.Nq;
  f.o.assign(rows * p.D, T(NAN));
  f.o_hp.assign(with_hp ? rows * p.D : 0, T(NAN));
  f.lse.assign(rows, NAN);
  f.m_ref.assign(rows, NAN);
  f.l.assign(rows, NAN);
  const DType dt = dtype_of<T>();
  ForwardOutputs out;
  out.o = make_view(f.o.data(), dt, {p.B, p.Hq, p.Nq, p.D}, "o");
  if (with_hp) out.o_hp = make_view(f.o_hp.data(), dt, {p.B, p.Hq, p.Nq, p.D}, "o_hp");
  out.lse = make_view(f.lse.data(), DType::kFloat32, {p.B, p.Hq, p.Nq}, "lse");
  out.m_ref = make_view(f.m_ref.data(), DType::kFloat32, {p.B, p.Hq, p.Nq}, "m_ref");
  out.l = make_view(f.l.data(), DType::kFloat32, {p.B, p.Hq, p.Nq}, "l");
  const Status st = attention_forward(make_view(p.q.data(), dt, {p.B, p.Hq, p.Nq, p.D}, "q"),
                                      make_view(p.k.data(), dt, {p.B, p.Hkv, p.Nk, p.D}, "k"),
                                      make_view(p.v.data(), dt, {p.B, p.Hkv, p.Nk, p.D}, "v"), opts, out);
  EXPECT_TRUE(st.ok()) << st.message();
  return f;
}

template <typename T>
struct Grads {
  std::vector<T> dq, dk, dv;
};

template <typename T>
Grads<T> backward(Problem<T>& p, Fwd<T>& f, std::vector<T>& dout, const AttentionOptions& opts) {
  Grads<T> g;
  g.dq.assign(p.q.size(), T(NAN));
  g.dk.assign(p.k.size(), T(NAN));
  g.dv.assign(p.v.size(), T(NAN));
  const DType dt = dtype_of<T>();
  ForwardState s;
  s.o = make_view(f.o.data(), dt, {p.B, p.Hq, p.Nq, p.D}, "o");
  if (!f.o_hp.empty()) s.o_hp = make_view(f.o_hp.data(), dt, {p.B, p.Hq, p.Nq, p.D}, "o_hp");
  s.lse = make_view(f.lse.data(), DType::kFloat32, {p.B, p.Hq, p.Nq}, "lse");
  s.m_ref = make_view(f.m_ref.data(), DType::kFloat32, {p.B, p.Hq, p.Nq}, "m_ref");
  s.l = make_view(f.l.data(), DType::kFloat32, {p.B, p.Hq, p.Nq}, "l");
  BackwardOutputs out;
  out.dq = make_view(g.dq.data(), dt, {p.B, p.Hq, p.Nq, p.D}, "dq");
  out.dk = make_view(g.dk.data(), dt, {p.B, p.Hkv, p.Nk, p.D}, "dk");
  out.dv = make_view(g.dv.data(), dt, {p.B, p.Hkv, p.Nk, p.D}, "dv");
  const Status st = attention_backward(make_view(dout.data(), dt, {p.B, p.Hq, p.Nq, p.D}, "dout"),
                                       make_view(p.q.data(), dt, {p.B, p.Hq, p.Nq, p.D}, "q"),
                                       make_view(p.k.data(), dt, {p.B, p.Hkv, p.Nk, p.D}, "k"),
                                       make_view(p.v.data(), dt, {p.B, p.Hkv, p.Nk, p.D}, "v"), s, opts, out);
  EXPECT_TRUE(st.ok()) << st.message();
  return g;
}

// ||a - b|| / ||b||; NaN anywhere gives +inf (NaN never passes a tolerance).
template <typename A, typename B>
double rel_err(const std::vector<A>& a, const std::vector<B>& b) {
  EXPECT_EQ(a.size(), b.size());
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
    const double x = static_cast<double>(a[i]), y = static_cast<double>(b[i]);
    if (std::isnan(x) || std::isnan(y)) return std::numeric_limits<double>::infinity();
    num += (x - y) * (x - y);
    den += y * y;
  }
  return den == 0 ? std::sqrt(num) : std::sqrt(num / den);
}

template <typename A>
double cosine(const std::vector<A>& a, const std::vector<A>& b) {
  double ab = 0, aa = 0, bb = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    ab += static_cast<double>(a[i]) * b[i];
    aa += static_cast<double>(a[i]) * a[i];
    bb += static_cast<double>(b[i]) * b[i];
  }
  return ab / std::sqrt(aa * bb);
}

// A test case's mask: causal or not (a bool converts, so case tables say true / false), and
// a sliding window (numerics section 3; -1: that side unbounded).
struct CaseMask {
  bool causal = false;
  int window_left = -1, window_right = -1;
  CaseMask(bool c) : causal(c) {}  // NOLINT(google-explicit-constructor): tables say true/false
  CaseMask(bool c, int left, int right) : causal(c), window_left(left), window_right(right) {}
};
inline CaseMask window(int left, int right, bool causal = false) {
  return CaseMask(causal, left, right);
}

inline AttentionOptions options(Mode mode, PQuant pq = PQuant::kPaper, CaseMask mask = false) {
  AttentionOptions o;
  o.mode = mode;
  o.p_quant = pq;
  o.causal = mask.causal;
  o.window_left = mask.window_left;
  o.window_right = mask.window_right;
  o.bwd = default_switches(mode);
  return o;
}

// Fake quantization of one [D] row (NVFP4 along the head dim, g = 1).
template <typename T>
std::vector<double> fq_row(const T* x, int64_t D, bool quantize) {
  std::vector<double> out(D);
  std::vector<float> f(D);
  for (int64_t d = 0; d < D; ++d) f[d] = static_cast<float>(x[d]);
  if (quantize)
    for (int64_t d = 0; d < D; d += 16) fake_quantize_block_nv(&f[d], 1.0f);
  for (int64_t d = 0; d < D; ++d) out[d] = quantize ? f[d] : static_cast<double>(x[d]);
  return out;
}

// Blockwise phi_nv of a row of probabilities (blocks of 16 from index 0, zero padded).
inline std::vector<double> quantize_p(const std::vector<double>& p, float g) {
  std::vector<double> out(p.size());
  for (size_t j0 = 0; j0 < p.size(); j0 += 16) {
    float blk[16];
    for (size_t i = 0; i < 16; ++i) blk[i] = j0 + i < p.size() ? static_cast<float>(p[j0 + i]) : 0.0f;
    fake_quantize_block_nv(blk, g);
    for (size_t i = 0; i < 16 && j0 + i < p.size(); ++i) out[j0 + i] = blk[i];
  }
  return out;
}

}  // namespace attnqat::test
