// The sm90 forward kernel for fp16, head dim 128, mask causal, without O': one explicit instantiation per file, so that
// the 24 instantiations compile in parallel (the list: fwd_launch.h).
#include "cuda/attention/sm90/fwd_launch.cuh"

namespace attnqat::sm90 {
template Status launch_fwd<FwdConfig<true, 128, false>, CausalMask>(const FwdArgs&);
}  // namespace attnqat::sm90
