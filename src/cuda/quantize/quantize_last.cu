// src/cuda/quantize/quantize_last.cu — quantize along the last axis: x [..., L] (fp32 / fp16 /
// bf16, leading dims strided) -> packed E2M1 codes [rows, L/2] + block scales [rows, L/block].
// NVFP4 (16-element blocks, E4M3 scales, second-level scale g read from device memory) and
// MXFP4 (32-element blocks, E8M0 scales). Must match reference::quantize() (quantize_block_nv /
// quantize_block_mx of src/reference/codec.cpp) bit for bit. Any arch of the build (sm_90a,
// sm_100a, sm_120a); the E2M1 rounding is the hardware convert on the latter two (codec.cuh).
//
// Design: bandwidth-bound, so one thread per block: 16 (NVFP4) or 32 (MXFP4) elements read with
// 16-byte loads (one to eight LDG.128), the block's scale and codes in registers, the packed
// codes written with one 8- or 16-byte store and the scale byte with one byte store (a warp
// writes 256 / 512 contiguous code bytes and 32 contiguous scale bytes). 256 threads per CTA,
// one block per thread per grid-stride step, no shared memory. g is read once per thread (a
// broadcast load; it was written by the amax pass earlier on the same stream when
// compute_global_scale is set).
#include "cuda/common/codec.cuh"
#include "cuda/quantize/launch.cuh"

namespace attnqat::cuda {
namespace {

template <DType kDt, int kBlock>
__global__ void __launch_bounds__(kQuantThreads) quantize_last_kernel(const LastAxisParams p) {
  const float g = nvfp4_g<kBlock>(p);
  const int64_t step = static_cast<int64_t>(gridDim.x) * kQuantThreads;
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * kQuantThreads + threadIdx.x; b < p.num_blocks;
       b += step) {
    const int64_t off =
        p.x_flat ? b * kBlock : last_axis_block_offset(p.x_lead, b, p.blocks_per_row, kBlock);
    float x[kBlock];  // [16 or 32] fp32, registers
#pragma unroll
    for (int k = 0; k < kBlock; k += 16) load16<kDt>(p.x, off + k, x + k);
    if constexpr (kBlock == kNvBlock) {
      const NvBlockScale sc = nv_block_scale(block_amax<kNvBlock>(x), g);
      reinterpret_cast<uint2*>(p.data)[b] = make_uint2(nv_pack8(x, sc), nv_pack8(x + 8, sc));
      p.scales[b] = static_cast<uint8_t>(sc.s_bits);
    } else {
      const MxBlockScale sc = mx_block_scale(block_amax<kMxBlock>(x));
      reinterpret_cast<uint4*>(p.data)[b] = make_uint4(mx_pack8(x, sc), mx_pack8(x + 8, sc),
                                                       mx_pack8(x + 16, sc), mx_pack8(x + 24, sc));
      p.scales[b] = static_cast<uint8_t>(sc.code);
    }
  }
}

}  // namespace

ATTNQAT_DEFINE_LAST_AXIS_LAUNCHER(launch_quantize_last, kThreadPerBlock, quantize_last_kernel)

}  // namespace attnqat::cuda
