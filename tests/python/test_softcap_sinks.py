"""attnqat.attention(..., softcap=, sinks=): logit soft-capping (Gemma 2) and attention sinks
(GPT-OSS's s_aux) on the CPU reference (docs/numerics.md 9.9, 9.10), against a float64 formula
written out here: mode bf16 to round-off, the FP4 modes through their distance to it; gradients
(dsinks included) by gradcheck; the edge cases, the options' checks, the torch ops (opcheck,
torch.compile); on a GPU, the CUDA kernels against the CPU reference (Gemma 2's cap, GPT-OSS's
sinks). The quantized numerics are checked bit for bit against naive
versions in tests/cpp/test_softcap_sinks.cpp."""

import math

import numpy as np
import pytest
import torch

import attnqat
from attnqat.attention import resolve_config
from conftest import rel_err

NEG_INF = float("-inf")


def qkv(b=2, hq=4, hkv=2, nq=13, nk=29, d=32, dtype=torch.float32, requires_grad=False, seed=0, scale=2.0):
    # Scores of a few units (q scaled by 2), so that a cap of 1-2 and sinks of a few units matter.
    g = torch.Generator().manual_seed(seed)
    make = lambda h, n, s: (s * torch.randn(b, h, n, d, generator=g, dtype=torch.float64)).to(dtype).requires_grad_(
        requires_grad)
    return make(hq, nq, scale), make(hkv, nk, 1.0), make(hkv, nk, 1.0)


def sink_logits(values, requires_grad=False):
    return torch.tensor(values, dtype=torch.float32).requires_grad_(requires_grad)


def formula(q, k, v, softcap=0.0, sinks=None, causal=False):
    """softmax([softcap * tanh(s / softcap) over the visible keys] ++ [sinks[h]]) with
    s = q.k / sqrt(D), the sink's column dropped before P.V; float64. Returns (O, LSE)."""
    q, k, v = (t.double() for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scale = float(np.float32(1 / math.sqrt(q.shape[-1])))  # the core's fp32 default, widened
    s = scale * q @ k.transpose(-1, -2)
    if softcap:
        softcap = float(np.float32(softcap))  # the core holds it in float32
        s = softcap * torch.tanh(s / softcap)
    nq, nk = s.shape[-2:]
    if causal:  # bottom-right aligned
        s = s.masked_fill(torch.arange(nk)[None, :] > torch.arange(nq)[:, None] + nk - nq, NEG_INF)
    logits = s
    if sinks is not None:
        logits = torch.cat([s, sinks.double().view(1, -1, 1, 1).expand(*s.shape[:3], 1)], -1)
    lse = torch.logsumexp(logits, -1)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)  # rows with no key and no sink: 0
    return p @ v, lse


