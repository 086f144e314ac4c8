#!/usr/bin/env bash
# usage: unshare -m -n --propagation private nsinit.sh STATE_DIR NODE_CIDR COMMAND...
# Prepares the private mount and network namespaces a test cluster runs in, then runs COMMAND.
#
# Mounts: the host paths containerd and kubelet hard-code (/run: shim sockets under
# /run/containerd; /var/log/pods, /var/log/containers; /var/lib/kubelet, /var/lib/cni) and
# the kernel tunables kubelet rewrites (vm.overcommit_memory, kernel.panic, ...) are bound to
# files under STATE_DIR, visible in this namespace only.
#
# Network: a namespace of its own with lo and the node's address NODE_CIDR on a veth pair
# whose both ends stay inside. It has no interface to the outside and no default route, so
# nothing in it (kubelet's probes, pods, a consumer dialling pod addresses) can send a packet
# off this machine, and the host's network is never touched. Every mount and interface
# here ends with the namespaces.
set -euo pipefail
B=$1 NODE_CIDR=$2; shift 2
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
ip link set lo up
# No dummy driver in every kernel: a veth pair, both ends here.
ip link add node0 type veth peer name node1
ip addr add "$NODE_CIDR" dev node0
ip link set node0 up
ip link set node1 up
exec "$@"
