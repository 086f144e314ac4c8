//! Desired state, pure: pods × registrations × defaults → what each (pod, registration)
//! pair should have in etcd. The index only applies and deletes objects and returns the
//! resulting changes; the registry and the status writer do the I/O.
//!
//! Registrations and annotated pods are untrusted: both go through one validating path
//! (`plan`) into typed key parts, and every key is made by [`format::build`], which checks
//! it against the admin's key space. What fails is reported (InvalidSpec on the registration,
//! an InvalidAnnotation Event on the pod) and nothing of it is written.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;

use crate::annotations::{self, AnnotationSpec, PortRef};
use crate::small::{SmallMap, SmallSet};
use crate::format::{self, Format, FormatOptions, Instance, Key};
use crate::labels::Selector;
use crate::pod::PodInfo;
use crate::registration::{MAX_TTL_SECONDS, MIN_TTL_SECONDS, ServiceRegistration};
use crate::validate::{self, AllowedPrefix, KeySpace, Prefix, ServiceName, shown};

/// The controller-wide defaults (flags), used where a registration or annotation is silent,
/// and the key space the admin allows.
#[derive(Debug, Clone, PartialEq)]
pub struct Defaults {
    pub format: Format,
    /// Prefix for the default format; other formats use their own default prefix.
    pub prefix: Option<Prefix>,
    pub ttl: i64,
    /// The prefixes podlease may write under, and the owner prefix (where ownership records
    /// live: no service's keys may lie in it, and none should cover it).
    pub key_space: KeySpace,
    /// Service names any namespace may publish (the cluster admin's `--shared-service`):
    /// these are not claimed.
    pub shared: BTreeSet<String>,
    /// The worst-case leader failover, with leader election: registrations whose TTL does
    /// not outlive it are warned about.
    pub failover: Option<std::time::Duration>,
}

impl Defaults {
    /// The defaults with their key space: the `allowed` prefixes (none: each format's own,
    /// for that format only), plus `prefix` for `format` (the admin set it, so the default
    /// format may always use it).
    pub fn new(format: Format, prefix: Option<Prefix>, ttl: i64, allowed: Vec<AllowedPrefix>, owner: Prefix) -> Result<Defaults, String> {
        let mut allowed = if allowed.is_empty() { KeySpace::default_allowlist(format, None) } else { allowed };
        if let Some(p) = &prefix {
            allowed.push(AllowedPrefix { format: Some(format), prefix: p.clone() });
        }
        Ok(Defaults { format, prefix, ttl, key_space: KeySpace::new(allowed, owner)?, shared: BTreeSet::new(), failover: None })
    }
}

impl Default for Defaults {
    fn default() -> Self {
        Defaults {
            format: Format::Json,
            prefix: None,
            ttl: crate::registration::DEFAULT_TTL_SECONDS,
            key_space: KeySpace::default(),
            shared: BTreeSet::new(),
            failover: None,
        }
    }
}

/// Where a pod's registration comes from.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Source {
    /// The pod's own `podlease.io/` annotations.
    Annotations,
    /// A ServiceRegistration (by name) in the pod's namespace.
    Registration(String),
}

/// Segment used in ownership records for annotation mode; `@` cannot start an object name.
const ANNOTATIONS_SEGMENT: &str = "@annotations";

impl Source {
    pub fn segment(&self) -> &str {
        match self {
            Source::Annotations => ANNOTATIONS_SEGMENT,
            Source::Registration(n) => n,
        }
    }
    pub fn from_segment(s: &str) -> Source {
        if s == ANNOTATIONS_SEGMENT { Source::Annotations } else { Source::Registration(s.to_string()) }
    }
}

/// One (pod, registration) pair: the unit that owns one lease.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InstanceId {
    pub namespace: String,
    pub pod: String,
    pub source: Source,
}

/// What one instance should look like in etcd.
#[derive(Debug, Clone, PartialEq)]
pub struct Desired {
    pub service: String,
    pub format: Format,
    pub key: Key,
    pub value: Vec<u8>,
    pub ttl: i64,
    pub address: String,
    pub pod_uid: String,
    /// When the pod's Ready condition last changed, for the propagation metric.
    pub ready_since: Option<Timestamp>,
    /// The claim this instance's service needs: its consumers' read prefix, which belongs
    /// to one namespace (None: the key holds the namespace, or the service is shared).
    pub claim: Option<String>,
}

/// A service claim held for as long as its source exists (a ServiceRegistration, or the
/// annotated pods of a namespace), whether or not any pod is ready: the read prefix
/// `read` belongs to `namespace` until the last such source goes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Hold {
    pub read: String,
    pub namespace: String,
    /// The registration, or [`Source::Annotations`] for all annotated pods of the namespace.
    pub holder: Source,
}

impl Hold {
    /// The hold an instance's writes need (None: its service is not claimed).
    pub fn of(id: &InstanceId, claim: Option<&str>) -> Option<Hold> {
        claim.map(|read| Hold { read: read.to_string(), namespace: id.namespace.clone(), holder: id.source.clone() })
    }
}

/// A change to the desired state, for the registry.
#[derive(Debug, Clone, PartialEq)]
pub enum Update {
    Upsert(InstanceId, Arc<Desired>),
    Remove(InstanceId),
    /// The key of `from` (which goes) is now `to`'s: it takes the lease and key over in
    /// place, so watchers see no DELETE (one owner per key, see [`dedup`]).
    Transfer { from: InstanceId, to: InstanceId, desired: Arc<Desired> },
}

/// A problem with one pod's annotations, for an Event on that pod.
#[derive(Debug, Clone, PartialEq)]
pub struct PodProblem {
    pub namespace: String,
    pub pod: String,
    pub uid: String,
    pub message: String,
    pub kind: ProblemKind,
}

/// What kind of problem a [`PodProblem`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProblemKind {
    /// The annotations are refused (or their service reads another's keys).
    Invalid,
    /// The annotations are published, but `podlease.io/ttl` does not outlive a leader
    /// failover: the keys could expire while a standby takes over (the annotated pod's
    /// counterpart of a registration's ShortTTL condition).
    ShortTtl,
}

