#!/usr/bin/env bash
# The reproduction study on one H100/H200, as one device command (docs/reproduction.md).
#
#   examples/reproduce/gpu_run.sh OUTDIR [run.py options...]
#
# Needs the prepared data in examples/reproduce/data/ (examples/reproduce/data.py, on a CPU
# machine; carry the folder). Builds attnqat's Python module with the sm_90a kernels unless an
# importable CUDA build is already there (a warm machine) or a module built earlier is in
# .carry/reproduce/ (carried back), then runs run.py --preset gpu, resuming from
# examples/reproduce/runs/gpu/ (carry it back too), and stops cleanly before BUDGET_S seconds
# (default 570) from the start of this script, so it fits a 10-minute device command. Exit code 75:
# not finished, run the same command again (after copying OUTDIR's files back as below).
#
# OUTDIR gets at most 8 files: run.log, build.log, gpu.txt, results.json, pretrain_ckpt_NN.pt and
# the built module _C*.so. Before the next call, copy results.json and pretrain_ckpt_*.pt into
# examples/reproduce/runs/gpu/ and the _C*.so into .carry/reproduce/, and carry those folders.
set -uo pipefail
START=$(date +%s)
DEADLINE=$((START + ${BUDGET_S:-570}))
OUTDIR=${1:?usage: examples/reproduce/gpu_run.sh OUTDIR [run.py options...]}
shift
cd "$(dirname "$0")/../.."
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1
RUNS=${RUNS:-examples/reproduce/runs/gpu}
SITE=/tmp/attnqat_site
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.total --format=csv | tee "$OUTDIR/gpu.txt"

have_cuda_build() {
  PYTHONPATH=$SITE python3 -c "import attnqat, sys; sys.exit(0 if attnqat.build_info()['cuda'] else 1)" 2>/dev/null
}
install_site() {  # install_site SO: the package sources of this tree + a built module
  rm -rf "$SITE" && mkdir -p "$SITE/attnqat"
  cp python/attnqat/*.py "$SITE/attnqat/" && cp "$1" "$SITE/attnqat/"
}
[ -d "$SITE/attnqat" ] && cp python/attnqat/*.py "$SITE/attnqat/"  # a warm machine: this tree's sources
if ! have_cuda_build; then
  carried=$(ls .carry/reproduce/_C*.so 2>/dev/null | head -1)
  if [ -n "$carried" ]; then
    install_site "$carried"
    echo "using the carried module $carried"
  fi
fi
if ! have_cuda_build; then
  t0=$SECONDS
  echo "building attnqat (sm_90a, target _C)..."
  { cmake --preset cuda -DATTNQAT_CUDA_ARCHS=90a -DATTNQAT_BUILD_PYTHON=ON &&
    cmake --build --preset cuda -j "${JOBS:-16}" --target _C; } >"$OUTDIR/build.log" 2>&1 ||
    { tail -40 "$OUTDIR/build.log"; exit 1; }
  install_site "$(ls build/cuda/python/_C*.so | head -1)"
  echo "built in $((SECONDS - t0)) s"
fi
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
python3 -c "import attnqat; print(attnqat.build_info())"

python3 examples/reproduce/run.py --preset gpu --out "$RUNS" --until "$DEADLINE" "$@" 2>&1 | tee -a "$OUTDIR/run.log"
rc=${PIPESTATUS[0]}
cp "$RUNS"/results.json "$RUNS"/pretrain_ckpt_*.pt "$OUTDIR/" 2>/dev/null
cp "$SITE"/attnqat/_C*.so "$OUTDIR/" 2>/dev/null
ls -la "$OUTDIR"
echo "run.py exit code $rc ($((($(date +%s) - START))) s in this command)"
exit "$rc"
