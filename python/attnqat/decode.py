"""FP4 inference: attention from packed NVFP4 tensors, and a paged FP4 KV cache with decode.

Everything here reproduces mode ``fp4`` of :func:`attnqat.attention` (``docs/numerics.md``
sections 3-4) on the same quantized operands:

- :func:`attention_packed` — attention from :class:`~attnqat.QuantizedTensor` Q, K, V (packed
  codes + E4M3 scales, as :func:`~attnqat.quantize_nvfp4` produces them), decoded exactly inside
  the call: the result equals ``attention(q_hat, k_hat, v_hat, mode="fp4")`` on the decoded values.
- :class:`FP4KVCache` — pages of ``page_size`` tokens (a multiple of 16); K and V stored as packed
  NVFP4 with channel blocks (g = 1, 4.5 bits per element), so appending never re-quantizes older
  tokens; per-sequence page lists; :meth:`FP4KVCache.append` quantizes new tokens straight into
  their pages and :meth:`FP4KVCache.attend` runs decode attention (1 to a few query tokens per
  sequence, causal among themselves, GQA, split-KV on the GPU) for a batch of sequences of any
  lengths.
- :func:`kv_cache_append`, :func:`decode_attention` — the same two operations on explicit page
  tables (int32 ``[B, max_pages]``) and lengths (int32 ``[B]``), for engines that manage pages
  themselves.

Sliding windows (``window_left``, as Mistral's or Gemma 2's local layers): query i of sequence b
also needs ``j >= seq_lens[b] - nq + i - window_left``, the dense mask of
:func:`attnqat.attention` with ``window=(window_left, 0)``; the GPU kernel visits only the keys
inside the window (the pages before it are never read).

``p_quant="anchored"`` (the default here) makes the quantized P independent of where the keys
are split, so the GPU kernel splits long contexts across many CTAs; ``"paper"`` runs one pass in
128-key tiles (the reference's ``kv_tile``), slower for long contexts at small batch.
"""

from __future__ import annotations

import math
import numbers
from typing import Dict, List, Optional, Sequence, Tuple

from . import _C
from ._util import is_torch_tensor
from .attention import check_bool, check_int, check_softmax_scale, core_options, resolve_config
from .formats import QuantizedTensor, quantize_nvfp4

_NV_BLOCK = 16
# Head dims the attention paths take (src/common/validate.cpp, src/cuda/decode): the CPU reference
# any multiple of 16 up to 256, the CUDA decode kernel 64 and 128.
CPU_MAX_HEAD_DIM = 256
CUDA_HEAD_DIMS = (64, 128)


def _head_dim_error(head_dim, device_type: str) -> str:
    return (f"head_dim: expected a multiple of 16 up to {CPU_MAX_HEAD_DIM} on the CPU (the reference), or "
            f"{' or '.join(map(str, CUDA_HEAD_DIMS))} on CUDA (the decode kernel); got {head_dim} for a "
            f"{device_type} cache")


# ---- Attention from packed NVFP4 tensors ---------------------------------------------------------


def _stream_of(t) -> int:
    if is_torch_tensor(t) and t.is_cuda:
        import torch

        return torch.cuda.current_stream(t.device).cuda_stream
    return 0


