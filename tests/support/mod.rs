//! The test bed: a real etcd (3.6; 3.5 under `run_on`) for the API server's storage, a real etcd for the registry
//! under test, and a real kube-apiserver (v1.37.2; v1.34.4 under `run_on`), on free 127.0.0.1 ports in a temp dir.
//!
//! Binaries come from `scripts/testbed.sh` (run by `make test`), found through the
//! `PODLEASE_*_BIN` variables or the cache's `testbed.env`. Every process started here dies
//! with the `TestBed` (also on panic) and, through PR_SET_PDEATHSIG, with the test thread
//! that started it, so no etcd or apiserver outlives a killed test binary.
#![allow(dead_code, unused_imports)]

pub mod bench;
pub mod consumer;
pub mod controller;
pub mod etcd;
pub mod frameworks;
pub mod gate;
pub mod helm;
pub mod kubelet;
pub mod node;
pub mod observer;
pub mod proc;
pub mod proxy;
pub mod tls;
pub mod watchdog;

use std::collections::{BTreeMap, HashSet};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

pub use controller::{Controller, bed_and_controller};
pub use kubelet::*;

/// The `p` quantile (0..=1) of sorted figures, nearest rank (for the benchmarks' tables).
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// How long any single wait in the tests may take before it fails.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// The admin bearer token of every test bed's apiserver (static token file).
pub const ADMIN_TOKEN: &str = "admintoken";

/// The releases a test runs on. The bed's own are Kubernetes 1.37 and etcd 3.6; a
/// compatibility test picks the oldest supported Kubernetes (1.34) or etcd 3.5 as its first
/// step, before anything locates a binary (each test is a process of its own under nextest).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Release {
    /// Kubernetes 1.37 and etcd 3.6.
    Current,
    /// The oldest supported Kubernetes (1.34), with etcd 3.6.
    OldestKubernetes,
    /// etcd 3.5 (the registry and the API server's storage), with Kubernetes 1.37.
    Etcd35,
}

static RELEASE: OnceLock<Release> = OnceLock::new();

/// Runs this test process on `release` (call it first: the binaries are located once).
pub fn run_on(release: Release) {
    let chosen = *RELEASE.get_or_init(|| release);
    assert_eq!(
        chosen, release,
        "this process already runs on {chosen:?}: a compatibility test needs a process of its own (run the suite with cargo nextest, as `make test` does)"
    );
    eprintln!("compatibility run on {release:?}: {}", Binaries::locate().describe());
}

fn release() -> Release {
    *RELEASE.get_or_init(|| Release::Current)
}

/// The cache directory (`PODLEASE_CACHE`, else `$XDG_CACHE_HOME/podlease`, else ~/.cache/podlease).
pub fn cache_dir() -> PathBuf {
    std::env::var_os("PODLEASE_CACHE").map(PathBuf::from).unwrap_or_else(|| {
        let base = std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache"));
        base.join("podlease")
    })
}

/// A variable of the test bed: the environment's `name`, else the cache's testbed.env's.
pub fn testbed_var(name: &str) -> Option<String> {
    static ENV: OnceLock<BTreeMap<String, String>> = OnceLock::new();
    let env = ENV.get_or_init(|| {
        let text = std::fs::read_to_string(cache_dir().join("testbed.env")).unwrap_or_default();
        text.lines().filter_map(|l| l.split_once('=')).map(|(k, v)| (k.trim().to_string(), v.trim().to_string())).collect()
    });
    std::env::var(name).ok().or_else(|| env.get(name).cloned())
}

/// A path of the test bed that must exist (`testbed_var`), or a panic that says what to run.
pub fn testbed_path(name: &str) -> PathBuf {
    let p = testbed_var(name).unwrap_or_else(|| {
        panic!("{name} is not set and {} has no entry: run scripts/testbed.sh (or `make test`) first", cache_dir().join("testbed.env").display())
    });
    let p = PathBuf::from(p);
    assert!(p.exists(), "{name}={} does not exist: run scripts/testbed.sh", p.display());
    p
}

