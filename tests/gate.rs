//! The readiness gate `podlease.io/registered` on the real bed, at the defaults: a gated
//! pod's condition turns True only after its key is in etcd, names what holds it False, is
//! never written for a recreated pod by a stale patch, and does not flip on failover. The
//! tests play the kubelet (ContainersReady, and Ready folded from the gate).

mod support;

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::api::Api;
use podlease::kubernetes::gate::{self, Decision};
use serde_json::json;
use support::etcd::keys;
use support::gate::Timeline;
use support::*;

const NS: &str = "default";
/// Longer than a takeover at the defaults (leader Lease 15 s) plus adoption.
const TAKEOVER: Duration = Duration::from_secs(60);

async fn gated_pod(bed: &TestBed, app: &str, name: &str, ip: usize) {
    create_pod(&bed.kube, NS, &PodSpec::new(name).label("app", app).gated()).await;
    set_containers_ready(&bed.kube, NS, name, &pod_ip(ip), true).await;
}

/// A bed with one podlease at the defaults, the registration `web` (app=web), and a
/// timeline of gates and keys.
async fn web() -> (TestBed, Controller, Timeline) {
    let bed = TestBed::start().await;
    bed.apply_crd().await;
    let c = Controller::start(&bed, "c", &[]).await;
    create_registration(&bed.kube, NS, "web", json!({"selector": {"matchLabels": {"app": "web"}}})).await;
    let t = Timeline::start(&bed.kube, NS, &bed.etcd, "/services/").await;
    (bed, c, t)
}

async fn condition(bed: &TestBed, name: &str) -> Option<k8s_openapi::api::core::v1::PodCondition> {
    let pods: Api<Pod> = Api::namespaced(bed.kube.clone(), NS);
    gate_condition(&pods.get(name).await.ok()?)
}

#[tokio::test]
async fn a_gated_pod_turns_ready_only_after_its_key_is_in_etcd() {
    let (bed, c, t) = web().await;
    let start = Instant::now();
    gated_pod(&bed, "web", "web-0", 1).await;
    let open = t.wait_gate("web-0", "True", "Registered", DEADLINE).await;
    let put = t.wait_key_event("/services/web/default/web-0", true, start, DEADLINE).await;
    assert!(put.at <= open.at, "the gate opened before the key was in etcd");
    assert_eq!(t.gate_changes("web-0").iter().filter(|g| g.status == "True").count(), 1);
    assert_eq!(open.message, "registered in etcd as /services/web/default/web-0");
    println!(
        "measured: ContainersReady → key {:?}, key → gate True {:?}, ContainersReady → gate True {:?}",
        put.at - start,
        open.at - put.at,
        open.at - start
    );
    // The kubelet folds the open gate into Ready.
    set_containers_ready(&bed.kube, NS, "web-0", &pod_ip(1), true).await;
    // What a user sees: kubectl's wide view counts the gate, describe shows its reason.
    let kubectl = |args: &[&str]| bed.kubectl(args);
    let wide = kubectl(&["get", "pods", "-n", NS, "-o", "wide"]);
    println!("$ kubectl get pods -o wide\n{wide}");
    assert!(wide.lines().next().unwrap().contains("READINESS GATES"), "{wide}");
    let row: Vec<&str> = wide.lines().find(|l| l.starts_with("web-0 ")).unwrap().split_whitespace().collect();
    assert_eq!(*row.last().unwrap(), "1/1", "READINESS GATES: {row:?}");
    let described = kubectl(&["describe", "pod", "-n", NS, "web-0"]);
    println!("$ kubectl describe pod web-0\n{described}");
    assert!(described.contains("podlease.io/registered"), "{described}");
    assert!(
        described.lines().any(|l| l.contains("podlease.io/registered") && l.contains("True")),
        "describe shows the gate's condition: {described}"
    );
    // Its reason and message come with the Event of the write (Events are published apart).
    let described = wait_until("describe shows the gate's Event", DEADLINE, || async {
        let d = kubectl(&["describe", "pod", "-n", NS, "web-0"]);
        d.contains("podlease.io/registered True: registered in etcd as /services/web/default/web-0").then_some(d)
    })
    .await;
    println!("$ kubectl describe pod web-0 (Events)\n{}", described.rsplit_once("Events:").unwrap().1);
    assert!(described.lines().any(|l| l.contains("Normal") && l.contains("Registered")), "{described}");

    // A pod without the gate is never written to; a gated pod nothing selects is let through.
    create_pod(&bed.kube, NS, &PodSpec::new("plain").label("app", "web")).await;
    set_ready(&bed.kube, NS, "plain", &pod_ip(2), true).await;
    gated_pod(&bed, "none", "lonely", 3).await;
    let lonely = t.wait_gate("lonely", "True", "NotSelected", DEADLINE).await;
    assert!(lonely.message.contains("no ServiceRegistration selects this pod"), "{}", lonely.message);
    support::etcd::wait_key(&bed.etcd, "/services/web/default/plain").await;
    assert!(condition(&bed, "plain").await.is_none(), "a pod without the gate got the condition");
    // The metrics: gated pods by state, and the gate latency.
    wait_until("gated pods counted", DEADLINE, || async {
        let m = c.metrics().await;
        (support::controller::metric(&m, "podlease_gated_pods{state=\"true\"}") == 2.0).then_some(())
    })
    .await;
    assert!(c.metric("podlease_gate_latency_seconds_count").await >= 1.0);
}

