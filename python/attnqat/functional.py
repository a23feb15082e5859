"""attnqat.sdpa (a drop-in for torch.nn.functional.scaled_dot_product_attention) and
attnqat.merge_attention (combining partial results over disjoint key sets: context parallelism).

The kernels compute one dense attention per call: no mask other than a bottom-right aligned
causal one (query ``i`` sees keys ``j <= i + Nk - Nq``), no variable sequence lengths. Everything
sdpa accepts beyond that is mapped *exactly* onto such calls, or rejected with an error:

- ``is_causal=True`` is torch's top-left aligned mask (query ``i`` sees keys ``j <= i``) for any
  ``Nq``, ``Nk``: the keys ``j >= Nq`` are invisible to every query and are dropped; when
  ``Nq > Nk`` the rows ``i >= Nk`` see every key and run as a second, non-causal call.
- A boolean ``attn_mask`` is accepted when, for every batch element, it is a contiguous range of
  visible keys ``[s_b, e_b)`` (left and/or right padding) intersected with a causal limit
  ``j <= i + delta_b`` (any alignment) or with nothing. Such a mask is verified exactly (one
  host synchronization) and each group of batch elements with the same ``(s_b, e_b, delta_b)``
  runs as at most two calls on the visible keys only (so, in the FP4 modes, a padded sequence
  is quantized exactly as the same sequence without padding: P blocks start at its first key).
  The commonest such mask, keys ``[0, e_b)`` without a causal limit (a text encoder's padding in
  cross-attention), runs as one packed-sequence call whatever the lengths (attention_varlen with
  ``seqused_k = e_b``), with the same numbers. Any other boolean mask raises.
- A float ``attn_mask`` (an additive bias), ``dropout_p > 0`` and a per-head mask raise.
"""

from __future__ import annotations

import math
import numbers
import weakref
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from ._config import resolve_options
from .attention import _is_bool, attention, attention_varlen, check_bool, check_softmax_scale, first_non_finite

# A plan: for each group of batch elements with the same mask structure, the calls to make.
# (batch indices or None for all, key start, key end, causal rows r: rows [0, r) bottom-right
# causal over keys [s, e), rows [r, Nq) non-causal over them). s == e: no visible key.


def _unsupported_mask(detail: str) -> ValueError:
    return ValueError(
        f"attnqat.sdpa: attn_mask: {detail}. The attnqat kernels support a causal mask and per-sequence "
        "key ranges (left/right padding) only; for other masks use "
        "torch.nn.functional.scaled_dot_product_attention (or flex_attention) in BF16, or pass "
        "is_causal=True / a padding mask of that form"
    )


def _autocast(q: Tensor, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Like torch's SDPA, attention runs in the autocast dtype inside an autocast region."""
    dev = q.device.type
    if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev):
        dtype = torch.get_autocast_dtype(dev)
        q, k, v = (t.to(dtype) if t.is_floating_point() else t for t in (q, k, v))
    return q, k, v


# The last analysed mask: transformers (and diffusers) pass the same mask tensor to every layer,
# so a model forward verifies it (and synchronizes) once, not once per layer. Keyed on the tensor
# whose memory it is (weak reference: a view made per call, as diffusers' [B, Nk] masks get, is
# recognised by its base), the view's geometry and the version counter, which in-place writes
# bump (shared by a base and its views).
_LAST_MASK = (None, None, None, None)


def _mask_structure(mask: Tensor, b: int, hq: int, nq: int, nk: int):
    """Per batch element (s, e, delta) of a boolean mask, verified exactly; delta None = no causal
    limit. Returns a list of B tuples (one host synchronization, none for the mask analysed last)."""
    global _LAST_MASK
    try:
        current = mask._version
    except RuntimeError:  # inference-mode tensors have no version counter: no reuse
        return _analyse_mask(mask, b, hq, nq, nk)
    base = mask if mask._base is None else mask._base
    key = (current, tuple(mask.shape), mask.stride(), mask.storage_offset(), (b, hq, nq, nk))
    ref, cached_key, _, structures = _LAST_MASK
    if ref is not None and ref() is base and cached_key == key:
        return structures
    structures = _analyse_mask(mask, b, hq, nq, nk)
    _LAST_MASK = (weakref.ref(base), key, None, structures)
    return structures


