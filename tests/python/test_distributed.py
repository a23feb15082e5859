"""attnqat.distributed.ulysses_attention on CPU process groups (gloo), 2 and 4 processes.

Every case compares the sequence-parallel forward output and dq, dk, dv with one
``attnqat.attention`` call on the full sequence, with ``torch.equal``: bitwise. Why that holds:
the all-to-alls only move bytes, and attention never mixes heads — each rank computes, for its
heads, the same per-head arithmetic on the same full sequence (the CPU reference fixes the order of
every fp32 sum independently of the number of heads and threads, and dK/dV of a GQA group sum over
its query heads, which land on the same rank). ``qkv_scale="amax"`` is bitwise too because the
amax is reduced over the ranks first.

One spawn per world size runs all its cases (process start-up dominates); each case returns its
failures instead of raising, so the ranks stay in step through the collectives and every case is
reported on its own.
"""

import json
import os
import tempfile
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import attnqat
from attnqat.distributed import UlyssesAttention, ulysses_attention

B, D = 2, 32
SEQ = 64  # the full sequence; shards of 64 / P


def _heads(world: int, gqa: bool):
    hq = 2 * world
    return hq, (world if gqa else hq)


def _cases(suite: str, world: int):
    """(name, kind, parameters) of every case of a suite ("gloo": CPU, "nccl": GPU), the same list
    in the test process and the workers."""
    if suite == "nccl":
        # The CUDA kernels: bf16 inputs, head dim 64; deterministic=True, so that the backward's
        # sums run in a fixed order (its default uses atomics, whose bits vary from run to run).
        cuda = dict(dtype=torch.bfloat16, head_dim=64, seq=256 * world, deterministic=True, layout="bshd", gqa=True)
        return [(f"{mode}-{'causal' if causal else 'full'}", "compare", dict(cuda, mode=mode, causal=causal))
                for mode in ("bf16", "attn_qat", "fp4") for causal in (False, True)] + [
            ("attn_qat-amax", "compare", dict(cuda, mode="attn_qat", qkv_scale="amax", causal=True))]
    cases = []
    if world == 2:
        for layout in ("bshd", "bhsd"):
            for mode in ("bf16", "attn_qat", "drop_in_qat", "fp4"):
                for causal in (False, True):
                    for gqa in (False, True):
                        cases.append((f"{layout}-{mode}-{'causal' if causal else 'full'}-{'gqa' if gqa else 'mha'}",
                                      "compare", dict(layout=layout, mode=mode, causal=causal, gqa=gqa)))
        cases += [
            ("attn_qat-anchored-token-v", "compare", dict(mode="attn_qat", p_quant="anchored", v_blocks="token")),
            ("attn_qat-amax", "compare", dict(mode="attn_qat", qkv_scale="amax", causal=True, gqa=True)),
            ("drop_in_qat-amax", "compare", dict(mode="drop_in_qat", qkv_scale="amax")),
            ("attn_qat-window", "compare", dict(mode="attn_qat", window=(8, 0), causal=True)),
            ("attn_qat-softcap-sinks", "compare", dict(mode="attn_qat", softcap=2.0, with_sinks=True, causal=True,
                                                       gqa=True)),
            ("attn_qat-bfloat16", "compare", dict(mode="attn_qat", dtype=torch.bfloat16, causal=True, gqa=True)),
            ("config-fp4-anchored", "compare", dict(config=dict(mode="fp4", p_quant="anchored"), causal=True)),
            ("module", "compare", dict(module=True, mode="attn_qat", causal=True, gqa=True, layout="bshd")),
            ("single-rank-groups", "compare", dict(subgroups=1, mode="attn_qat", causal=True, gqa=True)),
            ("errors", "errors", {}),
        ]
    else:
        for mode in ("bf16", "attn_qat", "fp4"):
            for causal in (False, True):
                cases.append((f"bshd-{mode}-{'causal' if causal else 'full'}-gqa", "compare",
                              dict(layout="bshd", mode=mode, causal=causal, gqa=True)))
        cases += [
            ("subgroups-of-2", "compare", dict(subgroups=2, mode="attn_qat", causal=True, gqa=True)),
            ("errors", "errors", {}),
        ]
    return cases


# ---- In the workers ---------------------------------------------------------------------------------


def _shard(full, layout, rank, world):
    """Rank `rank`'s contiguous sequence shard of a [B, H, S, D] tensor, in `layout`."""
    s = full.shape[2] // world
    part = full[:, :, rank * s:(rank + 1) * s]
    return (part if layout == "bhsd" else part.transpose(1, 2)).contiguous()


