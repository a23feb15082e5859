// Packed sequences (varlen) on the CPU reference: each sequence's rows are copied into a
// contiguous [1, H, len, D] buffer, the dense reference runs on it, and its outputs are copied
// back — "exactly as a separate call on its rows would", by construction (attnqat.h). With
// seqused_k only a sequence's used keys are gathered; the dK, dV of the others stay 0.
#include <cstdint>
#include <cstring>
#include <vector>

#include "attnqat/attnqat.h"
#include "reference/reference.h"

namespace attnqat::reference {
namespace {

// Rows [row0, row0 + len) of a packed tensor t ([total, H, D] with the last dim contiguous, or a
// contiguous [H, total]) as a contiguous [1, H, len, D] (or [1, H, len]) tensor in `buf`: copied
// when `copy`, else zeros. An undefined t gives an undefined view.
TensorView gather(const TensorView& t, int64_t row0, int64_t len, std::vector<uint8_t>& buf,
                  bool copy) {
  TensorView v = t;
  if (t.data == nullptr) return v;
  const size_t es = static_cast<size_t>(dtype_size(t.dtype));
  const bool rows3 = t.ndim == 3;
  const int64_t heads = rows3 ? t.shape[1] : t.shape[0], width = rows3 ? t.shape[2] : 1;
  buf.assign(static_cast<size_t>(heads * len * width) * es, 0);
  v.data = buf.data();
  v.ndim = rows3 ? 4 : 3;
  v.shape[0] = 1;
  v.shape[1] = heads;
  v.shape[2] = len;
  if (rows3) v.shape[3] = width;
  int64_t s = 1;
  for (int i = v.ndim - 1; i >= 0; --i) {
    v.stride[i] = s;
    s *= v.shape[i];
  }
  if (!copy) return v;
  const auto* src = static_cast<const uint8_t*>(t.data);
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t i = 0; i < len; ++i) {
      const int64_t from = rows3 ? (row0 + i) * t.stride[0] + h * t.stride[1]
                                 : h * t.stride[0] + (row0 + i) * t.stride[1];
      std::memcpy(buf.data() + static_cast<size_t>((h * len + i) * width) * es,
                  src + static_cast<size_t>(from) * es, static_cast<size_t>(width) * es);
    }
  return v;
}

// The inverse of gather: the buffer's rows back into rows [row0, row0 + len) of t.
void scatter(const TensorView& seq, const TensorView& t, int64_t row0) {
  if (t.data == nullptr) return;
  const size_t es = static_cast<size_t>(dtype_size(t.dtype));
  const bool rows3 = t.ndim == 3;
  const int64_t heads = seq.shape[1], len = seq.shape[2], width = rows3 ? seq.shape[3] : 1;
  auto* dst = static_cast<uint8_t*>(t.data);
  const auto* src = static_cast<const uint8_t*>(seq.data);
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t i = 0; i < len; ++i) {
      const int64_t to = rows3 ? (row0 + i) * t.stride[0] + h * t.stride[1]
                               : h * t.stride[0] + (row0 + i) * t.stride[1];
      std::memcpy(dst + static_cast<size_t>(to) * es,
                  src + static_cast<size_t>((h * len + i) * width) * es,
                  static_cast<size_t>(width) * es);
    }
}

void zero(const TensorView& t) {  // a validated contiguous output
  if (t.data != nullptr && t.numel() > 0)
    std::memset(t.data, 0, static_cast<size_t>(t.numel()) * static_cast<size_t>(dtype_size(t.dtype)));
}

struct Span {
  int64_t q0, lq, k0, lk;
};
// Sequence i's query rows and the keys it uses (seqused_k: a prefix of its range; validated).
Span span(const VarlenSeqs& s, int64_t i) {
  const IndexView &cq = s.cu_seqlens_q, &ck = s.cu_seqlens_k;
  const int64_t q0 = cq.data[i * cq.stride[0]], k0 = ck.data[i * ck.stride[0]];
  const int64_t lk = s.seqused_k.data != nullptr ? s.seqused_k.data[i * s.seqused_k.stride[0]]
                                                 : ck.data[(i + 1) * ck.stride[0]] - k0;
  return Span{q0, cq.data[(i + 1) * cq.stride[0]] - q0, k0, lk};
}

}  // namespace

