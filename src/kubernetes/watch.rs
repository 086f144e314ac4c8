//! Watches pods and ServiceRegistrations (in all namespaces, or each watched one), trimming
//! pods to `PodInfo` as they arrive so the full objects are never kept.

use futures::{StreamExt, stream::BoxStream};
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};

use crate::kubernetes::crd::{self, Installed};
use crate::pod::PodInfo;
use crate::registration::ServiceRegistration;

/// One watch event, tagged with the scope (namespace, or None for all) it came from, so a
/// re-list can drop exactly the objects of that scope that vanished meanwhile.
#[derive(Debug)]
pub enum Input {
    Pod(Option<String>, watcher::Event<PodInfo>),
    Registration(Option<String>, watcher::Event<ServiceRegistration>),
    /// The ServiceRegistration CRD is not installed (its object is absent, not merely
    /// unanswered): this scope has no registrations, which counts as listed. The watch keeps
    /// retrying, so registrations are picked up once the CRD is applied.
    RegistrationsAbsent(Option<String>),
    /// A watch failed (it is retried with backoff); for the log.
    Error(String),
}

fn scopes(namespaces: &[String]) -> Vec<Option<String>> {
    if namespaces.is_empty() { vec![None] } else { namespaces.iter().cloned().map(Some).collect() }
}

fn api<K>(client: &Client, scope: &Option<String>) -> Api<K>
where
    K: kube::Resource<Scope = kube::core::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match scope {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// All watch streams, merged. The number of scopes is what `synced` must count to.
pub fn inputs(client: &Client, namespaces: &[String]) -> (BoxStream<'static, Input>, usize) {
    let mut streams: Vec<BoxStream<'static, Input>> = Vec::new();
    let scopes = scopes(namespaces);
    for scope in &scopes {
        let s = scope.clone();
        let pods = watcher(api::<Pod>(client, scope), watcher::Config::default())
            .default_backoff()
            .map(move |ev| match ev {
                Ok(ev) => Input::Pod(s.clone(), map_event(ev, |p| PodInfo::from_pod(&p))),
                Err(e) => Input::Error(format!("pod watch: {e}")),
            });
        streams.push(pods.boxed());
        let s = scope.clone();
        let c = client.clone();
        let regs = watcher(api::<ServiceRegistration>(client, scope), watcher::Config::default())
            .default_backoff()
            .then(move |ev| {
                let (s, c) = (s.clone(), c.clone());
                async move {
                    match ev {
                        Ok(ev) => Input::Registration(s, ev),
                        Err(e) if not_found(&e) => registrations_missing(&c, s, e).await,
                        Err(e) => Input::Error(format!("ServiceRegistration watch: {e}")),
                    }
                }
            });
        streams.push(regs.boxed());
    }
    (futures::stream::select_all(streams).boxed(), scopes.len() * 2)
}

fn map_event<A, B>(ev: watcher::Event<A>, f: impl Fn(A) -> B) -> watcher::Event<B> {
    match ev {
        watcher::Event::Apply(a) => watcher::Event::Apply(f(a)),
        watcher::Event::Delete(a) => watcher::Event::Delete(f(a)),
        watcher::Event::Init => watcher::Event::Init,
        watcher::Event::InitApply(a) => watcher::Event::InitApply(f(a)),
        watcher::Event::InitDone => watcher::Event::InitDone,
    }
}

fn not_found(e: &watcher::Error) -> bool {
    matches!(e, watcher::Error::InitialListFailed(kube::Error::Api(s)) if s.code == 404)
}

/// A 404 listing ServiceRegistrations means "no such resource" only when the CRD object is
/// absent too: an API server that is starting answers 404 for custom resources until it has
/// loaded their definitions, and taking that for "no registrations" would revoke them all.
async fn registrations_missing(client: &Client, scope: Option<String>, e: watcher::Error) -> Input {
    let name = crd::name();
    match crd::installed(client).await {
        Ok(Installed::Absent) => Input::RegistrationsAbsent(scope),
        Ok(Installed::Differs(d)) => {
            Input::Error(format!("ServiceRegistration watch: {e}; the installed CRD {name} is not this version's ({d}): podlease crd | kubectl apply -f -"))
        }
        Ok(Installed::Current) => Input::Error(format!("ServiceRegistration watch: {e} (the CRD {name} exists: the API server is not serving it yet)")),
        Err(ce) => Input::Error(format!(
            "ServiceRegistration watch: {e}; whether the CRD {name} is installed is unknown ({ce}): grant get on customresourcedefinitions/{name}"
        )),
    }
}