/// What one index operation changed.
#[derive(Debug, Default, PartialEq)]
pub struct Changes {
    pub updates: Vec<Update>,
    /// ServiceRegistrations (namespace, name) whose status may have changed.
    pub registrations: BTreeSet<(String, String)>,
    /// New annotation problems (reported once per distinct message).
    pub problems: Vec<PodProblem>,
    /// Gated pods whose readiness gate may need writing.
    pub gated: BTreeSet<(String, String)>,
    /// The set of service claims to hold ([`Index::holds`]) may have changed.
    pub holds: bool,
}

/// What the readiness gate of one gated pod is decided from (see `kubernetes::gate`).
#[derive(Debug, Clone, PartialEq)]
pub struct GatedPod {
    pub uid: String,
    /// Containers ready, not terminating, has an IP, not finished.
    pub publishable: bool,
    pub terminating: bool,
    /// When its containers turned ready.
    pub ready_since: Option<Timestamp>,
    pub current: Option<crate::pod::GateCondition>,
    /// The sources that select the pod: Ok with the key its instance should have, Err with
    /// why the source publishes nothing for it (an invalid spec or annotation).
    pub sources: Vec<(Source, Result<Key, String>)>,
    /// Every source that may still hold a key of the pod (all registrations of its
    /// namespace, and its annotations).
    pub candidates: Vec<Source>,
}

/// How many gated pods show the gate True, False, or not at all.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GateCounts {
    pub r#true: i64,
    pub r#false: i64,
    pub unset: i64,
}

impl GateCounts {
    fn add(&mut self, pod: &PodInfo, by: i64) {
        if !pod.gated {
            return;
        }
        match pod.gate.as_ref().map(|g| g.status) {
            Some(true) => self.r#true += by,
            Some(false) => self.r#false += by,
            None => self.unset += by,
        }
    }
}

/// How to publish the pods of one registration (or of one annotated pod).
#[derive(Debug, Clone, PartialEq)]
struct Plan {
    service: ServiceName,
    /// The prefix this service's consumers read (Get with prefix, then Watch).
    read_prefix: String,
    port: Option<PortRef>,
    format: Format,
    prefix: Prefix,
    ttl: i64,
    metadata: BTreeMap<String, String>,
    metadata_from_labels: Vec<String>,
    publish_not_ready: bool,
    options: FormatOptions,
}

#[derive(Debug, Clone)]
struct Entry {
    uid: String,
    generation: Option<i64>,
    deleting: bool,
    finalizers: Vec<String>,
    resource_version: Option<String>,
    status: Option<crate::registration::ServiceRegistrationStatus>,
    selector: Option<Selector>,
    plan: Result<Plan, String>,
}

/// The status-relevant summary of one ServiceRegistration.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Summary {
    pub uid: String,
    pub service: String,
    pub generation: Option<i64>,
    pub deleting: bool,
    pub finalizers: Vec<String>,
    pub resource_version: Option<String>,
    /// The status as last seen on the API server.
    pub status: Option<crate::registration::ServiceRegistrationStatus>,
    pub matching: u32,
    pub ready: u32,
    /// Why the spec (or its use on some pod) is invalid.
    pub invalid: Option<String>,
    /// Another service's keys lie under the prefix this service's consumers read.
    pub overlap: Option<String>,
    /// The TTL does not outlive a leader failover: why.
    pub short_ttl: Option<String>,
    pub namespace: String,
    pub name: String,
    /// Pods whose key another source of theirs publishes: (pod, that source).
    pub served: Vec<(String, Source)>,
}

type PodKey = (String, String);

#[derive(Debug, Default)]
pub struct Index {
    defaults: Defaults,
    pods: BTreeMap<PodKey, PodInfo>,
    registrations: BTreeMap<PodKey, Entry>,
    /// What was last handed to the registry, per pod.
    emitted: HashMap<PodKey, SmallMap<Source, Arc<Desired>>>,
    /// Registrations that selected each pod at the last computation.
    matched: HashMap<PodKey, SmallSet<String>>,
    /// Last annotation problem per pod, so each distinct one is reported once.
    problems: HashMap<PodKey, String>,
    /// Per pod, why its `podlease.io/ttl` does not outlive a leader failover (its keys are
    /// published all the same), so each distinct warning is reported once.
    short_ttls: HashMap<PodKey, String>,
    /// Every prefix some service's consumers read, with how many registrations (and
    /// annotated pods) publish under it, to detect one service reading another's keys.
    read_prefixes: BTreeMap<String, usize>,
    /// The read prefix of each annotated pod's service.
    annotation_prefixes: HashMap<PodKey, String>,
    /// The claimed read prefix of each annotated pod's service, and how many pods of each
    /// (namespace, read prefix) there are: their namespace holds the claim while any exists.
    annotation_claims: HashMap<PodKey, String>,
    annotation_holds: BTreeMap<(String, String), usize>,
    /// Why a registration (by name) publishes nothing for a pod it selects (a port the pod
    /// does not declare, a key outside the key space), for its InvalidSpec condition.
    failures: HashMap<PodKey, BTreeMap<String, String>>,
    /// Gated pods by the state of their gate, kept as pods come and go.
    gate_counts: GateCounts,
    /// Per pod, sources whose key another source of the pod publishes (its owner).
    served: HashMap<PodKey, BTreeMap<Source, Source>>,
    /// Per pod, the fixed keys in `emitted` and which source publishes each: whether a
    /// source's key collides is one lookup, not a pass over the pod's sources.
    fixed_keys: HashMap<PodKey, SmallMap<String, Source>>,
}

impl Index {
    pub fn new(defaults: Defaults) -> Index {
        Index { defaults, ..Default::default() }
    }

    /// Adds or updates a pod.
    pub fn apply_pod(&mut self, pod: PodInfo) -> Changes {
        let key = (pod.namespace.clone(), pod.name.clone());
        if self.pods.get(&key) == Some(&pod) {
            return Changes::default();
        }
        self.gate_counts.add(&pod, 1);
        if let Some(old) = self.pods.insert(key.clone(), pod) {
            self.gate_counts.add(&old, -1);
        }
        let mut changes = Changes::default();
        self.recompute_pod(&key, &mut changes);
        changes
    }

    /// Removes a pod: all its instances go.
    pub fn delete_pod(&mut self, namespace: &str, name: &str) -> Changes {
        let key = (namespace.to_string(), name.to_string());
        let mut changes = Changes::default();
        if let Some(old) = self.pods.remove(&key) {
            self.gate_counts.add(&old, -1);
            if old.gated {
                changes.gated.insert(key.clone()); // the writer forgets it
            }
            self.recompute_pod(&key, &mut changes);
        }
        self.problems.remove(&key);
        self.short_ttls.remove(&key);
        changes
    }

