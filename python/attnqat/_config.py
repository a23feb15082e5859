"""attnqat.config: the attention options that sdpa, the nn module and the Hugging Face integration
read when a call does not pass them explicitly.

Three layers, the later winning: the built-in defaults (those of :func:`attnqat.attention`), the
process-wide defaults set with :func:`set_config`, and the ``with attnqat.config(...)`` blocks
that enclose the call (a ``contextvars.ContextVar``: nested blocks and threads/asyncio tasks each
see their own). Explicit keyword arguments of a call win over all three.

``torch.compile`` cannot trace ``ContextVar.get``; while compiling, the options are read from a
process-wide mirror of the most recently entered or left configuration instead, which dynamo
guards on, so changing the configuration recompiles. Compiled code therefore sees the
configuration of the thread that changed it last: do not compile concurrently in several threads
with different configurations.
"""

from __future__ import annotations

import contextvars
import threading
from dataclasses import dataclass, fields, replace
from typing import Optional, Tuple, Union

from .attention import check_option


@dataclass(frozen=True)
class AttnQATConfig:
    """The options that :func:`config` sets (see :func:`attnqat.attention` for their meaning).

    ``None`` for a ``bwd_*`` switch means the mode's default.
    """

    mode: str = "attn_qat"
    p_quant: str = "paper"
    v_blocks: str = "channel"
    kv_tile: int = 128
    bwd_quantized_qkv: Optional[bool] = None
    bwd_quant_p: Optional[bool] = None
    bwd_high_precision_o: Optional[bool] = None
    precision: str = "fp32"
    deterministic: bool = False
    qkv_scale: Union[None, str, Tuple[float, float, float]] = None
    check_finite: bool = False

    def attention_kwargs(self) -> dict:
        """The options as keyword arguments of :func:`attnqat.attention`."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


OPTION_NAMES = tuple(f.name for f in fields(AttnQATConfig))
_GLOBAL = AttnQATConfig()
_CONTEXT: contextvars.ContextVar = contextvars.ContextVar("attnqat_config", default=None)
_LOCK = threading.Lock()
# What compiled code reads (see the module docstring); always a complete AttnQATConfig.
_COMPILE_MIRROR = _GLOBAL


def _check(options: dict, where: str = "attnqat.config") -> dict:
    """The options of a config()/set_config() call (or fixed by the nn module / hf.register()),
    validated as attnqat.attention validates them (check_option: types here, values by the core);
    returns them normalized."""
    out = {}
    for name, value in options.items():
        if name not in OPTION_NAMES:
            raise TypeError(f"{where}: unknown option {name!r}; expected one of {', '.join(OPTION_NAMES)}")
        try:
            out[name] = check_option(name, value)
        except (TypeError, ValueError) as e:
            raise type(e)(f"{where}: {e}") from None
    return out


def _is_compiling() -> bool:
    import sys

    torch = sys.modules.get("torch")
    return torch is not None and torch.compiler.is_compiling()


def get_config() -> AttnQATConfig:
    """The effective configuration here: defaults < :func:`set_config` < enclosing ``config`` blocks."""
    if _is_compiling():
        return _COMPILE_MIRROR
    ctx = _CONTEXT.get()
    return _GLOBAL if ctx is None else ctx


def set_config(**options) -> AttnQATConfig:
    """Sets process-wide defaults (every thread; ``with attnqat.config(...)`` blocks still win).

    Example: ``attnqat.set_config(mode="attn_qat", p_quant="anchored")``. Unnamed options keep
    their current value; ``attnqat.reset_config()`` restores the built-in defaults. Returns the new
    process-wide configuration.
    """
    global _GLOBAL, _COMPILE_MIRROR
    options = _check(options)
    with _LOCK:
        _GLOBAL = replace(_GLOBAL, **options)
        _COMPILE_MIRROR = get_config()
    return _GLOBAL


def reset_config() -> AttnQATConfig:
    """Restores the built-in process-wide defaults (those of :func:`attnqat.attention`)."""
    global _GLOBAL, _COMPILE_MIRROR
    with _LOCK:
        _GLOBAL = AttnQATConfig()
        _COMPILE_MIRROR = get_config()
    return _GLOBAL


class config:
    """Context manager choosing the attnqat options of the code it encloses.

    ``with attnqat.config(mode="attn_qat", p_quant="anchored"): model(x)`` — every
    :func:`attnqat.sdpa`, :class:`attnqat.nn.FP4Attention` and Hugging Face ``"attnqat"``
    attention call inside uses these options unless it passes them explicitly. Blocks nest (the
    inner wins for the options it names); the setting is per thread / asyncio task (a
    ``ContextVar``). Options: ``mode``, ``p_quant``, ``v_blocks``, ``kv_tile``,
    ``bwd_quantized_qkv``, ``bwd_quant_p``, ``bwd_high_precision_o``, ``precision``,
    ``deterministic``, ``qkv_scale``, ``check_finite`` (see :func:`attnqat.attention`; e.g.
    ``attnqat.config(check_finite=True)`` raises naming the tensor and the index of its first
    NaN/Inf instead of propagating it, at the cost of a device synchronization per call). Values
    are checked when the block is created. Also usable as a decorator.
    """

    def __init__(self, **options):
        self._options = _check(options)
        self._tokens = []

    def __enter__(self) -> AttnQATConfig:
        global _COMPILE_MIRROR
        new = replace(get_config(), **self._options)
        self._tokens.append(_CONTEXT.set(new))
        _COMPILE_MIRROR = new
        return new

    def __exit__(self, *exc) -> None:
        global _COMPILE_MIRROR
        _CONTEXT.reset(self._tokens.pop())
        _COMPILE_MIRROR = get_config()

    def __call__(self, fn):
        import functools

        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            with config(**self._options):
                return fn(*args, **kwargs)

        return wrapped


def resolve_options(explicit: dict) -> dict:
    """The attention options of one call: the effective configuration, overridden by the
    explicitly passed (non-None) keyword arguments."""
    given = _check({k: v for k, v in explicit.items() if v is not None}, "attnqat.sdpa")
    base = get_config()
    opts = base.attention_kwargs()
    if "mode" in given and given["mode"] != base.mode:
        # A mode chosen explicitly takes its own switch defaults, not the configured ones.
        for name in ("bwd_quantized_qkv", "bwd_quant_p", "bwd_high_precision_o"):
            opts[name] = None
    opts.update(given)
    return opts
