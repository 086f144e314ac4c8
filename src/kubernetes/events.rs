//! Kubernetes Events, published from their own task through a bounded queue so that a slow
//! API server never holds up status writing (an Event that does not fit is dropped and
//! counted in the log).

use k8s_openapi::api::core::v1::ObjectReference;
use kube::Client;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use tokio::sync::mpsc;
use tracing::{debug, warn};

pub const REASON_REGISTERED: &str = "Registered";
pub const REASON_DEREGISTERED: &str = "Deregistered";
pub const REASON_CONFLICT: &str = "Conflict";
pub const REASON_SERVICE_CLAIMED: &str = "ServiceClaimed";
pub const REASON_INVALID_SPEC: &str = "InvalidSpec";
pub const REASON_INVALID_ANNOTATION: &str = "InvalidAnnotation";
pub const REASON_PREFIX_OVERLAP: &str = "PrefixOverlap";
pub const REASON_SHORT_TTL: &str = "ShortTTL";

#[derive(Clone)]
pub struct Events {
    tx: mpsc::Sender<(Event, ObjectReference)>,
}

impl Events {
    pub fn spawn(client: Client, instance: String) -> Events {
        let (tx, mut rx) = mpsc::channel::<(Event, ObjectReference)>(1024);
        let recorder = Recorder::new(client, Reporter { controller: "podlease".into(), instance: Some(instance) });
        tokio::spawn(async move {
            while let Some((ev, reference)) = rx.recv().await {
                if let Err(e) = recorder.publish(&ev, &reference).await {
                    debug!(error = %e, reason = ev.reason, "publishing event failed");
                }
            }
        });
        Events { tx }
    }

    pub fn publish(&self, warning: bool, reason: &str, action: &str, note: String, regarding: ObjectReference) {
        let ev = Event {
            type_: if warning { EventType::Warning } else { EventType::Normal },
            reason: reason.into(),
            note: Some(truncate(note, 1000)),
            action: action.into(),
            secondary: None,
        };
        if self.tx.try_send((ev, regarding)).is_err() {
            warn!(reason, "event queue full; event dropped");
        }
    }
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

fn object_ref(api_version: &str, kind: &str, namespace: &str, name: &str, uid: &str) -> ObjectReference {
    ObjectReference {
        api_version: Some(api_version.into()),
        kind: Some(kind.into()),
        namespace: Some(namespace.into()),
        name: Some(name.into()),
        uid: Some(uid.to_string()).filter(|u| !u.is_empty()),
        ..Default::default()
    }
}

pub fn pod_ref(namespace: &str, name: &str, uid: &str) -> ObjectReference {
    object_ref("v1", "Pod", namespace, name, uid)
}

pub fn registration_ref(namespace: &str, name: &str, uid: &str) -> ObjectReference {
    object_ref("podlease.io/v1alpha1", "ServiceRegistration", namespace, name, uid)
}
