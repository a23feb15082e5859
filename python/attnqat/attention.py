"""attnqat.attention: FlashAttention-style attention with FP4 fake quantization (Attn-QAT).

This module also holds the one checker of attention options (:func:`check_option`,
:func:`resolve_config`): :func:`attention`, :func:`attnqat.sdpa`, :func:`attnqat.config`, the nn
module and the Hugging Face integration all validate through it, so every entry point raises the
same message for the same bad value. Tensor arguments (dtypes, shapes, devices, strides) are
checked once, by the C++ core (``src/common/validate.cpp``), for every backend.
"""

from __future__ import annotations

import ast
import atexit
import functools
import math
import numbers
import sys
from dataclasses import dataclass, replace
from typing import Optional, Tuple, Union

import numpy as np

from . import _C
from ._util import is_torch_tensor, torch_import_error, torch_ops

MODES = ("bf16", "fp4", "drop_in_qat", "attn_qat")
P_QUANT = ("paper", "anchored")
V_BLOCKS = ("channel", "token")
PRECISIONS = ("fp32", "fp64", "bf16_operands")
KV_TILE_MAX = 4096
# The range of NVFP4 second-level scales (docs/numerics.md 9.2).
GLOBAL_SCALE_MIN, GLOBAL_SCALE_MAX = 2.0**-100, 2.0**100
# The largest magnitude an NVFP4 block represents with g = 1: E2M1 max (6) times E4M3 max (448).
FP4_RANGE = 6.0 * 448.0
_F32_MAX = float(np.finfo(np.float32).max)


# ---- Options -----------------------------------------------------------------------------------------
#
# The core's options cross to C++ as one object, attnqat._C.AttentionOptions (or DecodeOptions),
# built by core_options() from a resolved configuration. Their values are checked in one place,
# the core's validate_attention_options() (src/common/validate.cpp; enum strings are converted by
# the binding's parse_choice). The front end checks only what the core cannot see: Python types
# (a str for causal must not become True), None for "the mode's default", and its own options
# (qkv_scale, check_finite).


def _describe(value) -> str:
    """`value` for a message: its type and (short) repr."""
    text = repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{type(value).__name__} {text}"


def _is_bool(value) -> bool:
    return isinstance(value, (bool, np.bool_))


def _validate_core_options(items: tuple) -> bool:
    """Builds the core's options from (name, value) pairs and validates them (ValueError naming
    the option); cached, so an eager call costs a dict lookup. Under torch.compile this runs once,
    at trace time (assume_constant_result): fake tensors never reach C++."""
    return _validated(items)


@functools.lru_cache(maxsize=1024)
def _validated(items: tuple) -> bool:
    _C.validate_attention_options(_C.AttentionOptions(**dict(items)))
    return True


if torch_import_error() is None:
    import torch

    torch.compiler.assume_constant_result(_validate_core_options)


def validate_core_options(items: tuple) -> None:
    """Validates core options given as a tuple of (name, value) pairs (the others at their
    defaults) through the core's one checker."""
    _validate_core_options(items)


def check_bool(name: str, value, *, allow_none: bool = False):
    """True/False (python or numpy bool; None too when `allow_none`), else TypeError. Like torch,
    strings and integers are refused: ``causal="no"`` must not run as causal."""
    if value is None and allow_none:
        return None
    if _is_bool(value):
        return bool(value)
    accepted = "True, False or None (the mode's default)" if allow_none else "a bool (True or False)"
    raise TypeError(f"{name}: expected {accepted}, got {_describe(value)}")


def check_softmax_scale(name: str, value) -> Optional[float]:
    """None (1/sqrt(head_dim)) or a real number, as a float, else TypeError; its value (positive,
    finite, in float32 range) is checked by the core, naming `name`."""
    if value is None:
        return None
    if _is_bool(value) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number (float or int) or None for 1/sqrt(head_dim), "
                        f"got {_describe(value)}")
    value = float(value)
    try:
        validate_core_options((("softmax_scale", value),))
    except ValueError as e:  # the core says softmax_scale; sdpa and the nn module call it scale
        raise ValueError(name + str(e)[len("softmax_scale"):]) from None
    return value


