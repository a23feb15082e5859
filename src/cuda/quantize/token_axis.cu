// src/cuda/quantize/token_axis.cu — NVFP4 along the token axis (V with v_blocks="token",
// numerics sections 3 and 7): x [..., N, D] (fp32 / fp16 / bf16, leading dims and the token
// stride arbitrary, channels contiguous) in blocks of 16 consecutive tokens per channel, starting
// at token 0, the last block zero-padded. Packed layout data [..., D, nb*8], scales [..., D, nb]
// (nb = ceil(N/16)). quantize, fake_quantize (out may be x itself) and dequantize. Must match
// reference::quantize / fake_quantize / dequantize with BlockAxis::kToken bit for bit. Any arch.
//
// Design (correctness first; this is a small tensor per layer): a CTA of 256 threads covers a
// tile of 32 channels x 8 token blocks; lane = channel, so every one of the 16 scalar loads (or
// stores) of a warp touches 32 consecutive channels of one token (coalesced), and each thread
// owns one 16-token block: its amax, scale and codes stay in registers. The 8-byte code store and
// the scale byte of a thread go to [lead, c, j]: a warp's stores are nb*8 bytes apart, the 8
// warps of the CTA fill neighbouring j, so L2 merges them into full sectors.
#include "cuda/common/codec.cuh"
#include "cuda/quantize/launch.cuh"