#[tokio::test]
async fn containers_turning_unready_close_the_gate_only_once_the_key_is_revoked_and_reopen_it_after_the_key() {
    let (bed, _c, t) = web().await;
    let key = "/services/web/default/web-0";
    gated_pod(&bed, "web", "web-0", 1).await;
    t.wait_gate("web-0", "True", "Registered", DEADLINE).await;

    let flip = Instant::now();
    set_containers_ready(&bed.kube, NS, "web-0", &pod_ip(1), false).await;
    let closed = t.wait_gate("web-0", "False", "Deregistered", DEADLINE).await;
    let gone = t.wait_key_event(key, false, flip, DEADLINE).await;
    assert!(gone.at <= closed.at, "the gate closed before the key was revoked");

    let back = Instant::now();
    set_containers_ready(&bed.kube, NS, "web-0", &pod_ip(1), true).await;
    wait_until("the gate reopened", DEADLINE, || async {
        t.gate_changes("web-0").into_iter().find(|g| g.status == "True" && g.at >= back)
    })
    .await;
    let reopened = t.gate_changes("web-0").into_iter().find(|g| g.status == "True" && g.at >= back).unwrap();
    let put = t.wait_key_event(key, true, back, DEADLINE).await;
    assert!(put.at <= reopened.at, "the gate reopened before the key was back");
    let statuses: Vec<String> = t.gate_changes("web-0").iter().map(|g| format!("{} {}", g.status, g.reason)).collect();
    assert_eq!(statuses, ["True Registered", "False Deregistered", "True Registered"]);
}

#[tokio::test]
async fn etcd_down_keeps_a_newly_ready_gated_pod_out_and_fails_no_serving_pod() {
    let (mut bed, _c, t) = web().await;
    gated_pod(&bed, "web", "web-0", 1).await;
    t.wait_gate("web-0", "True", "Registered", DEADLINE).await;

    bed.registry.kill();
    gated_pod(&bed, "web", "web-1", 2).await;
    let held = t.wait_gate("web-1", "False", "EtcdUnavailable", DEADLINE).await;
    println!("web-1 while etcd is down: {}", held.message);
    assert!(t.gate_changes("web-0").iter().all(|g| g.status == "True"), "a serving pod was failed: {:?}", t.gate_changes("web-0"));

    bed.registry.resume();
    let etcd = etcd_client::Client::connect([bed.etcd_endpoint()], None).await.unwrap();
    t.wait_gate("web-1", "True", "Registered", TAKEOVER).await;
    assert_eq!(keys(&etcd, "/services/web/").await.len(), 2);
    assert!(t.gate_changes("web-0").iter().all(|g| g.status == "True"), "{:?}", t.gate_changes("web-0"));
}