def check_softcap(name: str, value) -> float:
    """Logit soft-capping (docs/numerics.md 9.9): None or 0 (off) or a positive finite number, as a
    float, else TypeError; the core checks its value (ValueError naming `name`)."""
    if value is None:
        return 0.0
    if _is_bool(value) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number (0 or None: off), got {_describe(value)}")
    value = float(value)
    if value != 0.0 and not (abs(value) <= _F32_MAX):  # the core's field is a float32
        raise ValueError(f"{name}: expected 0 (off) or a positive finite number in float32 range, got {value}")
    try:
        validate_core_options((("softcap", value),))
    except ValueError as e:
        raise ValueError(name + str(e)[len("softcap"):]) from None
    return value


def check_int(name: str, value, what: str) -> int:
    """An int (not a bool), else TypeError; the core checks its value."""
    if _is_bool(value) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an int ({what}), got {_describe(value)}")
    return int(value)


def check_power_of_two(name: str, value) -> float:
    """An NVFP4 second-level scale: a power of two in [2^-100, 2^100] (docs/numerics.md 9.2)."""
    if _is_bool(value) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number (a power of two), got {_describe(value)}")
    g = float(value)
    if not (g > 0 and math.isfinite(g) and math.frexp(g)[0] == 0.5 and GLOBAL_SCALE_MIN <= g <= GLOBAL_SCALE_MAX):
        raise ValueError(f"{name}: expected a power of two in [2^-100, 2^100] (so that decoded values are "
                         f"exact), got {g}")
    return g


def check_qkv_scale(name: str, value):
    """None, "amax" or three powers of two (g_q, g_k, g_v); see :func:`attention`."""
    if value is None:
        return None
    if isinstance(value, str):
        if value != "amax":
            raise ValueError(f"{name}: expected None, 'amax' or a tuple (g_q, g_k, g_v) of powers of two, "
                             f"got {value!r}")
        return value
    if not isinstance(value, (tuple, list)):
        raise TypeError(f"{name}: expected None, 'amax' or a tuple (g_q, g_k, g_v) of powers of two, "
                        f"got {_describe(value)}")
    if len(value) != 3:
        raise ValueError(f"{name}: expected three scales (g_q, g_k, g_v), got {len(value)}")
    return tuple(check_power_of_two(f"{name}[{i}] ({part})", g) for i, (part, g) in enumerate(zip("qkv", value)))


def check_window(name: str, value) -> Tuple[int, int]:
    """None (no window) or a sliding window ``(left, right)`` of two ints, each -1 (unbounded) or
    a number of keys >= 0; returns ``(window_left, window_right)`` (``(-1, -1)`` for None). The
    type is checked here (TypeError), the values by the core (ValueError naming `name`)."""
    if value is None:
        return (-1, -1)
    if not isinstance(value, (tuple, list)) or len(value) != 2 or any(
            _is_bool(w) or not isinstance(w, numbers.Integral) for w in value):
        raise TypeError(f"{name}: expected None or a tuple (left, right) of two ints (each -1 for unbounded or a "
                        f"number of keys >= 0), got {_describe(value)}")
    left, right = int(value[0]), int(value[1])
    if max(left, right) > 2**31 - 1:
        raise ValueError(f"{name}: expected each side at most 2^31 - 1 keys, got {(left, right)}")
    try:
        validate_core_options((("window_left", max(left, -2**31)), ("window_right", max(right, -2**31))))
    except ValueError as e:
        raise ValueError(f"{name}: {e} (window=(left, right) = {(left, right)})") from None
    return left, right


_BWD_SWITCHES = ("bwd_quantized_qkv", "bwd_quant_p", "bwd_high_precision_o")

# What the front end checks per option: the Python type (TypeError naming the option), and the
# front end's own options. Strings (mode, p_quant, v_blocks, precision) go to the core as they are.
_TYPES = {
    "causal": check_bool,
    "window_left": lambda n, v: check_int(n, v, "-1 or a number of keys >= 0"),
    "window_right": lambda n, v: check_int(n, v, "-1 or a number of keys >= 0"),
    "softmax_scale": lambda n, v: v if v is None else check_softmax_scale(n, v),
    "softcap": check_softcap,
    "kv_tile": lambda n, v: check_int(n, v, f"a positive multiple of 16 up to {KV_TILE_MAX}"),
    "bwd_quantized_qkv": lambda n, v: check_bool(n, v, allow_none=True),
    "bwd_quant_p": lambda n, v: check_bool(n, v, allow_none=True),
    "bwd_high_precision_o": lambda n, v: check_bool(n, v, allow_none=True),
    "deterministic": check_bool,
    "qkv_scale": check_qkv_scale,
    "check_finite": check_bool,
}
# The options that the core's AttentionOptions holds (the others are the front end's).
CORE_OPTIONS = ("causal", "softmax_scale", "mode", "p_quant", "v_blocks", "kv_tile", *_BWD_SWITCHES, "precision",
                "deterministic", "window_left", "window_right", "softcap")
