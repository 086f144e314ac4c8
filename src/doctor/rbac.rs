//! Every Kubernetes API call podlease makes, as (verb, resource, name, namespace), asked of
//! the API server one SelfSubjectAccessReview each. The list follows the code:
//! `kubernetes::watch` (list, watch pods and ServiceRegistrations), `kubernetes::gate`
//! (patch pods/status), `kubernetes::status` (patch ServiceRegistrations for the finalizer,
//! and their status), `kubernetes::events` (create Events, patch them into a series),
//! `kubernetes::crd` (get its CRD), `kubernetes::cluster_id` (get namespaces/kube-system)
//! and `leader` (create the Lease, get and update it). The chart grants exactly these
//! (tests/chart.rs checks them against the API server's audit log; tests/doctor.rs checks
//! this list against the chart).

use k8s_openapi::api::authorization::v1::{ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec};
use kube::Client;
use kube::api::{Api, PostParams};

use super::{Finding, KUBE_TIMEOUT};

const CHECK: &str = "rbac";

/// One API call podlease makes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Access {
    pub verb: &'static str,
    pub group: &'static str,
    pub resource: &'static str,
    pub subresource: Option<&'static str>,
    /// One named object (None: any, as list, watch and create need).
    pub name: Option<String>,
    /// The namespace (None: cluster-scoped, or every namespace).
    pub namespace: Option<String>,
    /// What podlease does with it.
    pub why: &'static str,
}

impl Access {
    /// `patch pods/status in namespace a`, `get customresourcedefinitions/serviceregistrations.podlease.io`.
    pub fn describe(&self, namespaced: bool) -> String {
        let mut s = format!("{} {}", self.verb, self.resource);
        if let Some(sub) = self.subresource {
            s = format!("{s}/{sub}");
        }
        if let Some(name) = &self.name {
            s = format!("{s} {name:?}");
        }
        match (&self.namespace, namespaced) {
            (Some(ns), _) => format!("{s} in namespace {ns}"),
            (None, true) => format!("{s} in all namespaces"),
            (None, false) => s,
        }
    }

    fn namespaced(&self) -> bool {
        !matches!(self.resource, "namespaces" | "customresourcedefinitions")
    }

    /// The RBAC rule that grants it.
    pub fn rule(&self) -> String {
        let resource = match self.subresource {
            Some(sub) => format!("{}/{sub}", self.resource),
            None => self.resource.to_string(),
        };
        let names = self.name.as_ref().map(|n| format!(", resourceNames: [{n}]")).unwrap_or_default();
        let kind = match &self.namespace {
            Some(ns) => format!("a Role in {ns}"),
            None => "a ClusterRole".into(),
        };
        format!("{{apiGroups: [\"{}\"], resources: [{resource}]{names}, verbs: [{}]}} in {kind}", self.group, self.verb)
    }
}

/// What decides the list: the watched namespaces (none: all), the leader Lease (namespace,
/// name) when electing, and whether the cluster id is given (else kube-system's UID is read).
#[derive(Debug, Clone, Default)]
pub struct Scope {
    pub namespaces: Vec<String>,
    pub leader: Option<(String, String)>,
    pub cluster_id_set: bool,
}

impl Scope {
    /// What `podlease run` with these flags calls.
    pub fn of(run: &crate::cli::RunArgs) -> Scope {
        Scope {
            namespaces: run.watch_namespace.iter().map(|n| n.trim().to_string()).filter(|n| !n.is_empty()).collect(),
            leader: run.leader_elect.then(|| (run.leader_namespace(), run.leader_election_name.clone())),
            cluster_id_set: run.cluster_id.is_some(),
        }
    }
}