namespace attnqat::cuda {
namespace {

struct TokenBlock {
  int64_t lead;     // index over the leading dims
  int64_t channel;  // c
  int64_t block;    // j: tokens 16j .. 16j+15
  bool valid;
};

__device__ __forceinline__ TokenBlock token_block(const TokenAxisParams& p, int64_t tile) {
  const int64_t rest = div_nonneg(tile, p.tiles_b);
  const int64_t tb = tile - rest * p.tiles_b;
  const int64_t lead = div_nonneg(rest, p.tiles_c);
  const int64_t tc = rest - lead * p.tiles_c;
  TokenBlock t;
  t.lead = lead;
  t.channel = tc * kTokenTileC + threadIdx.x % kTokenTileC;
  t.block = tb * kTokenTileB + threadIdx.x / kTokenTileC;
  t.valid = t.channel < p.channels && t.block < p.blocks_per_channel;
  return t;
}

// The block's 16 values, zeros past the last token.
template <DType kDt>
__device__ __forceinline__ void load_token_block(const TokenAxisParams& p, const TokenBlock& t,
                                                 float* x) {
  const int64_t base = lead_offset(p.x_lead, t.lead) + t.channel;
#pragma unroll
  for (int i = 0; i < kNvBlock; ++i) {
    const int64_t tok = t.block * kNvBlock + i;
    x[i] = tok < p.tokens ? load1<kDt>(p.x, base + tok * p.x_token_stride) : 0.0f;
  }
}

template <DType kDt>
__device__ __forceinline__ void store_token_block(const TokenAxisParams& p, const TokenBlock& t,
                                                  const float* v) {
  const int64_t base = lead_offset(p.out_lead, t.lead) + t.channel;
#pragma unroll
  for (int i = 0; i < kNvBlock; ++i) {
    const int64_t tok = t.block * kNvBlock + i;
    if (tok < p.tokens) store1<kDt>(p.out, base + tok * p.out_token_stride, v[i]);
  }
}

// Index of the block in the packed [lead, D, nb] order.
__device__ __forceinline__ int64_t packed_index(const TokenAxisParams& p, const TokenBlock& t) {
  return (t.lead * p.channels + t.channel) * p.blocks_per_channel + t.block;
}

// The grid-stride loop of the token-axis kernels: body(t) for every valid block of this thread
// (one tile per CTA and step, one block per thread and tile).
template <class Body>
__device__ __forceinline__ void for_each_token_block(const TokenAxisParams& p, Body&& body) {
  for (int64_t tile = blockIdx.x; tile < p.num_tiles; tile += gridDim.x) {
    const TokenBlock t = token_block(p, tile);
    if (!t.valid) continue;
    body(t);
  }
}

template <DType kDt>
__global__ void __launch_bounds__(kQuantThreads) nvfp4_quantize_token_kernel(const TokenAxisParams p) {
  const float g = *p.g;
  for_each_token_block(p, [&](const TokenBlock& t) {
    float x[kNvBlock];  // [16 tokens] fp32, registers
    load_token_block<kDt>(p, t, x);
    const NvBlockScale sc = nv_block_scale(block_amax<kNvBlock>(x), g);
    const int64_t q = packed_index(p, t);
    reinterpret_cast<uint2*>(p.data)[q] = make_uint2(nv_pack8(x, sc), nv_pack8(x + 8, sc));
    p.scales[q] = static_cast<uint8_t>(sc.s_bits);
  });
}

template <DType kDt>
__global__ void __launch_bounds__(kQuantThreads)
    nvfp4_fake_quantize_token_kernel(const TokenAxisParams p) {
  const float g = *p.g;
  for_each_token_block(p, [&](const TokenBlock& t) {
    float x[kNvBlock];  // [16 tokens] fp32, registers
    load_token_block<kDt>(p, t, x);
    const NvBlockScale sc = nv_block_scale(block_amax<kNvBlock>(x), g);
#pragma unroll
    for (int i = 0; i < kNvBlock; ++i) x[i] = nv_fake_element(x[i], sc, g);
    store_token_block<kDt>(p, t, x);
  });
}

template <DType kDt>
__global__ void __launch_bounds__(kQuantThreads)
    nvfp4_dequantize_token_kernel(const TokenAxisParams p) {
  const float g = *p.g;
  for_each_token_block(p, [&](const TokenBlock& t) {
    const int64_t q = packed_index(p, t);
    const uint2 w = reinterpret_cast<const uint2*>(p.data)[q];
    const float s = e4m3_decode(p.scales[q]);
    float v[kNvBlock];  // [16 tokens] fp32, registers
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      v[i] = nv_dequant_element(w.x >> (4 * i), s, g);
      v[8 + i] = nv_dequant_element(w.y >> (4 * i), s, g);
    }
    store_token_block<kDt>(p, t, v);
  });
}

enum class TokenOp { kQuantize, kFakeQuantize, kDequantize };

template <DType kDt>
auto token_kernel(TokenOp op) -> void (*)(TokenAxisParams) {
  switch (op) {
    case TokenOp::kQuantize: return &nvfp4_quantize_token_kernel<kDt>;
    case TokenOp::kFakeQuantize: return &nvfp4_fake_quantize_token_kernel<kDt>;
    default: return &nvfp4_dequantize_token_kernel<kDt>;  // TokenOp::kDequantize
  }
}

cudaError_t launch_op(TokenOp op, DType dtype, const TokenAxisParams& p, cudaStream_t stream) {
  const int grid = grid_for(p.num_tiles, 1);  // one tile per CTA
  return dispatch_dtype(dtype, [&](auto dt) {
    return launch_quant_kernel(token_kernel<decltype(dt)::value>(op), grid, p, stream);
  });
}

}  // namespace

cudaError_t launch_quantize_token(DType dtype, const TokenAxisParams& p, cudaStream_t stream) {
  return launch_op(TokenOp::kQuantize, dtype, p, stream);
}
cudaError_t launch_fake_quantize_token(DType dtype, const TokenAxisParams& p, cudaStream_t stream) {
  return launch_op(TokenOp::kFakeQuantize, dtype, p, stream);
}
cudaError_t launch_dequantize_token(DType dtype, const TokenAxisParams& p, cudaStream_t stream) {
  return launch_op(TokenOp::kDequantize, dtype, p, stream);
}

}  // namespace attnqat::cuda
