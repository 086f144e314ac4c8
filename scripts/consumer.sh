#!/usr/bin/env bash
# Builds tools/etcd-resolve (etcd's own gRPC naming resolver behind a tiny client, a real
# consumer of the etcd-naming format) from Debian's Go packages, in GOPATH mode, with no
# module proxy. Idempotent and cached: a second run finds the binary and takes no time.
# Prints the binary's path on stdout, progress on stderr.
#
# Why Debian sid, unpacked into the cache and not installed: bookworm's etcd sources are 3.4,
# which has no client/v3/naming/resolver (the grpc resolver.Builder for etcd:///); sid's
# golang-etcd-server-dev 3.5 has it, but needs sid's grpc-go, which needs Go >= 1.25, while
# bookworm's Go is 1.19. So the Go toolchain and the -dev packages all come from sid, unpacked
# with dpkg -x (as scripts/testbed.sh does for etcd), and GOPATH points at the unpacked
# /usr/share/gocode only: nothing of the system's own Go packages can mix in.
#
# Cache directory: $PODLEASE_CACHE, else $XDG_CACHE_HOME/podlease, else ~/.cache/podlease;
# this script uses $CACHE/consumer (packages, GOPATH, Go build cache, binary) and shares the
# sid package lists of scripts/testbed.sh ($CACHE/apt).
set -euo pipefail

HERE=$(cd "$(dirname "$0")/.." && pwd)
SRC="$HERE/tools/etcd-resolve"
CACHE=${PODLEASE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/podlease}
mkdir -p "$CACHE"
CACHE=$(cd "$CACHE" && pwd)
DIR="$CACHE/consumer"
BIN="$DIR/bin/etcd-resolve"
log() { echo "consumer: $*" >&2; }

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

# What the resolver and its client import, and nothing more (the Debian packages' own
# Depends pull in etcd's server and grpc's xDS stack: hundreds of MB never compiled here).
PACKAGES=(
  golang-etcd-server-dev        # go.etcd.io/etcd/{client/v3,api/v3,client/pkg/v3}
  golang-google-grpc-dev        # google.golang.org/grpc
  golang-google-protobuf-dev    # google.golang.org/protobuf
  golang-github-golang-protobuf-1-5-dev
  golang-github-gogo-protobuf-dev
  golang-google-genproto-dev    # googleapis/api/annotations, googleapis/rpc/status
  golang-github-coreos-go-semver-dev
  golang-github-coreos-go-systemd-dev
  golang-go.uber-zap-dev
  golang-go.uber-multierr-dev
  golang-golang-x-net-dev
  golang-golang-x-sys-dev
  golang-golang-x-text-dev
)

# The build is keyed by the source and this script: either changing rebuilds.
STAMP=$(cat "$SRC/main.go" "$0" | sha256sum | cut -d' ' -f1)
if [ -x "$BIN" ] && [ "$(cat "$DIR/bin/stamp" 2>/dev/null)" = "$STAMP" ]; then
  echo "$BIN"
  exit 0
fi

# The machine's own Debian mirror: never hard-code a registry host (as scripts/testbed.sh).
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

command -v dpkg-deb >/dev/null || { log "dpkg-deb is missing (a Debian system is needed)"; exit 1; }

# --- sid's package lists (shared with scripts/testbed.sh's etcd step) ---------------------
mkdir -p "$CACHE/apt/lists/partial"
echo "deb $(mirror) sid main" > "$CACHE/apt/sid.list"
A=(-o Dir::Etc::SourceList="$CACHE/apt/sid.list" -o Dir::Etc::SourceParts=/dev/null -o Dir::State::Lists="$CACHE/apt/lists")
sid_update() { log "apt-get update (sid lists)"; $SUDO apt-get "${A[@]}" update -qq >&2; }
if ! compgen -G "$CACHE/apt/lists/*_sid_main_binary-amd64_Packages*" >/dev/null; then sid_update; fi

# sid's default Go (golang-go depends on golang-1.NN-go), and its standard library sources.
# (awk reads to the end: an early exit could fail the pipeline with SIGPIPE under pipefail)
go_package() { apt-cache "${A[@]}" depends golang-go 2>/dev/null | awk '/Depends: golang-1\.[0-9]+-go$/ && !p {print $2; p=1}'; }
GO_PKG=$(go_package)
if [ -z "$GO_PKG" ]; then sid_update; GO_PKG=$(go_package); fi
[ -n "$GO_PKG" ] || { log "sid's golang-go names no golang-1.NN-go package"; exit 1; }
GO_VERSION=${GO_PKG#golang-}; GO_VERSION=${GO_VERSION%-go}

# --- download and unpack (a stale list may name files the mirror has dropped: update once) --
DEBS="$DIR/debs"
ROOT="$DIR/root"
rm -rf "$DEBS" "$ROOT.tmp"
mkdir -p "$DEBS"
download() { (cd "$DEBS" && apt-get "${A[@]}" download "$@" >&2); }
log "fetching Go $GO_VERSION and the etcd/grpc sources (Debian sid)"
if ! download "$GO_PKG" "golang-$GO_VERSION-src" "${PACKAGES[@]}"; then
  sid_update
  download "$GO_PKG" "golang-$GO_VERSION-src" "${PACKAGES[@]}"
fi
for f in "$DEBS"/*.deb; do
  dpkg-deb -x "$f" "$ROOT.tmp"
  dpkg-deb --showformat='${Package} ${Version}\n' -W "$f" >> "$ROOT.tmp/versions"
done
rm -rf "$ROOT" "$DEBS"
mv "$ROOT.tmp" "$ROOT"
[ -d "$ROOT/usr/share/gocode/src/go.etcd.io/etcd/client/v3/naming/resolver" ] \
  || { log "sid's golang-etcd-server-dev has no client/v3/naming/resolver"; exit 1; }

# --- build, GOPATH mode, offline ---------------------------------------------------------
# The /v3 import paths resolve through Go's minimal module compatibility: in GOPATH mode
# go.etcd.io/etcd/api/v3/... is found in .../etcd/api, whose go.mod declares the /v3 path.
GO="$ROOT/usr/lib/go-$GO_VERSION/bin/go"
mkdir -p "$DIR/bin" "$DIR/gopath" "$DIR/go-build"
log "building etcd-resolve with $("$GO" version | cut -d' ' -f3) (a minute or two the first time)"
(cd "$SRC" && env GO111MODULE=off GOPATH="$DIR/gopath:$ROOT/usr/share/gocode" GOPROXY=off \
  GOTOOLCHAIN=local GOFLAGS= GOENV=off GOTELEMETRY=off GOCACHE="$DIR/go-build" CGO_ENABLED=0 \
  HOME="$DIR/gopath" nice "$GO" build -trimpath -o "$BIN.tmp" .)
mv "$BIN.tmp" "$BIN"
echo "$STAMP" > "$DIR/bin/stamp"
log "built $BIN ($(awk '/^(golang-etcd-server-dev|golang-google-grpc-dev) /{printf "%s %s; ", $1, $2}' "$ROOT/versions"))"
echo "$BIN"
