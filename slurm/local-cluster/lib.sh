# lib.sh - what the local-cluster scripts (start/stop, single- and multi-node) share; sourced, not run.

# alive PIDFILE NAME: the pid file holds a live process whose comm starts with NAME (a reused pid, or
# another cluster's daemon, never counts)
alive() {
  local pid
  [[ -s $1 ]] || return 1
  pid=$(<"$1")
  [[ $pid =~ ^[0-9]+$ && -r /proc/$pid/comm ]] || return 1
  [[ $(</proc/"$pid"/comm) == "$2"* ]]
}

# wait_for SECONDS DESCRIPTION CMD...: poll CMD every 0.2 s until it succeeds; say what timed out
wait_for() {
  local n=$(( $1 * 5 )) what=$2; shift 2
  for ((i = 0; i < n; i++)); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  echo "$(basename "$0" .sh): timed out waiting for $what" >&2
  return 1
}
