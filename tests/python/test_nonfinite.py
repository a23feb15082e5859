"""Non-finite inputs: where a NaN or Inf in Q, K or V must show up (docs/numerics.md, "Non-finite
inputs"), on every path: attention forward and backward in every mode and p_quant, causal and
not, GQA, attention from packed NVFP4 tensors, and decode over the FP4 KV cache.

The expected outputs come from an oracle written from the contract's rules (which rows see the
bad element, which 16-element block it poisons, how the backward spreads it), not from the
reference, so a reference that is wrong the same way as a kernel cannot hide the bug. Every
output position the oracle calls clean must be finite and equal to the same call on inputs
without the bad element; every position it calls poisoned must be NaN (Inf in V in mode bf16,
which quantizes nothing, may also give +-Inf: IEEE arithmetic, as torch's SDPA).

CPU tests run the reference (CI); the same cases run on the CUDA kernels with the marker gpu.
On CUDA, in a causal 128-key tile that straddles the diagonal, masked positions take part in the
tensor-core products with a probability of exactly 0, and 0 * NaN = NaN: there the oracle's
clean positions may be NaN (docs/numerics.md says so). The cases below keep the rows and keys
outside that tile strict, and check the tile itself only for "finite or NaN, never wrong".
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import pytest
import torch

import attnqat

B, HQ, HKV, N, D = 1, 4, 2, 256, 64
GROUP = HQ // HKV
BLOCK = 16
TILE = 128  # CUDA key tile and query block (forward), key block (backward)

MODE_PQ = [("bf16", "paper"), ("fp4", "paper"), ("fp4", "anchored"), ("drop_in_qat", "paper"),
           ("drop_in_qat", "anchored"), ("attn_qat", "paper"), ("attn_qat", "anchored")]


@dataclass(frozen=True)
class Bad:
    """One bad element: tensor 'q' [B, HQ, Nq, D] or 'k'/'v' [B, HKV, Nk, D] at (b, h, n, d)."""

    tensor: str
    value: float
    b: int
    h: int
    n: int
    d: int


def key_end(i: int, nq: int, nk: int, causal: bool) -> int:
    return nk if not causal else max(0, min(nk, i + nk - nq + 1))


def _inputs(nq, nk, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, HQ, nq, D, generator=g)
    k = torch.randn(B, HKV, nk, D, generator=g)
    v = torch.randn(B, HKV, nk, D, generator=g)
    do = torch.randn(B, HQ, nq, D, generator=g)
    return [t.to(dtype).to(device) for t in (q, k, v, do)]


def _poison(t: torch.Tensor, bad: Bad) -> torch.Tensor:
    t = t.clone()
    t[bad.b, bad.h, bad.n, bad.d] = bad.value
    return t


# ---- The oracle ---------------------------------------------------------------------------------


@dataclass
class Expect:
    o: torch.Tensor    # bool [B, HQ, Nq, D]: poisoned output elements
    lse: torch.Tensor  # bool [B, HQ, Nq]
    empty: torch.Tensor  # bool [B, HQ, Nq]: rows that see no key (O = 0, LSE = -inf)
    dq: torch.Tensor   # bool [B, HQ, Nq] (rows: a poisoned gradient row is poisoned in every channel)
    dk: torch.Tensor   # bool [B, HKV, Nk]
    dv: torch.Tensor   # bool [B, HKV, Nk]
    differs: torch.Tensor  # bool [B, HQ, Nq]: finite rows whose value may change (bf16 -inf scores)
    grads_checked: bool = True


def oracle(bad: Bad, mode: str, causal: bool, v_blocks: str, nq: int, nk: int, q, k) -> Expect:
    quant = mode != "bf16"
    o = torch.zeros(B, HQ, nq, D, dtype=torch.bool)
    lse = torch.zeros(B, HQ, nq, dtype=torch.bool)
    empty = torch.zeros(B, HQ, nq, dtype=torch.bool)
    ends = [key_end(i, nq, nk, causal) for i in range(nq)]
    for i in range(nq):
        empty[:, :, i] = ends[i] == 0
    # The input region the bad element poisons: its 16-channel block (its 16-token block for V
    # with v_blocks="token") in the FP4 modes, the element itself in mode bf16.
    chans = list(range(bad.d // BLOCK * BLOCK, bad.d // BLOCK * BLOCK + BLOCK)) if quant else [bad.d]
    tokens = [bad.n]
    if bad.tensor == "v" and quant and v_blocks == "token":
        chans = [bad.d]
        t0 = bad.n // BLOCK * BLOCK
        tokens = list(range(t0, min(t0 + BLOCK, nk)))
    heads = [bad.h] if bad.tensor == "q" else list(range(bad.h * GROUP, (bad.h + 1) * GROUP))
    ieee_inf = not quant and math.isinf(bad.value) and bad.tensor in "qk"
    rows_lse = set()  # (h, i): rows whose statistics are poisoned
    rows_o = set()    # (h, i): rows with a poisoned output channel
    differs = torch.zeros(B, HQ, nq, dtype=torch.bool)
    for h in heads:
        for i in range(nq):
            sees = [j for j in tokens if j < ends[i]]
            if bad.tensor == "q":
                if i == bad.n and ends[i] > 0:
                    rows_lse.add((h, i))
            elif bad.tensor == "k":
                if sees:
                    # bf16 Inf: the score is q_d * Inf; -inf drops the key for this row (IEEE, as
                    # SDPA), unless it is the row's only key; +inf or NaN poisons the row.
                    score = float(q[bad.b, h, i, bad.d]) * bad.value
                    if not ieee_inf or score != -math.inf or ends[i] == 1:
                        rows_lse.add((h, i))
                    else:
                        differs[bad.b, h, i] = True
            elif sees:
                o[bad.b, h, i, chans] = True
                rows_o.add((h, i))
    for h, i in rows_lse:
        o[bad.b, h, i, :] = True
        lse[bad.b, h, i] = True
        rows_o.add((h, i))
    # Backward (dO finite): D_i is poisoned for rows_o; P_ij for rows_lse; dP_ij for j in the bad
    # V tokens; dS_ij = P_ij (dP_ij - D_i) on visible pairs; dQ_i, dK_j from dS; dV_j from P.
    dq = torch.zeros(B, HQ, nq, dtype=torch.bool)
    dk = torch.zeros(B, HKV, nk, dtype=torch.bool)
    dv = torch.zeros(B, HKV, nk, dtype=torch.bool)
    for h in range(HQ):
        hk = h // GROUP
        for i in range(nq):
            for j in range(ends[i]):
                p_bad = (h, i) in rows_lse
                ds_bad = p_bad or (h, i) in rows_o or (bad.tensor == "v" and hk == bad.h and j in tokens)
                if ds_bad:
                    dq[bad.b, h, i] = True
                    dk[bad.b, hk, j] = True
                if p_bad:
                    dv[bad.b, hk, j] = True
    return Expect(o, lse, empty, dq, dk, dv, differs, grads_checked=not ieee_inf)


def _zone(n_index: torch.Tensor, bad: Bad, causal: bool, gpu: bool, square: bool) -> torch.Tensor:
    """Positions (by token index) that may be NaN on CUDA although clean: the causal diagonal
    tile of the bad token (see the module docstring)."""
    if not (gpu and causal and square):
        return torch.zeros_like(n_index, dtype=torch.bool)
    return n_index // TILE == bad.n // TILE


def _check(name, got, clean, poisoned, zone, inf_ok, differs=None):
    """got/clean: tensors; poisoned/zone/differs: bool masks broadcastable to got. Clean
    positions must be finite, and equal to the run without the bad element unless in differs."""
    poisoned = poisoned.expand_as(got).to(got.device)
    zone = zone.expand_as(got).to(got.device)
    differs = torch.zeros_like(poisoned) if differs is None else differs.expand_as(got).to(got.device)
    bad_ok = torch.isnan(got) | (torch.isinf(got) if inf_ok else torch.zeros_like(poisoned))
    miss = poisoned & ~bad_ok
    assert not miss.any(), f"{name}: {int(miss.sum())} poisoned positions are finite, first at {miss.nonzero()[0].tolist()}"
    strict = ~poisoned & ~zone
    # Clean positions are finite, or what the run without the bad element gave (-inf: the LSE of
    # an empty row).
    nonfinite = strict & ~torch.isfinite(got) & ~(got == clean.to(got.device))
    assert not nonfinite.any(), (
        f"{name}: {int(nonfinite.sum())} clean positions are not finite, first at {nonfinite.nonzero()[0].tolist()}")
    relaxed = ~poisoned & zone & torch.isfinite(got)
    finite_clean = torch.isfinite(clean.to(got.device))
    for mask in (strict & ~differs & finite_clean, relaxed & ~differs & finite_clean):
        if mask.any():
            a, b = got[mask].double(), clean[mask].double()
            tol = 0.0 if got.device.type == "cpu" else 2e-2 * max(1.0, float(b.abs().max()))
            err = float((a - b).abs().max())
            assert err <= tol, f"{name}: clean positions differ from the run without the bad element by {err}"


def _run(q, k, v, do, mode, p_quant, causal, v_blocks, want_grad):
    q, k, v = (t.detach().requires_grad_(want_grad) for t in (q, k, v))
    o, lse = attnqat.attention(q, k, v, causal=causal, mode=mode, p_quant=p_quant, v_blocks=v_blocks,
                               return_lse=True, deterministic=True)
    grads = None
    if want_grad:
        o.backward(do)
        grads = (q.grad, k.grad, v.grad)
    return o.detach(), lse, grads


def run_case(bad: Bad, mode, p_quant, causal, v_blocks="channel", nq=N, nk=N, device="cpu"):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    q, k, v, do = _inputs(nq, nk, dtype, device)
    want_grad = mode != "fp4"
    clean = _run(q, k, v, do, mode, p_quant, causal, v_blocks, want_grad)
    args = {"q": q, "k": k, "v": v}
    args[bad.tensor] = _poison(args[bad.tensor], bad)
    got = _run(args["q"], args["k"], args["v"], do, mode, p_quant, causal, v_blocks, want_grad)
    exp = oracle(bad, mode, causal, v_blocks, nq, nk, q.float().cpu(), k.float().cpu())
    gpu = device != "cpu"
    square = nq == nk
    rows = torch.arange(nq).view(1, 1, nq)
    keys = torch.arange(nk).view(1, 1, nk)
    inf_ok = mode == "bf16" and math.isinf(bad.value)
    o, lse, grads = got
    # Empty rows: exactly 0 and -inf, whatever the inputs hold.
    em = exp.empty.to(o.device)
    assert torch.all(o[em.unsqueeze(-1).expand_as(o)] == 0), "empty rows must give O = 0"
    assert torch.all(lse[em] == -math.inf), "empty rows must give LSE = -inf"
    _check("O", o, clean[0], exp.o, _zone(rows, bad, causal, gpu, square).unsqueeze(-1), inf_ok,
           exp.differs.unsqueeze(-1))
    _check("LSE", lse, clean[1], exp.lse, _zone(rows, bad, causal, gpu, square), inf_ok, exp.differs)
    if want_grad and exp.grads_checked:
        dq, dk, dv = grads
        _check("dQ", dq, clean[2][0], exp.dq.unsqueeze(-1), _zone(rows, bad, causal, gpu, square).unsqueeze(-1), inf_ok)
        _check("dK", dk, clean[2][1], exp.dk.unsqueeze(-1), _zone(keys, bad, causal, gpu, square).unsqueeze(-1), inf_ok)
        _check("dV", dv, clean[2][2], exp.dv.unsqueeze(-1), _zone(keys, bad, causal, gpu, square).unsqueeze(-1), inf_ok)


# Bad positions: Q row 37 (head 1), K token 150 (KV head 1), V token 150 (KV head 0). With the
# causal mask, rows 0-127 never see token 150 and lie outside its CUDA diagonal tile: strict.
BADS = {
    "q": lambda val: Bad("q", val, 0, 1, 37, 20),
    "k": lambda val: Bad("k", val, 0, 1, 150, 5),
    "v": lambda val: Bad("v", val, 0, 0, 150, 40),
}
CASES = [
    pytest.param(t, val, mode, pq, causal, id=f"{t}-{vname}-{mode}-{pq}-{'causal' if causal else 'full'}")
    for t, (vname, val), (mode, pq), causal in itertools.product(
        "qkv", [("nan", math.nan), ("inf", math.inf), ("neginf", -math.inf)], MODE_PQ, (False, True))
    if not (vname == "neginf" and mode != "bf16")  # in FP4 modes -Inf poisons its block like +Inf
]


@pytest.mark.parametrize("tensor,value,mode,p_quant,causal", CASES)
def test_attention_nonfinite_cpu(tensor, value, mode, p_quant, causal):
    run_case(BADS[tensor](value), mode, p_quant, causal)


@pytest.mark.parametrize("mode", ["fp4", "attn_qat"])
def test_attention_nonfinite_v_token_blocks_cpu(mode):
    """v_blocks='token': a bad V element poisons its 16-token block of one channel."""
    run_case(Bad("v", math.nan, 0, 1, 150, 7), mode, "anchored", False, v_blocks="token")


@pytest.mark.parametrize("mode", ["bf16", "attn_qat"])
@pytest.mark.parametrize("tensor", ["q", "k", "v"])
def test_masked_positions_never_poison_cpu(tensor, mode):
    """Causal, Nq = 256 > Nk = 128: rows 0-127 see no key. A NaN in an empty row's Q leaves every
    output as without it and the row gives O = 0, LSE = -inf; a NaN in the last key (127) is
    seen only by row 255 (bottom-right alignment) and poisons exactly what that row reaches."""
    n = {"q": 5, "k": 127, "v": 127}[tensor]
    run_case(Bad(tensor, math.nan, 0, 1, n, 3), mode, "anchored", True, nq=256, nk=128)


def test_all_masked_rows_are_zero_not_nan_cpu():
    """Rows that see no key give O = 0 and LSE = -inf (never NaN) and zero gradients."""
    q, k, v, do = _inputs(64, 16, torch.float32, "cpu")
    q.requires_grad_(True)
    o, lse = attnqat.attention(q, k, v, causal=True, mode="attn_qat", return_lse=True)
    o.backward(do)
    assert torch.all(o[:, :, :48] == 0) and torch.all(lse[:, :, :48] == -math.inf)
    assert torch.all(q.grad[:, :, :48] == 0)
    assert torch.isfinite(o).all() and torch.isfinite(q.grad).all()


def test_merge_attention_keeps_nan_rows_nan():
    """Context-parallel merging: a chunk whose row is poisoned (LSE NaN) poisons the merged row;
    the other rows are the single call's (non-causal chunks: causal masks are per call)."""
    q, k, v, _ = _inputs(32, 64, torch.float32, "cpu")
    k = _poison(k, Bad("k", math.nan, 0, 0, 40, 1))  # chunk 2 (keys 32-63), KV head 0
    with torch.no_grad():
        parts = [attnqat.attention(q, k[:, :, s], v[:, :, s], mode="bf16", return_lse=True)
                 for s in (slice(0, 32), slice(32, 64))]
        o, lse = attnqat.merge_attention([p[0] for p in parts], [p[1] for p in parts])
        ref, ref_lse = attnqat.attention(q, k, v, mode="bf16", return_lse=True)
    bad = torch.zeros(B, HQ, 32, dtype=torch.bool)  # every row of the query heads of KV head 0
    bad[:, :GROUP] = True
    assert torch.isnan(lse[bad]).all() and torch.isnan(o[bad]).all()
    assert torch.isnan(ref_lse[bad]).all()
    torch.testing.assert_close(o[~bad], ref[~bad], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse[~bad], ref_lse[~bad], rtol=1e-5, atol=1e-6)


