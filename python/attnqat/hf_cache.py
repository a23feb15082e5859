"""The paged FP4 KV cache in Hugging Face generation: ``attnqat.hf.FP4Cache``.

    import attnqat
    attnqat.hf.register()
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="attnqat")
    cache = attnqat.hf.FP4Cache(model, max_cache_len=prompt_len + new_tokens)
    with attnqat.config(mode="fp4"):
        out = model.generate(input_ids, attention_mask=mask, past_key_values=cache, max_new_tokens=...)

A transformers ``Cache`` whose keys and values live in an :class:`attnqat.FP4KVCache` (packed
NVFP4, 4.5 bits per element, quantized once when appended) instead of bf16 tensors. It works with
the "attnqat" attention implementation in mode ``fp4``, the mode Attn-QAT models are served in:

- ``Cache.update`` only hands the new tokens' K, V to the attention function that runs next;
  the attention function appends the *visible* ones (left padding is skipped, so a padded
  sequence's cache starts at its first real token) and
- a prefill (no cached tokens yet) runs the ``fp4`` forward on the new K, V, exactly as without
  the cache; every later step runs the decode kernel (:func:`attnqat.decode_attention`) over the
  FP4 pages. The numerics are those of mode ``fp4`` on the full sequence: on the CPU reference the
  logits are bit-identical to generation with transformers' default cache (tested), on CUDA they
  differ by the order of fp32 sums.

Sliding-window layers (Mistral, Qwen2/3 with ``use_sliding_window``, Gemma 2's local layers): the
cache keeps every token of such a layer (no eviction; size ``max_cache_len`` for the whole
sequence) and its decode runs with ``window_left = sliding_window - 1``, transformers' window (key
j visible from query i when ``i - j < sliding_window``) as the dense path applies it; the decode
kernel reads only the pages inside the window. A layer's window comes from the model config
(``layer_types`` and ``sliding_window``, as transformers' own caches read it), and is checked
against the mask transformers built for the layer.

Limits (each raises a clear error): mode ``fp4`` only; no beam search, cropping or batch
expansion (``num_return_sequences`` > 1); a step whose new tokens are partly padding after the
prefill; a batch or a length beyond what the cache was sized for; layer types other than full and
sliding-window attention. transformers is imported here, so this module is imported by
``attnqat.hf.FP4Cache`` on first use.
"""

from __future__ import annotations

from typing import Optional

import torch
from transformers.cache_utils import Cache, DynamicLayer

from . import _C
from .decode import FP4KVCache
from .functional import _autocast, _mask_structure
from .hf import _PENDING


class _FP4Layer(DynamicLayer):
    """One layer of an :class:`FP4Cache`: counts the tokens transformers has given it (padding
    included, as its positions do); the K, V themselves go to the cache's FP4 pages."""

    is_croppable = False

    def __init__(self, owner: "FP4Cache", layer_idx: int):
        super().__init__()
        self.owner, self.layer_idx = owner, layer_idx
        self.seen = 0

    def lazy_initialization(self, key_states, value_states):
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        stale = getattr(_PENDING, "rec", None)
        _PENDING.rec = None
        if stale is not None and stale[0] is self.owner:
            raise RuntimeError("attnqat.hf.FP4Cache: the previous layer's keys were never consumed by the attnqat "
                               "attention; FP4Cache works only with attn_implementation='attnqat' (attnqat.hf.register())")
        self.owner._ensure(key_states)
        self.seen += int(key_states.shape[-2])
        _PENDING.rec = (self.owner, self.layer_idx, key_states, value_states)
        return key_states, value_states

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length, *args) -> tuple:
        q = int(query_length.shape[0]) if isinstance(query_length, torch.Tensor) else int(query_length)
        return self.seen + q, 0

    def get_max_length(self) -> int:
        return self.owner.capacity

    def reset(self) -> None:
        self.seen = 0

    def reorder_cache(self, beam_idx) -> None:
        raise NotImplementedError("attnqat.hf.FP4Cache: beam search is not supported")

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("attnqat.hf.FP4Cache: cropping (assisted decoding) is not supported")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("attnqat.hf.FP4Cache: expanding the batch (num_return_sequences > 1) is not "
                                  "supported; repeat the prompts instead")

    def batch_select_indices(self, indices) -> None:
        raise NotImplementedError("attnqat.hf.FP4Cache: selecting batch elements is not supported")


