# podlease — the two commands: `make demo` (see it work) and `make test` (the whole suite).
# Both install and cache what they need (scripts/testbed.sh); nothing else is assumed.

SHELL := /bin/bash
CARGO ?= cargo

.PHONY: all build testbed test demo demo-fast demo-node demo-shell crd bench bench-scale soak

all: build

# Installs into the cache (PODLEASE_CACHE, default ~/.cache/podlease) everything the tests,
# the demo and the benches use: the README says what (its first section). Idempotent.
testbed:
	@bash scripts/testbed.sh >/dev/null

build: testbed
	$(CARGO) build

# The whole suite: unit tests plus integration and end-to-end tests on the real test bed
# (Kubernetes 1.37, etcd 3.6), with the compatibility subsets on Kubernetes 1.34 and etcd 3.5
# (the tests under `on_kubernetes_1_34` and `on_etcd_3_5`) among them.
test: testbed
	$(CARGO) build --examples
	$(CARGO) nextest run --lib --bins --tests --no-fail-fast -E 'not (binary(faults) & test(=soak))'

# `make demo` is `make demo-node` (below): the story on a real node.
demo: demo-node

# The fast bed's demo (an API server and etcd, no node: pod readiness is patched by hand):
# controller running, pods turning ready and keys appearing in etcd.
demo-fast: testbed
	$(CARGO) build --bin podlease --example demo
	PODLEASE_BIN=$(CURDIR)/target/debug/podlease $(CURDIR)/target/debug/examples/demo

# On a real node: the mini-cluster (kubelet, containerd, scheduler, controller
# manager, in namespaces of its own with no way off the machine) up, podlease installed by its
# Helm chart from its own image, a Deployment through scale-up, a failing readiness probe, a
# rollout and a scale-down, printing the real output of kubectl and `podlease get --watch`.
# Root, like `make test`'s node tests. Under a minute once built; nothing is left behind.
demo-node: testbed
	$(CARGO) build --bin podlease --example demo_node
	PODLEASE_BIN=$(CURDIR)/target/debug/podlease $(CURDIR)/target/debug/examples/demo_node

# demo-node's cluster, podlease and a 3-replica Deployment left running: prints KUBECONFIG and
# ETCDCTL_ENDPOINTS (ports on 127.0.0.1) to use from another shell; Ctrl-C tears it down.
demo-shell: testbed
	$(CARGO) build --bin podlease --example demo_node
	PODLEASE_BIN=$(CURDIR)/target/debug/podlease $(CURDIR)/target/debug/examples/demo_node --shell

# The hostile-input property test with 10,000 cases, then random fault schedules at the
# defaults for SOAK_SECS seconds (default 1800) and a summary: schedules, faults by kind,
# invariant violations, worst convergence time.
SOAK_SECS ?= 1800
soak: testbed
	PROPTEST_CASES=10000 $(CARGO) test --lib proptests
	PODLEASE_SOAK_SECS=$(SOAK_SECS) $(CARGO) test --test faults soak -- --exact --nocapture

# Regenerates the checked-in CRD from the Rust types.
crd:
	$(CARGO) run -q -- crd > crds/serviceregistrations.podlease.io.yaml
	cp crds/serviceregistrations.podlease.io.yaml charts/podlease/crds/

# Benchmarks on the real test bed (release build; written to BENCHMARKS.md section by section,
# not asserted). Each bench first waits up to BENCH_SETTLE_SECS (180) for the 1-minute load
# average to fall to 0.5 per core and refuses to run otherwise, unless BENCH_FORCE=1 (the
# section then says it was measured on a busy machine). A bench that refuses leaves its
# section of BENCHMARKS.md as it was.
# `make bench`: propagation against the EndpointSlice controller (lease pool on and off, the
# peer unthrottled, then at its default QPS), the 1,000-pod rollout burst, failover at
# 10,000 pods, the readiness gate. 11 minutes on a 2-core machine, the release build included.
BENCHES := propagation burst failover gate
bench: testbed
	mkdir -p target/bench
	rm -f $(BENCHES:%=target/bench/%.md)
	status=0; for b in $(BENCHES); do \
		BENCH_OUT=$(CURDIR)/target/bench/$$b.md $(CARGO) bench --bench $$b || status=1; \
	done; \
	bash scripts/benchmarks-md.sh BENCHMARKS.md $(BENCHES:%=target/bench/%.md); exit $$status

# `make bench-scale` (long: an hour or more): initial sync, steady state, churn and adoption by another
# replica at 10,000, 50,000 and 150,000 pods (SCALE_SIZES), and the registry etcd's CPU
# against lease renewals per second (LOAD_SIZES leases at BENCH_TTLS). A run that stops
# early (the bed cannot hold a size) still writes what it measured and why it stopped.
SCALE_SIZES ?= 10000,50000,150000
LOAD_SIZES ?= 10000,50000
bench-scale: testbed
	mkdir -p target/bench
	rm -f target/bench/scale.md target/bench/etcd-load.md
	status=0; \
	BENCH_OUT=$(CURDIR)/target/bench/scale.md $(CARGO) bench --bench scale -- $(SCALE_SIZES) || status=1; \
	BENCH_OUT=$(CURDIR)/target/bench/etcd-load.md $(CARGO) bench --bench etcd_load -- $(LOAD_SIZES) || status=1; \
	bash scripts/benchmarks-md.sh BENCHMARKS.md target/bench/scale.md target/bench/etcd-load.md; exit $$status
