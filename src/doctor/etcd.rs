//! Every etcd endpoint on its own, with TLS and auth as configured: does it answer, is it a
//! member of one cluster with the others, with a leader and no alarm, which version does it
//! run; do the endpoints cover every member; may this user read and write where podlease
//! does; does etcd's clock run at our rate.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use etcd_client::{AlarmAction, AlarmType, Client, Compare, CompareOp, GetOptions, Txn, TxnOp};

use crate::etcd::{ConfigError, EtcdConfig};

use super::clock::{etcd_rate, rate_finding};
use super::{Finding, version_finding};

const CHECK: &str = "etcd";
const CLUSTER: &str = "etcd-cluster";

/// Prefixes whose permissions are checked: (what, prefix), e.g. ("ownership records", "/podlease/owners").
pub type Probes = Vec<(String, String)>;

struct Member {
    endpoint: String,
    client: Client,
    cluster_id: u64,
    member_id: u64,
}

pub async fn check(config: &EtcdConfig, probes: &Probes) -> Vec<Finding> {
    let endpoints: Vec<String> = config.endpoints.iter().map(|e| e.trim().to_string()).filter(|e| !e.is_empty()).collect();
    if endpoints.is_empty() {
        return vec![Finding::fail(CHECK, "no etcd endpoints configured", "set --etcd-endpoints to every member of the cluster")];
    }
    let probed = futures::future::join_all(endpoints.iter().map(|e| probe(config, e))).await;
    let mut findings = Vec::new();
    let mut members = Vec::new();
    // A configuration error (a file that cannot be read, TLS flags with http://) is the same
    // for every endpoint: said once.
    let mut said = BTreeSet::new();
    for (found, member) in probed {
        for f in found {
            if said.insert(f.found.clone()) {
                findings.push(f);
            }
        }
        members.extend(member);
    }
    if members.is_empty() {
        return findings;
    }
    let one = one_cluster(&members);
    let mixed = one.level == super::Level::Fail;
    findings.push(one);
    // Which members are missing only means something within one cluster.
    if !mixed {
        findings.extend(coverage(&members, config.call_timeout).await);
    }
    let mut first = members.swap_remove(0);
    findings.extend(permissions(&mut first.client, probes, config.call_timeout).await);
    findings.push(match etcd_rate(&mut first.client, config.call_timeout).await {
        Ok(rate) => rate_finding(&first.endpoint, &rate),
        Err(e) => Finding::warn("clock", format!("could not time etcd's lease clock via {}: {e}", first.endpoint), "see the etcd lines; podlease itself grants leases, so it needs this to work"),
    });
    findings
}

/// How the connection is secured, for the OK line (never the password).
fn security(config: &EtcdConfig) -> String {
    let mut parts = Vec::new();
    if config.ca.is_some() || config.cert.is_some() {
        parts.push(if config.cert.is_some() { "TLS with a client certificate" } else { "TLS" }.to_string());
    } else {
        parts.push("plain, no TLS".into());
    }
    if let Some(user) = &config.username {
        parts.push(format!("as user {user:?}"));
    }
    parts.join(", ")
}

