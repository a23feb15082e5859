// The sm90 backward kernel for fp16, head dim 128, mask nomask: one explicit instantiation per
// file, so that the 8 variants compile in parallel (bwd_launch.h).
#include "cuda/attention/sm90/bwd_launch.cuh"

namespace attnqat::sm90 {
template Status launch_bwd<BwdConfig<true, 128>, NoMask>(const BwdArgs&);
}  // namespace attnqat::sm90
