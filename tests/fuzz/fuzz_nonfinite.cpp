// Fuzz target: the reference attention (forward and backward) on small random problems with NaN
// and Inf planted at fuzzer-chosen positions, in every mode, p_quant, mask and GQA ratio. Besides
// the sanitizers' checks it asserts the non-finite contract of docs/numerics.md (sections 3, 9.7):
//   - a row the mask leaves without keys gives O = 0 and LSE = -inf, whatever the inputs hold;
//   - a row that sees a bad Q or K element (bad = NaN, or Inf in an FP4 mode, where it poisons
//     its block) has LSE NaN and O entirely NaN; one that sees a bad V element has NaN in O;
//   - a row that sees no bad element has finite O and LSE;
//   - in the backward, a poisoned row's dQ is NaN, and with no bad element every gradient is finite.
// (Inf in mode bf16 follows IEEE arithmetic, section 9.7; this target plants only NaN there.)
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <vector>

#include "attnqat/attnqat.h"

using namespace attnqat;

namespace {

void require(bool ok) {
  if (!ok) std::abort();  // libFuzzer reports the crashing input
}

struct Bytes {
  const uint8_t* p;
  size_t n, i = 0;
  uint8_t next() { return i < n ? p[i++] : 0; }
};

bool any_bad(const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (!std::isfinite(x[i])) return true;
  return false;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  Bytes in{data, size};
  const Mode mode = static_cast<Mode>(in.next() % 4);
  const bool quant = mode != Mode::kBF16;
  const PQuant pq = in.next() % 2 ? PQuant::kAnchored : PQuant::kPaper;
  const bool causal = in.next() % 2;
  const int64_t Hkv = 1 + in.next() % 2, group = 1 + in.next() % 2, Hq = Hkv * group;
  const int64_t Nq = in.next() % 40, Nk = in.next() % 40, D = 16 * (1 + in.next() % 2);
  const uint32_t seed = in.next();
  std::vector<float> q(Hq * Nq * D), k(Hkv * Nk * D), v(Hkv * Nk * D), dout(Hq * Nq * D);
  uint32_t state = seed * 2654435761u + 1;
  auto uniform = [&] {  // deterministic values in [-2, 2)
    state = state * 1664525u + 1013904223u;
    return static_cast<float>(state >> 8) / static_cast<float>(1u << 24) * 4.0f - 2.0f;
  };
  for (auto* t : {&q, &k, &v, &dout})
    for (float& x : *t) x = uniform();
  // Up to 3 bad elements: tensor, position, NaN or +-Inf (Inf only in the FP4 modes).
  const int n_bad = in.next() % 4;
  for (int b = 0; b < n_bad; ++b) {
    std::vector<float>* t[] = {&q, &k, &v};
    std::vector<float>& x = *t[in.next() % 3];
    const uint16_t pos = static_cast<uint16_t>(in.next() | (in.next() << 8));
    const uint8_t kind = in.next() % 3;
    if (x.empty()) continue;
    x[pos % x.size()] = !quant || kind == 0 ? NAN : kind == 1 ? INFINITY : -INFINITY;
  }

  AttentionOptions opts;
  opts.mode = mode;
  opts.p_quant = pq;
  opts.causal = causal;
  const int64_t rows = Hq * Nq;
  std::vector<float> o(rows * D, 7.0f), o_hp(rows * D, 7.0f), lse(rows, 7.0f), m_ref(rows), l(rows);
  ForwardOutputs out;
  out.o = make_view(o.data(), DType::kFloat32, {1, Hq, Nq, D}, "o");
  out.o_hp = make_view(o_hp.data(), DType::kFloat32, {1, Hq, Nq, D}, "o_hp");
  out.lse = make_view(lse.data(), DType::kFloat32, {1, Hq, Nq}, "lse");
  out.m_ref = make_view(m_ref.data(), DType::kFloat32, {1, Hq, Nq}, "m_ref");
  out.l = make_view(l.data(), DType::kFloat32, {1, Hq, Nq}, "l");
  const TensorView qv = make_view(q.data(), DType::kFloat32, {1, Hq, Nq, D}, "q");
  const TensorView kv = make_view(k.data(), DType::kFloat32, {1, Hkv, Nk, D}, "k");
  const TensorView vv = make_view(v.data(), DType::kFloat32, {1, Hkv, Nk, D}, "v");
  require(attention_forward(qv, kv, vv, opts, out).ok());

  std::vector<char> poisoned(rows, 0);
  for (int64_t h = 0; h < Hq; ++h) {
    const int64_t hk = h / group;
    for (int64_t i = 0; i < Nq; ++i) {
      const int64_t r = h * Nq + i;
      const int64_t end = causal ? std::max<int64_t>(0, std::min(Nk, i + Nk - Nq + 1)) : Nk;
      const float* orow = &o[r * D];
      if (end == 0) {
        require(lse[r] == -INFINITY);
        for (int64_t d = 0; d < D; ++d) require(orow[d] == 0.0f);
        continue;
      }
      bool bad_qk = any_bad(&q[r * D], D), bad_v = false;
      for (int64_t j = 0; j < end; ++j) {
        bad_qk = bad_qk || any_bad(&k[(hk * Nk + j) * D], D);
        bad_v = bad_v || any_bad(&v[(hk * Nk + j) * D], D);
      }
      if (bad_qk) {
        require(std::isnan(lse[r]));
        for (int64_t d = 0; d < D; ++d) require(std::isnan(orow[d]));
      } else if (bad_v) {
        require(std::isfinite(lse[r]));
        require(any_bad(orow, D));
      } else {
        require(std::isfinite(lse[r]));
        require(!any_bad(orow, D));
      }
      poisoned[r] = bad_qk || bad_v;
    }
  }
  if (mode == Mode::kFP4 || rows == 0) return 0;

  std::vector<float> dq(q.size(), 7.0f), dk(k.size(), 7.0f), dv(v.size(), 7.0f);
  ForwardState saved;
  saved.o = out.o;
  saved.o_hp = out.o_hp;
  saved.lse = out.lse;
  saved.m_ref = out.m_ref;
  saved.l = out.l;
  BackwardOutputs grads;
  grads.dq = make_view(dq.data(), DType::kFloat32, {1, Hq, Nq, D}, "dq");
  grads.dk = make_view(dk.data(), DType::kFloat32, {1, Hkv, Nk, D}, "dk");
  grads.dv = make_view(dv.data(), DType::kFloat32, {1, Hkv, Nk, D}, "dv");
  require(attention_backward(make_view(dout.data(), DType::kFloat32, {1, Hq, Nq, D}, "dout"), qv, kv, vv,
                             saved, opts, grads).ok());
  const bool inputs_bad = any_bad(q.data(), q.size()) || any_bad(k.data(), k.size()) || any_bad(v.data(), v.size());
  if (!inputs_bad) {
    require(!any_bad(dq.data(), dq.size()) && !any_bad(dk.data(), dk.size()) && !any_bad(dv.data(), dv.size()));
  }
  for (int64_t r = 0; r < rows; ++r)
    if (poisoned[r]) require(any_bad(&dq[r * D], D));
  return 0;
}
