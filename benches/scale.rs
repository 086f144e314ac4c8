//! Scale on the real test bed: initial sync (controller start → every key in etcd) for
//! already-ready pods, and the steady state that follows (controller CPU and RSS, keepalive
//! requests per second, etcd's CPU), at 1k / 5k / 10k pods.
//!
//! `make bench` (or `cargo bench --bench scale -- [1000,5000,10000]`). Writes the Markdown
//! section to $BENCH_OUT if set.

#[path = "../tests/support/mod.rs"]
mod support;

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use etcd_client::GetOptions;
use futures::StreamExt;
use kube::api::{Api, PostParams};
use podlease::registration::ServiceRegistration;
use serde_json::json;
use support::proc::{cores_over, rss_mib};
use support::*;

const NS: &str = "default";
const PREFIX: &str = "/services/scale/";
/// Steady-state measurement window (after one full renewal round).
const WINDOW: Duration = Duration::from_secs(30);

struct Row {
    pods: usize,
    sync: Duration,
    cores: f64,
    rss: f64,
    keepalive_per_s: f64,
    etcd_cores: f64,
}

async fn count(etcd: &etcd_client::Client) -> i64 {
    let mut kv = etcd.kv_client();
    kv.get(PREFIX, Some(GetOptions::new().with_prefix().with_count_only())).await.map(|r| r.count()).unwrap_or(0)
}

/// Empties the registry etcd: every key and every lease, so the next start is a cold sync.
async fn wipe(etcd: &etcd_client::Client) {
    let mut kv = etcd.kv_client();
    kv.delete("\0", Some(etcd_client::DeleteOptions::new().with_from_key())).await.unwrap();
    let mut lc = etcd.lease_client();
    let leases: Vec<i64> = lc.leases().await.unwrap().leases().iter().map(|l| l.id()).collect();
    futures::stream::iter(leases)
        .for_each_concurrent(64, |l| {
            let mut lc = etcd.lease_client();
            async move {
                let _ = lc.revoke(l).await;
            }
        })
        .await;
}

#[tokio::main]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // test runners list targets; this is a benchmark
    }
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .find(|a| a.chars().next().is_some_and(|c| c.is_ascii_digit()))
        .map(|a| a.split(',').filter_map(|n| n.parse().ok()).collect())
        .unwrap_or_else(|| vec![1000, 5000, 10000]);
    let bed = TestBed::start().await;
    bed.apply_crd().await;
    let regs: Api<ServiceRegistration> = Api::namespaced(bed.kube.clone(), NS);
    let sreg: ServiceRegistration = serde_json::from_value(json!({
        "apiVersion": "podlease.io/v1alpha1", "kind": "ServiceRegistration",
        "metadata": {"name": "scale"}, "spec": {"selector": {"matchLabels": {"app": "scale"}}},
    }))
    .unwrap();
    regs.create(&PostParams::default(), &sreg).await.unwrap();

    let mut rows = Vec::new();
    let mut created = 0;
    for &n in &sizes {
        // More already-ready pods, as the kubelet would have left them.
        let kube = bed.kube.clone();
        let started = Instant::now();
        futures::stream::iter(created..n)
            .for_each_concurrent(64, |i| {
                let kube = kube.clone();
                async move {
                    let name = format!("scale-{i}");
                    create_pod(&kube, NS, &PodSpec::new(&name).label("app", "scale")).await;
                    set_ready(&kube, NS, &name, &pod_ip(i + 1), true).await;
                }
            })
            .await;
        eprintln!("{n} ready pods in the apiserver ({:?} to create {})", started.elapsed(), n - created);
        created = n;
        wipe(&bed.etcd).await;

        // Cold start: process spawn → every key present. (The first start only creates
        // the leader Lease; the measured one finds it held by itself and takes it at once.)
        let mut c = Controller::start(&bed, "scale", &["--log-level", "warn"]).await;
        c.kill();
        wipe(&bed.etcd).await;
        let t0 = Instant::now();
        c.spawn();
        wait_until(&format!("{n} keys"), Duration::from_secs(300), || async { (count(&bed.etcd).await == n as i64).then_some(()) }).await;
        let sync = t0.elapsed();
        c.wait_ready().await;
        eprintln!("{n}: initial sync {sync:?}");

        // Steady state: after a full renewal round (TTL 30 s → every lease renewed every 10 s).
        tokio::time::sleep(Duration::from_secs(12)).await; // let the sync's burst pass
        let pid = c.child.as_ref().unwrap().id();
        let etcd_pid = bed.registry.pid().unwrap();
        let ka0 = c.metric("podlease_keepalive_requests_total").await;
        let started = Instant::now();
        let cores = cores_over(&[pid, etcd_pid], WINDOW).await;
        let ka = (c.metric("podlease_keepalive_requests_total").await - ka0) / started.elapsed().as_secs_f64();
        assert_eq!(count(&bed.etcd).await, n as i64, "every key still there");
        rows.push(Row { pods: n, sync, cores: cores[0], rss: rss_mib(pid), keepalive_per_s: ka, etcd_cores: cores[1] });
        eprintln!("{n}: {:.3} cores, {:.1} MiB, {ka:.0} keepalive/s, etcd {:.3} cores", cores[0], rss_mib(pid), cores[1]);
        c.kill();
    }

    let mut md = String::new();
    writeln!(md, "### c/d/e. Initial sync and steady state (TTL 30 s: each lease renewed every 10 s)\n").unwrap();
    writeln!(md, "Initial sync: process start → every key present in etcd, with every pod already Ready and etcd empty. Steady state: a {}-second window after one full renewal round; CPU from /proc (user + system).\n", WINDOW.as_secs()).unwrap();
    writeln!(md, "| pods (= leases) | initial sync | controller CPU | controller RSS | keepalive requests/s | etcd CPU |").unwrap();
    writeln!(md, "|---|---|---|---|---|---|").unwrap();
    for r in &rows {
        writeln!(
            md,
            "| {} | {:.2} s | {:.3} cores | {:.1} MiB | {:.0} | {:.3} cores |",
            r.pods,
            r.sync.as_secs_f64(),
            r.cores,
            r.rss,
            r.keepalive_per_s,
            r.etcd_cores
        )
        .unwrap();
    }
    if rows.len() > 1 {
        let (a, b) = (&rows[0], rows.last().unwrap());
        let k = b.pods as f64 / a.pods as f64;
        writeln!(
            md,
            "\nFrom {} to {} pods (×{k:.0}): controller CPU ×{:.1}, RSS ×{:.1}, initial sync ×{:.1}.",
            a.pods,
            b.pods,
            b.cores / a.cores.max(1e-9),
            b.rss / a.rss.max(1e-9),
            b.sync.as_secs_f64() / a.sync.as_secs_f64().max(1e-9)
        )
        .unwrap();
    }
    if let Some(big) = rows.iter().find(|r| r.pods == 10_000) {
        let verdict = |ok: bool| if ok { "met" } else { "missed" };
        writeln!(
            md,
            "\nTargets at 10,000 pods: initial sync ≤ 15 s: {} ({:.2} s); ≤ 0.25 core: {} ({:.3}); ≤ 150 MiB RSS: {} ({:.1} MiB).",
            verdict(big.sync.as_secs_f64() <= 15.0),
            big.sync.as_secs_f64(),
            verdict(big.cores <= 0.25),
            big.cores,
            verdict(big.rss <= 150.0),
            big.rss
        )
        .unwrap();
    }
    print!("{md}");
    if let Ok(path) = std::env::var("BENCH_OUT") {
        std::fs::write(path, md).unwrap();
    }
}
