//! The leader fence: one key, `<owner-prefix>/<cluster-id>/<install-id>` (the install's identity path), whose value names the
//! leadership epoch (the coordination Lease's `leaseTransitions` when this replica took it)
//! and the holder. Every registry write is a Txn that requires the fence key to be at the
//! revision its term wrote it at, so a deposed leader's writes fail.
//!
//! Taking the fence is itself conditional: a term may write it only if the stored epoch is
//! not newer than its own. A stale term that wakes from a pause (grant, sleep, put) can
//! therefore never take the fence back from a live leader.

use std::time::Duration;

use crate::etcd::Connection;
use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp};
use tokio::sync::watch;
use prometheus_client::metrics::gauge::Gauge;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::write::{OpError, Writer, call};

/// Leases podlease itself needs (the leader fence) are granted with this TTL at least.
pub const MIN_FENCE_TTL: i64 = 5;

/// The fence key's lease TTL. Short, so that a dead leader's fence is gone within seconds
/// and a standby keeps the leases alive long before any key TTL runs out (a leader that
/// loses its fence for a moment only starts a new term: no key changes).
pub const FENCE_TTL: i64 = 6;

/// How often the fence is read back (a term notices a newer one within this) and etcd's
/// reachability is probed.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(2);

/// A leader that has not reached etcd for this long steps down, so that a replica that can
/// reach it takes over while the keys' TTLs still run (a standby takes the released Lease
/// within one retry period).
pub const UNREACHABLE_AFTER: Duration = Duration::from_secs(6);

/// A term's fence: the key and the revision this term wrote it at.
#[derive(Debug, Clone)]
pub struct Fence {
    pub key: String,
    pub revision: i64,
}

/// The fence value: the epoch zero-padded so that etcd's byte-wise value comparison orders
/// epochs numerically, then the holder.
pub fn value(epoch: i64, identity: &str) -> String {
    format!("{:020}/{identity}", epoch.max(0))
}

/// The epoch a fence value names.
pub fn epoch_of(value: &[u8]) -> Option<i64> {
    std::str::from_utf8(value).ok()?.split('/').next()?.parse().ok()
}

/// The epoch the fence key names now (None: no fence). A Lease created afresh (someone
/// deleted it) must start above it, or its holder could never take the fence.
pub async fn current_epoch(client: &Connection, timeout: Duration, key: &str) -> Result<Option<i64>, OpError> {
    let mut kv = client.kv_client();
    let resp = call(timeout, "fence", kv.get(key, None)).await?;
    Ok(resp.kvs().first().and_then(|kv| epoch_of(kv.value())))
}

/// Takes the fence for `epoch` unless a newer epoch holds it; returns the fence and the
/// fence key's own lease. `Err(Fenced)` when a newer leader holds it. Every call has
/// `timeout` as its deadline.
pub async fn take(client: &Connection, timeout: Duration, key: &str, identity: &str, epoch: i64, ttl: i64) -> Result<(Fence, i64), OpError> {
    let drop_lease = |lease: i64| async move {
        let mut lc = client.lease_client();
        let _ = call(timeout, "revoke", lc.revoke(lease)).await;
    };
    let mut lc = client.lease_client();
    let lease = call(timeout, "grant", lc.grant(ttl.max(MIN_FENCE_TTL), None)).await?.id();
    let mine = value(epoch, identity);
    // A Value comparison on a missing key is false in etcd: an absent fence is taken too.
    let txn = Txn::new()
        .when(vec![Compare::value(key, CompareOp::Greater, mine.as_str())])
        .and_then(vec![TxnOp::get(key, None)])
        .or_else(vec![TxnOp::put(key, mine.as_str(), Some(PutOptions::new().with_lease(lease)))]);
    let mut kv = client.kv_client();
    let resp = match call(timeout, "fence", kv.txn(txn)).await {
        Ok(r) => r,
        Err(e) => {
            drop_lease(lease).await;
            return Err(e);
        }
    };
    if resp.succeeded() {
        drop_lease(lease).await;
        return Err(OpError::Fenced);
    }
    let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
    Ok((Fence { key: key.to_string(), revision }, lease))
}

/// What the fence key holds now: Some(mod revision) or None when absent.
pub async fn read(w: &Writer, key: &str) -> Result<Option<i64>, OpError> {
    let mut kv = w.client.kv_client();
    let resp = w.call("fence", kv.get(key, None)).await?;
    Ok(resp.kvs().first().map(|kv| kv.mod_revision()))
}

/// What this replica last saw of etcd and the fence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    /// The last successful read is recent (within UNREACHABLE_AFTER): only such a replica
    /// may lead.
    pub reachable: bool,
    /// Whether the fence key exists, from the last successful read (None before the first).
    /// No fence means no live leader term: any replica may then keep the leases alive.
    pub fence: Option<bool>,
}

/// Probes etcd every CHECK_INTERVAL with a linearizable read of the fence key (it needs a
/// quorum, as writes do).
/// `reachable` is the `podlease_etcd_reachable` gauge (every replica, leader or not).
pub fn probe(client: Connection, key: String, reachable: Gauge, shutdown: CancellationToken) -> watch::Receiver<Probe> {
    let (tx, rx) = watch::channel(Probe { reachable: true, fence: None });
    reachable.set(1);
    tokio::spawn(async move {
        let mut last_ok = tokio::time::Instant::now();
        let mut fence = None;
        let mut tick = tokio::time::interval(CHECK_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let mut kv = client.kv_client();
            let opts = etcd_client::GetOptions::new().with_count_only();
            if let Ok(Ok(resp)) = tokio::time::timeout(CHECK_INTERVAL, kv.get(key.as_str(), Some(opts))).await {
                last_ok = tokio::time::Instant::now();
                fence = Some(resp.count() > 0);
            }
            let now = Probe { reachable: last_ok.elapsed() < UNREACHABLE_AFTER, fence };
            reachable.set(i64::from(now.reachable));
            let before = *tx.borrow();
            if before.reachable != now.reachable {
                if now.reachable {
                    info!("etcd is reachable from this replica again");
                } else {
                    warn!(after = ?UNREACHABLE_AFTER, "etcd unreachable from this replica");
                }
            }
            if before != now {
                let _ = tx.send(now);
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fence_values_order_by_epoch_bytewise() {
        assert!(value(9, "zz") < value(10, "aa"));
        assert!(value(10, "a") < value(11, "a"));
        assert_eq!(value(3, "a"), value(3, "a"));
        assert_eq!(value(-1, "a"), value(0, "a"));
        assert_eq!(epoch_of(value(42, "pod-a/x").as_bytes()), Some(42));
        assert_eq!(epoch_of(b"garbage"), None);
    }
}
