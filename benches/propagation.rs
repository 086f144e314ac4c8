//! Propagation latency on the real test bed, side by side with Kubernetes' own EndpointSlice
//! controller reacting to the same pod transitions on the same API server: a pod's status
//! patched Ready → its key seen by an etcd watcher, and → its endpoint `ready: true` seen by
//! an EndpointSlice watcher; then Ready=False → the key's DELETE / `ready: false`. One pod at
//! a time, so each figure is one transition's latency, not a queue's.
//!
//! podlease runs twice side by side, each an install of its own on a namespace of its own:
//! with the lease pool (the default) and without it (`bench::POOL_OFF`, today's grant then
//! Txn). Transitions alternate between the two, so both see the same machine at the same
//! moments; the peer sees every transition. The peer runs unthrottled (the main comparison),
//! then, separately and labelled so, at kube-controller-manager's default client QPS.
//!
//! `cargo bench --bench propagation -- [transitions]` (default 1000 per direction and per
//! podlease variant); BENCH_WARMUP (default 50) transitions per direction and variant are run
//! first and discarded; BENCH_THROTTLED (default 200) transitions per direction for the
//! default-QPS run. Writes the Markdown section to $BENCH_OUT if set.

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::bench::*;
use support::*;

/// The Service (the peer's) in every namespace; podlease's services are named per variant.
const SERVICE: &str = "bench";

/// One pod of one variant.
#[derive(Clone)]
struct Target {
    variant: usize,
    ns: String,
    name: String,
    ip: String,
}

#[derive(Default)]
struct Sweep {
    /// podlease's latency per variant.
    podlease: HashMap<usize, Vec<Duration>>,
    peer: Vec<Duration>,
    retries: usize,
}

/// Turns each target `ready` in order, one at a time: patch, then wait until both watchers
/// have seen it.
async fn sweep(kube: &kube::Client, etcd: &Arc<Seen>, slices: &Arc<Seen>, targets: &[Target], ready: bool) -> Sweep {
    let retries = Retries::default();
    let mut s = Sweep::default();
    for t in targets {
        let t0 = Instant::now();
        set_ready_retrying(kube, &t.ns, &t.name, &t.ip, ready, &retries).await;
        let key = etcd.wait(&t.ip, ready, t0, DEADLINE).await;
        let ep = slices.wait(&t.ip, ready, t0, DEADLINE).await;
        s.podlease.entry(t.variant).or_default().push(key - t0);
        s.peer.push(ep - t0);
    }
    s.retries = retries.get();
    s
}

fn direction(ready: bool) -> &'static str {
    if ready { "Ready=True" } else { "Ready=False" }
}