/// Every call podlease makes with these settings.
pub fn required(scope: &Scope) -> Vec<Access> {
    const WORKLOAD: [(&str, &str, &str, Option<&str>, &str); 9] = [
        ("list", "", "pods", None, "watching pods"),
        ("watch", "", "pods", None, "watching pods"),
        ("patch", "", "pods", Some("status"), "the readiness gate podlease.io/registered"),
        ("list", "podlease.io", "serviceregistrations", None, "watching ServiceRegistrations"),
        ("watch", "podlease.io", "serviceregistrations", None, "watching ServiceRegistrations"),
        ("patch", "podlease.io", "serviceregistrations", None, "the finalizer that revokes leases on delete"),
        ("patch", "podlease.io", "serviceregistrations", Some("status"), "writing status"),
        ("create", "events.k8s.io", "events", None, "reporting problems as Events"),
        ("patch", "events.k8s.io", "events", None, "repeated Events (a series)"),
    ];
    let scopes: Vec<Option<String>> = if scope.namespaces.is_empty() { vec![None] } else { scope.namespaces.iter().cloned().map(Some).collect() };
    let mut out = Vec::new();
    for ns in &scopes {
        for (verb, group, resource, subresource, why) in WORKLOAD {
            out.push(Access { verb, group, resource, subresource, name: None, namespace: ns.clone(), why });
        }
    }
    if !scope.cluster_id_set {
        out.push(Access { verb: "get", group: "", resource: "namespaces", subresource: None, name: Some("kube-system".into()), namespace: None, why: "the cluster id (set --cluster-id to skip)" });
    }
    out.push(Access {
        verb: "get",
        group: "apiextensions.k8s.io",
        resource: "customresourcedefinitions",
        subresource: None,
        name: Some(crate::kubernetes::crd::name()),
        namespace: None,
        why: "whether the CRD is installed and this version's",
    });
    if let Some((ns, name)) = &scope.leader {
        let lease = |verb, named: bool, why| Access {
            verb,
            group: "coordination.k8s.io",
            resource: "leases",
            subresource: None,
            name: named.then(|| name.clone()),
            namespace: Some(ns.clone()),
            why,
        };
        out.push(lease("create", false, "leader election (the first replica creates the Lease)"));
        out.push(lease("get", true, "leader election"));
        out.push(lease("update", true, "leader election (renewing, taking over)"));
    }
    out
}

/// One finding per access denied, or one OK for all.
pub async fn review(client: &Client, accesses: &[Access]) -> Vec<Finding> {
    let api: Api<SelfSubjectAccessReview> = Api::all(client.clone());
    let answers = futures::future::join_all(accesses.iter().map(|a| {
        let api = api.clone();
        async move {
            let review = SelfSubjectAccessReview {
                spec: SelfSubjectAccessReviewSpec {
                    resource_attributes: Some(ResourceAttributes {
                        verb: Some(a.verb.into()),
                        group: Some(a.group.into()),
                        resource: Some(a.resource.into()),
                        subresource: a.subresource.map(Into::into),
                        name: a.name.clone(),
                        namespace: a.namespace.clone(),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                ..Default::default()
            };
            match tokio::time::timeout(KUBE_TIMEOUT, api.create(&PostParams::default(), &review)).await {
                Ok(Ok(r)) => Ok(r.status.map(|s| (s.allowed, s.reason.filter(|r| !r.is_empty()))).unwrap_or((false, None))),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(format!("no answer within {KUBE_TIMEOUT:?}")),
            }
        }
    }))
    .await;
    let mut findings = Vec::new();
    for (a, answer) in accesses.iter().zip(answers) {
        let what = a.describe(a.namespaced());
        match answer {
            Ok((true, _)) => {}
            Ok((false, _)) => findings.push(Finding::fail(CHECK, format!("may not {what} ({})", a.why), format!("grant {} (the chart's RBAC does)", a.rule()))),
            Err(e) => findings.push(Finding::fail(CHECK, format!("could not ask whether it may {what}: {e}"), "let this identity create selfsubjectaccessreviews (the default system:basic-user role does)")),
        }
    }
    if findings.is_empty() {
        findings.push(Finding::ok(CHECK, format!("all {} API calls podlease makes are allowed for this identity", accesses.len())));
    }
    findings
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_list_follows_the_flags() {
        let all = required(&Scope { namespaces: vec![], leader: Some(("ops".into(), "podlease".into())), cluster_id_set: false });
        assert_eq!(all.len(), 9 + 1 + 1 + 3);
        assert!(all.iter().all(|a| a.namespace.is_none() || a.resource == "leases"));
        let two = required(&Scope { namespaces: vec!["a".into(), "b".into()], leader: None, cluster_id_set: true });
        assert_eq!(two.len(), 2 * 9 + 1);
        assert!(!two.iter().any(|a| a.resource == "leases" || a.resource == "namespaces"));
        let status = two.iter().find(|a| a.resource == "pods" && a.subresource == Some("status") && a.namespace.as_deref() == Some("b")).unwrap();
        assert_eq!(status.describe(true), "patch pods/status in namespace b");
        assert_eq!(status.rule(), "{apiGroups: [\"\"], resources: [pods/status], verbs: [patch]} in a Role in b");
        let crd = two.last().unwrap();
        assert_eq!(crd.describe(false), "get customresourcedefinitions \"serviceregistrations.podlease.io\"");
    }
}
