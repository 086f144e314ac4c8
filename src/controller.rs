//! Wires the pieces together: watches → index → registry (etcd) → status writer, plus the
//! HTTP surface and leader election. Every replica watches and keeps its index warm; only
//! the leader runs a registry term (etcd writes) and writes status.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use kube::Client;
use kube::runtime::watcher::Event;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::desired::{Changes, Defaults, Index};
use crate::etcd::EtcdConfig;
use crate::http;
use crate::kubernetes::events::Events;
use crate::kubernetes::status::{Signal, StatusWriter};
use crate::kubernetes::watch::{Input, inputs as watch_inputs};
use crate::leader::{Elector, Handover, LeaderConfig};
use crate::metrics::Metrics;
use crate::registry::{Command, Notice, Registry, RegistryConfig, SharedView, TermEnd, fence};

/// Everything `podlease run` is configured with.
#[derive(Debug, Clone)]
pub struct Settings {
    pub defaults: Defaults,
    pub etcd: EtcdConfig,
    pub registry: RegistryConfig,
    /// Explicit cluster id; default: the UID of namespace kube-system.
    pub cluster_id: Option<String>,
    /// Namespaces to watch; empty = all.
    pub namespaces: Vec<String>,
    /// An earlier identity whose ownership records this install takes over at start.
    pub migrate_from: Option<String>,
    pub metrics_addr: SocketAddr,
    /// This replica's name (Events' reporting instance, leader identity).
    pub instance: String,
    /// Leader election; None = this replica always leads (a single replica).
    pub leader: Option<LeaderConfig>,
}

/// How long the start waits for the leader Lease. Only leading needs its answer (and asks
/// again before it); keeping the recorded leases alive does not, so a replica started while
/// the API server does not answer is not kept from that for long.
const START_LEASE_READ: Duration = Duration::from_secs(2);

