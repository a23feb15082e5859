"""attnqat.hf with packed sequences and sliding windows, on small randomly initialised models (CPU
reference, nothing downloaded): a packed batch (DataCollatorWithFlattening: position ids restarting,
with or without FlashAttention's cu_seq_lens_* arguments) gives the loss and gradients of the same
sequences as a padded batch; sliding-window layers (Mistral, Qwen3's sliding layers) match
attn_implementation="eager" in mode bf16 (plain, packed, generation); one attn_qat training step;
the errors. How it works: attnqat/hf.py's module docstring."""

import copy

import pytest
import torch
from transformers import (AutoModelForCausalLM, DataCollatorWithFlattening, Gemma2Config, LlamaConfig,
                          MistralConfig, Qwen3Config)

import attnqat
import attnqat.hf
from conftest import rel_err

attnqat.hf.register()

VOCAB = 96
COMMON = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, attention_dropout=0.0)
CONFIGS = {
    "llama": lambda: LlamaConfig(**COMMON),
    "qwen3": lambda: Qwen3Config(head_dim=32, **COMMON),
    # Sliding windows shorter than the sequences below (Mistral: every layer; Qwen3: layer 1).
    "mistral": lambda: MistralConfig(sliding_window=6, **COMMON),
    "qwen3_sliding": lambda: Qwen3Config(head_dim=32, use_sliding_window=True, sliding_window=7, max_window_layers=1,
                                         **COMMON),
    # Sliding and full layers alternating, with logit soft-capping.
    "gemma2": lambda: Gemma2Config(**dict(COMMON, hidden_size=64, num_attention_heads=2, num_key_value_heads=1),
                                   head_dim=64, attn_logit_softcapping=2.0, sliding_window=5),
}
LENGTHS = (5, 17, 1, 40, 16)


def make(kind, impl="attnqat", seed=0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(CONFIGS[kind](), attn_implementation=impl).train()


def twin(model, impl="eager"):
    other = AutoModelForCausalLM.from_config(copy.deepcopy(model.config), attn_implementation=impl).train()
    other.load_state_dict(model.state_dict())
    return other


def sequences(lengths=LENGTHS, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]


def packed_batch(seqs, flash_kwargs=False):
    return DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs)([{"input_ids": s} for s in seqs])