    /// Adds or updates a ServiceRegistration. One being deleted publishes nothing.
    pub fn apply_registration(&mut self, sreg: &ServiceRegistration) -> Changes {
        let ns = sreg.metadata.namespace.clone().unwrap_or_default();
        let name = sreg.metadata.name.clone().unwrap_or_default();
        let (selector, plan) = match compile(sreg, &self.defaults) {
            Ok((s, p)) => (Some(s), Ok(p)),
            // The selector may still be valid: the pods it selects show the problem on
            // their readiness gate.
            Err(e) => (compile_selector(&sreg.spec.selector).ok(), Err(e)),
        };
        let entry = Entry {
            uid: sreg.metadata.uid.clone().unwrap_or_default(),
            generation: sreg.metadata.generation,
            deleting: sreg.metadata.deletion_timestamp.is_some(),
            finalizers: sreg.finalizers().to_vec(),
            resource_version: sreg.metadata.resource_version.clone(),
            status: sreg.status.clone(),
            selector,
            plan,
        };
        let key = (ns.clone(), name.clone());
        let same_plan = self.registrations.get(&key).is_some_and(|old| {
            old.deleting == entry.deleting && old.plan == entry.plan && old.selector == entry.selector
        });
        let new_prefix = entry.plan.as_ref().ok().map(|p| p.read_prefix.clone());
        let old = self.registrations.insert(key.clone(), entry);
        let old_prefix = old.and_then(|o| o.plan.ok()).map(|p| p.read_prefix);
        let mut changes = Changes { holds: !same_plan, ..Default::default() };
        self.move_prefix(old_prefix, new_prefix, &mut changes);
        changes.registrations.insert(key);
        if !same_plan {
            self.recompute_selected(&ns, &name, &mut changes);
        }
        changes
    }

    /// Forgets a ServiceRegistration: all its instances go.
    pub fn delete_registration(&mut self, namespace: &str, name: &str) -> Changes {
        let mut changes = Changes::default();
        if let Some(old) = self.registrations.remove(&(namespace.to_string(), name.to_string())) {
            changes.holds = true;
            self.move_prefix(old.plan.ok().map(|p| p.read_prefix), None, &mut changes);
            self.recompute_selected(namespace, name, &mut changes);
        }
        changes
    }

    /// Records that a service moved from one read prefix to another; when the set of
    /// prefixes changes, every registration's overlap may have changed.
    fn move_prefix(&mut self, old: Option<String>, new: Option<String>, changes: &mut Changes) {
        if old == new {
            return;
        }
        let (old_key, new_key) = (old.clone(), new.clone());
        let mut changed = false;
        if let Some(old) = old
            && let Some(n) = self.read_prefixes.get_mut(&old)
        {
            *n -= 1;
            if *n == 0 {
                self.read_prefixes.remove(&old);
                changed = true;
            }
        }
        if let Some(new) = new {
            let n = self.read_prefixes.entry(new).or_insert(0);
            *n += 1;
            changed |= *n == 1;
        }
        if changed {
            // Only a registration whose read prefix nests with the one that came or went can
            // have its overlap change (a new prefix is not a status write for every
            // registration of the cluster).
            let moved: Vec<&String> = [&old_key, &new_key].into_iter().flatten().collect();
            let nests = |p: &str| moved.iter().any(|m| p.starts_with(m.as_str()) || m.starts_with(p));
            let touched = self.registrations.iter().filter(|(_, e)| e.plan.as_ref().is_ok_and(|p| nests(&p.read_prefix))).map(|(k, _)| k.clone());
            changes.registrations.extend(touched);
        }
    }

    /// Keeps the count of annotated pods per (namespace, claimed read prefix).
    fn move_annotation_claim(&mut self, key: &PodKey, new: Option<String>, changes: &mut Changes) {
        let old = self.annotation_claims.remove(key);
        if old == new {
            if let Some(n) = new {
                self.annotation_claims.insert(key.clone(), n);
            }
            return;
        }
        if let Some(old) = old {
            let k = (key.0.clone(), old);
            if let Some(n) = self.annotation_holds.get_mut(&k) {
                *n -= 1;
                if *n == 0 {
                    self.annotation_holds.remove(&k);
                    changes.holds = true;
                }
            }
        }
        if let Some(new) = new {
            let n = self.annotation_holds.entry((key.0.clone(), new.clone())).or_insert(0);
            *n += 1;
            changes.holds |= *n == 1;
            self.annotation_claims.insert(key.clone(), new);
        }
    }

    /// Every service claim this install holds: one per ServiceRegistration whose service is
    /// claimed (valid, not being deleted), one per (namespace, service) of annotated pods.
    pub fn holds(&self) -> BTreeSet<Hold> {
        let registrations = self.registrations.iter().filter(|(_, e)| !e.deleting).filter_map(|((ns, name), e)| {
            let read = e.plan.as_ref().ok()?.claim(&self.defaults)?;
            Some(Hold { read, namespace: ns.clone(), holder: Source::Registration(name.clone()) })
        });
        let annotated =
            self.annotation_holds.keys().map(|(ns, read)| Hold { read: read.clone(), namespace: ns.clone(), holder: Source::Annotations });
        registrations.chain(annotated).collect()
    }

    /// Why consumers reading `mine` would see keys that are not this service's.
    fn overlap(&self, mine: &str) -> Option<String> {
        let owners = format!("{}/", self.defaults.key_space.owner().as_str());
        if owners.starts_with(mine) {
            return Some(format!(
                "consumers of this service read the prefix {mine:?}, which also holds podlease's ownership records ({owners}); use another prefix"
            ));
        }
        let other = self
            .read_prefixes
            .range(mine.to_string()..)
            .take_while(|(p, _)| p.starts_with(mine))
            .find(|(p, _)| p.as_str() != mine)?;
        Some(format!(
            "consumers of this service read the prefix {mine:?}, which also holds the keys of another service (read as {:?}); rename one of them or give it another prefix",
            other.0
        ))
    }

