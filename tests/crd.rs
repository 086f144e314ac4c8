//! The checked-in CRD is exactly what `podlease crd` prints, and the real API server
//! accepts it with its schema, defaults and printer columns.

mod support;

use kube::api::{Api, PostParams};
use podlease::registration::ServiceRegistration;
use serde_json::json;
use support::etcd::{keys, wait_key};
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

/// Annotation mode needs no CRD: podlease leads and publishes annotated pods, says once that
/// ServiceRegistrations are off, and picks them up once the CRD is applied.
#[tokio::test]
async fn without_the_crd_annotated_pods_are_published_and_registrations_follow_once_it_is_applied() {
    let bed = TestBed::start().await;
    // Ready (leading, caches synced) without the CRD: `start` waits for /readyz.
    let c = Controller::start(&bed, "nocrd", &[]).await;
    create_pod(&bed.kube, "default", &PodSpec::new("web-0").annotation("podlease.io/service", "web")).await;
    set_ready(&bed.kube, "default", "web-0", &pod_ip(1), true).await;
    wait_key(&bed.etcd, "/services/web/default/web-0").await;

    // The watch retries meanwhile; the warning is said once all the same.
    const ABSENT: &str = "the ServiceRegistration CRD is not installed";
    wait_until("the watch retried twice", DEADLINE, || async {
        (c.log_text().matches("the ServiceRegistration CRD is still not installed").count() >= 2).then_some(())
    })
    .await;
    assert_eq!(c.log_text().matches(ABSENT).count(), 1, "said once:\n{}", c.log_text());

    bed.apply_crd().await;
    let api: Api<ServiceRegistration> = Api::namespaced(bed.kube.clone(), "default");
    let sreg: ServiceRegistration = serde_json::from_value(json!({
        "apiVersion": "podlease.io/v1alpha1", "kind": "ServiceRegistration",
        "metadata": {"name": "api"}, "spec": {"selector": {"matchLabels": {"app": "api"}}},
    }))
    .unwrap();
    api.create(&PostParams::default(), &sreg).await.unwrap();
    create_pod(&bed.kube, "default", &PodSpec::new("api-0").label("app", "api")).await;
    set_ready(&bed.kube, "default", "api-0", &pod_ip(2), true).await;
    wait_key(&bed.etcd, "/services/api/default/api-0").await;
    wait_until("status written", DEADLINE, || async { (api.get("api").await.ok()?.status?.registered == 1).then_some(()) }).await;
    assert!(c.log_text().contains("the ServiceRegistration CRD is installed: watching ServiceRegistrations"), "{}", c.log_text());
    // The annotated pod's key stayed throughout.
    assert_eq!(keys(&bed.etcd, "/services/web/").await.len(), 1);
}

/// A CRD that is not this version's (Helm never upgrades a chart's CRDs) is named at start;
/// the current one is not.
#[tokio::test]
async fn a_stale_installed_crd_is_reported_at_start() {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::api::{Patch, PatchParams};
    let bed = TestBed::start().await;
    bed.apply_crd().await;
    let c = Controller::start(&bed, "current", &[]).await;
    wait_until("the CRD was checked", DEADLINE, || async { c.log_text().contains("the ServiceRegistration CRD is this version's").then_some(()) }).await;
    assert!(!c.log_text().contains("is not this version's"), "{}", c.log_text());
    drop(c);

    // An older schema: one printer column fewer.
    let crds: Api<CustomResourceDefinition> = Api::all(bed.kube.clone());
    let name = podlease::kubernetes::crd::name();
    let mut crd = crds.get(&name).await.unwrap();
    crd.spec.versions[0].additional_printer_columns.as_mut().unwrap().pop();
    crd.metadata.managed_fields = None;
    crds.patch(&name, &PatchParams::apply("old-chart").force(), &Patch::Apply(&crd)).await.unwrap();
    let c = Controller::start(&bed, "stale", &[]).await;
    wait_until("the stale CRD was reported", DEADLINE, || async {
        c.log_text().contains("the installed ServiceRegistration CRD is not this version's (version v1alpha1: printer columns differ)").then_some(())
    })
    .await;
}

/// The compatibility subset on the oldest supported Kubernetes (1.34): the same tests, each in a process of its own
/// (README, "Supported versions").
mod on_kubernetes_1_34 {
    use super::support::{run_on, Release};

    #[test]
    fn the_api_server_accepts_the_crd_defaults_and_validates() {
        run_on(Release::OldestKubernetes);
        super::the_api_server_accepts_the_crd_defaults_and_validates();
    }
}
