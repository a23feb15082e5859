"""Attn-QAT for a video diffusion transformer: diffusers' Wan, synthetic video latents, flow matching.

    python examples/diffusion_qat.py                       # one H100/H200 (the default size)
    python examples/diffusion_qat.py --tiny --out /tmp/d   # CPU smoke run (seconds)

Nothing is downloaded. The model is a randomly initialised ``WanTransformer3DModel`` (Wan 2.1's
architecture: self-attention over the video tokens with 3-D rotary positions, cross-attention to
the text, timestep modulation) built from a config (--layers, --heads, --head-dim, ...). The data
are made here, deterministic from --seed:

- "video latents" ``[C, F, H, W]``: per sample two Gaussian blobs that move across the frames
  (wrapping around the edges) plus a travelling low-frequency wave. The sample's *class* fixes
  the blobs' direction and speed, their channel mix and the wave's frequency, channel mix and
  temporal speed; the positions, sizes and phases are random per sample. Each sample has unit
  RMS.
- "text": one fixed random embedding ``[--text-len, --text-dim]`` per class, given to the model
  as ``encoder_hidden_states``: the class is only in the text, so the model must use its
  cross-attention to denoise well.

Training is rectified flow (flow matching): ``x_t = (1 - t) x0 + t noise`` with ``t`` logit-normal
(``sigmoid`` of a standard normal), the model predicts ``v = noise - x0`` from ``x_t``, the
timestep ``1000 t`` and the text, MSE loss. Attention goes through attnqat's diffusers backend,
set once as a user would::

    attnqat.diffusers.register()
    model.set_attention_backend("attnqat")
    with attnqat.config(mode="attn_qat", p_quant="paper"):
        loss = flow_matching_loss(model, batch); loss.backward()

Phases (each arm continues from the same pretrained weights, with the same batches, the same
learning-rate schedule and the same number of steps, so the comparisons are paired):

1. ``pretrain``: --pretrain-steps with ``mode="bf16"`` (exact attention), AdamW, warm-up then
   cosine decay to 10% of --lr. Its weights are the checkpoint.
2. arms, --steps each from the checkpoint, peak learning rate --qat-lr (by default the
   pretraining's final rate): ``bf16`` (control), ``drop_in_qat`` (FP4 forward, high-precision
   backward), ``attn_qat_paper`` (``mode="attn_qat"``, the paper's P quantization) and
   ``attn_qat_anchored`` (``p_quant="anchored"``).
   Every step logs the loss and the pre-clip gradient norm; every --probe-every steps the dV
   probe captures q, k, v and the output gradient of one self-attention call of the training
   step (layer --probe-layer) and compares the dV of ``attnqat.attention`` in the arm's mode with
   the BF16 backward's dV on the same inputs (cosine).
3. evaluation of the pretrained checkpoint and of every arm: the held-out flow-matching loss
   (fixed held-out latents, noise and timesteps) with BF16 attention and with FP4 attention
   (``mode="fp4"``, P paper and anchored), and sampling: --sample-steps Euler steps of the flow
   ODE from the same noise and texts, with BF16 and with FP4 attention; the relative error
   ``|x_fp4 - x_bf16| / |x_bf16|`` of the final samples says how far FP4 serving moves the
   model's output (the paper: after Attn-QAT much less than before).

Outputs in --out: ``results.json`` (configuration, timing per phase, every curve, the evaluation),
``curves.csv`` (one row per training step) and ``curves.png`` (loss, gradient norm, dV cosine;
needs matplotlib, which is optional: without it the PNG is skipped with a message). A table is
printed at the end.

Device: CUDA when available (fp32 master weights, bf16 autocast; the CUDA kernels need head dim
64 or 128), else the CPU (fp32; attnqat's C++ reference, head dims multiples of 16).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

import attnqat
import attnqat.diffusers

# The continued-training arms: the attnqat options of their training steps.
ARMS = {
    "bf16": dict(mode="bf16"),
    "drop_in_qat": dict(mode="drop_in_qat", p_quant="paper"),
    "attn_qat_paper": dict(mode="attn_qat", p_quant="paper"),
    "attn_qat_anchored": dict(mode="attn_qat", p_quant="anchored"),
}
# The attention of the evaluations.
EVAL_MODES = {
    "bf16": dict(mode="bf16"),
    "fp4_paper": dict(mode="fp4", p_quant="paper"),
    "fp4_anchored": dict(mode="fp4", p_quant="anchored"),
}
FP4_EVAL_MODES = tuple(m for m in EVAL_MODES if m != "bf16")

# Sizes. "gpu" is meant for one H100/H200 in about 6 minutes (an estimate: it has not been timed
# yet); "tiny" runs on 2 CPU cores in seconds (CI).
PRESETS = {
    "gpu": dict(layers=6, heads=12, head_dim=128, ffn_dim=4096, channels=16, frames=16, height=32, width=32,
                text_len=32, text_dim=256, classes=8, batch=2, pretrain_steps=1000, steps=250, lr=2e-4,
                probe_every=25, log_every=25, eval_batches=8, samples=4, sample_steps=16),
    "tiny": dict(layers=1, heads=2, head_dim=64, ffn_dim=256, channels=4, frames=4, height=8, width=8,
                 text_len=8, text_dim=32, classes=4, batch=4, pretrain_steps=80, steps=20, lr=2e-3,
                 probe_every=10, log_every=20, eval_batches=2, samples=4, sample_steps=4),
}
PATCH = (1, 2, 2)  # Wan's patch: one frame, 2 x 2 latent pixels per token


# ---- data -------------------------------------------------------------------------------------

class SyntheticVideoLatents:
    """Moving blobs and travelling waves in ``[C, F, H, W]`` latents; the class sets the motion and
    the channel mixes, and is given to the model only through its text embedding (module docstring).

    Everything is drawn from CPU generators (the same data on every device)."""

    def __init__(self, channels: int, frames: int, height: int, width: int, classes: int, text_len: int,
                 text_dim: int, seed: int):
        self.shape = (channels, frames, height, width)
        g = torch.Generator().manual_seed(seed)
        self.blob_mix = F.normalize(torch.randn(classes, channels, generator=g), dim=1) * channels**0.5
        self.wave_mix = F.normalize(torch.randn(classes, channels, generator=g), dim=1) * channels**0.5
        angle = 2 * math.pi * (torch.arange(classes) + torch.rand(classes, generator=g)) / classes
        speed = 0.5 + torch.rand(classes, generator=g)  # latent pixels per frame
        self.velocity = torch.stack([speed * torch.sin(angle), speed * torch.cos(angle)], 1)  # (dy, dx)
        self.wave_freq = torch.randint(1, 3, (classes, 2), generator=g).float()  # cycles per height / width
        self.wave_speed = (torch.rand(classes, generator=g) - 0.5) * 1.5  # radians per frame
        self.text = torch.randn(classes, text_len, text_dim, generator=g)
        self.classes = classes

    def sample(self, n: int, g: torch.Generator):
        """``n`` latents ``[n, C, F, H, W]`` (float32) and their classes ``[n]``."""
        c_, f_, h_, w_ = self.shape
        cls = torch.randint(0, self.classes, (n,), generator=g)
        frame = torch.arange(f_, dtype=torch.float32)
        y = torch.arange(h_, dtype=torch.float32)
        x = torch.arange(w_, dtype=torch.float32)
        blobs = torch.zeros(n, f_, h_, w_)
        for _ in range(2):
            start = torch.rand(n, 2, generator=g) * torch.tensor([h_, w_])
            sigma = (0.1 + 0.1 * torch.rand(n, generator=g)) * min(h_, w_)
            center = start[:, None, :] + frame[None, :, None] * self.velocity[cls][:, None, :]  # [n, F, 2]
            dy = _wrapped(y[None, None, :] - center[..., :1], h_)  # [n, F, H]
            dx = _wrapped(x[None, None, :] - center[..., 1:], w_)  # [n, F, W]
            r2 = dy[..., :, None] ** 2 + dx[..., None, :] ** 2
            blobs += torch.exp(-r2 / (2 * sigma[:, None, None, None] ** 2))
        phase = torch.rand(n, generator=g) * 2 * math.pi
        ky, kx = self.wave_freq[cls, 0], self.wave_freq[cls, 1]
        arg = (2 * math.pi * (ky[:, None, None, None] * y[None, None, :, None] / h_
                              + kx[:, None, None, None] * x[None, None, None, :] / w_)
               + self.wave_speed[cls][:, None, None, None] * frame[None, :, None, None] + phase[:, None, None, None])
        wave = 0.5 * torch.cos(arg)
        latents = (self.blob_mix[cls][:, :, None, None, None] * blobs[:, None]
                   + self.wave_mix[cls][:, :, None, None, None] * wave[:, None])
        latents = latents / latents.pow(2).mean(dim=(1, 2, 3, 4), keepdim=True).sqrt()
        return latents, cls


def _wrapped(d: torch.Tensor, period: int) -> torch.Tensor:
    """The signed distance ``d`` on a circle of ``period`` (the blobs wrap around the edges)."""
    return torch.remainder(d + period / 2, period) - period / 2


def flow_matching_batch(data: SyntheticVideoLatents, n: int, g: torch.Generator, t: Optional[torch.Tensor] = None):
    """(x_t, t, classes, target v) of rectified flow: x_t = (1 - t) x0 + t noise, v = noise - x0;
    ``t`` logit-normal unless given."""
    x0, cls = data.sample(n, g)
    noise = torch.randn(x0.shape, generator=g)
    if t is None:
        t = torch.sigmoid(torch.randn(n, generator=g))
    tt = t[:, None, None, None, None]
    return (1 - tt) * x0 + tt * noise, t, cls, noise - x0


# ---- model ------------------------------------------------------------------------------------

def build_model(args, device: torch.device):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(args.seed)
    model = WanTransformer3DModel(
        patch_size=PATCH, num_attention_heads=args.heads, attention_head_dim=args.head_dim,
        in_channels=args.channels, out_channels=args.channels, text_dim=args.text_dim, freq_dim=256,
        ffn_dim=args.ffn_dim, num_layers=args.layers, rope_max_seq_len=max(64, args.frames, args.height, args.width))
    return model.to(device)


class Runner:
    """The device, the autocast region and the model call (timestep 1000 t, as Wan's pipelines)."""

    def __init__(self, model, device: torch.device):
        self.model = model
        self.device = device
        self.amp = device.type == "cuda"  # bf16 autocast on CUDA; fp32 on the CPU

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.amp else contextlib.nullcontext()

    def predict(self, x_t, t, text):
        d = self.device
        with self.autocast():
            return self.model(hidden_states=x_t.to(d), timestep=(1000 * t).to(d),
                              encoder_hidden_states=text.to(d)).sample.float()

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()


# ---- the dV probe ---------------------------------------------------------------------------

class AttentionProbe:
    """Captures the q, k, v ``[B, S, H, D]`` that one attention module passes to the attention
    backend, and the gradient of that call's output, during the steps run under :meth:`capture`.

    diffusers offers no hook on the attention call inside a processor, so :meth:`capture` wraps the
    ``dispatch_attention_fn`` that Wan's processor calls (restored on exit) and records the call
    made while ``module`` runs (between its forward pre-hook and forward hook)."""

    def __init__(self, module):
        self._inside = False
        self.q = self.k = self.v = self.dout = None
        self.dtype = None
        module.register_forward_pre_hook(lambda *_: setattr(self, "_inside", True))
        module.register_forward_hook(lambda *_: setattr(self, "_inside", False))

    @contextlib.contextmanager
    def capture(self):
        from diffusers.models.transformers import transformer_wan

        real = transformer_wan.dispatch_attention_fn
        self.q = self.k = self.v = self.dout = None

        def recording(query, key, value, *args, **kwargs):
            out = real(query, key, value, *args, **kwargs)
            if self._inside and out.requires_grad:
                self.q, self.k, self.v = (t.detach() for t in (query, key, value))
                self.dtype = out.dtype  # the dtype the attention ran in (autocast's on CUDA)
                out.register_hook(lambda grad: setattr(self, "dout", grad.detach()))
            return out

        transformer_wan.dispatch_attention_fn = recording
        try:
            yield self
        finally:
            transformer_wan.dispatch_attention_fn = real

    def dv_cosine(self, options: dict) -> float:
        """cos(dV in ``options``' mode, dV of the BF16 backward) on the captured inputs and output
        gradient (attnqat.attention on ``[B, H, S, D]``)."""
        if self.dout is None:
            raise RuntimeError("AttentionProbe: nothing captured (the probed module did not run under capture())")
        q, k, v, dout = (t.transpose(1, 2).to(self.dtype).contiguous() for t in (self.q, self.k, self.v, self.dout))

        def dv(opts):
            v_ = v.clone().requires_grad_(True)
            o = attnqat.attention(q, k, v_, **opts)
            (grad,) = torch.autograd.grad(o, v_, dout)
            return grad.float().flatten()

        return float(F.cosine_similarity(dv(options), dv(dict(mode="bf16")), dim=0))


# ---- training -------------------------------------------------------------------------------

def lr_factor(step: int, steps: int, warmup: int, floor: float = 0.1) -> float:
    """Linear warm-up to 1, then cosine decay to ``floor``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def train(runner: Runner, data: SyntheticVideoLatents, options: dict, steps: int, lr: float, args, label: str,
          probe: Optional[AttentionProbe] = None) -> dict:
    """``steps`` flow-matching steps with attnqat ``options``; the batches come from --seed and
    ``label``'s phase (every arm draws the same ones). Returns the curves."""
    model = runner.model
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, warmup))
    g = torch.Generator().manual_seed(args.seed * 1000 + (1 if label == "pretrain" else 2))
    curves = dict(loss=[], grad_norm=[], probe_step=[], dv_cosine=[], diverged_at=None)
    t0 = time.time()
    for step in range(steps):
        x_t, t, cls, target = flow_matching_batch(data, args.batch, g)
        probing = probe is not None and (step % args.probe_every == 0 or step == steps - 1)
        capture = probe.capture() if probing else contextlib.nullcontext()
        with attnqat.config(**options, deterministic=args.deterministic), capture:
            loss = F.mse_loss(runner.predict(x_t, t, data.text[cls]), target.to(runner.device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip))
        loss_value = loss.detach().item()
        curves["loss"].append(loss_value)
        curves["grad_norm"].append(grad_norm)
        if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
            curves["diverged_at"] = step
            print(f"[{label}] step {step}: non-finite loss or gradient norm ({loss_value}, {grad_norm}); "
                  "this arm stops here", flush=True)
            break
        opt.step()
        sched.step()
        if probing:
            curves["probe_step"].append(step)
            curves["dv_cosine"].append(probe.dv_cosine(options))
        if step % args.log_every == 0 or step == steps - 1:
            dv = f"  dV cos {curves['dv_cosine'][-1]:.4f}" if probing else ""
            print(f"[{label}] step {step:5d}  loss {loss_value:.4f}  grad norm {grad_norm:.3f}{dv}  "
                  f"({time.time() - t0:.1f} s)", flush=True)
    return curves