def _analyse_mask(mask: Tensor, b: int, hq: int, nq: int, nk: int):
    if mask.dim() > 4:
        raise _unsupported_mask(f"expected at most 4 dimensions, got shape {list(mask.shape)}")
    m = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    try:
        torch.broadcast_shapes(m.shape, (b, hq, nq, nk))
    except RuntimeError:
        raise ValueError(f"attnqat.sdpa: attn_mask: shape {list(mask.shape)} does not broadcast to "
                         f"[batch, heads, Nq, Nk] = {[b, hq, nq, nk]}") from None
    if m.shape[1] != 1:
        if not bool((m == m[:, :1]).all()):
            raise _unsupported_mask("it differs between heads (per-head masks are not supported)")
        m = m[:, :1]
    m = m[:, 0].expand(m.shape[0], nq, nk)  # [Bm, Nq, Nk], Bm in {1, B}
    if nq == 0 or nk == 0:
        return [(0, nk, None)] * b
    keys = torch.arange(nk, device=m.device)
    rows = torch.arange(nq, device=m.device)
    any_key = m.any(1)  # [Bm, Nk]
    has_key = any_key.any(-1)
    s = torch.where(has_key, any_key.int().argmax(-1), 0)
    e = torch.where(has_key, nk - any_key.flip(-1).int().argmax(-1), 0)
    count = m.sum(-1)  # [Bm, Nq] visible keys per row
    i0 = (count > 0).int().argmax(-1)  # first row that sees a key
    c0 = count.gather(1, i0[:, None])[:, 0]
    delta = s + c0 - 1 - i0  # that row sees [s, s + c0): its causal limit is i0 + delta
    expected = ((keys >= s[:, None]) & (keys < e[:, None]))[:, None, :] & (
        keys[None, None, :] <= rows[None, :, None] + delta[:, None, None])
    if not torch.equal(expected, m):
        raise _unsupported_mask("it is not a per-sequence key range (padding) combined with a causal mask")
    out = []
    for s_b, e_b, d_b in zip(s.tolist(), e.tolist(), delta.tolist()):
        out.append((s_b, e_b, None if d_b >= e_b - 1 else d_b))  # row 0 sees every key: no causal limit
    return out * b if len(out) == 1 else out


def _segment(nq: int, s: int, e: int, delta: Optional[int]) -> Tuple[int, int, int]:
    """(s, e, r) of one mask structure: rows [0, r) causal over keys [s, e), rows [r, nq) full."""
    if delta is None:
        return s, e, 0
    e = min(e, nq + delta)  # keys after the last row's causal limit are seen by no row
    if e <= s:
        return s, s, 0
    return s, e, min(max(e - delta, 0), nq)


def _run_segment(q, k, v, s, e, r, opts, softmax_scale):
    """Attention of q (all rows) over keys [s, e): rows [0, r) bottom-right causal, the rest not."""
    nq = q.shape[2]
    if e <= s:  # no visible key: O = 0, LSE = -inf (numerics section 3)
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            # Through attention on no key: a grad_fn and zero gradients, as torch's SDPA gives.
            return attention(q, k[:, :, s:s], v[:, :, s:s], causal=False, softmax_scale=softmax_scale,
                             return_lse=True, **opts)
        o = q.new_zeros(q.shape[:3] + (v.shape[-1],))
        lse = torch.full(q.shape[:3], -math.inf, dtype=torch.float32, device=q.device)
        return o, lse
    ks, vs = (k, v) if (s == 0 and e == k.shape[2]) else (k[:, :, s:e], v[:, :, s:e])
    parts = []
    if r > 0:
        parts.append(attention(q if r == nq else q[:, :, :r], ks, vs, causal=True, softmax_scale=softmax_scale,
                               return_lse=True, **opts))
    if r < nq or not parts:  # (nq == 0: one call on the empty rows, for the shapes and the grad_fn)
        parts.append(attention(q if r == 0 else q[:, :, r:], ks, vs, causal=False, softmax_scale=softmax_scale,
                               return_lse=True, **opts))
    if len(parts) == 1:
        return parts[0]
    return torch.cat([p[0] for p in parts], 2), torch.cat([p[1] for p in parts], 2)


# Offsets and used lengths of _padded_keys_attention, on the device (a few recent shapes: made once,
# not copied to the device at every call of every layer).
_PADDING_INDEX = {}


def _padding_index(b: int, nq: int, nk: int, ends: Tuple[int, ...], device: torch.device):
    """cu_seqlens_q, cu_seqlens_k, seqused_k and the [B, 1, Nk, 1] mask of the padding keys."""
    key = (b, nq, nk, ends, device)
    if key not in _PADDING_INDEX:
        if len(_PADDING_INDEX) >= 8:
            _PADDING_INDEX.pop(next(iter(_PADDING_INDEX)))
        steps = torch.arange(b + 1, dtype=torch.int32)
        used = torch.tensor(ends, dtype=torch.int32)
        padding = (torch.arange(nk)[None, :] >= used[:, None].long())[:, None, :, None]
        _PADDING_INDEX[key] = tuple(t.to(device) for t in (steps * nq, steps * nk, used, padding))
    return _PADDING_INDEX[key]


