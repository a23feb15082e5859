"""Diffusion transformer attention: attnqat against cuDNN BF16 on video/image DiT shapes, same
process, same GPU.

Cases (bf16, head dim 128, not causal):

- `wan_1.3b_self`: Wan 2.1 1.3B self-attention, B 1, H 12, N 31200 (the headline shape);
- `wan_14b_self`: Wan 2.1 14B self-attention, B 1, H 40, N 31200;
- `wan_cross_text_mask`: cross-attention from 31200 video tokens to 512 text tokens, H 12, B 2,
  with a text key-padding mask (valid text lengths 512 and 77). attnqat runs through its diffusers
  backend (`attnqat.diffusers`; the function registered with diffusers' dispatcher when diffusers
  is installed, else the module function it wraps), called as diffusers' dispatcher calls it: on
  `[B, S, H, D]` tensors with a boolean `[B, Nk]` mask; the `mask4d` rows pass the same mask as one
  `[B, 1, 1, Nk]` tensor, whose host-side analysis attnqat caches (the `[B, Nk]` form is analysed,
  with a host synchronization, at every call). The baseline is torch SDPA on the same
  tensors (transposed views, as diffusers' "native" backend) with the mask `[B, 1, 1, Nk]`, on
  cuDNN if cuDNN accepts the mask, else on the first of flash, efficient, math that does; the
  JSON's `backend` says which ran. Work counts the visible keys only;
- `flux_joint`: Flux joint attention (4096 image + 512 text tokens), B 1, H 24, N 4608;
- `wan_1.3b_self_diffusers_layout` (not with --quick): the headline shape through the diffusers
  backend on `[B, S, H, D]` views (the strides a diffusers model hands over), baseline likewise.

Per case: `fwd+bwd` (the training step's attention: the forward, then the backward of the output
through autograd, `torch.autograd.grad(o, (q, k, v), do)` as bench_varlen.py does) for attnqat's
`attn_qat` mode and the baseline, and `fwd` (serving: under no_grad) for the `fp4` mode and the
baseline. Times are CUDA-graph replays (common.time_cuda_graph), the same for every
implementation; the eager median is recorded too. The masked case runs eagerly for every
implementation (common.time_cuda): attnqat verifies a mask on the host and runs each group of
equal text lengths as its own call, which CUDA graphs cannot capture. Inputs are not rotated
(compute-bound, as in the other attention benchmarks). Each forward's relative error against the
baseline's output is recorded (a mask that were ignored would show as a large error). TFLOPS
count 4·H·Nq·(visible keys)·D for the forward and 3.5 times that for fwd+bwd, for every
implementation.

Headline `wan_fwd_bwd_attn_qat_vs_cudnn`: cuDNN BF16 fwd+bwd time / attnqat attn_qat fwd+bwd time
on `wan_1.3b_self` (target 0.8).

    python bench/bench_diffusion.py [--out DIR] [--quick] [--cases NAME ...] [--reps N]
    python bench/bench_diffusion.py --smoke --out DIR    # CPU, tiny shapes: code paths only
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import attnqat  # noqa: E402
import attnqat.diffusers  # noqa: E402

HEADLINE = "wan_fwd_bwd_attn_qat_vs_cudnn"
HEADLINE_CASE = "wan_1.3b_self"
TARGET = 0.8
# The SDPA baselines, in the order tried when cuDNN refuses an input (the masked case only).
BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


@dataclass(frozen=True)
class Case:
    name: str
    b: int
    h: int
    nq: int
    nk: int
    d: int = 128
    text_lengths: Optional[Tuple[int, ...]] = None  # key-padding mask: visible keys per batch element
    diffusers_layout: bool = False  # [B, S, H, D] through the diffusers backend
    in_quick: bool = True

    @property
    def visible_keys(self) -> int:
        """Keys summed over the batch (what the work counts)."""
        return sum(self.text_lengths) if self.text_lengths else self.b * self.nk


CASES = (
    Case("wan_1.3b_self", 1, 12, 31200, 31200),
    Case("wan_14b_self", 1, 40, 31200, 31200),
    Case("wan_cross_text_mask", 2, 12, 31200, 512, text_lengths=(512, 77), diffusers_layout=True),
    Case("flux_joint", 1, 24, 4608, 4608),
    Case("wan_1.3b_self_diffusers_layout", 1, 12, 31200, 31200, diffusers_layout=True, in_quick=False),
)


def smoke_case(case: Case) -> Case:
    """The same case at a size the CPU reference runs in a moment (2 heads, ~100 tokens)."""
    nq = max(64, case.nq // 390)
    if case.text_lengths:
        return replace(case, h=2, nq=nq, nk=32, text_lengths=(32, 7))
    return replace(case, h=2, nq=nq, nk=nq)


def diffusers_backend() -> Tuple[Callable, str]:
    """attnqat's diffusers backend function and how it was obtained: from diffusers' registry
    (after attnqat.diffusers.register()), as the dispatcher calls it; without diffusers, the module
    function the registered one wraps (the same code path)."""
    try:
        from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry
    except ImportError:
        return attnqat.diffusers.attention, "attnqat.diffusers.attention (diffusers not installed)"
    attnqat.diffusers.register()
    member = AttentionBackendName(attnqat.diffusers.NAME)
    return _AttentionBackendRegistry._backends[member], f"diffusers registry, backend {attnqat.diffusers.NAME!r}"


def make_inputs(case: Case, device):
    """q, k, v, do in the case's layout ([B, S, H, D] or [B, H, S, D]) and the masks ([B, Nk]
    for the diffusers backend, [B, 1, 1, Nk] for SDPA), or None."""
    g = torch.Generator(device=device).manual_seed(0)

    def t(n):
        shape = (case.b, n, case.h, case.d) if case.diffusers_layout else (case.b, case.h, n, case.d)
        return torch.randn(shape, device=device, dtype=torch.bfloat16, generator=g)

    q, k, v, do = t(case.nq), t(case.nk), t(case.nk), t(case.nq)
    if not case.text_lengths:
        return q, k, v, do, None, None
    lengths = torch.tensor(case.text_lengths, device=device)
    key_padding = torch.arange(case.nk, device=device)[None, :] < lengths[:, None]
    return q, k, v, do, key_padding, key_padding[:, None, None, :]


def sdpa_forward(case: Case, backend: SDPBackend, mask4):
    def fwd(q, k, v):
        if case.diffusers_layout:  # as diffusers' "native" backend: SDPA on [B, H, S, D] views
            q, k, v = (x.transpose(1, 2) for x in (q, k, v))
        with sdpa_kernel(backend):
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask4)
        return o.transpose(1, 2) if case.diffusers_layout else o
    return fwd


def attnqat_forward(case: Case, mode: str, backend_fn, key_padding):
    if case.diffusers_layout:
        def fwd(q, k, v):
            with attnqat.config(mode=mode):
                return backend_fn(query=q, key=k, value=v, attn_mask=key_padding)
    else:
        def fwd(q, k, v):
            return attnqat.attention(q, k, v, causal=False, mode=mode)
    return fwd


def fwd_bwd_step(fwd, q, k, v, do):
    def step(i):
        return torch.autograd.grad(fwd(q, k, v), (q, k, v), do)
    return step


def fwd_step(fwd, q, k, v):
    def step(i):
        with torch.no_grad():
            return fwd(q, k, v)
    return step


def pick_baseline(case: Case, q, k, v, do, mask4, strict: bool):
    """The SDPA backend of the baseline: cuDNN; where not `strict`, the first of BACKENDS that
    runs this case's forward and backward. Returns (name, refusals: {name: reason})."""
    refusals = {}
    for name, backend in BACKENDS.items():
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                fwd_bwd_step(sdpa_forward(case, backend, mask4), q, k, v, do)(0)
            return name, refusals
        except RuntimeError as e:
            reasons = "; ".join(str(w.message).splitlines()[0] for w in caught)
            refusals[name] = f"{str(e).splitlines()[0][:160]}{' | ' + reasons[:400] if reasons else ''}"
            if strict:
                break
    raise RuntimeError(f"{case.name}: no SDPA backend ran the baseline: {refusals}")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm())


