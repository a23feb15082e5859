// src/cuda/quantize/api.cu — host entry points of the CUDA quantization backend (declared in
// src/cuda/api.h): archs_built, quantize, dequantize, fake_quantize. Called by src/api.cpp after
// validate(), so shapes, dtypes, devices and the contiguity of outputs are already checked; here
// we check what only the kernels need (16-byte alignment of vector accesses), build the kernel
// parameters, and launch on the caller's stream. Host code only (no kernels in this file).
//
// Contract with the caller:
//  - stream: a cudaStream_t as void* (nullptr = the legacy default stream) of the tensors' device.
//    Nothing here synchronizes or reads device memory on the host, and nothing allocates, so every
//    call can be captured in a CUDA graph.
//  - device: the tensors' device_id (validate() made them agree). If it is not the current
//    device, we switch to it for the launches and switch back (DeviceGuard); the stream must
//    belong to that device.
//  - g (NVFP4): a one-element fp32 device buffer. With compute_global_scale it is written
//    first (memset + amax pass + finalize, on the stream); otherwise it is read by the kernels
//    and must hold a positive power of two (the reference validates it on the CPU; a device
//    value cannot be read here without a sync).
//  - Empty tensors launch nothing (except that compute_global_scale still writes g = 1, the
//    reference's value for an empty tensor).
#include <cuda_runtime_api.h>

#include <cstdint>
#include <string>

#include "cuda/common/device_guard.h"
#include "cuda/api.h"
#include "cuda/quantize/params.h"

#ifndef ATTNQAT_CUDA_ARCHS_BUILT
#define ATTNQAT_CUDA_ARCHS_BUILT "unknown"
#endif

