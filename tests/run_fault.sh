#!/usr/bin/env bash
# Runs one fault-injection job and checks how it ended: its exit status, its wall time, and the
# lines it must print (so that a job that failed early for another reason does not pass).
#
#   tests/run_fault.sh --expect ok|fail --within SECONDS [--marker TEXT]... -- command [args...]
#
# ok: the job exits 0. fail: it exits non-zero (Open MPI ended it: a killed rank, MPI_Abort).
# Either way it must end within SECONDS (the job is killed at that point, and the check fails).
set -uo pipefail
expect="" within="" markers=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --expect) expect="$2"; shift 2 ;;
    --within) within="$2"; shift 2 ;;
    --marker) markers+=("$2"); shift 2 ;;
    --) shift; break ;;
    *) echo "run_fault.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
[[ ( "$expect" == ok || "$expect" == fail ) && -n "$within" && $# -gt 0 ]] || {
  echo "usage: $0 --expect ok|fail --within SECONDS [--marker TEXT]... -- command..." >&2; exit 2; }

log=$(mktemp)
trap 'rm -f "$log"' EXIT
start=$(date +%s%N)
timeout --kill-after=5 "$within" "$@" >"$log" 2>&1
rc=$?
ms=$(( ($(date +%s%N) - start) / 1000000 ))
elapsed="$(( ms / 1000 )).$(printf %03d $(( ms % 1000 )))"
cat "$log"
echo "run_fault.sh: exit status $rc after ${elapsed} s (expected: $expect within ${within} s)"
status=0
if (( rc == 124 || ms >= within * 1000 )); then
  echo "run_fault.sh: FAILED: the job did not end within ${within} s"; status=1
elif [[ "$expect" == ok && $rc -ne 0 ]]; then
  echo "run_fault.sh: FAILED: the job exited $rc, expected 0"; status=1
elif [[ "$expect" == fail && $rc -eq 0 ]]; then
  echo "run_fault.sh: FAILED: the job exited 0, expected Open MPI to end it"; status=1
fi
for m in "${markers[@]}"; do
  if ! grep -qF -- "$m" "$log"; then
    echo "run_fault.sh: FAILED: no line contains: $m"; status=1
  fi
done
(( status == 0 )) && echo "run_fault.sh: passed"
exit $status
