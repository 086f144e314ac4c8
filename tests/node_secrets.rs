//! The chart's etcd TLS and auth path on the real node: podlease reads its CA, client
//! certificate and password from Secrets kubelet mounts into its pods (as uid 65532, read-only
//! root), against a registry etcd that speaks only TLS and has auth on, and publishes.

mod support;

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Pod, Secret};
use kube::api::{Api, ListParams, PostParams};
use serde_json::json;
use support::etcd::{AUTH_USER_PASSWORD, wait_key_within};
use support::node::*;
use support::tls;

const NS: &str = "podlease-system";
const SELECTOR: &str = "app.kubernetes.io/name=podlease";

/// The registry's root, read from the host over TLS (as an operator with etcdctl would).
async fn root_client(endpoint: &str, certs: &tls::Certs, client_certificate: bool) -> etcd_client::Client {
    let mut tls_opts = etcd_client::TlsOptions::new().ca_certificate(etcd_client::Certificate::from_pem(std::fs::read(&certs.ca).unwrap()));
    if client_certificate {
        tls_opts = tls_opts.identity(etcd_client::Identity::from_pem(std::fs::read(&certs.client_cert).unwrap(), std::fs::read(&certs.client_key).unwrap()));
    }
    let opts = etcd_client::ConnectOptions::new().with_tls(tls_opts).with_user("root", "root-secret-pw");
    etcd_client::Client::connect([endpoint], Some(opts)).await.expect("root over TLS")
}

fn secret(name: &str, type_: &str, files: &[(&str, Vec<u8>)]) -> Secret {
    let data = files.iter().map(|(k, v)| (k.to_string(), k8s_openapi::ByteString(v.clone()))).collect();
    Secret {
        metadata: kube::api::ObjectMeta { name: Some(name.into()), namespace: Some(NS.into()), ..Default::default() },
        type_: Some(type_.into()),
        data: Some(data),
        ..Default::default()
    }
}

/// One running pod annotated for podlease at the defaults (own network namespace, a pod IP
/// from the bridge; no readiness probe: Ready once its container runs).
fn annotated_pod(name: &str, service: &str) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "annotations": {"podlease.io/service": service}},
        "spec": {
            "terminationGracePeriodSeconds": 5,
            "containers": [{
                "name": "main",
                "image": BUSYBOX_IMAGE,
                "imagePullPolicy": "Never",
                "command": ["/bin/sh", "-c", "trap 'exit 0' TERM; while true; do sleep 1; done"],
                "ports": [{"name": "http", "containerPort": 8080}],
            }],
        },
    }))
    .unwrap()
}

