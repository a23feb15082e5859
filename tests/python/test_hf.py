"""Hugging Face transformers integration (attnqat.hf) on small randomly initialised Llama, Qwen2 and
Qwen3 models built from config classes (nothing downloaded), on the CPU reference: agreement with
transformers' SDPA in mode bf16 (padding included), training with attn_qat, FP4 generation with
the KV cache, the masks that cannot be expressed, torch.compile."""

import copy
import inspect

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

import attnqat
from conftest import rel_err

attnqat.hf.register()

VOCAB = 96
COMMON = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, attention_dropout=0.0)
CONFIGS = {
    "llama": lambda: LlamaConfig(**COMMON),
    "qwen2": lambda: Qwen2Config(**COMMON),
    "qwen3": lambda: Qwen3Config(head_dim=32, **COMMON),
}


def make(kind, impl="attnqat", seed=0):
    torch.manual_seed(seed)
    # A fresh config per model: from_config stores the implementation in the config object.
    return AutoModelForCausalLM.from_config(CONFIGS[kind](), attn_implementation=impl).eval()


def twin(model, impl="sdpa"):
    """The same weights with another attention implementation."""
    other = AutoModelForCausalLM.from_config(copy.deepcopy(model.config), attn_implementation=impl).eval()
    other.load_state_dict(model.state_dict())
    assert model.config._attn_implementation == "attnqat" and other.config._attn_implementation == impl
    return other


def ids(b, n, seed=1):
    return torch.randint(3, VOCAB, (b, n), generator=torch.Generator().manual_seed(seed))


def padding_mask(b, n, left=(), right=()):
    m = torch.ones(b, n, dtype=torch.long)
    for i, p in left:
        m[i, :p] = 0
    for i, p in right:
        m[i, n - p:] = 0
    return m


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_bf16_mode_matches_transformers_sdpa_with_padding(kind):
    model = make(kind)
    ref = twin(model)
    x = ids(4, 24)
    mask = padding_mask(4, 24, left=[(0, 5), (2, 23)], right=[(1, 7)])  # row 2: one token
    with torch.no_grad(), attnqat.config(mode="bf16"):
        out = model(x, attention_mask=mask).logits
        out_nomask = model(x).logits
    ref_out = ref(x, attention_mask=mask).logits.detach()
    valid = mask.bool()
    assert rel_err(out[valid], ref_out[valid]) < 1e-5
    # Padded query rows too: they see the same keys as in torch's SDPA (right padding: every valid key;
    # left padding: none, O = 0 in both).
    assert rel_err(out, ref_out) < 1e-5
    assert rel_err(out_nomask, ref(x).logits.detach()) < 1e-5
    # The FP4 forward is really in the path: it changes the logits.
    with torch.no_grad(), attnqat.config(mode="fp4"):
        fp4 = model(x, attention_mask=mask).logits
    assert rel_err(fp4[valid], out[valid]) > 1e-3


def test_fp4_left_padding_gives_the_unpadded_result():
    """Padded sequences run on their visible keys only: a left-padded sequence is quantized (P blocks
    from its first key) exactly as the same sequence alone."""
    model = make("llama")
    x = ids(2, 40)
    alone = x[0:1, 9:]
    mask = padding_mask(2, 40, left=[(0, 9)])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad(), attnqat.config(mode="fp4", p_quant="anchored"):
        padded = model(x, attention_mask=mask, position_ids=pos).logits[0, 9:]
        single = model(alone).logits[0]
    assert rel_err(padded, single) < 1e-5


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_attn_qat_training_loss_falls_and_gradients_flow(kind):
    model = make(kind).train()
    x = ids(2, 32, seed=4)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    with attnqat.config(mode="attn_qat", p_quant="anchored"):
        for _ in range(6):
            opt.zero_grad()
            loss = model(x, labels=x).loss
            loss.backward()
            q_proj = model.model.layers[0].self_attn.q_proj.weight
            assert q_proj.grad is not None and torch.isfinite(q_proj.grad).all() and q_proj.grad.abs().sum() > 0
            opt.step()
            losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


