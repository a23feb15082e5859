"""Shared fixtures. GPU tests carry the `gpu` marker: CI deselects them (`-m "not gpu"`), the GPU
machine runs them (`-m gpu`, via tools/gpu_check.sh) and they fail, never skip, without a GPU."""

import pytest
import torch


@pytest.fixture
def cuda():
    assert torch.cuda.is_available(), "GPU test run without a CUDA device"
    import attnqat

    assert attnqat.build_info()["cuda"], "GPU test run on a build without CUDA kernels"
    return torch.device("cuda")


def rel_err(a, b) -> float:
    a, b = a.double(), b.double()
    if torch.isnan(a).any() or torch.isnan(b).any():
        return float("inf")
    den = b.norm()
    return float((a - b).norm() / den) if den > 0 else float((a - b).norm())
