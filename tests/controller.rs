//! End to end on the real test bed: the podlease binary, a real kube-apiserver and a real
//! registry etcd. Each test asserts on etcd contents and on the ServiceRegistration status.

mod support;

use std::time::{Duration, Instant};

use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use podlease::registration::{ServiceRegistration, ServiceRegistrationStatus};
use serde_json::json;
use support::etcd::{Recorder, granted_ttl, keys, wait_absent, wait_key};
use support::*;

const NS: &str = "default";

async fn create_sreg(bed: &TestBed, name: &str, spec: serde_json::Value) -> ServiceRegistration {
    create_registration(&bed.kube, NS, name, spec).await
}

async fn wait_status(
    bed: &TestBed,
    name: &str,
    what: &str,
    pred: impl Fn(&ServiceRegistrationStatus) -> bool,
) -> ServiceRegistrationStatus {
    let api: Api<ServiceRegistration> = Api::namespaced(bed.kube.clone(), NS);
    wait_until(&format!("status of {name}: {what}"), DEADLINE, || {
        let api = api.clone();
        let pred = &pred;
        async move { api.get(name).await.ok()?.status.filter(|s| pred(s)) }
    })
    .await
}

fn condition<'a>(s: &'a ServiceRegistrationStatus, type_: &str) -> &'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
    s.conditions.iter().find(|c| c.type_ == type_).unwrap_or_else(|| panic!("no {type_} condition in {s:?}"))
}

async fn ready_pod(bed: &TestBed, name: &str, labels: &[(&str, &str)], ip: &str) {
    let mut spec = PodSpec::new(name).ports(&[("http", 8080), ("grpc", 9090)]);
    for (k, v) in labels {
        spec = spec.label(k, v);
    }
    create_pod(&bed.kube, NS, &spec).await;
    set_ready(&bed.kube, NS, name, ip, true).await;
}

/// Ownership records (`/podlease/owners/<cluster>/<install>/<ns>/<pod>/<registration>`),
/// not the leader fence key beside them (`/podlease/owners/<cluster>/<install>`).
async fn owner_records(bed: &TestBed) -> Vec<String> {
    keys(&bed.etcd, "/podlease/owners/")
        .await
        .into_iter()
        .map(|kv| kv.key_str().unwrap().to_string())
        .filter(|k| podlease::registry::identity::classify("/podlease/owners", k).is_some_and(|(_, ns)| ns.is_some()))
        .collect()
}

async fn events_for(bed: &TestBed, name: &str) -> Vec<Event> {
    let api: Api<Event> = Api::namespaced(bed.kube.clone(), NS);
    api.list(&ListParams::default()).await.unwrap().items.into_iter().filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)).collect()
}

async fn wait_event(bed: &TestBed, name: &str, reason: &str) -> Event {
    wait_until(&format!("{reason} event on {name}"), DEADLINE, || async {
        events_for(bed, name).await.into_iter().find(|e| e.reason.as_deref() == Some(reason))
    })
    .await
}

#[tokio::test]
async fn a_ready_pod_is_published_under_its_own_lease_and_revoked_when_not_ready() {
    let (bed, _c) = bed_and_controller(&[]).await;
    create_sreg(&bed, "user", json!({"selector": {"matchLabels": {"app": "user"}}, "port": "grpc", "ttlSeconds": 20, "metadata": {"zone": "a"}})).await;
    ready_pod(&bed, "user-1", &[("app", "user")], "10.0.0.1").await;

    let kv = wait_key(&bed.etcd, "/services/user/default/user-1").await;
    assert_eq!(
        kv.value_str().unwrap(),
        r#"{"addr":"10.0.0.1:9090","namespace":"default","pod":"user-1","node":"node-a","metadata":{"zone":"a"}}"#
    );
    assert_ne!(kv.lease(), 0, "the key lives under a lease");
    assert_eq!(granted_ttl(&bed.etcd, kv.lease()).await, 20);

    let st = wait_status(&bed, "user", "1 registered", |s| s.registered == 1).await;
    assert_eq!((st.matching_pods, st.ready_pods), (1, 1));
    assert_eq!(st.service.as_deref(), Some("user"));
    assert_eq!(st.instances[0].key, "/services/user/default/user-1");
    // As `etcdctl lease list` prints it: 16 hex digits.
    assert_eq!(st.instances[0].lease_id, format!("{:016x}", kv.lease()));
    let listed = support::etcd::etcdctl(&bed.etcd_endpoint(), None, &["lease", "list"]);
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(listed.lines().any(|l| l.trim() == st.instances[0].lease_id), "{listed}");
    assert_eq!(condition(&st, "Ready").status, "True");

    // Not ready: revoked at once, far inside the 20 s TTL.
    let start = Instant::now();
    set_ready(&bed.kube, NS, "user-1", "10.0.0.1", false).await;
    wait_absent(&bed.etcd, "/services/user/default/user-1", Duration::from_secs(5)).await;
    assert!(start.elapsed() < Duration::from_secs(5));
    // The key goes in a fenced Txn, the lease right after it: revoked, not left to expire.
    let lc = bed.etcd.lease_client();
    let lease = kv.lease();
    wait_until("the lease revoked", Duration::from_secs(5), || {
        let mut lc = lc.clone();
        async move { (lc.time_to_live(lease, None).await.ok()?.ttl() <= 0).then_some(()) }
    })
    .await;
    let st = wait_status(&bed, "user", "0 registered", |s| s.registered == 0).await;
    assert_eq!((st.matching_pods, st.ready_pods), (1, 0));
    assert!(owner_records(&bed).await.is_empty(), "the ownership record went with the lease");
}

