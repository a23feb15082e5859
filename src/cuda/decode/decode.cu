// src/cuda/decode/decode.cu — the launcher of the FP4 decode kernels (decode_kernel.cuh): twelve
// instantiations of the split kernel (head dim 64 / 128 x bf16 / fp16 queries and outputs x
// anchored with packed rows, anchored, paper) and four of the combine kernel. Portable (sm_89+):
// built for every target of ATTNQAT_CUDA_ARCHS.
#include "cuda/decode/decode_kernel.cuh"
#include "cuda/decode/launch.h"

namespace attnqat::decode {
namespace {

// Rows that share one KV head (group x nq) up to 4: the packed-rows variant (decode_kernel.cuh)
// for anchored P.
bool packs_rows(const DecodeParams& p) { return p.rows <= 4; }

template <int D, bool kF16, bool kPack, PQuant kPQuant>
cudaError_t set_smem() {
  // Above 48 KB of dynamic shared memory a kernel must opt in (idempotent, cheap).
  return cudaFuncSetAttribute(decode_kernel<D, kF16, kPack, kPQuant>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              Layout<D>::kSmemBytes);
}

// Programmatic dependent launch of the combine kernel needs sm_90 (griddepcontrol).
bool device_has_pdl() {
  int dev = 0, major = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) return false;
  return major >= 9;
}

template <int D, bool kF16, bool kPack, PQuant kPQuant>
cudaError_t launch_typed(const DecodeParams& p, int batch, cudaStream_t stream) {
  cudaError_t err = set_smem<D, kF16, kPack, kPQuant>();
  if (err != cudaSuccess) return err;
  const dim3 grid(p.num_splits, p.heads_kv * p.row_groups, batch);
  decode_kernel<D, kF16, kPack, kPQuant><<<grid, kThreads, Layout<D>::kSmemBytes, stream>>>(p);
  if ((err = cudaGetLastError()) != cudaSuccess || p.num_splits == 1) return err;
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(batch * p.heads_kv * p.row_groups, kRows);
  cfg.blockDim = dim3(kCombineThreads);
  cfg.dynamicSmemBytes = 0;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = device_has_pdl() ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, combine_kernel<D, kF16>, p);
}

template <int D>
cudaError_t launch_dim(const DecodeParams& p, int batch, bool f16, cudaStream_t stream) {
  if (p.p_quant == PQuant::kPaper)  // one split per sequence, rarely used for serving: no packed-rows variant
    return f16 ? launch_typed<D, true, false, PQuant::kPaper>(p, batch, stream) : launch_typed<D, false, false, PQuant::kPaper>(p, batch, stream);
  if (packs_rows(p))
    return f16 ? launch_typed<D, true, true, PQuant::kAnchored>(p, batch, stream) : launch_typed<D, false, true, PQuant::kAnchored>(p, batch, stream);
  return f16 ? launch_typed<D, true, false, PQuant::kAnchored>(p, batch, stream) : launch_typed<D, false, false, PQuant::kAnchored>(p, batch, stream);
}

template <int D>
cudaError_t occupancy_dim(bool f16, int* blocks_per_sm) {
  // Every variant of one head dim has the same launch bounds, registers cap and shared memory.
  cudaError_t err = f16 ? set_smem<D, true, false, PQuant::kAnchored>() : set_smem<D, false, false, PQuant::kAnchored>();
  if (err != cudaSuccess) return err;
  return f16 ? cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks_per_sm, decode_kernel<D, true, false, PQuant::kAnchored>,
                                                             kThreads, Layout<D>::kSmemBytes)
             : cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks_per_sm, decode_kernel<D, false, false, PQuant::kAnchored>,
                                                             kThreads, Layout<D>::kSmemBytes);
}

}  // namespace

bool decode_head_dim_supported(int head_dim) { return head_dim == 64 || head_dim == 128; }

cudaError_t decode_occupancy(bool f16, int head_dim, int* blocks_per_sm) {
  if (!decode_head_dim_supported(head_dim)) return cudaErrorInvalidValue;
  return head_dim == 64 ? occupancy_dim<64>(f16, blocks_per_sm) : occupancy_dim<128>(f16, blocks_per_sm);
}

cudaError_t launch_decode(const DecodeParams& p, int batch, bool f16, cudaStream_t stream) {
  if (!decode_head_dim_supported(p.head_dim)) return cudaErrorInvalidValue;  // api.cu checks first
  return p.head_dim == 64 ? launch_dim<64>(p, batch, f16, stream) : launch_dim<128>(p, batch, f16, stream);
}

}  // namespace attnqat::decode
