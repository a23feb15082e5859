// Helpers of the FP4 inference tests (CPU: test_decode.cpp; GPU: cuda_decode/): a host-side paged
// FP4 KV cache filled through the public kv_cache_append (the CPU reference), with pages handed
// out in a shuffled order so that no sequence's pages are contiguous.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <random>
#include <vector>

#include "attnqat/attnqat.h"

namespace attnqat::test {

inline IndexView index_view(const std::vector<int32_t>& v, int64_t rows, int64_t cols,
                            const char* name, Device dev = Device::kCPU, const int32_t* data = nullptr) {
  IndexView iv;
  iv.data = data ? data : v.data();
  iv.device = dev;
  iv.name = name;
  if (cols < 0) {
    iv.ndim = 1;
    iv.shape[0] = rows;
    iv.stride[0] = 1;
  } else {
    iv.ndim = 2;
    iv.shape[0] = rows;
    iv.shape[1] = cols;
    iv.stride[0] = cols;
    iv.stride[1] = 1;
  }
  return iv;
}

// A paged FP4 KV cache in host memory.
struct HostCache {
  int64_t num_pages = 0, heads = 0, page_size = 0, D = 0;
  std::vector<uint8_t> k_data, k_scales, v_data, v_scales;
  std::vector<int32_t> page_table;  // [B, pages_per_seq]
  std::vector<int32_t> lens;        // [B]
  int64_t B = 0, pages_per_seq = 0;

  HostCache(int64_t batch, int64_t max_len, int64_t hkv, int64_t d, int64_t ps, uint32_t seed)
      : heads(hkv), page_size(ps), D(d), B(batch) {
    pages_per_seq = std::max<int64_t>(1, (max_len + ps - 1) / ps);
    num_pages = B * pages_per_seq + 3;  // a few spare pages that no sequence uses
    const size_t rows = static_cast<size_t>(num_pages * hkv * ps);
    // Filled with a pattern that is never a valid page content (scales 0x7F = NaN): any read of
    // a slot that was not written poisons the result.
    k_data.assign(rows * d / 2, 0x77);
    v_data.assign(rows * d / 2, 0x77);
    k_scales.assign(rows * d / 16, 0x7F);
    v_scales.assign(rows * d / 16, 0x7F);
    std::vector<int32_t> ids(num_pages);
    std::iota(ids.begin(), ids.end(), 0);
    std::shuffle(ids.begin(), ids.end(), std::mt19937(seed));
    page_table.assign(B * pages_per_seq, 0);
    for (int64_t i = 0; i < B * pages_per_seq; ++i) page_table[i] = ids[i];
    lens.assign(B, 0);
  }

  PagedKVCache view(Device dev = Device::kCPU) {
    PagedKVCache c;
    c.k_data = make_view(k_data.data(), DType::kUInt8, {num_pages, heads, page_size, D / 2}, "k_data", dev);
    c.k_scales = make_view(k_scales.data(), DType::kUInt8, {num_pages, heads, page_size, D / 16}, "k_scales", dev);
    c.v_data = make_view(v_data.data(), DType::kUInt8, {num_pages, heads, page_size, D / 2}, "v_data", dev);
    c.v_scales = make_view(v_scales.data(), DType::kUInt8, {num_pages, heads, page_size, D / 16}, "v_scales", dev);
    return c;
  }
  IndexView table_view() const { return index_view(page_table, B, pages_per_seq, "page_table"); }
  IndexView lens_view() const { return index_view(lens, B, -1, "seq_lens"); }

  // Appends k, v [B, Hkv, n, D] (fp32) at the current lengths, through the public API (CPU).
  void append(std::vector<float>& k, std::vector<float>& v, int64_t n) {
    const PagedKVCache c = view();
    const TensorView kv = make_view(k.data(), DType::kFloat32, {B, heads, n, D}, "k_new");
    const TensorView vv = make_view(v.data(), DType::kFloat32, {B, heads, n, D}, "v_new");
    const Status st = kv_cache_append(c, kv, vv, table_view(), lens_view());
    ASSERT_TRUE(st.ok()) << st.message();
    for (auto& l : lens) l += static_cast<int32_t>(n);
  }
};

// Per-sequence K and V [Hkv, len, D] (fp32) of a mixed-length batch: sequence b holds lens[b]
// tokens. Appends them token block by token block (sizes cycling through `chunks`), only to
// the sequences that still have tokens in that round (B = 1 appends, as an engine would).
struct SeqKV {
  std::vector<std::vector<float>> k, v;  // [b] -> [Hkv, len_b, D]
};

inline SeqKV random_seqs(const std::vector<int64_t>& lens, int64_t hkv, int64_t d, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> n01(0.0f, 1.0f);
  SeqKV s;
  for (int64_t len : lens) {
    std::vector<float> k(hkv * len * d), v(hkv * len * d);
    for (size_t i = 0; i < k.size(); ++i) k[i] = n01(rng) * (((i % d) % 13 == 3) ? 8.0f : 1.0f);
    for (auto& x : v) x = n01(rng);
    s.k.push_back(std::move(k));
    s.v.push_back(std::move(v));
  }
  return s;
}

// Fills `cache` with `seqs` through single-sequence appends of `chunk` tokens.
inline void fill_cache(HostCache& cache, const SeqKV& seqs, const std::vector<int64_t>& lens, int64_t chunk) {
  const int64_t H = cache.heads, D = cache.D;
  for (int64_t b = 0; b < cache.B; ++b) {
    for (int64_t t0 = 0; t0 < lens[b]; t0 += chunk) {
      const int64_t n = std::min(chunk, lens[b] - t0);
      std::vector<float> k(H * n * D), v(H * n * D);
      for (int64_t h = 0; h < H; ++h)
        for (int64_t i = 0; i < n; ++i)
          for (int64_t c = 0; c < D; ++c) {
            k[(h * n + i) * D + c] = seqs.k[b][(h * lens[b] + t0 + i) * D + c];
            v[(h * n + i) * D + c] = seqs.v[b][(h * lens[b] + t0 + i) * D + c];
          }
      PagedKVCache c = cache.view();
      const TensorView kv = make_view(k.data(), DType::kFloat32, {1, H, n, D}, "k_new");
      const TensorView vv = make_view(v.data(), DType::kFloat32, {1, H, n, D}, "v_new");
      const IndexView table = index_view(cache.page_table, 1, cache.pages_per_seq, "page_table", Device::kCPU,
                                         cache.page_table.data() + b * cache.pages_per_seq);
      const IndexView start = index_view(cache.lens, 1, -1, "start", Device::kCPU, cache.lens.data() + b);
      const Status st = kv_cache_append(c, kv, vv, table, start);
      ASSERT_TRUE(st.ok()) << st.message();
      cache.lens[b] += static_cast<int32_t>(n);
    }
  }
}

}  // namespace attnqat::test
