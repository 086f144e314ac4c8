//! Scale on the real test bed, up to Kubernetes' maximum of 150,000 pods per cluster, one
//! podlease replica at the defaults. At each size:
//! - initial sync: process start → every key in etcd, every pod already Ready, etcd empty;
//! - steady state after a full renewal round: podlease CPU and RSS, keepalive requests/s,
//!   etcd CPU, RSS and db size, API server RSS, the whole machine's CPU;
//! - churn: 1 % of the pods flap (not ready, and ready again 5 s later) within one minute,
//!   evenly spread: the same figures, and each transition's latency to etcd;
//! - adoption after a restart by a different replica identity (a rollout: SIGTERM, then a
//!   new pod name takes the released leader Lease) over the non-empty etcd: time until it has
//!   adopted, holds and has renewed every lease, and the DELETE/PUT events etcd's history shows.
//!
//! `make bench-scale`, or `cargo bench --bench scale -- [10000,50000,150000]`. Writes the
//! Markdown section to $BENCH_OUT as it goes (a run that stops early leaves what it measured
//! and why it stopped).

#[path = "../tests/support/mod.rs"]
mod support;

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use serde_json::json;
use support::bench::*;
use support::proc::{CpuMark, peak_rss_mib, rss_mib};
use support::*;

const NS: &str = "default";
const PREFIX: &str = "/services/";
const TTL: i64 = 30;
const PODS_PER_SERVICE: usize = 1000;
/// Steady-state window: three renewal periods at the default TTL.
const WINDOW: Duration = Duration::from_secs(30);
const CHURN_WINDOW: Duration = Duration::from_secs(60);
const FLAP_DOWN: Duration = Duration::from_secs(5);
/// The API server's storage etcd gets 8 GiB instead of its default 2 GiB (150,000 pods with
/// two revisions each and the churn's fill more than 2 GiB before a defragmentation).
const STORAGE_QUOTA: &str = "--quota-backend-bytes=8589934592";
/// Any single step of a 150,000-pod bed may take this long before the bench gives up.
const LONG: Duration = Duration::from_secs(900);
const CREATE_CONCURRENCY: usize = 64;

#[derive(Default)]
struct Row {
    pods: usize,
    created: Duration,
    create_retries: usize,
    sync: Duration,
    sync_cpu: Vec<f64>,
    sync_machine: f64,
    steady_cpu: Vec<f64>,
    steady_machine: f64,
    podlease_rss: f64,
    /// The most it had resident up to then (the initial sync's peak).
    podlease_peak_rss: f64,
    keepalive_per_s: f64,
    etcd_rss: f64,
    etcd_db: f64,
    apiserver_rss: f64,
    storage_rss: f64,
    churn_flaps: usize,
    churn_cpu: Vec<f64>,
    churn_machine: f64,
    churn_down: Dist,
    churn_up: Dist,
    churn_retries: usize,
    adopted: Duration,
    held: Duration,
    renewed: Duration,
    adoption_cpu: Vec<f64>,
    adoption_events: (usize, usize),
}

fn pids(c: &Controller, bed: &TestBed) -> Vec<u32> {
    vec![c.child.as_ref().unwrap().id(), bed.registry.pid().unwrap(), bed.apiserver.pid()]
}

/// Where something ran at the machine's limit (the whole machine, or one process near a full
/// core while podlease's own threads could use two).
fn saturation(machine: f64, cpu: &[f64]) -> String {
    let mut s = Vec::new();
    if machine >= 0.9 * cores() as f64 {
        s.push(format!("machine busy {machine:.2} of {} cores", cores()));
    }
    for (who, c) in ["podlease", "etcd", "kube-apiserver"].iter().zip(cpu) {
        if *c >= 0.9 {
            s.push(format!("{who} {c:.2} cores"));
        }
    }
    if s.is_empty() { "—".into() } else { s.join("; ") }
}