def _padded_keys_attention(q, k, v, ends, opts, softmax_scale):
    """Non-causal attention in which batch element b sees its first ends[b] keys, as one packed-
    sequence call: [B, H, N, D] as [B * N, H, D] rows (a view when the memory is [B, N, H, D], as
    diffusers' is), cu_seqlens 0, N, 2 N, ... and seqused_k = ends. Each element's result is that of
    attention on its own visible keys, as the grouped calls give (attnqat.h)."""
    b, hq, nq, d = q.shape
    nk = k.shape[2]
    cu_q, cu_k, used, padding = _padding_index(b, nq, nk, tuple(ends), q.device)
    # The CUDA kernels read the padding rows of the key tile that crosses a sequence's end (with
    # probability 0, numerics 9.7): zeros there keep a NaN or Inf in masked keys from reaching
    # any output, as the mask promises. (K, V are small next to the attention: text keys.)
    k, v = k.masked_fill(padding, 0), v.masked_fill(padding, 0)
    rows = lambda t: t.transpose(1, 2).reshape(t.shape[0] * t.shape[2], t.shape[1], t.shape[3])
    o, lse = attention_varlen(rows(q), rows(k), rows(v), cu_q, cu_k, nq, nk, causal=False, softmax_scale=softmax_scale,
                              return_lse=True, seqused_k=used, **opts)
    return o.view(b, nq, hq, d).transpose(1, 2), lse.view(hq, b, nq).permute(1, 0, 2)


def _dense_attention(q, k, v, structures, opts, softmax_scale):
    """Runs attention for per-batch (s, e, delta) structures: one packed-sequence call when every
    element sees a prefix of the keys without a causal limit (and the options allow packing: no
    token V blocks, no per-call amax scale), else grouping equal structures."""
    b, nq = q.shape[0], q.shape[2]
    segs = [_segment(nq, *st) for st in structures]
    if (all(s == 0 and r == 0 for s, _, r in segs) and opts.get("v_blocks") != "token"
            and opts.get("qkv_scale") is None):
        return _padded_keys_attention(q, k, v, [e for _, e, _ in segs], opts, softmax_scale)
    groups = {}
    for i, seg in enumerate(segs):
        groups.setdefault(seg, []).append(i)
    if len(groups) == 1:
        (s, e, r), = groups
        return _run_segment(q, k, v, s, e, r, opts, softmax_scale)
    outs, lses, order = [], [], []
    for (s, e, r), idx in groups.items():
        sel = torch.tensor(idx, device=q.device)
        o, lse = _run_segment(q.index_select(0, sel), k.index_select(0, sel), v.index_select(0, sel),
                              s, e, r, opts, softmax_scale)
        outs.append(o)
        lses.append(lse)
        order.extend(idx)
    inverse = torch.empty(b, dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(b)
    inverse = inverse.to(q.device)
    return torch.cat(outs).index_select(0, inverse), torch.cat(lses).index_select(0, inverse)


def sdpa(
    query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
    is_causal: bool = False, scale: Optional[float] = None, enable_gqa: bool = False, *,
    mode: Optional[str] = None, p_quant: Optional[str] = None, v_blocks: Optional[str] = None,
    kv_tile: Optional[int] = None, bwd_quantized_qkv: Optional[bool] = None, bwd_quant_p: Optional[bool] = None,
    bwd_high_precision_o: Optional[bool] = None, precision: Optional[str] = None,
    deterministic: Optional[bool] = None, qkv_scale=None, check_finite: Optional[bool] = None,
    causal_alignment: str = "top_left",
) -> Tensor:
    """``torch.nn.functional.scaled_dot_product_attention`` with attnqat's FP4 attention.

    Same positional signature and semantics as torch's SDPA on ``[B, H, N, D]`` tensors; what it
    cannot honour raises ``ValueError`` naming the alternative (never a silent fallback).

    Args:
        query: ``[B, Hq, Nq, D]``; key, value: ``[B, Hkv, Nk, D]`` (``D`` a multiple of 16).
        attn_mask: ``None`` or a boolean mask broadcastable to ``[B, Hq, Nq, Nk]`` (True = take
            part in attention) that is, per batch element, a contiguous range of visible keys
            (left/right padding) optionally combined with a causal limit; verified exactly (a host
            synchronization, so not inside CUDA-graph capture or ``torch.compile(fullgraph=True)``).
            Float (additive) masks, per-head masks and other patterns raise.
        dropout_p: must be 0 (attnqat has no attention dropout).
        is_causal: causal mask, aligned as ``causal_alignment`` says; not together with
            ``attn_mask`` (as in torch). A bool (``TypeError`` otherwise, as in torch).
        scale: softmax scale, a positive finite number; default ``1/sqrt(D)``.
        enable_gqa: must be True when ``Hq != Hkv`` (as in torch); GQA runs natively, without
            repeating K and V.
        mode, p_quant, v_blocks, kv_tile, bwd_quantized_qkv, bwd_quant_p, bwd_high_precision_o,
            precision, deterministic, qkv_scale, check_finite: attnqat's options (see
            :func:`attnqat.attention`); ``None`` takes the value of the enclosing
            :func:`attnqat.config` (default mode ``attn_qat``). ``check_finite`` names
            ``query``, ``key`` or ``value`` and the index of the first NaN/Inf (a device
            synchronization); ``qkv_scale="amax"`` is computed per attention call (with a padding
            mask: per group of sequences with the same padding).
        causal_alignment: ``"top_left"`` (torch's SDPA: query ``i`` sees keys ``j <= i``) or
            ``"bottom_right"`` (attnqat's and FlashAttention's: ``j <= i + Nk - Nq``, what decoding
            with a KV cache needs). They differ only when ``Nq != Nk``.

    Returns:
        The attention output ``[B, Hq, Nq, D]`` in the dtype of ``query`` (the autocast dtype
        inside an autocast region, like torch's SDPA).
    """
    opts = resolve_options(dict(mode=mode, p_quant=p_quant, v_blocks=v_blocks, kv_tile=kv_tile,
                                bwd_quantized_qkv=bwd_quantized_qkv, bwd_quant_p=bwd_quant_p,
                                bwd_high_precision_o=bwd_high_precision_o, precision=precision,
                                deterministic=deterministic, qkv_scale=qkv_scale, check_finite=check_finite))
    o, _ = _sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, opts, causal_alignment)
    return o


