//! Rotated etcd credentials, as cert-manager or an operator rotates the Secrets podlease
//! mounts: a client certificate about to expire is reported before it does, and a new client
//! certificate, a new CA and a new password are used without a restart, with every key kept.

mod support;

use std::time::{Duration, SystemTime};

use serde_json::json;
use support::etcd::{history, wait_key};
use support::tls::{Ca, Certs, SecretDir};
use support::*;

const PREFIX: &str = "/services/user/";
const USER_PASSWORD_1: &str = "first-Pa55word-x9";
const USER_PASSWORD_2: &str = "second-Pa55word-k4";
const ROOT_PASSWORD: &str = "root-Pa55word-q7";

/// The files etcd itself reads (overwritten in place; etcd restarted to read them), and an
/// admin client certificate it accepts.
fn etcd_files(dir: &std::path::Path, server: &Ca, trusted: &[&Ca], admin: &Ca) -> Certs {
    std::fs::create_dir_all(dir).unwrap();
    let (cert, key) = server.server("server");
    std::fs::copy(cert, dir.join("server.crt")).unwrap();
    std::fs::copy(key, dir.join("server.key")).unwrap();
    let bundle: Vec<u8> = trusted.iter().flat_map(|ca| std::fs::read(&ca.cert).unwrap()).collect();
    std::fs::write(dir.join("ca.crt"), bundle).unwrap();
    let now = SystemTime::now();
    let (cert, key) = admin.client("admin", "root", now - Duration::from_secs(60), now + Duration::from_secs(86_400));
    Certs { ca: dir.join("ca.crt"), server_cert: dir.join("server.crt"), server_key: dir.join("server.key"), client_cert: cert, client_key: key }
}

fn client_files(ca: Vec<u8>, cert: &std::path::Path, key: &std::path::Path, password: &str) -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("ca.crt", ca),
        ("tls.crt", std::fs::read(cert).unwrap()),
        ("tls.key", std::fs::read(key).unwrap()),
        ("password", password.as_bytes().to_vec()),
    ]
}

/// A root client of the TLS etcd with `certs`' admin material.
async fn admin(endpoint: &str, certs: &Certs) -> etcd_client::Client {
    let tls = etcd_client::TlsOptions::new()
        .ca_certificate(etcd_client::Certificate::from_pem(std::fs::read(&certs.ca).unwrap()))
        .identity(etcd_client::Identity::from_pem(std::fs::read(&certs.client_cert).unwrap(), std::fs::read(&certs.client_key).unwrap()));
    let opts = etcd_client::ConnectOptions::new().with_tls(tls).with_user("root", ROOT_PASSWORD);
    wait_until("a root client of the TLS etcd", DEADLINE, || {
        let opts = opts.clone();
        async move { etcd_client::Client::connect([endpoint], Some(opts)).await.ok() }
    })
    .await
}

fn unix(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() as i64
}

async fn readyz(c: &Controller) -> String {
    support::controller::http_get(&format!("http://127.0.0.1:{}/readyz", c.metrics_port)).await.map(|(_, body)| body).unwrap_or_default()
}

async fn wait_metric(c: &Controller, what: &str, name: &str, ok: impl Fn(f64) -> bool) -> f64 {
    wait_until(what, Duration::from_secs(60), || async {
        let v = c.metric(name).await;
        ok(v).then_some(v)
    })
    .await
}

