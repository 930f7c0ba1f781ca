#!/usr/bin/env bash
# stop-multinode.sh WORK_DIR - stop the cluster of start-multinode.sh WORK_DIR: cancel its jobs (so that no
# slurmstepd or job process is left behind), then stop its daemons, found only through their pid files
# under WORK_DIR (and checked by process name, so a reused pid or another cluster is never hit).
# The emulated hosts themselves (namespaces, bridge) are left to whoever made them.
set -uo pipefail
[[ $# -eq 1 ]] || { echo "usage: stop-multinode.sh WORK_DIR" >&2; exit 2; }
W=$1
export SLURM_CONF=$W/slurm.conf

. "$(dirname "$(readlink -f "$0")")/lib.sh"   # alive, wait_for

stop_all() {  # stop_all NAME=PIDFILE... : SIGTERM to all at once (none needs another to stop), then wait
  local spec name pidfile pid live pids=() names=()
  for spec in "$@"; do
    name=${spec%%=*} pidfile=${spec#*=}
    if alive "$pidfile" "$name"; then
      pid=$(<"$pidfile"); echo "stopping $name (pid $pid)"; kill -TERM "$pid" 2>/dev/null; pids+=("$pid"); names+=("$name")
    fi
    rm -f "$pidfile"
  done
  for ((i = 0; i < 200; i++)); do
    live=0
    for pid in "${pids[@]}"; do [[ -d /proc/$pid ]] && live=1; done
    [[ $live == 0 ]] && return 0
    sleep 0.1
  done
  for i in "${!pids[@]}"; do
    pid=${pids[$i]} name=${names[$i]}
    if [[ -d /proc/$pid ]] && [[ $(</proc/"$pid"/comm) == "$name"* ]]; then
      echo "$name (pid $pid) ignored SIGTERM for 20s: SIGKILL"; kill -KILL "$pid" 2>/dev/null
    fi
  done
}

if [[ -f $SLURM_CONF ]] && alive "$W/run/slurmctld.pid" slurmctld; then
  jobs=$(squeue -h -o %A 2>/dev/null | tr '\n' ' ')
  if [[ -n ${jobs// /} ]]; then
    echo "cancelling jobs: $jobs"
    # shellcheck disable=SC2086
    scancel $jobs 2>/dev/null
    for ((i = 0; i < 75; i++)); do
      [[ -z $(squeue -h -t PD,R,CG,S -o %A 2>/dev/null) ]] && break; sleep 0.2
    done
  fi
fi
daemons=("slurmctld=$W/run/slurmctld.pid" "munged=$W/munge/munged.pid")
for pidfile in "$W"/run/slurmd-*.pid; do [[ -e $pidfile ]] && daemons+=("slurmd=$pidfile"); done
stop_all "${daemons[@]}"
exit 0
