"""Hugging Face diffusers integration: attnqat as an attention backend of diffusers' dispatcher.

    import attnqat.diffusers
    attnqat.diffusers.register()                        # once; adds the backend "attnqat"
    transformer.set_attention_backend("attnqat")        # Wan, Flux, LTX-Video, ... (see below)
    with attnqat.config(mode="fp4"):                    # serving: FP4 forward
        video = pipe(prompt).frames
    with attnqat.config(mode="attn_qat"):               # training: FP4 forward, Attn-QAT backward
        loss = loss_fn(transformer(...).sample)
    # or, for a model whose processors have no backend set:
    with diffusers.models.attention_dispatch.attention_backend("attnqat"):
        ...

diffusers' transformers route attention through ``dispatch_attention_fn``, which looks the backend
up in ``_AttentionBackendRegistry`` by an ``AttentionBackendName`` member; ``set_attention_backend``
and the ``attention_backend`` context manager accept only names that are values of that enum.
diffusers 0.42 has no public way to add a backend, so :func:`register` adds a member to the enum
(``AttentionBackendName.ATTNQAT``, value ``"attnqat"``) and registers the backend function with the
registry's own ``register`` decorator; from then on the name works everywhere a built-in backend
name does.

The backend receives diffusers' layout ``[B, S, H, D]`` and runs :func:`attnqat.sdpa`'s
implementation on ``[B, H, S, D]`` views (``transpose(1, 2)``: no copy, attnqat takes any strides
with a contiguous last dimension); the output ``[B, H, S, D]`` comes back as a ``[B, S, H, D]``
view, as from diffusers' "native" backend. Options: those fixed by ``register(name, **options)``,
the others from :func:`attnqat.config` at call time.

What it computes, and what raises (never a silent fallback to another attention):

- ``is_causal`` (torch's top-left alignment, as "native"), ``scale``, ``enable_gqa`` (native GQA).
- ``attn_mask``: a boolean mask (True = attend) of shape ``[B, Nk]`` (a key-padding mask, e.g. the
  text padding of cross-attention) or broadcastable to ``[B, H, Nq, Nk]``, when it is per batch
  element a contiguous range of visible keys (optionally with a causal limit) and equal across
  heads — exactly :func:`attnqat.sdpa`'s masks. A float mask whose entries are all ``0`` (visible)
  or ``<= -10000`` (masked; ``-inf`` included) is the same visibility mask written as a bias (LTX-Video
  builds its text mask as ``(1 - mask) * -10000``): it is taken as the boolean mask ``bias == 0``.
  "native" adds the bias, which gives the masked keys weights of ``exp(-10000 + spread)``, exactly
  0 in fp32 for any row whose scores span less than about 9900, so the two agree to round-off; a
  row with no visible key raises (the bias makes "native" attend to every key there). Any other
  float mask is an additive bias attnqat cannot apply: ``ValueError``, use "native".
- ``dropout_p > 0``: ``ValueError`` (attnqat has no attention dropout).
- ``return_lse=True``: ``(out [B, S, H, D], lse [B, S, H] float32)``, forward only (attnqat's LSE
  carries no gradient): ``NotImplementedError`` when a gradient would flow.
- context parallelism (``_parallel_config``, ``enable_parallelism``): ``NotImplementedError``.

Models whose processors call ``F.scaled_dot_product_attention`` themselves (the processors of
``attention_processor.py``: SD3, CogVideoX, ...) ignore attention backends, and diffusers'
``set_attention_backend`` skips them without a word; :func:`set_attention_backend` here raises
for them instead. Wan, Flux and LTX-Video dispatch (diffusers 0.42).
"""

from __future__ import annotations

import numbers
from typing import Optional

import torch

from ._config import _check, resolve_options
from .functional import _sdpa

NAME = "attnqat"
# A float mask entry at or below this (rounded to the mask's dtype: -9984 in bf16) is "masked".
FLOAT_MASK_MASKED_MAX = -10000.0
_REGISTERED = {}  # name -> options, for the names register() has added


