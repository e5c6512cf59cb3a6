#!/usr/bin/env bash
# scaling.sh: weak and strong scaling of synchronized batch norm over P = 1, 2, 4, ... ranks, for
# the exchange modes sync (one O(C) allreduce), allgather (PyTorch / Apex: allgather of every
# rank's mean, invstd and count) and local (no exchange), on this machine or across simulated
# hosts (network namespaces); one combined CSV, then bench/plot_scaling.py draws it.
#
#   launch/scaling.sh [options] [OUT_DIR] [-- EXTRA_BENCH_FLAGS...]
#
# OUT_DIR (default bench/results) receives YYYY-MM-DD-scaling-<network>.csv (the rows of every
# run, syncbn_bench's columns after two added ones, experiment (weak|strong) and network
# (local|netns)) and YYYY-MM-DD-scaling-<network>.txt (the commands and syncbn_bench's tables);
# <network> is "local" or "netns<H>-<delay>-<rate>". Each command is printed (stderr) before it
# runs.
#
# Options:
#   --shapes CxHxW[,CxHxW...]  per-sample shapes (default 256x14x14,2048x7x7: a mid-size ResNet-50
#                            layer, and a small one where the exchange dominates the step)
#   --batch N                weak scaling: the per-rank batch (default 32)
#   --global-batch N         strong scaling: the global batch, split over P ranks as N/P per rank;
#                            a P that does not divide it is skipped (default 256)
#   --experiments LIST       weak,strong (default both)
#   --modes LIST             sync,allgather,local (default all three)
#   --threads T              OpenMP threads per rank (default 1, so that P ranks fit the cores)
#   --max-ranks P            largest P (default nproc / T); more than the cores oversubscribes
#   --ranks LIST             the P values, e.g. 1,2,4,8 (default 1, 2, 4, ... up to --max-ranks,
#                            and --max-ranks itself)
#   --dtype f32|f64, --layout nchw|nhwc   (default f32, nchw)
#   -n ITERS, -w WARMUP      timed and warm-up iterations (default 20 and 5; with --netns 5 and 2)
#   --netns H                run each P across H simulated hosts (launch/netns_hosts.sh, as root),
#                            P/H ranks per host (P < H: P hosts of one rank; P not a multiple of H:
#                            skipped); exit 77 when netns_hosts.sh cannot simulate hosts here (not
#                            root, no namespaces, or --delay without netem: try --delay 0)
#   --delay D, --rate R      netem shaping of the simulated links (default 50us, 10gbit)
#   --also-local             with --netns, also run every P on plain local MPI into the same CSV
#   --onednn                 keep syncbn_bench's oneDNN comparison (default: --no-onednn)
#   --bench PATH             the driver (default build-lib/bench/syncbn_bench, or $SYNCBN_BENCH)
#   --tag NAME               replaces <network> in the file names
#   --dry-run                print the commands, run nothing, write nothing
# EXTRA_BENCH_FLAGS go to every syncbn_bench call (e.g. -- --no-check).
#
# Examples:
#   launch/scaling.sh                                   # weak + strong, up to nproc ranks
#   launch/scaling.sh --max-ranks 16 /tmp/r             # oversubscribed beyond the cores
#   launch/scaling.sh --netns 4 --max-ranks 32 --delay 50us --rate 10gbit
#   python3 bench/plot_scaling.py bench/results/$(date +%F)-scaling-local.csv
#
# Time per step = fwd_us + bwd_us (max over ranks of the median iteration); "n" is the per-rank
# batch. Environment: MPIRUN and SYNCBN_MPIRUN_FLAGS go through to launch/run_local.sh.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' >&2; exit "${1:-2}"; }
die() { echo "scaling.sh: $*" >&2; exit 2; }
is_pos() { [[ "$1" =~ ^[1-9][0-9]*$ ]]; }

shapes="256x14x14,2048x7x7"
batch=32
global_batch=256
experiments="weak,strong"
modes="sync,allgather,local"
threads=1
max_ranks=""
ranks_list=""
dtype=f32
layout=nchw
iters=""
warmup=""
netns_hosts=""
delay=50us
rate=10gbit
also_local=0
onednn=0
bench=${SYNCBN_BENCH:-$root/build-lib/bench/syncbn_bench}
tag=""
dry=0
out=""
extra=()

