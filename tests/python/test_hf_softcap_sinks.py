"""Hugging Face models with logit soft-capping (Gemma 2: the ``softcap`` keyword of the attention
function) and attention sinks (GPT-OSS: ``s_aux``, one learned logit per query head) through
attn_implementation="attnqat" on the CPU reference: tiny random models built from config classes
(nothing downloaded) match transformers' eager attention in mode bf16 to round-off, and train one
step with attn_qat (finite gradients, the sinks get theirs)."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma2Config, GptOssConfig

import attnqat
from conftest import rel_err

attnqat.hf.register()

VOCAB = 96
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, max_position_embeddings=128,
              attention_dropout=0.0, sliding_window=64)  # a window longer than the tests' sequences
CONFIGS = {
    # head_dim 256 as in Gemma 2 (the CPU reference takes it); a strong cap (2.0) so that it matters.
    "gemma2": lambda: Gemma2Config(intermediate_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=256,
                                   attn_logit_softcapping=2.0, **COMMON),
    "gpt_oss": lambda: GptOssConfig(intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                    num_local_experts=4, num_experts_per_tok=2, **COMMON),
}


def make(kind, impl="attnqat"):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[kind](), attn_implementation=impl).eval()
    # transformers initializes weights with std 0.02: attention scores far below the cap and sinks
    # of ~0. Larger query projections and sinks of a few units make both matter.
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(30.0)
            if kind == "gpt_oss":
                layer.self_attn.sinks.normal_(0.0, 2.0)
    return model


def twin(model, impl="eager"):
    other = AutoModelForCausalLM.from_config(copy.deepcopy(model.config), attn_implementation=impl).eval()
    other.load_state_dict(model.state_dict())
    return other


def ids(b, n, seed=1):
    return torch.randint(3, VOCAB, (b, n), generator=torch.Generator().manual_seed(seed))


def without_feature(kind, model):
    """The same weights with the cap or the sinks taken out (eager attention)."""
    other = twin(model)
    if kind == "gemma2":
        other.config.attn_logit_softcapping = None
        for layer in other.model.layers:
            layer.self_attn.attn_logit_softcapping = None
    else:
        with torch.no_grad():
            for layer in other.model.layers:
                layer.self_attn.sinks.fill_(float("-inf"))
    return other


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_bf16_mode_matches_eager(kind):
    model = make(kind)
    ref = twin(model)
    x = ids(2, 20)
    with torch.no_grad():
        with attnqat.config(mode="bf16"):
            out = model(x, labels=x)
        ref_out = ref(x, labels=x)
        without = without_feature(kind, model)(x)
    # float32 models: the CPU reference and eager attention differ by float32 round-off (measured
    # 3e-7 to 5e-7); without the cap or the sinks the logits move by 0.13 and 0.31.
    assert rel_err(out.logits, ref_out.logits) < 1e-5
    assert abs(float(out.loss) - float(ref_out.loss)) < 1e-5
    # The cap / the sinks are in the path: eager attention without them gives other logits.
    assert rel_err(out.logits, without.logits) > 1e-2
    # A padded batch (the mask path: a boolean mask and per-sequence calls) too.
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[0, :6] = 0
    with torch.no_grad():
        with attnqat.config(mode="bf16"):
            padded = model(x, attention_mask=mask).logits
        ref_padded = ref(x, attention_mask=mask).logits
    valid = mask.bool()
    assert rel_err(padded[valid], ref_padded[valid]) < 1e-5


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_bf16_mode_gradients_match_eager(kind):
    model = make(kind).train()
    ref = twin(model).train()
    x = ids(2, 16, seed=2)
    with attnqat.config(mode="bf16"):
        model(x, labels=x).loss.backward()
    ref(x, labels=x).loss.backward()
    grads = dict(model.named_parameters())
    for name, p in ref.named_parameters():
        if p.grad is None:
            continue
        # float32 round-off through two layers (measured: at most 2.4e-6).
        assert rel_err(grads[name].grad, p.grad) < 2e-5, name


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_one_attn_qat_training_step(kind):
    model = make(kind).train()
    x = ids(2, 24, seed=3)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with attnqat.config(mode="attn_qat"):
        loss = model(x, labels=x).loss
        loss.backward()
    assert bool(torch.isfinite(loss))
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert bool(torch.isfinite(p.grad).all()), name
    if kind == "gpt_oss":
        for layer in model.model.layers:
            g = layer.self_attn.sinks.grad
            assert g is not None and bool((g != 0).all())
    opt.step()
    if kind == "gpt_oss":
        assert not torch.equal(model.model.layers[0].self_attn.sinks, before["model.layers.0.self_attn.sinks"])


def test_fp4_cache_refuses_softcap_and_sinks():
    model = make("gpt_oss")
    cache = attnqat.hf.FP4Cache(model, max_cache_len=64, page_size=16)
    x = ids(1, 8)
    with torch.no_grad(), attnqat.config(mode="fp4"), pytest.raises(NotImplementedError, match="sinks"):
        model(x, cache=cache, use_cache=True)
