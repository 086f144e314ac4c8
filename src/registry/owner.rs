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
    /// The fence revision of the term that wrote it (none without a fence): etcd's history
    /// alone then shows whether every write came from the term whose fence was in force.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fence: Option<i64>,
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
}
