"""Property-based tests (hypothesis): arbitrary shapes, dtypes and options either work or raise
a ValueError — never crash — and quantization agrees with a numpy transcription of the spec."""

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnqat

E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6])


def e4m3_round(t: np.ndarray) -> np.ndarray:
    """Round fp32 values to E4M3 (RNE, satfinite) by nearest-value search over all 127 values."""
    vals = np.array([(m / 8 * 2.0**-6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7))
                     for e in range(16) for m in range(8)][:127])
    vals = np.minimum(vals, 448)
    a = np.minimum(np.abs(t.astype(np.float64)), 448)
    idx = np.abs(a[..., None] - vals).argmin(-1)
    # ties: argmin takes the lower code; move to the even code where the upper neighbour ties
    upper = np.minimum(idx + 1, 126)
    tie = np.abs(a - vals[upper]) == np.abs(a - vals[idx])
    idx = np.where(tie & (idx % 2 == 1), upper, idx)
    return vals[idx].astype(np.float32)


def nvfp4_numpy(x: np.ndarray) -> np.ndarray:
    """phi_nv with g = 1 along the last axis, transcribed from numerics section 2."""
    blocks = x.reshape(-1, 16).astype(np.float32)
    a = np.abs(blocks).max(-1, keepdims=True)
    s = e4m3_round(a / np.float32(6))
    out = np.zeros_like(blocks)
    nz = (s > 0)[:, 0]
    inv = (np.float32(1) / s[nz]).astype(np.float32)
    y = (blocks[nz] * inv).astype(np.float32)
    mag = np.abs(y)[..., None]
    idx = np.abs(mag - E2M1).argmin(-1)  # lower value on ties ...
    upper = np.minimum(idx + 1, 7)
    tie = np.abs(mag[..., 0] - E2M1[upper]) == np.abs(mag[..., 0] - E2M1[idx])
    idx = np.where(tie & (idx % 2 == 1), upper, idx)  # ... then the even code
    out[nz] = np.sign(y) * E2M1[idx] * s[nz]
    return out.reshape(x.shape)


@settings(max_examples=200, deadline=None)
@given(rows=st.integers(1, 8), blocks=st.integers(1, 4), scale=st.floats(1e-6, 1e6), seed=st.integers(0, 2**31 - 1))
def test_fake_quantize_matches_numpy_transcription(rows, blocks, scale, seed):
    x = (np.random.default_rng(seed).standard_normal((rows, 16 * blocks)) * scale).astype(np.float32)
    np.testing.assert_array_equal(attnqat.fake_quantize(x), nvfp4_numpy(x))


dims = st.lists(st.integers(0, 40), min_size=0, max_size=5)


@settings(max_examples=300, deadline=None)
@given(shape=dims, dtype=st.sampled_from([np.float32, np.float16, np.float64, np.int32]),
       axis=st.sampled_from(["last", "token"]), fmt=st.sampled_from(["nvfp4", "mxfp4"]))
def test_quantize_never_crashes(shape, dtype, axis, fmt):
    x = np.ones(shape, dtype)
    try:
        qt = attnqat.quantize_nvfp4(x, axis=axis) if fmt == "nvfp4" else attnqat.quantize_mxfp4(x)
        assert qt.dequantize().shape == x.shape
    except ValueError:
        pass


@settings(max_examples=150, deadline=None)
@given(b=st.integers(0, 2), hq=st.integers(0, 4), hkv=st.integers(0, 4), nq=st.integers(0, 20),
       nk=st.integers(0, 20), d=st.sampled_from([0, 8, 16, 32, 48]), causal=st.booleans(),
       mode=st.sampled_from(["bf16", "fp4", "attn_qat", "drop_in_qat"]), vb=st.sampled_from(["channel", "token"]))
def test_attention_never_crashes(b, hq, hkv, nq, nk, d, causal, mode, vb):
    q, k, v = torch.randn(b, hq, nq, d), torch.randn(b, hkv, nk, d), torch.randn(b, hkv, nk, d)
    try:
        o = attnqat.attention(q, k, v, causal=causal, mode=mode, v_blocks=vb)
    except ValueError:
        return
    assert o.shape == q.shape and not torch.isnan(o).any()
