"""Argument validation: every bad input raises one exception whose message names the argument,
what it got and what is accepted; edge inputs that are valid (empty tensors, odd strides) work.
docs/reliability.md lists these cases and the test of each."""

import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import attnqat
from attnqat import FP4KVCache
from attnqat.attention import nvfp4_global_scale


def qkv(b=1, hq=2, hkv=2, nq=8, nk=8, d=32, dtype=torch.float32, requires_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, nq, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, nk, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, nk, d, generator=g).to(dtype)
    return tuple(t.requires_grad_(requires_grad) for t in (q, k, v))


def raises(exc, fragment):
    return pytest.raises(exc, match=re.escape(fragment))


# ---- dtypes are named ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, name", [(torch.int32, "int32"), (torch.int64, "int64"), (torch.bool, "bool"),
                                         (torch.uint8, "uint8"), (torch.complex64, "complex64")])
def test_wrong_dtype_is_named_torch(dtype, name):
    q, k, v = qkv()
    with raises(ValueError, f"q: expected dtype float32, float16 or bfloat16 (or float64 on the CPU), got {name}"):
        attnqat.attention(q.to(dtype), k, v)


def test_wrong_dtype_is_named_numpy():
    q, k, v = (t.numpy() for t in qkv())
    with raises(ValueError, "k: expected dtype float32, float16 or bfloat16 (or float64 on the CPU), got int16"):
        attnqat.attention(q, k.astype(np.int16), v)
    with raises(ValueError, "q: expected dtype float32, float16 or bfloat16 (or float64 on the CPU), got <U1"):
        attnqat.attention(np.full((1, 1, 4, 16), "a"), k, v)


def test_wrong_dtype_is_named_quantize_and_index_tensors():
    with raises(ValueError, "x: expected dtype float32, float16 or bfloat16, got float64"):
        attnqat.quantize_nvfp4(torch.randn(2, 16, dtype=torch.float64))
    with raises(ValueError, "x: expected dtype float32, float16 or bfloat16 (or float64 on the CPU), got int32"):
        attnqat.fake_quantize(torch.ones(2, 16, dtype=torch.int32))
    cache = FP4KVCache(2, 16, 1, 32)
    new = torch.zeros(1, 1, 1, 32)
    with raises(ValueError, "page_table: expected dtype int32, got int64"):
        attnqat.kv_cache_append(*cache.layer_tensors(), new, new, torch.zeros(1, 1, dtype=torch.int64),
                                torch.zeros(1, dtype=torch.int32))


# ---- numpy arrays and torch tensors are not mixed -------------------------------------------------------


def test_numpy_next_to_torch():
    q, k, v = qkv()
    with raises(TypeError, "k is a numpy array but q is a torch tensor: pass the same kind"):
        attnqat.attention(q, k.numpy(), v)
    with raises(TypeError, "v is a torch tensor but q is a numpy array: pass the same kind"):
        attnqat.attention(q.numpy(), k.numpy(), v)
    with raises(TypeError, "attnqat.sdpa: key: expected a torch.Tensor, got ndarray"):
        attnqat.sdpa(q, k.numpy(), v)


def test_tensors_on_different_devices():
    q, k, v = qkv()
    with raises(ValueError, "k: expected a tensor on cpu (the device of q), got one on meta"):
        attnqat.attention(q, k.to("meta"), v)


# ---- causal / is_causal must be bools -------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["no", "False", 1, 0, None, 1.0])
def test_causal_must_be_a_bool(bad):
    q, k, v = qkv()
    with raises(TypeError, f"causal: expected a bool (True or False), got {type(bad).__name__} {bad!r}"):
        attnqat.attention(q, k, v, causal=bad)
    with raises(TypeError, f"is_causal: expected a bool (True or False), got {type(bad).__name__}"):
        attnqat.sdpa(q, k, v, is_causal=bad)


def test_causal_like_torch_sdpa():
    q, k, v = qkv()
    with pytest.raises(TypeError):  # torch refuses the string too
        F.scaled_dot_product_attention(q, k, v, is_causal="no")
    assert torch.equal(attnqat.attention(q, k, v, causal=np.bool_(True)), attnqat.attention(q, k, v, causal=True))
    assert not torch.equal(attnqat.attention(q, k, v, causal=False), attnqat.attention(q, k, v, causal=True))


