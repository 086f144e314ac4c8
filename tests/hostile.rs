//! Hostile input on the real test bed: what a namespace user writes in pod annotations or a
//! ServiceRegistration spec never places a key outside the allowed prefixes, nor a
//! malformed key, anywhere in etcd. Each refusal is visible to that user (an
//! InvalidAnnotation Event on the pod, an InvalidSpec condition on the registration), and
//! the well-formed pods beside it are registered.

mod support;

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams, PostParams};
use podlease::registration::{ServiceRegistration, ServiceRegistrationStatus};
use serde_json::json;
use support::etcd::{Recorder, keys, wait_key};
use support::*;

const NS: &str = "mallory";

async fn bed_and_controller(extra: &[&str]) -> (TestBed, Controller) {
    let bed = TestBed::start().await;
    bed.apply_crd().await;
    ensure_namespace(&bed.kube, NS).await;
    let c = Controller::start(&bed, "c1", extra).await;
    (bed, c)
}

async fn ready_annotated(bed: &TestBed, name: &str, annotations: &[(&str, &str)], ip: &str) {
    let mut spec = PodSpec::new(name).label("app", "web");
    for (k, v) in annotations {
        spec = spec.annotation(k, v);
    }
    create_pod(&bed.kube, NS, &spec).await;
    set_ready(&bed.kube, NS, name, ip, true).await;
}

