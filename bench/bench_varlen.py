"""Packed sequences (varlen) against one long sequence of equal work, same process, same GPU.

A realistic packed batch: sequence lengths drawn log-uniformly from 128 .. 8192 (seeded) until
they total 64k tokens, H = 16, D = 128, bf16, causal and not. The comparison is the same kernel
on one sequence of N tokens with N^2 = sum of the lengths^2 (equal attention work), so the ratio
says what packing costs (tiles cut at sequence ends, the grid's idle CTAs past short sequences).
Both run forward + backward (`attn_qat`, a training step's attention) and the `fp4` forward,
timed as CUDA-graph replays (common.time_cuda_graph), medians. Throughput = work / time; the
headline `varlen_vs_dense_attn_qat` is varlen's throughput over the long sequence's (target 0.9).
If flash-attn is installed, `flash_attn_varlen_func` (BF16) is timed on the same batch.

    python bench/bench_varlen.py [--out DIR] [--quick]
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import attnqat  # noqa: E402

TARGET = 0.9


def packed_lengths(total: int, lo: int, hi: int, seed: int) -> list:
    rng = random.Random(seed)
    lens = []
    while sum(lens) < total:
        lens.append(min(int(math.exp(rng.uniform(math.log(lo), math.log(hi)))), total - sum(lens)))
    return lens


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--reps", type=int, default=7)
    args = p.parse_args()
    banner = common.device_banner()
    common.print_banner(banner)
    h, d = 16, 128
    total = 32768 if args.quick else 65536
    lens = packed_lengths(total, 128, 8192, seed=0)
    n_eq = int(round(math.sqrt(sum(n * n for n in lens)) / 128)) * 128
    print(f"{len(lens)} sequences, {total} tokens; the long sequence: {n_eq} tokens (equal work)")
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=torch.int32, device="cuda")
    try:
        from flash_attn import flash_attn_varlen_func  # type: ignore
    except ImportError:
        flash_attn_varlen_func = None

    def packed(t):
        return torch.randn(t, h, d, device="cuda", dtype=torch.bfloat16)

    rows = []
    for causal in (False, True):
        work = sum(n * n for n in lens) / (2 if causal else 1)
        work_eq = n_eq * n_eq / (2 if causal else 1)
        qv, kv, vv, dov = (packed(total) for _ in range(4))
        qd, kd, vd, dod = (torch.randn(1, h, n_eq, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
        impls = {
            "varlen attn_qat fwd+bwd": (work, lambda: attnqat.attention_varlen(
                qv, kv, vv, cu, cu, max(lens), max(lens), causal=causal, mode="attn_qat"), (qv, kv, vv), dov),
            "dense attn_qat fwd+bwd": (work_eq, lambda: attnqat.attention(
                qd, kd, vd, causal=causal, mode="attn_qat"), (qd, kd, vd), dod),
            "varlen fp4 fwd": (work, lambda: attnqat.attention_varlen(
                qv, kv, vv, cu, cu, max(lens), max(lens), causal=causal, mode="fp4"), None, None),
            "dense fp4 fwd": (work_eq, lambda: attnqat.attention(qd, kd, vd, causal=causal, mode="fp4"), None, None),
        }
        if flash_attn_varlen_func is not None:
            impls["flash_attn_varlen bf16 fwd+bwd"] = (work, lambda: flash_attn_varlen_func(
                qv, kv, vv, cu, cu, max(lens), max(lens), causal=causal), (qv, kv, vv), dov)
        times = {}
        for name, (w, fwd, inputs, grad_out) in impls.items():
            try:
                if inputs is not None:
                    for t in inputs:
                        t.requires_grad_(True)

                    def step(i, fwd=fwd, inputs=inputs, grad_out=grad_out):
                        return torch.autograd.grad(fwd(), inputs, grad_out)
                else:
                    def step(i, fwd=fwd):
                        with torch.no_grad():
                            return fwd()
                t = common.time_cuda_graph(step, calls=2, warmup=1, reps=args.reps)
                t["eager_median_ms"] = common.time_cuda(step, warmup=1, reps=3)["median_ms"]
            except (RuntimeError, NotImplementedError, ValueError) as e:
                print(f"{name} causal={causal}: {type(e).__name__}: {str(e)[:200]}")
                continue
            t["work_per_ms"] = w / t["median_ms"]
            times[name] = t
            rows.append({"impl": name, "causal": causal, "h": h, "d": d, "tokens": total,
                         "num_seqs": len(lens), "n_equal_work": n_eq, **t})
        for kind in ("attn_qat fwd+bwd", "fp4 fwd"):
            v, dn = times.get(f"varlen {kind}"), times.get(f"dense {kind}")
            if v and dn:
                rows.append({"impl": f"ratio {kind}", "causal": causal,
                             "varlen_vs_dense": v["work_per_ms"] / dn["work_per_ms"]})
        del qv, kv, vv, dov, qd, kd, vd, dod
        torch.cuda.empty_cache()
    path = common.write_results("varlen", banner, rows, args.out)
    print(f"\n{'impl':<32} {'causal':>6} {'ms':>9} {'eager ms':>9} {'varlen/dense':>12}")
    for r in rows:
        if "median_ms" in r:
            print(f"{r['impl']:<32} {str(r['causal']):>6} {r['median_ms']:9.3f} {r['eager_median_ms']:9.3f}")
        else:
            print(f"{r['impl']:<32} {str(r['causal']):>6} {'':>9} {'':>9} {r['varlen_vs_dense']:12.3f}")
    vals = [r["varlen_vs_dense"] for r in rows if r["impl"] == "ratio attn_qat fwd+bwd"]
    if vals:
        day = str(banner["date"])[:10]
        common.update_headline({"varlen_vs_dense_attn_qat": {
            "value": round(statistics.median(vals), 4), "target": TARGET, "gpu": banner["gpu"], "date": day,
            "source": f"bench/results/{path.name}", "min": round(min(vals), 4),
            "aggregate": "median over causal and not; attn_qat fwd+bwd throughput, varlen over equal-work dense"}},
            args.out)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
