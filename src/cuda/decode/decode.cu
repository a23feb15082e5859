// src/cuda/decode/decode.cu — the launcher of the FP4 decode kernels (decode_kernel.cuh): six
// instantiations of the split kernel (bf16 / fp16 queries and outputs x anchored with packed rows,
// anchored, paper) and two of the combine kernel. Portable (sm_89+): built for every target of ATTNQAT_CUDA_ARCHS.
#include "cuda/decode/decode_kernel.cuh"
#include "cuda/decode/launch.h"

namespace attnqat::decode {
namespace {

// Rows that share one KV head (group x nq) up to 4: the packed-rows variant (decode_kernel.cuh)
// for anchored P.
bool packs_rows(const DecodeParams& p) { return p.rows <= 4; }

template <bool kF16, bool kPack, bool kPaper>
cudaError_t set_smem() {
  // Above 48 KB of dynamic shared memory a kernel must opt in (idempotent, cheap).
  return cudaFuncSetAttribute(decode_kernel<kF16, kPack, kPaper>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              kSmemBytes);
}

// Programmatic dependent launch of the combine kernel needs sm_90 (griddepcontrol).
bool device_has_pdl() {
  int dev = 0, major = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) return false;
  return major >= 9;
}

template <bool kF16, bool kPack, bool kPaper>
cudaError_t launch_typed(const DecodeParams& p, int batch, cudaStream_t stream) {
  cudaError_t err = set_smem<kF16, kPack, kPaper>();
  if (err != cudaSuccess) return err;
  const dim3 grid(p.num_splits, p.heads_kv * p.row_groups, batch);
  decode_kernel<kF16, kPack, kPaper><<<grid, kThreads, kSmemBytes, stream>>>(p);
  if ((err = cudaGetLastError()) != cudaSuccess || p.num_splits == 1) return err;
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(batch * p.heads_kv * p.row_groups, kRows);
  cfg.blockDim = dim3(kHeadDim);
  cfg.dynamicSmemBytes = 0;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = device_has_pdl() ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, combine_kernel<kF16>, p);
}

}  // namespace

int decode_smem_bytes() { return kSmemBytes; }

cudaError_t decode_occupancy(bool f16, int* blocks_per_sm) {
  // Every variant has the same launch bounds, registers cap and shared memory.
  cudaError_t err = f16 ? set_smem<true, false, false>() : set_smem<false, false, false>();
  if (err != cudaSuccess) return err;
  return f16 ? cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks_per_sm, decode_kernel<true, false, false>,
                                                             kThreads, kSmemBytes)
             : cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks_per_sm, decode_kernel<false, false, false>,
                                                             kThreads, kSmemBytes);
}

cudaError_t launch_decode(const DecodeParams& p, int batch, bool f16, cudaStream_t stream) {
  if (p.paper)  // one split per sequence, rarely used for serving: no packed-rows variant
    return f16 ? launch_typed<true, false, true>(p, batch, stream) : launch_typed<false, false, true>(p, batch, stream);
  if (packs_rows(p))
    return f16 ? launch_typed<true, true, false>(p, batch, stream) : launch_typed<false, true, false>(p, batch, stream);
  return f16 ? launch_typed<true, false, false>(p, batch, stream) : launch_typed<false, false, false>(p, batch, stream);
}

}  // namespace attnqat::decode
