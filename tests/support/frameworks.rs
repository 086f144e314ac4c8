//! The consumer frameworks' own clients (tools/consumers/<framework>, built by
//! scripts/consumers.sh), run as a Go service of that framework would run them.
//!
//! Each program speaks one protocol (tools/consumers/README.md; etcd-naming's `addrs` lines
//! are read as its sets): `resolve` prints JSON lines,
//! `{"event":"watching"}` once subscribed, then `{"instances":[...]}` with the whole set the
//! framework's client hands out, first and on every change, and `{"event":"called",...}` for
//! each RPC that reached a server under `--dial`; `register` registers an instance with the
//! framework's own register/keepalive code and prints `{"event":"registered"}`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// A framework whose client resolves what podlease writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framework {
    GoZero,
    Kratos,
    GoMicro,
    Kitex,
    Hertz,
    /// CoreDNS's etcd plugin, read through DNS queries (A and SRV) by a DNS client.
    CoreDns,
    EtcdNaming,
}

impl Framework {
    /// The directory under tools/consumers and the testbed.env name of its binary.
    pub fn name(self) -> &'static str {
        match self {
            Framework::GoZero => "go-zero",
            Framework::Kratos => "kratos",
            Framework::GoMicro => "go-micro",
            Framework::Kitex => "kitex",
            Framework::Hertz => "hertz",
            Framework::CoreDns => "coredns",
            Framework::EtcdNaming => "etcd-naming",
        }
    }

    pub fn binary(self) -> PathBuf {
        super::testbed_path(&format!("PODLEASE_CONSUMER_{}_BIN", self.name().replace('-', "_").to_uppercase()))
    }

    /// The module version of the framework's client that the binary was built with.
    pub fn version(self) -> String {
        super::testbed_var(&format!("PODLEASE_CONSUMER_{}_VERSION", self.name().replace('-', "_").to_uppercase())).unwrap_or_default()
    }
}

/// One line a client printed, timed on arrival.
#[derive(Debug, Clone)]
pub struct Line {
    pub at: Instant,
    pub json: Value,
}

/// A running `resolve` or `register`; killed on drop.
pub struct Client {
    pub framework: Framework,
    child: Child,
    lines: Arc<Mutex<Vec<Line>>>,
    log: PathBuf,
}

impl Client {
    /// `<program> resolve`, waiting until it watches. `dial`: also call through the
    /// framework's RPC client every 200 ms (only loopback addresses are ever published to it).
    /// `extra`: the program's own flags (CoreDNS's client: `--dns=<server>`).
    pub async fn resolve(framework: Framework, endpoints: &[String], service: &str, dial: bool, extra: &[String], dir: &Path) -> Client {
        let mut args = vec!["resolve".to_string(), format!("--endpoints={}", endpoints.join(",")), format!("--service={service}")];
        if dial {
            args.push("--dial".into());
        }
        args.extend(extra.iter().cloned());
        let c = Client::spawn(framework, Command::new(framework.binary()), &args, dir, "resolve");
        c.wait_event("watching", super::DEADLINE).await;
        c
    }

    /// `<program> resolve --dial --dial-any` through `cmd` (the binary run inside the node's
    /// sealed network namespace, `MiniCluster::in_node(framework.binary())`): there the
    /// client may dial the pods' addresses, and no packet can leave the machine.
    pub async fn resolve_in(framework: Framework, cmd: Command, endpoints: &[String], service: &str, dir: &Path) -> Client {
        let args = vec!["resolve".to_string(), format!("--endpoints={}", endpoints.join(",")), format!("--service={service}"), "--dial".into(), "--dial-any".into()];
        let c = Client::spawn(framework, cmd, &args, dir, "resolve");
        c.wait_event("watching", super::DEADLINE).await;
        c
    }

    /// `<program> register`: the framework's own server-side registration of `addr` (and its
    /// RPC server there, where it has one), waiting until it is registered.
    pub async fn register(framework: Framework, endpoints: &[String], service: &str, addr: &str, extra: &[&str], dir: &Path) -> Client {
        let mut args = vec!["register".to_string(), format!("--endpoints={}", endpoints.join(",")), format!("--service={service}"), format!("--addr={addr}")];
        args.extend(extra.iter().map(|s| s.to_string()));
        let c = Client::spawn(framework, Command::new(framework.binary()), &args, dir, "register");
        c.wait_event("registered", super::DEADLINE).await;
        c
    }

