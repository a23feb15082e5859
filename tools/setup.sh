#!/usr/bin/env bash
# Sets up a Python virtual environment with pinned dependencies and installs attnqat into it
# (the C++ core, the CPU reference, and the CUDA kernels for this machine's GPU). Prints each step
# before it runs and how long it took.
#
#   tools/setup.sh                          # venv in .venv
#   ATTNQAT_VENV=/path tools/setup.sh       # another (or an existing) venv; CI keeps one in its cache
#
# What gets built (ATTNQAT_CUDA, ATTNQAT_CUDA_ARCHS):
#   default: the CUDA kernels for the local GPU's architecture only (nvidia-smi compute_cap, e.g.
#            9.0 -> 90a) when a GPU and nvcc are found; the CPU library only when there is no GPU.
#            With CI=true: every architecture (90a;100a;120a) when nvcc is found, GPU or not.
#   ATTNQAT_CUDA=OFF|ON|AUTO                CPU-only / kernels required / kernels when nvcc is found
#   ATTNQAT_CUDA_ARCHS=all|90a|"90a;100a"   the kernels' architectures (all = 90a;100a;120a);
#                                           an explicit -DATTNQAT_CUDA_ARCHS in CMAKE_ARGS wins
#
# Where torch comes from (ATTNQAT_TORCH):
#   auto     (default) PyPI's torch, except on a machine without a GPU (and outside CI) that
#            reaches download.pytorch.org: its CPU-only wheel there
#   pypi     torch from PyPI: on Linux x86_64 this wheel pulls in its CUDA libraries (about 2.8 GB
#            download, a 5 GB venv) even on a machine without a GPU; there is no smaller torch on PyPI
#   cpu      the CPU-only wheel from https://download.pytorch.org/whl/cpu (a few hundred MB)
#   system   no download: reuse the torch that ATTNQAT_VENV already has, or, for a new venv, the
#            one of $PYTHON (the venv is created with --system-site-packages); torch >= 2.4
#   none     no torch: the numpy API only (the demo and the tests need torch)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${ATTNQAT_VENV:-.venv}
PY=${PYTHON:-python3}
TORCH_MODE=${ATTNQAT_TORCH:-auto}
# Pinned versions (the device image has torch 2.11 too). Bump them together.
# transformers: the Hugging Face integration tests (tests/python/test_hf.py, examples); attnqat itself
# does not need it (tested with 4.57 and 5.24).
TORCH_PIN="torch==2.11.0"
OTHER_PINS="numpy==2.2.6 pytest==8.4.2 hypothesis==6.140.2 nanobind==2.9.2 scikit-build-core==0.11.6 ninja==1.13.0 cmake==4.1.2 transformers==5.24.0 diffusers==0.42.1"
TORCH_CPU_INDEX="https://download.pytorch.org/whl/cpu"
ALL_ARCHS="90a;100a;120a"

T_START=$SECONDS
STEP=0
STEP_T0=$SECONDS
STEP_NAME=""
SUMMARY=()
step() {  # step NAME [WHAT TO EXPECT]: announces a step (and closes the previous one)
  step_done
  STEP=$((STEP + 1)) STEP_NAME=$1 STEP_T0=$SECONDS
  echo
  echo "==> [$STEP] $1${2:+ ($2)}"
}
step_done() {
  if [ -n "$STEP_NAME" ]; then
    local dt=$((SECONDS - STEP_T0))
    echo "    [$STEP] done in ${dt}s"
    SUMMARY+=("$(printf '%-44s %5ds' "$STEP_NAME" "$dt")")
    STEP_NAME=""
  fi
}
die() { echo "tools/setup.sh: error: $*" >&2; exit 1; }
LOG_DIR=$(mktemp -d "${TMPDIR:-/tmp}/attnqat-setup.XXXXXX")
trap 'rm -rf "$LOG_DIR"' EXIT

