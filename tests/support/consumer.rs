//! A real consumer at the other end: `etcd-resolve` (tools/consumers/etcd-naming, built by
//! scripts/consumers.sh) resolves `etcd:///<service>` through etcd's own gRPC naming resolver
//! as a grpc-go client does, and prints every address set the resolver hands to grpc. This
//! starts it, records each set with the Instant it arrived, and waits on them.
//!
//! Network safety: under `--dial` the channel connects to what it resolves. The binary itself
//! refuses any address that is not this machine's; on top of that, `Resolver` fails the test
//! if a dialling resolver ever sees an address outside 127.0.0.0/8, so a test that would
//! publish pod IPs with a dialling consumer is caught, not run. The one exception is
//! `start_in`: a consumer started inside the node tests' sealed network namespace (no
//! interface off the machine, no default route), where pod addresses are real and dialling
//! them is what a client in the cluster does.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{spawn_owned, tail, wait_until};

/// One address set the resolver handed to grpc (sorted, duplicates kept).
#[derive(Debug, Clone, PartialEq)]
pub struct Update {
    /// When the line reached the test.
    pub at: Instant,
    /// When the resolver called UpdateState (the binary's clock).
    pub t_unix_nanos: i128,
    pub addrs: Vec<String>,
}

#[derive(Default)]
struct Seen {
    updates: Vec<Update>,
    /// `{"event": ...}` lines (watching, state, refused_dial, resolver_error).
    events: Vec<(Instant, String, String)>,
    /// The etcd client's zap warnings (JSON lines on stderr), e.g. undecodable values.
    warnings: Vec<serde_json::Value>,
    /// Lines that are neither (a Go panic, a usage message): kept for failure messages.
    other: Vec<String>,
    /// An address a dialling resolver must never have been given.
    unsafe_addr: Option<String>,
    exited: bool,
}

/// `etcd-resolve` running against an etcd, killed on drop (and with the test thread).
pub struct Resolver {
    child: Child,
    seen: Arc<Mutex<Seen>>,
    pub log: PathBuf,
    pub service: String,
}

/// The binary: $PODLEASE_ETCD_RESOLVE_BIN, else the cache's testbed.env entry (as
/// `Binaries::locate` finds the others).
pub fn binary() -> PathBuf {
    super::testbed_path("PODLEASE_ETCD_RESOLVE_BIN")
}

impl Resolver {
    /// Starts resolving `etcd:///<service>` against `endpoints` and waits until the resolver
    /// watches (its initial Get is done). With `dial`, grpc keeps a round_robin connection
    /// to what it resolves: only ever with addresses on 127.0.0.0/8.
    pub async fn start(endpoints: &[String], service: &str, dial: bool, dir: &Path) -> Resolver {
        let mut cmd = Command::new(binary());
        if dial {
            cmd.arg("--dial");
        }
        Self::launch(cmd, endpoints, service, dial, dir).await
    }

    /// Starts it through `cmd` (the binary run inside a sealed network namespace, e.g.
    /// `MiniCluster::in_node(binary())`), dialling every address it resolves (`--dial
    /// --dial-any`): grpc keeps a round_robin subchannel per address, as a client in the
    /// cluster does. Only for a namespace no packet can leave.
    pub async fn start_in(mut cmd: Command, endpoints: &[String], service: &str, dir: &Path) -> Resolver {
        cmd.args(["--dial", "--dial-any"]);
        Self::launch(cmd, endpoints, service, false, dir).await
    }

    /// `loopback_only`: fail the test if an address outside 127.0.0.0/8 is resolved (the
    /// binary would dial it on this machine).
    async fn launch(mut cmd: Command, endpoints: &[String], service: &str, loopback_only: bool, dir: &Path) -> Resolver {
        let name = service.replace('/', "_");
        let log = dir.join(format!("etcd-resolve-{name}.log"));
        // stdout and stderr go through a FIFO so every line is timed on arrival, and is
        // copied to `log` as it comes.
        let fifo = dir.join(format!("etcd-resolve-{name}.fifo"));
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo {}: {}", fifo.display(), std::io::Error::last_os_error());
        // Opening the read end first (non-blocking) lets spawn_owned open the write end at once.
        let reader = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(&fifo).expect("open fifo");
        cmd.arg(format!("--endpoints={}", endpoints.join(","))).arg(format!("--service={service}"));
        let child = spawn_owned(&mut cmd, &fifo);
        drop(cmd); // its copies of the write end: EOF must mean the child is gone
        // SAFETY: clearing O_NONBLOCK on our own descriptor.
        unsafe { libc::fcntl(reader.as_raw_fd(), libc::F_SETFL, 0) };

        let seen = Arc::new(Mutex::new(Seen::default()));
        let shared = seen.clone();
        let mut copy = std::fs::File::create(&log).expect("create resolver log");
        std::thread::spawn(move || {
            for line in BufReader::new(reader).lines() {
                let Ok(line) = line else { break };
                let at = Instant::now();
                let _ = writeln!(copy, "{line}");
                let mut s = shared.lock().unwrap();
                record(&mut s, at, &line, loopback_only);
            }
            shared.lock().unwrap().exited = true;
        });

        let r = Resolver { child, seen, log, service: service.to_string() };
        let what = format!("etcd-resolve watching etcd:///{service}");
        wait_until(&what, super::DEADLINE, || async {
            r.check();
            r.seen.lock().unwrap().events.iter().any(|(_, e, _)| e == "watching").then_some(())
        })
        .await;
        r
    }

