//! The registry: the only place that writes to etcd. It receives desired-state updates,
//! runs each instance's operation (register, update, replace, revoke) with bounded
//! concurrency and at most one operation per instance at a time, keeps every lease alive
//! through one keepalive driver, and publishes what it holds for the status writer.

mod adopt;
pub mod lease;
pub mod owner;
mod write;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use etcd_client::Client;
use futures::StreamExt;
use k8s_openapi::jiff::Timestamp;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::time::{DelayQueue, delay_queue};
use tracing::{debug, info, warn};

use crate::desired::{Desired, InstanceId, Source, Update};
use crate::metrics::{Metrics, OpLabels, StateLabels};
use lease::{Backoff, Keepalive, Report};
pub use owner::Owners;
pub use write::Held;
use write::{OpError, Outcome, Writer, drifted, establish_fence};

/// How a registry term ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TermEnd {
    /// Shutdown, or leadership lost as the elector saw it.
    Stopped,
    /// etcd refused a write because another replica's fence is in place (or ours lapsed).
    Fenced,
}

/// How the registry is set up.
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    pub owner_prefix: String,
    pub cluster_id: String,
    /// Deadline of every etcd call.
    pub call_timeout: Duration,
    /// Operations in flight at once.
    pub concurrency: usize,
    /// How often an instance blocked by someone else's key is tried again.
    pub conflict_retry: Duration,
    /// How often every held key is checked against etcd (deleted or altered out of band).
    pub verify_interval: Duration,
    /// Fence writes with a leader key (off only for a controller without leader election).
    pub fence: bool,
    /// This replica's identity (written into the fence key).
    pub identity: String,
    /// TTL of the fence key's lease.
    pub fence_ttl: i64,
    /// Revoke every lease when the term ends by shutdown (default: leave them for the next
    /// leader to adopt).
    pub revoke_on_shutdown: bool,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            owner_prefix: "/podlease/owners".into(),
            cluster_id: "default".into(),
            call_timeout: Duration::from_secs(5),
            concurrency: 128,
            conflict_retry: Duration::from_secs(10),
            verify_interval: Duration::from_secs(30),
            fence: true,
            identity: "podlease".into(),
            fence_ttl: 15,
            revoke_on_shutdown: false,
        }
    }
}

/// Messages to the registry.
#[derive(Debug)]
pub enum Command {
    /// The complete desired state once the caches have synced: adopt, then converge.
    Resync(Vec<(InstanceId, Arc<Desired>)>),
    Update(Update),
}

/// What one instance looks like from outside.
#[derive(Debug, Clone, PartialEq)]
pub enum Shown {
    Registered { key: String, lease: i64, since: Timestamp, address: String },
    Conflict { key: String, message: String },
    Pending,
    Failed { message: String },
}

/// What the registry holds, grouped by (namespace, source) and pod, for the status writer.
#[derive(Debug, Default)]
pub struct View {
    pub groups: HashMap<(String, Source), BTreeMap<String, Shown>>,
    /// The last etcd operation failed for a reason other than a conflict.
    pub etcd_unavailable: Option<String>,
    /// Adoption is done and the first desired state is being applied.
    pub synced: bool,
}

impl View {
    /// Instances of one registration, by pod.
    pub fn group(&self, namespace: &str, source: &Source) -> Option<&BTreeMap<String, Shown>> {
        self.groups.get(&(namespace.to_string(), source.clone()))
    }

    fn set(&mut self, id: &InstanceId, shown: Option<Shown>) {
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
    /// A write was refused because someone else holds the key.
    Conflict(InstanceId, String),
    /// etcd became unavailable or available again (every status shows it).
    Etcd,
}

#[derive(Default)]
struct Slot {
    desired: Option<Arc<Desired>>,
    held: Option<Held>,
    conflict: Option<(String, String)>,
    failed: Option<String>,
    busy: bool,
    backoff: Backoff,
    retry: Option<delay_queue::Key>,
}

enum Op {
    Register(Arc<Desired>),
    Update(Arc<Desired>, Held),
    /// Revoke the held lease, then register the new desired state (key, TTL or pod changed).
    Replace(Arc<Desired>, Held),
    Revoke(Held),
}

impl Op {
    fn label(&self) -> &'static str {
        match self {
            Op::Register(_) => "register",
            Op::Update(..) => "update",
            Op::Replace(..) => "replace",
            Op::Revoke(_) => "revoke",
        }
    }
}

