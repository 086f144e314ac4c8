//! What keepalives cost etcd: the registry etcd's CPU against lease renewals per second, for
//! several lease counts and TTLs (renewals/s = 3 × leases / TTL: each lease is renewed every
//! TTL/3). Every renewal costs the etcd leader a leadership check (etcd-io/etcd#18069), and
//! the protocol does not batch them. One podlease replica at the defaults, the TTL set in
//! the ServiceRegistrations (`ttlSeconds`); each point starts from an empty etcd, waits for a full renewal round and
//! measures over whole renewal periods (at least 30 s). A point without podlease gives etcd's
//! idle CPU.
//!
//! `cargo bench --bench etcd_load -- [10000,50000]` (pods; default 10000), BENCH_TTLS
//! (default 10,15,30,60,120). Writes the Markdown section to $BENCH_OUT if set; the section
//! ends with the TTL to use per cluster size, from the fitted line.

#[path = "../tests/support/mod.rs"]
mod support;

use std::fmt::Write as _;
use std::time::Duration;

use kube::api::{Api, Patch, PatchParams};
use podlease::registration::ServiceRegistration;
use serde_json::json;
use support::bench::*;
use support::proc::{CpuMark, rss_mib};
use support::*;

const NS: &str = "default";
const PREFIX: &str = "/services/";
const PODS_PER_SERVICE: usize = 1000;
const MIN_WINDOW: Duration = Duration::from_secs(30);
const LONG: Duration = Duration::from_secs(900);
/// What the recommendation lets renewals cost: this share of one core of the etcd leader
/// (on this machine), above its idle.
const BUDGET_CORES: f64 = 0.1;
/// The smallest TTL recommended: the default, just above the failover floor (2/3 × TTL must
/// exceed the 19 s a standby may take at the defaults: 29 s).
const FAILOVER_FLOOR: i64 = 30;

struct Point {
    pods: usize,
    ttl: i64,
    /// podlease's keepalive requests/s and the renewals etcd itself counted.
    sent_per_s: f64,
    etcd_renewed_per_s: f64,
    etcd_cores: f64,
    podlease_cores: f64,
    etcd_rss: f64,
    /// The whole machine's busy cores (where the curve bends, this shows why).
    machine: f64,
    window: Duration,
}

/// Whole renewal periods of `ttl`, at least MIN_WINDOW.
fn window(ttl: i64) -> Duration {
    let period = Duration::from_secs_f64(ttl as f64 / 3.0);
    period.mul_f64((MIN_WINDOW.as_secs_f64() / period.as_secs_f64()).ceil())
}

async fn point(bed: &TestBed, pods: usize, services: usize, ttl: i64) -> Point {
    wipe(&bed.etcd).await;
    // podlease is stopped: the registrations' TTL changes before it starts over an empty etcd.
    let regs: Api<ServiceRegistration> = Api::namespaced(bed.kube.clone(), NS);
    for s in 0..services {
        regs.patch(&format!("load-{s}"), &PatchParams::default(), &Patch::Merge(json!({"spec": {"ttlSeconds": ttl}}))).await.expect("patch ttlSeconds");
    }
    let keys = KeyCount::start(&bed.etcd, PREFIX).await;
    let mut c = Controller::new(bed, &format!("load-{pods}-{ttl}"), bed.kubeconfig.clone(), &["--log-level", "info"]);
    c.spawn();
    keys.wait(pods as i64, LONG).await;
    wait_readyz(&c, "leader", LONG).await;
    let ka = podlease_metric(&c, "podlease_keepalive_requests_total").await;
    wait_until("a full renewal round", LONG, || async { (podlease_metric(&c, "podlease_keepalive_requests_total").await - ka >= pods as f64).then_some(()) }).await;
    let w = window(ttl);
    let endpoint = bed.etcd_endpoint();
    let (ka, renewed) = (podlease_metric(&c, "podlease_keepalive_requests_total").await, etcd_metric(&endpoint, "etcd_debugging_lease_renewed_total").await);
    let pid = c.child.as_ref().unwrap().id();
    let cpu = CpuMark::now(&[bed.registry.pid().unwrap(), pid]);
    tokio::time::sleep(w).await; // the measurement window itself
    let cores = cpu.cores_since();
    let secs = w.as_secs_f64();
    let p = Point {
        pods,
        ttl,
        sent_per_s: (podlease_metric(&c, "podlease_keepalive_requests_total").await - ka) / secs,
        etcd_renewed_per_s: (etcd_metric(&endpoint, "etcd_debugging_lease_renewed_total").await - renewed) / secs,
        etcd_cores: cores[0],
        podlease_cores: cores[1],
        etcd_rss: rss_mib(bed.registry.pid().unwrap()),
        machine: cpu.machine_cores_since(),
        window: w,
    };
    assert_eq!(keys.now(), pods as i64, "every key there through the window");
    c.terminate();
    eprintln!("{pods} leases, TTL {ttl}: {:.0} renewals/s, etcd {:.3} cores", p.sent_per_s, p.etcd_cores);
    p
}

