"""attnqat.attention_varlen: packed sequences of different lengths in FlashAttention's varlen layout
(q [total_q, Hq, D], k, v [total_k, Hkv, D], int32 offsets cu_seqlens_q/k). The property: each
sequence's output, LSE and gradients are those of attnqat.attention on that sequence alone as
[1, H, len, D] tensors, bit for bit (the CPU reference is deterministic; dsinks is the sum over the
sequences, in order), in every mode, with masks, windows, GQA, softcap, sinks and second-level
scales; mode bf16 also against softmax attention written out here in float64. Then gradcheck, empty
sequences, the numpy path, the errors, the torch ops (opcheck, torch.compile) and, on the GPU, the
CUDA kernels against one CUDA call per sequence (docs/numerics.md 9.11)."""

import itertools
import math

import numpy as np
import pytest
import torch

import attnqat
from attnqat.attention import nvfp4_global_scale, resolve_config
from conftest import rel_err

# Around the 16-key P blocks and the 128-row/128-key tiles, plus a longer one.
LENGTHS = [1, 15, 16, 17, 127, 128, 129, 300]
# Query and key lengths that differ per sequence (bottom-right alignment), with empty ones.
LENGTHS_Q = [1, 15, 16, 0, 40, 129, 17, 3]
LENGTHS_K = [5, 15, 33, 7, 0, 129, 1, 20]


def offsets(lengths):
    return torch.tensor([0] + list(itertools.accumulate(lengths)), dtype=torch.int32)


def packed(lens_q, lens_k=None, hq=4, hkv=2, d=32, dtype=torch.float32, seed=0):
    """(q, k, v), a cotangent for O, and seqs = (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)."""
    lens_k = lens_q if lens_k is None else lens_k
    g = torch.Generator().manual_seed(seed)
    make = lambda n, h: torch.randn(n, h, d, generator=g, dtype=torch.float64).to(dtype)
    q, k, v, do = make(sum(lens_q), hq), make(sum(lens_k), hkv), make(sum(lens_k), hkv), make(sum(lens_q), hq)
    return (q, k, v), do, (offsets(lens_q), offsets(lens_k), max(lens_q), max(lens_k))


def run(fn, inputs, do, sinks=None, train=True):
    """(O, LSE, gradients of q, k, v [and sinks]) of fn(q, k, v, sinks) -> (O, LSE) for the
    cotangent `do` (no gradients when not `train`)."""
    leaves = [t.detach().clone().requires_grad_(train) for t in inputs]
    if sinks is not None:
        leaves.append(sinks.detach().clone().requires_grad_(train))
    o, lse = fn(*leaves[:3], leaves[3] if sinks is not None else None)
    grads = torch.autograd.grad(o, leaves, do) if train else None
    return o.detach(), lse, grads


def varlen(inputs, do, seqs, sinks=None, train=True, **options):
    fn = lambda q, k, v, s: attnqat.attention_varlen(q, k, v, *seqs, sinks=s, return_lse=True, **options)
    return run(fn, inputs, do, sinks, train)


def per_sequence(inputs, do, seqs, sinks=None, train=True, **options):
    """attnqat.attention on each sequence alone ([1, H, len, D]), put back in the packed layout:
    O, LSE [Hq, total_q], dq, dk, dv (zero for keys of a sequence without queries) and dsinks
    summed over the sequences in order."""
    q, k, v = inputs
    cu_q, cu_k = seqs[0].tolist(), seqs[1].tolist()
    dense = lambda t: t.transpose(0, 1).unsqueeze(0)
    packed_rows = lambda t: t[0].transpose(0, 1)
    o, lse = torch.zeros_like(q), torch.full((q.shape[1], q.shape[0]), -math.inf, device=q.device)
    grads = [torch.zeros_like(t) for t in (q, k, v)] + ([torch.zeros_like(sinks)] if sinks is not None else [])
    fn = lambda a, b, c, s: attnqat.attention(a, b, c, sinks=s, return_lse=True, **options)
    for s in range(len(cu_q) - 1):
        rq, rk = slice(cu_q[s], cu_q[s + 1]), slice(cu_k[s], cu_k[s + 1])
        if rq.start == rq.stop:
            continue
        o_s, lse_s, g_s = run(fn, (dense(q[rq]), dense(k[rk]), dense(v[rk])), dense(do[rq]), sinks, train)
        o[rq], lse[:, rq] = packed_rows(o_s), lse_s[0]
        if train:
            grads[0][rq], grads[1][rk], grads[2][rk] = (packed_rows(g) for g in g_s[:3])
            if sinks is not None:
                grads[3] = grads[3] + g_s[3]
    return o, lse, grads if train else None


