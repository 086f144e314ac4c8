//! The Kubernetes side: watching pods and ServiceRegistrations into the index, writing
//! status, finalizers, readiness gates and Events back, and finding the cluster id.

pub mod crd;
pub mod events;
pub mod gate;
pub mod status;
pub mod watch;

use k8s_openapi::api::core::v1::Namespace;
use kube::{Api, Client};

/// The cluster id used in ownership records: the UID of namespace kube-system, which is
/// stable for the life of a cluster and differs between clusters sharing one etcd.
pub async fn cluster_id(client: &Client) -> Result<String, kube::Error> {
    let ns: Api<Namespace> = Api::all(client.clone());
    let ks = ns.get("kube-system").await?;
    Ok(ks.metadata.uid.unwrap_or_else(|| "unknown".into()))
}
