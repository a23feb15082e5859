// src/cuda/decode/launch.h — launchers of the decode and append kernels (decode.cu, append.cu),
// called by api.cu after it has filled the parameters. Each returns the launch error, if any.
#pragma once

#include <cuda_runtime_api.h>

#include "cuda/decode/params.h"

namespace attnqat::decode {

// The head dims the decode kernel is built for (64 and 128).
bool decode_head_dim_supported(int head_dim);

// The CTAs of decode_kernel that fit on one SM.
cudaError_t decode_occupancy(bool f16, int head_dim, int* blocks_per_sm);

// decode_kernel on grid (num_splits, Hkv * row_groups, B), then combine_kernel when
// num_splits > 1; p.head_dim picks the instantiation. `f16`: q/o are fp16 (else bf16).
cudaError_t launch_decode(const DecodeParams& p, int batch, bool f16, cudaStream_t stream);

// dtype: 0 fp32, 1 fp16, 2 bf16 (of k_new and v_new).
cudaError_t launch_append(const AppendParams& p, int dtype, cudaStream_t stream);

}  // namespace attnqat::decode
