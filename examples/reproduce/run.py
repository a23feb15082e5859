"""The reproduction study of Attn-QAT at small scale, in one command.

    python examples/reproduce/data.py                                  # once, on a CPU machine (apt)
    python examples/reproduce/run.py --preset gpu --out examples/reproduce/runs/gpu    # one H100/H200
    python examples/reproduce/run.py --preset tiny --out /tmp/tiny                    # CPU smoke run
    python examples/reproduce/plot.py RESULTS.json --out docs/reproduction            # PNGs + table
    python examples/reproduce/report.py RESULTS.json                                  # docs/reproduction.md

Protocol (the paper's continued pretraining, small):

1. pretrain a byte-level GPT (examples/reproduce/model.py) with BF16 attention; the checkpoint is
   stored in bf16 (like a released model) and every later phase starts from exactly those weights;
2. evaluate that checkpoint on the held-out split with BF16 attention and with FP4 attention
   (``mode="fp4"``, ``p_quant`` paper and anchored), no training: the quality drop;
3. from the checkpoint, train every arm for the same number of steps, the same learning-rate
   schedule and, for a given seed, the same batches: ``bf16`` (control), ``drop_in_qat``,
   ``attn_qat_paper``, ``attn_qat_anchored``, and the paper's ablations of Attn-QAT (paper P):
   ``ablation_hp_p_bwd`` (high-precision P in the backward, ``bwd_quant_p=False``) and
   ``ablation_lp_o_bwd`` (low-precision O in the backward, ``bwd_high_precision_o=False``);
4. record, per arm and seed: the held-out loss curve and final loss with BF16, FP4-paper and
   FP4-anchored attention, the training loss and the pre-clip global gradient norm of every step,
   spikes (a step whose gradient norm exceeds ``spike_factor`` times the median of the previous
   ``spike_window`` steps), divergence (a non-finite loss or gradient norm: the run stops) and
   loss blow-ups (the mean training loss of the last ``spike_window`` steps more than 0.5 nats
   above its lowest value so far).

Seeds (``--seeds N``: seeds 0..N-1) change the order of the continued-training batches; the
pretraining (initialisation and batches, ``--pretrain-seed``) is shared, so every arm starts from
one checkpoint (its sha256 is in the results). On the GPU the attention backward kernels use
atomics unless ``--deterministic``, so runs repeat up to floating-point summation order.

Everything goes to --out: ``results.json`` (every curve; rewritten after each phase) and the
checkpoint ``pretrain_ckpt_NN.pt`` (bf16 shards of at most 15 MiB). A second invocation with the
same --out resumes: finished phases are read back from results.json (a results.json and the
checkpoint shards carried to a fresh machine are enough). ``--max-minutes`` stops before a phase
that would not fit (exit code 75, "rerun to resume"), for machines that run a command for at most
10 minutes.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import attnqat  # noqa: E402
import data as data_mod  # noqa: E402
from model import GPT, AttnSpec, GPTConfig, param_groups  # noqa: E402

FORMAT = "attnqat-reproduce-v1"
EXIT_INCOMPLETE = 75

# The arms of step 3: (name, attention used for training, what it tests).
ARMS = {
    "bf16": (dict(mode="bf16"), "control: BF16 attention throughout"),
    "drop_in_qat": (dict(mode="drop_in_qat", p_quant="paper"),
                    "FP4 forward, ordinary high-precision backward (the paper's unstable baseline)"),
    "attn_qat_paper": (dict(mode="attn_qat", p_quant="paper"), "Attn-QAT as published (p_quant='paper')"),
    "attn_qat_anchored": (dict(mode="attn_qat", p_quant="anchored"), "Attn-QAT with our p_quant='anchored'"),
    "ablation_hp_p_bwd": (dict(mode="attn_qat", p_quant="paper", bwd_quant_p=False),
                          "paper ablation: high-precision P in the backward (bwd_quant_p=False)"),
    "ablation_lp_o_bwd": (dict(mode="attn_qat", p_quant="paper", bwd_high_precision_o=False),
                          "paper ablation: low-precision O in the backward (bwd_high_precision_o=False)"),
}
EVAL_MODES = ("bf16", "fp4_paper", "fp4_anchored")

PRESETS: Dict[str, dict] = {
    # CPU smoke run (CI): tiny model, short context; attention runs on the C++ reference.
    "tiny": dict(
        device="cpu", amp=False, threads=1,
        model=dict(ctx=64, d_model=64, n_layers=2, n_heads=2, head_dim=32, mlp_hidden=176),
        batch=8,
        pretrain=dict(steps=300, lr=3e-3, warmup=30, min_lr_frac=0.1, eval_every=50),
        arms=dict(steps=30, lr=3e-4, warmup=3, min_lr_frac=0.1, eval_every=10),
        seeds=1, curve_eval_windows=16, final_eval_windows=64, eval_batch=16,
        spike_window=10, spike_factor=5.0,
    ),
    # One H100/H200, <= 20 minutes in total (estimate: run.py --preset gpu --estimate).
    "gpu": dict(
        device="cuda", amp=True, threads=None,
        model=dict(ctx=2048, d_model=384, n_layers=6, n_heads=6, head_dim=64, mlp_hidden=1024),
        batch=8,
        pretrain=dict(steps=5000, lr=1e-3, warmup=250, min_lr_frac=0.1, eval_every=250),
        arms=dict(steps=1000, lr=1e-4, warmup=50, min_lr_frac=0.1, eval_every=100),
        seeds=3, curve_eval_windows=128, final_eval_windows=None, eval_batch=32,
        spike_window=50, spike_factor=5.0,
    ),
}
COMMON = dict(weight_decay=0.01, grad_clip=1.0, betas=(0.9, 0.95), tie_embeddings=True, pretrain_seed=0,
              bf16_impl="torch", api="sdpa", deterministic=False, blowup_nats=0.5)

# Throughputs assumed by --estimate (H100 SXM; see docs/reproduction.md). The attn_qat number is
# the brief's assumption for our kernels (FLOPs counted as 4·B·H·N²·D/2 forward for causal
# attention and 2.5 times that backward); the rest is typical for eager PyTorch on an H100.
GPU_ASSUMPTIONS = dict(matmul_tflops=200.0, attn_fp4_tflops=250.0, attn_bf16_tflops=350.0,
                       elementwise_tb_per_s=2.5, eval_fwd_fraction=0.33, fixed_ms_per_step=1.5)


# ---- configuration ------------------------------------------------------------------------------

def resolve_config(args) -> dict:
    cfg = copy.deepcopy(PRESETS[args.preset])
    cfg.update(copy.deepcopy(COMMON))
    cfg["preset"] = args.preset
    if args.device:
        cfg["device"] = args.device
    if args.seeds is not None:
        cfg["seeds"] = args.seeds
    if args.pretrain_steps is not None:
        cfg["pretrain"]["steps"] = args.pretrain_steps
    if args.arm_steps is not None:
        cfg["arms"]["steps"] = args.arm_steps
    if args.bf16_impl:
        cfg["bf16_impl"] = args.bf16_impl
    if args.api:
        cfg["api"] = args.api
    if args.deterministic:
        cfg["deterministic"] = True
    cfg["model"]["tie_embeddings"] = cfg.pop("tie_embeddings")
    cfg["arm_names"] = list(args.arms) if args.arms else list(ARMS)
    for a in cfg["arm_names"]:
        if a not in ARMS:
            raise SystemExit(f"--arms: unknown arm {a!r}; expected some of {', '.join(ARMS)}")
    cfg["betas"] = list(cfg["betas"])
    return cfg


def study_hash(cfg: dict, part: str) -> str:
    """A hash of what determines a phase's result (so a resumed study never mixes settings)."""
    keys = ["model", "batch", "weight_decay", "grad_clip", "betas", "pretrain_seed", "bf16_impl", "amp"]
    if part == "arms":
        keys += ["arms", "api", "deterministic", "spike_window", "spike_factor", "curve_eval_windows",
                 "final_eval_windows", "blowup_nats"]
    keys += ["pretrain"]
    blob = json.dumps({k: cfg[k] for k in keys}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def spec_for(cfg: dict, mode: str, p_quant: str = "paper", **switches) -> AttnSpec:
    return AttnSpec(mode=mode, p_quant=p_quant, bf16_impl=cfg["bf16_impl"], api=cfg["api"],
                    deterministic=cfg["deterministic"], **switches)


def eval_spec(cfg: dict, name: str) -> AttnSpec:
    if name == "bf16":
        return spec_for(cfg, "bf16")
    return spec_for(cfg, "fp4", name.split("_", 1)[1])


# ---- estimate -----------------------------------------------------------------------------------

def estimate(cfg: dict) -> dict:
    """Seconds the study should take on an H100 (GPU_ASSUMPTIONS), from FLOP and byte counts."""
    a = GPU_ASSUMPTIONS
    m = GPTConfig(**cfg["model"])
    b, n, d, h, layers = cfg["batch"], m.ctx, m.d_model, m.mlp_hidden, m.n_layers
    tokens = b * n
    matmul = 6.0 * tokens * (m.n_params(embeddings=False) + d * m.vocab_size)
    attn_fwd = layers * 4.0 * b * m.n_heads * n * n * m.head_dim / 2  # causal
    attn_train = attn_fwd * 3.5  # forward + backward (2.5x)
    # eager elementwise traffic (bytes per token and layer, forward + backward, measured by counting
    # the passes of model.py: norms, rope, casts, swiglu, residuals): ~450·d + 30·h
    elementwise = tokens * layers * (450.0 * d + 30.0 * h)
    base_ms = (matmul / (a["matmul_tflops"] * 1e12) + elementwise / (a["elementwise_tb_per_s"] * 1e12)) * 1e3
    base_ms += a["fixed_ms_per_step"]
    bf16_ms = base_ms + attn_train / (a["attn_bf16_tflops"] * 1e12) * 1e3
    fp4_ms = base_ms + attn_train / (a["attn_fp4_tflops"] * 1e12) * 1e3
    arms = cfg["arm_names"]
    n_fp4_arms = sum(1 for x in arms if ARMS[x][0]["mode"] != "bf16")
    steps_p, steps_a, seeds = cfg["pretrain"]["steps"], cfg["arms"]["steps"], cfg["seeds"]
    val_windows = cfg.get("_val_windows") or 846
    final_w = min(val_windows, cfg["final_eval_windows"] or val_windows)
    eval_pass_ms = fp4_ms * a["eval_fwd_fraction"] * cfg["eval_batch"] / b  # one eval batch, one mode
    evals_per_run = (steps_a // cfg["arms"]["eval_every"] + 1) * 3 * math.ceil(cfg["curve_eval_windows"] / cfg["eval_batch"])
    evals_per_run += 3 * math.ceil(final_w / cfg["eval_batch"])
    t_pre = steps_p * bf16_ms / 1e3
    t_arms = seeds * steps_a * ((len(arms) - n_fp4_arms) * bf16_ms + n_fp4_arms * fp4_ms) / 1e3
    t_eval = (seeds * len(arms) + 1) * evals_per_run * eval_pass_ms / 1e3
    t_fixed = 30.0  # start-up, data, warm-up, checkpoint
    return dict(assumptions=a, params=m.n_params(), tokens_per_step=tokens, matmul_tflop_per_step=matmul / 1e12,
                attn_tflop_per_step=attn_train / 1e12, elementwise_gb_per_step=elementwise / 1e9,
                step_ms_bf16=bf16_ms, step_ms_fp4=fp4_ms, pretrain_s=t_pre, arms_s=t_arms, eval_s=t_eval,
                fixed_s=t_fixed, total_s=t_pre + t_arms + t_eval + t_fixed,
                pretrain_tokens=steps_p * tokens, arm_tokens=steps_a * tokens)


# ---- data ---------------------------------------------------------------------------------------

class Data:
    def __init__(self, data_dir: Path, ctx: int, device: torch.device):
        self.manifest = data_mod.verify(data_dir)
        self.ctx = ctx
        train = np.fromfile(data_dir / "train.bin", dtype=np.uint8)
        val = np.fromfile(data_dir / "val.bin", dtype=np.uint8)
        if len(train) < ctx + 2 or len(val) < ctx + 1:
            raise SystemExit(f"{data_dir}: too little data for context {ctx}")
        self.train = torch.from_numpy(train).to(device)
        n_win = len(val) // (ctx + 1)  # non-overlapping held-out windows, fixed
        self.val_windows = torch.from_numpy(val[: n_win * (ctx + 1)].reshape(n_win, ctx + 1).copy()).to(device)
        self.offsets = torch.arange(ctx + 1, device=device)
        self.device = device

    def batch_starts(self, gen: torch.Generator, steps: int, b: int) -> torch.Tensor:
        """The window starts of every step of a phase, drawn at once on the CPU (the same on any
        device for a given seed) and moved to the device once (no host synchronization per step)."""
        return torch.randint(0, len(self.train) - self.ctx - 1, (steps, b), generator=gen).to(self.device)

    def batch(self, starts: torch.Tensor):
        x = self.train[starts[:, None] + self.offsets].long()
        return x[:, :-1], x[:, 1:]

    def eval_set(self, n: Optional[int]) -> torch.Tensor:
        w = self.val_windows
        if n is None or n >= len(w):
            return w
        idx = torch.linspace(0, len(w) - 1, n).round().long().to(w.device)  # evenly spaced, fixed
        return w[idx]


# ---- training -----------------------------------------------------------------------------------

def lr_at(step: int, sched: dict) -> float:
    peak, warm, steps = sched["lr"], sched["warmup"], sched["steps"]
    if step < warm:
        return peak * (step + 1) / warm
    t = (step - warm) / max(1, steps - warm)
    lo = peak * sched["min_lr_frac"]
    return lo + 0.5 * (peak - lo) * (1 + math.cos(math.pi * min(1.0, t)))


def autocast(cfg):
    if cfg["amp"]:
        return torch.autocast(device_type=cfg["device"], dtype=torch.bfloat16)
    return torch.autocast(device_type=cfg["device"], enabled=False)


@torch.no_grad()
def evaluate(model: GPT, windows: torch.Tensor, spec: AttnSpec, cfg: dict) -> float:
    """Mean held-out cross-entropy (nats per byte) of windows [W, ctx+1] with attention `spec`."""
    was = model.training
    model.eval()
    old = model.spec
    model.set_attention(spec)
    total, count = 0.0, 0
    try:
        for chunk in windows.split(cfg["eval_batch"]):
            x = chunk.long()
            with autocast(cfg):
                loss = model(x[:, :-1], x[:, 1:])
            total += float(loss) * len(chunk)
            count += len(chunk)
    finally:
        model.set_attention(old)
        model.train(was)
    return total / count


def eval_all(model, windows, cfg, modes=EVAL_MODES) -> Dict[str, Optional[float]]:
    """Held-out loss per attention mode (None where it is not finite)."""
    return {m: g6(evaluate(model, windows, eval_spec(cfg, m), cfg)) for m in modes}


def sync(cfg):
    if cfg["device"] == "cuda":
        torch.cuda.synchronize()


def g6(x) -> Optional[float]:
    x = float(x)
    return float(f"{x:.6g}") if math.isfinite(x) else None


def spike_stats(gn: List[Optional[float]], window: int, factor: float, skip: int) -> dict:
    """Spikes: steps t >= skip whose norm exceeds factor x the median of the previous `window` norms."""
    vals = [x if x is not None else math.inf for x in gn]
    spikes = []
    for t in range(max(window, skip), len(vals)):
        med = statistics.median(vals[t - window:t])
        if vals[t] > factor * med:
            spikes.append(t)
    post = [v for v in vals[skip:] if math.isfinite(v)] or [math.nan]
    return dict(spikes=len(spikes), spike_steps=spikes[:100], definition=f"norm > {factor} x median of the previous "
                f"{window} steps, from step {max(window, skip)}", median=g6(statistics.median(post)),
                p95=g6(float(np.percentile(post, 95))), max=g6(max(post)), mean=g6(statistics.fmean(post)))


def train_phase(model: GPT, data: Data, spec: AttnSpec, sched: dict, seed: int, cfg: dict, label: str,
                curve_windows: torch.Tensor, curve_modes) -> dict:
    """Trains `model` in place; returns the curves and statistics of the phase."""
    dev = torch.device(cfg["device"])
    model.set_attention(spec)
    model.train()
    fused = dev.type == "cuda"
    opt = torch.optim.AdamW(param_groups(model, cfg["weight_decay"]), lr=sched["lr"], betas=tuple(cfg["betas"]),
                            eps=1e-8, fused=fused)
    gen = torch.Generator().manual_seed(seed)
    steps = sched["steps"]
    starts = data.batch_starts(gen, steps, cfg["batch"])
    losses = torch.full((steps,), float("nan"), device=dev)
    gnorms = torch.full((steps,), float("nan"), device=dev)
    params = [p for p in model.parameters()]
    curve = [dict(step=0, **eval_all(model, curve_windows, cfg, curve_modes))]
    print(f"[{label}] step     0  eval {fmt(curve[-1])}", flush=True)
    diverged = None
    sync(cfg)
    t0 = time.time()
    t_eval = 0.0
    done = 0
    for step in range(steps):
        lr = lr_at(step, sched)
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = data.batch(starts[step])
        with autocast(cfg):
            loss = model(x, y)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses[step] = loss.detach()
        gnorms[step] = gn.detach()
        done = step + 1
        if done % sched["eval_every"] == 0 or done == steps:
            if not bool(torch.isfinite(losses[:done]).all() and torch.isfinite(gnorms[:done]).all()):
                bad = (~torch.isfinite(losses[:done]) | ~torch.isfinite(gnorms[:done])).nonzero()
                diverged = int(bad[0])
                print(f"[{label}] DIVERGED: non-finite loss or gradient norm at step {diverged}; stopping", flush=True)
                break
            te = time.time()
            curve.append(dict(step=done, **eval_all(model, curve_windows, cfg, curve_modes)))
            t_eval += time.time() - te
            tl = float(losses[max(0, done - sched["eval_every"]):done].mean())
            gw = gnorms[max(0, done - sched["eval_every"]):done]
            print(f"[{label}] step {done:5d}  train {tl:.4f}  |g| med {float(gw.median()):.3f} max "
                  f"{float(gw.max()):.3f}  lr {lr:.2e}  eval {fmt(curve[-1])}  ({time.time() - t0:.0f} s)",
                  flush=True)
    sync(cfg)
    elapsed = time.time() - t0
    loss_l = [g6(v) for v in losses[:done].tolist()]
    gn_l = [g6(v) for v in gnorms[:done].tolist()]
    w = cfg["spike_window"]
    smooth, blowup, best = None, None, math.inf
    for t in range(w, len(loss_l) + 1):
        seg = loss_l[t - w:t]
        if any(v is None for v in seg):
            break
        smooth = statistics.fmean(seg)
        best = min(best, smooth)
        if blowup is None and smooth > best + cfg["blowup_nats"]:
            blowup = t - 1
    return dict(steps_done=done, diverged_at=diverged, loss_blowup_at=blowup, time_s=round(elapsed, 2),
                train_ms_per_step=round((elapsed - t_eval) / max(1, done) * 1e3, 3), eval_time_s=round(t_eval, 2),
                train_loss=loss_l, grad_norm=gn_l, eval_curve=curve,
                grad_norm_stats=spike_stats(gn_l, w, cfg["spike_factor"],
                                            skip=sched["warmup"] if done > 2 * sched["warmup"] else 0))


def f4(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def fmt(d: dict) -> str:
    return " ".join(f"{k} {f4(v)}" for k, v in d.items() if k != "step")


def preflight(cfg: dict) -> dict:
    """Every training and evaluation attention of the study, once, at the model's shape: fails fast
    (before any training) on a configuration the build does not support, and on CUDA times each
    training attention (forward + backward, the TFLOPS-equivalent of the estimate)."""
    m = GPTConfig(**cfg["model"])
    dev = torch.device(cfg["device"])
    dt = torch.bfloat16 if cfg["amp"] else torch.float32
    b = cfg["batch"] if dev.type == "cuda" else 1
    gen = torch.Generator(device="cpu").manual_seed(0)
    # the model's layout: q, k, v are strided views of one projection [B, N, 3, H, D]
    base = torch.randn(b, m.ctx, 3, m.n_heads, m.head_dim, generator=gen).to(dev, dt)
    out = {}
    from model import attend

    def views(t):
        return t.permute(2, 0, 3, 1, 4).unbind(0)

    specs = {a: spec_for(cfg, **ARMS[a][0]) for a in cfg["arm_names"]}
    for name, spec in specs.items():
        leaf = base.clone().requires_grad_()
        o = attend(*views(leaf), spec)
        o.float().square().sum().backward()
        if not (bool(torch.isfinite(o).all()) and bool(torch.isfinite(leaf.grad).all())):
            raise SystemExit(f"preflight: {name}: non-finite attention output or gradient on random inputs")
        rec = dict(ok=True)
        if dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            dout = torch.ones_like(o)
            for _ in range(3):
                attend(*views(leaf), spec).backward(dout)
            start.record()
            for _ in range(10):
                attend(*views(leaf), spec).backward(dout)
            end.record()
            torch.cuda.synchronize()
            ms = start.elapsed_time(end) / 10
            flops = 3.5 * 4.0 * b * m.n_heads * m.ctx * m.ctx * m.head_dim / 2
            rec.update(ms_fwd_bwd=round(ms, 4), tflops_equiv=round(flops / ms / 1e9, 1))
        out[name] = rec
    with torch.no_grad():
        for name in EVAL_MODES:
            o = attend(*views(base), eval_spec(cfg, name))
            if not bool(torch.isfinite(o).all()):
                raise SystemExit(f"preflight: eval {name}: non-finite attention output")
            out.setdefault("eval", []).append(name)
    return out


# ---- checkpoint ---------------------------------------------------------------------------------

MAX_SHARD = 15 * 1024 * 1024


def save_checkpoint(model: GPT, out: Path) -> dict:
    """bf16 state dict in shards of at most 15 MiB (files small enough to come back from a GPU machine)."""
    for old in out.glob("pretrain_ckpt_*.pt"):
        old.unlink()
    sd = {k: v.detach().to("cpu", torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    shards, cur, size = [], {}, 0
    for k, v in sd.items():
        nb = v.numel() * v.element_size()
        if cur and size + nb > MAX_SHARD:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = v
        size += nb
    shards.append(cur)
    files = []
    h = hashlib.sha256()
    for i, s in enumerate(shards):
        p = out / f"pretrain_ckpt_{i:02d}.pt"
        torch.save(s, p)
        files.append(p.name)
    for k in sorted(sd):  # content hash, independent of torch.save's container bytes
        h.update(k.encode())
        h.update(sd[k].view(torch.int16).numpy().tobytes())
    return dict(files=files, dtype="bfloat16", sha256=h.hexdigest())


def load_checkpoint(model: GPT, out: Path, info: dict) -> None:
    sd = {}
    for f in info["files"]:
        p = out / f
        if not p.exists():
            raise FileNotFoundError(p)
        sd.update(torch.load(p, map_location="cpu", weights_only=True))
    h = hashlib.sha256()
    for k in sorted(sd):
        h.update(k.encode())
        h.update(sd[k].view(torch.int16).numpy().tobytes())
    if h.hexdigest() != info["sha256"]:
        raise ValueError(f"{out}: checkpoint shards do not match the sha256 in results.json")
    model.load_state_dict({k: v.float() for k, v in sd.items()})


# ---- results ------------------------------------------------------------------------------------

def write_results(res: dict, out: Path) -> None:
    res["summary"] = summarize(res)
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(res, indent=1, allow_nan=False) + "\n")
    os.replace(tmp, out / "results.json")


def summarize(res: dict) -> dict:
    """Per arm: mean and standard deviation over seeds of the final losses and gradient statistics."""
    out = {}
    for arm in res["config"]["arm_names"]:
        runs = [r for k, r in res["runs"].items() if k.split("/")[0] == arm]
        if not runs:
            continue
        s = dict(seeds=len(runs), diverged=sum(r["diverged_at"] is not None for r in runs),
                 blowups=sum(r["loss_blowup_at"] is not None for r in runs))
        for m in EVAL_MODES:
            vals = [r["final_eval"][m] for r in runs if r.get("final_eval") and r["final_eval"].get(m) is not None]
            if vals:
                s[m] = dict(mean=statistics.fmean(vals), std=statistics.stdev(vals) if len(vals) > 1 else 0.0,
                            values=vals)
        for key in ("spikes", "median", "max"):
            vals = [r["grad_norm_stats"][key] for r in runs if r["grad_norm_stats"][key] is not None]
            if vals:
                s["grad_norm_" + key] = statistics.fmean(vals)
        s["train_ms_per_step"] = statistics.fmean(r["train_ms_per_step"] for r in runs)
        out[arm] = s
    return out


def env_info(cfg) -> dict:
    info = dict(python=platform.python_version(), torch=torch.__version__, attnqat=attnqat.build_info(),
                host=platform.node(), has_sdpa=hasattr(attnqat, "sdpa"))
    if cfg["device"] == "cuda":
        p = torch.cuda.get_device_properties(0)
        info["gpu"] = dict(name=p.name, sms=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1))
    else:
        info["cpu_threads"] = torch.get_num_threads()
    return info


# ---- main ---------------------------------------------------------------------------------------

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), required=True)
    ap.add_argument("--data", type=Path, default=data_mod.DEFAULT_OUT, help="prepared data (data.py)")
    ap.add_argument("--out", type=Path, help="output folder (default examples/reproduce/runs/PRESET)")
    ap.add_argument("--seeds", type=int, help="number of continued-training seeds (0..N-1)")
    ap.add_argument("--arms", nargs="+", help=f"subset of the arms ({', '.join(ARMS)})")
    ap.add_argument("--pretrain-steps", type=int)
    ap.add_argument("--arm-steps", type=int)
    ap.add_argument("--device", choices=["cpu", "cuda"])
    ap.add_argument("--bf16-impl", choices=["torch", "attnqat"], help="BF16 attention: torch SDPA (default) or attnqat's bf16 mode")
    ap.add_argument("--api", choices=["sdpa", "attention"], help="attnqat.sdpa (default) or attnqat.attention")
    ap.add_argument("--deterministic", action="store_true", help="attnqat's deterministic backward (slower on CUDA)")
    ap.add_argument("--max-minutes", type=float, help="stop before a phase that would end after this many minutes "
                    "(exit code 75; rerun the same command to resume)")
    ap.add_argument("--until", type=float, help="the same as a Unix time (e.g. $(( $(date +%%s) + 570 )) taken at the "
                    "start of a device command that first builds the package)")
    ap.add_argument("--estimate", action="store_true", help="print the GPU time estimate and exit")
    ap.add_argument("--fresh", action="store_true", help="ignore an existing results.json in --out")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.time()
    cfg = resolve_config(args)
    if args.estimate:
        e = estimate(cfg)
        print(json.dumps(e, indent=1))
        print(f"estimated: {e['total_s'] / 60:.1f} min on one H100 (pretrain {e['pretrain_s']:.0f} s, arms "
              f"{e['arms_s']:.0f} s, eval {e['eval_s']:.0f} s, fixed {e['fixed_s']:.0f} s)")
        return 0
    if cfg["device"] == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--preset gpu needs a CUDA device (or pass --device cpu)")
    if cfg["device"] == "cuda" and not attnqat.build_info()["cuda"]:
        raise SystemExit("this attnqat was built without CUDA kernels; build it on the GPU machine first")
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    out = args.out or HERE / "runs" / args.preset
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(cfg["device"])
    data = Data(args.data, cfg["model"]["ctx"], dev)
    cfg["_val_windows"] = len(data.val_windows)
    hp, ha = study_hash(cfg, "pretrain"), study_hash(cfg, "arms")

    res = None
    if (out / "results.json").exists() and not args.fresh:
        res = json.loads((out / "results.json").read_text())
        if res.get("format") != FORMAT or res.get("pretrain_hash") != hp or res["data"]["outputs"] != data.manifest["outputs"]:
            raise SystemExit(f"{out}/results.json belongs to other settings or data; use another --out or --fresh")
        if res.get("arms_hash") != ha:
            print("note: arm settings changed since the earlier runs in results.json; dropping those runs", flush=True)
            res["runs"] = {}
        print(f"resuming {out}/results.json: pretrain {'done' if res.get('pretrain') else 'to do'}, "
              f"{len(res['runs'])} runs done", flush=True)
    if res is None:
        res = dict(format=FORMAT, complete=False, preset=args.preset, pretrain_hash=hp, arms_hash=ha,
                   data=dict(source=data.manifest["source"], outputs=data.manifest["outputs"]),
                   pretrain=None, checkpoint_eval=None, runs={}, calls=[])
    res["config"] = {k: v for k, v in cfg.items() if not k.startswith("_")}
    res["arms"] = {a: dict(train=spec_for(cfg, **ARMS[a][0]).as_dict(), description=ARMS[a][1]) for a in cfg["arm_names"]}
    res["arms_hash"] = ha
    res["estimate_h100"] = estimate(cfg)
    res["env"] = env_info(cfg)
    res["calls"].append(dict(started=time.strftime("%Y-%m-%dT%H:%M:%S"), argv=sys.argv[1:]))
    mcfg = GPTConfig(**cfg["model"])
    print(f"model: {mcfg.n_params() / 1e6:.2f} M parameters ({mcfg.n_layers} layers, d_model {mcfg.d_model}, "
          f"{mcfg.n_heads} heads x {mcfg.head_dim}, context {mcfg.ctx}); data: "
          f"{data.manifest['outputs']['train.bin']['tokens']:,} train / {data.manifest['outputs']['val.bin']['tokens']:,} "
          f"held-out bytes; device {cfg['device']}; {len(data.val_windows)} held-out windows", flush=True)

    res["preflight"] = preflight(cfg)
    if cfg["device"] == "cuda":
        print("preflight (attention fwd+bwd at the model's shape, one layer): " + ", ".join(
            f"{a} {r['ms_fwd_bwd']:.2f} ms ({r['tflops_equiv']:.0f} TFLOPS-eq.)"
            for a, r in res["preflight"].items() if isinstance(r, dict)), flush=True)
    curve_w = data.eval_set(cfg["curve_eval_windows"])
    final_w = data.eval_set(cfg["final_eval_windows"])
    est = res["estimate_h100"]
    ms = dict(bf16=None, fp4=None)  # measured ms per training step, for the time limit
    for key, r in res["runs"].items():
        arm = key.split("/")[0]
        if arm in ARMS:
            ms["bf16" if ARMS[arm][0]["mode"] == "bf16" else "fp4"] = r["train_ms_per_step"]
    limits = []
    if args.max_minutes is not None:
        limits.append(args.max_minutes * 60)
    if args.until is not None:
        limits.append(args.until - t_start)
    limit = min(limits) if limits else None

    def fits(steps: int, kind: str) -> bool:
        if limit is None:
            return True
        per = ms[kind] or (res["pretrain"] or {}).get("train_ms_per_step")
        if per is None:
            per = est["step_ms_bf16" if kind == "bf16" else "step_ms_fp4"] if cfg["device"] == "cuda" else 100.0
        if kind == "fp4" and ms["fp4"] is None:
            per *= 1.3
        need = steps * per / 1e3 * 1.15 + 10
        return time.time() - t_start + need <= limit

    def stop() -> int:
        res["calls"][-1]["elapsed_s"] = round(time.time() - t_start, 1)
        write_results(res, out)
        print(f"STOPPED before the time limit ({limit / 60:.1f} min from the start): rerun the same command to resume "
              f"({len(res['runs'])} runs done)", flush=True)
        return EXIT_INCOMPLETE

    # 1. pretraining with BF16 attention; 2. the FP4 drop of its checkpoint
    model = GPT(mcfg).to(dev)
    if res["pretrain"] is not None:
        try:
            load_checkpoint(model, out, res["pretrain"]["checkpoint"])
        except (FileNotFoundError, ValueError) as e:
            print(f"checkpoint unusable ({e}); pretraining again", flush=True)
            res["pretrain"], res["checkpoint_eval"], res["runs"] = None, None, {}
    if res["pretrain"] is None:
        if not fits(cfg["pretrain"]["steps"], "bf16"):
            return stop()
        torch.manual_seed(cfg["pretrain_seed"])
        model = GPT(mcfg).to(dev)
        print(f"== pretraining, BF16 attention, {cfg['pretrain']['steps']} steps", flush=True)
        ph = train_phase(model, data, spec_for(cfg, "bf16"), cfg["pretrain"], 10_000 + cfg["pretrain_seed"], cfg,
                         "pretrain", curve_w, ("bf16",))
        if ph["diverged_at"] is not None:
            raise SystemExit("pretraining diverged; see the log")
        ph["checkpoint"] = save_checkpoint(model, out)
        load_checkpoint(model, out, ph["checkpoint"])  # continue from exactly the stored bf16 weights
        res["pretrain"] = ph
        ms["bf16"] = ph["train_ms_per_step"]
        t = time.time()
        res["checkpoint_eval"] = dict(eval_all(model, final_w, cfg), windows=len(final_w),
                                      tokens=len(final_w) * mcfg.ctx, time_s=None)
        res["checkpoint_eval"]["time_s"] = round(time.time() - t, 2)
        write_results(res, out)
    ce = res["checkpoint_eval"]
    print(f"== checkpoint (sha256 {res['pretrain']['checkpoint']['sha256'][:12]}), held-out loss: BF16 {f4(ce['bf16'])}, "
          f"FP4 paper {f4(ce['fp4_paper'])}, FP4 anchored {f4(ce['fp4_anchored'])}", flush=True)
    if None in (ce["bf16"], ce["fp4_paper"], ce["fp4_anchored"]):
        raise SystemExit("the checkpoint's held-out loss is not finite")
    init_state = {k: v.clone() for k, v in model.state_dict().items()}

    # 3. continued training of every arm, seed-major (all arms of seed 0 first)
    for seed in range(cfg["seeds"]):
        for arm in cfg["arm_names"]:
            key = f"{arm}/s{seed}"
            if key in res["runs"]:
                continue
            tspec = spec_for(cfg, **ARMS[arm][0])
            kind = "bf16" if tspec.mode == "bf16" else "fp4"
            if not fits(cfg["arms"]["steps"], kind):
                return stop()
            model.load_state_dict(init_state)
            torch.manual_seed(seed)
            print(f"== {key}: {ARMS[arm][1]}, {cfg['arms']['steps']} steps", flush=True)
            r = train_phase(model, data, tspec, cfg["arms"], 20_000 + seed, cfg, key, curve_w, EVAL_MODES)
            r["final_eval"] = eval_all(model, final_w, cfg) if r["diverged_at"] is None else None
            r["init_checkpoint_sha256"] = res["pretrain"]["checkpoint"]["sha256"]
            r["seed"] = seed
            ms[kind] = r["train_ms_per_step"]
            res["runs"][key] = r
            write_results(res, out)
            fe = r["final_eval"]
            print(f"== {key}: final held-out loss " + (fmt(fe) if fe else "n/a (diverged)") +
                  f"; spikes {r['grad_norm_stats']['spikes']}, {r['time_s']:.0f} s", flush=True)

    res["complete"] = True
    res["calls"][-1]["elapsed_s"] = round(time.time() - t_start, 1)
    write_results(res, out)
    print_table(res)
    print(f"done in {time.time() - t_start:.0f} s: {out / 'results.json'}", flush=True)
    return 0


def print_table(res: dict) -> None:
    ce = res["checkpoint_eval"]
    print(f"\nheld-out loss (nats/byte); BF16 checkpoint: bf16 {f4(ce['bf16'])}, fp4_paper {f4(ce['fp4_paper'])}, "
          f"fp4_anchored {f4(ce['fp4_anchored'])}")
    print(f"{'arm':22s} {'bf16':>16s} {'fp4_paper':>16s} {'fp4_anchored':>16s} {'spikes':>7s} {'|g| med':>8s} "
          f"{'|g| max':>8s} {'div':>4s}")
    for arm, s in res["summary"].items():
        cells = [f"{s[m]['mean']:.4f}±{s[m]['std']:.4f}" if m in s else "n/a" for m in EVAL_MODES]
        print(f"{arm:22s} {cells[0]:>16s} {cells[1]:>16s} {cells[2]:>16s} {s.get('grad_norm_spikes', 0):7.1f} "
              f"{s.get('grad_norm_median', float('nan')):8.3f} {s.get('grad_norm_max', float('nan')):8.3f} "
              f"{s['diverged']:4d}/{s['seeds']}")


if __name__ == "__main__":
    sys.exit(main())
