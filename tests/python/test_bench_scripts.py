"""The GPU benchmark scripts bench/bench_diffusion.py, bench_eager.py and bench_model.py on the
CPU: `--help` runs, a run without a GPU stops with a message, and each script's `--smoke` run
(the CPU reference at tiny shapes, host-clock timing) goes through every code path and writes a
complete JSON and headline entries. Their numbers mean nothing; what is checked is structure, plus
the attention outputs' agreement with the SDPA baseline where the scripts record it."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "bench"
SCRIPTS = ("bench_diffusion", "bench_eager", "bench_model")


def load(name):
    """The script as a module (once per session; registered, as dataclasses need)."""
    key = f"attnqat_bench_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


def results(out: Path, kind: str):
    (path,) = out.glob(f"{kind}_cpu-smoke_*.json")
    return json.loads(path.read_text()), json.loads((out / "headline.json").read_text())


def test_help_runs():
    """Each script run as __main__ with --help, in one fresh interpreter (torch imports once)."""
    code = (
        "import runpy, sys\n"
        "for path in sys.argv[1:]:\n"
        "    sys.argv = [path, '--help']\n"
        "    try:\n"
        "        runpy.run_path(path, run_name='__main__')\n"
        "    except SystemExit as e:\n"
        "        print(f'=== {path} exit {e.code}', flush=True)\n"
    )
    paths = [str(BENCH / f"{name}.py") for name in SCRIPTS]
    proc = subprocess.run([sys.executable, "-c", code, *paths], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    chunks = proc.stdout.split("=== ")
    for path, chunk, tail in zip(paths, chunks, chunks[1:]):
        assert tail.startswith(f"{path} exit 0"), (path, tail, proc.stderr)
        assert "usage:" in chunk and "--quick" in chunk and "--smoke" in chunk and "--out" in chunk, chunk


@pytest.mark.parametrize("name", SCRIPTS)
def test_quick_and_defaults_parse(name):
    module = load(name)
    full, quick = module.parse_args([]), module.parse_args(["--quick"])
    assert full.out is None and quick.quick and not full.quick
    assert quick.reps <= full.reps


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
@pytest.mark.parametrize("name", SCRIPTS)
def test_without_gpu_stops_with_a_message(name, tmp_path):
    module = load(name)
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        module.main(["--quick", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--smoke needs --out"):
        module.main(["--smoke"])
    assert not any(tmp_path.iterdir())


def test_diffusion_smoke(tmp_path):
    load("bench_diffusion").main(["--smoke", "--out", str(tmp_path)])
    data, headline = results(tmp_path, "diffusion")
    rows = data["rows"]
    cases = {"wan_1.3b_self", "wan_14b_self", "wan_cross_text_mask", "flux_joint", "wan_1.3b_self_diffusers_layout"}
    assert {r["case"] for r in rows} == cases
    for case in cases:  # every implementation ran on every case
        expected = {("sdpa", "fwd+bwd"), ("attnqat attn_qat", "fwd+bwd"), ("sdpa", "fwd"), ("attnqat fp4", "fwd")}
        if case == "wan_cross_text_mask":
            expected |= {("attnqat attn_qat mask4d", "fwd+bwd"), ("attnqat fp4 mask4d", "fwd")}
        assert {(r["impl"].split("-")[0], r["pass"]) for r in rows if r["case"] == case} == expected
    masked = [r for r in rows if r["case"] == "wan_cross_text_mask"]
    assert all(r["text_lengths"] == [32, 7] and r["layout"].startswith("BSHD") for r in masked)
    # FP4 attention on Gaussian inputs is ~0.17-0.19 from exact attention (measured: Q, K, V, P
    # in E2M1 with 16-element blocks); 0.3 leaves margin. An ignored text mask, or exact attention
    # run by mistake (~1e-3: bf16 rounding only), would fall outside [0.05, 0.3].
    for r in rows:
        if r["impl"].startswith("attnqat"):
            assert 0.05 < r["rel_err_vs_baseline"] < 0.3, r
    entry = headline["wan_fwd_bwd_attn_qat_vs_cudnn"]
    assert entry["target"] == 0.8 and entry["value"] > 0 and entry["source"].endswith(".json")


def test_eager_smoke(tmp_path):
    load("bench_eager").main(["--smoke", "--out", str(tmp_path)])
    data, headline = results(tmp_path, "eager")
    impls = {r["impl"] for r in data["rows"]}
    assert impls == {"cudnn fwd", "cudnn fwd+bwd", "attnqat fp4 fwd", "attnqat bf16 fwd", "attnqat attn_qat fwd",
                     "attnqat attn_qat fwd+bwd"}
    profile = data["host_profile"]
    assert profile["torch_profiler_cpu_ops"] and profile["cprofile_functions"]
    assert any("attnqat" in op["op"] for op in profile["torch_profiler_cpu_ops"])
    ratio = headline["eager_over_graph_fp4_fwd_n4k"]
    assert ratio["better"] == "lower" and ratio["target"] == 1.10
    assert headline["fwd_fp4_vs_cudnn_d128_eager_n4k"]["target"] == 0.7


def test_model_smoke(tmp_path):
    load("bench_model").main(["--smoke", "--out", str(tmp_path)])
    data, headline = results(tmp_path, "model")
    train = [r for r in data["rows"] if r["part"] == "train_step"]
    assert {r["attention"] for r in train} == {"sdpa", "attnqat"}
    # Same weights and tokens: the first losses (~ln 512 = 6.24) differ by the FP4 attention's
    # noise only, measured 1.6e-3 apart; without the attention's contribution (o_proj zeroed) the
    # loss moves by 1.9e-2, so 5e-3 catches an attention path that does not work.
    assert abs(train[0]["first_loss"] - train[1]["first_loss"]) < 5e-3
    gen = {r["cache"]: r for r in data["rows"] if r["part"] == "generate"}
    assert set(gen) == {"FP4Cache", "DynamicCache (bf16)"}
    assert gen["FP4Cache"]["cache_bytes_per_token"] < gen["DynamicCache (bf16)"]["cache_bytes_per_token"]
    # On the CPU reference FP4Cache generation is bit-identical to the default cache (docs/integration.md).
    assert headline["model_generate_fp4cache_vs_bf16cache"]["token_agreement"] == 1.0
    assert "model_train_step_attn_qat_vs_sdpa_64" in headline


def test_headline_direction():
    sys.path.insert(0, str(BENCH))
    import common

    assert common.target_met({"value": 1.05, "target": 1.1, "better": "lower"}) is True
    assert common.target_met({"value": 1.2, "target": 1.1, "better": "lower"}) is False
    assert common.target_met({"value": 0.8, "target": 0.7}) is True
    assert common.target_met({"value": 0.6, "target": 0.7}) is False
    assert common.target_met({"value": 0.6, "target": None}) is None
    with pytest.raises(ValueError, match="better"):
        common.target_met({"value": 1.0, "target": 1.0, "better": "smaller"})
