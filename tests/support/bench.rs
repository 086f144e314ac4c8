//! What the benchmarks share: the quiet-machine guard (1-minute load average), the report
//! section each bench writes (command, machine, bed versions, load at start and end),
//! latency summaries, watch timelines of what consumers see (etcd keys, EndpointSlice
//! endpoints), the EndpointSlice controller as the peer with its client rate limiter
//! visible, load generators that retry the API server's 429s, and registry etcd figures.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{EventType, GetOptions, WatchOptions};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::GroupVersionKind;
use kube::runtime::watcher;
use serde_json::json;
use tokio::sync::Notify;

use super::controller::{Controller, http_get, metric};
use super::{Binaries, TestBed, free_port, spawn_owned};

/// A machine whose 1-minute load average is above this many runnable tasks per core is busy:
/// the bench waits for it to settle and refuses to run if it does not (unless forced).
pub const LOAD_PER_CORE: f64 = 0.5;

/// The flags that turn podlease's pool of pre-granted leases off (today's behaviour before
/// the pool: grant, then the Txn). The one parameter of the before/after comparison.
pub const POOL_OFF: &[&str] = &["--lease-pool-size", "0"];

/// The EndpointSlice controller's client rate limit for the main comparison: high enough
/// that its limiter never binds at the request rates the benches cause (checked from its
/// own rest_client_rate_limiter_duration_seconds, see `Peer::limiter`).
pub const PEER_UNTHROTTLED: (u32, u32) = (1000, 1000);

/// kube-controller-manager's own defaults (--kube-api-qps, --kube-api-burst).
pub const PEER_DEFAULT: (u32, u32) = (20, 30);

pub fn cores() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

impl TestBed {
    /// The API server's storage etcd (its memory is part of what a cluster of N pods costs).
    pub fn storage_pid(&self) -> Option<u32> {
        self.storage.pid()
    }
}

/// The 1-minute load average.
pub fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg").ok().and_then(|s| s.split_whitespace().next()?.parse().ok()).unwrap_or(f64::NAN)
}

fn env_secs(name: &str, default: u64) -> Duration {
    Duration::from_secs(std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default))
}

/// The machine's load when a bench started, and whether it ran forced on a busy machine.
#[derive(Debug, Clone)]
pub struct Load {
    pub threshold: f64,
    pub at_start: f64,
    pub busy: bool,
}

/// Waits up to $BENCH_SETTLE_SECS (default 180: the previous bench's own load decays from 2
/// to 1 in about 40 s) for the 1-minute load average to fall to `LOAD_PER_CORE` × cores.
/// If it does not, exits with status 2 before starting anything, unless BENCH_FORCE=1: then
/// the bench runs and its report says in bold that it was measured on a busy machine.
pub async fn require_quiet_machine() -> Load {
    let threshold = LOAD_PER_CORE * cores() as f64;
    let settle = env_secs("BENCH_SETTLE_SECS", 180);
    let forced = std::env::var("BENCH_FORCE").is_ok_and(|v| v == "1");
    let start = Instant::now();
    let mut said = Instant::now() - Duration::from_secs(60);
    loop {
        let load = loadavg();
        if load <= threshold {
            return Load { threshold, at_start: load, busy: false };
        }
        if forced {
            eprintln!("BENCH_FORCE=1: running on a busy machine (1-minute load {load:.2} > {threshold:.2}); the report says so");
            return Load { threshold, at_start: load, busy: true };
        }
        if start.elapsed() >= settle {
            eprintln!(
                "refusing to benchmark: the 1-minute load average is {load:.2}, above {threshold:.2} ({LOAD_PER_CORE} per core on {} cores), after waiting {}s for it to settle. Stop what else runs, or set BENCH_FORCE=1 to measure anyway (the report will say so).",
                cores(),
                settle.as_secs()
            );
            std::process::exit(2);
        }
        if said.elapsed() >= Duration::from_secs(15) {
            eprintln!("waiting for the machine to settle: 1-minute load {load:.2} > {threshold:.2}");
            said = Instant::now();
        }
        tokio::time::sleep(Duration::from_secs(1)).await; // the load average moves every 5 s
    }
}

/// Test runners call every harness=false target with `--list`: a bench then does nothing.
pub fn listing() -> bool {
    std::env::args().any(|a| a == "--list")
}

/// One section of BENCHMARKS.md. Its first line names it for scripts/benchmarks-md.sh, which
/// replaces that section and keeps the others.
pub struct Report {
    name: &'static str,
    title: String,
    load: Load,
    started: Instant,
    bed: String,
    pub md: String,
}