/// Waits until podlease has had `n` keepalive answers more than `since` (renewals over a
/// connection that works).
async fn wait_renewals(c: &Controller, since: f64, n: f64) {
    wait_metric(c, "keepalive answers on the new connection", "podlease_keepalive_rtt_seconds_count", |v| v >= since + n).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_client_certificate_ca_and_password_are_used_without_a_restart_and_nothing_is_deleted() {
    let bed = TestBed::start().await;
    bed.apply_crd().await;
    let pki = bed.dir.path().join("pki");
    let ca1 = Ca::new(&pki.join("ca1"), "podlease-test-ca-1");
    let ca2 = Ca::new(&pki.join("ca2"), "podlease-test-ca-2");

    // Phase 1: everything from CA 1; the client certificate has 45 s of its 145 s left, so
    // less than a third: podlease must warn at once, and the certificate expires mid-test.
    let now = SystemTime::now();
    let short_expiry = now + Duration::from_secs(45);
    let (c1, k1) = ca1.client("podlease-1", "podlease", now - Duration::from_secs(100), short_expiry);
    let etcd_dir = pki.join("etcd");
    let certs = etcd_files(&etcd_dir, &ca1, &[&ca1], &ca1);
    let mut etcd = EtcdServer::start_tls(bed.dir.path(), "secure", &certs);
    let endpoint = etcd.endpoint();
    let ctl = |certs: &Certs, args: &[&str]| support::etcd::etcdctl_ok(&endpoint, Some(certs), args);
    wait_until("TLS etcd healthy", DEADLINE, || async {
        support::etcd::etcdctl(&endpoint, Some(&certs), &["endpoint", "health"]).status.success().then_some(())
    })
    .await;
    ctl(&certs, &["user", "add", "root", &format!("--new-user-password={ROOT_PASSWORD}")]);
    ctl(&certs, &["role", "add", "podlease"]);
    ctl(&certs, &["role", "grant-permission", "podlease", "readwrite", "/", "--prefix=true"]);
    ctl(&certs, &["user", "add", "podlease", &format!("--new-user-password={USER_PASSWORD_1}")]);
    ctl(&certs, &["user", "grant-role", "podlease", "podlease"]);
    ctl(&certs, &["auth", "enable"]);

    let mut secret = SecretDir::new(&pki.join("secret"), &client_files(std::fs::read(&ca1.cert).unwrap(), &c1, &k1, USER_PASSWORD_1));
    let (ca, cert, key, pw) = (secret.path("ca.crt"), secret.path("tls.crt"), secret.path("tls.key"), secret.path("password"));
    let args = [
        "--etcd-endpoints", &endpoint,
        "--etcd-ca", ca.to_str().unwrap(),
        "--etcd-cert", cert.to_str().unwrap(),
        "--etcd-key", key.to_str().unwrap(),
        "--etcd-username", "podlease",
        "--etcd-password-file", pw.to_str().unwrap(),
    ];
    let c = Controller::start(&bed, "c1", &args).await;
    create_registration(&bed.kube, "default", "user", json!({"selector": {"matchLabels": {"app": "user"}}})).await;
    for i in 0..10 {
        create_pod(&bed.kube, "default", &PodSpec::new(&format!("user-{i}")).label("app", "user")).await;
        set_ready(&bed.kube, "default", &format!("user-{i}"), &pod_ip(i), true).await;
    }
    let reader = admin(&endpoint, &certs).await;
    let mut before = Vec::new();
    for i in 0..10 {
        before.push(wait_key(&reader, &format!("{PREFIX}default/user-{i}")).await);
    }
    let from = before.iter().map(|kv| kv.mod_revision()).min().unwrap();

    // The expiry is reported before it comes: metric, readiness detail and log.
    assert_eq!(c.metric("podlease_etcd_client_cert_expiry_timestamp_seconds").await as i64, unix(short_expiry));
    wait_metric(&c, "the expiring gauge", "podlease_etcd_client_cert_expiring", |v| v == 1.0).await;
    let body = readyz(&c).await;
    assert!(body.contains("warning: the etcd client certificate expires in"), "{body}");
    assert!(SystemTime::now() < short_expiry, "reported only after the certificate expired");
    assert!(c.log_text().contains("the etcd client certificate expires in"), "no warning in the log");
    // ... and once it has expired, readiness says so (the connection already open works on).
    let body = wait_until("/readyz saying the certificate expired", Duration::from_secs(90), || async {
        let body = readyz(&c).await;
        body.contains("the etcd client certificate expired").then_some(body)
    })
    .await;
    assert!(body.starts_with("ok (leader)"), "an expiring certificate is a warning, never unready: {body}");

    // Phase 2: a new CA. etcd trusts both CAs for a while (rotation step one) ...
    etcd_files(&etcd_dir, &ca1, &[&ca1, &ca2], &ca1);
    etcd.kill();
    etcd.resume();
    // ... podlease gets the bundle and a client certificate from CA 2 ...
    let now = SystemTime::now();
    let long_expiry = now + Duration::from_secs(86_400);
    let (c2, k2) = ca2.client("podlease-2", "podlease", now - Duration::from_secs(60), long_expiry);
    let bundle: Vec<u8> = [std::fs::read(&ca1.cert).unwrap(), std::fs::read(&ca2.cert).unwrap()].concat();
    secret.update(&client_files(bundle, &c2, &k2, USER_PASSWORD_1));
    wait_metric(&c, "the new certificate's expiry", "podlease_etcd_client_cert_expiry_timestamp_seconds", |v| v as i64 == unix(long_expiry)).await;
    wait_metric(&c, "the rotation applied", "podlease_etcd_credential_reloads_total{result=\"applied\"}", |v| v >= 1.0).await;
    wait_metric(&c, "the expiring gauge back to 0", "podlease_etcd_client_cert_expiring", |v| v == 0.0).await;
    assert!(!readyz(&c).await.contains("warning"), "the warning stays after the renewal");
    // ... and then etcd moves to CA 2 alone. podlease's first material (CA 1 trust, an
    // expired CA 1 certificate) can no longer make any connection: only the rotated one works.
    let certs = etcd_files(&etcd_dir, &ca2, &[&ca2], &ca2);
    etcd.kill();
    let answers = c.metric("podlease_keepalive_rtt_seconds_count").await;
    etcd.resume();
    wait_renewals(&c, answers, 10.0).await;
    let reader = admin(&endpoint, &certs).await;
    create_pod(&bed.kube, "default", &PodSpec::new("user-10").label("app", "user")).await;
    set_ready(&bed.kube, "default", "user-10", &pod_ip(10), true).await;
    wait_key(&reader, &format!("{PREFIX}default/user-10")).await;

    // Phase 3: a new password. The file changes first, before etcd knows it: podlease keeps
    // the connection in use, which still works, and says so ...
    let failed = c.metric("podlease_etcd_credential_reloads_total{result=\"failed\"}").await;
    let bundle: Vec<u8> = std::fs::read(&ca2.cert).unwrap();
    secret.update(&client_files(bundle, &c2, &k2, USER_PASSWORD_2));
    wait_metric(&c, "a failed reload (etcd refuses the new password)", "podlease_etcd_credential_reloads_total{result=\"failed\"}", |v| v > failed).await;
    // ... then the password is changed in etcd (which drops the old one's tokens) and
    // etcd restarts (which drops every token): only the new password logs in.
    reader.clone().user_change_password("podlease", USER_PASSWORD_2).await.expect("changing the password");
    wait_metric(&c, "the new password applied", "podlease_etcd_credential_reloads_total{result=\"applied\"}", |v| v >= 2.0).await;
    etcd.kill();
    let answers = c.metric("podlease_keepalive_rtt_seconds_count").await;
    etcd.resume();
    wait_renewals(&c, answers, 11.0).await;
    let reader = admin(&endpoint, &certs).await;
    create_pod(&bed.kube, "default", &PodSpec::new("user-11").label("app", "user")).await;
    set_ready(&bed.kube, "default", "user-11", &pod_ip(11), true).await;
    wait_key(&reader, &format!("{PREFIX}default/user-11")).await;

    // Nothing was deleted, and the first keys are the same writes under the same leases.
    let events = history(&reader, PREFIX, from).await;
    let deletes: Vec<_> = events.iter().filter(|e| !e.put).collect();
    assert!(deletes.is_empty(), "DELETE events during the rotations: {deletes:?}");
    for kv in &before {
        let now = wait_key(&reader, kv.key_str().unwrap()).await;
        assert_eq!((now.create_revision(), now.lease()), (kv.create_revision(), kv.lease()), "{} was rewritten", kv.key_str().unwrap());
    }
    let log = c.log_text();
    for secret in [USER_PASSWORD_1, USER_PASSWORD_2] {
        assert!(!log.contains(secret), "a password leaked into the log");
    }
    assert!(c.log_text().contains("the etcd credential files changed: new connections use them"), "no log line for the rotation");
}

// --- Rotations etcd refuses: the connection in use stays, for every request and stream ---

fn files(ca: &std::path::Path, cert: &std::path::Path, key: &std::path::Path, password: Option<&str>) -> Vec<(&'static str, Vec<u8>)> {
    let mut v = vec![("ca.crt", std::fs::read(ca).unwrap()), ("tls.crt", std::fs::read(cert).unwrap()), ("tls.key", std::fs::read(key).unwrap())];
    if let Some(p) = password {
        v.push(("password", p.as_bytes().to_vec()));
    }
    v
}

/// A TLS etcd trusting `ca` (users root and podlease when `auth`), podlease on a valid
/// certificate of `ca` (with the podlease user's password when `password`), and three ready
/// pods registered: (etcd, the admin's certificates, the Secret, podlease, revision of the
/// first key).
async fn refusal_bed(bed: &TestBed, ca: &Ca, auth: bool, password: bool) -> (EtcdServer, Certs, SecretDir, Controller, i64) {
    let pki = bed.dir.path().join("pki");
    let now = SystemTime::now();
    let (cert, key) = ca.client("podlease-1", "podlease", now - Duration::from_secs(60), now + Duration::from_secs(86_400));
    let certs = etcd_files(&pki.join("etcd"), ca, &[ca], ca);
    let etcd = EtcdServer::start_tls(bed.dir.path(), "secure", &certs);
    let endpoint = etcd.endpoint();
    wait_until("TLS etcd healthy", DEADLINE, || async {
        support::etcd::etcdctl(&endpoint, Some(&certs), &["endpoint", "health"]).status.success().then_some(())
    })
    .await;
    if auth {
        let ctl = |args: &[&str]| support::etcd::etcdctl_ok(&endpoint, Some(&certs), args);
        ctl(&["user", "add", "root", &format!("--new-user-password={ROOT_PASSWORD}")]);
        ctl(&["role", "add", "podlease"]);
        ctl(&["role", "grant-permission", "podlease", "readwrite", "/", "--prefix=true"]);
        ctl(&["user", "add", "podlease", &format!("--new-user-password={USER_PASSWORD_1}")]);
        ctl(&["user", "grant-role", "podlease", "podlease"]);
        ctl(&["auth", "enable"]);
    }
    let secret = SecretDir::new(&pki.join("secret"), &files(&ca.cert, &cert, &key, password.then_some(USER_PASSWORD_1)));
    let (ca_path, cert, key, pw) = (secret.path("ca.crt"), secret.path("tls.crt"), secret.path("tls.key"), secret.path("password"));
    let mut args = vec![
        "--etcd-endpoints".to_string(), endpoint.clone(),
        "--etcd-ca".into(), ca_path.display().to_string(),
        "--etcd-cert".into(), cert.display().to_string(),
        "--etcd-key".into(), key.display().to_string(),
    ];
    if password {
        args.extend(["--etcd-username".into(), "podlease".into(), "--etcd-password-file".into(), pw.display().to_string()]);
    }
    let c = Controller::start(bed, "c1", &args.iter().map(String::as_str).collect::<Vec<_>>()).await;
    create_registration(&bed.kube, "default", "user", json!({"selector": {"matchLabels": {"app": "user"}}})).await;
    for i in 0..3 {
        create_pod(&bed.kube, "default", &PodSpec::new(&format!("user-{i}")).label("app", "user")).await;
        set_ready(&bed.kube, "default", &format!("user-{i}"), &pod_ip(i), true).await;
    }
    let r = reader(&endpoint, &certs, auth).await;
    let mut from = i64::MAX;
    for i in 0..3 {
        from = from.min(wait_key(&r, &format!("{PREFIX}default/user-{i}")).await.mod_revision());
    }
    (etcd, certs, secret, c, from)
}

/// A client of the TLS etcd with the admin's certificate (as root when `root`).
async fn reader(endpoint: &str, certs: &Certs, root: bool) -> etcd_client::Client {
    if root {
        return admin(endpoint, certs).await;
    }
    let tls = etcd_client::TlsOptions::new()
        .ca_certificate(etcd_client::Certificate::from_pem(std::fs::read(&certs.ca).unwrap()))
        .identity(etcd_client::Identity::from_pem(std::fs::read(&certs.client_cert).unwrap(), std::fs::read(&certs.client_key).unwrap()));
    let opts = etcd_client::ConnectOptions::new().with_tls(tls);
    wait_until("a client of the TLS etcd", DEADLINE, || {
        let opts = opts.clone();
        async move {
            let mut c = etcd_client::Client::connect([endpoint], Some(opts)).await.ok()?;
            c.status().await.ok()?;
            Some(c)
        }
    })
    .await
}

/// After a refused rotation: nothing applied, the refusal counted once and shown on
/// /readyz, a new pod registered and the keys renewed over the connection in use, and no
/// DELETE since `from`.
async fn the_connection_in_use_stays(bed: &TestBed, c: &Controller, r: &etcd_client::Client, from: i64, answers: f64) {
    assert_eq!(c.metric("podlease_etcd_credential_reloads_total{result=\"applied\"}").await, 0.0, "a refused rotation was put in use");
    let body = readyz(c).await;
    assert!(body.contains("the etcd credential files changed, but") && body.contains("still using the previous ones"), "{body}");
    wait_renewals(c, answers, 4.0).await;
    create_pod(&bed.kube, "default", &PodSpec::new("user-3").label("app", "user")).await;
    set_ready(&bed.kube, "default", "user-3", &pod_ip(3), true).await;
    wait_key(r, &format!("{PREFIX}default/user-3")).await;
    let deletes: Vec<_> = history(r, PREFIX, from).await.into_iter().filter(|e| !e.put).collect();
    assert!(deletes.is_empty(), "DELETE events: {deletes:?}");
    assert_eq!(c.metric("podlease_etcd_credential_reloads_total{result=\"failed\"}").await, 1.0, "one refusal, counted once");
}

/// A new password in the file before etcd knows it, then an etcd restart (every stream
/// breaks): the keepalive stream reopens with the password in use, not the file's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_etcd_refuses_is_not_used_even_when_every_stream_reconnects() {
    let bed = TestBed::start().await;
    bed.apply_crd().await;
    let ca = Ca::new(&bed.dir.path().join("pki").join("ca1"), "podlease-test-ca-1");
    let (mut etcd, certs, mut secret, c, from) = refusal_bed(&bed, &ca, true, true).await;
    let (cert, key) = (secret.path("tls.crt"), secret.path("tls.key"));
    let (cert, key) = (std::fs::read(cert).unwrap(), std::fs::read(key).unwrap());
    let tmp = bed.dir.path().join("pki");
    std::fs::write(tmp.join("c.crt"), cert).unwrap();
    std::fs::write(tmp.join("c.key"), key).unwrap();
    secret.update(&files(&ca.cert, &tmp.join("c.crt"), &tmp.join("c.key"), Some(USER_PASSWORD_2)));
    wait_metric(&c, "the refusal", "podlease_etcd_credential_reloads_total{result=\"failed\"}", |v| v >= 1.0).await;
    etcd.kill();
    let answers = c.metric("podlease_keepalive_rtt_seconds_count").await;
    etcd.resume();
    let r = reader(&etcd.endpoint(), &certs, true).await;
    the_connection_in_use_stays(&bed, &c, &r, from, answers).await;
    // Once etcd knows the new password, it is put in use.
    r.clone().user_change_password("podlease", USER_PASSWORD_2).await.unwrap();
    wait_metric(&c, "the password applied", "podlease_etcd_credential_reloads_total{result=\"applied\"}", |v| v == 1.0).await;
}

