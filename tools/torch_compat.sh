#!/usr/bin/env bash
# Runs the CPU test suite (pytest tests/python -m "not gpu") against the oldest torch that
# pyproject.toml claims (torch>=X.Y: the newest X.Y.z on PyPI) and the newest torch on PyPI, each in
# a scratch venv, with one CPU-only build of attnqat (ATTNQAT_CUDA=OFF) installed into each. CI
# tests the pinned torch of tools/setup.sh only; this checks the range the package claims.
#
#   tools/torch_compat.sh                          # log: bench/results/torch_compat_cpu_<date>.log
#   TORCH_VERSIONS="2.4.1 2.15.0" tools/torch_compat.sh
#   TRANSFORMERS_2_4_1=4.57.6 tools/torch_compat.sh   # another transformers for one torch version
#   WORK=/tmp/dir KEEP=1 LOG=path PYTHON=python3.X tools/torch_compat.sh
#   APPEND=1 TORCH_VERSIONS=2.5.1 tools/torch_compat.sh   # add a run to an existing log
#
# Each venv gets torch with all its dependencies from PyPI (on Linux x86_64 that includes the CUDA
# libraries, ~2.5-2.8 GB per version: `pip install torch --no-deps` does not import without them)
# and is deleted after its run unless KEEP=1. Needs ~6 GB free in WORK (default: a new /tmp dir).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OWN_WORK=0
[ -n "${WORK:-}" ] || { WORK=$(mktemp -d "${TMPDIR:-/tmp}/attnqat-torch-compat.XXXXXX"); OWN_WORK=1; }
LOG=${LOG:-bench/results/torch_compat_cpu_$(date -u +%Y-%m-%d).log}
# The pins of tools/setup.sh, torch and transformers aside.
OTHER_PINS="numpy==2.2.6 pytest==8.4.2 hypothesis==6.140.2 nanobind==2.9.2 scikit-build-core==0.11.6 ninja==1.13.0 cmake==4.1.2"
TRANSFORMERS_DEFAULT=${TRANSFORMERS:-5.24.0}
mkdir -p "$WORK" "$(dirname "$LOG")"
[ "${APPEND:-0}" = 1 ] || : > "$LOG"
log() { echo "$*" | tee -a "$LOG"; }

if [ -z "${TORCH_VERSIONS:-}" ]; then
  MIN=$(sed -n 's/.*"torch>=\([0-9.]*\)".*/\1/p' pyproject.toml)
  AVAILABLE=$("$PY" -m pip index versions torch 2>/dev/null | sed -n 's/^Available versions: //p' | tr -d ',')
  [ -n "$MIN" ] && [ -n "$AVAILABLE" ] || { echo "cannot read torch>=X from pyproject.toml or the versions on PyPI" >&2; exit 1; }
  OLDEST=$(for v in $AVAILABLE; do case $v in "$MIN" | "$MIN".*) echo "$v"; break ;; esac; done)
  NEWEST=${AVAILABLE%% *}
  TORCH_VERSIONS="$OLDEST $NEWEST"
fi

[ "${APPEND:-0}" = 1 ] && log "" && log "# appended run"
log "# attnqat torch compatibility, CPU only (pytest tests/python -m \"not gpu\")"
log "date:     $(date -u '+%Y-%m-%d %H:%M UTC')"
log "commit:   $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- python tests pyproject.toml CMakeLists.txt src include || echo ' + uncommitted changes in python/tests/src')"
log "machine:  $(uname -sm), $(nproc) cores, GPU: $(command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | head -1 || echo none)"
log "python:   $("$PY" -c 'import sys; print(sys.version.split()[0])')"
log "claimed:  $(grep -o '"torch>=[0-9.]*"' pyproject.toml) (pyproject.toml); PyPI's newest for this Python: ${NEWEST:-?}"
log "versions: $TORCH_VERSIONS"
log "other packages: $OTHER_PINS (tools/setup.sh's pins), transformers per torch version (below)"
log "torch is installed with all its dependencies (its CUDA libraries included): torch 2.11 with"
log "--no-deps fails to import without them (ImportError: libcufile.so.0), so no --no-deps trick."
log "attnqat: one wheel built with ATTNQAT_CUDA=OFF, installed with --no-deps into each venv."

WHEEL_DIR="$WORK/wheel"
SUMMARY=()
for V in $TORCH_VERSIONS; do
  VENV="$WORK/venv-$V"
  TF_VAR="TRANSFORMERS_${V//./_}"
  TF=${!TF_VAR:-$TRANSFORMERS_DEFAULT}
  log ""
  log "## torch $V (transformers $TF)"
  t0=$SECONDS
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # shellcheck disable=SC2086
  if ! "$VENV/bin/python" -m pip install --log "$WORK/pip-$V.log" "torch==$V" "transformers==$TF" $OTHER_PINS \
       > "$WORK/pip-$V.out" 2>&1; then
    tail -n 20 "$WORK/pip-$V.out" | tee -a "$LOG"
    log "result: torch $V: pip install FAILED"
    SUMMARY+=("torch $V: pip install failed")
    continue
  fi
  "$VENV/bin/python" - "$WORK/pip-$V.log" <<'EOF' | tee -a "$LOG"
import re, sys
units = {"kB": 1e3, "MB": 1e6, "GB": 1e9}
found = dict(re.findall(r"Downloading (\S+) \(([\d.]+ [kMG]B)\)", open(sys.argv[1]).read()))
total = sum(float(s.split()[0]) * units[s.split()[1]] for s in found.values())
print(f"install: {len(found)} files downloaded, {total / 1e6:,.0f} MB")
EOF
  log "installed: $("$VENV/bin/python" -m pip list --format=freeze 2>/dev/null | grep -iE '^(torch|numpy|transformers|triton|sympy)==' | paste -sd' ')"
  log "venv size: $(du -sh "$VENV" | cut -f1), install took $((SECONDS - t0))s"
  if [ -z "$(ls "$WHEEL_DIR"/attnqat-*.whl 2>/dev/null)" ]; then
    t1=$SECONDS
    PATH="$VENV/bin:$PATH" ATTNQAT_CUDA=OFF "$VENV/bin/python" -m pip wheel -q --no-build-isolation --no-deps \
      --config-settings=build-dir="$WORK/build" -w "$WHEEL_DIR" . 2>&1 | tail -n 20 | tee -a "$LOG"
    log "attnqat wheel (ATTNQAT_CUDA=OFF) built in $((SECONDS - t1))s: $(basename "$WHEEL_DIR"/attnqat-*.whl)"
  fi
  "$VENV/bin/python" -m pip install -q --no-deps --force-reinstall "$WHEEL_DIR"/attnqat-*.whl
  log "build_info: $("$VENV/bin/python" -c 'import attnqat, json; print(json.dumps(attnqat.build_info()))' 2>&1 | tail -n 1)"
  t1=$SECONDS
  rc=0
  "$VENV/bin/python" -m pytest tests/python -m "not gpu" -q -p no:cacheprovider --tb=short -rfE 2>&1 \
    | tee -a "$LOG" | tail -n 3 || rc=$?
  RESULT=$(tail -n 1 "$LOG")
  log "result: torch $V: pytest exit $rc in $((SECONDS - t1))s"
  SUMMARY+=("torch $V (transformers $TF): $RESULT")
  [ "${KEEP:-0}" = 1 ] || rm -rf "$VENV"
done
[ "${KEEP:-0}" = 1 ] || [ "$OWN_WORK" = 0 ] || rm -rf "$WORK"

log ""
log "## summary"
for s in "${SUMMARY[@]}"; do log "$s"; done
echo "log: $LOG"
