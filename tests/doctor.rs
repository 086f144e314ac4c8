//! `podlease doctor` on the real bed: the chart's own setup (its RBAC through its
//! ServiceAccount's token, a TLS etcd with client certificates and auth) passes with no FAIL
//! and exit 0; then each misconfiguration alone gives its FAIL (or WARN) line and exit code.
//! And the doctor's list of API calls is exactly what the chart grants (which tests/chart.rs
//! proves is what the controller calls).

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use clap::Parser;
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::ClusterRole;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::CustomResourceExt;
use podlease::cli::{Cli, Commands};
use podlease::doctor::{Scope, required};
use serde_json::{Value, json};
use support::etcd::etcdctl_ok;
use support::helm::{apply, render};
use support::*;

const RELEASE: &str = "rel";
const NS: &str = "podlease-system";
const PASSWORD: &str = "Dr-s3cret-9Qv";

/// One finding as printed: (level, check, the rest of the line).
#[derive(Debug, Clone)]
struct Line {
    level: String,
    check: String,
    text: String,
}

/// What one `podlease doctor` run printed and its exit code.
struct Run {
    code: i32,
    output: String,
}

impl Run {
    fn lines(&self) -> Vec<Line> {
        self.output
            .lines()
            .filter_map(|l| {
                let (level, rest) = l.split_once(' ')?;
                matches!(level, "OK" | "WARN" | "FAIL").then_some(())?;
                let (check, text) = rest.trim_start().split_once(' ')?;
                Some(Line { level: level.into(), check: check.into(), text: text.trim_start().into() })
            })
            .collect()
    }

    fn with(&self, level: &str) -> Vec<Line> {
        self.lines().into_iter().filter(|l| l.level == level).collect()
    }

    /// The one `level` line of `check` containing every part of `parts`; panics otherwise.
    fn line(&self, level: &str, check: &str, parts: &[&str]) -> Line {
        let found: Vec<Line> = self.lines().into_iter().filter(|l| l.level == level && l.check == check && parts.iter().all(|p| l.text.contains(p))).collect();
        assert_eq!(found.len(), 1, "expected one {level} {check} line with {parts:?}:\n{}", self.output);
        found[0].clone()
    }

    /// No FAIL line, exit 0.
    fn passes(&self) {
        assert!(self.with("FAIL").is_empty() && self.code == 0, "expected no FAIL and exit 0 (got {}):\n{}", self.code, self.output);
    }

    /// Exactly the FAIL lines of `check`, exit 1.
    fn fails_only(&self, check: &str) {
        assert_eq!(self.code, 1, "{}", self.output);
        let other: Vec<Line> = self.with("FAIL").into_iter().filter(|l| l.check != check).collect();
        assert!(other.is_empty(), "only {check} should FAIL:\n{}", self.output);
    }
}