# ---- Packed NVFP4 attention and the FP4 KV cache -------------------------------------------------


def _packed_case(bad: Bad, causal, device):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    q, k, v, _ = _inputs(N, N, dtype, device)
    args = {"q": q, "k": k, "v": v}
    clean_o, clean_lse = attnqat.attention_packed(*(attnqat.quantize_nvfp4(args[n]) for n in "qkv"),
                                                  causal=causal, p_quant="anchored", return_lse=True)
    args[bad.tensor] = _poison(args[bad.tensor], bad)
    o, lse = attnqat.attention_packed(*(attnqat.quantize_nvfp4(args[n]) for n in "qkv"), causal=causal,
                                      p_quant="anchored", return_lse=True)
    exp = oracle(bad, "fp4", causal, "channel", N, N, q.float().cpu(), k.float().cpu())
    rows = torch.arange(N).view(1, 1, N)
    gpu = device != "cpu"
    _check("O", o, clean_o, exp.o, _zone(rows, bad, causal, gpu, True).unsqueeze(-1), False)
    _check("LSE", lse, clean_lse, exp.lse, _zone(rows, bad, causal, gpu, True), False)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("tensor", ["q", "k", "v"])
def test_packed_attention_nonfinite_cpu(tensor, causal):
    _packed_case(BADS[tensor](math.nan), causal, "cpu")


