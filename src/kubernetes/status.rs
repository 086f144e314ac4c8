//! The status writer: ServiceRegistration status, finalizers and Events, written only when
//! they change, from the index's counts and the registry's view of etcd.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::events::{self, Events};
use super::gate::Gates;
use crate::metrics::Metrics;
use crate::desired::{Index, PodProblem, ProblemKind, Source, Summary};
use crate::registration::{FINALIZER, MAX_STATUS_INSTANCES, RegisteredInstance, ServiceRegistration, ServiceRegistrationStatus, condition};
use crate::registry::lease::Backoff;
use crate::registry::{Notice, Records, SharedView, Shown, View};

type RegKey = (String, String);
type PodKey = (String, String);

/// Input to the status writer besides registry notices.
#[derive(Debug)]
pub enum Signal {
    /// A registration's spec, pods or counts may have changed.
    Dirty(RegKey),
    /// A pod's annotations are invalid.
    Problem(PodProblem),
    /// A gated pod's readiness gate may need writing.
    Gate(PodKey),
}

pub struct StatusWriter {
    client: Client,
    index: Arc<Mutex<Index>>,
    view: SharedView,
    events: Events,
    dirty: BTreeSet<RegKey>,
    /// Pods registered at the last write, per registration, to name them in Events.
    registered: HashMap<RegKey, BTreeSet<String>>,
    /// Last InvalidSpec message reported per registration.
    invalid: HashMap<RegKey, String>,
    /// Last prefix overlap reported per registration.
    overlap: HashMap<RegKey, String>,
    /// Last short-TTL warning reported per registration.
    short_ttl: HashMap<RegKey, String>,
    /// Registrations whose last write failed: not before this instant again.
    retry: HashMap<RegKey, (std::time::Instant, Backoff)>,
    /// What etcd holds, asked before a finalizer is released.
    records: Records,
    gates: Gates,
    /// The leading term the gates were last marked for (0: none).
    gates_term: u64,
    /// The conditions that are True in each registration's status as last computed (the
    /// `podlease_registrations` gauge).
    conditions: HashMap<RegKey, Vec<String>>,
    metrics: Metrics,
}

/// How often a deleted registration's finalizer is checked again while etcd still holds
/// some of its keys.
const RELEASE_RECHECK: Duration = Duration::from_millis(500);

/// How long changes are gathered before a round of writes (bounds API calls under churn).
const DEBOUNCE: Duration = Duration::from_millis(100);

impl StatusWriter {
    pub fn new(client: Client, index: Arc<Mutex<Index>>, view: SharedView, events: Events, records: Records, metrics: Metrics) -> StatusWriter {
        StatusWriter {
            gates: Gates::new(client.clone(), metrics.clone(), events.clone()),
            // Zeros until the first write: the series exist before anything goes wrong.
            conditions: HashMap::new(),
            metrics: {
                metrics.set_registration_conditions(std::iter::empty());
                metrics
            },
            gates_term: 0,
            client,
            index,
            view,
            events,
            dirty: BTreeSet::new(),
            registered: HashMap::new(),
            invalid: HashMap::new(),
            overlap: HashMap::new(),
            short_ttl: HashMap::new(),
            retry: HashMap::new(),
            records,
        }
    }