def attention_packed(q: QuantizedTensor, k: QuantizedTensor, v: QuantizedTensor, *, causal: bool = False,
                     softmax_scale: Optional[float] = None, p_quant: str = "paper", dtype=None,
                     return_lse: bool = False, unpack: str = "auto"):
    """Mode-``fp4`` attention from packed NVFP4 Q ``[B, Hq, Nq, D]``, K, V ``[B, Hkv, Nk, D]``.

    Args:
        q, k, v: :class:`QuantizedTensor` in NVFP4 with ``axis="last"`` (V may use ``axis="token"``,
            non-causal only). Any power-of-two ``global_scale``.
        causal: bottom-right causal mask.
        softmax_scale: ``c`` (default ``1/sqrt(D)``).
        p_quant: ``"paper"`` or ``"anchored"`` (numerics section 4).
        dtype: output dtype (default: Q's original dtype); on CUDA bfloat16 or float16, and the
            dtype the operands are decoded to (exact).
        return_lse: also return the row log-sum-exp (fp32, natural log).
        unpack: CUDA only, where the FP4 codes become values (same result, bit for bit): ``"kernel"``
            inside the sm90 forward kernel (no 16-bit copies in memory; channel blocks and
            ``quantize_nvfp4`` layouts only), ``"temporary"`` into 16-bit temporaries first, or
            ``"auto"``: the kernel when few 128-row query blocks read each KV head (short queries,
            e.g. chunked prefill), else the temporaries (faster for long prefill, where every
            query block would decode the same K/V tiles again). See ``docs/decode.md``.

    Returns:
        ``o`` (and ``lse``), equal to ``attention(q.dequantize(), k.dequantize(), v.dequantize(),
        mode="fp4")`` up to the order of fp32 sums, without re-quantizing the operands.
    """
    check_bool("causal", causal)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, QuantizedTensor):
            raise TypeError(f"{name}: expected a QuantizedTensor (attnqat.quantize_nvfp4), got {type(t).__name__}")
        if t.format != "nvfp4":
            raise ValueError(f"{name}: expected NVFP4 packing, got {t.format!r}")
        if len(t.shape) != 4:
            raise ValueError(f"{name}: expected a 4-D tensor [batch, heads, seq, head_dim], got shape {list(t.shape)}")
    if q.axis != "last" or k.axis != "last":
        raise ValueError("q, k: expected channel blocks (axis='last')")
    cfg = resolve_config(causal=causal, softmax_scale=softmax_scale, mode="fp4", p_quant=p_quant,
                         v_blocks="token" if v.axis == "token" else "channel")
    dtype = q.dtype if dtype is None else dtype
    b, hq, nq, d = q.shape
    if is_torch_tensor(q.data):
        import torch

        o = torch.empty((b, hq, nq, d), dtype=dtype, device=q.data.device)
        lse = torch.empty((b, hq, nq), dtype=torch.float32, device=q.data.device)
    else:
        import numpy as np

        o = np.empty((b, hq, nq, d), dtype)
        lse = np.empty((b, hq, nq), np.float32)
    _C.attention_forward_packed(q.data, q.scales, q.global_scale, k.data, k.scales, k.global_scale,
                                v.data, v.scales, v.global_scale, o, lse, None, None, core_options(cfg, True),
                                unpack, stream=_stream_of(q.data))
    return (o, lse) if return_lse else o


# ---- Explicit page tables --------------------------------------------------------------------------