    /// Every address set seen so far, in order.
    pub fn history(&self) -> Vec<Update> {
        self.check();
        self.seen.lock().unwrap().updates.clone()
    }

    /// The set grpc holds now (empty before the first update: the resolver sends none for
    /// an empty prefix).
    pub fn current(&self) -> Vec<String> {
        self.history().last().map(|u| u.addrs.clone()).unwrap_or_default()
    }

    /// Waits until the resolver's set equals `want` (any order) within `within`; the first
    /// update that made it so.
    pub async fn wait_for(&self, want: &[&str], within: Duration) -> Update {
        let mut want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
        want.sort();
        let what = format!("etcd:///{} to resolve to {want:?}", self.service);
        let start = Instant::now();
        loop {
            self.check();
            {
                let s = self.seen.lock().unwrap();
                if s.updates.last().is_some_and(|u| u.addrs == want) {
                    // The first of the trailing run of updates with this set.
                    return s.updates.iter().rev().take_while(|u| u.addrs == want).last().unwrap().clone();
                }
            }
            assert!(
                start.elapsed() < within,
                "timed out after {within:?} waiting for {what}; last sets: {:?}; log tail:\n{}",
                self.recent(5),
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// The distinct sets in the order they appeared (consecutive repeats folded), each with
    /// the arrival of its first update.
    pub fn changes(&self) -> Vec<(Instant, Vec<String>)> {
        let mut out: Vec<(Instant, Vec<String>)> = Vec::new();
        for u in self.history() {
            if out.last().is_none_or(|(_, a)| *a != u.addrs) {
                out.push((u.at, u.addrs));
            }
        }
        out
    }

    /// The smallest set the resolver handed to grpc at or after `since` (the set in force
    /// at `since` included); None if it never had one.
    pub fn smallest_since(&self, since: Instant) -> Option<Vec<String>> {
        let h = self.history();
        let in_force = h.iter().rev().find(|u| u.at <= since).cloned();
        in_force.into_iter().chain(h.into_iter().filter(|u| u.at > since)).map(|u| u.addrs).min_by_key(|a| a.len())
    }

    /// The etcd client's warnings, e.g. `unmarshal endpoint update failed` with the key.
    pub fn warnings(&self) -> Vec<serde_json::Value> {
        self.check();
        self.seen.lock().unwrap().warnings.clone()
    }

    /// Keys whose values the resolver could not decode (and so left out).
    pub fn undecodable_keys(&self) -> Vec<String> {
        self.warnings()
            .iter()
            .filter(|w| w["msg"] == "unmarshal endpoint update failed")
            .filter_map(|w| w["key"].as_str().map(str::to_string))
            .collect()
    }

    /// `(event, detail)` lines: watching, state (under --dial), refused_dial, resolver_error.
    pub fn events(&self) -> Vec<(String, String)> {
        self.check();
        self.seen.lock().unwrap().events.iter().map(|(_, e, d)| (e.clone(), d.clone())).collect()
    }

    fn recent(&self, n: usize) -> Vec<Vec<String>> {
        let s = self.seen.lock().unwrap();
        s.updates.iter().rev().take(n).rev().map(|u| u.addrs.clone()).collect()
    }

    fn log_tail(&self) -> String {
        tail(&std::fs::read_to_string(&self.log).unwrap_or_default(), 20, "\n")
    }

    /// Fails the test if the binary died or a dialling resolver was handed a foreign address.
    fn check(&self) {
        let s = self.seen.lock().unwrap();
        if let Some(a) = &s.unsafe_addr {
            panic!("a dialling etcd-resolve was handed {a}: only 127.0.0.0/8 addresses may be published to it (it would dial them)");
        }
        assert!(!s.exited, "etcd-resolve exited; output:\n{}", s.other.join("\n"));
    }
}

fn record(s: &mut Seen, at: Instant, line: &str, loopback_only: bool) {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
        s.other.push(line.to_string());
        return;
    };
    if let Some(addrs) = v.get("addrs").and_then(|a| a.as_array()) {
        let addrs: Vec<String> = addrs.iter().filter_map(|a| a.as_str().map(str::to_string)).collect();
        if loopback_only && let Some(bad) = addrs.iter().find(|a| !is_loopback(a)) {
            s.unsafe_addr.get_or_insert(bad.clone());
        }
        let t_unix_nanos = v["t_unix_nanos"].as_i64().unwrap_or_default() as i128;
        s.updates.push(Update { at, t_unix_nanos, addrs });
    } else if let Some(e) = v.get("event").and_then(|e| e.as_str()) {
        s.events.push((at, e.to_string(), v["detail"].as_str().unwrap_or_default().to_string()));
    } else if v.get("level").is_some() {
        s.warnings.push(v);
    } else {
        s.other.push(line.to_string());
    }
}

fn is_loopback(addr: &str) -> bool {
    addr.parse::<std::net::SocketAddr>().is_ok_and(|a| a.ip().is_loopback())
}

impl Drop for Resolver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// p50 and max of `figures` (nearest rank), for the report lines.
pub fn p50_max(figures: &[Duration]) -> (Duration, Duration) {
    let mut v = figures.to_vec();
    v.sort();
    (super::percentile(&v, 0.5), *v.last().expect("at least one figure"))
}
