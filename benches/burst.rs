//! Rollout burst on the real test bed: 1,000 pods turn Ready within about a second (as a
//! large Deployment's rollout does), then all turn not ready: time until the last key is in
//! etcd (and gone), and each pod's own latency from its own status patch, for podlease (lease
//! pool on and off, two installs side by side, one burst at a time) and the unthrottled
//! EndpointSlice controller on the same pods.
//!
//! `cargo bench --bench burst -- [pods]` (default 1000); BENCH_BURST_CONCURRENCY status
//! patches in flight (default 200); a warm-up burst of BENCH_WARMUP pods (default: as many as in flight) per
//! install first. Writes the Markdown section to $BENCH_OUT if set.

#[path = "../tests/support/mod.rs"]
mod support;

use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use support::bench::*;
use support::*;

const BENCH: &str = "burst";

/// How long a burst may take to show everywhere before the bench fails.
const BURST_DEADLINE: Duration = Duration::from_secs(120);

struct Burst {
    /// First patch sent → last patch answered.
    patched: Duration,
    retries: usize,
    /// Burst start → the last pod seen, per side.
    podlease_all: Duration,
    peer_all: Duration,
    /// Each pod's own patch → seen.
    podlease: Dist,
    peer: Dist,
    /// The peer's API requests during the burst.
    peer_requests: String,
    /// Registrations that took a pre-granted lease / found the pool empty.
    pool: (f64, f64),
}

async fn burst(bed: &TestBed, install: &Install, pods: &[PodRef], ready: bool, concurrency: usize, etcd: &Arc<Seen>, slices: &Arc<Seen>, peer: &Peer) -> Burst {
    let c = &install.controller;
    let pool0 = (podlease_metric(c, "podlease_lease_pool_taken_total").await, podlease_metric(c, "podlease_lease_pool_missed_total").await);
    let rate = peer.sample_requests().await;
    let retries = Retries::default();
    let t0 = Instant::now();
    let sent = Mutex::new(vec![t0; pods.len()]);
    futures::stream::iter(pods.iter().enumerate())
        .for_each_concurrent(concurrency, |(i, p)| {
            let (kube, sent, retries) = (bed.kube.clone(), &sent, &retries);
            async move {
                sent.lock().unwrap()[i] = Instant::now();
                set_ready_retrying(&kube, &p.ns, &p.name, &p.ip, ready, retries).await;
            }
        })
        .await;
    let patched = t0.elapsed();
    let sent = sent.into_inner().unwrap();
    let (mut mine, mut theirs) = (Vec::new(), Vec::new());
    let (mut last_mine, mut last_theirs) = (t0, t0);
    for (p, at) in pods.iter().zip(&sent) {
        let k = etcd.wait(&p.ip, ready, t0, BURST_DEADLINE).await;
        let e = slices.wait(&p.ip, ready, t0, BURST_DEADLINE).await;
        mine.push(k.saturating_duration_since(*at));
        theirs.push(e.saturating_duration_since(*at));
        last_mine = last_mine.max(k);
        last_theirs = last_theirs.max(e);
    }
    let peer_requests = rate.describe(peer.qps).await;
    let pool = (podlease_metric(c, "podlease_lease_pool_taken_total").await - pool0.0, podlease_metric(c, "podlease_lease_pool_missed_total").await - pool0.1);
    Burst { patched, retries: retries.get(), podlease_all: last_mine - t0, peer_all: last_theirs - t0, podlease: Dist::new(mine), peer: Dist::new(theirs), peer_requests, pool }
}

