//! The etcd operations of one instance: register (grant + Txn), update in place, revoke.
//! Every Txn writes the key and its ownership record together, under the same lease, and
//! only if the key is absent or already under our lease: never clobber.

use std::time::Duration;

use crate::etcd::Connection;
use etcd_client::{Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse, TxnResponse};
use k8s_openapi::jiff::Timestamp;

use super::fence::Fence;
use super::claim::Claims;
use super::owner::{OwnerRecord, Owners, value_hash};
use super::plan::Renew;
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
    /// The read prefix its service claim marker is under (None: not claimed).
    pub claim: Option<String>,
}

/// The result of one operation.
#[derive(Debug)]
pub enum Outcome {
    /// The key is ours under `held.lease`; `renew` says how much of its TTL is known left.
    Registered {
        held: Held,
        renew: Renew,
    },
    /// Someone else's key is in the way, or the service belongs to another namespace
    /// (`claimed_by`); nothing was written.
    Conflict {
        key: String,
        message: String,
        claimed_by: Option<String>,
    },
    Revoked,
    /// The lease expired under us: register anew.
    LeaseGone,
    /// The service's hold is not (or no longer) in etcd: nothing was written; try again
    /// once it is.
    Unclaimed,
    /// The write may or may not have landed under `held.lease`: keep that lease alive and
    /// try again under it.
    Unknown { held: Held, error: OpError },
}

#[derive(Debug, thiserror::Error)]
pub enum OpError {
    #[error("etcd {op} timed out after {after:?}")]
    Timeout { op: &'static str, after: Duration },
    #[error("etcd {op}: {source}")]
    Etcd { op: &'static str, source: etcd_client::Error },
    /// Another replica has taken over: this one must not write anything more.
    #[error("fenced: another podlease replica leads now")]
    Fenced,
}

impl OpError {
    pub fn op(&self) -> &'static str {
        match self {
            OpError::Timeout { op, .. } | OpError::Etcd { op, .. } => op,
            OpError::Fenced => "fenced",
        }
    }
}

/// Everything an operation needs; cheap to clone into a task.
#[derive(Clone)]
pub struct Writer {
    pub client: Connection,
    pub owners: Owners,
    pub claims: Claims,
    pub timeout: Duration,
    pub fence: Option<Fence>,
    /// Leases granted ahead (off where nothing registers).
    pub pool: super::pool::Pool,
}

pub(super) fn is_lease_not_found(e: &etcd_client::Error) -> bool {
    e.to_string().contains("requested lease not found")
}

/// One etcd call under a deadline.
pub async fn call<T>(timeout: Duration, op: &'static str, f: impl std::future::Future<Output = Result<T, etcd_client::Error>>) -> Result<T, OpError> {
    match tokio::time::timeout(timeout, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(source)) => Err(OpError::Etcd { op, source }),
        Err(_) => Err(OpError::Timeout { op, after: timeout }),
    }
}

impl Writer {
    pub(super) async fn call<T>(&self, op: &'static str, f: impl std::future::Future<Output = Result<T, etcd_client::Error>>) -> Result<T, OpError> {
        call(self.timeout, op, f).await
    }

    /// Runs `inner` only while this replica's fence holds.
    pub(super) async fn txn(&self, inner: Txn) -> Result<TxnResponse, OpError> {
        let Some(fence) = &self.fence else {
            let mut kv = self.client.kv_client();
            return self.call("txn", kv.txn(inner)).await;
        };
        let outer =
            Txn::new().when(vec![Compare::mod_revision(fence.key.as_str(), CompareOp::Equal, fence.revision)]).and_then(vec![TxnOp::txn(inner)]);
        let mut kv = self.client.kv_client();
        let resp = self.call("txn", kv.txn(outer)).await?;
        if !resp.succeeded() {
            return Err(OpError::Fenced);
        }
        resp.op_responses()
            .into_iter()
            .find_map(|r| match r {
                TxnOpResponse::Txn(t) => Some(t),
                _ => None,
            })
            .ok_or(OpError::Fenced)
    }

    fn owner_put(&self, id: &InstanceId, d: &Desired, key: &str, lease: i64) -> TxnOp {
        let record = OwnerRecord {
            key: key.to_string(),
            ttl: d.ttl,
            value_hash: value_hash(&d.value),
            pod_uid: d.pod_uid.clone(),
            v: 1,
            claim: d.claim.clone(),
            fence: self.fence.as_ref().map(|f| f.revision),
        };
        TxnOp::put(self.owners.key(id), serde_json::to_vec(&record).expect("serializes"), Some(PutOptions::new().with_lease(lease)))
    }