/// Runs `podlease doctor` with `args` (dies with the test) and waits for it to exit.
async fn doctor(dir: &Path, name: &str, kubeconfig: &Path, args: &[String]) -> Run {
    let log = dir.join(format!("doctor-{name}.log"));
    let mut cmd = Command::new(support::controller::binary());
    cmd.arg("doctor").arg("--kubeconfig").arg(kubeconfig).args(args).env("POD_NAMESPACE", NS).env_remove("PODLEASE_LOG_LEVEL");
    let mut child = spawn_owned(&mut cmd, &log);
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > DEADLINE {
            let _ = child.kill();
            panic!("podlease doctor ({name}) did not finish within {DEADLINE:?}:\n{}", std::fs::read_to_string(&log).unwrap_or_default());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    let output = std::fs::read_to_string(&log).unwrap();
    println!("--- podlease doctor ({name}), {:.1} s, {status}:\n{output}", start.elapsed().as_secs_f64());
    Run { code: status.code().expect("exited, not killed"), output }
}

/// `args` with `flag` set to `value` (the chart's `--flag=value` replaced).
fn with_flag(args: &[String], flag: &str, value: &str) -> Vec<String> {
    let mut out: Vec<String> = args.iter().filter(|a| !a.starts_with(&format!("{flag}="))).cloned().collect();
    out.push(format!("{flag}={value}"));
    out
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// A one-member TLS etcd requiring client certificates, with auth on: user `podlease`
/// (PASSWORD) may read and write `/podlease/` and `/services/`, as the runbook sets it up.
struct SecureEtcd {
    server: EtcdServer,
    certs: tls::Certs,
    password_file: PathBuf,
}

impl SecureEtcd {
    async fn start(dir: &Path) -> SecureEtcd {
        let certs = tls::make(&dir.join("pki"));
        let server = EtcdServer::start_tls(dir, "secure", &certs);
        let ep = server.endpoint();
        wait_until("the TLS etcd is healthy", DEADLINE, || async {
            support::etcd::etcdctl(&ep, Some(&certs), &["endpoint", "health"]).status.success().then_some(())
        })
        .await;
        let ctl = |args: &[&str]| etcdctl_ok(&ep, Some(&certs), args);
        ctl(&["user", "add", "root", "--new-user-password=root-Pw-1x"]);
        ctl(&["role", "add", "podlease"]);
        ctl(&["role", "grant-permission", "podlease", "readwrite", "/podlease/", "--prefix=true"]);
        ctl(&["role", "grant-permission", "podlease", "readwrite", "/services/", "--prefix=true"]);
        ctl(&["user", "add", "podlease", &format!("--new-user-password={PASSWORD}")]);
        ctl(&["user", "grant-role", "podlease", "podlease"]);
        ctl(&["auth", "enable"]);
        let password_file = dir.join("etcd-password");
        std::fs::write(&password_file, format!("{PASSWORD}\n")).unwrap();
        SecureEtcd { server, certs, password_file }
    }

    /// The flags a TLS + auth install passes (endpoints included).
    fn flags(&self, ca: &Path) -> Vec<String> {
        [
            "--etcd-endpoints", &self.server.endpoint(),
            "--etcd-ca", ca.to_str().unwrap(),
            "--etcd-cert", self.certs.client_cert.to_str().unwrap(),
            "--etcd-key", self.certs.client_key.to_str().unwrap(),
            "--etcd-username", "podlease",
            "--etcd-password-file", self.password_file.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }
}

fn find<'a>(objects: &'a [Value], kind: &str) -> Vec<&'a Value> {
    objects.iter().filter(|o| o["kind"] == kind).collect()
}

/// The Deployment's container args, as a user would copy them: but for the etcd flags the
/// test gives itself, the metrics address and the log format (text, as at a terminal).
fn deployment_args(objects: &[Value]) -> Vec<String> {
    let d = find(objects, "Deployment")[0];
    d["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .skip_while(|a| a == "run")
        .filter(|a| !a.starts_with("--etcd-") && !a.starts_with("--metrics-addr") && !a.starts_with("--log-format"))
        .collect()
}

/// Applies the chart's ServiceAccount and RBAC; a kubeconfig with the ServiceAccount's token.
async fn chart_identity(bed: &TestBed, objects: &[Value]) -> PathBuf {
    ensure_namespace(&bed.kube, NS).await;
    for obj in objects.iter().filter(|o| matches!(o["kind"].as_str(), Some("ServiceAccount" | "ClusterRole" | "ClusterRoleBinding" | "Role" | "RoleBinding"))) {
        apply(&bed.kube, obj).await;
    }
    let sa = find(objects, "ServiceAccount")[0]["metadata"]["name"].as_str().unwrap().to_string();
    let sas: Api<ServiceAccount> = Api::namespaced(bed.kube.clone(), NS);
    let req = json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {"expirationSeconds": 3600}});
    let tr: Value = sas.create_subresource("token", &sa, &PostParams::default(), &req).await.expect("TokenRequest");
    bed.kubeconfig_with_token("chart-sa", tr["status"]["token"].as_str().unwrap())
}