pub async fn run(client: Client, settings: Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    let metrics = Metrics::new();
    // First, so that a taken port stops the process at once with a clear error; and served
    // from now on, so that a slow start (etcd not answering) is not a liveness restart loop:
    // /readyz says what the start waits for.
    let listener = http::bind(settings.metrics_addr).await?;
    let view: SharedView = Arc::default();
    let health: Arc<http::Health> = Arc::default();
    // Not ready until the start is through, from the first request on.
    *health.starting.lock().unwrap() = Some("beginning".into());
    let http_task = tokio::spawn(http::serve(listener, metrics.clone(), view.clone(), health.clone(), shutdown.clone()));
    let start = Start { health: &health, shutdown: &shutdown };

    // An expired client certificate can be why the start waits: say so from the first moment.
    crate::credentials::check_files(&settings.etcd, &metrics, &health);
    let etcd = start
        .step("connecting to etcd", || async {
            settings.etcd.connection().await.map_err(|e| if e.is_transient() { Step::Retry(e.to_string()) } else { Step::Fatal(e.into()) })
        })
        .await?;
    let mut registry_config = settings.registry.clone();
    registry_config.cluster_id = match &settings.cluster_id {
        Some(id) => id.clone(),
        None => {
            let uid = start
                .step("reading the cluster id (the UID of namespace kube-system)", || async {
                    crate::kubernetes::cluster_id(&client).await.map_err(|e| Step::Retry(format!("{e} (set --cluster-id to skip)")))
                })
                .await?;
            // The kube-system UID is one key segment too: checked like the flag.
            crate::cli::parse_cluster_id(&uid).map_err(anyhow::Error::msg)?
        }
    };
    registry_config.fence = settings.leader.is_some();
    registry_config.keepalive_own_connection = true;
    // Rotated certificates, CA or password: new requests use them once etcd accepts them.
    crate::credentials::watch(etcd.clone(), settings.etcd.clone(), registry_config.fence_key(), metrics.clone(), health.clone(), shutdown.clone());
    info!(cluster_id = registry_config.cluster_id, install_id = registry_config.install_id, "starting");
    registry_config.migrate_from = settings.migrate_from.clone();
    // A changed identity would orphan every record: refuse before anything (or migrate once
    // leading). The leader Lease records the last leader's identity.
    // A Lease that cannot be read now (the API server down) says nothing: the check runs on
    // what etcd shows, and again once the Lease answers, before this replica may lead (it may
    // keep leases alive meanwhile: that changes no record).
    let (previous, recheck) = match &settings.leader {
        Some(cfg) => {
            *health.starting.lock().unwrap() = Some("reading the last leader's identity (the leader Lease)".into());
            match crate::leader::recorded_identity(&client, cfg, START_LEASE_READ).await {
                Ok(previous) => (previous, false),
                Err(e) => {
                    warn!(error = e, "the last leader's identity is unknown for now; checked again before this replica may lead");
                    (None, true)
                }
            }
        }
        None => (None, false),
    };
    start
        .step("checking this install's identity in etcd", || async {
            crate::registry::identity::check(&etcd, &registry_config, previous.as_deref()).await.map_err(|e| match e {
                crate::registry::identity::CheckError::Refused(m) => Step::Fatal(anyhow::anyhow!(m)),
                e => Step::Retry(e.to_string()),
            })
        })
        .await?;
    *health.starting.lock().unwrap() = None;
    tokio::spawn(report_crd(client.clone()));

    let index = Arc::new(Mutex::new(Index::new(settings.defaults.clone())));
    let (notice_tx, notice_rx) = mpsc::unbounded_channel();
    let (signal_tx, signal_rx) = mpsc::unbounded_channel();
    let events = Events::spawn(client.clone(), settings.instance.clone());
    let records = crate::registry::Records::new(etcd.clone(), registry_config.owners(), registry_config.call_timeout);
    let writer = StatusWriter::new(client.clone(), index.clone(), view.clone(), events, records, metrics.clone());
    let writer_task = tokio::spawn(writer.run(signal_rx, notice_rx, shutdown.clone()));

    // Leadership: an elector (the epoch while leading), or always leading at epoch 0.
    let (leader_tx, mut leader_rx) = watch::channel(settings.leader.is_none().then_some(0));
    let elector_shutdown = CancellationToken::new();
    // What this replica sees of etcd and the fence: who may lead, and whether nobody does.
    let mut probe = fence::probe(etcd.clone(), registry_config.fence_key(), metrics.etcd_reachable.clone(), elector_shutdown.clone());
    let mut _always_leading = None;
    let elector_task = match settings.leader.clone() {
        Some(cfg) => {
            info!(lease = cfg.name, namespace = cfg.namespace, identity = cfg.identity, "leader election on");
            let wait_for_taker = registry_config.revoke_on_shutdown;
            let recheck = recheck.then(|| (client.clone(), cfg.clone(), etcd.clone(), registry_config.clone()));
            let elector = Elector::new(client.clone(), cfg).with_fence(etcd.clone(), registry_config.fence_key(), registry_config.call_timeout);
            let (probe, elector_shutdown) = (probe.clone(), elector_shutdown.clone());
            Some(tokio::spawn(async move {
                if let Some((client, cfg, etcd, config)) = recheck
                    && !identity_recheck(&client, &cfg, &etcd, &config, &elector_shutdown).await
                {
                    return Handover::Unknown;
                }
                elector.run(leader_tx, probe, elector_shutdown, wait_for_taker).await
            }))
        }
        None => {
            _always_leading = Some(leader_tx);
            None
        }
    };

    let (mut inputs, scopes) = watch_inputs(&client, &settings.namespaces);
    let mut feed = Feed {
        index: index.clone(),
        signal_tx: signal_tx.clone(),
        metrics: metrics.clone(),
        scopes,
        synced_streams: HashSet::new(),
        seen: HashMap::new(),
        term: None,
        listed_at: None,
        registrations_absent: false,
    };
    let revoke_on_shutdown = registry_config.revoke_on_shutdown;
    let terms = Terms { etcd, config: registry_config, notices: notice_tx, metrics: metrics.clone(), view: view.clone() };
    let retry = settings.leader.as_ref().map_or(Duration::from_secs(1), |l| l.retry_period);
    let mut restart_at: Option<tokio::time::Instant> = None;
    loop {
        health.caches_synced.store(feed.synced(), Ordering::Relaxed);
        let epoch = *leader_rx.borrow();
        // No live leader term (no fence) and etcd reachable: any replica may renew the
        // recorded leases, which changes no key.
        let fenceless = probe.borrow().reachable && probe.borrow().fence == Some(false);
        match epoch {
            // Leading at `e` needs a term of that epoch. A caretaker term, or one of an older
            // epoch, ends first (terms never overlap), but only once the new one can start at
            // once: until then the old one keeps the leases alive. A new leader's caches must
            // be fresh, since adoption revokes what they do not show.
            Some(e) if feed.term.as_ref().is_none_or(|t| !t.leading || t.epoch != Some(e)) => {
                if feed.synced() && restart_at.is_none() {
                    if feed.fresh() {
                        if let Some(old) = feed.term.take() {
                            old.finish(false).await;
                        }
                        feed.term = Some(terms.start(Some(e), &index, &signal_tx));
                    } else {
                        info!("relisting pods and registrations before leading");
                        inputs = watch_inputs(&client, &settings.namespaces).0;
                        feed.relist();
                    }
                }
                // Listing 150,000 pods takes longer than a TTL: until the caches can lead,
                // keep the recorded leases alive as a caretaker would (no cache needed, no
                // writes), once the previous leader's fence is gone.
                if feed.term.is_none() && fenceless {
                    info!(epoch = e, "leading once the caches are listed; keeping the recorded leases alive meanwhile");
                    feed.term = Some(terms.start(None, &index, &signal_tx));
                }
            }
            // Nobody holds the fence (the leader died while no replica could take the Lease,
            // e.g. during an API server outage): keep the recorded leases alive meanwhile.
            // That needs no cache: a replica that started during the outage can do it too.
            None if feed.term.is_none() && settings.leader.is_some() && fenceless =>
            {
                feed.term = Some(terms.start(None, &index, &signal_tx));
            }
            _ => {}
        }
        let leading = feed.term.as_ref().is_some_and(|t| t.leading);
        health.leading.store(leading, Ordering::Relaxed);
        metrics.leader.set(i64::from(leading));
        tokio::select! {
            _ = shutdown.cancelled() => break,
            changed = leader_rx.changed() => {
                if changed.is_err() {
                    break;
                }
                if leader_rx.borrow().is_none() && let Some(t) = feed.term.as_mut() {
                    // Stop writing at once, keep the leases alive until another replica
                    // has taken over (or this one leads again).
                    t.step_down();
                }
            }
            input = inputs.next() => match input {
                Some(input) => feed.handle(input),
                None => break,
            },
            _ = probe.changed() => {}
            end = async { (&mut feed.term.as_mut().unwrap().task).await }, if feed.term.is_some() => {
                let ended = feed.term.take();
                // A term that panicked did not cancel its token: stop its keepalive driver.
                if let Some(t) = &ended {
                    t.cancel.cancel();
                }
                let was_leading = ended.is_some_and(|t| t.leading);
                if was_leading && matches!(end, Ok(TermEnd::Fenced)) {
                    // Only a fresh look at the Lease may start another term.
                    restart_at = Some(tokio::time::Instant::now() + retry);
                }
            }
            _ = tokio::time::sleep_until(restart_at.unwrap_or_else(tokio::time::Instant::now)), if restart_at.is_some() => {
                restart_at = None;
            }
        }
    }
    info!("shutting down");
    // Stop writing before the Lease is handed over; then revoke only if this replica led and
    // nobody takes over (--revoke-on-shutdown).
    let was_leading = feed.term.as_ref().is_some_and(|t| t.leading);
    if let Some(t) = feed.term.as_mut() {
        t.step_down();
    }
    elector_shutdown.cancel();
    let handover = match elector_task {
        Some(e) => e.await.unwrap_or(Handover::Unknown),
        None => Handover::NoTaker, // a single replica: nobody else will take over
    };
    if let Some(t) = feed.term.take() {
        let revoke = revoke_on_shutdown && was_leading && handover == Handover::NoTaker;
        if revoke_on_shutdown && was_leading && !revoke {
            info!(?handover, "not revoking on shutdown: another replica takes over (or that is unknown), and it adopts every lease");
        }
        t.finish(revoke).await;
    }
    // A status write to an API server that does not answer must not hold the exit up until
    // the kubelet's SIGKILL (the fault soak saw replicas miss their 30 s grace this way).
    if tokio::time::timeout(Duration::from_secs(5), async { tokio::join!(writer_task, http_task) }).await.is_err() {
        warn!("the status writer did not finish within 5 s; exiting anyway");
    }
    Ok(())
}

