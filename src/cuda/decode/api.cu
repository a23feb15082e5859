// src/cuda/decode/api.cu — host entry points of the CUDA FP4 inference paths (api.h): the
// kernel-specific checks (dtypes, head dim, alignment, device), the split-KV choice, the
// stream-ordered workspace, and the launches. Nothing synchronizes; errors come back as Status.
//
// Values that live in device memory (page ids, lengths) are not read here: the kernels clamp
// lengths to the page table's capacity and never dereference an out-of-range page id (the Python
// FP4KVCache checks them on its host copy and raises a clear error first).
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <string>

#include "cuda/common/device_guard.h"
#include "attnqat/attnqat.h"
#include "common/validate.h"
#include "cuda/common/workspace.h"
#include "cuda/attention/api.h"
#include "cuda/decode/api.h"
#include "cuda/decode/launch.h"

namespace attnqat::cuda {
namespace {

constexpr float kLog2e = 1.44269504088896340736f;  // RN(log2 e)
constexpr int kRows = 8;              // decode::kRows
constexpr int kCtaStepKeys = 128;     // decode::kCtaStepKeys: keys per CTA iteration
constexpr int kMaxSplits = 1024;     // decode::kMaxSplits: the combine kernel's shared memory
// Split heuristic, tuned on an H200 (bench/decode_probe.cu sweeps, bench/bench_decode.py): a
// whole number of waves of CTAs — every split has the same work, so a partial last wave would
// run alone — one wave when that gives a unit (sequence, KV head) at least kOneWaveSplits splits
// or splits of at most kOneWaveMaxKeys keys, else two; and no split under 32 keys per unit of the
// launch, clamped to [kMinSplitKeys, kMaxMinSplitKeys] (small batches: fewer, longer CTAs spread
// their fixed costs — Q quantization, the merge of their warps, the partial write, the combine —
// better). Measured (bench/decode_probe.cu, 2026-11-26): B = 1 at 8k: 32 splits, 13.3 us, where
// 64 splits of one step each took 15.8 us; B = 2 at 8k: 16 splits 17.3 us, 32 splits 19.3 us;
// B = 8 at 8k: 8 splits 40.7 us, 16 splits 45.5 us; B = 16 at 8k: 4 splits 68.1 us, 8 splits
// 71.5 us; B = 8 at 128k: 16 splits, 3% faster than 8.
constexpr int kMinSplitKeys = 256;
constexpr int kMaxMinSplitKeys = 1024;
constexpr int kOneWaveSplits = 16;
constexpr int kOneWaveMaxKeys = 2048;
constexpr size_t kAlign = 256;

Status cuda_error(const char* op, const char* what, cudaError_t err) {
  return Status::Cuda(std::string(op) + ": " + what + " failed: " + cudaGetErrorName(err) + " (" +
                      cudaGetErrorString(err) + ")");
}

Status check_aligned(const TensorView& t, size_t bytes) {
  if (reinterpret_cast<uintptr_t>(t.data) % bytes != 0)
    return Status::Invalid(std::string(t.name) + ": the CUDA kernels read it in " +
                           std::to_string(bytes) + "-byte units and need a " + std::to_string(bytes) +
                           "-byte aligned data pointer");
  return Status::Ok();
}

// The decode kernel needs sm_89+ (E4M3 converts) and one of the built targets.
Status check_device(const char* op, int device) {
  int major = 0, minor = 0;
  cudaError_t err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  if (err != cudaSuccess) return cuda_error(op, "querying the device", err);
  if (major * 10 + minor < 89)
    return Status::NotImplemented(std::string(op) + ": the FP4 decode kernels need sm_89 or newer; this "
                                  "device is sm_" + std::to_string(major) + std::to_string(minor) +
                                  "; run on CPU tensors (the reference) instead");
  return Status::Ok();
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

size_t round_up(size_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; }

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

// ---- Attention from packed NVFP4 tensors --------------------------------------------------------

// kAuto's choice. Every CTA (128 query rows of one head) decodes the K/V tiles it reads, so the
// in-kernel decode repeats group * ceil(Nq / 128) times per KV head, while the temporaries cost
// one decode pass plus a 16-bit write and read of K and V. Measured on H200 (d = 128, Nk = 8192,
// bench/bench_decode.py "packed paths", docs/decode.md): the in-kernel decode costs the forward
// ~18% whatever the shape (0.80-0.84x of the fp4 forward), the temporaries 0.45x at 1 block
// per KV head, 0.79-0.84x at 4, 0.84-0.87x at 8 and 0.93-0.96x at 16 or more: the crossover
// lies between 4 and 8 blocks.
namespace {
constexpr int64_t kInKernelMaxBlocksPerKvHead = 4;
bool in_kernel_decode_pays(int64_t nq, int64_t group) {
  return group * ((nq + 127) / 128) <= kInKernelMaxBlocksPerKvHead;
}
}  // namespace

Status attention_forward_packed(const PackedTensor& q, const PackedTensor& k, const PackedTensor& v,
                                const AttentionOptions& opts, const ForwardOutputs& out,
                                void* stream, PackedUnpack unpack) {
  const DType dt = out.o.dtype;
  if (dt != DType::kBFloat16 && dt != DType::kFloat16)
    return Status::NotImplemented(std::string("o: the CUDA packed attention decodes Q, K, V into the "
                                              "dtype of o, bfloat16 or float16; got ") + dtype_name(dt));
  const int64_t B = out.o.shape[0], Hq = out.o.shape[1], Nq = out.o.shape[2], D = out.o.shape[3];
  const int64_t Hkv = k.data.shape[1], Nk = k.data.shape[2];
  if (out.o.numel() == 0) return Status::Ok();
  DeviceGuard guard;
  if (const cudaError_t err = guard.set(out.o.device_id); err != cudaSuccess)
    return cuda_error("attention_forward_packed", "selecting the device", err);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  auto view = [&](void* p, int64_t h, int64_t n, const char* name) {
    TensorView t = make_view(p, dt, {B, h, n, D}, name, Device::kCUDA);
    t.device_id = out.o.device_id;
    return t;
  };
  // Channel-blocked operands with aligned rows (the quantize kernels' output and any slice of
  // it along B, H, N) can be decoded inside the sm90 kernel.
  const bool fusable = packed_forward_fusable(q, k, v, opts, out.o);
  if (unpack == PackedUnpack::kInKernel && !fusable)
    return Status::Invalid(
        "decode: the in-kernel decode needs channel blocks for V (v_blocks 'channel'), head dim "
        "64 or 128, a bfloat16/float16 output and rows of codes and scales contiguous and aligned "
        "(16 bytes, d/16 bytes), as quantize() writes them; use decode 'auto' or 'temporary'");
  if (fusable && (unpack == PackedUnpack::kInKernel ||
                  (unpack == PackedUnpack::kAuto && in_kernel_decode_pays(Nq, Hq / Hkv))))
    return attention_forward_from_packed(q, k, v, view(q.data.data, Hq, Nq, "q"),
                                         view(k.data.data, Hkv, Nk, "k"),
                                         view(v.data.data, Hkv, Nk, "v"), opts, out, stream);
  // Otherwise: K and V dequantized (exact) into one stream-ordered temporary; Q decoded in the
  // kernel too when its layout allows (it is read once per CTA: no repeated decode), else
  // dequantized alongside; then the forward on the decoded operands (inputs_quantized: no
  // re-quantization, the same operands bit for bit).
  const bool q_in_kernel = packed_operand_fusable(q, out.o);
  const size_t es = static_cast<size_t>(dtype_size(dt));
  const size_t qb = q_in_kernel ? 0 : round_up(B * Hq * Nq * D * es);
  const size_t kb = round_up(B * Hkv * Nk * D * es);
  Workspace ws;
  ATTNQAT_RETURN_IF_ERROR(ws.allocate(qb + 2 * kb, s));
  uint8_t* base = static_cast<uint8_t*>(ws.data());
  const TensorView kh = view(base + qb, Hkv, Nk, "k (decoded)");
  const TensorView vh = view(base + qb + kb, Hkv, Nk, "v (decoded)");
  QuantizeOptions qo;
  ATTNQAT_RETURN_IF_ERROR(::attnqat::dequantize(k.data, k.scales, k.global_scale, kh, qo, stream));
  QuantizeOptions vo;
  vo.axis = opts.v_blocks == VBlocks::kToken ? BlockAxis::kToken : BlockAxis::kLast;
  ATTNQAT_RETURN_IF_ERROR(::attnqat::dequantize(v.data, v.scales, v.global_scale, vh, vo, stream));
  if (q_in_kernel)
    return attention_forward_from_packed(q, k, v, view(q.data.data, Hq, Nq, "q"), kh, vh, opts,
                                         out, stream, /*kv_decoded=*/true);
  const TensorView qh = view(base, Hq, Nq, "q (decoded)");
  ATTNQAT_RETURN_IF_ERROR(::attnqat::dequantize(q.data, q.scales, q.global_scale, qh, qo, stream));
  AttentionOptions o2 = opts;
  o2.inputs_quantized = true;
  return ::attnqat::attention_forward(qh, kh, vh, o2, out, stream);
}

// ---- Paged FP4 KV cache: append -------------------------------------------------------------------

Status kv_cache_append(const PagedKVCache& cache, const KVCacheDims& dims, const TensorView& k_new,
                       const TensorView& v_new, const IndexView& page_table,
                       const IndexView& start, void* stream) {
  constexpr const char* kOp = "kv_cache_append";
  if (k_new.numel() == 0) return Status::Ok();
  for (const TensorView* t : {&cache.k_data, &cache.v_data}) ATTNQAT_RETURN_IF_ERROR(check_aligned(*t, 8));
  DeviceGuard guard;
  if (const cudaError_t err = guard.set(cache.k_data.device_id); err != cudaSuccess)
    return cuda_error(kOp, "selecting the device", err);
  ATTNQAT_RETURN_IF_ERROR(check_device(kOp, cache.k_data.device_id));
  decode::AppendParams p{};
  p.k_new = k_new.data;
  p.v_new = v_new.data;
  p.stride_b = k_new.stride[0];
  p.stride_h = k_new.stride[1];
  p.stride_i = k_new.stride[2];
  p.v_stride_b = v_new.stride[0];
  p.v_stride_h = v_new.stride[1];
  p.v_stride_i = v_new.stride[2];
  p.k_data = static_cast<uint8_t*>(cache.k_data.data);
  p.k_scales = static_cast<uint8_t*>(cache.k_scales.data);
  p.v_data = static_cast<uint8_t*>(cache.v_data.data);
  p.v_scales = static_cast<uint8_t*>(cache.v_scales.data);
  p.page_table = page_table.data;
  p.pt_stride_b = page_table.stride[0];
  p.pt_stride_p = page_table.stride[1];
  p.start = start.data;
  p.start_stride = start.stride[0];
  p.pages_per_seq = static_cast<int>(page_table.shape[1]);
  p.num_pages = static_cast<int>(dims.num_pages);
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
  if (const cudaError_t err = guard.set(device); err != cudaSuccess)
    return cuda_error(kOp, "selecting the device", err);
  ATTNQAT_RETURN_IF_ERROR(check_device(kOp, device));
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
  // Split-KV: as many splits as fit one wave next to the other units, but no split shorter than
  // kMinSplitKeys. paper: one split (its P depends on the running max of 128-key tiles from key
  // 0, as the reference's).
  int64_t splits = 1;
  const int64_t max_splits =
      std::min<int64_t>(kMaxSplits, std::max<int64_t>(1, (bound + kCtaStepKeys - 1) / kCtaStepKeys));
  if (!paper) {
    if (opts.num_splits > 0) {
      splits = std::min<int64_t>(opts.num_splits, max_splits);
    } else {
      const int64_t slots = static_cast<int64_t>(shape.sms) * shape.blocks_per_sm;
      const int64_t one_wave = std::max<int64_t>(1, slots / units);
      const int64_t waves = one_wave >= kOneWaveSplits || (bound + one_wave - 1) / one_wave <= kOneWaveMaxKeys ? 1 : 2;
      const int64_t min_keys = std::clamp<int64_t>(32 * units, kMinSplitKeys, kMaxMinSplitKeys);
      splits = std::clamp<int64_t>(waves * slots / units, 1,
                                   std::min<int64_t>(max_splits, std::max<int64_t>(1, bound / min_keys)));
    }
  }
  int64_t split_keys = std::max<int64_t>(1, (bound + splits - 1) / splits);
  split_keys = (split_keys + kCtaStepKeys - 1) / kCtaStepKeys * kCtaStepKeys;
  splits = std::max<int64_t>(1, (bound + split_keys - 1) / split_keys);  // <= the request, so <= kMaxSplits
  if (splits > 65535 || dims.heads * row_groups > 65535 || B > 65535)
    return Status::Invalid("decode_attention: the launch grid is too large (batch " + std::to_string(B) +
                           ", kv heads x row groups " + std::to_string(dims.heads * row_groups) + ")");

  decode::DecodeParams p{};
  p.q = q.data;
  p.q_stride_b = q.stride[0];
  p.q_stride_h = q.stride[1];
  p.q_stride_i = q.stride[2];
  p.k_data = static_cast<const uint8_t*>(cache.k_data.data);
  p.k_scales = static_cast<const uint8_t*>(cache.k_scales.data);
  p.v_data = static_cast<const uint8_t*>(cache.v_data.data);
  p.v_scales = static_cast<const uint8_t*>(cache.v_scales.data);
  p.page_table = page_table.data;
  p.pt_stride_b = page_table.stride[0];
  p.pt_stride_p = page_table.stride[1];
  p.seq_lens = seq_lens.data;
  p.lens_stride = seq_lens.stride[0];
  p.pages_per_seq = static_cast<int>(page_table.shape[1]);
  p.num_pages = static_cast<int>(dims.num_pages);
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
