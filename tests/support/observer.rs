//! An independent observer for fault tests: it records, each with its own local time, every
//! etcd event (its own watch over all registry members, with previous values, resumed from
//! the last seen revision + 1 after any error so no event is ever missed), every pod
//! transition and every ServiceRegistration change (its own kube-runtime watchers, straight
//! to the apiserver, not through any fault proxy), and the notes the test adds (faults).
//!
//! From that log it checks the invariants of the failure model (see `check_*`); every
//! violation prints with the log around it, times relative to the observer's start.
//!
//! The observer knows podlease's rules only as a user would: the publication rule (Ready,
//! not terminating, has an IP, not Succeeded/Failed), the json key layout
//! `<prefix>/<service>/<namespace>/<pod>`, ownership records
//! `<owner-prefix>/<cluster-id>/<namespace>/<pod>/<registration or @annotations>` and the
//! fence key `<owner-prefix>/<cluster-id>`. It assumes every registration it watches has a
//! service name of its own.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{Client as Etcd, ConnectOptions, EventType, GetOptions, WatchOptions};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::utils::Backoff;
use kube::runtime::watcher::{self, Event};
use podlease::format::Format;
use podlease::registration::{FINALIZER, ServiceRegistration};
use tokio::task::AbortHandle;

use super::{DEADLINE, background, client_from};

/// A DELETE within this long after the cause (pod no longer publishable, registration gone
/// or changed) is that cause's doing: the observer's watches and podlease's do not see a
/// change at the same instant.
pub const CAUSE_SLACK: Duration = Duration::from_secs(3);

/// How long after one of its watches is back the observer's view may still be catching up
/// (the relist that follows).
pub const RELIST_SLACK: Duration = Duration::from_secs(5);

/// The shortest cut from etcd after which a lease may expire legitimately. A lease is
/// renewed every TTL/3, so when every replica loses etcd it has between 2/3 TTL and TTL
/// left; a cut longer than 2/3 TTL (less a second for renewal round trips) may expire it.
/// (A cut "longer than the TTL" would leave cuts of 2/3..1 TTL unexcused although no
/// writer could have prevented the expiry.)
///
/// After the cut heals the survivors still need a reconnect (probe, fresh keepalive
/// connection, adoption read) before their first renewal: the README's failure model allows
/// for it (about 8 s), and so does this excuse. Seen in CI: a leader paused and the standby
/// blackholed together for 20.6 s left a 35 s-TTL lease 3.9 s after the heal, too little.
pub fn cut_excuses_expiry_after(ttl_seconds: i64) -> Duration {
    Duration::from_secs((ttl_seconds * 2 / 3).max(1) as u64).saturating_sub(RECONNECT).max(Duration::from_secs(1))
}

/// What a replica needs after etcd is back before its first renewal (see the README).
pub const RECONNECT: Duration = Duration::from_secs(8);

const ANNOTATION_SERVICE: &str = "podlease.io/service";
const ANNOTATION_PORT: &str = "podlease.io/port";
const ANNOTATION_TTL: &str = "podlease.io/ttl";
const ANNOTATIONS_SEGMENT: &str = "@annotations";
const DEFAULT_PREFIX: &str = "/services";

/// What the observer needs to know about the installation it watches.
#[derive(Debug, Clone)]
pub struct ObserverConfig {
    /// Every member of the registry etcd.
    pub etcd_endpoints: Vec<String>,
    /// A kubeconfig straight to the apiserver.
    pub kubeconfig: PathBuf,
    /// The namespace whose pods and ServiceRegistrations are watched.
    pub namespace: String,
    pub cluster_id: String,
    /// The install id of the controllers under test (the harness's default).
    pub install_id: String,
    pub owner_prefix: String,
    /// podlease's --default-ttl (annotated pods without podlease.io/ttl).
    pub default_ttl: i64,
    /// podlease's --shared-service names (not claimed).
    pub shared: Vec<String>,
}

impl ObserverConfig {
    pub fn new(
        etcd_endpoints: Vec<String>,
        kubeconfig: PathBuf,
        namespace: &str,
        cluster_id: &str,
    ) -> ObserverConfig {
        ObserverConfig {
            etcd_endpoints,
            kubeconfig,
            namespace: namespace.into(),
            cluster_id: cluster_id.into(),
            install_id: podlease::registry::DEFAULT_INSTALL_ID.into(),
            owner_prefix: "/podlease/owners".into(),
            default_ttl: podlease::registration::DEFAULT_TTL_SECONDS,
            shared: Vec::new(),
        }
    }

    fn owner_root(&self) -> String {
        format!("{}/", self.fence_key())
    }

    /// The leader's fence key (the install's identity path).
    pub fn fence_key(&self) -> String {
        format!(
            "{}/{}/{}",
            self.owner_prefix.trim_end_matches('/'),
            self.cluster_id,
            self.install_id
        )
    }
}

/// A pod as far as publication goes.
#[derive(Debug, Clone, PartialEq)]
pub struct PodState {
    pub uid: String,
    pub labels: BTreeMap<String, String>,
    /// Only the `podlease.io/` annotations.
    pub annotations: BTreeMap<String, String>,
    pub ip: Option<String>,
    pub ports: Vec<(Option<String>, i32)>,
    pub ready: bool,
    pub terminating: bool,
    pub phase: String,
}

impl PodState {
    fn from_pod(p: &Pod) -> PodState {
        let status = p.status.as_ref();
        PodState {
            uid: p.metadata.uid.clone().unwrap_or_default(),
            labels: p.metadata.labels.clone().unwrap_or_default(),
            annotations: p
                .metadata
                .annotations
                .iter()
                .flatten()
                .filter(|(k, _)| k.starts_with("podlease.io/"))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            ip: status
                .and_then(|s| s.pod_ip.clone())
                .filter(|ip| !ip.is_empty()),
            ports: p
                .spec
                .iter()
                .flat_map(|s| s.containers.iter())
                .flat_map(|c| c.ports.iter().flatten())
                .map(|port| (port.name.clone(), port.container_port))
                .collect(),
            ready: status
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True")),
            terminating: p.metadata.deletion_timestamp.is_some(),
            phase: status.and_then(|s| s.phase.clone()).unwrap_or_default(),
        }
    }

    /// The EndpointSlice rule: Ready, not terminating, has an IP, not finished.
    pub fn publishable(&self) -> bool {
        self.ready
            && !self.terminating
            && self.ip.is_some()
            && self.phase != "Succeeded"
            && self.phase != "Failed"
    }

    fn port(&self, want: Option<&IntOrString>) -> Option<i32> {
        match want {
            Some(IntOrString::Int(n)) => Some(*n),
            Some(IntOrString::String(s)) => match s.parse::<i32>() {
                Ok(n) => Some(n),
                Err(_) => self
                    .ports
                    .iter()
                    .find(|(n, _)| n.as_deref() == Some(s.as_str()))
                    .map(|(_, p)| *p),
            },
            None => self.ports.first().map(|(_, p)| *p),
        }
    }
}

/// A ServiceRegistration as far as publication goes.
#[derive(Debug, Clone, PartialEq)]
pub struct RegState {
    pub uid: String,
    pub service: String,
    pub prefix: String,
    pub json: bool,
    /// Its service is claimed (every format but skydns).
    pub claimed: bool,
    pub selector: LabelSelector,
    pub ttl: i64,
    pub port: Option<IntOrString>,
    pub publish_not_ready: bool,
    pub finalizers: Vec<String>,
    pub deleting: bool,
}

impl RegState {
    fn from_reg(r: &ServiceRegistration) -> RegState {
        let name = r.metadata.name.clone().unwrap_or_default();
        RegState {
            uid: r.metadata.uid.clone().unwrap_or_default(),
            service: r.spec.service.clone().unwrap_or(name),
            prefix: r
                .spec
                .prefix
                .clone()
                .unwrap_or_else(|| DEFAULT_PREFIX.into())
                .trim_end_matches('/')
                .to_string(),
            json: r.spec.format == Format::Json,
            claimed: r.spec.format != Format::Skydns,
            selector: r.spec.selector.clone(),
            ttl: r.spec.ttl_seconds,
            port: r.spec.port.clone(),
            publish_not_ready: r.spec.publish_not_ready,
            finalizers: r.metadata.finalizers.clone().unwrap_or_default(),
            deleting: r.metadata.deletion_timestamp.is_some(),
        }
    }