def assert_equal(got, want):
    (o, lse, grads), (o_ref, lse_ref, grads_ref) = got, want
    assert torch.equal(o, o_ref)
    assert torch.equal(lse, lse_ref)
    if grads_ref is not None:
        for name, a, b in zip(("dq", "dk", "dv", "dsinks"), grads, grads_ref):
            assert torch.equal(a, b), name


# ---- Equality with one call per sequence ------------------------------------------------------------


@pytest.mark.parametrize("mode, p_quant", [("bf16", "paper"), ("fp4", "paper"), ("fp4", "anchored"),
                                           ("drop_in_qat", "paper"), ("drop_in_qat", "anchored"),
                                           ("attn_qat", "paper"), ("attn_qat", "anchored")])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("group", [1, 4])
def test_each_sequence_is_its_own_call(mode, p_quant, causal, group):
    inputs, do, seqs = packed(LENGTHS, hq=4, hkv=4 // group, dtype=torch.bfloat16, seed=group)
    opts = dict(mode=mode, p_quant=p_quant, causal=causal)
    train = mode != "fp4"
    got = varlen(inputs, do, seqs, train=train, **opts)
    assert_equal(got, per_sequence(inputs, do, seqs, train=train, **opts))
    assert got[0].dtype == torch.bfloat16 and got[1].shape == (4, sum(LENGTHS))


@pytest.mark.parametrize("mode, p_quant", [("bf16", "paper"), ("attn_qat", "paper"), ("attn_qat", "anchored"),
                                           ("drop_in_qat", "paper")])
@pytest.mark.parametrize("window, causal, kv_tile", [((7, 0), False, 128), ((20, 5), False, 64),
                                                     ((0, 0), False, 128), ((-1, 16), False, 128),
                                                     ((9, -1), True, 16), (None, True, 32)])
def test_windows_and_unequal_query_and_key_lengths(mode, p_quant, window, causal, kv_tile):
    # Sequences whose query and key lengths differ (bottom-right aligned masks), one without
    # queries (its keys get dk = dv = 0) and one without keys (O = 0, LSE = -inf); the paper P
    # tiles of kv_tile keys start at each sequence's first key.
    inputs, do, seqs = packed(LENGTHS_Q, LENGTHS_K, hq=4, hkv=1, seed=3)
    opts = dict(mode=mode, p_quant=p_quant, causal=causal, window=window, kv_tile=kv_tile)
    got = varlen(inputs, do, seqs, **opts)
    assert_equal(got, per_sequence(inputs, do, seqs, **opts))
    empty_q = slice(sum(LENGTHS_K[:3]), sum(LENGTHS_K[:4]))
    assert (got[2][1][empty_q] == 0).all() and (got[2][2][empty_q] == 0).all()
    no_keys = slice(sum(LENGTHS_Q[:4]), sum(LENGTHS_Q[:5]))
    assert (got[0][no_keys] == 0).all() and torch.isneginf(got[1][:, no_keys]).all()


@pytest.mark.parametrize("mode, p_quant", [("bf16", "paper"), ("drop_in_qat", "anchored"), ("attn_qat", "paper"),
                                           ("attn_qat", "anchored")])
def test_softcap_and_sinks_whose_gradient_sums_over_the_sequences(mode, p_quant):
    inputs, do, seqs = packed(LENGTHS_Q, LENGTHS_K, hq=4, hkv=2, seed=4)
    sinks = torch.tensor([0.5, -1.0, 2.0, -math.inf])
    opts = dict(mode=mode, p_quant=p_quant, causal=True, softcap=2.5)
    got = varlen(inputs, do, seqs, sinks, **opts)
    assert_equal(got, per_sequence(inputs, do, seqs, sinks, **opts))
    assert (got[2][3][:3] != 0).all() and got[2][3][3] == 0  # the -inf sink takes no mass
    # A row without keys: LSE = the sink (through the log2-domain statistics: to ~1 ulp).
    no_keys = slice(sum(LENGTHS_Q[:4]), sum(LENGTHS_Q[:5]))
    assert torch.allclose(got[1][:3, no_keys], sinks[:3, None].expand(3, LENGTHS_Q[4]), atol=2e-6, rtol=0)


@pytest.mark.parametrize("mode", ["drop_in_qat", "attn_qat"])
def test_fixed_second_level_scales(mode):
    # drop_in_qat with scales runs on x / g (its backward reads the raw inputs), attn_qat
    # quantizes with g up front: both are each sequence's own call with the same scales.
    inputs, do, seqs = packed(LENGTHS_Q, LENGTHS_K, hq=2, hkv=2, seed=5)
    opts = dict(mode=mode, causal=True, qkv_scale=(2.0**-3, 4.0, 0.5))
    assert_equal(varlen(inputs, do, seqs, **opts), per_sequence(inputs, do, seqs, **opts))


def test_amax_scales_are_those_of_the_packed_tensors():
    # qkv_scale="amax": one g per packed tensor (as one padded batch would have), so each sequence
    # equals its own call with the packed tensors' scales; inputs large enough that g > 1.
    inputs, do, seqs = packed(LENGTHS_Q, LENGTHS_K, hq=2, hkv=1, seed=6)
    inputs = tuple(t * 3000 for t in inputs)
    scales = tuple(nvfp4_global_scale(float(t.abs().max())) for t in inputs)
    assert all(g > 1 for g in scales)
    got = varlen(inputs, do, seqs, mode="attn_qat", qkv_scale="amax")
    assert_equal(got, per_sequence(inputs, do, seqs, mode="attn_qat", qkv_scale=scales))


def test_numpy_arrays_give_the_torch_results():
    inputs, _, seqs = packed(LENGTHS_Q, LENGTHS_K, seed=7)
    for opts in (dict(mode="attn_qat", causal=True), dict(mode="fp4", window=(5, 2)),
                 dict(mode="drop_in_qat", qkv_scale="amax")):
        o, lse = attnqat.attention_varlen(*inputs, *seqs, return_lse=True, **opts)
        o_np, lse_np = attnqat.attention_varlen(*(t.numpy() for t in inputs), seqs[0].numpy(), seqs[1].numpy(),
                                                seqs[2], seqs[3], return_lse=True, **opts)
        assert np.array_equal(o_np, o.numpy()) and np.array_equal(lse_np, lse.numpy())


# ---- Mode bf16 against the float64 formula -----------------------------------------------------------


def softmax_attention(inputs, seqs, causal=False, window=None):
    """Softmax attention of each sequence alone, written out in float64 (bottom-right aligned
    causal mask and window, GQA by repeating K and V), packed: O [total_q, Hq, D]."""
    q, k, v = (t.double() for t in inputs)
    cu_q, cu_k = seqs[0].tolist(), seqs[1].tolist()
    group = q.shape[1] // k.shape[1]
    o = torch.zeros_like(q)
    for s in range(len(cu_q) - 1):
        qs = q[cu_q[s]:cu_q[s + 1]].transpose(0, 1)
        ks, vs = (t[cu_k[s]:cu_k[s + 1]].transpose(0, 1).repeat_interleave(group, 0) for t in (k, v))
        nq, nk = qs.shape[1], ks.shape[1]
        d = torch.arange(nq)[:, None] + nk - nq
        j = torch.arange(nk)[None, :]
        left, right = window or (-1, -1)
        right = 0 if causal else right
        visible = torch.ones(nq, nk, dtype=torch.bool)
        if left >= 0:
            visible &= j >= d - left
        if right >= 0:
            visible &= j <= d + right
        scores = (qs @ ks.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~visible, -math.inf)
        p = torch.softmax(scores, -1).nan_to_num(0.0)  # a row without keys: 0
        o[cu_q[s]:cu_q[s + 1]] = (p @ vs).transpose(0, 1)
    return o


@pytest.mark.parametrize("causal, window", [(False, None), (True, None), (False, (6, 3)), (True, (30, 0))])
def test_bf16_mode_is_softmax_attention_per_sequence(causal, window):
    # float64 inputs run the fp64 reference: the formula up to the float32 softmax scale (the
    # options hold a float) and the float32 LSE the backward normalizes with: ~1e-8 relative in O,
    # ~1e-7 in the gradients. A key of another sequence, or a row of another one, costs > 1e-2.
    inputs, do, seqs = packed(LENGTHS_Q, LENGTHS_K, hq=4, hkv=2, dtype=torch.float64, seed=8)
    o, _, grads = varlen(inputs, do, seqs, mode="bf16", causal=causal, window=window)
    ref_inputs = [t.clone().requires_grad_() for t in inputs]
    ref = softmax_attention(ref_inputs, seqs, causal, window)
    ref_grads = torch.autograd.grad(ref, ref_inputs, do)
    assert rel_err(o, ref.detach()) < 1e-7
    for name, g, r in zip("qkv", grads, ref_grads):
        assert rel_err(g, r) < 1e-6, name
    # The formula over the whole packed batch as one sequence is far away.
    one = (seqs[0][[0, -1]], seqs[1][[0, -1]], seqs[0][-1].item(), seqs[1][-1].item())
    assert rel_err(o, softmax_attention(inputs, one, causal, window)) > 1e-2


def test_gradcheck():
    """Finite differences in float64 (mode bf16, causal, GQA, an empty sequence and one without
    keys); the analytic gradients normalize with the float32 LSE (~1e-7 relative)."""
    inputs, _, seqs = packed([3, 0, 5, 2], [4, 2, 6, 0], hq=2, hkv=1, d=16, dtype=torch.float64, seed=9)
    inputs = [t.requires_grad_() for t in inputs]
    f = lambda q, k, v: attnqat.attention_varlen(q, k, v, *seqs, mode="bf16", causal=True)
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


# ---- Empty batches --------------------------------------------------------------------------------------


def test_no_tokens_at_all():
    inputs, do, _ = packed([0, 0], hq=2, hkv=2)
    seqs = (offsets([0, 0]), offsets([0, 0]), 0, 0)
    o, lse, grads = varlen(inputs, do, seqs, mode="attn_qat", causal=True)
    assert o.shape == (0, 2, 32) and lse.shape == (2, 0) and all(g.numel() == 0 for g in grads)


def test_sequences_without_queries_have_no_key_gradients():
    inputs, do, seqs = packed([0, 0, 0], [3, 17, 0], hq=2, hkv=1)
    o, lse, (dq, dk, dv) = varlen(inputs, do, seqs, mode="attn_qat")
    assert o.shape == (0, 2, 32) and (dk == 0).all() and (dv == 0).all() and dk.shape == (20, 1, 32)


# ---- Errors ------------------------------------------------------------------------------------------


def call(**changes):
    inputs, _, (cu_q, cu_k, max_q, max_k) = packed([3, 5], [4, 6], hq=2, hkv=1, d=16, seed=10)
    args = dict(q=inputs[0], k=inputs[1], v=inputs[2], cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q,
                max_seqlen_k=max_k)
    args.update(changes)
    return attnqat.attention_varlen(**args)


@pytest.mark.parametrize("changes, error, message", [
    (dict(cu_seqlens_q=torch.tensor([0, 3, 8])), ValueError, "cu_seqlens_q: expected dtype int32, got int64"),
    (dict(cu_seqlens_k=torch.tensor([[0, 4, 10]], dtype=torch.int32)), ValueError,
     "cu_seqlens_k: expected a 1-D int32 tensor, got 2 dimensions"),
    (dict(cu_seqlens_q=torch.tensor([0, 3, 9], dtype=torch.int32)), ValueError,
     "cu_seqlens_q: expected offsets from 0 to 8 (the tokens of q), got 0 .. 9"),
    (dict(cu_seqlens_q=torch.tensor([1, 3, 8], dtype=torch.int32)), ValueError, "expected offsets from 0 to 8"),
    (dict(cu_seqlens_k=torch.tensor([0, 6, 5, 10], dtype=torch.int32)), ValueError,
     "expected two int32 tensors [num_seqs + 1] of equal length >= 2, got 3 and 4"),
    (dict(cu_seqlens_k=torch.tensor([0, 7, 10], dtype=torch.int32)), ValueError,
     "cu_seqlens_k: sequence 0 has length 7, expected 0 .. max_seqlen_k = 6"),
    (dict(cu_seqlens_q=torch.tensor([0, 9, 8], dtype=torch.int32), max_seqlen_q=9), ValueError,
     "cu_seqlens_q: sequence 1 has length -1, expected 0 .. max_seqlen_q = 9"),
    (dict(max_seqlen_q=4), ValueError, "cu_seqlens_q: sequence 1 has length 5, expected 0 .. max_seqlen_q = 4"),
    (dict(max_seqlen_q=-1), ValueError, "max_seqlen_q: expected a length in [0, 2^31 - 256], got -1"),
    (dict(max_seqlen_k=torch.tensor(6)), TypeError, "max_seqlen_k: expected an int (at least the longest"),
    (dict(max_seqlen_k=6.0), TypeError, "max_seqlen_k: expected an int (at least the longest sequence's length), "
                                        "got float 6.0"),
    (dict(q=torch.zeros(1, 8, 2, 16)), ValueError, "q: expected a 3-D tensor [total_q, heads, head_dim] (packed "
                                                   "sequences), got shape [1, 8, 2, 16]"),
    (dict(k=torch.zeros(10, 1, 32), v=torch.zeros(10, 1, 32)), ValueError, "head"),
    (dict(v_blocks="token"), ValueError, "v_blocks: 'token' blocks run 16 tokens along the sequence and would "
                                         "straddle packed sequences"),
    (dict(cu_seqlens_q=np.array([0, 3, 8], np.int32)), TypeError, "cu_seqlens_q is a numpy array but q is a torch tensor"),
    (dict(k=torch.zeros(10, 1, 16, device="meta")), ValueError, "k: expected a tensor on cpu (the device of q)"),
])
def test_refused(changes, error, message):
    with pytest.raises(error) as e:
        call(**changes)
    assert message in str(e.value)


def test_token_v_blocks_are_refused_with_scales_and_numpy_too():
    for kw in (dict(qkv_scale=(2.0, 2.0, 2.0)), dict(qkv_scale="amax"), dict(mode="bf16")):
        with pytest.raises(ValueError, match="^v_blocks: 'token' blocks run 16 tokens"):
            call(v_blocks="token", **kw)
    inputs, _, seqs = packed([3, 5], hq=2, hkv=1, d=16)
    with pytest.raises(ValueError, match="^v_blocks: 'token' blocks run 16 tokens"):
        attnqat.attention_varlen(*(t.numpy() for t in inputs), seqs[0].numpy(), seqs[1].numpy(), 5, 5,
                                 v_blocks="token", qkv_scale=(2.0, 2.0, 2.0))


# ---- The torch ops ----------------------------------------------------------------------------------------


def test_opcheck():
    inputs, do, seqs = packed([5, 0, 17], [9, 3, 20], hq=2, hkv=1, seed=11)
    q, k, v = (t.requires_grad_() for t in inputs)
    sinks = torch.tensor([1.0, -2.0], requires_grad=True)
    options = resolve_config(causal=True, p_quant="anchored", window=(6, 0)).op_options(False)
    # The op's sequence arguments: cu_seqlens_q, cu_seqlens_k, seqused_k (None or int32 [S]), the lengths.
    for seqused_k in (None, torch.tensor([9, 1, 14], dtype=torch.int32)):
        op_seqs = (seqs[0], seqs[1], seqused_k, seqs[2], seqs[3])
        args = (q, k, v, *op_seqs, options, True, sinks)
        torch.library.opcheck(torch.ops.attnqat.attention_varlen_fwd.default, args)
        o, o_hp, lse, m_ref, l = torch.ops.attnqat.attention_varlen_fwd(*args)
        assert o_hp.shape == q.shape and lse.shape == m_ref.shape == l.shape == (2, 22)
        bwd_args = (do, *(t.detach() for t in (q, k, v)), *op_seqs, o.detach(), o_hp, lse, m_ref, l, options,
                    sinks.detach())
        torch.library.opcheck(torch.ops.attnqat.attention_varlen_bwd.default, bwd_args)
        dq, dk, dv, dsinks = torch.ops.attnqat.attention_varlen_bwd(*bwd_args)
        assert dk.shape == k.shape and dsinks.shape == (2,) and dsinks.dtype == torch.float32


def test_torch_compile_fullgraph():
    inputs, do, seqs = packed(LENGTHS_Q, LENGTHS_K, hq=4, hkv=2, seed=12)
    sinks = torch.nn.Parameter(torch.tensor([1.0, -1.0, 0.5, 0.0]))

    def f(q, k, v, cu_q, cu_k, max_q, max_k, s):
        return attnqat.attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal=True, sinks=s, mode="attn_qat")

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    eager = run(lambda q, k, v, s: (f(q, k, v, *seqs, s), None), inputs, do, sinks)
    got = run(lambda q, k, v, s: (compiled(q, k, v, *seqs, s), None), inputs, do, sinks)
    assert torch.equal(got[0], eager[0])
    assert all(torch.equal(a, b) for a, b in zip(got[2], eager[2]))
    # Other lengths in a batch of the same shapes: the same graph (max_seqlen_* may be symbolic).
    seqs2 = (offsets([16, 0, 40, 1, 1, 129, 17, 17]), seqs[1], 129, seqs[3])
    got2 = compiled(*inputs, *seqs2, sinks)
    assert torch.equal(got2, f(*inputs, *seqs2, sinks))