OPTIONS = CORE_OPTIONS + ("qkv_scale", "check_finite")


def check_option(name: str, value):
    """Validates one attention option (the rules every entry point shares): its Python type here,
    its value in the core (the others at their defaults); returns it normalized."""
    value = _TYPES.get(name, lambda n, v: v)(name, value)
    if name in CORE_OPTIONS and not (value is None and name in _BWD_SWITCHES):
        validate_core_options(((name, value),))
    return value


@dataclass(frozen=True)
class AttentionConfig:
    """Resolved options of one attention call (what the C++ core receives, plus the front end's
    ``qkv_scale`` and ``check_finite``)."""

    causal: bool
    softmax_scale: Optional[float]  # None: 1/sqrt(head_dim)
    mode: str
    p_quant: str
    v_blocks: str
    kv_tile: int
    bwd_quantized_qkv: bool
    bwd_quant_p: bool
    bwd_high_precision_o: bool
    precision: str
    deterministic: bool = False
    qkv_scale: Union[None, str, Tuple[float, float, float]] = None
    check_finite: bool = False
    window_left: int = -1  # sliding window (numerics section 3); -1: unbounded
    window_right: int = -1
    softcap: float = 0.0  # logit soft-capping (numerics 9.9); 0: off

    @property
    def needs_o_hp(self) -> bool:
        """Whether a backward would read O' (numerics section 5, switch bwd_high_precision_o)."""
        return self.mode in ("drop_in_qat", "attn_qat") and self.bwd_high_precision_o

    def core_items(self, inputs_quantized: bool = False) -> tuple:
        """The core's options as (name, value) pairs."""
        return tuple((name, getattr(self, name)) for name in CORE_OPTIONS) + (("inputs_quantized", inputs_quantized),)

    def op_options(self, inputs_quantized: bool) -> str:
        """The core's options as the one string argument of the torch ops (a dict literal)."""
        return repr(dict(self.core_items(inputs_quantized)))


@functools.lru_cache(maxsize=64)
def quantize_options(format: str, axis: str, compute_global_scale: bool = False):
    """The core's QuantizeOptions (format and axis checked by the binding and the core)."""
    return _C.QuantizeOptions(format=format, axis=axis, compute_global_scale=compute_global_scale)


def core_options(cfg: AttentionConfig, inputs_quantized: bool = False):
    """The one object of options that crosses to the core (attnqat._C.AttentionOptions)."""
    return _C.AttentionOptions(**dict(cfg.core_items(inputs_quantized)))


@functools.lru_cache(maxsize=256)
def core_options_from_string(options: str):
    """The core's options of a torch op's string argument (see :meth:`AttentionConfig.op_options`)."""
    return _C.AttentionOptions(**ast.literal_eval(options))


# The caches above hold _C objects: free them before the interpreter tears the module down, or
# nanobind reports them (and its types and functions) as leaked at every exit.
atexit.register(quantize_options.cache_clear)
atexit.register(core_options_from_string.cache_clear)


def resolve_config(
    *, causal=False, softmax_scale=None, mode="attn_qat", p_quant="paper", v_blocks="channel",
    kv_tile=128, bwd_quantized_qkv=None, bwd_quant_p=None, bwd_high_precision_o=None, precision="fp32",
    deterministic=False, qkv_scale=None, check_finite=False, window=None, softcap=0.0,
) -> AttentionConfig:
    """Checks every option (types here, values in the core) and fills in the mode's defaults for
    the ablation switches. ``window`` (None or ``(left, right)``) becomes window_left/right."""
    given = dict(causal=causal, softmax_scale=softmax_scale, mode=mode, p_quant=p_quant, v_blocks=v_blocks,
                 kv_tile=kv_tile, bwd_quantized_qkv=bwd_quantized_qkv, bwd_quant_p=bwd_quant_p,
                 bwd_high_precision_o=bwd_high_precision_o, precision=precision, deterministic=deterministic,
                 qkv_scale=qkv_scale, check_finite=check_finite, softcap=softcap)
    o = {name: _TYPES.get(name, lambda n, v: v)(name, value) for name, value in given.items()}
    o["window_left"], o["window_right"] = check_window("window", window)
    switches = [o[name] for name in _BWD_SWITCHES]
    if o["mode"] in ("bf16", "fp4") and any(s is not None for s in switches):
        raise ValueError(
            f"bwd_* switches: they select the backward of the QAT modes; mode {o['mode']!r} takes none "
            "(use mode='attn_qat' or 'drop_in_qat')"
        )
    default = o["mode"] == "attn_qat"
    for name, s in zip(_BWD_SWITCHES, switches):
        o[name] = default if s is None else s
    cfg = AttentionConfig(**o)
    validate_core_options(cfg.core_items())
    return cfg