#[tokio::test]
async fn a_terminating_pod_is_revoked_before_it_is_gone() {
    let (bed, _c) = bed_and_controller(&[]).await;
    create_sreg(&bed, "user", json!({"selector": {"matchLabels": {"app": "user"}}})).await;
    ready_pod(&bed, "user-1", &[("app", "user")], "10.0.0.1").await;
    wait_key(&bed.etcd, "/services/user/default/user-1").await;

    delete_graceful(&bed.kube, NS, "user-1").await;
    wait_absent(&bed.etcd, "/services/user/default/user-1", Duration::from_secs(5)).await;
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(bed.kube.clone(), NS);
    assert!(pods.get("user-1").await.unwrap().metadata.deletion_timestamp.is_some(), "still terminating");
}

#[tokio::test]
async fn leaving_the_selector_revokes_and_coming_back_republishes() {
    let (bed, _c) = bed_and_controller(&[]).await;
    create_sreg(&bed, "user", json!({"selector": {"matchLabels": {"app": "user"}}})).await;
    ready_pod(&bed, "user-1", &[("app", "user")], "10.0.0.1").await;
    let key = "/services/user/default/user-1";
    wait_key(&bed.etcd, key).await;

    patch_labels(&bed.kube, NS, "user-1", json!({"app": "other"})).await;
    wait_absent(&bed.etcd, key, Duration::from_secs(5)).await;
    wait_status(&bed, "user", "no matching pods", |s| s.matching_pods == 0 && s.registered == 0).await;

    patch_labels(&bed.kube, NS, "user-1", json!({"app": "user"})).await;
    wait_key(&bed.etcd, key).await;
    wait_status(&bed, "user", "back", |s| s.registered == 1).await;
}