# ---- CUDA: one launch over the packed sequences equals one call per sequence ----------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["bf16", "fp4", "drop_in_qat", "attn_qat"])
@pytest.mark.parametrize("causal, window, hkv", [(False, None, 8), (True, None, 2), (True, None, 1),
                                                 (False, (100, 30), 2), (True, (200, 0), 8)])
def test_cuda_varlen_equals_cuda_calls_per_sequence(cuda, mode, causal, window, hkv):
    # The kernels' contract (attnqat.h): every sequence exactly as its own call. Forward bit for
    # bit in every mode; backward bit for bit with deterministic=True (no atomics). Lengths around
    # the 128-row tiles and a long one; GQA 1, 4 and 8 (hq = 8).
    lens_q = [1, 15, 16, 17, 127, 128, 129, 4095, 0, 300]
    lens_k = lens_q if window is None else [1, 15, 20, 17, 200, 128, 129, 4095, 33, 290]
    inputs, do, seqs = packed(lens_q, lens_k, hq=8, hkv=hkv, d=128, dtype=torch.bfloat16, seed=13)
    inputs, do = tuple(t.to(cuda) for t in inputs), do.to(cuda)
    seqs = (seqs[0].to(cuda), seqs[1].to(cuda)) + seqs[2:]
    train = mode != "fp4"
    opts = dict(mode=mode, causal=causal, window=window, deterministic=True)
    got = varlen(inputs, do, seqs, train=train, **opts)
    assert_equal(got, per_sequence(inputs, do, seqs, train=train, **opts))