#[tokio::test]
async fn a_conflict_or_an_invalid_registration_keeps_the_gate_closed_with_that_reason() {
    let bed = TestBed::start().await;
    bed.apply_crd().await;
    let _c = Controller::start(&bed, "c", &[]).await;
    let t = Timeline::start(&bed.kube, NS, &bed.etcd, "/services/").await;
    // Someone else's key where the pod's would go.
    support::etcd::etcdctl_ok(&bed.etcd_endpoint(), None, &["put", "/services/web/default/web-0", "not-podlease"]);
    create_registration(&bed.kube, NS, "web", json!({"selector": {"matchLabels": {"app": "web"}}})).await;
    gated_pod(&bed, "web", "web-0", 1).await;
    let conflict = t.wait_gate("web-0", "False", "Conflict", DEADLINE).await;
    assert!(conflict.message.contains("/services/web/default/web-0"), "{}", conflict.message);
    // And a Warning Event on the pod says the same (what `kubectl describe pod` shows).
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(bed.kube.clone(), NS);
    wait_until("a Warning Conflict Event on the pod", DEADLINE, || async {
        events.list(&Default::default()).await.ok()?.items.into_iter().find(|e| {
            e.reason.as_deref() == Some("Conflict")
                && e.type_.as_deref() == Some("Warning")
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("web-0")
                && e.note.as_deref().is_some_and(|n| n.starts_with("podlease.io/registered False"))
        })
    })
    .await;
    // The key is freed: the conflict retry registers it and the gate opens.
    support::etcd::etcdctl_ok(&bed.etcd_endpoint(), None, &["del", "/services/web/default/web-0"]);
    t.wait_gate("web-0", "True", "Registered", TAKEOVER).await;

    // A registration that selects the pod but cannot publish it (a port it does not declare).
    create_registration(&bed.kube, NS, "api", json!({"selector": {"matchLabels": {"app": "api"}}, "port": "grpc"})).await;
    gated_pod(&bed, "api", "api-0", 2).await;
    let invalid = t.wait_gate("api-0", "False", "InvalidSpec", DEADLINE).await;
    assert!(invalid.message.contains("ServiceRegistration api: port \"grpc\" is not declared"), "{}", invalid.message);
    // Fixed: the gate opens.
    let regs: Api<podlease::registration::ServiceRegistration> = Api::namespaced(bed.kube.clone(), NS);
    regs.patch("api", &Default::default(), &kube::api::Patch::Merge(json!({"spec": {"port": "http"}}))).await.unwrap();
    t.wait_gate("api-0", "True", "Registered", DEADLINE).await;
}

#[tokio::test]
async fn a_pod_recreated_under_the_same_name_is_never_marked_by_a_stale_patch() {
    let (bed, _c, t) = web().await;
    gated_pod(&bed, "web", "web-0", 1).await;
    let first = t.wait_gate("web-0", "True", "Registered", DEADLINE).await;
    let key = "/services/web/default/web-0";
    let old_lease = keys(&bed.etcd, key).await[0].lease();

    // The same name, a new pod, the same address: the key stays the same and moves to a
    // new lease written for the new pod. Its gate opens only after that write.
    force_delete(&bed.kube, NS, "web-0").await;
    let recreated = Instant::now();
    create_pod(&bed.kube, NS, &PodSpec::new("web-0").label("app", "web").gated()).await;
    set_containers_ready(&bed.kube, NS, "web-0", &pod_ip(1), true).await;
    let open = wait_until("the new pod's gate opens", DEADLINE, || async {
        t.gate_changes("web-0").into_iter().find(|g| g.uid != first.uid && g.status == "True")
    })
    .await;
    let moved = wait_until("the key under a new lease", DEADLINE, || async {
        t.keys.lock().unwrap().iter().find(|k| k.key == key && k.put && k.lease != old_lease && k.at >= recreated).cloned()
    })
    .await;
    assert!(moved.at <= open.at, "the new pod's gate opened before its own key was written");

    // A patch meant for the old pod (its UID) is refused by the new one and changes nothing.
    let before = condition(&bed, "web-0").await.unwrap();
    let stale = Decision { status: false, reason: gate::REASON_DEREGISTERED, message: "stale".into() };
    match gate::patch(&bed.kube, NS, "web-0", &first.uid, Timestamp::now(), &stale).await {
        Err(e) => assert!(gate::gone(&e), "refused, but not as a recreated pod: {e:?}"),
        other => panic!("a patch with the old pod's UID was not refused: {other:?}"),
    }
    assert_eq!(condition(&bed, "web-0").await.unwrap(), before);
    let current_uid = Api::<Pod>::namespaced(bed.kube.clone(), NS).get("web-0").await.unwrap().metadata.uid.unwrap();
    gate::patch(&bed.kube, NS, "web-0", &current_uid, Timestamp::now(), &stale).await.expect("the right UID is accepted");
    assert_eq!(condition(&bed, "web-0").await.unwrap().message.as_deref(), Some("stale"));
}