    fn live(&self) -> bool {
        !self.deleting
    }

    fn selects(&self, pod: &PodState) -> bool {
        selector_matches(&self.selector, &pod.labels)
    }
}

/// Label selector semantics (matchLabels and matchExpressions, ANDed).
pub fn selector_matches(sel: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let labels_ok = sel
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let exprs_ok = sel.match_expressions.iter().flatten().all(|e| {
        let values = e.values.clone().unwrap_or_default();
        match e.operator.as_str() {
            "In" => labels.get(&e.key).is_some_and(|v| values.contains(v)),
            "NotIn" => labels.get(&e.key).is_none_or(|v| !values.contains(v)),
            "Exists" => labels.contains_key(&e.key),
            "DoesNotExist" => !labels.contains_key(&e.key),
            _ => false,
        }
    });
    labels_ok && exprs_ok
}

/// One etcd event.
#[derive(Debug, Clone)]
pub struct EtcdEvent {
    pub put: bool,
    pub key: String,
    pub value: String,
    pub lease: i64,
    /// The revision of the change.
    pub revision: i64,
    pub prev_value: Option<String>,
    pub prev_lease: Option<i64>,
}

/// What happened.
#[derive(Debug, Clone)]
pub enum Record {
    Etcd(EtcdEvent),
    /// A pod changed as far as publication goes; `None`: deleted.
    Pod {
        name: String,
        state: Option<PodState>,
    },
    /// A ServiceRegistration changed; `None`: deleted.
    Registration {
        name: String,
        state: Option<RegState>,
    },
    /// Something the test did (a fault, a heal, an action).
    Note(String),
    /// The observer's own trouble (a watch error, a resumed watch).
    Watch(String),
    /// The result of the I5 check at a finalizer release.
    Check(String),
}

#[derive(Debug, Clone)]
pub struct Entry {
    /// Since the observer started.
    pub at: Duration,
    pub what: Record,
}

/// A broken invariant, with when it happened (for the log around it).
#[derive(Debug, Clone)]
pub struct Violation {
    pub invariant: &'static str,
    pub at: Option<Duration>,
    pub message: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.at {
            Some(at) => write!(
                f,
                "{} at +{:.3}s: {}",
                self.invariant,
                at.as_secs_f64(),
                self.message
            ),
            None => write!(f, "{}: {}", self.invariant, self.message),
        }
    }
}

#[derive(Default)]
struct State {
    log: Vec<Entry>,
    pods: BTreeMap<String, PodState>,
    regs: BTreeMap<String, RegState>,
    /// Registrations whose finalizer release was already checked (by uid).
    released: HashSet<String>,
    /// Seeded foreign keys and their values.
    foreign: BTreeMap<String, String>,
    /// Replicas (by slot) and whether each is cut from etcd now.
    cut: BTreeMap<String, bool>,
    quorum_lost: bool,
    /// Intervals during which every replica was cut from etcd; the last may be open.
    all_cut: Vec<(Duration, Option<Duration>)>,
    violations: Vec<Violation>,
    last_revision: i64,
}

impl State {
    fn push(&mut self, at: Duration, what: Record) {
        self.log.push(Entry { at, what });
    }

    fn all_cut_now(&self) -> bool {
        self.quorum_lost || (!self.cut.is_empty() && self.cut.values().all(|c| *c))
    }
}

/// The observer. Its tasks run on the support's background runtime and stop when it drops.
pub struct Observer {
    cfg: ObserverConfig,
    t0: Instant,
    start_revision: i64,
    state: Arc<Mutex<State>>,
    etcd: Etcd,
    tasks: Vec<AbortHandle>,
}

impl Drop for Observer {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// A quick, steady retry: the observer must not fall behind after an apiserver restart.
struct Steady;
impl Iterator for Steady {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        Some(Duration::from_millis(250))
    }
}
impl Backoff for Steady {
    fn reset(&mut self) {}
}

async fn connect_etcd(endpoints: &[String]) -> Etcd {
    // Pings no more often than etcd's --grpc-keepalive-min-time (5 s) allows, or etcd
    // closes the connection for pinging too much.
    let opts = ConnectOptions::new()
        .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
        .with_keep_alive_while_idle(true)
        .with_connect_timeout(Duration::from_secs(2))
        .with_timeout(Duration::from_secs(5));
    Etcd::connect(endpoints, Some(opts)).await.expect("observer: connect etcd")
}

/// Runs `f` on the background runtime and waits for it.
async fn on_background<T: Send + 'static>(
    f: impl std::future::Future<Output = T> + Send + 'static,
) -> T {
    background().spawn(f).await.expect("observer task")
}

impl Observer {
    /// Starts watching etcd from its current revision, and pods and ServiceRegistrations
    /// from their current state (the first listing is recorded too); returns once every
    /// watch has started.
    pub async fn start(cfg: ObserverConfig) -> Observer {
        let t0 = Instant::now();
        let state: Arc<Mutex<State>> = Arc::default();
        let endpoints = cfg.etcd_endpoints.clone();
        let etcd = on_background(async move { connect_etcd(&endpoints).await }).await;
        let start_revision = {
            let mut kv = etcd.kv_client();
            let resp = on_background(async move {
                kv.get("\0", Some(GetOptions::new().with_keys_only().with_limit(1)))
                    .await
            })
            .await
            .expect("observer: etcd revision");
            resp.header().map(|h| h.revision()).unwrap_or(0)
        };
        state.lock().unwrap().last_revision = start_revision;
        let mut tasks = Vec::new();
        let (etcd_ready_tx, etcd_ready) = tokio::sync::oneshot::channel();
        tasks.push(
            background()
                .spawn(watch_etcd(
                    etcd.clone(),
                    start_revision + 1,
                    state.clone(),
                    t0,
                    etcd_ready_tx,
                ))
                .abort_handle(),
        );
        let kube = {
            let path = cfg.kubeconfig.clone();
            on_background(async move { client_from(&path).await }).await
        };
        let (pods_ready_tx, pods_ready) = tokio::sync::oneshot::channel();
        tasks.push(
            background()
                .spawn(watch_pods(
                    Api::namespaced(kube.clone(), &cfg.namespace),
                    state.clone(),
                    t0,
                    pods_ready_tx,
                ))
                .abort_handle(),
        );
        let (regs_ready_tx, regs_ready) = tokio::sync::oneshot::channel();
        tasks.push(
            background()
                .spawn(watch_registrations(
                    Api::namespaced(kube, &cfg.namespace),
                    state.clone(),
                    t0,
                    cfg.clone(),
                    etcd.clone(),
                    regs_ready_tx,
                ))
                .abort_handle(),
        );
        let all = async {
            let _ = etcd_ready.await;
            let _ = pods_ready.await;
            let _ = regs_ready.await;
        };
        tokio::time::timeout(DEADLINE, all)
            .await
            .expect("observer: watches did not start (is the CRD applied?)");
        Observer {
            cfg,
            t0,
            start_revision,
            state,
            etcd,
            tasks,
        }
    }

    pub fn config(&self) -> &ObserverConfig {
        &self.cfg
    }

    /// The observer's clock: time since it started.
    pub fn now(&self) -> Duration {
        self.t0.elapsed()
    }

    /// When the observer started (the origin of every time it prints).
    pub fn t0(&self) -> Instant {
        self.t0
    }

    /// The etcd revision the watch started after.
    pub fn start_revision(&self) -> i64 {
        self.start_revision
    }

    /// Adds a line to the log (a fault injected, healed, an action by the test).
    pub fn note(&self, text: impl Into<String>) {
        let at = self.now();
        self.state
            .lock()
            .unwrap()
            .push(at, Record::Note(text.into()));
    }

    /// A copy of the log so far.
    pub fn entries(&self) -> Vec<Entry> {
        self.state.lock().unwrap().log.clone()
    }

    /// Every etcd event so far.
    pub fn etcd_events(&self) -> Vec<(Duration, EtcdEvent)> {
        self.entries()
            .into_iter()
            .filter_map(|e| match e.what {
                Record::Etcd(ev) => Some((e.at, ev)),
                _ => None,
            })
            .collect()
    }

