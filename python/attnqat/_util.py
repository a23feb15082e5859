"""Small helpers shared by the public modules: torch detection without importing torch."""

import sys


def is_torch_tensor(x) -> bool:
    """True for a torch.Tensor, without importing torch when it is not loaded already."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def torch_ops():
    """The module that registers the torch custom ops (imported on first use)."""
    from . import _torch_ops

    return _torch_ops
