"""The torch custom ops of attnqat (``torch.ops.attnqat.*``).

Each op is a ``torch.library.custom_op`` with a fake (meta) implementation, so it works under
``torch.compile`` and CUDA-graph capture, and the attention and fake-quantization ops have
autograd formulas. Outputs are allocated here and filled by the C++ core (``attnqat._C``) on the
current CUDA stream; nothing synchronizes.
"""

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import _C
from .attention import core_options_from_string, quantize_options

_LIB = "attnqat"


def _stream(t: Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream if t.is_cuda else 0


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t.contiguous() if t.dim() and t.shape[-1] > 1 and t.stride(-1) != 1 else t


def _packed_shapes(shape, format: str, axis: str):
    from .formats import packed_shapes

    return packed_shapes(shape, format, axis)


# ---- Quantization ------------------------------------------------------------------------------


@torch.library.custom_op(f"{_LIB}::quantize", mutates_args=())
def _quantize_op(x: Tensor, format: str, axis: str, global_scale: float, compute_global_scale: bool) -> Tuple[Tensor, Tensor, Tensor]:
    dshape, sshape = _packed_shapes(x.shape, format, axis)
    data = torch.empty(dshape, dtype=torch.uint8, device=x.device)
    scales = torch.empty(sshape, dtype=torch.uint8, device=x.device)
    g = torch.full((1,), global_scale, dtype=torch.float32, device=x.device)
    _C.quantize(x, data, scales, g if format == "nvfp4" else None, quantize_options(format, axis, compute_global_scale),
                stream=_stream(x))
    return data, scales, g


@_quantize_op.register_fake
def _(x, format, axis, global_scale, compute_global_scale):
    dshape, sshape = _packed_shapes(x.shape, format, axis)
    return (x.new_empty(dshape, dtype=torch.uint8), x.new_empty(sshape, dtype=torch.uint8),
            x.new_empty((1,), dtype=torch.float32))


@torch.library.custom_op(f"{_LIB}::dequantize", mutates_args=())
def _dequantize_op(data: Tensor, scales: Tensor, global_scale: Tensor, format: str, axis: str, shape: List[int], dtype: torch.dtype) -> Tensor:
    out = torch.empty(shape, dtype=dtype, device=data.device)
    _C.dequantize(data, scales, global_scale if format == "nvfp4" else None, out, quantize_options(format, axis),
                  stream=_stream(data))
    return out


@_dequantize_op.register_fake
def _(data, scales, global_scale, format, axis, shape, dtype):
    return data.new_empty(shape, dtype=dtype)


@torch.library.custom_op(f"{_LIB}::fake_quantize", mutates_args=())
def _fake_quantize_op(x: Tensor, format: str, axis: str, global_scale: float, compute_global_scale: bool) -> Tensor:
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    g = torch.full((1,), global_scale, dtype=torch.float32, device=x.device) if format == "nvfp4" else None
    _C.fake_quantize(x, out, g, quantize_options(format, axis, compute_global_scale), stream=_stream(x))
    return out


@_fake_quantize_op.register_fake
def _(x, format, axis, global_scale, compute_global_scale):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _fake_quantize_backward(ctx, grad):
    # Straight-through estimator: the quantizer passes the gradient unchanged.
    return grad, None, None, None, None


torch.library.register_autograd(f"{_LIB}::fake_quantize", _fake_quantize_backward)


# Q, K and V fake-quantized (NVFP4) in one op: what attention's training forward needs before the
# attention op, at the host cost of one op dispatch instead of three (an eager training step runs
# it once per attention layer). The same kernels and numbers as three fake_quantize calls.
@torch.library.custom_op(f"{_LIB}::fake_quantize_qkv", mutates_args=())
def _fake_quantize_qkv_op(q: Tensor, k: Tensor, v: Tensor, v_axis: str, g_q: float, g_k: float, g_v: float,
                          compute_global_scale: bool) -> Tuple[Tensor, Tensor, Tensor]:
    # The three second-level scales in one device tensor (a fill, never a host-to-device copy).
    g = torch.full((3,), g_q, dtype=torch.float32, device=q.device)
    if g_k != g_q or g_v != g_q:
        g[1].fill_(g_k)
        g[2].fill_(g_v)
    outs = []
    for i, (x, axis) in enumerate(((q, "last"), (k, "last"), (v, v_axis))):
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        _C.fake_quantize(x, out, g[i:i + 1], quantize_options("nvfp4", axis, compute_global_scale), stream=_stream(x))
        outs.append(out)
    return tuple(outs)


@_fake_quantize_qkv_op.register_fake
def _(q, k, v, v_axis, g_q, g_k, g_v, compute_global_scale):
    return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k, v))


