// Reference attention, forward and backward: docs/numerics.md sections 3-6, the Attn-QAT
// paper's Algorithms 2 and 3 with the project's `p_quant="anchored"` variant.
//
// Layouts: q [B, Hq, Nq, D], k and v [B, Hkv, Nk, D] (any strides, last one 1); query head h
// reads key/value head h / (Hq / Hkv). The inputs are first copied into contiguous buffers of
// the accumulation type `Acc` (float: the contract; double: the fp64 variant for tests) and
// fake-quantized there; K and V are also kept transposed ([D, Nk]) so that the inner loops run
// over keys with unit stride and vectorize without reassociating any sum.
//
// Forward, per query row (rows are independent; the work is split over (b, h, row block)):
//   start: m = z2, m_ref = z2 or ceil(z2), l = exp2(z2 - m_ref) with the head's sink z2 (9.10);
//          without one m = m_ref = -inf, l = 0
//   for each key tile of kv_tile keys:  S2 = c2 * (q_hat . k_hat)  (softcap: b tanh(a q_hat . k_hat));
//     m_new = max(m, max S2)
//     m_ref_new = paper ? m_new : ceil(m_new);  f = exp2(m_ref - m_ref_new)
//     p~ = exp2(S2 - m_ref_new);  p_hat = phi_nv(p~ per 16 keys; g)
//     l = l f + sum p~;  O = O f + p_hat V_hat;  O' = O' f + p~ V_hat
//   O = O / l,  O' = O' / l,  LSE = ln2 (m_ref + log2 l)
// Non-finite inputs (numerics section 3): the row maxima propagate NaN, so a NaN score makes
// m, l, O and LSE of its row NaN; a row is empty (O = 0, LSE = -inf) only when the mask leaves it
// no key, never because its running sum is not positive.
// Backward: two passes, deterministic. dQ per query row; dK, dV per 64-key chunk summing over
// every query row of every query head of the group (the P blocks of 16 keys never straddle a
// chunk).
#include <algorithm>
#include <cmath>
#include <limits>
#include <thread>
#include <type_traits>
#include <vector>

#include "common/mask.h"
#include "common/host_convert.h"
#include "common/validate.h"
#include "reference/reference.h"

namespace attnqat::reference {
namespace {

constexpr float kLog2e = 1.44269504088896340736f;  // RN(log2 e)
constexpr float kLn2 = 0.693147180559945309417f;   // RN(ln 2)
constexpr int kRowBlock = 8;      // query rows processed together (reuse of each K/V load)
constexpr int kKeyChunk = 64;     // keys per work item of the dK/dV pass (a multiple of 16)
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

bool quantizes(Mode m) { return m != Mode::kBF16; }

// max that propagates NaN (std::max drops a NaN second argument): a NaN score poisons the row max.
template <typename Acc>
Acc max_nan(Acc a, Acc b) {
  return (std::isnan(a) || std::isnan(b)) ? std::numeric_limits<Acc>::quiet_NaN() : std::max(a, b);
}

// The switches the backward actually applies: bf16 mode quantizes nothing, so none applies.
BackwardSwitches effective_switches(const AttentionOptions& o) {
  return quantizes(o.mode) ? o.bwd : BackwardSwitches{false, false, false};
}

template <typename Acc>
Acc exp2_acc(Acc x) {
  return std::exp2(x);
}

// Rounds a P.V operand as the tensor cores would see it (Precision::kBF16Operands).
template <typename Acc>
Acc operand(Acc x, bool bf16_operands) {
  return bf16_operands ? static_cast<Acc>(round_to_bf16(static_cast<float>(x))) : x;
}

// The fake-quantized (or raw) operands of one attention call, contiguous, in Acc.
template <typename Acc>
struct Operands {
  int64_t B, Hq, Hkv, Nq, Nk, D, group;
  std::vector<Acc> q;   // [B, Hq, Nq, D]
  std::vector<Acc> k;   // [B, Hkv, Nk, D]
  std::vector<Acc> v;   // [B, Hkv, Nk, D]
  std::vector<Acc> kt;  // [B, Hkv, D, Nk]
  std::vector<Acc> vt;  // [B, Hkv, D, Nk]

