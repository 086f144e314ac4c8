//! The alerting rules and the dashboard: promtool checks and unit-tests the rules (each alert
//! with a firing and a quiet case), every alert has its runbook entry, and a real Prometheus
//! scraping a running podlease evaluates every rule and every dashboard query against the
//! metrics the binary really exposes, then sees alerts go pending or fire in scenarios that
//! trigger them on the bed.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Child, Command};
use std::time::Duration;

use serde_json::{Value, json};
use support::controller::http_get;
use support::etcd::{keys, wait_key};
use support::*;

const RULES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/charts/podlease/files/alerts.yaml");
const RULE_TESTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/alerts/alerts.test.yaml");
const DASHBOARD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/charts/podlease/files/dashboard.json");
const RUNBOOK: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/runbook.md");

fn yaml(path: &str) -> Value {
    serde_saphyr::from_str(&std::fs::read_to_string(path).unwrap()).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// (alert name, expression) of every rule.
fn rules() -> Vec<(String, String)> {
    let file = yaml(RULES);
    let mut out = Vec::new();
    for g in file["groups"].as_array().unwrap() {
        for r in g["rules"].as_array().unwrap() {
            out.push((r["alert"].as_str().unwrap().to_string(), r["expr"].as_str().unwrap().to_string()));
        }
    }
    out
}

/// (panel title, expression) of every dashboard query, with Grafana's `$__rate_interval`
/// made a plain range.
fn dashboard_queries() -> Vec<(String, String)> {
    let d: Value = serde_json::from_str(&std::fs::read_to_string(DASHBOARD).unwrap()).unwrap();
    let mut out = Vec::new();
    for p in d["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            out.push((p["title"].as_str().unwrap().to_string(), t["expr"].as_str().unwrap().replace("$__rate_interval", "1m")));
        }
    }
    assert!(out.len() >= 10, "{out:?}");
    out
}

fn promtool(args: &[&str]) -> String {
    let out = Command::new(&Binaries::locate().promtool).args(args).output().expect("promtool");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "promtool {args:?}:\n{text}");
    text
}

#[test]
fn promtool_checks_the_rules_and_runs_their_unit_tests() {
    let checked = promtool(&["check", "rules", RULES]);
    assert!(checked.contains(&format!("SUCCESS: {} rules found", rules().len())), "{checked}");
    let tested = promtool(&["test", "rules", RULE_TESTS]);
    assert!(tested.contains("SUCCESS"), "{tested}");
}

#[test]
fn every_alert_has_a_firing_case_a_quiet_case_and_a_runbook_entry() {
    let tests = yaml(RULE_TESTS);
    let mut firing: BTreeSet<String> = BTreeSet::new();
    let mut quiet: BTreeSet<String> = BTreeSet::new();
    for t in tests["tests"].as_array().unwrap() {
        for a in t["alert_rule_test"].as_array().into_iter().flatten() {
            let name = a["alertname"].as_str().unwrap().to_string();
            if a["exp_alerts"].as_array().is_some_and(|e| !e.is_empty()) {
                firing.insert(name);
            } else {
                quiet.insert(name);
            }
        }
    }
    let runbook = std::fs::read_to_string(RUNBOOK).unwrap();
    let file = yaml(RULES);
    for r in file["groups"][0]["rules"].as_array().unwrap() {
        let name = r["alert"].as_str().unwrap();
        assert!(firing.contains(name), "{name} has no firing case in {RULE_TESTS}");
        assert!(quiet.contains(name), "{name} has no quiet case in {RULE_TESTS}");
        assert!(runbook.contains(&format!("\n## {name}\n")), "{name} has no entry in docs/runbook.md");
        assert_eq!(r["annotations"]["runbook"], format!("docs/runbook.md#{}", name.to_lowercase()), "{name}");
        assert!(["critical", "warning"].contains(&r["labels"]["severity"].as_str().unwrap_or_default()), "{name}: severity");
    }
}

/// Every sample name `/metrics` can carry, from its `# TYPE` lines (a family appears there
/// even before it has a sample): counters as `_total`, histograms as `_bucket`/`_sum`/`_count`.
fn exposed_names(metrics: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in metrics.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else { continue };
        let (name, kind) = rest.split_once(' ').unwrap();
        match kind {
            "counter" => {
                out.insert(format!("{name}_total"));
            }
            "histogram" => out.extend(["_bucket", "_sum", "_count"].map(|s| format!("{name}{s}"))),
            _ => {
                out.insert(name.to_string());
            }
        }
    }
    out
}

fn metric_names(expr: &str) -> BTreeSet<String> {
    regex::Regex::new(r"\bpodlease_[a-z0-9_]+").unwrap().find_iter(expr).map(|m| m.as_str().to_string()).collect()
}

