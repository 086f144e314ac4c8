#!/usr/bin/env bash
# Installs and caches everything the test bed needs, idempotently:
#   protoc, gdb (stack dumps of a hung test), cargo-nextest; etcd 3.6 and Kubernetes 1.37 and
#   1.34 (kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kubectl), all built
#   from Go modules through the project's wrapper modules (tools/etcd, tools/kube); etcd 3.5
#   (Debian sid's etcd-server, unpacked: the registry's compatibility run) and 3.4 (bookworm's:
#   doctor's version check); Prometheus and promtool (Debian bookworm's, unpacked), a Python
#   virtualenv with helm-python-sdk, the consumer frameworks' own clients (tools/consumers), and
#   the rest of a real node (containerd, runc, pause and busybox images, the CNI plugin:
#   scripts/node.sh).
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
command -v gdb >/dev/null || apt_install gdb
command -v curl >/dev/null || apt_install curl   # the benches read the peer controller manager's TLS metrics

# --- cargo-nextest (the test runner of `make test`) -------------------------------------------
if ! cargo nextest --version >/dev/null 2>&1; then
  log "installing cargo-nextest (a few minutes the first time)"
  nice -n 10 cargo install --locked cargo-nextest >&2
fi

# --- Go (the module builds below): the machine's Go, with the project's own caches ------------
# The wrapper modules need Go 1.26 (their go.mod files say `go 1.26.0` and use `tool` lines):
# the first Go of at least 1.26 on the PATH or in /usr/local/go (Debian's golang-go is older).
GO=""
for g in "$(command -v go || true)" /usr/local/go/bin/go; do
  [ -n "$g" ] && [ -x "$g" ] || continue
  v=$("$g" env GOVERSION 2>/dev/null || true); v=${v#go}
  major=${v%%.*}; rest=${v#*.}; minor=${rest%%.*}
  if [ "${major:-0}" -gt 1 ] || { [ "${major:-0}" -eq 1 ] && [ "${minor:-0}" -ge 26 ]; } 2>/dev/null; then GO=$g; break; fi
done
[ -n "$GO" ] || { log "no Go toolchain of at least 1.26 (found: $(go version 2>/dev/null || echo none)): install Go 1.26 first"; exit 1; }
export PATH="$(dirname "$GO"):$PATH"
export GOMODCACHE="$CACHE/go/mod" GOCACHE="$CACHE/go/build" GOTOOLCHAIN=local
mkdir -p "$GOMODCACHE" "$GOCACHE"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

# --- etcd 3.6 (the registry and the API servers' storage), built from Go modules ----------------
ETCD_VERSION=3.6.17
ETCD_DIR="$CACHE/etcd-$ETCD_VERSION/bin"
if [ ! -x "$ETCD_DIR/etcd" ] || [ ! -x "$ETCD_DIR/etcdctl" ]; then
  log "building etcd $ETCD_VERSION from Go modules (a few minutes the first time)"
  nice -n 10 bash "$HERE/etcd.sh" build "$ETCD_VERSION" "$ETCD_DIR" >&2
fi
ETCD="$ETCD_DIR/etcd"
ETCDCTL="$ETCD_DIR/etcdctl"
case "$("$ETCD" --version)" in
  *"etcd Version: 3.6."*) ;;
  *) log "etcd is not 3.6: $("$ETCD" --version)"; exit 1 ;;
esac

