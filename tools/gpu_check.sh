#!/usr/bin/env bash
# The GPU machine's one command: build the CUDA preset, run the GPU tests (ctest label cuda,
# compute-sanitizer memcheck, pytest marker gpu), run the named benchmarks, and leave logs and
# JSON in OUTDIR. Prints a short table last.
#
#   tools/gpu_check.sh OUTDIR [BENCH ...]      e.g. tools/gpu_check.sh $OUT quantize
#
# BENCH names bench/bench_<name>.py; each writes its JSON and merges bench/results/headline.json
# (a copy in OUTDIR). Environment: SKIP_TESTS=1 (benchmarks only), SANITIZE_QUANT_FILTER,
# SANITIZE_ATTN_FILTER, SANITIZE_BWD_FILTER and SANITIZE_DECODE_FILTER (gtest filters of the
# compute-sanitizer runs),
# JOBS (default 16).
set -uo pipefail
OUT=${1:?usage: tools/gpu_check.sh OUTDIR [BENCH ...]}
shift
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
JOBS=${JOBS:-16}
SUMMARY=()
record() { SUMMARY+=("$(printf '%-40s %s' "$1" "$2")"); }
run_step() {  # run_step NAME LOG COMMAND...
  local name=$1 log=$2 t0=$SECONDS
  shift 2
  echo "::: $name" | tee -a "$log"
  if "$@" >>"$log" 2>&1; then record "$name" "ok ($((SECONDS - t0))s)"; return 0; fi
  record "$name" "FAILED ($((SECONDS - t0))s, see $(basename "$log"))"
  tail -30 "$log"
  return 1
}

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.total --format=csv | tee "$OUT/tests.log"
export CMAKE_ARGS="-DATTNQAT_CUDA_ARCHS=90a"  # the runnable target only; CI compiles the rest
run_step "cmake configure (cuda, sm_90a)" "$OUT/build.log" cmake --preset cuda -DATTNQAT_CUDA_ARCHS=90a \
  -DATTNQAT_BUILD_PYTHON=ON
run_step "cmake build" "$OUT/build.log" cmake --build --preset cuda -j "$JOBS" || { printf '%s\n' "${SUMMARY[@]}"; exit 1; }
grep -E "registers|spill|bytes stack" "$OUT/build.log" | sort -u | head -40 >>"$OUT/build.log"

# The Python package from the same build (the module built above + the package sources), so
# the kernels compile once. CI checks `pip install .` itself.
SITE=/tmp/attnqat_site
rm -rf "$SITE" && mkdir -p "$SITE/attnqat"
cp python/attnqat/*.py "$SITE/attnqat/" && cp build/cuda/python/_C*.so "$SITE/attnqat/"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
# Pure-Python wheels the GPU image lacks (diffusers, for tests/python/test_diffusers.py): put them
# in .carry/wheels here (pip download diffusers==0.42.1 --no-deps -d .carry/wheels) and carry that
# folder; they are installed beside the package, without the network.
if compgen -G ".carry/wheels/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --target "$SITE" .carry/wheels/*.whl &&
    echo "installed the carried wheels: $(cd .carry/wheels && ls *.whl | tr '\n' ' ')" | tee -a "$OUT/build.log"
fi
python3 -c "import attnqat; print(attnqat.build_info())" | tee -a "$OUT/build.log"

if [ "${SKIP_TESTS:-0}" != 1 ]; then
  run_step "ctest -L cuda" "$OUT/tests.log" ctest --test-dir build/cuda -L cuda --output-on-failure -j 4
  run_step "ctest -L cpu (reference on this host)" "$OUT/tests.log" ctest --test-dir build/cuda -L cpu -j "$JOBS"
  # compute-sanitizer on short filters (the tools slow kernels down 10-100x).
  QF=${SANITIZE_QUANT_FILTER:-'-QuantizeCuda.Nvfp4LastAxisLarge4096x13312:CodecCuda.E2M1EveryFiniteFp32MatchesSpecTable:CodecCuda.FastQuotientEveryFp32InZeroOne'}
  AF=${SANITIZE_ATTN_FILTER:-'*GemmLayout*bf16_d128*:*PQuant*bf16_paper_random*:*AttentionFwd.*fp4_paper_bf16_d128_causal_nk17*:*attnqat_paper_bf16_d64_bshd*:*Analytic*paper*:*seq1*:*AttentionFwdRawInputs*'}
  QB=build/cuda/tests/cpp/cuda/attnqat_cuda_tests
  AB=build/cuda/tests/cpp/cuda_attention/attnqat_attention_gpu_tests
  run_step "compute-sanitizer memcheck (quantize)" "$OUT/tests.log" \
    compute-sanitizer --tool memcheck --error-exitcode 1 "$QB" --gtest_filter="$QF"
  for tool in memcheck racecheck synccheck; do
    run_step "compute-sanitizer $tool (attention)" "$OUT/tests.log" \
      compute-sanitizer --tool "$tool" --error-exitcode 1 "$AB" --gtest_filter="$AF"
  done
  BB=build/cuda/tests/cpp/cuda_attention_bwd/attnqat_attention_bwd_gpu_tests
  BF=${SANITIZE_BWD_FILTER:-'*seq1*:*q1_k17*:*nq_gt_nk*:*deterministic_small*'}
  for tool in memcheck racecheck; do
    run_step "compute-sanitizer $tool (attention backward)" "$OUT/tests.log" \
      compute-sanitizer --tool "$tool" --error-exitcode 1 "$BB" --gtest_filter="$BF"
  done
  DB=build/cuda/tests/cpp/cuda_decode/attnqat_decode_gpu_tests
  DF=${SANITIZE_DECODE_FILTER:-'*PackedCuda*bf16_d128_pow2*:*PackedCuda*fp16_d64_causal*:*PackedCuda*bf16_d128_slow_g*:*DecodeCuda*/mixed_batch_ps16:*DecodeCuda*d64_mixed_batch_ps16:*DecodeCuda*d64_nq4*:*DecodeCuda*d64_paper*'}
  for tool in memcheck racecheck synccheck; do
    run_step "compute-sanitizer $tool (decode, packed attention)" "$OUT/tests.log" \
      compute-sanitizer --tool "$tool" --error-exitcode 1 "$DB" --gtest_filter="$DF"
  done
  run_step "pytest -m gpu" "$OUT/tests.log" python3 -m pytest tests/python -m gpu -q -p no:cacheprovider
fi

cp bench/results/headline.json "$OUT/headline.json" 2>/dev/null || true
for b in "$@"; do  # one log for all benchmarks: the GPU machine returns at most 8 files
  run_step "bench $b" "$OUT/bench.log" python3 "bench/bench_$b.py" --out "$OUT"
  tail -8 "$OUT/bench.log"
done

echo
echo "== gpu_check summary ($(nvidia-smi --query-gpu=name --format=csv,noheader | head -1))"
printf '  %s\n' "${SUMMARY[@]}"