impl Report {
    pub fn new(name: &'static str, title: &str, load: Load) -> Report {
        Report { name, title: title.to_string(), load, started: Instant::now(), bed: String::new(), md: String::new() }
    }

    /// Records the versions the bed really runs (asked from the live processes).
    pub async fn bed(&mut self, bed: &TestBed) {
        let apiserver = bed.kube.apiserver_version().await.map(|v| v.git_version).unwrap_or_else(|_| "?".into());
        let etcd = bed.etcd.maintenance_client().status().await.map(|s| s.version().to_string()).unwrap_or_else(|_| "?".into());
        self.bed = format!("kube-apiserver {apiserver}, etcd {etcd} (registry and API server storage, one member each)");
    }

    /// The command that reproduces this section: the bench, its arguments and every BENCH_*
    /// setting it ran with.
    fn command(&self) -> String {
        let mut env: Vec<String> = std::env::vars().filter(|(k, _)| k.starts_with("BENCH_") && k != "BENCH_OUT").map(|(k, v)| format!("{k}={v} ")).collect();
        env.sort();
        let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
        let args = if args.is_empty() { String::new() } else { format!(" -- {}", args.join(" ")) };
        format!("{}cargo bench --bench {}{args}", env.concat(), self.name.replace('-', "_"))
    }

    /// Writes the section so far to $BENCH_OUT with `pending` at its end (what has not been
    /// measured yet), so that a run that dies later still leaves what it measured.
    pub fn checkpoint(&self, pending: &str) {
        if let Ok(path) = std::env::var("BENCH_OUT") {
            let mut out = self.render();
            writeln!(out, "\n{pending}").unwrap();
            std::fs::write(&path, &out).unwrap_or_else(|e| panic!("write {path}: {e}"));
            *LAST_CHECKPOINT.lock().unwrap() = Some((path, out));
        }
    }

    /// After `checkpoint`, a panic appends its message to the section written (why the run
    /// stopped), then unwinds as usual.
    pub fn report_panics() {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if let Some((path, out)) = LAST_CHECKPOINT.lock().ok().and_then(|mut c| c.take()) {
                let _ = std::fs::write(&path, format!("{out}\n**The run stopped here**: {info}\n"));
            }
            default(info);
        }));
    }

    /// Prints the section and writes it to $BENCH_OUT when set.
    pub fn finish(self) {
        let out = self.render();
        print!("{out}");
        if let Ok(path) = std::env::var("BENCH_OUT") {
            std::fs::write(&path, out).unwrap_or_else(|e| panic!("write {path}: {e}"));
        }
    }

    fn render(&self) -> String {
        let end = loadavg();
        let mut out = String::new();
        writeln!(out, "<!-- bench:{} -->", self.name).unwrap();
        writeln!(out, "## {}\n", self.title).unwrap();
        if self.load.busy {
            writeln!(out, "**Measured on a busy machine (1-minute load {:.2} at start, above {:.2}; BENCH_FORCE=1): not figures to rely on.**\n", self.load.at_start, self.load.threshold).unwrap();
        }
        writeln!(out, "`{}` — {}; {}. Machine: {}. 1-minute load average {:.2} at start, {:.2} at end (the bench refuses to start above {:.2}); took {:.0} s.\n",
            self.command(), date(), self.bed, machine(), self.load.at_start, end, self.load.threshold, self.started.elapsed().as_secs_f64()).unwrap();
        out.push_str(&self.md);
        out
    }
}

static LAST_CHECKPOINT: Mutex<Option<(String, String)>> = Mutex::new(None);

fn date() -> String {
    k8s_openapi::jiff::Timestamp::now().strftime("%Y-%m-%d %H:%M UTC").to_string()
}

/// Cores, CPU model and memory, from /proc.
pub fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo.lines().find_map(|l| l.strip_prefix("model name")?.split_once(':').map(|(_, m)| m.trim().to_string())).unwrap_or_else(|| "?".into());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().find_map(|l| l.strip_prefix("MemTotal:")?.split_whitespace().next()?.parse::<f64>().ok()))
        .map(|kib| format!("{:.0} GiB", kib / 1048576.0))
        .unwrap_or_else(|| "?".into());
    format!("{} cores ({model}), {mem}", cores())
}

/// Latencies, sorted.
#[derive(Debug, Clone, Default)]
pub struct Dist(Vec<Duration>);

