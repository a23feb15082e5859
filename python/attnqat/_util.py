"""Small helpers shared by the public modules: torch detection without importing torch, and the
error that every torch-only entry point raises when torch is missing."""

import sys

INSTALL_TORCH = "install torch (pip install attnqat[torch])"


def torch_missing_error(what: str, cause: BaseException = None) -> ImportError:
    """The ImportError for a torch-only entry point `what` (e.g. ``"attnqat.sdpa"``)."""
    detail = f" (import torch failed: {cause})" if cause is not None else ""
    err = ImportError(f"{what} needs PyTorch, which is not available{detail}: {INSTALL_TORCH}")
    err.name = "torch"
    return err


def torch_import_error():
    """None when ``import torch`` works, else the exception it raises (torch missing or broken)."""
    if sys.modules.get("torch") is not None:
        return None
    try:
        import torch  # noqa: F401
    except (ImportError, OSError) as e:  # OSError: a torch wheel whose shared libraries are missing
        return e
    return None


def is_torch_tensor(x) -> bool:
    """True for a torch.Tensor, without importing torch when it is not loaded already."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def torch_ops():
    """The module that registers the torch custom ops (imported on first use)."""
    err = torch_import_error()
    if err is not None:
        raise torch_missing_error("the attnqat torch ops", err) from err
    from . import _torch_ops

    return _torch_ops