    /// The key, its record and its claim marker, under `lease`. The caller of a first write
    /// checks the claim itself (and is refused); every other write adds the marker only if
    /// no other namespace holds the claim (a nested Txn), so no path claims unchecked.
    fn puts(&self, id: &InstanceId, d: &Desired, key: &str, lease: i64) -> Vec<TxnOp> {
        let mut ops = vec![TxnOp::put(key, d.value.clone(), Some(PutOptions::new().with_lease(lease))), self.owner_put(id, d, key, lease)];
        if let Some(marker) = self.claims.marker(id, d.claim.as_deref()) {
            let when = unclaimed(&self.claims.others(id, d.claim.as_deref()));
            ops.push(TxnOp::txn(Txn::new().when(when).and_then(vec![TxnOp::put(marker, "", Some(PutOptions::new().with_lease(lease)))])));
        }
        ops
    }

    fn held(d: &Desired, key: String, lease: i64) -> Held {
        Held { lease, key, ttl: d.ttl, value_hash: value_hash(&d.value), pod_uid: d.pod_uid.clone(), since: Timestamp::now(), claim: d.claim.clone() }
    }

    /// Takes a pooled lease, or grants one, and writes key + ownership record under it if
    /// the key is absent: with a pooled lease, one etcd write.
    pub async fn register(&self, id: &InstanceId, d: &Desired) -> Result<Outcome, OpError> {
        if let Some(lease) = self.pool.take(d.ttl) {
            crate::failpoint::hit("after-grant");
            match self.register_under(id, d, lease, Renew::Pooled).await {
                // Revoked behind the pool's back (or expired over a long etcd outage):
                // nothing was written; grant one instead.
                Ok(Outcome::LeaseGone) => {}
                other => return other,
            }
        }
        let mut lc = self.client.lease_client();
        let lease = self.call("grant", lc.grant(d.ttl, None)).await?.id();
        crate::failpoint::hit("after-grant");
        self.register_under(id, d, lease, Renew::Granted).await
    }

    async fn register_under(&self, id: &InstanceId, d: &Desired, lease: i64, renew: Renew) -> Result<Outcome, OpError> {
        let key = d.key.with_lease(lease);
        match self.put_if_absent(id, d, &key, lease).await {
            Ok(Outcome::Registered { held, .. }) if held.lease == lease => Ok(Outcome::Registered { held, renew }),
            // The Txn may have been applied and only its answer lost (a timeout, a reset, an
            // etcd leader change): revoking now could delete a key that is live. Keep the
            // lease; the next attempt rewrites under it, which finds out either way.
            Err(e @ (OpError::Timeout { .. } | OpError::Etcd { .. })) => {
                let mut held = Self::held(d, key, lease);
                held.value_hash.clear();
                Ok(Outcome::Unknown { held, error: e })
            }
            other => {
                // Nothing is under the fresh lease: drop it now rather than at its TTL (and
                // stop renewing it, if it came from the pool).
                self.pool.discard(lease);
                let _ = self.revoke_lease(lease).await;
                other
            }
        }
    }

    /// Moves the key (same key) and its record to a fresh lease in one Txn, then revokes the
    /// old lease: watchers see a PUT, never a DELETE (TTL or pod UID changed).
    pub async fn reissue(&self, id: &InstanceId, d: &Desired, held: &Held) -> Result<Outcome, OpError> {
        let mut lc = self.client.lease_client();
        let lease = self.call("grant", lc.grant(d.ttl, None)).await?.id();
        let key = d.key.with_lease(lease);
        let txn = Txn::new()
            .when(vec![Compare::lease(key.as_str(), CompareOp::Equal, held.lease)])
            .and_then(self.puts(id, d, &key, lease))
            .or_else(vec![TxnOp::get(key.as_str(), None)]);
        // Read back after a lost answer: the fresh lease's age is then not known.
        let mut read_back = false;
        let moved = match self.txn(txn).await {
            Ok(r) => r.succeeded(),
            Err(OpError::Etcd { source, .. }) if is_lease_not_found(&source) => false,
            Err(OpError::Fenced) => {
                // Nothing moved: the fresh lease holds nothing.
                let _ = self.revoke_lease(lease).await;
                return Err(OpError::Fenced);
            }
            Err(e) => {
                // Whether it moved is unknown (the answer may be all that was lost). Read the
                // key back: under the fresh lease it moved, and that lease must be kept alive
                // from now on (nothing else knows it, a caretaker included).
                let mut kv = self.client.kv_client();
                match self.call("get", kv.get(key.as_str(), None)).await.map(|r| r.kvs().first().map(|kv| kv.lease())) {
                    Ok(Some(l)) if l == lease => {
                        read_back = true;
                        true
                    }
                    Ok(Some(l)) if l == held.lease => {
                        let _ = self.revoke_lease(lease).await;
                        return Err(e);
                    }
                    // Unread (or under neither): leave both leases; the retry finds the key
                    // under either (ours both, by the record) and takes it back.
                    _ => return Err(e),
                }
            }
        };
        if moved {
            let _ = self.revoke_lease(held.lease).await;
            // Granted a call deadline or more ago when read back: renewed at once then.
            let renew = if read_back { Renew::Unknown } else { Renew::Granted };
            return Ok(Outcome::Registered { held: Self::held(d, key, lease), renew });
        }
        // The key is not under our old lease (gone, or taken back under another of ours):
        // registered under the fresh lease as a new one is (a lost answer keeps it, the
        // write may have landed; anything else but success revokes it).
        let out = self.register_under(id, d, lease, Renew::Granted).await;
        match &out {
            // Taken back under the old lease itself: it stays.
            Ok(Outcome::Registered { held: h, .. }) if h.lease == held.lease => {}
            // Another replica leads: the old lease (and the record on it) is its to adopt.
            Err(OpError::Fenced) => {}
            _ => {
                let _ = self.revoke_recorded(std::slice::from_ref(id), held.lease).await;
            }
        }
        out
    }

