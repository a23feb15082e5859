"""attnqat.sdpa, attnqat.config and attnqat.nn.FP4Attention on the CPU reference: torch SDPA
semantics (causal alignment, masks, GQA), what raises, the configuration layers, autocast and
torch.compile(fullgraph=True)."""

import threading

import pytest
import torch
import torch.nn.functional as F

import attnqat
from conftest import rel_err


def qkv(b=2, hq=4, hkv=2, nq=33, nk=40, d=32, dtype=torch.float32, requires_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda h, n: torch.randn(b, h, n, d, generator=g).to(dtype).requires_grad_(requires_grad)
    return make(hq, nq), make(hkv, nk), make(hkv, nk)


def close(a, b, rel=1e-5, floor=1e-5) -> bool:
    """Relative L2 error below rel, or every element within floor (for gradients that are exactly 0
    in exact arithmetic, such as dq over a single key)."""
    a, b = a.detach(), b.detach()
    return rel_err(a, b) < rel or bool((a - b).abs().max() < floor)


def padded_causal(b, nq, nk, left=(), right=(), causal=True):
    """Key padding per sequence (left/right counts), with a bottom-right causal limit if causal."""
    m = torch.ones(b, 1, nq, nk, dtype=torch.bool)
    if causal:
        m = m.tril(diagonal=nk - nq)
    for i, p in left:
        m[i, ..., :p] = False
    for i, p in right:
        m[i, ..., nk - p:] = False
    return m


# ---- Semantics against torch's SDPA (mode bf16 = ordinary attention) --------------------------------


@pytest.mark.parametrize("nq, nk", [(33, 40), (40, 33), (24, 24), (1, 17), (17, 1), (5, 80)])
@pytest.mark.parametrize("is_causal", [False, True])
def test_matches_torch_sdpa_including_top_left_causal(nq, nk, is_causal):
    q, k, v = qkv(nq=nq, nk=nk, requires_grad=True)
    o = attnqat.sdpa(q, k, v, is_causal=is_causal, enable_gqa=True, mode="bf16")
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, (q, k, v), do)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, enable_gqa=True)
    ref_grads = torch.autograd.grad(ref, (q, k, v), do)
    assert close(o, ref)
    for g, r in zip(grads, ref_grads):
        assert close(g, r)


def test_bottom_right_alignment_matches_attention():
    q, k, v = qkv(nq=9, nk=40)
    o = attnqat.sdpa(q, k, v, is_causal=True, enable_gqa=True, causal_alignment="bottom_right")
    assert torch.equal(o, attnqat.attention(q, k, v, causal=True))


@pytest.mark.parametrize(
    "nq, nk, left, right, causal",
    [
        (24, 24, [(0, 5)], [(1, 3)], True),  # training batch, left and right padding
        (1, 30, [(0, 7), (1, 29)], [], True),  # decoding step over a left-padded cache
        (6, 30, [(1, 4)], [], True),  # chunked prefill over a cache
        (20, 20, [(0, 20)], [], True),  # a fully padded sequence: O = 0
        (16, 24, [(0, 3)], [(1, 9)], False),  # encoder-style key padding, no causal limit
    ],
)
def test_padding_masks_match_torch_sdpa(nq, nk, left, right, causal):
    q, k, v = qkv(nq=nq, nk=nk, requires_grad=True)
    m = padded_causal(2, nq, nk, left, right, causal)
    o = attnqat.sdpa(q, k, v, attn_mask=m, enable_gqa=True, mode="bf16")
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=True).nan_to_num()
    assert close(o, ref)
    do = torch.randn_like(o)
    for g, r in zip(torch.autograd.grad(o, (q, k, v), do), torch.autograd.grad(ref, (q, k, v), do)):
        assert close(g, r)


def test_broadcast_mask_shapes():
    q, k, v = qkv(nq=8, nk=12)
    key_padding = torch.ones(12, dtype=torch.bool)
    key_padding[:3] = False
    for m in (key_padding[None], key_padding[None, None, None].expand(2, 4, 8, 12), torch.ones(8, 12, dtype=torch.bool).tril(4)):
        o = attnqat.sdpa(q, k, v, attn_mask=m, enable_gqa=True, mode="bf16")
        assert rel_err(o, F.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=True)) < 1e-5


