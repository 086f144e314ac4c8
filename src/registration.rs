//! The `ServiceRegistration` custom resource (podlease.io/v1alpha1): which pods to publish
//! and how, and the status podlease writes back.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::format::{Format, FormatOptions};
use crate::validate::{self, pattern};

/// Lease TTL when neither the registration nor an annotation sets one.
pub const DEFAULT_TTL_SECONDS: i64 = 30;
/// etcd's minimum lease TTL is 5 s in practice (it grants at least its election timeout);
/// an hour is already far past any sensible safety net.
pub const MIN_TTL_SECONDS: i64 = 5;
pub const MAX_TTL_SECONDS: i64 = 3600;
/// How many instances the status lists; the counts are always complete.
pub const MAX_STATUS_INSTANCES: usize = 100;

/// Publishes the ready pods selected in this namespace into etcd, one lease per pod.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, JsonSchema, PartialEq)]
#[kube(
    group = "podlease.io",
    version = "v1alpha1",
    kind = "ServiceRegistration",
    plural = "serviceregistrations",
    shortname = "sreg",
    namespaced,
    status = "ServiceRegistrationStatus",
    printcolumn = r#"{"name":"Service","type":"string","jsonPath":".status.service"}"#,
    printcolumn = r#"{"name":"Format","type":"string","jsonPath":".spec.format"}"#,
    printcolumn = r#"{"name":"Ready","type":"integer","jsonPath":".status.readyPods"}"#,
    printcolumn = r#"{"name":"Registered","type":"integer","jsonPath":".status.registered"}"#,
    printcolumn = r#"{"name":"TTL","type":"integer","jsonPath":".spec.ttlSeconds"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ServiceRegistrationSpec {
    /// Service name consumers look up: DNS-1123 labels joined by '.' (etcd-naming and go-zero
    /// also take '/'). Default: the ServiceRegistration's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = pattern::service()), length(max = validate::MAX_SERVICE))]
    pub service: Option<String>,
    /// Pods in this namespace to publish.
    pub selector: LabelSelector,
    /// Container port name or number. Default: the first port the pod declares.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<IntOrString>,
    /// Key and value layout, named after the consumer that reads them.
    #[serde(default)]
    pub format: Format,
    /// Key prefix, one the cluster admin allows (podlease --allowed-prefix). Default: the
    /// format's own (e.g. `/services` for json).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = pattern::prefix()), length(max = validate::MAX_PREFIX))]
    pub prefix: Option<String>,
    /// Lease TTL: how long a key outlives podlease itself. Deregistration never waits for it.
    #[serde(default = "default_ttl")]
    #[schemars(range(min = 5, max = 3600))]
    pub ttl_seconds: i64,
    /// Static metadata published with every instance: at most 64 entries, keys are label
    /// keys, values at most 4 KiB, all together at most 16 KiB.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(transform = bounded_metadata)]
    pub metadata: BTreeMap<String, String>,
    /// Pod label keys whose values are copied into the metadata (at most 32).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = validate::MAX_LABEL_KEYS), inner(regex(pattern = pattern::label_key()), length(max = validate::MAX_LABEL_KEY)))]
    pub metadata_from_labels: Vec<String>,
    /// Publish pods that have an IP and are not terminating, ready or not.
    #[serde(default)]
    pub publish_not_ready: bool,
    /// Per-format settings (version, weight, endpoint scheme, ...).
    #[serde(default, skip_serializing_if = "FormatOptions::is_empty")]
    pub options: FormatOptions,
}

fn default_ttl() -> i64 {
    DEFAULT_TTL_SECONDS
}

/// What the API server can check of the metadata map (no schema names its keys).
fn bounded_metadata(schema: &mut schemars::Schema) {
    schema.insert("maxProperties".into(), validate::MAX_METADATA_ENTRIES.into());
    if let Some(values) = schema.get_mut("additionalProperties").and_then(|v| v.as_object_mut()) {
        values.insert("maxLength".into(), validate::MAX_METADATA_VALUE.into());
    }
}

/// What podlease last observed and did for a ServiceRegistration.
#[derive(Deserialize, Serialize, Clone, Debug, Default, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ServiceRegistrationStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The effective service name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// `Ready`, `Conflict`, `InvalidSpec`, `EtcdUnavailable`.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Pods the selector matches.
    #[serde(default)]
    pub matching_pods: u32,
    /// Matching pods that are publishable (ready, with an IP, not terminating).
    #[serde(default)]
    pub ready_pods: u32,
    /// Instances whose key is in etcd under a live lease.
    #[serde(default)]
    pub registered: u32,
    /// The registered instances, sorted by pod name (at most 100).
    #[serde(default)]
    pub instances: Vec<RegisteredInstance>,
}

/// One pod's entry in etcd.
#[derive(Deserialize, Serialize, Clone, Debug, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RegisteredInstance {
    pub pod: String,
    pub address: String,
    pub key: String,
    /// The etcd lease, in hex as `etcdctl lease list` prints it (16 digits).
    pub lease_id: String,
    pub since: Time,
}

/// Condition types.
pub mod condition {
    pub const READY: &str = "Ready";
    pub const CONFLICT: &str = "Conflict";
    pub const INVALID_SPEC: &str = "InvalidSpec";
    pub const ETCD_UNAVAILABLE: &str = "EtcdUnavailable";
    /// The TTL does not outlive a leader failover (keys could expire while a standby takes
    /// over); a warning, the keys are published all the same.
    pub const SHORT_TTL: &str = "ShortTTL";
    pub const ALL: [&str; 5] = [READY, CONFLICT, INVALID_SPEC, ETCD_UNAVAILABLE, SHORT_TTL];
}

/// The finalizer that makes deleting a ServiceRegistration revoke its leases first.
pub const FINALIZER: &str = "podlease.io/revoke-leases";

impl ServiceRegistration {
    /// The service name consumers look up.
    pub fn service_name(&self) -> String {
        match &self.spec.service {
            Some(s) if !s.is_empty() => s.clone(),
            _ => self.metadata.name.clone().unwrap_or_default(),
        }
    }
}

/// The CRD manifest as YAML, exactly as `podlease crd` prints it.
pub fn crd_yaml() -> String {
    use kube::CustomResourceExt;
    let crd = ServiceRegistration::crd();
    let body = serde_saphyr::to_string(&crd).expect("the CRD serializes");
    format!("# Generated by `podlease crd`; do not edit.\n{body}")
}
