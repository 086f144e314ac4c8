#!/usr/bin/env bash
# Installs and caches everything the test bed needs, idempotently:
#   protoc, etcd 3.5 (Debian sid's etcd-server, unpacked) and 3.4 (bookworm's), kube-apiserver,
#   kube-controller-manager, kube-scheduler and kubelet v1.20.2 (built from Debian bookworm's
#   kubernetes source), kubectl, Prometheus and promtool (Debian bookworm's prometheus,
#   unpacked), a Python virtualenv with helm-python-sdk, and the rest of a real node
#   (containerd, runc, pause and busybox images, the CNI plugin: scripts/node.sh).
# A second run finds everything in the cache, installs nothing and only checks it.
#
# Cache directory: $PODLEASE_CACHE, else $XDG_CACHE_HOME/podlease, else ~/.cache/podlease.
# Prints nothing but progress to stderr; writes "$CACHE/testbed.env" with the binaries' paths.
set -euo pipefail

CACHE=${PODLEASE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/podlease}
mkdir -p "$CACHE"
CACHE=$(cd "$CACHE" && pwd)
log() { echo "testbed: $*" >&2; }

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

# The machine's own Debian mirror: never hard-code a registry host.
mirror() {
  local m=""
  if [ -f /etc/apt/sources.list.d/debian.sources ]; then
    m=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources)
  fi
  if [ -z "$m" ] && [ -f /etc/apt/sources.list ]; then
    m=$(awk '/^deb /{print $2; exit}' /etc/apt/sources.list)
  fi
  [ -n "$m" ] || { log "cannot find a Debian mirror in the apt sources"; exit 1; }
  echo "$m"
}

