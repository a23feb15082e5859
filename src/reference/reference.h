// The CPU reference backend: the numerics of docs/numerics.md, readable and multithreaded.
// Arguments are validated by the caller (src/api.cpp); these functions assume valid input.
#pragma once

#include <functional>

#include "attnqat/attnqat.h"

namespace attnqat::reference {

Status quantize(const TensorView& x, const TensorView& data, const TensorView& scales,
                const TensorView& global_scale, const QuantizeOptions& opts);
Status dequantize(const TensorView& data, const TensorView& scales, const TensorView& global_scale,
                  const TensorView& out, const QuantizeOptions& opts);
Status fake_quantize(const TensorView& x, const TensorView& out, const TensorView& global_scale,
                     const QuantizeOptions& opts);

Status attention_forward(const TensorView& q, const TensorView& k, const TensorView& v,
                         const AttentionOptions& opts, const ForwardOutputs& out);
Status attention_backward(const TensorView& dout, const TensorView& q, const TensorView& k,
                          const TensorView& v, const ForwardState& saved,
                          const AttentionOptions& opts, const BackwardOutputs& grads);

// Packed sequences (attnqat.h): the dense reference on each sequence's rows.
Status attention_forward_varlen(const TensorView& q, const TensorView& k, const TensorView& v,
                                const VarlenSeqs& seqs, const AttentionOptions& opts,
                                const ForwardOutputs& out);
Status attention_backward_varlen(const TensorView& dout, const TensorView& q, const TensorView& k,
                                 const TensorView& v, const VarlenSeqs& seqs,
                                 const ForwardState& saved, const AttentionOptions& opts,
                                 const BackwardOutputs& grads);

// Runs f(i) for i in [0, n) on the reference's worker threads (ATTNQAT_NUM_THREADS, default:
// the hardware concurrency). Work items must be independent.
void parallel_for(int64_t n, const std::function<void(int64_t)>& f);

}  // namespace attnqat::reference