#[tokio::main]
async fn main() {
    if listing() {
        return;
    }
    let n: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(1000);
    let env = |k: &str, d: usize| std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d);
    let concurrency = env("BENCH_BURST_CONCURRENCY", 200);
    // A warm-up burst as wide as the measured one opens every connection it will use.
    let warm = env("BENCH_WARMUP", concurrency).min(n);
    let load = require_quiet_machine().await;
    let mut report = Report::new("burst", &format!("Rollout burst: {n} pods turn Ready at once, then not ready"), load);
    let bed = TestBed::start().await;
    bed.apply_crd().await;
    report.bed(&bed).await;
    let installs = pool_on_and_off(&bed, BENCH, n).await;
    let peer = Peer::start(&bed, PEER_UNTHROTTLED, "unthrottled").await;
    let etcd = watch_etcd(&bed.etcd, "/services/").await;
    let slices = watch_slices(&bed.kube, BENCH);

    let mut rows = Vec::new();
    for install in &installs {
        // Warm-up: connections (one per patch in flight), caches and both controllers.
        burst(&bed, install, &install.pods[..warm], true, concurrency, &etcd, &slices, &peer).await;
        burst(&bed, install, &install.pods[..warm], false, concurrency, &etcd, &slices, &peer).await;
        let up = burst(&bed, install, &install.pods, true, concurrency, &etcd, &slices, &peer).await;
        assert_eq!(count_keys(&bed.etcd, &format!("/services/{}/", install.pods[0].ns)).await, n as i64, "every key in etcd after the Ready burst");
        let down = burst(&bed, install, &install.pods, false, concurrency, &etcd, &slices, &peer).await;
        assert_eq!(count_keys(&bed.etcd, &format!("/services/{}/", install.pods[0].ns)).await, 0, "no key left after the not-ready burst");
        rows.push((install.label.clone(), up, down));
    }

    let md = &mut report.md;
    writeln!(md, "The test patches every pod's status as the kubelet would, {concurrency} patches in flight, one burst at a time; an etcd watcher sees podlease's keys, an EndpointSlice watcher the peer's endpoints. \"All\" runs from the first patch sent to the last pod seen; \"per pod\" from that pod's own patch request. A warm-up burst of {warm} pods each way precedes each install's measured bursts. {}. Peer: the EndpointSlice controller, {}, on a Service selecting the same pods.\n", installs_described(&installs), peer.flags()).unwrap();
    writeln!(md, "| burst | watcher | patching took | all seen after | per pod: n | p50 | p90 | p99 | max |").unwrap();
    writeln!(md, "|---|---|---|---|---|---|---|---|---|").unwrap();
    for (label, up, down) in &rows {
        for (what, b) in [("Ready=True", up), ("Ready=False", down)] {
            let patched = format!("{:.2} s{}", b.patched.as_secs_f64(), if b.retries > 0 { format!(" ({} retried)", b.retries) } else { String::new() });
            writeln!(md, "| {what} | {label} → etcd key | {patched} | {:.2} s | {} |", b.podlease_all.as_secs_f64(), b.podlease.cells()).unwrap();
            writeln!(md, "| {what} | EndpointSlice controller (unthrottled) → endpoint | {patched} | {:.2} s | {} |", b.peer_all.as_secs_f64(), b.peer.cells()).unwrap();
        }
    }
    writeln!(md).unwrap();
    for (label, up, down) in &rows {
        writeln!(md, "- {label}: the peer's client in the Ready burst: {}; in the not-ready burst: {}.", up.peer_requests, down.peer_requests).unwrap();
        if label.contains("pool on") {
            writeln!(md, "- {label}: in the Ready burst {:.0} registrations took a pre-granted lease and {:.0} found the pool empty and granted one first.", up.pool.0, up.pool.1).unwrap();
        }
    }
    let (label, up, _) = &rows[0];
    let in_time = up.patched <= Duration::from_secs(1);
    writeln!(md, "\nTarget ({label}): all {n} registered ≤ 2 s after the burst starts: {} ({:.2} s){}.",
        verdict(up.podlease_all <= Duration::from_secs(2)), up.podlease_all.as_secs_f64(),
        if in_time { String::new() } else { format!("; the patching itself took {:.2} s at {concurrency} in flight, more than the 1 s asked for", up.patched.as_secs_f64()) }).unwrap();
    drop(installs);
    report.finish();
}
