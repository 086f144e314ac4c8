//! The readiness gate `podlease.io/registered`: a pod that declares it turns Ready only once
//! every key podlease publishes for it is confirmed in etcd, so a rollout waits for
//! discovery. The decision is pure (`decide`); `Gates` writes it to the pod's status, only
//! from the leader (the status writer flushes only while its view is synced).
//!
//! The gate guards a pod's way into service. Once True, it goes False only when the pod's
//! containers stop being ready (the pod is not Ready then anyway) and its keys are gone:
//! failing a serving pod because its key was lost later (etcd down, a spec edited into an
//! error, a conflict) would take it out of every Kubernetes Service too, turning a discovery
//! problem into an outage. Those problems show on the ServiceRegistration and in metrics.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use tokio::task::JoinSet;
use tracing::{debug, warn};

use super::events::{self, Events};
use crate::desired::{GatedPod, Index, Source};
use crate::format::Key;
use crate::metrics::Metrics;
use crate::pod::{GATE, GateCondition};
use crate::registry::lease::Backoff;
use crate::registry::{SharedView, Shown};

type PodKey = (String, String);

pub const REASON_REGISTERED: &str = "Registered";
pub const REASON_NOT_SELECTED: &str = "NotSelected";
pub const REASON_PENDING: &str = "Pending";
pub const REASON_CONFLICT: &str = "Conflict";
pub const REASON_SERVICE_CLAIMED: &str = "ServiceClaimed";
pub const REASON_INVALID_SPEC: &str = "InvalidSpec";
pub const REASON_ETCD_UNAVAILABLE: &str = "EtcdUnavailable";
pub const REASON_DEREGISTERED: &str = "Deregistered";

/// Pod status patches in flight at once (a rollout makes many pods ready together).
const CONCURRENCY: usize = 32;
/// A condition message is cut here: it is for `kubectl describe`, not a log.
const MAX_MESSAGE: usize = 1024;
/// After a write, the pod watch may show the old condition this long: decisions meanwhile
/// start from what was written, and the pod is decided once more after it.
const WATCH_LAG: Duration = Duration::from_secs(5);

/// The condition a gated pod should show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub status: bool,
    pub reason: &'static str,
    pub message: String,
}

impl Decision {
    fn new(status: bool, reason: &'static str, message: String) -> Decision {
        let mut message = message;
        if message.len() > MAX_MESSAGE {
            let mut end = MAX_MESSAGE;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
            message.push('…');
        }
        Decision { status, reason, message }
    }
}

