//! Command-line interface. Every `run` flag can also come from a `PODLEASE_*` variable.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::desired::Defaults;
use crate::etcd::EtcdConfig;
use crate::format::Format;
use crate::registration::{MAX_TTL_SECONDS, MIN_TTL_SECONDS};
use crate::validate::{AllowedPrefix, Prefix};

#[derive(Debug, Parser)]
#[command(name = "podlease", version, about = "Publishes Kubernetes pod readiness into etcd: one lease per ready pod, kept alive, revoked the moment the pod stops being ready.")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Commands,
    #[command(flatten)]
    pub log: LogArgs,
}

#[derive(Debug, Subcommand)]
pub enum Commands {
    /// Run the controller.
    Run(RunArgs),
    /// Print the ServiceRegistration CRD as YAML.
    Crd,
    /// Show what etcd holds for a service, as its consumers read it.
    Get(GetArgs),
    /// Check, with `run`'s flags, what would stop podlease from working: RBAC, the CRD,
    /// every etcd endpoint, the etcd version, TTLs against the failover time, the clock.
    /// Exits 1 when a check FAILs.
    Doctor(DoctorArgs),
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Args)]
pub struct LogArgs {
    /// Log level or tracing filter (e.g. `info`, `podlease=debug`).
    #[arg(long, global = true, env = "PODLEASE_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
    /// Log format: text, or json (one JSON object per line).
    #[arg(long, global = true, env = "PODLEASE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(Debug, Args, Clone)]
pub struct EtcdArgs {
    /// etcd endpoints, comma separated: every member of one cluster. With more than one, each
    /// is asked alone for its member list at start (within --etcd-timeout), and endpoints that
    /// answer from different clusters stop the process with an error; an endpoint that does
    /// not answer then is not compared.
    #[arg(long, env = "PODLEASE_ETCD_ENDPOINTS", value_delimiter = ',', default_value = "http://127.0.0.1:2379")]
    pub etcd_endpoints: Vec<String>,
    /// CA bundle that signed the etcd server certificates (enables TLS).
    #[arg(long, env = "PODLEASE_ETCD_CA")]
    pub etcd_ca: Option<PathBuf>,
    /// Client certificate for etcd mutual TLS.
    #[arg(long, env = "PODLEASE_ETCD_CERT")]
    pub etcd_cert: Option<PathBuf>,
    /// Client key for etcd mutual TLS.
    #[arg(long, env = "PODLEASE_ETCD_KEY")]
    pub etcd_key: Option<PathBuf>,
    /// etcd user (with --etcd-password-file).
    #[arg(long, env = "PODLEASE_ETCD_USERNAME")]
    pub etcd_username: Option<String>,
    /// File holding the etcd password (never passed on the command line).
    #[arg(long, env = "PODLEASE_ETCD_PASSWORD_FILE")]
    pub etcd_password_file: Option<PathBuf>,
    /// Deadline of every etcd request, in seconds.
    #[arg(long, env = "PODLEASE_ETCD_TIMEOUT", default_value_t = 5)]
    pub etcd_timeout: u64,
}

impl EtcdArgs {
    pub fn config(&self) -> EtcdConfig {
        EtcdConfig {
            endpoints: self.etcd_endpoints.clone(),
            ca: self.etcd_ca.clone(),
            cert: self.etcd_cert.clone(),
            key: self.etcd_key.clone(),
            username: self.etcd_username.clone(),
            password_file: self.etcd_password_file.clone(),
            call_timeout: Duration::from_secs(self.etcd_timeout.max(1)),
        }
    }
}

fn parse_ttl(s: &str) -> Result<i64, String> {
    let t: i64 = s.trim_end_matches('s').parse().map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if (MIN_TTL_SECONDS..=MAX_TTL_SECONDS).contains(&t) {
        Ok(t)
    } else {
        Err(format!("{t} is not in {MIN_TTL_SECONDS}..{MAX_TTL_SECONDS}"))
    }
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// Format of annotated pods that do not set podlease.io/format.
    #[arg(long, env = "PODLEASE_DEFAULT_FORMAT", default_value = "json")]
    pub default_format: Format,
    /// Key prefix for the default format (default: that format's own, `/services` for json).
    /// Always allowed for the default format.
    #[arg(long, env = "PODLEASE_DEFAULT_PREFIX")]
    pub default_prefix: Option<Prefix>,
    /// Key prefixes podlease may write under, repeatable or comma separated: `FORMAT=PREFIX`
    /// for one format (`json=/services`, `etcd-naming=` for the empty prefix) or `PREFIX`
    /// for every format. A registration or annotation naming another prefix is refused.
    /// Default: each format's own prefix, for that format only. A list replaces the default.
    #[arg(long = "allowed-prefix", env = "PODLEASE_ALLOWED_PREFIXES", value_delimiter = ',')]
    pub allowed_prefix: Vec<AllowedPrefix>,
    /// Service names that any namespace may publish (repeatable or comma separated). Every
    /// other service name (under a given read prefix) belongs to the first namespace that
    /// asks for it (a ServiceRegistration or an annotated pod, ready or not), as long as one
    /// of them exists: another namespace is refused (ServiceClaimed). Only the cluster admin
    /// sets this; no namespace can.
    #[arg(long = "shared-service", env = "PODLEASE_SHARED_SERVICES", value_delimiter = ',')]
    pub shared_service: Vec<String>,
    /// Lease TTL in seconds of annotated pods without podlease.io/ttl, 5..3600 (a
    /// ServiceRegistration's ttlSeconds has its own default, 30). It must outlive a leader
    /// failover: a lease has two thirds of its TTL left when the leader dies, and a standby
    /// may take --leader-lease-duration plus two retry periods to lead (19 s at the
    /// defaults). With leader election on, a TTL below 1.5 × that (29 s at the defaults) is
    /// logged as a warning at start; the keys are published all the same.
    #[arg(long, env = "PODLEASE_DEFAULT_TTL", default_value = "30", value_parser = parse_ttl)]
    pub default_ttl: i64,
    /// Where ownership records live in etcd (absolute; never writable by a registration).
    #[arg(long, env = "PODLEASE_OWNER_PREFIX", default_value = "/podlease/owners")]
    pub owner_prefix: Prefix,
    /// Cluster id in ownership records (default: the UID of namespace kube-system).
    #[arg(long, env = "PODLEASE_CLUSTER_ID", value_parser = parse_cluster_id)]
    pub cluster_id: Option<String>,
    /// This install's identity within the cluster: it scopes the leader fence and the
    /// ownership records, so several installs share a cluster and an etcd. Default:
    /// `<leader Lease namespace>.<leader Lease name>` (the chart passes `<namespace>.<release>`).
    #[arg(long, env = "PODLEASE_INSTALL_ID", value_parser = parse_install_id)]
    pub install_id: Option<String>,
    /// Take over the ownership records of an earlier identity (after changing the cluster id,
    /// the install id or the owner prefix): its path, as the refusal to start names it, e.g.
    /// `/podlease/owners/<old-cluster-id>/<install-id>`. Keys and leases stay as they are.
    #[arg(long, env = "PODLEASE_MIGRATE_FROM")]
    pub migrate_from: Option<Prefix>,
    /// Namespace to watch (repeatable, or comma separated); default: all namespaces.
    #[arg(long, env = "PODLEASE_WATCH_NAMESPACE", value_delimiter = ',')]
    pub watch_namespace: Vec<String>,
    /// Address for /healthz, /readyz and /metrics.
    #[arg(long, env = "PODLEASE_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    pub metrics_addr: SocketAddr,
    /// Path to a kubeconfig (default: $KUBECONFIG, ~/.kube/config, or in-cluster).
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// etcd operations in flight at once.
    #[arg(long, env = "PODLEASE_CONCURRENCY", default_value_t = 128)]
    pub concurrency: usize,
    /// Leases granted ahead of time per TTL in use, so that a pod turning Ready costs one
    /// etcd write (its key's Txn) instead of a grant and then the Txn; 0 turns it off.
    /// They are kept alive while this replica leads and expire within their TTL, holding
    /// nothing, once it stops.
    #[arg(long, env = "PODLEASE_LEASE_POOL_SIZE", default_value_t = 16)]
    pub lease_pool_size: usize,
    /// Elect one leader among replicas (a coordination.k8s.io Lease); only it writes.
    #[arg(long, env = "PODLEASE_LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_elect: bool,
    /// Namespace of the leader Lease (default: $POD_NAMESPACE, else `default`).
    #[arg(long, env = "PODLEASE_LEADER_ELECTION_NAMESPACE")]
    pub leader_election_namespace: Option<String>,
    /// Name of the leader Lease.
    #[arg(long, env = "PODLEASE_LEADER_ELECTION_NAME", default_value = "podlease")]
    pub leader_election_name: String,
    /// Leader Lease duration in seconds (at least 2): a standby takes the Lease once it has
    /// not been renewed for this long. The worst failover is this plus two retry periods of
    /// 2/15 of it (19 s at 15); every TTL should be at least 1.5 × that.
    #[arg(long, env = "PODLEASE_LEADER_LEASE_DURATION", default_value_t = 15)]
    pub leader_lease_duration: u64,
    /// On SIGTERM of the leader, hand the leader Lease over and wait to see whether another
    /// replica takes over: if etcd and the API server answer to the end that none does,
    /// revoke every lease (deregister everything; service claims stay) before exiting; if
    /// either does not answer, revoke nothing (the keys expire with their TTL). A rollout
    /// (another replica takes over) and a leadership loss never revoke; with
    /// --leader-elect=false nobody takes over, so every SIGTERM revokes.
    #[arg(long, env = "PODLEASE_REVOKE_ON_SHUTDOWN")]
    pub revoke_on_shutdown: bool,
    /// Seconds between checks that every managed key is still in etcd as written.
    #[arg(long, env = "PODLEASE_VERIFY_INTERVAL", default_value_t = 30)]
    pub verify_interval: u64,
}

/// One key segment: the cluster id sits between the owner prefix and the install id.
pub fn parse_cluster_id(s: &str) -> Result<String, String> {
    segment(s).ok_or_else(|| "a cluster id is 1..128 of [A-Za-z0-9._-] (it is one key segment)".into())
}

/// One key segment: the install id sits between the cluster id and the namespace.
pub fn parse_install_id(s: &str) -> Result<String, String> {
    segment(s).ok_or_else(|| "an install id is 1..128 of [A-Za-z0-9._-] (it is one key segment)".into())
}

fn segment(s: &str) -> Option<String> {
    let ok = !s.is_empty() && s.len() <= 128 && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')) && s != "." && s != "..";
    ok.then(|| s.to_string())
}

impl RunArgs {
    /// Namespace of the leader Lease: the flag, else $POD_NAMESPACE, else `default` (as `run`).
    pub fn leader_namespace(&self) -> String {
        self.leader_election_namespace.clone().or_else(|| std::env::var("POD_NAMESPACE").ok()).unwrap_or_else(|| "default".into())
    }

