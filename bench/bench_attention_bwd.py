"""Attention backward: attnqat's modes against cuDNN BF16 attention backward, same process, same GPU.

Shapes (as the forward benchmark): head dims 128 and 64, N in {1k, 2k, 4k, 8k, 16k, 32k}
with B*N = 32k tokens and H*D = 2048, causal and not. FLOPs = 2.5 x 4*B*H*N*N*D (halved for
causal) for every implementation, whatever its kernels execute (FlashAttention's convention:
attn_qat's backward does the same 5 GEMMs; drop_in_qat adds a statistics pass, counted as 0).

Method: the forward runs once, outside the timed region, with inputs that require grad; what is
timed is `torch.autograd.grad(o, (q, k, v), do, retain_graph=True)` — the backward kernels only
(for attnqat: the preprocess, the main kernel, the dQ postprocess, and for drop_in_qat the
statistics pass; for SDPA: cuDNN's or flash's backward) — as CUDA-graph replays
(common.time_cuda_graph) for every implementation alike. Autograd runs each backward op on the
stream of its forward op, so the forward runs on the stream that torch.cuda.graph captures on
(torch.cuda.graph.default_capture_stream); the eager median (CUDA events) is recorded too.

Implementations: cudnn and flash (torch SDPA, BF16 baselines), attnqat `bf16`, `attn_qat`
(paper and anchored P_F), `attn_qat` deterministic, `drop_in_qat`.

    python bench/bench_attention_bwd.py [--out DIR] [--quick] [--dims 128 64]
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

TARGETS = {"bwd_attn_qat_vs_cudnn_d128": 0.5, "bwd_bf16_vs_cudnn_d128": 0.8, "bwd_attn_qat_vs_cudnn_d64": None}


def sdpa(backend):
    def fwd(q, k, v, causal):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return fwd


def attnqat_mode(mode, **kw):
    def fwd(q, k, v, causal):
        return attnqat.attention(q, k, v, causal=causal, mode=mode, **kw)
    return fwd


def capture_stream() -> torch.cuda.Stream:
    """The stream torch.cuda.graph captures on when given none (created by its first use)."""
    torch.cuda.graph(torch.cuda.CUDAGraph())
    return torch.cuda.graph.default_capture_stream


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--dims", type=int, nargs="+", default=[128, 64])
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    banner = common.device_banner()
    common.print_banner(banner)
    seqs = [1024, 2048, 4096, 8192, 16384, 32768] if not args.quick else [4096, 8192]
    impls = {
        "cudnn": sdpa(SDPBackend.CUDNN_ATTENTION),
        "flash": sdpa(SDPBackend.FLASH_ATTENTION),
        "bf16": attnqat_mode("bf16"),
        "attn_qat": attnqat_mode("attn_qat"),
        "attn_qat_anchored": attnqat_mode("attn_qat", p_quant="anchored"),
        "attn_qat_det": attnqat_mode("attn_qat", deterministic=True),
        "drop_in_qat": attnqat_mode("drop_in_qat"),
    }
    stream = capture_stream()
    rows = []
    for d in args.dims:
        h = 2048 // d
        for n in seqs:
            b = 32768 // n
            for causal in (False, True):
                q, k, v, do = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
                q, k, v = (t.requires_grad_(True) for t in (q, k, v))
                flops = common.attention_flops(b, h, n, n, d, causal, backward=True)
                times = {}
                for name, fwd in impls.items():
                    try:
                        stream.wait_stream(torch.cuda.current_stream())
                        with torch.cuda.stream(stream):
                            o = fwd(q, k, v, causal)
                        torch.cuda.current_stream().wait_stream(stream)

                        def bwd(i, o=o):
                            return torch.autograd.grad(o, (q, k, v), do, retain_graph=True)

                        t = common.time_cuda_graph(bwd, calls=3, warmup=1, reps=args.reps)
                        t["eager_median_ms"] = common.time_cuda(bwd, warmup=1, reps=3)["median_ms"]
                        del o
                    except (RuntimeError, NotImplementedError) as e:
                        print(f"{name} d={d} n={n} causal={causal}: {type(e).__name__}: {str(e)[:160]}")
                        continue
                    times[name] = t
                base = times.get("cudnn")
                for name, t in times.items():
                    tflops = flops / (t["median_ms"] * 1e-3) / 1e12
                    rows.append({"impl": name, "d": d, "n": n, "b": b, "h": h, "causal": causal, **t,
                                 "tflops": tflops,
                                 "vs_cudnn": (base["median_ms"] / t["median_ms"]) if base else None})
                del q, k, v, do
                torch.cuda.empty_cache()
    path = common.write_results("attention_bwd", banner, rows, args.out)
    print(f"\n{'impl':<18} {'d':>4} {'N':>6} {'causal':>6} {'ms':>8} {'eager':>8} {'TFLOPS':>7} {'x cuDNN':>8}")
    for r in rows:
        vs = f"{r['vs_cudnn']:8.3f}" if r["vs_cudnn"] else "       -"
        print(f"{r['impl']:<18} {r['d']:>4} {r['n']:>6} {str(r['causal']):>6} {r['median_ms']:8.3f} "
              f"{r['eager_median_ms']:8.3f} {r['tflops']:7.0f} {vs}")
    day = str(banner["date"])[:10]
    metrics = {}
    for impl, d, metric in (("attn_qat", 128, "bwd_attn_qat_vs_cudnn_d128"), ("bf16", 128, "bwd_bf16_vs_cudnn_d128"),
                            ("attn_qat", 64, "bwd_attn_qat_vs_cudnn_d64")):
        vals = [r["vs_cudnn"] for r in rows if r["impl"] == impl and r["d"] == d and r["n"] >= 4096 and r["vs_cudnn"]]
        if vals:
            metrics[metric] = {"value": round(statistics.median(vals), 4), "target": TARGETS[metric],
                               "gpu": banner["gpu"], "date": day, "source": f"bench/results/{path.name}",
                               "min": round(min(vals), 4), "aggregate": "median over N >= 4k, causal and not"}
    common.update_headline(metrics, args.out)
    print(f"\nwrote {path}")
    for k, v in metrics.items():
        print(f"{k}: {v['value']:.3f} (min {v['min']:.3f}; target >= {v['target']})")


if __name__ == "__main__":
    main()