APT_UPDATED=0
apt_install() {
  local missing=()
  for p in "$@"; do
    # No pipe into grep -q: under pipefail its early exit can fail the pipeline (SIGPIPE).
    [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" = "install ok installed" ] || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ $APT_UPDATED = 0 ]; then
    log "apt-get update"
    $SUDO apt-get update -qq >&2
    APT_UPDATED=1
  fi
  log "apt-get install ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >&2
}

# --- protoc (etcd-client's build), openssl (test certificates) ---------------------------
command -v protoc >/dev/null || apt_install protobuf-compiler
command -v openssl >/dev/null || apt_install openssl

# --- etcd 3.5 from Debian sid, unpacked, not installed -------------------------------------
ETCD="$CACHE/etcd/root/usr/bin/etcd"
ETCDCTL="$CACHE/etcd/root/usr/bin/etcdctl"
if [ ! -x "$ETCD" ] || [ ! -x "$ETCDCTL" ]; then
  log "fetching etcd 3.5 (Debian sid etcd-server, etcd-client)"
  M=$(mirror)
  mkdir -p "$CACHE/apt/lists/partial" "$CACHE/etcd"
  echo "deb $M sid main" > "$CACHE/apt/sid.list"
  A=(-o Dir::Etc::SourceList="$CACHE/apt/sid.list" -o Dir::Etc::SourceParts=/dev/null -o Dir::State::Lists="$CACHE/apt/lists")
  $SUDO apt-get "${A[@]}" update -qq >&2
  (cd "$CACHE/etcd" && rm -f ./*.deb && apt-get "${A[@]}" download etcd-server etcd-client >&2 \
    && for f in *.deb; do dpkg -x "$f" root; done)
fi
ETCD_VERSION=$("$ETCD" --version)
case "$ETCD_VERSION" in
  *"etcd Version: 3.5."*) ;;
  *) log "etcd is not 3.5: $ETCD_VERSION"; exit 1 ;;
esac

# --- etcd 3.4 from Debian bookworm, unpacked: a real etcd below 3.5.13 ------------------------
# `podlease doctor` must name the lease bugs of an older member (tests/doctor.rs runs it).
ETCD_OLD="$CACHE/etcd-3.4/root/usr/bin/etcd"
if [ ! -x "$ETCD_OLD" ]; then
  log "fetching etcd 3.4 (Debian bookworm etcd-server)"
  M=$(mirror)
  mkdir -p "$CACHE/apt/bookworm-lists/partial" "$CACHE/etcd-3.4"
  echo "deb $M bookworm main" > "$CACHE/apt/bookworm.list"
  A=(-o Dir::Etc::SourceList="$CACHE/apt/bookworm.list" -o Dir::Etc::SourceParts=/dev/null -o Dir::State::Lists="$CACHE/apt/bookworm-lists")
  $SUDO apt-get "${A[@]}" update -qq >&2
  (cd "$CACHE/etcd-3.4" && rm -rf ./*.deb root && apt-get "${A[@]}" download etcd-server >&2 \
    && dpkg -x etcd-server_*.deb root)
fi

# --- kube-apiserver, kube-controller-manager, kube-scheduler, kubelet v1.20.2 -------------------
# All four from Debian bookworm's source package; the node's pause image needs its tree too.
KBIN="$CACHE/kube/bin"
KSRC="$CACHE/kube/src/kubernetes-1.20.2"
KUBE_COMPONENTS=(kube-apiserver kube-controller-manager kube-scheduler kubelet)
kube_source() {
  [ -d "$KSRC/vendor" ] && return 0
  apt_install golang-go rsync make golang-github-modern-go-reflect2-dev
  local M; M=$(mirror)
  mkdir -p "$CACHE/apt/srclists/partial" "$CACHE/kube/src"
  echo "deb-src $M bookworm main" > "$CACHE/apt/src.list"
  local A=(-o Dir::Etc::SourceList="$CACHE/apt/src.list" -o Dir::Etc::SourceParts=/dev/null -o Dir::State::Lists="$CACHE/apt/srclists")
  log "fetching the kubernetes 1.20.2 source package"
  $SUDO apt-get "${A[@]}" update -qq >&2
  (cd "$CACHE/kube/src" && apt-get "${A[@]}" source --download-only kubernetes >&2 \
    && tar xzf kubernetes_1.20.5+really1.20.2.orig.tar.gz)
  # Kubernetes 1.20 vendors reflect2 v1.0.1, which faults under Go >= 1.18 on the first
  # CRD write; Debian's reflect2 1.0.2 has the same API.
  rm -rf "$KSRC/vendor/github.com/modern-go/reflect2"
  mkdir "$KSRC/vendor/github.com/modern-go/reflect2"
  cp /usr/share/gocode/src/github.com/modern-go/reflect2/* "$KSRC/vendor/github.com/modern-go/reflect2/"
  mkdir -p "$KSRC/.go/src/k8s.io" && ln -sfn ../../.. "$KSRC/.go/src/k8s.io/kubernetes"
}
for what in "${KUBE_COMPONENTS[@]}"; do
  if [ ! -x "$KBIN/$what" ]; then
    kube_source
    apt_install golang-go rsync make
    mkdir -p "$KBIN" "$CACHE/home"
    log "building $what (several minutes the first time)"
    (cd "$KSRC" && nice -n 19 env GOPATH="$KSRC/.go" GOCACHE="$CACHE/home/go-build" CGO_ENABLED=0 HOME="$CACHE/home" \
      make WHAT="cmd/$what" >&2)
    cp "$KSRC/_output/bin/$what" "$KBIN/$what.tmp" && mv "$KBIN/$what.tmp" "$KBIN/$what"
  fi
done

# --- kubectl -------------------------------------------------------------------------------------
KUBECTL=$(command -v kubectl || true)
if [ -z "$KUBECTL" ]; then
  apt_install kubernetes-client
  KUBECTL=$(command -v kubectl)
fi

# --- Prometheus and promtool from Debian bookworm, unpacked, not installed -----------------------
# The alert rules' unit tests (promtool test rules) and a live Prometheus scraping podlease.
PROM="$CACHE/prometheus/root/usr/bin/prometheus"
PROMTOOL="$CACHE/prometheus/root/usr/bin/promtool"
if [ ! -x "$PROM" ] || [ ! -x "$PROMTOOL" ]; then
  log "fetching prometheus (Debian bookworm)"
  M=$(mirror)
  mkdir -p "$CACHE/apt/bookworm-lists/partial" "$CACHE/prometheus"
  echo "deb $M bookworm main" > "$CACHE/apt/bookworm.list"
  A=(-o Dir::Etc::SourceList="$CACHE/apt/bookworm.list" -o Dir::Etc::SourceParts=/dev/null -o Dir::State::Lists="$CACHE/apt/bookworm-lists")
  $SUDO apt-get "${A[@]}" update -qq >&2
  (cd "$CACHE/prometheus" && rm -rf ./*.deb root && apt-get "${A[@]}" download prometheus >&2 \
    && dpkg -x prometheus_*.deb root)
fi

# --- Python virtualenv with helm-python-sdk (real Helm rendering) -------------------------------
VENV="$CACHE/venv"
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import helm_python' 2>/dev/null; then
  log "creating the Helm virtualenv"
  PY=$(command -v python3)
  "$PY" -m venv "$VENV" >&2 || { apt_install python3-venv; "$PY" -m venv "$VENV" >&2; }
  "$VENV/bin/pip" install -q --disable-pip-version-check helm-python-sdk pyyaml >&2
fi

# --- the rest of a real node: containerd, runc, images, CNI plugin ----------------------------
# shellcheck source=scripts/node.sh
. "$(dirname "${BASH_SOURCE[0]}")/node.sh"
node_setup

# --- etcd's own gRPC naming resolver, a real consumer of the etcd-naming format ----------------
ETCD_RESOLVE=$(bash "$(dirname "${BASH_SOURCE[0]}")/consumer.sh")

# Written aside and renamed: a test or demo reading it meanwhile never sees half a file.
cat > "$CACHE/testbed.env.tmp.$$" <<ENV
PODLEASE_ETCD_BIN=$ETCD
PODLEASE_ETCDCTL_BIN=$ETCDCTL
PODLEASE_ETCD_OLD_BIN=$ETCD_OLD
PODLEASE_KUBE_APISERVER_BIN=$KBIN/kube-apiserver
PODLEASE_KUBE_CONTROLLER_MANAGER_BIN=$KBIN/kube-controller-manager
PODLEASE_KUBECTL_BIN=$KUBECTL
PODLEASE_HELM_PYTHON=$VENV/bin/python
PODLEASE_PROMETHEUS_BIN=$PROM
PODLEASE_PROMTOOL_BIN=$PROMTOOL
PODLEASE_KUBE_SCHEDULER_BIN=$KBIN/kube-scheduler
PODLEASE_KUBELET_BIN=$KBIN/kubelet
PODLEASE_ETCD_RESOLVE_BIN=$ETCD_RESOLVE
$(node_env)
ENV
mv -f "$CACHE/testbed.env.tmp.$$" "$CACHE/testbed.env"
log "ready ($CACHE/testbed.env)"
echo "$CACHE/testbed.env"
