"""CPU smoke test of the reproduction study (examples/reproduce): data preparation on a
synthetic corpus, the tiny preset end to end (every arm, the FP4 evaluation of the BF16
checkpoint), resuming, the time limit, and the table/report generation. No network, no
matplotlib; the GPU study itself runs on the GPU machine (docs/reproduction.md)."""

import json
import math
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPRO = Path(__file__).resolve().parents[2] / "examples" / "reproduce"
sys.path.insert(0, str(REPRO))

import data as data_mod  # noqa: E402
import plot as plot_mod  # noqa: E402
import report as report_mod  # noqa: E402

ARMS = ["bf16", "drop_in_qat", "attn_qat_paper", "attn_qat_anchored", "ablation_hp_p_bwd", "ablation_lp_o_bwd"]
WORDS = ("the kernel driver memory page device interrupt lock queue buffer register module thread scheduler "
         "file system network packet timer clock power bus controller must should may not be is are to of and "
         "in for with on by when if this that each every all any").split()


def _corpus(root: Path, n_files: int = 120) -> Path:
    """A deterministic pseudo-English corpus of .rst/.txt files (plus files that must be skipped)."""
    rng = random.Random(7)
    for i in range(n_files):
        sub = root / ("core" if i % 3 else "drivers")
        sub.mkdir(parents=True, exist_ok=True)
        lines = []
        for _ in range(rng.randint(8, 20)):
            words = [rng.choice(WORDS) for _ in range(rng.randint(5, 14))]
            lines.append(" ".join(words).capitalize() + ".")
        (sub / f"doc_{i:03d}.{'rst' if i % 2 else 'txt'}").write_text(f"Title {i}\n========\n\n" + "\n".join(lines) + "\n")
    (root / "translations").mkdir(exist_ok=True)
    (root / "translations" / "skip.rst").write_text("not English, skipped\n")
    (root / "core" / "image.svg").write_text("<svg/>")
    return root