# pip with its normal output (progress bars on a terminal); its log gives the total it downloaded.
pip_install() {
  local log="$LOG_DIR/pip.$STEP.log" rc=0
  "$VENV/bin/python" -m pip install --log "$log" "$@" || rc=$?
  "$VENV/bin/python" - "$log" <<'EOF' || true
import re, sys
units = {"kB": 1e3, "MB": 1e6, "GB": 1e9}
found = dict(re.findall(r"Downloading (\S+) \(([\d.]+ [kMG]B)\)", open(sys.argv[1]).read()))
total = sum(float(s.split()[0]) * units[s.split()[1]] for s in found.values())
if found:
    print(f"    downloaded {len(found)} files, {total / 1e6:,.0f} MB")
EOF
  return $rc
}

# ---- 1. prerequisites and the build plan ---------------------------------------------------------
step "checking prerequisites"
command -v "$PY" >/dev/null || die "no $PY: install Python >= 3.9 (or set PYTHON=/path/to/python3)"
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 9))' \
  || die "$PY is Python $("$PY" -c 'import platform; print(platform.python_version())'); attnqat needs >= 3.9 (set PYTHON=...)"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -c 'import venv, ensurepip' 2>/dev/null \
    || die "$PY has no working venv module (Debian/Ubuntu: apt-get install python3-venv)"
fi
echo "    python: $("$PY" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
CXX_FOUND=${CXX:-}
[ -n "$CXX_FOUND" ] || CXX_FOUND=$(command -v c++ || command -v g++ || command -v clang++ || true)
[ -n "$CXX_FOUND" ] || die "no C++17 compiler (c++, g++ or clang++; Debian/Ubuntu: apt-get install g++)"
echo "    C++ compiler: $CXX_FOUND"
if [ ! -e /usr/include/gtest/gtest.h ] && [ ! -d /usr/src/googletest ]; then
  echo "    note: GoogleTest not found; tools/test.sh (the C++ tests) needs it (apt-get install libgtest-dev libgmock-dev)"
fi

NVCC=$(command -v nvcc || true)
[ -n "$NVCC" ] || { [ -n "${CUDACXX:-}" ] && NVCC=$CUDACXX; } || true
[ -n "$NVCC" ] || { [ -x /usr/local/cuda/bin/nvcc ] && NVCC=/usr/local/cuda/bin/nvcc; } || true
GPU_CAPS=""
if command -v nvidia-smi >/dev/null; then
  GPU_CAPS=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | tr -d ' ' | sort -u | paste -sd' ' || true)
fi
GPU_ARCHS=""  # the local GPUs' architectures the kernels support (compute capability >= 9.0)
for cap in $GPU_CAPS; do
  if [ "${cap%%.*}" -ge 9 ] 2>/dev/null; then GPU_ARCHS="${GPU_ARCHS:+$GPU_ARCHS;}${cap/./}a"; fi
done
echo "    GPU: $([ -n "$GPU_CAPS" ] && echo "compute capability $GPU_CAPS" || echo "none found (nvidia-smi)"); nvcc: ${NVCC:-not found}"

CUDA=${ATTNQAT_CUDA:-}
ARCHS_IN_CMAKE_ARGS=0
case "${CMAKE_ARGS:-}" in *ATTNQAT_CUDA_ARCHS*|*CMAKE_CUDA_ARCHITECTURES*) ARCHS_IN_CMAKE_ARGS=1 ;; esac
ARCHS=""
WHY=""
if [ "$ARCHS_IN_CMAKE_ARGS" = 1 ]; then
  WHY="as set in CMAKE_ARGS ($CMAKE_ARGS)"
elif [ -n "${ATTNQAT_CUDA_ARCHS:-}" ]; then
  ARCHS=$ATTNQAT_CUDA_ARCHS
  [ "$ARCHS" = all ] && ARCHS=$ALL_ARCHS
  WHY="ATTNQAT_CUDA_ARCHS"
elif [ "${CI:-}" = true ]; then
  ARCHS=$ALL_ARCHS WHY="CI=true: every architecture"
