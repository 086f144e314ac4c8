//! What an operator meets running podlease at its defaults: TTLs that do not outlive a
//! leader failover are pointed out wherever they come from (a pod's `podlease.io/ttl`,
//! `--default-ttl`) while the pods stay registered; a registration's format change makes
//! each new key before it breaks the old one, in etcd's own history; `podlease get` refuses
//! endpoints of two etcd clusters as `run` does.

mod support;

use std::collections::BTreeMap;
use std::process::Output;

use kube::api::{Api, Patch, PatchParams};
use podlease::registration::ServiceRegistration;
use serde_json::json;
use support::etcd::{auth_etcd, first_event, granted_ttl, history, keys, revision, wait_absent, wait_key, AUTH_USER_PASSWORD};
use support::*;

const NS: &str = "default";

async fn ready_annotated(bed: &TestBed, name: &str, annotations: &[(&str, &str)], ip: &str) {
    let mut spec = PodSpec::new(name);
    for (k, v) in annotations {
        spec = spec.annotation(k, v);
    }
    create_pod(&bed.kube, NS, &spec).await;
    set_ready(&bed.kube, NS, name, ip, true).await;
}

fn reasons(events: &[k8s_openapi::api::events::v1::Event]) -> Vec<String> {
    events.iter().filter_map(|e| e.reason.clone()).collect()
}

/// The annotated pod's counterpart of a registration's ShortTTL: a Warning Event on the pod,
/// the pod registered all the same, under its own TTL.
#[tokio::test]
async fn an_annotated_ttl_below_the_failover_is_warned_about_on_the_pod_and_still_registered() {
    let (bed, c) = bed_and_controller(&[]).await;
    // A TTL that outlives the failover first: had it been warned about, its Event would be
    // published before the short one's (one queue, in order).
    ready_annotated(&bed, "long", &[("podlease.io/service", "cart"), ("podlease.io/ttl", "30")], "10.0.0.1").await;
    wait_key(&bed.etcd, "/services/cart/default/long").await;
    ready_annotated(&bed, "short", &[("podlease.io/service", "cart"), ("podlease.io/ttl", "10")], "10.0.0.2").await;

    let kv = wait_key(&bed.etcd, "/services/cart/default/short").await;
    assert_eq!(granted_ttl(&bed.etcd, kv.lease()).await, 10, "registered under the TTL it asked for");
    let ev = wait_event_about(&bed.kube, NS, "short", "ShortTTL").await;
    let note = ev.note.clone().unwrap_or_default();
    assert_eq!(ev.type_.as_deref(), Some("Warning"), "{ev:?}");
    assert_eq!(ev.regarding.as_ref().and_then(|r| r.kind.as_deref()), Some("Pod"));
    assert!(note.starts_with("annotation podlease.io/ttl=\"10\": a TTL of 10 s is shorter than a leader failover"), "{note}");
    assert!(note.contains("a standby may take 19 s to take over") && note.ends_with("Use at least 29 s"), "{note}");

    // Only the short one, and nothing called invalid: the registration works.
    assert_eq!(reasons(&events_about(&bed.kube, NS, "short").await), ["ShortTTL"]);
    assert!(events_about(&bed.kube, NS, "long").await.is_empty(), "{:?}", events_about(&bed.kube, NS, "long").await);
    assert_eq!(c.metric("podlease_invalid_annotations_total").await, 0.0);
    assert!(c.log_text().contains("annotation podlease.io/ttl=\"10\": a TTL of 10 s"), "the warning is logged too");
}

/// `--default-ttl` below the failover: said once at start, and annotated pods, which take
/// it, are still registered (under it).
#[tokio::test]
async fn a_default_ttl_below_the_failover_is_warned_about_at_start_and_pods_still_register() {
    let (bed, c) = bed_and_controller(&["--default-ttl", "10"]).await;
    let log = c.log_text();
    let warning = "--default-ttl: a TTL of 10 s is shorter than a leader failover: a lease has two thirds of its TTL left (6.7 s) when the leader dies, and a standby may take 19 s to take over; keys would expire meanwhile. Use at least 29 s";
    assert_eq!(log.matches(warning).count(), 1, "the warning, once, before the controller was ready; log:\n{log}");
    let at = log.lines().find(|l| l.contains(warning)).unwrap();
    assert!(at.contains("WARN"), "{at}");

    for i in 1..=5 {
        ready_annotated(&bed, &format!("web-{i}"), &[("podlease.io/service", "web")], &pod_ip(i)).await;
    }
    for i in 1..=5 {
        let kv = wait_key(&bed.etcd, &format!("/services/web/default/web-{i}")).await;
        assert_eq!(granted_ttl(&bed.etcd, kv.lease()).await, 10, "web-{i} registered under --default-ttl");
    }
    // The default TTL is the admin's, said at start: no Event on every pod that uses it.
    for i in 1..=5 {
        assert!(events_about(&bed.kube, NS, &format!("web-{i}")).await.is_empty());
    }

    // At the defaults (30 s) a replica says nothing of the kind.
    let standby = Controller::start(&bed, "c2", &[]).await;
    assert!(!standby.log_text().contains("--default-ttl:"), "{}", standby.log_text());
}

