#!/usr/bin/env bash
# run_gpu_bench.sh: build bench/cuda_bench for one GPU and run it and bench/torch_bn_bench.py;
# the tables, CSVs and the environment go to a results directory, a summary to the terminal.
#
#   bench/run_gpu_bench.sh [RESULTS_DIR] [-- FLAGS...]
#
# RESULTS_DIR defaults to bench/results; files are named YYYY-MM-DD-<what>.{txt,csv,log} like
# the other results there (.txt: the table, stdout; .log: progress and errors, stderr). FLAGS go to both benchmarks (-n, -w, --batches, --dtypes, --layouts,
# --shapes, --cold-l2, --device), e.g.  bench/run_gpu_bench.sh /tmp/r -- --batches 2 -n 50
#
# The build needs cmake >= 3.25, ninja, nvcc, NCCL, cuDNN and the CLI11 header (cuda_bench's flags;
# Debian libcli11-dev, or CMAKE_ARGS=-DCLI11_INCLUDE_DIR=...), and nothing else: MPI, GoogleTest
# and libtorch are switched off. NCCL and cuDNN are taken from NCCL_HOME / CUDNN_HOME, else
# the CUDA toolkit or the system, else the pip wheels PyTorch brings (nvidia-nccl-cu*,
# nvidia-cudnn-cu*).
#
# Environment: BUILD_DIR (default build-gpu-bench), CUDA_ARCH (default 90, the H100/H200),
# CMAKE_ARGS (more configure flags), PYTHON (default python3), SKIP_TORCH=1, SKIP_SELF=1 (skip
# the --comm self run).
#
# Runs, in order: torch_bn_bench.py (its CSV feeds the xtorch columns), cuda_bench --comm nccl
# (every call includes its one-rank ncclAllReduce), cuda_bench --comm self (no exchange).
# Exit status: 0 if every step succeeded, else the first nonzero status (2: no GPU).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")
out=$root/bench/results
if [[ $# -gt 0 && $1 != "--" ]]; then
  out=$1
  shift
fi
[[ ${1:-} == "--" ]] && shift
flags=("$@")
build=${BUILD_DIR:-$root/build-gpu-bench}
arch=${CUDA_ARCH:-90}
python=${PYTHON:-python3}
stamp=$(date +%F)
mkdir -p "$out"
out=$(cd "$out" && pwd)
prefix="$out/$stamp-"

say() { printf '== %s\n' "$*" >&2; }

# ---- a GPU at all? --------------------------------------------------------------------------
if command -v nvidia-smi >/dev/null 2>&1; then
  if ! nvidia-smi -L >/dev/null 2>&1; then
    echo "run_gpu_bench: nvidia-smi finds no GPU; these benchmarks need one" >&2
    exit 2
  fi
else
  say "nvidia-smi not found; cuda_bench will report whether a device is usable"
fi

# ---- NCCL and cuDNN ---------------------------------------------------------------------------
nvcc_bin=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
cuda_home=${CUDA_HOME:-$(dirname "$(dirname "$nvcc_bin")")}
cmake_extra=()
libdirs=()

# True if header $1 is in a directory CMake searches by default (or the toolkit's).
header_found() {
  local d
  for d in "$cuda_home/include" "$cuda_home/targets/x86_64-linux/include" \
           "$cuda_home/targets/sbsa-linux/include" /usr/include /usr/local/include; do
    [[ -f "$d/$1" ]] && return 0
  done
  return 1
}
# The directory of a pip-installed nvidia.* package ("" if none).
pip_dir() {
  "$python" -c "import importlib; print(list(importlib.import_module('$1').__path__)[0])" \
    2>/dev/null || true
}
# Library file of a pip package: its lib/ holds only versioned names (libnccl.so.2).
pip_lib() { find "$1/lib" -maxdepth 1 -name "$2.so*" 2>/dev/null | sort | head -n 1 || true; }

if [[ -z ${NCCL_HOME:-} ]] && ! header_found nccl.h; then
  d=$(pip_dir nvidia.nccl)
  lib=${d:+$(pip_lib "$d" libnccl)}
  if [[ -n $d && -f $d/include/nccl.h && -n $lib ]]; then
    say "NCCL from the pip wheel in $d"
    cmake_extra+=("-DNCCL_INCLUDE_DIR=$d/include" "-DNCCL_LIBRARY=$lib")
    libdirs+=("$d/lib")
  else
    say "nccl.h not found (set NCCL_HOME); the configure step will say more"
  fi
fi
if [[ -z ${CUDNN_HOME:-} ]] && ! header_found cudnn.h; then
  d=$(pip_dir nvidia.cudnn)
  lib=${d:+$(pip_lib "$d" libcudnn)}
  if [[ -n $d && -f $d/include/cudnn.h && -n $lib ]]; then
    say "cuDNN from the pip wheel in $d"
    cmake_extra+=("-DCUDNN_INCLUDE_DIR=$d/include" "-DCUDNN_LIBRARY=$lib")
    libdirs+=("$d/lib")
  else
    say "cudnn.h not found (set CUDNN_HOME); cuda_bench will not be built"
  fi
fi
if [[ ${#libdirs[@]} -gt 0 ]]; then
  joined=$(IFS=:; echo "${libdirs[*]}")
  export LD_LIBRARY_PATH="$joined${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi

# ---- build ------------------------------------------------------------------------------------
say "configure $build (CUDA arch $arch)"
# shellcheck disable=SC2086  # CMAKE_ARGS is a list of flags
cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_CUDA_ARCHITECTURES="$arch" -DSYNCBN_WITH_CUDA=ON -DSYNCBN_WITH_NCCL=ON \
  -DSYNCBN_WITH_MPI=OFF -DSYNCBN_BUILD_TESTS=OFF -DSYNCBN_BUILD_EXAMPLES=OFF \
  -DSYNCBN_BUILD_BENCH=ON ${cmake_extra[@]+"${cmake_extra[@]}"} ${CMAKE_ARGS:-} >&2
say "build cuda_bench"
ninja -C "$build" cuda_bench >&2
bench="$build/bench/cuda_bench"

# ---- environment record -------------------------------------------------------------------
{
  echo "# run_gpu_bench.sh, $(date -Is)"
  echo "# flags: ${flags[*]:-(none)}"
  echo "# git: $(git -C "$root" rev-parse HEAD 2>/dev/null || echo '?')" \
       "$( [[ -n $(git -C "$root" status --porcelain 2>/dev/null) ]] && echo '(uncommitted changes)')"
  echo "# host: $(uname -srm), $(nproc) CPUs"
  if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi || true; fi
  "$nvcc_bin" --version 2>/dev/null | tail -n 2 || true
  cmake --version | head -n 1
  "$python" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, \
'cuDNN', torch.backends.cudnn.version())" 2>&1 || true
  grep -E '^(CUDNN_LIBRARY|CUDNN_INCLUDE_DIR|NCCL_LIBRARY|NCCL_INCLUDE_DIR|CMAKE_CUDA_ARCHITECTURES)' \
    "$build/CMakeCache.txt" || true
} >"${prefix}gpu_bench-env.txt" 2>&1

status=0
note_status() { [[ $status -eq 0 && $1 -ne 0 ]] && status=$1; return 0; }

# ---- PyTorch ----------------------------------------------------------------------------------
torch_csv=()
if [[ ${SKIP_TORCH:-0} != 1 ]]; then
  say "torch_bn_bench.py -> ${prefix}torch_bn_bench.{txt,csv}"
  set +e
  "$python" "$here/torch_bn_bench.py" --csv "${prefix}torch_bn_bench.csv" \
    ${flags[@]+"${flags[@]}"} 2> >(tee "${prefix}torch_bn_bench.log" >&2) \
    | tee "${prefix}torch_bn_bench.txt"
  rc=${PIPESTATUS[0]}
  set -e
  if [[ $rc -eq 0 ]]; then
    torch_csv=(--torch-csv "${prefix}torch_bn_bench.csv")
  else
    say "torch_bn_bench.py failed (status $rc); cuda_bench runs without the xtorch columns"
    note_status "$rc"
  fi
fi

# ---- syncbn -----------------------------------------------------------------------------------
comms=(nccl)
[[ ${SKIP_SELF:-0} == 1 ]] || comms+=(self)
for comm in "${comms[@]}"; do
  name="cuda_bench-$comm"
  say "cuda_bench --comm $comm -> ${prefix}$name.{txt,csv}"
  set +e
  "$bench" --comm "$comm" --csv "${prefix}$name.csv" ${torch_csv[@]+"${torch_csv[@]}"} \
    ${flags[@]+"${flags[@]}"} 2> >(tee "${prefix}$name.log" >&2) | tee "${prefix}$name.txt"
  rc=${PIPESTATUS[0]}
  set -e
  if [[ $rc -ne 0 ]]; then
    say "cuda_bench --comm $comm exited with status $rc"
    note_status "$rc"
    [[ $rc -eq 2 ]] && break  # no device, or bad flags: the next run would say the same
  fi
done

# ---- summary ----------------------------------------------------------------------------------
echo
echo "== summary (${prefix}*)"
for comm in "${comms[@]}"; do
  f="${prefix}cuda_bench-$comm.txt"
  [[ -f $f ]] || continue
  echo "-- comm $comm"
  grep -E '^# (goal|Out of tolerance|Failed|FAIL|flag h|cuDNN n/a)|^#   N=|^# ResNet-50' "$f" || true
done
echo "-- files"
ls -1 "${prefix}"* 2>/dev/null || true
exit "$status"
