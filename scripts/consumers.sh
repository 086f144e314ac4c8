#!/usr/bin/env bash
# Builds the consumer frameworks' own clients (tools/consumers/<framework>: one Go module each,
# every version pinned in its go.mod and go.sum, so one framework's dependencies never raise
# another's) from the Go module proxy, into the cache. A program is built again only when its
# sources change (the cache key is a hash of its directory). Sourced by scripts/testbed.sh
# (uses its CACHE and log, and the Go environment it sets up); prints testbed.env lines.
#
#   PODLEASE_CONSUMER_<NAME>_BIN      the program (`resolve` / `register`, tools/consumers/README.md)
#   PODLEASE_CONSUMER_<NAME>_VERSION  the framework's module version it was built with
# and for CoreDNS also PODLEASE_COREDNS_BIN (the coredns binary built from its module).

CONSUMERS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/../tools/consumers" && pwd)"

# The module whose version a framework's row in the README names.
consumer_module() {
  case $1 in
    go-zero) echo github.com/zeromicro/go-zero ;;
    kratos) echo github.com/go-kratos/kratos/contrib/registry/etcd/v2 ;;
    go-micro) echo go-micro.dev/v5 ;;
    kitex) echo github.com/kitex-contrib/registry-etcd ;;
    hertz) echo github.com/hertz-contrib/registry/etcd ;;
    coredns) echo github.com/coredns/coredns ;;
    etcd-naming) echo go.etcd.io/etcd/client/v3 ;;
  esac
}

consumers_build() {
  CONSUMER_ENV=""
  local dir name key out upper version
  for dir in "$CONSUMERS_DIR"/*/; do
    [ -f "$dir/go.mod" ] || continue
    name=$(basename "$dir")
    key=$(cd "$dir" && find . -type f \( -name '*.go' -o -name go.mod -o -name go.sum \) -print0 | sort -z \
      | xargs -0 sha256sum | sha256sum | cut -c1-16)
    out="$CACHE/consumers/$name/$key"
    if [ ! -x "$out/client" ]; then
      log "building the $name client (tools/consumers/$name)"
      rm -rf "$CACHE/consumers/$name"
      mkdir -p "$out.tmp"
      # The program itself, and every `tool` of its go.mod (CoreDNS: the coredns binary).
      (cd "$dir" && CGO_ENABLED=0 nice -n 10 go build -mod=readonly -trimpath -ldflags=-s\ -w -o "$out.tmp/client" . \
        && for t in $(go mod edit -json | python3 -c 'import json,sys; print(" ".join(t["Path"] for t in json.load(sys.stdin).get("Tool") or []))'); do \
             CGO_ENABLED=0 nice -n 10 go build -mod=readonly -trimpath -ldflags=-s\ -w -o "$out.tmp/" "$t"; done) >&2
      mv "$out.tmp" "$out"
    fi
    upper=$(echo "$name" | tr 'a-z-' 'A-Z_')
    version=$(cd "$dir" && go list -mod=readonly -m -f '{{.Version}}' "$(consumer_module "$name")" 2>/dev/null || echo unknown)
    CONSUMER_ENV+="PODLEASE_CONSUMER_${upper}_BIN=$out/client"$'\n'
    CONSUMER_ENV+="PODLEASE_CONSUMER_${upper}_VERSION=$version"$'\n'
    if [ -x "$out/coredns" ]; then CONSUMER_ENV+="PODLEASE_COREDNS_BIN=$out/coredns"$'\n'; fi
    if [ "$name" = etcd-naming ]; then CONSUMER_ENV+="PODLEASE_ETCD_RESOLVE_BIN=$out/client"$'\n'; fi
  done
}
