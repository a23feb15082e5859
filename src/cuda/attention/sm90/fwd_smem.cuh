// src/cuda/attention/sm90/fwd_smem.cuh — shared-memory addresses of the forward kernel (the map
// is in fwd_config.h): tiles and mbarriers as 32-bit shared-space addresses, computed once from
// the 1024-byte-aligned base.
#pragma once

#include <cstdint>

namespace attnqat::sm90 {

template <class Cfg>
struct SmemMap {
  uint32_t base;  // 1024-byte aligned (the 128B swizzle pattern repeats every 1024 bytes)

  __device__ __forceinline__ uint32_t q() const { return base + Cfg::kOffQ; }
  __device__ __forceinline__ uint32_t k(int stage) const {
    return base + Cfg::kOffK + stage * Cfg::kKVBytes;
  }
  __device__ __forceinline__ uint32_t v(int stage) const {
    return base + Cfg::kOffV + stage * Cfg::kKVBytes;
  }
  __device__ __forceinline__ uint32_t bar(int index) const {
    return base + Cfg::kOffBar + 8 * index;
  }
  // The P scale table (p_quant.cuh, fill_p_scale_entry).
  __device__ __forceinline__ uint32_t p_scale_table() const { return base + Cfg::kOffPScale; }
  // kPacked: staging stage s (K codes, K scales, V codes, V scales) and the decode tables.
  __device__ __forceinline__ uint32_t stage(int s) const {
    return base + Cfg::kOffStage + s * Cfg::kStageBytes;
  }
  __device__ __forceinline__ uint32_t table(int operand) const {
    return base + Cfg::kOffTables + operand * 1024;
  }
  // Q landed (transaction barrier, 1 arrival: the producer's expect_tx).
  __device__ __forceinline__ uint32_t q_full() const { return bar(Cfg::kBarQ); }
  // K/V tile of stage s landed (1 arrival + TMA bytes) / was consumed by all 256 consumers.
  __device__ __forceinline__ uint32_t k_full(int s) const { return bar(Cfg::kBarKFull + s); }
  __device__ __forceinline__ uint32_t k_empty(int s) const { return bar(Cfg::kBarKEmpty + s); }
  __device__ __forceinline__ uint32_t v_full(int s) const { return bar(Cfg::kBarVFull + s); }
  __device__ __forceinline__ uint32_t v_empty(int s) const { return bar(Cfg::kBarVEmpty + s); }
};

}  // namespace attnqat::sm90