def test_other_bool_arguments():
    q, k, v = qkv()
    with raises(TypeError, "enable_gqa: expected a bool (True or False), got str 'yes'"):
        attnqat.sdpa(q, k, v, enable_gqa="yes")
    with raises(TypeError, "deterministic: expected a bool (True or False), got int 1"):
        attnqat.attention(q, k, v, deterministic=1)
    with raises(TypeError, "bwd_quant_p: expected True, False or None (the mode's default), got str 'off'"):
        attnqat.attention(q, k, v, mode="drop_in_qat", bwd_quant_p="off")
    with raises(TypeError, "return_lse: expected a bool (True or False), got str 'yes'"):
        attnqat.attention(q, k, v, return_lse="yes")
    with raises(TypeError, "causal: expected a bool (True or False), got str 'yes'"):
        attnqat.attention_packed(*(attnqat.quantize_nvfp4(t) for t in (q, k, v)), causal="yes")


# ---- softmax_scale ------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["0.1", True, [0.1], torch.tensor(0.1)])
def test_softmax_scale_type(bad):
    q, k, v = qkv()
    with raises(TypeError, "softmax_scale: expected a real number (float or int) or None for 1/sqrt(head_dim), got"):
        attnqat.attention(q, k, v, softmax_scale=bad)


@pytest.mark.parametrize("bad, shown", [(0, "0.0"), (-1.0, "-1.0"), (math.nan, "nan"), (math.inf, "inf")])
def test_softmax_scale_value(bad, shown):
    q, k, v = qkv()
    with raises(ValueError, f"softmax_scale: expected a positive finite number, got {shown}"):
        attnqat.attention(q, k, v, softmax_scale=bad)
    with raises(ValueError, f"scale: expected a positive finite number, got {shown}"):
        attnqat.sdpa(q, k, v, scale=bad)


def test_softmax_scale_float32_range_and_accepted_types():
    q, k, v = qkv()
    with raises(ValueError, "softmax_scale: expected a positive finite number in float32 range"):
        attnqat.attention(q, k, v, softmax_scale=1e-50)  # 0 in float32 would mean "the default"
    with raises(ValueError, "softmax_scale: expected a positive finite number in float32 range"):
        attnqat.attention(q, k, v, softmax_scale=1e39)
    ref = attnqat.attention(q, k, v, softmax_scale=0.25)
    for ok in (np.float32(0.25), np.float64(0.25), 0.25):
        assert torch.equal(attnqat.attention(q, k, v, softmax_scale=ok), ref)
    with raises(TypeError, "scale: expected a real number (float or int)"):
        attnqat.sdpa(q, k, v, scale="0.1")
    with raises(TypeError, "scale: expected a real number"):
        attnqat.nn.FP4Attention(scale="0.1")
    with raises(TypeError, "softmax_scale: expected a real number"):
        FP4KVCache(2, 16, 2, 32).attend(q[:, :, :1], [0], softmax_scale="0.1")


# ---- Empty inputs: empty results and zero gradients, as torch's SDPA --------------------------------------


EMPTY = [((0, 2, 4, 32), (0, 2, 4, 32)), ((1, 0, 4, 32), (1, 0, 4, 32)),
         ((1, 2, 0, 32), (1, 2, 4, 32)), ((1, 2, 4, 32), (1, 2, 0, 32)), ((1, 2, 0, 32), (1, 2, 0, 32))]


@pytest.mark.parametrize("mode", ["bf16", "drop_in_qat", "attn_qat"])
@pytest.mark.parametrize("qshape, kshape", EMPTY)
def test_empty_inputs_forward_and_backward(mode, qshape, kshape):
    q = torch.randn(qshape, requires_grad=True)
    k = torch.randn(kshape, requires_grad=True)
    v = torch.randn(kshape, requires_grad=True)
    o, lse = attnqat.attention(q, k, v, mode=mode, return_lse=True)
    # (torch's own CPU SDPA dies of SIGFPE on H = 0, torch 2.11: compare with its shape rule.)
    assert o.shape == qshape and lse.shape == qshape[:3] and o.grad_fn is not None
    assert torch.equal(o, torch.zeros_like(o))  # Nk = 0: rows that see no key give O = 0 (torch: 0 too)
    assert bool((lse == -math.inf).all())
    o.sum().backward()
    for t in (q, k, v):
        assert t.grad is not None and t.grad.shape == t.shape and not bool(t.grad.any())