impl Dist {
    pub fn new(mut v: Vec<Duration>) -> Dist {
        v.sort();
        Dist(v)
    }
    pub fn n(&self) -> usize {
        self.0.len()
    }
    /// The `q` quantile in ms (nearest rank).
    pub fn ms(&self, q: f64) -> f64 {
        if self.0.is_empty() {
            return f64::NAN;
        }
        super::percentile(&self.0, q).as_secs_f64() * 1000.0
    }
    pub fn max_ms(&self) -> f64 {
        self.0.last().map(|d| d.as_secs_f64() * 1000.0).unwrap_or(f64::NAN)
    }
    /// `n | p50 | p90 | p99 | max` table cells.
    pub fn cells(&self) -> String {
        format!("{} | {} | {} | {} | {}", self.n(), fmt_ms(self.ms(0.5)), fmt_ms(self.ms(0.9)), fmt_ms(self.ms(0.99)), fmt_ms(self.max_ms()))
    }
}

pub fn fmt_ms(ms: f64) -> String {
    if ms >= 1000.0 { format!("{:.2} s", ms / 1000.0) } else { format!("{ms:.1} ms") }
}

pub fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "missed" }
}

/// Whether a latency sits within ±1 ms of a multiple of 50 ms: the signature of a client
/// rate limiter at 20 requests/s pacing a closed loop.
pub fn at_multiple_of_50ms(ms: f64) -> bool {
    let k = (ms / 50.0).round();
    k >= 1.0 && (ms - k * 50.0).abs() <= 1.0
}

/// What a consumer sees per pod IP: every transition to published (`true`) or not, with
/// the instant the watch delivered it.
#[derive(Default)]
pub struct Seen {
    events: Mutex<HashMap<String, Vec<(bool, Instant)>>>,
    changed: Notify,
}

impl Seen {
    fn record(&self, ip: String, ready: bool, at: Instant) {
        self.events.lock().unwrap().entry(ip).or_default().push((ready, at));
        self.changed.notify_waiters();
    }

    /// When `ip` was first seen `ready` at or after `after`.
    pub fn first(&self, ip: &str, ready: bool, after: Instant) -> Option<Instant> {
        self.events.lock().unwrap().get(ip)?.iter().find(|(r, at)| *r == ready && *at >= after).map(|(_, at)| *at)
    }

    /// Waits (woken by each event, no polling) until `ip` is seen `ready` at or after `after`.
    pub async fn wait(&self, ip: &str, ready: bool, after: Instant, within: Duration) -> Instant {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if let Some(at) = self.first(ip, ready, after) {
                return at;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                panic!("{ip} not seen ready={ready} within {within:?}");
            }
        }
    }
}

/// An etcd watch under `prefix` of json-format keys: a PUT publishes the value's address, a
/// DELETE withdraws the previous value's. Established when this returns.
pub async fn watch_etcd(etcd: &etcd_client::Client, prefix: &str) -> Arc<Seen> {
    let seen = Arc::new(Seen::default());
    let mut w = etcd.watch_client();
    let mut stream = w.watch(prefix, Some(WatchOptions::new().with_prefix().with_prev_key())).await.expect("etcd watch");
    let sink = seen.clone();
    tokio::spawn(async move {
        let _keep = w;
        while let Ok(Some(resp)) = stream.message().await {
            let at = Instant::now();
            for ev in resp.events() {
                let put = ev.event_type() == EventType::Put;
                let kv = if put { ev.kv() } else { ev.prev_kv() };
                let ip = kv
                    .and_then(|kv| serde_json::from_slice::<serde_json::Value>(kv.value()).ok())
                    .and_then(|v| Some(v["addr"].as_str()?.rsplit_once(':')?.0.to_string()));
                if let Some(ip) = ip {
                    sink.record(ip, put, at);
                }
            }
        }
    });
    seen
}

/// A watch of the EndpointSlices (discovery.k8s.io/v1) of Service `service` in
/// every namespace: an endpoint's `ready` condition per address, recorded when it changes.
pub fn watch_slices(kube: &kube::Client, service: &str) -> Arc<Seen> {
    let seen = Arc::new(Seen::default());
    let ar = ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("discovery.k8s.io", "v1", "EndpointSlice"), "endpointslices");
    let slices: Api<DynamicObject> = Api::all_with(kube.clone(), &ar);
    let cfg = watcher::Config::default().labels(&format!("kubernetes.io/service-name={service}"));
    let sink = seen.clone();
    tokio::spawn(async move {
        let mut last: HashMap<String, bool> = HashMap::new();
        let mut events = watcher(slices, cfg).boxed();
        while let Some(ev) = events.next().await {
            let at = Instant::now();
            let Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) = ev else { continue };
            for ep in o.data["endpoints"].as_array().into_iter().flatten() {
                let ready = ep["conditions"]["ready"].as_bool().unwrap_or(false);
                for ip in ep["addresses"].as_array().into_iter().flatten().filter_map(|a| a.as_str()) {
                    if last.insert(ip.to_string(), ready) != Some(ready) {
                        sink.record(ip.to_string(), ready, at);
                    }
                }
            }
        }
    });
    seen
}

