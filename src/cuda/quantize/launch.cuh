// src/cuda/quantize/launch.cuh — host-side launch helpers of the quantization kernels: the dtype
// dispatch (one kernel instance per fp32 / fp16 / bf16), the launch itself (kQuantThreads threads
// per CTA, no shared memory, the caller's stream, cudaGetLastError()), and the last-axis launcher
// that maps the format to the block size and sizes the grid for the kernel's thread mapping.
// Every launcher of src/cuda/quantize goes through these, so the launch configuration of a kernel
// is written once: grid_for() in params.h, the thread count here.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <type_traits>

#include "cuda/quantize/access.cuh"

namespace attnqat::cuda {

// A dtype or a block size as a type, for the generic lambdas that instantiate the kernels:
// decltype(tag)::value is the constant.
template <DType kDt>
using DTypeTag = std::integral_constant<DType, kDt>;
template <int kBlock>
using BlockTag = std::integral_constant<int, kBlock>;

// launch(DTypeTag<dtype>{}) for the three dtypes of the kernels; its cudaError_t.
template <class Launch>
cudaError_t dispatch_dtype(DType dtype, Launch&& launch) {
  switch (dtype) {
    case DType::kFloat32: return launch(DTypeTag<DType::kFloat32>{});
    case DType::kFloat16: return launch(DTypeTag<DType::kFloat16>{});
    case DType::kBFloat16: return launch(DTypeTag<DType::kBFloat16>{});
    default: return cudaErrorInvalidValue;  // unreachable: validate() admits these three
  }
}

// kernel<<<grid, kQuantThreads, 0, stream>>>(p) and the launch's error.
template <class Params>
cudaError_t launch_quant_kernel(void (*kernel)(Params), int grid, const Params& p,
                                cudaStream_t stream) {
  kernel<<<grid, kQuantThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

// How a last-axis kernel maps threads to quantization blocks: one thread per block, or a
// LaneGroup of block / kChunkElems lanes per block (one 16-byte chunk per lane).
enum class LastAxisMapping { kThreadPerBlock, kLaneGroup };

// Launches kernel_for(DTypeTag<dtype>{}, BlockTag<block>{}) — a kernel of LastAxisParams — with
// block = 16 for NVFP4 and 32 for MXFP4, on as many CTAs as p.num_blocks needs under `mapping`.
template <class KernelFor>
cudaError_t launch_last_axis(DType dtype, Format format, LastAxisMapping mapping,
                             const LastAxisParams& p, cudaStream_t stream, KernelFor&& kernel_for) {
  return dispatch_dtype(dtype, [&](auto dt) {
    constexpr int kChunk = kChunkElems<decltype(dt)::value>;
    const int block = format == Format::kNVFP4 ? kNvBlock : kMxBlock;
    const int64_t blocks_per_cta = mapping == LastAxisMapping::kThreadPerBlock
                                       ? kQuantThreads
                                       : kQuantThreads / (block / kChunk);
    const int grid = grid_for(p.num_blocks, blocks_per_cta);
    if (format == Format::kNVFP4)
      return launch_quant_kernel(kernel_for(dt, BlockTag<kNvBlock>{}), grid, p, stream);
    return launch_quant_kernel(kernel_for(dt, BlockTag<kMxBlock>{}), grid, p, stream);
  });
}

}  // namespace attnqat::cuda

// Defines the launcher `name` of params.h (DType, Format, const LastAxisParams&, cudaStream_t) of
// the kernel template kernel<DType, int kBlock> with `mapping` (a LastAxisMapping enumerator).
#define ATTNQAT_DEFINE_LAST_AXIS_LAUNCHER(name, mapping, kernel)                              \
  cudaError_t name(DType dtype, Format format, const LastAxisParams& p, cudaStream_t stream) { \
    return launch_last_axis(dtype, format, LastAxisMapping::mapping, p, stream,                \
                            [](auto dt, auto block) { return &kernel<dt, block>; });           \
  }
