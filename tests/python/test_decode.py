"""FP4 inference: attention from packed NVFP4 tensors, the paged FP4 KV cache, decode.

CPU tests (CI) check the reference paths bit for bit against ``attention(mode="fp4")`` on the raw
tensors (the same quantized operands, the same arithmetic; with a sliding window ``window_left``,
against ``attention(window=(window_left, 0))``), the errors of bad input, and Hugging Face
generation through ``attnqat.hf.FP4Cache`` on a sliding-window model (Mistral) against the FP4
forward of the whole sequence. GPU
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


def _reference(q, ks, vs, p_quant, dtype=torch.float32, window_left=None):
    """attention(mode='fp4') per sequence on the raw K, V (CPU, fp32): the decode contract (with
    window_left: the dense sliding window (window_left, 0))."""
    window = None if window_left is None else (window_left, 0)
    outs, lses = [], []
    for b in range(q.shape[0]):
        o, lse = attnqat.attention(q[b:b + 1].float().cpu(), ks[b].float(), vs[b].float(), mode="fp4",
                                   causal=True, p_quant=p_quant, window=window, return_lse=True)
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


@pytest.mark.parametrize("page_size,group,nq,lens,p_quant,window_left", [
    (16, 4, 1, [300, 1, 17], "anchored", 0),       # only the diagonal key
    (16, 2, 3, [40, 2, 19], "anchored", 5),        # each query token its own window; rows without keys
    (48, 2, 2, [300, 129, 1], "paper", 127),       # windows starting mid-tile, 128-key tiles from key 0
    (32, 4, 1, [260, 128, 3], "paper", 128),
    (16, 1, 2, [70, 5], "anchored", 4096),         # wider than every sequence: plain causal
])
def test_cpu_decode_with_window_matches_fp4_attention_with_window(page_size, group, nq, lens, p_quant, window_left):
    hkv, d = 2, 32
    cache = FP4KVCache(64, page_size, hkv, d, "cpu")
    ks, vs = _seqs(lens, hkv, d, 2)
    ids = _fill(cache, lens, ks, vs)
    q = torch.randn(len(lens), hkv * group, nq, d, generator=torch.Generator().manual_seed(3))
    out, lse = cache.attend(q, ids, p_quant=p_quant, window_left=window_left, return_lse=True)
    ref, ref_lse = _reference(q, ks, vs, p_quant, window_left=window_left)
    assert torch.equal(out, ref)
    assert torch.equal(lse, ref_lse)
    # The explicit-page-table entry point takes the same window.
    k_data, k_scales, v_data, v_scales = cache.layer_tensors()
    table, seq_lens = cache.page_table(ids), torch.tensor(lens, dtype=torch.int32)
    assert torch.equal(attnqat.decode_attention(q, k_data, k_scales, v_data, v_scales, table, seq_lens, p_quant=p_quant,
                                                window_left=window_left), ref)
    # The window is really applied (except where it holds every key): the plain causal decode differs.
    if window_left < max(lens):
        assert not torch.equal(cache.attend(q, ids, p_quant=p_quant), out)


def test_cpu_decode_window_errors():
    cache = FP4KVCache(4, 16, 2, 32)
    ids = _fill(cache, [5], *_seqs([5], 2, 32, 4))
    q = torch.randn(1, 2, 1, 32)
    with pytest.raises(ValueError, match=r"^window_left: expected -1 \(no window\) or a number of keys >= 0 .*got -2$"):
        cache.attend(q, ids, window_left=-2)
    with pytest.raises(TypeError, match="window_left: expected an int"):
        cache.attend(q, ids, window_left=2.0)
    with pytest.raises(TypeError, match="window_left: expected an int"):
        cache.attend(q, ids, window_left=True)
    with pytest.raises(ValueError, match="window_left: expected at most 2"):
        cache.attend(q, ids, window_left=2**31)
    k_data, k_scales, v_data, v_scales = cache.layer_tensors()
    with pytest.raises(ValueError, match="window_left"):
        attnqat.decode_attention(q, k_data, k_scales, v_data, v_scales, cache.page_table(ids),
                                 torch.tensor([5], dtype=torch.int32), window_left=-5)
    # None and -1 are the same: no window.
    assert torch.equal(cache.attend(q, ids, window_left=None), cache.attend(q, ids, window_left=-1))


# ---- CPU: Hugging Face generation through FP4Cache on sliding-window layers ------------------------

_HF_COMMON = dict(vocab_size=96, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, attention_dropout=0.0)


def _hf_model(kind, sliding_window):
    """A small random model with sliding-window layers: Mistral (every layer) or Qwen3 (layer 1)."""
    from transformers import AutoModelForCausalLM, MistralConfig, Qwen3Config

    import attnqat.hf

    attnqat.hf.register()
    if kind == "mistral":
        cfg = MistralConfig(sliding_window=sliding_window, **_HF_COMMON)
    else:
        cfg = Qwen3Config(head_dim=32, use_sliding_window=True, sliding_window=sliding_window, max_window_layers=1,
                          **_HF_COMMON)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="attnqat").eval()


def _cache_kw(model, cache):
    # transformers 5.x (>= 5.2x) renamed forward's past_key_values to cache.
    import inspect

    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache}


def _whole_sequence_logits(model, ids):
    """The FP4 forward of one whole sequence (no cache, no padding): its sliding-window layers run
    attnqat.attention(window=(sliding_window - 1, 0)), P blocks from its first token."""
    return model(ids, use_cache=False).logits[0]


# Tolerance of the FP4Cache logits against the whole-sequence forward: the FP4 operands and P
# blocks are the same, but the projections run on 1 (decode) instead of 20 tokens, which rounds
# differently in fp32: measured 3-4e-7 relative. A window one key wider moves the logits by 0.1-0.25
# (a window holding every key: > 0.4, checked below).
_CACHE_TOL = 1e-5


@pytest.mark.parametrize("kind", ["mistral", "qwen3"])
@pytest.mark.parametrize("p_quant", ["anchored", "paper"])
def test_fp4_cache_sliding_window_decode_with_left_padding(kind, p_quant):
    """A left-padded batch (20 and 17 tokens) through attnqat.hf.FP4Cache on a model whose sliding
    window (6 keys) is shorter than the sequences: a 5-token prefill, then 15 decode steps, each an
    FP4 decode over the pages with window_left = 5 (transformers builds the padded masks as tensors;
    each step's mask starts where the window or the padding does). The logits equal the FP4 forward
    of each sequence alone, and the cache keeps every token (no eviction)."""
    model = _hf_model(kind, 6)
    n, pad, prefill = 20, 3, 5
    x = torch.randint(3, 96, (2, n), generator=torch.Generator().manual_seed(5))
    mask = torch.ones(2, n, dtype=torch.long)
    mask[1, :pad] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad(), attnqat.config(mode="fp4", p_quant=p_quant):
        full = [_whole_sequence_logits(model, x[:1]), _whole_sequence_logits(model, x[1:, pad:])]
        cache = attnqat.hf.FP4Cache(model, max_cache_len=n, page_size=16)
        kw = _cache_kw(model, cache)
        model(x[:, :prefill], attention_mask=mask[:, :prefill], position_ids=pos[:, :prefill], use_cache=True, **kw)
        steps = [model(x[:, t:t + 1], attention_mask=mask[:, :t + 1], position_ids=pos[:, t:t + 1], use_cache=True,
                       **kw).logits[:, -1] for t in range(prefill, n)]
    got = torch.stack(steps, 1)
    assert cache.sliding_windows == ([6, 6] if kind == "mistral" else [None, 6])
    assert rel_err(got[0], full[0][prefill:]) < _CACHE_TOL
    assert rel_err(got[1], full[1][prefill - pad:]) < _CACHE_TOL
    assert [cache.store.length(s, 1) for s in cache.seq_ids] == [n, n - pad]
    # The window matters here: the same weights with a window that holds every key give other logits.
    wide = _hf_model(kind, 1000)
    wide.load_state_dict(model.state_dict())
    with torch.no_grad(), attnqat.config(mode="fp4", p_quant=p_quant):
        assert rel_err(_whole_sequence_logits(wide, x[:1])[prefill:], full[0][prefill:]) > 1e-2


@pytest.mark.parametrize("kind", ["mistral", "qwen3"])
@pytest.mark.parametrize("p_quant", ["anchored", "paper"])
def test_fp4_cache_sliding_window_generation_matches_the_whole_sequence(kind, p_quant):
    """No padding: a 9-token prefill (longer than the 6-key window: the windowed FP4 forward), a
    4-token chunk (one decode call with nq = 4, each query token its own window), then single
    decode steps; the logits equal the FP4 forward of the whole sequence. generate() through the
    cache gives the tokens and scores of generate() without one."""
    model = _hf_model(kind, 6)
    n = 20
    x = torch.randint(3, 96, (1, n), generator=torch.Generator().manual_seed(6))
    with torch.no_grad(), attnqat.config(mode="fp4", p_quant=p_quant):
        full = _whole_sequence_logits(model, x)
        cache = attnqat.hf.FP4Cache(model, max_cache_len=n, page_size=16)
        kw = _cache_kw(model, cache)
        parts = [model(x[:, :9], use_cache=True, **kw).logits[0], model(x[:, 9:13], use_cache=True, **kw).logits[0]]
        parts += [model(x[:, t:t + 1], use_cache=True, **kw).logits[0] for t in range(13, n)]
    assert rel_err(torch.cat(parts), full) < _CACHE_TOL
    assert cache.store.length(cache.seq_ids[0], 0) == n
    gen = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad(), attnqat.config(mode="fp4", p_quant=p_quant):
        ref = model.generate(x[:, :8], **gen, use_cache=False)
        cache = attnqat.hf.FP4Cache(model, max_cache_len=18, page_size=16)
        got = model.generate(x[:, :8], **gen, **_cache_kw(model, cache))
    assert torch.equal(got.sequences, ref.sequences)
    for a, b in zip(got.scores, ref.scores):
        assert rel_err(a, b) < _CACHE_TOL


def test_fp4_cache_sliding_window_errors():
    from types import SimpleNamespace

    from attnqat.hf_cache import _sliding_windows

    chunked = SimpleNamespace(num_hidden_layers=2, sliding_window=4, layer_types=["full_attention", "chunked_attention"])
    with pytest.raises(NotImplementedError, match="layer 1 is a 'chunked_attention' layer"):
        _sliding_windows(chunked)
    # A padded decode step whose mask does not start where the cache's window does (here: the
    # cache was told another window than the model's) raises instead of attending to other keys.
    model = _hf_model("mistral", 6)
    x = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(7))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :2] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad(), attnqat.config(mode="fp4"):
        cache = attnqat.hf.FP4Cache(model, max_cache_len=12, page_size=16)
        cache.sliding_windows = [4, 4]
        kw = _cache_kw(model, cache)
        model(x[:, :4], attention_mask=mask[:, :4], position_ids=pos[:, :4], use_cache=True, **kw)
        with pytest.raises(ValueError, match="sequence 1's mask starts at key 0, but its cache and the layer's window"):
            for t in range(4, 12):
                model(x[:, t:t + 1], attention_mask=mask[:, :t + 1], position_ids=pos[:, t:t + 1], use_cache=True,
                      **kw)


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
@pytest.mark.parametrize("window_left", [0, 1, 127, 128, 4096])
@pytest.mark.parametrize("nq,group,p_quant,dtype,d", [(1, 4, "anchored", torch.bfloat16, 128),
                                                      (4, 2, "paper", torch.float16, 64)])
def test_gpu_decode_with_window_matches_reference(cuda, window_left, nq, group, p_quant, dtype, d):
    """Sliding windows on CUDA: the decode kernel starts at the window (anchored: the splits cover
    the window only; paper: the 128-key tile holding its first key) and masks the keys before each
    query token's window; against the CPU reference attention(window=(window_left, 0))."""
    lens, hkv, page_size = [4095, 1, 17, 300, 1000, 9000], 2, 16
    pages = sum(-(-n // page_size) for n in lens) + 2
    ks, vs = _seqs(lens, hkv, d, 5, dtype)
    gpu = FP4KVCache(pages, page_size, hkv, d, cuda)
    ids = _fill(gpu, lens, ks, vs, chunk=1000, device=cuda)
    q = torch.randn(len(lens), hkv * group, nq, d).to(dtype)
    out, lse = gpu.attend(q.to(cuda), ids, p_quant=p_quant, window_left=window_left, return_lse=True)
    _assert_close_to_reference(out, lse, *_reference(q, ks, vs, p_quant, dtype, window_left=window_left))


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