    /// Everything currently desired (for a full resync of the registry).
    pub fn desired(&self) -> Vec<(InstanceId, Arc<Desired>)> {
        self.emitted
            .iter()
            .flat_map(|((ns, pod), by_source)| {
                by_source.iter().map(move |(source, d)| {
                    (InstanceId { namespace: ns.clone(), pod: pod.clone(), source: source.clone() }, d.clone())
                })
            })
            .collect()
    }

    /// Counts and problems of one ServiceRegistration, or None when it is unknown.
    pub fn summary(&self, namespace: &str, name: &str) -> Option<Summary> {
        let entry = self.registrations.get(&(namespace.to_string(), name.to_string()))?;
        let mut s = Summary {
            namespace: namespace.to_string(),
            name: name.to_string(),
            uid: entry.uid.clone(),
            generation: entry.generation,
            deleting: entry.deleting,
            finalizers: entry.finalizers.clone(),
            resource_version: entry.resource_version.clone(),
            status: entry.status.clone(),
            ..Default::default()
        };
        let plan = match &entry.plan {
            Ok(p) => p,
            Err(e) => {
                s.invalid = Some(e.clone());
                return Some(s);
            }
        };
        s.service = plan.service.to_string();
        s.overlap = self.overlap(&plan.read_prefix);
        s.short_ttl = self.defaults.failover.and_then(|f| crate::leader::short_ttl(plan.ttl, f));
        let selector = entry.selector.as_ref().expect("a valid plan has a selector");
        let mut first: Option<&String> = None;
        let mut more = 0;
        for ((_, pod_name), pod) in self.pods.range((namespace.to_string(), String::new())..).take_while(|((ns, _), _)| ns == namespace) {
            if !selector.matches(&pod.labels) {
                continue;
            }
            s.matching += 1;
            if pod.publishable(plan.publish_not_ready) {
                s.ready += 1;
                if let Some(owner) = self.served.get(&(namespace.to_string(), pod_name.clone())).and_then(|m| m.get(&Source::Registration(name.to_string()))) {
                    s.served.push((pod_name.clone(), owner.clone()));
                }
                let failure = self.failures.get(&(namespace.to_string(), pod_name.clone())).and_then(|f| f.get(name));
                match (failure, first) {
                    (Some(f), None) => first = Some(f),
                    (Some(_), Some(_)) => more += 1,
                    _ => {}
                }
            }
        }
        if let Some(first) = first {
            s.invalid = Some(if more == 0 { first.clone() } else { format!("{first} (and {more} more pods)") });
        }
        Some(s)
    }

    /// Pods (namespace, name) currently known.
    pub fn pod_keys(&self) -> Vec<(String, String)> {
        self.pods.keys().cloned().collect()
    }

    /// Registrations (namespace, name) currently known.
    pub fn registrations(&self) -> impl Iterator<Item = &(String, String)> {
        self.registrations.keys()
    }

    /// Registrations that select a pod (their status may show another source's instance).
    pub fn selecting(&self, namespace: &str, pod: &str) -> Vec<String> {
        self.matched.get(&(namespace.to_string(), pod.to_string())).map(|m| m.keys().cloned().collect()).unwrap_or_default()
    }

    /// Every pod's current annotation problem (for a new leader to report).
    pub fn problems(&self) -> Vec<PodProblem> {
        let invalid = self.problems.iter().map(|(k, m)| (k, m, ProblemKind::Invalid));
        let short = self.short_ttls.iter().map(|(k, m)| (k, m, ProblemKind::ShortTtl));
        invalid
            .chain(short)
            .map(|(k, message, kind)| PodProblem {
                namespace: k.0.clone(),
                pod: k.1.clone(),
                uid: self.pods.get(k).map(|p| p.uid.clone()).unwrap_or_default(),
                message: message.clone(),
                kind,
            })
            .collect()
    }

    /// Pods (namespace, name) that declare podlease's readiness gate.
    pub fn gated_pods(&self) -> Vec<(String, String)> {
        self.pods.iter().filter(|(_, p)| p.gated).map(|(k, _)| k.clone()).collect()
    }

    pub fn gate_counts(&self) -> GateCounts {
        self.gate_counts
    }

    /// What the readiness gate of a gated pod is decided from; None when the pod is unknown
    /// or not gated.
    pub fn gated(&self, namespace: &str, name: &str) -> Option<GatedPod> {
        let key = (namespace.to_string(), name.to_string());
        let pod = self.pods.get(&key).filter(|p| p.gated)?;
        let emitted = self.emitted.get(&key);
        let mut sources = Vec::new();
        let mut candidates = Vec::new();
        for ((_, reg), entry) in self.registrations.range((key.0.clone(), String::new())..).take_while(|((ns, _), _)| *ns == key.0) {
            let source = Source::Registration(reg.clone());
            candidates.push(source.clone());
            if entry.deleting || !entry.selector.as_ref().is_some_and(|s| s.matches(&pod.labels)) {
                continue;
            }
            let state = match (&entry.plan, emitted.and_then(|e| e.get(&source))) {
                (Err(e), _) => Err(format!("ServiceRegistration {reg}: {e}")),
                (Ok(_), Some(d)) => Ok(d.key.clone()),
                (Ok(_), None) => match self.failures.get(&key).and_then(|f| f.get(reg)) {
                    Some(f) => Err(format!("ServiceRegistration {reg}: {f}")),
                    None => continue, // not publishable for it: nothing desired
                },
            };
            sources.push((source, state));
        }
        candidates.push(Source::Annotations);
        let annotated = annotations::parse(&pod.annotations);
        if !matches!(annotated, Ok(None)) {
            let state = if let Some(d) = emitted.and_then(|e| e.get(&Source::Annotations)) {
                Some(Ok(d.key.clone()))
            } else {
                self.problems.get(&key).map(|p| Err(p.clone()))
            };
            sources.extend(state.map(|s| (Source::Annotations, s)));
        }
        Some(GatedPod {
            uid: pod.uid.clone(),
            publishable: pod.publishable(false),
            terminating: pod.terminating,
            ready_since: pod.ready_since,
            current: pod.gate.clone(),
            sources,
            candidates,
        })
    }

