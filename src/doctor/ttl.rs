//! Does every TTL in use outlive a leader failover? When the leader dies its leases have two
//! thirds of their TTL left, and a standby may take `leader::worst_failover` to take over:
//! a shorter TTL lets keys of ready pods expire meanwhile (`leader::short_ttl`).

use std::time::Duration;

use kube::Client;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ApiResource, DynamicObject, ListParams};

use crate::annotations;
use crate::leader::{min_ttl, short_ttl};
use crate::registration::{DEFAULT_TTL_SECONDS, ServiceRegistration};

use super::{Finding, KUBE_TIMEOUT};

const CHECK: &str = "ttl";

/// `--default-ttl` (the operator's own setting: a short one FAILs).
pub fn default_ttl(ttl: i64, failover: Option<Duration>) -> Finding {
    let Some(failover) = failover else {
        return Finding::ok(CHECK, format!("--default-ttl {ttl} s; leader election is off, so there is no failover to outlive (one replica: keys outlive a restart only if it takes less than the TTL)"));
    };
    match short_ttl(ttl, failover) {
        None => Finding::ok(CHECK, format!("--default-ttl {ttl} s outlives a leader failover ({:.0} s; at least {} s needed)", failover.as_secs_f64(), min_ttl(failover))),
        Some(why) => Finding::fail(CHECK, format!("--default-ttl: {why}"), format!("set --default-ttl to at least {} s, or shorten --leader-lease-duration", min_ttl(failover))),
    }
}

/// Each ServiceRegistration's `ttlSeconds` (a namespace user's choice: a short one WARNs,
/// as the ShortTTL condition does). Read as plain objects, so an older CRD's objects count too.
pub async fn registrations(client: &Client, namespaces: &[String], failover: Option<Duration>) -> Vec<Finding> {
    let Some(failover) = failover else { return Vec::new() };
    let resource = ApiResource::erase::<ServiceRegistration>(&());
    let (mut findings, seen) = each_object(client, namespaces, &resource, "ServiceRegistrations", |r| {
        let ttl = r.data["spec"]["ttlSeconds"].as_i64().unwrap_or(DEFAULT_TTL_SECONDS);
        short_ttl(ttl, failover).map(|why| {
            Finding::warn(CHECK, format!("ServiceRegistration {}: {why}", name(r)), format!("set its spec.ttlSeconds to at least {} s", min_ttl(failover)))
        })
    })
    .await;
    if findings.is_empty() {
        findings.push(Finding::ok(CHECK, format!("the TTLs of all {seen} ServiceRegistrations outlive a leader failover")));
    }
    findings
}

/// Each annotated pod's `podlease.io/ttl` (a namespace user's choice: a short one WARNs, as
/// the ShortTTL Event on the pod does). A pod without the annotation takes `--default-ttl`,
/// checked on its own; a value that is not a number is the controller's InvalidAnnotation.
pub async fn annotated_pods(client: &Client, namespaces: &[String], failover: Option<Duration>) -> Vec<Finding> {
    let Some(failover) = failover else { return Vec::new() };
    let resource = ApiResource::erase::<Pod>(&());
    let mut annotated = 0;
    let (mut findings, _) = each_object(client, namespaces, &resource, "pods", |pod| {
        let annotations = pod.metadata.annotations.as_ref()?;
        annotations.get(annotations::SERVICE)?;
        let ttl: i64 = annotations.get(annotations::TTL)?.trim().parse().ok()?;
        annotated += 1;
        short_ttl(ttl, failover).map(|why| {
            Finding::warn(CHECK, format!("pod {} ({}: {ttl}): {why}", name(pod), annotations::TTL), format!("set its {} to at least {} s (in the pod template)", annotations::TTL, min_ttl(failover)))
        })
    })
    .await;
    if findings.is_empty() {
        findings.push(Finding::ok(CHECK, format!("the {} of all {annotated} annotated pods that set one outlive a leader failover", annotations::TTL)));
    }
    findings
}

fn name(o: &DynamicObject) -> String {
    format!("{}/{}", o.metadata.namespace.as_deref().unwrap_or_default(), o.metadata.name.as_deref().unwrap_or_default())
}

/// Lists `resource` in every watched namespace (or all), page by page, and returns the
/// findings `judge` made of the objects (plus a WARN per scope that could not be listed) and
/// how many objects were seen.
async fn each_object(
    client: &Client,
    namespaces: &[String],
    resource: &ApiResource,
    what: &str,
    mut judge: impl FnMut(&DynamicObject) -> Option<Finding>,
) -> (Vec<Finding>, usize) {
    let apis: Vec<(Api<DynamicObject>, String)> = if namespaces.is_empty() {
        vec![(Api::all_with(client.clone(), resource), "all namespaces".into())]
    } else {
        namespaces.iter().map(|ns| (Api::namespaced_with(client.clone(), ns, resource), format!("namespace {ns}"))).collect()
    };
    let mut findings = Vec::new();
    let mut seen = 0;
    for (api, where_) in apis {
        let mut params = ListParams::default().limit(500);
        loop {
            let page = match tokio::time::timeout(KUBE_TIMEOUT, api.list(&params)).await {
                Ok(Ok(page)) => page,
                Ok(Err(e)) => {
                    findings.push(Finding::warn(CHECK, format!("cannot list {what} in {where_} to check their TTLs: {e}"), format!("grant list on {} (see the rbac line)", resource.plural)));
                    break;
                }
                Err(_) => {
                    findings.push(Finding::warn(CHECK, format!("listing {what} in {where_} did not answer within {KUBE_TIMEOUT:?}"), "check the API server"));
                    break;
                }
            };
            seen += page.items.len();
            findings.extend(page.items.iter().filter_map(&mut judge));
            match page.metadata.continue_.filter(|c| !c.is_empty()) {
                Some(token) => params = params.continue_token(&token),
                None => break,
            }
        }
    }
    (findings, seen)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::Level;
    use crate::leader::LeaderConfig;

    #[test]
    fn the_default_ttl_fails_below_the_failover_rule_and_passes_at_the_defaults() {
        let failover = LeaderConfig::new("ns".into(), "p".into(), "d".into(), Duration::from_secs(15)).worst_failover();
        assert_eq!(default_ttl(30, Some(failover)).level, Level::Ok);
        assert_eq!(default_ttl(29, Some(failover)).level, Level::Ok);
        let short = default_ttl(28, Some(failover));
        assert_eq!(short.level, Level::Fail);
        assert!(short.todo.unwrap().contains("at least 29 s"));
        assert_eq!(default_ttl(5, None).level, Level::Ok, "no leader election, no failover");
    }
}
