// src/cuda/quantize/params.h — kernel parameters and launchers of the quantization kernels
// (NVFP4 / MXFP4 quantize, dequantize, fake-quantize, and the amax pass of the global scale).
// Host-side view shared by the entry points (api.cu) and the kernel files; the structs are passed
// by value as kernel parameters, so they are plain data.
//
// Layouts (numerics sections 2, 3, 7; src/reference/quantize.cpp is the reference):
//  - last axis: x [..., L] (leading dims strided, last dim contiguous, L a multiple of the
//    block); block b = row * (L / block) + j covers x[row, j*block : (j+1)*block]; data
//    [rows, L/2] and scales [rows, L/block] contiguous, block b at byte b*block/2 and b.
//  - token axis (V with token blocks, NVFP4): x [..., N, D]; block (lead, c, j) covers tokens
//    16j .. 16j+15 of channel c, zero-padded past N; packed as data [..., D, nb*8] and scales
//    [..., D, nb] (nb = ceil(N/16)), block q = (lead * D + c) * nb + j.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "attnqat/attnqat.h"

namespace attnqat::cuda {

constexpr int kQuantThreads = 256;  // threads per CTA of every quantization kernel

// The leading dims of a strided view (all but the block axis' own dims), with size-1 dims dropped
// and neighbours that are contiguous with each other merged; innermost last. Row r (row-major
// over the original leading dims) starts at element offset lead_offset(lead, r).
struct LeadDims {
  int ndim = 0;
  int64_t shape[kMaxDims] = {};
  int64_t stride[kMaxDims] = {};
};

struct LastAxisParams {
  const void* x = nullptr;  // quantize / fake-quantize input (dtype of the launch)
  LeadDims x_lead;
  bool x_flat = false;      // rows back to back (row stride == L): block b at element b*block
  void* out = nullptr;      // fake-quantize / dequantize output (dtype of the launch)
  LeadDims out_lead;
  bool out_flat = false;
  uint8_t* data = nullptr;  // packed codes [rows, L/2]
  uint8_t* scales = nullptr;  // [rows, L/block]
  const float* g = nullptr;   // NVFP4 second-level scale (device), nullptr for MXFP4
  int64_t blocks_per_row = 0;
  int64_t num_blocks = 0;
};

struct TokenAxisParams {
  const void* x = nullptr;
  LeadDims x_lead;             // dims before [N, D]
  int64_t x_token_stride = 0;  // stride of N in x
  void* out = nullptr;
  LeadDims out_lead;
  int64_t out_token_stride = 0;
  uint8_t* data = nullptr;     // [lead, D, nb * 8]
  uint8_t* scales = nullptr;   // [lead, D, nb]
  const float* g = nullptr;
  int64_t tokens = 0;          // N
  int64_t channels = 0;        // D
  int64_t blocks_per_channel = 0;  // nb = ceil(N / 16)
  int64_t tiles_c = 0;         // ceil(D / kTokenTileC)
  int64_t tiles_b = 0;         // ceil(nb / kTokenTileB)
  int64_t num_tiles = 0;       // lead * tiles_c * tiles_b
};
// A token-axis CTA covers 32 channels (one warp: coalesced loads along D) x 8 token blocks.
constexpr int kTokenTileC = 32;
constexpr int kTokenTileB = kQuantThreads / kTokenTileC;

// The amax pass of compute_global_scale: max |x| over the whole tensor, as fp32 bits, atomically
// maxed into *amax_bits (which the caller zeroed). `unit` elements per work item: 16 (vector
// loads: row_len % 16 == 0 and 16-byte aligned rows) or 1.
struct AmaxParams {
  const void* x = nullptr;
  LeadDims lead;          // all dims but the last
  bool flat = false;      // rows back to back
  int64_t row_len = 0;    // size of the last dim
  int64_t units = 0;      // work items in total
  int64_t units_per_row = 0;
  uint32_t* amax_bits = nullptr;
};

// Launchers (one kernel launch each, on `stream`, the grid sized by the launcher for its own
// thread mapping); they return cudaGetLastError() of the launch. dtype: kFloat32 / kFloat16 /
// kBFloat16 (the dtype of x, or of the dequantized output).
cudaError_t launch_quantize_last(DType dtype, Format format, const LastAxisParams& p,
                                 cudaStream_t stream);
cudaError_t launch_fake_quantize_last(DType dtype, Format format, const LastAxisParams& p,
                                      cudaStream_t stream);
cudaError_t launch_dequantize_last(DType dtype, Format format, const LastAxisParams& p,
                                   cudaStream_t stream);
cudaError_t launch_quantize_token(DType dtype, const TokenAxisParams& p, cudaStream_t stream);
cudaError_t launch_fake_quantize_token(DType dtype, const TokenAxisParams& p, cudaStream_t stream);
cudaError_t launch_dequantize_token(DType dtype, const TokenAxisParams& p, cudaStream_t stream);
// The grid of a launch of `work` items, `per_cta` per CTA, grid-striding past gridDim.x's limit.
inline int grid_for(int64_t work, int64_t per_cta) {
  constexpr int64_t kMaxGrid = 0x7FFFFFFF;
  const int64_t ctas = (work + per_cta - 1) / per_cta;
  return static_cast<int>(ctas < kMaxGrid ? ctas : kMaxGrid);
}
// amax pass (vectorized when vec16) followed by nothing: the caller zeroes *amax_bits before and
// runs launch_global_scale_finalize after.
cudaError_t launch_amax(DType dtype, bool vec16, const AmaxParams& p, int grid,
                        cudaStream_t stream);
// One thread: turns the amax bits at *g into nvfp4_global_scale(amax), in place.
cudaError_t launch_global_scale_finalize(float* g, cudaStream_t stream);

}  // namespace attnqat::cuda