    fn pods_in<'a>(&'a self, namespace: &'a str) -> impl Iterator<Item = &'a PodInfo> + 'a {
        self.pods
            .range((namespace.to_string(), String::new())..)
            .take_while(move |((ns, _), _)| ns == namespace)
            .map(|(_, p)| p)
    }

    /// Recomputes this registration's instance of each pod it selects now or selected
    /// before: nothing else can change. A registration change costs one pass over the
    /// namespace's pods and one instance per selected pod, however many other
    /// registrations the namespace or the pods have (a pod in 1,000 registrations is not
    /// re-derived 1,000 times when one of them changes).
    fn recompute_selected(&mut self, namespace: &str, name: &str, changes: &mut Changes) {
        let selector = self.registrations.get(&(namespace.to_string(), name.to_string())).and_then(|e| e.selector.as_ref());
        let keys: Vec<PodKey> = self
            .pods_in(namespace)
            .map(|p| (p, (p.namespace.clone(), p.name.clone())))
            .filter(|(p, key)| selector.is_some_and(|s| s.matches(&p.labels)) || self.matched.get(key).is_some_and(|m| m.contains(name)))
            .map(|(_, key)| key)
            .collect();
        for key in keys {
            self.recompute_pair(&key, name, changes);
        }
        // Instances of pods that are gone were removed with the pod; nothing else to do.
    }

    /// Recomputes one pod's instance of one registration (what [`Index::recompute_pod`]
    /// does for that source alone).
    fn recompute_pair(&mut self, key: &PodKey, name: &str, changes: &mut Changes) {
        let source = Source::Registration(name.to_string());
        let mut selected = false;
        let mut now: Option<Result<Desired, String>> = None;
        if let (Some(pod), Some(entry)) = (self.pods.get(key), self.registrations.get(&(key.0.clone(), name.to_string())))
            && let (Some(selector), Ok(plan)) = (&entry.selector, &entry.plan)
            && selector.matches(&pod.labels)
        {
            selected = true;
            if !entry.deleting && pod.publishable(plan.publish_not_ready) {
                now = Some(desire(plan, pod, &self.defaults));
            }
        }
        // A key another source of the pod also wants (or wanted): who owns it is decided
        // over all the pod's sources. Only when this source is in a collision (served, or
        // serving another) or is about to be: a pod in many registrations is not re-derived
        // whole for each of them.
        let collides = self.served.get(key).is_some_and(|m| m.iter().any(|(s, o)| *s == source || *o == source))
            || matches!(&now, Some(Ok(Desired { key: Key::Fixed(k), .. })) if self.fixed_keys.get(key).and_then(|m| m.get(k)).is_some_and(|s| *s != source));
        if collides {
            self.recompute_pod(key, changes);
            return;
        }
        changes.registrations.insert((key.0.clone(), name.to_string()));
        if self.pods.get(key).is_some_and(|p| p.gated) {
            changes.gated.insert(key.clone());
        }
        let matched = self.matched.entry(key.clone()).or_default();
        if selected {
            matched.add(name.to_string());
        } else {
            matched.remove(name);
        }
        if matched.is_empty() {
            self.matched.remove(key);
        }
        let failures = self.failures.entry(key.clone()).or_default();
        match &now {
            Some(Err(e)) => {
                failures.insert(name.to_string(), e.clone());
            }
            _ => {
                failures.remove(name);
            }
        }
        if failures.is_empty() {
            self.failures.remove(key);
        }
        let emitted = self.emitted.entry(key.clone()).or_default();
        let replaced = match now {
            Some(Ok(d)) => {
                if emitted.get(&source).is_none_or(|o| **o != d) {
                    let d = Arc::new(d);
                    let old = emitted.insert(source.clone(), d.clone());
                    changes.updates.push(Update::Upsert(id(key, &source), d.clone()));
                    Some((old, Some(d)))
                } else {
                    None
                }
            }
            _ => emitted.remove(&source).map(|old| {
                changes.updates.push(Update::Remove(id(key, &source)));
                (Some(old), None)
            }),
        };
        if emitted.is_empty() {
            self.emitted.remove(key);
        }
        if let Some((old, new)) = replaced {
            let fixed = self.fixed_keys.entry(key.clone()).or_default();
            if let Some(Key::Fixed(k)) = old.as_ref().map(|o| &o.key) {
                fixed.remove(k);
            }
            if let Some(Key::Fixed(k)) = new.as_ref().map(|n| &n.key) {
                fixed.insert(k.clone(), source.clone());
            }
            if fixed.is_empty() {
                self.fixed_keys.remove(key);
            }
        }
    }

    /// Recomputes one pod's instances and records the difference to what was emitted.
    fn recompute_pod(&mut self, key: &PodKey, changes: &mut Changes) {
        let mut now: BTreeMap<Source, Arc<Desired>> = BTreeMap::new();
        let mut annotation_prefix: Option<String> = None;
        let mut annotation_claim: Option<String> = None;
        let mut matched: BTreeSet<String> = BTreeSet::new();
        let mut failed: BTreeMap<String, String> = BTreeMap::new();
        let mut short_ttl: Option<String> = None;
        let mut clear_problem = false;
        if self.pods.get(key).is_some_and(|p| p.gated) {
            changes.gated.insert(key.clone());
        }
        if let Some(pod) = self.pods.get(key) {
            // ServiceRegistrations in the pod's namespace.
            for ((_, name), entry) in self
                .registrations
                .range((key.0.clone(), String::new())..)
                .take_while(|((ns, _), _)| *ns == key.0)
            {
                let (Some(selector), Ok(plan)) = (&entry.selector, &entry.plan) else { continue };
                if !selector.matches(&pod.labels) {
                    continue;
                }
                matched.insert(name.clone());
                if entry.deleting || !pod.publishable(plan.publish_not_ready) {
                    continue;
                }
                match desire(plan, pod, &self.defaults) {
                    Ok(d) => {
                        now.insert(Source::Registration(name.clone()), Arc::new(d));
                    }
                    Err(e) => {
                        failed.insert(name.clone(), e);
                    }
                }
            }
            // Annotation mode.
            let spec = annotations::parse(&pod.annotations).map_err(|e| e.to_string());
            let plan = match &spec {
                Ok(Some(spec)) => annotation_plan(spec, &pod.namespace, &self.defaults).map(Some),
                Ok(None) => Ok(None),
                Err(e) => Err(e.clone()),
            };
            match plan {
                Ok(None) => clear_problem = true,
                Ok(Some(plan)) => {
                    if let Ok(Some(spec)) = &spec {
                        short_ttl = annotation_short_ttl(spec, &self.defaults);
                    }
                    annotation_prefix = Some(plan.read_prefix.clone());
                    annotation_claim = plan.claim(&self.defaults);
                    let result = if pod.publishable(false) { desire(&plan, pod, &self.defaults).map(Some) } else { Ok(None) };
                    match result {
                        Ok(d) => {
                            clear_problem = true;
                            if let Some(d) = d {
                                now.insert(Source::Annotations, Arc::new(d));
                            }
                        }
                        Err(message) => self.report(key, message, changes),
                    }
                }
                Err(message) => self.report(key, message, changes),
            }
        }
        if failed.is_empty() {
            self.failures.remove(key);
        } else {
            self.failures.insert(key.clone(), failed);
        }
        match short_ttl {
            Some(message) if self.short_ttls.get(key) != Some(&message) => {
                self.short_ttls.insert(key.clone(), message.clone());
                let uid = self.pods.get(key).map(|p| p.uid.clone()).unwrap_or_default();
                changes.problems.push(PodProblem { namespace: key.0.clone(), pod: key.1.clone(), uid, message, kind: ProblemKind::ShortTtl });
            }
            Some(_) => {}
            None => {
                self.short_ttls.remove(key);
            }
        }
        let old_prefix = self.annotation_prefixes.remove(key);
        if let Some(p) = &annotation_prefix {
            self.annotation_prefixes.insert(key.clone(), p.clone());
        }
        self.move_prefix(old_prefix, annotation_prefix.clone(), changes);
        self.move_annotation_claim(key, annotation_claim, changes);
        // Cleared only after the overlap check: clearing first would report a lasting
        // overlap again on every change of the pod.
        let overlap = annotation_prefix.as_ref().filter(|_| now.contains_key(&Source::Annotations)).and_then(|p| self.overlap(p));
        match overlap {
            Some(msg) => self.report(key, msg, changes),
            None if clear_problem => {
                self.problems.remove(key);
            }
            None => {}
        }

        // Registrations whose counts may change: those that select the pod now or did before.
        let before = self.matched.remove(key).unwrap_or_default();
        for name in before.keys().chain(matched.iter()) {
            changes.registrations.insert((key.0.clone(), name.clone()));
        }
        if !matched.is_empty() {
            self.matched.insert(key.clone(), matched.into_iter().map(|n| (n, ())).collect());
        }

        let (now, served) = dedup(now);
        if served.is_empty() {
            self.served.remove(key);
        } else {
            self.served.insert(key.clone(), served);
        }
        let old = self.emitted.remove(key).unwrap_or_default();
        // A source that lets go of a key (it goes, or now wants another key) while another
        // takes it over: a transfer, not a revoke.
        let lets_go = |s: &Source, o: &Desired| now.get(s).is_none_or(|n| !same_fixed_key(o, n));
        let mut handed: BTreeMap<Source, Source> = BTreeMap::new();
        for (source, d) in &now {
            if old.get(source).is_some_and(|o| same_fixed_key(o, d)) {
                continue;
            }
            let from = old.iter().find(|(s, o)| *s != source && lets_go(s, o) && !handed.contains_key(*s) && same_fixed_key(o, d)).map(|(s, _)| s.clone());
            if let Some(from) = from {
                handed.insert(from, source.clone());
            }
        }
        // Transfers first: a giver that still wants another key registers it afresh after
        // its old key has moved (an upsert first would replace, and so delete, that key).
        for (from, to) in &handed {
            changes.updates.push(Update::Transfer { from: id(key, from), to: id(key, to), desired: now[to].clone() });
        }
        for (source, d) in &now {
            if handed.values().any(|to| to == source) {
                continue;
            }
            if handed.contains_key(source) || old.get(source).is_none_or(|o| o != d) {
                changes.updates.push(Update::Upsert(id(key, source), d.clone()));
            }
        }
        for source in old.keys() {
            if !now.contains_key(source) && !handed.contains_key(source) {
                changes.updates.push(Update::Remove(id(key, source)));
            }
        }
        let fixed: SmallMap<String, Source> =
            now.iter().filter_map(|(s, d)| if let Key::Fixed(k) = &d.key { Some((k.clone(), s.clone())) } else { None }).collect();
        if fixed.is_empty() {
            self.fixed_keys.remove(key);
        } else {
            self.fixed_keys.insert(key.clone(), fixed);
        }
        if !now.is_empty() {
            self.emitted.insert(key.clone(), now.into_iter().collect());
        }
    }

    fn report(&mut self, key: &PodKey, message: String, changes: &mut Changes) {
        if self.problems.get(key) != Some(&message) {
            self.problems.insert(key.clone(), message.clone());
            let uid = self.pods.get(key).map(|p| p.uid.clone()).unwrap_or_default();
            changes.problems.push(PodProblem { namespace: key.0.clone(), pod: key.1.clone(), uid, message, kind: ProblemKind::Invalid });
        }
    }
}

