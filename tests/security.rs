//! etcd over TLS (server name verified, client certificates) with username/password auth,
//! as production clusters run it — and no secret in the logs.

mod support;

use serde_json::json;
use support::etcd::wait_key;
use support::*;

fn etcdctl(etcd: &EtcdServer, certs: &tls::Certs, args: &[&str]) {
    support::etcd::etcdctl_ok(&etcd.endpoint(), Some(certs), args);
}

#[tokio::test]
async fn podlease_registers_over_tls_with_auth_and_never_logs_the_password() {
    let bed = TestBed::start().await;
    bed.apply_crd().await;
    let certs = tls::make(&bed.dir.path().join("pki"));
    let etcd = EtcdServer::start_tls(bed.dir.path(), "secure", &certs);
    // Auth on: a root user, and a podlease user that may write everything under "/".
    let wait = std::time::Instant::now();
    while !support::etcd::etcdctl(&etcd.endpoint(), Some(&certs), &["endpoint", "health"]).status.success() {
        assert!(wait.elapsed() < DEADLINE, "TLS etcd not healthy");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    etcdctl(&etcd, &certs, &["user", "add", "root", "--new-user-password=root-secret-pw"]);
    etcdctl(&etcd, &certs, &["role", "add", "podlease"]);
    etcdctl(&etcd, &certs, &["role", "grant-permission", "podlease", "readwrite", "/", "--prefix=true"]);
    etcdctl(&etcd, &certs, &["user", "add", "podlease", "--new-user-password=s3cret-Pa55word"]);
    etcdctl(&etcd, &certs, &["user", "grant-role", "podlease", "podlease"]);
    etcdctl(&etcd, &certs, &["auth", "enable"]);
    let password_file = bed.dir.path().join("etcd-password");
    std::fs::write(&password_file, "s3cret-Pa55word\n").unwrap();

    let args = [
        "--etcd-endpoints", &etcd.endpoint(),
        "--etcd-ca", certs.ca.to_str().unwrap(),
        "--etcd-cert", certs.client_cert.to_str().unwrap(),
        "--etcd-key", certs.client_key.to_str().unwrap(),
        "--etcd-username", "podlease",
        "--etcd-password-file", password_file.to_str().unwrap(),
    ];
    let c = Controller::start(&bed, "c1", &args).await;
    create_registration(&bed.kube, "default", "user", json!({"selector": {"matchLabels": {"app": "user"}}})).await;
    create_pod(&bed.kube, "default", &PodSpec::new("user-0").label("app", "user")).await;
    set_ready(&bed.kube, "default", "user-0", "10.0.0.1", true).await;

    // Read back as the same authenticated client would.
    let opts = etcd_client::ConnectOptions::new()
        .with_tls(
            etcd_client::TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(std::fs::read(&certs.ca).unwrap()))
                .identity(etcd_client::Identity::from_pem(std::fs::read(&certs.client_cert).unwrap(), std::fs::read(&certs.client_key).unwrap())),
        )
        .with_user("root", "root-secret-pw");
    let client = etcd_client::Client::connect([etcd.endpoint()], Some(opts)).await.expect("TLS + auth client");
    let kv = wait_key(&client, "/services/user/default/user-0").await;
    assert_ne!(kv.lease(), 0);
    let log = c.log_text();
    assert!(!log.contains("s3cret-Pa55word"), "the password leaked into the log");

    // A wrong password is a clear error at start, not a crash loop: /healthz answers,
    // /readyz and the log say why, and the right password, once its file has it (a rotated
    // Secret), is picked up without a restart.
    std::fs::write(&password_file, "wr0ng-Pw-7Qx").unwrap();
    let mut bad = Controller::new(&bed, "c2", bed.kubeconfig.clone(), &args);
    bad.spawn();
    let why = starting(&bad, "authentication failed").await;
    assert!(why.starts_with("starting: connecting to etcd: "), "{why}");
    std::fs::write(&password_file, "s3cret-Pa55word\n").unwrap();
    bad.wait_ready().await;
    let log = bad.log_text();
    assert!(log.contains("authentication failed"), "{log}");
    assert!(!log.contains("wr0ng-Pw-7Qx") && !log.contains("s3cret-Pa55word"), "the password leaked into the log");

    // An endpoint that accepts connections and never answers (blackholed): logging in has
    // a deadline, so the start waits with /healthz up, and continues once etcd answers.
    let proxy = proxy::FaultProxy::to_url(&etcd.endpoint());
    proxy.set_mode(proxy::Mode::Blackhole);
    let endpoint = proxy.endpoint("https");
    let mut args = args.to_vec();
    args[1] = &endpoint;
    let mut slow = Controller::new(&bed, "c3", bed.kubeconfig.clone(), &args);
    slow.spawn();
    let why = starting(&slow, "did not finish within").await;
    assert!(why.starts_with("starting: connecting to etcd: "), "{why}");
    proxy.set_mode(proxy::Mode::Pass);
    slow.wait_ready().await;
    assert!(slow.child.as_mut().unwrap().try_wait().unwrap().is_none(), "still running");
}