/// kube-controller-manager running only the EndpointSlice controller, with its client's
/// QPS and burst, and its metrics (TLS, open to loopback readers) so the rate limiter's
/// waits can be read.
pub struct Peer {
    child: Child,
    metrics_port: u16,
    pub qps: (u32, u32),
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The peer's API requests over a window, sampled once a second from its
/// rest_client_requests_total (kept from client-go 1.20, which did not export its rate limiter's waits:
/// rest_client_rate_limiter_duration_seconds is never registered). A token bucket of rate
/// q and burst b delays no request while fewer than b requests come in any one second, and
/// a one-second window spans at most two samples: a peak below b/2 per sample proves it.
pub struct RequestRate {
    samples: Arc<Mutex<Vec<(Instant, f64)>>>,
    task: tokio::task::JoinHandle<()>,
    port: u16,
}

impl Drop for RequestRate {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RequestRate {
    /// (requests, seconds, highest requests in one sample).
    pub fn summary(&self) -> (f64, f64, f64) {
        let s = self.samples.lock().unwrap();
        let (Some(first), Some(last)) = (s.first(), s.last()) else { return (0.0, 0.0, 0.0) };
        let peak = s.windows(2).map(|w| w[1].1 - w[0].1).fold(0.0, f64::max);
        (last.1 - first.1, (last.0 - first.0).as_secs_f64(), peak)
    }

    /// Takes a last sample, stops sampling, and says what that means for a limiter of rate
    /// `qps` (q, b).
    pub async fn describe(self, qps: (u32, u32)) -> String {
        self.task.abort();
        if let Some(n) = PeerMetrics(self.port).requests().await {
            self.samples.lock().unwrap().push((Instant::now(), n));
        }
        let (n, secs, peak) = self.summary();
        let binds = if peak < qps.1 as f64 / 2.0 {
            format!("below half its burst of {}, so its limiter never delayed a request", qps.1)
        } else if peak >= qps.0 as f64 {
            format!("at its limiter's refill rate of {}/s: the limiter paced its requests", qps.0)
        } else {
            format!("enough that its limiter ({}/s, burst {}) may have delayed some", qps.0, qps.1)
        };
        format!("{n:.0} API requests in {secs:.0} s ({:.1}/s on average), at most {peak:.0} in one 1-s sample: {binds}", n / secs.max(1e-9))
    }
}

impl Peer {
    pub async fn start(bed: &TestBed, qps: (u32, u32), name: &str) -> Peer {
        let metrics_port = free_port();
        let mut cmd = Command::new(&Binaries::locate().kube_controller_manager);
        cmd.arg(format!("--kubeconfig={}", bed.kubeconfig.display())).args(Peer::flags_for(qps, metrics_port));
        let child = spawn_owned(&mut cmd, &bed.dir.path().join(format!("kube-controller-manager-{name}.log")));
        let peer = Peer { child, metrics_port, qps };
        super::wait_until("kube-controller-manager serves /healthz", super::DEADLINE, || async {
            https_get(&format!("https://127.0.0.1:{metrics_port}/healthz")).await.filter(|(c, _)| *c == 200).map(|_| ())
        })
        .await;
        peer
    }

    fn flags_for(qps: (u32, u32), metrics_port: u16) -> Vec<String> {
        vec![
            "--controllers=endpointslice".into(),
            "--leader-elect=false".into(),
            "--bind-address=127.0.0.1".into(),
            // Its only port (the plain one went in 1.24): self-signed TLS, and /metrics open
            // to an unauthenticated reader on loopback, like /healthz.
            format!("--secure-port={metrics_port}"),
            "--authorization-always-allow-paths=/healthz,/readyz,/livez,/metrics".into(),
            format!("--kube-api-qps={}", qps.0),
            format!("--kube-api-burst={}", qps.1),
            "--v=1".into(),
        ]
    }

    /// Its flags as the report shows them (every other setting is the default).
    pub fn flags(&self) -> String {
        let shown: Vec<String> = Peer::flags_for(self.qps, 0).into_iter().filter(|f| !f.starts_with("--secure-port=") && !f.starts_with("--authorization-always-allow-paths=")).collect();
        format!("`kube-controller-manager --kubeconfig=… {}` (plus a loopback metrics port)", shown.join(" "))
    }

