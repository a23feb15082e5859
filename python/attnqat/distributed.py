"""attnqat.distributed: sequence parallelism for attnqat attention (DeepSpeed-Ulysses style).

Each rank of a process group holds a contiguous shard of the sequence of Q, K and V. One
all-to-all turns the shards into the full sequence for ``H / P`` of the heads (``P`` ranks), attnqat
attention runs on them, and a second all-to-all turns the output back into sequence shards. The
backward runs the same two all-to-alls in reverse. Attention of one head never needs another
head, so every rank computes, for its heads, exactly what a single call on the full sequence
computes: on the CPU reference the results and gradients are bitwise those of one
:func:`attnqat.attention` call (see ``docs/distributed.md``).

Only ``torch.distributed`` collectives move data (``all_to_all_single``, and a small
``all_reduce`` for the cross-rank checks), so any backend with all-to-all works: gloo (CPU tensors)
and NCCL (CUDA tensors).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from ._config import _check, resolve_options
from .attention import (attention, check_bool, check_option, check_softmax_scale, check_window, first_non_finite,
                        nvfp4_global_scale)
from .functional import _autocast

LAYOUTS = ("bhsd", "bshd")
_WHERE = "attnqat.distributed.ulysses_attention"
_SEQ_TO_HEADS, _HEADS_TO_SEQ = "seq_to_heads", "heads_to_seq"


# ---- The all-to-all and its packing --------------------------------------------------------------
#
# On the wire every tensor travels as [P, B, Hl, s, D]: slice p goes to (or came from) rank p; Hl
# is the number of heads per rank, s the shard length. Forward (seq -> heads): rank r sends head
# group p of its shard to rank p and receives the shard of every rank for its head group r, which
# it stacks in rank order (the sequence order) into [B, Hl, P * s, D]. The reverse exchange is the
# inverse permutation, hence also the backward of the forward one, and vice versa.


def _to_wire(t: Tensor, direction: str, layout: str, world: int) -> Tensor:
    """The [P, B, Hl, s, D] view of a tensor about to be exchanged (no copy)."""
    if direction == _SEQ_TO_HEADS:
        if layout == "bhsd":
            b, h, s, d = t.shape
            return t.reshape(b, world, h // world, s, d).transpose(0, 1)
        b, s, h, d = t.shape
        return t.reshape(b, s, world, h // world, d).permute(2, 0, 3, 1, 4)
    b, hl, n, d = t.shape  # the full sequence of this rank's heads, [B, Hl, S, D]
    return t.reshape(b, hl, world, n // world, d).permute(2, 0, 1, 3, 4)


def _from_wire(w: Tensor, direction: str, layout: str) -> Tensor:
    """The received [P, B, Hl, s, D] as the tensor the exchange produces (a contiguous copy)."""
    world, b, hl, s, d = w.shape
    if direction == _SEQ_TO_HEADS:  # [B, Hl, S, D], what attnqat.attention takes
        return w.permute(1, 2, 0, 3, 4).reshape(b, hl, world * s, d)
    if layout == "bhsd":
        return w.transpose(0, 1).reshape(b, world * hl, s, d)
    return w.permute(1, 3, 0, 2, 4).reshape(b, s, world * hl, d)


def _exchange(tensors: Sequence[Tensor], direction: str, layout: str, group) -> List[Tensor]:
    """One all_to_all_single for all `tensors` (same dtype and device): packed into one send
    buffer [P, sum of per-rank sizes], exchanged, and unpacked."""
    world = dist.get_world_size(group)
    wires = [_to_wire(t, direction, layout, world) for t in tensors]
    sizes = [w[0].numel() for w in wires]
    send = torch.empty((world, sum(sizes)), dtype=tensors[0].dtype, device=tensors[0].device)
    offset = 0
    for w, n in zip(wires, sizes):
        send[:, offset:offset + n].view(w.shape).copy_(w)
        offset += n
    if world == 1:
        recv = send
    else:
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=group)
    out, offset = [], 0
    for w, n in zip(wires, sizes):
        out.append(_from_wire(recv[:, offset:offset + n].view(w.shape), direction, layout))
        offset += n
    return out


class _AllToAll(torch.autograd.Function):
    """The exchange of :func:`_exchange`, differentiable: the backward is the reverse exchange of
    the incoming gradients (of the inputs that need one)."""

    @staticmethod
    def forward(ctx, direction: str, layout: str, group, *tensors: Tensor):
        ctx.direction, ctx.layout, ctx.group = direction, layout, group
        outputs = tuple(_exchange(tensors, direction, layout, group))
        ctx.output_shapes = [o.shape for o in outputs]
        ctx.dtype, ctx.device = outputs[0].dtype, outputs[0].device
        return outputs

    @staticmethod
    def backward(ctx, *grads: Optional[Tensor]):
        wanted = [i for i, need in enumerate(ctx.needs_input_grad[3:]) if need]
        reverse = _HEADS_TO_SEQ if ctx.direction == _SEQ_TO_HEADS else _SEQ_TO_HEADS
        # Every rank must send the same buffer layout: a gradient that autograd did not
        # materialize is sent as zeros.
        sent = [grads[i] if grads[i] is not None else
                torch.zeros(ctx.output_shapes[i], dtype=ctx.dtype, device=ctx.device) for i in wanted]
        result = [None] * len(ctx.output_shapes)
        for i, g in zip(wanted, _exchange(sent, reverse, ctx.layout, ctx.group) if sent else []):
            result[i] = g
        return (None, None, None, *result)


# ---- Checks ------------------------------------------------------------------------------------


def _group_size(group) -> Tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"{_WHERE}: torch.distributed is not initialized: call "
                           "torch.distributed.init_process_group first (e.g. under torchrun)")
    return dist.get_world_size(group), dist.get_rank(group)


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, layout: str, world: int) -> None:
    """Checks what the exchange needs (ValueError naming the argument); attention itself checks
    the rest (head dims, dtypes it takes) on the gathered tensors."""
    if layout not in LAYOUTS:
        raise ValueError(f"{_WHERE}: layout: expected 'bhsd' ([batch, heads, seq, head_dim], the layout of "
                         f"attnqat.attention) or 'bshd' ([batch, seq, heads, head_dim]), got {layout!r}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{_WHERE}: {name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{_WHERE}: {name}: expected a 4-D tensor [{', '.join(_dims(layout))}], "
                             f"got shape {list(t.shape)}")
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{_WHERE}: {name}: expected the dtype and device of q ({q.dtype} on {q.device}), "
                             f"got {t.dtype} on {t.device}")
    head_axis, seq_axis = (1, 2) if layout == "bhsd" else (2, 1)
    hq, hkv = q.shape[head_axis], k.shape[head_axis]
    if v.shape[head_axis] != hkv or v.shape[seq_axis] != k.shape[seq_axis] or v.shape[0] != k.shape[0]:
        raise ValueError(f"{_WHERE}: v: expected the batch, heads and sequence shard of k "
                         f"({layout} {list(k.shape)}), got {list(v.shape)}")
    for name, h in (("q", hq), ("k and v", hkv)):
        if h % world:
            hint = (" (GQA with fewer key/value heads than ranks: repeat the key/value heads up to a multiple of "
                    f"the world size first, e.g. k.repeat_interleave({world} // {h}, dim={head_axis}) when {h} divides "
                    f"{world}, or use fewer ranks)" if name != "q" and h < world else "")
            raise ValueError(f"{_WHERE}: {name} have {h} heads, not a multiple of the world size {world}: "
                             f"each rank attends over H / {world} heads{hint}")


def _describe(t) -> str:
    return f"shape {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


def _dims(layout: str) -> List[str]:
    return ["batch", "heads", "seq_shard", "head_dim"] if layout == "bhsd" else ["batch", "seq_shard", "heads",
                                                                                 "head_dim"]


def _cross_rank_checks(q: Tensor, k: Tensor, v: Tensor, layout: str, group, rank: int, *, shapes: bool,
                       amax: bool, finite: bool):
    """One small all_reduce (MAX) for what needs every rank: that all ranks pass the same shapes
    (an all-to-all of unequal shards aborts, hangs or reads garbage), the amax of Q, K and V over
    the full tensors (qkv_scale="amax") and which rank holds a NaN/Inf (check_finite, and the
    "amax" rule). Raises on every rank; returns the global second-level scales when `amax`."""
    tensors = (q, k, v)
    dims = [float(n) for t in tensors for n in t.shape] if shapes else []
    scan = amax or finite
    bad = [t.numel() > 0 and not bool(torch.isfinite(t).all()) for t in tensors] if scan else []
    # MAX of -x is -(MIN of x): the shapes agree when both are equal. A holder is rank + 1 (0: none).
    fields = dims + [-n for n in dims]
    fields += [float(rank + 1) if b else 0.0 for b in bad]
    if amax:
        fields += [0.0 if b or t.numel() == 0 else float(t.detach().abs().amax()) for t, b in zip(tensors, bad)]
    stats = torch.tensor(fields, dtype=torch.float64, device=q.device)
    dist.all_reduce(stats, op=dist.ReduceOp.MAX, group=group)
    values = stats.tolist()
    n = len(dims)
    if values[:n] != [-x for x in values[n:2 * n]]:
        raise ValueError(f"{_WHERE}: the ranks pass different shapes (this rank: q {list(q.shape)}, k "
                         f"{list(k.shape)}, v {list(v.shape)}, layout {layout!r}): every rank must hold an equal "
                         "shard of the same batch, so the sequence length must be divisible by the world size")
    holders = [int(x) - 1 for x in values[2 * n:2 * n + len(bad)]]  # -1: no rank
    if finite:
        for name, t, holder in zip("qkv", tensors, holders):
            if holder == rank:
                first_non_finite(f"{name} (the shard of rank {rank})", t)
            if holder >= 0:
                raise ValueError(f"{name} contains NaN or Inf in the shard of rank {holder} (check_finite=True; leave "
                                 "it off to get the NaN propagation of docs/numerics.md instead of an error)")
    if not amax:
        return None
    # The rule of a single call (numerics section 9.2): g from the amax of the whole tensor, 1 when
    # it holds a NaN or Inf.
    amaxes = values[2 * n + len(bad):]
    return tuple(1.0 if holder >= 0 else nvfp4_global_scale(a) for a, holder in zip(amaxes, holders))


# ---- The public entry points -------------------------------------------------------------------


def ulysses_attention(
    q: Tensor, k: Tensor, v: Tensor, *, group=None, causal: bool = False, softmax_scale: Optional[float] = None,
    window=None, softcap: float = 0.0, sinks: Optional[Tensor] = None, layout: str = "bhsd",
    check_shapes: bool = True, **options,
) -> Tensor:
    """Sequence-parallel attnqat attention (DeepSpeed-Ulysses): each rank passes its shard of the
    sequence and gets the output for that shard.

    Call it on every rank of ``group`` with the same shapes and options. Rank ``r`` of ``P`` holds
    the positions ``[r * s, (r + 1) * s)`` of the full sequence ``S = P * s`` (a contiguous shard,
    in rank order). Two all-to-alls forward (Q, K, V together, then O) and two backward.

    Args:
        q: this rank's query shard, ``[B, Hq, s, D]`` (layout ``"bhsd"``, the default: the layout of
            :func:`attnqat.attention` and :func:`attnqat.sdpa`) or ``[B, s, Hq, D]`` (``"bshd"``).
        k, v: key and value shards in the same layout, ``Hkv`` heads (GQA/MQA when ``Hkv < Hq``),
            the same shard length ``s``; the dtype and device of ``q``. ``Hq`` and ``Hkv`` must be
            multiples of the world size ``P`` (``ValueError`` otherwise; for ``Hkv < P`` repeat the
            key/value heads first).
        group: the process group (default: the world). gloo for CPU tensors, NCCL for CUDA.
        causal: causal mask over the full sequence (``Nq == Nk``, so top-left and bottom-right
            alignments agree).
        softmax_scale: default ``1/sqrt(D)``.
        window, softcap: as in :func:`attnqat.attention`, over the full sequence.
        sinks: ``None`` or the attention sinks of all ``Hq`` heads (float32 ``[Hq]``, the same on
            every rank, e.g. a replicated parameter); each rank applies its heads' entries. Its
            gradient on a rank holds that rank's heads (zeros elsewhere): like the gradients of
            the projection weights under sequence parallelism, the sum over the group is the
            gradient of the whole sequence.
        layout: ``"bhsd"`` or ``"bshd"`` (input and output).
        check_shapes: verify with one small all-reduce that every rank passes the same shapes
            (unequal shards make the all-to-all abort, hang or return garbage). A host
            synchronization per call; pass False once the shapes are known to agree.
        **options: attnqat's options (``mode``, ``p_quant``, ``v_blocks``, ``kv_tile``, ``bwd_*``,
            ``precision``, ``deterministic``, ``qkv_scale``, ``check_finite``); those not given come
            from the enclosing :func:`attnqat.config`, as in :func:`attnqat.sdpa`.
            ``qkv_scale="amax"`` takes the amax of the whole tensors (an all-reduce over the ranks
            and a host synchronization), so the scales are those of a single call;
            ``check_finite=True`` raises on every rank when any rank holds a NaN/Inf.

    Returns:
        This rank's output shard, the shape of ``q``, in the dtype of ``q`` (the autocast dtype
        inside an autocast region, like :func:`attnqat.sdpa`). Differentiable except in mode
        ``fp4``.
    """
    world, rank = _group_size(group)
    causal = check_bool("causal", causal)
    softmax_scale = check_softmax_scale("softmax_scale", softmax_scale)
    check_window("window", window)
    check_option("softcap", softcap)
    check_shapes = check_bool("check_shapes", check_shapes)
    opts = resolve_options(_check(options, _WHERE))
    _check_inputs(q, k, v, layout, world)
    if sinks is not None:
        hq = q.shape[1 if layout == "bhsd" else 2]
        if not isinstance(sinks, torch.Tensor) or sinks.shape != (hq,):
            raise ValueError(f"{_WHERE}: sinks: expected None or a [Hq] = [{hq}] tensor (the sinks of all heads, the "
                             f"same on every rank), got {_describe(sinks)}")
    q, k, v = _autocast(q, k, v)  # like sdpa: in the autocast dtype (before the exchange: fewer bytes)
    amax = opts["mode"] != "bf16" and opts["qkv_scale"] == "amax"
    finite = opts["check_finite"]
    if (check_shapes and world > 1) or amax or finite:
        scales = _cross_rank_checks(q, k, v, layout, group, rank, shapes=check_shapes and world > 1, amax=amax,
                                    finite=finite)
        opts["check_finite"] = False
        if amax:
            opts["qkv_scale"] = scales
    qh, kh, vh = _AllToAll.apply(_SEQ_TO_HEADS, layout, group, q, k, v)
    if sinks is not None:
        local_heads = qh.shape[1]
        sinks = sinks[rank * local_heads:(rank + 1) * local_heads]  # autograd: zeros for the other heads
    o = attention(qh, kh, vh, causal=causal, softmax_scale=softmax_scale, window=window, softcap=softcap, sinks=sinks,
                  **opts)
    (out,) = _AllToAll.apply(_HEADS_TO_SEQ, layout, group, o)
    return out


class UlyssesAttention(torch.nn.Module):
    """:func:`ulysses_attention` as a module (the sequence-parallel twin of
    :class:`attnqat.nn.FP4Attention`): ``forward(q, k, v)`` takes this rank's shards and returns
    its output shard.

    Args:
        group: the process group (default: the world).
        is_causal: causal mask over the full sequence.
        scale: softmax scale (default ``1/sqrt(D)``).
        layout: ``"bhsd"`` (default) or ``"bshd"``.
        check_shapes: see :func:`ulysses_attention`.
        **options: attnqat options, checked here; those not given come from the enclosing
            :func:`attnqat.config` at call time.
    """

    def __init__(self, group=None, is_causal: bool = False, scale: Optional[float] = None, layout: str = "bhsd",
                 check_shapes: bool = True, **options):
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"attnqat.distributed.UlyssesAttention: layout: expected 'bhsd' or 'bshd', got {layout!r}")
        self.group = group
        self.is_causal = check_bool("is_causal", is_causal)
        self.scale = check_softmax_scale("scale", scale)
        self.layout = layout
        self.check_shapes = check_bool("check_shapes", check_shapes)
        self.options = _check(dict(options), "attnqat.distributed.UlyssesAttention")

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return ulysses_attention(q, k, v, group=self.group, causal=self.is_causal, softmax_scale=self.scale,
                                 layout=self.layout, check_shapes=self.check_shapes, **self.options)

    def extra_repr(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return f"is_causal={self.is_causal}, layout={self.layout!r}{opts}"
