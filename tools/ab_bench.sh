#!/usr/bin/env bash
# A/B of two source trees on one GPU, in one run: builds OLD_TREE and this tree (the cuda preset,
# sm_90a, with the Python module), then runs each named benchmark with --quick, alternating the
# builds (old, new, old, new), and compares the headline ratios (bench/ab_compare.py).
#
#   tools/ab_bench.sh OLD_TREE OUTDIR [BENCH ...]     e.g. tools/ab_bench.sh /tmp/old $OUT attention_fwd
#
# OLD_TREE: a checkout of the baseline commit (git worktree add, or git archive | tar -x). The
# benchmark scripts of THIS tree time both builds, so the measurement code is the same. Each run
# writes OUTDIR/ab_<tag><round>/<bench>.json; the summary goes to OUTDIR/ab_summary.txt.
# Before the benchmarks, bench/ab_bitwise.py runs the same inputs through both builds and compares
# every output bit for bit (OUTDIR/ab_bitwise.txt; AB_BITWISE=0 skips it).
# Environment: AB_SKIP_BUILD=1 (reuse the builds of an earlier call), AB_ROUNDS (default 2),
# JOBS (default 16, split between the two builds). No BENCH: build only.
set -uo pipefail
OLD=$(cd "${1:?usage: tools/ab_bench.sh OLD_TREE OUTDIR [BENCH ...]}" && pwd)
OUT=${2:?usage: tools/ab_bench.sh OLD_TREE OUTDIR [BENCH ...]}
shift 2
cd "$(dirname "$0")/.."
NEW=$(pwd)
mkdir -p "$OUT"
JOBS=${JOBS:-16}
export CMAKE_ARGS="-DATTNQAT_CUDA_ARCHS=90a"

build() {  # build TREE SITE: the cuda preset with the Python module, then a site dir with it
  local tree=$1 site=$2
  (cd "$tree" && cmake --preset cuda -DATTNQAT_CUDA_ARCHS=90a -DATTNQAT_BUILD_PYTHON=ON >/dev/null &&
    cmake --build --preset cuda -j "$((JOBS / 2))") || return 1
  rm -rf "$site" && mkdir -p "$site/attnqat"
  cp "$tree"/python/attnqat/*.py "$site/attnqat/" && cp "$tree"/build/cuda/python/_C*.so "$site/attnqat/"
}
if [ "${AB_SKIP_BUILD:-0}" != 1 ]; then
  echo "::: building $OLD and $NEW ($JOBS jobs in all)"
  t0=$SECONDS
  build "$OLD" /tmp/ab_site_old >"$OUT/ab_build_old.log" 2>&1 &
  pid_old=$!
  build "$NEW" /tmp/ab_site_new >"$OUT/ab_build_new.log" 2>&1 || { echo "new build failed"; tail -30 "$OUT/ab_build_new.log"; exit 1; }
  wait "$pid_old" || { echo "old build failed"; tail -30 "$OUT/ab_build_old.log"; exit 1; }
  echo "::: built in $((SECONDS - t0)) s"
fi
if [ "${AB_BITWISE:-1}" = 1 ]; then  # the same inputs through both builds: outputs bit for bit
  echo "::: bit-for-bit outputs (bench/ab_bitwise.py)"
  for tag in old new; do
    PYTHONPATH=/tmp/ab_site_$tag python3 bench/ab_bitwise.py run "/tmp/ab_bits_$tag.pt" \
      >"$OUT/ab_bitwise_run_$tag.log" 2>&1 || tail -20 "$OUT/ab_bitwise_run_$tag.log"
  done
  python3 bench/ab_bitwise.py compare /tmp/ab_bits_old.pt /tmp/ab_bits_new.pt >"$OUT/ab_bitwise.txt" 2>&1
  tail -1 "$OUT/ab_bitwise.txt"
fi
[ $# -gt 0 ] || exit 0

for round in $(seq "${AB_ROUNDS:-2}"); do
  for tag in old new; do
    for b in "$@"; do
      echo "::: $b ($tag, round $round)"
      PYTHONPATH=/tmp/ab_site_$tag python3 "bench/bench_$b.py" --quick --out "$OUT/ab_$tag$round" \
        >"$OUT/ab_$tag${round}_$b.log" 2>&1 || tail -20 "$OUT/ab_$tag${round}_$b.log"
    done
  done
done
python3 bench/ab_compare.py "$OUT" | tee "$OUT/ab_summary.txt"