# --- etcd 3.5 from Debian sid, unpacked, not installed: the registry's compatibility run -------
ETCD35="$CACHE/etcd/root/usr/bin/etcd"
ETCDCTL35="$CACHE/etcd/root/usr/bin/etcdctl"
if [ ! -x "$ETCD35" ] || [ ! -x "$ETCDCTL35" ]; then
  log "fetching etcd 3.5 (Debian sid etcd-server, etcd-client)"
  M=$(mirror)
  mkdir -p "$CACHE/apt/lists/partial" "$CACHE/etcd"
  echo "deb $M sid main" > "$CACHE/apt/sid.list"
  A=(-o Dir::Etc::SourceList="$CACHE/apt/sid.list" -o Dir::Etc::SourceParts=/dev/null -o Dir::State::Lists="$CACHE/apt/lists")
  $SUDO apt-get "${A[@]}" update -qq >&2
  (cd "$CACHE/etcd" && rm -f ./*.deb && apt-get "${A[@]}" download etcd-server etcd-client >&2 \
    && for f in *.deb; do dpkg -x "$f" root; done)
fi
case "$("$ETCD35" --version)" in
  *"etcd Version: 3.5."*) ;;
  *) log "etcd 3.5 is not 3.5: $("$ETCD35" --version)"; exit 1 ;;
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

# --- Kubernetes from Go modules: 1.37 (the bed) and 1.34 (the oldest supported release) ---------
# kube-apiserver, kube-controller-manager, kube-scheduler, kubelet and kubectl, each built from
# upstream's cmd/ package through tools/kube/v<version> (scripts/kube.sh), cached by version.
KUBE_VERSION=1.37.2
KUBE_OLDEST=1.34.4
for v in "$KUBE_VERSION" "$KUBE_OLDEST"; do
  d="$CACHE/kube-$v/bin"
  for c in kube-apiserver kube-controller-manager kube-scheduler kubelet kubectl; do
    if [ ! -x "$d/$c" ]; then
      log "building Kubernetes $v from Go modules (10-20 minutes the first time)"
      nice -n 10 bash "$HERE/kube.sh" build "$v" "$d" >&2
      break
    fi
  done
done
KBIN="$CACHE/kube-$KUBE_VERSION/bin"
KBIN_OLDEST="$CACHE/kube-$KUBE_OLDEST/bin"
KUBECTL="$KBIN/kubectl"
# The Kubernetes tree of the module cache (the node's pause image is built from its
# build/pause/linux/pause.c); downloaded if the cache lost it.
KSRC=$(go mod download -json "k8s.io/kubernetes@v$KUBE_VERSION" | sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')
[ -f "$KSRC/build/pause/linux/pause.c" ] || { log "no build/pause/linux/pause.c in k8s.io/kubernetes@v$KUBE_VERSION ($KSRC)"; exit 1; }

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

# --- the consumer frameworks' own clients (tools/consumers), etcd's naming resolver among them --
# shellcheck source=scripts/consumers.sh
. "$HERE/consumers.sh"
consumers_build

# Written aside and renamed: a test or demo reading it meanwhile never sees half a file.
cat > "$CACHE/testbed.env.tmp.$$" <<ENV
PODLEASE_ETCD_BIN=$ETCD
PODLEASE_ETCDCTL_BIN=$ETCDCTL
PODLEASE_ETCD35_BIN=$ETCD35
PODLEASE_ETCDCTL35_BIN=$ETCDCTL35
PODLEASE_ETCD_OLD_BIN=$ETCD_OLD
PODLEASE_KUBE_VERSION=$KUBE_VERSION
PODLEASE_KUBE_APISERVER_BIN=$KBIN/kube-apiserver
PODLEASE_KUBE_CONTROLLER_MANAGER_BIN=$KBIN/kube-controller-manager
PODLEASE_KUBECTL_BIN=$KUBECTL
PODLEASE_KUBE_OLDEST_VERSION=$KUBE_OLDEST
PODLEASE_KUBE_OLDEST_DIR=$KBIN_OLDEST
PODLEASE_HELM_PYTHON=$VENV/bin/python
PODLEASE_PROMETHEUS_BIN=$PROM
PODLEASE_PROMTOOL_BIN=$PROMTOOL
PODLEASE_KUBE_SCHEDULER_BIN=$KBIN/kube-scheduler
PODLEASE_KUBELET_BIN=$KBIN/kubelet
$(node_env)
$CONSUMER_ENV
ENV
mv -f "$CACHE/testbed.env.tmp.$$" "$CACHE/testbed.env"
log "ready ($CACHE/testbed.env)"
echo "$CACHE/testbed.env"
