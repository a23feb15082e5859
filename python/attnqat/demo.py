"""The main job for a new user: ``python -m attnqat.demo``.

Runs attention on realistic random inputs (Gaussian Q, K, V with a few large outlier channels in
K, as trained LLMs have) in every mode and prints, per mode:

- the relative error of the output O against BF16 (unquantized) attention, and of O';
- the fraction of P blocks (16 keys of one query row) whose FP4 scale underflows to zero, in the
  forward (``p~`` against the row max) and in the paper's backward (normalized ``P``, g = 1);
- for the training modes, the cosine of dQ/dK/dV with the BF16 gradients;
- the time of each call.

On a machine without a GPU everything runs on the CPU reference. With a GPU (and a CUDA build)
the CUDA kernels that exist are timed as well, next to ``torch.nn.functional.scaled_dot_product_attention``.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

import attnqat

E4M3_MIN_SUBNORMAL = 2.0**-9


def make_inputs(b, h, n, d, seed, outlier_scale=8.0, q_scale=1.0):
    import torch

    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n, d, generator=g) * q_scale
    k = torch.randn(b, h, n, d, generator=g)
    v = torch.randn(b, h, n, d, generator=g)
    outliers = torch.randperm(d, generator=g)[: max(1, d // 32)]
    k[..., outliers] *= outlier_scale
    return q, k, v


def flush_fractions(q, k, causal: bool):
    """Fraction of 16-key P blocks whose NVFP4 scale rounds to zero.

    A block flushes when its largest value a satisfies e4m3(a / (6 g)) == 0, i.e. a <= 6 g 2^-10.
    Forward (one key tile): p~ = exp2(S2 - m_ref) with m_ref = m (paper, g = 1) or ceil(m)
    (anchored, g = 2^-11). Paper backward: the normalized P with g = 1.
    """
    import torch

    qh = attnqat.fake_quantize(q)
    kh = attnqat.fake_quantize(k)
    c2 = (1.0 / math.sqrt(q.shape[-1])) * math.log2(math.e)
    s2 = torch.einsum("bhqd,bhkd->bhqk", qh.double(), kh.double()) * c2
    nq, nk = s2.shape[-2:]
    if causal:
        mask = torch.ones(nq, nk, dtype=torch.bool).tril(diagonal=nk - nq)
        s2 = s2.masked_fill(~mask, -math.inf)
    m = s2.amax(-1, keepdim=True)
    blocks = lambda p: p.reshape(*p.shape[:-1], nk // 16, 16).amax(-1)
    threshold = lambda g: 6 * g * 2.0**-10
    p_paper = torch.exp2(s2 - m)
    p_anchor = torch.exp2(s2 - torch.ceil(m))
    p_norm = p_paper / p_paper.sum(-1, keepdim=True)
    valid = blocks(torch.isfinite(s2).double()) > 0  # blocks with at least one visible key
    frac = lambda bm, g: float(((bm <= threshold(g)) & valid).sum() / valid.sum())
    return {
        "fwd_paper": frac(blocks(p_paper), 1.0),
        "fwd_anchored": frac(blocks(p_anchor), 2.0**-11),
        "bwd_paper": frac(blocks(p_norm), 1.0),
    }


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def cos(a, b):
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()))


def run(args):
    import torch

    info = attnqat.build_info()
    print(f"attnqat {info['version']} | CUDA kernels: {'yes (' + info['cuda_archs'] + ')' if info['cuda'] else 'no'} "
          f"| torch {info['torch']}")
    b, h, n, d = args.batch, args.heads, args.seq, args.dim
    print(f"inputs: B={b} H={h} N={n} D={d}, causal={args.causal}, K outlier channels x{args.outlier}, "
          f"Q scale {args.q_scale} (CPU reference, fp32)")
    q, k, v = make_inputs(b, h, n, d, args.seed, args.outlier, args.q_scale)

    fl = flush_fractions(q, k, args.causal)
    print(f"P blocks flushed to zero: forward paper {fl['fwd_paper']:.1%}, forward anchored "
          f"{fl['fwd_anchored']:.1%}, paper backward (normalized P) {fl['bwd_paper']:.1%}")

    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(args.seed + 1))

    def call(mode, p_quant="paper", grad=True):
        qq, kk, vv = (t.clone().requires_grad_(grad) for t in (q, k, v))
        t0 = time.perf_counter()
        o = attnqat.attention(qq, kk, vv, causal=args.causal, mode=mode, p_quant=p_quant)
        t1 = time.perf_counter()
        grads = None
        if grad:
            o.backward(do)
            grads = (qq.grad, kk.grad, vv.grad)
        return o.detach(), grads, t1 - t0, time.perf_counter() - t1

    o_bf16, g_bf16, tf, tb = call("bf16")
    rows = [("bf16", "-", 0.0, tf, tb, (1.0, 1.0, 1.0))]
    _, _, tf4, _ = call("fp4", grad=False)
    o_fp4, _, _, _ = call("fp4", grad=False)
    rows.append(("fp4", "paper", rel(o_fp4, o_bf16), tf4, float("nan"), None))
    for mode, pq in (("drop_in_qat", "paper"), ("attn_qat", "paper"), ("attn_qat", "anchored")):
        o, g, tf, tb = call(mode, pq)
        rows.append((mode, pq, rel(o, o_bf16), tf, tb, tuple(cos(a, b) for a, b in zip(g, g_bf16))))

    print()
    print(f"{'mode':<12} {'p_quant':<9} {'O rel.err':>9} {'fwd s':>7} {'bwd s':>7}   cos(dQ,dK,dV) vs bf16")
    for mode, pq, err, tf, tb, cs in rows:
        cs_s = "  ".join(f"{c:.4f}" for c in cs) if cs else "(no backward)"
        tb_s = f"{tb:7.2f}" if tb == tb else "      -"
        print(f"{mode:<12} {pq:<9} {err:9.4f} {tf:7.2f} {tb_s}   {cs_s}")

    if torch.cuda.is_available() and info["cuda"]:
        time_gpu(args)
    elif torch.cuda.is_available():
        print("\nA GPU is present but this build has no CUDA kernels (install with a CUDA toolkit).")
    else:
        print("\nNo GPU: only the CPU reference ran. On a GPU machine this demo also times the kernels.")


def time_gpu(args):
    """Times the CUDA kernels that exist against PyTorch on the same GPU."""
    import torch
    import torch.nn.functional as F

    dev = torch.device("cuda")
    print(f"\nGPU: {torch.cuda.get_device_name(dev)}")
    x = torch.randn(64 * 1024 * 1024 // 2, device=dev, dtype=torch.bfloat16).view(-1, 128)  # 64 MiB

    def bench(fn, reps=20):
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return float(np.median(times))

    t_copy = bench(lambda: x.clone())
    t_fq = bench(lambda: attnqat.fake_quantize(x))
    t_q = bench(lambda: attnqat.quantize_nvfp4(x))
    nbytes = x.numel() * 2
    print(f"copy {2 * nbytes / t_copy / 1e6:.0f} GB/s | fake_quantize {2 * nbytes / t_fq / 1e6:.0f} GB/s | "
          f"quantize {(nbytes + nbytes / 4 + nbytes / 32) / t_q / 1e6:.0f} GB/s  (64 MiB bf16, bytes read+written)")
    q, k, v = (torch.randn(4, 16, 4096, 128, device=dev, dtype=torch.bfloat16) for _ in range(3))
    t_sdpa = bench(lambda: F.scaled_dot_product_attention(q, k, v))
    print(f"torch SDPA bf16 forward (4x16x4096x128): {4 * 4 * 16 * 4096**2 * 128 / t_sdpa / 1e9:.0f} TFLOPS")
    try:
        t_a = bench(lambda: attnqat.attention(q, k, v, mode="fp4"))
        print(f"attnqat fp4 forward: {4 * 4 * 16 * 4096**2 * 128 / t_a / 1e9:.0f} TFLOPS")
    except NotImplementedError as e:
        print(f"attnqat attention on CUDA: {e}")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m attnqat.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--causal", action="store_true")
    p.add_argument("--outlier", type=float, default=8.0, help="scale of K's outlier channels")
    p.add_argument("--q-scale", type=float, default=1.0, help="scale of Q (smaller: more diffuse rows)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a small problem (seconds)")
    args = p.parse_args(argv)
    if args.quick:
        args.heads, args.seq, args.dim = 2, 256, 64
    try:
        import torch  # noqa: F401
    except ImportError:
        raise SystemExit("attnqat.demo needs torch: install torch (pip install attnqat[torch]); the library itself works on numpy arrays")
    run(args)


if __name__ == "__main__":
    main()
