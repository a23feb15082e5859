// Scratch memory: see workspace.h.
#include "cuda/common/workspace.h"

#include <mutex>
#include <string>

namespace attnqat::cuda {
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

Status error(const char* what, cudaError_t err) {
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
  if (err != cudaSuccess) return error("cudaStreamIsCapturing", err);
  if (capture != cudaStreamCaptureStatusNone) {
    err = cudaMallocAsync(&data_, bytes, stream);  // a graph memory node
  } else {
    int device = 0;
    cudaMemPool_t pool;
    if ((err = cudaGetDevice(&device)) != cudaSuccess) return error("cudaGetDevice", err);
    if ((err = pool_of(device, &pool)) != cudaSuccess) return error("creating the memory pool", err);
    err = cudaMallocFromPoolAsync(&data_, bytes, pool, stream);
  }
  if (err != cudaSuccess) {
    data_ = nullptr;
    return error("allocating scratch memory", err);
  }
  return Status::Ok();
}

}  // namespace attnqat::cuda