    /// Every API request the peer has made so far.
    pub async fn requests(&self) -> Option<f64> {
        PeerMetrics(self.metrics_port).requests().await
    }

    /// Samples `requests` once a second from now until the result is dropped.
    pub async fn sample_requests(&self) -> RequestRate {
        let samples: Arc<Mutex<Vec<(Instant, f64)>>> = Arc::default();
        let first = self.requests().await.expect("kube-controller-manager /metrics");
        samples.lock().unwrap().push((Instant::now(), first));
        let (sink, port) = (samples.clone(), self.metrics_port);
        let task = tokio::spawn(async move {
            let peer = PeerMetrics(port);
            let mut tick = tokio::time::interval(Duration::from_secs(1)); // the sampling period
            tick.tick().await;
            loop {
                tick.tick().await;
                if let Some(n) = peer.requests().await {
                    sink.lock().unwrap().push((Instant::now(), n));
                }
            }
        });
        RequestRate { samples, task, port: self.metrics_port }
    }
}

struct PeerMetrics(u16);

/// GET over TLS without verifying the peer's self-signed certificate (loopback only), with
/// curl: (status, body); None when nothing answers.
async fn https_get(url: &str) -> Option<(u16, String)> {
    assert!(url.starts_with("https://127.0.0.1:"), "loopback only: {url}");
    let out = tokio::process::Command::new("curl").args(["-sk", "--max-time", "5", "-w", "\n%{http_code}", url]).output().await.ok()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n')?;
    Some((code.trim().parse().ok().filter(|c| *c != 0)?, body.to_string()))
}

impl PeerMetrics {
    async fn requests(&self) -> Option<f64> {
        let (_, text) = https_get(&format!("https://127.0.0.1:{}/metrics", self.0)).await?;
        Some(metric_sum(&text, "rest_client_requests_total"))
    }
}

/// podlease's flags for one install of several side by side: its own namespace, leader
/// Lease and thus install id; everything else at the defaults.
pub fn install_flags(namespace: &str, lease: &str, extra: &[&str]) -> Vec<String> {
    let mut f: Vec<String> = vec!["--log-level".into(), "info".into(), "--watch-namespace".into(), namespace.into(), "--leader-election-name".into(), lease.into()];
    f.extend(extra.iter().map(|s| s.to_string()));
    f
}

/// One pod a bench drives.
#[derive(Debug, Clone)]
pub struct PodRef {
    pub ns: String,
    pub name: String,
    pub ip: String,
}

/// One podlease install of several side by side, with the pods it publishes.
pub struct Install {
    pub label: String,
    pub controller: Controller,
    pub pods: Vec<PodRef>,
}

/// podlease with its lease pool (the default) and without it (`POOL_OFF`), side by side: each
/// an install of its own (one replica, `install_flags`) on a namespace of its own
/// (`<bench>-pool`, `<bench>-nopool`) with `pods` not-yet-ready pods selected by a
/// ServiceRegistration of that name and by a Service named `bench` (the peer's). A binary
/// without the pool flag gets the second install only. Pod IPs are unique across installs.
pub async fn pool_on_and_off(bed: &TestBed, bench: &str, pods: usize) -> Vec<Install> {
    let specs: Vec<(&str, &str, &[&str])> = if pool_flag_supported() {
        vec![("podlease, lease pool on (default)", "pool", &[]), ("podlease, lease pool off", "nopool", POOL_OFF)]
    } else {
        vec![("podlease (this build has no lease pool)", "nopool", &[])]
    };
    super::ensure_node(&bed.kube, super::NODE).await;
    let mut installs = Vec::new();
    for (v, (label, tag, extra)) in specs.into_iter().enumerate() {
        let ns = format!("{bench}-{tag}");
        super::ensure_namespace(&bed.kube, &ns).await;
        super::create_registration(&bed.kube, &ns, &ns, json!({"selector": {"matchLabels": {"app": bench}}})).await;
        let svcs: Api<k8s_openapi::api::core::v1::Service> = Api::namespaced(bed.kube.clone(), &ns);
        let svc = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Service", "metadata": {"name": bench},
            "spec": {"selector": {"app": bench}, "ports": [{"port": 80, "targetPort": 8080}]},
        }))
        .unwrap();
        svcs.create(&PostParams::default(), &svc).await.expect("create Service");
        let refs: Vec<PodRef> = (0..pods).map(|i| PodRef { ns: ns.clone(), name: format!("{bench}-{i}"), ip: super::pod_ip(v * pods + i + 1) }).collect();
        let retries = Retries::default();
        let labels = json!({"app": bench});
        futures::stream::iter(&refs)
            .for_each_concurrent(64, |p| {
                let (kube, retries, labels) = (bed.kube.clone(), &retries, &labels);
                async move { create_pod_retrying(&kube, &p.ns, &p.name, labels, retries).await }
            })
            .await;
        let flags = install_flags(&ns, &format!("podlease-{tag}"), extra);
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let controller = Controller::start(bed, &ns, &flags).await;
        installs.push(Install { label: label.to_string(), controller, pods: refs });
    }
    installs
}