@pytest.mark.parametrize("qshape, kshape", EMPTY)
def test_empty_inputs_numpy(qshape, kshape):
    o, lse = attnqat.attention(np.zeros(qshape, np.float32), np.zeros(kshape, np.float32),
                               np.zeros(kshape, np.float32), return_lse=True)
    assert o.shape == qshape and lse.shape == qshape[:3] and not o.any()


@pytest.mark.parametrize("nq, nk", [(0, 8), (8, 0), (0, 0)])
@pytest.mark.parametrize("is_causal", [False, True])
def test_empty_sdpa_has_grad_fn_and_zero_grads(nq, nk, is_causal):
    q, k, v = qkv(nq=nq, nk=nk, requires_grad=True)
    o = attnqat.sdpa(q, k, v, is_causal=is_causal)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
    assert o.shape == ref.shape and o.grad_fn is not None
    o.sum().backward()
    for t in (q, k, v):
        assert t.grad.shape == t.shape and not bool(t.grad.any())


def test_sdpa_mask_hiding_every_key_has_grad_fn():
    q, k, v = qkv(b=2, nq=4, nk=6, requires_grad=True)
    mask = torch.zeros(2, 1, 4, 6, dtype=torch.bool)
    o = attnqat.sdpa(q, k, v, attn_mask=mask)
    assert o.grad_fn is not None and not bool(o.any())
    o.sum().backward()
    assert not bool(q.grad.any()) and not bool(k.grad.any())


# ---- FP4KVCache ---------------------------------------------------------------------------------------


def test_kv_cache_more_queries_than_cached_tokens():
    cache = FP4KVCache(4, 16, 1, 32)
    sid = cache.new_sequence()
    kv = torch.randn(1, 1, 2, 32)
    cache.append([sid], kv, kv)
    with raises(ValueError, "q: 3 query tokens, but sequence 0 has only 2 cached tokens in layer 0; the queries "
                            "are the last tokens of their sequences: append their K and V first"):
        cache.attend(torch.randn(1, 2, 3, 32), [sid])
    assert cache.attend(torch.randn(1, 2, 2, 32), [sid]).shape == (1, 2, 2, 32)
    other = cache.new_sequence()
    cache.append([other], kv[:, :, :1], kv[:, :, :1])
    with raises(ValueError, "q: 3 query tokens, but sequence 0 has only 2 cached tokens in layer 0 (the longest of the batch)"):
        cache.attend(torch.randn(2, 2, 3, 32), [sid, other])
    # Ragged batch: the longer sequence holds the queries; the shorter one's first row sees no key.
    o, lse = cache.attend(torch.randn(2, 2, 2, 32), [sid, other], return_lse=True)
    assert not bool(o[1, :, 0].any()) and bool((lse[1, :, 0] == -math.inf).all())


@pytest.mark.parametrize("head_dim, device", [(512, "cpu"), (272, "cpu"), (24, "cpu"), (0, "cpu"), (96, "cuda"),
                                              (256, "cuda")])
def test_kv_cache_head_dim_is_checked_against_attention(head_dim, device):
    with raises(ValueError, "head_dim: expected a multiple of 16 up to 256 on the CPU (the reference), or 64 or 128 "
                            f"on CUDA (the decode kernel); got {head_dim} for a {device} cache"):
        FP4KVCache(4, 16, 2, head_dim, device)


def test_kv_cache_integer_arguments():
    with raises(TypeError, "num_pages: expected an int, got float 4.0"):
        FP4KVCache(4.0, 16, 2, 64)
    with raises(ValueError, "num_kv_heads: expected a positive number, got 0"):
        FP4KVCache(4, 16, 0, 64)
    with raises(ValueError, "page_size: expected a positive multiple of 16"):
        FP4KVCache(4, 24, 2, 64)