def _fake_quantize_qkv_backward(ctx, gq, gk, gv):
    # Straight-through estimator, as fake_quantize.
    return gq, gk, gv, None, None, None, None, None


torch.library.register_autograd(f"{_LIB}::fake_quantize_qkv", _fake_quantize_qkv_backward)


def quantize(x: Tensor, format: str, axis: str, global_scale: float, compute: bool):
    # Quantization never copies silently: the C++ validation reports a strided last dim.
    return torch.ops.attnqat.quantize(x, format, axis, global_scale, compute)


def dequantize(data, scales, g, format, axis, shape, dtype):
    return torch.ops.attnqat.dequantize(data, scales, g, format, axis, list(shape), dtype)


def fake_quantize(x: Tensor, format: str, axis: str, global_scale: float, compute: bool):
    return torch.ops.attnqat.fake_quantize(x, format, axis, global_scale, compute)


# ---- Attention ---------------------------------------------------------------------------------

def _sinks_view(sinks: Optional[Tensor]) -> Optional[Tensor]:
    # A plain tensor for the binding, which takes torch.Tensor itself and not subclasses such as
    # nn.Parameter (what models hold their sinks in). Inside an op: no autograd to keep.
    return None if sinks is None else sinks.detach()


def _forward_outputs(q: Tensor, need_o_hp: bool, row_shape) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """O, O', LSE, m_ref, l of a forward, allocated like q (real or fake tensors): O' only when
    `need_o_hp`, else a 1-D placeholder (an O' of an empty q has q's rank and is empty, and still
    counts as given); the row statistics float32 `row_shape`."""
    o = q.new_empty(q.shape)
    o_hp = q.new_empty(q.shape if need_o_hp else (0,))
    lse, m_ref, l = (q.new_empty(row_shape, dtype=torch.float32) for _ in range(3))
    return o, o_hp, lse, m_ref, l


def _o_hp_given(o_hp: Tensor, q: Tensor) -> Optional[Tensor]:
    """O' as the core takes it: None for the forward's placeholder."""
    return o_hp if o_hp.dim() == q.dim() else None


def _dsinks_shape(sinks: Optional[Tensor]):
    # The sinks' gradient, float32 [Hq]; without sinks an empty placeholder.
    return tuple(sinks.shape) if sinks is not None else (0,)


def _backward_outputs(q: Tensor, k: Tensor, v: Tensor, sinks: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """dq, dk, dv (shapes and dtypes of q, k, v) and dsinks (float32 [Hq] or an empty placeholder)."""
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
            q.new_empty(_dsinks_shape(sinks), dtype=torch.float32))


def _dense_rows(q: Tensor):
    return tuple(q.shape[:3])  # [B, Hq, Nq]


def _varlen_rows(q: Tensor):
    return (q.shape[1], q.shape[0])  # [Hq, total_q]


# The options cross as one string (AttentionConfig.op_options: a dict literal of the core's
# AttentionOptions, inputs_quantized included), so the schema holds only what torch needs: the
# tensors, the options (a constant that dynamo guards on) and need_o_hp, which fixes O''s shape.
# `sinks` (float32 [Hq] or None) is the one tensor among the core's options (numerics 9.10).
@torch.library.custom_op(f"{_LIB}::attention_fwd", mutates_args=())
def _attention_fwd(q: Tensor, k: Tensor, v: Tensor, options: str, need_o_hp: bool, sinks: Optional[Tensor] = None
                   ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    o, o_hp, lse, m_ref, l = out = _forward_outputs(q, need_o_hp, _dense_rows(q))
    _C.attention_forward(q, k, v, o, o_hp if need_o_hp else None, lse, m_ref, l, core_options_from_string(options),
                         stream=_stream(q), sinks=_sinks_view(sinks))
    return out


@_attention_fwd.register_fake
def _(q, k, v, options, need_o_hp, sinks=None):
    return _forward_outputs(q, need_o_hp, _dense_rows(q))


@torch.library.custom_op(f"{_LIB}::attention_bwd", mutates_args=())
def _attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, o_hp: Tensor, lse: Tensor,
                   m_ref: Tensor, l: Tensor, options: str, sinks: Optional[Tensor] = None
                   ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    dq, dk, dv, dsinks = out = _backward_outputs(q, k, v, sinks)
    _C.attention_backward(_last_dim_contiguous(dout), q, k, v, o, _o_hp_given(o_hp, q), lse, m_ref, l, dq, dk, dv,
                          core_options_from_string(options), stream=_stream(q), sinks=_sinks_view(sinks),
                          dsinks=None if sinks is None else dsinks)
    return out


@_attention_bwd.register_fake
def _(dout, q, k, v, o, o_hp, lse, m_ref, l, options, sinks=None):
    return _backward_outputs(q, k, v, sinks)


# Packed sequences (varlen): q [total_q, Hq, D], k, v [total_k, Hkv, D], the sequences' offsets
# cu_seqlens_q/k (int32 [S + 1], on q's device, read by the core only: no host synchronization),
# the optional used key counts seqused_k (int32 [S]; None: every key of a range) and the maximum
# lengths; the row statistics are [Hq, total_q]. Otherwise the dense ops.
@torch.library.custom_op(f"{_LIB}::attention_varlen_fwd", mutates_args=())
def _attention_varlen_fwd(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                          seqused_k: Optional[Tensor], max_seqlen_q: int, max_seqlen_k: int, options: str,
                          need_o_hp: bool, sinks: Optional[Tensor] = None
                          ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    o, o_hp, lse, m_ref, l = out = _forward_outputs(q, need_o_hp, _varlen_rows(q))
    _C.attention_forward_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, o,
                                o_hp if need_o_hp else None, lse, m_ref, l, core_options_from_string(options),
                                stream=_stream(q), sinks=_sinks_view(sinks), seqused_k=seqused_k)
    return out


@_attention_varlen_fwd.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k, options, need_o_hp, sinks=None):
    return _forward_outputs(q, need_o_hp, _varlen_rows(q))


