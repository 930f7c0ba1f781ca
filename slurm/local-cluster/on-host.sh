#!/usr/bin/env bash
# on-host.sh WORK_DIR NAME CMD [ARGS...] - run CMD "on" emulated host NAME of the multi-node cluster of
# start-multinode.sh (as root): inside the host's network namespace, in a private UTS and mount namespace
# whose hostname is NAME and whose /etc/hosts is the cluster's hosts file ($WORK_DIR/hosts, bind-mounted:
# /etc is not changed). The file system is otherwise shared, as a cluster's shared file system is.
# ON_HOST_HOSTS=FILE puts FILE over /etc/hosts instead (tests/support/hosts.py: a host whose own name resolves
# to loopback, as Debian's default line makes it).
#
#   bash slurm/local-cluster/on-host.sh /tmp/mn h1 hostname            # h1
#   bash slurm/local-cluster/on-host.sh /tmp/mn h1 getent hosts h2     # h2's bridge address
#
# `ip netns exec` mounts a fresh /sys, which hides the cgroup file systems under /sys/fs/cgroup (slurmd
# then fails: "No filesystem mounted on /sys/fs/cgroup"): the root namespace's cgroup hierarchies (from
# /proc/1/mounts) are mounted again, seen only by CMD and its children.
set -euo pipefail
[[ $# -ge 3 ]] || { echo "usage: on-host.sh WORK_DIR NAME CMD [ARGS...]" >&2; exit 2; }
W=$1 name=$2; shift 2
nodes=$W/nodes   # "name address netns" per host, written by start-multinode.sh
[[ -s $nodes ]] || { echo "on-host: no $nodes: start the cluster with start-multinode.sh $W ..." >&2; exit 2; }
netns=$(awk -v n="$name" '$1 == n { print $3 }' "$nodes")
[[ -n $netns ]] || { echo "on-host: no host $name in $nodes" >&2; exit 2; }

exec ip netns exec "$netns" unshare --uts -- bash -c '
  set -e
  name=$1 hosts=$2; shift 2
  hostname "$name"
  mount --bind "$hosts" /etc/hosts
  while read -r src target fstype opts _; do
    case $fstype in
      tmpfs) [[ $target == /sys/fs/cgroup ]] && mount -t tmpfs -o "$opts" "$src" "$target" ;;
      cgroup|cgroup2) [[ $target == /sys/fs/cgroup* ]] || continue; mkdir -p "$target"
                      mount -t "$fstype" -o "$opts" "$src" "$target" ;;
    esac
  done < /proc/1/mounts
  exec "$@"' on-host "$name" "${ON_HOST_HOSTS:-$W/hosts}" "$@"
