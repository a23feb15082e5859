"""Bit-for-bit A/B of two builds of attnqat on one GPU (used by tools/ab_bench.sh).

    python bench/ab_bitwise.py run OUT.pt        # with PYTHONPATH pointing at one build
    python bench/ab_bitwise.py compare A.pt B.pt # prints a table; exit 1 when anything differs

`run` calls the public API on fixed inputs — forward and backward in every mode, p_quant,
mask, dtype and head dim the CUDA kernels take, GQA, odd lengths, token V blocks, attention from
packed NVFP4, the FP4 KV cache decode, the quantizers — and saves every output. The outputs of
the same inputs must be identical between two builds whose arithmetic is meant to be the same
(a refactoring). dQ of the non-deterministic backward is accumulated with atomics in an order
that changes from run to run, so it is compared with the deterministic backward's dQ instead,
which is bit-reproducible; every other output is compared bit for bit.
"""

import argparse
import itertools
import sys

import torch


def _inputs(seed, b, hq, hkv, nq, nk, d, dtype, device="cuda"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, nq, d, generator=g) * 1.5
    k = torch.randn(b, hkv, nk, d, generator=g) * 1.5
    v = torch.randn(b, hkv, nk, d, generator=g)
    do = torch.randn(b, hq, nq, d, generator=g)
    return [t.to(device, dtype) for t in (q, k, v, do)]


def run(path, device):
    import attnqat  # only here: `compare` runs without the package

    out = {}
    shapes = [(1, 4, 4, 256, 256), (2, 8, 2, 200, 333), (1, 2, 1, 77, 1000)]
    if device == "cpu":  # a smoke test of this script on the reference: small shapes
        shapes = [(1, 2, 1, 40, 70)]
    modes = ["bf16", "fp4", "drop_in_qat", "attn_qat"]
    case = 0
    for (b, hq, hkv, nq, nk), d, dtype, mode, p_quant, causal in itertools.product(
            shapes, (64, 128), (torch.bfloat16, torch.float16), modes, ("paper", "anchored"), (False, True)):
        if mode == "bf16" and p_quant == "anchored":
            continue
        case += 1
        q, k, v, do = _inputs(case, b, hq, hkv, nq, nk, d, dtype, device)
        name = f"{mode}/{p_quant}/{'causal' if causal else 'full'}/d{d}/{str(dtype)[6:]}/{b}x{hq}x{hkv}x{nq}x{nk}"
        train = mode != "fp4"
        for deterministic in ((False, True) if train else (False,)):
            qq, kk, vv = (t.clone().requires_grad_(train) for t in (q, k, v))
            o, lse = attnqat.attention(qq, kk, vv, mode=mode, p_quant=p_quant, causal=causal, return_lse=True,
                                       deterministic=deterministic)
            tag = f"{name}/det{int(deterministic)}"
            out[f"{tag}/o"] = o.detach().cpu()
            out[f"{tag}/lse"] = lse.detach().cpu()
            if train:
                o.backward(do)
                out[f"{tag}/dk"] = kk.grad.cpu()
                out[f"{tag}/dv"] = vv.grad.cpu()
                if deterministic:
                    out[f"{tag}/dq"] = qq.grad.cpu()
    # Token-blocked V (non-causal).
    q, k, v, do = _inputs(7, 1, 4, 4, 256, 320, 128, torch.bfloat16, device)
    o = attnqat.attention(q, k, v, mode="fp4", v_blocks="token")
    out["fp4/v_blocks_token/o"] = o.cpu()
    # Attention from packed NVFP4, both unpack paths.
    for unpack, causal in itertools.product(("kernel", "temporary"), (False, True)):
        qp, kp, vp = (attnqat.quantize_nvfp4(t) for t in (q, k, v))
        try:
            o = attnqat.attention_packed(qp, kp, vp, causal=causal, unpack=unpack)
        except TypeError:  # builds before the option's rename called it `decode`
            o = attnqat.attention_packed(qp, kp, vp, causal=causal, decode=unpack)
        out[f"packed/{unpack}/{int(causal)}/o"] = o.cpu()
    # The FP4 KV cache: append, then decode 1 and 4 query tokens, GQA 4, both P rules.
    for d, p_quant, nq in itertools.product((64, 128), ("paper", "anchored"), (1, 4)):
        cache = attnqat.FP4KVCache(num_pages=64, page_size=16, num_kv_heads=2, head_dim=d, device=device)
        seqs = [cache.new_sequence() for _ in range(3)]
        g = torch.Generator().manual_seed(d + nq)
        for n, s in zip((100, 333, 17), seqs):
            kv = torch.randn(2, 1, 2, n, d, generator=g).to(device, torch.bfloat16)
            cache.append([s], kv[0], kv[1])
        qd = torch.randn(3, 8, nq, d, generator=g).to(device, torch.bfloat16)
        o = cache.attend(qd, seqs, p_quant=p_quant)
        out[f"decode/d{d}/{p_quant}/nq{nq}/o"] = (o[0] if isinstance(o, tuple) else o).cpu()
    # Quantizers.
    x = _inputs(11, 2, 3, 3, 100, 64, 128, torch.bfloat16, device)[0]
    out["quant/fake_nvfp4"] = attnqat.fake_quantize(x).cpu()
    out["quant/fake_mxfp4"] = attnqat.fake_quantize(x, format="mxfp4").cpu()
    qt = attnqat.quantize_nvfp4(x, global_scale="amax")
    out["quant/nvfp4_data"] = qt.data.cpu()
    out["quant/nvfp4_scales"] = qt.scales.cpu()
    torch.save(out, path)
    print(f"{len(out)} outputs -> {path}")


def compare(a_path, b_path):
    a, b = torch.load(a_path), torch.load(b_path)
    bad = 0
    for key in sorted(set(a) | set(b)):
        if key not in a or key not in b:
            print(f"MISSING  {key}")
            bad += 1
            continue
        x, y = a[key], b[key]
        same = x.shape == y.shape and x.dtype == y.dtype and torch.equal(x.view(torch.uint8), y.view(torch.uint8))
        if not same:
            bad += 1
            diff = (x.float() - y.float()).abs().nan_to_num(0).max().item() if x.shape == y.shape else float("nan")
            print(f"DIFFERS  {key}  max|a-b| = {diff:.3e}")
    print(f"{len(a)} outputs compared: {len(a) - bad} bit-identical, {bad} differ")
    return bad == 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("out")
    r.add_argument("--device", default="cuda")
    c = sub.add_parser("compare")
    c.add_argument("a")
    c.add_argument("b")
    args = ap.parse_args()
    if args.cmd == "run":
        run(args.out, args.device)
        return 0
    return 0 if compare(args.a, args.b) else 1


if __name__ == "__main__":
    sys.exit(main())