def _compare(rank, world, device, layout="bshd", mode=None, causal=False, gqa=False, dtype=torch.float32,
             seq=SEQ, head_dim=D, config=None, module=False, subgroups=None, window=None, softcap=0.0,
             with_sinks=False, **options):
    """One case: the forward output and dq, dk, dv (and dsinks) of ulysses_attention on this
    rank's shard against one attnqat.attention call on the full sequence; returns the failures."""
    fails = []

    def expect(ok, what):
        if not ok:
            fails.append(f"rank {rank}: {what}")

    group, g_rank, g_world = None, rank, world
    if subgroups:  # run inside groups of `subgroups` consecutive ranks (every rank creates every group)
        groups = [dist.new_group(list(range(i, i + subgroups))) for i in range(0, world, subgroups)]
        group, g_rank, g_world = groups[rank // subgroups], rank % subgroups, subgroups
    hq, hkv = _heads(world, gqa)
    gen = torch.Generator().manual_seed(1234)  # the same full tensors on every rank
    q, k, v = (torch.randn(B, h, seq, head_dim, generator=gen) for h in (hq, hkv, hkv))
    if options.get("qkv_scale") == "amax":
        # v (which does not touch the softmax, so every key keeps a gradient): head 0 of the last
        # rank's shard beyond the FP4 range (6 * 448 = 2688: g = 1 would saturate it), the odd
        # heads small everywhere. The global g is then large enough that the small heads' block
        # scales fall into E4M3's subnormals, while a g taken per rank's shard (before the
        # exchange: rank 0 has no large value) or per head group (after it: a group without
        # head 0) is smaller, and either changes the result (checked by mutating the module), so
        # only the global amax passes.
        v[:, 0, -seq // world:] *= 3000.0
        v[:, 1::2] *= 0.01
    q, k, v = (t.to(device, dtype) for t in (q, k, v))
    dout = torch.randn(B, hq, seq, head_dim, generator=gen).to(device, dtype)
    sinks = torch.randn(hq, generator=gen) if with_sinks else None
    extra = dict(window=window, softcap=softcap)
    if mode is not None:
        options["mode"] = mode
    explicit = dict(options, **(config or {}))

    # The reference: one call on the full sequence.
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    sinks_r = None if sinks is None else sinks.clone().requires_grad_()
    ref = attnqat.attention(qr, kr, vr, causal=causal, sinks=sinks_r, **extra, **explicit)
    trains = ref.requires_grad and explicit.get("mode", "attn_qat") != "fp4"
    if trains:
        ref.backward(dout)
    if explicit.get("mode", "attn_qat") != "bf16":  # the FP4 numerics took effect
        with torch.no_grad():
            plain = attnqat.attention(q, k, v, causal=causal, sinks=sinks, **extra, mode="bf16")
        expect(not torch.equal(ref, plain), "the FP4 reference equals the bf16 one")
        if "qkv_scale" in options:
            with torch.no_grad():
                unscaled = attnqat.attention(q, k, v, causal=causal, sinks=sinks, **extra,
                                             **dict(explicit, qkv_scale=None))
            expect(not torch.equal(ref, unscaled), "qkv_scale='amax' changes nothing in the reference")

    # Sequence parallel: this rank's shard.
    qs, ks, vs = (_shard(t, layout, g_rank, g_world).requires_grad_() for t in (q, k, v))
    sinks_s = None if sinks is None else sinks.clone().requires_grad_()
    if module:
        attn = UlyssesAttention(group=group, is_causal=causal, layout=layout, **options)
        out = attn(qs, ks, vs)
    elif config:
        with attnqat.config(**config):
            out = ulysses_attention(qs, ks, vs, group=group, causal=causal, sinks=sinks_s, layout=layout, **extra,
                                    **options)
    else:
        out = ulysses_attention(qs, ks, vs, group=group, causal=causal, sinks=sinks_s, layout=layout, **extra,
                                **options)
    expect(out.requires_grad == ref.requires_grad, "requires_grad differs from one call")
    if trains:
        out.backward(_shard(dout, layout, g_rank, g_world))
    elif out.requires_grad:  # fp4: the backward raises as a single call's does (on every rank)
        try:
            out.backward(_shard(dout, layout, g_rank, g_world))
            fails.append(f"rank {rank}: the fp4 backward did not raise")
        except ValueError as e:
            expect("has no backward" in str(e), f"the fp4 backward raised {e}")

    # Every rank got its own shard, and together the shards are the full tensors.
    gathered = [torch.empty_like(qs) for _ in range(g_world)]
    dist.all_gather(gathered, qs.detach().contiguous(), group=group)
    seq_axis = 2 if layout == "bhsd" else 1
    full_q = q if layout == "bhsd" else q.transpose(1, 2)
    expect(torch.equal(torch.cat(gathered, seq_axis), full_q), "the shards are not the full q")
    expect(g_world == 1 or not torch.equal(gathered[0], gathered[1]), "ranks 0 and 1 hold the same shard")

    expect(out.shape == qs.shape and out.dtype == qs.dtype, f"output {list(out.shape)} {out.dtype}")
    expect(torch.equal(out, _shard(ref.detach(), layout, g_rank, g_world)), "forward output differs from one call")
    expect(out.abs().amax() > 0.1, "trivial output")
    if g_world > 1:
        other = _shard(ref.detach(), layout, (g_rank + 1) % g_world, g_world)
        expect(not torch.equal(out, other), "the output equals another rank's shard")
    if trains:
        for name, mine, full in (("dq", qs.grad, qr.grad), ("dk", ks.grad, kr.grad), ("dv", vs.grad, vr.grad)):
            want = _shard(full, layout, g_rank, g_world)
            if not torch.equal(mine, want):
                err = float((mine.double() - want.double()).abs().max())
                fails.append(f"rank {rank}: {name} differs from one call (max abs {err:.3g})")
            expect(mine.abs().amax() > 0, f"{name} is zero")
        if sinks is not None:
            # Each rank's sinks gradient holds its heads; their sum over the group is one call's.
            local = sinks_s.grad.clone()
            heads = hq // g_world
            mine = torch.zeros(hq, dtype=torch.bool)
            mine[g_rank * heads:(g_rank + 1) * heads] = True
            expect(torch.equal(local[~mine], torch.zeros_like(local[~mine])), "dsinks outside this rank's heads")
            expect(local[mine].abs().amax() > 0, "dsinks is zero")
            dist.all_reduce(local, group=group)
            expect(torch.equal(local, sinks_r.grad), "dsinks summed over the ranks differs from one call")
    return fails


def _errors(rank, world):
    """The inputs that must raise: each raise happens on every rank (so no rank waits in a
    collective) before any data is exchanged, except the cross-rank checks (by design)."""
    fails = []

    def raises(fn, exc, *fragments):
        try:
            fn()
        except exc as e:
            missing = [f for f in fragments if f not in str(e)]
            if missing:
                fails.append(f"rank {rank}: {exc.__name__} without {missing}: {e}")
            return
        except Exception as e:  # noqa: BLE001  (reported, not raised: the ranks stay in step)
            fails.append(f"rank {rank}: expected {exc.__name__}, got {type(e).__name__}: {e}")
            return
        fails.append(f"rank {rank}: no {exc.__name__}")

    s = SEQ // world
    x = lambda h, n=s: torch.randn(B, n, h, D)  # noqa: E731  (bshd)
    # Heads not divisible by the world size.
    raises(lambda: ulysses_attention(x(world + 1), x(world + 1), x(world + 1), layout="bshd"), ValueError,
           f"q have {world + 1} heads, not a multiple of the world size {world}")
    raises(lambda: ulysses_attention(x(world * (world + 1)), x(world + 1), x(world + 1), layout="bshd"), ValueError,
           f"k and v have {world + 1} heads, not a multiple of the world size {world}")
    # GQA with fewer key/value heads than ranks: raises, suggesting to repeat them.
    raises(lambda: ulysses_attention(x(2 * world), x(1), x(1), layout="bshd"), ValueError,
           "1 heads, not a multiple", "repeat the key/value heads")
    # Shards of different lengths (a sequence not divisible by the world size): caught by the
    # cross-rank check on every rank, not by an aborting or garbage all-to-all.
    n = s + (16 if rank == world - 1 else 0)
    raises(lambda: ulysses_attention(x(world, n), x(world, n), x(world, n), layout="bshd"), ValueError,
           "the ranks pass different shapes", "divisible by the world size")
    # A NaN in the last rank's k with check_finite: every rank raises; that rank names the index.
    kn = x(world)
    if rank == world - 1:
        kn[1, 3, 0, 5] = float("nan")
    raises(lambda: ulysses_attention(x(world), kn, x(world), layout="bshd", check_finite=True), ValueError,
           *(["k (the shard of rank", "NaN at index (1, 3, 0, 5)"] if rank == world - 1 else
             [f"k contains NaN or Inf in the shard of rank {world - 1}"]))
    raises(lambda: ulysses_attention(x(world), x(world), x(world), layout="sbhd"), ValueError, "layout")
    raises(lambda: ulysses_attention(x(world), x(world), x(world), layout="bshd", sinks=torch.zeros(world + 1)),
           ValueError, f"sinks: expected None or a [Hq] = [{world}] tensor")
    raises(lambda: ulysses_attention(x(world), x(world), x(world), layout="bshd", mode="fp8"), ValueError, "mode")
    raises(lambda: ulysses_attention(x(world), x(world), x(world), layout="bshd", dropout=0.1), TypeError,
           "unknown option 'dropout'")
    raises(lambda: ulysses_attention(x(world), x(world), x(world).double(), layout="bshd"), ValueError,
           "the dtype and device of q")
    # After all that, the group still works.
    ok = ulysses_attention(x(world), x(world), x(world), layout="bshd", mode="bf16")
    if ok.shape != (B, s, world, D):
        fails.append(f"rank {rank}: shape {list(ok.shape)} after the error cases")
    return fails


def _worker(rank, world, suite, store, out_dir):
    torch.set_num_threads(1)
    if suite == "nccl":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if suite == "nccl" else "gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=30))
    results = {}
    for name, kind, params in _cases(suite, world):
        results[name] = _compare(rank, world, device, **params) if kind == "compare" else _errors(rank, world)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


# ---- In the test process -------------------------------------------------------------------------


def _run(suite, world):
    """Runs every case of `suite` on `world` processes; {case: failures of all ranks}."""
    # A fork server that has imported torch and attnqat once: the workers fork from it instead
    # of each importing torch (seconds per process on a 2-core machine). It never runs torch ops
    # itself (no CUDA context, no thread pools), so forking from it is safe.
    mp.get_context("forkserver").set_forkserver_preload(["torch", "torch.distributed", "attnqat"])
    with tempfile.TemporaryDirectory() as tmp:
        env = {"ATTNQAT_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            mp.start_processes(_worker, args=(world, suite, os.path.join(tmp, "store"), tmp), nprocs=world,
                               start_method="forkserver")
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key)
                else:
                    os.environ[key] = value
        merged = {}
        for rank in range(world):
            with open(os.path.join(tmp, f"rank{rank}.json")) as f:
                for name, fails in json.load(f).items():
                    merged.setdefault(name, []).extend(fails)
    return merged


@pytest.fixture(scope="module")
def results():
    """The results of a (suite, world size), run once for all its cases."""
    cache = {}

    def get(suite, world):
        key = (suite, world)
        if key not in cache:
            try:
                cache[key] = _run(suite, world)
            except Exception as e:  # noqa: BLE001  (a worker died: every case of this run fails, without rerunning)
                cache[key] = e
        if isinstance(cache[key], Exception):
            pytest.fail(f"the {world}-process {suite} run failed: {cache[key]}")
        return cache[key]

    return get


def _check(outcome, case):
    assert case in outcome, f"case {case} did not run"
    assert not outcome[case], "\n".join(outcome[case])


@pytest.mark.parametrize("world,case", [(w, name) for w in (2, 4) for name, _, _ in _cases("gloo", w)])
def test_ulysses_gloo_matches_one_call(results, world, case):
    _check(results("gloo", world), case)


# The NCCL run on every visible GPU (one process per GPU; a single GPU still runs the packing and
# the NCCL collectives of a 1-rank group). Bitwise expected as on the CPU: each rank runs the same
# per-head kernel work as one call; a failure would mean the kernels' bits depend on the head count.
_GPUS = min(torch.cuda.device_count(), 8) or 1


@pytest.mark.gpu
@pytest.mark.parametrize("case", [name for name, _, _ in _cases("nccl", _GPUS)])
def test_ulysses_nccl_matches_one_call(cuda, results, case):
    _check(results("nccl", _GPUS), case)


def test_needs_an_initialized_process_group():
    assert not dist.is_initialized()
    q = torch.randn(1, 2, 16, D)
    with pytest.raises(RuntimeError, match="init_process_group"):
        ulysses_attention(q, q, q)


def test_module_checks_its_options():
    with pytest.raises(ValueError, match="layout"):
        UlyssesAttention(layout="sbhd")
    with pytest.raises(ValueError, match="mode"):
        UlyssesAttention(mode="fp8")
    with pytest.raises(TypeError, match="is_causal"):
        UlyssesAttention(is_causal="yes")
