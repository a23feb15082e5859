// src/cuda/common/ptx.cuh — the portable inline-PTX wrappers every kernel shares (sm_80+ unless a
// comment says otherwise): shared-memory addresses and accesses, cp.async, programmatic dependent
// launch, mma.sync / movmatrix, ex2.approx and the 16-bit pair instructions. One instruction per
// function, named after it; no policy here. The Hopper-only features (mbarrier, TMA, bulk copies,
// setmaxnreg, wgmma ordering) are in ptx_sm90.cuh, the wgmma instructions in wgmma.cuh.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace attnqat::cuda {

// ---- Shared memory ------------------------------------------------------------------------------

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void st_shared_b32(uint32_t addr, uint32_t v) {
  asm volatile("st.shared.b32 [%0], %1;" ::"r"(addr), "r"(v) : "memory");
}
__device__ __forceinline__ void st_shared_v2f(uint32_t addr, float x, float y) {
  asm volatile("st.shared.v2.f32 [%0], {%1, %2};" ::"r"(addr), "f"(x), "f"(y) : "memory");
}
__device__ __forceinline__ float4 ld_shared_v4f(uint32_t addr) {
  float4 v;
  asm volatile("ld.shared.v4.f32 {%0, %1, %2, %3}, [%4];"
               : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
               : "r"(addr)
               : "memory");
  return v;
}

__device__ __forceinline__ uint32_t ld_shared_u32(uint32_t a) {
  uint32_t v;
  asm volatile("ld.shared.u32 %0, [%1];" : "=r"(v) : "r"(a) : "memory");
  return v;
}
__device__ __forceinline__ uint32_t ld_shared_u8(uint32_t a) {
  uint16_t v;
  asm volatile("ld.shared.u8 %0, [%1];" : "=h"(v) : "r"(a) : "memory");
  return v;
}
__device__ __forceinline__ void st_shared_v4(uint32_t a, const uint32_t (&v)[4]) {
  asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};" ::"r"(a), "r"(v[0]), "r"(v[1]),
               "r"(v[2]), "r"(v[3])
               : "memory");
}

// ---- cp.async -----------------------------------------------------------------------------------

// 16 bytes global -> shared, cached in L2 only.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(src) : "memory");
}
// The same, zero-filled when !valid (src is then not read).
__device__ __forceinline__ void cp_async16_zfill(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src),
               "r"(valid ? 16 : 0)
               : "memory");
}
// 4 or 8 bytes global -> shared (cached in L1 too), zero-filled when !valid.
template <int kBytes>
__device__ __forceinline__ void cp_async_small_zfill(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;" ::"r"(dst), "l"(src), "n"(kBytes),
               "r"(valid ? kBytes : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
// Waits until at most kPending committed groups of this thread are in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(kPending) : "memory");
}

// ---- Programmatic dependent launch (sm_90+; no-ops below) ---------------------------------------

// Lets the next kernel in the stream (launched with the programmatic-serialization attribute)
// start its CTAs early.
__device__ __forceinline__ void griddep_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
// Waits until the previous kernel in the stream has completed and its memory is visible.
__device__ __forceinline__ void griddep_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// ---- Warp-level matrix instructions -------------------------------------------------------------

// D += A . B, m16n8k16, fp16 inputs, fp32 accumulators (row.col).
__device__ __forceinline__ void mma_m16n8k16_f16(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                                 uint32_t a3, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
// The transpose of an 8x8 matrix of 16-bit elements held one 32-bit word per lane.
__device__ __forceinline__ uint32_t movmatrix_trans(uint32_t a) {
  uint32_t d;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;" : "=r"(d) : "r"(a));
  return d;
}

// ---- Arithmetic ---------------------------------------------------------------------------------

// 2^x, MUFU.EX2 (max relative error about 2^-22; ex2(-inf) = +0; subnormal results flush to 0).
__device__ __forceinline__ float ex2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// ---- 16-bit pairs (low half = first element, as MMA fragments want) -----------------------------

// RN(lo), RN(hi) in the element type (kF16: fp16, else bf16), packed (low half = lo).
template <bool kF16>
__device__ __forceinline__ uint32_t pack_rn(float lo, float hi) {
  if constexpr (kF16) {
    const __half2 v = __floats2half2_rn(lo, hi);  // cvt.rn.f16x2.f32
    return *reinterpret_cast<const uint32_t*>(&v);
  } else {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // cvt.rn.bf16x2.f32
    return *reinterpret_cast<const uint32_t*>(&v);
  }
}
__device__ __forceinline__ uint32_t pack_rn_bf16x2(float lo, float hi) { return pack_rn<false>(lo, hi); }
__device__ __forceinline__ uint32_t pack_rn_f16x2(float lo, float hi) { return pack_rn<true>(lo, hi); }
// Two values exact in the element type, packed: bf16 as the upper halves of the fp32 patterns (one
// PRMT instead of a convert), fp16 by a convert (exact, subnormals kept).
template <bool kF16>
__device__ __forceinline__ uint32_t pack_exact(float lo, float hi) {
  if constexpr (kF16)
    return pack_rn<true>(lo, hi);
  else
    return __byte_perm(__float_as_uint(lo), __float_as_uint(hi), 0x7632);
}
// a * b of two packed pairs in the element type, round to nearest.
template <bool kF16>
__device__ __forceinline__ uint32_t mul_x2(uint32_t a, uint32_t b) {
  uint32_t r;
  if constexpr (kF16)
    asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
  else
    asm("mul.rn.bf16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
  return r;
}
__device__ __forceinline__ uint32_t mul_bf16x2(uint32_t a, uint32_t b) { return mul_x2<false>(a, b); }
__device__ __forceinline__ uint32_t mul_f16x2(uint32_t a, uint32_t b) { return mul_x2<true>(a, b); }
// Two E4M3 bytes (bits 0-7 -> low half, 8-15 -> high half) -> f16x2, exact (NaN stays NaN).
// sm_89+.
__device__ __forceinline__ uint32_t e4m3x2_to_f16x2(uint32_t two_bytes) {
  uint32_t d;
  const uint16_t s = static_cast<uint16_t>(two_bytes);
  asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(d) : "h"(s));
  return d;
}

}  // namespace attnqat::cuda