#[tokio::test]
async fn the_charts_setup_passes_and_each_kubernetes_side_misconfiguration_is_named() {
    let bed = TestBed::start().await;
    let dir = bed.dir.path();
    let etcd = SecureEtcd::start(dir).await;
    let objects = render(&json!({}), RELEASE, NS);
    let kubeconfig = chart_identity(&bed, &objects).await;
    let mut args = deployment_args(&objects);
    args.extend(etcd.flags(&etcd.certs.ca));

    // The CRD not installed yet: annotation mode works, so a warning, exit 0.
    let run = doctor(dir, "no-crd", &kubeconfig, &args).await;
    run.passes();
    run.line("WARN", "crd", &["is not installed"]);

    // The chart's setup as it is: nothing FAILs, nothing warns, every check said OK.
    bed.apply_crd().await;
    let run = doctor(dir, "correct", &kubeconfig, &args).await;
    run.passes();
    assert!(run.with("WARN").is_empty(), "{}", run.output);
    run.line("OK", "kubernetes", &[&format!("the API server answers ({})", Binaries::locate().kube_version)]);
    run.line("OK", "clock", &["agrees with the API server's"]);
    run.line("OK", "clock", &["etcd's lease clock", "runs at our rate"]);
    run.line("OK", "rbac", &["all 14 API calls podlease makes are allowed"]);
    run.line("OK", "crd", &["is this version's"]);
    run.line("OK", "ttl", &["--default-ttl 30 s outlives a leader failover (19 s; at least 29 s needed)"]);
    run.line("OK", "ttl", &["the TTLs of all 0 ServiceRegistrations"]);
    run.line("OK", "ttl", &["the podlease.io/ttl of all 0 annotated pods that set one outlive a leader failover"]);
    run.line("OK", "etcd", &[&etcd.server.endpoint(), "TLS with a client certificate, as user \"podlease\""]);
    run.line("OK", "etcd-version", &["runs etcd 3.6."]);
    run.line("OK", "etcd-cluster", &["every answering endpoint (1) is in cluster"]);
    run.line("OK", "etcd-cluster", &["reach every voting member (1)"]);
    run.line("OK", "etcd-access", &["ownership records under \"/podlease/owners/\""]);
    run.line("OK", "etcd-access", &["keys of the default format (json) under \"/services/\""]);
    assert!(!run.output.contains(PASSWORD), "the password was printed");

    // The same as JSON: one object, every finding.
    let mut json_args = args.clone();
    json_args.extend(strings(&["--output", "json"]));
    let run = doctor(dir, "json", &kubeconfig, &json_args).await;
    let report: Value = run.output.lines().find_map(|l| serde_json::from_str(l).ok()).expect("a JSON report");
    assert_eq!((report["fails"].as_u64(), report["warnings"].as_u64(), run.code), (Some(0), Some(0), 0), "{}", run.output);
    assert_eq!(report["findings"].as_array().unwrap().len(), 14, "{report:#}");
    assert!(report["findings"].as_array().unwrap().iter().all(|f| f["level"] == "ok" && f["check"].is_string() && f["found"].is_string()));

    // RBAC missing a verb: the cluster-wide role without patch on pods/status.
    let role_name = find(&objects, "ClusterRole").iter().find(|r| r["rules"].to_string().contains("pods/status")).unwrap()["metadata"]["name"].as_str().unwrap().to_string();
    let roles: Api<ClusterRole> = Api::all(bed.kube.clone());
    let mut role = roles.get(&role_name).await.unwrap();
    let intact = role.clone();
    role.rules.as_mut().unwrap().retain(|r| !r.resources.iter().flatten().any(|x| x == "pods/status"));
    role.metadata.managed_fields = None;
    roles.replace(&role_name, &PostParams::default(), &role).await.unwrap();
    let run = doctor(dir, "rbac", &kubeconfig, &args).await;
    run.fails_only("rbac");
    let line = run.line("FAIL", "rbac", &["may not patch pods/status in all namespaces (the readiness gate podlease.io/registered)"]);
    assert!(line.text.contains("-> grant {apiGroups: [\"\"], resources: [pods/status], verbs: [patch]} in a ClusterRole"), "{}", line.text);
    let mut back = roles.get(&role_name).await.unwrap();
    back.rules = intact.rules;
    roles.replace(&role_name, &PostParams::default(), &back).await.unwrap();

    // A CRD of another version: an older schema without a printer column.
    let crds: Api<CustomResourceDefinition> = Api::all(bed.kube.clone());
    let mut older = podlease::registration::ServiceRegistration::crd();
    older.spec.versions[0].additional_printer_columns.as_mut().unwrap().retain(|c| c.name != "TTL");
    crds.patch(&older.metadata.name.clone().unwrap(), &PatchParams::apply("podlease-tests").force(), &Patch::Apply(&older)).await.unwrap();
    let run = doctor(dir, "old-crd", &kubeconfig, &args).await;
    run.fails_only("crd");
    run.line("FAIL", "crd", &["is not this version's (version v1alpha1: printer columns differ)", "podlease crd | kubectl apply -f -"]);
    bed.apply_crd().await;

    // A ServiceRegistration with a TTL shorter than a failover: a warning naming it.
    create_registration(&bed.kube, "default", "short", json!({"selector": {"matchLabels": {"app": "short"}}, "ttlSeconds": 10})).await;
    create_registration(&bed.kube, "default", "fine", json!({"selector": {"matchLabels": {"app": "fine"}}})).await;
    let run = doctor(dir, "short-registration", &kubeconfig, &args).await;
    run.passes();
    run.line("WARN", "ttl", &["ServiceRegistration default/short: a TTL of 10 s is shorter than a leader failover", "set its spec.ttlSeconds to at least 29 s"]);
    assert_eq!(run.with("WARN").len(), 1, "only the short one:\n{}", run.output);

    // An annotated pod whose podlease.io/ttl is shorter than a failover: a warning naming it
    // (the pod's own ShortTTL Event says the same); one at 30 s passes.
    for (name, ttl) in [("short-pod", "10"), ("fine-pod", "30")] {
        create_pod(&bed.kube, "default", &PodSpec::new(name).annotation("podlease.io/service", "cart").annotation("podlease.io/ttl", ttl)).await;
    }
    let run = doctor(dir, "short-annotation", &kubeconfig, &args).await;
    run.passes();
    run.line("WARN", "ttl", &["pod default/short-pod (podlease.io/ttl: 10): a TTL of 10 s is shorter than a leader failover", "set its podlease.io/ttl to at least 29 s"]);
    assert_eq!(run.with("WARN").len(), 2, "the short registration and the short pod only:\n{}", run.output);

    // --default-ttl shorter than a failover: the operator's own flag, a FAIL.
    let short = with_flag(&args, "--default-ttl", "20");
    let run = doctor(dir, "short-default", &kubeconfig, &short).await;
    run.fails_only("ttl");
    run.line("FAIL", "ttl", &["--default-ttl: a TTL of 20 s is shorter than a leader failover", "set --default-ttl to at least 29 s"]);
    // A shorter Lease duration makes it fine again (the rule follows the flags).
    let shorter_lease = with_flag(&short, "--leader-lease-duration", "10");
    doctor(dir, "short-default-short-lease", &kubeconfig, &shorter_lease).await.line("OK", "ttl", &["--default-ttl 20 s outlives a leader failover (13 s"]);
}

