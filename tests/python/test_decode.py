"""FP4 inference: attention from packed NVFP4 tensors, the paged FP4 KV cache, decode.

CPU tests (CI) check the reference paths bit for bit against ``attention(mode="fp4")`` on the raw
tensors (the same quantized operands, the same arithmetic) and the errors of bad input. GPU
tests (marker ``gpu``; they fail, never skip, without a GPU) check the CUDA cache bytes against
the CPU cache bit for bit, decode outputs against the CPU reference within the tolerance of
tests/cpp/cuda_decode (relative L2 2e-3 on top of the output rounding: ex2.approx may move P
elements that sit on an E2M1 boundary), and the packed forward against the CUDA forward on the
decoded tensors bit for bit.
"""

import math

import pytest
import torch

import attnqat
from attnqat import FP4KVCache

from conftest import rel_err


def _seqs(lens, hkv, d, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    ks = [torch.randn(1, hkv, n, d, generator=g).to(dtype) for n in lens]
    vs = [torch.randn(1, hkv, n, d, generator=g).to(dtype) for n in lens]
    return ks, vs


def _fill(cache, lens, ks, vs, chunk=7, layer=0, device="cpu"):
    ids = [cache.new_sequence() for _ in lens]
    for sid, n, k, v in zip(ids, lens, ks, vs):
        for t0 in range(0, n, chunk):
            cache.append([sid], k[:, :, t0:t0 + chunk].to(device), v[:, :, t0:t0 + chunk].to(device), layer=layer)
    return ids


def _reference(q, ks, vs, p_quant, dtype=torch.float32):
    """attention(mode='fp4') per sequence on the raw K, V (CPU, fp32): the decode contract."""
    outs, lses = [], []
    for b in range(q.shape[0]):
        o, lse = attnqat.attention(q[b:b + 1].float().cpu(), ks[b].float(), vs[b].float(), mode="fp4",
                                   causal=True, p_quant=p_quant, return_lse=True)
        outs.append(o.to(dtype))
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


def _assert_close_to_reference(out, lse, ref, ref_lse):
    """GPU decode vs the CPU reference: O within 5e-3 relative L2 (fp32 summation order and
    ex2.approx move P elements across E2M1/E4M3 boundaries, see tests/cpp/cuda_decode), LSE within
    1e-4 relative, the same rows without keys (-inf)."""
    err = rel_err(out.cpu(), ref)
    assert err < 5e-3, f"rel err {err}"
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse.cpu()), finite)
    assert (lse.cpu()[finite] - ref_lse[finite]).abs().max() < 1e-4 * max(1.0, ref_lse[finite].abs().max().item())


# ---- CPU: the reference paths ------------------------------------------------------------------


@pytest.mark.parametrize("page_size,group,nq,lens,p_quant", [
    (16, 1, 1, [1], "anchored"),
    (16, 4, 1, [15, 16, 17], "anchored"),
    (48, 8, 1, [40, 3], "paper"),
    (64, 4, 3, [130, 2, 65], "anchored"),
])
def test_cpu_decode_matches_fp4_attention(page_size, group, nq, lens, p_quant):
    hkv, d = 2, 32
    cache = FP4KVCache(64, page_size, hkv, d, "cpu")
    ks, vs = _seqs(lens, hkv, d, 1)
    ids = _fill(cache, lens, ks, vs)
    q = torch.randn(len(lens), hkv * group, nq, d)
    out, lse = cache.attend(q, ids, p_quant=p_quant, return_lse=True)
    ref, ref_lse = _reference(q, ks, vs, p_quant)
    assert torch.equal(out, ref)
    assert torch.equal(lse, ref_lse)