pub struct Registry {
    writer: Writer,
    config: RegistryConfig,
    slots: HashMap<InstanceId, Slot>,
    by_lease: HashMap<i64, InstanceId>,
    queue: VecDeque<InstanceId>,
    queued: HashSet<InstanceId>,
    ops: JoinSet<(InstanceId, &'static str, Instant, Result<Outcome, OpError>)>,
    retries: DelayQueue<InstanceId>,
    keepalive: Keepalive,
    reports: mpsc::UnboundedReceiver<Report>,
    view: SharedView,
    notices: mpsc::UnboundedSender<Notice>,
    metrics: Metrics,
    /// Adoption is done (the first Resync is always the term's first command).
    synced: bool,
    /// The fence key's own lease (its loss ends the term).
    fence_lease: Option<i64>,
    term: CancellationToken,
    /// Ready transitions older than this were not seen live: they are not propagation.
    term_started: Timestamp,
    verifying: bool,
    verify_done: Option<tokio::sync::oneshot::Receiver<Result<Vec<InstanceId>, OpError>>>,
}

impl Registry {
    /// A registry for one leadership term. `view` is reset and then kept current; the
    /// keepalive driver lives as long as `term`.
    pub fn new(
        client: Client,
        config: RegistryConfig,
        notices: mpsc::UnboundedSender<Notice>,
        metrics: Metrics,
        view: SharedView,
        term: CancellationToken,
    ) -> Registry {
        let (reports_tx, reports) = mpsc::unbounded_channel();
        let keepalive = Keepalive::spawn(client.clone(), reports_tx, metrics.clone(), term.clone());
        *view.write().unwrap() = View::default();
        metrics.instances.clear();
        let writer = Writer {
            client,
            owners: Owners::new(&config.owner_prefix, &config.cluster_id),
            timeout: config.call_timeout,
            fence: None,
        };
        let registry = Registry {
            writer,
            config,
            slots: HashMap::new(),
            by_lease: HashMap::new(),
            queue: VecDeque::new(),
            queued: HashSet::new(),
            ops: JoinSet::new(),
            retries: DelayQueue::new(),
            keepalive,
            reports,
            view: view.clone(),
            notices,
            metrics,
            synced: false,
            fence_lease: None,
            term,
            term_started: Timestamp::now(),
            verifying: false,
            verify_done: None,
        };
        registry
    }

    /// The fence key: beside this cluster's ownership records, not among them.
    fn fence_key(&self) -> String {
        format!("{}/{}", self.config.owner_prefix.trim_end_matches('/'), self.config.cluster_id)
    }

