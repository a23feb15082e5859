"""Shared benchmark machinery: timing, FLOP/byte formulas, device banner, JSON results.

Timing method: CUDA events around each call, warm-up first, the median of many repetitions, and
inputs rotated among several sets whose total size exceeds the L2 cache, so that no call reads
what the previous one left in L2. Every benchmark measures its baseline in the same process on
the same GPU and reports ratios.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
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


def device_banner() -> Dict[str, object]:
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


def write_results(kind: str, banner: Dict[str, object], rows: Sequence[dict], out_dir: Path | None = None) -> Path:
    """Writes bench/results/<kind>_<gpu>_<date>.json (or into out_dir) and returns the path."""
    out_dir = Path(out_dir) if out_dir else RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    day = str(banner["date"])[:10]
    path = out_dir / f"{kind}_{gpu_slug(str(banner['gpu']))}_{day}.json"
    path.write_text(json.dumps({"benchmark": kind, "device": banner, "rows": list(rows)}, indent=1) + "\n")
    return path


def update_headline(metrics: Dict[str, dict], out_dir: Path | None = None) -> Path:
    """Merges {"metric": {"value", "target", "gpu", "date", "source"}} into headline.json."""
    out_dir = Path(out_dir) if out_dir else RESULTS
    path = out_dir / "headline.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(metrics)
    path.write_text(json.dumps(dict(sorted(data.items())), indent=1) + "\n")
    return path
