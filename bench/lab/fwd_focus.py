"""Focused forward timing for kernel work: attnqat's bf16 / fp4 / attn_qat modes against cuDNN BF16
attention (torch SDPA), same process, same GPU, CUDA-graph replay (bench/common.py), on the shapes
the project's targets are read at (N >= 4k, B x N = 32k tokens, H x D = 2048). A subset of
bench_attention_fwd.py, quick enough to run two builds back to back in one GPU call and compare.

    python bench/lab/fwd_focus.py [--tag NAME] [--out DIR] [--reps 10] [--set quick|full]

Prints one row per (shape, impl) and a summary of the ratios to cuDNN; --out writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench/common.py
import common  # noqa: E402
from bench_attention_fwd import attnqat_mode  # noqa: E402

import attnqat  # noqa: E402

SETS = {
    # (d, N, causal)
    "quick": [(128, 4096, False), (128, 4096, True), (128, 8192, False), (128, 8192, True),
              (128, 16384, False), (64, 4096, False), (64, 8192, False), (64, 8192, True)],
    "full": [(d, n, c) for d in (128, 64) for n in (4096, 8192, 16384, 32768) for c in (False, True)],
}


def cudnn(q, k, v, causal):
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tag", default="run")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--set", default="quick", choices=sorted(SETS))
    args = p.parse_args()
    torch.manual_seed(0)
    impls = {"cudnn": cudnn, "bf16": attnqat_mode("bf16"), "fp4": attnqat_mode("fp4"),
             "attn_qat": attnqat_mode("attn_qat")}
    rows = []
    for d, n, causal in SETS[args.set]:
        h, b = 2048 // d, 32768 // n
        q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        flops = common.attention_flops(b, h, n, n, d, causal)
        base = None
        for name, fn in impls.items():
            qq, kk, vv = (t.requires_grad_(name == "attn_qat") for t in (q, k, v))
            t = common.time_cuda_graph(lambda i: fn(qq, kk, vv, causal), calls=5, reps=args.reps)
            ms = t["median_ms"]
            base = ms if name == "cudnn" else base
            row = {"tag": args.tag, "impl": name, "d": d, "n": n, "b": b, "h": h, "causal": causal,
                   "ms": ms, "min_ms": t["min_ms"], "max_ms": t["max_ms"],
                   "tflops": flops / (ms * 1e-3) / 1e12, "vs_cudnn": base / ms}
            rows.append(row)
            print(f"{args.tag:<6} {name:<9} d={d:<4} N={n:<6} causal={str(causal):<5} {ms:8.3f} ms "
                  f"[{t['min_ms']:.3f}, {t['max_ms']:.3f}] {row['tflops']:6.0f} TFLOPS  x cuDNN {row['vs_cudnn']:.3f}",
                  flush=True)
        del q, k, v
        torch.cuda.empty_cache()
    summary = {}
    for impl in ("bf16", "fp4", "attn_qat"):
        for d in (128, 64):
            vals = [r["vs_cudnn"] for r in rows if r["impl"] == impl and r["d"] == d]
            if vals:
                summary[f"{impl}_d{d}"] = {"median": statistics.median(vals), "min": min(vals), "n": len(vals)}
    print(f"summary {args.tag}: " + "  ".join(f"{k} {v['median']:.3f} (min {v['min']:.3f})" for k, v in summary.items()))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"focus_{args.tag}.json").write_text(json.dumps(
            {"gpu": torch.cuda.get_device_name(), "rows": rows, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