/// The identity check of a replica that could not read the leader Lease at start: repeated
/// until the Lease answers (every 2 s). A refusal ends the process, as it would have at start
/// (this replica never led, so nothing of its own is left half done). False: shut down first.
async fn identity_recheck(client: &Client, cfg: &LeaderConfig, etcd: &crate::etcd::Connection, config: &RegistryConfig, shutdown: &CancellationToken) -> bool {
    for attempt in 0u64.. {
        let outcome = match crate::leader::recorded_identity(client, cfg, Duration::from_secs(5)).await {
            Ok(previous) => match crate::registry::identity::check(etcd, config, previous.as_deref()).await {
                Ok(()) => return true,
                Err(crate::registry::identity::CheckError::Refused(m)) => {
                    error!("{m}");
                    std::process::exit(1);
                }
                Err(e) => e.to_string(),
            },
            Err(e) => e,
        };
        // Said at once and then every minute: a replica that cannot read its Lease (RBAC, an
        // API server that stays slow) never leads, and must say why.
        if attempt % 30 == 0 {
            warn!(error = outcome, "this replica may not lead until the identity check can read the leader Lease and etcd");
        }
        tokio::select! {
            _ = shutdown.cancelled() => return false,
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
    false
}

/// One registry term: its task and the channel that feeds it.
struct Term {
    /// None for a caretaker started without leadership.
    epoch: Option<i64>,
    /// False once this replica stepped down (the term is a caretaker).
    leading: bool,
    cancel: CancellationToken,
    cmd_tx: mpsc::UnboundedSender<Command>,
    task: JoinHandle<TermEnd>,
}

impl Term {
    fn step_down(&mut self) {
        if self.leading {
            self.leading = false;
            let _ = self.cmd_tx.send(Command::StepDown);
        }
    }

    /// Ends the term and waits for it (a term stuck on an unreachable etcd is cut off after
    /// a few seconds, unless it is revoking).
    async fn finish(mut self, revoke: bool) {
        let _ = self.cmd_tx.send(Command::Finish { revoke });
        if self.epoch.is_none() && !revoke {
            // A caretaker that never led has nothing in flight worth waiting for.
            self.cancel.cancel();
        }
        if revoke {
            let _ = (&mut self.task).await;
            return;
        }
        if tokio::time::timeout(Duration::from_secs(5), &mut self.task).await.is_err() {
            self.cancel.cancel();
            let _ = self.task.await;
        }
    }
}

/// What every term is started from.
struct Terms {
    etcd: crate::etcd::Connection,
    config: RegistryConfig,
    notices: mpsc::UnboundedSender<Notice>,
    metrics: Metrics,
    view: SharedView,
}

impl Terms {
    /// Starts a registry with the complete desired state: it fences, adopts, converges.
    fn start(&self, epoch: Option<i64>, index: &Arc<Mutex<Index>>, signal_tx: &mpsc::UnboundedSender<Signal>) -> Term {
        let cancel = CancellationToken::new();
        let registry = Registry::new(
            self.etcd.clone(),
            self.config.clone(),
            epoch,
            self.notices.clone(),
            self.metrics.clone(),
            self.view.clone(),
            cancel.clone(),
        );
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(registry.run(cmd_rx));
        let index = index.lock().unwrap();
        let desired = index.desired();
        let _ = cmd_tx.send(Command::Holds(index.holds()));
        let _ = cmd_tx.send(Command::Resync(desired));
        if let Some(epoch) = epoch {
            info!(epoch, "leading: adopting and converging");
            for k in index.registrations() {
                let _ = signal_tx.send(Signal::Dirty(k.clone()));
            }
        }
        Term { epoch, leading: epoch.is_some(), cancel, cmd_tx, task }
    }
}

/// Feeds watch events into the index and passes the resulting changes on.
struct Feed {
    index: Arc<Mutex<Index>>,
    signal_tx: mpsc::UnboundedSender<Signal>,
    metrics: Metrics,
    /// Watch streams that must list once before a registry may act.
    scopes: usize,
    synced_streams: HashSet<(bool, Option<String>)>,
    /// Objects seen during a (re-)list, per stream, to drop the ones that vanished.
    seen: HashMap<(bool, Option<String>), HashSet<(String, String)>>,
    /// The registry term, while leading.
    term: Option<Term>,
    /// When every stream last finished a list.
    listed_at: Option<std::time::Instant>,
    /// The ServiceRegistration CRD was last seen absent (said once, until it appears).
    registrations_absent: bool,
}

/// A new leader's caches must be this fresh: adoption revokes what they do not show, and a
/// watch that went quiet (a silently dead connection) can lag by minutes.
const FRESH_LIST: Duration = Duration::from_secs(2);

impl Feed {
    /// Starts every watch again (a fresh quorum list) before a term may start.
    fn relist(&mut self) {
        self.synced_streams.clear();
        self.seen.clear();
        self.listed_at = None;
    }

    fn fresh(&self) -> bool {
        self.synced() && self.listed_at.is_some_and(|t| t.elapsed() < FRESH_LIST)
    }

    /// Every watch has listed once: adoption may now tell live registrations from stale ones.
    fn synced(&self) -> bool {
        self.synced_streams.len() == self.scopes
    }

    fn handle(&mut self, input: Input) {
        let started = std::time::Instant::now();
        self.apply(input);
        self.metrics.reconcile_duration.observe(started.elapsed().as_secs_f64());
    }

    fn apply(&mut self, input: Input) {
        let changes = {
            let shared = self.index.clone();
            let mut index = shared.lock().unwrap();
            match input {
                Input::Error(e) => {
                    warn!("{e}");
                    return;
                }
                Input::Pod(scope, ev) => {
                    let stream = (true, scope.clone());
                    match ev {
                        Event::Apply(p) => index.apply_pod(p),
                        Event::Delete(p) => index.delete_pod(&p.namespace, &p.name),
                        Event::Init => {
                            self.seen.insert(stream, HashSet::new());
                            Changes::default()
                        }
                        Event::InitApply(p) => {
                            self.seen.entry(stream).or_default().insert((p.namespace.clone(), p.name.clone()));
                            index.apply_pod(p)
                        }
                        Event::InitDone => {
                            let seen = self.seen.remove(&stream).unwrap_or_default();
                            let mut all = Changes::default();
                            for (ns, name) in index.pod_keys() {
                                if scope.as_ref().is_none_or(|s| *s == ns) && !seen.contains(&(ns.clone(), name.clone())) {
                                    merge(&mut all, index.delete_pod(&ns, &name));
                                }
                            }
                            self.synced_streams.insert(stream);
                            if self.synced() {
                                self.listed_at = Some(std::time::Instant::now());
                            }
                            all
                        }
                    }
                }
                Input::Registration(scope, ev) => {
                    let stream = (false, scope.clone());
                    match ev {
                        Event::Apply(r) => index.apply_registration(&r),
                        Event::Delete(r) => index
                            .delete_registration(r.metadata.namespace.as_deref().unwrap_or_default(), r.metadata.name.as_deref().unwrap_or_default()),
                        Event::Init => {
                            self.seen.insert(stream, HashSet::new());
                            Changes::default()
                        }
                        Event::InitApply(r) => {
                            let key = (r.metadata.namespace.clone().unwrap_or_default(), r.metadata.name.clone().unwrap_or_default());
                            self.seen.entry(stream).or_default().insert(key);
                            index.apply_registration(&r)
                        }
                        Event::InitDone => {
                            if self.registrations_absent {
                                self.registrations_absent = false;
                                info!("the ServiceRegistration CRD is installed: watching ServiceRegistrations");
                            }
                            let seen = self.seen.remove(&stream).unwrap_or_default();
                            self.registrations_listed(&mut index, stream, seen)
                        }
                    }
                }
                Input::RegistrationsAbsent(scope) => {
                    if self.registrations_absent {
                        tracing::debug!("the ServiceRegistration CRD is still not installed");
                    } else {
                        self.registrations_absent = true;
                        warn!(
                            "the ServiceRegistration CRD is not installed: annotated pods are published, ServiceRegistrations only once it is applied (podlease crd | kubectl apply -f -)"
                        );
                    }
                    // The CRD is gone, so are its objects: an empty list of this scope.
                    self.seen.remove(&(false, scope.clone()));
                    self.registrations_listed(&mut index, (false, scope), HashSet::new())
                }
            }
        };
        if let Some(term) = &self.term {
            if changes.holds {
                let _ = term.cmd_tx.send(Command::Holds(self.index.lock().unwrap().holds()));
            }
            for u in changes.updates {
                let _ = term.cmd_tx.send(Command::Update(u));
            }
        }
        for k in changes.registrations {
            let _ = self.signal_tx.send(Signal::Dirty(k));
        }
        for p in changes.problems {
            // A short podlease.io/ttl is published all the same: warned about, not invalid.
            if p.kind == crate::desired::ProblemKind::Invalid {
                self.metrics.invalid_annotations.inc();
            }
            let _ = self.signal_tx.send(Signal::Problem(p));
        }
        for k in changes.gated {
            let _ = self.signal_tx.send(Signal::Gate(k));
        }
        self.metrics.set_gate_counts(self.index.lock().unwrap().gate_counts());
    }
}

impl Feed {
    /// A registration stream finished a list that showed `seen`: the registrations of its
    /// scope that it did not show are gone.
    fn registrations_listed(&mut self, index: &mut Index, stream: (bool, Option<String>), seen: HashSet<(String, String)>) -> Changes {
        let scope = &stream.1;
        let gone: Vec<(String, String)> =
            index.registrations().filter(|(ns, _)| scope.as_ref().is_none_or(|s| s == ns)).filter(|k| !seen.contains(*k)).cloned().collect();
        let mut all = Changes::default();
        for (ns, name) in gone {
            merge(&mut all, index.delete_registration(&ns, &name));
        }
        self.synced_streams.insert(stream);
        if self.synced() {
            self.listed_at = Some(std::time::Instant::now());
        }
        all
    }
}

/// Says at start whether the ServiceRegistration CRD is the one this binary generates (Helm
/// never upgrades a chart's CRDs). An absent CRD is said by the watch, which notices it too.
async fn report_crd(client: Client) {
    use crate::kubernetes::crd::{self, Installed};
    match crd::installed(&client).await {
        Ok(Installed::Current) => info!(crd = crd::name(), "the ServiceRegistration CRD is this version's"),
        Ok(Installed::Absent) => {}
        Ok(Installed::Differs(d)) => warn!(
            crd = crd::name(),
            "the installed ServiceRegistration CRD is not this version's ({d}); Helm does not upgrade CRDs: podlease crd | kubectl apply -f -"
        ),
        Err(e) => warn!(crd = crd::name(), "cannot read the ServiceRegistration CRD ({e}); without get on it, a missing CRD is not told from a starting API server"),
    }
}

fn merge(into: &mut Changes, from: Changes) {
    into.updates.extend(from.updates);
    into.registrations.extend(from.registrations);
    into.problems.extend(from.problems);
    into.gated.extend(from.gated);
    into.holds |= from.holds;
}

/// The start-up steps before the controller runs: each is retried until it succeeds, the
/// reason shown on /readyz and in the log, unless it fails for good.
struct Start<'a> {
    health: &'a http::Health,
    shutdown: &'a CancellationToken,
}

enum Step {
    /// May go away by itself (etcd or the API server not answering yet): try again.
    Retry(String),
    /// A configuration to fix: stop.
    Fatal(anyhow::Error),
}

impl Start<'_> {
    async fn step<T, F, Fut>(&self, what: &str, mut attempt: F) -> anyhow::Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, Step>>,
    {
        *self.health.starting.lock().unwrap() = Some(what.to_string());
        let mut backoff = crate::registry::lease::Backoff::default();
        loop {
            match attempt().await {
                Ok(v) => return Ok(v),
                Err(Step::Fatal(e)) => return Err(e),
                Err(Step::Retry(e)) => {
                    let d = backoff.next();
                    warn!(error = %e, retry_in = ?d, "{what} failed");
                    *self.health.starting.lock().unwrap() = Some(format!("{what}: {e}"));
                    tokio::select! {
                        _ = self.shutdown.cancelled() => anyhow::bail!("shut down while {what}"),
                        _ = tokio::time::sleep(d) => {}
                    }
                }
            }
        }
    }
}
