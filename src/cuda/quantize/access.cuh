// src/cuda/quantize/access.cuh — memory access of the quantization kernels: strided row offsets,
// 16-element vector loads/stores (16-byte LDG/STG) and scalar loads/stores of fp32 / fp16 / bf16,
// converting to and from fp32 exactly (loads) and with round-to-nearest-even (stores, as the
// reference's store_from_double via float_to_bf16 / float_to_fp16). Any arch (sm_80+).
#pragma once

#include <cstdint>

#include "cuda/common/ptx.cuh"
#include "cuda/quantize/params.h"

namespace attnqat::cuda {

// n / d for n >= 0, d > 0, with the cheap 32-bit division when both fit.
__device__ __forceinline__ int64_t div_nonneg(int64_t n, int64_t d) {
  if (((static_cast<uint64_t>(n) | static_cast<uint64_t>(d)) >> 32) == 0)
    return static_cast<int64_t>(static_cast<uint32_t>(n) / static_cast<uint32_t>(d));
  return n / d;
}

// Element offset of row `row` (row-major over the leading dims). The loop is unrolled, so the
// LeadDims parameter is only ever indexed with constants (stays in the constant bank, no local
// memory); the outermost dim needs no division.
__device__ __forceinline__ int64_t lead_offset(const LeadDims& lead, int64_t row) {
  int64_t off = 0;
#pragma unroll
  for (int i = kMaxDims - 1; i >= 0; --i) {
    if (i < lead.ndim) {
      if (i == 0) {
        off += row * lead.stride[0];
      } else {
        const int64_t q = div_nonneg(row, lead.shape[i]);
        off += (row - q * lead.shape[i]) * lead.stride[i];
        row = q;
      }
    }
  }
  return off;
}

// Element offset of block b of a last-axis layout (blocks_per_row blocks of `block` per row).
__device__ __forceinline__ int64_t last_axis_block_offset(const LeadDims& lead, int64_t b,
                                                          int64_t blocks_per_row, int block) {
  const int64_t row = div_nonneg(b, blocks_per_row);
  return lead_offset(lead, row) + (b - row * blocks_per_row) * block;
}

// ---- fp16 / bf16 <-> fp32 -------------------------------------------------------------------

__device__ __forceinline__ void unpack_bf16x2(uint32_t w, float& lo, float& hi) {
  lo = __uint_as_float(w << 16);
  hi = __uint_as_float(w & 0xFFFF0000u);
}
__device__ __forceinline__ void unpack_f16x2(uint32_t w, float& lo, float& hi) {
  asm("{\n"
      ".reg .b16 l, h;\n"
      "mov.b32 {l, h}, %2;\n"
      "cvt.f32.f16 %0, l;\n"
      "cvt.f32.f16 %1, h;\n"
      "}"
      : "=f"(lo), "=f"(hi)
      : "r"(w));
}

// ---- one 16-byte chunk: 4 fp32 or 8 fp16/bf16 elements -----------------------------------------

template <DType kDt>
constexpr int kChunkElems = kDt == DType::kFloat32 ? 4 : 8;

template <DType kDt>
__device__ __forceinline__ void load_chunk(const void* base, int64_t off, float* v) {
  if constexpr (kDt == DType::kFloat32) {
    const float4 q = *reinterpret_cast<const float4*>(static_cast<const float*>(base) + off);
    v[0] = q.x;
    v[1] = q.y;
    v[2] = q.z;
    v[3] = q.w;
  } else {
    const uint4 q = *reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(base) + off);
    const uint32_t w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if constexpr (kDt == DType::kBFloat16)
        unpack_bf16x2(w[j], v[2 * j], v[2 * j + 1]);
      else
        unpack_f16x2(w[j], v[2 * j], v[2 * j + 1]);
    }
  }
}

template <DType kDt>
__device__ __forceinline__ void store_chunk(void* base, int64_t off, const float* v) {
  if constexpr (kDt == DType::kFloat32) {
    *reinterpret_cast<float4*>(static_cast<float*>(base) + off) = make_float4(v[0], v[1], v[2], v[3]);
  } else {
    uint32_t w[4];
#pragma unroll
    for (int j = 0; j < 4; ++j)
      w[j] = kDt == DType::kBFloat16 ? pack_rn_bf16x2(v[2 * j], v[2 * j + 1])
                                     : pack_rn_f16x2(v[2 * j], v[2 * j + 1]);
    *reinterpret_cast<uint4*>(static_cast<uint16_t*>(base) + off) = make_uint4(w[0], w[1], w[2], w[3]);
  }
}