def test_kv_cache_head_dim_256_works_on_cpu_and_strided_queries():
    cache = FP4KVCache(2, 16, 1, 256)
    sid = cache.new_sequence()
    kv = torch.randn(1, 1, 3, 256)
    cache.append([sid], kv, kv)
    q = torch.randn(1, 256, 1, 2).transpose(1, 3)  # [1, 2, 1, 256], last dim strided
    assert q.stride(-1) != 1
    assert torch.equal(cache.attend(q, [sid]), cache.attend(q.contiguous(), [sid]))


# ---- Options: unknown values list the valid ones ---------------------------------------------------------


@pytest.mark.parametrize("kwargs, exc, fragment", [
    (dict(mode="int4"), ValueError, "mode: expected one of 'bf16', 'fp4', 'drop_in_qat', 'attn_qat', got 'int4'"),
    (dict(p_quant="x"), ValueError, "p_quant: expected 'paper' or 'anchored', got 'x'"),
    (dict(v_blocks="rows"), ValueError, "v_blocks: expected 'channel' or 'token', got 'rows'"),
    (dict(precision="fp16"), ValueError, "precision: expected one of 'fp32', 'fp64', 'bf16_operands', got 'fp16'"),
    (dict(mode=None), ValueError, "mode: expected one of 'bf16', 'fp4', 'drop_in_qat', 'attn_qat', got None"),
    (dict(kv_tile=20), ValueError, "kv_tile: expected a positive multiple of 16 up to 4096, got 20"),
    (dict(kv_tile=8192), ValueError, "kv_tile: expected a positive multiple of 16 up to 4096, got 8192"),
    (dict(kv_tile="64"), TypeError, "kv_tile: expected an int (a positive multiple of 16 up to 4096), got str '64'"),
    (dict(mode="bf16", bwd_quant_p=False), ValueError, "bwd_* switches: they select the backward of the QAT modes"),
    (dict(causal=True, v_blocks="token"), ValueError, "v_blocks: 'token' cannot be used with causal attention"),
])
def test_option_messages(kwargs, exc, fragment):
    q, k, v = qkv()
    with raises(exc, fragment):
        attnqat.attention(q, k, v, **kwargs)


def test_one_checker_for_every_entry_point():
    """config(), set_config(), the nn module, hf.register() and sdpa use attention's checker."""
    q, k, v = qkv()
    with raises(TypeError, "kv_tile: expected an int"):
        attnqat.config(kv_tile="64")
    with raises(TypeError, "kv_tile: expected an int"):
        attnqat.sdpa(q, k, v, kv_tile="64")
    with raises(TypeError, "kv_tile: expected an int"):
        attnqat.nn.FP4Attention(kv_tile="64")
    with raises(TypeError, "kv_tile: expected an int"):
        attnqat.hf.register("attnqat_bad", kv_tile="64")
    with raises(TypeError, "deterministic: expected a bool"):
        attnqat.set_config(deterministic="yes")
    with raises(ValueError, "attnqat.config: p_quant: expected 'paper' or 'anchored', got 'x'"):
        attnqat.config(p_quant="x")
    with raises(TypeError, "is_causal: expected a bool"):
        attnqat.nn.FP4Attention(is_causal="yes")
    with raises(TypeError, "attnqat.config: unknown option 'causal'"):
        attnqat.config(causal=True)
    with raises(TypeError, "attnqat.sdpa: dropout_p: expected a float (0.0), got str '0'"):
        attnqat.sdpa(q, k, v, dropout_p="0")
    with raises(TypeError, "attnqat.sdpa: attn_mask: expected None or a boolean torch.Tensor, got list"):
        attnqat.sdpa(q, k, v, attn_mask=[[True]])
    assert attnqat.get_config() == attnqat.reset_config()


def test_head_dim_lists_the_supported_set():
    q, k, v = qkv(d=24)
    with raises(ValueError, "q: expected head_dim a positive multiple of 16 up to 256 (the NVFP4 block; CPU "
                            "reference: 16, 32, ..., 256; CUDA kernels: 16, 32, ..., 128), got 24"):
        attnqat.attention(q, k, v)
    q, k, v = qkv(d=272)
    with raises(ValueError, "got 272"):
        attnqat.attention(q, k, v)