namespace attnqat::cuda {

std::string archs_built() { return ATTNQAT_CUDA_ARCHS_BUILT; }

namespace {

constexpr int kVecBytes = 16;           // LDG.128 / STG.128
constexpr int kAmaxCtasPerSm = 8;        // amax pass: enough CTAs to fill the GPU, few atomics

std::string device_arch_str() {
  int device = 0, major = 0, minor = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess)
    return "unknown";
  return "sm_" + std::to_string(major) + std::to_string(minor);
}

// The Status of a CUDA runtime call or kernel launch made by `op`.
Status cuda_status(const char* op, const char* what, cudaError_t err) {
  if (err == cudaSuccess) return Status::Ok();
  std::string msg = std::string(op) + ": " + what + " failed: " + cudaGetErrorName(err) + " (" +
                    cudaGetErrorString(err) + ")";
  if (err == cudaErrorNoKernelImageForDevice || err == cudaErrorInvalidDeviceFunction ||
      err == cudaErrorUnsupportedPtxVersion)
    msg += "; this build of attnqat has CUDA kernels for " + archs_built() +
           ", the device is " + device_arch_str();
  return Status::Cuda(msg);
}

// ---- alignment checks of the vector accesses ------------------------------------------------

Status check_pointer_alignment(const TensorView& t, int align) {
  const auto addr = reinterpret_cast<uintptr_t>(t.data);
  const uintptr_t offset = addr % static_cast<uintptr_t>(align);
  if (offset == 0) return Status::Ok();
  return Status::Invalid(std::string(t.name) + ": expected a " + std::to_string(align) +
                         "-byte aligned data pointer for the CUDA kernels, got an address offset by " +
                         std::to_string(offset) + " bytes; call .contiguous() (or .clone() if it "
                         "is already contiguous) to get an aligned copy");
}

// Every row of the first `nlead` dims must start 16 bytes apart from the data pointer: the
// strides of the dims that are not of size 1, in bytes, multiples of 16.
Status check_row_alignment(const TensorView& t, int nlead) {
  const int64_t esize = dtype_size(t.dtype);
  for (int i = 0; i < nlead; ++i) {
    if (t.shape[i] <= 1) continue;
    const int64_t bytes = t.stride[i] * esize;
    if (bytes % kVecBytes != 0)
      return Status::Invalid(std::string(t.name) + ": expected strides that keep rows 16-byte "
                             "aligned for the CUDA kernels (stride times " + std::to_string(esize) +
                             " bytes a multiple of 16), got stride " + std::to_string(t.stride[i]) +
                             " in dimension " + std::to_string(i) + " of shape " + t.shape_str() +
                             "; call .contiguous()");
  }
  return Status::Ok();
}

// x / out of a last-axis kernel: 16-byte aligned pointer and rows.
Status check_last_axis_access(const TensorView& t) {
  ATTNQAT_RETURN_IF_ERROR(check_pointer_alignment(t, kVecBytes));
  return check_row_alignment(t, t.ndim - 1);
}

bool is_vec_accessible(const TensorView& t) {
  if (t.size(-1) % 16 != 0 || reinterpret_cast<uintptr_t>(t.data) % kVecBytes != 0) return false;
  return check_row_alignment(t, t.ndim - 1).ok();
}

// ---- layouts ----------------------------------------------------------------------------------

// The first `nlead` dims of t, size-1 dims dropped and contiguous neighbours merged.
LeadDims collapse_lead(const TensorView& t, int nlead) {
  LeadDims lead;
  for (int i = 0; i < nlead; ++i) {
    if (t.shape[i] == 1) continue;
    const int n = lead.ndim;
    if (n > 0 && lead.stride[n - 1] == t.stride[i] * t.shape[i]) {
      lead.shape[n - 1] *= t.shape[i];  // outer dim n-1 steps over whole runs of dim i: merge
      lead.stride[n - 1] = t.stride[i];
    } else {
      lead.shape[n] = t.shape[i];
      lead.stride[n] = t.stride[i];
      lead.ndim = n + 1;
    }
  }
  return lead;
}

// Rows of length row_len back to back (row r at r * row_len)?
bool is_flat(const LeadDims& lead, int64_t row_len) {
  return lead.ndim == 0 || (lead.ndim == 1 && lead.stride[0] == row_len);
}

int64_t lead_count(const TensorView& t, int nlead) {
  int64_t n = 1;
  for (int i = 0; i < nlead; ++i) n *= t.shape[i];
  return n;
}

int block_size(const QuantizeOptions& opts) {
  return opts.format == Format::kNVFP4 ? kNvBlock : kMxBlock;
}

LastAxisParams last_axis_params(const TensorView& x, const QuantizeOptions& opts) {
  LastAxisParams p;
  const int64_t len = x.size(-1);
  p.x_lead = collapse_lead(x, x.ndim - 1);
  p.x_flat = is_flat(p.x_lead, len);
  p.blocks_per_row = len / block_size(opts);
  p.num_blocks = lead_count(x, x.ndim - 1) * p.blocks_per_row;
  return p;
}

TokenAxisParams token_axis_params(const TensorView& x) {
  TokenAxisParams p;
  const int nlead = x.ndim - 2;
  p.x_lead = collapse_lead(x, nlead);
  p.x_token_stride = x.stride_of(-2);
  p.tokens = x.size(-2);
  p.channels = x.size(-1);
  p.blocks_per_channel = (p.tokens + kNvBlock - 1) / kNvBlock;
  p.tiles_c = (p.channels + kTokenTileC - 1) / kTokenTileC;
  p.tiles_b = (p.blocks_per_channel + kTokenTileB - 1) / kTokenTileB;
  p.num_tiles = lead_count(x, nlead) * p.tiles_c * p.tiles_b;
  return p;
}

// g = nvfp4_global_scale(amax(x)) into the device buffer g, on the stream.
Status compute_global_scale(const char* op, const TensorView& x, const TensorView& g,
                            cudaStream_t stream) {
  auto* g_ptr = static_cast<float*>(g.data);
  ATTNQAT_RETURN_IF_ERROR(cuda_status(op, "cudaMemsetAsync of the global scale",
                                      cudaMemsetAsync(g_ptr, 0, sizeof(float), stream)));
  if (x.numel() > 0) {
    AmaxParams p;
    p.x = x.data;
    const int64_t len = x.size(-1);
    const bool vec16 = is_vec_accessible(x);
    p.lead = collapse_lead(x, x.ndim - 1);
    p.flat = is_flat(p.lead, len);
    p.row_len = len;
    p.units_per_row = vec16 ? len / 16 : len;
    p.units = lead_count(x, x.ndim - 1) * p.units_per_row;
    p.amax_bits = reinterpret_cast<uint32_t*>(g_ptr);
    int device = 0, sms = 0;
    ATTNQAT_RETURN_IF_ERROR(cuda_status(op, "cudaGetDevice", cudaGetDevice(&device)));
    ATTNQAT_RETURN_IF_ERROR(cuda_status(
        op, "cudaDeviceGetAttribute",
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device)));
    const int64_t max_ctas = static_cast<int64_t>(sms > 0 ? sms : 1) * kAmaxCtasPerSm;
    const int64_t ctas = (p.units + kQuantThreads - 1) / kQuantThreads;
    const int grid = static_cast<int>(ctas < max_ctas ? ctas : max_ctas);
    ATTNQAT_RETURN_IF_ERROR(
        cuda_status(op, "launch of the amax kernel", launch_amax(x.dtype, vec16, p, grid, stream)));
  }
  return cuda_status(op, "launch of the global-scale kernel",
                     launch_global_scale_finalize(g_ptr, stream));
}

