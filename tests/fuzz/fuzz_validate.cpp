// Fuzz target: validate() on arbitrary shapes, strides, dtypes, devices and options. It must
// return a Status (never crash, hang or read memory). Data pointers are non-null dummies that are
// never dereferenced because only the validate_* functions are called.
#include <cstdint>
#include <cstring>

#include "common/validate.h"

using namespace attnqat;

namespace {

struct Reader {
  const uint8_t* p;
  size_t n;
  uint8_t byte() {
    if (n == 0) return 0;
    --n;
    return *p++;
  }
  int64_t small() { return static_cast<int64_t>(byte() % 70) - 3; }  // includes negatives and 0
};

TensorView random_view(Reader& r, const char* name) {
  static char dummy[16];
  TensorView t;
  t.name = name;
  t.data = (r.byte() % 8) ? dummy : nullptr;
  t.dtype = static_cast<DType>(r.byte() % 5);
  t.device = (r.byte() % 4) ? Device::kCPU : Device::kCUDA;
  t.ndim = r.byte() % (kMaxDims + 1);
  for (int i = 0; i < t.ndim; ++i) {
    t.shape[i] = r.small() < 0 ? 0 : r.small() * (r.byte() % 2 ? 16 : 1);
    t.stride[i] = r.small();
  }
  return t;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  Reader r{data, size};
  TensorView a = random_view(r, "q"), b = random_view(r, "k"), c = random_view(r, "v");
  TensorView d = random_view(r, "o"), e = random_view(r, "lse");
  AttentionOptions o;
  o.mode = static_cast<Mode>(r.byte() % 4);
  o.p_quant = static_cast<PQuant>(r.byte() % 2);
  o.v_blocks = static_cast<VBlocks>(r.byte() % 2);
  o.causal = r.byte() % 2;
  o.kv_tile = static_cast<int>(r.small()) * 16;
  o.softmax_scale = static_cast<float>(r.small()) / 7.0f;
  ForwardOutputs out;
  out.o = d;
  out.lse = e;
  (void)validate_attention_forward(a, b, c, o, out);
  ForwardState s;
  s.o = d;
  s.lse = e;
  BackwardOutputs g;
  (void)validate_attention_backward(a, a, b, c, s, o, g);
  QuantizeOptions qo;
  qo.format = static_cast<Format>(r.byte() % 2);
  qo.axis = static_cast<BlockAxis>(r.byte() % 2);
  qo.compute_global_scale = r.byte() % 2;
  (void)validate_quantize(a, b, c, d, qo);
  (void)validate_dequantize(a, b, c, d, qo);
  (void)validate_fake_quantize(a, b, c, qo);
  return 0;
}