fn render(report: &mut Report, rows: &[Row], sizes: &[usize]) {
    let md = &mut report.md;
    md.clear();
    writeln!(md, "Pods in ServiceRegistrations of {PODS_PER_SERVICE}, created and turned Ready by the test ({CREATE_CONCURRENCY} pods at a time, a create and a status patch each); one podlease replica at the defaults (TTL {TTL} s, each lease renewed every {} s), release build, `--log-level info`. The API server's storage etcd runs with `{STORAGE_QUOTA}` (8 GiB); every other process at its defaults. CPU in cores from /proc (user + system) averaged over each phase; \"machine\" is the whole machine's busy CPU from /proc/stat, the load generator included.\n", TTL / 3).unwrap();
    writeln!(md, "### Initial sync and adoption by another replica\n").unwrap();
    writeln!(md, "Initial sync: process start → every key present (an etcd watch counts them), etcd empty. Adoption: the replica is SIGTERMed (a rollout: it releases the leader Lease, revokes nothing) and one with a different pod name starts over the full etcd; times from its start, each milestone polled on its own. It takes the released Lease at once and, while it lists its pods, keeps the recorded leases alive as a caretaker (once the old replica's fence is gone): it may hold and renew every lease before it leads.\n").unwrap();
    writeln!(md, "| pods | created in | initial sync | CPU during sync: podlease / etcd / apiserver / machine | adopted (readyz leader) | holds every lease | renewed every lease | CPU during adoption: podlease / etcd | DELETE / PUT events | saturated during sync |").unwrap();
    writeln!(md, "|---|---|---|---|---|---|---|---|---|---|").unwrap();
    for r in rows {
        writeln!(md, "| {} | {:.0} s ({:.0} pods/s{}) | {:.2} s | {:.2} / {:.2} / {:.2} / {:.2} | {:.2} s | {:.2} s | {:.2} s | {:.2} / {:.2} | {} / {} | {} |",
            r.pods, r.created.as_secs_f64(), r.pods as f64 / r.created.as_secs_f64().max(1e-9),
            if r.create_retries > 0 { format!(", {} retried", r.create_retries) } else { String::new() },
            r.sync.as_secs_f64(), r.sync_cpu[0], r.sync_cpu[1], r.sync_cpu[2], r.sync_machine,
            r.adopted.as_secs_f64(), r.held.as_secs_f64(), r.renewed.as_secs_f64(), r.adoption_cpu[0], r.adoption_cpu[1],
            r.adoption_events.1, r.adoption_events.0, saturation(r.sync_machine, &r.sync_cpu)).unwrap();
    }
    writeln!(md, "\n### Steady state\n").unwrap();
    writeln!(md, "A {}-second window after one full renewal round.\n", WINDOW.as_secs()).unwrap();
    writeln!(md, "| pods (= leases) | podlease CPU | podlease RSS (peak so far) | keepalive requests/s | etcd CPU | etcd RSS | etcd db size | apiserver CPU | apiserver RSS | storage etcd RSS | machine | saturated |").unwrap();
    writeln!(md, "|---|---|---|---|---|---|---|---|---|---|---|---|").unwrap();
    for r in rows {
        writeln!(md, "| {} | {:.3} cores | {:.0} MiB ({:.0} MiB) | {:.0} | {:.3} cores | {:.0} MiB | {:.0} MiB | {:.3} cores | {:.0} MiB | {:.0} MiB | {:.2} cores | {} |",
            r.pods, r.steady_cpu[0], r.podlease_rss, r.podlease_peak_rss, r.keepalive_per_s, r.steady_cpu[1], r.etcd_rss, r.etcd_db, r.steady_cpu[2], r.apiserver_rss, r.storage_rss, r.steady_machine, saturation(r.steady_machine, &r.steady_cpu)).unwrap();
    }
    writeln!(md, "\n### Churn: 1 % of the pods flap within a minute\n").unwrap();
    writeln!(md, "Each flap: Ready=False, then Ready=True {} s later, started evenly over {} s. Latency: the status patch → the key's DELETE / PUT at an etcd watcher.\n", FLAP_DOWN.as_secs(), CHURN_WINDOW.as_secs()).unwrap();
    writeln!(md, "| pods | flaps | podlease CPU | etcd CPU | apiserver CPU | machine | not ready → DELETE: p50 / p99 / max | Ready → PUT: p50 / p99 / max | saturated |").unwrap();
    writeln!(md, "|---|---|---|---|---|---|---|---|---|").unwrap();
    for r in rows {
        let d = |x: &Dist| format!("{} / {} / {}", fmt_ms(x.ms(0.5)), fmt_ms(x.ms(0.99)), fmt_ms(x.max_ms()));
        writeln!(md, "| {} | {}{} | {:.3} cores | {:.3} cores | {:.3} cores | {:.2} cores | {} | {} | {} |",
            r.pods, r.churn_flaps, if r.churn_retries > 0 { format!(" ({} patches retried)", r.churn_retries) } else { String::new() },
            r.churn_cpu[0], r.churn_cpu[1], r.churn_cpu[2], r.churn_machine, d(&r.churn_down), d(&r.churn_up), saturation(r.churn_machine, &r.churn_cpu)).unwrap();
    }
    if let Some(big) = rows.last() {
        let target = sizes.iter().copied().max().unwrap_or(big.pods);
        writeln!(md, "\nTargets at {} pods on one replica{}: initial sync ≤ 60 s: {} ({:.1} s); adoption with 0 DELETEs: {} ({}); steady ≤ 0.5 core: {} ({:.3}); ≤ 1 GiB RSS: {} ({:.0} MiB).",
            big.pods, if big.pods < target { format!(" (the largest size reached; {target} asked)") } else { String::new() },
            verdict(big.sync <= Duration::from_secs(60)), big.sync.as_secs_f64(),
            verdict(big.adoption_events.1 == 0), big.adoption_events.1,
            verdict(big.steady_cpu[0] <= 0.5), big.steady_cpu[0],
            verdict(big.podlease_rss <= 1024.0), big.podlease_rss).unwrap();
    }
}