    /// The defaults and the key space, or why the flags contradict each other.
    pub fn defaults(&self) -> Result<Defaults, String> {
        let mut d = Defaults::new(self.default_format, self.default_prefix.clone(), self.default_ttl, self.allowed_prefix.clone(), self.owner_prefix.clone())?;
        d.shared = self.shared_service.iter().map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
        Ok(d)
    }
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Output {
    Text,
    Json,
}

#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// Every `podlease run` flag, so the command line of a running install can be checked as is.
    #[command(flatten)]
    pub run: RunArgs,
    /// text: one line per finding; json: one JSON object with every finding.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

#[derive(Debug, Args)]
pub struct GetArgs {
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// Service name.
    #[arg(long)]
    pub service: String,
    #[arg(long, default_value = "json")]
    pub format: Format,
    /// Key prefix (default: the format's own).
    #[arg(long)]
    pub prefix: Option<String>,
    /// Namespace (the skydns name includes it).
    #[arg(long, default_value = "default")]
    pub namespace: String,
    /// skydns: the DNS zone, as the registration's `options.zone` (default cluster.local).
    #[arg(long)]
    pub zone: Option<String>,
    /// After listing, follow changes (Get, then Watch from the next revision).
    #[arg(long)]
    pub watch: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Result<RunArgs, clap::Error> {
        let cli = Cli::try_parse_from(["podlease", "run"].iter().chain(args))?;
        let Commands::Run(run) = cli.command else { unreachable!() };
        Ok(run)
    }

