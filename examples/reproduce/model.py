"""A small GPT-style decoder in plain PyTorch whose attention runs through attnqat.

Byte-level (vocabulary 256), rotary positions, pre-norm RMSNorm, SwiGLU MLP, optional weight tying.
The attention of every layer goes through :func:`attend`, the one place that chooses the
implementation from an :class:`AttnSpec` (set with ``model.set_attention(spec)``):

- ``mode="bf16"`` with ``bf16_impl="torch"`` (default): ``torch.nn.functional.scaled_dot_product_attention``
  (flash attention on the GPU) — the ordinary BF16 attention the paper compares against;
- every other case: ``attnqat.sdpa`` (the SDPA-signature front end), or ``attnqat.attention`` directly
  with ``api="attention"`` (or when this attnqat has no ``sdpa``), with the spec's mode, ``p_quant``
  and the paper's ablation switches.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import attnqat

MODES = ("bf16", "fp4", "drop_in_qat", "attn_qat")


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 256
    ctx: int = 1024
    d_model: int = 384
    n_layers: int = 6
    n_heads: int = 6
    head_dim: int = 64
    mlp_hidden: int = 1024  # SwiGLU hidden size (about 8/3 d_model)
    tie_embeddings: bool = True
    rope_base: float = 10000.0
    init_std: float = 0.02

    def n_params(self, embeddings: bool = True) -> int:
        d, h = self.d_model, self.n_heads * self.head_dim
        per_layer = d * 3 * h + h * d + 3 * d * self.mlp_hidden + 2 * d
        emb = self.vocab_size * d * (1 if self.tie_embeddings else 2) if embeddings else 0
        return self.n_layers * per_layer + d + emb


@dataclass(frozen=True)
class AttnSpec:
    """How attention runs: an attnqat mode with its options (None = the mode's default)."""

    mode: str = "bf16"
    p_quant: str = "paper"
    bwd_quantized_qkv: Optional[bool] = None
    bwd_quant_p: Optional[bool] = None
    bwd_high_precision_o: Optional[bool] = None
    bf16_impl: str = "torch"  # "torch" (SDPA) or "attnqat" (attnqat's bf16 mode) for mode="bf16"
    api: str = "sdpa"  # "sdpa" (attnqat.sdpa) or "attention" (attnqat.attention)
    deterministic: bool = False

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {self.mode!r}")
        if self.bf16_impl not in ("torch", "attnqat") or self.api not in ("sdpa", "attention"):
            raise ValueError(f"bf16_impl {self.bf16_impl!r} / api {self.api!r}: unknown")

    def with_mode(self, mode: str, p_quant: Optional[str] = None) -> "AttnSpec":
        """The same implementation choices with another mode (and no ablation switches)."""
        return replace(self, mode=mode, p_quant=p_quant or self.p_quant, bwd_quantized_qkv=None, bwd_quant_p=None,
                       bwd_high_precision_o=None)

    def attnqat_kwargs(self) -> dict:
        kw = dict(mode=self.mode, p_quant=self.p_quant, deterministic=self.deterministic)
        for name in ("bwd_quantized_qkv", "bwd_quant_p", "bwd_high_precision_o"):
            if getattr(self, name) is not None:
                kw[name] = getattr(self, name)
        return kw

    def as_dict(self) -> dict:
        return asdict(self)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttnSpec) -> torch.Tensor:
    """Causal attention of ``[B, H, N, D]`` tensors as ``spec`` says (the model's only attention call)."""
    if spec.mode == "bf16" and spec.bf16_impl == "torch":
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    kw = spec.attnqat_kwargs()
    if spec.api == "sdpa" and hasattr(attnqat, "sdpa"):
        return attnqat.sdpa(q, k, v, is_causal=True, **kw)
    # attnqat.attention does not follow autocast (the CUDA kernels take bf16/fp16): cast as SDPA would.
    dev = q.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        q, k, v = q.to(dt), k.to(dt), v.to(dt)
    return attnqat.attention(q, k, v, causal=True, **kw)


def rope_tables(ctx: int, head_dim: int, base: float):
    inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    ang = torch.arange(ctx, dtype=torch.float64)[:, None] * inv[None, :]  # [N, D/2]
    ang = torch.cat([ang, ang], dim=-1)  # [N, D], the rotate-half layout
    return torch.cos(ang).float(), torch.sin(ang).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding (rotate-half form, as in Llama) of ``x [B, H, N, D]`` in x's dtype (tables
    computed in fp64, rounded to x's dtype: what Hugging Face's Llama does under bf16)."""
    n = x.shape[-2]
    cos, sin = cos[:n].to(x.dtype), sin[:n].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        h = cfg.n_heads * cfg.head_dim
        self.norm1 = RMSNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * h, bias=False)
        self.proj = nn.Linear(h, cfg.d_model, bias=False)
        self.norm2 = RMSNorm(cfg.d_model)
        self.gate_up = nn.Linear(cfg.d_model, 2 * cfg.mlp_hidden, bias=False)
        self.down = nn.Linear(cfg.mlp_hidden, cfg.d_model, bias=False)

    def forward(self, x, cos, sin, spec: AttnSpec):
        b, n, _ = x.shape
        c = self.cfg
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, c.n_heads, c.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = attend(q, k, v, spec)  # [B, H, N, D]
        x = x + self.proj(y.transpose(1, 2).reshape(b, n, c.n_heads * c.head_dim))
        gate, up = self.gate_up(self.norm2(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig, spec: Optional[AttnSpec] = None):
        super().__init__()
        self.cfg = cfg
        self.spec = spec or AttnSpec()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model)
        self.head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg.ctx, cfg.head_dim, cfg.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self):
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.dim() < 2:
                continue
            # residual output projections scaled by 1/sqrt(2 L) (GPT-2)
            s = std / math.sqrt(2 * self.cfg.n_layers) if name.endswith(("proj.weight", "down.weight")) else std
            nn.init.normal_(p, 0.0, s)

    def set_attention(self, spec: AttnSpec) -> None:
        self.spec = spec

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None):
        """Logits ``[B, N, V]`` of byte tokens ``idx [B, N]``; with targets, the mean cross-entropy (nats)."""
        x = self.embed(idx)
        for blk in self.blocks:
            x = blk(x, self.rope_cos, self.rope_sin, self.spec)
        x = self.norm(x)
        logits = F.linear(x, self.embed.weight) if self.head is None else self.head(x)
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))


def param_groups(model: nn.Module, weight_decay: float):
    """AdamW groups: decay on matrices (linear weights, embedding), none on norm gains."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