#[tokio::main]
async fn main() {
    if listing() {
        return;
    }
    let n: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(1000);
    let env = |k: &str, d: usize| std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d);
    let warm = env("BENCH_WARMUP", 50);
    let throttled = env("BENCH_THROTTLED", 200).min(n);
    let load = require_quiet_machine().await;
    let mut report = Report::new("propagation", "Propagation: pod status patch → what consumers watch, one transition at a time", load);
    let bed = TestBed::start().await;
    bed.apply_crd().await;
    report.bed(&bed).await;

    let installs = pool_on_and_off(&bed, SERVICE, warm + n).await;
    let pool = installs.len() > 1;
    let per_pod = warm + n;
    let targets: Vec<Vec<Target>> = installs
        .iter()
        .enumerate()
        .map(|(v, i)| i.pods.iter().map(|p| Target { variant: v, ns: p.ns.clone(), name: p.name.clone(), ip: p.ip.clone() }).collect())
        .collect();
    let peer = Peer::start(&bed, PEER_UNTHROTTLED, "unthrottled").await;
    let etcd = watch_etcd(&bed.etcd, "/services/").await;
    let slices = watch_slices(&bed.kube, SERVICE);

    // Transitions alternate between the variants: pod i of each in turn.
    let interleaved = |range: std::ops::Range<usize>| -> Vec<Target> { range.flat_map(|i| targets.iter().map(move |t| t[i].clone())).collect() };

    // Warm-up: every process, connection and cache on both sides has done this before.
    let w = interleaved(0..warm);
    sweep(&bed.kube, &etcd, &slices, &w, true).await;
    sweep(&bed.kube, &etcd, &slices, &w, false).await;

    let m = interleaved(warm..per_pod);
    let rate = peer.sample_requests().await;
    let taken0 = podlease_metric(&installs[0].controller, "podlease_lease_pool_taken_total").await;
    let missed0 = podlease_metric(&installs[0].controller, "podlease_lease_pool_missed_total").await;
    let on = sweep(&bed.kube, &etcd, &slices, &m, true).await;
    let off = sweep(&bed.kube, &etcd, &slices, &m, false).await;
    let limiter = rate.describe(peer.qps).await;
    let taken = podlease_metric(&installs[0].controller, "podlease_lease_pool_taken_total").await - taken0;
    let missed = podlease_metric(&installs[0].controller, "podlease_lease_pool_missed_total").await - missed0;
    let main_flags = peer.flags();
    drop(peer);

    // The same at the peer's default client QPS, first variant only: reported apart.
    let peer = Peer::start(&bed, PEER_DEFAULT, "default-qps").await;
    let first = |range: std::ops::Range<usize>| -> Vec<Target> { targets[0][range].to_vec() };
    sweep(&bed.kube, &etcd, &slices, &first(0..warm), true).await;
    sweep(&bed.kube, &etcd, &slices, &first(0..warm), false).await;
    let tm = first(warm..warm + throttled);
    let rate = peer.sample_requests().await;
    let ton = sweep(&bed.kube, &etcd, &slices, &tm, true).await;
    let toff = sweep(&bed.kube, &etcd, &slices, &tm, false).await;
    let tlimiter = rate.describe(peer.qps).await;
    let default_flags = peer.flags();
    drop(peer);

    // The report.
    let dist = |s: &Sweep, v: usize| Dist::new(s.podlease.get(&v).cloned().unwrap_or_default());
    let by_dir = |ready: bool| if ready { &on } else { &off };
    let md = &mut report.md;
    writeln!(md, "Each transition: the test patches one pod's status as the kubelet would (Ready and ContainersReady), then waits until podlease's key event reaches an etcd watcher and the EndpointSlice controller's endpoint change reaches an EndpointSlice watcher; times run from just before the patch request, so both include the API server's write and watch fan-out. {n} measured transitions per direction and per podlease variant, after {warm} discarded warm-up transitions each (both sides).\n").unwrap();
    writeln!(md, "{}, transitions alternating between them so both see the same machine at the same moments. Peer: kube-controller-manager {} running only the EndpointSlice controller, {main_flags}: a client rate limit high enough never to bind (checked below).\n", installs_described(&installs), support::Binaries::locate().kube_version).unwrap();
    writeln!(md, "| transition | watcher | n | p50 | p90 | p99 | max |").unwrap();
    writeln!(md, "|---|---|---|---|---|---|---|").unwrap();
    for ready in [true, false] {
        let s = by_dir(ready);
        for (v, var) in installs.iter().enumerate() {
            writeln!(md, "| {} | {} → etcd key | {} |", direction(ready), var.label, dist(s, v).cells()).unwrap();
        }
        writeln!(md, "| {} | EndpointSlice controller (unthrottled) → endpoint | {} |", direction(ready), Dist::new(s.peer.clone()).cells()).unwrap();
    }
    writeln!(md, "\nRatios from the same run (podlease ÷ EndpointSlice controller; below 1: podlease is faster):\n").unwrap();
    let header: Vec<String> = installs.iter().map(|v| format!("{}: p50 | p99", v.label)).collect();
    writeln!(md, "| transition | {} |", header.join(" | ")).unwrap();
    writeln!(md, "|---|{}", "---|---|".repeat(installs.len())).unwrap();
    for ready in [true, false] {
        let s = by_dir(ready);
        let peer = Dist::new(s.peer.clone());
        let cells: Vec<String> = (0..installs.len()).map(|v| format!("{:.2} | {:.2}", dist(s, v).ms(0.5) / peer.ms(0.5), dist(s, v).ms(0.99) / peer.ms(0.99))).collect();
        writeln!(md, "| {} | {} |", direction(ready), cells.join(" | ")).unwrap();
    }
    if pool {
        writeln!(md, "\nLease pool before/after (same run): pool off → pool on.\n").unwrap();
        writeln!(md, "| transition | p50 | p90 | p99 |").unwrap();
        writeln!(md, "|---|---|---|---|").unwrap();
        for ready in [true, false] {
            let (a, b) = (dist(by_dir(ready), 1), dist(by_dir(ready), 0));
            let cell = |q: f64| format!("{} → {} ({:+.0} %)", fmt_ms(a.ms(q)), fmt_ms(b.ms(q)), (b.ms(q) / a.ms(q) - 1.0) * 100.0);
            writeln!(md, "| {} | {} | {} | {} |", direction(ready), cell(0.5), cell(0.9), cell(0.99)).unwrap();
        }
        writeln!(md, "\nDuring the measured Ready transitions the pool-on install took a pre-granted lease {taken:.0} times and found the pool empty {missed:.0} times (podlease_lease_pool_taken_total, podlease_lease_pool_missed_total). A revoke does not use the pool: Ready=False is the same code both ways, and its difference shows the run's noise.").unwrap();
    }
    let peer_p50 = |s: &Sweep| Dist::new(s.peer.clone()).ms(0.5);
    writeln!(md, "\nThe peer's client during the measured transitions: {limiter}. Its p50 {} at a multiple of 50 ms (Ready {}, not ready {}), the signature of a limiter pacing the loop at 20 requests/s.",
        if at_multiple_of_50ms(peer_p50(&on)) || at_multiple_of_50ms(peer_p50(&off)) { "sits" } else { "does not sit" },
        fmt_ms(peer_p50(&on)), fmt_ms(peer_p50(&off))).unwrap();
    if on.retries + off.retries > 0 {
        writeln!(md, "\nThe API server pushed back on {} status patches (retried; the retry is inside those figures).", on.retries + off.retries).unwrap();
    }
    let (r, g) = (dist(&on, 0), dist(&off, 0));
    let (pr, pg) = (Dist::new(on.peer.clone()), Dist::new(off.peer.clone()));
    writeln!(md, "\nTargets ({}): p50 ≤ 0.5 × the unthrottled EndpointSlice controller's p50: {} on Ready ({:.2}×), {} on not ready ({:.2}×); p99 ≤ 50 ms: {} on Ready ({}), {} on not ready ({}).",
        installs[0].label,
        verdict(r.ms(0.5) <= 0.5 * pr.ms(0.5)), r.ms(0.5) / pr.ms(0.5),
        verdict(g.ms(0.5) <= 0.5 * pg.ms(0.5)), g.ms(0.5) / pg.ms(0.5),
        verdict(r.ms(0.99) <= 50.0), fmt_ms(r.ms(0.99)),
        verdict(g.ms(0.99) <= 50.0), fmt_ms(g.ms(0.99))).unwrap();

    writeln!(md, "\n### The peer at kube-controller-manager's default client QPS (not the comparison to quote)\n").unwrap();
    writeln!(md, "The same bed right after, the peer restarted as {default_flags} (its defaults), {throttled} transitions per direction on {}'s pods after {warm} warm-up ones. Earlier versions of this bench ran the peer this way.\n", installs[0].label).unwrap();
    writeln!(md, "| transition | watcher | n | p50 | p90 | p99 | max |").unwrap();
    writeln!(md, "|---|---|---|---|---|---|---|").unwrap();
    for (ready, s) in [(true, &ton), (false, &toff)] {
        writeln!(md, "| {} | {} → etcd key | {} |", direction(ready), installs[0].label, dist(s, 0).cells()).unwrap();
        writeln!(md, "| {} | EndpointSlice controller at 20 QPS / burst 30 → endpoint | {} |", direction(ready), Dist::new(s.peer.clone()).cells()).unwrap();
    }
    writeln!(md, "\nIts client meanwhile: {tlimiter}. p50 Ready {}, not ready {}{}.", fmt_ms(peer_p50(&ton)), fmt_ms(peer_p50(&toff)),
        if at_multiple_of_50ms(peer_p50(&ton)) || at_multiple_of_50ms(peer_p50(&toff)) { ": at a multiple of 50 ms, the limiter pacing the loop at 20 requests/s" } else { "" }).unwrap();
    drop(installs);
    report.finish();
}
