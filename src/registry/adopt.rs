//! Adoption: after a restart (or a new leader), the ownership records say which leases
//! podlease already holds. Leases that still match a desired instance are kept (no DELETE
//! reaches any watcher); the rest are revoked.

use std::time::Duration;

use etcd_client::{GetOptions, KeyValue};

use crate::etcd::Connection;

use super::owner::{OwnerRecord, Owners};
use super::write::{Held, OpError, Writer};
use crate::desired::{InstanceId, Source};

/// Records are read in pages so a large cluster never hits gRPC's message size limit.
const PAGE: i64 = 1000;

/// Every ownership record of this cluster, with the lease it lives under.
pub async fn read_records(w: &Writer) -> Result<Vec<(InstanceId, Held)>, OpError> {
    let root = w.owners.root().to_string();
    let mut out = Vec::new();
    scan(w, &root, false, |kv| {
        if let Some(entry) = parse(&w.owners, kv) {
            out.push(entry);
        }
    })
    .await?;
    Ok(out)
}

/// Calls `each` for every key under `prefix`, a page at a time.
pub(super) async fn scan(w: &Writer, prefix: &str, keys_only: bool, each: impl FnMut(&KeyValue)) -> Result<(), OpError> {
    let end = prefix_end(prefix.as_bytes());
    scan_range(w, prefix.as_bytes(), &end, keys_only, each).await
}

/// Calls `each` for every key in [from, end), a page at a time.
pub(super) async fn scan_range(
    w: &Writer,
    from: impl AsRef<[u8]>,
    end: impl AsRef<[u8]>,
    keys_only: bool,
    mut each: impl FnMut(&KeyValue),
) -> Result<(), OpError> {
    let end = end.as_ref().to_vec();
    let mut from = from.as_ref().to_vec();
    loop {
        let mut kv = w.client.kv_client();
        let mut opts = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
        if keys_only {
            opts = opts.with_keys_only();
        }
        let resp = w.call("get", kv.get(from.clone(), Some(opts))).await?;
        resp.kvs().iter().for_each(&mut each);
        match resp.kvs().last() {
            Some(last) if resp.more() => {
                from = last.key().to_vec();
                from.push(0);
            }
            _ => return Ok(()),
        }
    }
}

/// The ownership records in etcd, as the status writer asks about them: a finalizer is
/// released only when etcd holds no record (hence no key: both go in one Txn) of the
/// registration, never on the registry's in-memory view, which lags adoption and revokes
/// in flight.
#[derive(Clone)]
pub struct Records {
    w: Writer,
}

impl Records {
    pub fn new(client: Connection, owners: Owners, timeout: Duration) -> Records {
        Records { w: Writer { client, owners, claims: Default::default(), timeout, fence: None, pool: Default::default() } }
    }

    /// Whether etcd still holds a record of registration `name` in `namespace`.
    pub async fn any_left(&self, namespace: &str, name: &str) -> Result<bool, OpError> {
        let prefix = format!("{}{namespace}/", self.w.owners.root());
        let source = Source::Registration(name.to_string());
        let mut found = false;
        scan(&self.w, &prefix, true, |kv| {
            found |= kv.key_str().ok().and_then(|k| self.w.owners.parse_key(k)).is_some_and(|id| id.source == source);
        })
        .await?;
        Ok(found)
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
        // A record from before claims is rewritten once (an update in place), adding them.
        value_hash: if rec.v >= 1 { rec.value_hash } else { String::new() },
        pod_uid: rec.pod_uid,
        since: k8s_openapi::jiff::Timestamp::now(),
        claim: rec.claim,
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