#[tokio::test]
async fn a_metadata_change_rewrites_the_value_in_place_without_a_delete() {
    let (bed, _c) = bed_and_controller(&[]).await;
    create_sreg(&bed, "user", json!({"selector": {"matchLabels": {"app": "user"}}, "metadata": {"v": "1"}})).await;
    ready_pod(&bed, "user-1", &[("app", "user")], "10.0.0.1").await;
    let key = "/services/user/default/user-1";
    let before = wait_key(&bed.etcd, key).await;
    let recorder = Recorder::start(&bed.etcd, "/services/").await;

    let api: Api<ServiceRegistration> = Api::namespaced(bed.kube.clone(), NS);
    api.patch("user", &PatchParams::default(), &Patch::Merge(&json!({"spec": {"metadata": {"v": "2"}}}))).await.unwrap();
    let after = wait_until("value updated", DEADLINE, || async {
        let kv = wait_key(&bed.etcd, key).await;
        kv.value_str().unwrap().contains(r#""v":"2""#).then_some(kv)
    })
    .await;
    assert_eq!(after.lease(), before.lease(), "same lease");
    assert_eq!(after.create_revision(), before.create_revision(), "same key incarnation");
    assert!(recorder.deletes().is_empty(), "watchers saw a DELETE: {:?}", recorder.all());
}

#[tokio::test]
async fn deleting_a_registration_revokes_its_keys_then_releases_the_finalizer() {
    let (bed, _c) = bed_and_controller(&[]).await;
    create_sreg(&bed, "user", json!({"selector": {"matchLabels": {"app": "user"}}})).await;
    for i in 0..3 {
        ready_pod(&bed, &format!("user-{i}"), &[("app", "user")], &pod_ip(i + 1)).await;
    }
    wait_status(&bed, "user", "3 registered", |s| s.registered == 3).await;
    let api: Api<ServiceRegistration> = Api::namespaced(bed.kube.clone(), NS);
    let obj = api.get("user").await.unwrap();
    assert!(obj.metadata.finalizers.unwrap_or_default().contains(&"podlease.io/revoke-leases".to_string()));

    api.delete("user", &DeleteParams::default()).await.unwrap();
    wait_until("ServiceRegistration gone", DEADLINE, || async { api.get_opt("user").await.ok()?.is_none().then_some(()) }).await;
    assert!(keys(&bed.etcd, "/services/user/").await.is_empty(), "keys left behind");
    assert!(owner_records(&bed).await.is_empty(), "ownership records left behind");
}

#[tokio::test]
async fn after_sigkill_the_keys_expire_within_the_ttl() {
    let (bed, mut c) = bed_and_controller(&["--leader-lease-duration", "5"]).await;
    create_sreg(&bed, "user", json!({"selector": {"matchLabels": {"app": "user"}}, "ttlSeconds": 5})).await;
    ready_pod(&bed, "user-1", &[("app", "user")], "10.0.0.1").await;
    ready_pod(&bed, "user-2", &[("app", "user")], "10.0.0.2").await;
    wait_key(&bed.etcd, "/services/user/default/user-1").await;
    wait_key(&bed.etcd, "/services/user/default/user-2").await;

    c.kill();
    let start = Instant::now();
    // TTL 5 s; etcd may take up to its lease-checkpoint tick (~1 s) more.
    wait_absent(&bed.etcd, "/services/user/default/user-1", Duration::from_secs(8)).await;
    wait_absent(&bed.etcd, "/services/user/default/user-2", Duration::from_secs(8)).await;
    let gone = start.elapsed();
    assert!(gone >= Duration::from_secs(3), "keys vanished after {gone:?}: something revoked them, not the TTL");
    // The leader fence's own lease (6 s) goes too: nothing lingers but the service claim,
    // which outlives the keys it covers (CLAIM_TTL) so that no other namespace takes the name
    // while podlease is down.
    let claims = |k: &str| k.contains("/@claims/") || k.contains("/@claims-");
    wait_until("nothing left in etcd but the claim", Duration::from_secs(10), || async {
        keys(&bed.etcd, "/").await.iter().all(|kv| claims(kv.key_str().unwrap())).then_some(())
    })
    .await;
    let left: Vec<String> = keys(&bed.etcd, "/").await.iter().map(|kv| kv.key_str().unwrap().to_string()).collect();
    assert_eq!(left.len(), 3, "the hold, its lease's pointer and the claims epoch: {left:?}");
    assert!(left.iter().any(|k| k.ends_with("/@hold/user")), "{left:?}");
}

#[tokio::test]
async fn a_key_held_by_someone_else_is_not_overwritten() {
    let (bed, _c) = bed_and_controller(&[]).await;
    let mut kv = bed.etcd.kv_client();
    kv.put("/services/user/default/user-1", "someone else's", None).await.unwrap();
    create_sreg(&bed, "user", json!({"selector": {"matchLabels": {"app": "user"}}})).await;
    create_sreg(&bed, "fine", json!({"selector": {"matchLabels": {"app": "user"}}, "service": "fine"})).await;
    ready_pod(&bed, "user-1", &[("app", "user")], "10.0.0.1").await;

    let st = wait_status(&bed, "user", "Conflict", |s| s.conditions.iter().any(|c| c.type_ == "Conflict" && c.status == "True")).await;
    assert!(condition(&st, "Conflict").message.contains("/services/user/default/user-1"), "{st:?}");
    assert_eq!(condition(&st, "Ready").status, "False");
    wait_event(&bed, "user", "Conflict").await;
    let kv = wait_key(&bed.etcd, "/services/user/default/user-1").await;
    assert_eq!(kv.value_str().unwrap(), "someone else's");
    assert_eq!(kv.lease(), 0);
    // The other registration of the same pod is unaffected.
    wait_key(&bed.etcd, "/services/fine/default/user-1").await;
}

#[tokio::test]
async fn an_invalid_spec_is_reported_and_other_registrations_keep_working() {
    let (bed, _c) = bed_and_controller(&[]).await;
    ready_pod(&bed, "user-1", &[("app", "user")], "10.0.0.1").await;
    create_sreg(&bed, "bad-selector", json!({"selector": {"matchExpressions": [{"key": "app", "operator": "Near", "values": ["x"]}]}})).await;
    create_sreg(&bed, "bad-port", json!({"selector": {"matchLabels": {"app": "user"}}, "port": "metrics"})).await;
    create_sreg(&bed, "good", json!({"selector": {"matchLabels": {"app": "user"}}})).await;

    let st = wait_status(&bed, "bad-selector", "InvalidSpec", |s| s.conditions.iter().any(|c| c.type_ == "InvalidSpec" && c.status == "True")).await;
    assert!(condition(&st, "InvalidSpec").message.contains("operator \"Near\""), "{st:?}");
    let st = wait_status(&bed, "bad-port", "InvalidSpec", |s| s.conditions.iter().any(|c| c.type_ == "InvalidSpec" && c.status == "True")).await;
    assert_eq!(condition(&st, "InvalidSpec").message, "port \"metrics\" is not declared by pod user-1");
    wait_event(&bed, "bad-port", "InvalidSpec").await;

    wait_key(&bed.etcd, "/services/good/default/user-1").await;
    assert!(keys(&bed.etcd, "/services/bad-port/").await.is_empty());
    let st = wait_status(&bed, "good", "registered", |s| s.registered == 1).await;
    assert_eq!(condition(&st, "InvalidSpec").status, "False");
}

/// At the defaults (leader election, a 15 s Lease: up to 19 s to fail over), a TTL of 10 s
/// would let keys expire during a failover: a Warning condition and Event say so, and the
/// keys are published all the same. The default TTL (30 s) gets no warning.
#[tokio::test]
async fn a_ttl_shorter_than_a_failover_is_warned_about() {
    let (bed, c) = bed_and_controller(&[]).await;
    ready_pod(&bed, "user-1", &[("app", "user")], "10.0.0.1").await;
    create_sreg(&bed, "short", json!({"selector": {"matchLabels": {"app": "user"}}, "ttlSeconds": 10})).await;
    create_sreg(&bed, "default-ttl", json!({"selector": {"matchLabels": {"app": "user"}}})).await;

    let st = wait_status(&bed, "short", "ShortTTL", |s| s.registered == 1 && s.conditions.iter().any(|c| c.type_ == "ShortTTL" && c.status == "True")).await;
    let short = condition(&st, "ShortTTL");
    assert_eq!(short.reason, "TTLBelowFailover");
    assert!(short.message.contains("a standby may take 19 s") && short.message.contains("Use at least 29 s"), "{short:?}");
    let event = wait_event(&bed, "short", "ShortTTL").await;
    assert_eq!(event.type_.as_deref(), Some("Warning"));
    assert_eq!(event.note.as_deref(), Some(short.message.as_str()));
    let kv = wait_key(&bed.etcd, "/services/short/default/user-1").await;
    assert_eq!(granted_ttl(&bed.etcd, kv.lease()).await, 10, "published all the same");

    let st = wait_status(&bed, "default-ttl", "registered", |s| s.registered == 1).await;
    assert_eq!(condition(&st, "ShortTTL").status, "False");
    assert!(events_for(&bed, "default-ttl").await.iter().all(|e| e.reason.as_deref() != Some("ShortTTL")));
    assert!(!c.log_text().contains("--default-ttl:"), "the default TTL outlives the default failover");
}

#[tokio::test]
async fn annotated_pods_are_published_and_bad_annotations_become_events() {
    let (bed, _c) = bed_and_controller(&["--default-ttl", "15"]).await;
    let spec = PodSpec::new("cart-1").annotation("podlease.io/service", "cart").annotation("podlease.io/format", "go-zero");
    create_pod(&bed.kube, NS, &spec).await;
    set_ready(&bed.kube, NS, "cart-1", "10.0.0.9", true).await;
    let got = wait_until("go-zero key", DEADLINE, || async {
        keys(&bed.etcd, "cart/").await.into_iter().next()
    })
    .await;
    assert_eq!(got.key_str().unwrap(), format!("cart/{}", got.lease()), "go-zero keys end in the lease id");
    assert_eq!(got.value_str().unwrap(), "10.0.0.9:8080");
    assert_eq!(granted_ttl(&bed.etcd, got.lease()).await, 15);

    let bad = PodSpec::new("cart-2").annotation("podlease.io/service", "cart").annotation("podlease.io/ttl", "forever");
    create_pod(&bed.kube, NS, &bad).await;
    set_ready(&bed.kube, NS, "cart-2", "10.0.0.10", true).await;
    let ev = wait_event(&bed, "cart-2", "InvalidAnnotation").await;
    assert!(ev.note.unwrap_or_default().contains("podlease.io/ttl"));
    assert_eq!(keys(&bed.etcd, "cart/").await.len(), 1, "the bad pod is not published, the good one stays");

    patch_annotations(&bed.kube, NS, "cart-1", json!({"podlease.io/service": null})).await;
    wait_until("annotation removed → revoked", DEADLINE, || async { keys(&bed.etcd, "cart/").await.is_empty().then_some(()) }).await;
}

#[tokio::test]
async fn two_hundred_pods_are_all_registered_with_right_counts() {
    let (bed, _c) = bed_and_controller(&[]).await;
    create_sreg(&bed, "bulk", json!({"selector": {"matchLabels": {"app": "bulk"}}})).await;
    let n = 200;
    let kube = bed.kube.clone();
    futures::future::join_all((0..n).map(|i| {
        let kube = kube.clone();
        async move {
            create_pod(&kube, NS, &PodSpec::new(&format!("bulk-{i}")).label("app", "bulk")).await;
            set_ready(&kube, NS, &format!("bulk-{i}"), &pod_ip(i + 1), true).await;
        }
    }))
    .await;
    // Ten more that match but are not ready.
    for i in 0..10 {
        create_pod(&bed.kube, NS, &PodSpec::new(&format!("idle-{i}")).label("app", "bulk")).await;
    }
    let st = wait_status(&bed, "bulk", "200 registered", |s| s.registered == 200 && s.matching_pods == 210).await;
    assert_eq!(st.ready_pods, 200);
    assert_eq!(st.instances.len(), 100, "the instance list is bounded");
    assert_eq!(keys(&bed.etcd, "/services/bulk/").await.len(), 200);
    let leases: std::collections::HashSet<i64> = keys(&bed.etcd, "/services/bulk/").await.iter().map(|kv| kv.lease()).collect();
    assert_eq!(leases.len(), 200, "one lease per pod");
}

#[tokio::test]
async fn a_lease_revoked_behind_our_back_is_granted_again_and_rewritten() {
    let (bed, c) = bed_and_controller(&[]).await;
    create_sreg(&bed, "user", json!({"selector": {"matchLabels": {"app": "user"}}, "ttlSeconds": 6})).await;
    ready_pod(&bed, "user-1", &[("app", "user")], "10.0.0.1").await;
    let key = "/services/user/default/user-1";
    let before = wait_key(&bed.etcd, key).await;

    let mut lc = bed.etcd.lease_client();
    lc.revoke(before.lease()).await.unwrap();
    // The next renewal (TTL/3 = 2 s) hears TTL 0; the key comes back under a new lease.
    let after = wait_until("key back under a new lease", DEADLINE, || async {
        let kv = keys(&bed.etcd, key).await.into_iter().next()?;
        (kv.lease() != before.lease()).then_some(kv)
    })
    .await;
    assert_eq!(after.value(), before.value());
    assert_eq!(granted_ttl(&bed.etcd, after.lease()).await, 6);
    let m = c.metrics().await;
    assert!(m.contains("podlease_leases_lost_total 1"), "{m}");
    assert!(m.contains("podlease_leases_regranted_total 1"), "{m}");
}

/// etcd's own count of LeaseKeepAlive streams opened by clients.
async fn keepalive_streams(bed: &TestBed) -> u64 {
    let (_, body) = support::controller::http_get(&format!("{}/metrics", bed.etcd_endpoint())).await.expect("etcd metrics");
    body.lines()
        .filter(|l| l.starts_with("grpc_server_started_total") && l.contains("grpc_method=\"LeaseKeepAlive\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

use support::controller::metric;

#[tokio::test]
async fn every_lease_is_renewed_over_one_keepalive_stream() {
    let (bed, c) = bed_and_controller(&[]).await;
    create_sreg(&bed, "many", json!({"selector": {"matchLabels": {"app": "many"}}, "ttlSeconds": 5})).await;
    let n = 30;
    for i in 0..n {
        ready_pod(&bed, &format!("many-{i}"), &[("app", "many")], &pod_ip(i + 1)).await;
    }
    wait_status(&bed, "many", "all registered", |s| s.registered == n as u32).await;
    // Every lease renewed after two TTLs from here (etcd's remaining TTLs say so).
    support::etcd::wait_renewed_after(&bed.etcd, "/services/many/", Instant::now() + Duration::from_secs(10), Duration::from_secs(20)).await;
    assert_eq!(keepalive_streams(&bed).await, 1, "one LeaseKeepAlive stream for all {n} leases");
    assert_eq!(metric(&c.metrics().await, "podlease_leases_held"), n as f64 + 2.0, "one per pod, plus the leader fence's and the claims lease");
    assert_eq!(keys(&bed.etcd, "/services/many/").await.len(), n, "no key expired");
}

#[tokio::test]
async fn podlease_get_lists_then_follows_a_service() {
    let (bed, _c) = bed_and_controller(&[]).await;
    create_sreg(&bed, "user", json!({"selector": {"matchLabels": {"app": "user"}}, "format": "etcd-naming"})).await;
    ready_pod(&bed, "user-1", &[("app", "user")], "10.0.0.1").await;
    wait_key(&bed.etcd, "user/10.0.0.1:8080").await;

    let out = std::process::Command::new(support::controller::binary())
        .args(["get", "--service", "user", "--format", "etcd-naming", "--etcd-endpoints", &bed.etcd_endpoint()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8(out.stdout).unwrap(), "user/10.0.0.1:8080 {\"Op\":0,\"Addr\":\"10.0.0.1:8080\",\"Metadata\":null}\n");

    // --watch: the listing, then the changes as they happen.
    let log = bed.dir.path().join("get-watch.out");
    let mut cmd = std::process::Command::new(support::controller::binary());
    cmd.args(["get", "--service", "user", "--format", "etcd-naming", "--watch", "--etcd-endpoints", &bed.etcd_endpoint()]);
    let mut child = spawn_owned(&mut cmd, &log);
    wait_until("listing printed", DEADLINE, || async { std::fs::read_to_string(&log).ok()?.contains("user/10.0.0.1:8080").then_some(()) }).await;
    set_ready(&bed.kube, NS, "user-1", "10.0.0.1", false).await;
    wait_until("DELETE printed", DEADLINE, || async {
        std::fs::read_to_string(&log).ok()?.contains("DELETE user/10.0.0.1:8080").then_some(())
    })
    .await;
    let _ = child.kill();
    let _ = child.wait();

    // skydns with its own zone: --zone names it, as the registration does.
    create_sreg(&bed, "dns", json!({"selector": {"matchLabels": {"app": "user"}}, "service": "user", "format": "skydns", "options": {"zone": "example.org"}})).await;
    set_ready(&bed.kube, NS, "user-1", "10.0.0.1", true).await;
    wait_key(&bed.etcd, "/skydns/org/example/default/user/user-1").await;
    let get = |extra: &[&str]| {
        let mut args = vec!["get", "--service", "user", "--format", "skydns", "--etcd-endpoints"];
        let endpoint = bed.etcd_endpoint();
        args.push(&endpoint);
        args.extend_from_slice(extra);
        std::process::Command::new(support::controller::binary()).args(&args).output().unwrap()
    };
    let out = get(&["--zone", "example.org"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8(out.stdout).unwrap().starts_with("/skydns/org/example/default/user/user-1 {\"host\":\"10.0.0.1\""));
    // Without it, the default zone: nothing there.
    let out = get(&[]);
    assert!(out.status.success() && out.stdout.is_empty(), "{}", String::from_utf8_lossy(&out.stdout));
    let out = get(&["--zone", "bad..zone"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--zone \"bad..zone\""), "{}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test]
async fn only_watched_namespaces_are_published() {
    let bed = TestBed::start().await;
    bed.apply_crd().await;
    ensure_namespace(&bed.kube, "team-a").await;
    ensure_namespace(&bed.kube, "team-b").await;
    let _c = Controller::start(&bed, "c1", &["--watch-namespace", "team-a"]).await;
    for ns in ["team-b", "team-a"] {
        create_pod(&bed.kube, ns, &PodSpec::new("p").annotation("podlease.io/service", "svc")).await;
        set_ready(&bed.kube, ns, "p", "10.0.0.1", true).await;
    }
    wait_key(&bed.etcd, "/services/svc/team-a/p").await;
    assert!(keys(&bed.etcd, "/services/svc/team-b/").await.is_empty());
}

#[tokio::test]
async fn endpoints_of_two_different_etcd_clusters_are_refused_at_start() {
    let bed = TestBed::start().await;
    bed.apply_crd().await;
    let other = EtcdServer::start(bed.dir.path(), "other");
    let endpoints = format!("{},{}", bed.etcd_endpoint(), other.endpoint());
    let mut c = Controller::new(&bed, "c1", bed.kubeconfig.clone(), &["--etcd-endpoints", &endpoints]);
    c.spawn();
    let status = c.wait_exit().await;
    assert!(!status.success());
    assert!(c.log_text().contains("belong to different clusters"), "{}", c.log_text());
}

/// A pod turning Ready takes a lease granted ahead of time: its key is written by one Txn,
/// under a lease that already existed before the pod was ready. With the pool off, the
/// lease is granted on the way, as before.
#[tokio::test]
async fn a_pod_turning_ready_takes_a_lease_granted_ahead_unless_the_pool_is_off() {
    for pool in ["16", "0"] {
        let (bed, c) = bed_and_controller(&["--lease-pool-size", pool]).await;
        let on = pool != "0";
        create_sreg(&bed, "user", json!({"selector": {"matchLabels": {"app": "user"}}})).await;
        if on {
            // The default TTL (30 s) is pooled from the start.
            wait_until("the pool filled", DEADLINE, || async { (c.metric("podlease_lease_pool_free").await >= 16.0).then_some(()) }).await;
        }
        let mut lc = bed.etcd.lease_client();
        let before: std::collections::BTreeSet<i64> = lc.leases().await.unwrap().leases().iter().map(|l| l.id()).collect();
        for i in 0..3 {
            ready_pod(&bed, &format!("user-{i}"), &[("app", "user")], &pod_ip(i)).await;
            let kv = wait_key(&bed.etcd, &format!("/services/user/default/user-{i}")).await;
            assert_eq!(before.contains(&kv.lease()), on, "pool {pool}: lease {:x} granted before the pod was ready", kv.lease());
            assert_eq!(granted_ttl(&bed.etcd, kv.lease()).await, 30);
        }
        let (taken, missed) = (c.metric("podlease_lease_pool_taken_total").await, c.metric("podlease_lease_pool_missed_total").await);
        assert_eq!((taken, missed), if on { (3.0, 0.0) } else { (0.0, 0.0) }, "pool {pool}: taken, missed");
        // A pooled lease is renewed like any other: the key outlives its TTL.
        if on {
            let lease = wait_key(&bed.etcd, "/services/user/default/user-0").await.lease();
            wait_until("a renewal of the pooled lease", Duration::from_secs(20), || async {
                let ttl = bed.etcd.lease_client().time_to_live(lease, None).await.ok()?.ttl();
                (ttl >= 29).then_some(())
            })
            .await;
        }
    }
}

/// The compatibility subset on the oldest supported Kubernetes (1.34): the same tests, each in a process of its own
/// (README, "Supported versions").
mod on_kubernetes_1_34 {
    use super::support::{run_on, Release};

    #[test]
    fn a_ready_pod_is_published_under_its_own_lease_and_revoked_when_not_ready() {
        run_on(Release::OldestKubernetes);
        super::a_ready_pod_is_published_under_its_own_lease_and_revoked_when_not_ready();
    }

    #[test]
    fn a_terminating_pod_is_revoked_before_it_is_gone() {
        run_on(Release::OldestKubernetes);
        super::a_terminating_pod_is_revoked_before_it_is_gone();
    }

    #[test]
    fn annotated_pods_are_published_and_bad_annotations_become_events() {
        run_on(Release::OldestKubernetes);
        super::annotated_pods_are_published_and_bad_annotations_become_events();
    }
}
