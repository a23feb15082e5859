"""attnqat: 4-bit (NVFP4) attention with quantization-aware training.

The public API (numpy arrays and torch tensors alike):

- :func:`quantize_nvfp4`, :func:`quantize_mxfp4` -> :class:`QuantizedTensor` (packed codes,
  scales, second-level scale, block axis; ``.dequantize()``), :func:`fake_quantize`.
- :func:`attention` — FlashAttention-style attention in the Attn-QAT modes ``bf16``, ``fp4``,
  ``drop_in_qat`` and ``attn_qat``, differentiable for torch tensors; :func:`attention_varlen` —
  the same over packed sequences of different lengths (FlashAttention's varlen layout).
- :func:`build_info` — what this build contains (CUDA kernels or CPU reference only).
- FP4 inference (:mod:`attnqat.decode`): :func:`attention_packed` (attention from packed NVFP4
  Q, K, V), :class:`FP4KVCache` (a paged KV cache stored as packed NVFP4, with append and decode
  attention), :func:`kv_cache_append` and :func:`decode_attention` on explicit page tables.

With torch installed, the integration layer (``docs/integration.md``; without torch these names
raise ``ImportError``: install torch with ``pip install attnqat[torch]``):

- :func:`sdpa` — a drop-in for ``torch.nn.functional.scaled_dot_product_attention``;
  :func:`config` / :func:`set_config` / :func:`get_config` — the options it and the modules use;
  :class:`nn.FP4Attention` — the module; :func:`merge_attention` — context-parallel merging;
  :mod:`attnqat.hf` — the Hugging Face transformers attention implementation (``hf.register()``).

CPU inputs run the reference implementation of ``docs/numerics.md``; CUDA tensors run the
kernels when the package was built with CUDA.
"""

import importlib.abc as _importlib_abc
import sys as _sys

from ._C import build_info as _build_info
from ._util import torch_import_error as _torch_import_error
from ._util import torch_missing_error as _torch_missing_error
from .attention import attention, attention_varlen
from .decode import FP4KVCache, attention_packed, decode_attention, kv_cache_append
from .formats import QuantizedTensor, dequantize, fake_quantize, quantize_mxfp4, quantize_nvfp4

# The torch-only part of the API. Without torch (or with a torch that fails to import) these names
# and modules raise ImportError("... install torch (pip install attnqat[torch])") on use, while the
# numpy API above keeps working.
_TORCH_ONLY_NAMES = ("config", "get_config", "hf", "merge_attention", "nn", "reset_config", "sdpa", "set_config")
_TORCH_ONLY_MODULES = ("_torch_ops", "diffusers", "distributed", "functional", "hf", "hf_cache", "nn")
_TORCH_ERROR = _torch_import_error()

if _TORCH_ERROR is None:
    from . import _torch_ops  # noqa: F401  (registers torch.ops.attnqat.*)
    from . import hf, nn  # noqa: F401  (hf imports transformers only in hf.register())
    from ._config import config, get_config, reset_config, set_config
    from .functional import merge_attention, sdpa
else:

    def __getattr__(name):
        if name in _TORCH_ONLY_NAMES:
            raise _torch_missing_error(f"attnqat.{name}", _TORCH_ERROR)
        raise AttributeError(f"module 'attnqat' has no attribute {name!r}")

    class _TorchOnlyModules(_importlib_abc.MetaPathFinder):
        """Makes `import attnqat.nn` (etc.) raise the same error instead of 'No module named torch'."""

        def find_spec(self, fullname, path=None, target=None):
            prefix, _, sub = fullname.rpartition(".")
            if prefix == __name__ and sub in _TORCH_ONLY_MODULES:
                raise _torch_missing_error(fullname, _TORCH_ERROR)
            return None

    _sys.meta_path.insert(0, _TorchOnlyModules())

__version__ = _build_info()["version"]


def build_info() -> dict:
    """What this build of attnqat contains.

    Returns a dict with ``version``, ``cuda`` (True when CUDA kernels are compiled in),
    ``cuda_archs`` (e.g. ``"90a;100a;120a"``), ``cuda_version`` and ``torch`` (the installed
    torch version, or None when torch is not installed; the package works without it on numpy
    arrays).
    """
    info = dict(_build_info())
    info["torch"] = _sys.modules["torch"].__version__ if _TORCH_ERROR is None else None
    return info


__all__ = [
    "FP4KVCache",
    "QuantizedTensor",
    "attention",
    "attention_packed",
    "attention_varlen",
    "build_info",
    "decode_attention",
    "dequantize",
    "fake_quantize",
    "kv_cache_append",
    "quantize_mxfp4",
    "quantize_nvfp4",
]
if _TORCH_ERROR is None:
    __all__ += list(_TORCH_ONLY_NAMES)
