#!/usr/bin/env bash
# Runs the tests that need no GPU: the C++ tests (ctest, label cpu) and the Python tests
# (pytest, not marked gpu) against the installed package (tools/setup.sh installs it).
# GPU tests: tools/gpu_check.sh OUTDIR on a GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${ATTNQAT_VENV:-.venv}
JOBS=${JOBS:-$(nproc)}
export PATH="$(cd "$VENV" && pwd)/bin:$PATH"  # the pinned cmake and ninja
cmake --preset cpu >/dev/null
cmake --build --preset cpu -j "$JOBS"
ctest --preset cpu -j "$JOBS"
# The build choices tools/setup.sh made for this venv (CUDA on/off, architectures), so that the
# reinstall below reuses its build instead of reconfiguring it.
[ -f "$VENV/.attnqat-build-env" ] && . "$VENV/.attnqat-build-env"
echo "reinstalling attnqat from the sources (pip install --no-deps .)"
"$VENV/bin/python" -m pip install -q --no-build-isolation --no-deps .  # pick up source changes
"$VENV/bin/python" -m pytest tests/python -m "not gpu" -q
