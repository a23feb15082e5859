"""Python front end of the formats: torch and numpy agree bit for bit with the C++ reference
(exhaustively tested in tests/cpp/test_codec.cpp), options and errors, the STE gradient."""

import numpy as np
import pytest
import torch

import attnqat

E2M1 = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6])


def test_nvfp4_roundtrip_torch_matches_numpy_and_fake_quantize():
    x = torch.randn(6, 5, 64) * 3
    qt = attnqat.quantize_nvfp4(x)
    qn = attnqat.quantize_nvfp4(x.numpy())
    assert qt.data.shape == (6, 5, 32) and qt.scales.shape == (6, 5, 4) and qt.data.dtype == torch.uint8
    assert np.array_equal(qt.data.numpy(), qn.data) and np.array_equal(qt.scales.numpy(), qn.scales)
    assert torch.equal(qt.dequantize(), attnqat.fake_quantize(x))
    assert np.array_equal(qn.dequantize(), attnqat.fake_quantize(x.numpy()))


def test_decoded_values_are_block_scaled_e2m1():
    # Every decoded value is value(code) * s * g with s the block's E4M3 scale.
    x = torch.randn(32, 16)
    qt = attnqat.quantize_nvfp4(x)
    codes = torch.stack([qt.data & 0xF, qt.data >> 4], dim=-1).reshape(32, 16).long()
    mag = E2M1[codes & 7] * torch.where(codes >= 8, -1.0, 1.0)
    s = qt.scales.view(torch.float8_e4m3fn).float()
    assert torch.equal(qt.dequantize(), mag * s.repeat_interleave(16, dim=-1))


def test_bf16_and_fp16_inputs_decode_exactly():
    for dtype in (torch.bfloat16, torch.float16):
        x = (torch.randn(8, 48) * 2).to(dtype)
        y = attnqat.fake_quantize(x)
        assert y.dtype == dtype
        assert torch.equal(y.float(), attnqat.fake_quantize(x.float()))


def test_global_scale_options():
    x = torch.randn(4, 32) * 1e4
    assert attnqat.quantize_nvfp4(x).global_scale.item() == 1.0
    amax = x.abs().max().item()
    g = attnqat.quantize_nvfp4(x, global_scale="amax").global_scale.item()
    assert amax <= 2688 * g and amax > 1344 * g
    q4 = attnqat.quantize_nvfp4(x, global_scale=4.0)
    assert q4.global_scale.item() == 4.0
    assert torch.equal(q4.dequantize(), attnqat.fake_quantize(x, global_scale=4.0))
    with pytest.raises(ValueError, match="global_scale: expected a power of two in \\[2\\^-100, 2\\^100\\]"):
        attnqat.quantize_nvfp4(x, global_scale=3.0)
    with pytest.raises(ValueError, match="global_scale: expected a power of two, None or 'amax'"):
        attnqat.quantize_nvfp4(x, global_scale="max")


def test_token_axis_layout_and_padding():
    v = torch.randn(2, 3, 37, 64)
    qt = attnqat.quantize_nvfp4(v, axis="token")
    assert qt.data.shape == (2, 3, 64, 24) and qt.scales.shape == (2, 3, 64, 3)
    deq = qt.dequantize()
    assert deq.shape == v.shape
    # Same as quantizing the zero-padded transposed tensor along its last axis.
    padded = torch.zeros(2, 3, 48, 64)
    padded[:, :, :37] = v
    ref = attnqat.fake_quantize(padded.transpose(-1, -2).contiguous()).transpose(-1, -2)[:, :, :37]
    assert torch.equal(deq, ref)


def test_mxfp4():
    x = torch.randn(3, 64)
    qt = attnqat.quantize_mxfp4(x)
    assert qt.scales.shape == (3, 2)
    y = qt.dequantize()
    assert torch.equal(y, attnqat.fake_quantize(x, format="mxfp4"))
    # Scales are powers of two: every decoded value / 2^(code-127) is an E2M1 value.
    scale = torch.exp2(qt.scales.float() - 127).repeat_interleave(32, dim=-1)
    assert torch.isin((y / scale).abs(), E2M1).all()


def test_fp4_views():
    qt = attnqat.quantize_nvfp4(torch.randn(2, 32))
    if not hasattr(torch, "float4_e2m1fn_x2"):  # older torch: a clear error, not a crash
        with pytest.raises(RuntimeError, match="no float4_e2m1fn_x2 dtype"):
            qt.fp4_view()
        return
    data, scales = qt.fp4_view()
    assert data.dtype == torch.float4_e2m1fn_x2 and scales.dtype == torch.float8_e4m3fn


def test_poisoned_blocks_decode_to_nan():
    x = torch.ones(2, 32)
    x[0, 3] = float("nan")
    x[1, 20] = float("inf")
    y = attnqat.fake_quantize(x)
    assert torch.isnan(y[0, :16]).all() and torch.isfinite(y[0, 16:]).all()
    assert torch.isnan(y[1, 16:]).all() and torch.isfinite(y[1, :16]).all()


def test_fake_quantize_gradient_is_straight_through():
    x = torch.randn(4, 32, requires_grad=True)
    w = torch.randn(4, 32)
    (attnqat.fake_quantize(x) * w).sum().backward()
    assert torch.equal(x.grad, w)


def test_empty_tensors():
    qt = attnqat.quantize_nvfp4(torch.empty(0, 16))
    assert qt.data.shape == (0, 8) and qt.dequantize().shape == (0, 16)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: attnqat.quantize_nvfp4(torch.randn(4, 24)), "x: expected the last dimension to be a multiple of 16"),
        (lambda: attnqat.quantize_mxfp4(torch.randn(4, 48)), r"multiple of 32 \(the MXFP4 block\), got 48"),
        (lambda: attnqat.quantize_nvfp4(torch.randn(32, 4).t()), "x: expected the last dimension to be contiguous"),
        (lambda: attnqat.quantize_nvfp4(torch.randint(0, 5, (4, 16))), "x: unsupported dtype|x: expected dtype"),
        (lambda: attnqat.fake_quantize(torch.randn(16), format="int4"), "format: expected 'nvfp4' or 'mxfp4'"),
        (lambda: attnqat.quantize_nvfp4(torch.randn(16), axis="rows"), "axis: expected 'last' or 'token'"),
        (lambda: attnqat.quantize_nvfp4(torch.randn(16), axis="token"), "token-axis quantization expects"),
    ],
)
def test_bad_inputs_raise_clear_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_opcheck_quantization_ops():
    x = torch.randn(4, 64)
    torch.library.opcheck(torch.ops.attnqat.quantize.default, (x, "nvfp4", "last", 1.0, False))
    torch.library.opcheck(torch.ops.attnqat.quantize.default, (x, "nvfp4", "token", 1.0, True))
    data, scales, g = torch.ops.attnqat.quantize(x, "nvfp4", "last", 1.0, False)
    torch.library.opcheck(torch.ops.attnqat.dequantize.default, (data, scales, g, "nvfp4", "last", [4, 64], torch.bfloat16))
    torch.library.opcheck(torch.ops.attnqat.fake_quantize.default, (x.requires_grad_(), "nvfp4", "last", 1.0, False))
