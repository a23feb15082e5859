"""Hugging Face diffusers integration (attnqat.diffusers): the "attnqat" attention backend in tiny
randomly initialised Wan 2.1, Flux and LTX-Video transformers (head dim 64, one or two layers,
nothing downloaded) on the CPU reference, against diffusers' "native" backend (torch's SDPA) and
against direct calls of attnqat on the q, k, v the backend received."""

import pytest

pytest.importorskip("diffusers")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from diffusers import FluxTransformer2DModel, LTXVideoTransformer3DModel, WanTransformer3DModel  # noqa: E402
from diffusers.models.attention_dispatch import (  # noqa: E402
    AttentionBackendName,
    _AttentionBackendRegistry,
    attention_backend,
    dispatch_attention_fn,
)
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import attnqat  # noqa: E402
import attnqat.diffusers  # noqa: E402
from conftest import rel_err  # noqa: E402

attnqat.diffusers.register()
attnqat.diffusers.register("attnqat_fp4", mode="fp4")

# bf16 mode against "native", both fp32: exact attention that differs only in summation order
# (attnqat's online softmax over key tiles vs torch's math SDPA), measured ~1e-7 relative on these
# models; 1e-5 leaves 100x margin and still fails for bf16 rounding (~4e-3) or FP4 (>1e-3 here).
BF16_MODE_TOL = 1e-5
# FP4 attention on these inputs differs from exact attention by ~0.1 relative per attention call
# (Q, K, V, P in E2M1 with 16-element blocks); a backend that silently ran exact attention would
# give ~1e-7 here. Through the residual stream of a one-layer random model the output moves less:
# measured 3e-3 .. 1.1e-2, so the model-level floor is 5e-4, still 4000x the bf16-mode agreement.
FP4_ATTENTION_MIN_ERR = 0.02
FP4_MODEL_MIN_ERR = 5e-4


def _wan():
    torch.manual_seed(0)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=64, in_channels=4,
                                  out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=1,
                                  rope_max_seq_len=32).eval()
    g = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(2, 4, 2, 8, 8, generator=g), timestep=torch.tensor([500, 200]),
                  encoder_hidden_states=torch.randn(2, 16, 32, generator=g))
    return model, inputs, 2  # self-attention and cross-attention


def _flux():
    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                   attention_head_dim=64, num_attention_heads=2, joint_attention_dim=32,
                                   pooled_projection_dim=16, axes_dims_rope=(16, 24, 24)).eval()
    g = torch.Generator().manual_seed(1)
    grid = torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij")
    inputs = dict(hidden_states=torch.randn(2, 16, 16, generator=g), encoder_hidden_states=torch.randn(2, 8, 32, generator=g),
                  pooled_projections=torch.randn(2, 16, generator=g), timestep=torch.tensor([0.5, 0.2]),
                  img_ids=torch.stack(grid, -1).reshape(-1, 3), txt_ids=torch.zeros(8, 3))
    return model, inputs, 2  # the joint block and the single block


def _ltx(text_lengths=(9, 5)):
    torch.manual_seed(0)
    model = LTXVideoTransformer3DModel(in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=64,
                                       cross_attention_dim=128, num_layers=1, caption_channels=32).eval()
    g = torch.Generator().manual_seed(1)
    text_mask = torch.zeros(2, 12)
    for i, n in enumerate(text_lengths):
        text_mask[i, :n] = 1  # right padding of the prompt, as the LTX pipeline's tokenizer pads
    inputs = dict(hidden_states=torch.randn(2, 32, 8, generator=g), encoder_hidden_states=torch.randn(2, 12, 32, generator=g),
                  timestep=torch.tensor([500, 200]), encoder_attention_mask=text_mask, num_frames=2, height=4, width=4)
    return model, inputs, 2  # self-attention and cross-attention (with the text mask)


MODELS = {"wan": _wan, "flux": _flux, "ltx": _ltx}


@pytest.fixture(autouse=True)
def _restore_active_backend():
    """set_attention_backend also sets diffusers' process-wide active backend: restore it."""
    old = _AttentionBackendRegistry._active_backend
    yield
    _AttentionBackendRegistry.set_active_backend(old)


@pytest.fixture
def spy(monkeypatch):
    """spy(name) -> list of (kwargs, output) of every call of backend `name`."""

    def install(name="attnqat"):
        member = AttentionBackendName(name)
        real = _AttentionBackendRegistry._backends[member]
        calls = []

        def recording(**kwargs):
            out = real(**kwargs)
            calls.append((kwargs, out))
            return out

        monkeypatch.setitem(_AttentionBackendRegistry._backends, member, recording)
        return calls

    return install