#[tokio::test]
async fn each_etcd_side_misconfiguration_is_named() {
    let bed = TestBed::start().await;
    bed.apply_crd().await;
    let dir = bed.dir.path();
    let admin = bed.kubeconfig.clone();
    let etcd = SecureEtcd::start(dir).await;
    let good = etcd.flags(&etcd.certs.ca);
    doctor(dir, "secure", &admin, &good).await.passes();

    // A wrong password: an authentication failure, and the password is never printed.
    let wrong = dir.join("wrong-password");
    std::fs::write(&wrong, "Wr0ng-Pw-4Zt").unwrap();
    let mut args = good.clone();
    let i = args.iter().position(|a| a == "--etcd-password-file").unwrap();
    args[i + 1] = wrong.to_str().unwrap().into();
    let run = doctor(dir, "wrong-password", &admin, &args).await;
    run.fails_only("etcd");
    run.line("FAIL", "etcd", &[&etcd.server.endpoint(), "authentication failed", "check --etcd-username and the password in --etcd-password-file"]);
    assert!(!run.output.contains("Wr0ng-Pw-4Zt") && !run.output.contains(PASSWORD), "a password was printed");

    // A user whose role may only read the default format's prefix: writing there is refused,
    // and the Txn that finds out writes nothing.
    let ep = etcd.server.endpoint();
    let root = |args: &[&str]| {
        let mut all = vec!["--user=root:root-Pw-1x"];
        all.extend_from_slice(args);
        etcdctl_ok(&ep, Some(&etcd.certs), &all);
    };
    root(&["role", "add", "narrow"]);
    root(&["role", "grant-permission", "narrow", "readwrite", "/podlease/", "--prefix=true"]);
    root(&["role", "grant-permission", "narrow", "read", "/services/", "--prefix=true"]);
    root(&["user", "add", "narrow", &format!("--new-user-password={PASSWORD}")]);
    root(&["user", "grant-role", "narrow", "narrow"]);
    let narrow: Vec<String> = good.iter().map(|a| if a == "podlease" { "narrow".to_string() } else { a.clone() }).collect();
    let run = doctor(dir, "narrow-role", &admin, &narrow).await;
    run.fails_only("etcd-access");
    run.line("OK", "etcd-access", &["ownership records under \"/podlease/owners/\""]);
    run.line("FAIL", "etcd-access", &["keys of the default format (json) under \"/services/\": writing: PermissionDenied", "grant-permission"]);
    let probe = support::etcd::etcdctl(&ep, Some(&etcd.certs), &["--user=root:root-Pw-1x", "get", "--prefix", "/", "--keys-only"]);
    assert!(!String::from_utf8_lossy(&probe.stdout).contains("podlease-doctor-probe"), "the probe wrote a key");

    // An API server that does not answer: its FAIL, the etcd checks still run.
    let nowhere = bed.kubeconfig_for_port("nowhere", free_port());
    let run = doctor(dir, "no-apiserver", &nowhere, &good).await;
    run.fails_only("kubernetes");
    run.line("FAIL", "kubernetes", &["the API server cannot be reached", "Connection refused"]);
    run.line("OK", "etcd-version", &["runs etcd 3.6."]);

    // A CA that did not sign etcd's certificate.
    let other = tls::make(&dir.join("other-pki"));
    let run = doctor(dir, "wrong-ca", &admin, &etcd.flags(&other.ca)).await;
    run.fails_only("etcd");
    run.line("FAIL", "etcd", &[&etcd.server.endpoint(), "not signed by --etcd-ca"]);

    // One endpoint of two unreachable: its FAIL, the other still OK.
    let dead = format!("https://127.0.0.1:{}", free_port());
    let mut args = good.clone();
    args[1] = format!("{},{dead}", etcd.server.endpoint());
    let run = doctor(dir, "one-unreachable", &admin, &args).await;
    run.fails_only("etcd");
    run.line("FAIL", "etcd", &[&dead, "nothing listens there"]);
    run.line("OK", "etcd", &[&etcd.server.endpoint(), "answers"]);

    // Endpoints of two different clusters (plain etcds).
    let second = EtcdServer::start(dir, "second");
    let plain = |eps: &[String]| strings(&["--etcd-endpoints", &eps.join(",")]);
    let run = doctor(dir, "two-clusters", &admin, &plain(&[bed.etcd_endpoint(), second.endpoint()])).await;
    run.fails_only("etcd-cluster");
    run.line("FAIL", "etcd-cluster", &["different etcd clusters", &bed.etcd_endpoint(), &second.endpoint()]);
    assert!(!run.output.contains("voting member"), "no member coverage across two clusters:\n{}", run.output);

    // A three-member cluster: all endpoints reach all members; one endpoint alone warns.
    let members = EtcdServer::start_cluster(dir, "trio", 3);
    let all: Vec<String> = members.iter().map(|m| m.endpoint()).collect();
    let run = doctor(dir, "trio", &admin, &plain(&all)).await;
    run.passes();
    run.line("OK", "etcd-cluster", &["every answering endpoint (3) is in cluster"]);
    run.line("OK", "etcd-cluster", &["reach every voting member (3)"]);
    let run = doctor(dir, "trio-one-endpoint", &admin, &plain(&all[..1])).await;
    run.passes();
    run.line("WARN", "etcd-cluster", &["no answering endpoint reaches member(s) trio1", "trio2", "add every member to --etcd-endpoints"]);

    // A real etcd older than 3.5.13: Debian bookworm's 3.4.23, with its lease bug named.
    let old = OldEtcd::start(dir);
    let run = doctor(dir, "etcd-3.4", &admin, &plain(&[old.endpoint.clone()])).await;
    run.fails_only("etcd-version");
    run.line("FAIL", "etcd-version", &["runs etcd 3.4.23, which has known lease bugs", "leases wrongly revoked by the leader", "etcd#17425, fixed in 3.5.13 and 3.4.31", "upgrade every member to etcd 3.5.13 or later"]);
}

