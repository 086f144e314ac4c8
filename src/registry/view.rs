//! What the registry shows the rest of the process: each instance's state, grouped by
//! registration, for the status writer and /readyz; and the notices that say what changed.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use k8s_openapi::jiff::Timestamp;

use crate::desired::{InstanceId, Source};

/// What one instance looks like from outside.
#[derive(Debug, Clone, PartialEq)]
pub enum Shown {
    /// `pod_uid`: the pod the key was written for (a pod recreated under the same name is
    /// not registered until its own key is).
    Registered { key: String, lease: i64, since: Timestamp, address: String, pod_uid: String },
    /// `claimed_by`: the service belongs to that namespace (not a key held by another).
    Conflict { key: String, message: String, claimed_by: Option<String> },
    Pending,
    Failed { message: String },
}

impl Shown {
    /// The label of the `podlease_instances` gauge.
    /// Every `state_name`.
    pub const STATE_NAMES: [&'static str; 4] = ["registered", "conflict", "pending", "failed"];

    pub fn state_name(&self) -> &'static str {
        match self {
            Shown::Registered { .. } => "registered",
            Shown::Conflict { .. } => "conflict",
            Shown::Pending => "pending",
            Shown::Failed { .. } => "failed",
        }
    }
}

/// What the registry holds, grouped by (namespace, source) and pod, for the status writer.
#[derive(Debug, Default)]
pub struct View {
    pub groups: HashMap<(String, Source), BTreeMap<String, Shown>>,
    /// The last etcd operation failed for a reason other than a conflict.
    pub etcd_unavailable: Option<String>,
    /// This replica leads, adoption is done and the desired state is being applied: only
    /// then may status (and finalizers) be written from this view.
    pub synced: bool,
    /// Which leading term synced it (unique in the process), so that writers can tell a new
    /// term from the one they started under.
    pub term: u64,
    /// Sources (namespace, registration or annotations) whose service claim another
    /// namespace holds: (that namespace, the message). Shown even with no pod ready.
    pub refused: HashMap<(String, Source), (String, String)>,
}

/// The next term number for [`View::term`].
pub fn next_term() -> u64 {
    static TERMS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    TERMS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

impl View {
    /// Instances of one registration, by pod.
    pub fn group(&self, namespace: &str, source: &Source) -> Option<&BTreeMap<String, Shown>> {
        self.groups.get(&(namespace.to_string(), source.clone()))
    }

    pub(super) fn get(&self, id: &InstanceId) -> Option<&Shown> {
        self.group(&id.namespace, &id.source).and_then(|g| g.get(&id.pod))
    }

    pub(super) fn set(&mut self, id: &InstanceId, shown: Option<Shown>) {
        let group = (id.namespace.clone(), id.source.clone());
        match shown {
            Some(s) => {
                self.groups.entry(group).or_default().insert(id.pod.clone(), s);
            }
            None => {
                if let Some(g) = self.groups.get_mut(&group) {
                    g.remove(&id.pod);
                    if g.is_empty() {
                        self.groups.remove(&group);
                    }
                }
            }
        }
    }
}

pub type SharedView = Arc<RwLock<View>>;

/// What the registry tells the Kubernetes side.
#[derive(Debug, Clone, PartialEq)]
pub enum Notice {
    /// The instance's state changed (status may need rewriting).
    Changed(InstanceId),
    /// A write was refused because someone else holds the key, or (Some) the service
    /// belongs to that namespace.
    Conflict(InstanceId, String, Option<String>),
    /// etcd became unavailable or available again (every status shows it).
    Etcd,
    /// A source's service claim was refused (Some: owning namespace, message) or is no
    /// longer refused (None).
    Claim(String, Source, Option<(String, String)>),
}
