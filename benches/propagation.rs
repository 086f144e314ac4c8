//! Propagation latency on the real test bed: a pod's status patched Ready → its key seen by
//! an etcd watcher, and Ready=False → the key's DELETE seen, one pod at a time so each
//! figure is the latency of one transition, not of a queue.
//!
//! Run with `make bench` (or `cargo bench --bench propagation -- [pods]`).

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use etcd_client::{EventType, WatchOptions};
use kube::api::{Api, PostParams};
use podlease::registration::ServiceRegistration;
use serde_json::json;
use support::*;
use tokio::sync::mpsc;

const NS: &str = "default";

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn report(name: &str, mut v: Vec<Duration>) {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "{name:<34} n={:<5} p50={:>7.2} ms  p90={:>7.2} ms  p99={:>7.2} ms  max={:>7.2} ms",
        v.len(),
        ms(percentile(&v, 0.50)),
        ms(percentile(&v, 0.90)),
        ms(percentile(&v, 0.99)),
        ms(*v.last().unwrap())
    );
}

#[tokio::main]
async fn main() {
    // Test runners list targets with `--list`: this is a benchmark, not a test suite.
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let pods: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(200);
    let bed = TestBed::start().await;
    bed.apply_crd().await;
    let _controller = Controller::start(&bed, "bench", &["--log-level", "warn"]).await;

    let api: Api<ServiceRegistration> = Api::namespaced(bed.kube.clone(), NS);
    let sreg: ServiceRegistration = serde_json::from_value(json!({
        "apiVersion": "podlease.io/v1alpha1", "kind": "ServiceRegistration",
        "metadata": {"name": "bench"}, "spec": {"selector": {"matchLabels": {"app": "bench"}}},
    }))
    .unwrap();
    api.create(&PostParams::default(), &sreg).await.unwrap();
    for i in 0..pods {
        create_pod(&bed.kube, NS, &PodSpec::new(&format!("bench-{i}")).label("app", "bench")).await;
    }

    // Every key change under the service, as a consumer's watch sees it.
    let (tx, mut rx) = mpsc::unbounded_channel::<(String, bool, Instant)>();
    let mut w = bed.etcd.watch_client();
    let mut stream = w.watch("/services/bench/", Some(WatchOptions::new().with_prefix())).await.unwrap();
    tokio::spawn(async move {
        let _keep = w;
        while let Ok(Some(resp)) = stream.message().await {
            let now = Instant::now();
            for ev in resp.events() {
                if let Some(kv) = ev.kv() {
                    let _ = tx.send((kv.key_str().unwrap().to_string(), ev.event_type() == EventType::Put, now));
                }
            }
        }
    });
    let mut wait_for = async |key: &str, put: bool| -> Instant {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, rx.recv()).await {
                Ok(Some((k, p, at))) if k == key && p == put => return at,
                Ok(Some(_)) => continue,
                _ => panic!("no {} of {key} within {DEADLINE:?}", if put { "PUT" } else { "DELETE" }),
            }
        }
    };

    let mut ready = Vec::with_capacity(pods);
    let mut not_ready = Vec::with_capacity(pods);
    let mut ips: HashMap<usize, String> = HashMap::new();
    for i in 0..pods {
        let name = format!("bench-{i}");
        let ip = pod_ip(i + 1);
        let key = format!("/services/bench/{NS}/{name}");
        let t0 = Instant::now();
        set_ready(&bed.kube, NS, &name, &ip, true).await;
        ready.push(wait_for(&key, true).await - t0);
        ips.insert(i, ip);
    }
    for i in 0..pods {
        let name = format!("bench-{i}");
        let key = format!("/services/bench/{NS}/{name}");
        let t0 = Instant::now();
        set_ready(&bed.kube, NS, &name, &ips[&i], false).await;
        not_ready.push(wait_for(&key, false).await - t0);
    }
    println!("propagation through a real kube-apiserver v1.20.2 and etcd 3.5, {pods} pods, one at a time");
    println!("(from sending the status patch to the etcd watch event; includes the apiserver's own write and watch)");
    report("Ready=True  -> key PUT", ready);
    report("Ready=False -> key DELETE", not_ready);
}