    /// A new key: written first, then the old lease revoked (which deletes the old key; the
    /// record already moved to the new lease).
    pub async fn replace(&self, id: &InstanceId, d: &Desired, held: &Held) -> Result<Outcome, OpError> {
        let out = self.register(id, d).await?;
        // The record is still on the old lease unless the new key's Txn moved it (a
        // conflict, a lost answer).
        let _ = self.revoke_recorded(std::slice::from_ref(id), held.lease).await;
        Ok(out)
    }

    /// Revokes `lease`, which may still carry the ownership records of `ids`: a fenced Txn
    /// deletes those still on it first, and only then is the lease revoked. A newer leader
    /// reads the records after taking its fence, so it can never have adopted the lease this
    /// revokes; fenced, nothing is revoked and the lease is its to adopt.
    pub(super) async fn revoke_recorded(&self, ids: &[InstanceId], lease: i64) -> Result<Outcome, OpError> {
        let mut then = Vec::new();
        for id in ids {
            let record = self.owners.key(id);
            then.push(TxnOp::txn(Txn::new().when(vec![Compare::lease(record.as_str(), CompareOp::Equal, lease)]).and_then(vec![TxnOp::delete(record.as_str(), None)])));
        }
        self.txn(Txn::new().and_then(then)).await?;
        self.revoke_lease(lease).await
    }

    async fn put_if_absent(&self, id: &InstanceId, d: &Desired, key: &str, lease: i64) -> Result<Outcome, OpError> {
        let owner_key = self.owners.key(id);
        // The service's claim, atomically: its source's hold is there (which checked every
        // nested prefix), and no other namespace's marker under its read prefix.
        let others = self.claims.others(id, d.claim.as_deref());
        let hold = self.claims.hold_of(id, d.claim.as_deref());
        let mut when = vec![Compare::create_revision(key, CompareOp::Equal, 0)];
        when.extend(hold.iter().map(|h| Compare::create_revision(h.as_str(), CompareOp::Greater, 0)));
        when.extend(unclaimed(&others));
        let mut otherwise = vec![TxnOp::get(key, None), TxnOp::get(owner_key.as_str(), None)];
        if let Some(h) = &hold {
            otherwise.push(TxnOp::get(h.as_str(), Some(GetOptions::new().with_keys_only())));
        }
        otherwise.extend(
            others.iter().map(|(from, to)| TxnOp::get(from.as_str(), Some(GetOptions::new().with_range(to.as_str()).with_limit(1).with_keys_only()))),
        );
        let txn = Txn::new().when(when).and_then(self.puts(id, d, key, lease)).or_else(otherwise);
        let resp = match self.txn(txn).await {
            Err(OpError::Etcd { source, .. }) if is_lease_not_found(&source) => {
                return Ok(Outcome::LeaseGone);
            }
            r => r?,
        };
        if resp.succeeded() {
            return Ok(Outcome::Registered { held: Self::held(d, key.to_string(), lease), renew: Renew::Granted });
        }
        let mut gets = resp.op_responses().into_iter().filter_map(|r| match r {
            TxnOpResponse::Get(g) => Some(g.kvs().first().cloned()),
            _ => None,
        });
        let (existing, record) = (gets.next().flatten(), gets.next().flatten());
        let held_claim = hold.is_none() || gets.next().flatten().is_some();
        let claimant = gets.flatten().next().and_then(|kv| self.claims.namespace_of(kv.key_str().ok()?));
        // Our own key from before (a restart, an etcd outage that outlived our bookkeeping):
        // its ownership record names it under the same lease. Take it back instead of
        // reporting a conflict with ourselves.
        if let (Some(existing), Some(record)) = (&existing, &record)
            && existing.lease() != 0
            && existing.lease() == record.lease()
            && let Ok(rec) = serde_json::from_slice::<OwnerRecord>(record.value())
            && rec.key == key
        {
            // How much of its TTL is left is unknown: it is renewed at once.
            let held = Held {
                lease: existing.lease(),
                key: key.to_string(),
                ttl: rec.ttl,
                value_hash: rec.value_hash,
                pod_uid: rec.pod_uid,
                since: Timestamp::now(),
                claim: rec.claim,
            };
            return Ok(Outcome::Registered { held, renew: Renew::Unknown });
        }
        if let Some(ns) = claimant {
            let read = d.claim.as_deref().unwrap_or_default();
            let message = format!(
                "service {} (read as {read:?}) belongs to namespace {ns:?}: another namespace cannot join it unless the cluster admin shares it (--shared-service); nothing was written",
                d.service
            );
            return Ok(Outcome::Conflict { key: key.to_string(), message, claimed_by: Some(ns) });
        }
        if existing.is_none() && !held_claim {
            return Ok(Outcome::Unclaimed);
        }
        Ok(conflict(key, existing.map(|kv| kv.lease())))
    }

