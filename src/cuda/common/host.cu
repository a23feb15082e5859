// Host-side helpers of the CUDA entry points: see host.h.
#include "cuda/common/host.h"

#include <cstdint>
#include <mutex>
#include <string>

#include "common/validate.h"
#include "cuda/api.h"

namespace attnqat::cuda {

// ---- Errors and devices --------------------------------------------------------------------

Status cuda_error(const char* op, const char* what, cudaError_t err) {
  return Status::Cuda(std::string(op) + ": " + what + " failed: " + cudaGetErrorName(err) + " (" +
                      cudaGetErrorString(err) + ")");
}

Status check_device(const char* op, int device, DeviceNeed need) {
  int major = 0, minor = 0;
  cudaError_t err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  if (err != cudaSuccess) return cuda_error(op, "querying the device", err);
  const bool sm90a = need == DeviceNeed::kSm90a;
  if (sm90a ? major == 9 && minor == 0 : major * 10 + minor >= 89) return Status::Ok();
  return Status::NotImplemented(
      std::string(op) +
      (sm90a ? ": the CUDA attention kernel is built for sm_90a (Hopper: H100, H200)"
             : ": the FP4 decode kernels need sm_89 or newer") +
      "; this device is sm_" + std::to_string(major) + std::to_string(minor) +
      "; run on CPU tensors (the reference) instead");
}

Status DeviceGuard::select(int device, const char* op, const char* which) {
  const cudaError_t err = set(device);
  if (err == cudaSuccess) return Status::Ok();
  return cuda_error(op, (std::string("selecting ") + which).c_str(), err);
}

// ---- Stream-ordered scratch memory ---------------------------------------------------------

namespace {

constexpr int kMaxDevices = 64;

// The pool of `device`, created on first use with an unlimited release threshold.
cudaError_t pool_of(int device, cudaMemPool_t* pool) {
  static std::mutex mutex;
  static cudaMemPool_t pools[kMaxDevices] = {};
  if (device < 0 || device >= kMaxDevices) return cudaErrorInvalidDevice;
  std::lock_guard<std::mutex> lock(mutex);
  if (pools[device] == nullptr) {
    cudaMemPoolProps props = {};
    props.allocType = cudaMemAllocationTypePinned;
    props.location.type = cudaMemLocationTypeDevice;
    props.location.id = device;
    cudaMemPool_t p;
    cudaError_t err = cudaMemPoolCreate(&p, &props);
    if (err != cudaSuccess) return err;
    uint64_t keep_all = ~0ull;
    err = cudaMemPoolSetAttribute(p, cudaMemPoolAttrReleaseThreshold, &keep_all);
    if (err != cudaSuccess) return err;
    pools[device] = p;
  }
  *pool = pools[device];
  return cudaSuccess;
}

// Workspace messages: "attnqat workspace: <what>: <cudaErrorName> (<description>)".
Status workspace_error(const char* what, cudaError_t err) {
  return Status::Cuda(std::string("attnqat workspace: ") + what + ": " + cudaGetErrorName(err) + " (" +
                      cudaGetErrorString(err) + ")");
}

}  // namespace

Workspace::~Workspace() {
  if (data_ != nullptr) cudaFreeAsync(data_, stream_);  // stream-ordered after the last use
}

Status Workspace::allocate(size_t bytes, cudaStream_t stream) {
  stream_ = stream;
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  cudaError_t err = cudaStreamIsCapturing(stream, &capture);
  if (err != cudaSuccess) return workspace_error("cudaStreamIsCapturing", err);
  if (capture != cudaStreamCaptureStatusNone) {
    err = cudaMallocAsync(&data_, bytes, stream);  // a graph memory node
  } else {
    int device = 0;
    cudaMemPool_t pool;
    if ((err = cudaGetDevice(&device)) != cudaSuccess) return workspace_error("cudaGetDevice", err);
    if ((err = pool_of(device, &pool)) != cudaSuccess)
      return workspace_error("creating the memory pool", err);
    err = cudaMallocFromPoolAsync(&data_, bytes, pool, stream);
  }
  if (err != cudaSuccess) {
    data_ = nullptr;
    return workspace_error("allocating scratch memory", err);
  }
  return Status::Ok();
}

TensorView device_view(void* data, DType dtype, std::initializer_list<int64_t> shape,
                       const char* name, int device_id) {
  TensorView v = make_view(data, dtype, shape, name, Device::kCUDA);
  v.device_id = device_id;
  return v;
}

TensorView contiguous_like(void* data, const TensorView& t, const char* name) {
  return device_view(data, t.dtype, {t.shape[0], t.shape[1], t.shape[2], t.shape[3]}, name,
                     t.device_id);
}

// ---- Fake-quantized copies of the attention inputs -----------------------------------------

namespace {

__global__ void fill_one_kernel(float* g) { *g = 1.0f; }

// validate_fake_quantize(), then the quantization kernels: what the public fake_quantize() does
// for CUDA tensors.
Status fake_quantize_checked(const TensorView& x, const TensorView& out, const TensorView& g,
                             const QuantizeOptions& opts, cudaStream_t stream) {
  ATTNQAT_RETURN_IF_ERROR(validate_fake_quantize(x, out, g, opts));
  return attnqat::cuda::fake_quantize(x, out, g, opts, stream);
}

}  // namespace

Status QuantizedInputs::make(const TensorView& q, const TensorView& k, const TensorView& v,
                             VBlocks v_blocks, cudaStream_t stream, const char* op) {
  const size_t esize = static_cast<size_t>(dtype_size(q.dtype));
  const size_t q_bytes = round_up(q.numel() * esize), k_bytes = round_up(k.numel() * esize);
  const size_t v_bytes = round_up(v.numel() * esize);
  ATTNQAT_RETURN_IF_ERROR(buffer_.allocate(q_bytes + k_bytes + v_bytes + kTempAlign, stream));
  uint8_t* base = static_cast<uint8_t*>(buffer_.data());
  q_ = contiguous_like(base, q, "q (fake-quantized copy)");
  k_ = contiguous_like(base + q_bytes, k, "k (fake-quantized copy)");
  v_ = contiguous_like(base + q_bytes + k_bytes, v, "v (fake-quantized copy)");
  float* g = reinterpret_cast<float*>(base + q_bytes + k_bytes + v_bytes);
  fill_one_kernel<<<1, 1, 0, stream>>>(g);
  if (const cudaError_t err = cudaGetLastError(); err != cudaSuccess)
    return cuda_error(op, "writing g = 1", err);
  const TensorView g_view = device_view(g, DType::kFloat32, {1}, "g", q.device_id);

  QuantizeOptions qo;  // NVFP4, blocks along the head dim, g read from g_view (= 1)
  ATTNQAT_RETURN_IF_ERROR(fake_quantize_checked(q, q_, g_view, qo, stream));
  ATTNQAT_RETURN_IF_ERROR(fake_quantize_checked(k, k_, g_view, qo, stream));
  qo.axis = v_blocks == VBlocks::kToken ? BlockAxis::kToken : BlockAxis::kLast;
  return fake_quantize_checked(v, v_, g_view, qo, stream);
}

}  // namespace attnqat::cuda
