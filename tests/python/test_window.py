"""attnqat.attention(..., window=(left, right)): sliding-window attention, CPU reference and CUDA
kernels (docs/numerics.md section 3). The mask is bottom-right aligned like causal: query i sees keys
d - left <= j <= d + right with d = i + Nk - Nq, -1 leaving a side unbounded; causal=True makes
the right side 0. The numerics are tested in tests/cpp/test_attention.cpp and test_mask.cpp (CPU) and
the kernels' window cases of tests/cpp/cuda_attention*/ (GPU)."""

import numpy as np
import pytest
import torch

import attnqat
from attnqat.attention import resolve_config
from conftest import rel_err

WINDOWS = [(0, 0), (3, 2), (5, 0), (0, 4), (-1, 3), (7, -1), (16, 16)]


def qkv(b=2, hq=4, hkv=2, nq=13, nk=29, d=32, dtype=torch.float32, requires_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda h, n: torch.randn(b, h, n, d, generator=g, dtype=torch.float32).to(dtype).requires_grad_(requires_grad)
    return make(hq, nq), make(hkv, nk), make(hkv, nk)


def window_mask(nq, nk, window, causal=False):
    """True where query i sees key j (the rule written out here)."""
    left, right = window
    if causal:
        right = 0
    i = torch.arange(nq)[:, None]
    j = torch.arange(nk)[None, :]
    d = i + nk - nq
    mask = torch.ones(nq, nk, dtype=torch.bool)
    if left >= 0:
        mask &= j >= d - left
    if right >= 0:
        mask &= j <= d + right
    return mask


def dense(q, k, v, mask):
    """Masked softmax attention in the inputs' dtype (GQA by repeating K and V)."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, -1) @ v


def grads(fn, inputs, do):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    o = fn(*inputs)
    o.backward(do)
    return o.detach(), [t.grad for t in inputs]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", WINDOWS)
def test_bf16_mode_forward_and_backward_match_masked_dense_math(window, causal):
    # float64 inputs run the fp64 reference: the dense math up to the float32 softmax scale (the
    # options hold a float) and the float32 LSE the backward reads: ~1e-8 relative in O, ~1e-7 in
    # the gradients; a wrong key costs ~1e-2.
    q, k, v = qkv(dtype=torch.float64)
    do = torch.randn(q.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    mask = window_mask(q.shape[2], k.shape[2], window, causal)
    assert mask.any(-1).all()  # no empty row here (see test_rows_outside_the_window_are_empty)
    o, g = grads(lambda a, b, c: attnqat.attention(a, b, c, mode="bf16", causal=causal, window=window), (q, k, v), do)
    o_ref, g_ref = grads(lambda a, b, c: dense(a, b, c, mask), (q, k, v), do)
    assert rel_err(o, o_ref) < 1e-7
    for a, b in zip(g, g_ref):
        assert (a - b).abs().max() <= 1e-6 * max(1.0, float(b.abs().max()))


@pytest.mark.parametrize("window", [(3, 2), (5, 0)])
def test_bf16_mode_float32_and_bfloat16_inputs(window):
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        q, k, v = qkv(dtype=dtype)
        o = attnqat.attention(q, k, v, mode="bf16", window=window)
        ref = dense(*(t.double() for t in (q, k, v)), window_mask(q.shape[2], k.shape[2], window))
        assert o.dtype == dtype
        assert rel_err(o, ref) < tol


@pytest.mark.parametrize("mode", ["bf16", "drop_in_qat", "attn_qat"])
@pytest.mark.parametrize("p_quant", ["paper", "anchored"])
@pytest.mark.parametrize("shape", [(13, 29), (29, 13)])
def test_unbounded_sides_equal_causal_and_no_mask_bit_for_bit(mode, p_quant, shape):
    nq, nk = shape
    q, k, v = qkv(nq=nq, nk=nk, dtype=torch.bfloat16)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    run = lambda **kw: grads(lambda a, b, c: attnqat.attention(a, b, c, mode=mode, p_quant=p_quant, **kw), (q, k, v), do)
    causal = run(causal=True)
    full = run()
    # (4096, 0) cuts nothing on the left: the window's own path, causal's answers.
    for kw, want in ((dict(window=(-1, 0)), causal), (dict(window=(4096, 0)), causal),
                     (dict(causal=True, window=(-1, 5)), causal), (dict(window=(-1, -1)), full),
                     (dict(window=(4096, 4096)), full), (dict(window=None), full)):
        o, g = run(**kw)
        assert torch.equal(o, want[0]), kw
        for a, b in zip(g, want[1]):
            assert torch.equal(a, b), kw


@pytest.mark.parametrize("mode", ["drop_in_qat", "attn_qat"])
@pytest.mark.parametrize("p_quant", ["paper", "anchored"])
@pytest.mark.parametrize("window", [(3, 2), (8, 0)])
def test_qat_modes_follow_the_masked_dense_math(mode, p_quant, window):
    # FP4 attention is the masked attention up to the quantization error (several percent).
    q, k, v = qkv(nq=40, nk=70, d=64)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(3))
    mask = window_mask(40, 70, window)
    o, g = grads(lambda a, b, c: attnqat.attention(a, b, c, mode=mode, p_quant=p_quant, window=window), (q, k, v), do)
    o_ref, g_ref = grads(lambda a, b, c: dense(a, b, c, mask), (q, k, v), do)
    assert rel_err(o, o_ref) < 0.2
    for a, b in zip(g, g_ref):
        assert torch.isfinite(a).all()
        assert rel_err(a, b) < 0.35
    # And a key outside every window gets no gradient: with window (w, 0) and Nq < Nk, keys
    # before Nk - Nq - w are seen by no row.
    first_seen = 70 - 40 - window[0]
    assert (g[1][:, :, :first_seen] == 0).all() and (g[2][:, :, :first_seen] == 0).all()


def test_rows_outside_the_window_are_empty():
    # Window (1, 0) with Nq = 20 > Nk = 8: rows 0-11 see no key: O = 0, LSE = -inf, dQ = 0.
    for mode in ("bf16", "attn_qat"):
        q, k, v = qkv(b=1, hq=2, hkv=1, nq=20, nk=8, d=16, requires_grad=True)
        o, lse = attnqat.attention(q, k, v, mode=mode, window=(1, 0), return_lse=True)
        assert (o[:, :, :12] == 0).all()
        assert torch.isinf(lse[:, :, :12]).all() and (lse[:, :, :12] < 0).all()
        assert torch.isfinite(lse[:, :, 12:]).all()
        o.sum().backward()
        assert (q.grad[:, :, :12] == 0).all()
        assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_numpy_arrays_take_the_window():
    q, k, v = qkv()
    o = attnqat.attention(q, k, v, window=(3, 1))
    o_np = attnqat.attention(*(t.numpy() for t in (q, k, v)), window=(3, 1))
    assert np.array_equal(o.numpy(), o_np)


def test_the_window_reaches_the_core_options():
    cfg = resolve_config(window=(4, 2))
    assert (cfg.window_left, cfg.window_right) == (4, 2)
    assert "'window_left': 4" in cfg.op_options(False) and "'window_right': 2" in cfg.op_options(False)
    assert (resolve_config().window_left, resolve_config().window_right) == (-1, -1)
    opts = attnqat._C.AttentionOptions(window_left=3, window_right=0)
    assert (opts.window_left, opts.window_right) == (3, 0)
    assert "window_left=3" in repr(opts)


@pytest.mark.parametrize("window", [4, "4,0", (1,), (1, 2, 3), (1.0, 2), (True, 0), (0, None), {0: 1}])
def test_window_of_the_wrong_type_is_a_type_error(window):
    q, k, v = qkv()
    with pytest.raises(TypeError, match="^window: expected None or a tuple"):
        attnqat.attention(q, k, v, window=window)


@pytest.mark.parametrize("window, side", [((-2, 0), "window_left"), ((0, -5), "window_right"),
                                          ((-(2**40), 0), "window_left")])
def test_window_values_below_minus_one_are_a_value_error(window, side):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=f"^window: {side}: expected -1 \\(unbounded\\) or a number of keys >= 0"):
        attnqat.attention(q, k, v, window=window)


def test_window_values_past_int32_are_a_value_error():
    with pytest.raises(ValueError, match="^window: expected each side at most 2\\^31 - 1"):
        resolve_config(window=(2**31, 0))


def test_core_names_the_window_fields():
    with pytest.raises(ValueError, match="^window_right: expected -1"):
        attnqat._C.validate_attention_options(attnqat._C.AttentionOptions(window_right=-3))


def test_token_v_blocks_refuse_a_causal_like_window():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="^v_blocks: 'token' cannot be used with a window whose right side is 0"):
        attnqat.attention(q, k, v, window=(4, 0), v_blocks="token")
    attnqat.attention(q, k, v, window=(4, 4), v_blocks="token")  # not causal: allowed
    attnqat.attention(q, k, v, window=(4, 0), v_blocks="token", mode="bf16")  # nothing quantized


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["bf16", "fp4", "attn_qat"])
@pytest.mark.parametrize("window,causal", [((128, 0), False), ((1, 1), False), ((0, 127), False),
                                           ((127, -1), False), ((64, 300), True)])
def test_cuda_windows_match_the_cpu_reference(cuda, mode, window, causal):
    # The kernels against the CPU reference on the same bf16 inputs (C++ tests check every output
    # and statistic bit-level; this is the front end's path, forward and backward). bf16 mode:
    # both round O to bf16 (~4e-3 relative); quantized modes: P's FP4 codes can flip on ex2.approx
    # vs exp2 near a rounding boundary (numerics 9.1), ~1e-2. A wrong window costs > 0.1.
    q, k, v = qkv(b=1, hq=4, hkv=2, nq=300, nk=333, d=64, dtype=torch.bfloat16, seed=3)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    run = lambda a, b, c: attnqat.attention(a, b, c, mode=mode, causal=causal, window=window)
    tol = 1e-2 if mode == "bf16" else 3e-2
    if mode == "fp4":  # the inference forward: no backward
        o_gpu, o_cpu = run(q.to(cuda), k.to(cuda), v.to(cuda)), run(q, k, v)
    else:
        o_gpu, g_gpu = grads(run, [t.to(cuda) for t in (q, k, v)], do.to(cuda))
        o_cpu, g_cpu = grads(run, (q, k, v), do)
        for a, b in zip(g_gpu, g_cpu):
            assert rel_err(a.cpu(), b) < 2 * tol
    assert rel_err(o_gpu.cpu(), o_cpu) < tol
    o_full = attnqat.attention(q.to(cuda), k.to(cuda), v.to(cuda), mode=mode, causal=causal)
    assert rel_err(o_full.cpu(), o_cpu) > 0.1  # the window changed the answer
    # The windows that are causal or no mask are those masks, bit for bit.
    qc, kc, vc = (t.to(cuda) for t in (q, k, v))
    assert torch.equal(attnqat.attention(qc, kc, vc, mode=mode, window=(-1, 0)), attnqat.attention(qc, kc, vc, mode=mode, causal=True))
    assert torch.equal(attnqat.attention(qc, kc, vc, mode=mode, window=(-1, -1)), attnqat.attention(qc, kc, vc, mode=mode))
