"""attnqat.nn: torch.nn modules over attnqat attention."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._config import _check
from .attention import check_bool, check_softmax_scale
from .functional import sdpa


class FP4Attention(torch.nn.Module):
    """Scaled dot-product attention with attnqat's FP4 (Attn-QAT) numerics, as a module.

    A thin wrapper over :func:`attnqat.sdpa` that holds the options: the multi-head projections
    stay in your model. ``forward(q, k, v, attn_mask=None)`` takes ``[B, Hq, Nq, D]`` queries and
    ``[B, Hkv, Nk, D]`` keys/values and returns ``[B, Hq, Nq, D]``.

    Args:
        is_causal: apply a causal mask (aligned as ``causal_alignment`` says).
        scale: softmax scale (default ``1/sqrt(D)``).
        causal_alignment: ``"top_left"`` (torch's SDPA) or ``"bottom_right"`` (decoding with a KV
            cache); they differ only when ``Nq != Nk``.
        **options: attnqat options (``mode``, ``p_quant``, ``v_blocks``, ``kv_tile``, ``bwd_*``,
            ``precision``, ``deterministic``, ``qkv_scale``, ``check_finite``), checked here; those not given come from the enclosing
            :func:`attnqat.config` at call time. GQA is always enabled.

    Example::

        attn = attnqat.nn.FP4Attention(is_causal=True)           # mode from attnqat.config
        with attnqat.config(mode="attn_qat"):
            y = attn(q, k, v)
    """

    def __init__(self, is_causal: bool = False, scale: Optional[float] = None, causal_alignment: str = "top_left",
                 **options):
        super().__init__()
        if causal_alignment not in ("top_left", "bottom_right"):
            raise ValueError(f"causal_alignment: expected 'top_left' or 'bottom_right', got {causal_alignment!r}")
        self.is_causal = check_bool("is_causal", is_causal)
        self.scale = check_softmax_scale("scale", scale) or None
        self.causal_alignment = causal_alignment
        self.options = _check(dict(options), "attnqat.nn.FP4Attention")

    def forward(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor] = None) -> Tensor:
        """Attention of ``q`` over ``k``, ``v``; ``attn_mask`` as in :func:`attnqat.sdpa` (then
        ``is_causal`` must be False)."""
        return sdpa(q, k, v, attn_mask=attn_mask, is_causal=self.is_causal, scale=self.scale,
                    enable_gqa=True, causal_alignment=self.causal_alignment, **self.options)

    def extra_repr(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return f"is_causal={self.is_causal}, causal_alignment={self.causal_alignment!r}{opts}"
