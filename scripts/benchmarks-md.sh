#!/usr/bin/env bash
# Writes BENCHMARKS.md from benchmark sections: scripts/benchmarks-md.sh OUT [SECTION.md ...]
# Each section file starts with `<!-- bench:NAME -->` (benches/*.rs write them). A section
# given replaces the one of that name in OUT; the other sections of OUT stay, so `make bench`
# keeps what `make bench-scale` measured and the other way round. Section files that do not
# exist (a bench that refused to start on a busy machine) are skipped with a warning. The
# README's TTL table is copied from the etcd-load section.
set -euo pipefail
out=$1
shift
order=(propagation burst failover gate scale etcd-load)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# The sections OUT has now, one file each.
if [[ -f $out ]]; then
  awk -v dir="$tmp" '
    /^<!-- bench:[a-z-]+ -->$/ { name = $0; sub(/^<!-- bench:/, "", name); sub(/ -->$/, "", name); file = dir "/old-" name }
    file != "" { print > file }
  ' "$out"
fi
for f in "$@"; do
  if [[ ! -f $f ]]; then
    echo "benchmarks-md: $f does not exist (its bench did not run): keeping that section as it was" >&2
    continue
  fi
  name=$(head -n 1 "$f" | sed -n 's/^<!-- bench:\([a-z-]*\) -->$/\1/p')
  if [[ -z $name ]]; then
    echo "benchmarks-md: $f does not start with <!-- bench:NAME -->" >&2
    exit 1
  fi
  cp "$f" "$tmp/new-$name"
done

{
  cat <<'HEAD'
# Benchmarks

Measured on the real test bed: kube-apiserver built from the k8s.io/kubernetes Go module,
etcd 3.6 built from its Go module (one member for the registry, one for the API server's storage), and,
as the peer, kube-controller-manager of the same release running only the EndpointSlice controller, all
on one machine together with the load generator. Release build of podlease. Nothing here is
asserted by the test suite; each section says the command that produced it, when, on what
machine and at what load (every bench refuses to start when the 1-minute load average is
above 0.5 per core, unless forced with BENCH_FORCE=1, and then says so in bold).

- `make bench` (11 minutes on 2 cores, the release build included): propagation against the EndpointSlice controller with the
  lease pool on and off, the 1,000-pod rollout burst, failover at 10,000 pods, the readiness
  gate.
- `make bench-scale` (long: an hour or more): initial sync, steady state, churn and adoption at 10,000,
  50,000 and 150,000 pods; etcd's CPU against lease renewals per second.

HEAD
  known=" ${order[*]} "
  names=("${order[@]}")
  for f in "$tmp"/new-* "$tmp"/old-*; do
    [[ -e $f ]] || continue
    n=${f##*/}; n=${n#new-}; n=${n#old-}
    [[ $known == *" $n "* ]] || { names+=("$n"); known+="$n "; }
  done
  shown=0
  for n in "${names[@]}"; do
    if [[ -f $tmp/new-$n ]]; then src=$tmp/new-$n; elif [[ -f $tmp/old-$n ]]; then src=$tmp/old-$n; else continue; fi
    shown=$((shown + 1))
    # One blank line between sections, whatever the file ends with.
    sed -e :a -e '/^\n*$/{$d;N;ba' -e '}' "$src"
    echo
  done
  if ((shown == 0)); then
    echo "Nothing measured yet: run \`make bench\` and \`make bench-scale\` on a quiet machine."
  fi
} > "$tmp/out"
mv "$tmp/out" "$out"

# The README's TTL guidance is the etcd-load section's table (between the same markers).
readme=$(dirname "$0")/../README.md
if [[ -f $readme ]] && grep -q '^<!-- etcd-load:ttl -->$' "$out" && grep -q '^<!-- etcd-load:ttl -->$' "$readme"; then
  awk -v src="$out" '
    BEGIN { while ((getline l < src) > 0) { if (l == "<!-- etcd-load:ttl -->") on = 1; if (on) block = block l "\n"; if (l == "<!-- /etcd-load:ttl -->") on = 0 } }
    $0 == "<!-- etcd-load:ttl -->" { printf "%s", block; skip = 1; next }
    skip && $0 == "<!-- /etcd-load:ttl -->" { skip = 0; next }
    !skip { print }
  ' "$readme" > "$tmp/readme" && cat "$tmp/readme" > "$readme"
fi