while [[ $# -gt 0 ]]; do
  case "$1" in
    --shapes) shapes="$2"; shift 2 ;;
    --batch) batch="$2"; shift 2 ;;
    --global-batch) global_batch="$2"; shift 2 ;;
    --experiments) experiments="$2"; shift 2 ;;
    --modes) modes="$2"; shift 2 ;;
    --threads) threads="$2"; shift 2 ;;
    --max-ranks) max_ranks="$2"; shift 2 ;;
    --ranks) ranks_list="$2"; shift 2 ;;
    --dtype) dtype="$2"; shift 2 ;;
    --layout) layout="$2"; shift 2 ;;
    -n) iters="$2"; shift 2 ;;
    -w) warmup="$2"; shift 2 ;;
    --netns) netns_hosts="$2"; shift 2 ;;
    --delay) delay="$2"; shift 2 ;;
    --rate) rate="$2"; shift 2 ;;
    --also-local) also_local=1; shift ;;
    --onednn) onednn=1; shift ;;
    --bench) bench="$2"; shift 2 ;;
    --tag) tag="$2"; shift 2 ;;
    --dry-run) dry=1; shift ;;
    -h|--help) usage 0 ;;
    --) shift; extra=("$@"); break ;;
    -*) echo "scaling.sh: unknown option '$1'" >&2; usage ;;
    *) [[ -z "$out" ]] || die "more than one OUT_DIR ('$out', '$1')"; out="$1"; shift ;;
  esac
done

