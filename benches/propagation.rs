//! Propagation latency on the real test bed, side by side with Kubernetes' own EndpointSlice
//! controller reacting to the same pod transitions on the same API server: a pod's status
//! patched Ready → its key seen by an etcd watcher, and → its endpoint `ready: true` seen by
//! an EndpointSlice watcher; then Ready=False → the key's DELETE / `ready: false`. One pod at
//! a time, so each figure is one transition's latency, not a queue's.
//!
//! `make bench` (or `cargo bench --bench propagation -- [pods]`, default 1000 pods, i.e.
//! 1000 transitions each way). Writes the Markdown section to $BENCH_OUT if set.

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use etcd_client::{EventType, WatchOptions};
use futures::StreamExt;
use kube::api::{Api, ApiResource, DynamicObject, PostParams};
use kube::core::GroupVersionKind;
use kube::runtime::watcher;
use podlease::registration::ServiceRegistration;
use serde_json::json;
use support::*;
use tokio::sync::mpsc;

const NS: &str = "default";

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// What a watcher saw: (pod IP, ready) at an instant.
type Seen = (String, bool, Instant);

async fn wait_for(rx: &mut mpsc::UnboundedReceiver<Seen>, ip: &str, ready: bool) -> Instant {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, rx.recv()).await {
            Ok(Some((i, r, at))) if i == ip && r == ready => return at,
            Ok(Some(_)) => continue,
            _ => panic!("no ready={ready} for {ip} within {DEADLINE:?}"),
        }
    }
}

