// src/cuda/common/wgmma.cuh — the Hopper (sm_90a) warpgroup MMA layer: shared-memory matrix
// descriptors and wgmma.mma_async with fp32 accumulation for bf16 and fp16 inputs, in two forms:
//   wgmma_ss<kF16, kN, kTransA, kTransB>  D[64 x kN] (+)= A[64 x 16] B[16 x kN], A and B from
//                                         shared memory
//   wgmma_rs<kF16, kN, kTransB>           the same with A from registers (4 words of 16-bit pairs)
// kN = 64 or 128. Transposes (PTX imm-trans-a / imm-trans-b, 16-bit types only): 0 = K-major
// (the operand's rows run along k), 1 = MN-major (A = X^T of a tile X stored [k rows, M]; B stored
// [k rows, N contiguous]).
// The accumulator d[i] of thread T (warp w = T/32 of the warpgroup, g = lane/4, t = lane%4) is
// element (16w + g + 8*((i>>1)&1), 8*(i>>2) + 2t + (i&1)) (PTX ISA "wgmma .m64nNk16 register
// fragment layout for accumulator D"; docs/hopper.md, section 5.1); the register A fragment
// a[0..3] holds the same positions for 16 columns.
//
// scale_d = 0 zero-initializes the accumulator (D = A B), 1 accumulates (D += A B). Every call
// must sit between wgmma_fence() and wgmma_commit() (ptx_sm90.cuh); the results are readable after
// wgmma_wait<>() and reg_fence() on the accumulators.
#pragma once

#include <cstdint>

namespace attnqat::cuda {

// ---- Shared-memory matrix descriptors (PTX ISA "Matrix Descriptor Format") ----------------------
// bits 0-13 start address >> 4, 16-29 leading byte offset >> 4, 32-45 stride byte offset >> 4,
// 62-63 layout (1 = 128-byte swizzle). The tiles are 1024-byte aligned, so the base offset
// (bits 49-51) is 0; a start address moved by 32 bytes inside a 128-byte row selects the next
// 16 columns of a K-major tile (the swizzle is applied to the final address bits).

constexpr uint32_t kSw128AtomBytes = 1024;  // 8 rows x 128 bytes: one 128B-swizzle atom

// K-major, 128-byte swizzle: canonical layout ((8,m),(T,2k)):((8T,SBO),(1,T)) — rows of 64
// 16-bit elements, 8-row atoms stacked along M/N every SBO = 1024 bytes; LBO is unused (1).
__device__ __forceinline__ uint64_t desc_kmajor_sw128(uint32_t smem_addr) {
  return static_cast<uint64_t>((smem_addr & 0x3FFFF) >> 4) | (uint64_t{1} << 16) |
         (static_cast<uint64_t>(kSw128AtomBytes >> 4) << 32) | (uint64_t{1} << 62);
}

// MN-major, 128-byte swizzle: canonical layout ((T,8,m),(8,k)):((1,T,LBO),(8T,SBO)) — 64
// contiguous MN elements per 128-byte row, 8-row (8 K values) atoms every SBO = 1024 bytes along
// K, and the next 64 MN elements LBO bytes further.
__device__ __forceinline__ uint64_t desc_mnmajor_sw128(uint32_t smem_addr, uint32_t lbo_bytes) {
  return static_cast<uint64_t>((smem_addr & 0x3FFFF) >> 4) |
         (static_cast<uint64_t>((lbo_bytes >> 4) & 0x3FFF) << 16) |
         (static_cast<uint64_t>(kSw128AtomBytes >> 4) << 32) | (uint64_t{1} << 62);
}

// Descriptors: one base descriptor per operand tile, then the k16 steps add their byte offset
// >> 4 to the low word (the start-address field, bits 0-13). No carry can leave that field: every
// tile lies below 2^18 bytes of shared memory (the field holds address >> 4 of an 18-bit address),
// so base + offset is the descriptor desc_*_sw128 would build from the moved address. This keeps
// the per-wgmma descriptor work at one uniform add instead of the mask-shift-or sequence (about 5
// uniform instructions per wgmma, ~8% of the fp4 consumer loop's issue slots before).
__device__ __forceinline__ uint64_t desc_add(uint64_t desc, uint32_t byte_offset) {
  const uint32_t lo = static_cast<uint32_t>(desc) + (byte_offset >> 4);
  return (desc & 0xFFFFFFFF00000000ull) | lo;
}

// ---- Instructions ----------------------------------------------------------------------------
// One asm statement per (N, type); the transposes are immediate operands ("n"). The accumulator
// operand lists are macros because inline asm needs them written out.

#define ATTNQAT_WGMMA_REGS32 \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define ATTNQAT_WGMMA_REGS64 \
  ATTNQAT_WGMMA_REGS32 ", " \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define ATTNQAT_WGMMA_ACC32(d) \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
  "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
  "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
  "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
#define ATTNQAT_WGMMA_ACC64(d) \
  ATTNQAT_WGMMA_ACC32(d), \
  "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
  "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
  "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
  "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])

// SS: operands after the accumulators: desc_a, desc_b, scale_d, trans_a, trans_b.
#define ATTNQAT_WGMMA_SS(SHAPE, REGS, ACC, A, B, S, TA, TB)                                       \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" S ", 0;\n"                                 \
               "wgmma.mma_async.sync.aligned." SHAPE " {" REGS "}, %" A ", %" B                  \
               ", p, 1, 1, %" TA ", %" TB ";\n}\n"                                             \
               : ACC                                                                             \
               : "l"(desc_a), "l"(desc_b), "r"(scale_d), "n"(kTransA), "n"(kTransB))