def padded_batch(seqs):
    """The same sequences right-padded, the padding masked and out of the loss."""
    ids = torch.zeros(len(seqs), max(map(len, seqs)), dtype=torch.long)
    mask, labels = torch.zeros_like(ids), torch.full_like(ids, -100)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = labels[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def loss_and_grads(model, batch, mode="bf16"):
    # use_cache=False, as the Trainer passes: transformers detects packing only without a cache.
    with attnqat.config(mode=mode):
        out = model(**batch, use_cache=False)
    return out, torch.autograd.grad(out.loss, [p for p in model.parameters() if p.requires_grad])


# ---- Packed sequences --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
@pytest.mark.parametrize("mode", ["bf16", "attn_qat"])
@pytest.mark.parametrize("flash_kwargs", [False, True])
def test_packed_batch_gives_the_padded_batch_loss(kind, mode, flash_kwargs):
    """The collator's labels (-100 at each sequence's first token) make the packed loss the mean over
    the padded batch's targets. Each sequence runs as its own attention call in both batches (the
    padded one on its visible keys only), so the attention is the same bit for bit in every mode;
    what differs is the float32 rounding of the projections and MLPs over [1, 79] and [5, 40]
    token batches: measured 1 ulp of the loss (5e-7) and 2e-7 relative in the gradients, hence
    1e-5. Attention across the sequences (one causal call over the packed row) moves the loss
    by > 1e-2."""
    model = make(kind)
    seqs = sequences()
    packed, grads_packed = loss_and_grads(model, packed_batch(seqs, flash_kwargs), mode)
    padded, grads_padded = loss_and_grads(model, padded_batch(seqs), mode)
    assert abs(packed.loss.item() - padded.loss.item()) < 1e-5
    for a, b in zip(grads_packed, grads_padded):
        assert rel_err(a, b) < 1e-5
    # The same row as one sequence (position ids not restarting) is another loss.
    one = {k: v for k, v in packed_batch(seqs).items() if k != "position_ids"}
    with torch.no_grad(), attnqat.config(mode=mode):
        crossing = model(**one, use_cache=False).loss
    assert abs(crossing.item() - padded.loss.item()) > 1e-2


def test_flash_kwargs_define_the_sequences_without_a_host_read(monkeypatch):
    """With cu_seq_lens_* and max_length_* (ints) the sequences come from them: transformers' packed
    sequence ids are never read on the host; the results are those of the ids path, bit for bit."""
    model = make("llama").eval()
    seqs = sequences()
    with torch.no_grad():
        from_ids = model(**packed_batch(seqs), use_cache=False).logits

        def no_host_read(*args):
            raise AssertionError("the packed sequence ids were read on the host")

        monkeypatch.setattr(attnqat.hf, "_sequences_of", no_host_read)
        from_kwargs = model(**packed_batch(seqs, flash_kwargs=True), use_cache=False).logits
    assert torch.equal(from_ids, from_kwargs)


# ---- Sliding windows -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mistral", "qwen3_sliding", "gemma2"])
def test_sliding_window_layers_match_eager_in_bf16_mode(kind):
    """Windows of 5 to 7 keys (transformers: key j visible from query i when i - j < window) over
    20 tokens and over packed sequences up to 40 long, forward and backward, against eager
    attention on the same float32 weights: the fp32 reference against eager's fp32 softmax,
    measured ~1e-7 relative; a window off by one key costs > 1e-3."""
    model = make(kind)
    ref = twin(model)
    x = torch.randint(3, VOCAB, (2, 20), generator=torch.Generator().manual_seed(2))
    for batch in (dict(input_ids=x, labels=x), packed_batch(sequences())):
        out, grads = loss_and_grads(model, batch)
        ref_out = ref(**batch, use_cache=False)
        ref_grads = torch.autograd.grad(ref_out.loss, list(ref.parameters()))
        assert rel_err(out.logits.detach(), ref_out.logits.detach()) < 1e-5
        for a, b in zip(grads, ref_grads):
            assert rel_err(a, b) < 1e-4
    # With a window that holds every key the logits are far from eager's.
    full = CONFIGS[kind]()
    full.sliding_window = 1000
    no_window = AutoModelForCausalLM.from_config(full, attn_implementation="attnqat")
    no_window.load_state_dict(model.state_dict())
    with torch.no_grad(), attnqat.config(mode="bf16"):
        assert rel_err(no_window(x).logits, ref(x).logits) > 1e-3


def test_sliding_window_generation_matches_eager():
    # The KV cache (transformers' sliding-window layers) with the window bottom-right aligned.
    model, x = make("mistral").eval(), torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    ref = twin(model).eval()
    with torch.no_grad(), attnqat.config(mode="bf16"):
        out = model.generate(x, max_new_tokens=12, do_sample=False, pad_token_id=0, output_logits=True,
                             return_dict_in_generate=True)
        ref_out = ref.generate(x, max_new_tokens=12, do_sample=False, pad_token_id=0, output_logits=True,
                               return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref_out.sequences)
    for a, b in zip(out.logits, ref_out.logits):
        assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("batch_kind", ["plain", "packed"])
def test_one_attn_qat_training_step(batch_kind):
    model = make("mistral")
    x = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(4))
    batch = dict(input_ids=x, labels=x) if batch_kind == "plain" else packed_batch(sequences())
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    out, grads = loss_and_grads(model, batch, "attn_qat")
    assert torch.isfinite(out.loss) and all(bool(torch.isfinite(g).all()) for g in grads)
    assert model.model.layers[0].self_attn.q_proj.weight.requires_grad
    for p, g in zip(model.parameters(), grads):
        p.grad = g
    opt.step()
    with torch.no_grad(), attnqat.config(mode="attn_qat"):
        after = model(**batch, use_cache=False).loss
    assert after < out.loss  # the Attn-QAT gradient is a descent direction of the FP4 loss here


# ---- Errors ------------------------------------------------------------------------------------------------


def test_flash_kwargs_with_a_padding_mask_raise():
    model = make("llama").eval()
    batch = packed_batch(sequences(), flash_kwargs=True)
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    batch["attention_mask"][0, -3:] = 0
    with torch.no_grad(), pytest.raises(ValueError, match="cu_seq_lens_q/cu_seq_lens_k .* together with an attention mask"):
        model(**batch, use_cache=False)