def _decode_case(where: str, num_splits: int, device: str):
    """One sequence of L = 520 cached tokens, nq = 4 queries (the last 4 tokens), GQA 4/2."""
    L, nq = 520, 4
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    g = torch.Generator().manual_seed(1)
    k = torch.randn(1, HKV, L, D, generator=g).to(dtype)
    v = torch.randn(1, HKV, L, D, generator=g).to(dtype)
    q = torch.randn(1, HQ, nq, D, generator=g).to(dtype)

    def attend(q, k, v):
        cache = attnqat.FP4KVCache(num_pages=64, page_size=16, num_kv_heads=HKV, head_dim=D, device=device)
        sid = cache.new_sequence()
        cache.append([sid], k.to(device), v.to(device))
        kw = {"num_splits": num_splits} if num_splits else {}
        return cache.attend(q.to(device), [sid], return_lse=True, **kw)

    clean_o, clean_lse = attend(q, k, v)
    exp_o = torch.zeros(1, HQ, nq, D, dtype=torch.bool)
    exp_lse = torch.zeros(1, HQ, nq, dtype=torch.bool)
    ends = [L - nq + i + 1 for i in range(nq)]
    if where == "q":  # query 2 of head 3: its row
        q = _poison(q, Bad("q", math.nan, 0, 3, 2, 9))
        exp_o[0, 3, 2] = True
        exp_lse[0, 3, 2] = True
    elif where in ("k", "k_split"):  # one key (or every key of keys 128-255) of KV head 1
        j0, j1 = (L - 2, L - 1) if where == "k" else (128, 256)
        k = k.clone()
        k[0, 1, j0:j1, 0] = math.nan
        for h in range(GROUP, 2 * GROUP):
            for i in range(nq):
                if ends[i] > j0:
                    exp_o[0, h, i] = True
                    exp_lse[0, h, i] = True
    else:  # V token 100, channel 33 of KV head 0: channels 32-47 of every row of heads 0, 1
        v = _poison(v, Bad("v", math.nan, 0, 0, 100, 33))
        exp_o[0, :GROUP, :, 32:48] = True
    o, lse = attend(q, k, v)
    none = torch.zeros(1, 1, 1, 1, dtype=torch.bool)
    _check("O", o, clean_o, exp_o, none, False)
    _check("LSE", lse, clean_lse, exp_lse, none[..., 0], False)