def test_gqa_ratio_names_both():
    q, k, v = qkv(hq=3, hkv=2)
    with raises(ValueError, "expected the number of query heads (3) to be a multiple of the number of key/value heads (2)"):
        attnqat.attention(q, k, v)
    with raises(ValueError, "attnqat.sdpa: query has 3 heads and key/value 2: pass enable_gqa=True"):
        attnqat.sdpa(q, k, v)


def test_shape_messages():
    q, k, v = qkv()
    with raises(ValueError, "q: expected a 4-D tensor [batch, heads, seq, head_dim], got shape [2, 8, 32]"):
        attnqat.attention(q[0], k, v)
    with raises(ValueError, "k, v: expected batch 1 (the batch of q), got 2 and 1"):
        attnqat.attention(q, torch.cat([k, k]), v)
    with raises(ValueError, "v: expected the heads and sequence length of k [1, 2, 8, 32], got [1, 2, 7, 32]"):
        attnqat.attention(q, k, v[:, :, :7])
    with raises(ValueError, "k, v: expected the dtype of q (float32), got float16 and float32"):
        attnqat.attention(q, k.half(), v)


# ---- Strides: accepted where the kernels can be fed --------------------------------------------------------


def test_any_strides_give_the_contiguous_result():
    q, k, v = qkv(nq=16, nk=16)
    ref = attnqat.attention(q, k, v)
    qt = q.transpose(2, 3).contiguous().transpose(2, 3)  # last dim strided
    kx = k[:, :1].expand(1, 2, 16, 32)  # stride 0 over heads
    assert qt.stride(-1) != 1
    assert torch.equal(attnqat.attention(qt, k, v), ref)
    assert torch.equal(attnqat.attention(q, kx, kx), attnqat.attention(q, kx.contiguous(), kx.contiguous()))
    qn, kn, vn = (t.numpy() for t in (q, k, v))
    flipped = np.ascontiguousarray(qn[:, :, ::-1])[:, :, ::-1]  # negative stride over tokens
    assert flipped.strides[2] < 0
    assert np.array_equal(attnqat.attention(flipped, kn, vn), ref.numpy())
    assert np.array_equal(attnqat.attention(qn[..., ::-1][..., ::-1], kn, vn), ref.numpy())


def test_quantizers_refuse_a_strided_last_dim_clearly():
    with raises(ValueError, "x: expected the last dimension to be contiguous (stride 1), got stride 4; call .contiguous() first"):
        attnqat.quantize_nvfp4(torch.randn(16, 4).t())


# ---- Range: saturation without a global scale, qkv_scale ----------------------------------------------------


def test_values_beyond_2688_saturate_without_a_global_scale():
    x = torch.ones(1, 16)
    x[0, 0] = 1e4
    y = attnqat.fake_quantize(x)
    assert float(y[0, 0]) == 2688.0  # E4M3 scale saturates at 448, the element at E2M1's 6
    assert float(attnqat.fake_quantize(-x)[0, 0]) == -2688.0
    assert float(attnqat.fake_quantize(x.numpy())[0, 0]) == 2688.0
    z = attnqat.fake_quantize(x, global_scale="amax")
    # g = 4 (the smallest power of two with 1e4 <= 2688 g), s = e4m3(1e4 / 24) = 416: 1e4 / (416 * 4)
    # rounds to E2M1's 6, which decodes to 9984, within FP4's relative error.
    assert float(z[0, 0]) == 9984.0
    assert abs(float(z[0, 0]) - 1e4) / 1e4 <= 0.25


@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_qkv_scale_amax_represents_large_inputs(kind):
    q, k, v = qkv(nq=16, nk=16, d=32)
    v = v * 1e4
    if kind == "numpy":
        q, k, v = (t.numpy() for t in (q, k, v))
        err = lambda a, b: float(np.linalg.norm(a - b) / np.linalg.norm(b))
    else:
        err = lambda a, b: float((a - b).norm() / b.norm())
    ref = attnqat.attention(q, k, v, mode="bf16")
    saturated = attnqat.attention(q, k, v, mode="fp4")
    scaled = attnqat.attention(q, k, v, mode="fp4", qkv_scale="amax")
    assert err(saturated, ref) > 0.5
    assert err(scaled, ref) < 0.2
    g = tuple(nvfp4_global_scale(float(abs(t).max())) for t in (q, k, v))
    assert g[2] >= 8.0 and g[0] < 1 and g[1] < 1
    explicit = attnqat.attention(q, k, v, mode="fp4", qkv_scale=g)
    assert (explicit == scaled).all()


