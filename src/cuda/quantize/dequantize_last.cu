// src/cuda/quantize/dequantize_last.cu — dequantize along the last axis: packed E2M1 codes
// [rows, L/2] + block scales [rows, L/block] (+ g for NVFP4) -> out [..., L] (fp32 / fp16 / bf16,
// contiguous). Must match reference::dequantize() (dequantize_nv / dequantize_mx of
// src/reference/codec.cpp, same operation order) bit for bit; a NaN scale byte (poisoned block)
// decodes to NaN. Any arch of the build.
//
// Design: as fake_quantize_last.cu, a group of kLanes = block bytes / 16 lanes per block, one
// 16-byte output chunk per lane (one STG.128; a warp writes 512 contiguous bytes), its 2 or 4
// code bytes read as one 16- or 32-bit load, the scale byte read by every lane of the group (a
// broadcast). 256 threads per CTA, grid-stride over blocks.
#include "cuda/common/codec.cuh"
#include "cuda/quantize/launch.cuh"

namespace attnqat::cuda {
namespace {

// The kPer codes (kPer / 2 bytes) of this lane, low nibble first.
template <int kPer>
__device__ __forceinline__ uint32_t load_codes(const uint8_t* data, int64_t byte_off) {
  if constexpr (kPer == 4)
    return *reinterpret_cast<const uint16_t*>(data + byte_off);
  else
    return *reinterpret_cast<const uint32_t*>(data + byte_off);
}

template <DType kDt, int kBlock>
__global__ void __launch_bounds__(kQuantThreads) dequantize_last_kernel(const LastAxisParams p) {
  constexpr int kPer = kChunkElems<kDt>;  // elements of this lane
  const float g = nvfp4_g<kBlock>(p);
  for_each_group_block<kDt, kBlock>(p.num_blocks, [&](int64_t b, const auto& group) {
    const uint32_t codes = load_codes<kPer>(p.data, b * (kBlock / 2) + group.part * (kPer / 2));
    const uint8_t scale_byte = p.scales[b];
    float v[kPer];  // [4 or 8] fp32, registers
    if constexpr (kBlock == kNvBlock) {
      const float s = e4m3_decode(scale_byte);
#pragma unroll
      for (int i = 0; i < kPer; ++i) v[i] = nv_dequant_element(codes >> (4 * i), s, g);
    } else {
      const float scale = e8m0_decode(scale_byte);
#pragma unroll
      for (int i = 0; i < kPer; ++i) v[i] = mx_dequant_element(codes >> (4 * i), scale);
    }
    store_chunk<kDt>(p.out, b * kBlock + group.part * kPer, v);
  });
}

}  // namespace

ATTNQAT_DEFINE_LAST_AXIS_LAUNCHER(launch_dequantize_last, kLaneGroup, dequantize_last_kernel)

}  // namespace attnqat::cuda