    fn allowed(args: &[&str]) -> Vec<String> {
        run(args).unwrap().defaults().unwrap().key_space.allowed().iter().map(|a| a.to_string()).collect()
    }

    #[test]
    fn the_allowlist_defaults_to_each_formats_own_prefix() {
        assert_eq!(
            allowed(&[]),
            ["json=/services", "etcd-naming=", "go-zero=", "kratos=/microservices", "go-micro=/micro/registry", "kitex=kitex/registry-etcd", "hertz=hertz/registry-etcd", "skydns=/skydns"]
        );
        assert_eq!(allowed(&["--default-format", "kratos", "--default-prefix", "/ms/"]).last().unwrap(), "kratos=/ms");
    }

    #[test]
    fn allowed_prefixes_repeat_or_come_comma_separated_and_replace_the_default() {
        assert_eq!(allowed(&["--allowed-prefix", "json=/services,/registry", "--allowed-prefix=etcd-naming="]), ["json=/services", "/registry", "etcd-naming="]);
    }

    #[test]
    fn bad_prefixes_are_refused_at_start() {
        for args in [
            &["--allowed-prefix", "/a/../b"][..],
            &["--allowed-prefix", "zk=/x"],
            &["--default-prefix", "/a b"],
            &["--owner-prefix", "/a//b"],
            &["--cluster-id", "a/b"],
            &["--install-id", "a/b"],
            &["--install-id", ".."],
            &["--migrate-from", "/a/../b"],
        ] {
            assert!(run(args).is_err(), "{args:?} accepted");
        }
        let e = run(&["--allowed-prefix", "/podlease/owners/x"]).unwrap().defaults().unwrap_err();
        assert!(e.contains("inside the owner prefix"), "{e}");
        assert!(run(&["--owner-prefix", "podlease"]).unwrap().defaults().is_err(), "the owner prefix is absolute");
    }
}