def _sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, opts, causal_alignment):
    """sdpa with resolved options; returns (O, LSE)."""
    is_causal = check_bool("is_causal", is_causal)
    enable_gqa = check_bool("enable_gqa", enable_gqa)
    scale = check_softmax_scale("scale", scale) or None
    if _is_bool(dropout_p) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"attnqat.sdpa: dropout_p: expected a float (0.0), got {type(dropout_p).__name__} {dropout_p!r}")
    if dropout_p != 0.0:
        raise ValueError(
            f"attnqat.sdpa: dropout_p={dropout_p}: attnqat has no attention dropout; pass dropout_p=0.0 "
            "(for Hugging Face models set config.attention_dropout = 0.0) or use "
            "torch.nn.functional.scaled_dot_product_attention in BF16"
        )
    if causal_alignment not in ("top_left", "bottom_right"):
        raise ValueError(f"causal_alignment: expected 'top_left' or 'bottom_right', got {causal_alignment!r}")
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"attnqat.sdpa: {name}: expected a torch.Tensor, got {type(t).__name__} "
                            "(attnqat.attention takes numpy arrays)")
        if t.dim() != 4:
            raise ValueError(f"attnqat.sdpa: {name}: expected a 4-D tensor [batch, heads, seq, head_dim], "
                             f"got {list(t.shape)}")
    opts = dict(opts)
    if opts.pop("check_finite", False):
        for name, t in (("query", query), ("key", key), ("value", value)):
            first_non_finite(name, t)
    b, hq, nq, _ = query.shape
    hkv, nk = key.shape[1], key.shape[2]
    if hq != hkv and not enable_gqa:
        raise ValueError(
            f"attnqat.sdpa: query has {hq} heads and key/value {hkv}: pass enable_gqa=True for grouped-query "
            "attention (as torch.nn.functional.scaled_dot_product_attention requires)"
        )
    query, key, value = _autocast(query, key, value)
    if attn_mask is not None:
        if is_causal:
            raise ValueError("attnqat.sdpa: pass either attn_mask or is_causal=True, not both "
                             "(torch's SDPA rejects the combination too)")
        if not isinstance(attn_mask, torch.Tensor):
            raise TypeError(f"attnqat.sdpa: attn_mask: expected None or a boolean torch.Tensor, got "
                            f"{type(attn_mask).__name__}")
        if attn_mask.dtype != torch.bool:
            raise ValueError(
                f"attnqat.sdpa: attn_mask: a {attn_mask.dtype} mask is an additive bias, which attnqat cannot "
                "apply; if it only encodes visibility pass a boolean mask (attn_mask == 0), otherwise use "
                "torch.nn.functional.scaled_dot_product_attention in BF16"
            )
        if attn_mask.device != query.device:
            raise ValueError(f"attnqat.sdpa: attn_mask: expected a tensor on {query.device}, got one on {attn_mask.device}")
        structures = _mask_structure(attn_mask, b, hq, nq, nk)
    elif is_causal:
        delta = 0 if causal_alignment == "top_left" else nk - nq
        structures = [(0, nk, delta if delta < nk - 1 else None)]
    else:
        structures = [(0, nk, None)]
    if len(set(structures)) == 1:
        s, e, r = _segment(nq, *structures[0])
        return _run_segment(query, key, value, s, e, r, opts, scale)
    return _dense_attention(query, key, value, structures, opts, scale)