def _check_pages(page_table, lens, add: int, num_pages: int, page_size: int) -> None:
    """Host-side check of page ids and capacities (reads device tensors: one synchronization)."""
    import torch

    pt = page_table.detach().to("cpu", torch.int64)
    ln = lens.detach().to("cpu", torch.int64)
    cap = pt.shape[1] * page_size
    for b in range(pt.shape[0]):
        start, end = int(ln[b]), int(ln[b]) + add
        if start < 0:
            raise ValueError(f"lengths[{b}]: expected a non-negative length, got {start}")
        if end > cap:
            raise ValueError(f"sequence {b}: length {end} is beyond the capacity of its page table row "
                             f"({pt.shape[1]} pages of {page_size} tokens = {cap})")
        first = start // page_size if add > 0 else 0
        for p in range(first, -(-end // page_size)):
            pid = int(pt[b, p])
            if not 0 <= pid < num_pages:
                raise ValueError(f"page_table[{b}, {p}]: page id {pid} is out of range [0, {num_pages})")


def kv_cache_append(k_data, k_scales, v_data, v_scales, k_new, v_new, page_table, start, *, check: bool = True):
    """Quantizes ``k_new``, ``v_new`` ``[B, Hkv, n_new, D]`` into the pages of a paged FP4 cache
    (one layer: ``k_data``/``v_data`` uint8 ``[num_pages, Hkv, page_size, D/2]``, scales
    ``[.., D/16]``) at positions ``start[b] + i`` (``start``: int32 ``[B]``, the lengths before).
    ``check`` verifies page ids and capacities on the host first (a device synchronization for
    CUDA tensors; CPU tensors are always checked by the core)."""
    if check and is_torch_tensor(page_table) and page_table.is_cuda:
        _check_pages(page_table, start, int(k_new.shape[2]), int(k_data.shape[0]), int(k_data.shape[2]))
    _C.kv_cache_append(k_data, k_scales, v_data, v_scales, k_new, v_new, page_table, start,
                       stream=_stream_of(k_data))


def _window_left(value) -> int:
    """``window_left`` for the core: None -> -1 (no window); an int is passed on (the core rejects
    values below -1), one that no 32-bit key index reaches raises here."""
    if value is None:
        return -1
    left = check_int("window_left", value, "None or -1 for no window, else a number of keys >= 0")
    if left > 2**31 - 1:
        raise ValueError(f"window_left: expected at most 2^31 - 1 keys, got {left}")
    return max(left, -2**31)


def decode_options(softmax_scale=None, p_quant: str = "anchored", num_splits: int = 0, max_seq_len: int = 0,
                   window_left=None):
    """The core's DecodeOptions (values checked by the core: validate_decode_options)."""
    opts = _C.DecodeOptions(softmax_scale=check_softmax_scale("softmax_scale", softmax_scale), p_quant=p_quant,
                            num_splits=check_int("num_splits", num_splits, "0: automatic"),
                            max_seq_len=check_int("max_seq_len", max_seq_len, "0: the page table's capacity"),
                            window_left=_window_left(window_left))
    _C.validate_decode_options(opts)
    return opts


def decode_attention(q, k_data, k_scales, v_data, v_scales, page_table, seq_lens, *,
                     softmax_scale: Optional[float] = None, p_quant: str = "anchored", num_splits: int = 0,
                     max_seq_len: int = 0, window_left: Optional[int] = None, return_lse: bool = False, out=None,
                     check: bool = True):
    """Decode attention of ``q`` ``[B, Hq, nq, D]`` over a paged FP4 cache (one layer). Query i
    of sequence b sees keys ``j <= seq_lens[b] - nq + i`` (the nq new tokens are the last ones,
    already appended), and with ``window_left`` (None or -1: no window; else a number of keys
    >= 0) only ``j >= seq_lens[b] - nq + i - window_left``: the mask of ``window=(window_left,
    0)``. ``num_splits``/``max_seq_len``: split-KV control (0: automatic / the page table's
    capacity). Returns ``out`` (and ``lse``)."""
    import torch

    opts = decode_options(softmax_scale, p_quant, num_splits, max_seq_len, window_left)
    if check and page_table.is_cuda:
        _check_pages(page_table, seq_lens, 0, int(k_data.shape[0]), int(k_data.shape[2]))
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device) if return_lse else None
    _C.decode_attention(q, k_data, k_scales, v_data, v_scales, page_table, seq_lens, out, lse, opts,
                        stream=_stream_of(q))
    return (out, lse) if return_lse else out


# ---- The paged cache -------------------------------------------------------------------------------


class FP4KVCache:
    """A paged KV cache that stores K and V as packed NVFP4 (4.5 bits per element).

    Args:
        num_pages: pages in the pool (shared by all sequences and layers' page lists).
        page_size: tokens per page, a positive multiple of 16.
        num_kv_heads, head_dim: of the model's attention: head_dim a multiple of 16 up to 256 for a
            CPU cache (the reference), 64 or 128 for a CUDA cache (the decode kernel); others raise
            ``ValueError`` here rather than at the first attend.
        device: where the pages live (``"cpu"`` runs the reference implementation).
        num_layers: layers sharing the page lists (a token occupies the same page slot in every
            layer; each layer has its own K/V storage and lengths).

    Bytes per token: ``num_layers * 2 * num_kv_heads * (head_dim/2 + head_dim/16)``
    (:attr:`bytes_per_token`), against ``num_layers * 2 * num_kv_heads * head_dim * 2`` in bf16.
    """

    def __init__(self, num_pages: int, page_size: int, num_kv_heads: int, head_dim: int, device="cpu", *,
                 num_layers: int = 1):
        import torch

        for name, value in (("num_pages", num_pages), ("page_size", page_size), ("num_kv_heads", num_kv_heads),
                            ("head_dim", head_dim), ("num_layers", num_layers)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"{name}: expected an int, got {type(value).__name__} {value!r}")
        if page_size <= 0 or page_size % _NV_BLOCK:
            raise ValueError(f"page_size: expected a positive multiple of 16 (P blocks of 16 keys never "
                             f"straddle a page), got {page_size}")
        device = torch.device(device)
        if head_dim <= 0 or head_dim % _NV_BLOCK or head_dim > CPU_MAX_HEAD_DIM or (
                device.type == "cuda" and head_dim not in CUDA_HEAD_DIMS):
            raise ValueError(_head_dim_error(head_dim, device.type))
        for name, value in (("num_pages", num_pages), ("num_kv_heads", num_kv_heads), ("num_layers", num_layers)):
            if value <= 0:
                raise ValueError(f"{name}: expected a positive number, got {value}")
        self.num_pages, self.page_size = int(num_pages), int(page_size)
        self.num_kv_heads, self.head_dim, self.num_layers = int(num_kv_heads), int(head_dim), int(num_layers)
        self.device = device
        if self.device.type == "cuda" and self.device.index is None:  # "cuda" -> "cuda:N"
            self.device = torch.device("cuda", torch.cuda.current_device())
        shape = (num_layers, num_pages, num_kv_heads, page_size)
        # Zeros, so that never-written slots decode to 0 (the kernels mask them anyway).
        self.k_data = torch.zeros(shape + (head_dim // 2,), dtype=torch.uint8, device=self.device)
        self.v_data = torch.zeros_like(self.k_data)
        self.k_scales = torch.zeros(shape + (head_dim // _NV_BLOCK,), dtype=torch.uint8, device=self.device)
        self.v_scales = torch.zeros_like(self.k_scales)
        self._free: List[int] = list(range(num_pages - 1, -1, -1))
        self._pages: Dict[int, List[int]] = {}
        self._lens: Dict[int, List[int]] = {}  # per sequence: length in each layer
        self._next_id = 0

    # -- bookkeeping --------------------------------------------------------------------------------

    @property
    def bytes_per_token(self) -> int:
        return self.num_layers * 2 * self.num_kv_heads * (self.head_dim // 2 + self.head_dim // _NV_BLOCK)

    @property
    def free_pages(self) -> int:
        return len(self._free)

    def new_sequence(self) -> int:
        """Registers an empty sequence and returns its id."""
        sid = self._next_id
        self._next_id += 1
        self._pages[sid] = []
        self._lens[sid] = [0] * self.num_layers
        return sid

    def free_sequence(self, seq_id: int) -> None:
        """Returns a sequence's pages to the pool."""
        pages = self._pages.pop(self._seq(seq_id))
        del self._lens[seq_id]
        self._free.extend(reversed(pages))

    def length(self, seq_id: int, layer: int = 0) -> int:
        return self._lens[self._seq(seq_id)][self._layer(layer)]

    def pages(self, seq_id: int) -> List[int]:
        return list(self._pages[self._seq(seq_id)])

    def reserve(self, seq_ids: Sequence[int], tokens: int, layer: int = 0) -> None:
        """Allocates pages so that each sequence can grow by ``tokens`` in ``layer``."""
        need = []
        for sid in seq_ids:
            want = -(-(self.length(sid, layer) + tokens) // self.page_size)
            need.append(max(0, want - len(self._pages[sid])))
        if sum(need) > len(self._free):
            raise RuntimeError(f"FP4KVCache: out of pages: {sum(need)} more needed, {len(self._free)} free "
                               f"of {self.num_pages} (page_size {self.page_size})")
        for sid, n in zip(seq_ids, need):
            self._pages[sid].extend(self._free.pop() for _ in range(n))

    def page_table(self, seq_ids: Sequence[int], width: Optional[int] = None):
        """int32 ``[B, width]`` page table of the sequences (padded with page 0, never read)."""
        import torch

        rows = [self._pages[self._seq(s)] for s in seq_ids]
        width = max([len(r) for r in rows] + [1]) if width is None else width
        table = [r + [0] * (width - len(r)) for r in rows]
        return torch.tensor(table, dtype=torch.int32).to(self.device)

    def _lengths(self, seq_ids: Sequence[int], layer: int):
        import torch

        return torch.tensor([self.length(s, layer) for s in seq_ids], dtype=torch.int32).to(self.device)

    def _seq(self, seq_id: int) -> int:
        if seq_id not in self._pages:
            raise KeyError(f"FP4KVCache: unknown sequence id {seq_id} (new_sequence() makes one)")
        return seq_id

    def _layer(self, layer: int) -> int:
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"layer: expected 0 <= layer < {self.num_layers}, got {layer}")
        return layer

    def layer_tensors(self, layer: int = 0) -> Tuple:
        """(k_data, k_scales, v_data, v_scales) of one layer (views)."""
        layer = self._layer(layer)
        return self.k_data[layer], self.k_scales[layer], self.v_data[layer], self.v_scales[layer]

    # -- operations ---------------------------------------------------------------------------------

    def append(self, seq_ids: Sequence[int], k, v, layer: int = 0) -> None:
        """Quantizes ``k``, ``v`` ``[B, Hkv, n_new, D]`` (float32/float16/bfloat16) into the pages of
        the B sequences ``seq_ids`` (allocating pages as needed) and advances their lengths."""
        import torch

        seq_ids = list(seq_ids)
        layer = self._layer(layer)
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
            if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
                raise ValueError(f"{name}: expected dtype float32, float16 or bfloat16, got {t.dtype}")
            if t.dim() != 4 or t.shape[0] != len(seq_ids) or t.shape[1] != self.num_kv_heads or \
                    t.shape[3] != self.head_dim:
                raise ValueError(f"{name}: expected shape [{len(seq_ids)}, {self.num_kv_heads}, n_new, "
                                 f"{self.head_dim}], got {list(t.shape)}")
            if t.device != self.device:
                raise ValueError(f"{name}: expected a tensor on {self.device} (the cache's device), got {t.device}")
        n_new = int(k.shape[2])
        self.reserve(seq_ids, n_new, layer)
        k = k if k.stride(-1) == 1 else k.contiguous()
        v = v if v.stride(-1) == 1 else v.contiguous()
        _C.kv_cache_append(*self.layer_tensors(layer), k, v, self.page_table(seq_ids),
                           self._lengths(seq_ids, layer), stream=_stream_of(self.k_data))
        for sid in seq_ids:
            self._lens[sid][layer] += n_new

    def attend(self, q, seq_ids: Sequence[int], layer: int = 0, *, softmax_scale: Optional[float] = None,
               p_quant: str = "anchored", num_splits: int = 0, window_left: Optional[int] = None,
               return_lse: bool = False):
        """Decode attention of ``q`` ``[B, Hq, nq, D]`` (the sequences' last nq tokens, already
        appended) over the cached keys of ``seq_ids`` in ``layer``; ``window_left`` as in
        :func:`decode_attention` (the pages before a window stay allocated: they are just not
        read). ``nq`` larger than every sequence's cached length raises ``ValueError`` (the K, V
        of the queries are missing); in a batch of ragged lengths, query rows of a shorter
        sequence that see no key give O = 0 and LSE = -inf."""
        import torch

        seq_ids = list(seq_ids)
        decode_options(softmax_scale, p_quant, num_splits, window_left=window_left)  # the options' errors first
        if not isinstance(q, torch.Tensor):
            raise TypeError(f"q: expected a torch.Tensor, got {type(q).__name__}")
        if q.dim() != 4 or q.shape[0] != len(seq_ids):
            raise ValueError(f"q: expected shape [{len(seq_ids)}, heads, n_query, {self.head_dim}], got {list(q.shape)}")
        nq = int(q.shape[2])
        for sid in seq_ids:
            if self.length(sid, layer) < 1:
                raise ValueError(f"sequence {sid}: empty in layer {layer}; append the query tokens' K and V first")
        lens = [self.length(s, layer) for s in seq_ids]
        if lens and nq > max(lens):
            # No sequence holds the nq query tokens: their K and V were not appended. (In a batch of
            # ragged lengths a shorter sequence may have fewer: its first rows see no key, O = 0.)
            longest = max(range(len(lens)), key=lambda i: lens[i])
            raise ValueError(f"q: {nq} query tokens, but sequence {seq_ids[longest]} has only {lens[longest]} cached "
                             f"tokens in layer {layer}{' (the longest of the batch)' if len(lens) > 1 else ''}; the "
                             "queries are the last tokens of their sequences: append their K and V first")
        q = q if q.stride(-1) == 1 else q.contiguous()
        return decode_attention(q, *self.layer_tensors(layer), self.page_table(seq_ids), self._lengths(seq_ids, layer),
                                softmax_scale=softmax_scale, p_quant=p_quant, num_splits=num_splits,
                                max_seq_len=max(lens), window_left=window_left, return_lse=return_lse, check=False)

    def dequantize(self, seq_id: int, layer: int = 0):
        """The cached K^, V^ of a sequence, ``[Hkv, len, D]`` float32 (exact)."""
        import torch

        n = self.length(seq_id, layer)
        pages = torch.tensor(self._pages[seq_id], dtype=torch.long, device=self.device)
        out = []
        for data, scales in ((self.k_data, self.k_scales), (self.v_data, self.v_scales)):
            d = data[layer].index_select(0, pages).permute(1, 0, 2, 3).reshape(self.num_kv_heads, -1, self.head_dim // 2)
            s = scales[layer].index_select(0, pages).permute(1, 0, 2, 3).reshape(self.num_kv_heads, -1, self.head_dim // 16)
            d, s = d[:, :n].contiguous(), s[:, :n].contiguous()
            qt = QuantizedTensor(d, s, torch.ones(1, dtype=torch.float32, device=self.device), "nvfp4", "last",
                                 (self.num_kv_heads, n, self.head_dim), torch.float32)
            out.append(qt.dequantize() if n else torch.zeros((self.num_kv_heads, 0, self.head_dim)))
        return out[0], out[1]


__all__ = ["FP4KVCache", "attention_packed", "decode_attention", "kv_cache_append"]