Status attention_forward_varlen(const TensorView& q, const TensorView& k, const TensorView& v,
                                const VarlenSeqs& seqs, const AttentionOptions& opts,
                                const ForwardOutputs& out) {
  std::vector<uint8_t> bq, bk, bv, bo, bh, bl, bm, bs;
  for (int64_t i = 0; i + 1 < seqs.cu_seqlens_q.shape[0]; ++i) {
    const Span sp = span(seqs, i);
    if (sp.lq == 0) continue;  // no row to write
    const ForwardOutputs o{gather(out.o, sp.q0, sp.lq, bo, false),
                           gather(out.o_hp, sp.q0, sp.lq, bh, false),
                           gather(out.lse, sp.q0, sp.lq, bl, false),
                           gather(out.m_ref, sp.q0, sp.lq, bm, false),
                           gather(out.l, sp.q0, sp.lq, bs, false)};
    ATTNQAT_RETURN_IF_ERROR(reference::attention_forward(gather(q, sp.q0, sp.lq, bq, true),
                                              gather(k, sp.k0, sp.lk, bk, true),
                                              gather(v, sp.k0, sp.lk, bv, true), opts, o));
    scatter(o.o, out.o, sp.q0);
    scatter(o.o_hp, out.o_hp, sp.q0);
    scatter(o.lse, out.lse, sp.q0);
    scatter(o.m_ref, out.m_ref, sp.q0);
    scatter(o.l, out.l, sp.q0);
  }
  return Status::Ok();
}

Status attention_backward_varlen(const TensorView& dout, const TensorView& q, const TensorView& k,
                                 const TensorView& v, const VarlenSeqs& seqs,
                                 const ForwardState& saved, const AttentionOptions& opts,
                                 const BackwardOutputs& grads) {
  for (const TensorView* g : {&grads.dq, &grads.dk, &grads.dv, &grads.dsinks}) zero(*g);
  std::vector<uint8_t> bdo, bq, bk, bv, bo, bh, bl, bm, bs, bdq, bdk, bdv;
  std::vector<float> dsinks(grads.dsinks.data != nullptr ? grads.dsinks.numel() : 0);
  for (int64_t i = 0; i + 1 < seqs.cu_seqlens_q.shape[0]; ++i) {
    const Span sp = span(seqs, i);
    if (sp.lq == 0 || sp.lk == 0) continue;  // every gradient of the sequence is 0
    const ForwardState st{gather(saved.o, sp.q0, sp.lq, bo, true),
                          gather(saved.o_hp, sp.q0, sp.lq, bh, true),
                          gather(saved.lse, sp.q0, sp.lq, bl, true),
                          gather(saved.m_ref, sp.q0, sp.lq, bm, true),
                          gather(saved.l, sp.q0, sp.lq, bs, true)};
    BackwardOutputs g{gather(grads.dq, sp.q0, sp.lq, bdq, false),
                      gather(grads.dk, sp.k0, sp.lk, bdk, false),
                      gather(grads.dv, sp.k0, sp.lk, bdv, false), grads.dsinks};
    if (!dsinks.empty()) g.dsinks.data = dsinks.data();  // this sequence's part, added below
    ATTNQAT_RETURN_IF_ERROR(reference::attention_backward(gather(dout, sp.q0, sp.lq, bdo, true),
                                               gather(q, sp.q0, sp.lq, bq, true),
                                               gather(k, sp.k0, sp.lk, bk, true),
                                               gather(v, sp.k0, sp.lk, bv, true), st, opts, g));
    scatter(g.dq, grads.dq, sp.q0);
    scatter(g.dk, grads.dk, sp.k0);
    scatter(g.dv, grads.dv, sp.k0);
    auto* total = static_cast<float*>(grads.dsinks.data);
    for (size_t h = 0; h < dsinks.size(); ++h) total[h] += dsinks[h];
  }
  return Status::Ok();
}

}  // namespace attnqat::reference