@pytest.mark.parametrize("where", ["q", "k", "k_split", "v"])
def test_decode_nonfinite_cpu(where):
    _decode_case(where, 0, "cpu")


# ---- The same on the CUDA kernels ----------------------------------------------------------------

GPU_CASES = [
    pytest.param(t, val, mode, pq, causal, id=f"{t}-{vname}-{mode}-{pq}-{'causal' if causal else 'full'}")
    for t, (vname, val), (mode, pq), causal in itertools.product(
        "qkv", [("nan", math.nan), ("inf", math.inf)], MODE_PQ, (False, True))
]


@pytest.mark.gpu
@pytest.mark.parametrize("tensor,value,mode,p_quant,causal", GPU_CASES)
def test_attention_nonfinite_gpu(cuda, tensor, value, mode, p_quant, causal):
    run_case(BADS[tensor](value), mode, p_quant, causal, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("tensor", ["q", "k", "v"])
def test_masked_positions_never_poison_gpu(cuda, tensor):
    """On CUDA, positions outside the diagonal tiles: the Q of an empty row (Nq = 256 > Nk = 128,
    row 5), and key 128 of Nq = Nk = 256, which starts a key tile that only rows >= 128 visit
    (rows 0-127 must stay exactly as without it, forward and backward)."""
    if tensor == "q":
        run_case(Bad("q", math.nan, 0, 1, 5, 3), "attn_qat", "anchored", True, nq=256, nk=128, device="cuda")
    else:
        run_case(Bad(tensor, math.nan, 0, 1, 128, 3), "attn_qat", "anchored", True, device="cuda")


@pytest.mark.gpu
def test_attention_nonfinite_v_token_blocks_gpu(cuda):
    run_case(Bad("v", math.nan, 0, 1, 150, 7), "attn_qat", "anchored", False, v_blocks="token", device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("tensor", ["q", "k", "v"])
def test_packed_attention_nonfinite_gpu(cuda, tensor, causal):
    _packed_case(BADS[tensor](math.nan), causal, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [1, 4])
@pytest.mark.parametrize("where", ["q", "k", "k_split", "v"])
def test_decode_nonfinite_gpu(cuda, where, num_splits):
    _decode_case(where, num_splits, "cuda")