Status check_global_scale_pointer(const TensorView& g, const QuantizeOptions& opts) {
  if (opts.format != Format::kNVFP4) return Status::Ok();
  if (g.device != Device::kCUDA)
    return Status::Invalid(std::string(g.name) + ": expected a CUDA tensor, got a CPU tensor");
  return check_pointer_alignment(g, static_cast<int>(sizeof(float)));
}

const float* global_scale_ptr(const TensorView& g, const QuantizeOptions& opts) {
  return opts.format == Format::kNVFP4 ? static_cast<const float*>(g.data) : nullptr;
}

// How the kernels access one tensor of an entry point, and so the alignment it needs: along the
// last axis 16-byte vectors, along the token axis single elements (x / out) and 8-byte code stores.
enum class Access {
  kValues,      // x / out: an aligned pointer, and on the last axis rows 16 bytes apart
  kContiguous,  // out of dequantize: contiguous (validated), so an aligned pointer aligns its rows
  kCodes,       // packed codes: on the last axis 8 (NVFP4) or 16 (MXFP4) bytes per block
};

// The alignment check of one tensor for its access (the messages of check_pointer_alignment and
// check_last_axis_access).
Status check_access(const TensorView& t, Access access, const QuantizeOptions& opts) {
  const bool last = opts.axis == BlockAxis::kLast;
  switch (access) {
    case Access::kValues:
      return last ? check_last_axis_access(t) : check_pointer_alignment(t, dtype_size(t.dtype));
    case Access::kContiguous:
      return check_pointer_alignment(t, last ? kVecBytes : dtype_size(t.dtype));
    default:  // Access::kCodes; the token axis stores 8 bytes (16 codes of a block)
      return check_pointer_alignment(t, last && opts.format != Format::kNVFP4 ? 16 : 8);
  }
}

// A tensor of an entry point and how its kernel accesses it.
struct Operand {
  const TensorView& t;
  Access access;
};

// The packed side and g of a launch (quantize writes data / scales, dequantize reads them).
template <class Params>
void set_packed(Params& p, const TensorView& data, const TensorView& scales, const TensorView& g,
                const QuantizeOptions& opts) {
  p.data = static_cast<uint8_t*>(data.data);
  p.scales = static_cast<uint8_t*>(scales.data);
  p.g = global_scale_ptr(g, opts);
}