/// Waits until /healthz answers 200 and /readyz 503 with a body containing `what`; the body.
async fn starting(c: &Controller, what: &str) -> String {
    let port = c.metrics_port;
    wait_until(&format!("/readyz saying {what:?} while /healthz is ok"), DEADLINE, || async move {
        let (healthz, _) = support::controller::http_get(&format!("http://127.0.0.1:{port}/healthz")).await?;
        let (code, body) = support::controller::http_get(&format!("http://127.0.0.1:{port}/readyz")).await?;
        (healthz == 200 && code == 503 && body.contains(what)).then(|| body.trim().to_string())
    })
    .await
}

/// A TLS etcd with auth on: users root and podlease (readwrite under "/").
async fn auth_etcd(dir: &std::path::Path, name: &str, certs: &tls::Certs) -> EtcdServer {
    let etcd = EtcdServer::start_tls(dir, name, certs);
    let endpoint = etcd.endpoint();
    wait_until("TLS etcd healthy", DEADLINE, || async {
        support::etcd::etcdctl(&endpoint, Some(certs), &["endpoint", "health"]).status.success().then_some(())
    })
    .await;
    etcdctl(&etcd, certs, &["user", "add", "root", "--new-user-password=root-secret-pw"]);
    etcdctl(&etcd, certs, &["role", "add", "podlease"]);
    etcdctl(&etcd, certs, &["role", "grant-permission", "podlease", "readwrite", "/", "--prefix=true"]);
    etcdctl(&etcd, certs, &["user", "add", "podlease", "--new-user-password=s3cret-Pa55word"]);
    etcdctl(&etcd, certs, &["user", "grant-role", "podlease", "podlease"]);
    etcdctl(&etcd, certs, &["auth", "enable"]);
    etcd
}

/// With auth on, a user that is not root cannot ask for the status of a member: the check
/// that every endpoint is one cluster reads the member list instead, so it still compares.
#[tokio::test]
async fn endpoints_of_two_clusters_are_refused_for_a_user_without_root_too() {
    let bed = TestBed::start().await;
    bed.apply_crd().await;
    let certs = tls::make(&bed.dir.path().join("pki"));
    let a = auth_etcd(bed.dir.path(), "one", &certs).await;
    let b = auth_etcd(bed.dir.path(), "two", &certs).await;
    let password_file = bed.dir.path().join("etcd-password");
    std::fs::write(&password_file, "s3cret-Pa55word\n").unwrap();
    let endpoints = format!("{},{}", a.endpoint(), b.endpoint());
    let args = [
        "--etcd-endpoints", &endpoints,
        "--etcd-ca", certs.ca.to_str().unwrap(),
        "--etcd-cert", certs.client_cert.to_str().unwrap(),
        "--etcd-key", certs.client_key.to_str().unwrap(),
        "--etcd-username", "podlease",
        "--etcd-password-file", password_file.to_str().unwrap(),
    ];
    let mut c = Controller::new(&bed, "c1", bed.kubeconfig.clone(), &args);
    c.spawn();
    let status = c.wait_exit().await;
    assert!(!status.success());
    assert!(c.log_text().contains("belong to different clusters"), "{}", c.log_text());
}