async fn wait_event(bed: &TestBed, name: &str, reason: &str) -> String {
    let api: Api<Event> = Api::namespaced(bed.kube.clone(), NS);
    wait_until(&format!("{reason} event on {name}"), DEADLINE, || {
        let api = api.clone();
        async move {
            api.list(&ListParams::default())
                .await
                .ok()?
                .items
                .into_iter()
                .find(|e| e.reason.as_deref() == Some(reason) && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
                .map(|e| e.note.unwrap_or_default())
        }
    })
    .await
}

async fn create_sreg(bed: &TestBed, name: &str, spec: serde_json::Value) -> Result<ServiceRegistration, kube::Error> {
    let api: Api<ServiceRegistration> = Api::namespaced(bed.kube.clone(), NS);
    let obj: ServiceRegistration = serde_json::from_value(json!({
        "apiVersion": "podlease.io/v1alpha1", "kind": "ServiceRegistration", "metadata": {"name": name}, "spec": spec,
    }))
    .unwrap();
    api.create(&PostParams::default(), &obj).await
}

/// The registration's InvalidSpec condition message, once it is True.
async fn invalid_spec(bed: &TestBed, name: &str) -> String {
    let api: Api<ServiceRegistration> = Api::namespaced(bed.kube.clone(), NS);
    let st: ServiceRegistrationStatus = wait_until(&format!("InvalidSpec on {name}"), DEADLINE, || {
        let api = api.clone();
        async move {
            let st = api.get(name).await.ok()?.status?;
            st.conditions.iter().any(|c| c.type_ == "InvalidSpec" && c.status == "True").then_some(st)
        }
    })
    .await;
    st.conditions.iter().find(|c| c.type_ == "InvalidSpec").unwrap().message.clone()
}

/// Every key etcd holds: only these may be there (besides podlease's owner prefix).
async fn all_keys(bed: &TestBed) -> BTreeSet<String> {
    keys(&bed.etcd, "").await.iter().map(|kv| kv.key_str().unwrap().to_string()).filter(|k| !k.starts_with("/podlease/owners/") && k != "/podlease/owners").collect()
}

#[tokio::test]
async fn the_reported_inputs_are_refused_with_a_reason_and_write_nothing() {
    let (bed, _c) = bed_and_controller(&[]).await;
    let recorder = Recorder::start(&bed.etcd, "").await;

    // The five inputs of the report (the fifth: nobody was told; now everyone is), and a
    // metadata annotation far past its limit.
    let huge = format!("{{\"k\":\"{}\"}}", "x".repeat(200 * 1024));
    let bad = [
        ("a", vec![("podlease.io/service", "../../etc/passwd")], "a service name may not have \".\" or \"..\" segments"),
        ("b", vec![("podlease.io/service", "a b\nc")], "a service name may not contain whitespace or control characters"),
        ("c", vec![("podlease.io/service", "evil/../../podlease/owners")], "\"..\" segments"),
        ("d", vec![("podlease.io/service", "x"), ("podlease.io/prefix", "/config/payments")], "prefix \"/config/payments\" is not allowed for format json"),
        ("e", vec![("podlease.io/service", "big"), ("podlease.io/metadata", huge.as_str())], "annotation podlease.io/metadata is longer than 16384 bytes"),
    ];
    for (i, (name, annotations, _)) in bad.iter().enumerate() {
        ready_annotated(&bed, name, annotations, &pod_ip(i + 1)).await;
    }
    // The same attacks through ServiceRegistrations the schema cannot catch (a well-formed
    // prefix outside the allowlist; an etcd-naming path into kitex's prefix).
    create_sreg(&bed, "payments", json!({"selector": {"matchLabels": {"app": "web"}}, "prefix": "/config/payments"})).await.unwrap();
    create_sreg(&bed, "victim", json!({"selector": {"matchLabels": {"app": "web"}}, "format": "etcd-naming", "service": "kitex/registry-etcd/victim"}))
        .await
        .unwrap();
    // A well-formed pod beside them, annotated and selected.
    ready_annotated(&bed, "good", &[("podlease.io/service", "cart")], "10.9.9.9").await;
    create_sreg(&bed, "web", json!({"selector": {"matchLabels": {"app": "web"}}})).await.unwrap();

    for (name, _, why) in &bad {
        let note = wait_event(&bed, name, "InvalidAnnotation").await;
        assert!(note.contains(why), "{name}: {note}");
        assert!(note.len() < 1024, "{name}: the note is bounded");
    }
    let msg = invalid_spec(&bed, "payments").await;
    assert!(msg.contains("spec.prefix \"/config/payments\": prefix \"/config/payments\" is not allowed for format json"), "{msg}");
    let msg = invalid_spec(&bed, "victim").await;
    assert!(msg.contains("lies inside \"kitex/registry-etcd\", another allowed prefix"), "{msg}");
    wait_event(&bed, "payments", "InvalidSpec").await;

    // The good pod is registered, annotated and through the well-formed registration; every
    // pod of app=web is too (the registration is fine, only the annotations were not).
    wait_key(&bed.etcd, "/services/cart/mallory/good").await;
    let expected: BTreeSet<String> = std::iter::once("/services/cart/mallory/good".to_string())
        .chain(["a", "b", "c", "d", "e", "good"].iter().map(|p| format!("/services/web/mallory/{p}")))
        .collect();
    wait_until("the web registration's keys", DEADLINE, || async { (all_keys(&bed).await == expected).then_some(()) }).await;
    // Nothing else was ever written, anywhere (a recorder saw every PUT since the start).
    let written: BTreeSet<String> = recorder.all().into_iter().filter(|e| e.put).map(|e| e.key).filter(|k| !k.starts_with("/podlease/owners")).collect();
    assert_eq!(written, expected);
    assert!(keys(&bed.etcd, "/config/").await.is_empty());

    // The API server itself refuses an annotation of 256 KiB (its total limit), before
    // podlease could ever see it.
    let pods: Api<Pod> = Api::namespaced(bed.kube.clone(), NS);
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "f", "annotations": {"podlease.io/service": "s", "podlease.io/metadata": "x".repeat(256 * 1024)}},
        "spec": {"containers": [{"name": "app", "image": "example.invalid/app:1"}]},
    }))
    .unwrap();
    let err = pods.create(&PostParams::default(), &pod).await.expect_err("the API server refuses 256 KiB of annotations");
    assert!(err.to_string().contains("Too long"), "{err}");
}

