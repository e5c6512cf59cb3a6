#!/usr/bin/env bash
# Runs an MPI command across N simulated hosts on this machine: each host is a Linux network
# namespace, the hosts talk over TCP through a simulated switch, and Open MPI launches on them as
# it would over ssh. Needs root and iproute2.
#
#   launch/netns_hosts.sh [--hosts N] [--ranks-per-host R] [--threads T] [--subnet A.B.C.0/24]
#                         [--delay D] [--rate R] [--btl LIST] [--env VAR]... [--no-cpu-split] [-v]
#                         -- command [args...]
#
#   e.g. launch/netns_hosts.sh --hosts 2 --ranks-per-host 2 --delay 50us --rate 10gbit -- build/bench/syncbn_bench
#
# What it creates (all named syncbn-<pid>-<rand>-..., so that concurrent runs never clash):
#   - the switch: namespace syncbn-<pid>-<rand>-sw holding a bridge "sw" (no STP, no addresses);
#   - host i (i = 0..N-1): namespace syncbn-<pid>-<rand>-h<i> with lo (up) and eth0, one end of a
#     veth pair whose other end ("h<i>") is a port of the bridge; eth0 has the address A.B.C.(i+1)/24
#     of --subnet (default 10.213.0.0/24; private ranges only) and no route but that subnet, and no
#     IPv6 addresses. Nothing is created or changed in the root namespace: no interface, address,
#     route or firewall rule, so that traffic can only go to loopback or to these namespaces.
#   - a temporary directory /tmp/syncbn-netns.XXXXXX: the hostfile and Open MPI's session
#     directories (orte_tmpdir_base).
# Teardown, on every exit (success, failure, Ctrl-C, SIGTERM/SIGHUP): the job is stopped, every
# process still inside the namespaces is killed (TERM, then KILL), the namespaces are deleted (which
# deletes their veths and the bridge) and the temporary directory removed. SIGKILL (ctest's
# timeout) cannot be trapped: a detached watchdog started at the beginning waits for this script
# to end and then does the same teardown. Namespaces of an earlier run whose script is gone are
# deleted at the next start.
#
# Shaping (optional, with tc): --delay D (e.g. 50us) delays every packet a host sends, on its eth0,
# so the one-way latency between two hosts is D (RTT 2D); --rate R (e.g. 10gbit) limits each host's
# link to R in each direction (on its eth0 and on its switch port). Both use netem; a kernel without
# sch_netem gets the rate from tbf instead (bucket: 2 ms at the rate, at least 64 KiB) and cannot
# add delay (exit 77). --delay 0 / --rate 0 (or "none") mean no shaping, the default. Check with
# `tc -n syncbn-<pid>-<rand>-h0 qdisc show` while it runs.
#
# How it runs the job: mpirun (Open MPI) runs inside host 0's namespace, with a hostfile of the
# hosts' addresses (slots = R each) and --mca plm_rsh_agent launch/netns_rsh.sh. That agent is the
# "ssh" of these hosts: Open MPI calls it as `netns_rsh.sh HOST orted ...`, and it runs the command
# line in HOST's namespace (ip netns exec), see its header. Open MPI's daemons and ranks use only
# the simulated subnet (oob_tcp_if_include and btl_tcp_if_include), and ranks talk over TCP
# (--btl, default tcp,self; tcp,vader,self would use shared memory within a host).
# Each host also gets its own host name (a UTS namespace: its namespace name) and, by default, its
# own share of the cores (cores / N, contiguous, with taskset; --no-cpu-split: all cores), so that
# ranks of different hosts do not compete for the same cores. Ranks are not bound further
# (--bind-to none; always --oversubscribe); more threads than cores (R * T above a host's share)
# adds mpi_yield_when_idle, so that waiting ranks give the core up.
# Threads per rank T: --threads, else OMP_NUM_THREADS from the environment, else host cores / R.
# Passed to the ranks (-x): OMP_NUM_THREADS, PATH, LD_LIBRARY_PATH and every OMP_*, KMP_*, GTEST_*,
# SYNCBN_* variable set (but SYNCBN_NETNS_*), plus --env VAR (repeatable).
# Extra mpirun flags: SYNCBN_MPIRUN_FLAGS="...". Another mpirun: MPIRUN=/path/to/mpirun.
#
# Exit status: the command's (mpirun's); 2 on a usage error; 77 when this machine cannot simulate
# hosts: not root, no `ip`, network namespaces / veth / bridge cannot be created (e.g. a container
# without CAP_NET_ADMIN / CAP_SYS_ADMIN), or --delay without netem in the kernel; 128+n on signal n.
set -euo pipefail
exec 3>&2   # stderr, for -v's trace of commands whose stderr is captured

