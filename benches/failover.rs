//! Failover on the real test bed: two replicas at the defaults publish 10,000 ready pods; the
//! leader is SIGKILLed (as on a node failure) and the standby takes over. Measured from the
//! kill: when the standby leads, when it has adopted (readyz "leader", every lease held),
//! when it has renewed every lease (its keepalive count, then each lease's remaining TTL read
//! back from etcd), and how many DELETE events consumers saw (etcd's own history from the
//! revision before the kill: must be 0).
//!
//! `cargo bench --bench failover -- [pods]` (default 10000, services of 1000 pods each).
//! Writes the Markdown section to $BENCH_OUT if set.

#[path = "../tests/support/mod.rs"]
mod support;

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use serde_json::json;
use support::bench::*;
use support::controller::{http_get, metric};
use support::proc::{CpuMark, rss_mib};
use support::*;

const NS: &str = "default";
const PREFIX: &str = "/services/";
/// podlease's defaults this bench relies on (README, Failure model).
const TTL: i64 = 30;
const PODS_PER_SERVICE: usize = 1000;
/// How long any step of a 10k-pod bed may take before the bench fails.
const LONG: Duration = Duration::from_secs(300);

#[tokio::main]
async fn main() {
    if listing() {
        return;
    }
    let n: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(10_000);
    let load = require_quiet_machine().await;
    let mut report = Report::new("failover", &format!("Failover: SIGKILL of the leader with {n} registered pods, two replicas at the defaults"), load);
    let bed = TestBed::start().await;
    bed.apply_crd().await;
    report.bed(&bed).await;
    let services = n.div_ceil(PODS_PER_SERVICE);
    for s in 0..services {
        create_registration(&bed.kube, NS, &format!("fo-{s}"), json!({"selector": {"matchLabels": {"svc": format!("fo-{s}")}}})).await;
    }
    let started = Instant::now();
    let retries = populate_ready(&bed.kube, NS, "fo", 0..n, |i| json!({"svc": format!("fo-{}", i / PODS_PER_SERVICE)}), 64).await;
    let populated = started.elapsed();
    eprintln!("{n} ready pods in {populated:?} ({retries} requests retried)");

    // Leader first, so the standby is the second replica; both at the defaults.
    let flags = ["--log-level", "info"];
    let mut a = Controller::new(&bed, "failover-a", bed.kubeconfig.clone(), &flags);
    let t = Instant::now();
    start_within(&mut a, "leader", LONG).await;
    wait_until(&format!("{n} keys"), LONG, || async { (count_keys(&bed.etcd, PREFIX).await == n as i64).then_some(()) }).await;
    let sync = t.elapsed();
    let mut b = Controller::new(&bed, "failover-b", bed.kubeconfig.clone(), &flags);
    start_within(&mut b, "standby", LONG).await;
    // Steady state: the leader has renewed every lease once since the sync.
    let ka = podlease_metric(&a, "podlease_keepalive_requests_total").await;
    wait_until("a full renewal round by the leader", LONG, || async {
        (podlease_metric(&a, "podlease_keepalive_requests_total").await - ka >= n as f64).then_some(())
    })
    .await;
    let leases = key_leases(&bed.etcd, PREFIX).await;
    assert_eq!(leases.len(), n);
    let b_pid = b.child.as_ref().unwrap().id();
    let etcd_pid = bed.registry.pid().unwrap();

    let from = revision(&bed.etcd).await + 1;
    let ka_b = podlease_metric(&b, "podlease_keepalive_requests_total").await;
    let t0 = Instant::now();
    a.kill();
    let since = |at: Option<Instant>| at.map_or("not reached".to_string(), |at| format!("{:.2}", at.duration_since(t0).as_secs_f64()));
    let cpu = CpuMark::now(&[b_pid, etcd_pid]);
    // Every milestone polled together from the kill, every 25 ms: the standby keeps the
    // leases alive as a caretaker once the dead leader's fence is gone, before it leads.
    let (mut led, mut held, mut renewed_n, mut adopted) = (None, None, None, None);
    while adopted.is_none() || held.is_none() || renewed_n.is_none() {
        assert!(t0.elapsed() < LONG, "the standby did not take over within {LONG:?}");
        let text = http_get(&format!("http://127.0.0.1:{}/metrics", b.metrics_port)).await.map(|(_, t)| t).unwrap_or_default();
        let now = Instant::now();
        if led.is_none() && metric(&text, "podlease_leader") == 1.0 {
            led = Some(now);
        }
        if held.is_none() && metric(&text, "podlease_leases_held") >= n as f64 {
            held = Some(now);
        }
        if renewed_n.is_none() && metric(&text, "podlease_keepalive_requests_total") - ka_b >= n as f64 {
            renewed_n = Some(now);
        }
        if adopted.is_none() && http_get(&format!("http://127.0.0.1:{}/readyz", b.metrics_port)).await.is_some_and(|(c, body)| c == 200 && body.contains("leader")) {
            adopted = Some(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let adoption_cpu = cpu.cores_since();
    // Only the leases not yet seen renewed are read again; a lease that expired is never
    // renewed again: counted as lost, not waited for.
    let mut left = leases.clone();
    let mut lost = 0;
    let renewed_all = loop {
        left = not_renewed_since(&bed.etcd, &left, TTL, t0).await;
        if t0.elapsed() > Duration::from_secs(TTL as u64 + 5) {
            lost = left.len();
            break (lost == 0).then(Instant::now);
        }
        if left.is_empty() {
            break Some(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    let b_rss = rss_mib(b_pid);
    let events = support::etcd::history(&bed.etcd, PREFIX, from).await;
    let deletes = events.iter().filter(|e| !e.put).count();
    let puts = events.len() - deletes;
    let keys_after = count_keys(&bed.etcd, PREFIX).await;
    // Signed: the standby may renew (as a caretaker) before it leads.
    let at = |t: Instant| t.duration_since(t0).as_secs_f64();
    let between = |a: Option<Instant>, b: Option<Instant>| match (a, b) {
        (Some(a), Some(b)) => format!("{:+.2} s", at(b) - at(a)),
        _ => "n/a".to_string(),
    };

    let md = &mut report.md;
    writeln!(md, "{n} pods in {services} ServiceRegistrations of {PODS_PER_SERVICE}, all Ready before podlease starts (populated in {:.0} s, {retries} API requests retried). Two replicas of podlease at the defaults (TTL {TTL} s renewed every {} s, `--leader-lease-duration` 15 s: a standby leads within 15 s plus two retry periods, 19 s), release build, `--log-level info`; the first replica's initial sync took {:.1} s. The leader is SIGKILLed once it has renewed every lease once after the sync (a lease then has 20 to 30 s left). Every milestone is polled together from the kill, every 25 ms (so each time is late by up to about 25 ms plus a scrape).\n",
        populated.as_secs_f64(), TTL / 3, sync.as_secs_f64()).unwrap();
    writeln!(md, "| after SIGKILL of the leader | seconds |").unwrap();
    writeln!(md, "|---|---|").unwrap();
    writeln!(md, "| the standby keeps every lease alive (`podlease_leases_held` ≥ {n}; as a caretaker once the dead leader's fence has expired, or as the new leader) | {} |", since(held)).unwrap();
    writeln!(md, "| the standby has sent {n} keepalive requests since the kill (`podlease_keepalive_requests_total`) | {} |", since(renewed_n)).unwrap();
    writeln!(md, "| the standby leads (`podlease_leader` 1) | {} |", since(led)).unwrap();
    writeln!(md, "| the standby has adopted (`/readyz`: ok (leader)) | {} |", since(adopted)).unwrap();
    writeln!(md, "| every lease renewed by the standby (each lease's remaining TTL read back from etcd; an upper bound: reading {n} TTLs takes its own time) | {} |", since(renewed_all)).unwrap();
    writeln!(md, "\nLeading to adopted: {}; keepalive catch-up ({n} renewals sent) relative to leading: {}. From the kill until adopted: podlease {:.2} cores, etcd {:.2} cores on average; the standby's RSS afterwards {b_rss:.0} MiB. Leases that expired before the standby renewed them: {lost}.\n",
        between(led, adopted), between(led, renewed_n), adoption_cpu[0], adoption_cpu[1]).unwrap();
    writeln!(md, "etcd's history under `{PREFIX}` from the revision before the kill to the end: {deletes} DELETE events, {puts} PUT events; {keys_after} keys present at the end.\n").unwrap();
    writeln!(md, "Target: 0 DELETEs for pods that stayed ready: {} ({deletes}).", verdict(deletes == 0)).unwrap();
    drop((a, b));
    report.finish();
}
