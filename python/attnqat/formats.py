"""NVFP4 / MXFP4 quantization: packed tensors, dequantization, fake quantization.

The numerics are those of ``docs/numerics.md`` sections 1-2 and 7, bit for bit on every backend.
Torch tensors go through the ``attnqat::`` custom ops (autograd, ``torch.compile``, CUDA graphs);
numpy arrays call the C++ core directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Tuple, Union

import numpy as np

from . import _C
from ._util import is_torch_tensor, torch_ops
from .attention import check_power_of_two, quantize_options

_BLOCK = {"nvfp4": 16, "mxfp4": 32}


def _check_format_axis(format: str, axis: str) -> None:
    if format not in _BLOCK:
        raise ValueError(f"format: expected 'nvfp4' or 'mxfp4', got {format!r}")
    if axis not in ("last", "token"):
        raise ValueError(f"axis: expected 'last' or 'token', got {axis!r}")


def _resolve_global_scale(global_scale: Union[None, float, str], format: str) -> Tuple[float, bool]:
    """(value, compute) for the C++ call: "amax" computes g from the tensor's amax."""
    if format != "nvfp4":
        if global_scale not in (None, 1.0):
            raise ValueError("global_scale: MXFP4 has no second-level scale; leave it unset")
        return 1.0, False
    if global_scale is None:
        return 1.0, False
    if isinstance(global_scale, str):
        if global_scale != "amax":
            raise ValueError(f"global_scale: expected a power of two, None or 'amax', got {global_scale!r}")
        return 1.0, True
    return check_power_of_two("global_scale", global_scale), False


