"""Quantization kernels against the device-to-device copy, in the same process on the same GPU.

For each tensor (256 MiB and more of bf16/fp32) it times (CUDA graphs of 10 calls, so that host
launch overhead is not counted; bench/common.py): a copy (torch's copy_, bytes read +
written = 2x the tensor), quantize_nvfp4 (reads x, writes packed codes + scales), fake_quantize
(reads x, writes x's dtype) and dequantize, and reports each one's effective bandwidth
(bytes read + written / time) as a fraction of the copy's. Targets (docs/results.md): quantize and
fake-quantize >= 0.8 of copy bandwidth.

    python bench/bench_quantize.py [--out DIR] [--quick]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import attnqat  # noqa: E402

TARGET = 0.8


def bench_shape(shape, dtype, sets_hint=None):
    numel = 1
    for s in shape:
        numel *= s
    esize = torch.empty((), dtype=dtype).element_size()
    nbytes = numel * esize
    sets = sets_hint or common.rotation_count(nbytes)
    xs = [torch.randn(shape, device="cuda", dtype=torch.float32).to(dtype) for _ in range(sets)]
    dst = torch.empty_like(xs[0])
    packed = attnqat.quantize_nvfp4(xs[0])
    out_bytes_q = common.nvfp4_packed_bytes(numel)
    # Kernel time: calls captured in CUDA graphs (copy included), so the ~50 us of Python and
    # launch overhead per call does not count against a kernel that runs ~100-300 us.
    res = {}
    res["copy"] = common.time_cuda_graph(lambda i: dst.copy_(xs[i]), sets)
    res["quantize"] = common.time_cuda_graph(lambda i: attnqat.quantize_nvfp4(xs[i]), sets)
    res["quantize_amax"] = common.time_cuda_graph(lambda i: attnqat.quantize_nvfp4(xs[i], global_scale="amax"), sets)
    res["fake_quantize"] = common.time_cuda_graph(lambda i: attnqat.fake_quantize(xs[i]), sets)
    res["dequantize"] = common.time_cuda_graph(lambda i: packed.dequantize(), 1)
    moved = {
        "copy": 2 * nbytes,
        "quantize": nbytes + out_bytes_q,
        "quantize_amax": 2 * nbytes + out_bytes_q,  # the amax pass reads x once more
        "fake_quantize": 2 * nbytes,
        "dequantize": out_bytes_q + nbytes,
    }
    rows = []
    copy_bw = moved["copy"] / (res["copy"]["median_ms"] * 1e-3)
    for op, t in res.items():
        bw = moved[op] / (t["median_ms"] * 1e-3)
        rows.append({"op": op, "shape": list(shape), "dtype": str(dtype).replace("torch.", ""),
                     "bytes": moved[op], "sets": sets, **t, "gbps": bw / 1e9,
                     "fraction_of_copy": bw / copy_bw})  # against the copy of the same shape
    del xs
    torch.cuda.empty_cache()
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, default=None, help="results directory (default bench/results)")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    banner = common.device_banner()
    common.print_banner(banner)
    shapes = [((16384, 8192), torch.bfloat16), ((32768, 8192), torch.bfloat16), ((16384, 8192), torch.float32),
              ((4, 32, 8192, 128), torch.bfloat16)]
    if args.quick:
        shapes = shapes[:1]
    rows = []
    for shape, dtype in shapes:
        rows += bench_shape(shape, dtype)
    # The reference bandwidth is the best copy of the run: torch's copy of tensors of 1 GiB and more
    # runs slower (about 2.7 against 4.2 TB/s on an H200), which would flatter the ratios of those
    # shapes against their own copy.
    best_copy = max(r["gbps"] for r in rows if r["op"] == "copy")
    for r in rows:
        r["fraction_of_best_copy"] = r["gbps"] / best_copy
    path = common.write_results("quantize", banner, rows, args.out)
    print(f"\n{'op':<14} {'shape':<22} {'dtype':<9} {'MiB':>7} {'ms':>8} {'GB/s':>7} {'x copy':>7} {'x best':>7}")
    for r in rows:
        print(f"{r['op']:<14} {str(r['shape']):<22} {r['dtype']:<9} {r['bytes'] / 2**20:7.0f} {r['median_ms']:8.3f} "
              f"{r['gbps']:7.0f} {r['fraction_of_copy']:7.3f} {r['fraction_of_best_copy']:7.3f}")
    # Headline: the worst case over the >= 256 MiB inputs.
    big = [r for r in rows if r["bytes"] >= 2**28]
    day = str(banner["date"])[:10]
    metrics = {}
    for op, metric in (("quantize", "quantize_bw_fraction"), ("fake_quantize", "fake_quantize_bw_fraction")):
        vals = [r["fraction_of_best_copy"] for r in big if r["op"] == op]
        if vals:
            metrics[metric] = {"value": round(min(vals), 4), "target": TARGET, "gpu": banner["gpu"], "date": day,
                               "source": f"bench/results/{path.name}",
                               "aggregate": "min over inputs >= 256 MiB, against the run's best copy bandwidth"}
    common.update_headline(metrics, args.out)
    print(f"\nwrote {path}")
    for k, v in metrics.items():
        print(f"{k}: {v['value']:.3f} (target >= {v['target']}) {'PASS' if v['value'] >= v['target'] else 'MISS'}")


if __name__ == "__main__":
    main()
