// src/cuda/quantize/global_scale.cu — the NVFP4 second-level scale of compute_global_scale:
// g = nvfp4_global_scale(max |x|) written into the caller's one-element fp32 device buffer,
// without synchronizing the host (numerics 2.1; reference: tensor_amax + nvfp4_global_scale in
// src/reference/quantize.cpp and codec.cpp). Any arch.
//
// Sequence on the caller's stream (api.cu): cudaMemsetAsync(g, 0, 4); amax kernel: every warp
// reduces max(bits(|x|)) (non-negative fp32 patterns order like unsigned integers; NaN patterns
// are above +Inf's 0x7F800000, so a NaN or Inf anywhere makes the result >= 0x7F800000, i.e.
// "not finite", g = 1 as in the reference) and one lane atomicMax-es it into g's 4 bytes; then a
// one-thread finalize kernel turns those bits into g in place. The quantize kernel that follows
// reads g from device memory. Capturable in a CUDA graph (a memset node and two kernel nodes).
#include "cuda/common/codec.cuh"
#include "cuda/quantize/launch.cuh"

namespace attnqat::cuda {
namespace {

constexpr uint32_t kAbsMask = 0x7FFFFFFFu;

template <DType kDt, bool kVec16>
__global__ void __launch_bounds__(kQuantThreads) amax_bits_kernel(const AmaxParams p) {
  uint32_t m = 0;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kQuantThreads;
  for (int64_t u = static_cast<int64_t>(blockIdx.x) * kQuantThreads + threadIdx.x; u < p.units;
       u += step) {
    if constexpr (kVec16) {
      const int64_t off = p.flat ? u * 16 : last_axis_block_offset(p.lead, u, p.units_per_row, 16);
      float x[16];
      load16<kDt>(p.x, off, x);
#pragma unroll
      for (int i = 0; i < 16; ++i) m = max(m, __float_as_uint(x[i]) & kAbsMask);
    } else {
      const int64_t off = p.flat ? u : last_axis_block_offset(p.lead, u, p.units_per_row, 1);
      m = max(m, __float_as_uint(load1<kDt>(p.x, off)) & kAbsMask);
    }
  }
  m = __reduce_max_sync(0xFFFFFFFFu, m);
  if ((threadIdx.x % 32) == 0 && m != 0) atomicMax(p.amax_bits, m);
}

__global__ void global_scale_finalize_kernel(float* g) {
  const uint32_t amax_bits = *reinterpret_cast<const uint32_t*>(g);
  *g = nvfp4_global_scale_from_bits(amax_bits);
}

}  // namespace

cudaError_t launch_amax(DType dtype, bool vec16, const AmaxParams& p, int grid,
                        cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto dt) {
    constexpr DType kDt = decltype(dt)::value;
    return launch_quant_kernel(
        vec16 ? &amax_bits_kernel<kDt, true> : &amax_bits_kernel<kDt, false>, grid, p, stream);
  });
}

cudaError_t launch_global_scale_finalize(float* g, cudaStream_t stream) {
  global_scale_finalize_kernel<<<1, 1, 0, stream>>>(g);
  return cudaGetLastError();
}

}  // namespace attnqat::cuda