/// One endpoint alone: its findings, and the member when it answered.
async fn probe(config: &EtcdConfig, endpoint: &str) -> (Vec<Finding>, Option<Member>) {
    let single = EtcdConfig { endpoints: vec![endpoint.to_string()], ..config.clone() };
    let mut client = match single.connect().await {
        Ok(c) => c,
        Err(e) if !e.is_transient() => return (vec![Finding::fail(CHECK, format!("etcd configuration: {e}"), config_hint(&e))], None),
        Err(e) => {
            let text = error_text(&e);
            return (vec![Finding::fail(CHECK, format!("{endpoint}: {text}"), hint(&text))], None);
        }
    };
    let timeout = config.call_timeout;
    let status = match tokio::time::timeout(timeout, client.status()).await {
        Err(_) => {
            let text = format!("no answer within {timeout:?} (--etcd-timeout)");
            return (vec![Finding::fail(CHECK, format!("{endpoint}: {text}"), hint(&text))], None);
        }
        // With auth on, etcd answers Status only to root: the same facts, asked another way.
        Ok(Err(e)) if etcd_error_text(&e).contains("permission denied") => return without_status(config, endpoint, client).await,
        Ok(Err(e)) => {
            let text = etcd_error_text(&e);
            return (vec![Finding::fail(CHECK, format!("{endpoint}: {text}"), hint(&text))], None);
        }
        Ok(Ok(s)) => s,
    };
    let (cluster_id, member_id) = status.header().map(|h| (h.cluster_id(), h.member_id())).unwrap_or_default();
    let mut found = vec![Finding::ok(CHECK, format!("{endpoint} answers ({}): member {member_id:x} of cluster {cluster_id:x}", security(config)))];
    found.push(version_finding(endpoint, status.version()));
    if status.leader() == 0 {
        found.push(Finding::fail(CHECK, format!("{endpoint}: member {member_id:x} knows no leader"), "the cluster has lost quorum or is electing: check its members (etcdctl endpoint status --cluster)"));
    }
    if !status.errors().is_empty() {
        found.push(alarm_finding(endpoint, member_id, &status.errors().join("; ")));
    }
    (found, Some(Member { endpoint: endpoint.to_string(), client, cluster_id, member_id }))
}

/// A non-root user's view: the header of a member list (cluster and member id), the alarm
/// list, and the version from `/version`.
async fn without_status(config: &EtcdConfig, endpoint: &str, mut client: Client) -> (Vec<Finding>, Option<Member>) {
    let timeout = config.call_timeout;
    let list = match tokio::time::timeout(timeout, client.member_list()).await {
        Ok(Ok(l)) => l,
        Ok(Err(e)) => {
            let text = etcd_error_text(&e);
            return (vec![Finding::fail(CHECK, format!("{endpoint}: {text}"), hint(&text))], None);
        }
        Err(_) => return (vec![Finding::fail(CHECK, format!("{endpoint}: no answer within {timeout:?} (--etcd-timeout)"), hint("no answer"))], None),
    };
    let (cluster_id, member_id) = list.header().map(|h| (h.cluster_id(), h.member_id())).unwrap_or_default();
    let mut found = vec![Finding::ok(CHECK, format!("{endpoint} answers ({}): member {member_id:x} of cluster {cluster_id:x}", security(config)))];
    found.push(match super::etcd_http::version(config, endpoint, timeout).await {
        Ok(v) => version_finding(endpoint, &v),
        Err(e) => Finding::warn("etcd-version", format!("{endpoint}: the version cannot be read (Status is root-only with auth, and {e})"), "check it by hand: etcdctl endpoint status as root, or curl the endpoint's /version"),
    });
    if let Ok(Ok(alarms)) = tokio::time::timeout(timeout, client.alarm(AlarmAction::Get, AlarmType::None, None)).await {
        let mine: Vec<String> = alarms.alarms().iter().filter(|a| a.member_id() == member_id).map(|a| format!("alarm {:?}", a.alarm())).collect();
        if !mine.is_empty() {
            found.push(alarm_finding(endpoint, member_id, &mine.join("; ")));
        }
    }
    (found, Some(Member { endpoint: endpoint.to_string(), client, cluster_id, member_id }))
}

fn alarm_finding(endpoint: &str, member_id: u64, what: &str) -> Finding {
    Finding::fail(
        CHECK,
        format!("{endpoint}: member {member_id:x} reports {what}"),
        "clear the cause (etcdctl alarm list; NOSPACE: compact, defragment, raise the quota), then etcdctl alarm disarm",
    )
}

/// All answering endpoints in one cluster: podlease balances requests over them, so a list
/// mixing clusters grants a lease in one and writes under it in another.
fn one_cluster(members: &[Member]) -> Finding {
    let mut clusters: BTreeMap<u64, Vec<&str>> = BTreeMap::new();
    for m in members {
        clusters.entry(m.cluster_id).or_default().push(&m.endpoint);
    }
    if clusters.len() == 1 {
        let id = clusters.keys().next().expect("one");
        return Finding::ok(CLUSTER, format!("every answering endpoint ({}) is in cluster {id:x}", members.len()));
    }
    let list: Vec<String> = clusters.iter().map(|(id, eps)| format!("{} in cluster {id:x}", eps.join(", "))).collect();
    Finding::fail(CLUSTER, format!("the endpoints belong to different etcd clusters: {}", list.join("; ")), "list the members of one cluster only in --etcd-endpoints (podlease run refuses to start with these)")
}