# ---- Tensor arguments that only the front end sees --------------------------------------------------


def _kind(t) -> str:
    if is_torch_tensor(t):
        return "a torch tensor"
    if isinstance(t, np.ndarray):
        return "a numpy array"
    return f"a {type(t).__name__}"


def check_same_kind(**tensors) -> bool:
    """True when all are torch tensors, False when none is; mixing raises TypeError naming the
    odd one (the first argument is the reference)."""
    items = list(tensors.items())
    ref_name, ref = items[0]
    ref_torch = is_torch_tensor(ref)
    for name, t in items[1:]:
        if is_torch_tensor(t) != ref_torch:
            raise TypeError(f"{name} is {_kind(t)} but {ref_name} is {_kind(ref)}: pass the same kind "
                            "(all torch tensors or all numpy arrays)")
    return ref_torch


def first_non_finite(name: str, t) -> None:
    """Raises ValueError naming `name` and the index of its first NaN/Inf element, if any (one
    device synchronization for a CUDA tensor)."""
    if is_torch_tensor(t):
        import torch

        if t.numel() == 0 or not t.is_floating_point() or bool(torch.isfinite(t).all()):
            return
        bad = (~torch.isfinite(t)).nonzero()[0]
        index = tuple(int(i) for i in bad)
        value = float(t[index])
    else:
        a = np.asarray(t)
        if a.size == 0 or a.dtype.kind not in "fc" or np.isfinite(a).all():
            return
        index = tuple(int(i) for i in np.argwhere(~np.isfinite(a))[0])
        value = float(a[index])
    what = "NaN" if math.isnan(value) else ("+Inf" if value > 0 else "-Inf")
    raise ValueError(f"{name} contains {what} at index {index} (check_finite=True; leave it off to get the "
                     "NaN propagation of docs/numerics.md instead of an error)")


def nvfp4_global_scale(amax: float) -> float:
    """The second-level scale "amax" picks (docs/numerics.md 9.2): the smallest power of two g with
    amax <= 6 * 448 * g, its exponent clamped to [-100, 100]; 1 for an amax of 0 or not finite.
    (The host twin of the C++ ``nvfp4_global_scale``.)"""
    amax = float(np.float32(amax))
    if not (amax > 0 and math.isfinite(amax)):
        return 1.0
    f, ex = math.frexp(amax)
    e = ex - 12 if f <= 0.65625 else ex - 11  # 2688 = 0.65625 * 2^12
    return 2.0 ** min(max(e, -100), 100)


# ---- attention ---------------------------------------------------------------------------------------


