#!/usr/bin/env bash
# Builds the podlease image as a docker-archive (for `ctr images import` / `docker load`) from
# a local release binary, without a container engine or a base image: the Dockerfile's final
# stage (gcr.io/distroless/cc-debian12:nonroot + the binary) rebuilt from its parts:
#   /usr/local/bin/podlease         the stripped release binary
#   the shared libraries it links   (glibc, libgcc_s, libm: what distroless/cc ships)
#   /etc/ssl/certs/ca-certificates.crt   Debian's CA bundle (from scripts/testbed.sh)
#   /etc/passwd, /etc/group         root, nobody, nonroot (65532), as distroless has them
#   /home/nonroot, /tmp             the nonroot user's home and a sticky /tmp
# USER, ENTRYPOINT, CMD and EXPOSE are read from the Dockerfile's last stage, so the two
# cannot drift apart (tests/image.rs checks the result against it).
#
# usage: scripts/image.sh [OUT.tar [REPO:TAG]]   (default target/image/podlease.tar podlease:dev)
# The binary: $PODLEASE_BIN, else target/release/podlease (built with --locked if needed).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${1:-$ROOT/target/image/podlease.tar}
REF=${2:-podlease:dev}
CACHE=${PODLEASE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/podlease}
log() { echo "image: $*" >&2; }

BIN=${PODLEASE_BIN:-}
if [ -z "$BIN" ]; then
  (cd "$ROOT" && nice cargo build --release --locked --bin podlease >&2)
  BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/podlease
fi
[ -x "$BIN" ] || { log "no binary at $BIN"; exit 1; }

CA_BUNDLE=${PODLEASE_CA_BUNDLE:-}
if [ -z "$CA_BUNDLE" ] && [ -f "$CACHE/testbed.env" ]; then
  CA_BUNDLE=$(sed -n 's/^PODLEASE_CA_BUNDLE=//p' "$CACHE/testbed.env")
fi
[ -s "$CA_BUNDLE" ] || { log "no CA bundle: run scripts/testbed.sh first"; exit 1; }

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$(dirname "$OUT")"

strip -o "$WORK/podlease" "$BIN"
cat > "$WORK/passwd" <<'EOF'
root:x:0:0:root:/root:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
EOF
cat > "$WORK/group" <<'EOF'
root:x:0:
nobody:x:65534:
nonroot:x:65532:
EOF

# Every library the binary loads (and the loader), at the path the loader looks for it.
specs=("$WORK/podlease:/usr/local/bin/podlease" "$WORK/passwd:/etc/passwd" "$WORK/group:/etc/group"
  "$CA_BUNDLE:/etc/ssl/certs/ca-certificates.crt" "@dir:/home/nonroot:65532:65532:0700")
while read -r lib; do
  specs+=("$(readlink -f "$lib"):$lib")
done < <(ldd "$WORK/podlease" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}')

# USER, ENTRYPOINT, CMD, EXPOSE of the Dockerfile's last stage.
mapfile -t config < <(python3 - "$ROOT/Dockerfile" <<'EOF'
import json, sys
lines = open(sys.argv[1]).read().replace("\\\n", " ").splitlines()
stage = []
for line in lines:
    word = line.strip().split(" ", 1)
    if word[0].upper() == "FROM":
        stage = []
    elif word[0] and not word[0].startswith("#"):
        stage.append((word[0].upper(), word[1].strip() if len(word) > 1 else ""))
for k, v in stage:
    if k == "USER":
        print("--user=" + v)
    elif k in ("ENTRYPOINT", "CMD"):
        print(f"--{k.lower()}=" + json.dumps(json.loads(v)))
    elif k == "EXPOSE":
        for p in v.split():
            print("--expose=" + (p if "/" in p else p + "/tcp"))
EOF
)

python3 "$ROOT/scripts/mkimage.py" "$OUT.tmp" "$REF" "${config[@]}" --workdir /home/nonroot \
  --env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt "${specs[@]}" >&2
mv "$OUT.tmp" "$OUT"
log "$REF in $OUT ($(du -h "$OUT" | cut -f1))"
echo "$OUT"
