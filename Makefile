# podlease — the two commands: `make demo` (see it work) and `make test` (the whole suite).
# Both install and cache what they need (scripts/testbed.sh); nothing else is assumed.

SHELL := /bin/bash
CARGO ?= cargo

.PHONY: all build testbed test demo crd bench soak

all: build

# Installs protoc, etcd 3.5, kube-apiserver/kube-controller-manager v1.20.2, kubectl and the
# Helm virtualenv into the cache (PODLEASE_CACHE, default ~/.cache/podlease). Idempotent.
testbed:
	@bash scripts/testbed.sh >/dev/null

build: testbed
	$(CARGO) build

# The whole suite: unit tests plus integration and end-to-end tests on the real test bed.
test: testbed
	$(CARGO) build --examples
	@if $(CARGO) nextest --version >/dev/null 2>&1; then \
		$(CARGO) nextest run --lib --bins --tests --no-fail-fast -E 'not (binary(faults) & test(=soak))'; \
	else \
		$(CARGO) test --lib --bins --tests --no-fail-fast; \
	fi

# Test bed up, controller running, pods turning ready and keys appearing in etcd.
demo: testbed
	$(CARGO) build --bin podlease --example demo
	PODLEASE_BIN=$(CURDIR)/target/debug/podlease $(CURDIR)/target/debug/examples/demo

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

# Benchmarks on the real test bed (release build; printed and written to BENCHMARKS.md,
# not asserted). About 10 minutes.
bench: testbed
	mkdir -p target/bench
	BENCH_OUT=$(CURDIR)/target/bench/propagation.md $(CARGO) bench --bench propagation
	BENCH_OUT=$(CURDIR)/target/bench/scale.md $(CARGO) bench --bench scale
	BENCH_OUT=$(CURDIR)/target/bench/gate.md $(CARGO) bench --bench gate
	bash scripts/benchmarks-md.sh target/bench/propagation.md target/bench/scale.md target/bench/gate.md > BENCHMARKS.md