#[tokio::test]
async fn a_prefix_in_the_allowlist_is_accepted_and_one_outside_refused() {
    let (bed, _c) = bed_and_controller(&["--allowed-prefix", "json=/services,/team-a"]).await;
    ready_annotated(&bed, "inside", &[("podlease.io/service", "svc"), ("podlease.io/prefix", "/team-a/")], "10.0.0.1").await;
    ready_annotated(&bed, "outside", &[("podlease.io/service", "svc"), ("podlease.io/prefix", "/team-b")], "10.0.0.2").await;
    ready_annotated(&bed, "owner", &[("podlease.io/service", "svc"), ("podlease.io/prefix", "/podlease/owners")], "10.0.0.3").await;
    create_sreg(&bed, "in", json!({"selector": {"matchLabels": {"app": "web"}}, "prefix": "/team-a", "format": "kitex"})).await.unwrap();
    create_sreg(&bed, "out", json!({"selector": {"matchLabels": {"app": "web"}}, "prefix": "/team-b"})).await.unwrap();
    // The list replaced the default: etcd-naming's own (empty) prefix is no longer allowed.
    create_sreg(&bed, "naming", json!({"selector": {"matchLabels": {"app": "web"}}, "format": "etcd-naming"})).await.unwrap();

    wait_key(&bed.etcd, "/team-a/svc/mallory/inside").await;
    wait_key(&bed.etcd, "/team-a/in/10.0.0.1:8080").await;
    let note = wait_event(&bed, "outside", "InvalidAnnotation").await;
    assert!(note.contains("prefix \"/team-b\" is not allowed for format json; the cluster admin allows \"/services\", \"/team-a\""), "{note}");
    let note = wait_event(&bed, "owner", "InvalidAnnotation").await;
    assert!(note.contains("owner prefix"), "{note}");
    let msg = invalid_spec(&bed, "out").await;
    assert!(msg.contains("spec.prefix \"/team-b\""), "{msg}");
    let msg = invalid_spec(&bed, "naming").await;
    assert!(msg.contains("the default prefix of format etcd-naming: prefix \"\" is not allowed"), "{msg}");
    assert!(keys(&bed.etcd, "/team-b").await.is_empty());
    assert!(keys(&bed.etcd, "naming/").await.is_empty());
}

#[tokio::test]
async fn the_crd_schema_rejects_an_invalid_spec_at_create_time() {
    let bed = TestBed::start().await;
    bed.apply_crd().await;
    ensure_namespace(&bed.kube, NS).await;
    let many: serde_json::Map<String, serde_json::Value> = (0..65).map(|i| (format!("k{i}"), json!("v"))).collect();
    for (name, spec, field) in [
        ("a", json!({"service": "../../etc/passwd"}), "spec.service"),
        ("b", json!({"service": "a b\nc"}), "spec.service"),
        ("c", json!({"service": "evil/../../podlease/owners"}), "spec.service"),
        ("d", json!({"prefix": "/config/../payments"}), "spec.prefix"),
        ("e", json!({"prefix": "/a b"}), "spec.prefix"),
        ("f", json!({"metadata": many}), "spec.metadata"),
        ("g", json!({"metadata": {"k": "v".repeat(4097)}}), "spec.metadata.k"),
        ("h", json!({"metadataFromLabels": ["a b"]}), "spec.metadataFromLabels"),
        ("i", json!({"options": {"version": "1\n2"}}), "spec.options.version"),
        ("j", json!({"options": {"protocol": "grpc://x"}}), "spec.options.protocol"),
        ("k", json!({"options": {"zone": "../corp"}}), "spec.options.zone"),
    ] {
        let mut spec = spec;
        spec["selector"] = json!({"matchLabels": {"app": "web"}});
        let err = create_sreg(&bed, name, spec).await.expect_err(&format!("{name} must be refused"));
        assert!(err.to_string().contains(field), "{name}: {err}");
    }
    create_sreg(&bed, "ok", json!({"selector": {"matchLabels": {"app": "web"}}, "service": "svc/user", "format": "etcd-naming", "prefix": "/services/"}))
        .await
        .expect("a well-formed spec is stored");
}
