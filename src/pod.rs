//! The trimmed view of a Pod that podlease keeps in memory, and the publication rule
//! (the EndpointSlice controller's: serving = Ready, terminating = deletionTimestamp; for a
//! pod gated on podlease, serving = ContainersReady, since the gate itself holds Ready False).

use std::net::IpAddr;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;

use crate::annotations;
use crate::labels::Labels;
use crate::small::SmallMap;

/// What podlease needs of a pod; everything else (managedFields, spec, most status) is dropped.
#[derive(Debug, Clone, PartialEq)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub labels: Labels,
    /// Only the `podlease.io/` annotations podlease reads, each cut just past its limit
    /// ([`annotations::max_len`]): a hostile pod costs bounded memory and is still refused.
    pub annotations: SmallMap<String, String>,
    pub ip: Option<IpAddr>,
    pub node: String,
    pub phase: String,
    /// Serving: the `Ready` condition is True, or for a gated pod `ContainersReady` (its
    /// `Ready` waits for podlease's own condition).
    pub ready: bool,
    /// When that condition last changed (for the propagation-latency metric).
    pub ready_since: Option<Timestamp>,
    /// The pod declares the readiness gate `podlease.io/registered`.
    pub gated: bool,
    /// The gate's condition as the pod shows it now.
    pub gate: Option<GateCondition>,
    pub terminating: bool,
    /// Declared container ports in order: (name, number).
    pub ports: Vec<(Option<String>, i32)>,
}

/// The readiness gate a pod declares to turn Ready only once podlease has registered it.
pub const GATE: &str = "podlease.io/registered";

/// The gate's condition on a pod: the part podlease compares before writing it again.
#[derive(Debug, Clone, PartialEq)]
pub struct GateCondition {
    pub status: bool,
    pub reason: String,
    pub message: String,
    pub since: Option<Timestamp>,
}

impl PodInfo {
    pub fn from_pod(pod: &Pod) -> PodInfo {
        let meta = &pod.metadata;
        let status = pod.status.as_ref();
        let gated = pod.spec.iter().flat_map(|s| s.readiness_gates.iter().flatten()).any(|g| g.condition_type == GATE);
        let conditions = status.and_then(|s| s.conditions.as_ref());
        let find = |t: &str| conditions.and_then(|cs| cs.iter().find(|c| c.type_ == t));
        let ready_cond = find(if gated { "ContainersReady" } else { "Ready" });
        let gate = find(GATE).map(|c| GateCondition {
            status: c.status == "True",
            reason: c.reason.clone().unwrap_or_default(),
            message: c.message.clone().unwrap_or_default(),
            since: c.last_transition_time.as_ref().map(|t| t.0),
        });
        let ip = status
            .and_then(|s| s.pod_ip.as_deref())
            .or_else(|| status.and_then(|s| s.pod_ips.as_ref()).and_then(|ips| ips.first()).map(|i| i.ip.as_str()))
            .and_then(|ip| ip.parse().ok());
        let ports = pod
            .spec
            .iter()
            .flat_map(|s| s.containers.iter())
            .flat_map(|c| c.ports.iter().flatten())
            .map(|p| (p.name.clone(), p.container_port))
            .collect();
        PodInfo {
            namespace: meta.namespace.clone().unwrap_or_default(),
            name: meta.name.clone().unwrap_or_default(),
            uid: meta.uid.clone().unwrap_or_default(),
            labels: meta.labels.iter().flatten().map(|(k, v)| (k.clone(), v.clone())).collect(),
            annotations: meta
                .annotations
                .iter()
                .flatten()
                .filter(|(k, _)| annotations::ALL.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), bounded(v, annotations::max_len(k))))
                .collect(),
            ip,
            node: pod.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap_or_default(),
            phase: status.and_then(|s| s.phase.clone()).unwrap_or_default(),
            ready: ready_cond.is_some_and(|c| c.status == "True"),
            ready_since: ready_cond.and_then(|c| c.last_transition_time.as_ref()).map(|t| t.0),
            gated,
            gate,
            terminating: meta.deletion_timestamp.is_some(),
            ports,
        }
    }

    /// Whether the pod belongs in etcd: serving, not terminating, with an IP, not finished.
    /// With `publish_not_ready`, readiness is not required.
    pub fn publishable(&self, publish_not_ready: bool) -> bool {
        let finished = self.phase == "Succeeded" || self.phase == "Failed";
        self.ip.is_some() && !self.terminating && !finished && (self.ready || publish_not_ready)
    }
}