def test_mask_analysis_is_reused_only_for_the_same_unmodified_mask(monkeypatch):
    """transformers passes one mask tensor to every layer: it is verified (a host sync) once."""
    from attnqat import functional

    calls = []
    analyse = functional._analyse_mask
    monkeypatch.setattr(functional, "_analyse_mask", lambda *a: calls.append(1) or analyse(*a))
    q, k, v = qkv(nq=8, nk=8)
    m = padded_causal(2, 8, 8, left=[(0, 2)])
    first = attnqat.sdpa(q, k, v, attn_mask=m, enable_gqa=True, mode="bf16")
    assert torch.equal(attnqat.sdpa(q, k, v, attn_mask=m, enable_gqa=True, mode="bf16"), first)
    assert len(calls) == 1
    m[1, 0, 3, 5] = True  # written in place: analysed again, and now not expressible
    with pytest.raises(ValueError, match="not a per-sequence key range"):
        attnqat.sdpa(q, k, v, attn_mask=m, enable_gqa=True)
    attnqat.sdpa(q, k, v, attn_mask=m.clone().fill_(True), enable_gqa=True)  # another tensor: analysed
    assert len(calls) == 3


def test_masks_under_inference_mode():
    q, k, v = qkv(nq=8, nk=8)
    ref = attnqat.sdpa(q, k, v, attn_mask=padded_causal(2, 8, 8, left=[(0, 2)]), enable_gqa=True)
    with torch.inference_mode():  # inference tensors have no version counter
        m = padded_causal(2, 8, 8, left=[(0, 2)])
        for _ in range(2):
            assert torch.equal(attnqat.sdpa(q, k, v, attn_mask=m, enable_gqa=True), ref)


@pytest.mark.parametrize("p_quant", ["paper", "anchored"])
def test_fp4_padded_sequence_equals_the_sequence_alone(p_quant):
    """Each padded sequence runs on its visible keys only: its P blocks start at its first key, so
    padding changes nothing in the FP4 modes either."""
    q, k, v = qkv(b=2, nq=30, nk=30)
    m = padded_causal(2, 30, 30, left=[(0, 7)], right=[(1, 5)])
    o = attnqat.sdpa(q, k, v, attn_mask=m, enable_gqa=True, mode="fp4", p_quant=p_quant)
    alone0 = attnqat.attention(q[:1, :, 7:], k[:1, :, 7:], v[:1, :, 7:], causal=True, mode="fp4", p_quant=p_quant)
    alone1 = attnqat.attention(q[1:, :, :25], k[1:, :, :25], v[1:, :, :25], causal=True, mode="fp4", p_quant=p_quant)
    assert torch.equal(o[:1, :, 7:], alone0) and torch.equal(o[1:, :, :25], alone1)
    assert torch.equal(o[:1, :, :7], torch.zeros_like(o[:1, :, :7]))  # rows that see no key


@pytest.mark.parametrize("mode", ["fp4", "attn_qat"])
def test_key_padding_of_different_lengths_is_one_packed_call(mode, monkeypatch):
    """A text encoder's key padding (keys [0, e_b), no causal limit), different per element: one
    attention_varlen call with seqused_k instead of one call per length, same numbers as each
    element alone on its visible keys."""
    from attnqat import functional

    calls = []
    real = functional.attention_varlen
    monkeypatch.setattr(functional, "attention_varlen", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, v = qkv(b=3, nq=20, nk=24, requires_grad=mode != "fp4")
    ends = [24, 9, 0]
    m = (torch.arange(24)[None, :] < torch.tensor(ends)[:, None])[:, None, None, :]
    o = attnqat.sdpa(q, k, v, attn_mask=m, enable_gqa=True, mode=mode)
    assert len(calls) == 1
    for b, e in enumerate(ends[:2]):
        alone = attnqat.attention(q[b:b + 1], k[b:b + 1, :, :e], v[b:b + 1, :, :e], mode=mode)
        assert torch.equal(o[b:b + 1], alone)
    assert torch.equal(o[2], torch.zeros_like(o[2]))  # no visible key: O = 0
    if mode != "fp4":
        grads = torch.autograd.grad(o, (q, k, v), torch.ones_like(o))
        assert torch.equal(grads[1][1, :, 9:], torch.zeros_like(grads[1][1, :, 9:]))  # padding keys


def test_key_padding_packed_call_gets_zeros_for_masked_keys(monkeypatch):
    # The CUDA kernels read the padding rows that share a key tile with a sequence's last key
    # (with probability 0): the packed call must hand them zeros, so NaN at a masked key cannot
    # reach an output (numerics 9.7), and the result is that of the sequences alone.
    from attnqat import functional

    seen = []
    real = functional.attention_varlen
    monkeypatch.setattr(functional, "attention_varlen", lambda q, k, v, *a, **kw: seen.append((k, v)) or real(q, k, v, *a, **kw))
    q, k, v = qkv(b=2, nq=6, nk=20)
    k[1, :, 7:], v[1, :, 7:] = float("nan"), float("inf")
    m = (torch.arange(20)[None, :] < torch.tensor([20, 7])[:, None])[:, None, None, :]
    o = attnqat.sdpa(q, k, v, attn_mask=m, enable_gqa=True, mode="fp4")
    packed_k, packed_v = seen[0]
    assert torch.isfinite(packed_k).all() and torch.isfinite(packed_v).all()
    assert torch.equal(o[1:], attnqat.attention(q[1:], k[1:, :, :7], v[1:, :, :7], mode="fp4"))


def test_mask_views_made_per_call_are_analysed_once(monkeypatch):
    """diffusers passes a [B, Nk] mask that the backend views as [B, 1, 1, Nk] at every layer."""
    from attnqat import functional

    calls = []
    analyse = functional._analyse_mask
    monkeypatch.setattr(functional, "_analyse_mask", lambda *a: calls.append(1) or analyse(*a))
    q, k, v = qkv(b=2, nq=8, nk=12)
    key_padding = torch.arange(12)[None, :] < torch.tensor([12, 5])[:, None]
    for _ in range(3):
        attnqat.sdpa(q, k, v, attn_mask=key_padding[:, None, None, :], enable_gqa=True, mode="bf16")
    assert len(calls) == 1


# ---- What raises -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(dropout_p=0.1), "dropout_p=0.1: attnqat has no attention dropout"),
        (dict(attn_mask=torch.zeros(8, 8)), "additive bias"),
        (dict(attn_mask=torch.rand(8, 8) > 0.5), "not a per-sequence key range"),
        (dict(attn_mask=torch.ones(8, 8, dtype=torch.bool).triu()), "not a per-sequence key range"),  # anti-causal
        (dict(attn_mask=torch.ones(8, 8, dtype=torch.bool).tril().tril(-3).logical_not().logical_and(
            torch.ones(8, 8, dtype=torch.bool).tril())), "not a per-sequence key range"),  # sliding window
        (dict(attn_mask=torch.ones(8, 8, dtype=torch.bool), is_causal=True), "either attn_mask or is_causal"),
        (dict(attn_mask=torch.ones(3, 8, dtype=torch.bool)), "does not broadcast"),
        (dict(enable_gqa=False), "pass enable_gqa=True"),
        (dict(causal_alignment="center"), "causal_alignment"),
        (dict(mode="int4"), "mode: expected one of"),
    ],
)
def test_unsupported_arguments_raise(kwargs, message):
    q, k, v = qkv(nq=8, nk=8)
    kwargs.setdefault("enable_gqa", True)
    with pytest.raises(ValueError, match=message):
        attnqat.sdpa(q, k, v, **kwargs)