// The flow of every entry point around its launch: the checks of g, then of the alignment of a
// and b (a first; none for an empty a, which launches nothing); then, on a's device, g first when
// it is computed (`from_amax`: quantize / fake_quantize with compute_global_scale, NVFP4; also
// for an empty a, where it writes the reference's g = 1), then one kernel launch: launch_last or
// launch_token (by opts.axis) with the parameters of a's layout, returning its cudaError_t.
template <class LaunchLast, class LaunchToken>
Status run_entry_point(const char* op, Operand a, Operand b, const TensorView& g,
                       const QuantizeOptions& opts, bool from_amax, void* stream_ptr,
                       LaunchLast&& launch_last, LaunchToken&& launch_token) {
  const auto stream = static_cast<cudaStream_t>(stream_ptr);
  ATTNQAT_RETURN_IF_ERROR(check_global_scale_pointer(g, opts));
  const bool empty = a.t.numel() == 0;
  if (!empty) {
    ATTNQAT_RETURN_IF_ERROR(check_access(a.t, a.access, opts));
    ATTNQAT_RETURN_IF_ERROR(check_access(b.t, b.access, opts));
  }
  const bool compute_g = from_amax && opts.format == Format::kNVFP4 && opts.compute_global_scale;
  if (empty && !compute_g) return Status::Ok();

  DeviceGuard guard;
  ATTNQAT_RETURN_IF_ERROR(cuda_status(op, "cudaSetDevice", guard.set(a.t.device_id)));
  if (compute_g) ATTNQAT_RETURN_IF_ERROR(compute_global_scale(op, a.t, g, stream));
  if (empty) return Status::Ok();
  return cuda_status(op, "kernel launch",
                     opts.axis == BlockAxis::kLast
                         ? launch_last(last_axis_params(a.t, opts), stream)
                         : launch_token(token_axis_params(a.t), stream));
}

}  // namespace

Status quantize(const TensorView& x, const TensorView& data, const TensorView& scales,
                const TensorView& global_scale, const QuantizeOptions& opts, void* stream_ptr) {
  return run_entry_point(
      "quantize", {x, Access::kValues}, {data, Access::kCodes}, global_scale, opts, true,
      stream_ptr,
      [&](LastAxisParams p, cudaStream_t stream) {
        p.x = x.data;
        set_packed(p, data, scales, global_scale, opts);
        return launch_quantize_last(x.dtype, opts.format, p, stream);
      },
      [&](TokenAxisParams p, cudaStream_t stream) {
        p.x = x.data;
        set_packed(p, data, scales, global_scale, opts);
        return launch_quantize_token(x.dtype, p, stream);
      });
}

Status dequantize(const TensorView& data, const TensorView& scales, const TensorView& global_scale,
                  const TensorView& out, const QuantizeOptions& opts, void* stream_ptr) {
  return run_entry_point(
      "dequantize", {out, Access::kContiguous}, {data, Access::kCodes}, global_scale, opts, false,
      stream_ptr,
      [&](LastAxisParams p, cudaStream_t stream) {
        p.out = out.data;
        p.out_lead = p.x_lead;
        p.out_flat = true;  // out is contiguous (validated)
        set_packed(p, data, scales, global_scale, opts);
        return launch_dequantize_last(out.dtype, opts.format, p, stream);
      },
      [&](TokenAxisParams p, cudaStream_t stream) {
        p.out = out.data;
        p.out_lead = p.x_lead;
        p.out_token_stride = p.x_token_stride;
        set_packed(p, data, scales, global_scale, opts);
        return launch_dequantize_token(out.dtype, p, stream);
      });
}

Status fake_quantize(const TensorView& x, const TensorView& out, const TensorView& global_scale,
                     const QuantizeOptions& opts, void* stream_ptr) {
  return run_entry_point(
      "fake_quantize", {x, Access::kValues}, {out, Access::kValues}, global_scale, opts, true,
      stream_ptr,
      [&](LastAxisParams p, cudaStream_t stream) {
        p.x = x.data;
        p.out = out.data;
        p.out_lead = collapse_lead(out, out.ndim - 1);
        p.out_flat = is_flat(p.out_lead, out.size(-1));
        p.g = global_scale_ptr(global_scale, opts);
        return launch_fake_quantize_last(x.dtype, opts.format, p, stream);
      },
      [&](TokenAxisParams p, cudaStream_t stream) {
        p.x = x.data;
        p.out = out.data;
        p.out_lead = collapse_lead(out, out.ndim - 2);
        p.out_token_stride = out.stride_of(-2);
        p.g = global_scale_ptr(global_scale, opts);
        return launch_fake_quantize_token(x.dtype, p, stream);
      });
}

}  // namespace attnqat::cuda
