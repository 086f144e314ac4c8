//! Resource bounds: what one namespace can make podlease spend, measured on the pure
//! desired-state index (where the work and the memory are) with a counting allocator. Each
//! test prints its figures (`cargo nextest run --test bounds --no-capture`); the README
//! quotes them. The asserts are on behaviour and on generous bounds, so a quadratic
//! regression fails while a slow machine does not.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use podlease::desired::{Changes, Defaults, Index, Update};
use podlease::pod::PodInfo;
use podlease::registration::ServiceRegistration;
use serde_json::json;

/// Live heap bytes of the whole test process.
struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size, Ordering::Relaxed);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// One measurement at a time: the counter is process-wide.
static SERIAL: Mutex<()> = Mutex::new(());

fn live() -> usize {
    LIVE.load(Ordering::Relaxed)
}

fn pod(ns: &str, name: &str, labels: &[(&str, &str)], i: usize) -> PodInfo {
    PodInfo {
        namespace: ns.into(),
        name: name.into(),
        uid: format!("uid-{ns}-{name}"),
        labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        annotations: Default::default(),
        ip: Some(format!("10.{}.{}.{}", (i >> 16) & 0xff, (i >> 8) & 0xff, i & 0xff).parse().unwrap()),
        node: "node-a".into(),
        phase: "Running".into(),
        ready: true,
        ready_since: None,
        gated: false,
        gate: None,
        terminating: false,
        ports: vec![(Some("http".into()), 8080)],
    }
}

fn sreg(ns: &str, name: &str, spec: serde_json::Value) -> ServiceRegistration {
    serde_json::from_value(json!({
        "apiVersion": "podlease.io/v1alpha1", "kind": "ServiceRegistration",
        "metadata": {"name": name, "namespace": ns, "generation": 1},
        "spec": spec,
    }))
    .unwrap()
}