    /// Rewrites the value (and record) in place under the held lease: watchers see a PUT,
    /// never a DELETE. A key deleted out of band is recreated under the same lease.
    pub async fn update(&self, id: &InstanceId, d: &Desired, held: &Held) -> Result<Outcome, OpError> {
        let key = held.key.clone();
        let txn = Txn::new()
            .when(vec![Compare::lease(key.as_str(), CompareOp::Equal, held.lease)])
            .and_then(self.puts(id, d, &key, held.lease))
            .or_else(vec![TxnOp::get(key.as_str(), None)]);
        let resp = match self.txn(txn).await {
            Err(OpError::Etcd { source, .. }) if is_lease_not_found(&source) => {
                return Ok(Outcome::LeaseGone);
            }
            r => r?,
        };
        if resp.succeeded() {
            let mut h = Self::held(d, key, held.lease);
            h.since = held.since;
            return Ok(Outcome::Registered { held: h, renew: Renew::Granted });
        }
        let existing = resp.op_responses().into_iter().find_map(|r| match r {
            TxnOpResponse::Get(g) => Some(g.kvs().first().map(|kv| kv.lease())),
            _ => None,
        });
        match existing.flatten() {
            None => match self.put_if_absent(id, d, &key, held.lease).await? {
                Outcome::Registered { held: mut h, renew } => {
                    h.since = held.since;
                    Ok(Outcome::Registered { held: h, renew })
                }
                other => {
                    self.revoke(id, held).await?;
                    Ok(other)
                }
            },
            Some(holder) => {
                // Someone replaced our key: leave theirs alone and let go of ours.
                self.revoke(id, held).await?;
                Ok(conflict(&key, Some(holder)))
            }
        }
    }

    /// Ends an instance: deletes its key (if still under our lease) and its ownership record
    /// in one fenced Txn, then revokes the lease. Watchers see one DELETE of the same key.
    pub async fn revoke(&self, id: &InstanceId, held: &Held) -> Result<Outcome, OpError> {
        let owner_key = self.owners.key(id);
        // The marker goes with the record: once no record is left, no claim is either.
        let mut deletes = vec![TxnOp::delete(owner_key.as_str(), None)];
        if let Some(marker) = self.claims.marker(id, held.claim.as_deref()) {
            deletes.push(TxnOp::delete(marker, None));
        }
        let mut both = deletes.clone();
        both.insert(0, TxnOp::delete(held.key.as_str(), None));
        let txn = Txn::new().when(vec![Compare::lease(held.key.as_str(), CompareOp::Equal, held.lease)]).and_then(both).or_else(deletes);
        self.txn(txn).await?;
        self.revoke_lease(held.lease).await
    }