fn id(key: &PodKey, source: &Source) -> InstanceId {
    InstanceId { namespace: key.0.clone(), pod: key.1.clone(), source: source.clone() }
}

/// One owner per key: when several sources of one pod would publish the same key, the
/// first source in order (the pod's annotations, then registrations by name) publishes it
/// and the others are served by it. Keys that end in their lease id never collide.
fn dedup(all: BTreeMap<Source, Arc<Desired>>) -> (BTreeMap<Source, Arc<Desired>>, BTreeMap<Source, Source>) {
    let mut owners: HashMap<String, Source> = HashMap::new();
    let mut kept = BTreeMap::new();
    let mut served = BTreeMap::new();
    for (source, d) in all {
        if let Key::Fixed(k) = &d.key {
            if let Some(owner) = owners.get(k) {
                served.insert(source, owner.clone());
                continue;
            }
            owners.insert(k.clone(), source.clone());
        }
        kept.insert(source, d);
    }
    (kept, served)
}

fn same_fixed_key(a: &Desired, b: &Desired) -> bool {
    matches!((&a.key, &b.key), (Key::Fixed(x), Key::Fixed(y)) if x == y)
}

/// Where a plan's settings come from, to name the offending field in a message.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Origin {
    Annotations,
    Spec,
}

#[derive(Debug, Clone, Copy)]
enum Field {
    Service,
    Prefix,
    Metadata,
    MetadataFromLabels,
    Version,
    Protocol,
    Zone,
    Weight,
    DnsTtl,
}

