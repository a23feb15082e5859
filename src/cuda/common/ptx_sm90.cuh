// src/cuda/common/ptx_sm90.cuh — inline-PTX wrappers of the Hopper (sm_90a) features the
// attention kernels use: mbarriers, TMA tensor loads and 1-D bulk copies (with the bulk reduce-add),
// named barriers, setmaxnreg, the wgmma ordering instructions, the generic -> async proxy fence
// and an acquire load. One instruction per function, named after it; no policy here (the
// pipelines and their phases live in the kernels). The portable wrappers are in ptx.cuh, the
// wgmma instructions in wgmma.cuh.
//
// PTX ISA references: 9.7.13.15 (mbarrier), 9.7.9.25 (cp.async.bulk.tensor, cp.async.bulk,
// cp.reduce.async.bulk), 9.7.13.4 (bar / barrier), 9.7.17.1 (setmaxnreg), 9.7.15.7
// (wgmma.fence / commit_group / wait_group), 9.7.13.2 (fence.proxy), 9.7.9.8 (ld .acquire).
#pragma once

#include <cstdint>

namespace attnqat::cuda {

// ---- mbarrier (shared::cta, 64-bit) -------------------------------------------------------------

__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t arrive_count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(arrive_count) : "memory");
}

// Makes the initialized barriers visible to the async proxy (TMA) and to the other threads
// (followed by a __syncthreads in the kernel).
__device__ __forceinline__ void fence_barrier_init() {
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
}

// One arrival that also announces `bytes` of transactions (the TMA copies complete them).
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes)
               : "memory");
}

__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}

// Blocks until the phase with parity `parity` has completed (try_wait returns true once the
// barrier's current phase parity differs from `parity`). A fresh barrier is in phase 0, so
// waiting for parity 1 returns at once: that is how a producer's first pass over a ring skips its
// "slot empty" waits.
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "LAB_WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
      "@p bra.uni DONE;\n"
      "bra.uni LAB_WAIT;\n"
      "DONE:\n"
      "}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}

// ---- TMA ---------------------------------------------------------------------------------------

// 4-D tiled tensor load global -> shared, completing `bytes` on the mbarrier `bar`. `tmap` is the
// generic address of a CUtensorMap in parameter space (a __grid_constant__ kernel parameter).
// Coordinates are element indices, innermost first (column, row, head, batch).
__device__ __forceinline__ void tma_load_4d(uint32_t smem_dst, const void* tmap, uint32_t bar,
                                            int c0, int c1, int c2, int c3) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%3, %4, %5, %6}], [%2];" ::"r"(smem_dst),
      "l"(reinterpret_cast<uint64_t>(tmap)), "r"(bar), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
      : "memory");
}

__device__ __forceinline__ void prefetch_tma_descriptor(const void* tmap) {
  asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<uint64_t>(tmap)) : "memory");
}
template <class... Maps>
__device__ __forceinline__ void prefetch_tma_descriptors(const Maps*... tmaps) {
  (prefetch_tma_descriptor(tmaps), ...);
}

// ---- Named barriers ----------------------------------------------------------------------------
// bar.sync waits until `threads` arrivals (its own warps' included) were counted on barrier `id`;
// bar.arrive counts its warps and goes on. Both sides must name the same thread count.

__device__ __forceinline__ void named_bar_sync(uint32_t id, uint32_t threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void named_bar_arrive(uint32_t id, uint32_t threads) {
  asm volatile("bar.arrive %0, %1;" ::"r"(id), "r"(threads) : "memory");
}

// ---- Register reconfiguration (warpgroup-wide, sm_90a) -----------------------------------------

template <int kRegs>
__device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(kRegs));
}
template <int kRegs>
__device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(kRegs));
}

// ---- wgmma ordering ----------------------------------------------------------------------------

// Orders earlier register writes (accumulators, A fragments) before the next wgmma.mma_async.
__device__ __forceinline__ void wgmma_fence() {
  asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
}
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
}
// Waits until at most N committed groups of this warpgroup are pending.
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}

// Compiler-level fences: the register is "read and written" here, so the compiler can neither
// move its uses across this point nor reuse its physical register before it (cute's
// warpgroup_fence_operand). Placed after wgmma_wait on every accumulator and A fragment.
__device__ __forceinline__ void reg_fence(float& x) { asm volatile("" : "+f"(x)::"memory"); }
__device__ __forceinline__ void reg_fence(uint32_t& x) { asm volatile("" : "+r"(x)::"memory"); }
template <typename T, int N>
__device__ __forceinline__ void reg_fence(T (&x)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) reg_fence(x[i]);
}
template <typename T, int N, int M>
__device__ __forceinline__ void reg_fence(T (&x)[N][M]) {
#pragma unroll
  for (int i = 0; i < N; ++i) reg_fence(x[i]);
}

// ---- Warp specialization ------------------------------------------------------------------------
// Warpgroup 0 gives registers back (setmaxnreg.dec to kProducerRegs) and runs producer(); the
// others take them (setmaxnreg.inc to kConsumerRegs) and run consumer(w), w = warpgroup - 1. The
// sum must stay within the CTA's launch allocation (the kernels' configs assert it).
template <int kProducerRegs, int kConsumerRegs, class Producer, class Consumer>
__device__ __forceinline__ void split_warpgroups(Producer&& producer, Consumer&& consumer) {
  const int warpgroup = threadIdx.x / 128;
  if (warpgroup == 0) {
    setmaxnreg_dec<kProducerRegs>();
    producer();
  } else {
    setmaxnreg_inc<kConsumerRegs>();
    consumer(warpgroup - 1);
  }
}

// ---- 1-D bulk copies, proxy fence, acquire load ------------------------------------------------

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

}  // namespace attnqat::cuda