def test_per_head_mask_raises_and_identical_heads_pass():
    q, k, v = qkv(nq=8, nk=8)
    m = torch.ones(2, 4, 8, 8, dtype=torch.bool)
    attnqat.sdpa(q, k, v, attn_mask=m, enable_gqa=True)
    m[:, 1, :, 0] = False
    with pytest.raises(ValueError, match="differs between heads"):
        attnqat.sdpa(q, k, v, attn_mask=m, enable_gqa=True)


# ---- Configuration -----------------------------------------------------------------------------------


def test_config_nesting_explicit_wins_and_restores():
    q, k, v = qkv(nq=16, nk=16)
    base = {m: attnqat.attention(q, k, v, mode=m) for m in ("bf16", "fp4")}
    assert attnqat.get_config().mode == "attn_qat"
    with attnqat.config(mode="bf16") as cfg:
        assert cfg.mode == "bf16"
        assert torch.equal(attnqat.sdpa(q, k, v, enable_gqa=True), base["bf16"])
        with attnqat.config(p_quant="anchored"):
            assert attnqat.get_config().mode == "bf16" and attnqat.get_config().p_quant == "anchored"
            assert torch.equal(attnqat.sdpa(q, k, v, enable_gqa=True, mode="fp4", p_quant="paper"), base["fp4"])
        assert attnqat.get_config().p_quant == "paper"
    assert attnqat.get_config().mode == "attn_qat"
    assert torch.equal(attnqat.sdpa(q, k, v, enable_gqa=True), base["fp4"])  # attn_qat forward == fp4 forward


def test_config_explicit_mode_drops_configured_switches():
    q, k, v = qkv(nq=16, nk=16)
    with attnqat.config(mode="attn_qat", bwd_quant_p=False):
        assert attnqat.sdpa(q, k, v, enable_gqa=True, mode="bf16").shape == q.shape  # no "bwd_* switches" error


def test_config_errors_and_decorator():
    with pytest.raises(TypeError, match="unknown option 'modes'"):
        attnqat.config(modes="fp4")
    with pytest.raises(ValueError, match="p_quant: expected 'paper' or 'anchored'"):
        attnqat.config(p_quant="x")
    with pytest.raises(ValueError, match="kv_tile: expected a positive multiple of 16"):
        attnqat.set_config(kv_tile=20)

    @attnqat.config(mode="fp4")
    def inner():
        return attnqat.get_config().mode

    assert inner() == "fp4" and attnqat.get_config().mode == "attn_qat"