/// What the report says about how the installs ran.
pub fn installs_described(installs: &[Install]) -> String {
    format!(
        "podlease: {} side by side, each a single replica at the defaults except `--watch-namespace <its namespace> --leader-election-name <its own>` (release build, `--log-level info`){}",
        if installs.len() > 1 { "two installs" } else { "one install" },
        if installs.len() > 1 { format!("; pool off is `{}`", POOL_OFF.join(" ")) } else { String::new() }
    )
}

/// Whether the podlease binary under test has the lease pool flag at all.
pub fn pool_flag_supported() -> bool {
    Command::new(super::controller::binary()).args(["run", "--help"]).output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(POOL_OFF[0]))
}

/// Waits until `c` answers /readyz with 200 and a body containing `want`.
pub async fn wait_readyz(c: &Controller, want: &str, within: Duration) {
    super::wait_until(&format!("podlease /readyz says {want:?}"), within, || async {
        let (code, body) = http_get(&format!("http://127.0.0.1:{}/readyz", c.metrics_port)).await?;
        (code == 200 && body.contains(want)).then_some(())
    })
    .await
}

/// The sum of every sample of `name` (all label sets) in a Prometheus exposition.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

pub async fn podlease_metric(c: &Controller, name: &str) -> f64 {
    match http_get(&format!("http://127.0.0.1:{}/metrics", c.metrics_port)).await {
        Some((_, text)) => metric(&text, name),
        None => f64::NAN,
    }
}

/// API server requests a load generator had to repeat (429 Too Many Requests, 5xx, broken
/// connections), counted so the report can say where the API server pushed back.
#[derive(Default)]
pub struct Retries(std::sync::atomic::AtomicUsize);