/// Members the endpoints do not reach: requests never go to them, and when the reached ones
/// fail podlease has nowhere else to go.
async fn coverage(members: &[Member], timeout: Duration) -> Vec<Finding> {
    let reached: BTreeSet<u64> = members.iter().map(|m| m.member_id).collect();
    let mut client = members[0].client.clone();
    let list = match tokio::time::timeout(timeout, client.member_list()).await {
        Ok(Ok(l)) => l,
        Ok(Err(e)) => return vec![Finding::warn(CLUSTER, format!("cannot list the cluster's members: {}", etcd_error_text(&e)), "check by hand that --etcd-endpoints names every member (etcdctl member list)")],
        Err(_) => return vec![Finding::warn(CLUSTER, format!("listing the cluster's members did not answer within {timeout:?}"), "check etcd")],
    };
    let mut missing: Vec<String> = list
        .members()
        .iter()
        .filter(|m| !reached.contains(&m.id()) && !m.is_learner())
        .map(|m| format!("{} ({:x}, {})", m.name(), m.id(), m.client_urls().join(" ")))
        .collect();
    missing.sort();
    if missing.is_empty() {
        return vec![Finding::ok(CLUSTER, format!("the endpoints reach every voting member ({})", list.members().iter().filter(|m| !m.is_learner()).count()))];
    }
    vec![Finding::warn(
        CLUSTER,
        format!("no answering endpoint reaches member(s) {}", missing.join(", ")),
        "add every member to --etcd-endpoints (or fix the ones that fail above), so podlease keeps working when a member goes",
    )]
}

/// May this user read and write under each prefix podlease uses? Reading is a count of the
/// prefix; writing a Txn whose condition never holds (version < 0): it writes nothing, but
/// etcd checks the permissions of both of its branches.
async fn permissions(client: &mut Client, probes: &Probes, timeout: Duration) -> Vec<Finding> {
    let mut findings = Vec::new();
    for (what, prefix) in probes {
        let dir = format!("{}/", prefix.trim_end_matches('/'));
        let key = format!("{dir}podlease-doctor-probe");
        let read = tokio::time::timeout(timeout, client.get(dir.as_str(), Some(GetOptions::new().with_prefix().with_count_only()))).await;
        let txn = Txn::new().when([Compare::version(key.as_str(), CompareOp::Less, 0)]).and_then([TxnOp::put(key.as_str(), "", None)]);
        let write = tokio::time::timeout(timeout, client.txn(txn)).await;
        let problem = match (read, write) {
            (Ok(Ok(_)), Ok(Ok(r))) if !r.succeeded() => None,
            (Ok(Ok(_)), Ok(Ok(_))) => Some("a Txn that cannot succeed did".to_string()),
            (Ok(Err(e)), _) => Some(format!("reading: {}", etcd_error_text(&e))),
            (_, Ok(Err(e))) => Some(format!("writing: {}", etcd_error_text(&e))),
            _ => Some(format!("no answer within {timeout:?}")),
        };
        findings.push(match problem {
            None => Finding::ok("etcd-access", format!("may read and write {what} under {dir:?}")),
            Some(p) => Finding::fail("etcd-access", format!("{what} under {dir:?}: {p}"), hint(&p)),
        });
    }
    findings
}

fn config_hint(e: &ConfigError) -> String {
    match e {
        ConfigError::Read { .. } => "mount the file (in the chart: the Secret named in etcd.tls / etcd.auth) or fix the path".into(),
        ConfigError::PlainEndpointWithTls(_) => "use https:// endpoints with --etcd-ca/--etcd-cert, or drop the TLS flags".into(),
        ConfigError::CertWithoutKey => "give both --etcd-cert and --etcd-key".into(),
        ConfigError::UserWithoutPassword => "give --etcd-password-file with --etcd-username".into(),
        _ => "fix the etcd flags".into(),
    }
}

