"""attnqat without torch: the numpy API works, and every torch-only entry point raises ImportError
telling the user to install torch. Runs in a subprocess in which `import torch` fails
(``sys.modules["torch"] = None``), since this test process has torch loaded."""

import json
import subprocess
import sys
import textwrap

MESSAGE = "install torch (pip install attnqat[torch])"

SCRIPT = textwrap.dedent(
    r"""
    import importlib, json, sys
    sys.modules["torch"] = None            # hide torch: `import torch` raises ImportError
    import numpy as np
    import attnqat

    out = {"torch_in_build_info": attnqat.build_info()["torch"], "all": sorted(attnqat.__all__)}

    # numpy-only use: attention (bf16 mode against a numpy softmax reference, fp4 mode), quantization
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 2, 16, 64)).astype(np.float32) for _ in range(3))
    s = q @ k.transpose(0, 1, 3, 2) / 8.0
    p = np.exp(s - s.max(-1, keepdims=True))
    ref = (p / p.sum(-1, keepdims=True)) @ v
    o = attnqat.attention(q, k, v, mode="bf16")
    out["bf16_err"] = float(np.abs(o - ref).max())
    o4 = attnqat.attention(q, k, v, mode="fp4")
    out["fp4_err"] = float(np.abs(o4 - ref).max())
    packed = attnqat.quantize_nvfp4(k)
    out["quant_exact"] = bool(np.array_equal(packed.dequantize(), attnqat.fake_quantize(k)))

    def error_of(fn):
        try:
            fn()
        except ImportError as e:
            return "ImportError: " + str(e)
        except Exception as e:
            return type(e).__name__ + ": " + str(e)
        return None

    errors = {}
    for name in ["sdpa", "nn", "hf", "config", "set_config", "get_config", "reset_config", "merge_attention"]:
        errors["attnqat." + name] = error_of(lambda: getattr(attnqat, name))
    errors["from attnqat import sdpa"] = error_of(lambda: exec("from attnqat import sdpa"))
    for mod in ["attnqat.nn", "attnqat.hf", "attnqat.functional", "attnqat.hf_cache", "attnqat._torch_ops"]:
        errors["import " + mod] = error_of(lambda: importlib.import_module(mod))
    errors["_util.torch_ops()"] = error_of(lambda: attnqat._util.torch_ops())
    out["errors"] = errors
    out["hasattr_other"] = hasattr(attnqat, "no_such_name")
    print(json.dumps(out))
    """
)


def run_without_torch():
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_without_torch():
    out = run_without_torch()
    # numpy use keeps working
    assert out["torch_in_build_info"] is None
    assert out["bf16_err"] < 1e-4
    assert 1e-3 < out["fp4_err"] < 1.0
    assert out["quant_exact"]
    assert "sdpa" not in out["all"] and "attention" in out["all"]
    # every torch-only entry point says how to get torch
    for what, err in out["errors"].items():
        assert err is not None, f"{what}: no error without torch"
        assert err.startswith("ImportError: ") and MESSAGE in err, f"{what}: {err}"
    assert out["hasattr_other"] is False
