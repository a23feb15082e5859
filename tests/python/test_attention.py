"""attnqat.attention from Python (CPU reference): modes, autograd, opcheck, gradcheck, errors.
The numerics themselves are tested in tests/cpp/test_attention.cpp."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import attnqat
from attnqat.attention import resolve_config
from conftest import rel_err

MODES = ["bf16", "fp4", "drop_in_qat", "attn_qat"]


def qkv(b=2, hq=4, hkv=2, nq=33, nk=40, d=64, dtype=torch.float32, requires_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda h, n: torch.randn(b, h, n, d, generator=g, dtype=torch.float32).to(dtype).requires_grad_(requires_grad)
    return make(hq, nq), make(hkv, nk), make(hkv, nk)


@pytest.mark.parametrize("causal", [False, True])
def test_bf16_mode_matches_torch_sdpa(causal):
    q, k, v = qkv(nq=40, nk=40)
    o = attnqat.attention(q, k, v, mode="bf16", causal=causal)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    assert rel_err(o, ref) < 1e-5


def test_fp4_modes_differ_from_bf16_and_share_the_forward():
    q, k, v = qkv()
    outs = {m: attnqat.attention(q, k, v, mode=m) for m in MODES}
    assert torch.equal(outs["fp4"], outs["drop_in_qat"]) and torch.equal(outs["fp4"], outs["attn_qat"])
    err = rel_err(outs["fp4"], outs["bf16"])
    assert 0.01 < err < 0.5


def test_lse_and_scale():
    q, k, v = qkv(nq=8, nk=8)
    o, lse = attnqat.attention(q, k, v, mode="bf16", softmax_scale=0.3, return_lse=True)
    s = torch.einsum("bhqd,bhkd->bhqk", q, k.repeat_interleave(2, dim=1)) * 0.3
    assert rel_err(lse, torch.logsumexp(s, -1)) < 1e-6
    assert rel_err(o, F.scaled_dot_product_attention(q, k, v, scale=0.3, enable_gqa=True)) < 1e-5


def test_strided_inputs_give_the_same_result():
    q, k, v = qkv(b=1, hq=2, hkv=2)
    q_bnhd = q.transpose(1, 2).contiguous()  # [B, N, H, D] storage, viewed as [B, H, N, D]
    o1 = attnqat.attention(q, k, v)
    o2 = attnqat.attention(q_bnhd.transpose(1, 2), k, v)
    assert torch.equal(o1, o2)
    o3 = attnqat.attention(q.transpose(-1, -2).contiguous().transpose(-1, -2), k, v)  # strided last dim
    assert torch.equal(o1, o3)


def test_numpy_inputs_without_torch_types():
    q, k, v = (t.numpy() for t in qkv())
    o = attnqat.attention(q, k, v, causal=True)
    assert isinstance(o, np.ndarray) and o.shape == q.shape
    ot = attnqat.attention(*(torch.from_numpy(t) for t in (q, k, v)), causal=True)
    assert np.array_equal(o, ot.numpy())


@pytest.mark.parametrize("mode", ["bf16", "drop_in_qat", "attn_qat"])
@pytest.mark.parametrize("p_quant", ["paper", "anchored"])
def test_autograd_matches_the_backward_op(mode, p_quant):
    q, k, v = qkv(requires_grad=True)
    o = attnqat.attention(q, k, v, mode=mode, p_quant=p_quant, causal=True)
    do = torch.randn_like(o)
    o.backward(do)
    for t in (q, k, v):
        assert t.grad is not None and torch.isfinite(t.grad).all()
    if mode == "bf16":
        q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
        nq, nk = q.shape[2], k.shape[2]  # torch's is_causal is top-left aligned; ours bottom-right
        mask = torch.ones(nq, nk, dtype=torch.bool).tril(diagonal=nk - nq)
        F.scaled_dot_product_attention(q2, k2, v2, attn_mask=mask, enable_gqa=True).backward(do)
        for a, b in ((q, q2), (k, k2), (v, v2)):
            assert rel_err(a.grad, b.grad) < 1e-5


def test_no_grad_skips_o_hp():
    q, k, v = qkv(requires_grad=True)
    with torch.no_grad():
        _, o_hp, *_ = torch.ops.attnqat.attention_fwd(q, k, v, resolve_config().op_options(False), False)
    assert o_hp.numel() == 0


@pytest.mark.parametrize("mode,v_blocks", [("fp4", "channel"), ("attn_qat", "token"), ("drop_in_qat", "channel")])
def test_inference_path_quantizes_in_the_core_with_the_same_numbers(mode, v_blocks, monkeypatch):
    # Without a backward the raw inputs go to the attention op (the core quantizes them): one op
    # dispatch, not two. The output and LSE must be bit-identical to the path that fake-quantizes
    # in Python first (taken when a backward follows).
    q, k, v = qkv(seed=5)
    calls = []
    real = torch.ops.attnqat.fake_quantize_qkv
    monkeypatch.setattr(torch.ops.attnqat, "fake_quantize_qkv", lambda *a: calls.append(a) or real(*a), raising=False)
    kw = dict(mode=mode, v_blocks=v_blocks, return_lse=True)
    with torch.no_grad():
        o_inf, lse_inf = attnqat.attention(q, k, v, **kw)
    assert calls == []
    if mode == "fp4":  # fp4 has no backward: compare with an explicit Python-side quantization
        qh, kh, vh = (attnqat.fake_quantize(t) for t in (q, k, v))
        o_ref, lse_ref = attnqat.attention(qh, kh, vh, **kw)
    else:
        o_ref, lse_ref = attnqat.attention(*(t.clone().requires_grad_() for t in (q, k, v)), **kw)
        assert len(calls) == 1 or mode == "drop_in_qat"  # drop-in: raw backward, the core quantizes
    assert torch.equal(o_inf, o_ref.detach()) and torch.equal(lse_inf, lse_ref.detach())


@pytest.mark.parametrize("v_axis, scales, compute", [("last", (1.0, 1.0, 1.0), False), ("token", (0.5, 2.0, 4.0), False),
                                                     ("last", (1.0, 1.0, 1.0), True)])
def test_fake_quantize_qkv_is_three_fake_quantize_calls(v_axis, scales, compute):
    # The training forward's one op for Q, K, V: the same numbers as three fake_quantize calls
    # (explicit second-level scales and per-tensor amax too), the straight-through gradient, and
    # torch.library's checks of the op.
    q, k, v = qkv(seed=8, requires_grad=True)
    got = torch.ops.attnqat.fake_quantize_qkv(q, k, v, v_axis, *scales, compute)
    for t, axis, g, out in zip((q, k, v), ("last", "last", v_axis), scales, got):
        assert torch.equal(out, torch.ops.attnqat.fake_quantize(t, "nvfp4", axis, g, compute))
    grads = torch.autograd.grad(got, (q, k, v), [torch.full_like(t, 3.0) for t in got])
    assert all(torch.equal(g, torch.full_like(g, 3.0)) for g in grads)
    torch.library.opcheck(torch.ops.attnqat.fake_quantize_qkv.default, (q, k, v, v_axis, *scales, compute))


def test_gradcheck_fp64_bf16_mode():
    q, k, v = qkv(b=1, hq=2, hkv=1, nq=5, nk=7, d=16, dtype=torch.float64, requires_grad=True)
    for causal in (False, True):
        assert torch.autograd.gradcheck(lambda a, b, c: attnqat.attention(a, b, c, mode="bf16", causal=causal), (q, k, v))


def test_ablation_switches_change_the_gradient():
    q, k, v = qkv(requires_grad=True, seed=3)
    do = torch.randn(q.shape)
    grads = {}
    for name, kw in {
        "attn_qat": {},
        "no_quant_p": {"bwd_quant_p": False},
        "low_precision_o": {"bwd_high_precision_o": False},
        "unquantized_qkv": {"bwd_quantized_qkv": False},
    }.items():
        for t in (q, k, v):
            t.grad = None
        attnqat.attention(q, k, v, mode="attn_qat", **kw).backward(do)
        grads[name] = (q.grad.clone(), v.grad.clone())
    for name in ("no_quant_p", "low_precision_o", "unquantized_qkv"):
        assert rel_err(grads[name][0], grads["attn_qat"][0]) > 1e-4 or rel_err(grads[name][1], grads["attn_qat"][1]) > 1e-4, name


def test_opcheck_attention_ops():
    q, k, v = qkv(b=1, hq=2, hkv=1, nq=9, nk=20, d=32, requires_grad=True)
    options = resolve_config(causal=True, p_quant="anchored").op_options(False)
    args = (q, k, v, options, True)
    torch.library.opcheck(torch.ops.attnqat.attention_fwd.default, args)
    o, o_hp, lse, m_ref, l = torch.ops.attnqat.attention_fwd(*args)
    q, k, v, o, o_hp = (t.detach() for t in (q, k, v, o, o_hp))  # no double backward
    bwd_args = (torch.randn_like(o), q, k, v, o, o_hp, lse, m_ref, l, options)
    torch.library.opcheck(torch.ops.attnqat.attention_bwd.default, bwd_args)


# ---- Bad input: one test per class, asserting the message ---------------------------------------


@pytest.mark.parametrize(
    "kwargs, tensors, message",
    [
        ({}, dict(q=torch.randint(0, 3, (1, 1, 4, 16))), "q: unsupported dtype|q: expected dtype"),
        ({}, dict(k=torch.randn(1, 1, 4, 16, dtype=torch.float16)), "k, v: expected the dtype of q"),
        ({}, dict(q=torch.randn(1, 4, 16)), "q: expected a 4-D tensor"),
        ({}, dict(k=torch.randn(2, 1, 4, 16)), "k, v: expected batch 1"),
        ({}, dict(q=torch.randn(1, 1, 4, 24), k=torch.randn(1, 1, 4, 24), v=torch.randn(1, 1, 4, 24)), "head_dim a positive multiple of 16"),
        ({}, dict(q=torch.randn(1, 3, 4, 16), k=torch.randn(1, 2, 4, 16), v=torch.randn(1, 2, 4, 16)), "multiple of the number of key/value heads"),
        (dict(causal=True, v_blocks="token"), {}, "v_blocks: 'token' cannot be used with causal attention"),
        ({}, dict(q=torch.randn(1, 1, 4, 0), k=torch.randn(1, 1, 4, 0), v=torch.randn(1, 1, 4, 0)), "got 0"),
        (dict(mode="int4"), {}, "mode: expected one of"),
        (dict(p_quant="x"), {}, "p_quant: expected 'paper' or 'anchored'"),
        (dict(mode="bf16", bwd_quant_p=False), {}, "bwd_\\* switches"),
        (dict(softmax_scale=-1.0), {}, "softmax_scale: expected a positive finite number"),
        (dict(kv_tile=20), {}, "kv_tile: expected a positive multiple of 16"),
    ],
)
def test_bad_attention_inputs(kwargs, tensors, message):
    t = dict(q=torch.randn(1, 1, 4, 16), k=torch.randn(1, 1, 4, 16), v=torch.randn(1, 1, 4, 16))
    t.update(tensors)
    with pytest.raises(ValueError, match=message):
        attnqat.attention(t["q"], t["k"], t["v"], **kwargs)


def test_gradient_in_fp4_mode_names_attn_qat():
    q, k, v = qkv(requires_grad=True)
    o = attnqat.attention(q, k, v, mode="fp4")
    with pytest.raises(ValueError, match="mode: 'fp4' is the inference forward and has no backward; train with mode='attn_qat'"):
        o.sum().backward()


def test_mismatched_devices():
    meta = torch.empty(1, 1, 4, 16, device="meta")
    with pytest.raises(ValueError, match="k: expected a tensor on cpu \\(the device of q\\), got one on meta"):
        attnqat.attention(torch.randn(1, 1, 4, 16), meta, meta)


def test_empty_sequence_gives_empty_output():
    q = torch.randn(2, 2, 0, 32)
    k = v = torch.randn(2, 2, 5, 32)
    assert attnqat.attention(q, k, v).shape == (2, 2, 0, 32)
    # No keys: O = 0, LSE = -inf (numerics section 3).
    o, lse = attnqat.attention(torch.randn(1, 1, 3, 16), torch.randn(1, 1, 0, 16), torch.randn(1, 1, 0, 16), return_lse=True)
    assert torch.equal(o, torch.zeros_like(o)) and torch.isneginf(lse).all()
