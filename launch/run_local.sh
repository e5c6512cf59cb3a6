#!/usr/bin/env bash
# Runs a command on P local MPI ranks with the flags this kind of machine needs.
#
#   launch/run_local.sh -n P [--threads T] [--] command [args...]
#
# - Running as root: sets OMPI_ALLOW_RUN_AS_ROOT(_CONFIRM) for Open MPI.
# - Threads per rank: T (default: cores / P, at least 1), exported as OMP_NUM_THREADS.
# - P * T <= cores: each rank is bound to T cores (--map-by slot:PE=T --bind-to core).
#   More than the cores: --oversubscribe, no binding, and ranks yield the core while they wait
#   (mpi_yield_when_idle), so that oversubscribed runs do not spin against each other.
# - Shared-memory transport without the single-copy mechanism (containers often forbid the
#   ptrace-based CMA it uses).
# These flags are Open MPI's. Another MPI's launcher (MPICH's or Intel MPI's Hydra mpiexec) gets
# only the rank count and OMP_NUM_THREADS (-genv); Hydra shares cores without being asked.
# Another launcher: MPIRUN=/path/to/mpiexec; its rank-count flag: SYNCBN_MPIEXEC_NUMPROC_FLAG
# (default -np); extra flags: SYNCBN_MPIRUN_FLAGS="..." (ctest passes CMake's
# MPIEXEC_EXECUTABLE, MPIEXEC_NUMPROC_FLAG and MPIEXEC_PREFLAGS this way).
set -euo pipefail

usage() { echo "usage: $0 -n P [--threads T] [--] command [args...]" >&2; exit 2; }

np=""; threads=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    -n|--np) np="$2"; shift 2 ;;
    --threads) threads="$2"; shift 2 ;;
    --) shift; break ;;
    -h|--help) usage ;;
    *) break ;;
  esac
done
[[ -n "$np" && $# -gt 0 ]] || usage
[[ "$np" =~ ^[1-9][0-9]*$ ]] || { echo "$0: -n must be a positive integer, got '$np'" >&2; exit 2; }

cores=$(nproc)
if [[ -z "$threads" ]]; then
  threads=$(( cores / np )); (( threads >= 1 )) || threads=1
fi
[[ "$threads" =~ ^[1-9][0-9]*$ ]] || { echo "$0: --threads must be a positive integer" >&2; exit 2; }

export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMP_NUM_THREADS="$threads"
export OMPI_MCA_btl_vader_single_copy_mechanism=none

launcher=${MPIRUN:-mpirun}
flags=("${SYNCBN_MPIEXEC_NUMPROC_FLAG:--np}" "$np")
# The version text first: grep -q closing the pipe early would fail the pipeline (pipefail).
version=$("$launcher" --version 2>&1 || true)
if [[ "$version" == *"Open MPI"* || "$version" == *OpenRTE* ]]; then
  flags+=(-x OMP_NUM_THREADS)
  [[ -n "${LD_LIBRARY_PATH:-}" ]] && flags+=(-x LD_LIBRARY_PATH)
  if (( np * threads <= cores )); then
    flags+=(--map-by "slot:PE=$threads" --bind-to core)
  else
    flags+=(--oversubscribe --bind-to none --mca mpi_yield_when_idle 1)
  fi
else
  flags+=(-genv OMP_NUM_THREADS "$threads")
fi
# shellcheck disable=SC2206
extra=(${SYNCBN_MPIRUN_FLAGS:-})
exec "$launcher" "${flags[@]}" "${extra[@]}" "$@"