def packed_shapes(shape, format: str, axis: str):
    """Shapes of (data, scales) for an input of `shape` (numerics section 7)."""
    shape = tuple(int(s) for s in shape)
    block = _BLOCK[format]
    if axis == "token":
        if len(shape) < 2:
            raise ValueError(f"x: token-axis quantization expects [..., N, D], got shape {list(shape)}")
        n, d = shape[-2], shape[-1]
        nb = (n + 15) // 16
        return shape[:-2] + (d, nb * 8), shape[:-2] + (d, nb)
    if len(shape) < 1:
        raise ValueError("x: expected at least one dimension, got a scalar")
    return shape[:-1] + (shape[-1] // 2,), shape[:-1] + (shape[-1] // block,)


@dataclass
class QuantizedTensor:
    """A packed FP4 tensor (numerics section 7).

    Attributes:
        data: uint8 ``[..., L/2]`` — two E2M1 codes per byte, element 2i in the low nibble
            (token axis: ``[..., D, ceil(N/16)*8]``).
        scales: uint8 ``[..., L/block]`` — E4M3 bits (NVFP4) or E8M0 codes (MXFP4).
        global_scale: float32 ``[1]`` — the NVFP4 second-level scale ``g`` (1 for MXFP4).
        format: ``"nvfp4"`` or ``"mxfp4"``.
        axis: ``"last"`` (blocks along the last dim) or ``"token"`` (V: 16 tokens per channel).
        shape: the shape of the original tensor.
        dtype: the dtype of the original tensor (the default of :meth:`dequantize`).
    """

    data: Any
    scales: Any
    global_scale: Any
    format: str
    axis: str
    shape: Tuple[int, ...]
    dtype: Any

    def dequantize(self, dtype=None):
        """The decoded tensor (exactly the fake-quantized values), in `dtype` (default: the
        original dtype)."""
        return dequantize(self, dtype)

    def fp4_view(self):
        """``(data, scales)`` viewed as ``torch.float4_e2m1fn_x2`` / ``torch.float8_e4m3fn``
        (NVFP4 only, torch tensors only, where the installed torch has those dtypes)."""
        if not is_torch_tensor(self.data):
            raise TypeError("fp4_view: only torch tensors have FP4/FP8 dtypes")
        import torch

        if self.format != "nvfp4":
            raise ValueError("fp4_view: MXFP4 scales are E8M0; view them as torch.float8_e8m0fnu")
        if not hasattr(torch, "float4_e2m1fn_x2"):
            raise RuntimeError(f"fp4_view: torch {torch.__version__} has no float4_e2m1fn_x2 dtype")
        return self.data.view(torch.float4_e2m1fn_x2), self.scales.view(torch.float8_e4m3fn)


def _quantize(x, format: str, axis: str, global_scale) -> QuantizedTensor:
    _check_format_axis(format, axis)
    g, compute = _resolve_global_scale(global_scale, format)
    if is_torch_tensor(x):
        data, scales, gt = torch_ops().quantize(x, format, axis, g, compute)
        return QuantizedTensor(data, scales, gt, format, axis, tuple(x.shape), x.dtype)
    x = np.asarray(x)
    dshape, sshape = packed_shapes(x.shape, format, axis)
    data = np.empty(dshape, np.uint8)
    scales = np.empty(sshape, np.uint8)
    gt = np.full((1,), g, np.float32)
    _C.quantize(x, data, scales, gt, quantize_options(format, axis, compute))
    return QuantizedTensor(data, scales, gt, format, axis, tuple(x.shape), x.dtype)


def quantize_nvfp4(x, *, axis: str = "last", global_scale: Union[None, float, str] = None) -> QuantizedTensor:
    """Quantize to packed NVFP4 (E2M1 values, one E4M3 scale per 16 elements).

    Args:
        x: float32/float16/bfloat16 tensor (numpy array or torch tensor, CPU or CUDA); the last
            dimension must be contiguous. With ``axis="last"`` its length must be a multiple of 16.
        axis: ``"last"`` (Q, K, V channel blocks) or ``"token"`` (V token blocks: ``x`` is
            ``[..., N, D]``, blocks of 16 tokens per channel, the last block zero-padded).
        global_scale: the second-level scale ``g``: ``None``/``1.0`` (the paper's setting), a
            positive power of two, or ``"amax"`` to compute the smallest power of two with
            ``amax(x) <= 6 * 448 * g`` (no block scale saturates).

    Returns:
        A :class:`QuantizedTensor`; ``.dequantize()`` gives exactly :func:`fake_quantize`'s result.
    """
    return _quantize(x, "nvfp4", axis, global_scale)


def quantize_mxfp4(x) -> QuantizedTensor:
    """Quantize to packed MXFP4 (OCP MX v1.0: E2M1 values, one E8M0 scale per 32 elements along
    the last dimension, which must be a multiple of 32)."""
    return _quantize(x, "mxfp4", "last", None)


def dequantize(qt: QuantizedTensor, dtype=None):
    """Decode a :class:`QuantizedTensor` (exact) to `dtype` (default: its original dtype)."""
    dtype = qt.dtype if dtype is None else dtype
    if is_torch_tensor(qt.data):
        return torch_ops().dequantize(qt.data, qt.scales, qt.global_scale, qt.format, qt.axis, list(qt.shape), dtype)
    out = np.empty(qt.shape, dtype)
    _C.dequantize(qt.data, qt.scales, qt.global_scale if qt.format == "nvfp4" else None, out,
                  quantize_options(qt.format, qt.axis))
    return out


def fake_quantize(x, *, format: str = "nvfp4", axis: str = "last", global_scale: Union[None, float, str] = None):
    """``dequantize(quantize(x))`` in one pass, same dtype and shape as `x`.

    For torch tensors the gradient is the straight-through estimator (the identity), so this is
    the building block of quantization-aware training. Arguments as in :func:`quantize_nvfp4`.
    """
    _check_format_axis(format, axis)
    g, compute = _resolve_global_scale(global_scale, format)
    if is_torch_tensor(x):
        return torch_ops().fake_quantize(x, format, axis, g, compute)
    x = np.asarray(x)
    out = np.empty(x.shape, x.dtype)
    gt = np.full((1,), g, np.float32)
    _C.fake_quantize(x, out, gt if format == "nvfp4" else None, quantize_options(format, axis, compute))
    return out