/// What the gate of `pod` should be now, given what the registry shows for each of its
/// sources (`shown`); None: leave it as it is.
pub fn decide<'a>(pod: &GatedPod, shown: impl Fn(&Source) -> Option<&'a Shown>, etcd_unavailable: Option<&str>) -> Option<Decision> {
    if pod.terminating {
        return None; // its keys are being revoked and it leaves every Service anyway
    }
    let current_true = pod.current.as_ref().is_some_and(|c| c.status);
    // Serving: open since before its containers last turned ready. Containers that flapped
    // after the gate opened make the pod a newcomer again (to the second: metav1.Time).
    let serving = pod.publishable
        && pod.current.as_ref().is_some_and(|c| c.status && c.since.zip(pod.ready_since).is_none_or(|(open, ready)| ready <= open));
    // A key written for this very pod (not an earlier one of its name), where it should be.
    let registered = |s: &Source, want: Option<&Key>| match shown(s) {
        Some(Shown::Registered { key, pod_uid, .. }) if *pod_uid == pod.uid && want.is_none_or(|w| w.matches(key)) => Some(key.clone()),
        _ => None,
    };
    let want = if !pod.publishable {
        // Close the gate once no key of the pod is left, so that when its containers turn
        // ready again it is Ready only after its keys are back. A source that publishes
        // pods that are not ready (publishNotReady) keeps its key: nothing to close then.
        let wanted = pod.sources.iter().any(|(_, r)| r.is_ok());
        if !current_true || wanted || pod.candidates.iter().any(|s| registered(s, None).is_some()) {
            return None;
        }
        Decision::new(
            false,
            REASON_DEREGISTERED,
            "the pod's containers are not ready and its keys are revoked; it turns Ready once they are written again".into(),
        )
    } else if let Some((_, Err(e))) = pod.sources.iter().find(|(_, r)| r.is_err()) {
        Decision::new(false, REASON_INVALID_SPEC, e.clone())
    } else if pod.sources.is_empty() {
        Decision::new(
            true,
            REASON_NOT_SELECTED,
            "no ServiceRegistration selects this pod and it has no podlease.io/service annotation: nothing to wait for".into(),
        )
    } else {
        let total = pod.sources.len();
        let mut keys = Vec::new();
        let mut conflict = None;
        let mut claimed = false;
        let mut failed = None;
        for (source, want) in &pod.sources {
            if let Some(k) = registered(source, want.as_ref().ok()) {
                keys.push(k);
                continue;
            }
            match shown(source) {
                Some(Shown::Conflict { key, message, claimed_by }) => {
                    claimed |= claimed_by.is_some();
                    conflict = conflict.or(Some(format!("key {key}: {message}")));
                }
                Some(Shown::Failed { message }) => failed = failed.or(Some(message.clone())),
                _ => {}
            }
        }
        if keys.len() == total {
            keys.sort();
            let message = match keys.as_slice() {
                [one] => format!("registered in etcd as {one}"),
                [first, ..] => format!("registered in etcd under {total} keys ({first}, …)"),
                [] => unreachable!("sources is not empty"),
            };
            Decision::new(true, REASON_REGISTERED, message)
        } else if let Some(c) = conflict {
            let reason = if claimed { REASON_SERVICE_CLAIMED } else { REASON_CONFLICT };
            Decision::new(false, reason, format!("{} of {total} keys registered; {c}", keys.len()))
        } else if let Some(e) = failed.as_deref().or(etcd_unavailable) {
            Decision::new(false, REASON_ETCD_UNAVAILABLE, format!("{} of {total} keys registered; etcd: {e}", keys.len()))
        } else {
            Decision::new(false, REASON_PENDING, format!("{} of {total} keys registered; writing the rest", keys.len()))
        }
    };
    if serving && !want.status {
        return None; // never take a serving pod out of service for a discovery problem
    }
    // Pending is the short moment before the key is written: an absent condition or
    // Deregistered already says the pod waits for it, and a write each way would double
    // the API calls of a rollout. It replaces only a reason that no longer holds.
    let waits = pod.current.as_ref().is_none_or(|c| !c.status && [REASON_DEREGISTERED, REASON_PENDING].contains(&c.reason.as_str()));
    if want.reason == REASON_PENDING && waits {
        return None;
    }
    let same = pod.current.as_ref().is_some_and(|c| c.status == want.status && c.reason == want.reason && c.message == want.message);
    (!same).then_some(want)
}

/// Writes the gates of gated pods that may have changed, as a pipeline: up to
/// `CONCURRENCY` patches in flight, each result handled as it comes, at most one write per
/// pod at a time (a pod marked meanwhile is decided again once its write is done). Marks
/// are taken only while this replica leads and has adopted (`view.synced`); a new term
/// marks every gated pod.
pub struct Gates {
    client: Client,
    metrics: Metrics,
    /// Each write is also an Event on the pod: `kubectl describe pod` shows a condition's
    /// type and status only, the Event its reason and message.
    events: Events,
    dirty: BTreeSet<PodKey>,
    /// Pods with a write in flight, and those marked meanwhile.
    busy: HashSet<PodKey>,
    blocked: BTreeSet<PodKey>,
    inflight: JoinSet<Done>,
    /// Pods whose last write failed, with when to try again and the backoff.
    retry: HashMap<PodKey, (Instant, Backoff)>,
    /// Pods to decide again at an instant: failed writes, and writes the pod watch may not
    /// show yet (a write by a deposed leader could land after them).
    later: BTreeMap<PodKey, Instant>,
    /// The last write per pod: newer than the pod watch for a while (`WATCH_LAG`).
    written: HashMap<PodKey, Memo>,
    /// Containers that turned ready before this process started were not seen live: their
    /// wait is not gate latency.
    started: Timestamp,
}

struct Memo {
    uid: String,
    condition: GateCondition,
    at: Instant,
}

