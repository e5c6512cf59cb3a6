#!/usr/bin/env bash
# Fuzzes the C API: builds tests/fuzz/fuzz_c_api (libFuzzer, ASan + UBSan, clang) in build-fuzz/
# (or $BUILD_DIR) and runs it for the given time on a copy of the seed corpus
# (tests/fuzz/corpus). Fails (non-zero) on any finding: a crash, an invariant the target checks
# (__builtin_trap), an ASan / UBSan / LSan report, a timeout or out-of-memory, each saved under
# build-fuzz/artifacts/ with the input that caused it.
#
#   tests/run_fuzz.sh [seconds]          fuzz for seconds (default 60)
#   tests/run_fuzz.sh --repro FILE...    run the target once on each FILE (a crash input)
#
# Environment: BUILD_DIR, JOBS (build parallelism), FUZZ_ARGS (extra libFuzzer flags),
# OMP_NUM_THREADS (default 2), SYNCBN_FUZZ_TRACE=1 (the target prints each operation and
# status: for --repro).
# Prints exec/s, coverage and the wall time at the end.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/install_deps.sh"  # clang, libomp-dev among the rest
build=${BUILD_DIR:-$root/build-fuzz}
jobs=${JOBS:-$(nproc)}
start=$(date +%s)

repro=()
seconds=60
if [[ "${1:-}" == "--repro" ]]; then
  shift
  repro=("$@")
  [[ ${#repro[@]} -gt 0 ]] || { echo "usage: $0 --repro FILE..." >&2; exit 2; }
elif [[ $# -gt 0 ]]; then
  seconds=$1
  [[ "$seconds" =~ ^[1-9][0-9]*$ ]] || { echo "usage: $0 [seconds] | --repro FILE..." >&2; exit 2; }
fi

# The library alone (static, CPU, no MPI: the target uses the self and custom communicators)
# and the target; nothing else of the tree is built.
mkdir -p "$build"
CC=clang CXX=clang++ cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
      -DSYNCBN_FUZZ=ON -DSYNCBN_WITH_CUDA=OFF -DSYNCBN_WITH_MPI=OFF -DBUILD_SHARED_LIBS=OFF \
      -DSYNCBN_BUILD_TESTS=OFF -DSYNCBN_BUILD_EXAMPLES=OFF -DSYNCBN_BUILD_BENCH=OFF \
      -DSYNCBN_PYTHON= > "$build/configure.log" 2>&1 ||
  { cat "$build/configure.log" >&2; exit 1; }
cmake --build "$build" -j "$jobs" --target fuzz_c_api

export ASAN_OPTIONS="halt_on_error=1:detect_leaks=1:check_initialization_order=1:\
strict_init_order=1:detect_stack_use_after_return=1:strict_string_checks=1"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
unset SYNCBN_TIMEOUT_S  # the target expects the default deadline of new communicators

if [[ ${#repro[@]} -gt 0 ]]; then
  exec "$build/tests/fuzz/fuzz_c_api" "${repro[@]}"
fi

corpus=$build/corpus
artifacts=$build/artifacts
rm -rf "$corpus" "$artifacts"
mkdir -p "$corpus" "$artifacts"
cp "$root"/tests/fuzz/corpus/* "$corpus"/
log=$build/fuzz.log
# -max_len 4096: the longest seed is well under 1 KiB; programs of up to 96 operations with
# their buffers' fill selectors fit. -timeout 10: one input runs in milliseconds. -rss_limit_mb
# and the malloc limit at 2 GiB: plans are capped far below that (fuzz_c_api.cpp).
set +e
"$build/tests/fuzz/fuzz_c_api" -max_total_time="$seconds" -max_len=4096 -timeout=10 \
    -rss_limit_mb=2048 -print_final_stats=1 -artifact_prefix="$artifacts/" ${FUZZ_ARGS:-} \
    "$corpus" 2>&1 | tee "$log" | grep -E --line-buffered "pulse|NEW_FUNC|DONE|ERROR|runtime error|invariant|SUMMARY|Test unit written"
rc=${PIPESTATUS[0]}
set -e

found=$(find "$artifacts" -type f | wc -l)
summary=$(grep -E '^#[0-9]+' "$log" | tail -1 || true)
echo "run_fuzz.sh: ${seconds} s requested; last status: ${summary:-none}"
grep -E '^stat::(number_of_executed_units|average_exec_per_sec|peak_rss_mb)' "$log" || true
echo "run_fuzz.sh: corpus $(find "$corpus" -type f | wc -l) inputs; findings: $found" \
     "(in $artifacts); libFuzzer exit $rc; wall time $(( $(date +%s) - start )) s" \
     "(configure + build + fuzz)"
if (( rc != 0 || found != 0 )); then
  echo "run_fuzz.sh: FAILED; reproduce with: $0 --repro $artifacts/<file>; log: $log" >&2
  exit 1
fi