/// One size: initial sync, steady state, churn, adoption. Leaves no podlease running.
async fn measure(bed: &TestBed, n: usize, created: Duration, create_retries: usize) -> Row {
    let mut row = Row { pods: n, created, create_retries, ..Row::default() };
    let flags = ["--log-level", "info"];
    let keys = KeyCount::start(&bed.etcd, PREFIX).await;
    assert_eq!(keys.now(), 0, "a cold start begins with an empty etcd");

    // Initial sync.
    let mut a = Controller::new(bed, &format!("scale-a-{n}"), bed.kubeconfig.clone(), &flags);
    let t = Instant::now();
    a.spawn();
    let cpu = CpuMark::now(&pids(&a, bed));
    let synced = keys.wait(n as i64, LONG).await;
    row.sync = synced - t;
    row.sync_cpu = cpu.cores_since();
    row.sync_machine = cpu.machine_cores_since();
    wait_readyz(&a, "leader", LONG).await;
    eprintln!("{n}: initial sync {:?}", row.sync);

    // Steady state, after every lease has been renewed once.
    let ka = podlease_metric(&a, "podlease_keepalive_requests_total").await;
    wait_until("a full renewal round", LONG, || async { (podlease_metric(&a, "podlease_keepalive_requests_total").await - ka >= n as f64).then_some(()) }).await;
    let ka = podlease_metric(&a, "podlease_keepalive_requests_total").await;
    let cpu = CpuMark::now(&pids(&a, bed));
    tokio::time::sleep(WINDOW).await; // the measurement window itself
    row.steady_cpu = cpu.cores_since();
    row.steady_machine = cpu.machine_cores_since();
    row.keepalive_per_s = (podlease_metric(&a, "podlease_keepalive_requests_total").await - ka) / WINDOW.as_secs_f64();
    row.podlease_rss = rss_mib(a.child.as_ref().unwrap().id());
    row.podlease_peak_rss = peak_rss_mib(a.child.as_ref().unwrap().id());
    row.etcd_rss = rss_mib(bed.registry.pid().unwrap());
    row.apiserver_rss = rss_mib(bed.apiserver.pid());
    row.storage_rss = bed.storage_pid().map(rss_mib).unwrap_or(f64::NAN);
    row.etcd_db = db_mib(&bed.etcd).await;
    assert_eq!(keys.now(), n as i64, "every key still there in the steady state");
    eprintln!("{n}: steady {:?}, {:.0} keepalive/s", row.steady_cpu, row.keepalive_per_s);

    // Churn: flaps started evenly over the window, pods spread over the whole range.
    row.churn_flaps = (n / 100).max(1);
    let seen = watch_etcd(&bed.etcd, PREFIX).await;
    let retries = Retries::default();
    let stride = (n / row.churn_flaps).max(1);
    let cpu = CpuMark::now(&pids(&a, bed));
    let start = tokio::time::Instant::now();
    let flaps = (0..row.churn_flaps).map(|k| {
        let (kube, seen, retries) = (bed.kube.clone(), seen.clone(), &retries);
        let i = (k * stride) % n;
        let at = start + CHURN_WINDOW.mul_f64(k as f64 / row.churn_flaps as f64);
        async move {
            tokio::time::sleep_until(at).await; // the flap's place in the load's shape
            let (name, ip) = (format!("scale-{i}"), pod_ip(i + 1));
            let t0 = Instant::now();
            set_ready_retrying(&kube, NS, &name, &ip, false, retries).await;
            let down = seen.wait(&ip, false, t0, LONG).await - t0;
            tokio::time::sleep_until(tokio::time::Instant::from_std(t0) + FLAP_DOWN).await;
            let t1 = Instant::now();
            set_ready_retrying(&kube, NS, &name, &ip, true, retries).await;
            let up = seen.wait(&ip, true, t1, LONG).await - t1;
            (down, up)
        }
    });
    let results: Vec<(Duration, Duration)> = futures::future::join_all(flaps).await;
    row.churn_cpu = cpu.cores_since();
    row.churn_machine = cpu.machine_cores_since();
    row.churn_retries = retries.get();
    row.churn_down = Dist::new(results.iter().map(|r| r.0).collect());
    row.churn_up = Dist::new(results.iter().map(|r| r.1).collect());
    keys.wait(n as i64, LONG).await;
    eprintln!("{n}: churn {:?}", row.churn_cpu);

    // Adoption by another identity over the full etcd.
    let from = revision(&bed.etcd).await + 1;
    a.terminate();
    let mut b = Controller::new(bed, &format!("scale-b-{n}"), bed.kubeconfig.clone(), &flags);
    let t = Instant::now();
    b.spawn();
    let cpu = CpuMark::now(&pids(&b, bed));
    // The three milestones polled side by side: a new leader keeps the leases alive as a
    // caretaker while it lists its pods, so holding and renewing them may come first.
    let (_, held, renewed) = tokio::join!(
        async {
            wait_readyz(&b, "leader", LONG).await;
            row.adopted = t.elapsed();
        },
        wait_until("every lease held", LONG, || async { (podlease_metric(&b, "podlease_leases_held").await >= n as f64).then(|| t.elapsed()) }),
        wait_until("every lease renewed", LONG, || async { (podlease_metric(&b, "podlease_keepalive_requests_total").await >= n as f64).then(|| t.elapsed()) }),
    );
    (row.held, row.renewed) = (held, renewed);
    row.adoption_cpu = cpu.cores_since();
    // Keys whose leases expired before the new replica renewed them come back once it sees
    // them lost and registers them again: counted (DELETE events), not asserted, so the
    // report says how many consumers lost.
    keys.wait(n as i64, LONG).await;
    row.adoption_events = events_since(&bed.etcd, PREFIX, from, LONG).await;
    eprintln!("{n}: adopted in {:?}, events {:?}", row.adopted, row.adoption_events);
    b.terminate();
    row
}

