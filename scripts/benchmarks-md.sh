#!/usr/bin/env bash
# Assembles BENCHMARKS.md from the benchmark sections (see `make bench`).
set -euo pipefail
cat <<HEAD
# Benchmarks

Produced by \`make bench\` (benches/propagation.rs, benches/scale.rs and benches/gate.rs, release build) on
the real test bed: kube-apiserver v1.20.2, etcd 3.5 and, for comparison,
kube-controller-manager v1.20.2 running only the EndpointSlice controller, all on one
machine together with the load generator.

Machine: $(nproc) cores ($(awk -F: '/model name/{print $2; exit}' /proc/cpuinfo | sed 's/^ *//')), $(awk '/MemTotal/{printf "%.0f GiB", $2/1048576}' /proc/meminfo). Date: $(date -u +%Y-%m-%d).

HEAD
for f in "$@"; do
  cat "$f"
  echo
done
