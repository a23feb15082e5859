// src/cuda/attention/sm90/tma_host.cu — make_tma_bhsd (see tma_host.h). Host code only.
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled_v12000
#include <cuda_runtime_api.h>

#include <cstdint>
#include <string>

#include "attnqat/tensor.h"
#include "cuda/attention/sm90/tma_host.h"

namespace attnqat::sm90 {
namespace {

constexpr int kTmaAlign = 16;  // bytes: base address and every stride
constexpr int kBoxCols = 64;   // 128 bytes of 16-bit elements: the SWIZZLE_128B span

struct Encoder {
  PFN_cuTensorMapEncodeTiled_v12000 fn = nullptr;
  cudaError_t err = cudaSuccess;
  cudaDriverEntryPointQueryResult query = cudaDriverEntryPointSuccess;
};

// Looked up once (thread-safe static initialization); the ABI of version 12.0 is requested.
const Encoder& encoder() {
  static const Encoder enc = [] {
    Encoder e;
    void* fn = nullptr;
    e.err = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000,
                                             cudaEnableDefault, &e.query);
    e.fn = reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
    return e;
  }();
  return enc;
}

}  // namespace

Status make_tma_bhsd(CUtensorMap* map, const TensorView& t, int box_rows) {
  const int esize = dtype_size(t.dtype);
  if (esize != 2 || t.ndim != 4)
    return Status::Invalid(std::string(t.name) + ": TMA maps are built for 4-D 16-bit tensors");
  // dims innermost first: D, N, H, B. A size-1 dim's stride is never used (its coordinate is
  // always 0), so it is replaced by a valid one; torch gives size-1 dims arbitrary strides.
  cuuint64_t dims[4], strides[3];
  int64_t dense = t.shape[3] * esize;  // bytes of a dense [.., D] row, rounded up below
  for (int i = 0; i < 4; ++i) dims[i] = static_cast<cuuint64_t>(t.shape[3 - i]);
  for (int i = 1; i < 4; ++i) {
    const int64_t size = t.shape[3 - i];
    const int64_t bytes = t.stride[3 - i] * esize;
    dense = (dense + kTmaAlign - 1) / kTmaAlign * kTmaAlign;
    const int64_t use = size == 1 ? dense : bytes;
    if (use <= 0 || use % kTmaAlign != 0 || use >= (int64_t{1} << 40))
      return Status::Invalid(
          std::string(t.name) +
          ": the sm90 attention kernel reads it with TMA, which needs the "
          "batch, head and sequence strides to be positive multiples of 16 bytes (8 elements); "
          "got strides (elements) [" +
          std::to_string(t.stride[0]) + ", " + std::to_string(t.stride[1]) + ", " +
          std::to_string(t.stride[2]) + ", " + std::to_string(t.stride[3]) + "] for shape " +
          t.shape_str() + "; call .contiguous()");
    strides[i - 1] = static_cast<cuuint64_t>(use);
    dense = use * size;
  }
  if (reinterpret_cast<uintptr_t>(t.data) % kTmaAlign != 0)
    return Status::Invalid(std::string(t.name) +
                           ": the sm90 attention kernel reads it with TMA, which needs a 16-byte "
                           "aligned data pointer; got one at byte offset " +
                           std::to_string(reinterpret_cast<uintptr_t>(t.data) % kTmaAlign) +
                           " (a storage offset that is not a multiple of 8 elements?); call "
                           ".contiguous()");
  const Encoder& enc = encoder();
  if (enc.err != cudaSuccess || enc.fn == nullptr || enc.query != cudaDriverEntryPointSuccess)
    return Status::Cuda(std::string("attention_forward: cannot get cuTensorMapEncodeTiled from the "
                                    "driver (") +
                        cudaGetErrorName(enc.err) + ", query result " +
                        std::to_string(static_cast<int>(enc.query)) +
                        "); TMA needs a driver for CUDA 12.0 or newer");
  const cuuint32_t box[4] = {static_cast<cuuint32_t>(kBoxCols), static_cast<cuuint32_t>(box_rows),
                             1, 1};
  const cuuint32_t elem_strides[4] = {1, 1, 1, 1};
  const CUtensorMapDataType type = t.dtype == DType::kFloat16 ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16
                                                              : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
  const CUresult res =
      enc.fn(map, type, 4, t.data, dims, strides, box, elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
             CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
             CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (res != CUDA_SUCCESS)
    return Status::Cuda(std::string(t.name) + ": cuTensorMapEncodeTiled failed (CUresult " +
                        std::to_string(static_cast<int>(res)) + ") for shape " + t.shape_str());
  return Status::Ok();
}

}  // namespace attnqat::sm90