/// A Prometheus on the bed: scrapes `targets` every second and evaluates the rules every
/// second (their `for` durations as written).
struct Prometheus {
    port: u16,
    _child: ChildGuard,
}

struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Prometheus {
    fn start(dir: &Path, targets: &[u16]) -> Prometheus {
        let port = free_port();
        let config = dir.join("prometheus.yml");
        let targets: Vec<String> = targets.iter().map(|p| format!("\"127.0.0.1:{p}\"")).collect();
        std::fs::write(
            &config,
            format!(
                "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\nrule_files: [\"{RULES}\"]\nscrape_configs:\n  - job_name: podlease\n    static_configs: [{{targets: [{}]}}]\n",
                targets.join(", ")
            ),
        )
        .unwrap();
        let mut cmd = Command::new(&Binaries::locate().prometheus);
        cmd.arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("prometheus-data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"));
        let child = spawn_owned(&mut cmd, &dir.join("prometheus.log"));
        Prometheus { port, _child: ChildGuard(child) }
    }

    async fn get(&self, path: &str) -> Option<Value> {
        let (code, body) = http_get(&format!("http://127.0.0.1:{}{path}", self.port)).await?;
        let v: Value = serde_json::from_str(&body).ok()?;
        (code == 200 && v["status"] == "success").then_some(v["data"].clone())
    }

    /// An instant query; Err with Prometheus' error when it does not evaluate.
    async fn query(&self, expr: &str) -> Result<Vec<Value>, String> {
        let (_, body) = http_get(&format!("http://127.0.0.1:{}/api/v1/query?query={}", self.port, encode(expr))).await.ok_or("no answer")?;
        let v: Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
        if v["status"] != "success" {
            return Err(body);
        }
        Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
    }

    /// The active alerts (pending or firing) by name.
    async fn alerts(&self) -> BTreeMap<String, Value> {
        let data = self.get("/api/v1/alerts").await.unwrap_or(json!({"alerts": []}));
        data["alerts"].as_array().unwrap().iter().map(|a| (a["labels"]["alertname"].as_str().unwrap().to_string(), a.clone())).collect()
    }

    async fn wait_alert(&self, name: &str, state: &str) -> Value {
        wait_until(&format!("alert {name} {state}"), Duration::from_secs(120), || async {
            self.alerts().await.remove(name).filter(|a| a["state"] == state)
        })
        .await
    }
}

fn encode(s: &str) -> String {
    s.bytes().map(|b| if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) { (b as char).to_string() } else { format!("%{b:02X}") }).collect()
}

/// What an operator sees of an alert: its state, labels and annotations.
fn shown(a: &Value) -> String {
    format!("{} {} {}", a["state"].as_str().unwrap_or_default(), a["labels"], a["annotations"])
}