#[tokio::test]
async fn a_failover_flips_no_gate() {
    let bed = TestBed::start().await;
    bed.apply_crd().await;
    // The defaults: leader Lease 15 s, TTL 30 s.
    let mut a = Controller::start(&bed, "a", &[]).await;
    let mut b = Controller::start(&bed, "b", &[]).await;
    create_registration(&bed.kube, NS, "web", json!({"selector": {"matchLabels": {"app": "web"}}})).await;
    let t = Timeline::start(&bed.kube, NS, &bed.etcd, "/services/").await;
    let kube = bed.kube.clone();
    futures::future::join_all((0..20).map(|i| {
        let kube = kube.clone();
        async move {
            let name = format!("web-{i}");
            create_pod(&kube, NS, &PodSpec::new(&name).label("app", "web").gated()).await;
            set_containers_ready(&kube, NS, &name, &pod_ip(i + 1), true).await;
        }
    }))
    .await;
    for i in 0..20 {
        t.wait_gate(&format!("web-{i}"), "True", "Registered", DEADLINE).await;
    }
    let leader = support::controller::wait_leader(&[&a, &b]).await;
    let (dead, standby) = if leader == 0 { (&mut a, &mut b) } else { (&mut b, &mut a) };
    dead.kill();
    support::controller::wait_adopted(standby, TAKEOVER).await;
    // The new leader writes gates: a new pod's opens. By then it has decided every gate.
    gated_pod(&bed, "web", "web-new", 99).await;
    t.wait_gate("web-new", "True", "Registered", DEADLINE).await;
    for i in 0..20 {
        let changes = t.gate_changes(&format!("web-{i}"));
        assert_eq!(changes.len(), 1, "web-{i}'s gate changed on failover: {changes:?}");
    }
    wait_until("the new leader counts 21 open gates", DEADLINE, || async {
        (standby.metric("podlease_gated_pods{state=\"true\"}").await == 21.0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_stale_gate_write_landing_after_the_leaders_is_corrected() {
    let (bed, _c, t) = web().await;
    gated_pod(&bed, "web", "web-0", 1).await;
    let open = t.wait_gate("web-0", "True", "Registered", DEADLINE).await;
    // A deposed leader's patch, in flight through a takeover, lands right after: it closes
    // the gate of a registered pod. No pod or etcd change follows to wake the leader up.
    let stale = Decision { status: false, reason: gate::REASON_DEREGISTERED, message: "stale".into() };
    gate::patch(&bed.kube, NS, "web-0", &open.uid, Timestamp::now(), &stale).await.unwrap();
    let closed = t.wait_gate("web-0", "False", gate::REASON_DEREGISTERED, DEADLINE).await;
    let fixed = wait_until("the gate reopened", DEADLINE, || async {
        t.gate_changes("web-0").into_iter().find(|g| g.status == "True" && g.at > closed.at)
    })
    .await;
    println!("measured: a stale False corrected after {:?}", fixed.at - closed.at);
}

/// The compatibility subset on the oldest supported Kubernetes (1.34): the same tests, each in a process of its own
/// (README, "Supported versions").
mod on_kubernetes_1_34 {
    use super::support::{run_on, Release};

    #[test]
    fn a_gated_pod_turns_ready_only_after_its_key_is_in_etcd() {
        run_on(Release::OldestKubernetes);
        super::a_gated_pod_turns_ready_only_after_its_key_is_in_etcd();
    }

    #[test]
    fn containers_turning_unready_close_the_gate_only_once_the_key_is_revoked_and_reopen_it_after_the_key() {
        run_on(Release::OldestKubernetes);
        super::containers_turning_unready_close_the_gate_only_once_the_key_is_revoked_and_reopen_it_after_the_key();
    }
}
