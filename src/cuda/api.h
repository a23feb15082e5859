// Host entry points of the CUDA quantization kernels (defined in src/cuda/quantize/api.cu). Called
// by src/api.cpp after validation, only when the library was built with CUDA (ATTNQAT_WITH_CUDA),
// and inside the backend (cuda/common/host.cu: fake_quantize for the copies of q, k, v;
// cuda/attention/packed.cu: dequantize), which never calls the public API of include/attnqat.
// The other entry points: src/cuda/attention/api.h, src/cuda/decode/api.h.
#pragma once

#include "attnqat/attnqat.h"

namespace attnqat::cuda {

std::string archs_built();  // e.g. "90a"

Status quantize(const TensorView& x, const TensorView& data, const TensorView& scales,
                const TensorView& global_scale, const QuantizeOptions& opts, void* stream);
Status dequantize(const TensorView& data, const TensorView& scales, const TensorView& global_scale,
                  const TensorView& out, const QuantizeOptions& opts, void* stream);
Status fake_quantize(const TensorView& x, const TensorView& out, const TensorView& global_scale,
                     const QuantizeOptions& opts, void* stream);

}  // namespace attnqat::cuda