    fn spawn(framework: Framework, mut cmd: Command, args: &[String], dir: &Path, what: &str) -> Client {
        static RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = RUNS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let log = dir.join(format!("{}-{what}-{n}.log", framework.name()));
        let stderr = std::fs::File::create(&log).expect("client log");
        cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(stderr);
        // SAFETY: prctl only, between fork and exec.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {}: {e}", framework.name()));
        let out = child.stdout.take().unwrap();
        let lines: Arc<Mutex<Vec<Line>>> = Arc::default();
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                let at = Instant::now();
                let mut json: Value = serde_json::from_str(&line).unwrap_or_else(|_| serde_json::json!({"unparsed": line}));
                // etcd-naming keeps etcd-resolve's own lines: `addrs` is its set.
                if let Some(addrs) = json.get("addrs").and_then(|a| a.as_array()).cloned() {
                    json = serde_json::json!({"instances": addrs.iter().map(|a| serde_json::json!({"addr": a})).collect::<Vec<_>>()});
                }
                sink.lock().unwrap().push(Line { at, json });
            }
        });
        Client { framework, child, lines, log }
    }

    pub fn lines(&self) -> Vec<Line> {
        self.lines.lock().unwrap().clone()
    }

    /// The smallest set in force at or after `since` (the one in force then included).
    pub fn smallest_since(&self, since: Instant) -> Option<Vec<String>> {
        let sets = self.sets();
        let in_force = sets.iter().rev().find(|(at, _)| *at <= since).cloned();
        in_force.into_iter().chain(sets.into_iter().filter(|(at, _)| *at > since)).map(|(_, s)| addrs_of(&s)).min_by_key(|a| a.len())
    }

    /// Every set the client handed out, in order, timed on arrival.
    pub fn sets(&self) -> Vec<(Instant, Vec<Value>)> {
        self.lines().into_iter().filter_map(|l| Some((l.at, l.json.get("instances")?.as_array()?.clone()))).collect()
    }

    /// The addresses of the set in force now.
    pub fn current(&self) -> Option<Vec<Value>> {
        self.sets().pop().map(|(_, s)| s)
    }

    /// Events named `event` (watching, error, called, registered), timed on arrival.
    pub fn events(&self, event: &str) -> Vec<Line> {
        self.lines().into_iter().filter(|l| l.json["event"] == event).collect()
    }

    async fn wait_event(&self, event: &str, within: Duration) {
        let what = format!("{} to print {event}", self.framework.name());
        let start = Instant::now();
        loop {
            if !self.events(event).is_empty() {
                return;
            }
            self.check_alive();
            assert!(start.elapsed() < within, "timed out after {within:?} waiting for {what}; stderr:\n{}", self.log_tail());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until the set in force has exactly `addrs` (sorted), and returns when that set
    /// first arrived and the set itself.
    pub async fn wait_addrs(&self, addrs: &[String], within: Duration) -> (Instant, Vec<Value>) {
        let mut want: Vec<String> = addrs.to_vec();
        want.sort();
        let start = Instant::now();
        loop {
            if let Some((at, set)) = self.sets().pop()
                && addrs_of(&set) == want
            {
                return (at, set);
            }
            self.check_alive();
            assert!(
                start.elapsed() < within,
                "timed out after {within:?} waiting for {} to resolve {want:?}; last sets: {:?}; stderr:\n{}",
                self.framework.name(),
                self.sets().iter().rev().take(3).map(|(_, s)| addrs_of(s)).collect::<Vec<_>>(),
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    fn check_alive(&self) {
        // try_wait needs &mut; a dead child shows as a closed stdout with no more lines, so
        // read /proc instead.
        assert!(!super::proc::has_exited(self.child.id()), "{} exited; stderr:\n{}", self.framework.name(), self.log_tail());
    }

    /// SIGTERM, then the exit (the framework deregisters as it does on a shutdown).
    pub async fn stop(mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            // Never a thread sleep here: it would hold one of the test runtime's workers.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A CoreDNS server built from its module (PODLEASE_COREDNS_BIN) serving `zone` from the
/// registry etcd's SkyDNS records under `/skydns`, on a free loopback port; killed on drop.
pub struct CoreDns {
    child: Child,
    pub addr: String,
}

impl CoreDns {
    pub async fn start(zone: &str, endpoints: &[String], dir: &Path) -> CoreDns {
        let port = super::free_port();
        let corefile = dir.join("Corefile");
        // The plugin's defaults otherwise (min-lease-ttl 30 s, max-lease-ttl 24 h).
        std::fs::write(&corefile, format!("{zone}:{port} {{\n    bind 127.0.0.1\n    etcd {{\n        path /skydns\n        endpoint {}\n    }}\n}}\n", endpoints.join(" "))).unwrap();
        let mut cmd = Command::new(super::testbed_path("PODLEASE_COREDNS_BIN"));
        cmd.arg("-conf").arg(&corefile);
        let child = super::spawn_owned(&mut cmd, &dir.join("coredns.log"));
        let addr = format!("127.0.0.1:{port}");
        let start = Instant::now();
        // It serves TCP on the same port as UDP: a listening socket means it serves.
        while tokio::net::TcpStream::connect(&addr).await.is_err() {
            assert!(start.elapsed() < super::DEADLINE, "CoreDNS did not listen on {addr}: {}", std::fs::read_to_string(dir.join("coredns.log")).unwrap_or_default());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        CoreDns { child, addr }
    }
}

impl Drop for CoreDns {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The sorted addresses of a set.
pub fn addrs_of(set: &[Value]) -> Vec<String> {
    let mut a: Vec<String> = set.iter().filter_map(|i| i["addr"].as_str().map(str::to_string)).collect();
    a.sort();
    a
}
