//! Ownership records: `<owner-prefix>/<cluster-id>/<install-id>/<namespace>/<pod>/<source>`,
//! written under the instance's lease in the same Txn as its key, so that a restarted
//! controller can find (adopt) every lease it holds and tell its keys from anyone else's.
//! Each install (its identity: owner prefix, cluster id, install id) has a root of its own,
//! and its leader's fence key beside it (`<root>` without the trailing slash).

use serde::{Deserialize, Serialize};

use crate::desired::{InstanceId, Source};

/// What the record says about the instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerRecord {
    /// The published key.
    pub key: String,
    /// The lease TTL it was granted with.
    pub ttl: i64,
    /// FNV-1a of the published value, to tell whether adoption must rewrite it.
    pub value_hash: String,
    /// The pod's UID, so a recreated pod of the same name is not mistaken for the old one.
    #[serde(default)]
    pub pod_uid: String,
    /// 1 once written with its service claim (absent in records from before claims: those
    /// are rewritten once, which adds the claim).
    #[serde(default)]
    pub v: u32,
    /// The read prefix of its claim marker, so that a revoke removes the marker too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim: Option<String>,
}

/// Where the ownership records of one install live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owners {
    /// `<owner-prefix>/<cluster-id>/<install-id>/`
    root: String,
}

impl Owners {
    pub fn new(owner_prefix: &str, cluster_id: &str, install_id: &str) -> Owners {
        Owners::at(&format!("{}/{cluster_id}/{install_id}", owner_prefix.trim_end_matches('/')))
    }

    /// The records under `root` (the identity's path, with or without a trailing slash):
    /// also an older layout's, to migrate from it.
    pub fn at(root: &str) -> Owners {
        Owners { root: format!("{}/", root.trim_end_matches('/')) }
    }

    /// The identity's path, which is also its fence key.
    pub fn identity(&self) -> &str {
        self.root.trim_end_matches('/')
    }

    /// The prefix under which all of this cluster's records live.
    pub fn root(&self) -> &str {
        &self.root
    }

    pub fn key(&self, id: &InstanceId) -> String {
        format!("{}{}/{}/{}", self.root, id.namespace, id.pod, id.source.segment())
    }

    /// The instance a record key belongs to, or None for a key that is not a record.
    pub fn parse_key(&self, key: &str) -> Option<InstanceId> {
        let rest = key.strip_prefix(&self.root)?;
        let mut parts = rest.splitn(3, '/');
        let (ns, pod, source) = (parts.next()?, parts.next()?, parts.next()?);
        if ns.is_empty() || pod.is_empty() || source.is_empty() || source.contains('/') {
            return None;
        }
        Some(InstanceId { namespace: ns.into(), pod: pod.into(), source: Source::from_segment(source) })
    }
}

/// Service claims. A service name under a read prefix belongs to one namespace: each
/// instance writes a marker `<owner-prefix>/@claims/<read prefix in hex>/<namespace>/<cluster>/
/// <install>/<pod>/<source>` under its own lease, in the Txn that first writes its key, and
/// only if no other namespace has a marker there. The claim lasts while any instance of the
/// namespace does (restarts and failovers keep leases), and is released with the last one.
/// Claims are global to the etcd, not per cluster: a namespace is the same namespace in
/// every cluster (namespace sameness), and another cluster's namespace is refused too.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Claims {
    /// `<owner-prefix>/@claims/`; empty: this writer writes no claims.
    root: String,
    /// `<cluster>/<install>`, to keep every instance's marker apart.
    identity: String,
}

impl Claims {
    pub fn new(owner_prefix: &str, cluster_id: &str, install_id: &str) -> Claims {
        Claims { root: format!("{}/@claims/", owner_prefix.trim_end_matches('/')), identity: format!("{cluster_id}/{install_id}") }
    }

    fn service_root(&self, read_prefix: &str) -> String {
        let hex: String = read_prefix.bytes().map(|b| format!("{b:02x}")).collect();
        format!("{}{hex}/", self.root)
    }

    /// The marker of instance `id` when its service is claimed (`claim`: the read prefix).
    pub fn marker(&self, id: &InstanceId, claim: Option<&str>) -> Option<String> {
        let claim = claim.filter(|_| !self.root.is_empty())?;
        Some(format!("{}{}/{}/{}/{}", self.service_root(claim), id.namespace, self.identity, id.pod, id.source.segment()))
    }