#[tokio::main]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // test runners list targets; this is a benchmark
    }
    let pods: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(1000);
    let bed = TestBed::start().await;
    bed.apply_crd().await;
    let _kcm = bed.start_endpointslice_controller();
    let _controller = Controller::start(&bed, "bench", &["--log-level", "warn"]).await;

    // The same pods, selected by a ServiceRegistration and by a Service.
    let regs: Api<ServiceRegistration> = Api::namespaced(bed.kube.clone(), NS);
    let sreg: ServiceRegistration = serde_json::from_value(json!({
        "apiVersion": "podlease.io/v1alpha1", "kind": "ServiceRegistration",
        "metadata": {"name": "bench"}, "spec": {"selector": {"matchLabels": {"app": "bench"}}},
    }))
    .unwrap();
    regs.create(&PostParams::default(), &sreg).await.unwrap();
    let svcs: Api<k8s_openapi::api::core::v1::Service> = Api::namespaced(bed.kube.clone(), NS);
    let svc = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "bench"},
        "spec": {"selector": {"app": "bench"}, "ports": [{"port": 80, "targetPort": 8080}]},
    }))
    .unwrap();
    svcs.create(&PostParams::default(), &svc).await.unwrap();
    let kube = bed.kube.clone();
    futures::stream::iter(0..pods)
        .for_each_concurrent(32, |i| {
            let kube = kube.clone();
            async move { create_pod(&kube, NS, &PodSpec::new(&format!("bench-{i}")).label("app", "bench")).await; }
        })
        .await;

    // etcd: the json value carries the address; a DELETE is matched by its key.
    let (etcd_tx, mut etcd_rx) = mpsc::unbounded_channel::<Seen>();
    let mut w = bed.etcd.watch_client();
    let mut stream = w.watch("/services/bench/", Some(WatchOptions::new().with_prefix().with_prev_key())).await.unwrap();
    tokio::spawn(async move {
        let _keep = w;
        while let Ok(Some(resp)) = stream.message().await {
            let now = Instant::now();
            for ev in resp.events() {
                let put = ev.event_type() == EventType::Put;
                let value = if put { ev.kv().map(|kv| kv.value().to_vec()) } else { ev.prev_kv().map(|kv| kv.value().to_vec()) };
                let addr = value
                    .and_then(|v| serde_json::from_slice::<serde_json::Value>(&v).ok())
                    .and_then(|v| v["addr"].as_str().map(|a| a.rsplit_once(':').unwrap().0.to_string()));
                if let Some(ip) = addr {
                    let _ = etcd_tx.send((ip, put, now));
                }
            }
        }
    });

    // EndpointSlices (discovery.k8s.io/v1beta1 on 1.20): an endpoint's ready condition.
    let (es_tx, mut es_rx) = mpsc::unbounded_channel::<Seen>();
    let ar = ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("discovery.k8s.io", "v1beta1", "EndpointSlice"), "endpointslices");
    let slices: Api<DynamicObject> = Api::namespaced_with(bed.kube.clone(), NS, &ar);
    let cfg = watcher::Config::default().labels("kubernetes.io/service-name=bench");
    tokio::spawn(async move {
        let mut last: HashMap<String, bool> = HashMap::new();
        let mut events = watcher(slices, cfg).boxed();
        while let Some(Ok(ev)) = events.next().await {
            let now = Instant::now();
            let objs = match ev {
                watcher::Event::Apply(o) | watcher::Event::InitApply(o) => vec![o],
                _ => vec![],
            };
            for o in objs {
                for ep in o.data["endpoints"].as_array().into_iter().flatten() {
                    let ready = ep["conditions"]["ready"].as_bool().unwrap_or(false);
                    for ip in ep["addresses"].as_array().into_iter().flatten().filter_map(|a| a.as_str()) {
                        if last.insert(ip.to_string(), ready) != Some(ready) {
                            let _ = es_tx.send((ip.to_string(), ready, now));
                        }
                    }
                }
            }
        }
    });

    let mut results: HashMap<(&str, bool), Vec<Duration>> = HashMap::new();
    for ready in [true, false] {
        for i in 0..pods {
            let name = format!("bench-{i}");
            let ip = pod_ip(i + 1);
            let t0 = Instant::now();
            set_ready(&bed.kube, NS, &name, &ip, ready).await;
            let at = wait_for(&mut etcd_rx, &ip, ready).await;
            results.entry(("podlease", ready)).or_default().push(at - t0);
            let at = wait_for(&mut es_rx, &ip, ready).await;
            results.entry(("endpointslice", ready)).or_default().push(at - t0);
        }
    }
    for v in results.values_mut() {
        v.sort();
    }

    let mut md = String::new();
    writeln!(md, "### a/b. Propagation: pod status patch → watcher sees the change ({pods} pods, one transition at a time)\n").unwrap();
    writeln!(md, "Same run, same kube-apiserver v1.20.2; podlease → etcd 3.5 watch, kube-controller-manager's EndpointSlice controller (v1.20.2) → EndpointSlice watch. Times include the API server's own write and watch fan-out.\n").unwrap();
    writeln!(md, "| transition | watcher | n | p50 | p90 | p99 | max |").unwrap();
    writeln!(md, "|---|---|---|---|---|---|---|").unwrap();
    for ready in [true, false] {
        for who in ["podlease", "endpointslice"] {
            let v = &results[&(who, ready)];
            writeln!(
                md,
                "| Ready={} | {} | {} | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms |",
                if ready { "True" } else { "False" },
                if who == "podlease" { "podlease → etcd key" } else { "EndpointSlice endpoint" },
                v.len(),
                ms(percentile(v, 0.5)),
                ms(percentile(v, 0.9)),
                ms(percentile(v, 0.99)),
                ms(*v.last().unwrap())
            )
            .unwrap();
        }
    }
    writeln!(md, "\n| transition | podlease / EndpointSlice, p50 | p99 |").unwrap();
    writeln!(md, "|---|---|---|").unwrap();
    for ready in [true, false] {
        let (p, e) = (&results[&("podlease", ready)], &results[&("endpointslice", ready)]);
        writeln!(
            md,
            "| Ready={} | {:.2} | {:.2} |",
            if ready { "True" } else { "False" },
            ms(percentile(p, 0.5)) / ms(percentile(e, 0.5)),
            ms(percentile(p, 0.99)) / ms(percentile(e, 0.99))
        )
        .unwrap();
    }
    let ready_p99 = ms(percentile(&results[&("podlease", true)], 0.99));
    let gone_p99 = ms(percentile(&results[&("podlease", false)], 0.99));
    let vs = |ready: bool| {
        let (p, e) = (&results[&("podlease", ready)], &results[&("endpointslice", ready)]);
        percentile(p, 0.99) <= percentile(e, 0.99) && percentile(p, 0.5) <= percentile(e, 0.5)
    };
    let verdict = |ok: bool| if ok { "met" } else { "missed" };
    writeln!(md, "\nTargets: p99 ≤ 100 ms: {} (Ready {ready_p99:.1} ms, not ready {gone_p99:.1} ms); no slower than EndpointSlice at p50 and p99: {} (Ready), {} (not ready).",
        verdict(ready_p99 <= 100.0 && gone_p99 <= 100.0), verdict(vs(true)), verdict(vs(false))).unwrap();
    print!("{md}");
    if let Ok(path) = std::env::var("BENCH_OUT") {
        std::fs::write(path, md).unwrap();
    }
}