/// Make-before-break across keys: when the key of every pod changes (a new format), each
/// pod's new key is written before its old one is deleted, so consumers never see the pod
/// gone. Read from etcd's history, which orders every write.
#[tokio::test]
async fn a_format_change_writes_every_new_key_before_it_deletes_the_old_one() {
    let (bed, _c) = bed_and_controller(&[]).await;
    create_registration(&bed.kube, NS, "user", json!({"selector": {"matchLabels": {"app": "user"}}})).await;
    let pods: BTreeMap<String, String> = (1..=6).map(|i| (format!("user-{i}"), pod_ip(i))).collect();
    for (pod, ip) in &pods {
        create_pod(&bed.kube, NS, &PodSpec::new(pod).label("app", "user")).await;
        set_ready(&bed.kube, NS, pod, ip, true).await;
    }
    for pod in pods.keys() {
        wait_key(&bed.etcd, &format!("/services/user/default/{pod}")).await;
    }

    let from = revision(&bed.etcd).await + 1;
    let api: Api<ServiceRegistration> = Api::namespaced(bed.kube.clone(), NS);
    api.patch("user", &PatchParams::default(), &Patch::Merge(&json!({"spec": {"format": "etcd-naming"}}))).await.expect("change the format");
    for (pod, ip) in &pods {
        wait_key(&bed.etcd, &format!("user/{ip}:8080")).await;
        wait_absent(&bed.etcd, &format!("/services/user/default/{pod}"), DEADLINE).await;
    }

    let events = history(&bed.etcd, "", from).await;
    for (pod, ip) in &pods {
        let (old, new) = (format!("/services/user/default/{pod}"), format!("user/{ip}:8080"));
        let put = first_event(&events, &new, true).unwrap_or_else(|| panic!("no PUT of {new} in {events:?}"));
        let delete = first_event(&events, &old, false).unwrap_or_else(|| panic!("no DELETE of {old} in {events:?}"));
        assert!(put.revision < delete.revision, "{pod}: {new} written at revision {}, {old} deleted at {}: break before make", put.revision, delete.revision);
        assert!(first_event(&events, &new, false).is_none(), "{new} was deleted");
        assert_eq!(events.iter().filter(|e| e.key == old).count(), 1, "{old}: only its DELETE");
    }
    assert_eq!(keys(&bed.etcd, "/services/").await.len(), 0);
}

fn get(args: &[&str]) -> Output {
    let out = std::process::Command::new(support::controller::binary()).arg("get").args(["--service", "user"]).args(args).output().expect("run podlease get");
    println!("podlease get {args:?}: {}\nstdout: {}\nstderr: {}", out.status, String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    out
}

fn refused_as_two_clusters(out: &Output, endpoints: &[String]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(out.stdout.is_empty(), "nothing may be listed: {}", String::from_utf8_lossy(&out.stdout));
    assert!(stderr.contains("the etcd endpoints belong to different clusters") && stderr.contains("list the members of one cluster"), "{stderr}");
    for e in endpoints {
        assert!(stderr.contains(&format!("{e} is in cluster ")), "{e} is named: {stderr}");
    }
}

/// `podlease get` balances its reads over the endpoints like `run`, so a list mixing two
/// clusters would show a different service at each read: refused, clearly, with plain etcds
/// and with TLS + auth as a user that is not root (who may not ask a member for its status).
#[tokio::test]
async fn podlease_get_refuses_endpoints_of_two_different_etcd_clusters() {
    let dir = tempfile::Builder::new().prefix("podlease-operate-").tempdir().unwrap();
    let (a, b) = (EtcdServer::start(dir.path(), "one"), EtcdServer::start(dir.path(), "two"));
    support::etcd::etcdctl_ok(&a.endpoint(), None, &["put", "/services/user/default/p", "{}"]);
    let eps = [a.endpoint(), b.endpoint()];
    refused_as_two_clusters(&get(&["--etcd-endpoints", &eps.join(",")]), &eps);
    // Two members of one cluster are fine: the refusal is about clusters.
    let pair = EtcdServer::start_cluster(dir.path(), "pair", 2);
    let out = get(&["--etcd-endpoints", &pair.iter().map(|m| m.endpoint()).collect::<Vec<_>>().join(",")]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let certs = tls::make(&dir.path().join("pki"));
    let (a, b) = (auth_etcd(dir.path(), "secure-one", &certs).await, auth_etcd(dir.path(), "secure-two", &certs).await);
    let password = dir.path().join("etcd-password");
    std::fs::write(&password, format!("{AUTH_USER_PASSWORD}\n")).unwrap();
    let secure = |endpoints: &[String]| {
        let endpoints = endpoints.join(",");
        get(&[
            "--etcd-endpoints", &endpoints,
            "--etcd-ca", certs.ca.to_str().unwrap(),
            "--etcd-cert", certs.client_cert.to_str().unwrap(),
            "--etcd-key", certs.client_key.to_str().unwrap(),
            "--etcd-username", "podlease",
            "--etcd-password-file", password.to_str().unwrap(),
        ])
    };
    let eps = [a.endpoint(), b.endpoint()];
    refused_as_two_clusters(&secure(&eps), &eps);
    // The same credentials on one cluster's endpoint, listed twice, pass the check.
    let out = secure(&[a.endpoint(), a.endpoint()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