# ---- evaluation -----------------------------------------------------------------------------

def heldout_set(data: SyntheticVideoLatents, args) -> List[tuple]:
    """Fixed held-out batches: their own latents and noise, and timesteps evenly spread over (0, 1)."""
    g = torch.Generator().manual_seed(args.seed * 1000 + 3)
    n = args.eval_batches * args.batch
    t_all = (torch.arange(n) + 0.5) / n
    t_all = t_all[torch.randperm(n, generator=g)]
    return [flow_matching_batch(data, args.batch, g, t_all[i * args.batch:(i + 1) * args.batch])
            for i in range(args.eval_batches)]


@torch.no_grad()
def heldout_loss(runner: Runner, data: SyntheticVideoLatents, batches, options: dict, text_shift: int = 0) -> float:
    """The mean flow-matching loss of ``batches``; ``text_shift`` 1 gives every latent the text of
    the next class (the wrong text: how much the model relies on its conditioning)."""
    runner.model.eval()
    with attnqat.config(**options):
        losses = [float(F.mse_loss(runner.predict(x_t, t, data.text[(cls + text_shift) % data.classes]),
                                   target.to(runner.device)))
                  for x_t, t, cls, target in batches]
    return sum(losses) / len(losses)


@torch.no_grad()
def sample(runner: Runner, noise: torch.Tensor, text: torch.Tensor, steps: int, options: dict) -> torch.Tensor:
    """Euler integration of the flow ODE dx/dt = v(x, t) from t = 1 (noise) to t = 0 (data)."""
    runner.model.eval()
    x = noise.to(runner.device)
    ts = torch.linspace(1.0, 0.0, steps + 1)
    with attnqat.config(**options):
        for i in range(steps):
            v = runner.predict(x, ts[i].expand(len(x)), text)
            x = x + (ts[i + 1] - ts[i]).item() * v
    return x.cpu()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def evaluate(runner: Runner, data: SyntheticVideoLatents, batches, noise, text, args) -> dict:
    losses = {name: heldout_loss(runner, data, batches, opts) for name, opts in EVAL_MODES.items()}
    samples = {name: sample(runner, noise, text, args.sample_steps, opts) for name, opts in EVAL_MODES.items()}
    return dict(
        heldout_loss=losses,
        heldout_loss_wrong_text=heldout_loss(runner, data, batches, EVAL_MODES["bf16"], text_shift=1),
        sample_rel_err={name: relative_error(samples[name], samples["bf16"]) for name in FP4_EVAL_MODES},
        sample_rms={name: float(s.pow(2).mean().sqrt()) for name, s in samples.items()},
        sample_sha256={name: hashlib.sha256(s.contiguous().numpy().tobytes()).hexdigest()
                       for name, s in samples.items()},
    )


