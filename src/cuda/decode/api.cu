// src/cuda/decode/api.cu — host entry points of token-by-token generation on CUDA (api.h): the
// paged FP4 KV cache append and decode attention over the cache. Here: the kernel-specific checks
// (dtypes, head dim, alignment, device), the split-KV choice, the stream-ordered workspace, and
// the launches. Nothing synchronizes; errors come back as Status.
//
// Values that live in device memory (page ids, lengths) are not read here: the kernels clamp
// lengths to the page table's capacity and never dereference an out-of-range page id (the Python
// FP4KVCache checks them on its host copy and raises a clear error first).
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <string>

#include "attnqat/attnqat.h"
#include "common/validate.h"
#include "cuda/common/host.h"
#include "cuda/decode/api.h"
#include "cuda/decode/launch.h"

namespace attnqat::cuda {
namespace {

constexpr float kLog2e = 1.44269504088896340736f;  // RN(log2 e)
constexpr int kRows = 8;              // decode::kRows
constexpr int kStepKeys = 32;         // decode::kStepKeys: keys per warp step
constexpr int kCtaStepKeys = 128;     // decode::kCtaStepKeys: keys per CTA iteration
constexpr int kMaxSplits = 1024;     // decode::kMaxSplits: the combine kernel's shared memory
// Split heuristic (tuned with bench/lab/decode_probe.cu; the sweep is in docs/decode.md): a whole
// number of waves of CTAs — every split has the same work, so a partial last wave would run
// alone — one wave when that gives a unit (sequence, KV head) at least kOneWaveSplits splits or
// splits of at most kOneWaveMaxKeys keys, else two; and no split under 32 keys per unit of the
// launch, clamped to [kMinSplitKeys, kMaxMinSplitKeys] (small batches: fewer, longer CTAs spread
// their fixed costs — Q quantization, the merge of their warps, the partial write, the combine —
// better).
constexpr int kMinSplitKeys = 256;
constexpr int kMaxMinSplitKeys = 1024;
constexpr int kOneWaveSplits = 16;
constexpr int kOneWaveMaxKeys = 2048;

Status check_aligned(const TensorView& t, size_t bytes) {
  if (reinterpret_cast<uintptr_t>(t.data) % bytes != 0)
    return Status::Invalid(std::string(t.name) + ": the CUDA kernels read it in " +
                           std::to_string(bytes) + "-byte units and need a " + std::to_string(bytes) +
                           "-byte aligned data pointer");
  return Status::Ok();
}

// Makes `device` current for the guard's lifetime and checks that it runs the portable FP4
// kernels (sm_89+: E4M3 converts); launch_status() reports a target missing from the build.
Status enter_device(DeviceGuard& guard, int device, const char* op) {
  ATTNQAT_RETURN_IF_ERROR(guard.select(device, op, "the device"));
  return check_device(op, device, DeviceNeed::kSm89);
}

Status launch_status(const char* op, cudaError_t err, int device) {
  if (err == cudaSuccess) return Status::Ok();
  if (err == cudaErrorNoKernelImageForDevice || err == cudaErrorInvalidDeviceFunction) {
    int major = 0, minor = 0;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
    return Status::NotImplemented(std::string(op) + ": this build has no kernel for sm_" +
                                  std::to_string(major) + std::to_string(minor) +
                                  " (built for " ATTNQAT_CUDA_ARCHS_BUILT "); rebuild with "
                                  "ATTNQAT_CUDA_ARCHS including it, or run on CPU tensors");
  }
  return cuda_error(op, "the kernel launch", err);
}

// The cache and its page table as the kernels address them (AppendParams and DecodeParams).
template <class Byte>
void set_cache(decode::PagedCacheRef<Byte>& p, const PagedKVCache& cache, const KVCacheDims& dims,
               const IndexView& page_table) {
  p.k_data = static_cast<uint8_t*>(cache.k_data.data);
  p.k_scales = static_cast<uint8_t*>(cache.k_scales.data);
  p.v_data = static_cast<uint8_t*>(cache.v_data.data);
  p.v_scales = static_cast<uint8_t*>(cache.v_scales.data);
  p.page_table = page_table.data;
  p.pt_stride_b = page_table.stride[0];
  p.pt_stride_p = page_table.stride[1];
  p.pages_per_seq = static_cast<int>(page_table.shape[1]);
  p.num_pages = static_cast<int>(dims.num_pages);
}

// SMs and resident decode CTAs per SM, per device, dtype and head dim (queried once).
struct DeviceShape {
  int sms = 0, blocks_per_sm = 0;
};
Status device_shape(int device, bool f16, int head_dim, DeviceShape* out) {
  static std::mutex mu;
  static DeviceShape cache[64][2][2];
  std::lock_guard<std::mutex> lock(mu);
  DeviceShape& e = cache[device & 63][f16 ? 1 : 0][head_dim == 64 ? 0 : 1];
  if (e.sms == 0) {
    cudaError_t err = cudaDeviceGetAttribute(&e.sms, cudaDevAttrMultiProcessorCount, device);
    if (err == cudaSuccess) err = decode::decode_occupancy(f16, head_dim, &e.blocks_per_sm);
    if (err != cudaSuccess) {
      e.sms = 0;
      return launch_status("decode_attention", err, device);
    }
    e.blocks_per_sm = std::max(1, e.blocks_per_sm);
  }
  *out = e;
  return Status::Ok();
}

}  // namespace

// ---- Paged FP4 KV cache: append -------------------------------------------------------------------

Status kv_cache_append(const PagedKVCache& cache, const KVCacheDims& dims, const TensorView& k_new,
                       const TensorView& v_new, const IndexView& page_table,
                       const IndexView& start, void* stream) {
  constexpr const char* kOp = "kv_cache_append";
  if (k_new.numel() == 0) return Status::Ok();
  for (const TensorView* t : {&cache.k_data, &cache.v_data}) ATTNQAT_RETURN_IF_ERROR(check_aligned(*t, 8));
  DeviceGuard guard;
  ATTNQAT_RETURN_IF_ERROR(enter_device(guard, cache.k_data.device_id, kOp));
  decode::AppendParams p{};
  p.k_new = k_new.data;
  p.v_new = v_new.data;
  token_strides(k_new, &p.stride_b, &p.stride_h, &p.stride_i);
  token_strides(v_new, &p.v_stride_b, &p.v_stride_h, &p.v_stride_i);
  set_cache(p, cache, dims, page_table);
  p.start = start.data;
  p.start_stride = start.stride[0];
  p.batch = static_cast<int>(k_new.shape[0]);
  p.heads = static_cast<int>(dims.heads);
  p.n_new = static_cast<int>(k_new.shape[2]);
  p.head_dim = static_cast<int>(dims.head_dim);
  p.page_size = static_cast<int>(dims.page_size);
  const int dtype = k_new.dtype == DType::kFloat32 ? 0 : k_new.dtype == DType::kFloat16 ? 1 : 2;
  return launch_status(kOp, decode::launch_append(p, dtype, static_cast<cudaStream_t>(stream)),
                       cache.k_data.device_id);
}

// ---- Decode attention -----------------------------------------------------------------------------

Status decode_attention(const TensorView& q, const PagedKVCache& cache, const KVCacheDims& dims,
                        const IndexView& page_table, const IndexView& seq_lens,
                        const DecodeOptions& opts, const TensorView& out, const TensorView& lse,
                        void* stream) {
  constexpr const char* kOp = "decode_attention";
  if (q.dtype != DType::kBFloat16 && q.dtype != DType::kFloat16)
    return Status::NotImplemented(std::string("q: the CUDA decode kernel takes bfloat16 or float16 "
                                              "queries, got ") + dtype_name(q.dtype));
  if (!decode::decode_head_dim_supported(static_cast<int>(dims.head_dim)))
    return Status::NotImplemented("q: the CUDA decode kernel supports head_dim 64 and 128, got " +
                                  std::to_string(dims.head_dim) + "; run on CPU tensors (the reference)");
  if (dims.num_pages > INT32_MAX || page_table.shape[1] * dims.page_size > INT32_MAX)
    return Status::Invalid("page_table: the CUDA decode kernel indexes keys with 32-bit integers; "
                           "the cache or the page table is too large");
  for (const TensorView* t : {&cache.k_data, &cache.v_data, &cache.k_scales, &cache.v_scales})
    ATTNQAT_RETURN_IF_ERROR(check_aligned(*t, 16));
  if (q.numel() == 0) return Status::Ok();
  DeviceGuard guard;
  const int device = q.device_id;
  ATTNQAT_RETURN_IF_ERROR(enter_device(guard, device, kOp));
  const bool f16 = q.dtype == DType::kFloat16;
  DeviceShape shape;
  ATTNQAT_RETURN_IF_ERROR(device_shape(device, f16, static_cast<int>(dims.head_dim), &shape));

  const int64_t B = q.shape[0], Hq = q.shape[1], nq = q.shape[2];
  const int64_t group = Hq / dims.heads, rows = group * nq;
  const int64_t row_groups = (rows + kRows - 1) / kRows;
  const int64_t capacity = page_table.shape[1] * dims.page_size;
  const int64_t bound = opts.max_seq_len > 0 ? std::min<int64_t>(opts.max_seq_len, capacity) : capacity;
  const int64_t units = B * dims.heads * row_groups;
  const bool paper = opts.p_quant == PQuant::kPaper;
  // The keys one (sequence, KV head) may visit. With a window the kernel starts at the step
  // (anchored) or 128-key tile (paper) that holds query token 0's first visible key, so at most
  // window_left + nq keys plus that rounding, whatever the context length: the splits are sized
  // on this, not on the context.
  const int64_t span =
      opts.window_left >= 0
          ? std::min<int64_t>(bound, opts.window_left + nq + (paper ? kCtaStepKeys : kStepKeys) - 1)
          : bound;
  // Split-KV: as many splits as fit one wave next to the other units, but no split shorter than
  // kMinSplitKeys. paper: one split (its P depends on the running max of 128-key tiles from key
  // 0, as the reference's).
  int64_t splits = 1;
  const int64_t max_splits =
      std::min<int64_t>(kMaxSplits, std::max<int64_t>(1, (span + kCtaStepKeys - 1) / kCtaStepKeys));
  if (!paper) {
    if (opts.num_splits > 0) {
      splits = std::min<int64_t>(opts.num_splits, max_splits);
    } else {
      const int64_t slots = static_cast<int64_t>(shape.sms) * shape.blocks_per_sm;
      const int64_t one_wave = std::max<int64_t>(1, slots / units);
      const int64_t waves = one_wave >= kOneWaveSplits || (span + one_wave - 1) / one_wave <= kOneWaveMaxKeys ? 1 : 2;
      const int64_t min_keys = std::clamp<int64_t>(32 * units, kMinSplitKeys, kMaxMinSplitKeys);
      splits = std::clamp<int64_t>(waves * slots / units, 1,
                                   std::min<int64_t>(max_splits, std::max<int64_t>(1, span / min_keys)));
    }
  }
  int64_t split_keys = std::max<int64_t>(1, (span + splits - 1) / splits);
  split_keys = (split_keys + kCtaStepKeys - 1) / kCtaStepKeys * kCtaStepKeys;
  splits = std::max<int64_t>(1, (span + split_keys - 1) / split_keys);  // <= the request, so <= kMaxSplits
  if (splits > 65535 || dims.heads * row_groups > 65535 || B > 65535)
    return Status::Invalid("decode_attention: the launch grid is too large (batch " + std::to_string(B) +
                           ", kv heads x row groups " + std::to_string(dims.heads * row_groups) + ")");

  decode::DecodeParams p{};
  p.q = q.data;
  token_strides(q, &p.q_stride_b, &p.q_stride_h, &p.q_stride_i);
  set_cache(p, cache, dims, page_table);
  p.seq_lens = seq_lens.data;
  p.lens_stride = seq_lens.stride[0];
  p.heads_kv = static_cast<int>(dims.heads);
  p.page_size = static_cast<int>(dims.page_size);
  p.page_shift = -1;
  for (int sh = 0; sh < 31; ++sh)
    if ((int64_t{1} << sh) == dims.page_size) p.page_shift = sh;
  p.group = static_cast<int>(group);
  p.nq = static_cast<int>(nq);
  p.rows = static_cast<int>(rows);
  p.row_groups = static_cast<int>(row_groups);
  p.head_dim = static_cast<int>(dims.head_dim);
  p.num_splits = static_cast<int>(splits);
  p.split_keys = static_cast<int>(split_keys);
  AttentionOptions scale_opts;
  scale_opts.softmax_scale = opts.softmax_scale;
  p.c2 = resolve_softmax_scale(scale_opts, dims.head_dim) * kLog2e;  // c2 = RN(c * RN(log2 e))
  p.p_quant = opts.p_quant;
  p.window_left = opts.window_left;
  p.o = out.data;
  p.lse = static_cast<float*>(lse.data);
  p.heads_q = static_cast<int>(Hq);

  cudaStream_t s = static_cast<cudaStream_t>(stream);
  Workspace ws;  // split partials, freed stream-ordered after the combine kernel
  if (splits > 1) {
    const size_t prow = static_cast<size_t>(units) * splits * kRows;
    const size_t o_bytes = round_up(prow * static_cast<size_t>(dims.head_dim) * sizeof(float));
    ATTNQAT_RETURN_IF_ERROR(ws.allocate(o_bytes + round_up(prow * 2 * sizeof(float)), s));
    p.part_o = static_cast<float*>(ws.data());
    p.part_ml = reinterpret_cast<float*>(static_cast<uint8_t*>(ws.data()) + o_bytes);
  }
  return launch_status(kOp, decode::launch_decode(p, static_cast<int>(B), f16, s), device);
}

}  // namespace attnqat::cuda