def run(model, inputs, backend, **config):
    model.set_attention_backend(backend)
    with torch.no_grad(), attnqat.config(**config):
        return model(**inputs).sample


def bool_mask(attn_mask):
    """diffusers' mask as the boolean mask it stands for (None, bool, or a 0 / -10000 float bias)."""
    return attn_mask if attn_mask is None or attn_mask.dtype == torch.bool else attn_mask == 0


def to_bhsd(kwargs):
    return [kwargs[n].transpose(1, 2).contiguous() for n in ("query", "key", "value")]


# ---- registration ---------------------------------------------------------------------------------

def test_register_adds_a_backend_name_diffusers_resolves():
    member = AttentionBackendName("attnqat")
    assert member is AttentionBackendName.ATTNQAT is AttentionBackendName["ATTNQAT"]
    assert member.value == "attnqat" and member in list(AttentionBackendName)
    assert "attnqat" in {m.value for m in AttentionBackendName.__members__.values()}
    assert member in _AttentionBackendRegistry.list_backends()
    assert attnqat.diffusers.register() == "attnqat"  # idempotent
    assert AttentionBackendName("attnqat") is member


@pytest.mark.parametrize("name, error", [("native", "diffusers' own"), ("AttnQAT", "lowercase"),
                                         ("attn-qat", "lowercase identifier")])
def test_register_rejects_bad_names(name, error):
    with pytest.raises(ValueError, match=error):
        attnqat.diffusers.register(name)


def test_register_checks_options():
    with pytest.raises(ValueError, match="mode"):
        attnqat.diffusers.register("attnqat_bad", mode="fp8")
    with pytest.raises(TypeError, match="unknown option"):
        attnqat.diffusers.register("attnqat_bad", causal=True)


# ---- the models -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(MODELS))
def test_bf16_mode_matches_native(kind, spy):
    model, inputs, n_calls = MODELS[kind]()
    native = run(model, inputs, "native")
    calls = spy()
    out = run(model, inputs, "attnqat", mode="bf16")
    assert len(calls) == n_calls  # every attention of the model ran through the backend
    assert rel_err(out, native) < BF16_MODE_TOL


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("mode", ["fp4", "attn_qat"])
def test_fp4_modes_equal_attnqat_on_the_same_qkv(kind, mode, spy):
    """The backend's output is attnqat's FP4 attention of the q, k, v (and mask) it received, not
    torch's: equal to a direct attnqat.sdpa call on contiguous copies, far from native SDPA."""
    model, inputs, n_calls = MODELS[kind]()
    native = run(model, inputs, "native")
    calls = spy()
    out = run(model, inputs, "attnqat", mode=mode)
    assert len(calls) == n_calls
    for kwargs, o in calls:
        q, k, v = to_bhsd(kwargs)
        mask = bool_mask(kwargs["attn_mask"])
        expected = attnqat.sdpa(q, k, v, attn_mask=mask, mode=mode).transpose(1, 2)
        assert torch.equal(o, expected)
        exact = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)
        assert rel_err(o, exact) > FP4_ATTENTION_MIN_ERR
    assert rel_err(out, native) > FP4_MODEL_MIN_ERR


def test_config_and_fixed_options(spy):
    """attnqat.config picks the mode of "attnqat"; "attnqat_fp4" fixes mode fp4 over the config;
    the attention_backend context manager selects the backend of a model with no backend set."""
    model, inputs, n_calls = _wan()
    with torch.no_grad():
        with attnqat.config(mode="fp4"):
            model.set_attention_backend("attnqat")
            fp4 = model(**inputs).sample
            model.set_attention_backend("attnqat_fp4")
            with attnqat.config(mode="bf16"):
                fixed = model(**inputs).sample
        fresh, _, _ = _wan()  # processors without a backend follow the active one
        calls = spy()
        with attention_backend("attnqat"), attnqat.config(mode="fp4"):
            ctx = fresh(**inputs).sample
    assert torch.equal(fixed, fp4) and torch.equal(ctx, fp4)
    assert len(calls) == n_calls


def test_text_padding_mask_matches_native():
    """LTX-Video's cross-attention gets the prompt's padding as a float mask (0 / -10000, per head):
    taken as a key-padding mask, it matches native, and the mask matters (ignoring it would not)."""
    model, inputs, _ = _ltx(text_lengths=(9, 5))
    native = run(model, inputs, "native")
    out = run(model, inputs, "attnqat", mode="bf16")
    assert rel_err(out, native) < BF16_MODE_TOL
    unmasked = run(model, dict(inputs, encoder_attention_mask=torch.ones(2, 12)), "native")
    assert rel_err(unmasked, native) > 1e-3