def test_attn_qat_gradient_differs_from_bf16_and_matches_sdpa_in_bf16_mode():
    model = make("qwen2")
    ref = twin(model)
    x = ids(2, 20, seed=5)
    mask = padding_mask(2, 20, left=[(1, 4)])
    grads = {}
    for name, m, mode in (("sdpa", ref, None), ("bf16", model, "bf16"), ("attn_qat", model, "attn_qat")):
        m.zero_grad()
        with attnqat.config(**({"mode": mode} if mode else {})):
            m(x, attention_mask=mask, labels=x).loss.backward()
        grads[name] = m.model.layers[0].self_attn.k_proj.weight.grad.clone()
    assert rel_err(grads["bf16"], grads["sdpa"]) < 1e-4
    assert rel_err(grads["attn_qat"], grads["bf16"]) > 1e-3


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_fp4_generation_with_kv_cache_is_consistent_with_full_recompute(kind):
    """Decoding (Nq = 1 over the cache) must be the bottom-right causal attention of the full
    sequence: greedy tokens from the KV cache equal the argmax of a full forward, with left padding."""
    model = make(kind)
    x = ids(2, 12, seed=6)
    mask = padding_mask(2, 12, left=[(1, 5)])
    with torch.no_grad(), attnqat.config(mode="fp4"):
        out = model.generate(x, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
        full_mask = torch.cat([mask, torch.ones(2, 8, dtype=torch.long)], 1)
        pos = (full_mask.cumsum(-1) - 1).clamp(min=0)  # the position ids generate uses
        logits = model(out, attention_mask=full_mask, position_ids=pos).logits
    assert out.shape == (2, 20)
    assert torch.equal(logits[:, 11:-1].argmax(-1), out[:, 12:])


@pytest.mark.parametrize("mode", ["bf16", "fp4"])
def test_chunked_prefill_with_cache_is_bottom_right_causal(mode):
    """Several new queries over a cache (Nq > 1, Nk > Nq): transformers passes no mask (the builder
    skips an exactly bottom-right causal one) and the result equals the full forward."""
    model = make("llama")
    x = ids(1, 40, seed=8)
    with torch.no_grad(), attnqat.config(mode=mode, p_quant="anchored"):
        full = model(x).logits
        first = model(x[:, :23], use_cache=True)
        # transformers 5 renamed the argument past_key_values to cache.
        name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        rest = model(x[:, 23:], use_cache=True, **{name: first.past_key_values}).logits
    assert rel_err(rest, full[:, 23:]) < 1e-5


def test_generation_in_bf16_mode_matches_sdpa_and_static_cache():
    model = make("llama")
    ref = twin(model)
    x = ids(2, 10, seed=7)
    mask = padding_mask(2, 10, left=[(0, 3)])
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad(), attnqat.config(mode="bf16"):
        dynamic = model.generate(x, **kw)
        static = model.generate(x, cache_implementation="static", **kw)  # masks with an unused cache tail
    assert torch.equal(dynamic, ref.generate(x, **kw))
    assert torch.equal(static, dynamic)


def test_set_attn_implementation_switches_to_attnqat():
    model = make("llama", impl="sdpa")
    if not hasattr(model, "set_attn_implementation"):
        pytest.fail(f"transformers {transformers.__version__} has no set_attn_implementation")
    x = ids(1, 16)
    with torch.no_grad(), attnqat.config(mode="fp4"):
        before = model(x).logits
        model.set_attn_implementation("attnqat")
        assert model.config._attn_implementation == "attnqat"
        after = model(x).logits
    assert rel_err(after, before) > 1e-3


def test_register_with_fixed_options():
    name = attnqat.hf.register("attnqat_bf16_test", mode="bf16")
    model = make("llama", impl=name)
    ref = make("llama", impl="sdpa")
    x = ids(1, 16)
    with torch.no_grad(), attnqat.config(mode="fp4"):  # the name's fixed mode wins over the config
        assert rel_err(model(x).logits, ref(x).logits) < 1e-5


def test_unsupported_masks_and_options_raise():
    model = make("llama")
    x = ids(2, 16)
    # (Packed sequences run as packed sequences now: tests/python/test_hf_packing.py.)
    # Right padding during generation puts padding between the prompt and the new tokens.
    with torch.no_grad(), pytest.raises(ValueError, match="per-sequence key range"):
        model.generate(x, attention_mask=padding_mask(2, 16, right=[(0, 4)]), max_new_tokens=2, do_sample=False,
                       pad_token_id=0)
    # A 4-D float mask with a bias.
    bias = torch.zeros(2, 1, 16, 16).masked_fill(torch.ones(16, 16, dtype=torch.bool).triu(1), float("-inf"))
    bias[..., 0] = 0.5
    with torch.no_grad(), pytest.raises(ValueError, match="additive bias"):
        model(x, attention_mask=bias)
    # Attention dropout in training.
    cfg = CONFIGS["llama"]()
    cfg.attention_dropout = 0.1
    train = AutoModelForCausalLM.from_config(cfg, attn_implementation="attnqat").train()
    with pytest.raises(ValueError, match="attention_dropout"):
        train(x)


def test_torch_compile_fullgraph_hf_model():
    model = make("qwen2")
    x = ids(2, 16)
    with attnqat.config(mode="attn_qat"):
        eager = model(x, labels=x)
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        out = compiled(x, labels=x)
        out.loss.backward()
    assert torch.allclose(out.logits, eager.logits, atol=1e-5, rtol=1e-5)
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None


def _cache_kw(model, cache):
    # transformers 5.x (>= 5.2x) renamed generate's/forward's past_key_values to cache.
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache}


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
@pytest.mark.parametrize("p_quant", ["paper", "anchored"])
def test_fp4_cache_generation_is_bit_identical_to_the_default_cache(kind, p_quant):
    """attnqat.hf.FP4Cache: K, V live in FP4 pages, the prefill runs the fp4 forward and every later
    step the decode path over the pages. On the CPU reference the scores equal generation with
    transformers' default cache bit for bit (the same quantized operands, the same P blocks), with
    left padding (the padded sequence's cache starts at its first token)."""
    model = make(kind)
    x = ids(2, 12, seed=6)
    mask = padding_mask(2, 12, left=[(1, 5)])
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0, output_scores=True,
              return_dict_in_generate=True)
    with torch.no_grad(), attnqat.config(mode="fp4", p_quant=p_quant):
        ref = model.generate(x, **kw)
        cache = attnqat.hf.FP4Cache(model, max_cache_len=20, page_size=16)
        got = model.generate(x, **kw, **_cache_kw(model, cache))
    assert torch.equal(got.sequences, ref.sequences)
    assert all(torch.equal(a, b) for a, b in zip(got.scores, ref.scores))
    # 12 prompt tokens (5 of them padding in row 1) and 7 fed-back new tokens per sequence.
    assert [cache.store.length(s, 1) for s in cache.seq_ids] == [19, 14]
    assert cache.get_seq_length() == 19
    assert cache.bytes_per_token == 2 * 2 * 2 * (model.config.head_dim // 2 + model.config.head_dim // 16)
    # The FP4 decode changes the result against bf16 attention: the FP4 path is really in use.
    with torch.no_grad(), attnqat.config(mode="bf16"):
        bf16 = model.generate(x, **kw)
    assert not all(torch.equal(a, b) for a, b in zip(bf16.scores, ref.scores))


def test_fp4_cache_under_autocast_takes_float32_keys_with_bf16_values():
    """Qwen3's q/k norm hands float32 keys with bf16 values to the cache under bf16 autocast: the
    cache casts them as the dense path does (it raised a dtype mismatch before) and generates what
    the cache-less fp4 generation does."""
    model = make("qwen3")
    x = ids(1, 12, seed=5)
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad(), attnqat.config(mode="fp4"), torch.autocast("cpu", dtype=torch.bfloat16):
        ref = model.generate(x, **kw)
        cache = attnqat.hf.FP4Cache(model, max_cache_len=16, page_size=16)
        got = model.generate(x, **kw, **_cache_kw(model, cache))
    assert torch.equal(got, ref)
    assert cache.get_seq_length() == 15  # 12 prompt tokens + 3 fed-back ones went to the FP4 pages


def test_fp4_cache_refuses_use_cache_false():
    """With use_cache=False transformers still appends to the cache it is given, and generate() re-feeds
    the whole prefix at each step: the FP4 pages would silently hold tokens twice. It raises instead."""
    model = make("llama")
    x = ids(1, 12, seed=6)
    with torch.no_grad(), attnqat.config(mode="fp4"):
        cache = attnqat.hf.FP4Cache(model, max_cache_len=64, page_size=16)
        with pytest.raises(ValueError, match="^attnqat.hf.FP4Cache: the model was called with use_cache=False"):
            model.generate(x, max_new_tokens=3, do_sample=False, pad_token_id=0, use_cache=False,
                           **_cache_kw(model, cache))


def test_fp4_cache_chunked_prefill_is_bottom_right_causal():
    """Several new queries over the FP4 pages (Nq > 1, a second prompt chunk) equal the full forward."""
    model = make("llama")
    x = ids(1, 40, seed=8)
    with torch.no_grad(), attnqat.config(mode="fp4", p_quant="anchored"):
        full = model(x).logits
        cache = attnqat.hf.FP4Cache(model, max_cache_len=40, page_size=16)
        model(x[:, :23], use_cache=True, **_cache_kw(model, cache))
        rest = model(x[:, 23:], use_cache=True, **_cache_kw(model, cache)).logits
    assert rel_err(rest, full[:, 23:]) < 1e-5
    assert cache.store.length(cache.seq_ids[0], 0) == 40


def test_fp4_cache_errors():
    model = make("llama")
    x = ids(2, 8)
    with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
        attnqat.hf.FP4Cache(make("llama", impl="sdpa"), max_cache_len=16)
    with pytest.raises(ValueError, match="max_cache_len"):
        attnqat.hf.FP4Cache(model, max_cache_len=0)
    cache = attnqat.hf.FP4Cache(model, max_cache_len=16, page_size=16)
    with torch.no_grad(), attnqat.config(mode="bf16"), pytest.raises(ValueError, match="mode='fp4'"):
        model(x, use_cache=True, **_cache_kw(model, cache))
    cache = attnqat.hf.FP4Cache(model, max_cache_len=16, page_size=16)
    with torch.no_grad(), attnqat.config(mode="fp4", p_quant="paper", kv_tile=64), \
            pytest.raises(ValueError, match="kv_tile"):
        model(x, use_cache=True, **_cache_kw(model, cache))
    # Beyond the size the cache was made for: a clear error from the page pool.
    cache = attnqat.hf.FP4Cache(model, max_cache_len=16, page_size=16)
    with torch.no_grad(), attnqat.config(mode="fp4"), pytest.raises(RuntimeError, match="out of pages"):
        model.generate(x, max_new_tokens=12, do_sample=False, pad_token_id=0, **_cache_kw(model, cache))