impl Retries {
    pub fn get(&self) -> usize {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Runs `op` until it succeeds; 409 AlreadyExists counts as success (a create repeated
/// after a lost answer). Gives up after two minutes of failures.
async fn retrying<F, Fut, T>(what: &str, retries: &Retries, mut op: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, kube::Error>>,
{
    let start = Instant::now();
    let mut pause = Duration::from_millis(50);
    loop {
        match op().await {
            Ok(_) => return,
            Err(kube::Error::Api(e)) if e.code == 409 => return,
            Err(e) => {
                let transient = match &e {
                    kube::Error::Api(s) => s.code == 429 || s.code >= 500,
                    _ => true,
                };
                assert!(transient && start.elapsed() < Duration::from_secs(120), "{what}: {e}");
                retries.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(pause).await; // back off before asking the API server again
                pause = (pause * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// Creates pod `name` bound to the kubelet helpers' node (create that first:
/// `ensure_node`), as `kubelet::create_pod` does, retrying the API server's push-back.
pub async fn create_pod_retrying(kube: &kube::Client, ns: &str, name: &str, labels: &serde_json::Value, retries: &Retries) {
    let pods: Api<Pod> = Api::namespaced(kube.clone(), ns);
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {"nodeName": super::NODE, "containers": [{"name": "app", "image": "example.invalid/app:1", "ports": [{"name": "http", "containerPort": 8080}]}]},
    }))
    .unwrap();
    let pp = PostParams::default();
    retrying(&format!("create pod {name}"), retries, || pods.create(&pp, &pod)).await
}

/// The kubelet's status patch of `kubelet::set_ready` (Running, the IP, Ready and
/// ContainersReady `ready`), retrying the API server's push-back.
pub async fn set_ready_retrying(kube: &kube::Client, ns: &str, name: &str, ip: &str, ready: bool, retries: &Retries) {
    let pods: Api<Pod> = Api::namespaced(kube.clone(), ns);
    let status = if ready { "True" } else { "False" };
    let t = k8s_openapi::jiff::Timestamp::from_second(k8s_openapi::jiff::Timestamp::now().as_second()).unwrap().to_string();
    let cond = |type_: &str, st: &str| json!({"type": type_, "status": st, "lastTransitionTime": t});
    let patch = json!({"status": {
        "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": "192.0.2.1",
        "conditions": [cond("Initialized", "True"), cond("ContainersReady", status), cond("Ready", status), cond("PodScheduled", "True")],
    }});
    let (pp, patch) = (PatchParams::default(), Patch::Strategic(&patch));
    retrying(&format!("patch status of {name}"), retries, || pods.patch_status(name, &pp, &patch)).await
}

/// Pods `range` in `ns`, named `<name>-<i>` with IP `pod_ip(i + 1)` and the labels `labels(i)`
/// gives, created and turned Ready as a kubelet would have left them, `concurrency` pods at
/// a time. Returns how many API requests had to be repeated.
pub async fn populate_ready(kube: &kube::Client, ns: &str, name: &str, range: std::ops::Range<usize>, labels: impl Fn(usize) -> serde_json::Value, concurrency: usize) -> usize {
    super::ensure_node(kube, super::NODE).await;
    let retries = Retries::default();
    let (labels, retries_ref) = (&labels, &retries);
    futures::stream::iter(range)
        .for_each_concurrent(concurrency, |i| async move {
            let pod = format!("{name}-{i}");
            create_pod_retrying(kube, ns, &pod, &labels(i), retries_ref).await;
            set_ready_retrying(kube, ns, &pod, &super::pod_ip(i + 1), true, retries_ref).await;
        })
        .await;
    retries.get()
}

/// Spawns `c` and waits until /readyz says `want`, within `within` (a large initial sync
/// takes longer than the harness's usual deadline).
pub async fn start_within(c: &mut Controller, want: &str, within: Duration) {
    c.spawn();
    wait_readyz(c, want, within).await;
}

/// Registry keys and their leases under `prefix`.
pub async fn key_leases(etcd: &etcd_client::Client, prefix: &str) -> Vec<i64> {
    let r = etcd.kv_client().get(prefix, Some(GetOptions::new().with_prefix().with_keys_only())).await.expect("etcd get");
    r.kvs().iter().map(|kv| kv.lease()).collect()
}

/// Of `leases` (granted `ttl` seconds), those not renewed since `since`: a lease last renewed
/// before `since` has at most `ttl - (now - since)` seconds left (whole seconds, hence the
/// margin of 2); gone leases count as not renewed.
pub async fn not_renewed_since(etcd: &etcd_client::Client, leases: &[i64], ttl: i64, since: Instant) -> Vec<i64> {
    let asked = Instant::now();
    let bound = ttl as f64 - asked.duration_since(since).as_secs_f64() + 2.0;
    let stale = Mutex::new(Vec::new());
    futures::stream::iter(leases)
        .for_each_concurrent(64, |&l| {
            let (mut lc, stale) = (etcd.lease_client(), &stale);
            async move {
                let left = lc.time_to_live(l, None).await.map(|r| r.ttl()).unwrap_or(-1);
                if (left as f64) <= bound {
                    stale.lock().unwrap().push(l);
                }
            }
        })
        .await;
    stale.into_inner().unwrap()
}

/// How many keys exist under a prefix, followed by one etcd watch from a known revision (no
/// polling: a count query over 150,000 keys costs etcd more than the watch does).
pub struct KeyCount {
    inner: Arc<Counted>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
struct Counted {
    /// Keys now, and when the watch last delivered a change.
    state: Mutex<(i64, Option<Instant>)>,
    changed: Notify,
}

impl Drop for KeyCount {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl KeyCount {
    pub async fn start(etcd: &etcd_client::Client, prefix: &str) -> KeyCount {
        let r = etcd.kv_client().get(prefix, Some(GetOptions::new().with_prefix().with_count_only())).await.expect("etcd count");
        let from = r.header().expect("header").revision() + 1;
        let mut w = etcd.watch_client();
        let mut stream = w.watch(prefix, Some(WatchOptions::new().with_prefix().with_start_revision(from))).await.expect("etcd watch");
        let inner = Arc::new(Counted { state: Mutex::new((r.count(), None)), changed: Notify::new() });
        let sink = inner.clone();
        let task = tokio::spawn(async move {
            let _keep = w;
            while let Ok(Some(resp)) = stream.message().await {
                let at = Instant::now();
                let mut st = sink.state.lock().unwrap();
                for ev in resp.events() {
                    let created = ev.kv().is_some_and(|kv| kv.create_revision() == kv.mod_revision());
                    match ev.event_type() {
                        EventType::Put if created => st.0 += 1,
                        EventType::Delete => st.0 -= 1,
                        _ => {}
                    }
                }
                if !resp.events().is_empty() {
                    st.1 = Some(at);
                }
                drop(st);
                sink.changed.notify_waiters();
            }
        });
        KeyCount { inner, task }
    }

    pub fn now(&self) -> i64 {
        self.inner.state.lock().unwrap().0
    }

    /// Waits until exactly `n` keys exist; the instant the watch delivered the last change.
    pub async fn wait(&self, n: i64, within: Duration) -> Instant {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let changed = self.inner.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let (count, at) = *self.inner.state.lock().unwrap();
            if count == n {
                return at.unwrap_or_else(Instant::now);
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                panic!("{count} keys, not {n}, after {within:?}");
            }
        }
    }
}

/// (PUT, DELETE) events under `prefix` from revision `from` to now, read back from etcd's
/// history (misses nothing, unlike a live watch that starts late).
pub async fn events_since(etcd: &etcd_client::Client, prefix: &str, from: i64, within: Duration) -> (usize, usize) {
    let head = revision(etcd).await;
    if head < from {
        return (0, 0);
    }
    let mut w = etcd.watch_client();
    let mut stream = w.watch(prefix, Some(WatchOptions::new().with_prefix().with_start_revision(from))).await.expect("etcd watch");
    let (mut puts, mut deletes) = (0, 0);
    let start = Instant::now();
    loop {
        // A progress notice comes once the watch has caught up with the store.
        stream.request_progress().await.expect("progress request");
        if let Ok(resp) = tokio::time::timeout(Duration::from_millis(500), stream.message()).await {
            let resp = resp.expect("watch").expect("the history watch ended");
            if !resp.created() && resp.events().is_empty() && resp.header().map(|h| h.revision()).unwrap_or(0) >= head {
                return (puts, deletes);
            }
            for ev in resp.events() {
                match ev.event_type() {
                    EventType::Put => puts += 1,
                    EventType::Delete => deletes += 1,
                }
            }
        }
        assert!(start.elapsed() < within, "the history of {prefix} from revision {from} did not catch up with {head} within {within:?}");
    }
}

/// Keys under `prefix` in the registry etcd.
pub async fn count_keys(etcd: &etcd_client::Client, prefix: &str) -> i64 {
    etcd.kv_client().get(prefix, Some(GetOptions::new().with_prefix().with_count_only())).await.map(|r| r.count()).unwrap_or(-1)
}

/// The registry etcd's current revision (a history watch from here + 1 sees what follows).
pub async fn revision(etcd: &etcd_client::Client) -> i64 {
    etcd.kv_client().get("\0", Some(GetOptions::new().with_count_only())).await.expect("etcd get").header().expect("header").revision()
}

/// The registry etcd's database size in MiB (its bolt file, free pages included).
pub async fn db_mib(etcd: &etcd_client::Client) -> f64 {
    etcd.maintenance_client().status().await.map(|s| s.db_size() as f64 / 1048576.0).unwrap_or(f64::NAN)
}

/// Leases etcd holds.
pub async fn lease_count(etcd: &etcd_client::Client) -> usize {
    etcd.lease_client().leases().await.map(|l| l.leases().len()).unwrap_or(0)
}

/// Empties the registry etcd: every key and every lease, so the next start is a cold sync.
pub async fn wipe(etcd: &etcd_client::Client) {
    etcd.kv_client().delete("\0", Some(etcd_client::DeleteOptions::new().with_from_key())).await.expect("etcd delete");
    let leases: Vec<i64> = etcd.lease_client().leases().await.expect("etcd leases").leases().iter().map(|l| l.id()).collect();
    futures::stream::iter(leases)
        .for_each_concurrent(64, |l| {
            let mut lc = etcd.lease_client();
            async move {
                let _ = lc.revoke(l).await;
            }
        })
        .await;
    // Compacted and defragmented: the next measurement's db size is its own, not the
    // history of what was wiped.
    let rev = etcd.kv_client().get("\0", None).await.expect("etcd get").header().map(|h| h.revision()).unwrap_or(0);
    if rev > 0 {
        let _ = etcd.kv_client().compact(rev, Some(etcd_client::CompactionOptions::new().with_physical())).await;
    }
    let _ = etcd.maintenance_client().defragment().await;
}

/// One etcd metric (summed over label sets) from a member's /metrics on its client URL.
pub async fn etcd_metric(endpoint: &str, name: &str) -> f64 {
    match http_get(&format!("{endpoint}/metrics")).await {
        Some((_, text)) => metric_sum(&text, name),
        None => f64::NAN,
    }
}
