#!/usr/bin/env bash
# Installs the Debian packages syncbn's build, tests and examples need, if any is missing.
#   ./install_deps.sh          everything (library, tests, Fashion-MNIST trainer, reference checks,
#                              the Python package's tests, the sanitizer and fuzzing runs)
# Runs apt-get (as root, or through sudo) only when a package is missing.
set -euo pipefail

packages=(
  build-essential cmake ninja-build pkg-config
  libopenmpi-dev openmpi-bin          # MPI communicator, mpirun
  libgtest-dev                        # tests
  iproute2                            # ip, tc: simulated hosts (launch/netns_hosts.sh)
  libcli11-dev libtorch-dev zlib1g-dev dataset-fashion-mnist   # the trainer and its data
  libdnnl-dev                         # oneDNN, the CPU baseline of the benchmarks
  python3-torch python3-numpy python3-matplotlib   # reference checks, bench/plot_scaling.py
  python3-venv python3-mpi4py python3-pytest python3-torchvision   # the Python package's suite
  clang libomp-dev                    # TSan with LLVM's OpenMP (archer), libFuzzer
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if (( ${#missing[@]} == 0 )); then
  echo "install_deps: all ${#packages[@]} packages present"
  exit 0
fi
sudo=""
(( EUID == 0 )) || sudo="sudo"
echo "install_deps: installing ${missing[*]}"
$sudo apt-get update -q
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q "${missing[@]}"