def _sliding_windows(text_config) -> list:
    """Per layer, transformers' ``sliding_window`` of its attention (None: full attention), read as
    transformers' caches read it: ``layer_types`` when the config has them ("sliding_attention"
    layers take ``sliding_window``), else ``sliding_window`` for every layer (Mistral)."""
    n = int(text_config.num_hidden_layers)
    window = getattr(text_config, "sliding_window", None)
    layer_types = getattr(text_config, "layer_types", None)
    if layer_types is None:
        return [window] * n
    windows = []
    for i, kind in enumerate(layer_types):
        if kind not in ("full_attention", "sliding_attention"):
            raise NotImplementedError(f"attnqat.hf.FP4Cache: layer {i} is a {kind!r} layer; the FP4 cache serves "
                                      "full and sliding-window attention layers; use transformers' default cache")
        windows.append(window if kind == "sliding_attention" else None)
    return windows


class FP4Cache(Cache):
    """A transformers cache backed by a paged FP4 KV cache (see the module docstring).

    Args:
        model: the model it serves (its config gives layers, KV heads and head dim; it must use
            an attnqat attention implementation).
        max_cache_len: tokens per sequence the cache must hold (prompt, padding included, plus
            new tokens).
        page_size: tokens per page (a multiple of 16).
        max_batch_size: sequences; default: the batch of the first call.

    The P quantization (``p_quant``) is the configured one (:func:`attnqat.config`), for the
    prefill and the decode steps alike, so that serving sees what training saw.

    Attributes:
        store: the :class:`attnqat.FP4KVCache` (created on the first update, on the keys' device).
        capacity: ``max_cache_len``.
        sliding_windows: per layer, transformers' ``sliding_window`` (None: full attention); the
            decode of such a layer runs with ``window_left = sliding_window - 1``.
    """

    def __init__(self, model, max_cache_len: int, page_size: int = 64, max_batch_size: Optional[int] = None):
        from . import hf

        cfg = model.config
        impl = getattr(cfg, "_attn_implementation", None)
        if impl not in hf._REGISTERED:
            raise ValueError(f"attnqat.hf.FP4Cache: the model uses attn_implementation={impl!r}; FP4Cache needs an "
                             f"attnqat one ({sorted(hf._REGISTERED) or 'call attnqat.hf.register() first'})")
        if max_cache_len <= 0:
            raise ValueError(f"max_cache_len: expected a positive number of tokens, got {max_cache_len}")
        text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        self.num_layers = int(text.num_hidden_layers)
        self.num_kv_heads = int(getattr(text, "num_key_value_heads", None) or text.num_attention_heads)
        self.head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads)
        self.sliding_windows = _sliding_windows(text)
        # (Not max_cache_len / max_batch_size: transformers' Cache has properties of those names.)
        self.capacity, self.page_size = int(max_cache_len), int(page_size)
        self.batch_capacity = max_batch_size
        self.store: Optional[FP4KVCache] = None
        self.seq_ids: list = []
        super().__init__(layers=[_FP4Layer(self, i) for i in range(self.num_layers)])

    def _ensure(self, key_states: torch.Tensor) -> None:
        b = int(key_states.shape[0])
        if self.store is None:
            if key_states.is_cuda and self.head_dim not in (64, 128):
                raise NotImplementedError(f"attnqat.hf.FP4Cache: on CUDA, the FP4 decode kernel takes head_dim 64 and "
                                          f"128; this model has {self.head_dim}: use transformers' default cache on CUDA")
            self.batch_capacity = self.batch_capacity or b
            pages = -(-self.capacity // self.page_size)
            self.store = FP4KVCache(self.batch_capacity * pages, self.page_size, self.num_kv_heads, self.head_dim,
                                    key_states.device, num_layers=self.num_layers)
            self.seq_ids = [self.store.new_sequence() for _ in range(b)]
        if b != len(self.seq_ids):
            raise ValueError(f"attnqat.hf.FP4Cache: batch of {b} sequences, but the cache holds {len(self.seq_ids)}")

    def reset(self):
        super().reset()
        if self.store is not None:
            for sid in self.seq_ids:
                self.store.free_sequence(sid)
            self.seq_ids = [self.store.new_sequence() for _ in self.seq_ids]

    @property
    def bytes_per_token(self) -> int:
        """Cache bytes per token, all layers (K and V codes and scales)."""
        return self.num_layers * 2 * self.num_kv_heads * (self.head_dim // 2 + self.head_dim // 16)


def fp4_cache_attention(rec, query: torch.Tensor, mask: Optional[torch.Tensor], scaling: Optional[float],
                        opts: dict, dense_attention, sliding_window: Optional[int] = None) -> torch.Tensor:
    """The attention of one layer through an FP4Cache (called by attnqat.hf.attention_forward).

    ``rec``: the hand-off record of attnqat.hf (the cache, the layer, the new K, V); ``mask``:
    boolean ``[B, 1, Nq, Nk]`` or None (plain causal, or the sliding window ``sliding_window``);
    ``sliding_window``: the window of the mask transformers built for the layer when attnqat.hf
    read it as a structure instead of a tensor (None otherwise); ``dense_attention(q, k, v,
    mask)``: the cache-less path (with that window), used for the prefill. Returns ``[B, Hq, Nq,
    D]``."""
    cache, layer, k_new, v_new = rec
    # The dense path's dtype rule (under autocast every operand in the autocast dtype): models
    # such as Qwen3 hand over float32 keys (after their q/k norm) with bf16 values.
    query, k_new, v_new = _autocast(query, k_new, v_new)
    if opts.get("mode") != "fp4":
        raise ValueError(f"attnqat.hf.FP4Cache serves mode='fp4' attention (the FP4 inference of an Attn-QAT model); "
                         f"the configured mode is {opts.get('mode')!r}: use attnqat.config(mode='fp4')")
    try:  # the decode runs on 128-key tiles: the core's one rule for p_quant='paper'
        _C.check_paper_kv_tile(_C.AttentionOptions(mode="fp4", p_quant=opts["p_quant"], kv_tile=opts.get("kv_tile", 128)))
    except ValueError as e:
        raise ValueError(f"attnqat.hf.FP4Cache: {e}") from None
    b, hq, nq, _ = query.shape
    nk = cache.layers[layer].seen
    past = nk - nq
    window = cache.sliding_windows[layer]
    if sliding_window is not None and sliding_window != window:
        raise ValueError(f"attnqat.hf.FP4Cache: layer {layer}'s mask has sliding_window={sliding_window}, but the model "
                         f"config gives {window}")
    if mask is None and sliding_window is None and window is not None and nk > window:
        raise ValueError(f"attnqat.hf.FP4Cache: the model config gives layer {layer} sliding_window={window}, shorter "
                         f"than its {nk} keys, but transformers built no sliding-window mask for it")
    if mask is None:
        structures = [(0, nk, None)] * b
    else:
        structures = _mask_structure(mask, b, hq, nq, nk)
    # Visible new keys of sequence i: [max(s, past), e) within [past, nk). Left padding keeps its
    # keys out of the cache; anything else that hides new keys is not a serving pattern.
    first = []  # per sequence: its first visible new token (nq: none)
    for s, e, _ in structures:
        lo = max(s, past)
        if e <= lo:
            first.append(nq)
        elif e != nk:
            raise ValueError("attnqat.hf.FP4Cache: the attention mask hides the last keys of a sequence (right "
                             "padding); pad on the left for generation")
        else:
            first.append(lo - past)
    if past > 0 and any(f != 0 for f in first):  # (a sequence with no visible new token included)
        raise ValueError("attnqat.hf.FP4Cache: new tokens that are padding after the prefill are not supported")
    store, ids = cache.store, cache.seq_ids
    if past > 0 and mask is not None:
        # A decode step with padding: each sequence's first visible key must be its first cached
        # token (the left padding is not cached) or, later, the start of the window that the decode
        # applies; anything else would be silently ignored.
        for i, (s, _, _) in enumerate(structures):
            cached = store.length(ids[i], layer) + nq  # after this step's append
            expect = max(nk - cached, 0 if window is None else nk - nq - (window - 1))
            if s != expect:
                raise ValueError(f"attnqat.hf.FP4Cache: sequence {i}'s mask starts at key {s}, but its cache and the "
                                 f"layer's window ({'none' if window is None else window}) start it at {expect}; "
                                 "only left padding and the layer's sliding window can hide keys")
    groups = {}
    for i, f in enumerate(first):
        if f < nq:
            groups.setdefault(f, []).append(i)
    for f, rows in groups.items():
        sel = torch.tensor(rows, device=k_new.device)
        store.append([ids[i] for i in rows], k_new.index_select(0, sel)[:, :, f:], v_new.index_select(0, sel)[:, :, f:],
                     layer)
    if past == 0:
        return dense_attention(query, k_new, v_new, mask)
    return store.attend(query, ids, layer, softmax_scale=scaling, p_quant=opts["p_quant"],
                        window_left=None if window is None else window - 1)