impl Origin {
    fn name(self, field: Field) -> &'static str {
        match (self, field) {
            (Origin::Annotations, Field::Service) => "annotation podlease.io/service",
            (Origin::Annotations, Field::Prefix) => "annotation podlease.io/prefix",
            (Origin::Annotations, Field::Metadata) => "annotation podlease.io/metadata",
            (Origin::Annotations, Field::Version) => "annotation podlease.io/version",
            (Origin::Annotations, Field::Protocol) => "annotation podlease.io/protocol",
            (Origin::Annotations, Field::Zone) => "annotation podlease.io/zone",
            (Origin::Annotations, Field::Weight) => "annotation podlease.io/weight",
            (Origin::Annotations, Field::DnsTtl) => "annotation podlease.io/dns-ttl",
            (_, Field::MetadataFromLabels) => "spec.metadataFromLabels",
            (Origin::Spec, Field::Service) => "spec.service",
            (Origin::Spec, Field::Prefix) => "spec.prefix",
            (Origin::Spec, Field::Metadata) => "spec.metadata",
            (Origin::Spec, Field::Version) => "spec.options.version",
            (Origin::Spec, Field::Protocol) => "spec.options.protocol",
            (Origin::Spec, Field::Zone) => "spec.options.zone",
            (Origin::Spec, Field::Weight) => "spec.options.weight",
            (Origin::Spec, Field::DnsTtl) => "spec.options.dnsTtl",
        }
    }
}

/// What a registration or an annotated pod asks for, before validation.
struct Request<'a> {
    origin: Origin,
    service: &'a str,
    port: Option<PortRef>,
    format: Format,
    /// None: the default prefix.
    prefix: Option<&'a str>,
    ttl: i64,
    metadata: &'a BTreeMap<String, String>,
    metadata_from_labels: &'a [String],
    publish_not_ready: bool,
    options: &'a FormatOptions,
}

/// Validates a request into a plan: the one path from what a namespace user wrote to the
/// parts of a key or value. Specs and annotations share it, so they share the grammar.
fn plan(req: Request, namespace: &str, defaults: &Defaults) -> Result<Plan, String> {
    let o = req.origin;
    let bad = |field: Field, value: &str, e: String| format!("{} {}: {e}", o.name(field), shown(value));
    let format = req.format;
    let service = ServiceName::parse(req.service, format).map_err(|e| bad(Field::Service, req.service, e))?;
    let prefix = match req.prefix {
        Some(p) => Prefix::parse(p).map_err(|e| bad(Field::Prefix, p, e))?,
        None => match &defaults.prefix {
            Some(p) if o == Origin::Annotations && format == defaults.format => p.clone(),
            _ => Prefix::parse(format.layout().default_prefix()).expect("every format's default prefix is valid"),
        },
    };
    defaults.key_space.permit(format, &prefix).map_err(|e| match req.prefix {
        Some(p) => bad(Field::Prefix, p, e),
        None => format!("the default prefix of format {format}: {e}"),
    })?;
    if !(MIN_TTL_SECONDS..=MAX_TTL_SECONDS).contains(&req.ttl) {
        return Err(format!("ttlSeconds {} is not in {MIN_TTL_SECONDS}..{MAX_TTL_SECONDS}", req.ttl));
    }
    validate::metadata(req.metadata).map_err(|e| format!("{}: {e}", o.name(Field::Metadata)))?;
    validate::label_keys(req.metadata_from_labels).map_err(|e| format!("{}: {e}", o.name(Field::MetadataFromLabels)))?;
    // Empty strings mean the format's default, as if unset.
    let mut options = req.options.clone();
    options.version = options.version.filter(|s| !s.is_empty());
    options.protocol = options.protocol.filter(|s| !s.is_empty());
    options.zone = options.zone.filter(|s| !s.is_empty());
    if let Some(v) = &options.version {
        validate::version(v).map_err(|e| bad(Field::Version, v, e))?;
    }
    if let Some(p) = &options.protocol {
        validate::protocol(p).map_err(|e| bad(Field::Protocol, p, e))?;
    }
    // 0 stays accepted (a registration published with it must not lose its keys on an
    // upgrade), although Kitex's and Hertz's resolvers serve it as their default 10.
    if let Some(w) = options.weight
        && w < 0
    {
        return Err(format!("{} {w}: a weight is not negative", o.name(Field::Weight)));
    }
    if options.dns_ttl == Some(0) {
        return Err(format!("{} 0: a DNS TTL is at least 1 second", o.name(Field::DnsTtl)));
    }
    if options.zone.is_some() || format == Format::Skydns {
        let z = options.zone.as_deref().unwrap_or(format::DEFAULT_ZONE);
        let zone = validate::zone(z, &service, namespace).map_err(|e| bad(Field::Zone, z, e))?;
        options.zone = options.zone.map(|_| zone);
    }
    let read_prefix = format.layout().service_prefix(&prefix, &service, namespace, &options);
    // The keys of this service lie below what its consumers read: check that path now, so
    // a name that reaches into another allowed prefix is refused before there is any pod.
    defaults.key_space.check_key(&prefix, read_prefix.trim_end_matches('/')).map_err(|e| bad(Field::Service, service.as_str(), e))?;
    // Consumers that read without a trailing slash read every key that starts with the
    // prefix: `k` would read `kitex/registry-etcd/…`, another allowed prefix's keys.
    if let Some(other) = defaults.key_space.allowed().iter().find(|a| a.prefix != prefix && a.prefix.as_str().starts_with(read_prefix.as_str())) {
        return Err(bad(
            Field::Service,
            service.as_str(),
            format!("consumers of this service would read {read_prefix:?}, which holds every key of the allowed prefix {}; choose another name", other.prefix),
        ));
    }
    Ok(Plan {
        read_prefix,
        service,
        port: req.port,
        format,
        prefix,
        ttl: req.ttl,
        metadata: req.metadata.clone(),
        metadata_from_labels: req.metadata_from_labels.to_vec(),
        publish_not_ready: req.publish_not_ready,
        options,
    })
}

