// src/cuda/attention/sm90/ptx.cuh — thin inline-PTX wrappers of the Hopper (sm_90a) features the
// attention kernels use: mbarriers, TMA tensor loads, named barriers, setmaxnreg, wgmma fences,
// ex2.approx and the 16-bit packing instructions. One instruction per function, named after it;
// no policy here (the pipelines and their phases live in the kernel steps).
//
// PTX ISA references: 9.7.13.15 (mbarrier), 9.7.9.25 (cp.async.bulk.tensor), 9.7.13.4 (bar /
// barrier), 9.7.17.1 (setmaxnreg), 9.7.15.7 (wgmma.fence / commit_group / wait_group).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace attnqat::sm90 {

// ---- Addresses ----------------------------------------------------------------------------------

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

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

// ---- Arithmetic --------------------------------------------------------------------------------

// 2^x, MUFU.EX2 (max relative error about 2^-22; ex2(-inf) = +0; subnormal results flush to 0).
__device__ __forceinline__ float ex2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// ---- 16-bit pairs (low half = first element, as the wgmma A fragment wants) --------------------

// RN(lo), RN(hi) packed; PTX cvt puts its first source in the upper half.
__device__ __forceinline__ uint32_t pack_rn_bf16x2(float lo, float hi) {
  uint32_t r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}
__device__ __forceinline__ uint32_t pack_rn_f16x2(float lo, float hi) {
  uint32_t r;
  asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}
// The upper halves of two fp32 patterns: bf16x2 of values that are exact in bf16 (no rounding
// needed), one PRMT instead of a convert.
__device__ __forceinline__ uint32_t pack_exact_bf16x2(float lo, float hi) {
  return __byte_perm(__float_as_uint(lo), __float_as_uint(hi), 0x7632);
}
__device__ __forceinline__ uint32_t mul_bf16x2(uint32_t a, uint32_t b) {
  uint32_t r;
  asm("mul.rn.bf16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
  return r;
}
__device__ __forceinline__ uint32_t mul_f16x2(uint32_t a, uint32_t b) {
  uint32_t r;
  asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
  return r;
}

}  // namespace attnqat::sm90
