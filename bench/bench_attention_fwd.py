"""Attention forward: attnqat's modes against cuDNN BF16 attention, same process, same GPU.

Shapes (the project's benchmark grid): head dims 128 and 64, N in {1k, 2k, 4k, 8k, 16k, 32k} with B*N = 32k tokens and
H*D = 2048, causal and not. FLOPs = 4*B*H*N*N*D (halved for causal) for every mode, whatever the
kernel executes (attn_qat's O' adds 50% matrix work that this convention does not count).

Modes timed: cuDNN and flash BF16 through torch SDPA (baselines), attnqat `bf16`, `fp4`
(inference forward under no_grad) and `attn_qat` (the training forward with O': inputs require
grad). The attnqat times include the quantization of Q, K, V (separate memory-bound passes).
Times are CUDA-graph replays (no host overhead, for every implementation alike); the eager
median is recorded too.

    python bench/bench_attention_fwd.py [--out DIR] [--quick] [--dims 128 64]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import attnqat  # noqa: E402

TARGETS = {"fp4": 0.65, "attn_qat": 0.45, "bf16": 0.85}  # the project's targets (docs/results.md), at head dim 128


def sdpa(backend):
    def run(q, k, v, causal):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return run


def attnqat_mode(mode):
    def run(q, k, v, causal):
        if mode == "attn_qat":
            with torch.enable_grad():
                return attnqat.attention(q, k, v, causal=causal, mode=mode)
        with torch.no_grad():
            return attnqat.attention(q, k, v, causal=causal, mode=mode)
    return run


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--dims", type=int, nargs="+", default=[128, 64])
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args()
    banner = common.device_banner()
    common.print_banner(banner)
    seqs = [1024, 2048, 4096, 8192, 16384, 32768] if not args.quick else [4096]
    impls = {
        "cudnn": sdpa(SDPBackend.CUDNN_ATTENTION),
        "flash": sdpa(SDPBackend.FLASH_ATTENTION),
        "bf16": attnqat_mode("bf16"),
        "fp4": attnqat_mode("fp4"),
        "attn_qat": attnqat_mode("attn_qat"),
    }
    rows = []
    for d in args.dims:
        h = 2048 // d
        for n in seqs:
            b = 32768 // n
            for causal in (False, True):
                q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
                flops = common.attention_flops(b, h, n, n, d, causal)
                times = {}
                for name, fn in impls.items():
                    qq, kk, vv = (t.requires_grad_(name == "attn_qat") for t in (q, k, v))
                    try:
                        # Graph replay: kernel time including attnqat's Q/K/V quantization passes,
                        # without host overhead (the same for every implementation); eager too.
                        t = common.time_cuda_graph(lambda i: fn(qq, kk, vv, causal), calls=5, reps=args.reps)
                        t["eager_median_ms"] = common.time_cuda(lambda i: fn(qq, kk, vv, causal), reps=10)["median_ms"]
                    except (RuntimeError, NotImplementedError) as e:
                        print(f"{name} d={d} n={n} causal={causal}: {type(e).__name__}: {str(e)[:120]}")
                        continue
                    times[name] = t
                base = times.get("cudnn")
                for name, t in times.items():
                    tflops = flops / (t["median_ms"] * 1e-3) / 1e12
                    rows.append({"impl": name, "d": d, "n": n, "b": b, "h": h, "causal": causal, **t,
                                 "tflops": tflops,
                                 "vs_cudnn": (base["median_ms"] / t["median_ms"]) if base else None})
                del q, k, v
                torch.cuda.empty_cache()
    path = common.write_results("attention_fwd", banner, rows, args.out)
    print(f"\n{'impl':<9} {'d':>4} {'N':>6} {'causal':>6} {'ms':>8} {'eager':>8} {'TFLOPS':>7} {'x cuDNN':>8}")
    for r in rows:
        vs = f"{r['vs_cudnn']:8.3f}" if r["vs_cudnn"] else "       -"
        print(f"{r['impl']:<9} {r['d']:>4} {r['n']:>6} {str(r['causal']):>6} {r['median_ms']:8.3f} "
              f"{r['eager_median_ms']:8.3f} {r['tflops']:7.0f} {vs}")
    day = str(banner["date"])[:10]
    metrics = {}
    for impl, d, metric in (("fp4", 128, "fwd_fp4_vs_cudnn_d128"), ("attn_qat", 128, "fwd_attn_qat_vs_cudnn_d128"),
                            ("bf16", 128, "fwd_bf16_vs_cudnn_d128"), ("fp4", 64, "fwd_fp4_vs_cudnn_d64")):
        vals = [r["vs_cudnn"] for r in rows if r["impl"] == impl and r["d"] == d and r["n"] >= 4096 and r["vs_cudnn"]]
        if vals:
            metrics[metric] = {"value": round(statistics.median(vals), 4), "target": TARGETS[impl] if d == 128 else None,
                               "gpu": banner["gpu"],
                               "date": day, "source": f"bench/results/{path.name}", "min": round(min(vals), 4),
                               "aggregate": "median over N >= 4k, causal and not"}
    common.update_headline(metrics, args.out)
    print(f"\nwrote {path}")
    for k, v in metrics.items():
        print(f"{k}: {v['value']:.3f} (min {v['min']:.3f}; target {v['target']})")


if __name__ == "__main__":
    main()