    /// The last etcd revision the watch has delivered.
    pub fn last_revision(&self) -> i64 {
        self.state.lock().unwrap().last_revision
    }

    /// Waits until the watch has delivered revision `rev` (so the log is complete up to it).
    pub async fn caught_up_to(&self, rev: i64, deadline: Duration) -> bool {
        let start = Instant::now();
        while self.last_revision() < rev {
            if start.elapsed() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    /// Waits until the log holds everything etcd has now.
    pub async fn catch_up(&self, deadline: Duration) -> bool {
        let start = Instant::now();
        match self.revision(deadline).await {
            Ok(rev) => {
                self.caught_up_to(rev, deadline.saturating_sub(start.elapsed()))
                    .await
            }
            Err(_) => false,
        }
    }

    /// etcd's current revision, read again until `deadline` while a read fails: after a
    /// member was down, the client's first request to it may fail with the connect error
    /// its channel kept from then (tonic), although the member serves again.
    async fn revision(&self, deadline: Duration) -> Result<i64, String> {
        let start = Instant::now();
        loop {
            let mut kv = self.etcd.kv_client();
            let read = on_background(async move {
                tokio::time::timeout(
                    Duration::from_secs(5),
                    kv.get("\0", Some(GetOptions::new().with_keys_only().with_limit(1))),
                )
                .await
            })
            .await;
            let err = match read {
                Ok(Ok(r)) => return Ok(r.header().map(|h| h.revision()).unwrap_or(0)),
                Ok(Err(e)) => e.to_string(),
                Err(_) => "timed out".to_string(),
            };
            if start.elapsed() >= deadline {
                return Err(err);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Why the log is behind etcd: the revisions on both sides, the watch's own troubles and
    /// the observer's violations (a compaction ends the watch), for a failed `catch_up`.
    pub async fn lag_report(&self) -> String {
        let etcd = match self.revision(Duration::from_secs(10)).await {
            Ok(r) => r.to_string(),
            Err(e) => format!("unreadable for 10 s ({e})"),
        };
        let st = self.state.lock().unwrap();
        let mut out = format!("etcd at revision {etcd}, the observer's log at {}", st.last_revision);
        let troubles: Vec<String> = st
            .log
            .iter()
            .filter_map(|e| match &e.what {
                Record::Watch(m) => Some(format!("{:.1?} {m}", e.at)),
                _ => None,
            })
            .collect();
        for t in troubles.iter().rev().take(10).rev() {
            out.push_str(&format!("\n  watch: {t}"));
        }
        for v in st.violations.iter().filter(|v| v.invariant == "observer") {
            out.push_str(&format!("\n  {}", v.message));
        }
        out
    }

    /// Puts foreign keys (no lease) that podlease must never touch (I4), and records them.
    pub async fn seed_foreign(&self, kvs: &[(&str, &str)]) {
        for (k, v) in kvs {
            self.state
                .lock()
                .unwrap()
                .foreign
                .insert(k.to_string(), v.to_string());
            let mut kv = self.etcd.kv_client();
            let (k, v) = (k.to_string(), v.to_string());
            on_background(async move { kv.put(k, v, None).await })
                .await
                .expect("seed foreign key");
        }
    }

    pub fn foreign_keys(&self) -> BTreeMap<String, String> {
        self.state.lock().unwrap().foreign.clone()
    }

    /// Names a replica (a slot, e.g. "a") whose cut from etcd the test reports with `set_cut`.
    pub fn track_replica(&self, replica: &str) {
        self.state
            .lock()
            .unwrap()
            .cut
            .insert(replica.to_string(), false);
    }

    /// Whether `replica` can reach etcd right now: it is cut while every etcd proxy of it
    /// blackholes, while it is SIGSTOPped, and while it is dead (killed, not restarted yet).
    pub fn set_cut(&self, replica: &str, cut: bool) {
        self.set_cut_at(replica, cut, self.now());
    }

    /// As `set_cut`, at `at` (not before the last change recorded): for a change that was
    /// due at `at` and is handled later.
    pub fn set_cut_at(&self, replica: &str, cut: bool, at: Duration) {
        let mut st = self.state.lock().unwrap();
        let at = at.max(st.all_cut.last().map_or(Duration::ZERO, |(a, b)| b.unwrap_or(*a)));
        let before = st.all_cut_now();
        if st.cut.insert(replica.to_string(), cut) == Some(cut) {
            return;
        }
        Self::update_all_cut(&mut st, at, before);
    }

    /// etcd has lost its quorum (counts as every replica cut).
    pub fn set_quorum_lost(&self, lost: bool) {
        let at = self.now();
        let mut st = self.state.lock().unwrap();
        let before = st.all_cut_now();
        st.quorum_lost = lost;
        Self::update_all_cut(&mut st, at, before);
    }

    fn update_all_cut(st: &mut State, at: Duration, before: bool) {
        let now = st.all_cut_now();
        if now && !before {
            st.all_cut.push((at, None));
            st.push(at, Record::Note("every replica is cut from etcd".into()));
        } else if before && !now {
            if let Some(last) = st.all_cut.last_mut() {
                last.1 = Some(at);
            }
            st.push(at, Record::Note("a replica reaches etcd again".into()));
        }
    }

    /// Intervals during which every replica was cut from etcd (an open one ends now).
    pub fn all_cut_intervals(&self) -> Vec<(Duration, Duration)> {
        let now = self.now();
        self.state
            .lock()
            .unwrap()
            .all_cut
            .iter()
            .map(|(a, b)| (*a, b.unwrap_or(now)))
            .collect()
    }

    /// The replica the fence key names now (the last fence write seen).
    pub fn fence_holder(&self) -> Option<String> {
        let fence = self.cfg.fence_key();
        let st = self.state.lock().unwrap();
        for e in st.log.iter().rev() {
            if let Record::Etcd(ev) = &e.what
                && ev.key == fence
            {
                return ev.put.then(|| fence_identity(&ev.value).to_string());
            }
        }
        None
    }

    /// The current pods (by name) and registrations (by name), as last observed.
    pub fn current(&self) -> (BTreeMap<String, PodState>, BTreeMap<String, RegState>) {
        let st = self.state.lock().unwrap();
        (st.pods.clone(), st.regs.clone())
    }

    // ---- invariants -------------------------------------------------------------------

    /// I1: no DELETE of a pod's key while the pod stayed publishable. A DELETE of key K (of
    /// service S, pod P) at t is a violation unless, at some time in [K's last PUT, t + 3 s],
    /// P was not publishable or gone, or no live registration (or annotation) of S selected
    /// it, or every replica had been cut from etcd long enough for K's lease to expire
    /// (`cut_excuses_expiry_after`). An apiserver outage is no excuse. Also excused: P
    /// stopped being published within 3 s before t but before K's last PUT, and after K's
    /// previous DELETE (a drop podlease had not answered yet; see `unanswered_drop`).
    pub fn check_i1(&self) -> Vec<Violation> {
        self.scan_deletes().0
    }

    /// Every DELETE of a pod's key that I1 let pass, with the reason: (time, key, why).
    pub fn deletes_explained(&self) -> Vec<(Duration, String, String)> {
        self.scan_deletes().1
    }

    fn scan_deletes(&self) -> (Vec<Violation>, Vec<(Duration, String, String)>) {
        let st = self.state.lock().unwrap();
        let log = &st.log;
        let now = self.t0.elapsed();
        let all_cut: Vec<(Duration, Duration)> = st
            .all_cut
            .iter()
            .map(|(a, b)| (*a, b.unwrap_or(now)))
            .collect();
        let mut prefixes: BTreeSet<String> = BTreeSet::from([DEFAULT_PREFIX.to_string()]);
        for e in log {
            if let Record::Registration { state: Some(r), .. } = &e.what {
                prefixes.insert(r.prefix.clone());
            }
        }
        // While the observer's own pod or registration watch is down it cannot see a cause:
        // a change it learns of when the watch is back (and has listed) may be that old.
        let mut blind: Vec<(Duration, Duration)> = Vec::new();
        let mut down_since: HashMap<&str, Duration> = HashMap::new();
        for e in log {
            let Record::Watch(msg) = &e.what else { continue };
            for kind in ["pod watch", "ServiceRegistration watch"] {
                if msg.starts_with(&format!("{kind}:")) {
                    down_since.entry(kind).or_insert(e.at);
                } else if msg == &format!("{kind} back")
                    && let Some(from) = down_since.remove(kind)
                {
                    blind.push((from, e.at + RELIST_SLACK));
                }
            }
        }
        blind.extend(down_since.values().map(|from| (*from, now)));
        let mut last_put: HashMap<&str, Duration> = HashMap::new();
        let mut last_delete: HashMap<&str, Duration> = HashMap::new();
        let (mut bad, mut fine) = (Vec::new(), Vec::new());
        for e in log {
            let Record::Etcd(ev) = &e.what else { continue };
            if ev.put {
                last_put.insert(&ev.key, e.at);
                continue;
            }
            if st.foreign.contains_key(&ev.key) {
                continue; // I4's business
            }
            let Some((prefix, svc, ns, pod)) = parse_service_key(&ev.key, &prefixes) else {
                continue;
            };
            if ns != self.cfg.namespace {
                continue;
            }
            let from = last_put
                .get(ev.key.as_str())
                .copied()
                .unwrap_or(Duration::ZERO);
            let previous_delete = last_delete.insert(ev.key.as_str(), e.at);
            let to = blind
                .iter()
                .filter(|(from, until)| *from <= e.at + CAUSE_SLACK && *until + CAUSE_SLACK >= e.at)
                .map(|(_, until)| *until + CAUSE_SLACK)
                .fold(e.at + CAUSE_SLACK, Duration::max);
            // The drop must come after the key's previous DELETE: one podlease has answered
            // already explains nothing.
            let since = e.at.saturating_sub(CAUSE_SLACK).max(previous_delete.unwrap_or_default());
            let why = excuse(log, &prefix, &svc, &pod, from, to, self.cfg.default_ttl, &all_cut, e.at)
                .or_else(|| unanswered_drop(log, &prefix, &svc, &pod, since, from));
            match why {
                Some(why) => fine.push((e.at, ev.key.clone(), why)),
                None => bad.push(Violation {
                    invariant: "I1",
                    at: Some(e.at),
                    message: format!(
                        "DELETE of {} (revision {}, lease {:x}) while pod {pod} stayed publishable and selected for service {svc} since the key's last PUT at +{:.3}s",
                        ev.key,
                        ev.revision,
                        ev.prev_lease.unwrap_or(0),
                        from.as_secs_f64()
                    ),
                }),
            }
        }
        (bad, fine)
    }

    /// The exact etcd contents expected now: every publishable pod of a live registration
    /// (and every annotated one) with its key, value, lease TTL and ownership record, the
    /// fence key naming one of `replicas`, the foreign keys as seeded, and nothing else.
    /// Returns the differences (empty: converged).
    pub async fn diff_i2(&self, etcd: &Etcd, replicas: &[String]) -> Vec<String> {
        let (pods, regs) = self.current();
        let foreign = self.foreign_keys();
        let want = expected(&self.cfg, &pods, &regs);
        // A failed read is not a difference: read again (a member that was down may fail
        // the client's first request with a stale connect error) for up to 10 s.
        let start = Instant::now();
        let all = loop {
            let mut kv = etcd.kv_client();
            let err = match tokio::time::timeout(
                Duration::from_secs(5),
                kv.get("\0", Some(GetOptions::new().with_all_keys())),
            )
            .await
            {
                Ok(Ok(r)) => break r,
                Ok(Err(e)) => format!("reading etcd failed: {e}"),
                Err(_) => "reading etcd timed out".to_string(),
            };
            if start.elapsed() >= Duration::from_secs(10) {
                return vec![format!("{err} (for 10 s)")];
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let got: BTreeMap<String, (String, i64)> = all
            .kvs()
            .iter()
            .map(|kv| {
                (
                    String::from_utf8_lossy(kv.key()).to_string(),
                    (String::from_utf8_lossy(kv.value()).to_string(), kv.lease()),
                )
            })
            .collect();
        let mut leases: HashMap<i64, (i64, i64)> = HashMap::new();
        let mut lc = etcd.lease_client();
        for (_, lease) in got.values() {
            if *lease != 0 && !leases.contains_key(lease) {
                match tokio::time::timeout(Duration::from_secs(5), lc.time_to_live(*lease, None))
                    .await
                {
                    Ok(Ok(t)) => {
                        leases.insert(*lease, (t.ttl(), t.granted_ttl()));
                    }
                    _ => return vec![format!("reading lease {lease:x} failed")],
                }
            }
        }
        let mut diff = Vec::new();
        let mut accounted: BTreeSet<&str> = BTreeSet::new();
        for (key, w) in &want {
            accounted.insert(key);
            accounted.insert(&w.owner);
            let Some((value, lease)) = got.get(key) else {
                diff.push(format!(
                    "missing {key} (pod {} is publishable, {})",
                    w.pod, w.source
                ));
                continue;
            };
            match serde_json::from_str::<serde_json::Value>(value) {
                Ok(v) => {
                    let ok = v["addr"] == w.addr.as_str()
                        && v["namespace"] == w.namespace.as_str()
                        && v["pod"] == w.pod.as_str();
                    if !ok {
                        diff.push(format!(
                            "{key} = {value}, want addr {} namespace {} pod {}",
                            w.addr, w.namespace, w.pod
                        ));
                    }
                }
                Err(e) => diff.push(format!("{key} = {value:?} is not JSON: {e}")),
            }
            match leases.get(lease) {
                _ if *lease == 0 => diff.push(format!("{key} has no lease")),
                Some((ttl, _)) if *ttl <= 0 => diff.push(format!("{key}: lease {lease:x} is gone")),
                Some((_, granted)) if *granted != w.ttl => diff.push(format!(
                    "{key}: lease {lease:x} granted {granted} s, want {} s ({})",
                    w.ttl, w.source
                )),
                _ => {}
            }
            accounted.insert(&w.claim);
            match got.get(&w.claim) {
                None => diff.push(format!("missing claim marker {} of {key}", w.claim)),
                Some((_, l)) if l != lease => diff.push(format!("claim marker {} under lease {l:x}, its key {key} under {lease:x}", w.claim)),
                _ => {}
            }
            match got.get(&w.owner) {
                None => diff.push(format!("missing ownership record {} of {key}", w.owner)),
                Some((_, l)) if l != lease => diff.push(format!(
                    "ownership record {} under lease {l:x}, its key {key} under {lease:x}",
                    w.owner
                )),
                _ => {}
            }
        }
        let fence = self.cfg.fence_key();
        accounted.insert(&fence);
        match got.get(&fence) {
            None => diff.push(format!("missing fence key {fence}")),
            Some((value, lease)) => {
                let holder = fence_identity(value);
                if !replicas.iter().any(|r| r == holder) {
                    diff.push(format!(
                        "fence key {fence} names {holder:?}, not a replica ({replicas:?})"
                    ));
                }
                if *lease == 0 || leases.get(lease).is_none_or(|(ttl, _)| *ttl <= 0) {
                    diff.push(format!(
                        "fence key {fence} is not under a live lease ({lease:x})"
                    ));
                }
            }
        }
        // Service claims: a hold per live registration and per annotated service, under the
        // claims lease the pointer names; the epoch key without a lease.
        let pointer = format!("{}@claims-", self.cfg.owner_root());
        let pointers: Vec<(&String, i64)> = got.iter().filter(|(k, _)| k.starts_with(&pointer)).map(|(k, (_, l))| (k, *l)).collect();
        if pointers.len() > 1 {
            diff.push(format!("{} claims lease pointers, want one: {pointers:?}", pointers.len()));
        }
        let claims_lease = pointers.first().map(|(_, l)| *l);
        for (k, l) in &pointers {
            accounted.insert(k.as_str());
            if **k != format!("{pointer}{l:x}") {
                diff.push(format!("claims lease pointer {k} is under lease {l:x}"));
            }
        }
        let mut holds: BTreeSet<String> = BTreeSet::new();
        let mut any_of: Vec<String> = Vec::new();
        for (rname, r) in regs.iter().filter(|(_, r)| r.live() && r.claimed && !self.cfg.shared.contains(&r.service)) {
            if r.json {
                holds.insert(claim_marker(&self.cfg, &format!("{}/{}/", r.prefix, r.service), "@hold", rname));
            } else {
                any_of.push(format!("/{}/{}/{}/@hold/{rname}", self.cfg.namespace, self.cfg.cluster_id, self.cfg.install_id));
            }
        }
        for pod in pods.values() {
            if let Some(svc) = pod.annotations.get(ANNOTATION_SERVICE).filter(|s| !self.cfg.shared.contains(s)) {
                holds.insert(claim_marker(&self.cfg, &format!("{DEFAULT_PREFIX}/{svc}/"), "@hold", ANNOTATIONS_SEGMENT));
            }
        }
        let held: Vec<&String> = got.keys().filter(|k| holds.contains(k.as_str()) || any_of.iter().any(|s| k.ends_with(s.as_str()))).collect();
        if !holds.is_empty() || !any_of.is_empty() {
            match claims_lease {
                None => diff.push(format!("missing claims lease pointer {pointer}<lease>")),
                Some(l) if l == 0 || leases.get(&l).is_none_or(|(ttl, _)| *ttl <= 0) => {
                    diff.push(format!("claims lease pointer {pointer} is not under a live lease ({l:x})"))
                }
                _ => {}
            }
        }
        for h in &holds {
            match got.get(h) {
                None => diff.push(format!("missing claim hold {h}")),
                Some((_, l)) if Some(*l) != claims_lease => diff.push(format!("claim hold {h} under lease {l:x}, not the claims lease")),
                _ => {}
            }
        }
        for k in held {
            accounted.insert(k);
        }
        let epoch = format!("{}/@claims/@epoch", self.cfg.owner_prefix.trim_end_matches('/'));
        accounted.insert(&epoch);
        for (k, v) in &foreign {
            accounted.insert(k);
            match got.get(k) {
                None => diff.push(format!("foreign key {k} is gone")),
                Some((value, lease)) if value != v || *lease != 0 => diff.push(format!(
                    "foreign key {k} = {value:?} under lease {lease:x}, seeded {v:?} without lease"
                )),
                _ => {}
            }
        }
        for (k, (v, lease)) in &got {
            if !accounted.contains(k.as_str()) {
                diff.push(format!(
                    "unexpected key {k} (lease {lease:x}) = {}",
                    clip(v, 160)
                ));
            }
        }
        diff
    }

    /// I2 by polling: waits up to `bound` for `diff_i2` to come out empty; the time it took,
    /// or a violation with the last difference.
    pub async fn wait_converged(
        &self,
        etcd: &Etcd,
        replicas: &[String],
        bound: Duration,
    ) -> Result<Duration, Violation> {
        let start = Instant::now();
        loop {
            let diff = self.diff_i2(etcd, replicas).await;
            if diff.is_empty() {
                return Ok(start.elapsed());
            }
            if start.elapsed() > bound {
                return Err(Violation {
                    invariant: "I2",
                    at: Some(self.now()),
                    message: format!(
                        "not converged {bound:?} after the last fault healed; last difference:\n    {}",
                        diff.join("\n    ")
                    ),
                });
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// I3: one writer per fence epoch, read from etcd's history alone. Every ownership record
    /// names the fence revision of the term that wrote it; each record PUT the watch saw must
    /// name the fence in force at its revision (the last PUT of the fence key before it),
    /// which only the term that wrote that fence knows. A deposed term's write, or one that
    /// skipped the fence, names an older one (or none). Returns the violations and the
    /// number of record writes checked.
    pub fn check_i3(&self) -> (Vec<Violation>, usize) {
        let fence = self.cfg.fence_key();
        let records = podlease::registry::owner::Owners::at(&fence);
        // The fence in force from each revision on: (revision, value), None once deleted.
        let mut fences: Vec<(i64, Option<String>)> = Vec::new();
        let mut out = Vec::new();
        let mut checked = 0;
        for (at, ev) in self.etcd_events() {
            if ev.key == fence {
                fences.push((ev.revision, ev.put.then(|| ev.value.clone())));
                continue;
            }
            if !ev.put || records.parse_key(&ev.key).is_none() {
                continue;
            }
            let named = serde_json::from_str::<serde_json::Value>(&ev.value).ok().and_then(|v| v.get("fence")?.as_i64());
            let in_force = fences.last().cloned();
            let Some((rev, value)) = in_force else {
                // No fence written since the watch began: the one in force is older than it.
                if named.is_none_or(|n| n > self.start_revision) {
                    out.push(Violation {
                        invariant: "I3",
                        at: Some(at),
                        message: format!("record {} written at revision {} under fence {named:?}, before any fence the watch saw", ev.key, ev.revision),
                    });
                }
                checked += 1;
                continue;
            };
            checked += 1;
            let holder = value.as_deref().map(fence_identity);
            if value.is_none() || named != Some(rev) {
                out.push(Violation {
                    invariant: "I3",
                    at: Some(at),
                    message: format!(
                        "record {} written at revision {} names fence revision {named:?}, but the fence in force was {} ({})",
                        ev.key,
                        ev.revision,
                        rev,
                        holder.map_or("deleted".to_string(), |h| format!("held by {h:?}")),
                    ),
                });
            }
        }
        if checked == 0 {
            out.push(Violation { invariant: "I3", at: None, message: "no ownership record was written: the check saw nothing".into() });
        }
        (out, checked)
    }

    /// I4: no event on a seeded foreign key after its seeding PUT.
    pub fn check_i4(&self) -> Vec<Violation> {
        let st = self.state.lock().unwrap();
        let mut seeded: HashSet<&str> = HashSet::new();
        let mut out = Vec::new();
        for e in &st.log {
            let Record::Etcd(ev) = &e.what else { continue };
            let Some(value) = st.foreign.get(&ev.key) else {
                continue;
            };
            if !seeded.contains(ev.key.as_str()) && ev.put && &ev.value == value {
                seeded.insert(&ev.key);
                continue;
            }
            out.push(Violation {
                invariant: "I4",
                at: Some(e.at),
                message: format!(
                    "foreign key {} {} (lease {:x}, value {:?}; seeded {value:?})",
                    ev.key,
                    if ev.put { "overwritten" } else { "deleted" },
                    ev.lease,
                    clip(&ev.value, 120)
                ),
            });
        }
        out
    }

    /// I5: what the live checks found when finalizers were released (keys of a released
    /// registration still in etcd at that moment).
    pub fn check_i5(&self) -> Vec<Violation> {
        self.state
            .lock()
            .unwrap()
            .violations
            .iter()
            .filter(|v| v.invariant == "I5")
            .cloned()
            .collect()
    }

    /// Trouble of the observer itself (e.g. a compacted watch: events were missed).
    pub fn observer_errors(&self) -> Vec<Violation> {
        self.state
            .lock()
            .unwrap()
            .violations
            .iter()
            .filter(|v| v.invariant == "observer")
            .cloned()
            .collect()
    }

    /// How many finalizer releases the live I5 check examined.
    pub fn i5_checks(&self) -> usize {
        self.entries()
            .iter()
            .filter(|e| matches!(e.what, Record::Check(_)))
            .count()
    }

    /// The log around `at`: `around` entries either side.
    pub fn log_around(&self, at: Option<Duration>, around: usize) -> String {
        let st = self.state.lock().unwrap();
        let log = &st.log;
        let idx = match at {
            Some(at) => log.partition_point(|e| e.at <= at),
            None => log.len(),
        };
        let from = idx.saturating_sub(around);
        let to = (idx + around).min(log.len());
        let mut s = String::new();
        for (i, e) in log[from..to].iter().enumerate() {
            let mark = if from + i + 1 == idx { ">" } else { " " };
            s.push_str(&format!("{mark} {}\n", render(e)));
        }
        s
    }

    /// Each violation with the observer's log around it (±20 entries); after the first
    /// `MAX_EXPLAINED`, one line each.
    pub fn explain(&self, violations: &[Violation]) -> String {
        const MAX_EXPLAINED: usize = 8;
        let mut s = String::new();
        for (i, v) in violations.iter().enumerate() {
            if i < MAX_EXPLAINED {
                s.push_str(&format!("{v}\n  observer log around it:\n{}\n", indent(&self.log_around(v.at, 20), "  ")));
            } else {
                s.push_str(&format!("{v}\n"));
            }
        }
        s
    }

    /// The whole log, one line per entry.
    pub fn render_log(&self) -> String {
        self.entries()
            .iter()
            .map(render)
            .collect::<Vec<_>>()
            .join("\n")
    }
}

fn indent(s: &str, by: &str) -> String {
    s.lines().map(|l| format!("{by}{l}\n")).collect()
}

fn clip(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(n).collect::<String>())
    }
}

/// One log line.
pub fn render(e: &Entry) -> String {
    let t = format!("+{:8.3}s", e.at.as_secs_f64());
    match &e.what {
        Record::Etcd(ev) if ev.put => format!(
            "{t} etcd PUT    rev={} {} lease={:x} {}",
            ev.revision,
            ev.key,
            ev.lease,
            clip(&ev.value, 100)
        ),
        Record::Etcd(ev) => format!(
            "{t} etcd DELETE rev={} {} (was lease={:x})",
            ev.revision,
            ev.key,
            ev.prev_lease.unwrap_or(0)
        ),
        Record::Pod {
            name,
            state: Some(p),
        } => format!(
            "{t} pod  {name} publishable={} ready={} terminating={} ip={} phase={} labels={:?}{}",
            p.publishable(),
            p.ready,
            p.terminating,
            p.ip.as_deref().unwrap_or("-"),
            p.phase,
            p.labels,
            if p.annotations.is_empty() {
                String::new()
            } else {
                format!(" annotations={:?}", p.annotations)
            }
        ),
        Record::Pod { name, state: None } => format!("{t} pod  {name} deleted"),
        Record::Registration {
            name,
            state: Some(r),
        } => format!(
            "{t} sreg {name} service={} ttl={} selector={} finalizers={:?} deleting={}",
            r.service,
            r.ttl,
            serde_json::to_string(&r.selector).unwrap_or_default(),
            r.finalizers,
            r.deleting
        ),
        Record::Registration { name, state: None } => format!("{t} sreg {name} deleted"),
        Record::Note(n) => format!("{t} ---- {n}"),
        Record::Watch(n) => format!("{t} (observer) {n}"),
        Record::Check(n) => format!("{t} I5 check: {n}"),
    }
}

/// `(prefix, service, namespace, pod)` of a json-format key, when it is one.
fn parse_service_key(
    key: &str,
    prefixes: &BTreeSet<String>,
) -> Option<(String, String, String, String)> {
    for p in prefixes {
        let Some(rest) = key.strip_prefix(&format!("{p}/")) else {
            continue;
        };
        let parts: Vec<&str> = rest.split('/').collect();
        if parts.len() == 3 && parts.iter().all(|s| !s.is_empty()) {
            return Some((p.clone(), parts[0].into(), parts[1].into(), parts[2].into()));
        }
    }
    None
}

/// Whether pod `pod` is published under `prefix/svc` given the pod's and the
/// registrations' states.
fn published(
    pod: Option<&PodState>,
    regs: &BTreeMap<String, RegState>,
    prefix: &str,
    svc: &str,
) -> bool {
    let Some(pod) = pod else { return false };
    let by_annotation = pod
        .annotations
        .get(ANNOTATION_SERVICE)
        .is_some_and(|s| s == svc)
        && prefix == DEFAULT_PREFIX;
    let by_registration = regs.values().any(|r| {
        r.live()
            && r.service == svc
            && r.prefix == prefix
            && r.selects(pod)
            && (pod.publishable() || (r.publish_not_ready && pod.ip.is_some() && !pod.terminating))
    });
    (pod.publishable() && by_annotation) || by_registration
}

/// Applies `e` to the replayed state of `pod` and the registrations; whether it was one.
fn apply_state(e: &Entry, pod: &str, pod_state: &mut Option<PodState>, regs: &mut BTreeMap<String, RegState>) -> bool {
    match &e.what {
        Record::Pod { name, state } if name == pod => {
            *pod_state = state.clone();
            true
        }
        Record::Registration { name, state } => {
            match state {
                Some(s) => regs.insert(name.clone(), s.clone()),
                None => regs.remove(name),
            };
            true
        }
        _ => false,
    }
}

/// A drop podlease had not answered yet when it wrote the key: `pod` went from published
/// to not published (for `svc`) in (`since`, `put`]. podlease reacts to a pod's states in
/// order, so a PUT for "ready" can land while "not ready" (the pod flapped) is still on
/// its way through its queue, and the DELETE for the flap comes next. Only a change counts:
/// a pod that was never published before the PUT (new, or before the observer saw it)
/// explains nothing.
fn unanswered_drop(log: &[Entry], prefix: &str, svc: &str, pod: &str, since: Duration, put: Duration) -> Option<String> {
    if since >= put {
        return None;
    }
    let (mut pod_state, mut regs) = (None, BTreeMap::new());
    let mut was = false;
    for e in log.iter().take_while(|e| e.at <= put) {
        if !apply_state(e, pod, &mut pod_state, &mut regs) {
            continue;
        }
        let now = published(pod_state.as_ref(), &regs, prefix, svc);
        if e.at > since && was && !now {
            return Some(format!(
                "not published at +{:.3}s, a drop not yet answered at its last PUT (+{:.3}s)",
                e.at.as_secs_f64(),
                put.as_secs_f64()
            ));
        }
        was = now;
    }
    None
}

/// Why a DELETE of `prefix/svc/<ns>/pod` at `deleted_at` is fine, if it is.
#[allow(clippy::too_many_arguments)]
fn excuse(
    log: &[Entry],
    prefix: &str,
    svc: &str,
    pod: &str,
    from: Duration,
    to: Duration,
    default_ttl: i64,
    all_cut: &[(Duration, Duration)],
    deleted_at: Duration,
) -> Option<String> {
    // Replay pod and registration states up to `from`, then through the window.
    let mut pod_state: Option<PodState> = None;
    let mut regs: BTreeMap<String, RegState> = BTreeMap::new();
    let mut ttls: Vec<i64> = Vec::new();
    let apply = |e: &Entry, pod_state: &mut Option<PodState>, regs: &mut BTreeMap<String, RegState>| apply_state(e, pod, pod_state, regs);
    let mut i = 0;
    while i < log.len() && log[i].at <= from {
        apply(&log[i], &mut pod_state, &mut regs);
        i += 1;
    }
    let ttl_now =
        |pod_state: &Option<PodState>, regs: &BTreeMap<String, RegState>| -> Option<i64> {
            let ann = pod_state
                .as_ref()
                .filter(|p| {
                    p.annotations
                        .get(ANNOTATION_SERVICE)
                        .is_some_and(|s| s == svc)
                })
                .map(|p| {
                    p.annotations
                        .get(ANNOTATION_TTL)
                        .and_then(|t| t.parse().ok())
                        .unwrap_or(default_ttl)
                });
            regs.values()
                .find(|r| r.service == svc)
                .map(|r| r.ttl)
                .or(ann)
        };
    if !published(pod_state.as_ref(), &regs, prefix, svc) {
        return Some(format!(
            "not published at its last PUT (+{:.3}s)",
            from.as_secs_f64()
        ));
    }
    ttls.extend(ttl_now(&pod_state, &regs));
    while i < log.len() && log[i].at <= to {
        if apply(&log[i], &mut pod_state, &mut regs) {
            if !published(pod_state.as_ref(), &regs, prefix, svc) {
                return Some(format!("not published at +{:.3}s", log[i].at.as_secs_f64()));
            }
            ttls.extend(ttl_now(&pod_state, &regs));
        }
        i += 1;
    }
    let ttl = ttls.into_iter().min().unwrap_or(default_ttl);
    let need = cut_excuses_expiry_after(ttl);
    for (a, b) in all_cut {
        let overlap = (*b).min(deleted_at).saturating_sub((*a).max(from));
        // A cut explains an expiry during it or within a reconnect after it; later the
        // replicas renew again, and a DELETE then has another cause.
        let late = deleted_at > *b + RECONNECT + CAUSE_SLACK;
        if overlap >= need && !late {
            return Some(format!(
                "every replica cut from etcd for {overlap:?} (TTL {ttl} s)"
            ));
        }
    }
    None
}

/// One key podlease should hold.
#[derive(Debug, Clone)]
struct Want {
    addr: String,
    namespace: String,
    pod: String,
    ttl: i64,
    owner: String,
    /// The instance's service claim marker, under the key's lease.
    claim: String,
    source: String,
}

/// The claim marker of an instance: `<owner-prefix>/@claims/<read prefix in hex>/<ns>/
/// <cluster>/<install>/<pod>/<source>`.
fn claim_marker(cfg: &ObserverConfig, read_prefix: &str, pod: &str, source: &str) -> String {
    let hex: String = read_prefix.bytes().map(|b| format!("{b:02x}")).collect();
    format!("{}/@claims/{hex}/{}/{}/{}/{pod}/{source}", cfg.owner_prefix.trim_end_matches('/'), cfg.namespace, cfg.cluster_id, cfg.install_id)
}

fn expected(
    cfg: &ObserverConfig,
    pods: &BTreeMap<String, PodState>,
    regs: &BTreeMap<String, RegState>,
) -> BTreeMap<String, Want> {
    let ns = &cfg.namespace;
    let root = cfg.owner_root();
    let mut want = BTreeMap::new();
    for (name, pod) in pods {
        let Some(ip) = &pod.ip else { continue };
        // One owner per key: the pod's annotations first, then registrations by name.
        if let Some(svc) = pod.annotations.get(ANNOTATION_SERVICE)
            && pod.publishable()
        {
            let port = pod.port(
                pod.annotations
                    .get(ANNOTATION_PORT)
                    .map(|p| IntOrString::String(p.clone()))
                    .as_ref(),
            );
            let ttl = pod
                .annotations
                .get(ANNOTATION_TTL)
                .and_then(|t| t.parse().ok())
                .unwrap_or(cfg.default_ttl);
            if let Some(port) = port {
                want.entry(format!("{DEFAULT_PREFIX}/{svc}/{ns}/{name}")).or_insert(Want {
                    addr: format!("{ip}:{port}"),
                    namespace: ns.clone(),
                    pod: name.clone(),
                    ttl,
                    owner: format!("{root}{ns}/{name}/{ANNOTATIONS_SEGMENT}"),
                    claim: claim_marker(cfg, &format!("{DEFAULT_PREFIX}/{svc}/"), name, ANNOTATIONS_SEGMENT),
                    source: format!("annotation, TTL {ttl}"),
                });
            }
        }
        for (rname, r) in regs {
            if !r.live() || !r.json || !r.selects(pod) {
                continue;
            }
            let ok = pod.publishable() || (r.publish_not_ready && !pod.terminating);
            let Some(port) = pod.port(r.port.as_ref()) else {
                continue;
            };
            if ok {
                want.entry(format!("{}/{}/{ns}/{name}", r.prefix, r.service)).or_insert(Want {
                    addr: format!("{ip}:{port}"),
                    namespace: ns.clone(),
                    pod: name.clone(),
                    ttl: r.ttl,
                    owner: format!("{root}{ns}/{name}/{rname}"),
                    claim: claim_marker(cfg, &format!("{}/{}/", r.prefix, r.service), name, rname),
                    source: format!("registration {rname}, TTL {}", r.ttl),
                });
            }
        }
    }
    want
}

/// The replica a fence key value names: the value is the identity, possibly after a
/// `<term>/` prefix (the last `/`-separated part; identities are pod names).
pub fn fence_identity(value: &str) -> &str {
    value.rsplit('/').next().unwrap_or(value)
}


fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ ... final byte in @..~
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Every podlease log in a test bed directory, as (replica identity, file): the harness
/// names them `podlease-<identity>-<run>.log`.
pub fn replica_logs(dir: &Path) -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let Some(stem) = name
            .strip_prefix("podlease-")
            .and_then(|n| n.strip_suffix(".log"))
        else {
            continue;
        };
        let Some((identity, run)) = stem.rsplit_once('-') else {
            continue;
        };
        if run.chars().all(|c| c.is_ascii_digit()) {
            out.push((identity.to_string(), entry.path()));
        }
    }
    out.sort();
    out
}

// ---- the watches ----------------------------------------------------------------------

/// How long the observer's etcd watch may be silent before it is opened again.
const QUIET_REWATCH: Duration = Duration::from_secs(10);

async fn watch_etcd(
    etcd: Etcd,
    mut next: i64,
    state: Arc<Mutex<State>>,
    t0: Instant,
    ready: tokio::sync::oneshot::Sender<()>,
) {
    let mut ready = Some(ready);
    let mut failing = false;
    loop {
        let mut wc = etcd.watch_client();
        let opts = WatchOptions::new()
            .with_all_keys()
            .with_prev_key()
            .with_start_revision(next);
        let stream = tokio::time::timeout(Duration::from_secs(5), wc.watch("\0", Some(opts))).await;
        let mut stream = match stream {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                note_trouble(
                    &state,
                    t0,
                    &mut failing,
                    format!("etcd watch from revision {next} failed: {e}"),
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            Err(_) => {
                note_trouble(
                    &state,
                    t0,
                    &mut failing,
                    format!("etcd watch from revision {next}: no answer in 5 s"),
                );
                continue;
            }
        };
        loop {
            // A stream that says nothing for a while may be stuck on a member that went away
            // without closing it: watch afresh from the next revision (nothing is lost).
            let Ok(message) = tokio::time::timeout(QUIET_REWATCH, stream.message()).await else {
                break;
            };
            match message {
                Ok(Some(resp)) => {
                    if resp.created() {
                        if let Some(r) = ready.take() {
                            let _ = r.send(());
                        }
                        if failing {
                            failing = false;
                            let at = t0.elapsed();
                            state.lock().unwrap().push(
                                at,
                                Record::Watch(format!("etcd watch resumed from revision {next}")),
                            );
                        }
                    }
                    if resp.compact_revision() > 0 {
                        let at = t0.elapsed();
                        let mut st = state.lock().unwrap();
                        st.violations.push(Violation {
                            invariant: "observer",
                            at: Some(at),
                            message: format!("etcd compacted to {} before the observer read revision {next}: events missed", resp.compact_revision()),
                        });
                        return;
                    }
                    if resp.canceled() {
                        note_trouble(
                            &state,
                            t0,
                            &mut failing,
                            format!("etcd watch canceled: {}", resp.cancel_reason()),
                        );
                        break;
                    }
                    let at = t0.elapsed();
                    let mut st = state.lock().unwrap();
                    for ev in resp.events() {
                        let Some(kv) = ev.kv() else { continue };
                        let rev = kv.mod_revision();
                        let prev = ev.prev_kv();
                        st.push(
                            at,
                            Record::Etcd(EtcdEvent {
                                put: ev.event_type() == EventType::Put,
                                key: String::from_utf8_lossy(kv.key()).to_string(),
                                value: String::from_utf8_lossy(kv.value()).to_string(),
                                lease: kv.lease(),
                                revision: rev,
                                prev_value: prev
                                    .map(|p| String::from_utf8_lossy(p.value()).to_string()),
                                prev_lease: prev.map(|p| p.lease()),
                            }),
                        );
                        next = next.max(rev + 1);
                    }
                    if let Some(h) = resp.header() {
                        // Events up to the header's revision are all delivered once a response
                        // carries none (progress); otherwise up to the last event.
                        if resp.events().is_empty() && !resp.created() {
                            next = next.max(h.revision() + 1);
                        }
                    }
                    st.last_revision = st.last_revision.max(next - 1);
                }
                Ok(None) => {
                    note_trouble(&state, t0, &mut failing, "etcd watch stream ended".into());
                    break;
                }
                Err(e) => {
                    note_trouble(&state, t0, &mut failing, format!("etcd watch broke: {e}"));
                    break;
                }
            }
        }
    }
}

/// Records the first failure of a run of failures (not every retry).
fn note_trouble(state: &Arc<Mutex<State>>, t0: Instant, failing: &mut bool, what: String) {
    if !*failing {
        *failing = true;
        let at = t0.elapsed();
        state.lock().unwrap().push(at, Record::Watch(what));
    }
}

async fn watch_pods(
    api: Api<Pod>,
    state: Arc<Mutex<State>>,
    t0: Instant,
    ready: tokio::sync::oneshot::Sender<()>,
) {
    let mut ready = Some(ready);
    let mut listing: Option<BTreeSet<String>> = None;
    let mut failing = false;
    let stream = watcher::watcher(api, watcher::Config::default()).backoff(Steady);
    let mut stream = std::pin::pin!(stream);
    while let Some(ev) = stream.next().await {
        let ev = match ev {
            Ok(ev) => ev,
            Err(e) => {
                note_trouble(&state, t0, &mut failing, format!("pod watch: {e}"));
                continue;
            }
        };
        if failing {
            failing = false;
            state
                .lock()
                .unwrap()
                .push(t0.elapsed(), Record::Watch("pod watch back".into()));
        }
        let at = t0.elapsed();
        let mut st = state.lock().unwrap();
        match ev {
            Event::Init => listing = Some(BTreeSet::new()),
            Event::InitApply(p) | Event::Apply(p) => {
                let name = p.metadata.name.clone().unwrap_or_default();
                if let Some(l) = listing.as_mut() {
                    l.insert(name.clone());
                }
                let s = PodState::from_pod(&p);
                if st.pods.get(&name) != Some(&s) {
                    st.pods.insert(name.clone(), s.clone());
                    st.push(
                        at,
                        Record::Pod {
                            name,
                            state: Some(s),
                        },
                    );
                }
            }
            Event::Delete(p) => {
                let name = p.metadata.name.clone().unwrap_or_default();
                if st.pods.remove(&name).is_some() {
                    st.push(at, Record::Pod { name, state: None });
                }
            }
            Event::InitDone => {
                if let Some(listed) = listing.take() {
                    let gone: Vec<String> = st
                        .pods
                        .keys()
                        .filter(|n| !listed.contains(*n))
                        .cloned()
                        .collect();
                    for name in gone {
                        st.pods.remove(&name);
                        st.push(at, Record::Pod { name, state: None });
                    }
                }
                if let Some(r) = ready.take() {
                    let _ = r.send(());
                }
            }
        }
    }
}

async fn watch_registrations(
    api: Api<ServiceRegistration>,
    state: Arc<Mutex<State>>,
    t0: Instant,
    cfg: ObserverConfig,
    etcd: Etcd,
    ready: tokio::sync::oneshot::Sender<()>,
) {
    let mut ready = Some(ready);
    let mut listing: Option<BTreeSet<String>> = None;
    let mut failing = false;
    let stream = watcher::watcher(api, watcher::Config::default()).backoff(Steady);
    let mut stream = std::pin::pin!(stream);
    while let Some(ev) = stream.next().await {
        let ev = match ev {
            Ok(ev) => ev,
            Err(e) => {
                note_trouble(
                    &state,
                    t0,
                    &mut failing,
                    format!("ServiceRegistration watch: {e}"),
                );
                continue;
            }
        };
        if failing {
            failing = false;
            state.lock().unwrap().push(
                t0.elapsed(),
                Record::Watch("ServiceRegistration watch back".into()),
            );
        }
        let at = t0.elapsed();
        // Registrations whose finalizer was released by this event: (name, last state).
        let mut released: Vec<(String, RegState)> = Vec::new();
        {
            let mut st = state.lock().unwrap();
            match ev {
                Event::Init => listing = Some(BTreeSet::new()),
                Event::InitApply(r) | Event::Apply(r) => {
                    let name = r.metadata.name.clone().unwrap_or_default();
                    if let Some(l) = listing.as_mut() {
                        l.insert(name.clone());
                    }
                    let s = RegState::from_reg(&r);
                    if st.regs.get(&name) != Some(&s) {
                        st.regs.insert(name.clone(), s.clone());
                        st.push(
                            at,
                            Record::Registration {
                                name: name.clone(),
                                state: Some(s.clone()),
                            },
                        );
                    }
                    if s.deleting
                        && !s.finalizers.iter().any(|f| f == FINALIZER)
                        && st.released.insert(s.uid.clone())
                    {
                        released.push((name, s));
                    }
                }
                Event::Delete(r) => {
                    let name = r.metadata.name.clone().unwrap_or_default();
                    if let Some(s) = st.regs.remove(&name) {
                        st.push(
                            at,
                            Record::Registration {
                                name: name.clone(),
                                state: None,
                            },
                        );
                        if st.released.insert(s.uid.clone()) {
                            released.push((name, s));
                        }
                    }
                }
                Event::InitDone => {
                    if let Some(listed) = listing.take() {
                        let gone: Vec<String> = st
                            .regs
                            .keys()
                            .filter(|n| !listed.contains(*n))
                            .cloned()
                            .collect();
                        for name in gone {
                            let s = st.regs.remove(&name).unwrap();
                            st.push(
                                at,
                                Record::Registration {
                                    name: name.clone(),
                                    state: None,
                                },
                            );
                            if st.released.insert(s.uid.clone()) {
                                released.push((name, s));
                            }
                        }
                    }
                    if let Some(r) = ready.take() {
                        let _ = r.send(());
                    }
                }
            }
        }
        for (name, reg) in released {
            check_released(&cfg, &etcd, &state, t0, &name, &reg).await;
        }
    }
}

/// I5 at the moment a finalizer release is seen: nothing of the registration is left.
async fn check_released(
    cfg: &ObserverConfig,
    etcd: &Etcd,
    state: &Arc<Mutex<State>>,
    t0: Instant,
    name: &str,
    reg: &RegState,
) {
    let records_prefix = format!("{}{}/", cfg.owner_root(), cfg.namespace);
    let keys_prefix = format!("{}/{}/", reg.prefix, reg.service);
    let start = Instant::now();
    let found = loop {
        let mut kv = etcd.kv_client();
        let read = async {
            let records = kv
                .get(
                    records_prefix.as_str(),
                    Some(GetOptions::new().with_prefix()),
                )
                .await?;
            let keys = kv
                .get(keys_prefix.as_str(), Some(GetOptions::new().with_prefix()))
                .await?;
            Ok::<_, etcd_client::Error>((records, keys))
        };
        match tokio::time::timeout(Duration::from_secs(2), read).await {
            Ok(Ok((records, keys))) => {
                let st = state.lock().unwrap();
                let other_owner = st
                    .regs
                    .values()
                    .any(|r| r.live() && r.service == reg.service && r.prefix == reg.prefix);
                let mut left: Vec<String> = records
                    .kvs()
                    .iter()
                    .map(|kv| String::from_utf8_lossy(kv.key()).to_string())
                    .filter(|k| k.rsplit('/').next() == Some(name))
                    .collect();
                if !other_owner {
                    left.extend(
                        keys.kvs()
                            .iter()
                            .map(|kv| String::from_utf8_lossy(kv.key()).to_string())
                            .filter(|k| !st.foreign.contains_key(k)),
                    );
                }
                break Some(left);
            }
            _ if start.elapsed() > Duration::from_secs(10) => break None,
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    let at = t0.elapsed();
    let mut st = state.lock().unwrap();
    match found {
        Some(left) if left.is_empty() => {
            st.push(
                at,
                Record::Check(format!(
                    "{name} released its finalizer; nothing of it left in etcd"
                )),
            );
        }
        Some(left) => {
            st.push(
                at,
                Record::Check(format!(
                    "{name} released its finalizer with {} keys left: {left:?}",
                    left.len()
                )),
            );
            st.violations.push(Violation {
                invariant: "I5",
                at: Some(at),
                message: format!("ServiceRegistration {name} released its finalizer while etcd still held {left:?}"),
            });
        }
        None => {
            st.push(
                at,
                Record::Check(format!(
                    "{name} released its finalizer; etcd did not answer the check for 10 s"
                )),
            );
            st.violations.push(Violation {
                invariant: "observer",
                at: Some(at),
                message: format!(
                    "could not read etcd for 10 s to check the finalizer release of {name}"
                ),
            });
        }
    }
}
