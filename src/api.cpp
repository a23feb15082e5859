// The public entry points: validate (src/common/validate.cpp), then dispatch on the device to
// the CPU reference or the CUDA backend. The only place where the two backends meet.
#include <cstring>
#include <string>

#include "attnqat/attnqat.h"
#include "common/validate.h"
#include "reference/decode.h"
#include "reference/reference.h"
#ifdef ATTNQAT_WITH_CUDA
#include "cuda/api.h"
#include "cuda/attention/api.h"
#include "cuda/decode/api.h"
#endif

#ifndef ATTNQAT_VERSION
#define ATTNQAT_VERSION "0.0.0"
#endif

namespace attnqat {
namespace {

[[maybe_unused]] Status no_cuda(const char* op) {
  return Status::NotImplemented(std::string(op) +
                                ": got CUDA tensors, but this build of attnqat has no CUDA kernels "
                                "(built without a CUDA toolkit; see attnqat.build_info())");
}

// Zeros a validated (contiguous) output on the host.
void zero_contiguous(const TensorView& t) {
  if (t.data != nullptr && t.numel() > 0)
    std::memset(t.data, 0, static_cast<size_t>(t.numel()) * static_cast<size_t>(dtype_size(t.dtype)));
}

}  // namespace

BuildInfo build_info() {
  BuildInfo info;
  info.version = ATTNQAT_VERSION;
#ifdef ATTNQAT_WITH_CUDA
  info.cuda = true;
  info.cuda_archs = cuda::archs_built();
#ifdef ATTNQAT_CUDA_VERSION
  info.cuda_version = ATTNQAT_CUDA_VERSION;
#endif
#endif
  return info;
}

Status quantize(const TensorView& x, const TensorView& data, const TensorView& scales,
                const TensorView& global_scale, const QuantizeOptions& opts, void* stream) {
  ATTNQAT_RETURN_IF_ERROR(validate_quantize(x, data, scales, global_scale, opts));
  if (x.device == Device::kCPU) return reference::quantize(x, data, scales, global_scale, opts);
#ifdef ATTNQAT_WITH_CUDA
  return cuda::quantize(x, data, scales, global_scale, opts, stream);
#else
  (void)stream;
  return no_cuda("quantize");
#endif
}

Status dequantize(const TensorView& data, const TensorView& scales, const TensorView& global_scale,
                  const TensorView& out, const QuantizeOptions& opts, void* stream) {
  ATTNQAT_RETURN_IF_ERROR(validate_dequantize(data, scales, global_scale, out, opts));
  if (out.device == Device::kCPU) return reference::dequantize(data, scales, global_scale, out, opts);
#ifdef ATTNQAT_WITH_CUDA
  return cuda::dequantize(data, scales, global_scale, out, opts, stream);
#else
  (void)stream;
  return no_cuda("dequantize");
#endif
}

Status fake_quantize(const TensorView& x, const TensorView& out, const TensorView& global_scale,
                     const QuantizeOptions& opts, void* stream) {
  ATTNQAT_RETURN_IF_ERROR(validate_fake_quantize(x, out, global_scale, opts));
  if (x.device == Device::kCPU) return reference::fake_quantize(x, out, global_scale, opts);
#ifdef ATTNQAT_WITH_CUDA
  return cuda::fake_quantize(x, out, global_scale, opts, stream);
#else
  (void)stream;
  return no_cuda("fake_quantize");
#endif
}

Status attention_forward(const TensorView& q, const TensorView& k, const TensorView& v,
                         const AttentionOptions& opts, const ForwardOutputs& out, void* stream) {
  ATTNQAT_RETURN_IF_ERROR(validate_attention_forward(q, k, v, opts, out));
  if (q.device == Device::kCPU) return reference::attention_forward(q, k, v, opts, out);
#ifdef ATTNQAT_WITH_CUDA
  return cuda::attention_forward(q, k, v, opts, out, stream);
#else
  return no_cuda("attention_forward");
#endif
}

Status attention_backward(const TensorView& dout, const TensorView& q, const TensorView& k,
                          const TensorView& v, const ForwardState& saved,
                          const AttentionOptions& opts, const BackwardOutputs& grads,
                          void* stream) {
  ATTNQAT_RETURN_IF_ERROR(validate_attention_backward(dout, q, k, v, saved, opts, grads));
  if (q.device == Device::kCPU) {
    if (q.numel() == 0 || k.numel() == 0) {  // no query row or no key: every gradient is 0
      for (const TensorView* g : {&grads.dq, &grads.dk, &grads.dv}) zero_contiguous(*g);
      return Status::Ok();
    }
    return reference::attention_backward(dout, q, k, v, saved, opts, grads);
  }
#ifdef ATTNQAT_WITH_CUDA
  return cuda::attention_backward(dout, q, k, v, saved, opts, grads, stream);
#else
  (void)stream;
  return no_cuda("attention_backward");
#endif
}

// ---- FP4 inference -------------------------------------------------------------------------

Status attention_forward_packed(const PackedTensor& q, const PackedTensor& k, const PackedTensor& v,
                                const AttentionOptions& opts, const ForwardOutputs& out,
                                void* stream, PackedUnpack unpack) {
  ATTNQAT_RETURN_IF_ERROR(validate_attention_forward_packed(q, k, v, opts, out));
  if (out.o.device == Device::kCPU) return reference::attention_forward_packed(q, k, v, opts, out);
#ifdef ATTNQAT_WITH_CUDA
  return cuda::attention_forward_packed(q, k, v, opts, out, stream, unpack);
#else
  (void)stream;
  (void)unpack;
  return no_cuda("attention_forward_packed");
#endif
}

Status kv_cache_append(const PagedKVCache& cache, const TensorView& k_new, const TensorView& v_new,
                       const IndexView& page_table, const IndexView& start, void* stream) {
  KVCacheDims dims;
  ATTNQAT_RETURN_IF_ERROR(validate_kv_cache_append(cache, k_new, v_new, page_table, start, &dims));
  if (cache.k_data.device == Device::kCPU)
    return reference::kv_cache_append(cache, dims, k_new, v_new, page_table, start);
#ifdef ATTNQAT_WITH_CUDA
  return cuda::kv_cache_append(cache, dims, k_new, v_new, page_table, start, stream);
#else
  (void)stream;
  return no_cuda("kv_cache_append");
#endif
}

Status decode_attention(const TensorView& q, const PagedKVCache& cache,
                        const IndexView& page_table, const IndexView& seq_lens,
                        const DecodeOptions& opts, const TensorView& out, const TensorView& lse,
                        void* stream) {
  KVCacheDims dims;
  ATTNQAT_RETURN_IF_ERROR(
      validate_decode_attention(q, cache, page_table, seq_lens, opts, out, lse, &dims));
  if (q.device == Device::kCPU)
    return reference::decode_attention(q, cache, dims, page_table, seq_lens, opts, out, lse);
#ifdef ATTNQAT_WITH_CUDA
  return cuda::decode_attention(q, cache, dims, page_table, seq_lens, opts, out, lse, stream);
#else
  (void)stream;
  return no_cuda("decode_attention");
#endif
}

}  // namespace attnqat
