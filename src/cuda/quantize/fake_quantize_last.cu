// src/cuda/quantize/fake_quantize_last.cu — fake quantization along the last axis:
// out = dequantize(quantize(x)) for x [..., L] (fp32 / fp16 / bf16), out of x's shape and dtype
// (leading dims of both strided; out may be x itself: every lane reads its chunk of the block
// before the group's shuffle, and writes it after, and no other lane touches that block). NVFP4
// (g from device memory) and MXFP4. Must match reference::fake_quantize() bit for bit
// (quantize_block_nv + dequantize_nv, or the MX pair, of src/reference/codec.cpp; the value is
// stored in out's dtype with RNE, which is exact for it). Any arch of the build; E2M1 rounding
// per codec.cuh.
//
// Design: a group of kLanes = block bytes / 16 lanes per block (NVFP4: 4 lanes for fp32, 2 for
// fp16/bf16; MXFP4: 8 and 4), one 16-byte chunk per lane: one LDG.128 and one STG.128 per lane,
// a warp's accesses contiguous (LaneGroup in access.cuh says why). The block amax is reduced over
// the group with shuffles; every lane then derives the same scale (a few dozen instructions per
// 16-byte chunk; the kernel stays bandwidth-bound). The codes are never materialized: each element
// goes straight to value(q) * s * g (codec.cuh nv_fake_element / mx_fake_element). 256 threads
// per CTA, grid-stride over blocks, no shared memory.
#include "cuda/common/codec.cuh"
#include "cuda/quantize/launch.cuh"

namespace attnqat::cuda {
namespace {

template <DType kDt, int kBlock>
__global__ void __launch_bounds__(kQuantThreads) fake_quantize_last_kernel(const LastAxisParams p) {
  constexpr int kPer = kChunkElems<kDt>;  // elements of this lane
  const float g = nvfp4_g<kBlock>(p);
  for_each_group_block<kDt, kBlock>(p.num_blocks, [&](int64_t b, const auto& group) {
    const int64_t off_x =
        p.x_flat ? b * kBlock : last_axis_block_offset(p.x_lead, b, p.blocks_per_row, kBlock);
    const int64_t off_out =
        p.out_flat ? b * kBlock : last_axis_block_offset(p.out_lead, b, p.blocks_per_row, kBlock);
    float x[kPer];  // [4 or 8] fp32, registers; overwritten with the fake-quantized values
    load_chunk<kDt>(p.x, off_x + group.part * kPer, x);
    const float amax = group_max_nan<kBlock / kPer>(block_amax<kPer>(x), group.mask);
    if constexpr (kBlock == kNvBlock) {
      const NvBlockScale sc = nv_block_scale(amax, g);
#pragma unroll
      for (int i = 0; i < kPer; ++i) x[i] = nv_fake_element(x[i], sc, g);
    } else {
      const MxBlockScale sc = mx_block_scale(amax);
#pragma unroll
      for (int i = 0; i < kPer; ++i) x[i] = mx_fake_element(x[i], sc);
    }
    store_chunk<kDt>(p.out, off_out + group.part * kPer, x);
  });
}

}  // namespace

ATTNQAT_DEFINE_LAST_AXIS_LAUNCHER(launch_fake_quantize_last, kLaneGroup, fake_quantize_last_kernel)

}  // namespace attnqat::cuda
