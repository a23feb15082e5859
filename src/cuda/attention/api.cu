// Placeholder until the sm90 forward kernel lands: CUDA attention is not implemented yet.
#include "cuda/attention/api.h"

namespace attnqat::cuda {

Status attention_forward(const TensorView&, const TensorView&, const TensorView&,
                         const AttentionOptions&, const ForwardOutputs&, void*) {
  return Status::NotImplemented("attention_forward: the CUDA kernel is not implemented yet; run on CPU "
                                "tensors (the reference) for now");
}

}  // namespace attnqat::cuda