/// Debian bookworm's etcd 3.4.23 (scripts/testbed.sh unpacks it), one member, plain.
struct OldEtcd {
    endpoint: String,
    _child: std::process::Child,
}

impl OldEtcd {
    fn start(dir: &Path) -> OldEtcd {
        let bin = testbed_path("PODLEASE_ETCD_OLD_BIN");
        let (client, peer) = (free_port(), free_port());
        let endpoint = format!("http://127.0.0.1:{client}");
        let mut cmd = Command::new(bin);
        cmd.args(["--name", "old", "--data-dir"])
            .arg(dir.join("etcd-old"))
            .args(["--listen-client-urls", &endpoint, "--advertise-client-urls", &endpoint])
            .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}"), "--initial-advertise-peer-urls", &format!("http://127.0.0.1:{peer}")])
            .args(["--initial-cluster", &format!("old=http://127.0.0.1:{peer}"), "--log-level", "warn", "--logger", "zap"]);
        let child = spawn_owned(&mut cmd, &dir.join("etcd-old.log"));
        let start = Instant::now();
        while !support::etcd::etcdctl(&endpoint, None, &["endpoint", "health"]).status.success() {
            assert!(start.elapsed() < DEADLINE, "etcd 3.4 did not become healthy: {}", std::fs::read_to_string(dir.join("etcd-old.log")).unwrap_or_default());
            std::thread::sleep(Duration::from_millis(100));
        }
        OldEtcd { endpoint, _child: child }
    }
}