    /// The key ranges [from, to) where other namespaces' markers of `d`'s service would be.
    pub fn others(&self, id: &InstanceId, claim: Option<&str>) -> Vec<(String, String)> {
        let Some(claim) = claim.filter(|_| !self.root.is_empty()) else { return Vec::new() };
        let service = self.service_root(claim);
        let mine = format!("{service}{}/", id.namespace);
        // ('/' + 1 is '0': the end of everything that starts with the text before it.)
        let end = |p: &str| format!("{}0", &p[..p.len() - 1]);
        vec![(service.clone(), mine.clone()), (end(&mine), end(&service))]
    }

    /// The namespace a marker belongs to.
    pub fn namespace_of(&self, marker: &str) -> Option<String> {
        let rest = marker.strip_prefix(&self.root)?;
        rest.split('/').nth(1).filter(|n| !n.is_empty()).map(str::to_string)
    }
}

/// 64-bit FNV-1a, in hex: stable across builds, unlike std's hasher.
pub fn value_hash(value: &[u8]) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in value {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{h:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_keys_round_trip() {
        let o = Owners::new("/podlease/owners/", "c1", "ns.rel");
        assert_eq!(o.identity(), "/podlease/owners/c1/ns.rel");
        for source in [Source::Annotations, Source::Registration("user".into())] {
            let id = InstanceId { namespace: "shop".into(), pod: "p-1".into(), source };
            let key = o.key(&id);
            assert!(key.starts_with("/podlease/owners/c1/ns.rel/shop/p-1/"));
            assert_eq!(o.parse_key(&key), Some(id));
        }
        assert_eq!(o.parse_key("/podlease/owners/c2/ns.rel/shop/p/r"), None);
        assert_eq!(o.parse_key("/podlease/owners/c1/ns.rel/shop/p"), None);
        assert_eq!(o.parse_key("/podlease/owners/c1/other/shop/p/r"), None, "another install's");
        // The layout before install ids: one root per cluster.
        let old = Owners::at("/podlease/owners/c1");
        assert_eq!(old.parse_key("/podlease/owners/c1/shop/p/r").unwrap().pod, "p");
    }

    #[test]
    fn value_hash_is_fnv1a() {
        assert_eq!(value_hash(b""), "cbf29ce484222325");
        assert_eq!(value_hash(b"a"), "af63dc4c8601ec8c");
    }

    #[test]
    fn a_claim_marker_lies_in_its_namespace_and_the_other_namespaces_are_the_ranges_around_it() {
        let c = Claims::new("/podlease/owners", "c1", "ns.rel");
        let d = crate::desired::Desired {
            service: "pay".into(),
            format: crate::format::Format::Json,
            key: crate::format::Key::Fixed("/services/pay/shop/p".into()),
            value: vec![],
            ttl: 30,
            address: String::new(),
            pod_uid: String::new(),
            ready_since: None,
            claim: Some("/services/pay/".into()),
        };
        let id = InstanceId { namespace: "shop".into(), pod: "p".into(), source: Source::Registration("r".into()) };
        let root = "/podlease/owners/@claims/2f73657276696365732f7061792f/";
        let marker = c.marker(&id, d.claim.as_deref()).unwrap();
        assert_eq!(marker, format!("{root}shop/c1/ns.rel/p/r"));
        assert_eq!(c.namespace_of(&marker).as_deref(), Some("shop"));
        let others = c.others(&id, d.claim.as_deref());
        assert_eq!(others, vec![(root.to_string(), format!("{root}shop/")), (format!("{root}shop0"), "/podlease/owners/@claims/2f73657276696365732f7061792f0".to_string())]);
        let inside = |k: &str| others.iter().any(|(a, b)| a.as_str() <= k && k < b.as_str());
        assert!(!inside(&marker), "our own namespace is not another's");
        assert!(inside(&format!("{root}mallory/c1/x/p/r")) && inside(&format!("{root}a/c1/x/p/r")) && inside(&format!("{root}shopx/c9/x/p/r")));
        assert!(!inside("/podlease/owners/@claims/2f73657276696365732f7061792f2f/a"), "another service's");
        // Unclaimed (shared, skydns) or a writer without claims: no marker, no check.
        assert!(c.marker(&id, None).is_none());
        assert!(Claims::default().others(&id, d.claim.as_deref()).is_empty());
    }
}
