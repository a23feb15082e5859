// attnqat/tensor.h — the types that cross the public C++ API: a non-owning strided tensor view,
// a Status for errors, and the dtype/device enums. Host-only: no torch, no CUDA headers.
//
// Tensors are described, never owned: the caller (the nanobind module, a test, a benchmark)
// allocates every input and output and passes views. Strides are in elements, as in DLPack.
#pragma once

#include <cstdint>
#include <string>
#include <utility>

namespace attnqat {

enum class DType : uint8_t { kFloat32, kFloat16, kBFloat16, kFloat64, kUInt8 };
enum class Device : uint8_t { kCPU, kCUDA };

const char* dtype_name(DType dtype);
int dtype_size(DType dtype);

constexpr int kMaxDims = 6;

// A non-owning view of a strided tensor. `name` is used in error messages ("q", "k", ...).
struct TensorView {
  void* data = nullptr;
  DType dtype = DType::kFloat32;
  Device device = Device::kCPU;
  int device_id = 0;
  int ndim = 0;
  int64_t shape[kMaxDims] = {};
  int64_t stride[kMaxDims] = {};  // in elements
  const char* name = "tensor";

  int64_t numel() const {
    int64_t n = 1;
    for (int i = 0; i < ndim; ++i) n *= shape[i];
    return n;
  }
  // Python-style index: size(-1) is the last dimension.
  int64_t size(int i) const { return shape[i < 0 ? ndim + i : i]; }
  int64_t stride_of(int i) const { return stride[i < 0 ? ndim + i : i]; }
  bool defined() const { return data != nullptr || numel() == 0; }
  bool is_contiguous() const;
  std::string shape_str() const;  // "[2, 8, 128, 64]"
};

// Builds a contiguous view (strides computed from the shape), for tests and internal buffers.
TensorView make_view(void* data, DType dtype, std::initializer_list<int64_t> shape,
                     const char* name = "tensor", Device device = Device::kCPU);

enum class StatusCode : uint8_t { kOk, kInvalidArgument, kNotImplemented, kCudaError };

// The result of every public entry point. Library code never throws across the API, never
// aborts, never prints: errors come back here with a message that names the argument, what was
// expected and what came.
class Status {
 public:
  Status() = default;
  static Status Ok() { return Status(); }
  static Status Invalid(std::string msg) { return Status(StatusCode::kInvalidArgument, std::move(msg)); }
  static Status NotImplemented(std::string msg) { return Status(StatusCode::kNotImplemented, std::move(msg)); }
  static Status Cuda(std::string msg) { return Status(StatusCode::kCudaError, std::move(msg)); }

  bool ok() const { return code_ == StatusCode::kOk; }
  StatusCode code() const { return code_; }
  const std::string& message() const { return message_; }

 private:
  Status(StatusCode code, std::string msg) : code_(code), message_(std::move(msg)) {}
  StatusCode code_ = StatusCode::kOk;
  std::string message_;
};

#define ATTNQAT_RETURN_IF_ERROR(expr)        \
  do {                                       \
    ::attnqat::Status _st = (expr);          \
    if (!_st.ok()) return _st;               \
  } while (0)

}  // namespace attnqat
