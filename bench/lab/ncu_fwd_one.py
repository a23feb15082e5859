"""One attnqat forward call of a given mode and shape, after a warm-up call: the target for
Nsight Compute (profile the second launch of fwd_kernel), e.g.

    ncu --clock-control none -k regex:fwd_kernel --launch-skip 1 --launch-count 1 \
        --section SpeedOfLight --section ComputeWorkloadAnalysis \
        python bench/lab/ncu_fwd_one.py --mode fp4 --d 128 --n 4096 --b 2
"""

import argparse

import torch

import attnqat


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--mode", default="fp4")
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--b", type=int, default=2)
    p.add_argument("--causal", action="store_true")
    a = p.parse_args()
    h = 2048 // a.d
    q, k, v = (torch.randn(a.b, h, a.n, a.d, device="cuda", dtype=torch.bfloat16,
                           requires_grad=a.mode == "attn_qat") for _ in range(3))
    for _ in range(2):
        if a.mode == "attn_qat":
            attnqat.attention(q, k, v, causal=a.causal, mode=a.mode)
        else:
            with torch.no_grad():
                attnqat.attention(q, k, v, causal=a.causal, mode=a.mode)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
