"""CPU smoke tests of the examples with tiny settings: they run to the end, print what they promise
and their own checks (falling loss, DDP replicas in sync, FSDP2 following DDP) pass. The 2-GPU run
of examples/train_ddp_fsdp.py is the lead's (docs/integration.md)."""

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def run(args, timeout=120):
    """Runs `python args...` in its own process group, killed as a whole on timeout."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=env, start_new_session=True)
    try:
        stdout, stderr = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        stdout, stderr = p.communicate()
        raise AssertionError(f"timed out after {timeout} s\n--- stdout\n{stdout[-3000:]}\n--- stderr\n{stderr[-3000:]}")
    assert p.returncode == 0, f"exit {p.returncode}\n--- stdout\n{stdout[-3000:]}\n--- stderr\n{stderr[-3000:]}"
    return stdout


def test_finetune_then_serve(tmp_path):
    text = tmp_path / "corpus.txt"
    words = "the quick brown fox jumps over a lazy dog while attention learns to quantize".split()
    text.write_text(" ".join(words[(i * 7) % len(words)] for i in range(1500)))
    out = run([EXAMPLES / "finetune_qat.py", text, "--hidden", "64", "--layers", "2", "--seq", "48", "--batch", "4",
               "--bf16-steps", "12", "--steps", "12", "--log-every", "4", "--eval-batches", "1",
               "--out", tmp_path / "model"])
    qat = [float(x) for x in re.findall(r"\[attn_qat\] step +\d+ +loss ([\d.]+)", out)]
    assert len(qat) >= 2 and qat[-1] < qat[0], out
    assert "held-out loss after QAT" in out and (tmp_path / "model" / "config.json").exists()
    out = run([EXAMPLES / "serve_fp4.py", "--model-dir", tmp_path / "model", "--max-new-tokens", "6", "--compare",
               "--prompt", "the quick ", "--prompt", "a"])
    assert "fp4 attention: 12 tokens" in out and "generated tokens equal to fp4's" in out, out


def test_train_ddp_fsdp_torchrun_gloo():
    out = run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", EXAMPLES / "train_ddp_fsdp.py",
               "--device", "cpu", "--steps", "4", "--seq", "48", "--batch", "2", "--dim", "64"], timeout=60)
    assert "[ddp] loss per step" in out and "[fsdp2] loss per step" in out and out.rstrip().endswith("OK"), out


def test_serve_fp4_with_the_fp4_kv_cache():
    out = run([EXAMPLES / "serve_fp4.py", "--device", "cpu", "--fp4-cache", "--max-new-tokens", "6", "--hidden", "128",
               "--layers", "2", "--page-size", "16", "--prompt", "the quick ", "--prompt", "a"])
    # On the CPU reference, generation through the FP4 pages gives the tokens of the default cache.
    assert "cache 144 bytes per token (bf16 cache: 512)" in out and "tokens equal to the bf16-cache run: 100.0%" in out, out
