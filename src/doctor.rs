//! `podlease doctor`: with `run`'s own flags, finds what would stop podlease from working
//! and says what to do, before anyone reads code. It changes nothing but one 10 s lease the
//! etcd clock check grants and revokes.
//!
//! Checks, each in its module: the API server and its clock (`apiserver`, `clock`), every
//! API call podlease makes (`rbac`), the CRD (`crd`), TTLs against the leader failover
//! (`ttl`), every etcd endpoint on its own (`etcd`, with `etcd_http` for what a non-root
//! user cannot ask over gRPC) and the etcd version rule (`version`).

mod apiserver;
mod clock;
mod crd;
mod etcd;
mod etcd_http;
mod rbac;
mod ttl;
mod version;

use std::fmt;
use std::io::Write;
use std::time::Duration;

use serde::Serialize;

use crate::cli::{DoctorArgs, Output};
use crate::leader::LeaderConfig;

use clock::skew_finding;
pub use rbac::{Access, Scope, required};
use version::version_finding;

/// How long any one Kubernetes request of the doctor may take.
const KUBE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Level::Ok => "OK",
            Level::Warn => "WARN",
            Level::Fail => "FAIL",
        })
    }
}

/// One line of the report: what was found and, unless it is fine, what to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub level: Level,
    /// Which check: kubernetes, clock, rbac, crd, ttl, etcd, etcd-cluster, etcd-version.
    pub check: &'static str,
    pub found: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub todo: Option<String>,
}

impl Finding {
    pub fn ok(check: &'static str, found: impl Into<String>) -> Finding {
        Finding { level: Level::Ok, check, found: found.into(), todo: None }
    }

    pub fn warn(check: &'static str, found: impl Into<String>, todo: impl Into<String>) -> Finding {
        Finding { level: Level::Warn, check, found: found.into(), todo: Some(todo.into()) }
    }

    pub fn fail(check: &'static str, found: impl Into<String>, todo: impl Into<String>) -> Finding {
        Finding { level: Level::Fail, check, found: found.into(), todo: Some(todo.into()) }
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:<4} {:<13} {}", self.level.to_string(), self.check, self.found)?;
        if let Some(todo) = &self.todo {
            write!(f, " -> {todo}")?;
        }
        Ok(())
    }
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub findings: Vec<Finding>,
    pub fails: usize,
    pub warnings: usize,
}

impl Report {
    pub fn new(findings: Vec<Finding>) -> Report {
        let count = |l| findings.iter().filter(|f| f.level == l).count();
        Report { fails: count(Level::Fail), warnings: count(Level::Warn), findings }
    }

    /// 0 when nothing FAILs, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        i32::from(self.fails > 0)
    }
}

/// Runs every check and prints the report; the process exit code. `kube` is the client
/// `run` would make from the same flags (or why it could not be made).
pub async fn run(args: DoctorArgs, kube: anyhow::Result<kube::Client>) -> i32 {
    let report = Report::new(check(&args, kube).await);
    let mut out = std::io::stdout().lock();
    let written = match args.output {
        Output::Json => serde_json::to_writer(&mut out, &report).map_err(std::io::Error::from).and_then(|_| writeln!(out)),
        Output::Text => report.findings.iter().try_for_each(|f| writeln!(out, "{f}")).and_then(|_| {
            writeln!(out, "{} FAIL, {} WARN, {} checks", report.fails, report.warnings, report.findings.len())
        }),
    };
    if written.and_then(|_| out.flush()).is_err() {
        return 1;
    }
    report.exit_code()
}

async fn check(args: &DoctorArgs, kube: anyhow::Result<kube::Client>) -> Vec<Finding> {
    let run = &args.run;
    let failover = run.leader_elect.then(|| {
        LeaderConfig::new(run.leader_namespace(), run.leader_election_name.clone(), "doctor".into(), Duration::from_secs(run.leader_lease_duration.max(2)))
            .worst_failover()
    });
    let scope = Scope::of(run);
    let mut findings = Vec::new();
    if let Err(e) = run.defaults() {
        findings.push(Finding::fail("flags", format!("the flags contradict each other: {e}"), "fix the flags; podlease run refuses to start with them"));
    }
    let default_ttl = ttl::default_ttl(run.default_ttl, failover);

    let kube_side = async {
        let client = match kube {
            Ok(c) => c,
            Err(e) => {
                let no_client = Finding::fail("kubernetes", format!("no Kubernetes client: {}", chain(e.as_ref())), "check --kubeconfig / $KUBECONFIG, or run inside the cluster");
                return vec![no_client, default_ttl];
            }
        };
        let (reached, sample) = match apiserver::reach(&client).await {
            Ok(r) => r,
            Err(unreached) => return vec![unreached, default_ttl],
        };
        let mut found = vec![reached];
        found.push(match sample {
            Some(sample) => skew_finding(&sample.skew()),
            None => Finding::warn("clock", "the API server's answer has no Date header: the clock was not compared", "compare this host's clock with the cluster's by hand (date -u)"),
        });
        found.extend(rbac::review(&client, &required(&scope)).await);
        let (installed, crd_present) = crd::check(&client).await;
        found.push(installed);
        found.push(default_ttl);
        if crd_present {
            found.extend(ttl::registrations(&client, &scope.namespaces, failover).await);
        }
        found.extend(ttl::annotated_pods(&client, &scope.namespaces, failover).await);
        found
    };
    let (etcd_config, probes) = (run.etcd.config(), probes(run));
    let etcd_side = etcd::check(&etcd_config, &probes);
    let (kube_findings, etcd_findings) = tokio::join!(kube_side, etcd_side);
    findings.extend(kube_findings);
    findings.extend(etcd_findings);
    findings
}

/// The etcd prefixes podlease reads and writes: the ownership records, and the default
/// format's key prefix (unless it is empty: keys are then the service names themselves).
fn probes(run: &crate::cli::RunArgs) -> etcd::Probes {
    let mut probes = vec![("ownership records".to_string(), run.owner_prefix.as_str().to_string())];
    let prefix = run.default_prefix.as_ref().map(|p| p.as_str().to_string()).unwrap_or_else(|| run.default_format.layout().default_prefix().to_string());
    if !prefix.trim_matches('/').is_empty() {
        probes.push((format!("keys of the default format ({})", run.default_format), prefix));
    }
    probes
}

/// `e` with its causes, as one line (tonic and hyper keep the useful part in the chain).
pub(crate) fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let s = c.to_string();
        if !text.contains(&s) {
            text.push_str(": ");
            text.push_str(&s);
        }
        cause = c.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_finding_is_one_line_with_what_to_do_and_the_exit_code_follows_the_fails() {
        let f = Finding::fail("etcd", "https://a:2379: connection refused", "check the address");
        assert_eq!(f.to_string(), "FAIL etcd          https://a:2379: connection refused -> check the address");
        assert_eq!(Finding::ok("crd", "installed").to_string(), "OK   crd           installed");
        assert_eq!(Report::new(vec![Finding::ok("a", "x"), Finding::warn("b", "y", "z")]).exit_code(), 0);
        let r = Report::new(vec![Finding::ok("a", "x"), f]);
        assert_eq!((r.exit_code(), r.fails, r.warnings), (1, 1, 0));
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["findings"][1]["level"], "fail");
        assert_eq!(json["findings"][0].get("todo"), None);
    }
}
