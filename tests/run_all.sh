#!/usr/bin/env bash
# The whole test suite from a fresh clone: installs what is missing, builds everything (library,
# tests, examples, benchmarks) in build/ (or $BUILD_DIR), and runs every ctest.
#   tests/run_all.sh [extra ctest arguments, e.g. -L mpi or -R single]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/install_deps.sh"
build=${BUILD_DIR:-$root/build}
cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release
cmake --build "$build" -j "$(nproc)"
cd "$build"
ctest --output-on-failure -j "$(nproc)" "$@"