# ---- check the arguments ----------------------------------------------------------------------
is_pos "$batch" || die "--batch must be a positive integer, got '$batch'"
is_pos "$global_batch" || die "--global-batch must be a positive integer, got '$global_batch'"
is_pos "$threads" || die "--threads must be a positive integer, got '$threads'"
[[ "$dtype" == f32 || "$dtype" == f64 ]] || die "--dtype must be f32 or f64"
[[ "$layout" == nchw || "$layout" == nhwc ]] || die "--layout must be nchw or nhwc"
IFS=, read -r -a shape_arr <<< "$shapes"
(( ${#shape_arr[@]} > 0 )) || die "--shapes is empty"
for s in "${shape_arr[@]}"; do
  [[ "$s" =~ ^[1-9][0-9]*(x[1-9][0-9]*)*$ ]] || die "--shapes: '$s' is not CxHxW (e.g. 256x14x14)"
done
IFS=, read -r -a exp_arr <<< "$experiments"
for e in "${exp_arr[@]}"; do
  [[ "$e" == weak || "$e" == strong ]] || die "--experiments: '$e' is neither weak nor strong"
done
IFS=, read -r -a mode_arr <<< "$modes"
for m in "${mode_arr[@]}"; do
  [[ "$m" == sync || "$m" == allgather || "$m" == local ]] || die "--modes: unknown mode '$m'"
done

cores=$(nproc)
if [[ -z "$max_ranks" ]]; then
  max_ranks=$(( cores / threads )); (( max_ranks >= 1 )) || max_ranks=1
fi
is_pos "$max_ranks" || die "--max-ranks must be a positive integer, got '$max_ranks'"
if [[ -n "$ranks_list" ]]; then
  IFS=, read -r -a p_arr <<< "$ranks_list"
  for p in "${p_arr[@]}"; do is_pos "$p" || die "--ranks: '$p' is not a positive integer"; done
else
  p_arr=()
  for (( p = 1; p <= max_ranks; p *= 2 )); do p_arr+=("$p"); done
  (( p_arr[${#p_arr[@]} - 1] == max_ranks )) || p_arr+=("$max_ranks")
fi

networks=(local)
if [[ -n "$netns_hosts" ]]; then
  is_pos "$netns_hosts" || die "--netns must be a positive integer, got '$netns_hosts'"
  networks=(netns)
  (( also_local )) && networks=(local netns)
  : "${iters:=5}" "${warmup:=2}"
else
  (( also_local == 0 )) || die "--also-local needs --netns H"
fi
: "${iters:=20}" "${warmup:=5}"
is_pos "$iters" || die "-n must be a positive integer, got '$iters'"
[[ "$warmup" =~ ^[0-9]+$ ]] || die "-w must be a non-negative integer, got '$warmup'"

if [[ -z "$tag" ]]; then
  if [[ -n "$netns_hosts" ]]; then
    tag="netns${netns_hosts}-${delay}-${rate}"
    (( also_local )) && tag="local+$tag"
  else
    tag=local
  fi
fi
[[ "$tag" =~ ^[A-Za-z0-9._+-]+$ ]] || die "--tag '$tag': use letters, digits and . _ + - only"

out=${out:-$root/bench/results}
stamp=$(date +%F)
csv="$out/$stamp-scaling-$tag.csv"
log="$out/$stamp-scaling-$tag.txt"

if (( ! dry )); then
  [[ -x "$bench" ]] || die "no driver at $bench (build it: ninja -C build-lib syncbn_bench, or pass --bench)"
  [[ -z "$netns_hosts" || -x "$here/netns_hosts.sh" ]] || die "--netns needs launch/netns_hosts.sh"
  mkdir -p "$out"
  : > "$csv"
  : > "$log"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
fi

# ---- run --------------------------------------------------------------------------------------
say() { printf '%s\n' "$*" >&2; (( dry )) || printf '# %s\n' "$*" >> "$log"; }
quote() {  # the words of a command, shell-quoted only where needed
  local a q="" w
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./=:,+@%-]+$ ]]; then w=$a; else printf -v w '%q' "$a"; fi
    q+="${q:+ }$w"
  done
  printf '%s' "$q"
}

say "scaling.sh $stamp: $(hostname), $cores cores, $(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | sed 's/.*: //' || true)"
say "P = ${p_arr[*]}; threads/rank $threads; shapes ${shape_arr[*]}; weak batch/rank $batch; strong global batch $global_batch; $dtype $layout; -n $iters -w $warmup"
(( dry )) || say "output: $csv"

header=""
runs=0
skipped=0
for net in "${networks[@]}"; do
  for exp in "${exp_arr[@]}"; do
    for p in "${p_arr[@]}"; do
      if [[ "$exp" == weak ]]; then
        n=$batch
      else
        if (( global_batch % p != 0 )); then
          say "skip: strong P=$p (global batch $global_batch is not a multiple of $p)"
          skipped=$(( skipped + 1 )); continue
        fi
        n=$(( global_batch / p ))
      fi
      launcher=()
      if [[ "$net" == local ]]; then
        launcher=("$here/run_local.sh" -n "$p" --threads "$threads" --)
      else
        hosts=$netns_hosts
        (( p < hosts )) && hosts=$p
        if (( p % hosts != 0 )); then
          say "skip: $exp P=$p over $netns_hosts hosts (P is not a multiple of the host count)"
          skipped=$(( skipped + 1 )); continue
        fi
        launcher=("$here/netns_hosts.sh" --hosts "$hosts" --ranks-per-host $(( p / hosts ))
                  --threads "$threads" --delay "$delay" --rate "$rate" --)
      fi
      part="${tmp:-/tmp/scaling.XXXXXX}/$net-$exp-$p.csv"
      cmd=("${launcher[@]}" "$bench")
      for s in "${shape_arr[@]}"; do cmd+=(--shape "${n}x$s"); done
      cmd+=(--dtype "$dtype" --layout "$layout" -n "$iters" -w "$warmup"
            --mode "$(IFS=,; echo "${mode_arr[*]}")" --csv "$part")
      (( onednn )) || cmd+=(--no-onednn)
      cmd+=("${extra[@]}")
      say "+ $(quote "${cmd[@]}")"
      (( dry )) && continue
      rc=0
      "${cmd[@]}" > >(tee -a "$log") 2> >(tee -a "$log" >&2) || rc=$?
      if (( rc == 77 )) && [[ "$net" == netns ]]; then
        echo "scaling.sh: launch/netns_hosts.sh cannot simulate hosts on this machine (exit 77, its reason above)" >&2
        [[ -s "$csv" ]] || rm -f "$csv" "$log"
        exit 77
      fi
      (( rc == 0 )) || { echo "scaling.sh: the command above failed (exit $rc); rows so far are in $csv" >&2; exit "$rc"; }
      [[ -s "$part" ]] || { echo "scaling.sh: $bench wrote no CSV to $part" >&2; exit 1; }
      h=$(head -n1 "$part")
      if [[ -z "$header" ]]; then
        header=$h
        printf 'experiment,network,%s\n' "$header" > "$csv"
      elif [[ "$h" != "$header" ]]; then
        echo "scaling.sh: CSV header of $part differs from the first run's" >&2; exit 1
      fi
      tail -n +2 "$part" | sed "/^[[:space:]]*\$/d; s/^/$exp,$net,/" >> "$csv"
      runs=$(( runs + 1 ))
    done
  done
done

if (( dry )); then
  say "dry run: nothing ran ($skipped skipped)"
else
  say "done: $runs runs, $skipped skipped, $(( $(wc -l < "$csv") - 1 )) rows in $csv"
  say "plot: python3 $(quote "$root/bench/plot_scaling.py" "$csv")"
fi