    /// Runs until `shutdown`. Leases are NOT revoked on the way out: the next leader adopts
    /// them, so a rollout deregisters nothing.
    pub async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>, shutdown: CancellationToken) -> TermEnd {
        if self.config.fence && !self.fence(&shutdown).await {
            return TermEnd::Stopped;
        }
        let mut verify = tokio::time::interval(self.config.verify_interval);
        verify.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        verify.tick().await;
        let end = loop {
            self.dispatch();
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break TermEnd::Stopped,
                Some(report) = self.reports.recv() => match report {
                    Report::Lost(lease) if Some(lease) == self.fence_lease => {
                        warn!("the fence lease lapsed; ending this term");
                        break TermEnd::Fenced;
                    }
                    Report::Lost(lease) => self.on_lease_lost(lease),
                    Report::Down(why) => self.etcd_failed(why),
                    Report::Up => self.etcd_ok(),
                },
                Some(done) = self.ops.join_next(), if !self.ops.is_empty() => match done {
                    Ok((_, _, _, Err(OpError::Fenced))) => {
                        self.metrics.fenced_writes.inc();
                        warn!("etcd refused a write: another replica leads now; ending this term");
                        break TermEnd::Fenced;
                    }
                    Ok((id, op, started, result)) => self.on_done(id, op, started, result),
                    Err(e) => warn!(error = %e, "registry operation panicked"),
                },
                _ = verify.tick(), if self.synced && !self.verifying => self.start_verify(),
                Ok(result) = async { self.verify_done.as_mut().unwrap().await }, if self.verify_done.is_some() => {
                    self.verify_done = None;
                    self.verifying = false;
                    self.on_verified(result);
                }
                cmd = commands.recv() => match cmd {
                    None => break TermEnd::Stopped,
                    Some(Command::Resync(all)) => self.resync(all).await,
                    Some(Command::Update(u)) => self.apply(u),
                },
                Some(expired) = self.retries.next(), if !self.retries.is_empty() => {
                    let id = expired.into_inner();
                    if let Some(slot) = self.slots.get_mut(&id) {
                        slot.retry = None;
                    }
                    self.enqueue(id);
                }
            }
        };
        if end == TermEnd::Stopped && self.config.revoke_on_shutdown {
            // Let in-flight writes finish (each has a deadline) so their leases are revoked too.
            while let Some(done) = self.ops.join_next().await {
                if let Ok((id, op, started, result)) = done {
                    self.on_done(id, op, started, result);
                }
            }
            self.revoke_all().await;
        }
        self.ops.abort_all();
        self.view.write().unwrap().synced = false;
        self.metrics.etcd_available.set(0);
        end
    }

    /// Takes the fence for this term: until it is written, nothing else is.
    async fn fence(&mut self, shutdown: &CancellationToken) -> bool {
        let key = self.fence_key();
        let mut backoff = Backoff::default();
        loop {
            match establish_fence(&self.writer, &key, &self.config.identity, self.config.fence_ttl).await {
                Ok((fence, lease)) => {
                    info!(key, revision = fence.revision, "fence taken");
                    self.keepalive.track(lease, self.config.fence_ttl.max(write::MIN_FENCE_TTL));
                    self.fence_lease = Some(lease);
                    self.writer.fence = Some(fence);
                    self.etcd_ok();
                    return true;
                }
                Err(e) => {
                    self.etcd_failed(e.to_string());
                    let d = backoff.next();
                    warn!(error = %e, retry_in = ?d, "writing the fence key failed");
                    tokio::select! {
                        _ = shutdown.cancelled() => return false,
                        _ = tokio::time::sleep(d) => {}
                    }
                }
            }
        }
    }

    /// Checks every held key against etcd in the background.
    fn start_verify(&mut self) {
        let held: Vec<(InstanceId, Held)> = self
            .slots
            .iter()
            .filter(|(_, s)| !s.busy && s.desired.is_some())
            .filter_map(|(id, s)| s.held.clone().map(|h| (id.clone(), h)))
            .collect();
        if held.is_empty() {
            return;
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let writer = self.writer.clone();
        tokio::spawn(async move {
            let _ = tx.send(drifted(&writer, held).await);
        });
        self.verifying = true;
        self.verify_done = Some(rx);
    }

    /// Instances whose key was deleted or altered out of band are written again (or found
    /// in conflict if someone else's key now stands there).
    fn on_verified(&mut self, result: Result<Vec<InstanceId>, OpError>) {
        match result {
            Ok(ids) => {
                for id in ids {
                    if let Some(slot) = self.slots.get_mut(&id)
                        && let Some(h) = slot.held.as_mut()
                    {
                        warn!(namespace = id.namespace, pod = id.pod, key = h.key, "key changed out of band; repairing");
                        self.metrics.drift_repairs.inc();
                        h.value_hash.clear(); // forces an update, which recreates or reports
                        self.enqueue(id);
                    }
                }
            }
            Err(e) => debug!(error = %e, "verifying keys failed"),
        }
    }

    /// Revokes every held lease (shutdown with --revoke-on-shutdown).
    async fn revoke_all(&mut self) {
        let held: Vec<(InstanceId, Held)> =
            self.slots.iter().filter_map(|(id, s)| s.held.clone().map(|h| (id.clone(), h))).collect();
        info!(leases = held.len(), "revoking every lease before exit");
        let writer = self.writer.clone();
        futures::stream::iter(held)
            .for_each_concurrent(self.config.concurrency, |(id, h)| {
                let writer = writer.clone();
                async move {
                    if let Err(e) = writer.revoke(&id, &h).await {
                        warn!(error = %e, key = h.key, "revoking on shutdown failed; the key expires with its TTL");
                    }
                }
            })
            .await;
        if let Some(l) = self.fence_lease {
            let _ = writer.revoke_lease(l).await;
        }
    }

    /// Adopts what the ownership records say we hold, then converges on `all`.
    async fn resync(&mut self, all: Vec<(InstanceId, Arc<Desired>)>) {
        if !self.synced {
            let mut backoff = Backoff::default();
            let records = loop {
                match adopt::read_records(&self.writer).await {
                    Ok(r) => break r,
                    Err(e) => {
                        self.etcd_failed(e.to_string());
                        let d = backoff.next();
                        warn!(error = %e, retry_in = ?d, "reading ownership records failed");
                        tokio::select! {
                            _ = self.term.cancelled() => return,
                            _ = tokio::time::sleep(d) => {}
                        }
                    }
                }
            };
            info!(records = records.len(), desired = all.len(), "adopting existing registrations");
            for (id, held) in records {
                self.by_lease.insert(held.lease, id.clone());
                self.keepalive.track(held.lease, held.ttl);
                let slot = self.slots.entry(id.clone()).or_default();
                slot.held = Some(held);
                self.enqueue(id);
            }
        }
        let wanted: HashSet<&InstanceId> = all.iter().map(|(id, _)| id).collect();
        let stale: Vec<InstanceId> = self.slots.keys().filter(|id| !wanted.contains(id)).cloned().collect();
        for id in stale {
            self.apply(Update::Remove(id));
        }
        for (id, d) in all {
            self.apply(Update::Upsert(id, d));
        }
        self.synced = true;
        self.view.write().unwrap().synced = true;
    }

    fn apply(&mut self, update: Update) {
        let id = match update {
            Update::Upsert(id, d) => {
                let slot = self.slots.entry(id.clone()).or_default();
                slot.desired = Some(d);
                // A new desire deserves a prompt try even after a conflict or failure.
                if let Some(k) = slot.retry.take() {
                    self.retries.remove(&k);
                }
                slot.backoff.reset();
                id
            }
            Update::Remove(id) => {
                let Some(slot) = self.slots.get_mut(&id) else { return };
                slot.desired = None;
                if let Some(k) = slot.retry.take() {
                    self.retries.remove(&k);
                }
                id
            }
        };
        self.enqueue(id);
    }

    fn enqueue(&mut self, id: InstanceId) {
        if self.queued.insert(id.clone()) {
            self.queue.push_back(id);
        }
    }

    /// Starts operations for queued instances while there is room.
    fn dispatch(&mut self) {
        while self.ops.len() < self.config.concurrency {
            let Some(id) = self.queue.pop_front() else { return };
            self.queued.remove(&id);
            let Some(slot) = self.slots.get_mut(&id) else { continue };
            if slot.busy || slot.retry.is_some() {
                continue; // re-enqueued when the op finishes or the retry fires
            }
            let op = match (&slot.desired, &slot.held) {
                (None, None) => {
                    self.slots.remove(&id);
                    self.show(&id, None);
                    continue;
                }
                (None, Some(h)) => Op::Revoke(h.clone()),
                (Some(d), None) => Op::Register(d.clone()),
                (Some(d), Some(h)) => {
                    let same_place = d.key.matches(&h.key) && d.ttl == h.ttl && d.pod_uid == h.pod_uid;
                    if !same_place {
                        Op::Replace(d.clone(), h.clone())
                    } else if owner::value_hash(&d.value) != h.value_hash {
                        Op::Update(d.clone(), h.clone())
                    } else {
                        // Already as desired (adopted, or a retry that found nothing to do).
                        let shown = Shown::Registered { key: h.key.clone(), lease: h.lease, since: h.since, address: d.address.clone() };
                        self.show(&id, Some(shown));
                        continue;
                    }
                }
            };
            slot.busy = true;
            if matches!(op, Op::Register(_)) && slot.conflict.is_none() {
                self.show(&id, Some(Shown::Pending));
            }
            let writer = self.writer.clone();
            let label = op.label();
            let task_id = id.clone();
            self.ops.spawn(async move {
                let started = Instant::now();
                let result = match op {
                    Op::Register(d) => writer.register(&task_id, &d).await,
                    Op::Update(d, h) => writer.update(&task_id, &d, &h).await,
                    Op::Replace(d, h) => match writer.revoke(&task_id, &h).await {
                        Ok(_) => writer.register(&task_id, &d).await,
                        Err(e) => Err(e),
                    },
                    Op::Revoke(h) => writer.revoke(&task_id, &h).await,
                };
                (task_id, label, started, result)
            });
        }
    }

    fn on_done(&mut self, id: InstanceId, op: &'static str, started: Instant, result: Result<Outcome, OpError>) {
        self.metrics.etcd_op_duration.get_or_create(&OpLabels { op: op.into() }).observe(started.elapsed().as_secs_f64());
        let Some(slot) = self.slots.get_mut(&id) else { return };
        slot.busy = false;
        // Whatever lease the slot held before is replaced or gone unless the op says otherwise.
        let old = slot.held.as_ref().map(|h| h.lease);
        match result {
            Ok(Outcome::Registered(held)) => {
                if old != Some(held.lease) {
                    if let Some(l) = old {
                        self.by_lease.remove(&l);
                        self.keepalive.untrack(l);
                    }
                    self.by_lease.insert(held.lease, id.clone());
                    self.keepalive.track(held.lease, held.ttl);
                    // metav1.Time has whole seconds: the figure is good to a second. A
                    // clock ahead of ours on the pod's node would make it negative: 0.
                    if op == "register"
                        && let Some(since) = slot.desired.as_ref().and_then(|d| d.ready_since)
                        && since.as_second() >= self.term_started.as_second()
                    {
                        let lag = Timestamp::now().duration_since(since).as_secs_f64();
                        self.metrics.propagation.observe(lag.max(0.0));
                    }
                }
                slot.failed = None;
                slot.conflict = None;
                slot.backoff.reset();
                let address = slot.desired.as_ref().map(|d| d.address.clone()).unwrap_or_default();
                let shown = Shown::Registered { key: held.key.clone(), lease: held.lease, since: held.since, address };
                slot.held = Some(held);
                self.etcd_ok();
                self.show(&id, Some(shown));
            }
            Ok(Outcome::Revoked) => {
                if let Some(l) = old {
                    self.by_lease.remove(&l);
                    self.keepalive.untrack(l);
                }
                slot.held = None;
                slot.failed = None;
                self.etcd_ok();
                self.show(&id, None);
            }
            Ok(Outcome::LeaseGone) => {
                if let Some(l) = old {
                    self.by_lease.remove(&l);
                    self.keepalive.untrack(l);
                }
                slot.held = None;
            }
            Ok(Outcome::Conflict { key, message }) => {
                if let Some(l) = old {
                    self.by_lease.remove(&l);
                    self.keepalive.untrack(l);
                }
                slot.held = None;
                self.metrics.conflicts.inc();
                let first = slot.conflict.as_ref().map(|(_, m)| m) != Some(&message);
                slot.conflict = Some((key.clone(), message.clone()));
                slot.retry = Some(self.retries.insert(id.clone(), self.config.conflict_retry));
                self.etcd_ok();
                self.show(&id, Some(Shown::Conflict { key, message: message.clone() }));
                if first {
                    warn!(namespace = id.namespace, pod = id.pod, registration = id.source.segment(), "{message}");
                    let _ = self.notices.send(Notice::Conflict(id.clone(), message));
                }
            }
            Err(e) => {
                self.metrics.etcd_error(e.op());
                let delay = slot.backoff.next();
                debug!(namespace = id.namespace, pod = id.pod, error = %e, retry_in = ?delay, "etcd operation failed");
                slot.failed = Some(e.to_string());
                slot.retry = Some(self.retries.insert(id.clone(), delay));
                let keep = slot.held.is_some();
                self.etcd_failed(e.to_string());
                if !keep {
                    self.show(&id, Some(Shown::Failed { message: e.to_string() }));
                }
            }
        }
        self.enqueue(id);
    }

    fn on_lease_lost(&mut self, lease: i64) {
        let Some(id) = self.by_lease.remove(&lease) else { return };
        if let Some(slot) = self.slots.get_mut(&id)
            && slot.held.as_ref().map(|h| h.lease) == Some(lease)
        {
            slot.held = None;
            if slot.desired.is_some() {
                self.metrics.leases_regranted.inc();
            }
            self.show(&id, Some(Shown::Pending));
            self.enqueue(id);
        }
    }

    fn show(&mut self, id: &InstanceId, shown: Option<Shown>) {
        let changed = {
            let mut view = self.view.write().unwrap();
            let before = view.group(&id.namespace, &id.source).and_then(|g| g.get(&id.pod)).cloned();
            let changed = before != shown;
            if changed {
                if let Some(b) = &before {
                    self.metrics.instances.get_or_create(&StateLabels { state: state_name(b).into() }).dec();
                }
                if let Some(s) = &shown {
                    self.metrics.instances.get_or_create(&StateLabels { state: state_name(s).into() }).inc();
                }
                view.set(id, shown);
            }
            changed
        };
        if changed {
            let _ = self.notices.send(Notice::Changed(id.clone()));
        }
    }

    fn etcd_ok(&mut self) {
        let was_down = self.view.write().unwrap().etcd_unavailable.take().is_some();
        self.metrics.etcd_available.set(1);
        if was_down {
            info!("etcd is reachable again");
            let _ = self.notices.send(Notice::Etcd);
        }
    }

    fn etcd_failed(&mut self, why: String) {
        let was_up = self.view.write().unwrap().etcd_unavailable.replace(why.clone()).is_none();
        self.metrics.etcd_available.set(0);
        if was_up {
            warn!(error = why, "etcd unavailable");
            let _ = self.notices.send(Notice::Etcd);
        }
    }
}

fn state_name(s: &Shown) -> &'static str {
    match s {
        Shown::Registered { .. } => "registered",
        Shown::Conflict { .. } => "conflict",
        Shown::Pending => "pending",
        Shown::Failed { .. } => "failed",
    }
}