@torch.library.custom_op(f"{_LIB}::attention_varlen_bwd", mutates_args=())
def _attention_varlen_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                          seqused_k: Optional[Tensor], max_seqlen_q: int, max_seqlen_k: int, o: Tensor, o_hp: Tensor,
                          lse: Tensor, m_ref: Tensor, l: Tensor, options: str, sinks: Optional[Tensor] = None
                          ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    dq, dk, dv, dsinks = out = _backward_outputs(q, k, v, sinks)
    _C.attention_backward_varlen(_last_dim_contiguous(dout), q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                 max_seqlen_k, o, _o_hp_given(o_hp, q), lse, m_ref, l, dq, dk, dv,
                                 core_options_from_string(options), stream=_stream(q), sinks=_sinks_view(sinks),
                                 dsinks=None if sinks is None else dsinks, seqused_k=seqused_k)
    return out


@_attention_varlen_bwd.register_fake
def _(dout, q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k, o, o_hp, lse, m_ref, l,
      options, sinks=None):
    return _backward_outputs(q, k, v, sinks)


def _attention_bwd_backward(ctx, *grads):
    raise NotImplementedError("attnqat.attention: double backward (gradients of gradients) is not supported")


def _register_attention_autograd(fwd: str, bwd: str, num_seq_args: int) -> None:
    """The autograd formula of the forward op `fwd`, inputs (q, k, v, *seq_args, options,
    need_o_hp, sinks): the backward op `bwd`, inputs (dout, q, k, v, *seq_args, o, o_hp, lse,
    m_ref, l, options, sinks), gives dq, dk, dv and dsinks (and has no backward itself).
    seq_args: none for the dense op; the varlen op's cu_seqlens_q, cu_seqlens_k, seqused_k
    (saved tensors; seqused_k may be None) and max_seqlen_q, max_seqlen_k (ints, kept on ctx
    after the tensors: every tensor argument comes before every other one)."""
    torch.library.register_autograd(f"{_LIB}::{bwd}", _attention_bwd_backward)
    bwd_op = getattr(torch.ops.attnqat, bwd)

    def setup_context(ctx, inputs, output):
        q, k, v = inputs[:3]
        seq_args, (options, _, sinks) = inputs[3:3 + num_seq_args], inputs[3 + num_seq_args:]
        ctx.options = options
        ctx.seq_ints = tuple(a for a in seq_args if not isinstance(a, Tensor))
        o, o_hp, lse, m_ref, l = output
        ctx.save_for_backward(q, k, v, *(a for a in seq_args if isinstance(a, Tensor)), o, o_hp, lse, m_ref, l, sinks)
        ctx.mark_non_differentiable(o_hp, lse, m_ref, l)

    def backward(ctx, do, do_hp, dlse, dm, dl):
        q, k, v, *seq_tensors, o, o_hp, lse, m_ref, l, sinks = ctx.saved_tensors
        dq, dk, dv, dsinks = bwd_op(do, q, k, v, *seq_tensors, *ctx.seq_ints, o, o_hp, lse, m_ref, l, ctx.options, sinks)
        return (dq, dk, dv) + (None,) * (num_seq_args + 2) + ((dsinks if sinks is not None else None),)

    torch.library.register_autograd(f"{_LIB}::{fwd}", backward, setup_context=setup_context)


_register_attention_autograd("attention_fwd", "attention_bwd", 0)
_register_attention_autograd("attention_varlen_fwd", "attention_varlen_bwd", 5)