#[tokio::test]
async fn a_real_prometheus_evaluates_every_rule_and_dashboard_query_and_sees_alerts_in_real_scenarios() {
    let mut bed = TestBed::start().await;
    bed.apply_crd().await;
    let mut c = Controller::start(&bed, "a", &[]).await;
    let prom = Prometheus::start(bed.dir.path(), &[c.metrics_port]);

    // Every name the rules and the dashboard use is one the binary exposes.
    let exposed = exposed_names(&c.metrics().await);
    let queries: Vec<(String, String)> = rules().into_iter().chain(dashboard_queries()).collect();
    for (what, expr) in &queries {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "{what}: no podlease metric in {expr}");
        for n in names {
            assert!(exposed.contains(&n), "{what}: {n} is not exposed by podlease (exposed: {exposed:?})");
        }
    }

    // Scraped, and every rule evaluated without error; every query evaluates.
    wait_until("podlease scraped", Duration::from_secs(60), || async { prom.query("podlease_leader == 1").await.ok().filter(|r| r.len() == 1) }).await;
    wait_until("every rule evaluated", Duration::from_secs(60), || async {
        let data = prom.get("/api/v1/rules").await?;
        let rules: Vec<Value> = data["groups"].as_array()?.iter().flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default()).collect();
        (rules.len() == queries.len() - dashboard_queries().len() && rules.iter().all(|r| r["health"] == "ok")).then_some(())
    })
    .await;
    for (what, expr) in &queries {
        prom.query(expr).await.unwrap_or_else(|e| panic!("{what}: {expr} does not evaluate: {e}"));
    }
    // A healthy install raises nothing (once the rules have been evaluated on a scrape: the
    // very first evaluation may precede it and see no podlease at all).
    wait_until("no alert on a healthy install", Duration::from_secs(30), || async { prom.alerts().await.is_empty().then_some(()) }).await;

    // Scenarios, and what an operator sees (printed for the record).
    let ns = "default";
    // An invalid spec (a port the pods do not declare): pending, firing after 5 minutes.
    create_pod(&bed.kube, ns, &PodSpec::new("web-0").label("app", "web").ports(&[("http", 8080)])).await;
    set_ready(&bed.kube, ns, "web-0", &pod_ip(1), true).await;
    create_registration(&bed.kube, ns, "web-bad", json!({"selector": {"matchLabels": {"app": "web"}}, "port": "grpc"})).await;
    println!("PodleaseRegistrationInvalid: {}", shown(&prom.wait_alert("PodleaseRegistrationInvalid", "pending").await));
    // A key another writer holds: Conflict.
    let mut kv = bed.etcd.kv_client();
    kv.put("/services/web/default/web-0", "someone else's", None).await.unwrap();
    create_registration(&bed.kube, ns, "web", json!({"selector": {"matchLabels": {"app": "web"}}})).await;
    println!("PodleaseRegistrationConflict: {}", shown(&prom.wait_alert("PodleaseRegistrationConflict", "pending").await));

    // Keys deleted behind podlease's back, four of them: repaired at the next verify pass
    // (30 s at the defaults), and the alert fires at once.
    create_registration(&bed.kube, ns, "api", json!({"selector": {"matchLabels": {"app": "api"}}})).await;
    for i in 0..4 {
        let pod = format!("api-{i}");
        create_pod(&bed.kube, ns, &PodSpec::new(&pod).label("app", "api")).await;
        set_ready(&bed.kube, ns, &pod, &pod_ip(10 + i), true).await;
        wait_key(&bed.etcd, &format!("/services/api/default/{pod}")).await;
    }
    kv.delete("/services/api/", Some(etcd_client::DeleteOptions::new().with_prefix())).await.unwrap();
    println!("PodleaseDriftRepairs: {}", shown(&prom.wait_alert("PodleaseDriftRepairs", "firing").await));
    assert_eq!(keys(&bed.etcd, "/services/api/").await.len(), 4, "repaired");

    // A lease revoked behind podlease's back: etcd reports it gone at the next renewal.
    let lease = wait_key(&bed.etcd, "/services/api/default/api-0").await.lease();
    bed.etcd.lease_client().revoke(lease).await.unwrap();
    println!("PodleaseLeasesLost: {}", shown(&prom.wait_alert("PodleaseLeasesLost", "firing").await));

    // etcd gone: no replica reaches it, and the leader steps down.
    bed.kill_registry_member(0);
    println!("PodleaseEtcdUnavailable: {}", shown(&prom.wait_alert("PodleaseEtcdUnavailable", "pending").await));
    println!("PodleaseNoLeader: {}", shown(&prom.wait_alert("PodleaseNoLeader", "pending").await));
    bed.resume_registry_member(0);
    c.wait_ready().await;
    wait_until("etcd and leader alerts resolved", Duration::from_secs(120), || async {
        let a = prom.alerts().await;
        (!a.contains_key("PodleaseEtcdUnavailable") && !a.contains_key("PodleaseNoLeader")).then_some(())
    })
    .await;

    // podlease gone altogether: nothing scraped is no leader too.
    c.kill();
    println!("PodleaseNoLeader (no replica scraped): {}", shown(&prom.wait_alert("PodleaseNoLeader", "pending").await));
}

/// The certificate alert on the bed: podlease on an etcd that only speaks TLS, with a client
/// certificate that has 60 s of its 150 s left (under a third): the alert goes pending at
/// once (it fires after 10 minutes: longer than a test should wait), and what an operator
/// sees is printed.
#[tokio::test]
async fn an_etcd_client_certificate_close_to_its_expiry_raises_its_alert() {
    let bed = TestBed::start().await;
    bed.apply_crd().await;
    let pki = bed.dir.path().join("pki");
    let ca = support::tls::Ca::new(&pki.join("ca"), "podlease-test-ca");
    let (server_cert, server_key) = ca.server("server");
    let now = std::time::SystemTime::now();
    let (cert, key) = ca.client("podlease", "podlease", now - Duration::from_secs(90), now + Duration::from_secs(60));
    let certs = support::tls::Certs { ca: ca.cert.clone(), server_cert, server_key, client_cert: cert.clone(), client_key: key.clone() };
    let etcd = EtcdServer::start_tls(bed.dir.path(), "secure", &certs);
    let args = [
        "--etcd-endpoints", &etcd.endpoint(),
        "--etcd-ca", certs.ca.to_str().unwrap(),
        "--etcd-cert", cert.to_str().unwrap(),
        "--etcd-key", key.to_str().unwrap(),
    ];
    let c = Controller::start(&bed, "tls", &args).await;
    let prom = Prometheus::start(bed.dir.path(), &[c.metrics_port]);
    println!("PodleaseEtcdClientCertExpiring: {}", shown(&prom.wait_alert("PodleaseEtcdClientCertExpiring", "pending").await));
}