def test_cpu_cache_holds_the_quantized_tensors():
    hkv, d, lens = 2, 64, [37, 5]
    cache = FP4KVCache(16, 16, hkv, d, "cpu", num_layers=2)
    ks, vs = _seqs(lens, hkv, d, 2)
    ids = _fill(cache, lens, ks, vs, chunk=5, layer=1)
    for sid, k, v, n in zip(ids, ks, vs, lens):
        k_hat, v_hat = cache.dequantize(sid, layer=1)
        assert torch.equal(k_hat, attnqat.fake_quantize(k[0]))
        assert torch.equal(v_hat, attnqat.fake_quantize(v[0]))
        assert cache.length(sid, 1) == n and cache.length(sid, 0) == 0
    assert cache.bytes_per_token == 2 * 2 * hkv * (d // 2 + d // 16)
    # Freed pages return to the pool.
    used = cache.num_pages - cache.free_pages
    cache.free_sequence(ids[0])
    assert cache.num_pages - cache.free_pages == used - math.ceil(lens[0] / 16)


@pytest.mark.parametrize("causal", [False, True])
def test_cpu_attention_packed_matches_fp4(causal):
    q, k, v = torch.randn(2, 4, 33, 64), torch.randn(2, 2, 70, 64), torch.randn(2, 2, 70, 64)
    pq, pk, pv = (attnqat.quantize_nvfp4(t) for t in (q, k, v))
    o, lse = attnqat.attention_packed(pq, pk, pv, causal=causal, return_lse=True)
    ref, ref_lse = attnqat.attention(q, k, v, mode="fp4", causal=causal, return_lse=True)
    assert torch.equal(o, ref) and torch.equal(lse, ref_lse)


def test_cpu_bad_input_errors():
    with pytest.raises(ValueError, match="multiple of 16"):
        FP4KVCache(4, 24, 2, 64)
    cache = FP4KVCache(2, 16, 2, 64)
    sid = cache.new_sequence()
    with pytest.raises(ValueError, match="dtype"):
        cache.append([sid], torch.zeros(1, 2, 1, 64, dtype=torch.int32), torch.zeros(1, 2, 1, 64, dtype=torch.int32))
    with pytest.raises(ValueError, match="expected shape"):
        cache.append([sid], torch.zeros(1, 3, 1, 64), torch.zeros(1, 3, 1, 64))
    with pytest.raises(RuntimeError, match="out of pages"):
        cache.append([sid], torch.zeros(1, 2, 33, 64), torch.zeros(1, 2, 33, 64))
    # Explicit page tables: ids out of range, lengths beyond capacity, wrong index dtype.
    k_data, k_scales, v_data, v_scales = cache.layer_tensors()
    new = torch.zeros(1, 2, 4, 64)
    with pytest.raises(ValueError, match=r"page_table\[0, 0\]: page id 5 is out of range"):
        attnqat.kv_cache_append(k_data, k_scales, v_data, v_scales, new, new,
                                torch.tensor([[5]], dtype=torch.int32), torch.tensor([0], dtype=torch.int32))
    with pytest.raises(ValueError, match="beyond the capacity"):
        attnqat.kv_cache_append(k_data, k_scales, v_data, v_scales, new, new,
                                torch.tensor([[0]], dtype=torch.int32), torch.tensor([14], dtype=torch.int32))
    with pytest.raises(ValueError, match="int32"):
        attnqat.kv_cache_append(k_data, k_scales, v_data, v_scales, new, new,
                                torch.tensor([[0]], dtype=torch.int64), torch.tensor([0], dtype=torch.int32))
    with pytest.raises(ValueError, match="beyond the capacity"):
        attnqat.decode_attention(torch.zeros(1, 2, 1, 64), k_data, k_scales, v_data, v_scales,
                                 torch.tensor([[0]], dtype=torch.int32), torch.tensor([17], dtype=torch.int32))
    with pytest.raises(TypeError, match="QuantizedTensor"):
        attnqat.attention_packed(torch.zeros(1, 1, 16, 64), torch.zeros(1, 1, 16, 64), torch.zeros(1, 1, 16, 64))
    p = attnqat.quantize_nvfp4(torch.randn(1, 1, 16, 64))
    with pytest.raises(ValueError, match="unpack: expected one of 'auto', 'kernel', 'temporary', got 'fused'"):
        attnqat.attention_packed(p, p, p, unpack="fused")


# ---- GPU ---------------------------------------------------------------------------------------

DECODE_CASES = [
    # (page_size, hkv, group, nq, lens, p_quant, dtype)
    (16, 2, 4, 1, [1], "anchored", torch.bfloat16),
    (16, 2, 4, 1, [15], "anchored", torch.bfloat16),
    (32, 4, 1, 1, [16], "anchored", torch.float16),
    (64, 1, 8, 1, [17], "anchored", torch.bfloat16),
    (64, 2, 4, 1, [4095], "anchored", torch.bfloat16),
    (256, 2, 4, 1, [100_000], "anchored", torch.bfloat16),
    (16, 2, 4, 1, [4095, 1, 17, 300, 16, 1000], "anchored", torch.bfloat16),
    (48, 2, 8, 2, [513, 3, 77], "anchored", torch.float16),
    (128, 2, 4, 1, [2000, 17], "paper", torch.bfloat16),
]


@pytest.mark.gpu
@pytest.mark.parametrize("page_size,hkv,group,nq,lens,p_quant,dtype", DECODE_CASES)
def test_gpu_decode_matches_reference(cuda, page_size, hkv, group, nq, lens, p_quant, dtype):
    d = 128
    pages = sum(-(-n // page_size) for n in lens) + 2
    ks, vs = _seqs(lens, hkv, d, 3, dtype)
    gpu = FP4KVCache(pages, page_size, hkv, d, cuda)
    cpu = FP4KVCache(pages, page_size, hkv, d, "cpu")
    chunk = 4096 if max(lens) > 10_000 else 61
    ids = _fill(gpu, lens, ks, vs, chunk=chunk, device=cuda)
    _fill(cpu, lens, ks, vs, chunk=chunk)
    for name in ("k_data", "k_scales", "v_data", "v_scales"):  # same page order, same bytes
        assert torch.equal(getattr(gpu, name).cpu(), getattr(cpu, name)), name
    q = torch.randn(len(lens), hkv * group, nq, d).to(dtype)
    out, lse = gpu.attend(q.to(cuda), ids, p_quant=p_quant, return_lse=True)
    _assert_close_to_reference(out, lse, *_reference(q, ks, vs, p_quant, dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("nq,group,p_quant,dtype", [(1, 4, "anchored", torch.bfloat16), (2, 4, "paper", torch.float16),
                                                    (3, 4, "anchored", torch.bfloat16), (1, 1, "anchored", torch.float16)])
def test_gpu_decode_head_dim_64_matches_reference(cuda, nq, group, p_quant, dtype):
    """Head dim 64 on CUDA (the decode kernel's second layout): the GPU append writes the CPU
    append's bytes, and the decode matches the reference."""
    lens, hkv, d, page_size = [1, 17, 300, 4095], 2, 64, 32
    pages = sum(-(-n // page_size) for n in lens) + 2
    ks, vs = _seqs(lens, hkv, d, 4, dtype)
    gpu = FP4KVCache(pages, page_size, hkv, d, cuda)
    cpu = FP4KVCache(pages, page_size, hkv, d, "cpu")
    ids = _fill(gpu, lens, ks, vs, chunk=61, device=cuda)
    _fill(cpu, lens, ks, vs, chunk=61)
    for name in ("k_data", "k_scales", "v_data", "v_scales"):
        assert torch.equal(getattr(gpu, name).cpu(), getattr(cpu, name)), name
    q = torch.randn(len(lens), hkv * group, nq, d).to(dtype)
    out, lse = gpu.attend(q.to(cuda), ids, p_quant=p_quant, return_lse=True)
    _assert_close_to_reference(out, lse, *_reference(q, ks, vs, p_quant, dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("unpack", ["auto", "kernel", "temporary"])
def test_gpu_attention_packed_bit_identical(cuda, causal, unpack):
    q = torch.randn(2, 8, 300, 128, device=cuda, dtype=torch.bfloat16)
    k = torch.randn(2, 2, 333, 128, device=cuda, dtype=torch.bfloat16)
    v = torch.randn(2, 2, 333, 128, device=cuda, dtype=torch.bfloat16)
    pq, pk, pv = (attnqat.quantize_nvfp4(t) for t in (q, k, v))
    with torch.no_grad():
        o = attnqat.attention_packed(pq, pk, pv, causal=causal, p_quant="anchored", unpack=unpack)
        ref = attnqat.attention(q, k, v, mode="fp4", causal=causal, p_quant="anchored")
    assert torch.equal(o, ref)


@pytest.mark.gpu
def test_gpu_attention_packed_kernel_unpack_needs_channel_blocks(cuda):
    q = torch.randn(1, 2, 64, 128, device=cuda, dtype=torch.bfloat16)
    pq, pk = attnqat.quantize_nvfp4(q), attnqat.quantize_nvfp4(q)
    pv = attnqat.quantize_nvfp4(q, axis="token")
    with pytest.raises(ValueError, match="in-kernel unpack needs channel blocks"):
        attnqat.attention_packed(pq, pk, pv, unpack="kernel")
    o = attnqat.attention_packed(pq, pk, pv, unpack="auto")  # falls back to the temporaries
    assert torch.equal(o, attnqat.attention_packed(pq, pk, pv, unpack="temporary"))


@pytest.mark.gpu
def test_gpu_bad_input_errors(cuda):
    cache = FP4KVCache(4, 16, 2, 128, cuda)
    k_data, k_scales, v_data, v_scales = cache.layer_tensors()
    q = torch.zeros(1, 8, 1, 128, device=cuda, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="out of range"):
        attnqat.decode_attention(q, k_data, k_scales, v_data, v_scales,
                                 torch.tensor([[9]], dtype=torch.int32, device=cuda),
                                 torch.tensor([3], dtype=torch.int32, device=cuda))
    with pytest.raises(ValueError, match="beyond the capacity"):
        attnqat.decode_attention(q, k_data, k_scales, v_data, v_scales,
                                 torch.tensor([[0]], dtype=torch.int32, device=cuda),
                                 torch.tensor([40], dtype=torch.int32, device=cuda))
    with pytest.raises(NotImplementedError, match="bfloat16 or float16"):
        attnqat.decode_attention(q.float(), k_data, k_scales, v_data, v_scales,
                                 torch.tensor([[0]], dtype=torch.int32, device=cuda),
                                 torch.tensor([3], dtype=torch.int32, device=cuda))
    # Head dims other than 64 and 128: the CPU reference only. The cache refuses them on CUDA; the
    # decode entry point on explicit tensors does too.
    with pytest.raises(ValueError, match="head_dim"):
        FP4KVCache(4, 16, 2, 96, cuda)
    odd = [t.to(cuda) for t in FP4KVCache(4, 16, 2, 96, "cpu").layer_tensors()]
    with pytest.raises(NotImplementedError, match="head_dim 64 and 128"):
        attnqat.decode_attention(torch.zeros(1, 8, 1, 96, device=cuda, dtype=torch.bfloat16), *odd,
                                 torch.tensor([[0]], dtype=torch.int32, device=cuda),
                                 torch.tensor([3], dtype=torch.int32, device=cuda))