def run_case(case: Case, args, device, backend_fn) -> list:
    q, k, v, do, key_padding, mask4 = make_inputs(case, device)
    for x in (q, k, v):
        x.requires_grad_(True)
    graphs = not (args.smoke or case.text_lengths)
    strict = not (args.smoke or case.text_lengths)  # the unmasked cases compare with cuDNN, nothing else
    try:
        base, refusals = pick_baseline(case, q, k, v, do, mask4, strict)
    except RuntimeError as e:  # attnqat is still timed; its rows then have no ratio
        print(e)
        base, refusals = None, {"error": str(e)[:600]}
    if refusals and base:
        print(f"{case.name}: baseline on SDPA {base}; refused: {refusals}")
    impls = {}
    if base:
        impls[(f"sdpa-{base}", "fwd+bwd")] = sdpa_forward(case, BACKENDS[base], mask4)
    impls[("attnqat attn_qat", "fwd+bwd")] = attnqat_forward(case, "attn_qat", backend_fn, key_padding)
    if base:
        impls[(f"sdpa-{base}", "fwd")] = sdpa_forward(case, BACKENDS[base], mask4)
    impls[("attnqat fp4", "fwd")] = attnqat_forward(case, "fp4", backend_fn, key_padding)
    if case.text_lengths:
        # The same mask as [B, 1, 1, Nk], one tensor for every call: attnqat's mask analysis (a
        # host synchronization) is cached for the last mask tensor, which the [B, Nk] form, reshaped
        # by the backend at each call, never is. The difference is that analysis's cost per call.
        impls[("attnqat attn_qat mask4d", "fwd+bwd")] = attnqat_forward(case, "attn_qat", backend_fn, mask4)
        impls[("attnqat fp4 mask4d", "fwd")] = attnqat_forward(case, "fp4", backend_fn, mask4)
    if args.smoke:
        timer, eager = common.time_wall, None
    elif graphs:
        timer, eager = common.time_cuda_graph, common.time_cuda
    else:
        timer, eager = common.time_cuda, None
    flops_fwd = 4.0 * case.h * case.nq * case.visible_keys * case.d
    reference = fwd_step(impls[(f"sdpa-{base}", "fwd")], q, k, v)(0) if base else None
    rows, times = [], {}
    for (impl, part), fwd in impls.items():
        step = fwd_bwd_step(fwd, q, k, v, do) if part == "fwd+bwd" else fwd_step(fwd, q, k, v)
        try:
            if timer is common.time_cuda:
                t = timer(step, warmup=1, reps=args.reps)
            else:
                t = timer(step, calls=2, warmup=1, reps=args.reps)
            if eager is not None:
                t["eager_median_ms"] = eager(step, warmup=1, reps=3)["median_ms"]
            err = None if (impl.startswith("sdpa") or reference is None) else rel_err(
                fwd_step(fwd, q, k, v)(0), reference)
        except (RuntimeError, NotImplementedError, ValueError) as e:
            print(f"{case.name} {impl} {part}: {type(e).__name__}: {str(e)[:200]}")
            continue
        times[(impl, part)] = t
        flops = flops_fwd * (3.5 if part == "fwd+bwd" else 1.0)
        rows.append({"case": case.name, "impl": impl, "pass": part, "backend": base if impl.startswith("sdpa") else
                     "attnqat", **{f: getattr(case, f) for f in ("b", "h", "nq", "nk", "d")},
                     "text_lengths": list(case.text_lengths) if case.text_lengths else None,
                     "layout": "BSHD (diffusers)" if case.diffusers_layout else "BHSD",
                     "baseline_refusals": refusals or None, **t,
                     "tflops": flops / (t["median_ms"] * 1e-3) / 1e12, "rel_err_vs_baseline": err})
    for row in rows:
        b = times.get((f"sdpa-{base}", row["pass"]))
        row["vs_baseline"] = b["median_ms"] / row["median_ms"] if b else None
    del q, k, v, do, reference
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def parse_args(argv=None):
    p = common.bench_parser(__doc__, "3 repetitions, no diffusers-layout case", "tiny shapes")
    p.add_argument("--cases", nargs="+", choices=[c.name for c in CASES], default=None,
                   help="run these cases only (default: all; --quick: all but the diffusers-layout one)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default 7, --quick 3)")
    args = p.parse_args(argv)
    if args.reps is None:
        args.reps = 3 if (args.quick or args.smoke) else 7
    return args


