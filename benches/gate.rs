//! Readiness-gate latency on the real test bed: a gated pod's ContainersReady patched True →
//! its key seen by an etcd watcher → its `podlease.io/registered` condition seen True by a
//! pod watcher. First one pod at a time (each figure one transition, not a queue), then all
//! pods at once (a rollout's burst: the figures include the queue).
//!
//! `cargo bench --bench gate -- [pods]` (default 500). Writes the Markdown section to
//! $BENCH_OUT if set.

#[path = "../tests/support/mod.rs"]
mod support;

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use serde_json::json;
use support::gate::Timeline;
use support::*;

const NS: &str = "default";

fn row(md: &mut String, what: &str, v: &mut [Duration]) {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    writeln!(
        md,
        "| {what} | {} | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms |",
        v.len(),
        ms(percentile(v, 0.5)),
        ms(percentile(v, 0.9)),
        ms(percentile(v, 0.99)),
        ms(*v.last().unwrap())
    )
    .unwrap();
}

#[tokio::main]
async fn main() {
    if support::bench::listing() {
        return;
    }
    let pods: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(500);
    let load = support::bench::require_quiet_machine().await;
    let mut report = support::bench::Report::new("gate", &format!("Readiness gate: ContainersReady → key in etcd → gate True ({pods} pods)"), load);
    let bed = TestBed::start().await;
    bed.apply_crd().await;
    report.bed(&bed).await;
    let _controller = Controller::start(&bed, "bench", &["--log-level", "info"]).await;
    create_registration(&bed.kube, NS, "bench", json!({"selector": {"matchLabels": {"app": "bench"}}})).await;
    let kube = bed.kube.clone();
    futures::StreamExt::for_each_concurrent(futures::stream::iter(0..pods), 32, |i| {
        let kube = kube.clone();
        async move {
            create_pod(&kube, NS, &PodSpec::new(&format!("bench-{i}")).label("app", "bench").gated()).await;
        }
    })
    .await;
    let t = Timeline::start(&bed.kube, NS, &bed.etcd, "/services/bench/").await;
    let long = Duration::from_secs(120);

    // One at a time.
    let (mut key, mut gate, mut gap) = (Vec::new(), Vec::new(), Vec::new());
    // The key and the gate arrive on two watch streams: their order as seen here can differ
    // from etcd's and the API server's by the streams' delivery (podlease's own order is
    // asserted by tests/gate.rs). Counted, not asserted.
    let mut seen_inverted = 0;
    for i in 0..pods {
        let name = format!("bench-{i}");
        let t0 = Instant::now();
        set_containers_ready(&bed.kube, NS, &name, &pod_ip(i + 1), true).await;
        let put = t.wait_key_event(&format!("/services/bench/default/{name}"), true, t0, long).await;
        let open = t.wait_gate(&name, "True", "Registered", long).await;
        if open.at < put.at {
            seen_inverted += 1;
        }
        key.push(put.at - t0);
        gate.push(open.at - t0);
        gap.push(open.at - put.at);
    }

    // Close every gate, then all pods' containers turn ready at once.
    futures::StreamExt::for_each_concurrent(futures::stream::iter(0..pods), 32, |i| {
        let kube = kube.clone();
        async move {
            set_containers_ready(&kube, NS, &format!("bench-{i}"), &pod_ip(i + 1), false).await;
        }
    })
    .await;
    for i in 0..pods {
        t.wait_gate(&format!("bench-{i}"), "False", "Deregistered", long).await;
    }
    let t0 = Instant::now();
    let started = std::sync::Mutex::new(vec![t0; pods]);
    futures::StreamExt::for_each_concurrent(futures::stream::iter(0..pods), 32, |i| {
        let (kube, started) = (kube.clone(), &started);
        async move {
            started.lock().unwrap()[i] = Instant::now();
            set_containers_ready(&kube, NS, &format!("bench-{i}"), &pod_ip(i + 1), true).await;
        }
    })
    .await;
    let patched = t0.elapsed();
    let started = started.into_inner().unwrap();
    let (mut burst, mut own, mut own_key, mut key_gate) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (i, own_t0) in started.iter().enumerate() {
        let name = format!("bench-{i}");
        let open = wait_until(&format!("{name} reopened"), long, || async {
            t.gate_changes(&name).into_iter().find(|g| g.status == "True" && g.at >= t0)
        })
        .await;
        let put = t.wait_key_event(&format!("/services/bench/default/{name}"), true, t0, long).await;
        burst.push(open.at - t0);
        own.push(open.at - *own_t0);
        own_key.push(put.at - *own_t0);
        key_gate.push(open.at - put.at);
    }

    let md = &mut report.md;
    writeln!(md, "podlease at the defaults, one replica, release build; the test patches ContainersReady as the kubelet would (a GET and a PATCH, both inside the figures), an etcd watch sees the key, a pod watch sees the condition. Times include the API server's writes and watch fan-out. podlease writes gates as soon as nothing else is queued (no debounce) with up to 32 patches in flight.\n").unwrap();
    writeln!(md, "| one pod at a time | n | p50 | p90 | p99 | max |").unwrap();
    writeln!(md, "|---|---|---|---|---|---|").unwrap();
    row(md, "ContainersReady → key PUT", &mut key);
    row(md, "key PUT → gate True", &mut gap);
    row(md, "ContainersReady → gate True", &mut gate);
    writeln!(md, "\nGate seen before its key (two watch streams' delivery; counted as 0 ms above): {seen_inverted} of {pods}.").unwrap();
    writeln!(md, "\n| all {pods} at once (patched in {:.1} s, 32 in flight) | n | p50 | p90 | p99 | max |", patched.as_secs_f64()).unwrap();
    writeln!(md, "|---|---|---|---|---|---|").unwrap();
    row(md, "burst start → gate True", &mut burst);
    row(md, "the pod's own ContainersReady patch → key PUT", &mut own_key);
    row(md, "key PUT → gate True", &mut key_gate);
    row(md, "the pod's own ContainersReady patch → gate True", &mut own);
    report.finish();
}