def _dispatch():
    from diffusers.models import attention_dispatch

    return attention_dispatch


def _backend_member(name: str):
    """The ``AttentionBackendName`` member of ``name``, added to the enum when it is new."""
    enum = _dispatch().AttentionBackendName
    if name in enum._value2member_map_:
        return enum._value2member_map_[name]
    key = name.upper()
    if key in enum.__members__:
        raise ValueError(f"attnqat.diffusers.register: name {name!r}: AttentionBackendName.{key} already exists "
                         f"with the value {enum.__members__[key].value!r}; choose another name")
    member = str.__new__(enum, name)
    member._name_ = key
    member._value_ = name
    member._sort_order_ = len(enum._member_names_)
    # The structures Enum's lookups read: enum[key], enum(value), iteration, __members__, enum.KEY.
    type.__setattr__(enum, key, member)
    enum._member_map_[key] = member
    enum._value2member_map_[name] = member
    enum._member_names_.append(key)
    return member


def register(name: str = NAME, **options) -> str:
    """Registers attnqat with diffusers as attention backend ``name``.

    Afterwards ``transformer.set_attention_backend(name)`` (or :func:`set_attention_backend`, which
    also checks that every attention module dispatches), ``with attention_backend(name):`` and
    ``dispatch_attention_fn(..., backend=name)`` run attnqat. Registering a name again replaces its
    options.

    Args:
        name: the backend's name: lowercase (diffusers lowercases the name it is given), a Python
            identifier, not one of diffusers' own backends. Register several names to fix options
            per model, e.g. ``register("attnqat_fp4", mode="fp4")``.
        **options: attnqat options fixed for this name (``mode``, ``p_quant``, ...); the others come
            from :func:`attnqat.config` at call time.

    Returns:
        ``name``.
    """
    if not isinstance(name, str) or not name.isidentifier() or name != name.lower():
        raise ValueError(f"attnqat.diffusers.register: name: expected a lowercase identifier (diffusers lowercases "
                         f"backend names), got {name!r}")
    options = _check(dict(options), "attnqat.diffusers.register")
    dispatch = _dispatch()
    if name not in _REGISTERED and name in dispatch.AttentionBackendName._value2member_map_:
        raise ValueError(f"attnqat.diffusers.register: {name!r} is one of diffusers' own attention backends; "
                         "choose another name")
    member = _backend_member(name)
    dispatch._AttentionBackendRegistry.register(member, supports_context_parallel=False)(_backend_function(name, options))
    _REGISTERED[name] = dict(options)
    return name


def _backend_function(name: str, options: dict):
    """The function diffusers calls: its parameter names are those dispatch_attention_fn passes
    (it drops the arguments a backend's signature does not name)."""

    def attnqat_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attn_mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0, is_causal: bool = False,
                          scale: Optional[float] = None, enable_gqa: bool = False, return_lse: bool = False,
                          _parallel_config=None):
        return attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, return_lse,
                         _parallel_config, name=name, options=options)

    attnqat_attention.__qualname__ = attnqat_attention.__name__ = f"attnqat_attention[{name}]"
    return attnqat_attention


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
              dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None, enable_gqa: bool = False,
              return_lse: bool = False, _parallel_config=None, *, name: str = NAME, options: Optional[dict] = None):
    """The backend: attention on diffusers' ``[B, S, H, D]`` tensors (see the module docstring).

    Returns ``[B, Nq, Hq, D]`` in the dtype of ``query`` (a transposed view of attnqat's
    ``[B, Hq, Nq, D]`` output), and the LSE ``[B, Nq, Hq]`` too when ``return_lse``.
    """
    where = f"attnqat (diffusers backend {name!r})"
    if _parallel_config is not None:
        raise NotImplementedError(f"{where}: context parallelism (enable_parallelism) is not supported; use the "
                                  "'native' backend for context-parallel attention")
    for arg, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            got = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{where}: {arg}: expected a 4-D tensor [batch, seq, heads, head_dim], got {got}")
    if not isinstance(dropout_p, numbers.Real) or isinstance(dropout_p, bool) or dropout_p != 0.0:
        raise ValueError(f"{where}: dropout_p={dropout_p!r}: attnqat has no attention dropout; put the model in eval() "
                         "or set its attention dropout to 0, or use the 'native' backend")
    if return_lse and torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        raise NotImplementedError(f"{where}: return_lse=True with gradients: attnqat's LSE carries no gradient; run "
                                  "under torch.no_grad(), or use the 'native' backend")
    b, nq, nk = query.shape[0], query.shape[1], key.shape[1]
    mask = _visibility_mask(attn_mask, b, nk, where)
    opts = resolve_options(dict(options or {}))
    o, lse = _sdpa(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), mask, 0.0, is_causal, scale,
                   enable_gqa, opts, "top_left")
    out = o.transpose(1, 2)
    return (out, lse.transpose(1, 2)) if return_lse else out