/// The three alerts the first scenario does not raise, each from a real cause on the bed:
/// keys that reach etcd late (a slow link to etcd while pods turn Ready), keepalive streams broken
/// again and again, and a leader whose writes keep being fenced off (the fence key rewritten
/// as another replica taking over would). What an operator sees is printed.
#[tokio::test]
async fn late_keys_broken_keepalives_and_fenced_writes_raise_their_alerts() {
    let bed = TestBed::start().await;
    bed.apply_crd().await;
    let proxy = support::proxy::FaultProxy::to_url(&bed.etcd_endpoint());
    let c = Controller::start(&bed, "a", &["--etcd-endpoints", &proxy.endpoint("http")]).await;
    let prom = Prometheus::start(bed.dir.path(), &[c.metrics_port]);
    wait_until("podlease scraped", Duration::from_secs(60), || async { prom.query("podlease_leader == 1").await.ok().filter(|r| r.len() == 1) }).await;
    let ns = "default";
    create_registration(&bed.kube, ns, "web", json!({"selector": {"matchLabels": {"app": "web"}}})).await;
    for i in 0..2 {
        let pod = format!("web-{i}");
        create_pod(&bed.kube, ns, &PodSpec::new(&pod).label("app", "web")).await;
        set_ready(&bed.kube, ns, &pod, &pod_ip(1 + i), true).await;
        wait_key(&bed.etcd, &format!("/services/web/{ns}/{pod}")).await;
    }
    // Healthy first (the very first evaluation may precede the first scrape).
    wait_until("no alert on a healthy install", Duration::from_secs(30), || async { prom.alerts().await.is_empty().then_some(()) }).await;

    // Pods turn Ready while every etcd round trip takes 4.4 s (2.2 s each way, under the 5 s
    // call timeout): their keys land that much after their Ready transitions. (A longer
    // outage or freeze would end the term, whose successor does not count transitions from
    // before it.)
    proxy.set_mode(support::proxy::Mode::Latency(Duration::from_millis(2200)));
    for i in 2..6 {
        let pod = format!("web-{i}");
        create_pod(&bed.kube, ns, &PodSpec::new(&pod).label("app", "web")).await;
        set_ready(&bed.kube, ns, &pod, &pod_ip(1 + i), true).await;
    }
    for i in 2..6 {
        wait_key(&bed.etcd, &format!("/services/web/{ns}/web-{i}")).await;
    }
    proxy.set_mode(support::proxy::Mode::Pass);
    println!("PodleasePropagationSlow: {}", shown(&prom.wait_alert("PodleasePropagationSlow", "pending").await));

    // Every etcd connection reset, four times, each once the keepalive stream is back.
    const KEEPALIVE_ERRORS: &str = "podlease_etcd_errors_total{op=\"keepalive\"}";
    for _ in 0..4 {
        let before = c.metric(KEEPALIVE_ERRORS).await;
        let renewals = c.metric("podlease_keepalive_requests_total").await;
        wait_until("keepalives flowing", Duration::from_secs(60), || async { (c.metric("podlease_keepalive_requests_total").await > renewals).then_some(()) }).await;
        proxy.reset_all();
        wait_until("the broken stream counted", Duration::from_secs(60), || async { (c.metric(KEEPALIVE_ERRORS).await > before).then_some(()) }).await;
    }
    println!("PodleaseKeepalivesFailing: {}", shown(&prom.wait_alert("PodleaseKeepalivesFailing", "pending").await));

    // The fence key rewritten while a pod flips, again and again: each write of the term
    // is refused, the term ends and the next one fences anew.
    let owners = keys(&bed.etcd, "/podlease/owners/").await;
    let names: Vec<String> = owners.iter().map(|kv| kv.key_str().unwrap().to_string()).collect();
    let fence = names.iter().find(|k| names.iter().any(|o| o.starts_with(&format!("{k}/")))).expect("the fence key").clone();
    let kv = bed.etcd.kv_client();
    let mut flip = false;
    wait_until("six fenced writes", Duration::from_secs(180), || {
        flip = !flip;
        let (mut kv, fence, kube, c) = (kv.clone(), fence.clone(), bed.kube.clone(), &c);
        let ready = flip;
        async move {
            if c.metric("podlease_fenced_writes_total").await >= 6.0 {
                return Some(());
            }
            // Only a term that leads has writes to refuse.
            if !c.leads().await {
                return None;
            }
            let current = kv.get(fence.as_str(), None).await.ok()?.kvs().first().map(|f| (f.value().to_vec(), f.lease()))?;
            kv.put(fence.as_str(), current.0, Some(etcd_client::PutOptions::new().with_lease(current.1))).await.ok()?;
            set_ready(&kube, ns, "web-0", &pod_ip(1), ready).await;
            None
        }
    })
    .await;
    println!("PodleaseFencedWrites: {}", shown(&prom.wait_alert("PodleaseFencedWrites", "firing").await));
}
