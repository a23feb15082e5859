"""FP4 inference benchmarks, same process, same GPU:

1. Decode over the paged FP4 KV cache against BF16 decode through
   torch.nn.functional.scaled_dot_product_attention (cuDNN and flash backends; the faster counts),
   batch 1, 8, 32; 32 query heads, 8 KV heads, head dim 128; one query token; contexts 8k..128k.
   Effective bandwidth = (packed codes + scales read) / time, against the device-to-device copy
   bandwidth (bytes read + written) measured in the same run. Next to each: the read-only floor,
   a Triton kernel that only reads the same number of bytes (timed the same way): its bandwidth
   fraction bounds what any decode kernel can reach at that shape, and bf16 / floor its speedup.
2. Attention from packed NVFP4 Q, K, V (attention_packed) against the fp4 forward on the decoded
   bf16 inputs (the same consumers with inputs_quantized), for each decode path: "kernel" (decoded
   inside the sm90 kernel), "temporary" (decoded into 16-bit temporaries first) and "auto" (the
   default's choice, which the headline reports); then a grid of query lengths and GQA groups that
   shows where the in-kernel decode pays (kAuto's threshold, src/cuda/decode/api.cu).

Times are CUDA-graph replays (no host overhead, baselines alike), inputs rotated beyond L2.
Headline metrics (bench/results/headline.json): decode_fp4_speedup_vs_bf16 and decode_bw_fraction
are the minimum over the decode grid (context >= 8k); packed_fwd_vs_fp4_fwd the minimum
throughput ratio over the forward shapes.

    python bench/bench_decode.py [--out DIR] [--quick] [--contexts 8192 32768 131072]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import attnqat  # noqa: E402
from attnqat import _C  # noqa: E402

# The raw binding calls below (no Python overhead in the timed region) in both of its forms: one
# options object (this tree), or positional options (older builds, which tools/ab_bench.sh times
# with this same script).
_OPTIONS_OBJECT = hasattr(_C, "AttentionOptions")


def _c_decode(q, kd, ks, vd, vs, table, lens, out, ctx, stream):
    if _OPTIONS_OBJECT:
        _C.decode_attention(q, kd, ks, vd, vs, table, lens, out, None,
                            _C.DecodeOptions(p_quant="anchored", max_seq_len=ctx), stream=stream)
    else:
        _C.decode_attention(q, kd, ks, vd, vs, table, lens, out, None, 0.0, "anchored", 0, ctx, stream=stream)


def _c_fp4_forward_quantized(q, k, v, o, lse, causal, stream):
    if _OPTIONS_OBJECT:
        opts = _C.AttentionOptions(mode="fp4", p_quant="anchored", causal=causal, bwd_quantized_qkv=False,
                                   bwd_quant_p=False, bwd_high_precision_o=False, inputs_quantized=True)
        _C.attention_forward(q, k, v, o, None, lse, None, None, opts, stream=stream)
    else:
        _C.attention_forward(q, k, v, o, None, lse, None, None, "fp4", "anchored", "channel", causal, 0.0,
                             128, False, False, False, "fp32", True, False, stream=stream)


def _c_packed_forward(pq, pk, pv, o, lse, causal, where, stream):
    arrays = (pq.data, pq.scales, pq.global_scale, pk.data, pk.scales, pk.global_scale, pv.data, pv.scales,
              pv.global_scale)
    if _OPTIONS_OBJECT:
        opts = _C.AttentionOptions(mode="fp4", p_quant="anchored", causal=causal)
        _C.attention_forward_packed(*arrays, o, lse, None, None, opts, where, stream=stream)
    else:
        _C.attention_forward_packed(*arrays, o, lse, None, None, "anchored", "channel", causal, 0.0, 128, where,
                                    stream=stream)

HQ, HKV, D = 32, 8, 128
PAGE = 256
TARGET_SPEEDUP, TARGET_BW, TARGET_PACKED = 3.0, 0.8, 0.9


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    a.random_(0, 255)
    t = common.time_cuda(lambda i: b.copy_(a), warmup=3, reps=20)["median_ms"] * 1e-3
    del a, b
    return 2 * n / t


_READ_FLOOR_KERNEL = None


def _read_floor_kernel():
    """A Triton kernel that only reads its input (int32 words, BLOCK per program, one xor-sum
    written per program): the floor of any one-kernel decode that reads the same bytes."""
    global _READ_FLOOR_KERNEL
    if _READ_FLOOR_KERNEL is None:
        import triton
        import triton.language as tl

        @triton.jit
        def read_floor(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
            pid = tl.program_id(0)
            offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
            v = tl.load(x_ptr + offs, mask=offs < n, other=0)
            tl.store(out_ptr + pid, tl.xor_sum(v, axis=0))

        _READ_FLOOR_KERNEL = (triton, read_floor)
    return _READ_FLOOR_KERNEL


def read_floor_ms(nbytes: int, reps: int) -> float:
    """Per-call time of the read-only kernel over `nbytes`, timed like the decode (CUDA-graph
    replays, input sets rotated beyond L2); the best of three block sizes."""
    triton, kernel = _read_floor_kernel()
    n = -(-nbytes // 4)
    sets = common.rotation_count(4 * n)
    bufs = [torch.randint(-2**31, 2**31 - 1, (n,), dtype=torch.int32, device="cuda") for _ in range(sets)]
    best = None
    for block in (1024, 4096, 8192):
        grid = (triton.cdiv(n, block),)
        out = torch.empty(grid[0], dtype=torch.int32, device="cuda")

        def run(i, block=block, grid=grid, out=out):
            kernel[grid](bufs[i], out, n, BLOCK=block, num_warps=4 if block <= 1024 else 8)

        ms = common.time_cuda_graph(run, sets=sets, reps=reps)["median_ms"]
        best = ms if best is None else min(best, ms)
    del bufs
    return best


def fp4_bytes_per_token_head(d: int = D) -> int:
    return 2 * (d // 2 + d // 16)  # K and V: codes + E4M3 scales


def bench_decode(batch: int, ctx: int, bw_copy: float, reps: int, d: int = D) -> dict:
    dev = "cuda"
    bf16_set = 2 * batch * HKV * ctx * d * 2
    fp4_set = batch * HKV * ctx * fp4_bytes_per_token_head(d)
    sets_bf16 = common.rotation_count(bf16_set)
    sets_fp4 = common.rotation_count(fp4_set)
    pages_per_seq = -(-ctx // PAGE)
    num_pages = sets_fp4 * batch * pages_per_seq
    cache = attnqat.FP4KVCache(num_pages, PAGE, HKV, d, dev)
    kd, ks, vd, vs = cache.layer_tensors()
    perm = torch.randperm(num_pages, device=dev, dtype=torch.int64).to(torch.int32)
    tables = [perm[s * batch * pages_per_seq:(s + 1) * batch * pages_per_seq].view(batch, pages_per_seq).contiguous()
              for s in range(sets_fp4)]
    zeros = torch.zeros(batch, dtype=torch.int32, device=dev)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device=dev)
    kv_sets = []
    for s in range(max(sets_fp4, sets_bf16)):
        k = torch.randn(batch, HKV, ctx, d, device=dev, dtype=torch.bfloat16)
        v = torch.randn(batch, HKV, ctx, d, device=dev, dtype=torch.bfloat16)
        if s < sets_fp4:
            attnqat.kv_cache_append(kd, ks, vd, vs, k, v, tables[s], zeros, check=False)
        if s < sets_bf16:
            kv_sets.append((k, v))
        else:
            del k, v
    qs = [torch.randn(batch, HQ, 1, d, device=dev, dtype=torch.bfloat16) for _ in range(max(sets_fp4, sets_bf16))]
    out = torch.empty(batch, HQ, 1, d, device=dev, dtype=torch.bfloat16)
    stream = lambda: torch.cuda.current_stream().cuda_stream  # noqa: E731

    def fp4(i):
        _c_decode(qs[i], kd, ks, vd, vs, tables[i], lens, out, ctx, stream())

    row = {"batch": batch, "context": ctx, "hq": HQ, "hkv": HKV, "d": d, "page_size": PAGE,
           "fp4_bytes": fp4_set, "bf16_bytes": bf16_set}
    row["fp4_ms"] = common.time_cuda_graph(fp4, sets=sets_fp4, reps=reps)["median_ms"]
    # Sanity: the FP4 decode against SDPA on the dequantized cache of sequence 0 (FP4 P error only).
    fp4(0)
    k_hat, v_hat = (x.to(torch.bfloat16)[None] for x in _dequant_seq(cache, tables[0][0], ctx, d))
    ref = F.scaled_dot_product_attention(attnqat.fake_quantize(qs[0][:1]), k_hat, v_hat, enable_gqa=True)
    row["rel_err_vs_sdpa_on_decoded"] = float((out[:1].float() - ref.float()).norm() / ref.float().norm())
    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
        def bf16(i, backend=backend):
            k, v = kv_sets[i % len(kv_sets)]
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(qs[i], k, v, enable_gqa=True)
        try:
            row[f"{name}_ms"] = common.time_cuda_graph(bf16, sets=sets_bf16, reps=reps)["median_ms"]
        except Exception as e:  # a backend that does not take this shape
            row[f"{name}_ms"] = None
            row[f"{name}_error"] = str(e).splitlines()[0][:200]
    base = [row[f"{n}_ms"] for n in ("cudnn", "flash") if row.get(f"{n}_ms")]
    row["bf16_best_ms"] = min(base) if base else None
    row["speedup_vs_bf16"] = row["bf16_best_ms"] / row["fp4_ms"] if base else None
    row["fp4_bw_gbs"] = fp4_set / (row["fp4_ms"] * 1e-3) / 1e9
    row["bf16_bw_gbs"] = bf16_set / (row["bf16_best_ms"] * 1e-3) / 1e9 if base else None
    row["bw_fraction_of_copy"] = row["fp4_bw_gbs"] * 1e9 / bw_copy
    if d == 64:
        # The previous CUDA path at head dim 64 (before the decode kernel took it): per sequence,
        # Q quantized and attention_packed over the sequence's packed K, V with the bottom-right
        # mask — timed here with the K, V already gathered (the old path also gathered the pages
        # on every call), one input set.
        k0, v0 = kv_sets[0]
        pk, pv = attnqat.quantize_nvfp4(k0), attnqat.quantize_nvfp4(v0)
        pks = [attnqat.QuantizedTensor(pk.data[b:b + 1], pk.scales[b:b + 1], pk.global_scale, "nvfp4", "last",
                                       (1, HKV, ctx, d), torch.bfloat16) for b in range(batch)]
        pvs = [attnqat.QuantizedTensor(pv.data[b:b + 1], pv.scales[b:b + 1], pv.global_scale, "nvfp4", "last",
                                       (1, HKV, ctx, d), torch.bfloat16) for b in range(batch)]

        def per_sequence(i):
            for b in range(batch):
                attnqat.attention_packed(attnqat.quantize_nvfp4(qs[0][b:b + 1]), pks[b], pvs[b], causal=True)

        row["per_sequence_forward_ms"] = common.time_cuda_graph(per_sequence, reps=reps)["median_ms"]
        del pk, pv, pks, pvs
    del cache, kv_sets, qs
    torch.cuda.empty_cache()
    # The floor: a kernel that only reads the same number of bytes. Its bandwidth fraction bounds
    # what any decode can reach at this shape, bf16_best / floor its speedup.
    try:
        row["read_floor_ms"] = read_floor_ms(fp4_set, reps)
        row["read_floor_bw_fraction"] = fp4_set / (row["read_floor_ms"] * 1e-3) / bw_copy
        row["speedup_bound_vs_bf16"] = row["bf16_best_ms"] / row["read_floor_ms"] if base else None
    except Exception as e:  # no Triton: the floor is left out
        row["read_floor_ms"] = None
        row["read_floor_error"] = str(e).splitlines()[0][:200]
    torch.cuda.empty_cache()
    return row


def _dequant_seq(cache, table_row, ctx, d=D):
    """K^, V^ [Hkv, ctx, d] of the sequence whose pages are table_row (exact)."""
    pages = table_row.long()
    res = []
    for data, scales in ((cache.k_data[0], cache.k_scales[0]), (cache.v_data[0], cache.v_scales[0])):
        dd = data.index_select(0, pages).permute(1, 0, 2, 3).reshape(HKV, -1, d // 2)[:, :ctx].contiguous()
        ss = scales.index_select(0, pages).permute(1, 0, 2, 3).reshape(HKV, -1, d // 16)[:, :ctx].contiguous()
        qt = attnqat.QuantizedTensor(dd, ss, torch.ones(1, device="cuda"), "nvfp4", "last", (HKV, ctx, d),
                                     torch.bfloat16)
        res.append(qt.dequantize())
    return res


def bench_packed(b: int, h: int, n: int, causal: bool, reps: int, hkv: int = 0, nq: int = 0) -> dict:
    """attention_packed against the fp4 forward on the decoded bf16 tensors, with each decode
    path ("kernel": in the sm90 kernel; "temporary": into 16-bit temporaries; "auto": the
    default's choice). hkv / nq default to h / n (self-attention shapes)."""
    hkv, nq = hkv or h, nq or n
    q = torch.randn(b, h, nq, D, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(b, hkv, n, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    pq, pk, pv = (attnqat.quantize_nvfp4(t) for t in (q, k, v))
    qh, kh, vh = (t.dequantize() for t in (pq, pk, pv))
    o = torch.empty_like(q)
    lse = torch.empty(b, h, nq, device="cuda", dtype=torch.float32)
    stream = lambda: torch.cuda.current_stream().cuda_stream  # noqa: E731

    def fp4_fwd(i):  # the fp4 forward on fake-quantized bf16 inputs (no re-quantization)
        _c_fp4_forward_quantized(qh, kh, vh, o, lse, causal, stream())

    def packed(where):
        def run(i):
            _c_packed_forward(pq, pk, pv, o, lse, causal, where, stream())
        return run

    flops = common.attention_flops(b, h, nq, n, D, causal)
    row = {"batch": b, "heads": h, "heads_kv": hkv, "seq_q": nq, "seq": n, "d": D, "causal": causal}
    row["fp4_fwd_ms"] = common.time_cuda_graph(fp4_fwd, reps=reps)["median_ms"]
    row["fp4_fwd_tflops"] = flops / row["fp4_fwd_ms"] / 1e9
    fp4_fwd(0)
    o_ref = o.clone()
    row["bit_identical"] = True
    for where in ("auto", "kernel", "temporary"):
        ms = common.time_cuda_graph(packed(where), reps=reps)["median_ms"]
        row[f"packed_{where}_ms"] = ms
        row[f"packed_{where}_vs_fp4_fwd"] = row["fp4_fwd_ms"] / ms
        o.fill_(float("nan"))
        packed(where)(0)
        row["bit_identical"] = row["bit_identical"] and bool(torch.equal(o, o_ref))
    # The default path (auto) is what the headline metric reports.
    row["packed_ms"] = row["packed_auto_ms"]
    row["packed_tflops"] = flops / row["packed_ms"] / 1e9
    row["packed_vs_fp4_fwd"] = row["packed_auto_vs_fp4_fwd"]
    return row


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768, 131072])
    p.add_argument("--reps", type=int, default=15)
    args = p.parse_args()
    banner = common.device_banner()
    common.print_banner(banner)
    bw_copy = copy_bandwidth()
    print(f"# device-to-device copy: {bw_copy / 1e9:.0f} GB/s (read + write)")
    contexts = [8192] if args.quick else args.contexts
    rows = []
    for b in args.batches:
        for ctx in contexts:
            r = bench_decode(b, ctx, bw_copy, args.reps)
            rows.append({"kind": "decode", **r})
            print(f"decode B={b:3d} ctx={ctx:6d}: fp4 {r['fp4_ms']*1e3:8.1f} us  cudnn {_us(r.get('cudnn_ms'))}  "
                  f"flash {_us(r.get('flash_ms'))}  speedup {r['speedup_vs_bf16'] or 0:5.2f}x  "
                  f"bw {r['fp4_bw_gbs']:6.0f} GB/s ({100 * r['bw_fraction_of_copy']:4.1f}% of copy)  "
                  f"err {r['rel_err_vs_sdpa_on_decoded']:.3f}  read-only floor {_us(r.get('read_floor_ms'))}"
                  + (f" ({100 * r['read_floor_bw_fraction']:4.1f}% of copy, speedup bound "
                     f"{r['speedup_bound_vs_bf16']:.2f}x)" if r.get("read_floor_ms") else ""), flush=True)
    # Head dim 64 (the Llama-3.2-1B / Qwen2.5-0.5B class): not part of the main grid or the
    # headline; next to BF16 SDPA and the previous CUDA path (a packed forward per sequence).
    for b in ([1, 8] if not args.quick else [1]):
        for ctx in ([8192, 32768] if not args.quick else [8192]):
            r = bench_decode(b, ctx, bw_copy, args.reps, d=64)
            rows.append({"kind": "decode_d64", **r})
            print(f"decode d=64 B={b:3d} ctx={ctx:6d}: fp4 {r['fp4_ms']*1e3:8.1f} us  cudnn {_us(r.get('cudnn_ms'))}  "
                  f"flash {_us(r.get('flash_ms'))}  speedup {r['speedup_vs_bf16'] or 0:5.2f}x  "
                  f"({100 * r['bw_fraction_of_copy']:4.1f}% of copy)  previous path (packed forward per sequence) "
                  f"{_us(r.get('per_sequence_forward_ms'))}  err {r['rel_err_vs_sdpa_on_decoded']:.3f}", flush=True)
    fwd_shapes = [(8, 16, 4096), (2, 16, 16384)] if not args.quick else [(8, 16, 4096)]
    for b, h, n in fwd_shapes:
        for causal in (False, True):
            r = bench_packed(b, h, n, causal, args.reps)
            rows.append({"kind": "packed_fwd", **r})
            print(f"packed fwd B={b} H={h} N={n} causal={causal}: fp4 fwd {r['fp4_fwd_tflops']:6.1f} TFLOPS, "
                  f"packed {r['packed_tflops']:6.1f} TFLOPS, ratio {r['packed_vs_fp4_fwd']:.3f} "
                  f"(kernel {r['packed_kernel_vs_fp4_fwd']:.3f}, temporary {r['packed_temporary_vs_fp4_fwd']:.3f}), "
                  f"bit-identical {r['bit_identical']}", flush=True)
    # Where the in-kernel decode pays (kAuto's threshold): query blocks per KV head =
    # group * ceil(Nq / 128); Nk = 8192, causal off, 32 query heads.
    if not args.quick:
        for hkv in (32, 8):
            for nq in (128, 256, 512, 1024, 2048):
                r = bench_packed(4, 32, 8192, False, args.reps, hkv=hkv, nq=nq)
                rows.append({"kind": "packed_paths", **r})
                blocks = (32 // hkv) * -(-nq // 128)
                print(f"packed paths Hkv={hkv} Nq={nq} Nk=8192 (query blocks per KV head {blocks}): "
                      f"kernel {r['packed_kernel_vs_fp4_fwd']:.3f}, temporary {r['packed_temporary_vs_fp4_fwd']:.3f}, "
                      f"auto {r['packed_auto_vs_fp4_fwd']:.3f} (x the fp4 forward), "
                      f"bit-identical {r['bit_identical']}", flush=True)
    path = common.write_results("decode", {**banner, "copy_bw_gbs": bw_copy / 1e9}, rows, args.out)
    dec = [r for r in rows if r["kind"] == "decode" and r["context"] >= 8192 and r["speedup_vs_bf16"]]
    fwd = [r for r in rows if r["kind"] == "packed_fwd"]
    day = str(banner["date"])
    metrics = {}
    if dec:
        metrics["decode_fp4_speedup_vs_bf16"] = {"value": round(min(r["speedup_vs_bf16"] for r in dec), 3),
                                                 "target": TARGET_SPEEDUP, "gpu": banner["gpu"], "date": day,
                                                 "source": path.name}
        metrics["decode_bw_fraction"] = {"value": round(min(r["bw_fraction_of_copy"] for r in dec), 3),
                                         "target": TARGET_BW, "gpu": banner["gpu"], "date": day, "source": path.name}
    if fwd:
        metrics["packed_fwd_vs_fp4_fwd"] = {"value": round(min(r["packed_vs_fp4_fwd"] for r in fwd), 3),
                                            "target": TARGET_PACKED, "gpu": banner["gpu"], "date": day,
                                            "source": path.name}
    common.update_headline(metrics, args.out)
    print(f"# cache bytes per token (per layer, {HKV} KV heads, D={D}): fp4 {HKV * fp4_bytes_per_token_head()} "
          f"vs bf16 {HKV * 2 * D * 2} ({HKV * 2 * D * 2 / (HKV * fp4_bytes_per_token_head()):.2f}x)")
    print(f"# results: {path}")
    print("\n| B | ctx | fp4 us | bf16 best us | speedup | fp4 GB/s | % copy | read floor us | floor % copy | speedup bound |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in dec:
        fl = (f"{r['read_floor_ms']*1e3:.1f} | {100*r['read_floor_bw_fraction']:.1f} | {r['speedup_bound_vs_bf16']:.2f}"
              if r.get("read_floor_ms") else "n/a | n/a | n/a")
        print(f"| {r['batch']} | {r['context']} | {r['fp4_ms']*1e3:.1f} | {r['bf16_best_ms']*1e3:.1f} | "
              f"{r['speedup_vs_bf16']:.2f} | {r['fp4_bw_gbs']:.0f} | {100*r['bw_fraction_of_copy']:.1f} | {fl} |")
    for k, m in metrics.items():
        print(f"{k}: {m['value']} (target {m['target']})")


def _us(ms):
    return f"{ms * 1e3:8.1f} us" if ms else "     n/a"


if __name__ == "__main__":
    main()