/// The chart installed with `etcd.tls.secretName` (with or without a client certificate in
/// it) and `etcd.auth.*` against `etcd`, which is what `client_certificate` says: both
/// podlease pods turn Ready (they read every mounted credential as uid 65532 and logged in),
/// an annotated pod's key appears in the registry, and no podlease log holds the password.
async fn publishes_with_tls_and_auth_from_secrets(tag: &str, client_certificate: bool) {
    let t0 = Instant::now();
    let work = tempfile::Builder::new().prefix("podlease-node-secrets-").tempdir().unwrap();
    let image = podlease_image(work.path(), std::path::Path::new(env!("CARGO_BIN_EXE_podlease")), tag);
    let certs = tls::make(&work.path().join("pki"));
    let registry = if client_certificate {
        support::etcd::auth_etcd(work.path(), "registry", &certs).await
    } else {
        support::etcd::auth_etcd_without_client_certs(work.path(), "registry", &certs).await
    };
    let etcd = root_client(&registry.endpoint(), &certs, client_certificate).await;
    // The registry really refuses what podlease must not get away with: no password, and
    // (with client certificates required) no certificate.
    let ca_only = etcd_client::ConnectOptions::new().with_tls(etcd_client::TlsOptions::new().ca_certificate(etcd_client::Certificate::from_pem(std::fs::read(&certs.ca).unwrap())));
    let anonymous = etcd_client::Client::connect([registry.endpoint()], Some(ca_only)).await;
    let refused = match anonymous {
        Err(e) => format!("{e}"),
        Ok(mut c) => match c.put("/services/anonymous", "x", None).await {
            Err(e) => format!("{e}"),
            Ok(_) => panic!("the registry took a write without credentials"),
        },
    };
    eprintln!("registry etcd (TLS, client certificates {}, auth on) refuses an anonymous write: {refused}", if client_certificate { "required" } else { "not asked for" });

    let mut cluster = MiniCluster::start().await;
    eprintln!("node Ready {:?} after start", cluster.started.node_ready);
    cluster.import_image(&image);
    let etcd_in_node = cluster.expose(format!("127.0.0.1:{}", registry.client_port).parse().unwrap());

    // The Secrets, as an operator (or cert-manager) makes them, in the release namespace.
    let namespaces: Api<Namespace> = Api::all(cluster.kube.clone());
    namespaces.create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": NS}})).unwrap()).await.expect("create namespace");
    let secrets: Api<Secret> = Api::namespaced(cluster.kube.clone(), NS);
    let read = |p: &std::path::PathBuf| std::fs::read(p).unwrap();
    let tls_secret = if client_certificate {
        secret("etcd-client", "kubernetes.io/tls", &[("ca.crt", read(&certs.ca)), ("tls.crt", read(&certs.client_cert)), ("tls.key", read(&certs.client_key))])
    } else {
        secret("etcd-client", "Opaque", &[("ca.crt", read(&certs.ca))])
    };
    secrets.create(&PostParams::default(), &tls_secret).await.expect("create the TLS Secret");
    secrets
        .create(&PostParams::default(), &secret("etcd-password", "Opaque", &[("password", format!("{AUTH_USER_PASSWORD}\n").into_bytes())]))
        .await
        .expect("create the password Secret");

    let mut values = podlease_values(tag, &[format!("https://{etcd_in_node}")]);
    values["etcd"]["tls"] = json!({"secretName": "etcd-client", "clientCertificate": client_certificate});
    values["etcd"]["auth"] = json!({"username": "podlease", "secretName": "etcd-password"});
    let t = Instant::now();
    let release = cluster.helm_install(&podlease_chart(), "podlease", NS, &values);
    assert_eq!(release["status"], "deployed", "{release}");
    cluster.wait_deployment_explained(NS, "podlease", SELECTOR, 2, Duration::from_secs(120)).await;
    eprintln!("helm install → 2 podlease pods Ready in {:?}", t.elapsed());

    let pods: Api<Pod> = Api::namespaced(cluster.kube.clone(), NS);
    let podlease_pods = pods.list(&ListParams::default().labels(SELECTOR)).await.unwrap().items;
    assert_eq!(podlease_pods.len(), 2);
    for p in &podlease_pods {
        let c = &p.spec.as_ref().unwrap().containers[0];
        let args = c.args.clone().unwrap_or_default();
        let has = |flag: &str| args.iter().any(|a| a.starts_with(flag));
        assert!(has("--etcd-ca=") && has("--etcd-username=podlease") && has("--etcd-password-file="), "{args:?}");
        assert_eq!(has("--etcd-cert=") && has("--etcd-key="), client_certificate, "client certificate flags: {args:?}");
        let sc = c.security_context.as_ref();
        assert_eq!(sc.and_then(|s| s.read_only_root_filesystem), Some(true));
        assert_eq!(p.spec.as_ref().unwrap().security_context.as_ref().and_then(|s| s.run_as_user), Some(65532), "runs as the image's nonroot user");
    }

    // An annotated pod: podlease (its leader, logged in as user podlease) publishes it.
    cluster.wait_service_account("default", "default").await;
    let apps: Api<Pod> = Api::namespaced(cluster.kube.clone(), "default");
    let t = Instant::now();
    apps.create(&PostParams::default(), &annotated_pod("web-0", "web")).await.expect("create the annotated pod");
    let kv = wait_key_within(&etcd, "/services/web/default/web-0", Duration::from_secs(90)).await;
    eprintln!("annotated pod created → its key in the TLS + auth registry in {:?}", t.elapsed());
    let ip = apps.get("web-0").await.unwrap().status.and_then(|s| s.pod_ip).expect("pod IP");
    let value: serde_json::Value = serde_json::from_slice(kv.value()).unwrap();
    assert_eq!(value["addr"], format!("{ip}:8080"), "{value}");
    assert_eq!(value["node"], NODE_NAME, "{value}");
    assert_ne!(kv.lease(), 0, "written under a lease");

    // Their logs (what `kubectl logs` shows a user): real start-up lines, one of them leads,
    // and the password is in none of them.
    let mut leading = 0;
    for p in &podlease_pods {
        let name = p.metadata.name.as_deref().unwrap();
        let log = cluster.kubectl(&["logs", "-n", NS, name]);
        assert!(log.contains("\"starting\""), "{name} logged no start: {log}");
        leading += usize::from(log.contains("leading: adopting and converging"));
        assert!(!log.contains(AUTH_USER_PASSWORD), "the etcd password is in {name}'s log:\n{log}");
    }
    assert_eq!(leading, 1, "exactly one of the two podlease pods leads");
    eprintln!("{}", cluster.kubectl(&["get", "pods", "-A", "-o", "wide"]));
    cluster.assert_sealed();

    let traces = cluster.shutdown();
    assert_nothing_left("the mini-cluster", || Leftovers::of(&traces));
    eprintln!("whole test {:?}", t0.elapsed());
}

/// etcd with client certificates required and auth on; the chart's default
/// `etcd.tls.clientCertificate` (true): a kubernetes.io/tls Secret with ca.crt, tls.crt and
/// tls.key.
#[tokio::test]
async fn podlease_from_its_chart_publishes_over_tls_with_a_client_certificate_and_a_password_from_secrets() {
    publishes_with_tls_and_auth_from_secrets("node-secrets-mtls", true).await;
}

/// etcd with server TLS only (no client certificate asked for) and auth on;
/// `etcd.tls.clientCertificate=false`: an Opaque Secret with ca.crt alone, no --etcd-cert or
/// --etcd-key, the password the only credential.
#[tokio::test]
async fn podlease_from_its_chart_publishes_over_tls_with_only_a_ca_and_a_password_from_secrets() {
    publishes_with_tls_and_auth_from_secrets("node-secrets-ca", false).await;
}
