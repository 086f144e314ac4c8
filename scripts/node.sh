# shellcheck shell=bash
# Sourced by scripts/testbed.sh (uses its CACHE, log, mirror, apt_install and KSRC, the Kubernetes tree):
# everything a real node needs besides kubelet itself, cached under "$CACHE/node":
#   containerd 1.6   Debian bookworm's .deb (kubelet 1.37 still takes a CRI without RuntimeConfig; 1.38 will not), unpacked (not installed: no service is started)
#   runc             Debian package (the only runtime that works on this hybrid cgroup layout)
#   images           docker-archive tarballs for `ctr images import` (no registry is reachable):
#                    local/pause:3.2 (static pause from the Kubernetes tree's pause.c) and
#                    local/busybox:1 (Debian's busybox-static), made by scripts/mkimage.py
#   CNI plugins      Debian's containernetworking-plugins (bridge, host-local, loopback), unpacked
#   CA bundle        Debian's ca-certificates, for the podlease image (scripts/image.sh)
# The test harness (tests/support/node.rs) starts the whole cluster from these, always inside
# private mount and network namespaces (scripts/node/nsinit.sh).

NODE_DIR="$CACHE/node"
NODE_SCRIPTS="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

# Package lists of Debian bookworm of our own (the machine's may be of another release).
bookworm_apt() {
  mkdir -p "$CACHE/apt/bookworm-lists/partial"
  echo "deb $(mirror) bookworm main" > "$CACHE/apt/bookworm.list"
  BOOKWORM_APT=(-o Dir::Etc::SourceList="$CACHE/apt/bookworm.list" -o Dir::Etc::SourceParts=/dev/null -o Dir::State::Lists="$CACHE/apt/bookworm-lists")
}

# Downloads Debian bookworm package $1 into $2 and unpacks it into $2/root.
unpack_deb() {
  local pkg=$1 dir=$2
  bookworm_apt
  mkdir -p "$dir"
  rm -rf "$dir/root" "$dir"/*.deb
  # Lists fetched by an earlier run may name files the mirror no longer has: update, retry.
  if ! (cd "$dir" && apt-get "${BOOKWORM_APT[@]}" download "$pkg" >&2); then
    $SUDO apt-get "${BOOKWORM_APT[@]}" update -qq >&2
    (cd "$dir" && apt-get "${BOOKWORM_APT[@]}" download "$pkg" >&2)
  fi
  dpkg -x "$dir"/"$pkg"_*.deb "$dir/root"
}

node_setup() {
  mkdir -p "$NODE_DIR/images"
  command -v nsenter >/dev/null && command -v unshare >/dev/null || apt_install util-linux
  command -v ip >/dev/null || apt_install iproute2

  CONTAINERD_DIR="$NODE_DIR/containerd/root/usr/bin"
  if [ ! -x "$CONTAINERD_DIR/containerd" ] || [ ! -x "$CONTAINERD_DIR/containerd-shim-runc-v2" ]; then
    log "fetching containerd (Debian bookworm)"
    unpack_deb containerd "$NODE_DIR/containerd"
  fi

  RUNC=$(command -v runc || true)
  if [ -z "$RUNC" ]; then
    apt_install runc
    RUNC=$(command -v runc)
  fi

  BUSYBOX="$NODE_DIR/busybox/root/bin/busybox"
  if [ ! -x "$BUSYBOX" ]; then
    log "fetching busybox-static (Debian bookworm)"
    unpack_deb busybox-static "$NODE_DIR/busybox"
  fi

  # Images are rebuilt when the script that makes them changed (same inputs, same bytes).
  local mkimage="$NODE_SCRIPTS/mkimage.py"
  PAUSE_IMAGE="$NODE_DIR/images/pause.tar"
  if [ ! -f "$PAUSE_IMAGE" ] || [ "$mkimage" -nt "$PAUSE_IMAGE" ]; then
    command -v gcc >/dev/null || apt_install gcc
    [ -f /usr/lib/x86_64-linux-gnu/libc.a ] || [ -f /usr/lib/libc.a ] || apt_install libc6-dev
    log "building the pause image"
    nice -n 19 gcc -Os -static -DVERSION=v3.2-podlease -o "$NODE_DIR/images/pause" "$KSRC/build/pause/linux/pause.c"
    strip "$NODE_DIR/images/pause"
    python3 "$mkimage" "$PAUSE_IMAGE.tmp" local/pause:3.2 --entrypoint '["/pause"]' \
      "$NODE_DIR/images/pause:/pause" >&2
    mv "$PAUSE_IMAGE.tmp" "$PAUSE_IMAGE"
  fi
  BUSYBOX_IMAGE="$NODE_DIR/images/busybox.tar"
  if [ ! -f "$BUSYBOX_IMAGE" ] || [ "$mkimage" -nt "$BUSYBOX_IMAGE" ]; then
    log "building the busybox image"
    local links=() applet
    for applet in $("$BUSYBOX" --list); do
      [ "$applet" = busybox ] || links+=("@link:/bin/$applet:busybox")
    done
    python3 "$mkimage" "$BUSYBOX_IMAGE.tmp" local/busybox:1 --entrypoint '["/bin/sh"]' \
      "$BUSYBOX:/bin/busybox" "${links[@]}" >&2
    mv "$BUSYBOX_IMAGE.tmp" "$BUSYBOX_IMAGE"
  fi

  # The CA bundle of the podlease image (scripts/image.sh): Debian's, not this machine's own.
  CA_BUNDLE="$NODE_DIR/ca-certificates/ca-certificates.crt"
  if [ ! -s "$CA_BUNDLE" ]; then
    log "fetching ca-certificates (Debian bookworm)"
    unpack_deb ca-certificates "$NODE_DIR/ca-certificates"
    # What update-ca-certificates writes: every certificate Debian ships, concatenated.
    find "$NODE_DIR/ca-certificates/root/usr/share/ca-certificates" -name '*.crt' -print0 | sort -z \
      | xargs -0 cat > "$CA_BUNDLE.tmp"
    mv "$CA_BUNDLE.tmp" "$CA_BUNDLE"
  fi

  CNI_BIN="$NODE_DIR/cni-plugins/root/usr/lib/cni"
  if [ ! -x "$CNI_BIN/bridge" ] || [ ! -x "$CNI_BIN/host-local" ] || [ ! -x "$CNI_BIN/loopback" ]; then
    log "fetching containernetworking-plugins (Debian bookworm)"
    unpack_deb containernetworking-plugins "$NODE_DIR/cni-plugins"
  fi
}

# The node's lines of testbed.env.
node_env() {
  cat <<ENV
PODLEASE_CONTAINERD_DIR=$CONTAINERD_DIR
PODLEASE_RUNC_BIN=$RUNC
PODLEASE_CNI_BIN_DIR=$CNI_BIN
PODLEASE_PAUSE_IMAGE=$PAUSE_IMAGE
PODLEASE_BUSYBOX_IMAGE=$BUSYBOX_IMAGE
PODLEASE_CA_BUNDLE=$CA_BUNDLE
ENV
}
