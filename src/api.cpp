// The public entry points: validate (src/common/validate.cpp), then dispatch on the device to
// the CPU reference or the CUDA backend. The only place where the two backends meet.
#include <cstring>
#include <string>
#include <type_traits>

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

// After validation: `cpu` (the reference) for CPU tensors, else `cuda` (the CUDA backend), which is
// nullptr in a build without CUDA kernels: then kNotImplemented naming `op`.
template <typename Cpu, typename Cuda>
Status dispatch(const char* op, Device device, Cpu&& cpu, Cuda&& cuda) {
  if (device == Device::kCPU) return cpu();
  if constexpr (std::is_same_v<std::decay_t<Cuda>, std::nullptr_t>)
    return no_cuda(op);
  else
    return cuda();
}

// The CUDA backend's call as dispatch()'s `cuda` argument (nullptr without CUDA kernels).
#ifdef ATTNQAT_WITH_CUDA
#define ATTNQAT_CUDA_CALL(call) [&] { return cuda::call; }
#else
#define ATTNQAT_CUDA_CALL(call) nullptr
#endif

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
  return dispatch("quantize", x.device, [&] { return reference::quantize(x, data, scales, global_scale, opts); },
                  ATTNQAT_CUDA_CALL(quantize(x, data, scales, global_scale, opts, stream)));
}

Status dequantize(const TensorView& data, const TensorView& scales, const TensorView& global_scale,
                  const TensorView& out, const QuantizeOptions& opts, void* stream) {
  ATTNQAT_RETURN_IF_ERROR(validate_dequantize(data, scales, global_scale, out, opts));
  return dispatch("dequantize", out.device,
                  [&] { return reference::dequantize(data, scales, global_scale, out, opts); },
                  ATTNQAT_CUDA_CALL(dequantize(data, scales, global_scale, out, opts, stream)));
}

Status fake_quantize(const TensorView& x, const TensorView& out, const TensorView& global_scale,
                     const QuantizeOptions& opts, void* stream) {
  ATTNQAT_RETURN_IF_ERROR(validate_fake_quantize(x, out, global_scale, opts));
  return dispatch("fake_quantize", x.device, [&] { return reference::fake_quantize(x, out, global_scale, opts); },
                  ATTNQAT_CUDA_CALL(fake_quantize(x, out, global_scale, opts, stream)));
}

Status attention_forward(const TensorView& q, const TensorView& k, const TensorView& v,
                         const AttentionOptions& opts, const ForwardOutputs& out, void* stream) {
  ATTNQAT_RETURN_IF_ERROR(validate_attention_forward(q, k, v, opts, out));
  return dispatch("attention_forward", q.device, [&] { return reference::attention_forward(q, k, v, opts, out); },
                  ATTNQAT_CUDA_CALL(attention_forward(q, k, v, opts, out, stream)));
}

Status attention_backward(const TensorView& dout, const TensorView& q, const TensorView& k,
                          const TensorView& v, const ForwardState& saved,
                          const AttentionOptions& opts, const BackwardOutputs& grads,
                          void* stream) {
  ATTNQAT_RETURN_IF_ERROR(validate_attention_backward(dout, q, k, v, saved, opts, grads));
  const auto cpu = [&] {
    if (q.numel() == 0 || k.numel() == 0) {  // no query row or no key: every gradient is 0
      for (const TensorView* g : {&grads.dq, &grads.dk, &grads.dv, &grads.dsinks}) zero_contiguous(*g);
      return Status::Ok();
    }
    return reference::attention_backward(dout, q, k, v, saved, opts, grads);
  };
  return dispatch("attention_backward", q.device, cpu,
                  ATTNQAT_CUDA_CALL(attention_backward(dout, q, k, v, saved, opts, grads, stream)));
}

Status attention_forward_varlen(const TensorView& q, const TensorView& k, const TensorView& v,
                                const VarlenSeqs& seqs, const AttentionOptions& opts,
                                const ForwardOutputs& out, void* stream) {
  ATTNQAT_RETURN_IF_ERROR(validate_attention_varlen_forward(q, k, v, seqs, opts, out));
  return dispatch("attention_forward_varlen", q.device,
                  [&] { return reference::attention_forward_varlen(q, k, v, seqs, opts, out); },
                  ATTNQAT_CUDA_CALL(attention_forward_varlen(q, k, v, seqs, opts, out, stream)));
}

Status attention_backward_varlen(const TensorView& dout, const TensorView& q, const TensorView& k,
                                 const TensorView& v, const VarlenSeqs& seqs,
                                 const ForwardState& saved, const AttentionOptions& opts,
                                 const BackwardOutputs& grads, void* stream) {
  ATTNQAT_RETURN_IF_ERROR(validate_attention_varlen_backward(dout, q, k, v, seqs, saved, opts, grads));
  return dispatch(
      "attention_backward_varlen", q.device,
      [&] { return reference::attention_backward_varlen(dout, q, k, v, seqs, saved, opts, grads); },
      ATTNQAT_CUDA_CALL(
          attention_backward_varlen(dout, q, k, v, seqs, saved, opts, grads, stream)));
}

// ---- FP4 inference -------------------------------------------------------------------------

Status attention_forward_packed(const PackedTensor& q, const PackedTensor& k, const PackedTensor& v,
                                const AttentionOptions& opts, const ForwardOutputs& out,
                                void* stream, PackedUnpack unpack) {
  ATTNQAT_RETURN_IF_ERROR(validate_attention_forward_packed(q, k, v, opts, out));
  return dispatch("attention_forward_packed", out.o.device,
                  [&] { return reference::attention_forward_packed(q, k, v, opts, out); },
                  ATTNQAT_CUDA_CALL(attention_forward_packed(q, k, v, opts, out, stream, unpack)));
}

Status kv_cache_append(const PagedKVCache& cache, const TensorView& k_new, const TensorView& v_new,
                       const IndexView& page_table, const IndexView& start, void* stream) {
  KVCacheDims dims;
  ATTNQAT_RETURN_IF_ERROR(validate_kv_cache_append(cache, k_new, v_new, page_table, start, &dims));
  return dispatch("kv_cache_append", cache.k_data.device,
                  [&] { return reference::kv_cache_append(cache, dims, k_new, v_new, page_table, start); },
                  ATTNQAT_CUDA_CALL(kv_cache_append(cache, dims, k_new, v_new, page_table, start, stream)));
}

Status decode_attention(const TensorView& q, const PagedKVCache& cache,
                        const IndexView& page_table, const IndexView& seq_lens,
                        const DecodeOptions& opts, const TensorView& out, const TensorView& lse,
                        void* stream) {
  KVCacheDims dims;
  ATTNQAT_RETURN_IF_ERROR(
      validate_decode_attention(q, cache, page_table, seq_lens, opts, out, lse, &dims));
  return dispatch("decode_attention", q.device,
                  [&] { return reference::decode_attention(q, cache, dims, page_table, seq_lens, opts, out, lse); },
                  ATTNQAT_CUDA_CALL(decode_attention(q, cache, dims, page_table, seq_lens, opts, out, lse, stream)));
}

}  // namespace attnqat