# ---- seqused_k: a prefix of each sequence's key range ----------------------------------------------


def check_seqused_k(mode, causal, lens_q, range_k, used, device=None, **kw):
    # The same as packing only the used keys, bit for bit; the padding keys get dk = dv = 0.
    inputs, do, seqs = packed(lens_q, [range_k] * len(used), seed=11, **kw)
    keep = torch.cat([torch.arange(range_k * s, range_k * s + n) for s, n in enumerate(used)])
    ref_seqs = (seqs[0], offsets(used), seqs[2], max(used))
    used_t = torch.tensor(used, dtype=torch.int32)
    if device is not None:
        inputs, do, keep, used_t = tuple(t.to(device) for t in inputs), do.to(device), keep.to(device), used_t.to(device)
        seqs, ref_seqs = ((s[0].to(device), s[1].to(device)) + s[2:] for s in (seqs, ref_seqs))
    q, k, v = inputs
    opts = dict(mode=mode, causal=causal, deterministic=True)
    train = mode != "fp4"
    got = run(lambda q, k, v, s: attnqat.attention_varlen(q, k, v, *seqs, seqused_k=used_t, return_lse=True, **opts),
              inputs, do, train=train)
    ref = run(lambda q, k, v, s: attnqat.attention_varlen(q, k, v, *ref_seqs, return_lse=True, **opts),
              (q, k[keep], v[keep]), do, train=train)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    assert not train or torch.equal(got[2][0], ref[2][0])
    for g, r in zip(got[2][1:] if train else (), ref[2][1:] if train else ()):
        assert torch.equal(g[keep], r)
        padding = torch.ones(g.shape[0], dtype=torch.bool, device=g.device)
        padding[keep] = False
        assert torch.equal(g[padding], torch.zeros_like(g[padding]))
    empty = used.index(0)  # a sequence without keys: empty rows
    q0 = sum(lens_q[:empty])
    assert torch.isneginf(got[1][:, q0:q0 + lens_q[empty]]).all()