def attention(
    q, k, v, *, causal: bool = False, softmax_scale: Optional[float] = None, mode: str = "attn_qat",
    p_quant: str = "paper", v_blocks: str = "channel", kv_tile: int = 128,
    bwd_quantized_qkv: Optional[bool] = None, bwd_quant_p: Optional[bool] = None,
    bwd_high_precision_o: Optional[bool] = None, return_lse: bool = False, precision: str = "fp32",
    deterministic: bool = False, qkv_scale=None, check_finite: bool = False, window=None,
    softcap: float = 0.0, sinks=None,
):
    """Scaled dot-product attention with FP4 (NVFP4) fake quantization, as in Attn-QAT.

    Args:
        q: ``[B, Hq, Nq, D]``; k, v: ``[B, Hkv, Nk, D]`` (the layout of
            ``torch.nn.functional.scaled_dot_product_attention``). ``Hq`` must be a multiple of
            ``Hkv`` (GQA/MQA), ``D`` a multiple of 16 up to 256 on the CPU (the reference); the
            CUDA kernels take ``D`` a multiple of 16 up to 128. float32/float16/bfloat16 (and float64 on the CPU);
            all numpy arrays or all torch tensors; any strides (a last dimension that is not
            contiguous is copied). Empty inputs (``B``, ``H``, ``Nq`` or ``Nk`` 0) give empty
            results and zero gradients; a query row that sees no key gives ``O = 0`` and
            ``LSE = -inf`` (so ``Nk = 0`` gives zeros, like torch's SDPA).
        causal: bottom-right aligned causal mask (query i sees keys j <= i + Nk - Nq). A bool.
        window: ``None`` (no window) or a sliding window ``(left, right)`` of two ints, aligned
            like ``causal``: query i sees keys ``d - left <= j <= d + right`` with
            ``d = i + Nk - Nq``; ``-1`` leaves a side unbounded. With ``causal=True`` the right
            side is 0 (FlashAttention's ``window_size`` convention), so ``(-1, 0)`` is causal.
            The CUDA kernels skip the key tiles outside every row's window.
        softmax_scale: a positive finite number; default ``1/sqrt(D)``.
        softcap: logit soft-capping (Gemma 2): the scores ``s = softmax_scale * q.k`` become
            ``softcap * tanh(s / softcap)`` before the softmax (after the FP4 quantization of Q
            and K; ``docs/numerics.md`` 9.9). ``0`` or ``None``: off. CPU reference and CUDA
            kernels (forward and backward).
        sinks: attention sinks (GPT-OSS's ``s_aux``): ``None`` or one logit per query head, a
            float32 ``[Hq]`` tensor (a numpy array with numpy inputs). Each row's softmax gets the
            extra term ``exp(sinks[h])``, which takes probability mass but has no value row
            (``docs/numerics.md`` 9.10); ``-inf`` is no sink for that head, NaN and ``+inf`` raise.
            Differentiable: a torch tensor that requires grad gets its gradient. A row that sees
            no key gives ``O = 0`` and ``LSE = sinks[h]``. CPU reference and CUDA kernels, like
            ``softcap``; on CUDA the values are not checked on the host (NaN or ``+inf`` make that
            head's outputs NaN).
        mode: ``"bf16"`` (ordinary attention), ``"fp4"`` (FP4 inference forward; no gradient),
            ``"drop_in_qat"`` (FP4 forward, the paper's naive high-precision backward),
            ``"attn_qat"`` (FP4 forward with O', the Attn-QAT backward).
        p_quant: ``"paper"`` (Algorithm 2/3 as published) or ``"anchored"`` (integer anchor and
            second-level scale 2^-11: tile-size independent, the backward reproduces the forward's
            P blocks). See ``docs/numerics.md``.
        v_blocks: ``"channel"`` (V blocks along the head dim) or ``"token"`` (16 tokens per
            channel; non-causal only).
        kv_tile: keys per tile of the online softmax (affects ``p_quant="paper"`` only).
        bwd_quantized_qkv, bwd_quant_p, bwd_high_precision_o: the paper's ablation switches
            (default: all on for ``attn_qat``, all off for ``drop_in_qat``).
        return_lse: also return the log-sum-exp ``[B, Hq, Nq]`` (float32, natural log; -inf for
            rows that see no key). The LSE carries no gradient.
        precision: CPU reference arithmetic: ``"fp32"`` (the contract), ``"fp64"`` or
            ``"bf16_operands"`` (tensor-core operand rounding; used for tolerances in tests).
        deterministic: a backward with the same bits on every run (no floating-point atomics; the
            CPU reference always is). Slower on CUDA.
        qkv_scale: the NVFP4 second-level (per-tensor) scale ``g`` of Q, K and V in the FP4
            modes (numerics section 2: ``x_hat = e2m1 * e4m3_scale * g``). ``None`` (the paper's
            setting): ``g = 1``, so a 16-element block whose largest magnitude exceeds
            ``6 * 448 = 2688`` saturates: its E4M3 scale clamps to 448 and its elements to
            ``+-2688`` (values below keep their E2M1 grid of that block). ``"amax"``: each of Q, K,
            V gets the smallest power of two with ``amax <= 2688 * g`` (computed per call, on the
            device; no block saturates). ``(g_q, g_k, g_v)``: three powers of two in
            ``[2^-100, 2^100]``. ``g`` is always a power of two, so ``x_hat`` is exactly the
            two-level phi_nv of the numerics and exact in bf16. Q, K, V are fake-quantized with
            their ``g`` and the core runs on them (``inputs_quantized``); where the backward reads
            the raw inputs (``bwd_quantized_qkv`` off: ``drop_in_qat``) or the quantizer cannot take
            the dtype (float64), the call runs instead on ``x / g`` with the softmax scale times
            ``g_q * g_k`` and multiplies O by ``g_v``, the same result (powers of two commute with
            rounding); there ``"amax"`` reads the amax on the host (a device synchronization).
            Ignored in mode ``bf16`` (nothing is quantized).
        check_finite: raise ``ValueError`` naming the tensor and the index of its first NaN/Inf
            (e.g. ``"q contains NaN at index (0, 1, 5, 3)"``) instead of propagating it. Costs an
            ``isfinite`` pass per input and, on CUDA, a device synchronization (not usable inside
            CUDA-graph capture; a graph break under ``torch.compile``).

    Returns:
        ``O`` with the shape and dtype of ``q`` (and the LSE when ``return_lse``). For torch
        tensors the result is differentiable (except in ``fp4`` mode), and O' is computed only
        when a gradient will be needed (``torch.no_grad()`` gives the plain inference forward).

    Raises:
        TypeError: an option of the wrong type (``causal="no"``, ``softmax_scale="0.1"``,
            ``window=4``), or numpy arrays mixed with torch tensors.
        ValueError: an option or tensor the kernels do not accept; the message names the
            argument, what it got and what is accepted.
        NotImplementedError: what the CUDA kernels do not take yet (e.g. head dims above 128,
            float32 inputs).
    """
    cfg = resolve_config(
        causal=causal, softmax_scale=softmax_scale, mode=mode, p_quant=p_quant, v_blocks=v_blocks,
        kv_tile=kv_tile, bwd_quantized_qkv=bwd_quantized_qkv, bwd_quant_p=bwd_quant_p,
        bwd_high_precision_o=bwd_high_precision_o, precision=precision, deterministic=deterministic,
        qkv_scale=qkv_scale, check_finite=check_finite, window=window, softcap=softcap,
    )
    return_lse = check_bool("return_lse", return_lse)
    tensors = dict(q=q, k=k, v=v) if sinks is None else dict(q=q, k=k, v=v, sinks=sinks)
    if check_same_kind(**tensors):
        o, lse = torch_ops().attention(q, k, v, cfg, sinks)
    else:
        o, lse = _attention_numpy(q, k, v, cfg, sinks)
    return (o, lse) if return_lse else o


