"""attnqat.attention: FlashAttention-style attention with FP4 fake quantization (Attn-QAT)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from . import _C
from ._util import is_torch_tensor, torch_ops

MODES = ("bf16", "fp4", "drop_in_qat", "attn_qat")
P_QUANT = ("paper", "anchored")
V_BLOCKS = ("channel", "token")
PRECISIONS = ("fp32", "fp64", "bf16_operands")


@dataclass(frozen=True)
class AttentionConfig:
    """Resolved options of one attention call (what the C++ core receives)."""

    causal: bool
    softmax_scale: float  # 0 means 1/sqrt(head_dim)
    mode: str
    p_quant: str
    v_blocks: str
    kv_tile: int
    bwd_quantized_qkv: bool
    bwd_quant_p: bool
    bwd_high_precision_o: bool
    precision: str
    deterministic: bool = False

    @property
    def needs_o_hp(self) -> bool:
        """Whether a backward would read O' (numerics section 5, switch bwd_high_precision_o)."""
        return self.mode in ("drop_in_qat", "attn_qat") and self.bwd_high_precision_o

    def as_args(self):
        return (
            self.causal, self.softmax_scale, self.mode, self.p_quant, self.v_blocks, self.kv_tile,
            self.bwd_quantized_qkv, self.bwd_quant_p, self.bwd_high_precision_o, self.precision,
            self.deterministic,
        )


def resolve_config(
    *, causal=False, softmax_scale=None, mode="attn_qat", p_quant="paper", v_blocks="channel",
    kv_tile=128, bwd_quantized_qkv=None, bwd_quant_p=None, bwd_high_precision_o=None, precision="fp32",
    deterministic=False,
) -> AttentionConfig:
    """Checks the options and fills in the mode's defaults for the ablation switches."""
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {', '.join(map(repr, MODES))}, got {mode!r}")
    if p_quant not in P_QUANT:
        raise ValueError(f"p_quant: expected 'paper' or 'anchored', got {p_quant!r}")
    if v_blocks not in V_BLOCKS:
        raise ValueError(f"v_blocks: expected 'channel' or 'token', got {v_blocks!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {', '.join(map(repr, PRECISIONS))}, got {precision!r}")
    if softmax_scale is None:
        softmax_scale = 0.0
    else:
        softmax_scale = float(softmax_scale)
        if not softmax_scale > 0 or softmax_scale == float("inf"):
            raise ValueError(f"softmax_scale: expected a positive finite number, got {softmax_scale}")
    switches = (bwd_quantized_qkv, bwd_quant_p, bwd_high_precision_o)
    if mode in ("bf16", "fp4") and any(s is not None for s in switches):
        raise ValueError(
            f"bwd_* switches: they select the backward of the QAT modes; mode {mode!r} takes none "
            "(use mode='attn_qat' or 'drop_in_qat')"
        )
    default = mode == "attn_qat"
    resolved = [default if s is None else bool(s) for s in switches]
    return AttentionConfig(bool(causal), softmax_scale, mode, p_quant, v_blocks, int(kv_tile), *resolved, precision,
                           bool(deterministic))


def attention(
    q, k, v, *, causal: bool = False, softmax_scale: Optional[float] = None, mode: str = "attn_qat",
    p_quant: str = "paper", v_blocks: str = "channel", kv_tile: int = 128,
    bwd_quantized_qkv: Optional[bool] = None, bwd_quant_p: Optional[bool] = None,
    bwd_high_precision_o: Optional[bool] = None, return_lse: bool = False, precision: str = "fp32",
    deterministic: bool = False,
):
    """Scaled dot-product attention with FP4 (NVFP4) fake quantization, as in Attn-QAT.

    Args:
        q: ``[B, Hq, Nq, D]``; k, v: ``[B, Hkv, Nk, D]`` (the layout of
            ``torch.nn.functional.scaled_dot_product_attention``). ``Hq`` must be a multiple of
            ``Hkv`` (GQA/MQA), ``D`` a multiple of 16 up to 256. float32/float16/bfloat16 (and
            float64 on the CPU); numpy arrays or torch tensors; any strides.
        causal: bottom-right aligned causal mask (query i sees keys j <= i + Nk - Nq).
        softmax_scale: default ``1/sqrt(D)``.
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

    Returns:
        ``O`` with the shape and dtype of ``q`` (and the LSE when ``return_lse``). For torch
        tensors the result is differentiable (except in ``fp4`` mode), and O' is computed only
        when a gradient will be needed (``torch.no_grad()`` gives the plain inference forward).
    """
    cfg = resolve_config(
        causal=causal, softmax_scale=softmax_scale, mode=mode, p_quant=p_quant, v_blocks=v_blocks,
        kv_tile=kv_tile, bwd_quantized_qkv=bwd_quantized_qkv, bwd_quant_p=bwd_quant_p,
        bwd_high_precision_o=bwd_high_precision_o, precision=precision, deterministic=deterministic,
    )
    if is_torch_tensor(q):
        o, lse = torch_ops().attention(q, k, v, cfg)
    else:
        o, lse = _attention_numpy(q, k, v, cfg)
    return (o, lse) if return_lse else o


def _attention_numpy(q, k, v, cfg: AttentionConfig):
    q, k, v = (_last_dim_contiguous(np.asarray(t)) for t in (q, k, v))
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.ndim != 4:
            raise ValueError(f"{name}: expected a 4-D tensor [batch, heads, seq, head_dim], got shape {list(t.shape)}")
    o = np.empty(q.shape, q.dtype)
    lse = np.empty(q.shape[:3], np.float32)
    _C.attention_forward(q, k, v, o, None, lse, None, None, cfg.mode, cfg.p_quant, cfg.v_blocks,
                         cfg.causal, cfg.softmax_scale, cfg.kv_tile, cfg.bwd_quantized_qkv,
                         cfg.bwd_quant_p, cfg.bwd_high_precision_o, cfg.precision,
                         deterministic=cfg.deterministic)
    return o, lse


def _last_dim_contiguous(a: np.ndarray) -> np.ndarray:
    """Attention accepts any strides; the kernels need the last dimension contiguous."""
    if a.ndim and a.shape[-1] > 1 and a.strides[-1] != a.itemsize:
        return np.ascontiguousarray(a)
    return a
