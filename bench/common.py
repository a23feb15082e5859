"""Shared benchmark machinery: timing, FLOP/byte formulas, device banner, JSON results.

Timing method: CUDA events around each call, warm-up first, the median of many repetitions, and
inputs rotated among several sets whose total size exceeds the L2 cache, so that no call reads
what the previous one left in L2. Every benchmark measures its baseline in the same process on
the same GPU and reports ratios.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Sequence

import torch

RESULTS = Path(__file__).resolve().parent / "results"


# ---- Formulas ------------------------------------------------------------------------------------

def attention_flops(b: int, h: int, nq: int, nk: int, d: int, causal: bool, backward: bool = False) -> float:
    """4·B·H·Nq·Nk·D for the forward (halved for causal), 2.5x that for the backward — the
    convention of FlashAttention, whatever the kernel executes."""
    f = 4.0 * b * h * nq * nk * d
    if causal:
        f /= 2
    return f * 2.5 if backward else f


def nvfp4_packed_bytes(numel: int) -> int:
    """Bytes of a packed NVFP4 tensor: half a byte per element plus one E4M3 byte per 16."""
    return numel // 2 + numel // 16


# ---- Timing --------------------------------------------------------------------------------------

def l2_bytes() -> int:
    return torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size


def rotation_count(bytes_per_set: int, min_sets: int = 2) -> int:
    """How many input sets to rotate through so that they exceed the L2 cache 3 times over."""
    return max(min_sets, -(-3 * l2_bytes() // max(bytes_per_set, 1)))


def time_cuda(fn: Callable[[int], object], sets: int = 1, warmup: int = 5, reps: int = 30) -> Dict[str, float]:
    """Times fn(i) (i: the index of the input set, rotated) with CUDA events. Returns the median,
    min and max in milliseconds."""
    for i in range(warmup):
        fn(i % sets)
    torch.cuda.synchronize()
    times: List[float] = []
    for i in range(reps):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn(i % sets)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "reps": reps}


def time_cuda_graph(fn: Callable[[int], object], sets: int = 1, calls: int = 10, warmup: int = 3,
                    reps: int = 15) -> Dict[str, float]:
    """Times fn(i) without the host's launch overhead: `calls` calls (rotating the input sets) are
    captured in one CUDA graph, whose replays are timed with CUDA events. Returns per-call
    milliseconds (median, min, max over the replays). Use it for calls short enough that Python
    and launch overheads would otherwise dominate; the baseline is timed the same way."""
    for i in range(warmup):
        fn(i % sets)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i % sets)
    graph.replay()
    torch.cuda.synchronize()
    times: List[float] = []
    for _ in range(reps):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    del graph
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "reps": reps,
            "calls_per_graph": calls, "method": "cuda_graph"}


def time_eager_loop(fn: Callable[[int], object], sets: int = 1, calls: int = 50, loops: int = 7,
                    warmup: int = 5, cuda: bool = True) -> Dict[str, float]:
    """Times fn(i) as eager code runs it: `calls` back-to-back calls between two CUDA events (host
    launch overhead counts wherever it exceeds the GPU's time), per call; median, min, max over
    `loops` loops. Also the host's time to issue one call (`host_issue_ms`, median): when it
    exceeds `median_ms` the GPU waits for the host. With `cuda=False` (a smoke run on the CPU)
    the host clock times the loop."""
    for i in range(warmup):
        fn(i % sets)
    if cuda:
        torch.cuda.synchronize()
    times: List[float] = []
    issue: List[float] = []
    for _ in range(loops):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        for i in range(calls):
            fn(i % sets)
        t1 = time.perf_counter()
        if cuda:
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / calls)
        else:
            times.append((t1 - t0) * 1e3 / calls)
        issue.append((t1 - t0) * 1e3 / calls)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "reps": loops,
            "calls_per_loop": calls, "host_issue_ms": statistics.median(issue),
            "method": "eager_loop" if cuda else "host_clock_smoke"}


def time_wall(fn: Callable[[int], object], sets: int = 1, warmup: int = 1, reps: int = 3,
              **_ignored) -> Dict[str, float]:
    """time_cuda's result from the host clock, for the CPU smoke runs of the benchmarks (`--smoke`):
    they check that a script's code paths run and that its JSON is complete; the numbers mean
    nothing. Takes (and ignores) time_cuda_graph's keywords, so it can stand in for either."""
    for i in range(warmup):
        fn(i % sets)
    times: List[float] = []
    for i in range(reps):
        start = time.perf_counter()
        fn(i % sets)
        times.append((time.perf_counter() - start) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "reps": reps,
            "method": "host_clock_smoke"}


def bench_parser(doc: str, quick_help: str, smoke_help: str) -> argparse.ArgumentParser:
    """The options every benchmark with a smoke mode takes: --out, --quick (what it shortens:
    `quick_help`) and --smoke (a CPU run at tiny shapes: `smoke_help`, needs --out)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="directory for the JSON and headline.json "
                   "(default: bench/results)")
    p.add_argument("--quick", action="store_true", help=f"{quick_help} (< 1 min)")
    p.add_argument("--smoke", action="store_true", help=f"CPU, {smoke_help}: checks the code paths (needs --out)")
    return p


def require_device(smoke: bool, out_dir: Path | None) -> None:
    """Exits with a message (not a traceback) when a benchmark cannot run here: without `--smoke`
    it needs a CUDA GPU and a build of attnqat with CUDA kernels; a smoke run needs `--out` (its
    meaningless numbers must not reach bench/results)."""
    if smoke:
        if out_dir is None:
            sys.exit("--smoke needs --out DIR: a smoke run's numbers mean nothing and must not reach bench/results")
        return
    import attnqat

    if not torch.cuda.is_available():
        sys.exit("this benchmark needs a CUDA GPU (torch.cuda.is_available() is False); "
                 "--smoke --out DIR runs its code paths on the CPU at tiny shapes")
    if not attnqat.build_info()["cuda"]:
        sys.exit("this benchmark needs attnqat built with CUDA kernels (attnqat.build_info()['cuda'] is False)")


# ---- Banner and results --------------------------------------------------------------------------

def git_hash() -> str:
    """ATTNQAT_GIT_HASH when set (tools/gpu_check.sh runs on a snapshot whose enclosing .git, if
    any, is not the snapshot's commit), else `git rev-parse`."""
    if os.environ.get("ATTNQAT_GIT_HASH"):
        return os.environ["ATTNQAT_GIT_HASH"]
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=RESULTS.parent,
                                       stderr=subprocess.DEVNULL, text=True).strip()
    except Exception:
        return os.environ.get("ATTNQAT_GIT_HASH", "unknown")


def device_banner(smoke: bool = False) -> Dict[str, object]:
    """The GPU and software of this run; `smoke`: a CPU smoke run (gpu "cpu-smoke")."""
    if smoke or not torch.cuda.is_available():
        return {"gpu": "cpu-smoke", "sm_count": 0, "memory_gib": 0, "l2_mib": 0, "capability": "-",
                "torch": torch.__version__, "cuda_runtime": None, "git": git_hash(), "host": platform.node(),
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    info = {
        "gpu": props.name,
        "sm_count": props.multi_processor_count,
        "memory_gib": round(props.total_memory / 2**30, 1),
        "l2_mib": round(props.L2_cache_size / 2**20, 1),
        "capability": f"{props.major}.{props.minor}",
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "git": git_hash(),
        "host": platform.node(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        out = subprocess.check_output(
            ["nvidia-smi", "--query-gpu=driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.draw,temperature.gpu",
             "--format=csv,noheader"], text=True).strip()
        info["nvidia_smi"] = out
    except Exception:
        pass
    return info


def print_banner(info: Dict[str, object]) -> None:
    print(f"# {info['gpu']} ({info['sm_count']} SMs, {info['memory_gib']} GiB, L2 {info['l2_mib']} MiB) | "
          f"torch {info['torch']} CUDA {info['cuda_runtime']} | git {info['git']} | {info['date']}")
    if "nvidia_smi" in info:
        print(f"# nvidia-smi: {info['nvidia_smi']}")


def gpu_slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


def write_results(kind: str, banner: Dict[str, object], rows: Sequence[dict], out_dir: Path | None = None,
                  extra: Dict[str, object] | None = None) -> Path:
    """Writes bench/results/<kind>_<gpu>_<date>.json (or into out_dir) and returns the path.
    `extra`: more top-level fields (a run's configuration, profiles, notes)."""
    out_dir = Path(out_dir) if out_dir else RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    day = str(banner["date"])[:10]
    path = out_dir / f"{kind}_{gpu_slug(str(banner['gpu']))}_{day}.json"
    data = {"benchmark": kind, "device": banner, "rows": list(rows), **(extra or {})}
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


def update_headline(metrics: Dict[str, dict], out_dir: Path | None = None) -> Path:
    """Merges {"metric": {"value", "target", "gpu", "date", "source"}} into headline.json. An
    entry may say "better": "lower" (e.g. a time ratio whose target is a ceiling); without it
    higher is better and the target is a floor."""
    out_dir = Path(out_dir) if out_dir else RESULTS
    path = out_dir / "headline.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(metrics)
    path.write_text(json.dumps(dict(sorted(data.items())), indent=1) + "\n")
    return path


def target_met(entry: dict):
    """Whether a headline entry meets its target: value >= target, or value <= target when the
    entry says "better": "lower"; None without a target."""
    target = entry.get("target")
    better = entry.get("better", "higher")
    if better not in ("higher", "lower"):
        raise ValueError(f"headline entry: 'better' must be 'higher' or 'lower', got {better!r}")
    if target is None:
        return None
    if better == "lower":
        return entry["value"] <= target
    return entry["value"] >= target


def print_headline(metrics: Dict[str, dict]) -> None:
    """One line per headline entry: value, min/max where given, the target with its direction."""
    for name, entry in metrics.items():
        lower = entry.get("better", "higher") == "lower"
        spread = "".join(f"{k} {entry[k]:.3f}; " for k in ("min", "max") if entry.get(k) is not None)
        met = target_met(entry)
        target = "no target" if met is None else (
            f"target {'<=' if lower else '>='} {entry['target']}: {'met' if met else 'NOT met'}")
        print(f"{name}: {entry['value']:.3f} ({spread}{target}{'; lower is better' if lower else ''})")