// ---- 16 elements at a 16-byte aligned address -------------------------------------------------

template <DType kDt>
__device__ __forceinline__ void load16(const void* base, int64_t off, float* v) {
#pragma unroll
  for (int k = 0; k < 16; k += kChunkElems<kDt>) load_chunk<kDt>(base, off + k, v + k);
}

template <DType kDt>
__device__ __forceinline__ void store16(void* base, int64_t off, const float* v) {
#pragma unroll
  for (int k = 0; k < 16; k += kChunkElems<kDt>) store_chunk<kDt>(base, off + k, v + k);
}

// ---- lane groups ------------------------------------------------------------------------------

// kLanes consecutive lanes of a warp (an aligned group) that share one quantization block, each
// owning one 16-byte chunk of it, so that a warp's 16-byte stores cover 512 contiguous bytes
// (one thread per block would leave 64 or 128 bytes between neighbouring lanes, so every
// 16-byte store of a warp would touch its own 32-byte sector). The lanes of a group are always active
// together (the loop bounds are per block), so `mask` is a valid shuffle mask.
template <int kLanes>
struct LaneGroup {
  static_assert(kLanes >= 1 && kLanes <= 32 && (kLanes & (kLanes - 1)) == 0, "a power of two");
  static constexpr int kPerCta = kQuantThreads / kLanes;  // blocks per CTA and step
  int part;       // this lane's chunk in the block
  unsigned mask;  // the group's lanes
  __device__ __forceinline__ LaneGroup() {
    const unsigned lane = threadIdx.x % 32u;
    part = static_cast<int>(threadIdx.x % kLanes);
    mask = (kLanes == 32 ? 0xFFFFFFFFu : ((1u << kLanes) - 1u)) << (lane & ~(kLanes - 1u));
  }
  __device__ __forceinline__ int64_t first_block() const {
    return static_cast<int64_t>(blockIdx.x) * kPerCta + threadIdx.x / kLanes;
  }
  __device__ __forceinline__ int64_t block_step() const {
    return static_cast<int64_t>(gridDim.x) * kPerCta;
  }
};

// The grid-stride loop of a lane-group kernel over a last-axis layout: body(b, group) for every
// block b (of kBlock elements) that this lane's group owns, kBlock / kChunkElems<kDt> lanes per
// block. The launch sizes its grid to match (launch_last_axis, LastAxisMapping::kLaneGroup).
template <DType kDt, int kBlock, class Body>
__device__ __forceinline__ void for_each_group_block(int64_t num_blocks, Body&& body) {
  const LaneGroup<kBlock / kChunkElems<kDt>> group;
  for (int64_t b = group.first_block(); b < num_blocks; b += group.block_step()) body(b, group);
}

// The NVFP4 second-level scale g of a last-axis kernel, read once per thread (kBlock 16); 1 for
// MXFP4 (kBlock 32), which has none and whose p.g is nullptr.
template <int kBlock>
__device__ __forceinline__ float nvfp4_g(const LastAxisParams& p) {
  return kBlock == kNvBlock ? *p.g : 1.0f;
}

// ---- one element ------------------------------------------------------------------------------

template <DType kDt>
__device__ __forceinline__ float load1(const void* base, int64_t off) {
  if constexpr (kDt == DType::kFloat32) {
    return static_cast<const float*>(base)[off];
  } else {
    const uint32_t h = static_cast<const uint16_t*>(base)[off];
    float lo, hi;
    if constexpr (kDt == DType::kBFloat16)
      unpack_bf16x2(h, lo, hi);
    else
      unpack_f16x2(h, lo, hi);
    return lo;
  }
}

template <DType kDt>
__device__ __forceinline__ void store1(void* base, int64_t off, float v) {
  if constexpr (kDt == DType::kFloat32) {
    static_cast<float*>(base)[off] = v;
  } else {
    uint16_t h;
    if constexpr (kDt == DType::kBFloat16)
      asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(v));
    else
      asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
    static_cast<uint16_t*>(base)[off] = h;
  }
}

}  // namespace attnqat::cuda