def test_set_config_is_process_wide_and_context_is_per_thread():
    seen = {}
    started, release = threading.Event(), threading.Event()

    def worker():
        with attnqat.config(mode="bf16"):
            started.set()
            release.wait(10)
            seen["worker"] = attnqat.get_config().mode
        seen["worker_after"] = attnqat.get_config().mode

    try:
        attnqat.set_config(mode="fp4")
        t = threading.Thread(target=worker)
        t.start()
        started.wait(10)
        seen["main_during"] = attnqat.get_config().mode  # the worker's block is not visible here
        release.set()
        t.join(10)
    finally:
        attnqat.reset_config()
    assert seen == {"worker": "bf16", "worker_after": "fp4", "main_during": "fp4"}
    assert attnqat.get_config().mode == "attn_qat"


# ---- The module ----------------------------------------------------------------------------------------


def test_fp4_attention_module():
    q, k, v = qkv(nq=12, nk=20)
    mod = attnqat.nn.FP4Attention(is_causal=True, causal_alignment="bottom_right", p_quant="anchored")
    assert "p_quant='anchored'" in repr(mod)
    with attnqat.config(mode="fp4", p_quant="paper"):  # module options win; mode from the config
        out = mod(q, k, v)
    assert torch.equal(out, attnqat.attention(q, k, v, causal=True, mode="fp4", p_quant="anchored"))
    top_left = attnqat.nn.FP4Attention(is_causal=True, mode="bf16")(q, k, v)
    assert rel_err(top_left, F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)) < 1e-5
    with pytest.raises(ValueError, match="either attn_mask or is_causal"):
        mod(q, k, v, attn_mask=torch.ones(12, 20, dtype=torch.bool))
    with pytest.raises(TypeError, match="unknown option"):
        attnqat.nn.FP4Attention(softmax_scale=0.1)


# ---- Autocast and torch.compile ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_runs_in_the_autocast_dtype(dtype):
    lin = torch.nn.Linear(32, 32)
    q, k, v = qkv(nq=16, nk=16)
    k32 = lin(k.transpose(1, 2)).transpose(1, 2)  # float32
    with torch.autocast("cpu", dtype=dtype):
        q16 = lin(q.transpose(1, 2)).transpose(1, 2)  # autocast dtype
        assert q16.dtype == dtype and k32.dtype == torch.float32
        o = attnqat.sdpa(q16, k32, v, is_causal=True, enable_gqa=True)
    assert o.dtype == dtype
    ref = attnqat.attention(q16.detach(), k32.detach().to(dtype), v.to(dtype), causal=True)
    assert torch.equal(o, ref)
    o.float().sum().backward()
    assert lin.weight.grad is not None and torch.isfinite(lin.weight.grad).all()


class TinyBlock(torch.nn.Module):
    def __init__(self, d=64, heads=4, kv_heads=2):
        super().__init__()
        self.h, self.hkv, self.dh = heads, kv_heads, d // heads
        self.q = torch.nn.Linear(d, d)
        self.kv = torch.nn.Linear(d, 2 * kv_heads * self.dh)
        self.o = torch.nn.Linear(d, d)
        self.attn = attnqat.nn.FP4Attention(is_causal=True)

    def forward(self, x):
        b, n, _ = x.shape
        q = self.q(x).view(b, n, self.h, self.dh).transpose(1, 2)
        k, v = self.kv(x).view(b, n, 2, self.hkv, self.dh).permute(2, 0, 3, 1, 4)
        return self.o(self.attn(q, k, v).transpose(1, 2).reshape(b, n, -1))


def test_torch_compile_fullgraph_forward_backward_and_config_recompiles():
    torch.manual_seed(0)
    block = TinyBlock()
    x = torch.randn(2, 24, 64)
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    for mode in ("attn_qat", "bf16"):  # a config change must recompile, not reuse the first graph
        with attnqat.config(mode=mode):
            eager = block(x)
            (ge,) = torch.autograd.grad(eager.sum(), block.q.weight)
            out = compiled(x)
            (gc,) = torch.autograd.grad(out.sum(), block.q.weight)
        assert torch.equal(out, eager) and torch.equal(gc, ge), mode
    with attnqat.config(mode="attn_qat"):
        assert not torch.equal(compiled(x), out)  # back to FP4


def test_torch_compile_fullgraph_sdpa_is_causal_nq_ne_nk():
    q, k, v = qkv(nq=20, nk=12)
    f = lambda q, k, v: attnqat.sdpa(q, k, v, is_causal=True, enable_gqa=True, mode="fp4")
    torch._dynamo.reset()
    assert torch.equal(torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v), f(q, k, v))
