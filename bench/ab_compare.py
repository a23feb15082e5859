"""Compares the A/B runs of tools/ab_bench.sh: the headline metrics (ratios against the baseline
measured in the same process) of the old and the new build, per round and as the median over the
rounds, and the gain of each: new/old, or old/new for an entry that says "better": "lower" (a
time ratio), so that a gain above 1 is always an improvement. Prints a table; exit status 0 (a
report, not a gate).

    python bench/ab_compare.py OUTDIR
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def load(out: Path, tag: str):
    rounds = sorted(p for p in out.glob(f"ab_{tag}[0-9]*") if p.is_dir())
    return [json.loads((p / "headline.json").read_text()) if (p / "headline.json").exists() else {} for p in rounds]


def main() -> None:
    out = Path(sys.argv[1])
    old, new = load(out, "old"), load(out, "new")
    names = sorted({k for r in old + new for k in r})
    print(f"{'metric':<34} {'old (rounds)':>22} {'new (rounds)':>22} {'gain':>8}")
    for name in names:
        o = [r[name]["value"] for r in old if name in r]
        n = [r[name]["value"] for r in new if name in r]
        if not o or not n:
            continue
        lower_is_better = any(r[name].get("better") == "lower" for r in old + new if name in r)
        a, b = (statistics.median(o), statistics.median(n)) if lower_is_better else (statistics.median(n), statistics.median(o))
        ratio = a / b if b else float("nan")
        fmt = lambda xs: " ".join(f"{x:.4f}" for x in xs)
        print(f"{name:<34} {fmt(o):>22} {fmt(n):>22} {ratio:8.4f}")


if __name__ == "__main__":
    main()