/// Least squares: (intercept, slope).
fn fit(xy: &[(f64, f64)]) -> (f64, f64) {
    let n = xy.len() as f64;
    let (sx, sy) = xy.iter().fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y));
    let (mx, my) = (sx / n, sy / n);
    let sxx: f64 = xy.iter().map(|(x, _)| (x - mx) * (x - mx)).sum();
    let sxy: f64 = xy.iter().map(|(x, y)| (x - mx) * (y - my)).sum();
    let slope = if sxx > 0.0 { sxy / sxx } else { 0.0 };
    (my - slope * mx, slope)
}

/// The measured points so far (the section's first part, rewritten at each checkpoint).
fn points_table(md: &mut String, idle: f64, points: &[Point]) {
    md.clear();
    writeln!(md, "One podlease replica at the defaults, the TTL set in every ServiceRegistration (`spec.ttlSeconds`, before podlease starts), release build, on one registry etcd member (its leader); every pod Ready. Each point starts from an empty etcd, waits for a full renewal round after the initial sync, then measures over whole renewal periods (at least {} s). CPU from /proc (user + system). etcd's own count of renewals (`etcd_debugging_lease_renewed_total`) is shown beside podlease's keepalive requests. TTLs under 29 s do not outlive a leader failover at the defaults (podlease flags them ShortTTL); they are here for the curve.\n", MIN_WINDOW.as_secs()).unwrap();
    writeln!(md, "| leases | TTL | renewals/s sent | renewals/s etcd counted | etcd CPU | etcd CPU above idle | podlease CPU | machine | etcd RSS | window |").unwrap();
    writeln!(md, "|---|---|---|---|---|---|---|---|---|---|").unwrap();
    writeln!(md, "| 0 | — | 0 | — | {idle:.3} cores | — | — | — | — | {} s |", MIN_WINDOW.as_secs()).unwrap();
    for p in points {
        writeln!(md, "| {} | {} s | {:.0} | {:.0} | {:.3} cores | {:.3} cores | {:.3} cores | {:.2} of {} cores | {:.0} MiB | {:.0} s |",
            p.pods, p.ttl, p.sent_per_s, p.etcd_renewed_per_s, p.etcd_cores, p.etcd_cores - idle, p.podlease_cores, p.machine, cores(), p.etcd_rss, p.window.as_secs_f64()).unwrap();
    }
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
        .unwrap_or_else(|| vec![10_000]);
    let ttls: Vec<i64> = std::env::var("BENCH_TTLS").unwrap_or_else(|_| "10,15,30,60,120".into()).split(',').filter_map(|t| t.trim().parse().ok()).collect();
    let load = require_quiet_machine().await;
    let busy = load.busy;
    let mut report = Report::new("etcd-load", "etcd load: the registry etcd's CPU against lease renewals per second", load);
    Report::report_panics();
    let bed = TestBed::start().await;
    bed.apply_crd().await;
    report.bed(&bed).await;

    // etcd with nothing to renew.
    let cpu = CpuMark::now(&[bed.registry.pid().unwrap()]);
    tokio::time::sleep(MIN_WINDOW).await; // the measurement window itself
    let idle = cpu.cores_since()[0];

    let mut points = Vec::new();
    let mut created = 0;
    let mut services = 0;
    for &n in &sizes {
        while services < n.div_ceil(PODS_PER_SERVICE) {
            create_registration(&bed.kube, NS, &format!("load-{services}"), json!({"selector": {"matchLabels": {"svc": format!("load-{services}")}}})).await;
            services += 1;
        }
        populate_ready(&bed.kube, NS, "load", created..n, |i| json!({"svc": format!("load-{}", i / PODS_PER_SERVICE)}), 64).await;
        created = n;
        for &ttl in &ttls {
            // What is measured so far is in the section: a run that stops keeps it.
            points_table(&mut report.md, idle, &points);
            report.checkpoint(&format!("**Still to measure from {n} leases at TTL {ttl} s** (the run is in progress or stopped; see below)."));
            points.push(point(&bed, n, services, ttl).await);
        }
    }

    let xy: Vec<(f64, f64)> = std::iter::once((0.0, idle)).chain(points.iter().map(|p| (p.sent_per_s, p.etcd_cores))).collect();
    let (a, b) = fit(&xy);
    let per_1000 = b * 1000.0;
    points_table(&mut report.md, idle, &points);
    let md = &mut report.md;
    writeln!(md, "\nFitted over these points (idle included): etcd CPU ≈ {a:.3} + {per_1000:.3} × (renewals/s ÷ 1000) cores, i.e. {per_1000:.3} cores of the etcd leader per 1,000 renewals/s on this machine.\n").unwrap();
    writeln!(md, "TTL per cluster size: renewals/s = 3 × registered pods (one lease each) ÷ TTL; a lease outlives a podlease that is gone entirely by up to one TTL (keys of pods that died meanwhile stay that long: the crash-safety window). The recommended TTL is the smallest of 30, 60, 120, 300 s whose renewals cost etcd at most {BUDGET_CORES} core above idle by the line above, and never under {FAILOVER_FLOOR} s (the default, just above the failover floor of 29 s).\n").unwrap();
    // The README's TTL guidance is this table: scripts/benchmarks-md.sh copies it there.
    writeln!(md, "<!-- etcd-load:ttl -->").unwrap();
    writeln!(md, "| registered pods (leases) | renewals/s at TTL 30 s | etcd CPU for them | at 60 s | at 120 s | at 300 s | recommended TTL |").unwrap();
    writeln!(md, "|---|---|---|---|---|---|---|").unwrap();
    for n in [1_000usize, 10_000, 50_000, 150_000] {
        let rate = |ttl: i64| 3.0 * n as f64 / ttl as f64;
        let cost = |ttl: i64| b * rate(ttl);
        let pick = [30i64, 60, 120, 300].into_iter().find(|t| cost(*t) <= BUDGET_CORES).map(|t| format!("{t} s")).unwrap_or_else(|| "over budget even at 300 s: give etcd more CPU".into());
        writeln!(md, "| {n} | {:.0} | {:.3} cores | {:.0} /s, {:.3} cores | {:.0} /s, {:.3} cores | {:.0} /s, {:.3} cores | {pick} |",
            rate(30), cost(30), rate(60), cost(60), rate(120), cost(120), rate(300), cost(300)).unwrap();
    }
    writeln!(md, "\netcd CPU as measured by `make bench-scale` on {}{}; the line is fitted to the lease counts and rates measured there ({} leases), and rows beyond the largest measured rate ({:.0}/s) extrapolate it.",
        machine(), if busy { ", **a busy machine: not figures to rely on**" } else { "" },
        sizes.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(", "), points.iter().map(|p| p.sent_per_s).fold(0.0, f64::max)).unwrap();
    writeln!(md, "<!-- /etcd-load:ttl -->").unwrap();
    report.finish();
}
