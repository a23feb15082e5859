#!/usr/bin/env bash
# Sets up a Python virtual environment with pinned dependencies and installs attnqat into it
# (the C++ core, the CPU reference, and the CUDA kernels when a CUDA toolkit is found).
#
#   tools/setup.sh                     # venv in .venv
#   ATTNQAT_VENV=/path tools/setup.sh  # another venv (CI keeps one in its cache directory)
#   ATTNQAT_CUDA=OFF tools/setup.sh    # CPU-only build even where nvcc exists
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${ATTNQAT_VENV:-.venv}
PY=${PYTHON:-python3}
# Pinned versions (the device image has torch 2.11 too). Bump them together.
# transformers: the Hugging Face integration tests (tests/python/test_hf.py, examples); attnqat itself
# does not need it (tested with 4.57 and 5.24).
PINS="torch==2.11.0 numpy==2.2.6 pytest==8.4.2 hypothesis==6.140.2 nanobind==2.9.2 scikit-build-core==0.11.6 ninja==1.13.0 cmake==4.1.2 transformers==5.24.0"

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
if [ "$(cat "$VENV/.attnqat-pins" 2>/dev/null)" != "$PINS" ]; then
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # shellcheck disable=SC2086
  "$VENV/bin/python" -m pip install -q $PINS
  echo "$PINS" > "$VENV/.attnqat-pins"
fi
export PATH="$(cd "$VENV" && pwd)/bin:$PATH"  # its cmake and ninja build the package
"$VENV/bin/python" -m pip install -q --no-build-isolation --no-deps .
"$VENV/bin/python" -c "import attnqat, json; print('attnqat installed:', json.dumps(attnqat.build_info()))"
