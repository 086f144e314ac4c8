//! Reading the registry etcd the way consumers do.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{Client, EventType, GetOptions, KeyValue, WatchOptions};

use super::{AbortOnDrop, DEADLINE, wait_until};

/// Waits until `key` exists and returns it.
pub async fn wait_key(etcd: &Client, key: &str) -> KeyValue {
    wait_key_within(etcd, key, DEADLINE).await
}

pub async fn wait_key_within(etcd: &Client, key: &str, deadline: Duration) -> KeyValue {
    let mut kv = etcd.kv_client();
    wait_until(&format!("etcd key {key}"), deadline, || {
        let mut kv = kv.clone();
        async move { kv.get(key, None).await.ok()?.kvs().first().cloned() }
    })
    .await;
    kv.get(key, None).await.unwrap().kvs()[0].clone()
}

/// Waits until `key` is gone.
pub async fn wait_absent(etcd: &Client, key: &str, deadline: Duration) {
    let kv = etcd.kv_client();
    wait_until(&format!("etcd key {key} to vanish"), deadline, || {
        let mut kv = kv.clone();
        async move { kv.get(key, None).await.ok()?.kvs().is_empty().then_some(()) }
    })
    .await
}

/// Keys under `prefix`.
pub async fn keys(etcd: &Client, prefix: &str) -> Vec<KeyValue> {
    let mut kv = etcd.kv_client();
    kv.get(prefix, Some(GetOptions::new().with_prefix())).await.expect("etcd get").kvs().to_vec()
}

/// Keys and leases under a prefix, to compare before and after a fault.
pub async fn leases_under(etcd: &Client, prefix: &str) -> std::collections::BTreeSet<(String, i64)> {
    keys(etcd, prefix).await.iter().map(|kv| (kv.key_str().unwrap().to_string(), kv.lease())).collect()
}

/// Granted TTL of a lease (seconds).
pub async fn granted_ttl(etcd: &Client, lease: i64) -> i64 {
    let mut lc = etcd.lease_client();
    lc.time_to_live(lease, None).await.expect("lease ttl").granted_ttl()
}