def _run(args, timeout=150):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    p = subprocess.Popen([sys.executable, str(REPRO / "run.py"), *map(str, args)], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        raise AssertionError(f"run.py timed out after {timeout} s\n{out[-4000:]}")
    return p.returncode, out


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    src = _corpus(tmp_path_factory.mktemp("corpus"))
    out = tmp_path_factory.mktemp("data")
    manifest = data_mod.prepare_from_dir(src, out, val_fraction=0.1)
    return out, manifest


def test_data_preparation(prepared, tmp_path):
    out, m = prepared
    train, val = (out / "train.bin").read_bytes(), (out / "val.bin").read_bytes()
    assert m["files"]["train"] + m["files"]["val"] == 120 and m["files"]["val"] > 0
    assert m["outputs"]["train.bin"]["tokens"] == len(train) and m["outputs"]["val.bin"]["tokens"] == len(val)
    assert train.count(0) == m["files"]["train"] and val.count(0) == m["files"]["val"]  # one EOD per file
    assert b"not English" not in train + val and b"<svg" not in train + val
    assert data_mod.verify(out)["outputs"] == m["outputs"]
    # deterministic: the same corpus gives the same bytes; the split is by file path
    m2 = data_mod.prepare_from_dir(_corpus(tmp_path / "again"), tmp_path / "d2", val_fraction=0.1)
    assert m2["outputs"] == m["outputs"]
    assert (out / ".gitignore").read_text() == "*\n"


def test_tiny_study_end_to_end(prepared, tmp_path):
    data_dir, manifest = prepared
    out = tmp_path / "run"
    rc, log = _run(["--preset", "tiny", "--data", data_dir, "--out", out])
    assert rc == 0, log[-4000:]
    res = json.loads((out / "results.json").read_text())
    assert res["complete"] and res["data"]["outputs"] == manifest["outputs"]
    cfg = res["config"]
    # 1-2: the pretraining and the FP4 evaluation of its BF16 checkpoint
    pre = res["pretrain"]
    assert len(pre["train_loss"]) == len(pre["grad_norm"]) == cfg["pretrain"]["steps"]
    assert all(x is not None and math.isfinite(x) for x in pre["train_loss"] + pre["grad_norm"])
    assert pre["eval_curve"][-1]["bf16"] < pre["eval_curve"][0]["bf16"] - 0.5, "pretraining did not learn"
    ce = res["checkpoint_eval"]
    for m in ("bf16", "fp4_paper", "fp4_anchored"):
        assert math.isfinite(ce[m])
    assert ce["fp4_paper"] != ce["bf16"]  # FP4 attention changes the model's output
    # 3-4: every arm, same number of steps, finite curves, statistics
    assert sorted(res["runs"]) == sorted(f"{a}/s0" for a in ARMS)
    for key, r in res["runs"].items():
        assert r["steps_done"] == cfg["arms"]["steps"] and r["diverged_at"] is None, key
        assert r["init_checkpoint_sha256"] == pre["checkpoint"]["sha256"]
        assert len(r["grad_norm"]) == cfg["arms"]["steps"] and all(g > 0 for g in r["grad_norm"])
        assert all(math.isfinite(r["final_eval"][m]) for m in ("bf16", "fp4_paper", "fp4_anchored")), key
        assert r["eval_curve"][0]["step"] == 0 and r["eval_curve"][-1]["step"] == cfg["arms"]["steps"]
        assert {"spikes", "median", "max"} <= set(r["grad_norm_stats"])
    # every arm starts from the same checkpoint: identical step-0 evaluations
    assert len({json.dumps(r["eval_curve"][0], sort_keys=True) for r in res["runs"].values()}) == 1
    assert set(res["summary"]) == set(ARMS)
    assert res["arms"]["drop_in_qat"]["train"]["mode"] == "drop_in_qat"
    assert res["arms"]["attn_qat_anchored"]["train"]["p_quant"] == "anchored"
    assert res["arms"]["ablation_hp_p_bwd"]["train"]["bwd_quant_p"] is False
    assert res["arms"]["ablation_lp_o_bwd"]["train"]["bwd_high_precision_o"] is False
    assert len(list(out.glob("pretrain_ckpt_*.pt"))) == len(pre["checkpoint"]["files"])

    # resuming: nothing is trained again
    rc, log2 = _run(["--preset", "tiny", "--data", data_dir, "--out", out])
    assert rc == 0 and "resuming" in log2, log2[-3000:]
    assert not [ln for ln in log2.splitlines() if ln.startswith(("[pretrain]", "== pretraining", "[bf16/s0]"))], log2
    assert json.loads((out / "results.json").read_text())["runs"].keys() == res["runs"].keys()

    # the table and the report section, from the results (no matplotlib)
    table = plot_mod.make_table(res)
    assert all(f"`{a}`" in table for a in ARMS) and "BF16 checkpoint" in table
    doc = tmp_path / "doc.md"
    doc.write_text("# x\n\n<!-- results:tiny:begin -->\nold\n<!-- results:tiny:end -->\n\nreading by hand\n")
    assert report_mod.main([str(out / "results.json"), "--doc", str(doc), "--figures", str(tmp_path)]) == 0
    text = doc.read_text()
    assert "old" not in text and "reading by hand" in text and "FP4 attention on the BF16 checkpoint" in text
    assert all(f"`{a}`" in text for a in ARMS)


def test_time_limit_stops_cleanly(prepared, tmp_path):
    data_dir, _ = prepared
    out = tmp_path / "limited"
    rc, log = _run(["--preset", "tiny", "--data", data_dir, "--out", out, "--max-minutes", "0"], timeout=90)
    assert rc == 75 and "STOPPED" in log, log[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert not res["complete"] and res["pretrain"] is None and res["runs"] == {}


def test_gpu_preset_estimate_fits_the_budget():
    """The GPU preset is sized to finish on one H100 in 20 minutes (estimate with stated assumptions)."""
    import run as run_mod

    cfg = run_mod.resolve_config(run_mod.parse_args(["--preset", "gpu"]))
    est = run_mod.estimate(cfg)
    assert est["total_s"] < 20 * 60
    assert 1024 <= cfg["model"]["ctx"] <= 2048 and cfg["model"]["head_dim"] in (64, 128)