# ---- Mode bf16: the formula to round-off ------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("softcap, with_sinks", [(1.5, True), (0.7, False), (0.0, True)])
def test_bf16_mode_is_the_float64_formula(causal, softcap, with_sinks):
    q, k, v = qkv(nq=29 if causal else 13, dtype=torch.float64, requires_grad=True, seed=1)
    sinks = sink_logits([2.5, -1.0, 4.0, NEG_INF], requires_grad=True) if with_sinks else None
    o, lse = attnqat.attention(q, k, v, mode="bf16", causal=causal, softcap=softcap, sinks=sinks, return_lse=True)
    ref_o, ref_lse = formula(q, k, v, softcap, sinks, causal)
    # float64 inputs run the fp64 reference: O to ~1e-15; the LSE is stored in float32.
    assert rel_err(o.detach(), ref_o.detach()) < 1e-12
    assert rel_err(lse, ref_lse.detach()) < 1e-7
    inputs = (q, k, v) + ((sinks,) if with_sinks else ())
    do = torch.randn(o.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    grads = torch.autograd.grad(o, inputs, do)
    ref_grads = torch.autograd.grad(ref_o, inputs, do)
    # The backward normalizes with the float32 LSE: ~1e-7 relative.
    for name, g, r in zip("qkvs", grads, ref_grads):
        assert rel_err(g, r) < 1e-5, name
    if with_sinks:
        assert grads[3][3] == 0  # the -inf sink takes no mass and gets no gradient
    # The cap and the sinks are applied: the formula without them is far away.
    assert rel_err(o.detach(), formula(q, k, v, causal=causal)[0].detach()) > 1e-2


def test_gradcheck():
    """Finite differences in float64 (mode bf16, a cap, GQA, causal). The sinks are float32 (the
    core's dtype): gradcheck moves a float64 copy by eps = 1e-3, which rounds to float32 with a
    relative error of ~6e-5 of the difference, well inside rtol 1e-3; the analytic gradients
    normalize with the float32 LSE (~1e-7)."""
    q, k, v = qkv(b=1, hq=2, hkv=1, nq=5, nk=7, d=16, dtype=torch.float64, requires_grad=True, seed=3)
    z = torch.tensor([0.75, -0.5], dtype=torch.float64, requires_grad=True)

    def f(q, k, v, z):
        return attnqat.attention(q, k, v, mode="bf16", causal=True, softcap=1.25, sinks=z.float())

    assert torch.autograd.gradcheck(f, (q, k, v, z), eps=1e-3, atol=1e-6, rtol=1e-3)


# ---- The FP4 modes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["fp4", "drop_in_qat", "attn_qat"])
@pytest.mark.parametrize("p_quant", ["paper", "anchored"])
def test_fp4_modes_apply_the_cap_and_the_sinks(mode, p_quant):
    """The FP4 result is within FP4 error of the capped formula with sinks and much further from the
    formula without them (an FP4 forward that dropped either could not pass). The quantized
    numerics themselves: tests/cpp/test_softcap_sinks.cpp, bit for bit against a naive version."""
    q, k, v = qkv(seed=4)
    sinks = sink_logits([5.0, 3.0, 6.0, NEG_INF])
    o = attnqat.attention(q, k, v, mode=mode, p_quant=p_quant, softcap=1.0, sinks=sinks)
    err = rel_err(o, formula(q, k, v, 1.0, sinks)[0])
    # FP4 attention error (Q, K, V and P in NVFP4; measured 0.15-0.16 here, 0.8 without the cap
    # and 0.64 without the sinks).
    assert err < 0.25
    assert rel_err(o, formula(q, k, v, 0.0, sinks)[0]) > 3 * err
    assert rel_err(o, formula(q, k, v, 1.0, None)[0]) > 3 * err
    # numpy arrays run the same core: the same bits.
    o_np = attnqat.attention(q.numpy(), k.numpy(), v.numpy(), mode=mode, p_quant=p_quant, softcap=1.0,
                             sinks=sinks.numpy())
    assert np.array_equal(o_np, o.detach().numpy())


def test_training_modes_give_finite_gradients_for_every_input():
    q, k, v = qkv(requires_grad=True, seed=5)
    sinks = sink_logits([1.0, 2.0, 3.0, 4.0], requires_grad=True)
    grads = {}
    for mode in ("drop_in_qat", "attn_qat"):
        o = attnqat.attention(q, k, v, mode=mode, causal=True, softcap=2.0, sinks=sinks)
        grads[mode] = torch.autograd.grad(o.square().sum(), (q, k, v, sinks))
        assert all(bool(torch.isfinite(g).all()) for g in grads[mode])
        assert bool((grads[mode][3] != 0).all())
    # The modes' backwards differ (D from O vs O', quantized or raw scores): dsinks too.
    assert rel_err(grads["drop_in_qat"][3], grads["attn_qat"][3]) > 1e-4


def test_qkv_scale_paths_carry_the_cap_and_the_sinks():
    """With a second-level scale the drop-in backward runs the forward on x / g (rescaled softmax
    scale); powers of two commute with every rounding, so it is the prequantized path's forward,
    bit for bit, cap and sinks included."""
    q, k, v = qkv(requires_grad=True, seed=6)
    sinks = sink_logits([2.0, 1.0, 3.0, 0.5], requires_grad=True)
    kw = dict(softcap=1.5, sinks=sinks, qkv_scale=(4.0, 0.5, 2.0))
    o_rescaled = attnqat.attention(q, k, v, mode="drop_in_qat", **kw)  # grad enabled: the x / g path
    with torch.no_grad():
        o_prequant = attnqat.attention(q, k, v, mode="drop_in_qat", **kw)
        o_plain = attnqat.attention(q, k, v, mode="drop_in_qat", qkv_scale=(4.0, 0.5, 2.0))
    assert torch.equal(o_rescaled.detach(), o_prequant)
    assert rel_err(o_prequant, o_plain) > 1e-2
    (g,) = torch.autograd.grad(o_rescaled.sum(), (sinks,))
    assert bool(torch.isfinite(g).all()) and bool((g != 0).all())


# ---- Edge cases ---------------------------------------------------------------------------------------


def test_minus_inf_sink_is_no_sink():
    q, k, v = qkv(requires_grad=True, seed=7)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(8))
    none = sink_logits([NEG_INF] * 4, requires_grad=True)
    for mode in ("bf16", "drop_in_qat", "attn_qat"):
        o0 = attnqat.attention(q, k, v, mode=mode, causal=True, softcap=2.0)
        o1 = attnqat.attention(q, k, v, mode=mode, causal=True, softcap=2.0, sinks=none)
        assert torch.equal(o0, o1)
        g0 = torch.autograd.grad(o0, (q, k, v), do)
        g1 = torch.autograd.grad(o1, (q, k, v, none), do)
        assert all(torch.equal(a, b) for a, b in zip(g0, g1))
        assert bool((g1[3] == 0).all())


