//! The checked-in CRD is exactly what `podlease crd` prints, and the real API server
//! accepts it with its schema, defaults and printer columns.

mod support;

use kube::api::{Api, PostParams};
use podlease::registration::ServiceRegistration;
use serde_json::json;
use support::*;

#[test]
fn checked_in_crd_matches_the_generated_one() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/crds/serviceregistrations.podlease.io.yaml");
    let on_disk = std::fs::read_to_string(path).expect("crds/serviceregistrations.podlease.io.yaml");
    let generated = podlease::registration::crd_yaml();
    assert!(
        on_disk == generated,
        "the CRD drifted from the Rust types: run `cargo run -- crd > crds/serviceregistrations.podlease.io.yaml`"
    );
}

#[test]
fn podlease_crd_prints_the_generated_yaml() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_podlease")).arg("crd").output().unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8(out.stdout).unwrap(), podlease::registration::crd_yaml());
}

#[tokio::test]
async fn the_api_server_accepts_the_crd_defaults_and_validates() {
    let bed = TestBed::start().await;
    bed.apply_crd().await;
    let api: Api<ServiceRegistration> = Api::namespaced(bed.kube.clone(), "default");

    let ok: ServiceRegistration = serde_json::from_value(json!({
        "apiVersion": "podlease.io/v1alpha1", "kind": "ServiceRegistration",
        "metadata": {"name": "user"},
        "spec": {"selector": {"matchLabels": {"app": "user"}}, "port": "grpc"},
    }))
    .unwrap();
    let created = api.create(&PostParams::default(), &ok).await.expect("valid object accepted");
    assert_eq!(created.spec.ttl_seconds, 30, "schema default applied");
    assert_eq!(created.spec.format, podlease::format::Format::Json);

    for (name, spec, expect) in [
        ("ttl-low", json!({"selector": {"matchLabels": {"a": "b"}}, "ttlSeconds": 1}), "ttlSeconds"),
        ("ttl-high", json!({"selector": {"matchLabels": {"a": "b"}}, "ttlSeconds": 4000}), "ttlSeconds"),
        ("bad-format", json!({"selector": {"matchLabels": {"a": "b"}}, "format": "zookeeper"}), "format"),
    ] {
        let obj = json!({"apiVersion": "podlease.io/v1alpha1", "kind": "ServiceRegistration", "metadata": {"name": name}, "spec": spec});
        let err = bed
            .kube
            .request::<serde_json::Value>(
                http::Request::post("/apis/podlease.io/v1alpha1/namespaces/default/serviceregistrations")
                    .header("content-type", "application/json")
                    .body(serde_json::to_vec(&obj).unwrap())
                    .unwrap(),
            )
            .await
            .expect_err(&format!("{name} must be rejected"));
        assert!(err.to_string().contains(expect), "{name}: {err}");
    }

    // kubectl's table view shows the printer columns.
    let table: serde_json::Value = bed
        .kube
        .request(
            http::Request::get("/apis/podlease.io/v1alpha1/namespaces/default/serviceregistrations")
                .header("accept", "application/json;as=Table;v=v1;g=meta.k8s.io")
                .body(Vec::new())
                .unwrap(),
        )
        .await
        .unwrap();
    let cols: Vec<&str> = table["columnDefinitions"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(cols, ["Name", "Service", "Format", "Ready", "Registered", "TTL", "Age"]);
}
