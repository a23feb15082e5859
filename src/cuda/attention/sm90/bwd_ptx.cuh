// src/cuda/attention/sm90/bwd_ptx.cuh — inline-PTX wrappers that the backward kernel adds to
// ptx.cuh's: 1-D bulk copies (global -> shared on an mbarrier, shared -> global reduce-add),
// their bulk-group completion, the generic -> async proxy fence, and the acquire load of the
// deterministic mode's semaphores. One instruction per function, named after it.
//
// PTX ISA: 9.7.9.25.4 (cp.async.bulk, cp.reduce.async.bulk, commit_group / wait_group),
// 9.7.13.2 (membar / fence.proxy), 9.7.9.8 (ld with .acquire).
#pragma once

#include <cstdint>

namespace attnqat::sm90 {

// `bytes` (a multiple of 16) from global `src` (16-byte aligned) to shared `dst`, completing
// `bytes` of transactions on the mbarrier `bar`.
__device__ __forceinline__ void bulk_load(uint32_t dst, const void* src, uint32_t bytes,
                                          uint32_t bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
          dst),
      "l"(reinterpret_cast<uint64_t>(src)), "r"(bytes), "r"(bar)
      : "memory");
}

// dst[i] += src[i] (fp32) for `bytes` / 4 elements, performed by the bulk copy engine in L2
// (element-wise atomic). Asynchronous: a bulk group (commit, then wait).
__device__ __forceinline__ void bulk_reduce_add_f32(float* dst, uint32_t src, uint32_t bytes) {
  asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;" ::"l"(
                   reinterpret_cast<uint64_t>(dst)),
               "r"(src), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void bulk_commit() {
  asm volatile("cp.async.bulk.commit_group;" ::: "memory");
}
// Every committed bulk group has finished reading its shared-memory source.
__device__ __forceinline__ void bulk_wait_read_all() {
  asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory");
}
// Every committed bulk group has completed (its writes performed).
__device__ __forceinline__ void bulk_wait_all() {
  asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
}

// Orders this thread's earlier generic-proxy shared-memory writes before later async-proxy
// accesses (wgmma operands, bulk copies) that a barrier makes wait for them (docs/hopper.md, section 4).
__device__ __forceinline__ void fence_proxy_async_smem() {
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}

__device__ __forceinline__ int ld_acquire_gpu(const int* p) {
  int v;
  asm volatile("ld.acquire.gpu.global.b32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

}  // namespace attnqat::sm90
