"""Host overhead of eager calls: attnqat called from Python as a user calls it, against the same
calls replayed from a CUDA graph, and against cuDNN called eagerly. Same process, same GPU.

Shape: B 1, H 16, N 4096, D 128, bf16, not causal (short enough that a call's host work — the
Python front end, option checks, the quantization and attention launches — can show next to its
GPU time). Calls: attnqat `fp4` forward (serving, under no_grad), `bf16` forward, `attn_qat`
forward (inputs require grad: the training forward, its autograd graph dropped) and `attn_qat`
forward + backward (`torch.autograd.grad`), cuDNN BF16 (torch SDPA) forward and forward +
backward.

- eager: `--calls` back-to-back calls between two CUDA events, per call, median over `--loops`
  loops (common.time_eager_loop); `host_issue_ms` is the host's time to issue one call;
- graph: the same calls captured in a CUDA graph and replayed (common.time_cuda_graph): GPU time
  without host overhead.

Also a torch.profiler table of 10 eager `fp4` calls (CPU ops by self CPU time, top 15) and a
cProfile of the same calls (Python functions by own time, top 15): where the host time goes. Both
go to the log, their top rows into the JSON.

Headlines: `eager_over_graph_fp4_fwd_n4k` = fp4 eager time / fp4 graph time (target <= 1.10; lower
is better) and `fwd_fp4_vs_cudnn_d128_eager_n4k` = cuDNN eager time / fp4 eager time (target 0.7).

    python bench/bench_eager.py [--out DIR] [--quick] [--calls 50] [--loops 7]
    python bench/bench_eager.py --smoke --out DIR    # CPU, tiny shape: code paths only
"""

from __future__ import annotations

import cProfile
import io
import pstats
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import attnqat  # noqa: E402

TARGETS = {"eager_over_graph_fp4_fwd_n4k": 1.10, "fwd_fp4_vs_cudnn_d128_eager_n4k": 0.7}
PROFILED_CALLS = 10
TOP_ROWS = 15


def impls(q, k, v, do, cudnn: SDPBackend):
    """name -> step(i): the calls timed, on the same q, k, v (which require grad)."""

    def sdpa(q, k, v):
        with sdpa_kernel(cudnn):
            return F.scaled_dot_product_attention(q, k, v)

    def no_grad(fn):
        def step(i):
            with torch.no_grad():
                return fn(q, k, v)
        return step

    def fwd_bwd(fn):
        def step(i):
            return torch.autograd.grad(fn(q, k, v), (q, k, v), do)
        return step

    return {
        "cudnn fwd": no_grad(sdpa),
        "cudnn fwd+bwd": fwd_bwd(sdpa),
        "attnqat fp4 fwd": no_grad(lambda q, k, v: attnqat.attention(q, k, v, mode="fp4")),
        "attnqat bf16 fwd": no_grad(lambda q, k, v: attnqat.attention(q, k, v, mode="bf16")),
        "attnqat attn_qat fwd": lambda i: attnqat.attention(q, k, v, mode="attn_qat"),
        "attnqat attn_qat fwd+bwd": fwd_bwd(lambda q, k, v: attnqat.attention(q, k, v, mode="attn_qat")),
    }