/// A finished write: the pod, what was decided, and how it went.
pub struct Done(PodKey, GatedPod, Decision, Written);

enum Written {
    Done(Timestamp),
    /// The pod is gone or was recreated under its name: nothing to write to it.
    Gone,
    /// This replica no longer leads: the next leader decides.
    NotLeading,
    Failed(kube::Error),
}

impl Gates {
    pub fn new(client: Client, metrics: Metrics, events: Events) -> Gates {
        Gates {
            client,
            metrics,
            events,
            dirty: BTreeSet::new(),
            busy: HashSet::new(),
            blocked: BTreeSet::new(),
            inflight: JoinSet::new(),
            retry: HashMap::new(),
            later: BTreeMap::new(),
            written: HashMap::new(),
            started: Timestamp::now(),
        }
    }

    pub fn mark(&mut self, key: PodKey) {
        if self.busy.contains(&key) {
            self.blocked.insert(key);
        } else if !self.retry.contains_key(&key) {
            self.dirty.insert(key);
        }
    }

    pub fn mark_all(&mut self, index: &Mutex<Index>) {
        let all = index.lock().unwrap().gated_pods();
        for key in all {
            self.mark(key);
        }
    }

    /// Not leading: nothing to write, nothing to remember (a standby would only pile up).
    /// Writes in flight are abandoned; each checked leadership just before its patch.
    pub fn clear(&mut self) {
        self.inflight.abort_all();
        self.busy.clear();
        self.blocked.clear();
        self.dirty.clear();
        self.retry.clear();
        self.later.clear();
        self.written.clear();
    }

    /// There are pods to decide and room to write.
    pub fn can_start(&self) -> bool {
        !self.dirty.is_empty() && self.inflight.len() < CONCURRENCY
    }

    /// The next finished write (pending forever while none is in flight).
    pub async fn next_done(&mut self) -> Option<Done> {
        match self.inflight.join_next().await {
            Some(Ok(done)) => Some(done),
            Some(Err(e)) => {
                if !e.is_cancelled() {
                    warn!(error = %e, "a readiness gate write panicked");
                }
                None
            }
            None => std::future::pending().await,
        }
    }

    /// Pods whose instant to be decided again has come.
    pub fn requeue_due(&mut self) {
        let now = Instant::now();
        let due: Vec<PodKey> = self.later.iter().filter(|(_, at)| **at <= now).map(|(k, _)| k.clone()).collect();
        for key in due {
            self.later.remove(&key);
            // (A failed write's retry instant has come: `mark` would wait for it.)
            if self.busy.contains(&key) {
                self.blocked.insert(key);
            } else {
                self.dirty.insert(key);
            }
        }
    }

    /// Decides dirty pods' gates and starts the writes that change them, while there is
    /// room; the rest stay dirty.
    pub fn start(&mut self, index: &Arc<Mutex<Index>>, view: &SharedView) {
        let index_guard = index.lock().unwrap();
        let v = view.read().unwrap();
        while self.inflight.len() < CONCURRENCY {
            let Some(key) = self.dirty.pop_first() else { break };
            let Some(mut pod) = index_guard.gated(&key.0, &key.1) else {
                self.written.remove(&key);
                self.retry.remove(&key);
                self.later.remove(&key);
                continue;
            };
            self.retry.remove(&key);
            // What this replica wrote last is newer than what the watch shows for a while;
            // decide from it then, and once more when the watch must have caught up.
            if let Some(m) = self.written.get(&key).filter(|m| m.uid == pod.uid && m.at.elapsed() < WATCH_LAG) {
                pod.current = Some(m.condition.clone());
                self.later.entry(key.clone()).or_insert(m.at + WATCH_LAG);
            }
            let shown = |s: &Source| v.group(&key.0, s).and_then(|g| g.get(&key.1));
            let Some(decision) = decide(&pod, shown, v.etcd_unavailable.as_deref()) else { continue };
            let (client, view, term) = (self.client.clone(), view.clone(), v.term);
            self.busy.insert(key.clone());
            self.inflight.spawn(async move {
                // Leadership may have moved since the decision.
                let leading = {
                    let v = view.read().unwrap();
                    v.synced && v.term == term
                };
                let result = if leading { write(&client, &key, &pod, &decision).await } else { Written::NotLeading };
                Done(key, pod, decision, result)
            });
        }
    }

