// Tensor-level reference quantizers: apply the block quantizers of codec.cpp along the block
// axis of a strided tensor (docs/numerics.md sections 2, 3 and 7).
#include <cmath>
#include <functional>
#include <vector>

#include "common/host_convert.h"
#include "reference/reference.h"

namespace attnqat::reference {
namespace {

// Calls f(lead_index, offset in a, offset in b) for every index of the first `nlead` dims of
// two views of the same logical shape (b may be a or another layout).
void for_each_leading(const TensorView& a, const TensorView& b, int nlead,
                      const std::function<void(int64_t, int64_t, int64_t)>& f) {
  int64_t count = 1;
  for (int i = 0; i < nlead; ++i) count *= a.shape[i];
  for (int64_t n = 0; n < count; ++n) {
    int64_t rem = n, off_a = 0, off_b = 0;
    for (int i = nlead - 1; i >= 0; --i) {
      const int64_t idx = rem % a.shape[i];
      rem /= a.shape[i];
      off_a += idx * a.stride[i];
      off_b += idx * b.stride[i];
    }
    f(n, off_a, off_b);
  }
}

float read_global_scale(const TensorView& g, const QuantizeOptions& opts) {
  if (opts.format != Format::kNVFP4) return 1.0f;
  return *static_cast<const float*>(g.data);
}

// amax over a whole tensor; NaN or Inf anywhere gives +Inf (then nvfp4_global_scale gives 1).
float tensor_amax(const TensorView& x) {
  float amax = 0.0f;
  const int64_t last = x.size(-1), last_stride = x.stride_of(-1);
  for_each_leading(x, x, x.ndim - 1, [&](int64_t, int64_t off, int64_t) {
    for (int64_t i = 0; i < last; ++i) {
      const float v = static_cast<float>(load_as_double(x, off + i * last_stride));
      if (!std::isfinite(v)) amax = INFINITY;
      else amax = std::fmax(amax, std::fabs(v));
    }
  });
  return amax;
}

int block_of(const QuantizeOptions& opts) { return opts.format == Format::kNVFP4 ? kNvBlock : kMxBlock; }

// Quantizes one block of values (block_size of them) into codes, returns the scale byte.
uint8_t quantize_block(const float* x, const QuantizeOptions& opts, float g, uint8_t* codes) {
  return opts.format == Format::kNVFP4 ? quantize_block_nv(x, g, codes) : quantize_block_mx(x, codes);
}
float dequantize_element(uint8_t code, uint8_t scale, const QuantizeOptions& opts, float g) {
  return opts.format == Format::kNVFP4 ? dequantize_nv(code, scale, g) : dequantize_mx(code, scale);
}

// Visits every block of x: gathers its values (zero-padded on the token axis) and hands
// (packed-block index, values, element offsets in x, element offsets in y) to f; offsets are -1
// for padding. y is a second view of x's logical shape (an output), or x itself.
using BlockFn = std::function<void(int64_t block, const float* vals, const int64_t* offs_x,
                                   const int64_t* offs_y)>;
void for_each_block(const TensorView& x, const TensorView& y, const QuantizeOptions& opts,
                    bool load, const BlockFn& f) {
  const int block = block_of(opts);
  std::vector<float> vals(block, 0.0f);
  std::vector<int64_t> offs_x(block), offs_y(block);
  if (opts.axis == BlockAxis::kLast) {
    const int64_t len = x.size(-1), nb = len / block;
    for_each_leading(x, y, x.ndim - 1, [&](int64_t row, int64_t ox, int64_t oy) {
      for (int64_t b = 0; b < nb; ++b) {
        for (int i = 0; i < block; ++i) {
          offs_x[i] = ox + (b * block + i) * x.stride_of(-1);
          offs_y[i] = oy + (b * block + i) * y.stride_of(-1);
          if (load) vals[i] = static_cast<float>(load_as_double(x, offs_x[i]));
        }
        f(row * nb + b, vals.data(), offs_x.data(), offs_y.data());
      }
    });
  } else {
    // x [..., N, D]: blocks of 16 tokens per channel; packed order [..., D, nb].
    const int64_t n = x.size(-2), d = x.size(-1), nb = (n + block - 1) / block;
    for_each_leading(x, y, x.ndim - 2, [&](int64_t lead, int64_t ox, int64_t oy) {
      for (int64_t c = 0; c < d; ++c) {
        for (int64_t b = 0; b < nb; ++b) {
          for (int i = 0; i < block; ++i) {
            const int64_t tok = b * block + i;
            const bool in = tok < n;
            offs_x[i] = in ? ox + tok * x.stride_of(-2) + c * x.stride_of(-1) : -1;
            offs_y[i] = in ? oy + tok * y.stride_of(-2) + c * y.stride_of(-1) : -1;
            if (load) vals[i] = in ? static_cast<float>(load_as_double(x, offs_x[i])) : 0.0f;
          }
          f((lead * d + c) * nb + b, vals.data(), offs_x.data(), offs_y.data());
        }
      }
    });
  }
}

}  // namespace

Status quantize(const TensorView& x, const TensorView& data, const TensorView& scales,
                const TensorView& global_scale, const QuantizeOptions& opts) {
  if (opts.format == Format::kNVFP4 && opts.compute_global_scale)
    *static_cast<float*>(global_scale.data) = nvfp4_global_scale(tensor_amax(x));
  const float g = read_global_scale(global_scale, opts);
  const int block = block_of(opts);
  auto* d8 = static_cast<uint8_t*>(data.data);
  auto* s8 = static_cast<uint8_t*>(scales.data);
  std::vector<uint8_t> codes(block);
  for_each_block(x, x, opts, /*load=*/true, [&](int64_t b, const float* vals, const int64_t*, const int64_t*) {
    s8[b] = quantize_block(vals, opts, g, codes.data());
    for (int i = 0; i < block; i += 2) d8[b * block / 2 + i / 2] = pack_codes(codes[i], codes[i + 1]);
  });
  return Status::Ok();
}

Status dequantize(const TensorView& data, const TensorView& scales, const TensorView& global_scale,
                  const TensorView& out, const QuantizeOptions& opts) {
  const float g = read_global_scale(global_scale, opts);
  const int block = block_of(opts);
  const auto* d8 = static_cast<const uint8_t*>(data.data);
  const auto* s8 = static_cast<const uint8_t*>(scales.data);
  for_each_block(out, out, opts, /*load=*/false, [&](int64_t b, const float*, const int64_t* offs, const int64_t*) {
    for (int i = 0; i < block; ++i) {
      if (offs[i] < 0) continue;  // token-axis padding
      const uint8_t code = unpack_code(d8[b * block / 2 + i / 2], i);
      store_from_double(out, offs[i], dequantize_element(code, s8[b], opts, g));
    }
  });
  return Status::Ok();
}

Status fake_quantize(const TensorView& x, const TensorView& out, const TensorView& global_scale,
                     const QuantizeOptions& opts) {
  if (opts.format == Format::kNVFP4 && opts.compute_global_scale)
    *static_cast<float*>(global_scale.data) = nvfp4_global_scale(tensor_amax(x));
  const float g = read_global_scale(global_scale, opts);
  const int block = block_of(opts);
  std::vector<uint8_t> codes(block);
  // Each block is read completely before it is written, so out may alias x.
  for_each_block(x, out, opts, /*load=*/true,
                 [&](int64_t, const float* vals, const int64_t*, const int64_t* offs_out) {
                   const uint8_t s = quantize_block(vals, opts, g, codes.data());
                   for (int i = 0; i < block; ++i)
                     if (offs_out[i] >= 0)
                       store_from_double(out, offs_out[i], dequantize_element(codes[i], s, opts, g));
                 });
  return Status::Ok();
}

}  // namespace attnqat::reference
