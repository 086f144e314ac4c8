//! The registry: the only place that writes to etcd. It receives desired-state updates,
//! runs each instance's operation (register, update, replace, revoke) with bounded
//! concurrency and at most one operation per instance at a time, keeps every lease alive
//! through one keepalive driver, and publishes what it holds for the status writer.
//!
//! A term starts when this replica becomes leader: it takes the fence, adopts, converges.
//! When leadership is lost the term does not end: it stops writing and keeps every lease
//! alive ("caretaker") until a newer fence shows that another replica has taken over, so an
//! API server outage of any length deregisters nothing. A standby starts a caretaker term
//! of its own when no fence exists at all (the leader died while nobody could take the
//! Lease): renewing a lease changes no key, so it is safe from any replica. The decisions
//! live in `plan`.

mod adopt;
pub mod claim;
pub mod fence;
pub mod identity;
pub mod lease;
mod outbox;
pub mod owner;
pub mod plan;
pub mod pool;
pub mod view;
mod write;

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::etcd::Connection;
use futures::StreamExt;
use k8s_openapi::jiff::Timestamp;
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;
use tokio_util::time::{DelayQueue, delay_queue};
use tracing::{debug, info, warn};

use crate::desired::{Desired, Hold, InstanceId, Update};
use crate::metrics::{Metrics, OpLabels, StateLabels};
pub use adopt::Records;
use lease::{Backoff, Keepalive, Report};
pub use claim::Claims;
pub use owner::Owners;
use plan::{Effect, Next, Op, Renew, Slot};
pub use view::{Notice, SharedView, Shown, View};
pub use write::{Held, OpError};
use write::{Outcome, Writer, drifted};

/// How a registry term ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TermEnd {
    /// Shutdown, or told to finish.
    Stopped,
    /// Another replica's fence is in place (or ours lapsed): a fresh look at the leader
    /// Lease must come first.
    Fenced,
}

/// How the registry is set up.
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    pub owner_prefix: String,
    pub cluster_id: String,
    /// This install's identity within the cluster (default `<namespace>.<leader Lease
    /// name>`): several installs share a cluster and an etcd without touching each other.
    pub install_id: String,
    /// Namespaces this install watches (empty: all): it adopts and revokes records of
    /// these only.
    pub namespaces: Vec<String>,
    /// An earlier identity whose records a new leader takes over before adopting.
    pub migrate_from: Option<String>,
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
    /// TTL of the fence key's lease: when a leader dies its fence is gone this soon, and a
    /// standby starts keeping the leases alive.
    pub fence_ttl: i64,
    /// Revoke every lease when the process shuts down and no other replica takes over
    /// (default: leave them for the next leader to adopt).
    pub revoke_on_shutdown: bool,
    /// Whether the keepalive driver makes connections of its own (with the credentials in
    /// use), so keepalives never queue behind other calls and a stalled stream can move to a
    /// fresh connection; otherwise it shares the registry's.
    pub keepalive_own_connection: bool,
    /// Leases granted ahead per TTL in use (0: off), and the TTLs to pool from the start.
    pub lease_pool_size: usize,
    pub pooled_ttls: Vec<i64>,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            owner_prefix: "/podlease/owners".into(),
            cluster_id: "default".into(),
            install_id: DEFAULT_INSTALL_ID.into(),
            namespaces: Vec::new(),
            migrate_from: None,
            call_timeout: Duration::from_secs(5),
            concurrency: 128,
            conflict_retry: Duration::from_secs(10),
            verify_interval: Duration::from_secs(30),
            fence: true,
            identity: "podlease".into(),
            fence_ttl: fence::FENCE_TTL,
            revoke_on_shutdown: false,
            keepalive_own_connection: false,
            lease_pool_size: 0,
            pooled_ttls: Vec::new(),
        }
    }
}

/// The install id of a controller run outside the chart, with defaults: `<namespace of the
/// leader Lease>.<its name>`.
pub const DEFAULT_INSTALL_ID: &str = "default.podlease";

impl RegistryConfig {
    /// The fence key: beside this install's ownership records, not among them.
    pub fn fence_key(&self) -> String {
        self.owners().identity().to_string()
    }

    pub fn owners(&self) -> Owners {
        Owners::new(&self.owner_prefix, &self.cluster_id, &self.install_id)
    }

    pub fn claims(&self) -> Claims {
        Claims::new(&self.owner_prefix, &self.cluster_id, &self.install_id)
    }

    /// Whether this install looks after `namespace`.
    pub fn watches(&self, namespace: &str) -> bool {
        self.namespaces.is_empty() || self.namespaces.iter().any(|n| n == namespace)
    }
}

/// Messages to the registry.
#[derive(Debug)]
pub enum Command {
    /// The complete desired state: adopt (once per term), then converge.
    Resync(Vec<(InstanceId, Arc<Desired>)>),
    Update(Update),
    /// Every service claim to hold now (see [`claim`]).
    Holds(BTreeSet<Hold>),
    /// Leadership is lost: write nothing more, keep every lease alive until a newer fence
    /// appears (or the term is told to finish).
    StepDown,
    /// End the term; with `revoke`, revoke every lease first (process shutdown with
    /// --revoke-on-shutdown and nobody to take over).
    Finish {
        revoke: bool,
    },
}

/// An instance's slot plus the actor's own bookkeeping for it.
#[derive(Default)]
struct Entry {
    slot: Slot,
    retry: Option<delay_queue::Key>,
}

