#include <sstream>

#include "attnqat/attnqat.h"

namespace attnqat {

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return "float32";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
    case DType::kFloat64: return "float64";
    case DType::kUInt8: return "uint8";
  }
  return "unknown";
}

int dtype_size(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return 4;
    case DType::kFloat16:
    case DType::kBFloat16: return 2;
    case DType::kFloat64: return 8;
    case DType::kUInt8: return 1;
  }
  return 0;
}

const char* mode_name(Mode m) {
  switch (m) {
    case Mode::kBF16: return "bf16";
    case Mode::kFP4: return "fp4";
    case Mode::kDropInQAT: return "drop_in_qat";
    case Mode::kAttnQAT: return "attn_qat";
  }
  return "unknown";
}

BackwardSwitches default_switches(Mode m) {
  const bool on = (m == Mode::kAttnQAT);
  return BackwardSwitches{on, on, on};
}

bool TensorView::is_contiguous() const {
  if (numel() == 0) return true;  // nothing to address
  int64_t expected = 1;
  for (int i = ndim - 1; i >= 0; --i) {
    if (shape[i] != 1 && stride[i] != expected) return false;
    expected *= shape[i];
  }
  return true;
}

std::string TensorView::shape_str() const {
  std::ostringstream os;
  os << "[";
  for (int i = 0; i < ndim; ++i) os << (i ? ", " : "") << shape[i];
  os << "]";
  return os.str();
}

TensorView make_view(void* data, DType dtype, std::initializer_list<int64_t> shape,
                     const char* name, Device device) {
  TensorView t;
  t.data = data;
  t.dtype = dtype;
  t.device = device;
  t.name = name;
  t.ndim = static_cast<int>(shape.size());
  int i = 0;
  for (int64_t s : shape) t.shape[i++] = s;
  int64_t stride = 1;
  for (int d = t.ndim - 1; d >= 0; --d) {
    t.stride[d] = stride;
    stride *= t.shape[d];
  }
  return t;
}

}  // namespace attnqat
