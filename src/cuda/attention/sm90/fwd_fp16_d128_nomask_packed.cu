// The sm90 forward kernel for packed NVFP4 inputs decoded to fp16, head dim 128, mask none: one explicit
// instantiation per file, so that the variants compile in parallel (fwd_launch.h).
#include "cuda/attention/sm90/fwd_launch.cuh"

namespace attnqat::sm90 {
template Status launch_fwd<FwdConfig<true, 128, false, true>, NoMask>(const FwdArgs&);
}  // namespace attnqat::sm90