/// A certificate from a CA etcd does not trust, arriving while etcd is down: it cannot be
/// checked, so it is not put in use; once etcd is back it is refused, and the certificate
/// in use (still valid, still trusted) carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_certificate_that_arrives_while_etcd_is_down_is_not_put_in_use() {
    let bed = TestBed::start().await;
    bed.apply_crd().await;
    let pki = bed.dir.path().join("pki");
    let ca1 = Ca::new(&pki.join("ca1"), "podlease-test-ca-1");
    let ca2 = Ca::new(&pki.join("ca2"), "podlease-test-ca-2");
    let (mut etcd, certs, mut secret, c, from) = refusal_bed(&bed, &ca1, false, false).await;
    let now = SystemTime::now();
    let (cert, key) = ca2.client("podlease-2", "podlease", now - Duration::from_secs(60), now + Duration::from_secs(86_400));
    etcd.kill();
    secret.update(&files(&ca1.cert, &cert, &key, None));
    wait_metric(&c, "the rotation not put in use while etcd is down", "podlease_etcd_credential_reloads_total{result=\"failed\"}", |v| v >= 1.0).await;
    let answers = c.metric("podlease_keepalive_rtt_seconds_count").await;
    etcd.resume();
    let r = reader(&etcd.endpoint(), &certs, false).await;
    the_connection_in_use_stays(&bed, &c, &r, from, answers).await;
}

/// With client-certificate auth: a certificate of the trusted CA whose name is no user with
/// access. etcd lets it connect (and answer a status call); podlease checks a read and a
/// write permission, refuses it and keeps writing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_certificate_of_a_user_without_access_is_not_put_in_use() {
    let bed = TestBed::start().await;
    bed.apply_crd().await;
    let ca = Ca::new(&bed.dir.path().join("pki").join("ca1"), "podlease-test-ca-1");
    let (etcd, certs, mut secret, c, from) = refusal_bed(&bed, &ca, true, false).await;
    let now = SystemTime::now();
    let (cert, key) = ca.client("nobody", "nobody", now - Duration::from_secs(60), now + Duration::from_secs(86_400));
    secret.update(&files(&ca.cert, &cert, &key, None));
    wait_metric(&c, "the refusal", "podlease_etcd_credential_reloads_total{result=\"failed\"}", |v| v >= 1.0).await;
    let answers = c.metric("podlease_keepalive_rtt_seconds_count").await;
    let r = reader(&etcd.endpoint(), &certs, true).await;
    the_connection_in_use_stays(&bed, &c, &r, from, answers).await;
}
