"""Hugging Face transformers integration: attnqat as an attention implementation.

    import attnqat
    attnqat.hf.register()                                   # once; registers "attnqat"
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="attnqat")
    # or: model.set_attn_implementation("attnqat")          (transformers versions that have it)
    with attnqat.config(mode="attn_qat"):                   # training: FP4 forward, Attn-QAT backward
        loss = model(input_ids, labels=input_ids).loss
    with attnqat.config(mode="fp4"):                        # serving: FP4 forward
        model.generate(...)

Masks: transformers builds the masks of "attnqat" with its SDPA mask builder (registered too:
without one, transformers passes *no* mask to an unknown implementation and padding would be
ignored silently), except for the masks whose structure the builder can read from transformers'
mask function without looking at tensor values, which are not built:

- exactly bottom-right causal (no padding mask, the plain causal mask function, queries at the end
  of the keys): the attention function receives ``None`` and runs the causal kernel directly,
  which keeps ``torch.compile(fullgraph=True)`` and CUDA graphs free of host synchronizations;
- sliding-window causal (transformers' ``sliding_window``: a key is visible when
  ``q_idx - kv_idx < sliding_window``; no padding, queries at the end of the keys): it runs as
  ``window=(sliding_window - 1, 0)`` with ``causal=True`` (also through a sliding-window KV cache);
- packed sequences (``position_ids`` restarting, as ``DataCollatorWithFlattening`` and TRL's
  padding-free packing produce, no padding mask and no cache — transformers detects them only
  then, e.g. with ``use_cache=False`` as the Trainer passes), causal or sliding-window: every
  sequence runs as its own causal call in one :func:`attnqat.attention_varlen` call. The sequence
  boundaries come from the FlashAttention keyword arguments ``cu_seq_lens_q``/``cu_seq_lens_k``
  and ``max_length_q``/``max_length_k`` when the model forward receives them
  (``DataCollatorWithFlattening(return_flash_attn_kwargs=True)``: no host synchronization),
  otherwise from transformers' packed sequence ids, at one host synchronization per mask and model
  forward (the number of sequences sizes the offsets and the CUDA grid; every layer reuses them).
  ``cu_seq_lens_q/k``, when given, define the sequences (as for FlashAttention).

Reading the structure uses the closures of transformers' mask functions, which dynamo cannot
trace: under ``torch.compile`` that step runs outside the graph (a graph break for sliding-window
and packed masks; plain causal masks stay in the graph). A mask that is built is honoured when
:func:`attnqat.sdpa` can express it — per-sequence key ranges (left or right padding, a KV cache, a
static cache's unused tail) with a causal limit — and any other mask (sliding windows together
with padding, custom 4-D masks of other patterns, masks combined with extra mask functions)
raises ``ValueError``. A padded batch costs one host synchronization per model forward to verify
the mask (every layer gets the same mask tensor and reuses the analysis), and one or two attention
calls per group of sequences with equal padding. transformers is imported only by
:func:`register` (and :class:`FP4Cache`).

:class:`FP4Cache` (``attnqat.hf.FP4Cache``, module :mod:`attnqat.hf_cache`): a transformers cache
whose K, V live in the paged FP4 KV cache, for ``model.generate(..., past_key_values=cache)`` in
mode ``fp4``; decode steps run the FP4 decode kernel over its pages.
"""

from __future__ import annotations

import functools
import threading
from typing import Optional

import torch

from ._config import _check, resolve_options
from .attention import attention, attention_varlen
from .functional import _autocast, _sdpa

NAME = "attnqat"
_HF = {}  # transformers' SDPA mask builder and causal mask function, bound by register()
_REGISTERED = set()  # the implementation names register() has registered

# FP4Cache's hand-off (attnqat.hf_cache): its update() leaves (cache, layer, key, value) here for
# the attention function that runs next in the same module and thread.
_PENDING = threading.local()


def __getattr__(name):
    if name == "FP4Cache":  # imports transformers: only on use
        from .hf_cache import FP4Cache

        return FP4Cache
    raise AttributeError(f"module 'attnqat.hf' has no attribute {name!r}")


def _take_pending(key):
    """The FP4Cache record whose update() returned ``key`` just before this call, or None."""
    rec = getattr(_PENDING, "rec", None)
    if rec is None or rec[2] is not key:
        return None
    _PENDING.rec = None
    return rec