def merge_attention(outputs: Sequence[Tensor], lses: Sequence[Tensor]) -> Tuple[Tensor, Tensor]:
    """Combines attention results over disjoint key sets into the result over their union.

    For context-parallel (ring) attention: each ``(outputs[i], lses[i])`` is
    ``attnqat.attention(q, k_i, v_i, ..., return_lse=True)`` for the same queries and a disjoint
    chunk of keys ``k_i, v_i``. The merge is the exact log-sum-exp combination
    ``LSE = log(sum_i exp(LSE_i))``, ``O = sum_i exp(LSE_i - LSE) O_i`` in fp32 (chunks whose
    LSE is ``-inf`` — no visible key — contribute nothing; a row that sees no key in any chunk
    gives O = 0, LSE = -inf, as a single call does).

    What matches a single call over all keys: mode ``bf16`` exactly up to fp32 rounding. In the
    FP4 modes Q, K and V (channel blocks) quantize per token, identically; P is quantized per call:
    with ``p_quant="anchored"`` and chunks whose boundaries are multiples of 16 keys the quantized P
    blocks are the single call's up to fp32 rounding (the anchored P does not depend on which other
    keys a call sees, numerics section 4) except blocks far below the row maximum; with
    ``p_quant="paper"`` the quantized P depends on the running maximum of each call, so the merged
    result differs from a single call by FP4-level noise; ``v_blocks="token"`` blocks restart at
    each chunk.

    Forward only: attnqat's LSE carries no gradient, so the merged output's gradient with respect to
    q and k would be wrong; calling it with grad enabled on outputs that require grad raises.

    Args:
        outputs: sequence of ``[B, H, Nq, D]`` tensors (any float dtype).
        lses: sequence of ``[B, H, Nq]`` float32 log-sum-exps (natural log).

    Returns:
        ``(O, LSE)``: O in the dtype of ``outputs[0]``, LSE float32.
    """
    outputs, lses = list(outputs), list(lses)
    if not outputs or len(outputs) != len(lses):
        raise ValueError(f"merge_attention: expected as many outputs as lses (at least one), got {len(outputs)} and {len(lses)}")
    if torch.is_grad_enabled() and any(o.requires_grad for o in outputs):
        raise NotImplementedError(
            "merge_attention is forward-only: the LSE of attnqat.attention carries no gradient, so the "
            "merged output's gradient with respect to q and k would be wrong; run it under torch.no_grad() "
            "(inference), or train with one attnqat.attention call over all keys"
        )
    shape = outputs[0].shape
    for i, (o, l) in enumerate(zip(outputs, lses)):
        if o.shape != shape or tuple(l.shape) != tuple(shape[:-1]):
            raise ValueError(f"merge_attention: outputs[{i}] {list(o.shape)} / lses[{i}] {list(l.shape)}: expected "
                             f"{list(shape)} and {list(shape[:-1])}")
    lse_all = torch.stack([l.float() for l in lses])  # [C, B, H, Nq]
    lse = torch.logsumexp(lse_all, 0)
    # A row is empty only when every chunk's LSE is -inf (weights 0, O = 0). A NaN LSE (a chunk
    # that saw a NaN or Inf input, docs/numerics.md 9.7) makes the merged LSE, weights and O NaN.
    empty = lse == float("-inf")
    w = torch.where(empty, 0.0, torch.exp(lse_all - torch.where(empty, 0.0, lse)))  # [C, B, H, Nq]
    o = sum(w[i, ..., None] * outputs[i].float() for i in range(len(outputs)))
    return o.to(outputs[0].dtype), lse