impl Drop for OldEtcd {
    fn drop(&mut self) {
        let _ = self._child.kill();
        let _ = self._child.wait();
    }
}

/// A path scripts/testbed.sh wrote into testbed.env (or the environment has).

/// (apiGroup, resource[/subresource], verb, resourceName, namespace) as RBAC rules grant it.
type Grant = (String, String, String, Option<String>, Option<String>);

/// What the rendered Roles and ClusterRoles grant (every one is bound to the chart's
/// ServiceAccount), in the doctor's terms.
fn granted(objects: &[Value]) -> BTreeSet<Grant> {
    let mut out = BTreeSet::new();
    for role in objects.iter().filter(|o| o["kind"] == "ClusterRole" || o["kind"] == "Role") {
        let ns = (role["kind"] == "Role").then(|| role["metadata"]["namespace"].as_str().unwrap().to_string());
        for rule in role["rules"].as_array().unwrap() {
            let names: Vec<Option<String>> = match rule["resourceNames"].as_array() {
                Some(n) => n.iter().map(|n| Some(n.as_str().unwrap().to_string())).collect(),
                None => vec![None],
            };
            let each = |k: &str| rule[k].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect::<Vec<_>>();
            for g in each("apiGroups") {
                for r in each("resources") {
                    for v in each("verbs") {
                        for n in &names {
                            out.insert((g.clone(), r.clone(), v.clone(), n.clone(), ns.clone()));
                        }
                    }
                }
            }
        }
    }
    out
}

#[test]
fn the_doctors_list_of_api_calls_is_what_the_chart_grants() {
    let value_sets = [
        json!({}),
        json!({"watchNamespaces": ["team-a", "team-b"], "clusterId": "prod-eu-1"}),
        json!({"replicaCount": 1, "leaderElection": {"enabled": false}}),
    ];
    for values in value_sets {
        let objects = render(&values, RELEASE, NS);
        let args = deployment_args(&objects);
        let cli = Cli::try_parse_from(["podlease", "doctor"].into_iter().map(String::from).chain(args.clone())).unwrap_or_else(|e| panic!("{args:?}: {e}"));
        let Commands::Doctor(doctor) = cli.command else { unreachable!() };
        let asked: BTreeSet<Grant> = required(&Scope::of(&doctor.run))
            .into_iter()
            .map(|a| {
                let resource = a.subresource.map_or(a.resource.to_string(), |s| format!("{}/{s}", a.resource));
                (a.group.to_string(), resource, a.verb.to_string(), a.name, a.namespace)
            })
            .collect();
        assert_eq!(asked, granted(&objects), "values {values}");
    }
}