#[tokio::main]
async fn main() {
    if listing() {
        return;
    }
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .find(|a| a.chars().next().is_some_and(|c| c.is_ascii_digit()))
        .map(|a| a.split(',').filter_map(|n| n.parse().ok()).collect())
        .unwrap_or_else(|| vec![10_000, 50_000, 150_000]);
    let load = require_quiet_machine().await;
    let mut report = Report::new("scale", "Scale: initial sync, steady state, churn and adoption up to 150,000 pods", load);
    Report::report_panics();
    let bed = TestBed::start_with_storage_flags(&[STORAGE_QUOTA]).await;
    bed.apply_crd().await;
    report.bed(&bed).await;

    let mut rows: Vec<Row> = Vec::new();
    let mut created = 0;
    let mut services = 0;
    for &n in &sizes {
        report.checkpoint(&format!("**Sizes still to measure: {:?}** (the run is in progress or stopped; see below).", sizes.iter().filter(|s| **s >= n).collect::<Vec<_>>()));
        while services < n.div_ceil(PODS_PER_SERVICE) {
            create_registration(&bed.kube, NS, &format!("scale-{services}"), json!({"selector": {"matchLabels": {"svc": format!("scale-{services}")}}})).await;
            services += 1;
        }
        let t = Instant::now();
        let retries = populate_ready(&bed.kube, NS, "scale", created..n, |i| json!({"svc": format!("scale-{}", i / PODS_PER_SERVICE)}), CREATE_CONCURRENCY).await;
        eprintln!("{n} ready pods in the API server ({:?} for {}, {retries} retried)", t.elapsed(), n - created);
        let took = t.elapsed();
        let earlier = rows.last().map(|r: &Row| r.created).unwrap_or_default();
        created = n;
        wipe(&bed.etcd).await;
        let row = measure(&bed, n, earlier + took, retries).await;
        rows.push(row);
        render(&mut report, &rows, &sizes);
    }
    report.finish();
}