def _bool_mask(mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """transformers' float masks are 0 (visible) or a very negative value (masked): a boolean in
    disguise. Anything else is an additive bias, which attnqat cannot apply."""
    if mask is None or mask.dtype == torch.bool:
        return mask
    if not mask.is_floating_point():
        raise ValueError(f"attnqat (transformers): attention_mask: unsupported dtype {mask.dtype}")
    visible = mask == 0
    masked = mask <= torch.finfo(mask.dtype).min / 2
    if not bool((visible | masked).all()):
        raise ValueError(
            "attnqat (transformers): attention_mask holds an additive bias (values other than 0 and the dtype's "
            "minimum), which attnqat cannot apply; use attn_implementation='sdpa' or 'eager' for this model"
        )
    return visible


class StructuredMask:
    """What the mask builder of "attnqat" returns instead of a boolean mask whose structure it read
    from transformers' mask function (see the module docstring): a causal mask over ``q_length``
    queries ending at the last of ``kv_length`` keys, cut to transformers' ``sliding_window``
    (``None``: no window) and, with ``sequence_ids`` (transformers' packed sequence mask, ``[B,
    N]`` ids, equal within a sequence), restricted to packed sequences. transformers hands it to
    the attention function of every layer unchanged."""

    def __init__(self, q_length: int, kv_length: int, sliding_window: Optional[int],
                 sequence_ids: Optional[torch.Tensor]):
        self.q_length, self.kv_length = q_length, kv_length
        self.sliding_window, self.sequence_ids = sliding_window, sequence_ids
        self._sequences = None

    @property
    def window(self):
        """attnqat's ``window`` for ``causal=True``: transformers' key ``j`` is visible from query
        ``i`` when ``i - j < sliding_window``, i.e. ``sliding_window - 1`` keys to the left."""
        return None if self.sliding_window is None else (self.sliding_window - 1, 0)

    def sequences(self, device):
        """The packed sequences as :func:`attnqat.attention_varlen` takes them: ``(cu_seqlens,
        cu_seqlens, max_seqlen, max_seqlen)`` over the ``B * N`` flattened tokens (a batch row's
        start also starts a sequence). One host synchronization, on the first call only."""
        if self._sequences is None:
            self._sequences = _sequences_of(self.sequence_ids, device)
        return self._sequences


@torch.compiler.disable
def _sequences_of(sequence_ids: torch.Tensor, device):
    ids = sequence_ids.cpu()  # the host synchronization (run outside any compiled graph)
    starts = torch.ones(ids.shape, dtype=torch.bool)
    starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
    cu = torch.cat([starts.reshape(-1).nonzero()[:, 0], torch.tensor([ids.numel()])]).to(torch.int32)
    max_len = int(cu.diff().max()) if cu.numel() > 1 else 0
    cu = cu.to(device)
    return cu, cu, max_len, max_len


def _cell(fn, name: str):
    """The value a closure `fn` captured as `name`."""
    return fn.__closure__[fn.__code__.co_freevars.index(name)].cell_contents


def _closure_of(fn, factory: str):
    """True when `fn` is a closure made by transformers.masking_utils.<factory> (same code)."""
    code = _HF.get(factory)
    return code is not None and getattr(fn, "__code__", None) is code


@torch.compiler.disable
def _read_mask_function(mask_function):
    """(sliding_window, sequence_ids) of transformers' causal mask function (None, None), its
    sliding-window version (w, None), and either of them remapped to packed sequences
    (..., sequence ids); None for any other mask function. Reads closures, which dynamo cannot
    trace: run outside compiled graphs."""
    fn, sequence_ids = mask_function, None
    if _closure_of(fn, "and_masks"):
        parts = _cell(fn, "mask_functions")
        if len(parts) == 2 and _closure_of(parts[1], "packed_sequence_mask_function"):
            # Packed: the causal (or sliding) function, of position ids in recent transformers, and
            # equal sequence ids. The ids change wherever a position id is not its predecessor's
            # + 1, so within a sequence position and index differences are equal: the index-based
            # mask restricted to each sequence.
            fn, sequence_ids = parts[0], _cell(parts[1], "packed_sequence_mask")
            if _closure_of(fn, "remap_positions_for_packed_sequence"):
                fn = _cell(fn, "mask_function")
    if fn is _HF["causal_mask_function"]:
        return None, sequence_ids
    if _closure_of(fn, "and_masks"):
        parts = _cell(fn, "mask_functions")
        if (len(parts) == 2 and _closure_of(parts[0], "sliding_window_overlay")
                and parts[1] is _HF["causal_mask_function"]):
            return _cell(parts[0], "sliding_window"), sequence_ids
    return None


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: Optional[torch.Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
                      is_causal: Optional[bool] = None, _attnqat_options: Optional[dict] = None, **kwargs):
    """The transformers attention function (the ``AttentionInterface`` signature).

    Args:
        module: the calling attention module (its ``is_causal`` is read, as transformers' SDPA does).
        query: ``[B, Hq, Nq, D]``; key, value: ``[B, Hkv, Nk, D]`` (GQA runs natively).
        attention_mask: ``None``, a :class:`StructuredMask` (from the mask builder: sliding
            window, packed sequences), a boolean ``[B, 1, Nq, Nk]`` mask (True = visible) or a
            float mask of 0 / dtype-minimum values; see the module docstring for what is supported.
        dropout: must be 0 (set ``config.attention_dropout = 0``).
        scaling: the softmax scale.
        is_causal: overrides ``module.is_causal``.
        **kwargs: ``softcap`` (Gemma 2's logit soft-capping) and ``s_aux`` (GPT-OSS's attention
            sinks, one logit per query head) are applied as :func:`attnqat.attention`'s ``softcap``
            and ``sinks`` (the sinks cast to float32, so their gradient flows back to the
            parameter); both run on the CPU reference and the CUDA kernels, not with
            :class:`FP4Cache` (its decode has neither). ``cu_seq_lens_q``,
            ``cu_seq_lens_k``, ``max_length_q``, ``max_length_k`` (FlashAttention's packed-sequence
            arguments, over the ``B * N`` flattened tokens) run the layer as
            :func:`attnqat.attention_varlen`. ``sliding_window`` is honoured through the mask; other
            keyword arguments are ignored, as by transformers' SDPA.

    Returns:
        ``(attn_output [B, Nq, Hq, D], None)``: attention weights are never materialized.
    """
    # Gemma 2's softcap and GPT-OSS's sinks (s_aux) become options of every attention call (_sdpa
    # hands its options to attnqat.attention unchanged).
    softmax_extras = {}
    if kwargs.get("softcap") is not None:
        softmax_extras["softcap"] = kwargs["softcap"]
    if kwargs.get("s_aux") is not None:
        softmax_extras["sinks"] = kwargs["s_aux"].float()
    structured = attention_mask if isinstance(attention_mask, StructuredMask) else None
    mask = None if structured is not None else _bool_mask(attention_mask)
    flash_sequences = _flash_sequences(kwargs)
    rec = _take_pending(key)  # an FP4Cache: key holds only the new tokens
    if rec is not None and kwargs.get("use_cache") is False:
        # transformers still hands the cache every token, and generate() then feeds the whole
        # prefix again at each step: the FP4 pages would hold every token several times.
        raise ValueError("attnqat.hf.FP4Cache: the model was called with use_cache=False, but transformers still "
                         "appends every token to the cache it is given (generate() re-feeds the whole prefix at each "
                         "step); call with use_cache=True, or without the FP4Cache")
    nq, nk = query.shape[2], (rec[0].layers[rec[1]].seen if rec is not None else key.shape[2])
    if mask is not None and mask.shape[-1] > nk:
        mask = mask[..., :nk]  # as transformers' eager attention does
    module_causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    window = kwargs.get("sliding_window")
    if module_causal and attention_mask is None and window is not None and nk > window:
        raise ValueError(f"attnqat (transformers): sliding_window={window} is shorter than the {nk} keys but "
                         "transformers built no sliding-window mask for this layer (it attends to every earlier key); "
                         "use attn_implementation='eager' to get that model's behaviour")
    opts = {**resolve_options(dict(_attnqat_options or {})), **softmax_extras}
    if structured is not None or flash_sequences is not None:
        if mask is not None:
            raise ValueError("attnqat (transformers): cu_seq_lens_q/cu_seq_lens_k (packed sequences) were given "
                             "together with an attention mask (padding, or a pattern attnqat cannot read); pass the "
                             "packed sequences without padding")
        if rec is not None and (flash_sequences is not None or structured.sequence_ids is not None):
            raise NotImplementedError("attnqat.hf.FP4Cache: packed sequences are not a generation pattern; call the "
                                      "model without the FP4Cache")
        if structured is not None and (structured.q_length, structured.kv_length) != (nq, nk):
            raise ValueError(f"attnqat (transformers): the mask was built for {structured.q_length} queries and "
                             f"{structured.kv_length} keys, the layer has {nq} and {nk}")
        if rec is None:
            out = _structured_attention(query, key, value, structured, flash_sequences, module_causal, dropout,
                                        scaling, opts)
            return out, None
        # An FP4Cache layer whose sliding window is shorter than the keys: the cache's decode applies
        # the window itself (attnqat.hf_cache), the prefill runs the windowed attention below.

    def dense(q, k, v, m):
        if structured is not None:  # the FP4Cache prefill of a sliding-window layer (m is None)
            return _structured_attention(q, k, v, structured, None, module_causal, dropout, scaling, opts).transpose(1, 2)
        # No mask on a causal module: _causal_mask skipped building an exactly bottom-right causal
        # mask (transformers < 4.53, which has no mask registry, always builds one for causal models).
        return _sdpa(q, k, v, m, dropout, module_causal and m is None, scaling, True, opts, "bottom_right")[0]

    if rec is not None:
        from .hf_cache import fp4_cache_attention

        if not module_causal:
            raise ValueError("attnqat.hf.FP4Cache: the attention module is not causal; the FP4 cache serves decoders")
        if softmax_extras:
            raise NotImplementedError(f"attnqat.hf.FP4Cache: the FP4 KV cache's decode has no {' or '.join(softmax_extras)} "
                                      "(this model's attention uses it); use transformers' default cache")
        out = fp4_cache_attention(rec, query, mask, scaling, opts, dense,
                                  sliding_window=structured.sliding_window if structured is not None else None)
    else:
        out = dense(query, key, value, mask)
    return out.transpose(1, 2).contiguous(), None


def _flash_sequences(kwargs: dict):
    """The FlashAttention keyword arguments of packed sequences (``cu_seq_lens_q/k``,
    ``max_length_q/k``, as ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)`` passes
    them through the model forward) as :func:`attnqat.attention_varlen`'s ``(cu_seqlens_q,
    cu_seqlens_k, max_seqlen_q, max_seqlen_k)``; None when absent. A maximum length that is a
    tensor (or missing) is read on the host: a synchronization."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is None and cu_k is None:
        return None
    if cu_q is None or cu_k is None:
        raise ValueError("attnqat (transformers): packed sequences need both cu_seq_lens_q and cu_seq_lens_k")
    lengths = []
    for name, cu in (("max_length_q", cu_q), ("max_length_k", cu_k)):
        value = kwargs.get(name)
        if value is None:
            value = cu.diff().max() if cu.numel() > 1 else 0
        lengths.append(int(value) if isinstance(value, torch.Tensor) else value)
    # transformers types the offsets as LongTensor; attnqat (like FlashAttention) takes int32.
    return (cu_q.to(torch.int32), cu_k.to(torch.int32), *lengths)


def _structured_attention(query, key, value, structured: Optional[StructuredMask], flash_sequences, module_causal,
                          dropout, scaling, opts) -> torch.Tensor:
    """A sliding-window and/or packed-sequence causal mask read by the mask builder, or packed
    sequences given as FlashAttention keyword arguments: one attnqat.attention call with the
    window, or one attnqat.attention_varlen call over the ``B * N`` flattened tokens. Returns
    ``[B, Nq, Hq, D]``."""
    if dropout != 0.0:
        raise ValueError(f"attnqat (transformers): attention dropout {dropout}: attnqat has no attention dropout; "
                         "set config.attention_dropout = 0.0")
    query, key, value = _autocast(query, key, value)
    # The builder reads causal mask functions only; FlashAttention's arguments follow the module.
    causal = True if structured is not None else module_causal
    window = structured.window if structured is not None else None
    sequences = flash_sequences
    if sequences is None and structured.sequence_ids is not None:
        sequences = structured.sequences(query.device)
    if sequences is None:  # a sliding window, one sequence per batch row
        out = attention(query, key, value, causal=causal, window=window, softmax_scale=scaling, **opts)
        return out.transpose(1, 2).contiguous()
    b, hq, nq, _ = query.shape
    # [B, H, N, D] views of [B, N, H, D] projections: the flattening is usually a view.
    flat = lambda t: t.transpose(1, 2).reshape(-1, t.shape[1], t.shape[3])
    out = attention_varlen(flat(query), flat(key), flat(value), *sequences, causal=causal, window=window,
                           softmax_scale=scaling, **opts)
    return out.view(b, nq, hq, -1)


def register(name: str = NAME, **options) -> str:
    """Registers attnqat with transformers as attention implementation ``name``.

    After ``attnqat.hf.register()``, ``from_pretrained``/``from_config(...,
    attn_implementation="attnqat")`` and ``model.set_attn_implementation("attnqat")`` use attnqat.
    Registers the attention function (``AttentionInterface``) and, where transformers has one, the
    mask builder (``AttentionMaskInterface``: SDPA's boolean masks). Idempotent.

    Args:
        name: the implementation's name; register several names to fix options per model, e.g.
            ``register("attnqat_fp4", mode="fp4")``.
        **options: attnqat options fixed for this name (``mode``, ``p_quant``, ...); the others come
            from :func:`attnqat.config` at call time.

    Returns:
        ``name``.
    """
    options = _check(dict(options), "attnqat.hf.register")
    from transformers import AttentionInterface

    fn = functools.partial(attention_forward, _attnqat_options=dict(options)) if options else attention_forward
    AttentionInterface.register(name, fn)
    _REGISTERED.add(name)
    try:
        from transformers import masking_utils
        from transformers.masking_utils import AttentionMaskInterface, causal_mask_function
    except ImportError:  # transformers < 4.53 builds its masks in the models (4-D float masks)
        return name
    _HF.update(sdpa_mask=AttentionMaskInterface._global_mapping["sdpa"], causal_mask_function=causal_mask_function)
    # The code objects of the closures that transformers composes its causal masks from (those
    # this version has), by which the builder recognizes sliding windows and packed sequences.
    for factory, args in (("and_masks", ()), ("sliding_window_overlay", (1,)),
                          ("packed_sequence_mask_function", (None,)),
                          ("remap_positions_for_packed_sequence", (None, None))):
        if hasattr(masking_utils, factory):
            _HF[factory] = getattr(masking_utils, factory)(*args).__code__
    AttentionMaskInterface.register(name, _causal_mask)
    return name


def _causal_mask(**kwargs):
    """The mask builder of "attnqat" (transformers' ``AttentionMaskInterface``; called with keyword
    arguments: ``batch_size``, ``q_length``/``q_offset`` (transformers 5) or ``cache_position``
    (4.x), ``kv_length``, ``kv_offset``, ``mask_function``, ``attention_mask``, ``local_size``,
    ...).

    Without a padding mask and with the queries ending at the last key (as far as static
    information shows; with transformers 4.x, whose query offset is a tensor, only ``Nq == Nk``)
    it returns ``None`` for a mask that is exactly bottom-right causal (the plain causal mask
    function, or a sliding window or chunk that holds every key: transformers' own rule for
    ``local_size``), and a :class:`StructuredMask` for transformers' sliding-window causal mask and
    for packed sequences (causal or sliding). Otherwise it returns transformers' SDPA boolean mask,
    always materialized (its own "use is_causal" skip assumes torch's top-left alignment).
    """
    causal_fn = _HF["causal_mask_function"]
    kwargs.setdefault("mask_function", causal_fn)
    kv_length, kv_offset = kwargs["kv_length"], kwargs.get("kv_offset", 0)
    if "q_length" in kwargs:
        q_length, q_offset = kwargs["q_length"], kwargs.get("q_offset", 0)
    else:
        q_length, q_offset = kwargs["cache_position"].shape[0], None  # offset = cache_position[0]: a tensor
    static_offset = q_offset is not None and not isinstance(q_offset, torch.Tensor)
    static_kv = not isinstance(kv_offset, torch.Tensor)
    ends_at_last_key = static_kv and ((q_length == kv_length and kv_offset == 0)
                                      or (static_offset and q_offset + q_length == kv_offset + kv_length))
    local_size = kwargs.get("local_size")
    mask_function = kwargs["mask_function"]
    skip_allowed = kwargs.get("allow_is_causal_skip", True)
    if kwargs.get("attention_mask") is None and ends_at_last_key:
        # transformers composes extra mask functions, packing and block ids with
        # allow_is_causal_skip=False: allowed, the mask function is the plain one of its builder.
        if (skip_allowed and kv_offset == 0 and (
                mask_function is causal_fn if local_size is None else kv_length < local_size)):
            return None
        if mask_function is not causal_fn:
            structure = _read_mask_function(mask_function)
            if structure is not None:
                sliding_window, sequence_ids = structure
                if sequence_ids is not None and tuple(sequence_ids.shape[1:]) == (q_length,) == (kv_length,):
                    return StructuredMask(q_length, kv_length, sliding_window, sequence_ids)
                if sequence_ids is None and sliding_window is not None and skip_allowed:
                    return StructuredMask(q_length, kv_length, sliding_window, None)
    kwargs["allow_is_causal_skip"] = False
    return _HF["sdpa_mask"](**kwargs)
