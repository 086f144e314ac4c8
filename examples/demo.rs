//! `make demo`: the test bed up, podlease running, pods walking through ready → not ready →
//! terminating → gone, and the etcd keys printed as they appear and vanish.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::Instant;

use etcd_client::{EventType, WatchOptions};
use kube::api::{Api, DeleteParams, PostParams};
use podlease::registration::ServiceRegistration;
use serde_json::json;
use support::*;

const NS: &str = "default";

fn say(start: Instant, what: &str) {
    println!("\n[{:>5.2}s] {what}", start.elapsed().as_secs_f64());
}

/// The real `kubectl get serviceregistrations`, as a user would type it.
fn table(bed: &TestBed) {
    println!("        $ kubectl get serviceregistrations -n {NS}");
    for line in bed.kubectl(&["get", "serviceregistrations", "-n", NS]).lines() {
        println!("        {line}");
    }
}

async fn settle(bed: &TestBed, what: &str, expect_keys: usize) {
    wait_until(what, DEADLINE, || async {
        let n = support::etcd::keys(&bed.etcd, "/services/").await.len() + support::etcd::keys(&bed.etcd, "/microservices/").await.len();
        (n == expect_keys).then_some(())
    })
    .await;
}

/// Waits until the status of `user` shows `n` registered instances.
async fn registered(bed: &TestBed, n: u32) {
    let api: Api<ServiceRegistration> = Api::namespaced(bed.kube.clone(), NS);
    wait_until("status of user", DEADLINE, || async {
        (api.get("user").await.ok()?.status?.registered == n).then_some(())
    })
    .await;
}

#[tokio::main]
async fn main() {
    let start = Instant::now();
    say(start, &format!("starting the test bed: etcd (apiserver storage), etcd (registry), kube-apiserver {}", support::Binaries::locate().kube_version));
    let bed = TestBed::start().await;
    bed.apply_crd().await;
    println!("        registry etcd: {}   apiserver: {}", bed.etcd_endpoint(), bed.apiserver_url());

    say(start, "starting podlease (TTL 10 s)");
    let controller = Controller::start(&bed, "demo", &["--default-ttl", "10", "--log-level", "warn"]).await;
    println!("        controller log: {}", controller.log.display());

    // Print every key change in etcd, as a consumer's watch sees it.
    let mut w = bed.etcd.watch_client();
    let mut stream = w.watch("/", Some(WatchOptions::new().with_prefix())).await.unwrap();
    let t0 = start;
    tokio::spawn(async move {
        let _keep = w;
        while let Ok(Some(resp)) = stream.message().await {
            for ev in resp.events() {
                let Some(kv) = ev.kv() else { continue };
                let key = kv.key_str().unwrap_or_default();
                if key.starts_with("/podlease/owners/") {
                    continue; // ownership records: podlease's own bookkeeping
                }
                match ev.event_type() {
                    EventType::Put => println!("[{:>5.2}s]   etcd PUT    {key} = {}", t0.elapsed().as_secs_f64(), kv.value_str().unwrap_or_default()),
                    EventType::Delete => println!("[{:>5.2}s]   etcd DELETE {key}", t0.elapsed().as_secs_f64()),
                }
            }
        }
    });

    say(start, "creating ServiceRegistration `user` (app=user, format json, port grpc)");
    let api: Api<ServiceRegistration> = Api::namespaced(bed.kube.clone(), NS);
    let sreg: ServiceRegistration = serde_json::from_value(json!({
        "apiVersion": "podlease.io/v1alpha1", "kind": "ServiceRegistration",
        "metadata": {"name": "user"},
        "spec": {"selector": {"matchLabels": {"app": "user"}}, "port": "grpc", "metadata": {"version": "1.4.2"}},
    }))
    .unwrap();
    api.create(&PostParams::default(), &sreg).await.unwrap();

    say(start, "creating pods user-0..2 (app=user) and cart-0..1 (annotated podlease.io/service=cart, format kratos)");
    for i in 0..3 {
        create_pod(&bed.kube, NS, &PodSpec::new(&format!("user-{i}")).label("app", "user").ports(&[("http", 8080), ("grpc", 9090)])).await;
    }
    for i in 0..2 {
        let spec = PodSpec::new(&format!("cart-{i}"))
            .annotation("podlease.io/service", "cart")
            .annotation("podlease.io/format", "kratos")
            .ports(&[("grpc", 9000)]);
        create_pod(&bed.kube, NS, &spec).await;
    }

    say(start, "kubelet: every pod turns Ready");
    for i in 0..3 {
        set_ready(&bed.kube, NS, &format!("user-{i}"), &pod_ip(10 + i), true).await;
    }
    for i in 0..2 {
        set_ready(&bed.kube, NS, &format!("cart-{i}"), &pod_ip(20 + i), true).await;
    }
    settle(&bed, "5 keys", 5).await;
    registered(&bed, 3).await;
    table(&bed);

    say(start, "kubelet: user-0 fails its readiness probe (Ready=False)");
    set_ready(&bed.kube, NS, "user-0", &pod_ip(10), false).await;
    settle(&bed, "4 keys", 4).await;

    say(start, "user-1 is deleted (terminating: still in the API, no longer published)");
    delete_graceful(&bed.kube, NS, "user-1").await;
    settle(&bed, "3 keys", 3).await;
    force_delete(&bed.kube, NS, "user-1").await;

    say(start, "cart-1 is deleted at once");
    force_delete(&bed.kube, NS, "cart-1").await;
    settle(&bed, "2 keys", 2).await;
    registered(&bed, 1).await;
    table(&bed);

    say(start, "ServiceRegistration `user` is deleted: its leases are revoked before the finalizer goes");
    api.delete("user", &DeleteParams::default()).await.unwrap();
    settle(&bed, "1 key", 1).await;

    say(start, "podlease is SIGKILLed: the remaining key (cart-0) expires with its 10 s lease");
    drop(controller);
    settle(&bed, "no keys", 0).await;

    say(start, "done; stopping the test bed");
}
