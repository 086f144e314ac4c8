//! Adoption: after a restart (or a new leader), the ownership records say which leases
//! podlease already holds. Leases that still match a desired instance are kept (no DELETE
//! reaches any watcher); the rest are revoked.

use etcd_client::{GetOptions, KeyValue};

use super::owner::{OwnerRecord, Owners};
use super::write::{Held, OpError, Writer};
use crate::desired::InstanceId;

/// Records are read in pages so a large cluster never hits gRPC's message size limit.
const PAGE: i64 = 1000;

/// Every ownership record of this cluster, with the lease it lives under.
pub async fn read_records(w: &Writer) -> Result<Vec<(InstanceId, Held)>, OpError> {
    let root = w.owners.root().to_string();
    let end = prefix_end(root.as_bytes());
    let mut from = root.clone().into_bytes();
    let mut out = Vec::new();
    loop {
        let mut kv = w.client.kv_client();
        let opts = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
        let resp = w.call("get", kv.get(from.clone(), Some(opts))).await?;
        for kv in resp.kvs() {
            if let Some(entry) = parse(&w.owners, kv) {
                out.push(entry);
            }
        }
        match resp.kvs().last() {
            Some(last) if resp.more() => {
                from = last.key().to_vec();
                from.push(0);
            }
            _ => return Ok(out),
        }
    }
}

fn parse(owners: &Owners, kv: &KeyValue) -> Option<(InstanceId, Held)> {
    let id = owners.parse_key(kv.key_str().ok()?)?;
    let rec: OwnerRecord = serde_json::from_slice(kv.value()).ok()?;
    if kv.lease() == 0 {
        return None;
    }
    let held = Held {
        lease: kv.lease(),
        key: rec.key,
        ttl: rec.ttl,
        value_hash: rec.value_hash,
        pod_uid: rec.pod_uid,
        since: k8s_openapi::jiff::Timestamp::now(),
    };
    Some((id, held))
}

/// The smallest key greater than every key with this prefix.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_increments_the_last_byte() {
        assert_eq!(prefix_end(b"/a/"), b"/a0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
    }
}