fn annotation_plan(spec: &AnnotationSpec, namespace: &str, defaults: &Defaults) -> Result<Plan, String> {
    plan(
        Request {
            origin: Origin::Annotations,
            service: &spec.service,
            port: spec.port.clone(),
            format: spec.format.unwrap_or(defaults.format),
            prefix: spec.prefix.as_deref(),
            ttl: spec.ttl.unwrap_or(defaults.ttl),
            metadata: &spec.metadata,
            metadata_from_labels: &[],
            publish_not_ready: false,
            options: &spec.options,
        },
        namespace,
        defaults,
    )
}

/// Why an annotated pod's own `podlease.io/ttl` does not outlive a leader failover (None:
/// it does, there is no failover, or the TTL is `--default-ttl`'s, warned about at start).
/// The keys are published all the same: a risk to point out, not a value to refuse.
fn annotation_short_ttl(spec: &AnnotationSpec, defaults: &Defaults) -> Option<String> {
    let ttl = spec.ttl?;
    let why = crate::leader::short_ttl(ttl, defaults.failover?)?;
    Some(format!("annotation {}=\"{ttl}\": {why}", annotations::TTL))
}

/// Validates a ServiceRegistration into its selector and plan, or says what is wrong.
fn compile(sreg: &ServiceRegistration, defaults: &Defaults) -> Result<(Selector, Plan), String> {
    let spec = &sreg.spec;
    // The name is a segment of ownership records; the API server checks it too.
    validate::object_name(sreg.metadata.name.as_deref().unwrap_or_default(), true).map_err(|e| format!("metadata.name {e}"))?;
    let selector = compile_selector(&spec.selector)?;
    let port = match &spec.port {
        None => None,
        Some(IntOrString::Int(n)) if (1..=65535).contains(n) => Some(PortRef::Number(*n)),
        Some(IntOrString::Int(n)) => return Err(format!("port {n} is not in 1..65535")),
        Some(IntOrString::String(s)) => match PortRef::parse(s) {
            PortRef::Number(n) if !(1..=65535).contains(&n) => return Err(format!("port {n} is not in 1..65535")),
            PortRef::Name(n) => {
                validate::port_name(&n).map_err(|e| format!("spec.port {}: {e}", shown(&n)))?;
                Some(PortRef::Name(n))
            }
            p => Some(p),
        },
    };
    let service = sreg.service_name();
    let namespace = sreg.metadata.namespace.as_deref().unwrap_or_default();
    let plan = plan(
        Request {
            origin: Origin::Spec,
            service: &service,
            port,
            format: spec.format,
            prefix: spec.prefix.as_deref(),
            ttl: spec.ttl_seconds,
            metadata: &spec.metadata,
            metadata_from_labels: &spec.metadata_from_labels,
            publish_not_ready: spec.publish_not_ready,
            options: &spec.options,
        },
        namespace,
        defaults,
    )?;
    Ok((selector, plan))
}

fn compile_selector(sel: &LabelSelector) -> Result<Selector, String> {
    let empty = sel.match_labels.as_ref().is_none_or(|m| m.is_empty())
        && sel.match_expressions.as_ref().is_none_or(|e| e.is_empty());
    if empty {
        return Err("selector is empty, which would publish every pod in the namespace; set matchLabels or matchExpressions".into());
    }
    for (i, req) in sel.match_expressions.iter().flatten().enumerate() {
        let values = req.values.as_ref().map_or(0, |v| v.len());
        let ok = match req.operator.as_str() {
            "In" | "NotIn" => values > 0,
            "Exists" | "DoesNotExist" => values == 0,
            other => {
                return Err(format!(
                    "selector.matchExpressions[{i}]: operator {other:?} is not one of In, NotIn, Exists, DoesNotExist"
                ));
            }
        };
        if !ok {
            return Err(format!(
                "selector.matchExpressions[{i}]: operator {} {} values",
                req.operator,
                if values == 0 { "needs" } else { "takes no" }
            ));
        }
    }
    kube::core::Selector::try_from(sel.clone()).map(Selector::from).map_err(|e| format!("selector: {}", e.0))
}

/// The port number to publish, or why there is none.
fn resolve_port(port: Option<&PortRef>, pod: &PodInfo) -> Result<u16, String> {
    let n = match port {
        Some(PortRef::Number(n)) => *n,
        Some(PortRef::Name(name)) => pod
            .ports
            .iter()
            .find(|(n, _)| n.as_deref() == Some(name.as_str()))
            .map(|(_, p)| *p)
            .ok_or_else(|| format!("port {name:?} is not declared by pod {}", pod.name))?,
        None => pod
            .ports
            .first()
            .map(|(_, p)| *p)
            .ok_or_else(|| format!("pod {} declares no container port; set a port", pod.name))?,
    };
    u16::try_from(n).ok().filter(|p| *p > 0).ok_or_else(|| format!("port {n} of pod {} is out of range", pod.name))
}

fn desire(plan: &Plan, pod: &PodInfo, defaults: &Defaults) -> Result<Desired, String> {
    let space = &defaults.key_space;
    let port = resolve_port(plan.port.as_ref(), pod)?;
    let ip = pod.ip.expect("publishable pods have an IP");
    let mut metadata = plan.metadata.clone();
    for label in &plan.metadata_from_labels {
        if let Some(v) = pod.labels.get(label) {
            metadata.insert(label.clone(), v.clone());
        }
    }
    let inst = Instance {
        service: &plan.service,
        namespace: &pod.namespace,
        pod: &pod.name,
        node: &pod.node,
        ip,
        port,
        metadata: &metadata,
        options: &plan.options,
    };
    let built = format::build(plan.format, &plan.prefix, &inst, space)?;
    Ok(Desired {
        service: plan.service.to_string(),
        format: plan.format,
        key: built.key,
        value: built.value,
        ttl: plan.ttl,
        address: inst.addr(),
        pod_uid: pod.uid.clone(),
        ready_since: pod.ready_since,
        claim: plan.claim(defaults),
    })
}

impl Plan {
    /// The read prefix this plan's service claims; none for a name the cluster admin shares.
    /// Skydns keys hold the namespace, but a registration picks its zone, and a zone can put
    /// a name beneath another namespace's (zone `user.shop.cluster.local` in namespace `evil`
    /// answers for `user.shop.cluster.local`): claimed like every other format.
    fn claim(&self, defaults: &Defaults) -> Option<String> {
        (!defaults.shared.contains(self.service.as_str())).then(|| self.read_prefix.clone())
    }
}

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;
