#!/usr/bin/env bash
# The "remote shell" of launch/netns_hosts.sh: runs a command on one of its simulated hosts, i.e.
# inside that host's network namespace, the way ssh would run it on a real host. Open MPI's rsh
# launcher calls it (--mca plm_rsh_agent) to start its daemon (orted) on every host but the first.
#
#   netns_rsh.sh [ssh-style options] HOST WORD...    run the words as one shell command line,
#                                                   like ssh: joined with spaces, run by /bin/sh -c
#   netns_rsh.sh --argv HOST COMMAND [ARGS...]       run the argument vector as it is (no shell);
#                                                   netns_hosts.sh starts mpirun on host 0 this way
#
# HOST is a simulated host's address or its namespace name, looked up in SYNCBN_NETNS_HOSTS,
# which netns_hosts.sh exports: space-separated entries "ADDRESS:NAMESPACE:CPUS" (CPUS a cpu list
# for taskset, or empty). The command then runs as
#   ip netns exec NAMESPACE unshare --uts -- taskset -c CPUS ...
# in the host's network namespace (its only interfaces: lo and the veth to the simulated switch),
# in a UTS namespace of its own whose host name is NAMESPACE (so that every simulated host has its
# own host name, as Open MPI expects of separate hosts: session directories, shared-memory file
# names), and on the host's share of the cores (CPUS). The host name is set only after unshare has
# made the new UTS namespace, never the machine's own. Without unshare (or with
# SYNCBN_NETNS_UTS=0) the hosts share the machine's host name.
#
# Leading ssh-style options (Open MPI adds -x when the agent's name contains "ssh"; plm_rsh_args)
# are accepted and ignored. The environment passes through: the command inherits the caller's.
set -euo pipefail

die() { echo "netns_rsh.sh: $*" >&2; exit 255; }   # 255: what ssh returns when it cannot connect

mode=shell
while [[ $# -gt 0 ]]; do
  case "$1" in
    --argv) mode=argv; shift ;;
    --) shift; break ;;
    -[bcDEeFIiJLlmOopQRSWw]) shift 2 ;;   # ssh options that take a value
    -?*) shift ;;                         # flags (-x, -T, -n, -q, ...) and -oKey=value forms
    *) break ;;
  esac
done
[[ $# -ge 2 ]] || die "usage: netns_rsh.sh [--argv] HOST COMMAND..."
host=$1; shift

ns=""; cpus=""
for entry in ${SYNCBN_NETNS_HOSTS:-}; do
  IFS=: read -r e_addr e_ns e_cpus <<< "$entry"
  if [[ "$host" == "$e_addr" || "$host" == "$e_ns" ]]; then
    ns=$e_ns; cpus=$e_cpus; break
  fi
done
[[ -n "$ns" ]] || die "unknown host '$host' (not in SYNCBN_NETNS_HOSTS; run through launch/netns_hosts.sh)"

cmd=(ip netns exec "$ns")
if [[ "${SYNCBN_NETNS_UTS:-1}" == 1 ]] && command -v unshare > /dev/null; then
  # In the new UTS namespace only: name the host, then run the rest.
  # shellcheck disable=SC2016  # $0 and $@ are the inner shell's
  cmd+=(unshare --uts -- /bin/sh -c 'echo "$0" > /proc/sys/kernel/hostname && exec "$@"' "$ns")
fi
[[ -n "$cpus" ]] && cmd+=(taskset -c "$cpus")

if [[ "$mode" == argv ]]; then
  exec "${cmd[@]}" "$@"
else
  exec "${cmd[@]}" /bin/sh -c "$*"
fi