/// A Kubernetes component of the release this test runs on (`kube-apiserver`, `kubelet`, ...).
pub fn kube_binary(component: &str) -> PathBuf {
    match release() {
        Release::OldestKubernetes => testbed_path("PODLEASE_KUBE_OLDEST_DIR").join(component),
        _ => testbed_path(&format!("PODLEASE_{}_BIN", component.replace('-', "_").to_uppercase())),
    }
}

/// Paths of the test bed's binaries.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub etcd: PathBuf,
    pub etcdctl: PathBuf,
    pub kube_apiserver: PathBuf,
    pub kube_controller_manager: PathBuf,
    /// The Kubernetes release of those binaries, as `/version` says it (`v1.37.2`).
    pub kube_version: String,
    /// Python of the virtualenv with helm-python-sdk (real Helm rendering).
    pub helm_python: PathBuf,
    pub kubectl: PathBuf,
    /// Prometheus and promtool (the alert rules' tests).
    pub prometheus: PathBuf,
    pub promtool: PathBuf,
}

impl Binaries {
    /// Reads `PODLEASE_*_BIN` from the environment, falling back to the cache's testbed.env,
    /// for the release this test runs on ([`run_on`]).
    pub fn locate() -> &'static Binaries {
        static BINS: OnceLock<Binaries> = OnceLock::new();
        // Every test that starts a bed locates its binaries first: a hung one shows its stacks.
        watchdog::install();
        BINS.get_or_init(|| {
            let etcd35 = release() == Release::Etcd35;
            let kube_version = match release() {
                Release::OldestKubernetes => testbed_var("PODLEASE_KUBE_OLDEST_VERSION"),
                _ => testbed_var("PODLEASE_KUBE_VERSION"),
            };
            Binaries {
                etcd: testbed_path(if etcd35 { "PODLEASE_ETCD35_BIN" } else { "PODLEASE_ETCD_BIN" }),
                etcdctl: testbed_path(if etcd35 { "PODLEASE_ETCDCTL35_BIN" } else { "PODLEASE_ETCDCTL_BIN" }),
                kube_apiserver: kube_binary("kube-apiserver"),
                kube_controller_manager: kube_binary("kube-controller-manager"),
                kube_version: format!("v{}", kube_version.expect("PODLEASE_KUBE_VERSION: run scripts/testbed.sh")),
                helm_python: testbed_path("PODLEASE_HELM_PYTHON"),
                // kubectl of the bed's own release (the version skew policy allows one minor
                // either way; 1.37's kubectl is not for 1.34).
                kubectl: kube_binary("kubectl"),
                prometheus: testbed_path("PODLEASE_PROMETHEUS_BIN"),
                promtool: testbed_path("PODLEASE_PROMTOOL_BIN"),
            }
        })
    }

    /// The releases, for reports.
    pub fn describe(&self) -> String {
        let etcd = Command::new(&self.etcd).arg("--version").output().map(|o| String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or("").to_string()).unwrap_or_default();
        format!("Kubernetes {}, {etcd}", self.kube_version)
    }
}

/// A runtime of its own for the test support's background work (fault proxies, the
/// observer), so that a test blocking its own runtime's thread, or a current-thread test
/// runtime, never stalls the bytes a proxy forwards or the times the observer records.
pub fn background() -> tokio::runtime::Handle {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("test-support")
            .enable_all()
            .build()
            .expect("background runtime")
    })
    .handle()
    .clone()
}