// RS: operands after the accumulators: a[0..3], desc_b, scale_d, trans_b.
#define ATTNQAT_WGMMA_RS(SHAPE, REGS, ACC, A0, A1, A2, A3, B, S, TB)                             \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" S ", 0;\n"                                 \
               "wgmma.mma_async.sync.aligned." SHAPE " {" REGS "}, {%" A0 ", %" A1 ", %" A2      \
               ", %" A3 "}, %" B ", p, 1, 1, %" TB ";\n}\n"                                     \
               : ACC                                                                             \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(scale_d),          \
                 "n"(kTransB))

template <bool kF16, int kN, int kTransA, int kTransB>
__device__ __forceinline__ void wgmma_ss(float (&d)[kN / 2], uint64_t desc_a, uint64_t desc_b,
                                         int scale_d) {
  static_assert(kN == 64 || kN == 128, "wgmma_ss: N = 64 or 128");
  if constexpr (kN == 64 && kF16)
    ATTNQAT_WGMMA_SS("m64n64k16.f32.f16.f16", ATTNQAT_WGMMA_REGS32, ATTNQAT_WGMMA_ACC32(d), "32",
                     "33", "34", "35", "36");
  else if constexpr (kN == 64)
    ATTNQAT_WGMMA_SS("m64n64k16.f32.bf16.bf16", ATTNQAT_WGMMA_REGS32, ATTNQAT_WGMMA_ACC32(d), "32",
                     "33", "34", "35", "36");
  else if constexpr (kF16)
    ATTNQAT_WGMMA_SS("m64n128k16.f32.f16.f16", ATTNQAT_WGMMA_REGS64, ATTNQAT_WGMMA_ACC64(d), "64",
                     "65", "66", "67", "68");
  else
    ATTNQAT_WGMMA_SS("m64n128k16.f32.bf16.bf16", ATTNQAT_WGMMA_REGS64, ATTNQAT_WGMMA_ACC64(d), "64",
                     "65", "66", "67", "68");
}

template <bool kF16, int kN, int kTransB>
__device__ __forceinline__ void wgmma_rs(float (&d)[kN / 2], const uint32_t (&a)[4], uint64_t desc_b,
                                         int scale_d) {
  static_assert(kN == 64 || kN == 128, "wgmma_rs: N = 64 or 128");
  if constexpr (kN == 64 && kF16)
    ATTNQAT_WGMMA_RS("m64n64k16.f32.f16.f16", ATTNQAT_WGMMA_REGS32, ATTNQAT_WGMMA_ACC32(d), "32",
                     "33", "34", "35", "36", "37", "38");
  else if constexpr (kN == 64)
    ATTNQAT_WGMMA_RS("m64n64k16.f32.bf16.bf16", ATTNQAT_WGMMA_REGS32, ATTNQAT_WGMMA_ACC32(d), "32",
                     "33", "34", "35", "36", "37", "38");
  else if constexpr (kF16)
    ATTNQAT_WGMMA_RS("m64n128k16.f32.f16.f16", ATTNQAT_WGMMA_REGS64, ATTNQAT_WGMMA_ACC64(d), "64",
                     "65", "66", "67", "68", "69", "70");
  else
    ATTNQAT_WGMMA_RS("m64n128k16.f32.bf16.bf16", ATTNQAT_WGMMA_REGS64, ATTNQAT_WGMMA_ACC64(d), "64",
                     "65", "66", "67", "68", "69", "70");
}

#undef ATTNQAT_WGMMA_SS
#undef ATTNQAT_WGMMA_RS
#undef ATTNQAT_WGMMA_ACC64
#undef ATTNQAT_WGMMA_ACC32
#undef ATTNQAT_WGMMA_REGS64
#undef ATTNQAT_WGMMA_REGS32

}  // namespace attnqat::cuda