@pytest.mark.parametrize("mode", ["attn_qat", "bf16"])
@pytest.mark.parametrize("causal", [False, True])
def test_seqused_k_is_the_call_on_the_used_keys_with_zero_gradients_for_the_padding(mode, causal):
    # Key ranges of 12 rows, of which the sequences use 12, 5, 0 and 1 (a text encoder's padding).
    check_seqused_k(mode, causal, [9, 9, 9, 9], 12, [12, 5, 0, 1])


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["attn_qat", "fp4"])
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_seqused_k(cuda, mode, causal):
    # Cross-attention shaped: 300 queries, 512 text keys of which 512, 77, 0, 1 are used.
    check_seqused_k(mode, causal, [300] * 4, 512, [512, 77, 0, 1], cuda, hq=4, hkv=2, d=128, dtype=torch.bfloat16)


def test_seqused_k_errors():
    inputs, _, seqs = packed([3, 5], [4, 6], seed=12)
    with pytest.raises(ValueError, match=r"seqused_k: sequence 1 uses 7 keys, expected 0 \.\. 6"):
        attnqat.attention_varlen(*inputs, *seqs, seqused_k=torch.tensor([4, 7], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"seqused_k: expected an int32 tensor \[num_seqs\] = \[2\], got 3"):
        attnqat.attention_varlen(*inputs, *seqs, seqused_k=torch.tensor([1, 2, 3], dtype=torch.int32))