/// Ends a test's background task with the value that owns it: a watch left running past
/// its bed's teardown would retry a dead API server or etcd until the process exits.
pub struct AbortOnDrop(pub tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A port for servers that several loopback addresses (127.0.0.x) listen on: below the
/// kernel's ephemeral range (32768 and up by default), so no outgoing connection of any
/// process can take it as its local port between the pick and the bind (a client dialling
/// 127.0.0.2 gets a local 127.0.0.2:<ephemeral> port, and [`free_port`]'s ports are
/// ephemeral ones). Free on every address when picked; random, so that processes side by
/// side rarely pick the same one.
pub fn free_server_port() -> u16 {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    static GIVEN: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let given = GIVEN.get_or_init(Default::default);
    loop {
        // RandomState's keys are random per process and per call.
        let port = 20000 + (RandomState::new().build_hasher().finish() % 12000) as u16;
        if TcpListener::bind(("0.0.0.0", port)).is_ok() && given.lock().unwrap().insert(port) {
            return port;
        }
    }
}

/// A free TCP port on 127.0.0.1, never handed out twice by this process (so two test beds
/// started at once cannot pick the same one).
pub fn free_port() -> u16 {
    static GIVEN: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let given = GIVEN.get_or_init(Default::default);
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if given.lock().unwrap().insert(port) {
            return port;
        }
    }
}

/// Spawns `cmd` so that it is killed when the spawning thread dies (even by SIGKILL).
pub fn spawn_owned(cmd: &mut Command, log: &Path) -> Child {
    let out = std::fs::File::create(log).expect("create log file");
    let err = out.try_clone().unwrap();
    cmd.stdin(Stdio::null()).stdout(out).stderr(err);
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn()
        .unwrap_or_else(|e| panic!("spawn {:?}: {e}", cmd.get_program()))
}