  const Acc* q_row(int64_t b, int64_t h, int64_t i) const { return q.data() + (((b * Hq + h) * Nq + i) * D); }
  const Acc* k_row(int64_t b, int64_t hk, int64_t j) const { return k.data() + (((b * Hkv + hk) * Nk + j) * D); }
  const Acc* v_row(int64_t b, int64_t hk, int64_t j) const { return v.data() + (((b * Hkv + hk) * Nk + j) * D); }
  const Acc* kt_head(int64_t b, int64_t hk) const { return kt.data() + ((b * Hkv + hk) * D * Nk); }
  const Acc* vt_head(int64_t b, int64_t hk) const { return vt.data() + ((b * Hkv + hk) * D * Nk); }
};

// Copies a [B, H, N, D] view into a contiguous Acc buffer.
template <typename Acc>
std::vector<Acc> load4(const TensorView& t) {
  const int64_t B = t.shape[0], H = t.shape[1], N = t.shape[2], D = t.shape[3];
  std::vector<Acc> out(static_cast<size_t>(B * H * N * D));
  parallel_for(B * H, [&](int64_t bh) {
    const int64_t b = bh / H, h = bh % H;
    for (int64_t n = 0; n < N; ++n) {
      const int64_t base = b * t.stride[0] + h * t.stride[1] + n * t.stride[2];
      Acc* dst = out.data() + (((bh * N) + n) * D);
      for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<Acc>(load_as_double(t, base + d * t.stride[3]));
    }
  });
  return out;
}

// NVFP4 fake quantization (g = 1) of a contiguous [rows, D] buffer along D.
template <typename Acc>
void fake_quantize_rows(std::vector<Acc>& x, int64_t D) {
  const int64_t rows = D ? static_cast<int64_t>(x.size()) / D : 0;
  parallel_for(rows, [&](int64_t r) {
    float blk[kNvBlock];
    for (int64_t c = 0; c < D; c += kNvBlock) {
      Acc* p = x.data() + (r * D + c);
      for (int i = 0; i < kNvBlock; ++i) blk[i] = static_cast<float>(p[i]);
      fake_quantize_block_nv(blk, 1.0f);
      for (int i = 0; i < kNvBlock; ++i) p[i] = blk[i];
    }
  });
}

// NVFP4 fake quantization of V [heads, N, D] along tokens: 16 tokens per channel from token 0,
// the last block zero-padded (numerics section 3, v_blocks="token").
template <typename Acc>
void fake_quantize_tokens(std::vector<Acc>& x, int64_t heads, int64_t N, int64_t D) {
  parallel_for(heads, [&](int64_t h) {
    float blk[kNvBlock];
    Acc* base = x.data() + (h * N * D);
    for (int64_t c = 0; c < D; ++c) {
      for (int64_t t0 = 0; t0 < N; t0 += kNvBlock) {
        for (int i = 0; i < kNvBlock; ++i)
          blk[i] = t0 + i < N ? static_cast<float>(base[(t0 + i) * D + c]) : 0.0f;
        fake_quantize_block_nv(blk, 1.0f);
        for (int i = 0; i < kNvBlock && t0 + i < N; ++i) base[(t0 + i) * D + c] = blk[i];
      }
    }
  });
}

template <typename Acc>
std::vector<Acc> transpose_heads(const std::vector<Acc>& x, int64_t heads, int64_t N, int64_t D) {
  std::vector<Acc> t(x.size());
  parallel_for(heads, [&](int64_t h) {
    for (int64_t n = 0; n < N; ++n)
      for (int64_t d = 0; d < D; ++d) t[(h * D + d) * N + n] = x[(h * N + n) * D + d];
  });
  return t;
}

template <typename Acc>
Operands<Acc> make_operands(const TensorView& q, const TensorView& k, const TensorView& v,
                            bool quantize, VBlocks v_blocks) {
  Operands<Acc> op;
  op.B = q.shape[0];
  op.Hq = q.shape[1];
  op.Nq = q.shape[2];
  op.D = q.shape[3];
  op.Hkv = k.shape[1];
  op.Nk = k.shape[2];
  op.group = op.Hkv ? op.Hq / op.Hkv : 1;
  op.q = load4<Acc>(q);
  op.k = load4<Acc>(k);
  op.v = load4<Acc>(v);
  if (quantize) {
    fake_quantize_rows(op.q, op.D);
    fake_quantize_rows(op.k, op.D);
    if (v_blocks == VBlocks::kChannel) fake_quantize_rows(op.v, op.D);
    else fake_quantize_tokens(op.v, op.B * op.Hkv, op.Nk, op.D);
  }
  op.kt = transpose_heads(op.k, op.B * op.Hkv, op.Nk, op.D);
  op.vt = transpose_heads(op.v, op.B * op.Hkv, op.Nk, op.D);
  return op;
}

// The keys query row i sees, [begin, end) (numerics section 3): the mask policy of
// src/common/mask.h (no mask, causal or a sliding window), the same one the CUDA kernels ask.
// Keys before `begin` are skipped exactly as keys from `end` on; a row whose range is empty is
// an empty row. The ranges are monotone in i: the first row of a block has the smallest begin,
// the last row the largest end.
struct RowMask {
  MaskKind kind;
  SeqInfo seq;
  RowMask(const AttentionOptions& opts, int64_t Nq, int64_t Nk)
      : kind(attention_mask_kind(opts)), seq(attention_seq(opts, Nq, Nk)) {}
  IndexRange keys(int64_t i) const { return visible_keys(kind, static_cast<int>(i), seq); }
};

// The start of the 16-key P block holding offset `off` of a tile or chunk (both start at
// multiples of 16, so P blocks start at key 0): masked keys of that block are p~ = 0 in it.
int64_t p_block_start(int64_t off) { return off / kNvBlock * kNvBlock; }

// s[r][j - j0] = q_r . k_j for rows r < nrows, keys j in [j0, j1): fp32 (or fp64) accumulation
// over d in order; the inner loop runs over keys (unit stride in kt) and vectorizes.
template <typename Acc>
void scores(const Acc* const* q_rows, int nrows, const Acc* kt, int64_t Nk, int64_t D, int64_t j0,
            int64_t j1, Acc* s, int64_t ld) {
  const int64_t n = j1 - j0;
  for (int r = 0; r < nrows; ++r) std::fill(s + r * ld, s + r * ld + n, Acc(0));
  for (int64_t d = 0; d < D; ++d) {
    const Acc* krow = kt + d * Nk + j0;
    for (int r = 0; r < nrows; ++r) {
      const Acc qd = q_rows[r][d];
      Acc* sr = s + r * ld;
      for (int64_t j = 0; j < n; ++j) sr[j] += qd * krow[j];
    }
  }
}

// P quantization of one row of a tile (numerics section 4): blocks of 16 keys starting at the
// tile start (tiles start at multiples of 16, so blocks start at key 0); entries past `n` are 0.
template <typename Acc>
void quantize_p_row(const Acc* p, int64_t n, float g, Acc* p_hat) {
  float blk[kNvBlock];
  for (int64_t j0 = 0; j0 < n; j0 += kNvBlock) {
    for (int i = 0; i < kNvBlock; ++i) blk[i] = j0 + i < n ? static_cast<float>(p[j0 + i]) : 0.0f;
    fake_quantize_block_nv(blk, g);
    for (int i = 0; i < kNvBlock && j0 + i < n; ++i) p_hat[j0 + i] = blk[i];
  }
}

template <typename Acc>
Acc c2_of(float c) {
  // c2 = RN(c * RN(log2 e)) in the fp32 contract; exact product in the fp64 variant.
  if constexpr (std::is_same_v<Acc, float>) return c * kLog2e;
  else return static_cast<double>(c) * 1.4426950408889634074;
}

template <typename Acc>
Acc ln2_of() {
  if constexpr (std::is_same_v<Acc, float>) return kLn2;
  else return 0.69314718055994530942;
}

template <typename Acc>
Acc log2e_of() {
  if constexpr (std::is_same_v<Acc, float>) return kLog2e;
  else return 1.4426950408889634074;
}

// The scores in log2 units from the dot products S = q_hat . k_hat (numerics 9.1 and 9.9):
// S2 = c2 * S, or with a softcap S2 = b * tanh(a * S), a = RN(c / softcap),
// b = RN(softcap * RN(log2 e)) (in fp64 in the fp64 variant). with_slope() also gives the slope
// of the cap, d(capped score) / d(score) = 1 - tanh^2(a * S) (1 without a cap), for the backward.
template <typename Acc>
struct ScoreMap {
  bool capped;
  Acc c2, a, b;
  ScoreMap(const AttentionOptions& opts, int64_t D) : capped(opts.softcap > 0.0f) {
    const float c = resolve_softmax_scale(opts, D);
    c2 = c2_of<Acc>(c);
    a = capped ? static_cast<Acc>(c) / static_cast<Acc>(opts.softcap) : Acc(0);
    b = capped ? static_cast<Acc>(opts.softcap) * log2e_of<Acc>() : Acc(0);
  }
  Acc with_slope(Acc s, Acc* slope) const {
    if (!capped) {
      *slope = 1;
      return c2 * s;
    }
    const Acc t = std::tanh(a * s);
    *slope = 1 - t * t;
    return b * t;
  }
  Acc operator()(Acc s) const {
    Acc slope;
    return with_slope(s, &slope);
  }
};

// The sinks of the query heads in log2 units, z2 = RN(z * RN(log2 e)) (numerics 9.10); -inf
// for a head without one (every head when the call has no sinks).
template <typename Acc>
std::vector<Acc> sink_logits2(const AttentionOptions& opts, int64_t Hq) {
  std::vector<Acc> z2(static_cast<size_t>(Hq), -std::numeric_limits<Acc>::infinity());
  if (!has_sinks(opts)) return z2;
  const float* z = static_cast<const float*>(opts.sinks.data);
  for (int64_t h = 0; h < Hq; ++h) z2[h] = static_cast<Acc>(z[h * opts.sinks.stride[0]]) * log2e_of<Acc>();
  return z2;
}

// A row's online-softmax state before its first key (numerics 9.10): the sink is a key of score
// z2 with no value row that sits in no P block, so m = z2, m_ref = z2 (paper) or ceil(z2)
// (anchored), l = exp2(z2 - m_ref), O = O' = 0. Without a sink (z2 = -inf) m = m_ref = -inf, l = 0.
template <typename Acc>
struct RowStart {
  Acc m, m_ref, l;
};

template <typename Acc>
RowStart<Acc> row_start(Acc z2, bool anchored) {
  constexpr Acc kInf = std::numeric_limits<Acc>::infinity();
  if (!(z2 > -kInf)) return {-kInf, -kInf, Acc(0)};
  const Acc m_ref = anchored ? std::ceil(z2) : z2;
  return {z2, m_ref, exp2_acc<Acc>(z2 - m_ref)};
}

// ---- Forward -------------------------------------------------------------------------------

template <typename Acc>
void forward_impl(const TensorView& qv, const TensorView& kv, const TensorView& vv,
                  const AttentionOptions& opts, const ForwardOutputs& out) {
  const bool quant = quantizes(opts.mode);
  const bool anchored = opts.p_quant == PQuant::kAnchored;
  const bool bf16_ops = opts.precision == Precision::kBF16Operands;
  const float g_p = anchored ? kAnchoredPScale : 1.0f;
  const Operands<Acc> op = make_operands<Acc>(qv, kv, vv, quant && !opts.inputs_quantized, opts.v_blocks);
  const int64_t B = op.B, Hq = op.Hq, Nq = op.Nq, Nk = op.Nk, D = op.D;
  const ScoreMap<Acc> score2(opts, D);
  const std::vector<Acc> sink2 = sink_logits2<Acc>(opts, Hq);
  const int64_t tile = opts.kv_tile;
  const bool want_hp = out.o_hp.data != nullptr;
  const bool want_stats = out.m_ref.data != nullptr;
  const RowMask mask(opts, Nq, Nk);

  const int64_t row_blocks = (Nq + kRowBlock - 1) / kRowBlock;
  parallel_for(B * Hq * row_blocks, [&](int64_t item) {
    const int64_t bh = item / row_blocks, rb = item % row_blocks;
    const int64_t b = bh / Hq, h = bh % Hq, hk = h / op.group;
    const int64_t i0 = rb * kRowBlock;
    const int nrows = static_cast<int>(std::min<int64_t>(kRowBlock, Nq - i0));
    const Acc* kt = op.kt_head(b, hk);

    const Acc* q_rows[kRowBlock];
    for (int r = 0; r < nrows; ++r) q_rows[r] = op.q_row(b, h, i0 + r);
    std::vector<Acc> s(static_cast<size_t>(kRowBlock * tile)), p(tile), p_hat(tile);
    std::vector<Acc> o_acc(static_cast<size_t>(kRowBlock * D), Acc(0)), o_hp_acc(o_acc.size(), Acc(0));
    Acc m[kRowBlock], m_ref[kRowBlock], l[kRowBlock];
    const RowStart<Acc> start = row_start(sink2[h], anchored);
    for (int r = 0; r < kRowBlock; ++r) m[r] = start.m, m_ref[r] = start.m_ref, l[r] = start.l;

    // Tiles start at multiples of kv_tile from key 0, from the tile of the first row's begin to
    // the last row's end (the rows' ranges are monotone).
    const int64_t first_key = mask.keys(i0).begin, last_key = mask.keys(i0 + nrows - 1).end;
    for (int64_t j0 = first_key / tile * tile; j0 < last_key; j0 += tile) {
      const int64_t j1 = std::min(j0 + tile, Nk);
      scores(q_rows, nrows, kt, Nk, D, j0, j1, s.data(), tile);
      for (int r = 0; r < nrows; ++r) {
        const IndexRange rk = mask.keys(i0 + r);
        const int64_t begin = std::max<int64_t>(j0, rk.begin), end = std::min<int64_t>(j1, rk.end);
        if (end <= begin) continue;  // no visible key in this tile: nothing changes for this row
        // Tile offsets: visible keys [off, n); masked keys before them are p~ = 0 in their P
        // block (from pb) and take no part in the tile's max (paper) or sum.
        const int64_t n = end - j0, off = begin - j0, pb = p_block_start(off);
        Acc* sr = s.data() + (r * tile);
        Acc tile_max = -std::numeric_limits<Acc>::infinity();
        for (int64_t j = off; j < n; ++j) {
          sr[j] = score2(sr[j]);  // S2, log2 units
          tile_max = max_nan(tile_max, sr[j]);
        }
        const Acc m_new = max_nan(m[r], tile_max);
        const Acc m_ref_new = anchored ? std::ceil(m_new) : m_new;
        const Acc f = std::isinf(m[r]) ? Acc(0) : exp2_acc<Acc>(m_ref[r] - m_ref_new);
        Acc sum = 0;
        for (int64_t j = pb; j < off; ++j) p[j] = 0;
        for (int64_t j = off; j < n; ++j) {
          p[j] = exp2_acc<Acc>(sr[j] - m_ref_new);  // p~
          sum += p[j];
        }
        if (quant) quantize_p_row(p.data() + pb, n - pb, g_p, p_hat.data() + pb);
        else for (int64_t j = off; j < n; ++j) p_hat[j] = p[j];
        l[r] = l[r] * f + sum;
        Acc* o = o_acc.data() + (r * D);
        Acc* o_hp = o_hp_acc.data() + (r * D);
        for (int64_t d = 0; d < D; ++d) o[d] *= f;
        if (want_hp) for (int64_t d = 0; d < D; ++d) o_hp[d] *= f;
        for (int64_t j = off; j < n; ++j) {
          const Acc* vj = op.v_row(b, hk, j0 + j);
          const Acc pq = operand(p_hat[j], bf16_ops);
          for (int64_t d = 0; d < D; ++d) o[d] += pq * vj[d];
          if (want_hp) {
            const Acc pt = operand(p[j], bf16_ops);
            for (int64_t d = 0; d < D; ++d) o_hp[d] += pt * vj[d];
          }
        }
        m[r] = m_new;
        m_ref[r] = m_ref_new;
      }
    }

    for (int r = 0; r < nrows; ++r) {
      const int64_t i = i0 + r;
      const int64_t row_off = ((b * Hq + h) * Nq + i);
      // Empty only by the mask (O = 0, LSE = -inf; with a sink LSE is the sink's, 9.10). A row
      // that saw keys but has no positive sum (NaN, or 0 when every score is -inf and there is
      // no sink) is poisoned: its divisor is NaN, so O, O' and LSE come out NaN.
      const bool empty = mask.keys(i).empty();
      const bool no_mass = empty && !(sink2[h] > -std::numeric_limits<Acc>::infinity());
      const Acc l_div = l[r] > 0 ? l[r] : std::numeric_limits<Acc>::quiet_NaN();
      for (int64_t d = 0; d < D; ++d) {
        const int64_t off = b * out.o.stride[0] + h * out.o.stride[1] + i * out.o.stride[2] + d;
        store_from_double(out.o, off, empty ? 0.0 : static_cast<double>(o_acc[r * D + d] / l_div));
        if (want_hp)
          store_from_double(out.o_hp, off, empty ? 0.0 : static_cast<double>(o_hp_acc[r * D + d] / l_div));
      }
      const Acc lse = no_mass ? -std::numeric_limits<Acc>::infinity()
                              : ln2_of<Acc>() * (m_ref[r] + std::log2(l_div));
      static_cast<float*>(out.lse.data)[row_off] = static_cast<float>(lse);
      if (want_stats) {
        static_cast<float*>(out.m_ref.data)[row_off] = no_mass ? kNegInf : static_cast<float>(m_ref[r]);
        static_cast<float*>(out.l.data)[row_off] = static_cast<float>(l[r]);
      }
    }
  });
}

// ---- Backward ------------------------------------------------------------------------------

// Row statistics the backward normalizes with: lse2 = LSE / ln 2 (log2 units), and for the
// anchored P_F the forward's final m_ref and l.
template <typename Acc>
struct RowStats {
  std::vector<Acc> lse2, m_ref, l;  // [B, Hq, Nq]
};

// Recomputes the row statistics of the scores the backward sees, in one pass over each row:
// used when those scores are not the forward's (drop_in_qat: unquantized Q and K).
template <typename Acc>
RowStats<Acc> recompute_stats(const Operands<Acc>& op, const ScoreMap<Acc>& score2, const std::vector<Acc>& sink2,
                              bool anchored, const RowMask& mask) {
  RowStats<Acc> st;
  const int64_t rows = op.B * op.Hq * op.Nq;
  st.lse2.resize(rows);
  st.m_ref.resize(rows);
  st.l.resize(rows);
  parallel_for(rows, [&](int64_t row) {
    const int64_t i = row % op.Nq, bh = row / op.Nq, b = bh / op.Hq, h = bh % op.Hq;
    const IndexRange rk = mask.keys(i);
    const int64_t hk = h / op.group, n = rk.empty() ? 0 : rk.end - rk.begin;
    std::vector<Acc> s(static_cast<size_t>(std::max<int64_t>(n, 1)));
    const Acc* qr = op.q_row(b, h, i);
    if (n > 0) scores(&qr, 1, op.kt_head(b, hk), op.Nk, op.D, rk.begin, rk.end, s.data(), n);
    // The sink as the forward's first state (9.10), then every visible key at once.
    const RowStart<Acc> start = row_start(sink2[h], anchored);
    Acc m = start.m;
    for (int64_t j = 0; j < n; ++j) m = max_nan(m, s[j] = score2(s[j]));
    if (n == 0 && start.l == 0) {  // no key and no sink
      st.lse2[row] = st.m_ref[row] = m;
      st.l[row] = 0;
      return;
    }
    const Acc mr = anchored ? std::ceil(m) : m;
    Acc l = start.l == 0 ? Acc(0) : exp2_acc<Acc>(sink2[h] - mr);
    for (int64_t j = 0; j < n; ++j) l += exp2_acc<Acc>(s[j] - mr);
    st.m_ref[row] = mr;
    st.l[row] = l;
    st.lse2[row] = l > 0 ? mr + std::log2(l) : std::numeric_limits<Acc>::quiet_NaN();
  });
  return st;
}

template <typename Acc>
RowStats<Acc> saved_stats(const ForwardState& saved, int64_t rows, bool need_ml) {
  RowStats<Acc> st;
  st.lse2.resize(rows);
  const float* lse = static_cast<const float*>(saved.lse.data);
  for (int64_t r = 0; r < rows; ++r) {
    if constexpr (std::is_same_v<Acc, float>) st.lse2[r] = lse[r] / kLn2;
    else st.lse2[r] = static_cast<double>(lse[r]) / 0.69314718055994530942;
  }
  if (need_ml) {
    const float* m = static_cast<const float*>(saved.m_ref.data);
    const float* l = static_cast<const float*>(saved.l.data);
    st.m_ref.assign(m, m + rows);
    st.l.assign(l, l + rows);
  }
  return st;
}

template <typename Acc>
void backward_impl(const TensorView& doutv, const TensorView& qv, const TensorView& kv,
                   const TensorView& vv, const ForwardState& saved, const AttentionOptions& opts,
                   const BackwardOutputs& grads) {
  const BackwardSwitches sw = effective_switches(opts);
  const bool anchored = opts.p_quant == PQuant::kAnchored;
  const bool bf16_ops = opts.precision == Precision::kBF16Operands;
  const Operands<Acc> op =
      make_operands<Acc>(qv, kv, vv, sw.quantized_qkv && !opts.inputs_quantized, opts.v_blocks);
  const int64_t B = op.B, Hq = op.Hq, Hkv = op.Hkv, Nq = op.Nq, Nk = op.Nk, D = op.D;
  const float c = resolve_softmax_scale(opts, D);
  const ScoreMap<Acc> score2(opts, D);
  const std::vector<Acc> sink2 = sink_logits2<Acc>(opts, Hq);
  const std::vector<Acc> dout = load4<Acc>(doutv);

  // D_i = rowsum(dO * O') (Attn-QAT) or rowsum(dO * O).
  const TensorView& o_src = sw.high_precision_o ? saved.o_hp : saved.o;
  const std::vector<Acc> o_for_delta = load4<Acc>(o_src);
  std::vector<Acc> delta(static_cast<size_t>(B * Hq * Nq));
  parallel_for(B * Hq * Nq, [&](int64_t row) {
    Acc sum = 0;
    for (int64_t d = 0; d < D; ++d) sum += dout[row * D + d] * o_for_delta[row * D + d];
    delta[row] = sum;
  });

  // Row statistics: the forward's when the backward recomputes the forward's scores.
  const bool recompute = quantizes(opts.mode) && !sw.quantized_qkv;
  const bool use_p_f = quantizes(opts.mode) && sw.quant_p;
  const RowMask mask(opts, Nq, Nk);
  const RowStats<Acc> st = recompute ? recompute_stats(op, score2, sink2, anchored, mask)
                                     : saved_stats<Acc>(saved, B * Hq * Nq, use_p_f && anchored);

  // P = exp2(S2 - LSE/ln2) for a row over keys [j0, j0+n), from scores s (overwritten by S2),
  // and the softcap's slope (9.9; 1 without a cap), which turns dS into the uncapped scores'.
  auto probs = [&](int64_t row, Acc* s, int64_t n, Acc* p, Acc* slope) {
    const Acc lse2 = st.lse2[row];
    for (int64_t j = 0; j < n; ++j) {
      s[j] = score2.with_slope(s[j], &slope[j]);
      // Only empty rows have LSE = -inf (and they have no visible key); NaN stays NaN.
      p[j] = lse2 == -std::numeric_limits<Acc>::infinity() ? Acc(0) : exp2_acc<Acc>(s[j] - lse2);
    }
  };

  // dsinks_h = -sum over the rows of head h of p_sink * D, p_sink = exp2(z2 - LSE/ln2) (9.10).
  // Rows that see no key have O = 0 whatever the sink: they contribute nothing.
  if (has_sinks_tensor(grads.dsinks)) {
    float* dsinks = static_cast<float*>(grads.dsinks.data);
    parallel_for(Hq, [&](int64_t h) {
      Acc sum = 0;
      if (sink2[h] > -std::numeric_limits<Acc>::infinity())
        for (int64_t b = 0; b < B; ++b)
          for (int64_t i = 0; i < Nq; ++i) {
            if (mask.keys(i).empty()) continue;
            const int64_t row = (b * Hq + h) * Nq + i;
            sum += exp2_acc<Acc>(sink2[h] - st.lse2[row]) * delta[row];
          }
      dsinks[h] = static_cast<float>(-sum);
    });
  }

  // Pass 1: dQ_i = c * sum_j dS_ij K_j, one query row block per work item.
  const int64_t row_blocks = (Nq + kRowBlock - 1) / kRowBlock;
  std::vector<Acc> dq(static_cast<size_t>(B * Hq * Nq * D), Acc(0));
  parallel_for(B * Hq * row_blocks, [&](int64_t item) {
    const int64_t bh = item / row_blocks, rb = item % row_blocks;
    const int64_t b = bh / Hq, h = bh % Hq, hk = h / op.group;
    const int64_t i0 = rb * kRowBlock;
    const int nrows = static_cast<int>(std::min<int64_t>(kRowBlock, Nq - i0));
    // Keys [key0, key1): from the first row's begin to the last row's end (monotone ranges).
    const int64_t key0 = mask.keys(i0).begin, key1 = mask.keys(i0 + nrows - 1).end, w = key1 - key0;
    if (w <= 0) return;
    const Acc* q_rows[kRowBlock];
    const Acc* do_rows[kRowBlock];
    for (int r = 0; r < nrows; ++r) {
      q_rows[r] = op.q_row(b, h, i0 + r);
      do_rows[r] = dout.data() + (((bh * Nq) + i0 + r) * D);
    }
    std::vector<Acc> s(static_cast<size_t>(kRowBlock * w)), dp(s.size()), p(w), slope(w);
    scores(q_rows, nrows, op.kt_head(b, hk), Nk, D, key0, key1, s.data(), w);
    scores(do_rows, nrows, op.vt_head(b, hk), Nk, D, key0, key1, dp.data(), w);
    for (int r = 0; r < nrows; ++r) {
      const int64_t row = bh * Nq + i0 + r;
      const IndexRange rk = mask.keys(i0 + r);
      if (rk.empty()) continue;  // an empty row: dQ = 0
      const int64_t begin = rk.begin, n = rk.end - rk.begin;  // p[j - begin], s and dp at j - key0
      probs(row, s.data() + (r * w + begin - key0), n, p.data(), slope.data());
      Acc* dqr = dq.data() + (row * D);
      for (int64_t j = begin; j < rk.end; ++j) {
        const Acc ds = operand(p[j - begin] * (dp[r * w + j - key0] - delta[row]) * slope[j - begin], bf16_ops);
        const Acc* kj = op.k_row(b, hk, j);
        for (int64_t d = 0; d < D; ++d) dqr[d] += ds * kj[d];
      }
      for (int64_t d = 0; d < D; ++d) dqr[d] *= static_cast<Acc>(c);
    }
  });

  // Pass 2: dK_j, dV_j for a chunk of keys, summed over the query heads of the group.
  const int64_t key_chunks = (Nk + kKeyChunk - 1) / kKeyChunk;
  std::vector<Acc> dk(static_cast<size_t>(B * Hkv * Nk * D), Acc(0)), dv(dk.size(), Acc(0));
  const float g_p = anchored ? kAnchoredPScale : 1.0f;
  parallel_for(B * Hkv * key_chunks, [&](int64_t item) {
    const int64_t bhk = item / key_chunks, kc = item % key_chunks;
    const int64_t b = bhk / Hkv, hk = bhk % Hkv;
    const int64_t j0 = kc * kKeyChunk, j1 = std::min(j0 + kKeyChunk, Nk), n = j1 - j0;
    Acc s[kKeyChunk], dp[kKeyChunk], p[kKeyChunk], pf[kKeyChunk], pt[kKeyChunk], slope[kKeyChunk];
    Acc* dk_c = dk.data() + ((bhk * Nk + j0) * D);
    Acc* dv_c = dv.data() + ((bhk * Nk + j0) * D);
    for (int64_t h = hk * op.group; h < (hk + 1) * op.group; ++h) {
      for (int64_t i = 0; i < Nq; ++i) {
        const IndexRange rk = mask.keys(i);
        const int64_t begin = std::max<int64_t>(j0, rk.begin), end = std::min<int64_t>(j1, rk.end);
        if (end <= begin) continue;
        // Chunk offsets: visible keys [off, nv); the keys of off's P block before it (from pb)
        // are masked, p = 0 there, and take no part in the sums.
        const int64_t nv = end - j0, off = begin - j0, pb = p_block_start(off);
        const int64_t row = (b * Hq + h) * Nq + i;
        const Acc* qr = op.q_row(b, h, i);
        const Acc* dor = dout.data() + (row * D);
        scores(&qr, 1, op.kt_head(b, hk), Nk, D, j0 + pb, end, s + pb, kKeyChunk);
        scores(&dor, 1, op.vt_head(b, hk), Nk, D, j0 + pb, end, dp + pb, kKeyChunk);
        probs(row, s + pb, nv - pb, p + pb, slope + pb);
        for (int64_t j = pb; j < off; ++j) p[j] = 0;
        if (use_p_f && !anchored) {
          quantize_p_row(p + pb, nv - pb, g_p, pf + pb);  // Algorithm 3: phi_nv(P; 1) of the normalized P
        } else if (use_p_f) {
          // Anchored: phi_nv(exp2(S2 - m_ref); 2^-11) / l, the forward's quantized P.
          const Acc mr = st.m_ref[row], l = st.l[row];
          // The row sees keys (nv > off), so m_ref and l are its forward statistics: finite, or
          // NaN for a poisoned row (which then poisons P_F and every dV it reaches).
          for (int64_t j = pb; j < off; ++j) pt[j] = 0;
          for (int64_t j = off; j < nv; ++j) pt[j] = exp2_acc<Acc>(s[j] - mr);
          quantize_p_row(pt + pb, nv - pb, g_p, pf + pb);
          for (int64_t j = off; j < nv; ++j) pf[j] = pf[j] / l;
        } else {
          for (int64_t j = off; j < nv; ++j) pf[j] = p[j];
        }
        for (int64_t j = off; j < nv; ++j) {
          const Acc pv = operand(pf[j], bf16_ops);
          const Acc ds = operand(p[j] * (dp[j] - delta[row]) * slope[j], bf16_ops);
          Acc* dvj = dv_c + j * D;
          Acc* dkj = dk_c + j * D;
          for (int64_t d = 0; d < D; ++d) dvj[d] += pv * dor[d];
          for (int64_t d = 0; d < D; ++d) dkj[d] += ds * qr[d];
        }
      }
    }
    for (int64_t x = 0; x < n * D; ++x) dk_c[x] *= static_cast<Acc>(c);
  });

  // Store (straight-through: the gradients of the quantized operands are returned as the
  // gradients of the inputs).
  auto store = [&](const TensorView& t, const std::vector<Acc>& src) {
    const int64_t H = t.shape[1], N = t.shape[2];
    parallel_for(t.shape[0] * H, [&](int64_t bh) {
      const int64_t b = bh / H, h = bh % H;
      for (int64_t n = 0; n < N; ++n)
        for (int64_t d = 0; d < D; ++d)
          store_from_double(t, b * t.stride[0] + h * t.stride[1] + n * t.stride[2] + d,
                            static_cast<double>(src[((bh * N) + n) * D + d]));
    });
  };
  store(grads.dq, dq);
  store(grads.dk, dk);
  store(grads.dv, dv);
}

bool use_double(const TensorView& q, const AttentionOptions& opts) {
  return opts.precision == Precision::kFloat64 || q.dtype == DType::kFloat64;
}

}  // namespace

Status attention_forward(const TensorView& q, const TensorView& k, const TensorView& v,
                         const AttentionOptions& opts, const ForwardOutputs& out) {
  if (q.numel() == 0) return Status::Ok();
  if (use_double(q, opts)) forward_impl<double>(q, k, v, opts, out);
  else forward_impl<float>(q, k, v, opts, out);
  return Status::Ok();
}

Status attention_backward(const TensorView& dout, const TensorView& q, const TensorView& k,
                          const TensorView& v, const ForwardState& saved,
                          const AttentionOptions& opts, const BackwardOutputs& grads) {
  if (use_double(q, opts)) backward_impl<double>(dout, q, k, v, saved, opts, grads);
  else backward_impl<float>(dout, q, k, v, saved, opts, grads);
  return Status::Ok();
}

}  // namespace attnqat::reference
