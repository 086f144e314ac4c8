//! The etcd operations of one instance: register (grant + Txn), update in place, revoke.
//! Every Txn writes the key and its ownership record together, under the same lease, and
//! only if the key is absent or already under our lease: never clobber.

use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, PutOptions, Txn, TxnOp, TxnOpResponse};
use k8s_openapi::jiff::Timestamp;

use super::owner::{OwnerRecord, Owners, value_hash};
use crate::desired::{Desired, InstanceId};

/// What the registry holds in etcd for one instance.
#[derive(Debug, Clone, PartialEq)]
pub struct Held {
    pub lease: i64,
    pub key: String,
    pub ttl: i64,
    pub value_hash: String,
    pub pod_uid: String,
    pub since: Timestamp,
}

/// The result of one operation.
#[derive(Debug)]
pub enum Outcome {
    Registered(Held),
    /// Someone else's key is in the way; nothing was written.
    Conflict { key: String, message: String },
    Revoked,
    /// The lease expired under us: register anew.
    LeaseGone,
}

#[derive(Debug, thiserror::Error)]
pub enum OpError {
    #[error("etcd {op} timed out after {after:?}")]
    Timeout { op: &'static str, after: Duration },
    #[error("etcd {op}: {source}")]
    Etcd { op: &'static str, source: etcd_client::Error },
}

impl OpError {
    pub fn op(&self) -> &'static str {
        match self {
            OpError::Timeout { op, .. } | OpError::Etcd { op, .. } => op,
        }
    }
}

/// Everything an operation needs; cheap to clone into a task.
#[derive(Clone)]
pub struct Writer {
    pub client: Client,
    pub owners: Owners,
    pub timeout: Duration,
}

fn is_lease_not_found(e: &etcd_client::Error) -> bool {
    e.to_string().contains("requested lease not found")
}

impl Writer {
    pub(super) async fn call<T>(
        &self,
        op: &'static str,
        f: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, OpError> {
        match tokio::time::timeout(self.timeout, f).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(source)) => Err(OpError::Etcd { op, source }),
            Err(_) => Err(OpError::Timeout { op, after: self.timeout }),
        }
    }

    fn owner_put(&self, id: &InstanceId, d: &Desired, key: &str, lease: i64) -> TxnOp {
        let record = OwnerRecord { key: key.to_string(), ttl: d.ttl, value_hash: value_hash(&d.value), pod_uid: d.pod_uid.clone() };
        TxnOp::put(
            self.owners.key(id),
            serde_json::to_vec(&record).expect("serializes"),
            Some(PutOptions::new().with_lease(lease)),
        )
    }

    fn puts(&self, id: &InstanceId, d: &Desired, key: &str, lease: i64) -> Vec<TxnOp> {
        vec![
            TxnOp::put(key, d.value.clone(), Some(PutOptions::new().with_lease(lease))),
            self.owner_put(id, d, key, lease),
        ]
    }

    fn held(d: &Desired, key: String, lease: i64) -> Held {
        Held { lease, key, ttl: d.ttl, value_hash: value_hash(&d.value), pod_uid: d.pod_uid.clone(), since: Timestamp::now() }
    }

    /// Grants a lease and writes key + ownership record under it if the key is absent.
    pub async fn register(&self, id: &InstanceId, d: &Desired) -> Result<Outcome, OpError> {
        let mut lc = self.client.lease_client();
        let lease = self.call("grant", lc.grant(d.ttl, None)).await?.id();
        let key = d.key.with_lease(lease);
        match self.put_if_absent(id, d, &key, lease).await {
            Ok(Outcome::Registered(h)) => Ok(Outcome::Registered(h)),
            other => {
                // Nothing of ours is under the lease: drop it now rather than at TTL.
                let _ = self.revoke(lease).await;
                other
            }
        }
    }

    async fn put_if_absent(&self, id: &InstanceId, d: &Desired, key: &str, lease: i64) -> Result<Outcome, OpError> {
        let txn = Txn::new()
            .when(vec![Compare::create_revision(key, CompareOp::Equal, 0)])
            .and_then(self.puts(id, d, key, lease))
            .or_else(vec![TxnOp::get(key, None)]);
        let mut kv = self.client.kv_client();
        let resp = match self.call("txn", kv.txn(txn)).await {
            Err(OpError::Etcd { source, .. }) if is_lease_not_found(&source) => return Ok(Outcome::LeaseGone),
            r => r?,
        };
        if resp.succeeded() {
            return Ok(Outcome::Registered(Self::held(d, key.to_string(), lease)));
        }
        let holder = resp.op_responses().into_iter().find_map(|r| match r {
            TxnOpResponse::Get(g) => g.kvs().first().map(|kv| kv.lease()),
            _ => None,
        });
        Ok(conflict(key, holder))
    }

    /// Rewrites the value (and record) in place under the held lease: watchers see a PUT,
    /// never a DELETE. A key deleted out of band is recreated under the same lease.
    pub async fn update(&self, id: &InstanceId, d: &Desired, held: &Held) -> Result<Outcome, OpError> {
        let key = held.key.clone();
        let txn = Txn::new()
            .when(vec![Compare::lease(key.as_str(), CompareOp::Equal, held.lease)])
            .and_then(self.puts(id, d, &key, held.lease))
            .or_else(vec![TxnOp::get(key.as_str(), None)]);
        let mut kv = self.client.kv_client();
        let resp = match self.call("txn", kv.txn(txn)).await {
            Err(OpError::Etcd { source, .. }) if is_lease_not_found(&source) => return Ok(Outcome::LeaseGone),
            r => r?,
        };
        if resp.succeeded() {
            let mut h = Self::held(d, key, held.lease);
            h.since = held.since;
            return Ok(Outcome::Registered(h));
        }
        let existing = resp.op_responses().into_iter().find_map(|r| match r {
            TxnOpResponse::Get(g) => Some(g.kvs().first().map(|kv| kv.lease())),
            _ => None,
        });
        match existing.flatten() {
            None => match self.put_if_absent(id, d, &key, held.lease).await? {
                Outcome::Registered(mut h) => {
                    h.since = held.since;
                    Ok(Outcome::Registered(h))
                }
                other => {
                    let _ = self.revoke(held.lease).await;
                    Ok(other)
                }
            },
            Some(holder) => {
                // Someone replaced our key: leave theirs alone and let go of ours.
                let _ = self.revoke(held.lease).await;
                Ok(conflict(&key, Some(holder)))
            }
        }
    }

    /// Revokes a lease: its key and ownership record vanish at once. An unknown lease is
    /// already gone, which is what we wanted.
    pub async fn revoke(&self, lease: i64) -> Result<Outcome, OpError> {
        let mut lc = self.client.lease_client();
        match self.call("revoke", lc.revoke(lease)).await {
            Ok(_) => Ok(Outcome::Revoked),
            Err(OpError::Etcd { source, .. }) if is_lease_not_found(&source) => Ok(Outcome::Revoked),
            Err(e) => Err(e),
        }
    }
}

fn conflict(key: &str, holder: Option<i64>) -> Outcome {
    let message = match holder {
        Some(0) => format!("key {key} already exists in etcd without a lease; podlease leaves it alone"),
        Some(l) => format!("key {key} already exists in etcd under lease {l:x}, not this registration's; podlease leaves it alone"),
        None => format!("key {key} is held by another writer; podlease leaves it alone"),
    };
    Outcome::Conflict { key: key.to_string(), message }
}