fn upserts(c: &Changes) -> usize {
    c.updates.iter().filter(|u| matches!(u, Update::Upsert(..))).count()
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

#[test]
fn a_registration_selecting_10000_pods() {
    let _serial = SERIAL.lock().unwrap();
    let n = 10_000;
    let before = live();
    let mut idx = Index::new(Defaults::default());
    idx.apply_registration(&sreg("big", "all", json!({"selector": {"matchLabels": {"app": "all"}}, "metadata": {"version": "1"}})));
    let start = Instant::now();
    let mut published = 0;
    for i in 0..n {
        published += upserts(&idx.apply_pod(pod("big", &format!("pod-{i}"), &[("app", "all")], i)));
    }
    let apply = start.elapsed();
    assert_eq!(published, n);
    let held = live() - before;

    // A spec change rewrites every value once, in one operation.
    let start = Instant::now();
    let c = idx.apply_registration(&sreg("big", "all", json!({"selector": {"matchLabels": {"app": "all"}}, "metadata": {"version": "2"}})));
    let change = start.elapsed();
    assert_eq!(upserts(&c), n);
    drop(c);
    let start = Instant::now();
    let s = idx.summary("big", "all").unwrap();
    let summary = start.elapsed();
    assert_eq!((s.matching, s.ready, s.invalid), (n as u32, n as u32, None));

    // Another namespace: exactly its own instance, at the cost of one pod.
    let start = Instant::now();
    idx.apply_registration(&sreg("other", "svc", json!({"selector": {"matchLabels": {"app": "svc"}}})));
    let c = idx.apply_pod(pod("other", "o1", &[("app", "svc")], 1));
    let other = start.elapsed();
    assert_eq!(upserts(&c), 1);
    println!(
        "10,000 pods in one registration: apply {} ({:.1} µs/pod), index holds {} KiB ({} B/pod); \
         a spec change re-plans all in {}; status summary {}; another namespace's registration + pod {}",
        ms(apply),
        apply.as_secs_f64() * 1e6 / n as f64,
        held / 1024,
        held / n,
        ms(change),
        ms(summary),
        ms(other)
    );
    assert!(held / n < 2560, "{} bytes per pod", held / n);
    assert!(other < Duration::from_secs(1), "another namespace waited {other:?}");
}

#[test]
fn a_thousand_registrations_in_one_namespace() {
    let _serial = SERIAL.lock().unwrap();
    let n = 1_000;
    let before = live();
    let mut idx = Index::new(Defaults::default());
    for i in 0..n {
        idx.apply_pod(pod("busy", &format!("pod-{i}"), &[("app", &format!("svc-{i}")), ("tier", "all")], i));
    }
    let start = Instant::now();
    let mut published = 0;
    let mut status_fanout = 0;
    let mut slowest = Duration::ZERO;
    for i in 0..n {
        let t = Instant::now();
        let c = idx.apply_registration(&sreg("busy", &format!("svc-{i}"), json!({"selector": {"matchLabels": {"app": format!("svc-{i}")}}})));
        slowest = slowest.max(t.elapsed());
        published += upserts(&c);
        status_fanout += c.registrations.len();
    }
    let apply = start.elapsed();
    assert_eq!(published, n, "one instance each");
    let held = live() - before;

    // 100 more registrations that select every pod: each pod in 101 registrations.
    let wide_n = 100;
    let t = Instant::now();
    for i in 0..wide_n {
        idx.apply_registration(&sreg("busy", &format!("wide-{i}"), json!({"selector": {"matchLabels": {"tier": "all"}}, "service": format!("svc-{i}")})));
    }
    let wide = t.elapsed();
    // wide-i publishes svc-i, the key registration svc-i already publishes for pod-i: one
    // owner per key, so those 100 are served, not published twice.
    assert_eq!(idx.desired().len(), n * (wide_n + 1) - wide_n, "every pod in every wide registration, plus its own, each key once");

    // Another namespace meanwhile: only its own instance.
    let t = Instant::now();
    idx.apply_registration(&sreg("quiet", "svc", json!({"selector": {"matchLabels": {"app": "svc"}}})));
    let c = idx.apply_pod(pod("quiet", "q1", &[("app", "svc")], 1));
    let other = t.elapsed();
    assert_eq!(upserts(&c), 1);
    let t = Instant::now();
    let s = idx.summary("busy", "svc-7").unwrap();
    let summary = t.elapsed();
    assert_eq!(s.ready, 1);
    println!(
        "1,000 registrations × 1,000 pods in one namespace: adding them took {} (slowest {}), index holds {} KiB; \
         status fan-out {:.1} registrations per add (a new read prefix re-examines only the registrations whose prefix nests with it); \
         100 more registrations selecting every pod (100,000 instances more) {}; one summary {}; another namespace's registration + pod {}",
        ms(apply),
        ms(slowest),
        held / 1024,
        status_fanout as f64 / n as f64,
        ms(wide),
        ms(summary),
        ms(other)
    );
    // Each add rewrites its own status only: none of the others' prefixes nests with it.
    assert!(status_fanout <= n, "status fan-out {status_fanout} for {n} adds: unrelated registrations re-examined");
    assert!(slowest < Duration::from_secs(2), "one registration took {slowest:?}");
    assert!(other < Duration::from_secs(1), "another namespace waited {other:?}");
}

#[test]
fn a_pod_with_100_registrations() {
    let _serial = SERIAL.lock().unwrap();
    let mut idx = Index::new(Defaults::default());
    for i in 0..100 {
        idx.apply_registration(&sreg("ns", &format!("r{i}"), json!({"selector": {"matchLabels": {"app": "x"}}})));
    }
    let t = Instant::now();
    let c = idx.apply_pod(pod("ns", "p", &[("app", "x")], 1));
    let apply = t.elapsed();
    assert_eq!(upserts(&c), 100, "one instance (one lease) per registration");
    assert_eq!(c.registrations.len(), 100);
    let t = Instant::now();
    let c = idx.apply_pod(PodInfo { ready: false, ..pod("ns", "p", &[("app", "x")], 1) });
    let revoke = t.elapsed();
    assert_eq!(c.updates.len(), 100);
    println!("a pod in 100 registrations: 100 instances in {}, all revoked in {}", ms(apply), ms(revoke));
}

#[test]
fn a_256_kib_annotation_is_refused_in_bounded_memory() {
    let _serial = SERIAL.lock().unwrap();
    let huge = format!("{{\"k\":\"{}\"}}", "x".repeat(256 * 1024));
    let k8s_pod = |name: &str, metadata: &str| -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "ns", "uid": "u", "annotations": {"podlease.io/service": "svc", "podlease.io/metadata": metadata}},
            "spec": {"containers": [{"name": "a", "ports": [{"containerPort": 80}]}]},
            "status": {"phase": "Running", "podIP": "10.0.0.1", "conditions": [{"type": "Ready", "status": "True"}]},
        }))
        .unwrap()
    };
    let mut idx = Index::new(Defaults::default());
    let small = k8s_pod("small", r#"{"k":"v"}"#);
    let big = k8s_pod("big", &huge);
    let before = live();
    idx.apply_pod(PodInfo::from_pod(&small));
    let small_cost = live() - before;
    let before = live();
    let t = Instant::now();
    let c = idx.apply_pod(PodInfo::from_pod(&big));
    let refuse = t.elapsed();
    assert!(c.updates.is_empty());
    assert_eq!(c.problems[0].message, "annotation podlease.io/metadata is longer than 16384 bytes");
    drop(c);
    let big_cost = live() - before;
    println!(
        "a pod with a 256 KiB podlease.io/metadata annotation: refused in {} (\"annotation podlease.io/metadata is longer than 16384 bytes\"), \
         the index keeps {} KiB of it (a well-formed pod: {} B)",
        ms(refuse),
        big_cost / 1024,
        small_cost
    );
    assert!(big_cost < 24 * 1024, "the index keeps {big_cost} bytes of a refused pod");
}
