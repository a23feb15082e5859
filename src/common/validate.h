// The one argument validation shared by every backend (CPU reference, CUDA kernels). Each
// public entry point calls the matching validate_*() before it dispatches; a message names the
// argument, what was expected and what came.
#pragma once

#include "attnqat/attnqat.h"

namespace attnqat {

// Shapes of the packed outputs of quantize() for an input of the given shape.
struct PackedShapes {
  int ndim = 0;
  int64_t data[kMaxDims] = {};
  int64_t scales[kMaxDims] = {};
};
PackedShapes packed_shapes(const TensorView& x, const QuantizeOptions& opts);

Status validate_quantize(const TensorView& x, const TensorView& data, const TensorView& scales,
                         const TensorView& global_scale, const QuantizeOptions& opts);
Status validate_dequantize(const TensorView& data, const TensorView& scales,
                           const TensorView& global_scale, const TensorView& out,
                           const QuantizeOptions& opts);
Status validate_fake_quantize(const TensorView& x, const TensorView& out,
                              const TensorView& global_scale, const QuantizeOptions& opts);

Status validate_attention_forward(const TensorView& q, const TensorView& k, const TensorView& v,
                                  const AttentionOptions& opts, const ForwardOutputs& out);
Status validate_attention_backward(const TensorView& dout, const TensorView& q,
                                   const TensorView& k, const TensorView& v,
                                   const ForwardState& saved, const AttentionOptions& opts,
                                   const BackwardOutputs& grads);

// True when the forward must produce O' for the backward that the options describe.
bool needs_o_hp(const AttentionOptions& opts);
// The softmax scale c actually used (1/sqrt(D) when opts.softmax_scale <= 0).
float resolve_softmax_scale(const AttentionOptions& opts, int64_t head_dim);

}  // namespace attnqat