def test_cross_attention_boolean_padding_mask(spy):
    """Wan's cross-attention module with a boolean key-padding mask [B, Nk] (Nq != Nk): bf16 mode
    matches native; in fp4 each padded sequence gives exactly what its unpadded text gives alone
    (the backend runs each sequence on its visible keys only)."""
    model, _, _ = _wan()
    attn = model.blocks[0].attn2
    g = torch.Generator().manual_seed(2)
    x, text = torch.randn(2, 32, 128, generator=g), torch.randn(2, 16, 128, generator=g)
    lengths = (11, 16)
    mask = torch.arange(16)[None, :] < torch.tensor(lengths)[:, None]
    with torch.no_grad():
        model.set_attention_backend("native")
        native = attn(x, text, mask)
        model.set_attention_backend("attnqat")
        with attnqat.config(mode="bf16"):
            assert rel_err(attn(x, text, mask), native) < BF16_MODE_TOL
        with attnqat.config(mode="fp4"):
            padded = attn(x, text, mask)
            alone = [attn(x[i:i + 1], text[i:i + 1, :n]) for i, n in enumerate(lengths)]
    assert torch.equal(padded, torch.cat(alone))
    assert rel_err(padded[:1], attn(x[:1], text[:1]).detach()) > FP4_ATTENTION_MIN_ERR  # the padding is not attended


@pytest.mark.parametrize("kind", ["wan", "ltx"])
def test_backward_attn_qat(kind):
    """Training through the backend (LTX: with the text padding mask): mode bf16 gives native's
    gradients; attn_qat gives finite gradients equal to those of the same model with attnqat.sdpa
    called directly (contiguous [B, H, S, D] copies, mode attn_qat) in place of the backend."""
    model, inputs, _ = MODELS[kind]()

    def grads(backend, **config):
        model.zero_grad()
        model.set_attention_backend(backend)
        with attnqat.config(**config):
            out = model(**inputs).sample
        target = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
        F.mse_loss(out, target).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    native = grads("native")
    assert rel_err(grads("attnqat", mode="bf16"), native) < BF16_MODE_TOL  # measured ~1.3e-7
    qat = grads("attnqat", mode="attn_qat")
    assert torch.isfinite(qat).all()
    assert 1e-3 < rel_err(qat, native) < 0.1  # FP4 noise (measured 1e-2 .. 1.6e-2), not a different gradient

    member = AttentionBackendName("attnqat")
    real = _AttentionBackendRegistry._backends[member]

    def direct(query, key, value, attn_mask=None, **_):
        q, k, v = (t.transpose(1, 2).contiguous() for t in (query, key, value))
        return attnqat.sdpa(q, k, v, attn_mask=bool_mask(attn_mask), mode="attn_qat").transpose(1, 2)

    _AttentionBackendRegistry._backends[member] = direct
    try:
        reference = grads("attnqat")
    finally:
        _AttentionBackendRegistry._backends[member] = real
    # The same computation; only the inputs' strides differ. (drop_in_qat's gradients differ from
    # attn_qat's by ~1e-2 here: a wrong mode or switch would fail.)
    assert rel_err(qat, reference) < 1e-6


def test_torch_compile_fullgraph():
    """Without a mask the backend traces into one graph (aot_eager: no inductor compile time on
    CI); the compiled model gives the eager result bit for bit."""
    model, inputs, _ = _wan()
    eager = run(model, inputs, "attnqat", mode="fp4")
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad(), attnqat.config(mode="fp4"):
        assert torch.equal(compiled(**inputs).sample, eager)


# ---- the backend function on its own --------------------------------------------------------------

def qkv(b=2, nq=24, nk=20, hq=2, hkv=2, d=64, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, nq, hq, d, generator=g, **kw), torch.randn(b, nk, hkv, d, generator=g, **kw),
            torch.randn(b, nk, hkv, d, generator=g, **kw))


def native(q, k, v, **kw):
    return dispatch_attention_fn(q, k, v, backend="native", **kw)


def ours(q, k, v, mode="bf16", **kw):
    with attnqat.config(mode=mode):
        return dispatch_attention_fn(q, k, v, backend="attnqat", **kw)


def test_causal_scale_and_gqa_match_native():
    q, k, v = qkv(nq=24, nk=40, hq=4, hkv=2)
    for kw in (dict(is_causal=True, enable_gqa=True), dict(scale=0.3, enable_gqa=True)):
        assert rel_err(ours(q, k, v, **kw), native(q, k, v, **kw)) < BF16_MODE_TOL
    with pytest.raises(ValueError, match="enable_gqa"):
        ours(q, k, v)


