//! A real consumer at the other end of the etcd-naming format: etcd's own gRPC naming
//! resolver (go.etcd.io/etcd/client/v3/naming/resolver), behind grpc.Dial, as a Go service
//! would use it (tools/consumers/etcd-naming). Pods of one service turn ready and not ready on the
//! fast bed; the resolver must see exactly the ready pods' addresses, every change, and
//! nothing in between. The pods' addresses are on 127.0.0.0/8: the resolver dials them.

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::consumer::{Resolver, p50_max};
use support::*;

const NS: &str = "shop";
/// etcd-naming service names are paths: the resolver's target is `etcd:///svc/user`.
const SERVICE: &str = "svc/user";
const PORT: i32 = 9090;
/// Loopback addresses only: a dialling resolver connects to every address it resolves.
const PODS: [(&str, &str); 3] = [("user-0", "127.0.0.2"), ("user-1", "127.0.0.3"), ("user-2", "127.0.0.4")];
/// Not-ready/ready flips per pod.
const ROUNDS: usize = 5;

async fn setup() -> (TestBed, Controller) {
    let bed = TestBed::start().await;
    bed.apply_crd().await;
    ensure_namespace(&bed.kube, NS).await;
    let c = Controller::start(&bed, "c1", &[]).await;
    create_registration(&bed.kube, NS, "user", json!({
        "selector": {"matchLabels": {"app": "user"}}, "port": "grpc", "format": "etcd-naming", "service": SERVICE,
    }))
    .await;
    for (name, ip) in PODS {
        assert!(ip.starts_with("127."), "test pods of a dialling consumer must be on loopback, not {ip}");
        create_pod(&bed.kube, NS, &PodSpec::new(name).label("app", "user").ports(&[("grpc", PORT)])).await;
    }
    (bed, c)
}

fn addr(ip: &str) -> String {
    format!("{ip}:{PORT}")
}

/// Patches the pod's readiness and waits until the resolver hands grpc `want`; how long
/// that took from the moment the patch was sent.
async fn flip(bed: &TestBed, r: &Resolver, pod: (&str, &str), ready: bool, want: &[String]) -> Duration {
    let sent = Instant::now();
    set_ready(&bed.kube, NS, pod.0, pod.1, ready).await;
    let want: Vec<&str> = want.iter().map(String::as_str).collect();
    let update = r.wait_for(&want, DEADLINE).await;
    update.at.saturating_duration_since(sent)
}

#[tokio::test]
async fn the_etcd_resolver_sees_exactly_the_ready_pods_and_every_change() {
    let (bed, _c) = setup().await;
    let r = Resolver::start(&bed.etcd_endpoints(), SERVICE, true, bed.dir.path()).await;
    assert!(r.history().is_empty(), "nothing is ready yet, yet the resolver saw {:?}", r.history());

    // The sets grpc must be handed, in this order and nothing else.
    let mut steps: Vec<Vec<String>> = Vec::new();
    let (mut up, mut down) = (Vec::new(), Vec::new());
    let mut ready: Vec<String> = Vec::new();
    let set = |ready: &Vec<String>| {
        let mut s = ready.clone();
        s.sort();
        s
    };

    for pod in PODS {
        ready.push(addr(pod.1));
        steps.push(set(&ready));
        up.push(flip(&bed, &r, pod, true, &set(&ready)).await);
    }
    let flips_from = Instant::now();
    for _ in 0..ROUNDS {
        for pod in PODS {
            ready.retain(|a| *a != addr(pod.1));
            steps.push(set(&ready));
            down.push(flip(&bed, &r, pod, false, &set(&ready)).await);
            ready.push(addr(pod.1));
            steps.push(set(&ready));
            up.push(flip(&bed, &r, pod, true, &set(&ready)).await);
        }
    }
    let smallest = r.smallest_since(flips_from).expect("a set in force");
    // The last one out: the resolver hands grpc an empty set (which grpc refuses, keeping
    // the old one: the reason a service must not rely on its resolver to drain it).
    for pod in PODS {
        ready.retain(|a| *a != addr(pod.1));
        steps.push(set(&ready));
        down.push(flip(&bed, &r, pod, false, &set(&ready)).await);
    }

    let seen: Vec<Vec<String>> = r.changes().into_iter().map(|(_, a)| a).collect();
    assert_eq!(seen, steps, "the resolver must pass through exactly the ready sets, no transient drop or extra address");
    assert_eq!(smallest.len(), PODS.len() - 1, "one pod out at a time: the smallest set while flipping is one short: {smallest:?}");
    let events = r.events();
    assert!(events.iter().all(|(e, _)| e != "refused_dial"), "only loopback addresses were published, yet a dial was refused: {events:?}");
    assert!(events.iter().any(|(e, _)| e == "state"), "under --dial the channel reports its connectivity: {events:?}");
    assert!(r.undecodable_keys().is_empty(), "the resolver could not decode: {:?}", r.undecodable_keys());

    let (up50, upmax) = p50_max(&up);
    let (down50, downmax) = p50_max(&down);
    println!(
        "etcd resolver (grpc.Dial etcd:///{SERVICE}, round_robin): pod status patch -> resolver update, ready: p50 {up50:?} max {upmax:?} over {} changes; not ready: p50 {down50:?} max {downmax:?} over {}; smallest set while flipping: {} of {}",
        up.len(),
        down.len(),
        smallest.len(),
        PODS.len()
    );
}

#[tokio::test]
async fn the_etcd_resolver_decodes_the_value_podlease_writes_and_drops_what_it_cannot() {
    let (bed, _c) = setup().await;
    // What a wrong writer would leave under the service's prefix: the resolver skips both
    // (with a warning), so a format of that shape would never reach grpc.
    let wrong = [
        ("svc/user/127.0.0.8:9090", "127.0.0.8:9090".to_string()),                                      // go-zero's plain text
        ("svc/user/127.0.0.9:9090", json!({"Op": "0", "Addr": "127.0.0.9:9090", "Metadata": null}).to_string()), // Op as a string
    ];
    let mut kv = bed.etcd.kv_client();
    for (k, v) in &wrong {
        kv.put(*k, v.as_str(), None).await.unwrap();
    }
    // Resolve only: the channel dials nothing.
    let r = Resolver::start(&bed.etcd_endpoints(), SERVICE, false, bed.dir.path()).await;
    wait_until("the resolver to reject both wrong values", DEADLINE, || async {
        let keys = r.undecodable_keys();
        wrong.iter().all(|(k, _)| keys.iter().any(|u| u == k)).then_some(())
    })
    .await;
    assert!(r.history().is_empty(), "undecodable values must not reach grpc: {:?}", r.history());

    let (name, ip) = PODS[0];
    set_ready(&bed.kube, NS, name, ip, true).await;
    r.wait_for(&[&addr(ip)], DEADLINE).await;
    let key = format!("{SERVICE}/{}", addr(ip));
    let written = etcd_dump(&bed.etcd, &key).await;
    assert_eq!(
        written.get(&key).map(String::as_str),
        Some(r#"{"Op":0,"Addr":"127.0.0.2:9090","Metadata":null}"#),
        "podlease's etcd-naming value, byte for byte: {written:?}"
    );
    assert!(!r.undecodable_keys().contains(&key), "the resolver could not decode podlease's value: {:?}", r.warnings());
    assert_eq!(r.current(), [addr(ip)], "exactly podlease's address, none of the wrong values");
}