def test_a_huge_sink_takes_all_the_mass():
    q, k, v = qkv(seed=9)
    sinks = sink_logits([200.0] * 4)
    for mode in ("bf16", "attn_qat"):
        o, lse = attnqat.attention(q, k, v, mode=mode, sinks=sinks, return_lse=True)
        assert float(o.abs().max()) < 1e-30  # exp(-~190)
        assert torch.allclose(lse, torch.full_like(lse, 200.0), atol=1e-4, rtol=0)


def test_a_huge_cap_is_no_cap():
    # cap tanh(s / cap) = s (1 - (s / cap)^2 / 3 + ...) with s of a few units: 1e-7 at cap 1e4,
    # plus the float32 roundings of the cap's constants.
    q, k, v = qkv(seed=10)
    o0 = attnqat.attention(q, k, v, mode="bf16")
    assert rel_err(attnqat.attention(q, k, v, mode="bf16", softcap=1e4), o0) < 1e-5
    assert rel_err(attnqat.attention(q, k, v, mode="bf16", softcap=None), o0) == 0


def test_rows_without_keys_give_zero_and_the_sinks_lse():
    # Causal with Nq = 20 > Nk = 8: rows 0-11 see no key: O = 0, LSE = the sink, no gradient.
    q, k, v = qkv(b=1, hq=2, hkv=1, nq=20, nk=8, d=16, requires_grad=True, seed=11)
    sinks = sink_logits([1.5, -2.0], requires_grad=True)
    for mode in ("bf16", "attn_qat"):
        o, lse = attnqat.attention(q, k, v, mode=mode, causal=True, sinks=sinks, return_lse=True)
        assert bool((o[:, :, :12] == 0).all())
        assert torch.allclose(lse[0, :, :12], sinks.detach()[:, None].expand(2, 12), atol=2e-6, rtol=0)
        assert bool(torch.isfinite(lse).all())
        gq, gs = torch.autograd.grad(o.sum(), (q, sinks))
        assert bool((gq[:, :, :12] == 0).all()) and bool(torch.isfinite(gs).all())
    # No key at all.
    o, lse = attnqat.attention(q, k[:, :, :0], v[:, :, :0], sinks=sinks, return_lse=True)
    assert bool((o == 0).all())
    assert torch.allclose(lse[0], sinks.detach()[:, None].expand(2, 20), atol=2e-6, rtol=0)
    (gs,) = torch.autograd.grad(o.sum(), (sinks,))
    assert bool((gs == 0).all())


# ---- Options and tensors that are refused -------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(softcap=-1.0), ValueError, "softcap: expected 0 (off) or a positive finite number, got -1.0"),
        (dict(softcap=float("nan")), ValueError, "softcap: expected 0 (off) or a positive finite number"),
        (dict(softcap=1e300), ValueError, "softcap: expected 0 (off) or a positive finite number in float32 range"),
        (dict(softcap="50"), TypeError, "softcap: expected a real number (0 or None: off), got str"),
        (dict(softcap=True), TypeError, "softcap: expected a real number"),
        (dict(softcap=1e-40), ValueError, "softcap: softmax_scale / softcap and softcap * log2(e) must be normal"),
        (dict(sinks=[float("nan"), 0, 0, 0]), ValueError,
         "sinks: expected finite logits (or -inf: no sink for that head), got nan at index 0"),
        (dict(sinks=[0, 0, float("inf"), 0]), ValueError, "got inf at index 2"),
        (dict(sinks=[0.0, 0.0]), ValueError, "sinks: expected one logit per query head, shape [4], got [2]"),
        (dict(sinks=torch.zeros(4, dtype=torch.float64)), ValueError, "sinks: expected dtype float32, got float64"),
        (dict(sinks=np.zeros(4, np.float32)), TypeError, "sinks is a numpy array but q is a torch tensor"),
    ],
)
def test_refused(kwargs, error, message):
    q, k, v = qkv(seed=12)
    if isinstance(kwargs.get("sinks"), list):
        kwargs = dict(kwargs, sinks=torch.tensor(kwargs["sinks"], dtype=torch.float32))
    with pytest.raises(error) as e:
        attnqat.attention(q, k, v, **kwargs)
    assert message in str(e.value)