def attention(q: Tensor, k: Tensor, v: Tensor, cfg, sinks: Optional[Tensor] = None, seqs=None) -> Tuple[Tensor, Tensor]:
    """Runs the forward op; O' is computed only when autograd will call the backward. ``sinks``:
    None or the float32 ``[Hq]`` sink logits (numerics 9.10), differentiable. ``seqs``: None
    (dense ``[B, H, N, D]`` tensors) or packed sequences' ``(cu_seqlens_q, cu_seqlens_k,
    seqused_k, max_seqlen_q, max_seqlen_k)`` (q ``[total_q, Hq, D]``, k, v ``[total_k, Hkv, D]``; the LSE
    is ``[Hq, total_q]``).

    In the quantized modes, when a backward will follow, Q, K, V are fake-quantized here first
    (the straight-through fake_quantize_qkv op, memory from torch's caching allocator, with the
    second-level scales of ``cfg.qkv_scale``), so the forward and the backward share the quantized
    copies; the drop-in backward (bwd_quantized_qkv off) needs the raw inputs instead, and then the
    core quantizes them itself (with a qkv_scale: on x / g, see :func:`_attention_rescaled`).
    Without a backward (inference, ``torch.no_grad``) and without a qkv_scale, the raw inputs go
    to the attention op and the core quantizes them into temporaries with the same quantizer: the
    same numbers, one op dispatch instead of two (the host time of an eager call).
    """
    for name, t in (("k", k), ("v", v)):
        if t.device != q.device:
            raise ValueError(f"{name}: expected a tensor on {q.device} (the device of q), got one on {t.device}")
    if cfg.check_finite:
        from .attention import first_non_finite

        for name, t in (("q", q), ("k", k), ("v", v)):
            first_non_finite(name, t)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    wants_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad or
                                              (sinks is not None and sinks.requires_grad))
    need_o_hp = wants_grad and cfg.needs_o_hp
    quantized_mode = cfg.mode != "bf16"
    raw_backward = wants_grad and not cfg.bwd_quantized_qkv
    scale = cfg.qkv_scale if quantized_mode else None
    quantizable = _quantizable(q, k, v, cfg, seqs)
    if scale is not None and (raw_backward or not quantizable):
        return _attention_rescaled(q, k, v, cfg, scale, sinks, seqs)
    prequantize = quantized_mode and not raw_backward and quantizable and (wants_grad or scale is not None)
    if prequantize:
        v_axis = "token" if cfg.v_blocks == "token" else "last"
        compute = scale == "amax"
        g_q, g_k, g_v = (1.0, 1.0, 1.0) if scale is None or compute else scale
        q, k, v = torch.ops.attnqat.fake_quantize_qkv(q, k, v, v_axis, g_q, g_k, g_v, compute)
    options = cfg.op_options(prequantize)
    if seqs is None:
        o, _, lse, _, _ = torch.ops.attnqat.attention_fwd(q, k, v, options, need_o_hp, sinks)
    else:
        o, _, lse, _, _ = torch.ops.attnqat.attention_varlen_fwd(q, k, v, *seqs, options, need_o_hp, sinks)
    return o, lse


def _attention_rescaled(q: Tensor, k: Tensor, v: Tensor, cfg, scale, sinks, seqs=None) -> Tuple[Tensor, Tensor]:
    """Attention with second-level scales g where Q, K, V cannot be quantized up front: on
    (q / g_q, k / g_k, v / g_v) with the softmax scale times g_q * g_k, O times g_v. Powers of two
    commute with every rounding, so this is the result of quantizing with g; autograd sees the
    raw inputs (what the drop-in backward reads)."""
    from .attention import nvfp4_global_scale, rescaled_config

    if scale == "amax":  # host values (a synchronization): the softmax scale is a float argument
        scale = tuple(nvfp4_global_scale(float(t.detach().abs().amax())) if t.numel() and
                      bool(torch.isfinite(t).all()) else 1.0 for t in (q, k, v))
    inner = rescaled_config(cfg, q.shape[-1], scale)
    o, lse = attention(q / scale[0], k / scale[1], v / scale[2], inner, sinks, seqs)
    return o * scale[2], lse


def _quantizable(q: Tensor, k: Tensor, v: Tensor, cfg, seqs) -> bool:
    """Inputs the quantizers accept (otherwise the attention op reports the error itself): dense
    [B, H, N, D] or packed [total, H, D] tensors; packed sequences never take token V blocks (the
    core refuses them with its message)."""
    rank = 4 if seqs is None else 3
    ok = lambda t: t.dim() == rank and t.shape[-1] % 16 == 0 and t.shape[-1] > 0 and t.dtype in (
        torch.float32, torch.float16, torch.bfloat16)
    return (all(ok(t) for t in (q, k, v)) and k.dtype == q.dtype and v.dtype == q.dtype
            and (seqs is None or cfg.v_blocks != "token"))
