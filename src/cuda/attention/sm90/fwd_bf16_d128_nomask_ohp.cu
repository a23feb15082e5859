// The sm90 forward kernel for bf16, head dim 128, mask nomask, with O' (attn_qat): one explicit instantiation per file, so that
// the 24 instantiations compile in parallel (the list: fwd_launch.h).
#include "cuda/attention/sm90/fwd_launch.cuh"

namespace attnqat::sm90 {
template Status launch_fwd<FwdConfig<false, 128, true>, NoMask>(const FwdArgs&);
}  // namespace attnqat::sm90
