// Reference FP4 inference paths; see decode.h. Readable, not fast: the decode gathers
// each sequence's cache into contiguous fp32 K^, V^ and runs the reference forward on them.
#include "reference/decode.h"

#include <cmath>
#include <limits>
#include <vector>

#include "common/host_convert.h"
#include "reference/reference.h"

namespace attnqat::reference {
namespace {

constexpr float kUnitScale = 1.0f;  // g of Q, K, V in mode fp4 (numerics section 2)

TensorView float_view(std::vector<float>& buf, std::initializer_list<int64_t> shape, const char* name) {
  return make_view(buf.data(), DType::kFloat32, shape, name);
}

// Offset of token `pos` of head h in a [num_pages, H, page_size, width] cache tensor.
int64_t cache_row(const KVCacheDims& dims, int64_t page, int64_t h, int64_t slot, int64_t width) {
  return ((page * dims.heads + h) * dims.page_size + slot) * width;
}

int32_t page_of(const IndexView& table, int64_t b, int64_t idx) {
  return table.data[b * table.stride[0] + idx * table.stride[1]];
}

int32_t index_at(const IndexView& v, int64_t b) { return v.data[b * v.stride[0]]; }

}  // namespace

Status attention_forward_packed(const PackedTensor& q, const PackedTensor& k, const PackedTensor& v,
                                const AttentionOptions& opts, const ForwardOutputs& out) {
  const TensorView& o = out.o;
  const int64_t B = o.shape[0], Hq = o.shape[1], Nq = o.shape[2], D = o.shape[3];
  const int64_t Hkv = k.data.shape[1], Nk = k.data.shape[2];
  std::vector<float> qh(B * Hq * Nq * D), kh(B * Hkv * Nk * D), vh(B * Hkv * Nk * D);
  QuantizeOptions qo;  // NVFP4, channel blocks
  const TensorView qv = float_view(qh, {B, Hq, Nq, D}, "q");
  const TensorView kv = float_view(kh, {B, Hkv, Nk, D}, "k");
  const TensorView vv = float_view(vh, {B, Hkv, Nk, D}, "v");
  ATTNQAT_RETURN_IF_ERROR(reference::dequantize(q.data, q.scales, q.global_scale, qv, qo));
  ATTNQAT_RETURN_IF_ERROR(reference::dequantize(k.data, k.scales, k.global_scale, kv, qo));
  qo.axis = opts.v_blocks == VBlocks::kToken ? BlockAxis::kToken : BlockAxis::kLast;
  ATTNQAT_RETURN_IF_ERROR(reference::dequantize(v.data, v.scales, v.global_scale, vv, qo));
  AttentionOptions o2 = opts;
  o2.inputs_quantized = true;  // the decoded values are the operands: no re-quantization
  return reference::attention_forward(qv, kv, vv, o2, out);
}

Status kv_cache_append(const PagedKVCache& cache, const KVCacheDims& dims, const TensorView& k_new,
                       const TensorView& v_new, const IndexView& page_table,
                       const IndexView& start) {
  const int64_t B = k_new.shape[0], H = k_new.shape[1], N = k_new.shape[2], D = dims.head_dim;
  const int64_t nblk = D / kNvBlock;
  for (int pass = 0; pass < 2; ++pass) {
    const TensorView& x = pass == 0 ? k_new : v_new;
    auto* data = static_cast<uint8_t*>(pass == 0 ? cache.k_data.data : cache.v_data.data);
    auto* scales = static_cast<uint8_t*>(pass == 0 ? cache.k_scales.data : cache.v_scales.data);
    parallel_for(B * H, [&](int64_t bh) {
      const int64_t b = bh / H, h = bh % H;
      float vals[kNvBlock];
      uint8_t codes[kNvBlock];
      for (int64_t i = 0; i < N; ++i) {
        const int64_t pos = index_at(start, b) + i;
        const int64_t page = page_of(page_table, b, pos / dims.page_size);
        const int64_t slot = pos % dims.page_size;
        uint8_t* drow = data + cache_row(dims, page, h, slot, D / 2);
        uint8_t* srow = scales + cache_row(dims, page, h, slot, nblk);
        const int64_t base = b * x.stride[0] + h * x.stride[1] + i * x.stride[2];
        for (int64_t blk = 0; blk < nblk; ++blk) {
          for (int e = 0; e < kNvBlock; ++e)
            vals[e] = static_cast<float>(load_as_double(x, base + (blk * kNvBlock + e) * x.stride[3]));
          srow[blk] = quantize_block_nv(vals, kUnitScale, codes);
          for (int e = 0; e < kNvBlock; e += 2)
            drow[blk * (kNvBlock / 2) + e / 2] = pack_codes(codes[e], codes[e + 1]);
        }
      }
    });
  }
  return Status::Ok();
}

std::vector<float> gather_cache(const TensorView& data, const TensorView& scales,
                                const KVCacheDims& dims, const IndexView& page_table, int64_t b,
                                int64_t len) {
  const int64_t H = dims.heads, D = dims.head_dim, nblk = D / kNvBlock;
  std::vector<float> out(static_cast<size_t>(H * len * D));
  const auto* d8 = static_cast<const uint8_t*>(data.data);
  const auto* s8 = static_cast<const uint8_t*>(scales.data);
  for (int64_t h = 0; h < H; ++h)
    for (int64_t t = 0; t < len; ++t) {
      const int64_t page = page_of(page_table, b, t / dims.page_size), slot = t % dims.page_size;
      const uint8_t* drow = d8 + cache_row(dims, page, h, slot, D / 2);
      const uint8_t* srow = s8 + cache_row(dims, page, h, slot, nblk);
      float* dst = out.data() + (h * len + t) * D;
      for (int64_t c = 0; c < D; ++c)
        dst[c] = dequantize_nv(unpack_code(drow[c / 2], static_cast<int>(c)), srow[c / kNvBlock], kUnitScale);
    }
  return out;
}

Status decode_attention(const TensorView& q, const PagedKVCache& cache, const KVCacheDims& dims,
                        const IndexView& page_table, const IndexView& seq_lens,
                        const DecodeOptions& opts, const TensorView& out, const TensorView& lse,
                        const AttentionOptions& base) {
  const int64_t B = q.shape[0], Hq = q.shape[1], nq = q.shape[2], D = q.shape[3];
  AttentionOptions ao = base;
  ao.mode = Mode::kFP4;
  ao.p_quant = opts.p_quant;
  ao.v_blocks = VBlocks::kChannel;
  // Bottom-right causal (the nq queries are the last tokens of the sequence), cut to the window:
  // the dense mask with window (window_left, 0).
  ao.causal = true;
  ao.window_left = opts.window_left;
  ao.window_right = 0;
  ao.softmax_scale = opts.softmax_scale;
  ao.kv_tile = 128;
  ao.inputs_quantized = true;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t len = index_at(seq_lens, b);
    std::vector<float> kh = gather_cache(cache.k_data, cache.k_scales, dims, page_table, b, len);
    std::vector<float> vh = gather_cache(cache.v_data, cache.v_scales, dims, page_table, b, len);
    // Q^ = phi_nv(q; 1) per 16 channels, in fp32 (exact), or fp64 for the fp64 variant.
    std::vector<float> qh(static_cast<size_t>(Hq * nq * D));
    for (int64_t h = 0; h < Hq; ++h)
      for (int64_t i = 0; i < nq; ++i) {
        const int64_t src = b * q.stride[0] + h * q.stride[1] + i * q.stride[2];
        float* dst = qh.data() + (h * nq + i) * D;
        for (int64_t c = 0; c < D; ++c) dst[c] = static_cast<float>(load_as_double(q, src + c * q.stride[3]));
        for (int64_t c = 0; c < D; c += kNvBlock) fake_quantize_block_nv(dst + c, kUnitScale);
      }
    const int64_t Hkv = dims.heads;
    // Precision::kFloat64 in `base` makes the reference compute in fp64 on these fp32 copies.
    const TensorView qv = float_view(qh, {1, Hq, nq, D}, "q");
    const TensorView kv = float_view(kh, {1, Hkv, len, D}, "k");
    const TensorView vv = float_view(vh, {1, Hkv, len, D}, "v");
    std::vector<float> lse_buf(static_cast<size_t>(Hq * nq));
    ForwardOutputs fo;
    fo.o = out;
    fo.o.data = static_cast<uint8_t*>(out.data) + b * out.stride[0] * dtype_size(out.dtype);
    fo.o.shape[0] = 1;
    fo.lse = float_view(lse_buf, {1, Hq, nq}, "lse");
    ATTNQAT_RETURN_IF_ERROR(reference::attention_forward(qv, kv, vv, ao, fo));
    if (lse.data != nullptr)
      for (int64_t h = 0; h < Hq; ++h)
        for (int64_t i = 0; i < nq; ++i)
          static_cast<float*>(lse.data)[b * lse.stride[0] + h * lse.stride[1] + i * lse.stride[2]] =
              lse_buf[h * nq + i];
  }
  return Status::Ok();
}

}  // namespace attnqat::reference