def attention_varlen(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int, *, causal: bool = False,
    softmax_scale: Optional[float] = None, mode: str = "attn_qat", p_quant: str = "paper", v_blocks: str = "channel",
    kv_tile: int = 128, bwd_quantized_qkv: Optional[bool] = None, bwd_quant_p: Optional[bool] = None,
    bwd_high_precision_o: Optional[bool] = None, return_lse: bool = False, precision: str = "fp32",
    deterministic: bool = False, qkv_scale=None, check_finite: bool = False, window=None,
    softcap: float = 0.0, sinks=None, seqused_k=None,
):
    """Attention over packed sequences of different lengths, without padding (the layout of
    FlashAttention's ``flash_attn_varlen_func``).

    Sequence ``s`` owns the rows ``cu_seqlens_q[s] : cu_seqlens_q[s + 1]`` of ``q`` and
    ``cu_seqlens_k[s] : cu_seqlens_k[s + 1]`` of ``k`` and ``v`` and attends only to its own keys:
    its result is exactly (bit for bit, forward and gradients) that of :func:`attention` on its
    rows alone as ``[1, H, len, D]`` tensors, with the same options (masks, windows and FP4 blocks
    are per sequence; ``docs/numerics.md`` 9.11).

    Args:
        q: ``[total_q, Hq, D]``; k, v: ``[total_k, Hkv, D]`` (dtypes, head dims, GQA and strides
            as for :func:`attention`).
        cu_seqlens_q, cu_seqlens_k: the sequences' offsets, int32 ``[S + 1]`` on the device of
            ``q`` (torch tensors with torch inputs, numpy arrays with numpy inputs): 0, then
            non-decreasing, ending at ``total_q`` / ``total_k``. Sequences of length 0 are allowed
            (a query row of a sequence without keys gives ``O = 0``, ``LSE = -inf``).
        max_seqlen_q, max_seqlen_k: ints, at least the longest sequence's length (CUDA launches
            this many query rows per sequence).
        causal, window: per sequence, bottom-right aligned within it as in :func:`attention`.
        sinks: ``None`` or float32 ``[Hq]`` logits shared by every sequence; their gradient is the
            sum over the sequences.
        seqused_k: ``None`` or int32 ``[S]`` on the device of ``q`` (FlashAttention's
            ``seqused_k``): sequence ``s`` has only the first ``seqused_k[s]`` keys of its range
            (``0 .. cu_seqlens_k[s + 1] - cu_seqlens_k[s]``; CPU inputs are checked, CUDA inputs
            clamped); the rest are padding that no query sees (masks align to the used length),
            whose ``dk``, ``dv`` are 0. A padded batch ``[B, Nk]`` with a key-padding mask (a text
            encoder's) runs as one call: ``cu_seqlens_k = 0, Nk, 2 Nk, ...`` and ``seqused_k`` the
            valid lengths.
        v_blocks: ``"channel"`` only: a 16-token V block (``"token"``) would straddle sequences.
        qkv_scale: as in :func:`attention`; ``"amax"`` gives one second-level scale per packed
            tensor (as a padded batch of the same sequences would), so each sequence equals its own
            call with those scales, not with its own amax.
        other options: as for :func:`attention`.

    Returns:
        ``O`` ``[total_q, Hq, D]`` in the dtype of ``q`` (and with ``return_lse`` the float32 LSE
        ``[Hq, total_q]``), differentiable for torch tensors like :func:`attention`'s.

    Raises:
        TypeError: an option of the wrong type, ``max_seqlen_*`` not an int, numpy arrays mixed
            with torch tensors.
        ValueError: tensors or options the core does not accept, named (``q`` not 3-D,
            ``cu_seqlens_q`` not int32, not 1-D or on another device, sequence counts that differ,
            ``v_blocks="token"``). CPU inputs: the offsets are checked too (start at 0, end at the
            total, no negative length, none above ``max_seqlen_*``). CUDA inputs: the offsets are
            read on the device only (no host synchronization) and trusted, as by FlashAttention; the
            kernels clamp them to the tensors, so wrong offsets give wrong results, never accesses
            out of bounds.
        NotImplementedError: what the CUDA kernels do not take (as for :func:`attention`).
    """
    cfg = resolve_config(
        causal=causal, softmax_scale=softmax_scale, mode=mode, p_quant=p_quant, v_blocks=v_blocks,
        kv_tile=kv_tile, bwd_quantized_qkv=bwd_quantized_qkv, bwd_quant_p=bwd_quant_p,
        bwd_high_precision_o=bwd_high_precision_o, precision=precision, deterministic=deterministic,
        qkv_scale=qkv_scale, check_finite=check_finite, window=window, softcap=softcap,
    )
    return_lse = check_bool("return_lse", return_lse)
    lengths = tuple(_check_max_seqlen(name, value) for name, value in
                    (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)))
    tensors = dict(q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    if sinks is not None:
        tensors["sinks"] = sinks
    if seqused_k is not None:
        tensors["seqused_k"] = seqused_k
    if check_same_kind(**tensors):
        o, lse = torch_ops().attention(q, k, v, cfg, sinks, (cu_seqlens_q, cu_seqlens_k, seqused_k) + lengths)
    else:
        seqs = (np.asarray(cu_seqlens_q), np.asarray(cu_seqlens_k),
                None if seqused_k is None else np.asarray(seqused_k)) + lengths
        o, lse = _attention_numpy(q, k, v, cfg, sinks, seqs)
    return (o, lse) if return_lse else o


def _check_max_seqlen(name: str, value):
    """An int (or a torch.SymInt under torch.compile), else TypeError; the core checks its range."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.SymInt):
        return value
    if is_torch_tensor(value):
        raise TypeError(f"{name}: expected an int (at least the longest sequence's length), got a tensor; "
                        "pass int(t) (a host synchronization) or an upper bound such as the total length")
    return check_int(name, value, "at least the longest sequence's length")


def rescaled_config(cfg: AttentionConfig, head_dim: int, g: Tuple[float, float, float]) -> AttentionConfig:
    """The options of attention on (q / g_q, k / g_k, v / g_v): the softmax scale times g_q * g_k
    (exact: powers of two), no qkv_scale."""
    c = cfg.softmax_scale or float(np.float32(1.0 / math.sqrt(head_dim)))
    c2 = float(np.float32(c)) * g[0] * g[1]
    if not (0 < c2 <= _F32_MAX and float(np.float32(c2)) > 0):
        raise ValueError(f"qkv_scale: softmax_scale {c} times g_q * g_k = {g[0] * g[1]} leaves the float32 range; "
                         "use smaller scales")
    return replace(cfg, softmax_scale=c2, qkv_scale=None, check_finite=False)


def _attention_numpy(q, k, v, cfg: AttentionConfig, sinks=None, seqs=None):
    """attention (seqs None: [B, H, N, D] arrays) or attention_varlen (seqs: the offsets and
    maximum lengths; [total, H, D] arrays) on numpy arrays."""
    arrays = []
    for name, t in (("q", q), ("k", k), ("v", v)):
        a = np.asarray(t)
        if a.dtype.kind not in "fiuc":
            raise ValueError(f"{name}: expected dtype float32, float16 or bfloat16 (or float64 on the CPU), "
                             f"got {a.dtype} (a numpy array of non-numbers)")
        arrays.append(_last_dim_contiguous(a))
    q, k, v = arrays
    rank, layout = (4, "[batch, heads, seq, head_dim]") if seqs is None else (
        3, "[total, heads, head_dim] (packed sequences)")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.ndim != rank:
            raise ValueError(f"{name}: expected a {rank}-D tensor {layout}, got shape {list(t.shape)}")
    if cfg.check_finite:
        for name, t in (("q", q), ("k", k), ("v", v)):
            first_non_finite(name, t)
    prequantized = False
    if cfg.mode != "bf16" and cfg.qkv_scale is not None:
        # (Packed sequences take no token V blocks: the core refuses them, unquantized.)
        if (q.dtype in (np.float32, np.float16) and k.dtype == q.dtype and v.dtype == q.dtype
                and (seqs is None or cfg.v_blocks != "token")):
            q, k, v = _fake_quantize_numpy(q, k, v, cfg)
            prequantized = True
        else:  # float64 (the quantizers take 32- and 16-bit floats): run on x / g
            g = _numpy_scales(q, k, v, cfg.qkv_scale)
            o, lse = _attention_numpy(q / g[0], k / g[1], v / g[2], rescaled_config(cfg, q.shape[-1], g), sinks, seqs)
            return (o * g[2]).astype(q.dtype, copy=False), lse
    o = np.empty(q.shape, q.dtype)
    sinks = None if sinks is None else np.asarray(sinks)
    if seqs is None:
        lse = np.empty(q.shape[:3], np.float32)
        _C.attention_forward(q, k, v, o, None, lse, None, None, core_options(cfg, prequantized), sinks=sinks)
    else:
        lse = np.empty((q.shape[1], q.shape[0]), np.float32)
        cu_q, cu_k, seqused_k, max_q, max_k = seqs
        _C.attention_forward_varlen(q, k, v, cu_q, cu_k, max_q, max_k, o, None, lse, None, None,
                                    core_options(cfg, prequantized), sinks=sinks, seqused_k=seqused_k)
    return o, lse


def _numpy_scales(q, k, v, qkv_scale) -> Tuple[float, float, float]:
    if qkv_scale != "amax":
        return qkv_scale
    return tuple(nvfp4_global_scale(np.abs(t).max(initial=0.0)) if np.isfinite(t).all() else 1.0 for t in (q, k, v))


def _fake_quantize_numpy(q, k, v, cfg: AttentionConfig):
    """Q, K, V fake-quantized with their second-level scales (the core then skips quantization)."""
    amax = cfg.qkv_scale == "amax"
    scales = (1.0, 1.0, 1.0) if amax else cfg.qkv_scale
    out = []
    for t, g, axis in zip((q, k, v), scales, ("last", "last", "token" if cfg.v_blocks == "token" else "last")):
        r = np.empty(t.shape, t.dtype)
        _C.fake_quantize(t, r, np.full((1,), g, np.float32), quantize_options("nvfp4", axis, amax))
        out.append(r)
    return out


def _last_dim_contiguous(a: np.ndarray) -> np.ndarray:
    """Attention accepts any strides; the kernels need the last dimension contiguous."""
    if a.ndim and a.shape[-1] > 1 and a.strides[-1] != a.itemsize:
        return np.ascontiguousarray(a)
    return a