self=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")
agent=$(dirname "$self")/netns_rsh.sh
name_re='^syncbn-([0-9]+)-[0-9a-f]{4}-'

say() { printf 'netns_hosts.sh: %s\n' "$*" >&2; }
skip() { say "skipped: $*"; exit 77; }
usage() {
  echo "usage: $0 [--hosts N] [--ranks-per-host R] [--threads T] [--subnet A.B.C.0/24] [--delay D]" \
       "[--rate R] [--btl LIST] [--env VAR] [--no-cpu-split] [-v] -- command [args...]" >&2
  exit 2
}

# The start time of a process (field 22 of /proc/PID/stat), empty when it is gone: with the pid,
# it names the process without the risk of a reused pid.
starttime() {
  local s f
  s=$(cat "/proc/$1/stat" 2>/dev/null) || return 0
  read -ra f <<< "${s##*) }"
  echo "${f[19]}"
}

# The namespaces whose names start with $1.
ns_list() { ip netns list 2>/dev/null | awk -v p="$1" 'index($1, p) == 1 { print $1 }'; }

# Pids of the processes inside the namespaces given.
ns_pids() { local ns; for ns in "$@"; do ip netns pids "$ns" 2>/dev/null || true; done; }

# Kills what runs inside the namespaces with prefix $1 and deletes them.
teardown() {
  local prefix=$1 all pids i
  mapfile -t all < <(ns_list "$prefix")
  (( ${#all[@]} )) || return 0
  for i in $(seq 1 40); do          # TERM, then KILL after 2 s; up to 4 s in all
    mapfile -t pids < <(ns_pids "${all[@]}")
    (( ${#pids[@]} )) || break
    if (( i == 1 )); then kill -TERM "${pids[@]}" 2>/dev/null || true
    elif (( i >= 20 )); then kill -KILL "${pids[@]}" 2>/dev/null || true; fi
    sleep 0.1
  done
  for i in "${all[@]}"; do
    ip netns del "$i" 2>/dev/null || say "could not delete network namespace $i"
  done
}

# ---- internal: the watchdog (see the header) --------------------------------------------------
if [[ "${1:-}" == --_reap ]]; then
  owner=$2 owner_start=$3 prefix=$4 tmp=$5
  while [[ "$(starttime "$owner")" == "$owner_start" ]]; do sleep 0.5; done
  teardown "$prefix"
  [[ "$tmp" == /tmp/syncbn-netns.* ]] && rm -rf "$tmp"
  exit 0
fi

# ---- arguments ---------------------------------------------------------------------------------
hosts=2; rph=1; threads=""; subnet=${SYNCBN_NETNS_SUBNET:-10.213.0.0/24}; delay=""; rate=""
btl=tcp,self; cpu_split=1; verbose=0; envs=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --hosts) hosts=${2:-}; shift 2 || usage ;;
    --ranks-per-host) rph=${2:-}; shift 2 || usage ;;
    --threads) threads=${2:-}; shift 2 || usage ;;
    --subnet) subnet=${2:-}; shift 2 || usage ;;
    --delay) delay=${2:-}; shift 2 || usage ;;
    --rate) rate=${2:-}; shift 2 || usage ;;
    --btl) btl=${2:-}; shift 2 || usage ;;
    --env) envs+=("${2:-}"); shift 2 || usage ;;
    --no-cpu-split) cpu_split=0; shift ;;
    -v|--verbose) verbose=1; shift ;;
    -h|--help) usage ;;
    --) shift; break ;;
    -*) say "unknown option $1"; usage ;;
    *) break ;;
  esac