def profile_host(step, cuda: bool):
    """torch.profiler (CPU activity) and cProfile over PROFILED_CALLS eager calls of `step`.
    Returns (printable tables, JSON rows of each)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Profiler clears events")  # one profiling cycle here
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for i in range(PROFILED_CALLS):
                step(i)
            if cuda:
                torch.cuda.synchronize()
    averages = prof.key_averages()
    table = averages.table(sort_by="self_cpu_time_total", row_limit=TOP_ROWS)
    ops = [{"op": e.key, "calls": e.count, "self_cpu_us": round(e.self_cpu_time_total, 1),
            "cpu_total_us": round(e.cpu_time_total, 1),
            "self_cpu_us_per_attention_call": round(e.self_cpu_time_total / PROFILED_CALLS, 2)}
           for e in sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)[:TOP_ROWS]]
    py = cProfile.Profile()
    py.enable()
    for i in range(PROFILED_CALLS):
        step(i)
    py.disable()
    if cuda:
        torch.cuda.synchronize()
    text = io.StringIO()
    stats = pstats.Stats(py, stream=text).sort_stats("tottime")
    stats.print_stats(TOP_ROWS)
    functions = []
    for (file, line, name), (_, ncalls, tottime, cumtime, _) in sorted(
            stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:TOP_ROWS]:
        functions.append({"function": f"{Path(file).name}:{line}({name})", "calls": ncalls,
                          "own_us_per_attention_call": round(tottime * 1e6 / PROFILED_CALLS, 2),
                          "cumulative_us_per_attention_call": round(cumtime * 1e6 / PROFILED_CALLS, 2)})
    return table, text.getvalue(), ops, functions


def parse_args(argv=None):
    p = common.bench_parser(__doc__, "fewer loops and graph replays", "tiny shape")
    p.add_argument("--calls", type=int, default=None, help="calls per eager loop (default 50, --smoke 3)")
    p.add_argument("--loops", type=int, default=None, help="eager loops, median taken (default 7, --quick 3)")
    p.add_argument("--reps", type=int, default=None, help="graph replays (default 15, --quick 5)")
    p.add_argument("--no-profile", action="store_true", help="skip the host profiles")
    args = p.parse_args(argv)
    args.calls = args.calls or (3 if args.smoke else 50)
    args.loops = args.loops or (2 if args.smoke else 3 if args.quick else 7)
    args.reps = args.reps or (2 if args.smoke else 5 if args.quick else 15)
    return args


def main(argv=None):
    args = parse_args(argv)
    common.require_device(args.smoke, args.out)
    cuda = not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    banner = common.device_banner(args.smoke)
    common.print_banner(banner)
    b, h, n, d = (1, 2, 256, 128) if args.smoke else (1, 16, 4096, 128)
    print(f"B {b}, H {h}, N {n}, D {d}, bf16, not causal; {args.calls} calls per eager loop, {args.loops} loops")
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v, do = (torch.randn(b, h, n, d, device=device, dtype=torch.bfloat16, generator=g) for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_(True)
    # The smoke run (CPU) has no cuDNN: its baseline is SDPA's math backend.
    steps = impls(q, k, v, do, SDPBackend.CUDNN_ATTENTION if cuda else SDPBackend.MATH)
    rows, by_name = [], {}
    for name, step in steps.items():
        try:
            eager = common.time_eager_loop(step, calls=args.calls, loops=args.loops, warmup=3, cuda=cuda)
            graph = (common.time_cuda_graph(step, calls=10, warmup=3, reps=args.reps) if cuda
                     else common.time_wall(step, reps=args.reps))
        except (RuntimeError, NotImplementedError, ValueError) as e:
            print(f"{name}: {type(e).__name__}: {str(e)[:200]}")
            continue
        row = {"impl": name, "b": b, "h": h, "n": n, "d": d, "causal": False,
               "eager_ms": eager["median_ms"], "eager_min_ms": eager["min_ms"], "eager_max_ms": eager["max_ms"],
               "host_issue_ms": eager["host_issue_ms"], "eager_loops": eager["reps"],
               "calls_per_loop": eager["calls_per_loop"], "eager_method": eager["method"],
               "graph_ms": graph["median_ms"], "graph_min_ms": graph["min_ms"], "graph_max_ms": graph["max_ms"],
               "graph_method": graph["method"], "eager_over_graph": eager["median_ms"] / graph["median_ms"]}
        rows.append(row)
        by_name[name] = row
    for row in rows:  # against cuDNN's eager time of the same pass
        base = by_name.get("cudnn fwd+bwd" if row["impl"].endswith("fwd+bwd") else "cudnn fwd")
        row["cudnn_eager_over_eager"] = base["eager_ms"] / row["eager_ms"] if base else None
    profiles = {}
    if not args.no_profile and "attnqat fp4 fwd" in by_name:
        table, py_text, ops, functions = profile_host(steps["attnqat fp4 fwd"], cuda)
        print(f"\ntorch.profiler, {PROFILED_CALLS} eager fp4 calls, CPU ops by self CPU time:\n{table}")
        print(f"cProfile, the same {PROFILED_CALLS} calls, Python functions by own time:\n{py_text}")
        profiles = {"impl": "attnqat fp4 fwd", "calls": PROFILED_CALLS, "torch_profiler_cpu_ops": ops,
                    "cprofile_functions": functions}
    path = common.write_results("eager", banner, rows, args.out, extra={"host_profile": profiles or None})
    print(f"\n{'impl':<26} {'eager ms':>9} {'host ms':>8} {'graph ms':>9} {'eager/graph':>11} {'cuDNN/this':>10}")
    for r in rows:
        vs = f"{r['cudnn_eager_over_eager']:10.3f}" if r["cudnn_eager_over_eager"] else f"{'-':>10}"
        print(f"{r['impl']:<26} {r['eager_ms']:9.4f} {r['host_issue_ms']:8.4f} {r['graph_ms']:9.4f} "
              f"{r['eager_over_graph']:11.3f} {vs}")
    day = str(banner["date"])[:10]
    metrics = {}
    fp4 = by_name.get("attnqat fp4 fwd")
    shape = f"B {b}, H {h}, N {n}, D {d}, bf16, not causal"
    if fp4:
        metrics["eager_over_graph_fp4_fwd_n4k"] = {
            "value": round(fp4["eager_over_graph"], 4), "target": TARGETS["eager_over_graph_fp4_fwd_n4k"],
            "better": "lower", "gpu": banner["gpu"], "date": day, "source": f"bench/results/{path.name}",
            "aggregate": (f"{shape}; fp4 forward, eager time per call ({args.calls} back-to-back calls, median of "
                          f"{args.loops} loops) over CUDA-graph replay time per call; lower is better")}
    if fp4 and fp4["cudnn_eager_over_eager"]:
        metrics["fwd_fp4_vs_cudnn_d128_eager_n4k"] = {
            "value": round(fp4["cudnn_eager_over_eager"], 4), "target": TARGETS["fwd_fp4_vs_cudnn_d128_eager_n4k"],
            "gpu": banner["gpu"], "date": day, "source": f"bench/results/{path.name}",
            "aggregate": f"{shape}; cuDNN BF16 eager time per call over attnqat fp4 eager time per call"}
    common.update_headline(metrics, args.out)
    print(f"\nwrote {path}")
    common.print_headline(metrics)


if __name__ == "__main__":
    main()
