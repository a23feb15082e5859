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
ignored silently), except that a mask which is exactly bottom-right causal and known to be so
without reading tensor values (no padding mask, the plain causal mask function, queries at the end
of the keys) is not built: the attention function receives ``None`` and runs the causal kernel
directly, which keeps ``torch.compile(fullgraph=True)`` and CUDA graphs free of host
synchronizations. A mask that is built is honoured when :func:`attnqat.sdpa` can express it —
per-sequence key ranges (left or right padding, a KV cache, a static cache's unused tail) with a
causal limit — and any other mask (packed sequences, sliding windows shorter than the keys,
custom 4-D masks of other patterns) raises ``ValueError``. A padded batch costs one host
synchronization per model forward to verify the mask (every layer gets the same mask tensor and
reuses the analysis), and one or two attention calls per group of sequences with equal padding.
transformers is imported only by :func:`register` (and :class:`FP4Cache`).

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
from .functional import _sdpa

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


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: Optional[torch.Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
                      is_causal: Optional[bool] = None, _attnqat_options: Optional[dict] = None, **kwargs):
    """The transformers attention function (the ``AttentionInterface`` signature).

    Args:
        module: the calling attention module (its ``is_causal`` is read, as transformers' SDPA does).
        query: ``[B, Hq, Nq, D]``; key, value: ``[B, Hkv, Nk, D]`` (GQA runs natively).
        attention_mask: ``None``, a boolean ``[B, 1, Nq, Nk]`` mask (True = visible) or a float
            mask of 0 / dtype-minimum values; see the module docstring for what is supported.
        dropout: must be 0 (set ``config.attention_dropout = 0``).
        scaling: the softmax scale.
        is_causal: overrides ``module.is_causal``.
        **kwargs: ``softcap`` (Gemma 2's logit soft-capping) and ``s_aux`` (GPT-OSS's attention
            sinks, one logit per query head) are applied as :func:`attnqat.attention`'s ``softcap``
            and ``sinks`` (the sinks cast to float32, so their gradient flows back to the
            parameter); both run on the CPU reference only (CUDA tensors raise
            ``NotImplementedError``) and not with :class:`FP4Cache`. ``sliding_window`` is honoured
            through the mask; other keyword arguments are ignored, as by transformers' SDPA.

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
    mask = _bool_mask(attention_mask)
    rec = _take_pending(key)  # an FP4Cache: key holds only the new tokens
    nq, nk = query.shape[2], (rec[0].layers[rec[1]].seen if rec is not None else key.shape[2])
    if mask is not None and mask.shape[-1] > nk:
        mask = mask[..., :nk]  # as transformers' eager attention does
    module_causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    window = kwargs.get("sliding_window")
    if module_causal and mask is None and window is not None and nk > window:
        raise ValueError(f"attnqat (transformers): sliding_window={window} is shorter than the {nk} keys and no mask "
                         "was given; sliding-window attention is not supported")
    opts = {**resolve_options(dict(_attnqat_options or {})), **softmax_extras}

    def dense(q, k, v, m):
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
        out = fp4_cache_attention(rec, query, mask, scaling, opts, dense)
    else:
        out = dense(query, key, value, mask)
    return out.transpose(1, 2).contiguous(), None


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
        from transformers.masking_utils import AttentionMaskInterface, causal_mask_function
    except ImportError:  # transformers < 4.53 builds its masks in the models (4-D float masks)
        return name
    _HF.update(sdpa_mask=AttentionMaskInterface._global_mapping["sdpa"], causal_mask_function=causal_mask_function)
    AttentionMaskInterface.register(name, _causal_mask)
    return name


def _causal_mask(**kwargs):
    """The mask builder of "attnqat" (transformers' ``AttentionMaskInterface``; called with keyword
    arguments: ``batch_size``, ``q_length``/``q_offset`` (transformers 5) or ``cache_position``
    (4.x), ``kv_length``, ``kv_offset``, ``mask_function``, ``attention_mask``, ...).

    Returns ``None`` for a mask that is exactly bottom-right causal as far as static information
    shows (no padding mask, the plain causal mask function, the queries ending at the last key:
    with transformers 4.x, whose query offset is a tensor, only ``Nq == Nk``), and otherwise
    transformers' SDPA boolean mask, always materialized (its own "use is_causal" skip assumes
    torch's top-left alignment).
    """
    causal_fn = _HF["causal_mask_function"]
    kwargs.setdefault("mask_function", causal_fn)
    kv_length, kv_offset = kwargs["kv_length"], kwargs.get("kv_offset", 0)
    if "q_length" in kwargs:
        q_length, q_offset = kwargs["q_length"], kwargs.get("q_offset", 0)
    else:
        q_length, q_offset = kwargs["cache_position"].shape[0], None  # offset = cache_position[0]: a tensor
    static_offset = q_offset is not None and not isinstance(q_offset, torch.Tensor)
    ends_at_last_key = (q_length == kv_length) or (static_offset and q_offset + q_length == kv_length)
    if (kwargs.get("allow_is_causal_skip", True) and kwargs.get("attention_mask") is None
            and kwargs["mask_function"] is causal_fn and kwargs.get("local_size") is None
            and not isinstance(kv_offset, torch.Tensor) and kv_offset == 0 and ends_at_last_key):
        return None
    kwargs["allow_is_causal_skip"] = False
    return _HF["sdpa_mask"](**kwargs)