def test_bf16_mode_does_not_copy_qkv():
    """q, k, v reach the attention op as transposed views: no copy (the FP4 modes' quantized copies
    aside); the output is a transposed view of attnqat's [B, H, S, D] output, as native's is."""

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.__name__)
            return func(*args, **(kwargs or {}))

    q, k, v = qkv()
    with Ops() as ops:
        out = ours(q, k, v)
    assert "attention_fwd.default" in ops.names
    assert not {"clone.default", "copy_.default", "_to_copy.default", "contiguous.default"} & set(ops.names), ops.names
    assert out.shape == q.shape and out.transpose(1, 2).is_contiguous()


def test_return_lse():
    q, k, v = qkv()
    with torch.no_grad():
        out, lse = ours(q, k, v, attention_kwargs=dict(return_lse=True))
    o_ref, lse_ref = attnqat.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mode="bf16",
                                       return_lse=True)
    assert lse.shape == (2, 24, 2) and torch.equal(lse, lse_ref.transpose(1, 2))
    assert torch.equal(out, o_ref.transpose(1, 2))
    q.requires_grad_(True)
    with pytest.raises(NotImplementedError, match="native"):
        ours(q, k, v, attention_kwargs=dict(return_lse=True))


def test_what_attnqat_cannot_compute_raises():
    q, k, v = qkv()
    bias = torch.randn(2, 1, 1, 20)
    with pytest.raises(ValueError, match="additive bias.*'native'"):
        ours(q, k, v, attn_mask=bias)
    empty_row = torch.zeros(2, 20)
    empty_row[0] = -10000.0
    with pytest.raises(ValueError, match="every key"):
        ours(q, k, v, attn_mask=empty_row)
    with pytest.raises(ValueError, match="dropout.*'native'"):
        ours(q, k, v, dropout_p=0.1)
    strided = torch.zeros(2, 20, dtype=torch.bool)
    strided[:, ::2] = True  # not a contiguous key range
    with pytest.raises(ValueError, match="attn_mask"):
        ours(q, k, v, attn_mask=strided)
    with pytest.raises(NotImplementedError, match="context parallelism"):
        _AttentionBackendRegistry._backends[AttentionBackendName("attnqat")](
            query=q, key=k, value=v, _parallel_config=object())


def test_set_attention_backend_refuses_models_that_ignore_backends():
    """diffusers' set_attention_backend silently skips processors that call torch's SDPA
    themselves; attnqat.diffusers.set_attention_backend raises for them."""
    from diffusers.models.attention_processor import Attention

    class OldStyle(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = Attention(query_dim=64, heads=1, dim_head=64)

    with pytest.raises(ValueError, match="AttnProcessor2_0"):
        attnqat.diffusers.set_attention_backend(OldStyle())
    model, inputs, _ = _flux()
    assert attnqat.diffusers.set_attention_backend(model) is model
    assert all(m.processor._attention_backend is AttentionBackendName.ATTNQAT
               for m in model.modules() if hasattr(m, "processor"))


# ---- CUDA ---------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_gpu_wan_bf16_and_fp4(cuda, spy):
    """On CUDA in bf16: bf16 mode agrees with native to bf16 rounding; fp4 equals a direct attnqat
    call on the captured q, k, v and is far from exact attention."""
    model, inputs, n_calls = _wan()
    model = model.to(cuda, torch.bfloat16)
    inputs = {k: (v.to(cuda, torch.bfloat16) if v.is_floating_point() else v.to(cuda)) for k, v in inputs.items()}
    native_out = run(model, inputs, "native")
    # bf16 inputs and outputs on both sides (fp32 accumulation): a few bf16 ulps (4e-3) apart.
    assert rel_err(run(model, inputs, "attnqat", mode="bf16"), native_out) < 2e-2
    calls = spy()
    out = run(model, inputs, "attnqat", mode="fp4")
    assert len(calls) == n_calls
    for kwargs, o in calls:
        q, k, v = to_bhsd(kwargs)
        expected = attnqat.sdpa(q, k, v, mode="fp4").transpose(1, 2)
        # Strided and contiguous inputs may take different kernel paths: bf16 rounding apart at most.
        assert rel_err(o, expected) < 1e-2
        assert rel_err(o, F.scaled_dot_product_attention(q, k, v).transpose(1, 2)) > FP4_ATTENTION_MIN_ERR
    assert torch.isfinite(out).all()