fn kill_child(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// One etcd member (or a one-member cluster), stoppable and restartable with its data.
pub struct EtcdServer {
    pub name: String,
    pub client_port: u16,
    pub peer_port: u16,
    data_dir: PathBuf,
    log: PathBuf,
    initial_cluster: String,
    child: Option<Child>,
    runs: usize,
    /// Extra flags (TLS), and whether clients must use https.
    extra: Vec<String>,
    tls: bool,
}

impl EtcdServer {
    /// Starts a one-member etcd cluster under `dir` and waits until it serves.
    pub fn start(dir: &Path, name: &str) -> EtcdServer {
        EtcdServer::start_with(dir, name, &[])
    }

    /// The same with extra etcd flags (e.g. a larger --quota-backend-bytes).
    pub fn start_with(dir: &Path, name: &str, extra: &[&str]) -> EtcdServer {
        let client_port = free_port();
        let peer_port = free_port();
        let initial_cluster = format!("{name}=http://127.0.0.1:{peer_port}");
        let mut s = EtcdServer::configured(dir, name, client_port, peer_port, initial_cluster);
        s.extra = extra.iter().map(|f| f.to_string()).collect();
        s.resume();
        s
    }

    /// Starts a cluster of `n` members and waits until every member serves.
    pub fn start_cluster(dir: &Path, prefix: &str, n: usize) -> Vec<EtcdServer> {
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        let initial = ports
            .iter()
            .enumerate()
            .map(|(i, (_, p))| format!("{prefix}{i}=http://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut members: Vec<EtcdServer> = ports
            .iter()
            .enumerate()
            .map(|(i, (c, p))| {
                EtcdServer::configured(dir, &format!("{prefix}{i}"), *c, *p, initial.clone())
            })
            .collect();
        for m in &mut members {
            m.spawn();
        }
        for m in &members {
            m.wait_serving();
        }
        members
    }

    fn configured(
        dir: &Path,
        name: &str,
        client_port: u16,
        peer_port: u16,
        initial_cluster: String,
    ) -> EtcdServer {
        EtcdServer {
            name: name.to_string(),
            client_port,
            peer_port,
            data_dir: dir.join(format!("etcd-{name}")),
            log: dir.join(format!("etcd-{name}")),
            initial_cluster,
            child: None,
            runs: 0,
            extra: Vec::new(),
            tls: false,
        }
    }

    /// A one-member cluster that only speaks TLS and requires client certificates signed
    /// by `certs.ca`.
    pub fn start_tls(dir: &Path, name: &str, certs: &tls::Certs) -> EtcdServer {
        EtcdServer::start_tls_with(dir, name, certs, true)
    }

    /// A TLS etcd that does not ask clients for a certificate (server TLS only: clients
    /// verify it against the CA and authenticate, if at all, with a password).
    pub fn start_tls_without_client_certs(dir: &Path, name: &str, certs: &tls::Certs) -> EtcdServer {
        EtcdServer::start_tls_with(dir, name, certs, false)
    }

    fn start_tls_with(dir: &Path, name: &str, certs: &tls::Certs, client_cert_auth: bool) -> EtcdServer {
        let client_port = free_port();
        let peer_port = free_port();
        let initial_cluster = format!("{name}=http://127.0.0.1:{peer_port}");
        let mut s = EtcdServer::configured(dir, name, client_port, peer_port, initial_cluster);
        s.tls = true;
        s.extra = vec![
            format!("--cert-file={}", certs.server_cert.display()),
            format!("--key-file={}", certs.server_key.display()),
        ];
        // etcd asks for (and requires) a client certificate as soon as it has a trusted CA,
        // --client-cert-auth or not: without client certificates, it gets neither.
        if client_cert_auth {
            s.extra.push(format!("--trusted-ca-file={}", certs.ca.display()));
            s.extra.push("--client-cert-auth".into());
        }
        s.spawn();
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", s.client_port)).is_err() {
            assert!(start.elapsed() < DEADLINE, "etcd {name} did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        s
    }

    pub fn endpoint(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "etcd {} already running", self.name);
        let mut cmd = Command::new(&Binaries::locate().etcd);
        cmd.arg("--name")
            .arg(&self.name)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--listen-client-urls")
            .arg(self.endpoint())
            .arg("--advertise-client-urls")
            .arg(self.endpoint())
            .arg("--listen-peer-urls")
            .arg(format!("http://127.0.0.1:{}", self.peer_port))
            .arg("--initial-advertise-peer-urls")
            .arg(format!("http://127.0.0.1:{}", self.peer_port))
            .arg("--initial-cluster")
            .arg(&self.initial_cluster)
            .arg("--initial-cluster-state")
            .arg("new")
            .arg("--log-level")
            .arg(std::env::var("PODLEASE_ETCD_LOG_LEVEL").unwrap_or_else(|_| "warn".into()))
            // etcd's own heartbeat and election timeout (100 ms, 1,000 ms): the failover and
            // keepalive claims are made at the timings users run.
            .args(&self.extra);
        // One log per run: etcd-<name>-<run>.log.
        self.runs += 1;
        let log = PathBuf::from(format!("{}-{}.log", self.log.display(), self.runs));
        self.child = Some(spawn_owned(&mut cmd, &log));
    }

    fn wait_serving(&self) {
        let url = format!("127.0.0.1:{}", self.client_port);
        let start = Instant::now();
        loop {
            if let Ok(mut s) = std::net::TcpStream::connect(&url) {
                use std::io::{Read, Write};
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let req = format!("GET /health HTTP/1.0\r\nHost: {url}\r\n\r\n");
                let mut body = String::new();
                if s.write_all(req.as_bytes()).is_ok()
                    && s.read_to_string(&mut body).is_ok()
                    && body.contains("\"health\":\"true\"")
                {
                    return;
                }
            }
            assert!(
                start.elapsed() < DEADLINE,
                "etcd {} did not become healthy; log in {}-{}.log",
                self.name,
                self.log.display(),
                self.runs
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts the member again with its data (after `kill`/`stop`) and waits until it serves.
    pub fn resume(&mut self) {
        self.spawn();
        self.wait_serving_alone();
    }

    /// A single member can check /health on its own; a cluster member needs a quorum, so
    /// only wait for the port there.
    fn wait_serving_alone(&self) {
        // /health over plain HTTP needs a plain port: a TLS member is waited for by its port.
        if self.initial_cluster.contains(',') || self.tls {
            let start = Instant::now();
            while std::net::TcpStream::connect(("127.0.0.1", self.client_port)).is_err() {
                assert!(
                    start.elapsed() < DEADLINE,
                    "etcd {} did not listen",
                    self.name
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        } else {
            self.wait_serving();
        }
    }

    /// SIGKILLs the member (its data stays for `resume`).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill_child(&mut c);
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A real kube-apiserver backed by its own etcd.
pub struct ApiServer {
    pub port: u16,
    child: Child,
    /// The program and flags it was started with, so a restart is the same server.
    program: PathBuf,
    args: Vec<std::ffi::OsString>,
    dir: PathBuf,
    runs: usize,
    stopped: bool,
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.resume();
        kill_child(&mut self.child);
    }
}

impl ApiServer {
    fn spawn(program: &Path, args: &[std::ffi::OsString], log: &Path) -> Child {
        let mut cmd = Command::new(program);
        cmd.args(args);
        spawn_owned(&mut cmd, log)
    }

    /// SIGKILLs the apiserver and starts it again on the same port with the same flags,
    /// without waiting for it to serve (`TestBed::restart_apiserver` waits). The first run
    /// logs to kube-apiserver.log, run n to kube-apiserver-n.log.
    pub fn respawn(&mut self) {
        self.resume();
        kill_child(&mut self.child);
        self.runs += 1;
        let log = self.dir.join(format!("kube-apiserver-{}.log", self.runs));
        self.child = ApiServer::spawn(&self.program, &self.args, &log);
    }

    /// SIGSTOP: the process keeps its sockets open and answers nothing (a hung apiserver).
    /// Returns once every thread of it has stopped.
    pub fn stall(&mut self) {
        self.stopped = true;
        proc::stop(self.child.id());
    }

    /// SIGCONT after `stall` (a no-op otherwise).
    pub fn resume(&mut self) {
        if std::mem::take(&mut self.stopped) {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGCONT) };
        }
    }

    pub fn is_stalled(&self) -> bool {
        self.stopped
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// Everything one test needs: a real API server, a real registry etcd, and clients for both.
pub struct TestBed {
    // Field order is drop order: the apiserver goes before its storage, the dir goes last.
    pub kube: Client,
    pub etcd: etcd_client::Client,
    pub registry: EtcdServer,
    /// The other members when the registry is a cluster (`start_with_registry_cluster`):
    /// member 0 is `registry`, members 1.. are here. Empty for a one-member registry.
    pub registry_cluster: Vec<EtcdServer>,
    pub apiserver: ApiServer,
    storage: EtcdServer,
    pub kubeconfig: PathBuf,
    pub dir: tempfile::TempDir,
}

impl Drop for TestBed {
    fn drop(&mut self) {
        // Keep the logs of a failed test when asked to (PODLEASE_KEEP_TESTBED=1).
        if std::thread::panicking() && std::env::var_os("PODLEASE_KEEP_TESTBED").is_some() {
            let kept = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap()).keep();
            eprintln!("test bed kept in {}", kept.display());
        }
    }
}

impl TestBed {
    /// Starts kube-controller-manager with only the EndpointSlice controller, the reference
    /// podlease is measured against. It dies with the returned child.
    pub fn start_endpointslice_controller(&self) -> Child {
        let mut cmd = Command::new(&Binaries::locate().kube_controller_manager);
        cmd.arg(format!("--kubeconfig={}", self.kubeconfig.display()))
            .arg("--controllers=endpointslice")
            .arg("--leader-elect=false")
            .arg("--bind-address=127.0.0.1")
            .arg("--secure-port=0")
            .arg("--v=1");
        spawn_owned(
            &mut cmd,
            &self.dir.path().join("kube-controller-manager.log"),
        )
    }

    /// Starts etcd (apiserver storage), etcd (registry under test) and kube-apiserver, and
    /// waits until all three serve.
    pub async fn start() -> TestBed {
        TestBed::start_with(false).await
    }

    /// The same, with the apiserver writing an audit log of every request (Metadata level)
    /// to `audit_log()`.
    pub async fn start_audited() -> TestBed {
        TestBed::start_with(true).await
    }

    /// The same, with a registry etcd of `members` members (`registry` is member 0, the rest
    /// are in `registry_cluster`); `bed.etcd` talks to all of them.
    pub async fn start_with_registry_cluster(members: usize) -> TestBed {
        TestBed::start_full(false, members, &[]).await
    }

    /// Every request the apiserver audited (one JSON object per line).
    pub fn audit_events(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dir.path().join("audit.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    async fn start_with(audit: bool) -> TestBed {
        TestBed::start_full(audit, 1, &[]).await
    }

    /// The same, with extra flags for the API server's storage etcd (the scale bench's
    /// 150,000 pods need more than its default 2 GiB quota).
    pub async fn start_with_storage_flags(flags: &[&str]) -> TestBed {
        TestBed::start_full(false, 1, flags).await
    }

    async fn start_full(audit: bool, registry_members: usize, storage_flags: &[&str]) -> TestBed {
        let dir = tempfile::Builder::new()
            .prefix("podlease-testbed-")
            .tempdir()
            .expect("tempdir");
        let root = dir.path().to_path_buf();
        let bins = Binaries::locate();

        let storage = EtcdServer::start_with(&root, "storage", storage_flags);
        let (registry, registry_cluster) = if registry_members > 1 {
            let mut members = EtcdServer::start_cluster(&root, "registry", registry_members);
            let rest = members.split_off(1);
            (members.pop().unwrap(), rest)
        } else {
            (EtcdServer::start(&root, "registry"), Vec::new())
        };

        // Keys and tokens for the apiserver.
        let sa_key = root.join("sa.key");
        let sa_pub = root.join("sa.pub");
        run(Command::new("openssl")
            .args(["genrsa", "-out"])
            .arg(&sa_key)
            .arg("2048"));
        run(Command::new("openssl")
            .args(["rsa", "-in"])
            .arg(&sa_key)
            .args(["-pubout", "-out"])
            .arg(&sa_pub));
        let tokens = root.join("tokens.csv");
        std::fs::write(
            &tokens,
            format!("{ADMIN_TOKEN},admin,admin,system:masters\n"),
        )
        .unwrap();

        let port = free_port();
        let mut cmd = Command::new(&bins.kube_apiserver);
        cmd.arg(format!("--etcd-servers={}", storage.endpoint()))
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--secure-port={port}"))
            .arg(format!("--cert-dir={}", root.join("certs").display()))
            .arg(format!("--token-auth-file={}", tokens.display()))
            .arg("--authorization-mode=RBAC")
            .arg("--service-account-issuer=https://kubernetes.default.svc")
            .arg(format!("--service-account-key-file={}", sa_pub.display()))
            .arg(format!(
                "--service-account-signing-key-file={}",
                sa_key.display()
            ))
            .arg("--service-cluster-ip-range=10.96.0.0/16")
            .arg("--disable-admission-plugins=ServiceAccount")
            .arg("--advertise-address=127.0.0.1")
            // Since 1.35 the `kubernetes` Endpoints reconciler refuses a loopback address; no
            // test reads that Service.
            .arg("--endpoint-reconciler-type=none")
            .arg("--v=1");
        if audit {
            let policy = root.join("audit-policy.yaml");
            std::fs::write(
                &policy,
                "apiVersion: audit.k8s.io/v1\nkind: Policy\nrules:\n- level: Metadata\n",
            )
            .unwrap();
            cmd.arg(format!("--audit-policy-file={}", policy.display()))
                .arg(format!(
                    "--audit-log-path={}",
                    root.join("audit.log").display()
                ))
                .arg("--audit-log-format=json");
        }
        let program = cmd.get_program().into();
        let args: Vec<std::ffi::OsString> = cmd.get_args().map(|a| a.to_os_string()).collect();
        let child = spawn_owned(&mut cmd, &root.join("kube-apiserver.log"));
        let apiserver = ApiServer {
            port,
            child,
            program,
            args,
            dir: root.clone(),
            runs: 1,
            stopped: false,
        };

        let kubeconfig = root.join("kubeconfig");
        std::fs::write(&kubeconfig, kubeconfig_yaml(port, ADMIN_TOKEN)).unwrap();
        let kube = wait_apiserver_ready(&kubeconfig, &root).await;

        let endpoints: Vec<String> = std::iter::once(&registry)
            .chain(&registry_cluster)
            .map(|m| m.endpoint())
            .collect();
        let etcd = etcd_client::Client::connect(endpoints, None)
            .await
            .expect("connect registry etcd");

        TestBed {
            kube,
            etcd,
            registry,
            registry_cluster,
            apiserver,
            storage,
            kubeconfig,
            dir,
        }
    }

    pub fn etcd_endpoint(&self) -> String {
        self.registry.endpoint()
    }

    /// Every member of the registry etcd (one unless started with a cluster).
    pub fn etcd_endpoints(&self) -> Vec<String> {
        self.registry_members().map(|m| m.endpoint()).collect()
    }

    pub fn registry_members(&self) -> impl Iterator<Item = &EtcdServer> {
        std::iter::once(&self.registry).chain(&self.registry_cluster)
    }

    /// Registry member `i` (0 is `registry`).
    pub fn registry_member(&mut self, i: usize) -> &mut EtcdServer {
        if i == 0 {
            &mut self.registry
        } else {
            &mut self.registry_cluster[i - 1]
        }
    }

    /// SIGKILLs registry member `i` (its data stays for `resume_registry_member`).
    pub fn kill_registry_member(&mut self, i: usize) {
        self.registry_member(i).kill();
    }

    /// Starts registry member `i` again with its data (waits for its port only: a member
    /// alone cannot tell whether it is healthy).
    pub fn resume_registry_member(&mut self, i: usize) {
        self.registry_member(i).resume();
    }

    /// Restarts the apiserver on the same port with the same flags and waits until it serves.
    pub async fn restart_apiserver(&mut self) {
        self.apiserver.respawn();
        self.wait_apiserver_ready().await;
    }

    /// Waits until the apiserver serves (/readyz ok and the bootstrap namespaces there).
    pub async fn wait_apiserver_ready(&self) {
        wait_apiserver_ready(&self.kubeconfig, self.dir.path()).await;
    }

    /// SIGSTOPs the apiserver: connections stay open, nothing answers.
    pub fn stall_apiserver(&mut self) {
        self.apiserver.stall();
    }

    /// SIGCONTs the apiserver after `stall_apiserver`.
    pub fn resume_apiserver(&mut self) {
        self.apiserver.resume();
    }

    /// A kubeconfig (admin token) for an apiserver reachable on `port`, e.g. a fault proxy
    /// in front of the bed's apiserver (TLS is not verified, so a byte proxy works).
    pub fn kubeconfig_for_port(&self, name: &str, port: u16) -> PathBuf {
        let path = self.dir.path().join(format!("kubeconfig-{name}"));
        std::fs::write(&path, kubeconfig_yaml(port, ADMIN_TOKEN)).unwrap();
        path
    }

    pub fn apiserver_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.apiserver.port)
    }

    /// A kubeconfig for the same apiserver that authenticates with `token`.
    pub fn kubeconfig_with_token(&self, name: &str, token: &str) -> PathBuf {
        let path = self.dir.path().join(format!("kubeconfig-{name}"));
        std::fs::write(&path, kubeconfig_yaml(self.apiserver.port, token)).unwrap();
        path
    }

    /// Applies the project's generated CRD and waits until the API server serves it.
    pub async fn apply_crd(&self) {
        apply_crd(&self.kube).await
    }

    /// Runs the real kubectl against the bed and returns its output (what a user sees).
    pub fn kubectl(&self, args: &[&str]) -> String {
        let out = Command::new(&Binaries::locate().kubectl).arg("--kubeconfig").arg(&self.kubeconfig).args(args).output().expect("kubectl");
        assert!(out.status.success(), "kubectl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).expect("kubectl prints UTF-8")
    }

    /// The apiserver's log, for failure messages.
    pub fn apiserver_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("kube-apiserver.log")).unwrap_or_default()
    }
}

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("run {:?}: {e}", cmd.get_program()));
    assert!(
        out.status.success(),
        "{:?} failed: {}",
        cmd,
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn kubeconfig_yaml(port: u16, token: &str) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: testbed
  cluster:
    server: https://127.0.0.1:{port}
    insecure-skip-tls-verify: true
users:
- name: testbed
  user:
    token: {token}
contexts:
- name: testbed
  context:
    cluster: testbed
    user: testbed
current-context: testbed
"
    )
}

/// A kube client from a kubeconfig file.
pub async fn client_from(kubeconfig: &Path) -> Client {
    let kc = Kubeconfig::read_from(kubeconfig).expect("read kubeconfig");
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("kubeconfig");
    Client::try_from(config).expect("kube client")
}

async fn wait_apiserver_ready(kubeconfig: &Path, root: &Path) -> Client {
    let client = client_from(kubeconfig).await;
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    let start = Instant::now();
    loop {
        let ready = client
            .request_text(http::Request::get("/readyz").body(Vec::new()).unwrap())
            .await
            .map(|b| b.trim() == "ok")
            .unwrap_or(false);
        // The bootstrap controller creates these; pods can only be created once they exist.
        if ready
            && namespaces.get_opt("default").await.ok().flatten().is_some()
            && namespaces
                .get_opt("kube-system")
                .await
                .ok()
                .flatten()
                .is_some()
        {
            return client;
        }
        if start.elapsed() > Duration::from_secs(60) {
            let log = std::fs::read_to_string(root.join("kube-apiserver.log")).unwrap_or_default();
            let tail = tail(&log, 30, "\n");
            panic!("kube-apiserver did not become ready within 60s; log tail:\n{tail}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Server-side applies the generated CRD and waits for `Established`.
pub async fn apply_crd(client: &Client) {
    use kube::CustomResourceExt;
    let crd = podlease::registration::ServiceRegistration::crd();
    let name = crd.metadata.name.clone().unwrap();
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    api.patch(
        &name,
        &PatchParams::apply("podlease-tests").force(),
        &Patch::Apply(&crd),
    )
    .await
    .expect("apply CRD");
    wait_until("CRD established", DEADLINE, || async {
        let crd = api.get(&name).await.ok()?;
        let established = crd
            .status?
            .conditions?
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True");
        established.then_some(())
    })
    .await;
}

/// Polls `check` until it yields `Some`, failing the test after `deadline`.
pub async fn wait_until<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// All keys and values under `prefix` in the registry etcd, as strings.
pub async fn etcd_dump(etcd: &etcd_client::Client, prefix: &str) -> BTreeMap<String, String> {
    let mut kv = etcd.kv_client();
    let resp = kv
        .get(prefix, Some(etcd_client::GetOptions::new().with_prefix()))
        .await
        .expect("etcd get");
    resp.kvs()
        .iter()
        .map(|kv| {
            (
                kv.key_str().unwrap().to_string(),
                kv.value_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// The last `n` lines of `text`, joined by `sep`.
pub fn tail(text: &str, n: usize, sep: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join(sep)
}
