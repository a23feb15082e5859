// src/cuda/attention/packed.cu — attention from packed NVFP4 tensors on CUDA
// (attnqat::cuda::attention_forward_packed, api.h), called by src/api.cpp after
// validate_attention_forward_packed(). The whole host side of the packed forward: which operands
// the sm90 kernel unpacks itself (FP4 codes -> values, sm90/fwd_packed.cuh) and which are unpacked
// first into stream-ordered 16-bit temporaries by the dequantize kernels (src/cuda/quantize); the
// kernel launch is api.cu's sm90_forward. Unpacking is exact, so every choice gives the same
// operands and the same output, bit for bit.
//
// Contract: as api.cu — nothing synchronizes, every launch and allocation is on `stream`
// (Workspace, cuda/common/host.h), errors come back as Status.
#include <cuda_runtime_api.h>

#include <cstdint>
#include <string>

#include "attnqat/attnqat.h"
#include "common/validate.h"
#include "cuda/api.h"
#include "cuda/attention/api.h"
#include "cuda/common/host.h"

namespace attnqat::cuda {
namespace {

constexpr const char* kOp = "attention_forward_packed";

// The packed producer (sm90/fwd_packed.cuh) copies rows of codes with 16-byte cp.async and rows
// of scales with one d/16-byte cp.async: each row's bytes contiguous, rows and bases aligned.
// True when operand t's layout and head dim (64, 128) suit it, for an output o of bf16/fp16.
bool operand_unpacks_in_kernel(const PackedTensor& t, const TensorView& o) {
  const int64_t d = t.data.shape[3] * 2;
  if (d != 64 && d != 128) return false;
  if (o.dtype != DType::kBFloat16 && o.dtype != DType::kFloat16) return false;
  const int64_t scale_row = d / 16;
  if (t.data.stride[3] != 1 || t.scales.stride[3] != 1) return false;
  if (reinterpret_cast<uintptr_t>(t.data.data) % 16 != 0 ||
      reinterpret_cast<uintptr_t>(t.scales.data) % scale_row != 0)
    return false;
  for (int i = 0; i < 3; ++i)
    if (t.data.stride[i] % 16 != 0 || t.scales.stride[i] % scale_row != 0) return false;
  return true;
}

// All three operands can be unpacked in the kernel: channel blocks everywhere (the kernel does not
// read token-blocked V) and every operand's layout suits it.
bool all_unpack_in_kernel(const PackedTensor& q, const PackedTensor& k, const PackedTensor& v,
                          const AttentionOptions& opts, const TensorView& o) {
  return opts.v_blocks == VBlocks::kChannel && operand_unpacks_in_kernel(q, o) &&
         operand_unpacks_in_kernel(k, o) && operand_unpacks_in_kernel(v, o);
}

// kAuto's choice. Every CTA (128 query rows of one head) unpacks the K/V tiles it reads, so the
// in-kernel unpack repeats group * ceil(Nq / 128) times per KV head, while the temporaries cost
// one unpack pass plus a 16-bit write and read of K and V. docs/decode.md (the packed paths
// against the fp4 forward by query blocks per KV head; H200, d = 128, Nk = 8192,
// bench/bench_decode.py): the kernel path runs at 0.80-0.84x of the fp4 forward at every shape,
// the temporaries at 0.45x with 1 block per KV head, 0.76-0.78x at 4, 0.86-0.87x at 8 and
// 0.92-0.99x at 16 or more: the crossover lies between 4 and 8 blocks.
constexpr int64_t kInKernelMaxBlocksPerKvHead = 4;
bool in_kernel_unpack_pays(int64_t nq, int64_t group) {
  return group * ((nq + 127) / 128) <= kInKernelMaxBlocksPerKvHead;
}

// validate_dequantize(), then the dequantize kernels: what the public dequantize() does for CUDA
// tensors. Unpacks p (blocks along `axis`) into out.
Status unpack_into(const PackedTensor& p, const TensorView& out, BlockAxis axis, void* stream) {
  QuantizeOptions opts;
  opts.axis = axis;
  ATTNQAT_RETURN_IF_ERROR(validate_dequantize(p.data, p.scales, p.global_scale, out, opts));
  return attnqat::cuda::dequantize(p.data, p.scales, p.global_scale, out, opts, stream);
}

}  // namespace

Status attention_forward_packed(const PackedTensor& q, const PackedTensor& k, const PackedTensor& v,
                                const AttentionOptions& opts, const ForwardOutputs& out,
                                void* stream, PackedUnpack unpack) {
  const DType dt = out.o.dtype;
  if (dt != DType::kBFloat16 && dt != DType::kFloat16)
    return Status::NotImplemented(std::string("o: the CUDA packed attention unpacks Q, K, V into the "
                                              "dtype of o, bfloat16 or float16; got ") + dtype_name(dt));
  const int64_t B = out.o.shape[0], Hq = out.o.shape[1], Nq = out.o.shape[2], D = out.o.shape[3];
  const int64_t Hkv = k.data.shape[1], Nk = k.data.shape[2];
  if (out.o.numel() == 0) return Status::Ok();
  DeviceGuard guard;
  ATTNQAT_RETURN_IF_ERROR(guard.select(out.o.device_id, kOp, "the device"));
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  // [B, h, n, D] views of the output's dtype: the logical operands, or temporaries.
  auto view = [&](void* p, int64_t h, int64_t n, const char* name) {
    return device_view(p, dt, {B, h, n, D}, name, out.o.device_id);
  };
  // Channel-blocked operands with aligned rows (the quantize kernels' output and any slice of
  // it along B, H, N) can be unpacked inside the sm90 kernel.
  const bool in_kernel = all_unpack_in_kernel(q, k, v, opts, out.o);
  if (unpack == PackedUnpack::kInKernel && !in_kernel)
    return Status::Invalid(
        "unpack: the in-kernel unpack needs channel blocks for V (v_blocks 'channel'), head dim "
        "64 or 128, a bfloat16/float16 output and rows of codes and scales contiguous and aligned "
        "(16 bytes, d/16 bytes), as quantize() writes them; use unpack 'auto' or 'temporary'");
  if (in_kernel && (unpack == PackedUnpack::kInKernel ||
                    (unpack == PackedUnpack::kAuto && in_kernel_unpack_pays(Nq, Hq / Hkv)))) {
    const PackedOperands all{&q, &k, &v, /*kv_unpacked=*/false};
    return sm90_forward(view(q.data.data, Hq, Nq, "q"), view(k.data.data, Hkv, Nk, "k"),
                        view(v.data.data, Hkv, Nk, "v"), opts, out, stream, &all);
  }
  // Otherwise: K and V unpacked (exact) into one stream-ordered temporary; Q unpacked in the
  // kernel too when its layout allows (it is read once per CTA: no repeated unpack), else
  // unpacked alongside; then the forward on the unpacked operands (inputs_quantized: no
  // re-quantization, the same operands bit for bit).
  const bool q_in_kernel = operand_unpacks_in_kernel(q, out.o);
  const size_t es = static_cast<size_t>(dtype_size(dt));
  const size_t qb = q_in_kernel ? 0 : round_up(B * Hq * Nq * D * es);
  const size_t kb = round_up(B * Hkv * Nk * D * es);
  Workspace ws;
  ATTNQAT_RETURN_IF_ERROR(ws.allocate(qb + 2 * kb, s));
  uint8_t* base = static_cast<uint8_t*>(ws.data());
  const TensorView kh = view(base + qb, Hkv, Nk, "k (unpacked)");
  const TensorView vh = view(base + qb + kb, Hkv, Nk, "v (unpacked)");
  ATTNQAT_RETURN_IF_ERROR(unpack_into(k, kh, BlockAxis::kLast, stream));
  ATTNQAT_RETURN_IF_ERROR(unpack_into(
      v, vh, opts.v_blocks == VBlocks::kToken ? BlockAxis::kToken : BlockAxis::kLast, stream));
  if (q_in_kernel) {
    const PackedOperands q_only{&q, &k, &v, /*kv_unpacked=*/true};
    return sm90_forward(view(q.data.data, Hq, Nq, "q"), kh, vh, opts, out, stream, &q_only);
  }
  const TensorView qh = view(base, Hq, Nq, "q (unpacked)");
  ATTNQAT_RETURN_IF_ERROR(unpack_into(q, qh, BlockAxis::kLast, stream));
  AttentionOptions o2 = opts;
  o2.inputs_quantized = true;
  // The checks of the public attention_forward(), then the CUDA forward.
  ATTNQAT_RETURN_IF_ERROR(validate_attention_forward(qh, kh, vh, o2, out));
  return attnqat::cuda::attention_forward(qh, kh, vh, o2, out, stream);
}

}  // namespace attnqat::cuda
