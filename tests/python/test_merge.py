"""attnqat.merge_attention: context-parallel (ring) attention over disjoint key chunks, merged with
the LSEs, against one attnqat.attention call over all keys (CPU reference)."""

import math

import pytest
import torch

import attnqat
from conftest import rel_err


def qkv(b=2, hq=4, hkv=2, nq=48, nk=96, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g) for h, n in ((hq, nq), (hkv, nk), (hkv, nk))]


def ring(q, k, v, bounds, **kw):
    """Each 'rank' holds keys [a, b) and computes its partial result with its LSE."""
    parts = [attnqat.attention(q, k[:, :, a:b], v[:, :, a:b], return_lse=True, **kw) for a, b in bounds]
    return attnqat.merge_attention([p[0] for p in parts], [p[1] for p in parts])


CHUNKS = [(0, 32), (32, 48), (48, 96)]  # boundaries at multiples of 16 keys, unequal sizes


def test_bf16_merge_equals_a_single_call():
    q, k, v = qkv()
    o, lse = ring(q, k, v, CHUNKS, mode="bf16")
    ref, ref_lse = attnqat.attention(q, k, v, mode="bf16", return_lse=True)
    assert rel_err(o, ref) < 1e-6
    assert (lse - ref_lse).abs().max() < 1e-5


def test_causal_ring_step_diagonal_and_past_chunks():
    """The causal ring pattern: a query chunk over the earlier key chunks (no mask) and over its own
    chunk (causal), merged, equals bottom-right causal attention over all keys."""
    q, k, v = qkv(nq=32, nk=96)
    past = attnqat.attention(q, k[:, :, :64], v[:, :, :64], mode="bf16", return_lse=True)
    diag = attnqat.attention(q, k[:, :, 64:], v[:, :, 64:], mode="bf16", causal=True, return_lse=True)
    o, lse = attnqat.merge_attention([past[0], diag[0]], [past[1], diag[1]])
    ref, ref_lse = attnqat.attention(q, k, v, mode="bf16", causal=True, return_lse=True)
    assert rel_err(o, ref) < 1e-6 and (lse - ref_lse).abs().max() < 1e-5


def test_fp4_anchored_merge_matches_a_single_call_closely_and_paper_within_fp4_noise():
    q, k, v = qkv(seed=1)
    bf16 = attnqat.attention(q, k, v, mode="bf16")
    anchored, _ = ring(q, k, v, CHUNKS, mode="fp4", p_quant="anchored")
    ref_anchored = attnqat.attention(q, k, v, mode="fp4", p_quant="anchored")
    fp4_error = rel_err(ref_anchored, bf16)
    # Anchored P blocks do not depend on the other keys of a call: the merge reproduces the single
    # call far below the FP4 error (measured ~1e-7 relative: fp32 rounding of the rescales).
    assert rel_err(anchored, ref_anchored) < 1e-3 * fp4_error
    paper, _ = ring(q, k, v, CHUNKS, mode="fp4", p_quant="paper")
    ref_paper = attnqat.attention(q, k, v, mode="fp4", p_quant="paper")
    # Paper P blocks depend on each call's running maximum: FP4-level differences, but no worse
    # than FP4 attention itself is from BF16.
    assert rel_err(paper, ref_paper) < 2 * fp4_error
    assert rel_err(paper, bf16) < 2 * fp4_error


def test_chunks_without_visible_keys_and_empty_rows():
    q, k, v = qkv(nq=16, nk=32)
    a = attnqat.attention(q, k[:, :, :16], v[:, :, :16], mode="bf16", return_lse=True)
    none = (torch.zeros_like(a[0]), torch.full_like(a[1], -math.inf))  # a rank whose keys are all masked
    o, lse = attnqat.merge_attention([a[0], none[0]], [a[1], none[1]])
    assert torch.equal(o, a[0]) and torch.equal(lse, a[1])
    o, lse = attnqat.merge_attention([none[0], none[0]], [none[1], none[1]])
    assert torch.equal(o, torch.zeros_like(o)) and torch.isneginf(lse).all()


def test_merge_errors():
    q, k, v = qkv(nq=8, nk=16)
    o, lse = attnqat.attention(q, k, v, return_lse=True)
    with pytest.raises(ValueError, match="as many outputs as lses"):
        attnqat.merge_attention([o], [])
    with pytest.raises(ValueError, match="expected"):
        attnqat.merge_attention([o, o[:, :2]], [lse, lse])
    qg = q.clone().requires_grad_()
    og, lg = attnqat.attention(qg, k, v, return_lse=True)
    with pytest.raises(NotImplementedError, match="forward-only"):
        attnqat.merge_attention([og], [lg])
    with torch.no_grad():
        og, lg = attnqat.attention(qg, k, v, return_lse=True)
        attnqat.merge_attention([og], [lg])