fn error_text(e: &ConfigError) -> String {
    match e {
        ConfigError::Connect(e) => etcd_error_text(e),
        e => e.to_string(),
    }
}

/// An etcd client error with what tonic keeps in its causes (the TLS or TCP reason), each
/// cause once, without tonic's bare "transport error".
fn etcd_error_text(e: &etcd_client::Error) -> String {
    match e {
        etcd_client::Error::GRpcStatus(s) => {
            let mut text = format!("{:?}: {}", s.code(), s.message());
            let mut cause = std::error::Error::source(s);
            while let Some(c) = cause {
                let more = c.to_string();
                if more != "transport error" && !text.contains(&more) {
                    text = format!("{text}: {more}");
                }
                cause = c.source();
            }
            text
        }
        etcd_client::Error::TransportError(t) => super::chain(t),
        e => e.to_string(),
    }
}

/// What to do about an error, from its text.
pub fn hint(text: &str) -> String {
    let t = text.to_lowercase();
    let has = |needles: &[&str]| needles.iter().any(|n| t.contains(n));
    if has(&["authentication failed", "invalid user id or password", "invalid auth token", "user name not found"]) {
        "check --etcd-username and the password in --etcd-password-file (etcdctl --user=NAME endpoint status)"
    } else if has(&["permission denied"]) {
        "grant this etcd user's role readwrite on the prefix (etcdctl role grant-permission ROLE readwrite PREFIX --prefix)"
    } else if has(&["unknownissuer", "unknown issuer", "unknown ca", "badsignature", "self signed", "self-signed"]) {
        "etcd's server certificate is not signed by --etcd-ca: give the CA that signed etcd's serving certificate"
    } else if has(&["notvalidforname", "not valid for name", "certificate is not valid for"]) {
        "the server certificate does not name this endpoint's host: use a name or IP from its subject alternative names"
    } else if has(&["expired", "notvalidyet", "not valid yet"]) {
        "a certificate is outside its validity (expired, or not yet valid: check the clocks too); renew it"
    } else if has(&["certificate required", "certificaterequired", "bad certificate", "badcertificate", "handshake failure", "handshakefailure"]) {
        "etcd refused the client certificate: give --etcd-cert/--etcd-key signed by the CA etcd trusts (--trusted-ca-file)"
    } else if has(&["invalidcontenttype", "corrupt message", "corruptmessage", "frame with invalid size", "http2 error", "invalid http version", "wrong version number"]) {
        "the endpoint's scheme does not match etcd's: https:// with --etcd-ca for a TLS etcd, http:// for a plain one"
    } else if has(&["connection refused"]) {
        "nothing listens there: check the address and port, and that the member runs"
    } else if has(&["dns error", "failed to lookup", "name or service not known", "no such host"]) {
        "the host name does not resolve: check the endpoint's name"
    } else if has(&["no answer", "timed out", "timeout", "did not finish", "deadline"]) {
        "nothing answered in time: check the address, firewalls and the NetworkPolicy (networkPolicy.etcdPort), and that the member runs"
    } else {
        "check the endpoint, and the TLS and auth flags (etcdctl with the same ones tells more)"
    }
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_of_failure_gets_its_own_advice() {
        let cases = [
            ("InvalidArgument: etcdserver: authentication failed, invalid user ID or password", "--etcd-password-file"),
            ("Unavailable: error trying to connect: invalid peer certificate: UnknownIssuer", "not signed by --etcd-ca"),
            ("Unknown: transport error: received fatal alert: CertificateRequired", "--etcd-cert/--etcd-key"),
            ("Unavailable: tcp connect error: Connection refused (os error 111)", "nothing listens there"),
            ("no answer within 5s (--etcd-timeout)", "nothing answered in time"),
            ("PermissionDenied: etcdserver: permission denied", "grant-permission"),
            ("invalid peer certificate: NotValidForName", "subject alternative names"),
            ("something else", "etcdctl"),
        ];
        for (text, advice) in cases {
            assert!(hint(text).contains(advice), "{text}: {}", hint(text));
        }
    }
}
