//! Prometheus metrics (prometheus-client). Cheap to clone: every metric is shared.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    pub op: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConditionLabels {
    pub condition: String,
}

#[derive(Clone)]
pub struct Metrics {
    pub registry: Arc<Registry>,
    pub instances: Family<StateLabels, Gauge>,
    pub leases_held: Gauge,
    pub keepalive_requests: Counter,
    pub keepalive_rtt: Histogram,
    pub leases_lost: Counter,
    pub leases_regranted: Counter,
    pub etcd_errors: Family<OpLabels, Counter>,
    pub etcd_op_duration: Family<OpLabels, Histogram>,
    pub propagation: Histogram,
    pub conflicts: Counter,
    pub invalid_annotations: Counter,
    pub leader: Gauge,
    pub fenced_writes: Counter,
    pub drift_repairs: Counter,
    pub reconcile_duration: Histogram,
    pub etcd_available: Gauge,
    pub etcd_reachable: Gauge,
    pub gated_pods: Family<StateLabels, Gauge>,
    pub gate_latency: Histogram,
    pub registrations: Family<ConditionLabels, Gauge>,
    pub etcd_client_cert_expiry: Gauge,
    pub etcd_client_cert_expiring: Gauge,
    pub credential_reloads: Family<ResultLabels, Counter>,
    pub lease_pool_free: Gauge,
    pub lease_pool_taken: Counter,
    pub lease_pool_missed: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut r = Registry::with_prefix("podlease");
        let instances = Family::<StateLabels, Gauge>::default();
        r.register("instances", "Instances (pod, registration) by state: registered, conflict, pending, failed", instances.clone());
        let leases_held = Gauge::default();
        r.register("leases_held", "etcd leases kept alive", leases_held.clone());
        let keepalive_requests = Counter::default();
        r.register("keepalive_requests", "Lease keepalive requests sent", keepalive_requests.clone());
        let keepalive_rtt = Histogram::new(exponential_buckets(0.0005, 2.0, 14));
        r.register("keepalive_rtt_seconds", "Lease keepalive round trip", keepalive_rtt.clone());
        let leases_lost = Counter::default();
        r.register("leases_lost", "Leases etcd reported gone (TTL 0, or not renewed in time)", leases_lost.clone());
        let leases_regranted = Counter::default();
        r.register("leases_regranted", "Lost leases replaced by a new grant and rewrite", leases_regranted.clone());
        let etcd_errors = Family::<OpLabels, Counter>::default();
        r.register("etcd_errors", "Failed etcd requests by operation", etcd_errors.clone());
        let etcd_op_duration =
            Family::<OpLabels, Histogram>::new_with_constructor(|| Histogram::new(exponential_buckets(0.0005, 2.0, 14)));
        r.register("etcd_op_duration_seconds", "Registry operations (register, update, revoke) end to end", etcd_op_duration.clone());
        let propagation = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        r.register(
            "propagation_seconds",
            "From the pod's Ready transition to the etcd Txn commit of its key",
            propagation.clone(),
        );
        let conflicts = Counter::default();
        r.register("conflicts", "Writes refused because someone else holds the key", conflicts.clone());
        let invalid_annotations = Counter::default();
        r.register("invalid_annotations", "Pods with invalid podlease.io annotations seen", invalid_annotations.clone());
        let leader = Gauge::default();
        r.register("leader", "1 while this replica leads (writes to etcd)", leader.clone());
        let fenced_writes = Counter::default();
        r.register("fenced_writes", "Writes etcd refused because another replica had taken over", fenced_writes.clone());
        let reconcile_duration = Histogram::new(exponential_buckets(0.000_01, 2.0, 16));
        r.register(
            "reconcile_duration_seconds",
            "Applying one watch event to the desired state and handing the changes on",
            reconcile_duration.clone(),
        );
        let etcd_available = Gauge::default();
        r.register("etcd_available", "1 while the leader's last etcd operation succeeded (0 on followers)", etcd_available.clone());
        let drift_repairs = Counter::default();
        r.register("drift_repairs", "Managed keys found deleted or altered out of band and written again", drift_repairs.clone());
        let gated_pods = Family::<StateLabels, Gauge>::default();
        r.register(
            "gated_pods",
            "Pods with the readiness gate podlease.io/registered, by the state of its condition: true, false, unset (every replica reports the cluster's pods)",
            gated_pods.clone(),
        );
        let gate_latency = Histogram::new(exponential_buckets(0.01, 2.0, 14));
        r.register(
            "gate_latency_seconds",
            "From a gated pod's ContainersReady transition to its podlease.io/registered condition turning True (whole seconds: metav1.Time)",
            gate_latency.clone(),
        );
        let registrations = Family::<ConditionLabels, Gauge>::default();
        r.register(
            "registrations",
            "ServiceRegistrations whose condition is True, by condition, as the leader last wrote them (0 on a standby)",
            registrations.clone(),
        );
        let etcd_reachable = Gauge::default();
        r.register(
            "etcd_reachable",
            "1 while this replica's etcd probe (a quorum read every 2 s) has succeeded within the last 6 s; every replica",
            etcd_reachable.clone(),
        );
        let etcd_client_cert_expiry = Gauge::default();
        r.register(
            "etcd_client_cert_expiry_timestamp_seconds",
            "When the etcd client certificate in use expires (Unix seconds; 0 without --etcd-cert)",
            etcd_client_cert_expiry.clone(),
        );
        let etcd_client_cert_expiring = Gauge::default();
        r.register(
            "etcd_client_cert_expiring",
            "1 while the etcd client certificate has less than a third of its validity (at most 30 days) left, or has expired, or cannot be read",
            etcd_client_cert_expiring.clone(),
        );
        let credential_reloads = Family::<ResultLabels, Counter>::default();
        r.register(
            "etcd_credential_reloads",
            "Changed etcd credential files (CA, client certificate, key, password) by result: applied (new connections use them) or failed (kept the connection in use)",
            credential_reloads.clone(),
        );
        let lease_pool_free = Gauge::default();
        r.register("lease_pool_free", "Leases granted ahead, kept alive and not yet taken (every TTL in use; 0 on a standby)", lease_pool_free.clone());
        let lease_pool_taken = Counter::default();
        r.register("lease_pool_taken", "Registrations that took a lease granted ahead (one etcd write instead of two)", lease_pool_taken.clone());
        let lease_pool_missed = Counter::default();
        r.register("lease_pool_missed", "Registrations that found the pool empty and granted a lease first", lease_pool_missed.clone());
        let m = Metrics {
            registry: Arc::new(r),
            instances,
            leases_held,
            keepalive_requests,
            keepalive_rtt,
            leases_lost,
            leases_regranted,
            etcd_errors,
            etcd_op_duration,
            propagation,
            conflicts,
            invalid_annotations,
            leader,
            fenced_writes,
            drift_repairs,
            reconcile_duration,
            etcd_available,
            etcd_reachable,
            gated_pods,
            gate_latency,
            registrations,
            etcd_client_cert_expiry,
            etcd_client_cert_expiring,
            credential_reloads,
            lease_pool_free,
            lease_pool_taken,
            lease_pool_missed,
        };
        // Series that exist from the start (at zero), so that rates and alerts have them
        // before anything happens.
        m.clear_instances();
        let _ = m.etcd_errors.get_or_create(&OpLabels { op: "keepalive".into() });
        for result in ["applied", "failed"] {
            let _ = m.credential_reloads.get_or_create(&ResultLabels { result: result.into() });
        }
        for op in crate::registry::plan::Op::LABELS {
            let _ = m.etcd_op_duration.get_or_create(&OpLabels { op: op.into() });
        }
        m
    }

    /// Every instance state at zero (a new term counts afresh; a standby holds none).
    pub fn clear_instances(&self) {
        self.instances.clear();
        for state in crate::registry::view::Shown::STATE_NAMES {
            let _ = self.instances.get_or_create(&StateLabels { state: state.into() });
        }
    }

    /// Sets the registrations-by-condition gauge (every condition type, zeros included, so
    /// the series exist before anything goes wrong).
    pub fn set_registration_conditions<'a>(&self, true_conditions: impl Iterator<Item = &'a str>) {
        let mut counts: std::collections::BTreeMap<&str, i64> = crate::registration::condition::ALL.iter().map(|c| (*c, 0)).collect();
        for c in true_conditions {
            *counts.entry(c).or_default() += 1;
        }
        for (condition, n) in counts {
            self.registrations.get_or_create(&ConditionLabels { condition: condition.into() }).set(n);
        }
    }

    /// Sets the gated-pods gauge from the index's counts.
    pub fn set_gate_counts(&self, c: crate::desired::GateCounts) {
        for (state, n) in [("true", c.r#true), ("false", c.r#false), ("unset", c.unset)] {
            self.gated_pods.get_or_create(&StateLabels { state: state.into() }).set(n);
        }
    }

    pub fn etcd_error(&self, op: &str) {
        self.etcd_errors.get_or_create(&OpLabels { op: op.into() }).inc();
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("encoding to a String cannot fail");
        out
    }
}