    /// Takes in a finished write.
    pub fn done(&mut self, Done(key, pod, decision, result): Done) {
        self.busy.remove(&key);
        if self.blocked.remove(&key) {
            self.dirty.insert(key.clone());
        }
        match result {
            Written::Done(since) => {
                let opened = decision.status && !pod.current.as_ref().is_some_and(|c| c.status);
                if opened && let Some(ready) = pod.ready_since.filter(|s| s.as_second() >= self.started.as_second()) {
                    self.metrics.gate_latency.observe(Timestamp::now().duration_since(ready).as_secs_f64().max(0.0));
                }
                let problem = [REASON_CONFLICT, REASON_SERVICE_CLAIMED, REASON_INVALID_SPEC, REASON_ETCD_UNAVAILABLE].contains(&decision.reason);
                let note = format!("{GATE} {}: {}", if decision.status { "True" } else { "False" }, decision.message);
                self.events.publish(problem, decision.reason, "Gate", note, events::pod_ref(&key.0, &key.1, &pod.uid));
                let at = Instant::now();
                let condition = GateCondition { status: decision.status, reason: decision.reason.into(), message: decision.message, since: Some(since) };
                self.written.insert(key.clone(), Memo { uid: pod.uid, condition, at });
                self.later.insert(key, at + WATCH_LAG);
            }
            Written::Gone => {
                self.written.remove(&key);
                self.later.remove(&key);
            }
            Written::NotLeading => {}
            Written::Failed(e) => {
                let entry = self.retry.entry(key.clone()).or_insert_with(|| (Instant::now(), Backoff::default()));
                let delay = entry.1.next();
                entry.0 = Instant::now() + delay;
                warn!(namespace = key.0, pod = key.1, error = %e, retry_in = ?delay, "writing the readiness gate failed");
                self.dirty.remove(&key);
                self.later.insert(key, entry.0);
            }
        }
    }
}

/// Writes a decision to the pod, keeping the transition time while the status stays.
async fn write(client: &Client, key: &PodKey, pod: &GatedPod, d: &Decision) -> Written {
    let since = match &pod.current {
        Some(c) if c.status == d.status => c.since.unwrap_or_else(Timestamp::now),
        _ => Timestamp::now(),
    };
    match patch(client, &key.0, &key.1, &pod.uid, since, d).await {
        Ok(()) => {
            debug!(namespace = key.0, pod = key.1, status = d.status, reason = d.reason, "readiness gate written");
            Written::Done(since)
        }
        Err(e) if gone(&e) => {
            debug!(namespace = key.0, pod = key.1, error = %e, "readiness gate not written: the pod is gone or was recreated");
            Written::Gone
        }
        Err(e) => Written::Failed(e),
    }
}

/// The pod a patch was meant for is gone: deleted (404), or recreated under its name, which
/// refuses the old UID (422 "metadata.uid: field is immutable"). Anything else is retried.
pub fn gone(e: &kube::Error) -> bool {
    match e {
        kube::Error::Api(s) => {
            s.code == 404 || (s.code == 422 && s.details.as_ref().is_some_and(|d| d.causes.iter().any(|c| c.field == "metadata.uid")))
        }
        _ => false,
    }
}

/// Patches the gate condition of pod `uid`. The UID is a precondition, as in the kubelet's
/// own status patches: a pod recreated under the same name refuses it (see [`gone`]).
pub async fn patch(client: &Client, namespace: &str, name: &str, uid: &str, since: Timestamp, d: &Decision) -> Result<(), kube::Error> {
    let body = json!({
        "metadata": {"uid": uid},
        "status": {"conditions": [{
            "type": GATE, "status": if d.status { "True" } else { "False" }, "reason": d.reason, "message": d.message,
            "lastTransitionTime": Time(since), "lastProbeTime": null,
        }]},
    });
    let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
    api.patch_status(name, &PatchParams::default(), &Patch::Strategic(&body)).await.map(|_| ())
}

#[cfg(test)]
mod tests;