type OpResult = (InstanceId, &'static str, Instant, Result<Outcome, OpError>);

/// A queue this long (a sync, an adoption) is followed by a heap trim once it has drained.
const BACKLOG_TRIM: usize = 1024;

/// Claims jobs in flight at once (new claims take turns through the epoch key, so more
/// would mostly wait on each other).
const HOLD_CONCURRENCY: usize = 4;
/// Commands applied at most before each dispatch, so that op results are not starved.
const DRAIN_MAX: usize = 1024;

pub struct Registry {
    writer: Writer,
    config: RegistryConfig,
    /// The leadership epoch this term writes under (the fence value); None for a caretaker
    /// started without leadership.
    epoch: Option<i64>,
    slots: HashMap<InstanceId, Entry>,
    by_lease: HashMap<i64, InstanceId>,
    queue: VecDeque<InstanceId>,
    queued: HashSet<InstanceId>,
    ops: JoinSet<OpResult>,
    retries: DelayQueue<InstanceId>,
    keepalive: Keepalive,
    reports: mpsc::UnboundedReceiver<Report>,
    view: SharedView,
    notices: mpsc::UnboundedSender<Notice>,
    metrics: Metrics,
    /// Adoption is done (the first Resync is always the term's first command).
    synced: bool,
    /// This replica leads: operations may run. False once stepped down (caretaker).
    leading: bool,
    /// The fence key's own lease.
    fence_lease: Option<i64>,
    /// The longest the queue has been since the heap was last trimmed
    /// ([`crate::memory::give_back`]).
    backlog_peak: usize,
    term: CancellationToken,
    /// Ready transitions older than this were not seen live: they are not propagation.
    term_started: Timestamp,
    verify: Option<JoinHandle<Result<Vec<InstanceId>, OpError>>>,
    fence_check: Option<JoinHandle<Result<Option<i64>, OpError>>>,
    /// Service claims: which holds are wanted and what etcd answered.
    keeper: claim::Keeper,
    hold_jobs: JoinSet<Result<claim::Done, OpError>>,
    /// Instances waiting for their service's hold to be answered.
    parked: HashMap<Hold, HashSet<InstanceId>>,
    /// Hand-overs waiting for the giver's operation (often its own take-over) to finish:
    /// giver → (heir, the heir's desire).
    heirs: HashMap<InstanceId, (InstanceId, Arc<Desired>)>,
}

/// What earlier terms hold: the ownership records, and the claims leases the claim pointers
/// name (adoption takes them over; a term waiting for its fence keeps them alive).
async fn read_held(w: &Writer) -> Result<(Vec<(InstanceId, write::Held)>, Vec<i64>), OpError> {
    let records = adopt::read_records(w).await?;
    let claims = claim::read_pointers(w, &w.owners).await?;
    Ok((records, claims))
}

impl Registry {
    /// A registry for one leadership term (`epoch`), or a caretaker that only keeps the
    /// recorded leases alive (`None`). `view` is reset and then kept current; the keepalive
    /// driver lives as long as `term`.
    pub fn new(
        client: Connection,
        config: RegistryConfig,
        epoch: Option<i64>,
        notices: mpsc::UnboundedSender<Notice>,
        metrics: Metrics,
        view: SharedView,
        term: CancellationToken,
    ) -> Registry {
        let (reports_tx, reports) = mpsc::unbounded_channel();
        let keepalive = Keepalive::spawn(client.clone(), config.keepalive_own_connection, reports_tx, metrics.clone(), term.clone());
        *view.write().unwrap() = View::default();
        metrics.clear_instances();
        // Only a leading term registers anything: a caretaker needs no pool.
        let pool = pool::Pool::new(if epoch.is_some() { config.lease_pool_size } else { 0 }, keepalive.clone(), metrics.clone());
        for ttl in &config.pooled_ttls {
            pool.prewarm(*ttl);
        }
        pool.spawn_refill(client.clone(), config.call_timeout, term.clone());
        let writer = Writer { client, owners: config.owners(), claims: config.claims(), timeout: config.call_timeout, fence: None, pool };
        Registry {
            writer,
            config,
            epoch,
            slots: HashMap::new(),
            by_lease: HashMap::new(),
            queue: VecDeque::new(),
            queued: HashSet::new(),
            ops: JoinSet::new(),
            retries: DelayQueue::new(),
            keepalive,
            reports,
            view,
            notices,
            metrics,
            synced: false,
            leading: epoch.is_some(),
            fence_lease: None,
            backlog_peak: 0,
            term,
            term_started: Timestamp::now(),
            verify: None,
            fence_check: None,
            keeper: claim::Keeper::default(),
            hold_jobs: JoinSet::new(),
            parked: HashMap::new(),
            heirs: HashMap::new(),
        }
    }

    /// Runs until the term ends. Leases are revoked only on `Finish { revoke: true }`;
    /// otherwise the next leader adopts them, so a rollout deregisters nothing.
    pub async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) -> TermEnd {
        let term = self.term.clone();
        let end = self.serve(&mut commands, &term).await;
        self.ops.abort_all();
        self.hold_jobs.abort_all();
        for task in [self.verify.take().map(|t| t.abort_handle()), self.fence_check.take().map(|t| t.abort_handle())].into_iter().flatten() {
            task.abort();
        }
        self.view.write().unwrap().synced = false;
        self.metrics.etcd_available.set(0);
        self.term.cancel(); // stops the keepalive driver
        // What this term held is the next term's to report (none, on a standby).
        self.metrics.clear_instances();
        self.metrics.leases_held.set(0);
        end
    }

    async fn serve(&mut self, commands: &mut mpsc::UnboundedReceiver<Command>, term: &CancellationToken) -> TermEnd {
        if !self.leading {
            info!("no leader holds the fence: keeping every recorded lease alive until one does");
        } else if self.config.fence {
            // Until the fence is ours nothing is written; commands wait in the channel.
            match self.take_fence(commands, term).await {
                Ok(()) => {}
                Err(end) => return end,
            }
        }
        let mut verify = tokio::time::interval(self.config.verify_interval);
        verify.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        verify.tick().await;
        let mut fence_tick = tokio::time::interval(fence::CHECK_INTERVAL);
        fence_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        fence_tick.tick().await;
        let mut hold_tick = tokio::time::interval(self.config.conflict_retry);
        hold_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        hold_tick.tick().await;
        loop {
            // What is known already is applied before any write starts: finished writes'
            // results first (as before, they come before commands), then what the controller
            // has sent. A write must not start from a state a queued update replaces (a pod
            // that turned not ready and back would get a PUT, then a DELETE, then a PUT).
            while let Some(done) = self.ops.try_join_next() {
                if let Some(end) = self.on_joined(done) {
                    return end;
                }
            }
            for _ in 0..DRAIN_MAX {
                if term.is_cancelled() {
                    return TermEnd::Stopped;
                }
                let Ok(cmd) = commands.try_recv() else { break };
                if let Some(end) = self.on_command(Some(cmd)).await {
                    return end;
                }
            }
            if term.is_cancelled() {
                return TermEnd::Stopped;
            }
            if self.leading {
                self.dispatch_holds();
                self.dispatch();
            }
            tokio::select! {
                biased;
                _ = term.cancelled() => return TermEnd::Stopped,
                Some(report) = self.reports.recv() => match report {
                    Report::Lost(lease) if Some(lease) == self.fence_lease => {
                        if self.leading {
                            warn!("the fence lease lapsed; ending this term");
                            return TermEnd::Fenced;
                        }
                        // A caretaker keeps the leases alive until a newer fence exists.
                        self.fence_lease = None;
                    }
                    Report::Lost(lease) if self.keeper.lease_lost(lease) => {
                        warn!(lease = format!("{lease:x}"), "the claims lease lapsed; claiming every service again");
                    }
                    Report::Lost(lease) => self.on_lease_lost(lease),
                    Report::Down(why) => self.etcd_failed(why),
                    Report::Up => self.etcd_ok(),
                },
                Some(done) = self.ops.join_next(), if !self.ops.is_empty() => {
                    if let Some(end) = self.on_joined(done) {
                        return end;
                    }
                }
                Some(done) = self.hold_jobs.join_next(), if !self.hold_jobs.is_empty() => match done {
                    Ok(Ok(done)) => self.on_hold_done(done),
                    Ok(Err(_)) => {
                        self.metrics.fenced_writes.inc();
                        warn!("etcd refused a claim: another replica leads now; ending this term");
                        return TermEnd::Fenced;
                    }
                    Err(e) => warn!(error = %e, "claims job panicked"),
                },
                _ = hold_tick.tick() => self.keeper.retry(),
                _ = verify.tick(), if self.leading && self.synced && self.verify.is_none() => self.start_verify(),
                done = join(&mut self.verify) => {
                    self.verify = None;
                    match done {
                        Ok(result) => self.on_verified(result),
                        Err(e) => {
                            // Never leaves verification stuck: the next tick starts afresh.
                            self.metrics.etcd_error("verify");
                            warn!(error = %e, "verifying keys failed unexpectedly; retrying at the next interval");
                        }
                    }
                }
                _ = fence_tick.tick(), if self.config.fence && self.fence_check.is_none() => {
                    let (writer, key) = (self.writer.clone(), self.config.fence_key());
                    self.fence_check = Some(tokio::spawn(async move { fence::read(&writer, &key).await }));
                }
                done = join(&mut self.fence_check) => {
                    self.fence_check = None;
                    match done {
                        Ok(Ok(now)) => {
                            if let Some(end) = self.on_fence_read(now) {
                                return end;
                            }
                        }
                        Ok(Err(_)) => self.metrics.etcd_error("fence"),
                        Err(_) => {}
                    }
                }
                cmd = commands.recv() => {
                    if let Some(end) = self.on_command(cmd).await {
                        return end;
                    }
                }
                Some(expired) = self.retries.next(), if !self.retries.is_empty() => {
                    let id = expired.into_inner();
                    if let Some(e) = self.slots.get_mut(&id) {
                        e.retry = None;
                    }
                    self.enqueue(id);
                }
            }
        }
    }

    /// A finished write's result; Some when etcd's fence refused it (the term ends).
    fn on_joined(&mut self, done: Result<OpResult, tokio::task::JoinError>) -> Option<TermEnd> {
        match done {
            Ok((id, op, started, result)) => {
                if self.on_done(id, op, started, result) {
                    self.metrics.fenced_writes.inc();
                    warn!("etcd refused a write: another replica leads now; ending this term");
                    return Some(TermEnd::Fenced);
                }
            }
            Err(e) => warn!(error = %e, "registry operation panicked"),
        }
        None
    }

    /// Applies one command from the controller (None: the channel is closed); Some when the
    /// term ends.
    async fn on_command(&mut self, cmd: Option<Command>) -> Option<TermEnd> {
        match cmd {
            None => return Some(TermEnd::Stopped),
            Some(Command::Resync(all)) => self.resync(all).await,
            Some(Command::Update(u)) => self.apply(u),
            Some(Command::Holds(h)) => self.want_holds(h),
            Some(Command::StepDown) => self.step_down(),
            Some(Command::Finish { revoke }) => {
                if revoke {
                    self.revoke_all().await;
                }
                return Some(TermEnd::Stopped);
            }
        }
        None
    }

    /// What the periodic read of the fence key means for this term.
    fn on_fence_read(&mut self, now: Option<i64>) -> Option<TermEnd> {
        let ours = self.writer.fence.as_ref().map(|f| f.revision);
        match now {
            Some(rev) if Some(rev) != ours => {
                info!(revision = rev, "a newer fence is in place: another replica has taken over; ending this term");
                Some(TermEnd::Fenced)
            }
            None if self.leading => {
                warn!("the fence key is gone; ending this term");
                Some(TermEnd::Fenced)
            }
            _ => None,
        }
    }

    /// Takes the fence for this term: until it is written, nothing else is.
    async fn take_fence(&mut self, commands: &mut mpsc::UnboundedReceiver<Command>, term: &CancellationToken) -> Result<(), TermEnd> {
        let key = self.config.fence_key();
        let mut backoff = Backoff::default();
        let mut waiting = Vec::new();
        let epoch = self.epoch.unwrap_or(0);
        let mut caretaking = false;
        let result = loop {
            let (client, timeout) = (&self.writer.client, self.config.call_timeout);
            match fence::take(client, timeout, &key, &self.config.identity, epoch, self.config.fence_ttl).await {
                Ok((fence, lease)) => {
                    info!(key, revision = fence.revision, epoch, "fence taken");
                    self.keepalive.track(lease, self.config.fence_ttl.max(fence::MIN_FENCE_TTL), Renew::Granted);
                    self.fence_lease = Some(lease);
                    self.writer.fence = Some(fence);
                    self.etcd_ok();
                    break Ok(());
                }
                Err(OpError::Fenced) => {
                    warn!(key, epoch, "a newer leader holds the fence; not taking it");
                    break Err(TermEnd::Fenced);
                }
                Err(e) => {
                    self.metrics.etcd_error("fence");
                    self.etcd_failed(e.to_string());
                    let d = backoff.next();
                    warn!(error = %e, retry_in = ?d, "writing the fence key failed");
                    // etcd may refuse writes while it still renews and reads (a NOSPACE
                    // alarm): until the fence is ours, keep what the records hold alive, as
                    // a caretaker does. Renewing changes no key; adoption tracks them again.
                    if !caretaking {
                        caretaking = self.keep_recorded_leases_alive().await;
                    }
                    let sleep = tokio::time::sleep(d);
                    tokio::pin!(sleep);
                    loop {
                        tokio::select! {
                            _ = term.cancelled() => return Err(TermEnd::Stopped),
                            _ = &mut sleep => break,
                            cmd = commands.recv() => match cmd {
                                None | Some(Command::StepDown) | Some(Command::Finish { .. }) => return Err(TermEnd::Stopped),
                                Some(c) => waiting.push(c),
                            },
                        }
                    }
                }
            }
        };
        if result.is_ok() {
            for c in waiting {
                match c {
                    Command::Resync(all) => self.resync(all).await,
                    Command::Update(u) => self.apply(u),
                    Command::Holds(h) => self.want_holds(h),
                    Command::StepDown | Command::Finish { .. } => {}
                }
            }
        }
        result
    }

    /// Tracks every lease the ownership records and claim pointers name (renewals only, no
    /// write): true once read. A read etcd does not answer is tried again at the next call.
    async fn keep_recorded_leases_alive(&mut self) -> bool {
        let (records, claims) = tokio::select! {
            _ = self.term.cancelled() => return false,
            r = read_held(&self.writer) => match r {
                Ok(r) => r,
                Err(e) => {
                    warn!(error = %e, "reading ownership records to keep their leases alive failed");
                    return false;
                }
            },
        };
        // As adoption does: records of namespaces this install no longer watches are left to
        // expire, never kept alive.
        let records: Vec<_> = records.into_iter().filter(|(id, _)| self.config.watches(&id.namespace)).collect();
        info!(records = records.len(), "the fence cannot be written yet: keeping every recorded lease alive meanwhile");
        for (_, held) in &records {
            self.keepalive.track(held.lease, held.ttl, Renew::Unknown);
        }
        for l in claims {
            self.keepalive.track(l, claim::CLAIM_TTL, Renew::Unknown);
        }
        true
    }

    /// Leadership lost: write nothing more, keep the leases alive (caretaker).
    fn step_down(&mut self) {
        if !self.leading {
            return;
        }
        info!(leases = self.by_lease.len(), "no longer leading: writing nothing, keeping every lease alive until another replica takes over");
        self.leading = false;
        self.view.write().unwrap().synced = false;
    }

    /// Checks every held key against etcd in the background.
    fn start_verify(&mut self) {
        let held: Vec<(InstanceId, Held)> = self
            .slots
            .iter()
            .filter(|(_, e)| !e.slot.busy && e.slot.desired.is_some())
            .filter_map(|(id, e)| e.slot.held.clone().map(|h| (id.clone(), h)))
            .collect();
        if held.is_empty() {
            return;
        }
        let writer = self.writer.clone();
        self.verify = Some(tokio::spawn(async move {
            if crate::failpoint::once("verify-panic") {
                panic!("failpoint verify-panic");
            }
            drifted(&writer, held).await
        }));
    }

    /// Instances whose key was deleted or altered out of band are written again (or found
    /// in conflict if someone else's key now stands there).
    fn on_verified(&mut self, result: Result<Vec<InstanceId>, OpError>) {
        match result {
            Ok(ids) => {
                for id in ids {
                    if let Some(e) = self.slots.get_mut(&id)
                        && e.slot.drifted()
                    {
                        let key = e.slot.held.as_ref().map(|h| h.key.clone()).unwrap_or_default();
                        warn!(namespace = id.namespace, pod = id.pod, key, "key changed out of band; repairing");
                        self.metrics.drift_repairs.inc();
                        self.enqueue(id);
                    }
                }
            }
            Err(e) => {
                self.metrics.etcd_error(e.op());
                debug!(error = %e, "verifying keys failed");
            }
        }
    }

    /// Revokes every held lease (shutdown with --revoke-on-shutdown and nobody to take
    /// over). In-flight writes finish first so that their leases are revoked too.
    async fn revoke_all(&mut self) {
        while let Some(done) = self.ops.join_next().await {
            if let Ok((id, op, started, result)) = done {
                self.on_done(id, op, started, result);
            }
        }
        let held: Vec<(InstanceId, Held)> = self.slots.iter().filter_map(|(id, e)| e.slot.held.clone().map(|h| (id.clone(), h))).collect();
        info!(leases = held.len(), "revoking every lease before exit");
        let (writer, metrics) = (self.writer.clone(), self.metrics.clone());
        futures::stream::iter(held)
            .for_each_concurrent(self.config.concurrency, |(id, h)| {
                let (writer, metrics) = (writer.clone(), metrics.clone());
                async move {
                    if let Err(e) = writer.revoke(&id, &h).await {
                        metrics.etcd_error("revoke");
                        warn!(error = %e, key = h.key, "revoking on shutdown failed; the key expires with its TTL");
                    }
                }
            })
            .await;
        // Not the claims: a restart of a single replica must not open every name to the
        // first namespace that asks (they lapse with CLAIM_TTL once nothing renews them).
        if let Some(l) = self.fence_lease {
            let _ = writer.revoke_lease(l).await;
        }
    }

    /// Adopts what the ownership records say we hold (once per term), then converges on
    /// `all`.
    async fn resync(&mut self, all: Vec<(InstanceId, Arc<Desired>)>) {
        if !self.synced {
            let mut backoff = Backoff::default();
            let migrate_from = self.config.migrate_from.clone().filter(|_| self.leading);
            let records = loop {
                let read = async {
                    if let Some(from) = &migrate_from {
                        let keepalive = &self.keepalive;
                        identity::migrate(&self.writer, &self.config, from, |lease, ttl| keepalive.track(lease, ttl, plan::Renew::Unknown)).await?;
                    }
                    read_held(&self.writer).await
                };
                // Cancellable: a caretaker handing over to a leading term must not hold the
                // hand-over up for a 150,000-record read.
                let outcome = tokio::select! {
                    _ = self.term.cancelled() => return,
                    r = read => r,
                };
                match outcome {
                    Ok((r, claims)) => {
                        // The previous term's claims lease lives on until this term has put
                        // every hold under its own (a caretaker only keeps it alive).
                        for l in &claims {
                            self.keepalive.track(*l, claim::CLAIM_TTL, Renew::Unknown);
                        }
                        self.keeper.adopt(claims);
                        break r;
                    }
                    Err(e) => {
                        self.metrics.etcd_error("adopt");
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
            let (records, elsewhere): (Vec<_>, Vec<_>) = records.into_iter().partition(|(id, _)| self.config.watches(&id.namespace));
            if !elsewhere.is_empty() {
                warn!(records = elsewhere.len(), "records of namespaces this install no longer watches are left alone (their keys expire)");
            }
            info!(records = records.len(), desired = all.len(), "adopting existing registrations");
            for (id, held) in records {
                let fx = self.slots.entry(id.clone()).or_default().slot.adopt(held);
                self.perform(&id, fx);
            }
        }
        let wanted: HashSet<&InstanceId> = all.iter().map(|(id, _)| id).collect();
        let stale: Vec<InstanceId> = self.slots.keys().filter(|id| !wanted.contains(id)).cloned().collect();
        for id in stale {
            // A key another source of the pod owns now (its owner went while no replica
            // led): handed over in place rather than revoked and written again.
            let held = self.slots.get(&id).and_then(|e| e.slot.held.clone());
            let heir = held.and_then(|h| {
                all.iter().find(|(w, d)| {
                    w.namespace == id.namespace
                        && w.pod == id.pod
                        && matches!(d.key, crate::format::Key::Fixed(_))
                        && d.key.matches(&h.key)
                        && self.slots.get(w).is_none_or(|e| e.slot.held.is_none())
                })
            });
            match heir {
                Some((to, d)) => self.transfer(id, to.clone(), d.clone()),
                None => self.apply(Update::Remove(id)),
            }
        }
        for (id, d) in all {
            self.apply(Update::Upsert(id, d));
        }
        // Adopted instances that already are as desired are shown now, not when the queue
        // reaches them: whoever reads the synced view (status, readiness gates) sees every
        // key this term holds.
        let holding: Vec<(InstanceId, Shown)> = self
            .slots
            .iter()
            .filter(|(_, e)| !e.slot.busy)
            .filter_map(|(id, e)| match e.slot.next() {
                Next::Hold(shown) => Some((id.clone(), shown)),
                _ => None,
            })
            .collect();
        for (id, shown) in holding {
            self.show(&id, Some(shown));
        }
        self.synced = true;
        let mut view = self.view.write().unwrap();
        view.synced = self.leading;
        view.term = view::next_term();
    }

    fn apply(&mut self, update: Update) {
        let (id, desired) = match update {
            Update::Transfer { from, to, desired } => return self.transfer(from, to, desired),
            Update::Upsert(id, d) => {
                if let Some((_, want)) = self.heirs.values_mut().find(|(heir, _)| *heir == id) {
                    *want = d;
                    return;
                }
                (id, Some(d))
            }
            Update::Remove(id) => {
                // An heir no longer wanted: its giver revokes once its operation is done.
                self.heirs.retain(|_, (heir, _)| *heir != id);
                if !self.slots.contains_key(&id) {
                    return;
                }
                (id, None)
            }
        };
        let entry = self.slots.entry(id.clone()).or_default();
        if desired.is_some() || entry.slot.desired.is_some() {
            // A changed desire deserves a prompt try even after a conflict or failure.
            if let Some(k) = entry.retry.take() {
                self.retries.remove(&k);
            }
        }
        let fx = entry.slot.desire(desired);
        self.perform(&id, fx);
    }

    /// `to` takes over `from`'s key and lease in place. When `from` holds no such key (or
    /// is busy), it is an ordinary remove and upsert.
    fn transfer(&mut self, from: InstanceId, to: InstanceId, desired: Arc<Desired>) {
        // `from` still waits to inherit the key itself (a chain: a → b while b → c): it
        // passes straight on.
        if let Some((heir, want)) = self.heirs.values_mut().find(|(heir, _)| *heir == from) {
            (*heir, *want) = (to, desired);
            return;
        }
        // `to` waited to inherit another key from a busy giver: it wants this one now, and
        // that giver's key is nobody's (it is revoked once its operation is done).
        self.heirs.retain(|_, (heir, _)| *heir != to);
        let to_free = self.slots.get(&to).is_none_or(|e| e.slot.held.is_none() && e.slot.transfer.is_none() && !e.slot.busy);
        if to_free && self.slots.get(&from).is_some_and(|e| e.slot.busy) {
            // The giver's operation finishes first (see on_done); meanwhile it is not wanted.
            // It holds one key: one already promised to an heir leaves this one to be
            // registered afresh.
            let fx = self.slots.get_mut(&from).expect("checked").slot.desire(None);
            self.perform(&from, fx);
            if self.heirs.contains_key(&from) {
                self.apply(Update::Upsert(to, desired));
            } else {
                self.heirs.insert(from, (to, desired));
            }
            return;
        }
        // What `from` can hand on: the key it holds, or one it has yet to take over itself
        // (its hand-over still waits in the queue, or lost its answer): `to` takes that over
        // from every source it passed through, `from` included (its record may have landed),
        // `to` itself excepted (handed back).
        let given = self
            .slots
            .get(&from)
            .filter(|e| !e.slot.busy)
            .and_then(|e| match e.slot.transfer.as_deref() {
                Some((givers, h)) => {
                    let mut all: Vec<InstanceId> = givers.iter().chain([&from]).filter(|g| **g != to).cloned().collect();
                    all.dedup();
                    Some((all, h.clone()))
                }
                None => e.slot.held.clone().map(|h| (vec![from.clone()], h)),
            })
            .filter(|(_, h)| desired.key.matches(&h.key));
        let free = self.slots.get(&to).is_none_or(|e| e.slot.held.is_none() && e.slot.transfer.is_none() && !e.slot.busy);
        let Some((givers, held)) = given.filter(|_| free) else {
            // No hand-over in place: `from` lets go the ordinary way, unless it still wants
            // another key (its service or format changed), which it keeps wanting.
            match self.slots.get(&from).and_then(|e| e.slot.desired.clone()).filter(|d| d.key != desired.key) {
                Some(other) => self.apply(Update::Upsert(from, other)),
                None => self.apply(Update::Remove(from)),
            }
            self.apply(Update::Upsert(to, desired));
            return;
        };
        // `from` lets go without revoking: its lease is `to`'s from now on. A giver that
        // still wants a key (another one: its service or format changed) starts afresh.
        let mut still_wanted = None;
        if let Some(e) = self.slots.remove(&from) {
            if let Some(k) = e.retry {
                self.retries.remove(&k);
            }
            still_wanted = e.slot.desired.filter(|d| !d.key.matches(&held.key));
        }
        self.show(&from, None);
        let entry = self.slots.entry(to.clone()).or_default();
        if let Some(k) = entry.retry.take() {
            self.retries.remove(&k);
        }
        self.by_lease.insert(held.lease, to.clone());
        let fx = entry.slot.take_over(givers, held, desired);
        self.perform(&to, fx);
        if let Some(d) = still_wanted {
            self.apply(Update::Upsert(from, d));
        }
    }

    fn enqueue(&mut self, id: InstanceId) {
        if self.queued.insert(id.clone()) {
            self.queue.push_back(id);
            self.backlog_peak = self.backlog_peak.max(self.queue.len());
        }
    }

    /// Starts operations for queued instances while there is room.
    fn dispatch(&mut self) {
        while self.ops.len() < self.config.concurrency {
            let Some(id) = self.queue.pop_front() else {
                // A sync or an adoption queued every instance: once that backlog has
                // drained and its last operation is done, give back the queue's room (at
                // 150,000 instances tens of MiB) and what its requests and answers left
                // free in the heap. Churn never builds such a backlog, so this is rare.
                if self.ops.is_empty() && self.backlog_peak > BACKLOG_TRIM {
                    self.backlog_peak = 0;
                    self.queue.shrink_to_fit();
                    self.queued.shrink_to_fit();
                    crate::memory::give_back();
                }
                return;
            };
            self.queued.remove(&id);
            let Some(entry) = self.slots.get_mut(&id) else {
                continue;
            };
            if entry.slot.busy || entry.retry.is_some() {
                continue; // re-enqueued when the op finishes or the retry fires
            }
            let (held, desired) = (entry.slot.held.clone(), entry.slot.desired.clone());
            let hold = desired.as_ref().and_then(|d| Hold::of(&id, d.claim.as_deref())).filter(|_| self.writer.claims.enabled());
            let state = hold.as_ref().and_then(|h| self.keeper.state(h));
            let refused = match (&hold, state) {
                (Some(h), Some(claim::HoldState::Refused { namespace, read })) => Some((h.clone(), namespace.clone(), read.clone())),
                _ => None,
            };
            let op = match entry.slot.next() {
                Next::Forget => {
                    self.slots.remove(&id);
                    self.show(&id, None);
                    continue;
                }
                // Published, but another namespace holds the service: the key goes (the
                // Update only carries it to `refuse`).
                Next::Hold(_) if refused.is_some() && let (Some(d), Some(h)) = (desired, held) => Op::Update(d, h),
                Next::Hold(shown) => {
                    self.show(&id, Some(shown));
                    continue;
                }
                Next::Run(op) => op,
            };
            // Every write needs its service's hold: a first write waits for it; any write is
            // refused (and a held key revoked) once another namespace holds the service.
            let refused = refused.filter(|_| !matches!(op, Op::Revoke(_)));
            if let (Some(h), None, Op::Register(_) | Op::Replace(..)) = (&hold, state, &op) {
                self.parked.entry(h.clone()).or_default().insert(id);
                continue;
            }
            let entry = self.slots.get_mut(&id).expect("looked up above");
            let fx = entry.slot.start(&op);
            self.perform(&id, fx);
            let writer = self.writer.clone();
            let label = op.label();
            let task_id = id.clone();
            if let Some((h, namespace, read)) = refused {
                self.ops.spawn(async move {
                    let started = Instant::now();
                    let result = refuse(&writer, &task_id, &op, &h, namespace, read).await;
                    (task_id, label, started, result)
                });
                continue;
            }
            self.ops.spawn(async move {
                let started = Instant::now();
                let result = match op {
                    Op::Register(d) => writer.register(&task_id, &d).await,
                    Op::Update(d, h) => writer.update(&task_id, &d, &h).await,
                    Op::Reissue(d, h) => writer.reissue(&task_id, &d, &h).await,
                    Op::Replace(d, h) => writer.replace(&task_id, &d, &h).await,
                    Op::Revoke(h) => writer.revoke(&task_id, &h).await,
                    Op::Transfer(d, h, from) => writer.transfer(&task_id, &d, &h, &from).await,
                };
                (task_id, label, started, result)
            });
        }
    }

    /// Feeds an operation's result to the planner. True when the write was fenced.
    fn on_done(&mut self, id: InstanceId, op: &'static str, started: Instant, result: Result<Outcome, OpError>) -> bool {
        self.metrics.etcd_op_duration.get_or_create(&OpLabels { op: op.into() }).observe(started.elapsed().as_secs_f64());
        let Some(entry) = self.slots.get_mut(&id) else {
            return false;
        };
        let fx = entry.slot.done(op, result);
        let fenced = fx.contains(&Effect::Fenced);
        self.perform(&id, fx);
        if !fenced && let Some((to, desired)) = self.heirs.remove(&id) {
            self.transfer(id, to, desired);
        }
        fenced
    }

    fn on_lease_lost(&mut self, lease: i64) {
        let Some(id) = self.by_lease.get(&lease).cloned() else {
            self.writer.pool.lost(lease);
            return;
        };
        if let Some(e) = self.slots.get_mut(&id) {
            let fx = e.slot.lease_lost(lease);
            self.perform(&id, fx);
        }
    }

    /// Carries out the planner's effects for one instance.
    fn perform(&mut self, id: &InstanceId, effects: Vec<Effect>) {
        for effect in effects {
            match effect {
                Effect::Track { lease, ttl, renew } => {
                    self.by_lease.insert(lease, id.clone());
                    self.keepalive.track(lease, ttl, renew);
                }
                Effect::Untrack(lease) => {
                    self.by_lease.remove(&lease);
                    self.keepalive.untrack(lease);
                }
                Effect::Show(shown) => self.show(id, shown),
                Effect::Conflicted { message, first, claimed_by } => {
                    self.metrics.conflicts.inc();
                    self.schedule_retry(id, self.config.conflict_retry);
                    if first {
                        warn!(namespace = id.namespace, pod = id.pod, registration = id.source.segment(), "{message}");
                        let _ = self.notices.send(Notice::Conflict(id.clone(), message, claimed_by));
                    }
                }
                Effect::RetryBackoff => {
                    if let Some(e) = self.slots.get_mut(id) {
                        let delay = e.slot.backoff.next();
                        self.schedule_retry(id, delay);
                    }
                }
                Effect::Regrant => {
                    self.metrics.leases_regranted.inc();
                }
                Effect::EtcdOk => self.etcd_ok(),
                Effect::EtcdFailed { op, message } => {
                    self.metrics.etcd_error(op);
                    debug!(namespace = id.namespace, pod = id.pod, error = message, "etcd operation failed");
                    self.etcd_failed(message);
                }
                Effect::Propagated => self.observe_propagation(id),
                Effect::Fenced => {}
                Effect::Enqueue => self.enqueue(id.clone()),
                Effect::Unclaimed => {
                    let hold = self.slots.get(id).and_then(|e| e.slot.desired.as_ref()).and_then(|d| Hold::of(id, d.claim.as_deref()));
                    if let Some(h) = hold {
                        debug!(namespace = id.namespace, pod = id.pod, read = h.read, "the service's hold is not in etcd; claiming it again");
                        self.keeper.recheck(&h);
                    }
                }
            }
        }
    }

    /// The complete set of holds wanted now.
    fn want_holds(&mut self, holds: BTreeSet<Hold>) {
        for gone in self.keeper.want(holds) {
            self.show_refused(&gone, None);
            self.wake(&gone);
        }
    }

    /// Shows (or clears) a source's refused claim, for its status and an Event.
    fn show_refused(&mut self, h: &Hold, refused: Option<(String, String)>) {
        let key = (h.namespace.clone(), h.holder.clone());
        let changed = {
            let mut view = self.view.write().unwrap();
            let changed = view.refused.get(&key) != refused.as_ref();
            match &refused {
                Some(r) => view.refused.insert(key.clone(), r.clone()),
                None => view.refused.remove(&key),
            };
            changed
        };
        if changed {
            let _ = self.notices.send(Notice::Claim(key.0, key.1, refused));
        }
    }

    /// Starts claims jobs while there is room (leading, adopted: the previous term's lease
    /// is known before this term's is granted).
    fn dispatch_holds(&mut self) {
        if !self.synced {
            return;
        }
        while self.hold_jobs.len() < HOLD_CONCURRENCY {
            let Some(job) = self.keeper.next(self.hold_jobs.len()) else { return };
            let (writer, owners) = (self.writer.clone(), self.writer.owners.clone());
            self.hold_jobs.spawn(claim::run(writer, owners, job));
        }
    }

    fn on_hold_done(&mut self, done: claim::Done) {
        match &done {
            claim::Done::Granted(lease) => {
                info!(lease = format!("{lease:x}"), "claims lease granted: every service claim is put under it");
                self.keepalive.track(*lease, claim::CLAIM_TTL, Renew::Granted);
            }
            claim::Done::RevokedOld(lease) => {
                debug!(lease = format!("{lease:x}"), "the previous term's claims lease is revoked");
                self.keepalive.untrack(*lease);
            }
            claim::Done::Claimed(h, claim::Claimed::Refused { namespace, read }) => {
                debug!(read = h.read, namespace = h.namespace, owner = namespace, owner_read = read, "service claimed by another namespace");
                let message = claimed_message(None, h, namespace, read);
                self.show_refused(h, Some((namespace.clone(), message)));
            }
            claim::Done::Claimed(h, claim::Claimed::Held) => self.show_refused(h, None),
            claim::Done::Failed(job, message) => {
                self.metrics.etcd_error("claim");
                warn!(error = message, ?job, "a service claim could not be written; retrying");
            }
            _ => {}
        }
        for h in self.keeper.done(done) {
            if matches!(self.keeper.state(&h), Some(claim::HoldState::Refused { .. })) {
                // Keys published before the refusal go too (see dispatch).
                let of: Vec<InstanceId> = self
                    .slots
                    .iter()
                    .filter(|(id, e)| e.slot.desired.as_ref().and_then(|d| Hold::of(id, d.claim.as_deref())).as_ref() == Some(&h))
                    .map(|(id, _)| id.clone())
                    .collect();
                for id in of {
                    self.enqueue(id);
                }
            }
            self.wake(&h);
        }
    }

    /// Instances waiting on a hold look again.
    fn wake(&mut self, h: &Hold) {
        for id in self.parked.remove(h).unwrap_or_default() {
            self.enqueue(id);
        }
    }

    fn schedule_retry(&mut self, id: &InstanceId, after: Duration) {
        if let Some(e) = self.slots.get_mut(id) {
            if let Some(k) = e.retry.take() {
                self.retries.remove(&k);
            }
            e.retry = Some(self.retries.insert(id.clone(), after));
        }
    }

    /// metav1.Time has whole seconds: the figure is good to a second. A clock ahead of ours
    /// on the pod's node would make it negative: 0.
    fn observe_propagation(&self, id: &InstanceId) {
        if let Some(since) = self.slots.get(id).and_then(|e| e.slot.desired.as_ref()).and_then(|d| d.ready_since)
            && since.as_second() >= self.term_started.as_second()
        {
            let lag = Timestamp::now().duration_since(since).as_secs_f64();
            self.metrics.propagation.observe(lag.max(0.0));
        }
    }

    fn show(&mut self, id: &InstanceId, shown: Option<Shown>) {
        let changed = {
            let mut view = self.view.write().unwrap();
            let before = view.get(id).cloned();
            let changed = before != shown;
            if changed {
                if let Some(b) = &before {
                    self.metrics.instances.get_or_create(&StateLabels { state: b.state_name().into() }).dec();
                }
                if let Some(s) = &shown {
                    self.metrics.instances.get_or_create(&StateLabels { state: s.state_name().into() }).inc();
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

/// A write whose service another namespace claims: nothing is written, and a key the
/// instance holds goes (published before the claim was refused: an upgrade, a name no longer
/// shared).
async fn refuse(w: &Writer, id: &InstanceId, op: &Op, h: &Hold, namespace: String, read: String) -> Result<Outcome, OpError> {
    match op {
        Op::Replace(_, old) | Op::Update(_, old) | Op::Reissue(_, old) => {
            w.revoke(id, old).await?;
        }
        Op::Transfer(_, old, from) => {
            // The key goes with the lease; first every record on it, fenced.
            let on_lease: Vec<InstanceId> = from.iter().chain([id]).cloned().collect();
            w.revoke_recorded(&on_lease, old.lease).await?;
        }
        Op::Register(_) | Op::Revoke(_) => {}
    }
    let (service, key) = match op {
        Op::Register(d) | Op::Replace(d, _) | Op::Update(d, _) | Op::Reissue(d, _) | Op::Transfer(d, ..) => (d.service.clone(), d.key.with_lease(0)),
        Op::Revoke(_) => Default::default(),
    };
    let message = claimed_message(Some(&service), h, &namespace, &read);
    Ok(Outcome::Conflict { key, message, claimed_by: Some(namespace) })
}

/// Why a source may not publish its service: `namespace` claims `read`.
fn claimed_message(service: Option<&str>, h: &Hold, namespace: &str, read: &str) -> String {
    let service = service.map(|s| format!("service {s} (read as {:?})", h.read)).unwrap_or_else(|| format!("the service read as {:?}", h.read));
    let within = if read == h.read {
        String::new()
    } else {
        format!(" (it claims {read:?}: consumers of one of the two prefixes read the keys of the other)")
    };
    format!(
        "{service} belongs to namespace {namespace:?}{within}: another namespace cannot join it unless the cluster admin shares it (--shared-service); nothing was written"
    )
}

/// Waits for a background task if there is one (never resolves otherwise).
async fn join<T>(task: &mut Option<JoinHandle<T>>) -> Result<T, tokio::task::JoinError> {
    match task {
        Some(t) => t.await,
        None => std::future::pending().await,
    }
}