# ---- outputs --------------------------------------------------------------------------------

def finite_or_none(x):
    """JSON has no NaN/Inf: non-finite numbers are written as null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: finite_or_none(v) for k, v in x.items()}
    if isinstance(x, list):
        return [finite_or_none(v) for v in x]
    return x


def write_curves_csv(path: Path, results: dict) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["phase", "step", "loss", "grad_norm", "dv_cosine"])
        phases = {"pretrain": results["pretrain"], **results["arms"]}
        for phase, c in phases.items():
            dv = dict(zip(c["probe_step"], c["dv_cosine"]))
            for step, (loss, gn) in enumerate(zip(c["loss"], c["grad_norm"])):
                w.writerow([phase, step, loss, gn, dv.get(step, "")])


def write_curves_png(path: Path, results: dict) -> bool:
    """loss (pretraining and arms), gradient norm and dV cosine; False when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def smooth(values, window):
        out, acc = [], []
        for v in values:
            acc = (acc + [v])[-window:]
            out.append(sum(acc) / len(acc))
        return out

    arms = results["arms"]
    window = max(1, min(len(c["loss"]) for c in arms.values()) // 20)
    fig, ax = plt.subplots(1, 4, figsize=(20, 4.2))
    pre = results["pretrain"]["loss"]
    ax[0].plot(smooth(pre, max(1, len(pre) // 50)), color="k")
    ax[0].set(title="pretraining loss (bf16 attention)", xlabel="step", ylabel="flow-matching MSE", yscale="log")
    for name, c in arms.items():
        ax[1].plot(smooth(c["loss"], window), label=name)
        ax[2].plot(c["grad_norm"], label=name, lw=0.8)
        ax[3].plot(c["probe_step"], c["dv_cosine"], marker="o", ms=3, label=name)
    ax[1].set(title="continued training loss" + (f" (mean of the last {window} steps)" if window > 1 else ""),
              xlabel="step")
    ax[2].set(title="gradient norm (before clipping)", xlabel="step", yscale="log")
    ax[3].set(title=f"dV cosine vs the BF16 backward (layer {results['config']['probe_layer']} self-attention)",
              xlabel="step")
    for a in ax[1:]:
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def print_table(results: dict) -> None:
    ev = results["evaluation"]
    print("\nheld-out flow-matching loss (bf16 / fp4 attention) and FP4 sampling error |x_fp4 - x_bf16| / |x_bf16|:")
    print(f"{'model':<19} {'loss bf16':>10} {'fp4 paper':>10} {'fp4 anch.':>10} {'err paper':>10} {'err anch.':>10} "
          f"{'dV cos':>8}")
    for name, e in ev.items():
        l, r = e["heldout_loss"], e["sample_rel_err"]
        arm = results["arms"].get(name)
        dv = f"{arm['dv_cosine'][-1]:8.4f}" if arm and arm["dv_cosine"] else f"{'-':>8}"
        print(f"{name:<19} {l['bf16']:10.4f} {l['fp4_paper']:10.4f} {l['fp4_anchored']:10.4f} "
              f"{r['fp4_paper']:10.4f} {r['fp4_anchored']:10.4f} {dv}")
    print("(dV cos: the last probe of the arm's training; err: relative error of the final Euler samples)")
    for arm, c in results["arms"].items():
        if c["diverged_at"] is not None:
            print(f"{arm} diverged at step {c['diverged_at']} (non-finite loss or gradient norm); its row is the "
                  "model before that step")
    wrong = ", ".join(f"{name} {e['heldout_loss_wrong_text']:.4f}" for name, e in ev.items())
    print(f"held-out loss with the text of another class (bf16 attention): {wrong}")
    control = ev["bf16"]["sample_rel_err"]
    for arm in ("attn_qat_paper", "attn_qat_anchored"):
        ratios = ", ".join(f"{m} {ev[arm]['sample_rel_err'][m] / control[m]:.3f}" for m in FP4_EVAL_MODES)
        print(f"FP4 sampling error of {arm} / that of the bf16 control: {ratios}")


# ---- main -----------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="the CPU smoke size (CI); else the one-GPU size")
    sizes = PRESETS["gpu"]
    for name, help_text in (("layers", "transformer blocks"), ("heads", "attention heads"),
                            ("head-dim", "attention head dim (CUDA: a multiple of 16 up to 128)"), ("ffn-dim", "feed-forward width"),
                            ("channels", "latent channels C"), ("frames", "latent frames F"),
                            ("height", "latent height H (even)"), ("width", "latent width W (even)"),
                            ("text-len", "text tokens per class"), ("text-dim", "text embedding width"),
                            ("classes", "classes (texts)"), ("batch", "latents per step"),
                            ("pretrain-steps", "bf16 pretraining steps"), ("steps", "continued-training steps per arm"),
                            ("probe-every", "dV probe every this many steps"),
                            ("log-every", "print every this many steps"),
                            ("eval-batches", "held-out batches"), ("samples", "sampled latents per model and mode"),
                            ("sample-steps", "Euler steps of the flow ODE")):
        key = name.replace("-", "_")
        p.add_argument(f"--{name}", type=int, default=None, help=f"{help_text} (default {sizes[key]}, --tiny "
                       f"{PRESETS['tiny'][key]})")
    p.add_argument("--lr", type=float, default=None, help="pretraining peak learning rate (default 2e-4, --tiny 2e-3)")
    p.add_argument("--qat-lr", type=float, default=None,
                   help="continued-training peak learning rate (default: the pretraining's final rate, lr / 10)")
    p.add_argument("--clip", type=float, default=1.0, help="gradient clipping (global norm)")
    p.add_argument("--probe-layer", type=int, default=None, help="block whose self-attention the dV probe watches "
                   "(default the middle one)")
    p.add_argument("--deterministic", action="store_true", help="attnqat's deterministic backward (slower on CUDA)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "diffusion_results"))
    args = p.parse_args(argv)
    preset = PRESETS["tiny" if args.tiny else "gpu"]
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.qat_lr is None:
        args.qat_lr = args.lr * 0.1
    if args.probe_layer is None:
        args.probe_layer = args.layers // 2
    if not 0 <= args.probe_layer < args.layers:
        p.error(f"--probe-layer {args.probe_layer}: the model has {args.layers} layers")
    if args.device.startswith("cuda") and (args.head_dim % 16 or not 16 <= args.head_dim <= 128):
        p.error(f"--head-dim {args.head_dim}: attnqat's CUDA kernels take head dims 16, 32, ..., 128")
    if args.height % PATCH[1] or args.width % PATCH[2]:
        p.error(f"--height and --width must be multiples of {PATCH[1]} (Wan's 2 x 2 patches)")
    if min(args.layers, args.heads, args.head_dim, args.batch, args.pretrain_steps, args.steps, args.probe_every,
           args.log_every, args.eval_batches, args.samples, args.sample_steps, args.classes) < 1:
        p.error("sizes and step counts must be positive")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    t_start = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    attnqat.diffusers.register()
    data = SyntheticVideoLatents(args.channels, args.frames, args.height, args.width, args.classes, args.text_len,
                                 args.text_dim, args.seed)
    model = build_model(args, device)
    model.set_attention_backend("attnqat")
    runner = Runner(model, device)
    probe = AttentionProbe(model.blocks[args.probe_layer].attn1)
    tokens = args.frames * (args.height // PATCH[1]) * (args.width // PATCH[2])
    n_params = sum(p.numel() for p in model.parameters())
    print(f"WanTransformer3DModel: {args.layers} layers, {args.heads} heads x {args.head_dim}, "
          f"{n_params / 1e6:.2f} M parameters; latents {args.channels}x{args.frames}x{args.height}x{args.width} = "
          f"{tokens} tokens per sample, batch {args.batch}; {device}"
          f"{' (bf16 autocast)' if runner.amp else ' (fp32)'}", flush=True)
    timing: Dict[str, float] = {}
    results = dict(config=dict(vars(args), device=str(device), autocast_bf16=runner.amp, tokens_per_sample=tokens,
                               parameters=n_params, attnqat=attnqat.build_info()["version"]),
                   timing_s=timing, arms={}, evaluation={})

    def timed(name, fn, *fn_args):
        runner.sync()
        t0 = time.time()
        out = fn(*fn_args)
        runner.sync()
        timing[name] = time.time() - t0
        print(f"-- {name}: {timing[name]:.1f} s", flush=True)
        return out

    results["pretrain"] = timed("pretrain", train, runner, data, ARMS["bf16"], args.pretrain_steps, args.lr, args,
                                "pretrain")
    checkpoint = {k: v.detach().clone() for k, v in model.state_dict().items()}
    # The evaluation's fixed inputs: held-out batches, and the noise and texts the samplers start from.
    heldout = heldout_set(data, args)
    noise = torch.randn(args.samples, *data.shape, generator=torch.Generator().manual_seed(args.seed * 1000 + 4))
    text = data.text[torch.arange(args.samples) % args.classes]
    evaluation_inputs = (runner, data, heldout, noise, text, args)
    results["evaluation"]["pretrained"] = timed("evaluate pretrained", evaluate, *evaluation_inputs)
    for arm, options in ARMS.items():
        model.load_state_dict(checkpoint)
        curves = timed(arm, train, runner, data, options, args.steps, args.qat_lr, args, arm, probe)
        results["arms"][arm] = dict(curves, options=options)
        results["evaluation"][arm] = timed(f"evaluate {arm}", evaluate, *evaluation_inputs)
    timing["total"] = time.time() - t_start

    write_curves_csv(out / "curves.csv", results)
    png = write_curves_png(out / "curves.png", results)
    results["files"] = dict(results="results.json", curves_csv="curves.csv", curves_png="curves.png" if png else None)
    with open(out / "results.json", "w") as f:
        json.dump(finite_or_none(results), f, indent=1, allow_nan=False)
    print_table(results)
    print("\ntime per phase: " + ", ".join(f"{k} {v:.1f} s" for k, v in timing.items()))
    no_png = " (no curves.png: matplotlib is not installed; pip install matplotlib)"
    print(f"wrote {out / 'results.json'}, {out / 'curves.csv'}" + (f", {out / 'curves.png'}" if png else no_png))
    return results


if __name__ == "__main__":
    main()