    pub async fn run(
        mut self,
        mut signals: mpsc::UnboundedReceiver<Signal>,
        mut notices: mpsc::UnboundedReceiver<Notice>,
        shutdown: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(DEBOUNCE);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {
                    self.follow_term();
                    self.gates.requeue_due();
                    // Only the leader writes, and only once it has adopted and converges.
                    if !self.dirty.is_empty() && self.view.read().unwrap().synced {
                        self.flush().await;
                    }
                }
                Some(s) = signals.recv() => match s {
                    Signal::Dirty(k) => { self.dirty.insert(k); }
                    Signal::Gate(k) => if self.leading() { self.gates.mark(k) },
                    Signal::Problem(p) => {
                        warn!(namespace = p.namespace, pod = p.pod, "{}", p.message);
                        // Only the leader speaks; a new leader reports what is current.
                        if self.leading() {
                            self.report_problem(&p);
                        }
                    }
                },
                Some(n) = notices.recv() => self.on_notice(n),
                Some(done) = self.gates.next_done() => self.gates.done(done),
                // Gates are decided as soon as nothing else is waiting: a rollout waits on
                // them. Their writes run beside this loop.
                _ = std::future::ready(()), if self.gates.can_start() && self.view.read().unwrap().synced => {
                    self.gates.start(&self.index, &self.view);
                }
            }
        }
    }

    fn leading(&self) -> bool {
        self.view.read().unwrap().synced
    }

    /// A new leading term decides every gate afresh; a replica that does not lead keeps
    /// nothing of them.
    fn follow_term(&mut self) {
        let (synced, term) = {
            let v = self.view.read().unwrap();
            (v.synced, v.term)
        };
        if !synced {
            self.gates.clear();
            if self.gates_term != 0 {
                // Only the leader's counts mean anything.
                self.conditions.clear();
                self.metrics.set_registration_conditions(std::iter::empty());
            }
            self.gates_term = 0;
        } else if term != self.gates_term {
            self.gates_term = term;
            // Every status is looked at afresh (written only where it differs).
            let all: Vec<RegKey> = self.index.lock().unwrap().registrations().cloned().collect();
            self.dirty.extend(all);
            self.gates.mark_all(&self.index);
            let problems = self.index.lock().unwrap().problems();
            for p in &problems {
                self.report_problem(p);
            }
        }
    }

    fn report_problem(&self, p: &PodProblem) {
        let reason = match p.kind {
            ProblemKind::Invalid => events::REASON_INVALID_ANNOTATION,
            ProblemKind::ShortTtl => events::REASON_SHORT_TTL,
        };
        self.events.publish(true, reason, "Validate", p.message.clone(), events::pod_ref(&p.namespace, &p.pod, &p.uid));
    }

    fn on_notice(&mut self, n: Notice) {
        match n {
            Notice::Etcd => {
                let all: Vec<RegKey> = self.index.lock().unwrap().registrations().cloned().collect();
                self.dirty.extend(all);
                if self.leading() {
                    self.gates.mark_all(&self.index);
                }
            }
            Notice::Changed(id) => {
                if self.leading() {
                    self.gates.mark((id.namespace.clone(), id.pod.clone()));
                }
                // Registrations this instance serves count it too.
                let selecting = self.index.lock().unwrap().selecting(&id.namespace, &id.pod);
                for name in selecting {
                    self.dirty.insert((id.namespace.clone(), name));
                }
                if let Source::Registration(name) = id.source {
                    self.dirty.insert((id.namespace, name));
                }
            }
            Notice::Claim(namespace, Source::Registration(name), refused) => {
                if let Some((_, message)) = refused {
                    let uid = self.index.lock().unwrap().summary(&namespace, &name).map(|s| s.uid).unwrap_or_default();
                    self.events.publish(true, events::REASON_SERVICE_CLAIMED, "Claim", message, events::registration_ref(&namespace, &name, &uid));
                }
                self.dirty.insert((namespace, name));
            }
            // Annotated pods show it on their own once ready (their writes are refused).
            Notice::Claim(_, Source::Annotations, _) => {}
            Notice::Conflict(id, message, claimed_by) => {
                let reason = if claimed_by.is_some() { events::REASON_SERVICE_CLAIMED } else { events::REASON_CONFLICT };
                match &id.source {
                Source::Registration(name) => {
                    let uid = self.index.lock().unwrap().summary(&id.namespace, name).map(|s| s.uid).unwrap_or_default();
                    self.events.publish(
                        true,
                        reason,
                        "Register",
                        format!("pod {}: {message}", id.pod),
                        events::registration_ref(&id.namespace, name, &uid),
                    );
                    self.dirty.insert((id.namespace.clone(), name.clone()));
                }
                Source::Annotations => {
                    self.events.publish(true, reason, "Register", message, events::pod_ref(&id.namespace, &id.pod, ""));
                }
                }
            }
        }
    }

    async fn flush(&mut self) {
        let now = std::time::Instant::now();
        let (keys, later): (BTreeSet<RegKey>, BTreeSet<RegKey>) =
            std::mem::take(&mut self.dirty).into_iter().partition(|k| self.retry.get(k).is_none_or(|(at, _)| *at <= now));
        self.dirty = later;
        for key in keys {
            let summary = self.index.lock().unwrap().summary(&key.0, &key.1);
            let Some(summary) = summary else {
                self.registered.remove(&key);
                self.invalid.remove(&key);
                self.overlap.remove(&key);
                self.short_ttl.remove(&key);
                self.conditions.remove(&key);
                continue;
            };
            match self.write(&key, summary).await {
                Ok(true) => {
                    self.retry.remove(&key);
                }
                Ok(false) => {
                    self.retry.insert(key.clone(), (now + RELEASE_RECHECK, Backoff::default()));
                    self.dirty.insert(key);
                }
                // A stale resourceVersion: the watch brings the new one and marks it dirty.
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    debug!(namespace = key.0, name = key.1, "status write raced an update; will retry");
                    self.dirty.insert(key);
                }
                Err(e) => {
                    let entry = self.retry.entry(key.clone()).or_insert_with(|| (now, Backoff::default()));
                    let delay = entry.1.next();
                    entry.0 = now + delay;
                    warn!(namespace = key.0, name = key.1, error = %e, retry_in = ?delay, "writing ServiceRegistration status failed");
                    self.dirty.insert(key);
                }
            }
        }
        self.metrics.set_registration_conditions(self.conditions.values().flatten().map(String::as_str));
    }

    /// Writes what the registration should show. Ok(false): not done yet (a finalizer
    /// waits for etcd to hold none of its keys), look again shortly.
    async fn write(&mut self, key: &RegKey, summary: Summary) -> Result<bool, kube::Error> {
        let api: Api<ServiceRegistration> = Api::namespaced(self.client.clone(), &key.0);
        let has_finalizer = summary.finalizers.iter().any(|f| f == FINALIZER);
        let computed = {
            let view = self.view.read().unwrap();
            let group = view.group(&key.0, &Source::Registration(key.1.clone()));
            if summary.deleting {
                // Every lease is revoked once the registry shows nothing for it.
                Err(group.is_none_or(|g| g.is_empty()))
            } else {
                let pods: BTreeSet<String> =
                    group.into_iter().flatten().filter(|(_, s)| matches!(s, Shown::Registered { .. })).map(|(p, _)| p.clone()).collect();
                Ok((compute(&summary, group, &view), pods))
            }
        };
        let (status, pods) = match computed {
            Ok(c) => c,
            Err(all_revoked) => {
                self.conditions.remove(key);
                if !has_finalizer {
                    return Ok(true);
                }
                // The view only says nothing is registered as far as this term knows; etcd
                // must confirm that no key of the registration is left.
                let released = all_revoked && matches!(self.records.any_left(&key.0, &key.1).await, Ok(false));
                if !released {
                    return Ok(false);
                }
                let rest: Vec<&String> = summary.finalizers.iter().filter(|f| *f != FINALIZER).collect();
                let patch = json!({"metadata": {"finalizers": rest, "resourceVersion": summary.resource_version}});
                api.patch(&key.1, &PatchParams::default(), &Patch::Merge(&patch)).await?;
                return Ok(true);
            }
        };

        if !has_finalizer {
            let mut all = summary.finalizers.clone();
            all.push(FINALIZER.to_string());
            let patch = json!({"metadata": {"finalizers": all, "resourceVersion": summary.resource_version}});
            api.patch(&key.1, &PatchParams::default(), &Patch::Merge(&patch)).await?;
        }

        self.conditions.insert(key.clone(), status.conditions.iter().filter(|c| c.status == "True").map(|c| c.type_.clone()).collect());
        if summary.status.as_ref() != Some(&status) {
            api.patch_status(&key.1, &PatchParams::default(), &Patch::Merge(&json!({"status": status}))).await?;
        }

        // Events: spec problems when they change, registrations as they come and go.
        let reference = events::registration_ref(&key.0, &key.1, &summary.uid);
        report_once(&mut self.invalid, key, summary.invalid.as_ref(), |msg| {
            self.events.publish(true, events::REASON_INVALID_SPEC, "Validate", msg, reference.clone())
        });
        report_once(&mut self.overlap, key, summary.overlap.as_ref(), |msg| {
            self.events.publish(true, events::REASON_PREFIX_OVERLAP, "Validate", msg, reference.clone())
        });
        report_once(&mut self.short_ttl, key, summary.short_ttl.as_ref(), |msg| {
            self.events.publish(true, events::REASON_SHORT_TTL, "Validate", msg, reference.clone())
        });
        if let Some(before) = self.registered.get(key) {
            let added: Vec<&String> = pods.difference(before).collect();
            let removed: Vec<&String> = before.difference(&pods).collect();
            if !added.is_empty() {
                self.events.publish(false, events::REASON_REGISTERED, "Register", describe(&added, pods.len()), reference.clone());
            }
            if !removed.is_empty() {
                self.events.publish(false, events::REASON_DEREGISTERED, "Revoke", describe(&removed, pods.len()), reference);
            }
        }
        self.registered.insert(key.clone(), pods);
        Ok(true)
    }
}