elif [ -n "$GPU_ARCHS" ]; then
  ARCHS=$GPU_ARCHS WHY="this machine's GPU; ATTNQAT_CUDA_ARCHS=all for every architecture"
else
  ARCHS=$ALL_ARCHS WHY="no supported GPU here: every architecture"
fi
if [ -z "$CUDA" ]; then
  if [ "$ARCHS_IN_CMAKE_ARGS" = 1 ] || [ -n "${ATTNQAT_CUDA_ARCHS:-}" ] || [ "${CI:-}" = true ]; then
    CUDA=AUTO
  elif [ -n "$GPU_ARCHS" ] && [ -n "$NVCC" ]; then
    CUDA=ON
  else
    CUDA=OFF
    if [ -n "$GPU_CAPS" ] && [ -z "$GPU_ARCHS" ]; then
      echo "    the kernels need compute capability >= 9.0 (H100/H200, sm_100, sm_120); building the CPU library"
    elif [ -n "$GPU_CAPS" ]; then
      echo "    no CUDA toolkit (nvcc, CUDA >= 12.8) found: building the CPU library only"
    elif [ -n "$NVCC" ]; then
      echo "    no GPU: building the CPU library only (ATTNQAT_CUDA=ON compiles the kernels anyway: minutes per architecture on 2 cores)"
    fi
  fi
fi
export ATTNQAT_CUDA=$CUDA  # pyproject.toml passes it to CMake; the build directory keeps it for tools/test.sh
if [ "$CUDA" != OFF ] && [ -n "$ARCHS" ]; then
  export CMAKE_ARGS="${CMAKE_ARGS:+$CMAKE_ARGS }-DATTNQAT_CUDA_ARCHS=$ARCHS"
fi
if [ "$CUDA" = OFF ]; then
  echo "    build: CPU library (ATTNQAT_CUDA=OFF)"
else
  echo "    build: ATTNQAT_CUDA=$CUDA, kernel architectures ${ARCHS:-from CMAKE_ARGS} ($WHY)"
fi

if [ "$TORCH_MODE" = auto ]; then
  if [ "${CI:-}" = true ] || [ -n "$GPU_CAPS" ]; then
    TORCH_MODE=pypi
  elif "$PY" -c "import urllib.request as u; u.urlopen('$TORCH_CPU_INDEX/torch/', timeout=10)" >/dev/null 2>&1; then
    TORCH_MODE=cpu
  else
    TORCH_MODE=pypi
    echo "    no GPU, but $TORCH_CPU_INDEX (the CPU-only torch) is not reachable: torch from PyPI, with its CUDA libraries"
  fi
fi
case "$TORCH_MODE" in
  pypi) TORCH_SPEC=$TORCH_PIN TORCH_NOTE="$TORCH_PIN from PyPI with its CUDA libraries: about 2.8 GB to download, a 5 GB venv" ;;
  cpu) TORCH_SPEC="$TORCH_PIN+cpu" TORCH_NOTE="$TORCH_PIN CPU-only from $TORCH_CPU_INDEX" ;;
  system) TORCH_SPEC="torch=system" TORCH_NOTE="the existing torch (no download)" ;;
  none) TORCH_SPEC="torch=none" TORCH_NOTE="no torch: numpy API only" ;;
  *) die "ATTNQAT_TORCH=$TORCH_MODE: expected auto, pypi, cpu, system or none" ;;
esac
echo "    torch: $TORCH_NOTE (ATTNQAT_TORCH=$TORCH_MODE)"

# ---- 2. the venv ---------------------------------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
  step "creating the venv $VENV" "seconds"
  if [ "$TORCH_MODE" = system ]; then
    "$PY" -c 'import torch' 2>/dev/null || die "ATTNQAT_TORCH=system: $PY cannot import torch"
    "$PY" -m venv --system-site-packages "$VENV"
  else
    "$PY" -m venv "$VENV"
  fi