/// `v`, or its first bytes just past `max` (enough to tell it is too long).
fn bounded(v: &str, max: usize) -> String {
    if v.len() <= max {
        return v.to_string();
    }
    let mut end = max + 1;
    while !v.is_char_boundary(end) {
        end += 1;
    }
    v[..end].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(status: serde_json::Value, deleting: bool) -> PodInfo {
        let mut meta = json!({"name": "p", "namespace": "ns", "uid": "u1", "annotations": {"podlease.io/service": "s", "other": "x", "podlease.io/unknown": "y"}});
        if deleting {
            meta["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        }
        let p: Pod = serde_json::from_value(json!({
            "metadata": meta,
            "spec": {"nodeName": "n1", "containers": [{"name": "a", "ports": [{"name": "http", "containerPort": 80}, {"containerPort": 81}]}]},
            "status": status,
        }))
        .unwrap();
        PodInfo::from_pod(&p)
    }

    fn ready(r: &str) -> serde_json::Value {
        json!({"phase": "Running", "podIP": "10.0.0.1", "conditions": [{"type": "Ready", "status": r}]})
    }

    #[test]
    fn a_ready_running_pod_with_an_ip_is_published() {
        let p = pod(ready("True"), false);
        assert!(p.publishable(false));
        assert_eq!(p.ports, vec![(Some("http".into()), 80), (None, 81)]);
        assert_eq!(p.annotations.len(), 1, "only the podlease.io/ annotations podlease reads are kept");
        assert_eq!(p.node, "n1");
    }

    #[test]
    fn not_ready_is_published_only_with_publish_not_ready() {
        let p = pod(ready("False"), false);
        assert!(!p.publishable(false));
        assert!(p.publishable(true));
    }

    #[test]
    fn terminating_pods_are_never_published() {
        let p = pod(ready("True"), true);
        assert!(!p.publishable(false));
        assert!(!p.publishable(true));
    }

    #[test]
    fn pods_without_ip_or_finished_are_not_published() {
        assert!(!pod(json!({"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}), false).publishable(true));
        let mut s = ready("True");
        s["phase"] = json!("Succeeded");
        assert!(!pod(s.clone(), false).publishable(false));
        s["phase"] = json!("Failed");
        assert!(!pod(s, false).publishable(true));
    }

    #[test]
    fn a_gated_pod_is_served_on_containers_ready_since_its_ready_waits_for_the_gate() {
        let gated = |containers: &str, gate: Option<&str>| {
            let mut conditions = vec![
                json!({"type": "ContainersReady", "status": containers, "lastTransitionTime": "2026-01-01T00:00:05Z"}),
                json!({"type": "Ready", "status": "False", "lastTransitionTime": "2026-01-01T00:00:01Z"}),
            ];
            if let Some(g) = gate {
                conditions.push(json!({"type": GATE, "status": g, "reason": "Registered", "message": "m"}));
            }
            let p: Pod = serde_json::from_value(json!({
                "metadata": {"name": "p", "namespace": "ns", "uid": "u1"},
                "spec": {"containers": [], "readinessGates": [{"conditionType": GATE}]},
                "status": {"phase": "Running", "podIP": "10.0.0.1", "conditions": conditions},
            }))
            .unwrap();
            PodInfo::from_pod(&p)
        };
        let p = gated("True", None);
        assert!(p.gated && p.publishable(false));
        assert_eq!(p.ready_since.unwrap().to_string(), "2026-01-01T00:00:05Z", "the ContainersReady transition");
        assert!(p.gate.is_none());
        assert!(!gated("False", Some("True")).publishable(false));
        let g = gated("True", Some("True")).gate.unwrap();
        assert!(g.status && g.reason == "Registered" && g.message == "m");
        // Another gate is not ours: Ready decides.
        let p: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p"},
            "spec": {"containers": [], "readinessGates": [{"conditionType": "example.com/other"}]},
            "status": {"phase": "Running", "podIP": "10.0.0.1", "conditions": [{"type": "ContainersReady", "status": "True"}, {"type": "Ready", "status": "False"}]},
        }))
        .unwrap();
        let p = PodInfo::from_pod(&p);
        assert!(!p.gated && !p.publishable(false));
    }

    #[test]
    fn pod_ips_is_used_when_pod_ip_is_missing() {
        let p = pod(json!({"phase": "Running", "podIPs": [{"ip": "fd00::5"}], "conditions": [{"type": "Ready", "status": "True"}]}), false);
        assert_eq!(p.ip, Some("fd00::5".parse().unwrap()));
    }

    #[test]
    fn a_huge_annotation_is_kept_only_just_past_its_limit() {
        let huge = "x".repeat(256 * 1024);
        let p: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "ns", "annotations": {"podlease.io/service": "s", "podlease.io/metadata": huge, "podlease.io/zone": "é".repeat(2000)}},
        }))
        .unwrap();
        let info = PodInfo::from_pod(&p);
        assert_eq!(info.annotations["podlease.io/metadata"].len(), crate::validate::MAX_METADATA_BYTES + 1);
        assert!(info.annotations["podlease.io/zone"].len() > annotations::max_len("podlease.io/zone"));
        assert!(info.annotations["podlease.io/zone"].len() <= annotations::max_len("podlease.io/zone") + 2, "cut on a char boundary");
        assert_eq!(
            annotations::parse(&info.annotations).unwrap_err().to_string(),
            "annotation podlease.io/metadata is longer than 16384 bytes"
        );
    }
}