def _visibility_mask(mask: Optional[torch.Tensor], b: int, nk: int, where: str) -> Optional[torch.Tensor]:
    """diffusers' ``attn_mask`` as the boolean mask attnqat.sdpa analyses (True = visible)."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{where}: attn_mask: expected None or a torch.Tensor, got {type(mask).__name__}")
    if mask.dim() == 2 and tuple(mask.shape) == (b, nk):  # a key-padding mask, as "native" reads it
        mask = mask[:, None, None, :]
    if mask.dtype == torch.bool:
        return mask
    if not mask.is_floating_point():
        raise ValueError(f"{where}: attn_mask: unsupported dtype {mask.dtype}; pass a boolean mask (True = attend)")
    visible = mask == 0
    masked = mask <= float(torch.tensor(FLOAT_MASK_MASKED_MAX, dtype=mask.dtype))
    only_visibility, every_row_sees_a_key = torch.stack([(visible | masked).all(), visible.any(-1).all()]).tolist()
    if not only_visibility:
        raise ValueError(
            f"{where}: attn_mask is an additive bias (a {mask.dtype} mask with values other than 0 and <= "
            f"{FLOAT_MASK_MASKED_MAX:g}), which attnqat cannot apply; use the 'native' backend for this model, or pass "
            "a boolean mask if it only encodes visibility")
    if not every_row_sees_a_key:
        raise ValueError(
            f"{where}: attn_mask: a float mask masks every key of some query row; the 'native' backend then attends "
            "to all keys of that row (the bias shifts them equally) while attnqat would give 0; pass a boolean mask "
            "(True = attend) to get 0 for such rows")
    return visible


def set_attention_backend(model: torch.nn.Module, name: str = NAME) -> torch.nn.Module:
    """``model.set_attention_backend(name)``, after checking that every attention module of
    ``model`` dispatches (diffusers' own method skips the processors that call
    ``F.scaled_dot_product_attention`` directly, which would then keep running torch's attention).

    Registers ``name`` with default options first if :func:`register` has not. Raises
    ``ValueError`` naming the processor classes that ignore attention backends, and when the model
    has no attention module. Returns ``model``.
    """
    if name not in _REGISTERED:
        register(name)
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention, MochiAttention

    # The modules and the attribute diffusers' ModelMixin.set_attention_backend itself looks at.
    modules = [m for m in model.modules() if isinstance(m, (Attention, MochiAttention, AttentionModuleMixin))]
    if not modules:
        raise ValueError(f"attnqat.diffusers.set_attention_backend: {type(model).__name__} has no diffusers "
                         "attention module")
    ignoring = sorted({type(m.processor).__name__ for m in modules
                       if m.processor is None or not hasattr(m.processor, "_attention_backend")})
    if ignoring:
        raise ValueError(
            f"attnqat.diffusers.set_attention_backend: {type(model).__name__}: the attention processors "
            f"{', '.join(ignoring)} call torch's attention directly and ignore attention backends, so these modules "
            f"would not run {name!r}; this model cannot use the attnqat diffusers backend (call attnqat.sdpa from "
            "a custom processor instead)")
    model.set_attention_backend(name)
    return model