def test_options_object_and_config():
    assert resolve_config(softcap=30).softcap == 30.0
    assert resolve_config(softcap=None).softcap == 0.0
    assert attnqat._C.AttentionOptions(softcap=50.0).softcap == 50.0
    assert "'softcap': 2.5" in resolve_config(softcap=2.5).op_options(False)
    with pytest.raises(TypeError, match="unknown option 'sinks'"):
        attnqat._C.AttentionOptions(sinks=None)  # a tensor: an argument of the calls, not an option


# ---- The torch ops ------------------------------------------------------------------------------------


def test_opcheck_with_sinks():
    q, k, v = qkv(b=1, hq=2, hkv=1, nq=9, nk=20, d=32, requires_grad=True, seed=13)
    sinks = sink_logits([1.0, 2.0], requires_grad=True)
    options = resolve_config(causal=True, p_quant="anchored", softcap=2.0).op_options(False)
    args = (q, k, v, options, True, sinks)
    torch.library.opcheck(torch.ops.attnqat.attention_fwd.default, args)
    o, o_hp, lse, m_ref, l = torch.ops.attnqat.attention_fwd(*args)
    detached = [t.detach() for t in (q, k, v, o, o_hp)]
    bwd_args = (torch.randn_like(o), *detached, lse, m_ref, l, options, sinks.detach())
    torch.library.opcheck(torch.ops.attnqat.attention_bwd.default, bwd_args)
    dq, dk, dv, dsinks = torch.ops.attnqat.attention_bwd(*bwd_args)
    assert dsinks.shape == (2,) and dsinks.dtype == torch.float32


def test_torch_compile_fullgraph():
    q, k, v = qkv(b=1, hq=2, hkv=1, nq=16, nk=16, d=16, requires_grad=True, seed=14)
    sinks = torch.nn.Parameter(torch.tensor([1.0, -1.0]))  # as models hold them

    def f(q, k, v, s):
        return attnqat.attention(q, k, v, causal=True, softcap=2.0, sinks=s)

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    o_c = compiled(q, k, v, sinks)
    o_e = f(q, k, v, sinks)
    assert torch.equal(o_c, o_e)
    g_c = torch.autograd.grad(o_c.sum(), (q, sinks))
    g_e = torch.autograd.grad(o_e.sum(), (q, sinks))
    assert all(torch.equal(a, b) for a, b in zip(g_c, g_e))


# ---- CUDA against the CPU reference -------------------------------------------------------------------


def run_on(device, q, k, v, do, sinks=None, **kw):
    """O, LSE and the gradients (dsinks last, with sinks) of one call on `device`, back on the CPU."""
    qq, kk, vv = (t.detach().to(device).requires_grad_(True) for t in (q, k, v))
    zz = None if sinks is None else sinks.detach().to(device).requires_grad_(True)
    o, lse = attnqat.attention(qq, kk, vv, sinks=zz, return_lse=True, **kw)
    o.backward(do.to(device))
    grads = [t.grad.float().cpu() for t in (qq, kk, vv) + (() if zz is None else (zz,))]
    return o.detach().float().cpu(), lse.cpu(), grads