/// Waits until every lease of the keys under `prefix` has been renewed after `since` (which
/// may lie ahead: then at least until then), reading etcd's own remaining TTLs: a lease last
/// renewed at or before `since` has at most `granted - (now - since)` seconds left (etcd
/// truncates), so more than that means a renewal came later. Returns how many leases were
/// checked. Panics after `within` past `since`, naming the leases not renewed.
pub async fn wait_renewed_after(etcd: &Client, prefix: &str, since: std::time::Instant, within: Duration) -> usize {
    let mut lc = etcd.lease_client();
    // Two seconds past `since` at least: a renewal then shows above etcd's whole-second TTL.
    let from = since + Duration::from_secs(2);
    loop {
        let now = std::time::Instant::now();
        if now < from {
            tokio::time::sleep(from - now).await;
            continue;
        }
        let leases: std::collections::BTreeSet<i64> = keys(etcd, prefix).await.iter().map(|kv| kv.lease()).collect();
        let elapsed = now.duration_since(since).as_secs_f64();
        let mut stale = Vec::new();
        for &lease in &leases {
            let ttl = lc.time_to_live(lease, None).await.expect("lease ttl");
            if (ttl.ttl() as f64) <= ttl.granted_ttl() as f64 - elapsed {
                stale.push((lease, ttl.ttl(), ttl.granted_ttl()));
            }
        }
        if stale.is_empty() && !leases.is_empty() {
            return leases.len();
        }
        assert!(now.duration_since(since) < within, "{}", if leases.is_empty() {
            format!("no key left under {prefix} (their leases expired?) {within:?} after the point asked")
        } else {
            format!("leases under {prefix} not renewed within {within:?} after the point asked (lease, TTL left, granted): {stale:?}")
        });
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// One event an etcd watcher saw.
#[derive(Debug, Clone, PartialEq)]
pub struct Seen {
    pub put: bool,
    pub key: String,
    pub value: String,
    pub prev_value: Option<String>,
    /// The revision of the event (the key's mod revision; for a DELETE, the revision that
    /// deleted it), to order events across keys.
    pub revision: i64,
}

/// Records every event under a prefix from now on (with previous values, as go-micro reads).
/// The watch survives etcd going away: it resumes from the revision after the last one it
/// saw, so no event is missed across an outage. A watch etcd cancels (its history was
/// compacted past the resume point) makes every read of the recorder fail: a recorder that
/// stopped seeing must never read as "no DELETE".
#[derive(Clone)]
pub struct Recorder {
    events: Arc<Mutex<Vec<Seen>>>,
    broken: Arc<Mutex<Option<String>>>,
    _task: Arc<AbortOnDrop>,
}

impl Recorder {
    pub async fn start(etcd: &Client, prefix: &str) -> Recorder {
        let mut w = etcd.watch_client();
        let options = || WatchOptions::new().with_prefix().with_prev_key();
        let mut stream = w.watch(prefix, Some(options())).await.expect("watch");
        let events: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let broken: Arc<Mutex<Option<String>>> = Arc::default();
        let (sink, failed) = (events.clone(), broken.clone());
        let prefix = prefix.to_string();
        let task = tokio::spawn(async move {
            // The revision to resume from: after the watch's start, then after each event.
            let mut next: Option<i64> = None;
            loop {
                loop {
                    let resp = match stream.message().await {
                        Ok(Some(resp)) => resp,
                        Ok(None) | Err(_) => break,
                    };
                    if resp.canceled() {
                        *failed.lock().unwrap() = Some(format!(
                            "etcd cancelled the recorder's watch of {prefix:?} (compacted at {}): {}",
                            resp.compact_revision(),
                            resp.cancel_reason()
                        ));
                        return;
                    }
                    if next.is_none() {
                        next = resp.header().map(|h| h.revision() + 1);
                    }
                    for ev in resp.events() {
                        let Some(kv) = ev.kv() else { continue };
                        next = Some(kv.mod_revision() + 1);
                        sink.lock().unwrap().push(Seen {
                            put: ev.event_type() == EventType::Put,
                            key: kv.key_str().unwrap_or_default().to_string(),
                            value: kv.value_str().unwrap_or_default().to_string(),
                            prev_value: ev.prev_kv().map(|p| p.value_str().unwrap_or_default().to_string()),
                            revision: kv.mod_revision(),
                        });
                    }
                }
                // etcd went away (or the stream ended): watch again from where we were, until
                // it answers.
                stream = loop {
                    let mut opts = options();
                    if let Some(rev) = next {
                        opts = opts.with_start_revision(rev);
                    }
                    match w.watch(prefix.as_str(), Some(opts)).await {
                        Ok(s) => break s,
                        Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                    }
                };
            }
        });
        Recorder { events, broken, _task: Arc::new(AbortOnDrop(task.abort_handle())) }
    }

    /// Every event seen so far; panics if the watch was cancelled.
    pub fn all(&self) -> Vec<Seen> {
        let broken = self.broken.lock().unwrap().clone();
        if let Some(why) = broken {
            panic!("{why}");
        }
        self.events.lock().unwrap().clone()
    }

    pub fn deletes(&self) -> Vec<Seen> {
        self.all().into_iter().filter(|e| !e.put).collect()
    }
}

/// Runs the real etcdctl against `endpoint` (with `certs` for a TLS etcd); the output.
pub fn etcdctl(endpoint: &str, certs: Option<&super::tls::Certs>, args: &[&str]) -> std::process::Output {
    let mut cmd = std::process::Command::new(&super::Binaries::locate().etcdctl);
    cmd.env("ETCDCTL_API", "3").arg(format!("--endpoints={endpoint}"));
    if let Some(c) = certs {
        cmd.arg(format!("--cacert={}", c.ca.display()))
            .arg(format!("--cert={}", c.client_cert.display()))
            .arg(format!("--key={}", c.client_key.display()));
    }
    cmd.args(args).output().expect("run etcdctl")
}

/// etcdctl that must succeed.
pub fn etcdctl_ok(endpoint: &str, certs: Option<&super::tls::Certs>, args: &[&str]) {
    let out = etcdctl(endpoint, certs, args);
    assert!(out.status.success(), "etcdctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Every event under `prefix` from revision `from` up to now, read back from etcd's history:
/// unlike a live [`Recorder`], it misses nothing across etcd restarts or broken watches.
pub async fn history(etcd: &Client, prefix: &str, from: i64) -> Vec<Seen> {
    let head = etcd
        .kv_client()
        .get(prefix, Some(GetOptions::new().with_prefix().with_count_only()))
        .await
        .expect("get")
        .header()
        .expect("header")
        .revision();
    let mut w = etcd.watch_client();
    let opts = WatchOptions::new().with_prefix().with_prev_key().with_start_revision(from);
    let mut stream = w.watch(prefix, Some(opts)).await.expect("watch");
    let mut seen = Vec::new();
    let start = std::time::Instant::now();
    loop {
        // A progress notice comes only once the watcher has caught up with the store: after
        // it, every event up to `head` has been delivered.
        stream.request_progress().await.expect("progress request");
        if let Ok(resp) = tokio::time::timeout(Duration::from_millis(500), stream.message()).await {
            let resp = resp.expect("watch").expect("the history watch ended");
            let at = resp.header().map(|h| h.revision()).unwrap_or(0);
            if !resp.created() && resp.events().is_empty() && at >= head {
                return seen;
            }
            for ev in resp.events() {
                let Some(kv) = ev.kv() else { continue };
                seen.push(Seen {
                    put: ev.event_type() == EventType::Put,
                    key: kv.key_str().unwrap_or_default().to_string(),
                    value: kv.value_str().unwrap_or_default().to_string(),
                    prev_value: ev.prev_kv().map(|p| p.value_str().unwrap_or_default().to_string()),
                    revision: kv.mod_revision(),
                });
            }
        }
        assert!(start.elapsed() < DEADLINE, "the history of {prefix} from revision {from} did not catch up with revision {head}");
    }
}

/// The current revision of the registry etcd: [`history`] from one past it sees everything
/// that happens from now on.
pub async fn revision(etcd: &Client) -> i64 {
    etcd.kv_client().get("/", Some(GetOptions::new().with_count_only())).await.expect("etcd get").header().expect("header").revision()
}

/// The first event of `put` kind on `key` in `events`, if any.
pub fn first_event<'a>(events: &'a [Seen], key: &str, put: bool) -> Option<&'a Seen> {
    events.iter().find(|e| e.key == key && e.put == put)
}

/// The password of the `podlease` user of an [`auth_etcd`].
pub const AUTH_USER_PASSWORD: &str = "s3cret-Pa55word";

/// A one-member TLS etcd with auth on: users root and podlease (readwrite under "/", not
/// root, so it may not ask a member for its status), password [`AUTH_USER_PASSWORD`].
pub async fn auth_etcd(dir: &std::path::Path, name: &str, certs: &super::tls::Certs) -> super::EtcdServer {
    enable_auth(super::EtcdServer::start_tls(dir, name, certs), certs).await
}

/// [`auth_etcd`] on an etcd that speaks TLS but asks for no client certificate: the password
/// is the only credential.
pub async fn auth_etcd_without_client_certs(dir: &std::path::Path, name: &str, certs: &super::tls::Certs) -> super::EtcdServer {
    enable_auth(super::EtcdServer::start_tls_without_client_certs(dir, name, certs), certs).await
}

/// Adds the users and role of [`auth_etcd`] to a TLS etcd and turns auth on.
async fn enable_auth(etcd: super::EtcdServer, certs: &super::tls::Certs) -> super::EtcdServer {
    let endpoint = etcd.endpoint();
    wait_until("TLS etcd healthy", DEADLINE, || async { etcdctl(&endpoint, Some(certs), &["endpoint", "health"]).status.success().then_some(()) }).await;
    let user = format!("--new-user-password={AUTH_USER_PASSWORD}");
    for args in [
        &["user", "add", "root", "--new-user-password=root-secret-pw"][..],
        &["role", "add", "podlease"],
        &["role", "grant-permission", "podlease", "readwrite", "/", "--prefix=true"],
        &["user", "add", "podlease", &user],
        &["user", "grant-role", "podlease", "podlease"],
        &["auth", "enable"],
    ] {
        etcdctl_ok(&endpoint, Some(certs), args);
    }
    etcd
}