/// Calls `publish` when `current` is a message not reported for `key` yet; forgets it once
/// the problem is gone, so a recurrence is reported again.
fn report_once(seen: &mut HashMap<RegKey, String>, key: &RegKey, current: Option<&String>, publish: impl FnOnce(String)) {
    match current {
        Some(msg) if seen.get(key) != Some(msg) => {
            seen.insert(key.clone(), msg.clone());
            publish(msg.clone());
        }
        Some(_) => {}
        None => {
            seen.remove(key);
        }
    }
}

fn describe(pods: &[&String], total: usize) -> String {
    let shown: Vec<&str> = pods.iter().take(5).map(|p| p.as_str()).collect();
    let more = pods.len().saturating_sub(shown.len());
    let list = if more > 0 { format!("{} and {more} more", shown.join(", ")) } else { shown.join(", ") };
    format!("{list} ({total} registered)")
}

/// The status a registration should have now. Conditions keep their lastTransitionTime while
/// their status stays the same, and instances keep their `since`.
pub fn compute(summary: &Summary, group: Option<&BTreeMap<String, Shown>>, view: &View) -> ServiceRegistrationStatus {
    let previous = summary.status.clone().unwrap_or_default();
    let mut registered = 0u32;
    let mut conflicts: Vec<(&String, &String)> = Vec::new();
    let mut claimed = false;
    let mut instances = Vec::new();
    for (pod, shown) in group.into_iter().flatten() {
        match shown {
            Shown::Registered { key, lease, since, address, .. } => {
                registered += 1;
                if instances.len() < MAX_STATUS_INSTANCES {
                    let lease_id = format!("{lease:016x}");
                    let since =
                        previous.instances.iter().find(|i| &i.pod == pod && i.lease_id == lease_id).map(|i| i.since.clone()).unwrap_or(Time(*since));
                    instances.push(RegisteredInstance { pod: pod.clone(), address: address.clone(), key: key.clone(), lease_id, since });
                }
            }
            Shown::Conflict { message, claimed_by, .. } => {
                claimed |= claimed_by.is_some();
                conflicts.push((pod, message));
            }
            Shown::Pending | Shown::Failed { .. } => {}
        }
    }
    // A pod whose key another of its sources publishes is registered when that one is.
    for (pod, owner) in &summary.served {
        if matches!(view.group(&summary.namespace, owner).and_then(|g| g.get(pod)), Some(Shown::Registered { .. })) {
            registered += 1;
        }
    }
    let generation = summary.generation;
    let cond = |type_: &str, ok: bool, reason: &str, message: String| -> Condition {
        let status = if ok { "True" } else { "False" };
        let last = previous
            .conditions
            .iter()
            .find(|c| c.type_ == type_ && c.status == status)
            .map(|c| c.last_transition_time.clone())
            .unwrap_or(Time(Timestamp::now()));
        Condition {
            type_: type_.into(),
            status: status.into(),
            reason: reason.into(),
            message,
            last_transition_time: last,
            observed_generation: generation,
        }
    };

    let invalid = summary.invalid.clone();
    let key_conflict = conflicts.first().map(|(pod, m)| {
        let more = conflicts.len() - 1;
        if more > 0 { format!("pod {pod}: {m} (and {more} more pods)") } else { format!("pod {pod}: {m}") }
    });
    // The service's claim refused: shown whether or not any pod is ready.
    let refused = view.refused.get(&(summary.namespace.clone(), Source::Registration(summary.name.clone())));
    claimed |= refused.is_some();
    let key_conflict = match (refused, key_conflict) {
        (Some((_, m)), Some(k)) => Some(format!("{m}; {k}")),
        (Some((_, m)), None) => Some(m.clone()),
        (None, k) => k,
    };
    let conflict_msg = match (&key_conflict, &summary.overlap) {
        (Some(k), Some(o)) => Some(format!("{k}; {o}")),
        (Some(k), None) => Some(k.clone()),
        (None, Some(o)) => Some(o.clone()),
        (None, None) => None,
    };
    let etcd = view.etcd_unavailable.clone();
    let all_in = invalid.is_none() && conflict_msg.is_none() && etcd.is_none() && registered == summary.ready;
    let (ready_reason, ready_msg) = if let Some(m) = &invalid {
        ("InvalidSpec", m.clone())
    } else if conflict_msg.is_some() {
        ("Conflict", format!("{registered} of {} ready pods registered; see the Conflict condition", summary.ready))
    } else if etcd.is_some() {
        ("EtcdUnavailable", format!("{} of {} ready pods registered; etcd is unavailable", registered, summary.ready))
    } else if registered == summary.ready {
        ("AllRegistered", format!("{registered} of {} ready pods registered", summary.ready))
    } else {
        ("Registering", format!("{registered} of {} ready pods registered", summary.ready))
    };
    let conditions = vec![
        cond(condition::READY, all_in, ready_reason, ready_msg),
        match &conflict_msg {
            Some(m) if key_conflict.is_none() => cond(condition::CONFLICT, true, "PrefixOverlap", m.clone()),
            Some(m) => cond(condition::CONFLICT, true, if claimed { "ServiceClaimed" } else { "KeyHeldByOther" }, m.clone()),
            None => cond(condition::CONFLICT, false, "NoConflict", "no key is held by another writer".into()),
        },
        match &invalid {
            Some(m) => cond(condition::INVALID_SPEC, true, "InvalidSpec", m.clone()),
            None => cond(condition::INVALID_SPEC, false, "Valid", "the spec is valid for every matching pod".into()),
        },
        match &etcd {
            Some(m) => cond(condition::ETCD_UNAVAILABLE, true, "EtcdUnreachable", m.clone()),
            None => cond(condition::ETCD_UNAVAILABLE, false, "EtcdReachable", "etcd answers".into()),
        },
        match &summary.short_ttl {
            Some(m) => cond(condition::SHORT_TTL, true, "TTLBelowFailover", m.clone()),
            None => cond(condition::SHORT_TTL, false, "TTLOutlivesFailover", "keys outlive a leader failover".into()),
        },
    ];
    ServiceRegistrationStatus {
        observed_generation: generation,
        service: Some(summary.service.clone()).filter(|s| !s.is_empty()),
        conditions,
        matching_pods: summary.matching,
        ready_pods: summary.ready,
        registered,
        instances,
    }
}