fi
if [ "$TORCH_MODE" = system ]; then
  "$VENV/bin/python" - <<'EOF' || die "ATTNQAT_TORCH=system: $VENV/bin/python needs torch >= 2.4 (a venv made with --system-site-packages sees the system's torch)"
import sys
try:
    import torch
except Exception as e:
    sys.exit(f"    cannot import torch: {e}")
v = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
print(f"    reusing torch {torch.__version__} from {torch.__file__.rsplit('/', 2)[0]}")
sys.exit(v < (2, 4))
EOF
fi

# ---- 3. pinned dependencies ----------------------------------------------------------------------
PINS="$TORCH_SPEC $OTHER_PINS"
if [ "$(cat "$VENV/.attnqat-pins" 2>/dev/null)" != "$PINS" ]; then
  step "upgrading pip" "seconds"
  pip_install -q --upgrade pip
  case "$TORCH_MODE" in
    pypi)
      step "installing torch from PyPI" "$TORCH_PIN + CUDA libraries: ~2.8 GB download, ~5 GB on disk; about 2-5 min with a fast link, the install after the downloads is silent for a minute or two"
      pip_install "$TORCH_PIN" ;;
    cpu)
      step "installing the CPU-only torch" "$TORCH_PIN from $TORCH_CPU_INDEX"
      if ! pip_install "$TORCH_PIN" --index-url "$TORCH_CPU_INDEX"; then
        echo "    the CPU-only torch failed to install: using PyPI's torch instead (~2.8 GB)"
        PINS="$TORCH_PIN $OTHER_PINS"
        pip_install "$TORCH_PIN"
      fi ;;
  esac
  step "installing the other pinned packages" "numpy, pytest, hypothesis, nanobind, scikit-build-core, ninja, cmake, transformers, diffusers: ~100 MB (the diffusers wheel: 6.4 MB)"
  # shellcheck disable=SC2086
  pip_install $OTHER_PINS
  echo "$PINS" > "$VENV/.attnqat-pins"
else
  echo "    pinned packages already installed in $VENV"
fi

# ---- 4. build and install attnqat ----------------------------------------------------------------
if [ "$CUDA" = OFF ]; then
  EXPECT="the C++ core and the Python module: about 1 min on 2 cores"
else
  EXPECT="the C++ core and the CUDA kernels for ${ARCHS:-the CMAKE_ARGS architectures}: several minutes on 2 cores"
fi
step "building and installing attnqat" "$EXPECT; build directory build/python-*"
export PATH="$(cd "$VENV" && pwd)/bin:$PATH"  # its cmake and ninja build the package
BUILD_LOG="$LOG_DIR/build.log"
# pip -v shows the build's output; of it, CMake's attnqat lines and ninja's [n/N] progress are printed.
if ! "$VENV/bin/python" -m pip install -v --no-build-isolation --no-deps . 2>&1 | tee "$BUILD_LOG" \
     | { grep --line-buffered -E '^ *(\[[0-9]+/[0-9]+\] |-- attnqat|ninja: no work|Successfully installed)' || true; }; then
  tail -n 60 "$BUILD_LOG"
  die "building attnqat failed (above: the end of the build log)"
fi

# The build choice, for a rebuild with this venv (`. "$VENV/.attnqat-build-env"` before pip install .):
# the build directory keeps it too, but forgets it when another venv builds in the same checkout.
{
  echo "export ATTNQAT_CUDA=$ATTNQAT_CUDA"
  [ -z "${CMAKE_ARGS:-}" ] || echo "export CMAKE_ARGS=$(printf '%q' "$CMAKE_ARGS")"
} > "$VENV/.attnqat-build-env"

step "checking the installation"
"$VENV/bin/python" -c "import attnqat, json; print('attnqat installed:', json.dumps(attnqat.build_info()))"
step_done
echo
echo "tools/setup.sh: done in $((SECONDS - T_START))s; $VENV: $(du -sh "$VENV" 2>/dev/null | cut -f1)"
printf '  %s\n' "${SUMMARY[@]}"
