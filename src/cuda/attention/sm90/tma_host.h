// src/cuda/attention/sm90/tma_host.h — host side of TMA: encoding the tensor maps of the
// attention kernels (cuTensorMapEncodeTiled, reached through cudaGetDriverEntryPointByVersion so
// that nothing links libcuda: the library loads on machines without a driver).
#pragma once

#include <cuda.h>

#include "attnqat/tensor.h"

namespace attnqat::sm90 {

// A 4-D map over t [B, H, N, D] (16-bit elements, any batch/head/sequence strides, last dim
// contiguous): dims (D, N, H, B) innermost first, boxes of 64 columns x box_rows rows x 1 x 1,
// 128-byte swizzle, out-of-bounds elements read as zeros. TMA needs a 16-byte aligned base and
// strides that are multiples of 16 bytes: otherwise Status::Invalid naming t.
Status make_tma_bhsd(CUtensorMap* map, const TensorView& t, int box_rows);

}  // namespace attnqat::sm90