def main(argv=None):
    args = parse_args(argv)
    common.require_device(args.smoke, args.out)
    device = torch.device("cpu" if args.smoke else "cuda")
    banner = common.device_banner(args.smoke)
    common.print_banner(banner)
    backend_fn, backend_source = diffusers_backend()
    print(f"attnqat diffusers backend: {backend_source}")
    cases = [c for c in CASES if (c.name in args.cases if args.cases else (c.in_quick or not args.quick))]
    rows = []
    for case in cases:
        case = smoke_case(case) if args.smoke else case
        print(f"{case.name}: B {case.b}, H {case.h}, Nq {case.nq}, Nk {case.nk}, D {case.d}"
              f"{', text lengths ' + str(case.text_lengths) if case.text_lengths else ''}", flush=True)
        rows += run_case(case, args, device, backend_fn)
    for row in rows:
        row["diffusers_backend"] = backend_source if row["layout"].startswith("BSHD") else None
    path = common.write_results("diffusion", banner, rows, args.out)
    print(f"\n{'case':<31} {'impl':<24} {'pass':<8} {'ms':>9} {'eager':>9} {'TFLOPS':>7} {'x base':>7} "
          f"{'rel err':>8}")
    for r in rows:
        eager = f"{r['eager_median_ms']:9.3f}" if "eager_median_ms" in r else f"{'-':>9}"
        vs = f"{r['vs_baseline']:7.3f}" if r["vs_baseline"] else f"{'-':>7}"
        err = f"{r['rel_err_vs_baseline']:8.4f}" if r["rel_err_vs_baseline"] is not None else f"{'-':>8}"
        print(f"{r['case']:<31} {r['impl']:<24} {r['pass']:<8} {r['median_ms']:9.3f} {eager} {r['tflops']:7.1f} "
              f"{vs} {err}")
    day = str(banner["date"])[:10]
    metrics = {}
    qat = [r for r in rows if r["case"] == HEADLINE_CASE and r["impl"] == "attnqat attn_qat"]
    # (A smoke run has no cuDNN: its headline entry, in its --out directory, compares with what ran.)
    base = [r for r in rows if r["case"] == HEADLINE_CASE and r["pass"] == "fwd+bwd"
            and r["impl"] == ("sdpa-" + r["backend"] if args.smoke else "sdpa-cudnn")]
    if qat and base:
        metrics[HEADLINE] = {
            "value": round(base[0]["median_ms"] / qat[0]["median_ms"], 4), "target": TARGET, "gpu": banner["gpu"],
            "date": day, "source": f"bench/results/{path.name}",
            "aggregate": (f"one shape: B {qat[0]['b']}, H {qat[0]['h']}, N {qat[0]['nq']}, D {qat[0]['d']}, "
                          "not causal; "
                          f"cuDNN BF16 fwd+bwd time over attnqat attn_qat fwd+bwd time ({qat[0]['method']})")}
    elif not args.cases or HEADLINE_CASE in args.cases:
        print(f"\nno {HEADLINE}: the cuDNN baseline or attnqat did not run on {HEADLINE_CASE} (see above)")
    common.update_headline(metrics, args.out)
    print(f"\nwrote {path}")
    common.print_headline(metrics)


if __name__ == "__main__":
    main()
