#!/usr/bin/env bash
# usage: unshare -m --propagation private nsinit.sh STATE_DIR COMMAND...
# Runs COMMAND in the private mount namespace a test node's containerd and kubelet share, with
# the host paths they hard-code (/run: shim sockets under /run/containerd; /var/log/pods,
# /var/log/containers; /var/lib/kubelet) and the kernel tunables kubelet rewrites
# (vm.overcommit_memory, kernel.panic, kernel.panic_on_oops, ...) bound to files under
# STATE_DIR, visible in this namespace only. Every mount here ends with the namespace.
set -euo pipefail
B=$1; shift
export LIBMOUNT_UTAB=$B/utab   # keeps mount(8) from creating /run/mount on the host
mkdir -p "$B/run" "$B/varlog" "$B/varlib" "$B/sysctl"
mount --bind "$B/run" /run
mount --bind "$B/varlog" /var/log
mount --bind "$B/varlib" /var/lib   # nothing in this namespace needs the host's /var/lib
for f in vm/overcommit_memory vm/panic_on_oom kernel/panic kernel/panic_on_oops kernel/keys/root_maxkeys kernel/keys/root_maxbytes; do
  n=$B/sysctl/${f//\//_}
  cat "/proc/sys/$f" > "$n"
  mount --bind "$n" "/proc/sys/$f"
done
exec "$@"
