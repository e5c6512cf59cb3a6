#!/usr/bin/env bash
# The whole test suite from a fresh clone: installs what is missing, installs the Python package
# into a virtual environment (build/venv, made from /usr/bin/python3 with the system's torch,
# torchvision, mpi4py, numpy and pytest; pip builds libsyncbn into the package), builds everything
# (library, tests, examples, benchmarks) in build/ (or $BUILD_DIR), and runs every ctest, the
# Python suite at 1-4 ranks under mpirun and 2-3 under torch.distributed.run included.
#   tests/run_all.sh [extra ctest arguments, e.g. -L mpi, -L python or -R single]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/install_deps.sh"
build=${BUILD_DIR:-$root/build}
venv=${SYNCBN_VENV:-$build/venv}
mkdir -p "$build"
[[ -x "$venv/bin/python" ]] || /usr/bin/python3 -m venv --system-site-packages "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$root"
# fairscale's SyncBatchNorm, the comparison of bench/torch_sync_bench.py (--no-deps: keep torch)
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps fairscale
cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DSYNCBN_PYTHON="$venv/bin/python"
cmake --build "$build" -j "$(nproc)"
cd "$build"
ctest --output-on-failure -j "$(nproc)" "$@"