def assert_cuda_matches_cpu(got, ref, fp4):
    (o, lse, grads), (o_ref, lse_ref, grads_ref) = got, ref
    # O: bf16 output rounding (2^-9 relative), plus in the FP4 modes the rare E2M1 boundary flips
    # of P from the GPU's approximate exp2 and tanh (the kernels' tanh is good to ~2.4e-7 absolute:
    # softcap.cuh); tests/cpp/cuda_attention holds the justified per-output tolerances.
    assert rel_err(o, o_ref) < (2e-2 if fp4 else 8e-3)
    # LSE: fp32 sums in another order, ex2.approx and the tanh: ~1e-5 relative (C++ tests: 1e-5).
    finite = torch.isfinite(lse_ref)
    assert torch.equal(finite, torch.isfinite(lse))
    assert bool(((lse - lse_ref)[finite].abs() <= 1e-4 * (1 + lse_ref[finite].abs())).all())
    # Gradients: bf16 operands of the dS / P_F products, O and O' of two forwards that round
    # differently (D and dsinks read them), E2M1 flips of P_F (tests/cpp/cuda_attention_bwd).
    for name, a, b in zip(("dq", "dk", "dv", "dsinks"), grads, grads_ref):
        assert rel_err(a, b) < 2e-2, (name, rel_err(a, b))


@pytest.mark.gpu
@pytest.mark.parametrize("mode, p_quant", [("bf16", "paper"), ("attn_qat", "paper"), ("attn_qat", "anchored"),
                                           ("drop_in_qat", "anchored")])
def test_cuda_gemma2_softcap_matches_the_cpu_reference(cuda, mode, p_quant):
    """Gemma 2's attention logit soft-capping (50 on the scaled logits), causal, GQA, head dim
    128: the CUDA kernels against the CPU reference, forward and backward. Queries scaled by 12
    give logits of tens of units, where the cap bends them: the result without the cap is far."""
    q, k, v = qkv(b=2, hq=8, hkv=4, nq=300, nk=300, d=128, dtype=torch.bfloat16, seed=20, scale=12.0)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(21)).to(torch.bfloat16)
    kw = dict(mode=mode, p_quant=p_quant, causal=True, softcap=50.0)
    got = run_on(cuda, q, k, v, do, **kw)
    assert_cuda_matches_cpu(got, run_on("cpu", q, k, v, do, **kw), fp4=mode != "bf16")
    # The cap is applied: it lowers each row's top logits (e.g. 36 -> 31 at 100 keys), and its LSE.
    uncapped = run_on("cpu", q, k, v, do, **dict(kw, softcap=0.0))
    assert float((uncapped[1] - got[1]).mean()) > 1.0


@pytest.mark.gpu
@pytest.mark.parametrize("mode, p_quant", [("bf16", "paper"), ("attn_qat", "anchored"), ("attn_qat", "paper"),
                                           ("drop_in_qat", "paper")])
@pytest.mark.parametrize("nq, nk, window", [(256, 256, None), (300, 129, None), (333, 333, (127, 0))])
def test_cuda_gpt_oss_sinks_match_the_cpu_reference(cuda, mode, p_quant, nq, nk, window):
    """GPT-OSS's attention sinks: one learned logit per query head (here one of them -inf: no sink,
    one large), GQA 4, head dim 64, causal, and a sliding window of 128 keys as on GPT-OSS's
    alternating layers; Nq > Nk leaves rows without keys (O = 0, LSE = the sink). The sinks'
    gradient (dsinks) against the CPU reference's too."""
    q, k, v = qkv(b=2, hq=8, hkv=2, nq=nq, nk=nk, d=64, dtype=torch.bfloat16, seed=22, scale=1.0)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(23)).to(torch.bfloat16)
    sinks = sink_logits([0.5, 2.0, NEG_INF, -1.0, 3.5, 8.0, 1.0, -0.25])
    kw = dict(mode=mode, p_quant=p_quant, causal=True, window=window)
    got = run_on(cuda, q, k, v, do, sinks, **kw)
    assert_cuda_matches_cpu(got, run_on("cpu", q, k, v, do, sinks, **kw), fp4=mode != "bf16")
    o, lse, grads = got
    dsinks = grads[3]
    assert dsinks[2] == 0 and bool((dsinks[[0, 1, 3, 4, 5, 6, 7]] != 0).all())
    if nq > nk:  # rows 0 .. nq - nk - 1 see no key
        empty = nq - nk
        assert bool((o[:, :, :empty] == 0).all())
        want = sinks[None, :, None].expand(2, 8, empty).clone()
        has = torch.isfinite(want)
        assert torch.allclose(lse[:, :, :empty][has], want[has], atol=2e-5, rtol=0)
        assert bool(torch.isneginf(lse[:, 2, :empty]).all())
    without = run_on("cpu", q, k, v, do, **kw)
    assert rel_err(o, without[0]) > 0.05
