#!/usr/bin/env bash
# The ctest suite under sanitizers (cmake/Sanitize.cmake's SYNCBN_SANITIZE), CPU only
# (SYNCBN_WITH_CUDA=OFF), from a clean or an existing build directory.
#
#   tests/run_sanitized.sh [address] [extra ctest arguments]
#       ASan + UBSan (GCC) over the whole suite: library, single-process and MPI tests (under
#       mpirun), fault injection, the installed-package consumer, the libtorch examples and the
#       benchmarks' smoke test. build-asan/ (or $BUILD_DIR). LSan checks leaks in every process.
#   tests/run_sanitized.sh thread [extra ctest arguments]
#       TSan (clang, LLVM libomp, the archer OMPT tool) over the single-process suite (ctest -L
#       single: the OpenMP CPU kernels of src/cpu/kernels.cpp through tests/cpu/, and the
#       thread-rank custom communicators of test_custom_comm.cpp and test_thread_scenarios.cpp)
#       at OMP_NUM_THREADS=2 and 4, then
#       the MPI tests (ctest -L mpi). build-tsan/ (or $BUILD_DIR). Examples, the libtorch module
#       (uninstrumented libtorch) and benchmarks are not
#       built.
#
# Any sanitizer report fails the run: the test it happens in fails (halt_on_error), and a report
# in a test that passes anyway (the fault-injection tests that expect a failing job) is found in
# the tests' output afterwards (ctest's JUnit file) and fails the run too.
# Python-package tests (label python) are not configured (-DSYNCBN_PYTHON=): the package's
# libsyncbn would have to be the instrumented one, loaded into an uninstrumented python.
# Environment: BUILD_DIR, JOBS (build and ctest parallelism, default nproc).
# Prints the wall time of configure + build + tests at the end.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/install_deps.sh"  # clang, libomp-dev among the rest
mode=address
if [[ $# -gt 0 && "$1" != -* ]]; then
  mode=$1
  shift
fi
jobs=${JOBS:-$(nproc)}
start=$(date +%s)
supp=$root/tests/sanitize

finish() {
  local rc=$?
  echo "run_sanitized.sh $mode: exit $rc, wall time $(( $(date +%s) - start )) s" \
       "(configure + build + tests)"
}
trap finish EXIT

# ctest, keeping every test's whole output in a JUnit file for scan_reports.
junit_files=()
run_ctest() {
  local junit
  junit=$build/ctest-$(( ${#junit_files[@]} + 1 )).xml
  junit_files+=("$junit")
  ctest --output-on-failure --output-junit "$junit" --test-output-size-passed 50000000 \
        --test-output-size-failed 50000000 "$@"
}

# Names the tests whose output holds a sanitizer report; fails if there is one.
scan_reports() {
  /usr/bin/python3 - "${junit_files[@]}" <<'EOF'
import re, sys, xml.etree.ElementTree as ET
marker = re.compile(r"ERROR: (Address|Leak|Thread|Memory)Sanitizer|WARNING: ThreadSanitizer|"
                    r"runtime error: |Sanitizer:DEADLYSIGNAL")
found = 0
for path in sys.argv[1:]:
    for case in ET.parse(path).getroot().iter("testcase"):
        text = "".join(e.text or "" for e in case.iter() if e.tag in ("system-out", "failure"))
        hits = sorted({m.group(0) for m in marker.finditer(text)})
        if hits:
            found += 1
            print(f"run_sanitized.sh: sanitizer report in {case.get('name')}: {', '.join(hits)}")
print(f"run_sanitized.sh: {found} test(s) with a sanitizer report")
sys.exit(1 if found else 0)
EOF
}


case "$mode" in
  address|asan|address,undefined)
    mode=address
    build=${BUILD_DIR:-$root/build-asan}
    # The examples (libtorch) and benchmarks are built too: Debian's libtorch is not
    # instrumented, which ASan allows (its own code is then not checked, calls into it are).
    cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
          -DSYNCBN_SANITIZE=address,undefined -DSYNCBN_WITH_CUDA=OFF -DSYNCBN_PYTHON=
    cmake --build "$build" -j "$jobs"

    # halt_on_error: the first report ends the process with a failure (UBSan's too: the build
    # has -fno-sanitize-recover=undefined). Leak checking stays on for every test, the MPI ones
    # under mpirun included; tests/sanitize/lsan.supp suppresses only what Open MPI and the
    # libraries under it allocate and never free.
    # fast_unwind_on_malloc=0: Open MPI is built without frame pointers, so the fast unwinder
    # stops at its first frame and the allocation stacks of its leaks would name no library the
    # suppressions could match (its MCA components are dlclose'd at MPI_Finalize, so their own
    # frames read "<unknown module>"); the DWARF unwinder reaches libmpi / libopen-rte beneath.
    export ASAN_OPTIONS="halt_on_error=1:abort_on_error=0:detect_leaks=1:fast_unwind_on_malloc=0:\
check_initialization_order=1:strict_init_order=1:detect_stack_use_after_return=1:\
strict_string_checks=1:print_suppressions=0"
    export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:print_summary=1"
    export LSAN_OPTIONS="suppressions=$supp/lsan.supp:print_suppressions=0"
    # consumer_package builds a project against the installed (instrumented) libsyncbn: CMake
    # takes these for that fresh build, so its programs load the ASan runtime first too.
    export CFLAGS="-fsanitize=address,undefined -fno-omit-frame-pointer"
    export CXXFLAGS="$CFLAGS"
    export LDFLAGS="-fsanitize=address,undefined"
    cd "$build"
    rc=0
    run_ctest -j "$jobs" -E '^soak\.' "$@" || rc=1
    # soak.*: its own check is that RSS grows by less than 1 MiB over 50000 steps. ASan's
    # quarantine (freed memory held back, 256 MiB by default, so that a use after free is
    # caught; +320 MiB measured) and its fake stacks for detect_stack_use_after_return (+1.4 MiB)
    # grow RSS by design, so the soak test runs without both; LSan still checks its leaks.
    ASAN_OPTIONS="$ASAN_OPTIONS:quarantine_size_mb=0:detect_stack_use_after_return=0" \
      run_ctest -R '^soak\.' "$@" || rc=1
    scan_reports || rc=1
    exit $rc
    ;;

  thread|tsan)
    mode=thread
    build=${BUILD_DIR:-$root/build-tsan}
    archer=${ARCHER:-/usr/lib/llvm-14/lib/libarcher.so}
    [[ -f "$archer" ]] || { echo "$0: archer ($archer) not found (Debian libomp-14-dev)" >&2; exit 2; }
    # MPI stays on: Open MPI is not instrumented, but the MPI tests run one thread per rank, and
    # TSan checks libsyncbn's own accesses and the tests' other threads (the watchdog of
    # mpi_main.cpp) without a false report from MPI's internals (measured 2026-12-02).
    CC=clang CXX=clang++ cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
          -DSYNCBN_SANITIZE=thread -DSYNCBN_WITH_CUDA=OFF \
          -DSYNCBN_BUILD_EXAMPLES=OFF -DSYNCBN_BUILD_BENCH=OFF -DSYNCBN_BUILD_TORCH=OFF \
          -DSYNCBN_PYTHON=
    # FindOpenMP with clang: -fopenmp=libomp and LLVM's libomp.so, which archer hooks into (a
    # libgomp found here would make every parallel region a false report).
    grep -q '^OpenMP_CXX_FLAGS:.*=-fopenmp=libomp' "$build/CMakeCache.txt" &&
      grep -q '^OpenMP_omp_LIBRARY:.*libomp\.so' "$build/CMakeCache.txt" || {
      echo "$0: CMake did not find clang's OpenMP (-fopenmp=libomp, libomp.so);" \
           "see OpenMP_* in $build/CMakeCache.txt" >&2
      exit 2
    }
    cmake --build "$build" -j "$jobs"

    # archer turns libomp's synchronization (fork/join, barriers, reductions, tasks, locks) into
    # TSan happens-before annotations; without it TSan reports libomp's own barriers as races.
    # (archer suggests ignore_noninstrumented_modules=1; tests/sanitize/tsan.supp's narrower
    # called_from_lib:libomp.so is enough, and keeps libstdc++'s and MPI's interceptor calls
    # checked.)
    export OMP_TOOL_LIBRARIES=$archer
    export ARCHER_OPTIONS="verbose=1"
    export TSAN_OPTIONS="halt_on_error=1:second_deadlock_stack=1:\
suppressions=$supp/tsan.supp"
    cd "$build"
    rc=0
    for threads in 2 4; do
      echo "== ctest -L single with OMP_NUM_THREADS=$threads"
      # one test at a time: each runs OMP_NUM_THREADS threads on 2 cores already
      OMP_NUM_THREADS=$threads run_ctest -L single "$@" || rc=1
    done
    if grep -q '^SYNCBN_WITH_MPI:BOOL=ON' CMakeCache.txt; then
      echo "== ctest -L mpi (one thread per rank: launch/run_local.sh --threads 1)"
      run_ctest -j "$jobs" -L mpi "$@" || rc=1
    fi
    scan_reports || rc=1
    exit $rc
    ;;

  *)
    echo "usage: $0 [address|thread] [extra ctest arguments]" >&2
    exit 2
    ;;
esac