def test_qkv_scale_paths_agree_and_gradients_flow():
    """Quantizing with g (attn_qat) and running on x / g (drop_in_qat's raw backward, float64) are
    the same computation; with inputs in range, g does not change the result at all."""
    q, k, v = qkv(nq=16, nk=16, requires_grad=True)
    for mode in ("attn_qat", "drop_in_qat"):
        grads = []
        for scale in (None, "amax", (2.0**-8, 2.0**-8, 2.0**-8)):
            o = attnqat.attention(q, k, v, mode=mode, qkv_scale=scale)
            with torch.no_grad():
                assert torch.equal(o, attnqat.attention(q, k, v, mode=mode, qkv_scale=scale))
            grads.append(torch.autograd.grad(o.square().sum(), (q, k, v)))
        for g in grads[1:]:
            for a, b in zip(g, grads[0]):
                assert torch.equal(a, b)
    q64, k64, v64 = (t.detach().double() * 1e4 for t in (q, k, v))
    o64 = attnqat.attention(q64, k64, v64, mode="fp4", qkv_scale="amax")
    o32 = attnqat.attention(*(t.float() for t in (q64, k64, v64)), mode="fp4", qkv_scale="amax")
    assert float((o64 - o32.double()).norm() / o32.double().norm()) < 1e-5


def test_qkv_scale_in_bf16_mode_and_config():
    q, k, v = qkv()
    assert torch.equal(attnqat.attention(q, k, v, mode="bf16", qkv_scale="amax"), attnqat.attention(q, k, v, mode="bf16"))
    with attnqat.config(qkv_scale="amax", mode="fp4"):
        assert torch.equal(attnqat.sdpa(q, k, v), attnqat.attention(q, k, v, mode="fp4", qkv_scale="amax"))


@pytest.mark.parametrize("bad, exc, fragment", [
    ("max", ValueError, "qkv_scale: expected None, 'amax' or a tuple (g_q, g_k, g_v) of powers of two, got 'max'"),
    (2.0, TypeError, "qkv_scale: expected None, 'amax' or a tuple (g_q, g_k, g_v) of powers of two, got float 2.0"),
    ((1.0, 1.0), ValueError, "qkv_scale: expected three scales (g_q, g_k, g_v), got 2"),
    ((1.0, 3.0, 1.0), ValueError, "qkv_scale[1] (k): expected a power of two in [2^-100, 2^100]"),
    ((1.0, 1.0, 2.0**-101), ValueError, "qkv_scale[2] (v): expected a power of two in [2^-100, 2^100]"),
    ((1.0, "1", 1.0), TypeError, "qkv_scale[1] (k): expected a real number (a power of two), got str '1'"),
])
def test_qkv_scale_errors(bad, exc, fragment):
    q, k, v = qkv()
    with raises(exc, fragment):
        attnqat.attention(q, k, v, qkv_scale=bad)


# ---- check_finite ------------------------------------------------------------------------------------------


def test_check_finite_names_tensor_and_index():
    q, k, v = qkv(nq=8)
    q = q.clone()
    q[0, 1, 5, 3] = math.nan
    with attnqat.config(check_finite=True):
        with raises(ValueError, "query contains NaN at index (0, 1, 5, 3)"):
            attnqat.sdpa(q, k, v)
    assert torch.isnan(attnqat.sdpa(q, k, v)).any()  # off by default: NaN propagates
    with raises(ValueError, "q contains NaN at index (0, 1, 5, 3)"):
        attnqat.attention(q, k, v, check_finite=True)
    with raises(ValueError, "q contains NaN at index (0, 1, 5, 3)"):
        attnqat.attention(q.numpy(), k.numpy(), v.numpy(), check_finite=True)
    v = v.clone()
    v[0, 0, 2, 0] = -math.inf
    with raises(ValueError, "v contains -Inf at index (0, 0, 2, 0)"):
        attnqat.attention(k, k, v, check_finite=True)
    with raises(TypeError, "check_finite: expected a bool (True or False), got str 'yes'"):
        attnqat.config(check_finite="yes")