    /// Takes over the key and lease of `from` (the sources it passed through, the last one
    /// first to hold it) for `id`: while the key is still under that lease, writes the value
    /// and `id`'s record under it and deletes each of their records and claim markers still
    /// on that lease, in one Txn. Watchers see at most a PUT. When the key is no longer
    /// under it, the lease goes and `id` registers afresh.
    pub async fn transfer(&self, id: &InstanceId, d: &Desired, held: &Held, from: &[InstanceId]) -> Result<Outcome, OpError> {
        let key = d.key.with_lease(held.lease);
        // The record says the TTL the lease has (a different one wanted is a reissue next).
        let as_granted = Desired { ttl: held.ttl, ..d.clone() };
        let mut then = self.puts(id, &as_granted, &key, held.lease);
        then.extend(self.deletes_on(from, held));
        let txn = Txn::new().when(vec![Compare::lease(key.as_str(), CompareOp::Equal, held.lease)]).and_then(then);
        match self.txn(txn).await {
            Ok(r) if r.succeeded() => {
                let mut h = Self::held(d, key, held.lease);
                // Still the lease it was granted as: a different TTL wanted is a reissue next.
                (h.ttl, h.since) = (held.ttl, held.since);
                Ok(Outcome::Registered { held: h, renew: Renew::Unknown })
            }
            Ok(_) => {
                // The key is no longer on the lease; records may be (`id`'s too, from an
                // attempt whose answer was lost). Only once they are gone does `id` start
                // afresh: a failure is retried as it was, and the lease stays tracked.
                let mut on_lease = from.to_vec();
                on_lease.push(id.clone());
                self.revoke_recorded(&on_lease, held.lease).await?;
                self.register(id, d).await
            }
            Err(OpError::Etcd { source, .. }) if is_lease_not_found(&source) => self.register(id, d).await,
            Err(e) => Err(e),
        }
    }

    /// Deletes the records and claim markers of `ids` that are still on `held`'s lease (each
    /// its own nested Txn): a source that has since written a record of its own elsewhere (it
    /// wants another key) keeps it.
    fn deletes_on(&self, ids: &[InstanceId], held: &Held) -> Vec<TxnOp> {
        let mut ops = Vec::new();
        for id in ids {
            let marker = self.claims.marker(id, held.claim.as_deref());
            for k in std::iter::once(self.owners.key(id)).chain(marker) {
                ops.push(TxnOp::txn(Txn::new().when(vec![Compare::lease(k.as_str(), CompareOp::Equal, held.lease)]).and_then(vec![TxnOp::delete(k.as_str(), None)])));
            }
        }
        ops
    }

    /// Revokes a lease: everything under it vanishes. An unknown lease is already gone,
    /// which is what we wanted.
    pub async fn revoke_lease(&self, lease: i64) -> Result<Outcome, OpError> {
        let mut lc = self.client.lease_client();
        match self.call("revoke", lc.revoke(lease)).await {
            Ok(_) => Ok(Outcome::Revoked),
            Err(OpError::Etcd { source, .. }) if is_lease_not_found(&source) => Ok(Outcome::Revoked),
            Err(e) => Err(e),
        }
    }
}

/// "No key in any of these ranges": no other namespace's claim marker (an empty range
/// compares as revision 0).
fn unclaimed(ranges: &[(String, String)]) -> Vec<Compare> {
    ranges.iter().map(|(from, to)| Compare::create_revision(from.as_str(), CompareOp::Equal, 0).with_range(to.as_str())).collect()
}

fn conflict(key: &str, holder: Option<i64>) -> Outcome {
    let message = match holder {
        Some(0) => {
            format!("key {key} already exists in etcd without a lease; podlease leaves it alone")
        }
        Some(l) => format!("key {key} already exists in etcd under lease {l:x}, not this registration's; podlease leaves it alone"),
        None => format!("key {key} is held by another writer; podlease leaves it alone"),
    };
    Outcome::Conflict { key: key.to_string(), message, claimed_by: None }
}

/// Which held instances no longer look as written: key gone, under another lease, or a
/// different value. Reads in batches of Gets inside one Txn each.
pub async fn drifted(w: &Writer, held: Vec<(InstanceId, Held)>) -> Result<Vec<InstanceId>, OpError> {
    const BATCH: usize = 64;
    let mut out = Vec::new();
    for chunk in held.chunks(BATCH) {
        let gets: Vec<TxnOp> = chunk.iter().map(|(_, h)| TxnOp::get(h.key.as_str(), None)).collect();
        let mut kv = w.client.kv_client();
        let resp = w.call("verify", kv.txn(Txn::new().and_then(gets))).await?;
        for ((id, h), r) in chunk.iter().zip(resp.op_responses()) {
            let TxnOpResponse::Get(g) = r else { continue };
            let ok = g.kvs().first().is_some_and(|kv| kv.lease() == h.lease && value_hash(kv.value()) == h.value_hash);
            if !ok {
                out.push(id.clone());
            }
        }
    }
    Ok(out)
}