done
(( $# > 0 )) || usage
pos() { [[ "$1" =~ ^[1-9][0-9]*$ ]]; }
{ pos "$hosts" && (( hosts <= 250 )); } || { say "--hosts must be 1..250, got '$hosts'"; exit 2; }
pos "$rph" || { say "--ranks-per-host must be a positive integer, got '$rph'"; exit 2; }
[[ -z "$threads" ]] || pos "$threads" || { say "--threads must be a positive integer, got '$threads'"; exit 2; }
if [[ "$subnet" =~ ^([0-9]+)\.([0-9]+)\.([0-9]+)\.0/24$ ]] && (( BASH_REMATCH[1] < 256 &&
      BASH_REMATCH[2] < 256 && BASH_REMATCH[3] < 256 )) &&
   { (( BASH_REMATCH[1] == 10 )) || (( BASH_REMATCH[1] == 172 && BASH_REMATCH[2] >= 16 && BASH_REMATCH[2] < 32 )) ||
     (( BASH_REMATCH[1] == 192 && BASH_REMATCH[2] == 168 )); }; then
  net24="${BASH_REMATCH[1]}.${BASH_REMATCH[2]}.${BASH_REMATCH[3]}"
else
  say "--subnet must be a private /24 (10/8, 172.16/12 or 192.168/16) written A.B.C.0/24, got '$subnet'"; exit 2
fi
[[ "$delay" =~ ^(|0|none)$ ]] && delay=""
[[ "$rate" =~ ^(|0|none)$ ]] && rate=""
[[ -z "$delay" || "$delay" =~ ^[0-9]+(\.[0-9]+)?(s|ms|us|ns|sec|msec|usec|nsec)$ ]] ||
  { say "--delay: a time like 50us or 1ms, got '$delay'"; exit 2; }
[[ -z "$rate" || "${rate,,}" =~ ^[0-9]+(\.[0-9]+)?([kmgt]i?)?(bit|bps)$ ]] ||
  { say "--rate: a rate like 10gbit or 500mbit, got '$rate'"; exit 2; }
[[ "$btl" =~ ^[a-z0-9,^]+$ ]] || { say "--btl: a list like tcp,self, got '$btl'"; exit 2; }
for v in "${envs[@]}"; do [[ "$v" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || { say "--env: not a variable name: '$v'"; exit 2; }; done

# ---- can this machine do it? -------------------------------------------------------------------
(( EUID == 0 )) || skip "needs root to create network namespaces"
command -v ip > /dev/null || skip "needs ip (iproute2)"
mpirun=${MPIRUN:-mpirun}
command -v "$mpirun" > /dev/null || { say "no $mpirun (install openmpi-bin, or set MPIRUN)"; exit 1; }
"$mpirun" --version 2>&1 | grep -q "Open MPI" || { say "$mpirun is not Open MPI's"; exit 1; }
[[ -x "$agent" ]] || { say "the rsh agent $agent is missing or not executable"; exit 1; }

# Namespaces left by runs whose script died without its watchdog (e.g. both SIGKILLed).
while read -r ns; do
  [[ "$ns" =~ $name_re ]] || continue
  [[ -e "/proc/${BASH_REMATCH[1]}" ]] && continue
  say "removing $ns, left behind by process ${BASH_REMATCH[1]} (gone)"
  teardown "$ns"
done < <(ip netns list 2>/dev/null | awk '{ print $1 }')

# ---- set up ------------------------------------------------------------------------------------
prefix=$(printf 'syncbn-%d-%04x-' "$$" $(( RANDOM % 65536 )))
sw="${prefix}sw"
tmp=$(mktemp -d /tmp/syncbn-netns.XXXXXX)
child=""

# shellcheck disable=SC2317  # (the traps call them)
on_exit() {
  local rc=$?
  set +e
  trap '' INT TERM HUP
  teardown "$prefix"
  rm -rf "$tmp"
  exit "$rc"
}
# shellcheck disable=SC2317
on_signal() {  # $1: name, $2: number
  trap '' INT TERM HUP
  say "caught SIG$1: stopping the job and removing the simulated hosts"
  if [[ -n "$child" ]] && kill -TERM "$child" 2>/dev/null; then
    for _ in $(seq 1 50); do kill -0 "$child" 2>/dev/null || break; sleep 0.1; done
  fi
  exit $(( 128 + $2 ))
}
trap on_exit EXIT
trap 'on_signal INT 2' INT
trap 'on_signal TERM 15' TERM
trap 'on_signal HUP 1' HUP

# The watchdog: detached (own session, parent gone) and off our stdout/stderr, so that a kill of
# this script's process tree or group spares it and a ctest waiting on our output does not wait on it.
( setsid bash "$self" --_reap "$$" "$(starttime $$)" "$prefix" "$tmp" < /dev/null > /dev/null 2>&1 3>&- & )

run() { (( ! verbose )) || say "+ $*" 2>&3; "$@"; }
ipn() { run ip -n "$1" "${@:2}"; }

run ip netns add "$sw" 2> "$tmp/err" ||
  skip "cannot create network namespaces here ($(head -c 200 "$tmp/err")); needs root with CAP_SYS_ADMIN and CAP_NET_ADMIN"
run ip netns exec "$sw" true 2> "$tmp/err" ||
  skip "cannot enter a network namespace (ip netns exec: $(head -c 200 "$tmp/err"))"
ipn "$sw" link set lo up 2> "$tmp/err" ||
  skip "cannot configure a network namespace ($(head -c 200 "$tmp/err")); needs CAP_NET_ADMIN"
ipn "$sw" link add sw type bridge 2> "$tmp/err" || skip "cannot create a bridge ($(head -c 200 "$tmp/err"))"
ipn "$sw" link set sw addrgenmode none
ipn "$sw" link set sw up

addrs=(); names=()
for (( i = 0; i < hosts; i++ )); do
  h="${prefix}h$i"; a="$net24.$(( i + 1 ))"
  names+=("$h"); addrs+=("$a")
  run ip netns add "$h" 2> "$tmp/err" || skip "cannot create network namespace $h ($(head -c 200 "$tmp/err"))"
  ipn "$sw" link add "h$i" type veth peer name eth0 netns "$h" 2> "$tmp/err" ||
    skip "cannot create a veth pair ($(head -c 200 "$tmp/err"))"
  ipn "$sw" link set "h$i" addrgenmode none
  ipn "$sw" link set "h$i" master sw up
  ipn "$h" link set lo up
  ipn "$h" link set eth0 addrgenmode none
  ipn "$h" addr add "$a/24" dev eth0
  ipn "$h" link set eth0 up
done

# Shaping: netem if the kernel has it, else tbf for the rate (no delay without netem).
links="unshaped"
if [[ -n "$delay$rate" ]]; then
  netem=1
  run tc -n "${names[0]}" qdisc add dev eth0 root netem delay 1us 2>/dev/null &&
    run tc -n "${names[0]}" qdisc del dev eth0 root || netem=0
  if (( ! netem )) && [[ -n "$delay" ]]; then
    skip "--delay needs tc netem, which this kernel lacks (CONFIG_NET_SCH_NETEM); --delay 0 shapes the rate only"
  fi
  if (( ! netem )); then
    # tbf's bucket: 2 ms at the rate, at least 64 KiB (a GSO packet).
    burst=$(awk -v r="${rate,,}" 'BEGIN {
      n = r + 0; u = substr(r, length(n "") + 1); m = 1
      if (u ~ /^k/) m = 1e3; if (u ~ /^m/) m = 1e6; if (u ~ /^g/) m = 1e9; if (u ~ /^t/) m = 1e12
      if (u ~ /^.i/) m = (u ~ /^k/) ? 1024 : (u ~ /^m/) ? 1048576 : (u ~ /^g/) ? 1073741824 : 1099511627776
      bytes = (u ~ /bps$/) ? n * m : n * m / 8
      b = int(bytes * 0.002); if (b < 65536) b = 65536; print b }')
  fi
  for (( i = 0; i < hosts; i++ )); do
    h=${names[i]}
    if (( netem )); then
      run tc -n "$h" qdisc add dev eth0 root netem ${delay:+delay "$delay"} ${rate:+rate "$rate"} limit 100000
      [[ -z "$rate" ]] || run tc -n "$sw" qdisc add dev "h$i" root netem rate "$rate" limit 100000
    else
      run tc -n "$h" qdisc add dev eth0 root tbf rate "$rate" burst "$burst" latency 10ms 2> "$tmp/err" ||
        skip "cannot shape the rate with tbf ($(head -c 200 "$tmp/err"))"
      run tc -n "$sw" qdisc add dev "h$i" root tbf rate "$rate" burst "$burst" latency 10ms
    fi
  done
  links="${delay:+delay $delay one way}${delay:+${rate:+, }}${rate:+rate $rate each way}"
  (( netem )) || links+=" (tbf)"
fi

# Wait for the links to come up (carrier on both ends of every veth).
for (( i = 0; i < hosts; i++ )); do
  for _ in $(seq 1 50); do
    [[ "$(ip -n "${names[i]}" -o link show eth0)" == *LOWER_UP* ]] && break
    sleep 0.05
  done
done

# Cores: host i gets the i-th of N contiguous shares of the cores this script may use.
cpus=()
mapfile -t allowed < <(awk '/^Cpus_allowed_list/ { n = split($2, r, ",");
  for (i = 1; i <= n; i++) { split(r[i], ab, "-"); if (ab[2] == "") ab[2] = ab[1];
  for (c = ab[1]; c <= ab[2]; c++) print c } }' /proc/self/status)
ncpu=${#allowed[@]}
(( ncpu > 0 )) || { mapfile -t allowed < <(seq 0 $(( $(nproc) - 1 ))); ncpu=${#allowed[@]}; }
if (( cpu_split && ncpu >= hosts )); then
  for (( i = 0; i < hosts; i++ )); do
    lo=$(( i * ncpu / hosts )); hi=$(( (i + 1) * ncpu / hosts ))
    cpus+=("$(IFS=,; echo "${allowed[*]:lo:hi-lo}")")
  done
  per_host=$(( ncpu / hosts ))
else
  (( cpu_split )) && say "fewer cores ($ncpu) than hosts ($hosts): the hosts share all cores"
  for (( i = 0; i < hosts; i++ )); do cpus+=(""); done
  per_host=$(( ncpu / hosts ))   # the fair share, for the default thread count
fi

if [[ -z "$threads" ]]; then
  if pos "${OMP_NUM_THREADS:-}"; then threads=$OMP_NUM_THREADS
  else threads=$(( per_host / rph )); (( threads >= 1 )) || threads=1; fi
fi

# ---- run ---------------------------------------------------------------------------------------
map=""
for (( i = 0; i < hosts; i++ )); do
  map+="${map:+ }${addrs[i]}:${names[i]}:${cpus[i]}"
  echo "${addrs[i]} slots=$rph" >> "$tmp/hostfile"
done
export SYNCBN_NETNS_HOSTS=$map
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_btl_vader_single_copy_mechanism=none
export OMP_NUM_THREADS=$threads

flags=(-np $(( hosts * rph )) --hostfile "$tmp/hostfile" --map-by "ppr:$rph:node"
       --oversubscribe --bind-to none
       --mca plm rsh --mca plm_rsh_agent "$agent" --mca plm_rsh_no_tree_spawn 1
       --mca oob_tcp_if_include "$net24.0/24" --mca btl_tcp_if_include "$net24.0/24"
       --mca btl "$btl" --mca orte_tmpdir_base "$tmp")
# More threads than cores (a host's share, or all of them when shared): ranks yield while they wait.
if (( ${#cpus[0]} ? rph * threads > per_host : hosts * rph * threads > ncpu )); then
  flags+=(--mca mpi_yield_when_idle 1)
fi
passed=$(compgen -e | grep -E '^(OMP_|KMP_|GTEST_|SYNCBN_)' | grep -v '^SYNCBN_NETNS_' || true)
for v in PATH LD_LIBRARY_PATH $passed "${envs[@]}"; do
  [[ -n "${!v+set}" ]] && flags+=(-x "$v")
done
# shellcheck disable=SC2206
extra=(${SYNCBN_MPIRUN_FLAGS:-})

cores="all shared"
[[ -n "${cpus[0]}" ]] && cores=$(IFS='|'; echo "${cpus[*]}")
say "$hosts hosts x $rph ranks, $threads threads/rank: ${addrs[0]}..${addrs[hosts-1]} (${prefix}h*)," \
    "cores $cores; links $links"
(( verbose )) && say "+ $mpirun ${flags[*]} ${extra[*]} $*"
"$agent" --argv "${addrs[0]}" "$mpirun" "${flags[@]}" "${extra[@]}" "$@" <&0 &
child=$!
rc=0
wait "$child" || rc=$?
child=""
exit "$rc"
