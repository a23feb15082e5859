"""Figures and the markdown table of a reproduction study (examples/reproduce/run.py's results.json).

    python examples/reproduce/plot.py examples/reproduce/runs/gpu/results.json \
        --out examples/reproduce/results --name gpu

writes ``NAME_pretrain.png`` (pretraining loss), ``NAME_heldout.png`` (held-out loss of every arm
during continued training, FP4 attention, mean over seeds with the min-max band),
``NAME_grad_norm.png`` (pre-clip gradient norm of every step, one panel per arm, every seed, log
scale, spikes marked) and ``NAME_table.md``. matplotlib is imported only for the PNGs;
``make_table`` needs nothing but the standard library (report.py and the tests use it).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import List, Optional

EVAL_MODES = ("bf16", "fp4_paper", "fp4_anchored")


def deploy_mode(arm_cfg: dict) -> str:
    """The attention an arm is meant to be served with: BF16 for the control, else FP4 with its p_quant."""
    t = arm_cfg["train"]
    return "bf16" if t["mode"] == "bf16" else f"fp4_{t['p_quant']}"


def _pm(s: Optional[dict], digits: int = 4) -> str:
    if not s:
        return "n/a"
    if s.get("std") and len(s.get("values", [])) > 1:
        return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"
    return f"{s['mean']:.{digits}f}"


def paired_diff(res: dict, arm_a: str, mode_a: str, arm_b: str, mode_b: str) -> Optional[dict]:
    """Mean and std over seeds of final_eval[arm_a][mode_a] - final_eval[arm_b][mode_b] (same seed)."""
    diffs = []
    for key, r in res["runs"].items():
        arm, seed = key.split("/")
        if arm != arm_a or not r.get("final_eval"):
            continue
        other = res["runs"].get(f"{arm_b}/{seed}")
        if other and other.get("final_eval"):
            a, b = r["final_eval"].get(mode_a), other["final_eval"].get(mode_b)
            if a is not None and b is not None:
                diffs.append(a - b)
    if not diffs:
        return None
    return dict(mean=statistics.fmean(diffs), std=statistics.stdev(diffs) if len(diffs) > 1 else 0.0,
                n=len(diffs), negative=sum(d < 0 for d in diffs), values=diffs)


def make_table(res: dict) -> str:
    """The results table (markdown): one row per arm, means ± std over seeds."""
    summ = res["summary"]
    ce = res["checkpoint_eval"]
    ctrl = summ.get("bf16", {}).get("bf16")
    lines = [
        "| arm | trained with | seeds | held-out loss, served attention | Δ vs BF16 control | BF16 eval | FP4 eval (paper P) "
        "| FP4 eval (anchored P) | grad-norm median | grad-norm max | spikes | diverged | ms/step |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    if ce:
        d = ce["fp4_paper"] - ctrl["mean"] if ctrl else None
        lines.append(
            f"| BF16 checkpoint, no continued training | BF16 (pretraining) | – | {ce['fp4_paper']:.4f} (FP4 paper) "
            f"| {'' if d is None else f'{d:+.4f}'} | {ce['bf16']:.4f} | {ce['fp4_paper']:.4f} | {ce['fp4_anchored']:.4f} "
            f"| – | – | – | – | – |")
    for arm, s in summ.items():
        acfg = res["arms"][arm]
        t = acfg["train"]
        trained = t["mode"] if t["mode"] == "bf16" else f"{t['mode']}, P {t['p_quant']}"
        sw = [f"{n}={t[n]}" for n in ("bwd_quantized_qkv", "bwd_quant_p", "bwd_high_precision_o") if t.get(n) is not None]
        if sw:
            trained += ", " + ", ".join(sw)
        dm = deploy_mode(acfg)
        served = s.get(dm)
        delta = f"{served['mean'] - ctrl['mean']:+.4f}" if served and ctrl else "n/a"
        if arm == "bf16":
            delta = "0 (reference)"
        label = "BF16" if dm == "bf16" else f"FP4 {dm.split('_')[1]}"
        lines.append(
            f"| `{arm}` | {trained} | {s['seeds']} | {_pm(served)} ({label}) | {delta} | {_pm(s.get('bf16'))} "
            f"| {_pm(s.get('fp4_paper'))} | {_pm(s.get('fp4_anchored'))} | {s.get('grad_norm_median', math.nan):.3g} "
            f"| {s.get('grad_norm_max', math.nan):.3g} | {s.get('grad_norm_spikes', 0):.3g} "
            f"| {s['diverged']}/{s['seeds']} | {s.get('train_ms_per_step', math.nan):.1f} |")
    return "\n".join(lines) + "\n"


def _smooth(xs: List[Optional[float]], w: int) -> List[float]:
    out, acc = [], []
    for x in xs:
        acc.append(math.nan if x is None else x)
        if len(acc) > w:
            acc.pop(0)
        vals = [a for a in acc if not math.isnan(a)]
        out.append(statistics.fmean(vals) if vals else math.nan)
    return out


def plot_all(res: dict, out: Path, name: str) -> List[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    files = []
    arms = list(res["summary"])
    colors = dict(zip(arms, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 2))
    where = res.get("env", {}).get("gpu", {}).get("name") or "CPU"
    title = f"{res['preset']} preset ({where})"

    # pretraining
    pre = res["pretrain"]
    fig, ax = plt.subplots(figsize=(7, 4))
    w = max(1, len(pre["train_loss"]) // 100)
    ax.plot(range(1, len(pre["train_loss"]) + 1), _smooth(pre["train_loss"], w), lw=1, label=f"train (mean of {w} steps)")
    ax.plot([c["step"] for c in pre["eval_curve"]], [c["bf16"] for c in pre["eval_curve"]], "o-",
            label=f"held-out, BF16 ({res['config']['curve_eval_windows']} fixed windows)")
    ce = res["checkpoint_eval"]
    first = next(iter(res["runs"].values()), None)  # step 0 of a run: the checkpoint on the curve windows
    if first:
        c0 = first["eval_curve"][0]
        last = pre["eval_curve"][-1]["step"]
        ax.plot([last], [c0["fp4_paper"]], "rs", label=f"checkpoint, FP4 attention (paper P): {c0['fp4_paper']:.3f}")
        ax.plot([last], [c0["bf16"]], "kD", ms=4, label=f"checkpoint (bf16 weights), BF16: {c0['bf16']:.3f}")
    ax.text(0.02, 0.02, f"full held-out set: BF16 {ce['bf16']:.4f}, FP4 paper {ce['fp4_paper']:.4f}, "
            f"FP4 anchored {ce['fp4_anchored']:.4f}", transform=ax.transAxes, fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/byte)")
    lo = min(c["bf16"] for c in pre["eval_curve"])
    ax.set_ylim(lo - 0.1, lo + 1.5)
    ax.set_title(f"Pretraining with BF16 attention — {title}")
    ax.legend()
    fig.tight_layout()
    files.append(out / f"{name}_pretrain.png")
    fig.savefig(files[-1], dpi=90)
    plt.close(fig)

    # held-out loss during continued training
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for panel, (ax, mode_of) in enumerate(zip(axes, (lambda a: deploy_mode(res["arms"][a]), lambda a: "bf16"))):
        for arm in arms:
            mode = mode_of(arm)
            runs = [r for k, r in res["runs"].items() if k.split("/")[0] == arm]
            curves = [[math.nan if c[mode] is None else c[mode] for c in r["eval_curve"]] for r in runs]
            longest = max(runs, key=lambda r: len(r["eval_curve"]))
            steps = [c["step"] for c in longest["eval_curve"]]
            n = len(steps)
            curves = [c + [math.nan] * (n - len(c)) for c in curves]  # a diverged run stops early
            col = [[c[i] for c in curves if not math.isnan(c[i])] or [math.nan] for i in range(n)]
            ax.plot(steps, [statistics.fmean(x) for x in col], "-o", ms=2, color=colors[arm], label=f"{arm} ({mode})")
            if len(curves) > 1:
                ax.fill_between(steps, [min(x) for x in col], [max(x) for x in col], color=colors[arm], alpha=0.15)
        if first:
            ax.axhline(first["eval_curve"][0]["bf16"], color="k", ls=":", lw=1, label="checkpoint, BF16")
        ax.set_xlabel("continued-training step")
        ax.set_ylabel("held-out loss (nats/byte, curve subset)")
        ax.set_title("served attention (FP4 for QAT arms, BF16 for control)" if panel == 0 else "BF16 attention")
        ax.legend(fontsize=7)
    fig.suptitle(f"Held-out loss during continued training — {title}; mean over seeds, band = min..max")
    fig.tight_layout()
    files.append(out / f"{name}_heldout.png")
    fig.savefig(files[-1], dpi=90)
    plt.close(fig)

    # gradient norms
    cols = 3
    rows = math.ceil(len(arms) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.2 * rows), sharey=True, squeeze=False)
    for ax, arm in zip(axes.flat, arms):
        for k, r in res["runs"].items():
            if k.split("/")[0] != arm:
                continue
            g = [math.nan if x is None else x for x in r["grad_norm"]]
            ax.plot(range(len(g)), g, lw=0.6, alpha=0.8, label=k.split("/")[1])
            sp = r["grad_norm_stats"]["spike_steps"]
            ax.plot(sp, [g[i] for i in sp], "rx", ms=4)
        s = res["summary"][arm]
        ax.set_yscale("log")
        ax.set_title(f"{arm}: spikes {s.get('grad_norm_spikes', 0):.3g}, median {s.get('grad_norm_median', math.nan):.3g}",
                     fontsize=9)
        ax.set_xlabel("step")
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(arms):]:
        ax.axis("off")
    axes[0][0].set_ylabel("pre-clip gradient norm")
    fig.suptitle(f"Gradient norm during continued training — {title} (x: spike)")
    fig.tight_layout()
    files.append(out / f"{name}_grad_norm.png")
    fig.savefig(files[-1], dpi=90)
    plt.close(fig)
    return files


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", type=Path)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--name", help="file prefix (default: the preset's name)")
    ap.add_argument("--no-png", action="store_true", help="only the table (no matplotlib needed)")
    args = ap.parse_args(argv)
    res = json.loads(args.results.read_text())
    name = args.name or res["preset"]
    args.out.mkdir(parents=True, exist_ok=True)
    table = args.out / f"{name}_table.md"
    table.write_text(make_table(res))
    print(table)
    if not args.no_png:
        for f in plot_all(res, args.out, name):
            print(f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
