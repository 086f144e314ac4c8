//! Pre-granted leases. A pod turning Ready used to cost a lease grant and then the Txn that
//! writes its key: two raft writes in series on the way to consumers. With a few leases per
//! TTL granted ahead of time, a registration takes one and writes its key in one Txn.
//!
//! A pooled lease holds nothing and is renewed by the keepalive driver like any other (a
//! renewal is no raft write), so it always has two thirds of its TTL ahead when it is taken
//! and keeps its renewal schedule. When the term ends, the driver stops and the pool's
//! leases expire within a TTL, holding nothing: podlease dying with a full pool loses
//! nothing. A TTL nobody asked for in [`IDLE`] stops being pooled (the prewarmed ones stay).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::lease::{Backoff, Keepalive};
use super::write::call;
use crate::etcd::Connection;
use crate::metrics::Metrics;

/// A TTL not asked for in this long is no longer pooled.
pub const IDLE: Duration = Duration::from_secs(600);
/// Grants in flight at once while refilling.
const REFILL_CONCURRENCY: usize = 8;
/// How often the pool drops idle TTLs and tops up, besides right after a take.
const TICK: Duration = Duration::from_secs(1);

#[derive(Default)]
struct Inner {
    free: HashMap<i64, VecDeque<i64>>,
    /// TTLs in use, and when each was last asked for ...
    wanted: HashMap<i64, Instant>,
    /// ... and those pooled whatever the demand (the default TTL).
    prewarmed: HashSet<i64>,
}

/// Cheap to clone; clones share the pool. Off (size 0, no keepalive driver) by default.
#[derive(Clone, Default)]
pub struct Pool {
    size: usize,
    inner: Arc<Mutex<Inner>>,
    wake: Arc<Notify>,
    keepalive: Option<Keepalive>,
    metrics: Option<Metrics>,
}

impl Pool {
    /// A pool of `size` leases per TTL in use, kept alive by `keepalive`; `size` 0 is off.
    pub fn new(size: usize, keepalive: Keepalive, metrics: Metrics) -> Pool {
        Pool { size, inner: Arc::default(), wake: Arc::default(), keepalive: Some(keepalive), metrics: Some(metrics) }
    }

    pub fn enabled(&self) -> bool {
        self.size > 0 && self.keepalive.is_some()
    }

    /// A lease of `ttl` from the pool, if one is there; either way `ttl` counts as in use
    /// and the pool tops it up.
    pub fn take(&self, ttl: i64) -> Option<i64> {
        if !self.enabled() {
            return None;
        }
        let taken = {
            let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            inner.wanted.insert(ttl, Instant::now());
            inner.free.get_mut(&ttl).and_then(VecDeque::pop_front)
        };
        self.count(|m| match taken {
            Some(_) => {
                m.lease_pool_free.dec();
                m.lease_pool_taken.inc();
            }
            None => {
                m.lease_pool_missed.inc();
            }
        });
        self.wake.notify_one();
        taken
    }

    /// A taken lease that ends up holding nothing (the registration was refused; the caller
    /// revokes it): no longer renewed.
    pub fn discard(&self, lease: i64) {
        if let Some(k) = &self.keepalive {
            k.untrack(lease);
        }
    }

    /// etcd reported `lease` gone: if it was waiting in the pool, it is not handed out.
    pub fn lost(&self, lease: i64) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let mut removed = 0;
        for q in inner.free.values_mut() {
            let before = q.len();
            q.retain(|l| *l != lease);
            removed += before - q.len();
        }
        drop(inner);
        self.count(|m| m.lease_pool_free.dec_by(removed as i64));
    }

    /// Pools `ttl` from now on, whatever the demand (the default TTL).
    pub fn prewarm(&self, ttl: i64) {
        if self.enabled() {
            let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            inner.prewarmed.insert(ttl);
            inner.wanted.insert(ttl, Instant::now());
            drop(inner);
            self.wake.notify_one();
        }
    }

    fn count<T>(&self, f: impl FnOnce(&Metrics) -> T) {
        if let Some(m) = &self.metrics {
            let _ = f(m);
        }
    }

    /// Keeps the pool topped up until `term` ends (then the driver stops renewing and what
    /// is left expires on its own).
    pub fn spawn_refill(&self, etcd: Connection, timeout: Duration, term: CancellationToken) {
        if !self.enabled() {
            return;
        }
        let pool = self.clone();
        tokio::spawn(async move {
            let mut backoff = Backoff::capped(Duration::from_secs(30));
            let mut wait = TICK;
            loop {
                tokio::select! {
                    _ = term.cancelled() => break,
                    _ = pool.wake.notified(), if wait == TICK => {}
                    _ = tokio::time::sleep(wait) => {}
                }
                let mut short = false;
                for (ttl, n) in pool.prune_and_count(Instant::now()) {
                    let granted: Vec<i64> = futures::stream::iter(0..n)
                        .map(|_| {
                            let (mut lc, pool) = (etcd.lease_client(), pool.clone());
                            async move {
                                let granted = call(timeout, "grant", lc.grant(ttl, None)).await.ok().map(|r| r.id());
                                if granted.is_none() {
                                    pool.count(|m| m.etcd_error("grant"));
                                }
                                granted
                            }
                        })
                        .buffer_unordered(REFILL_CONCURRENCY)
                        .take_until(term.cancelled())
                        .filter_map(|l| async move { l })
                        .collect()
                        .await;
                    if term.is_cancelled() {
                        break;
                    }
                    short |= granted.len() < n;
                    pool.put(ttl, granted);
                }
                // Grants failing (etcd down or refusing): try again later, not every tick.
                wait = if short { backoff.next() } else { backoff.reset(); TICK };
                if short {
                    debug!(retry_in = ?wait, "lease pool: grants failed");
                }
            }
            pool.clear();
        });
    }

    /// Drops TTLs no longer in use (their leases are no longer renewed, and expire holding
    /// nothing); how many leases each TTL in use lacks.
    fn prune_and_count(&self, now: Instant) -> Vec<(i64, usize)> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let prewarmed = inner.prewarmed.clone();
        inner.wanted.retain(|ttl, last| prewarmed.contains(ttl) || now.saturating_duration_since(*last) < IDLE);
        let wanted: Vec<i64> = inner.wanted.keys().copied().collect();
        let idle: Vec<i64> = inner.free.keys().filter(|ttl| !wanted.contains(ttl)).copied().collect();
        for ttl in idle {
            for lease in inner.free.remove(&ttl).unwrap_or_default() {
                self.discard(lease);
                self.count(|m| m.lease_pool_free.dec());
            }
        }
        wanted
            .into_iter()
            .filter_map(|ttl| {
                let have = inner.free.get(&ttl).map_or(0, VecDeque::len);
                (have < self.size).then(|| (ttl, self.size - have))
            })
            .collect()
    }

    /// Fresh grants: kept alive from now on, handed out in grant order.
    fn put(&self, ttl: i64, granted: Vec<i64>) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let keep = inner.wanted.contains_key(&ttl);
        for lease in granted {
            if keep && let Some(k) = &self.keepalive {
                k.track_pooled(lease, ttl);
                inner.free.entry(ttl).or_default().push_back(lease);
                self.count(|m| m.lease_pool_free.inc());
            }
        }
    }

    fn clear(&self) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let n: usize = inner.free.values().map(VecDeque::len).sum();
        inner.free.clear();
        inner.wanted.clear();
        drop(inner);
        self.count(|m| m.lease_pool_free.dec_by(n as i64));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(size: usize) -> Pool {
        Pool::new(size, Keepalive::detached(), Metrics::new())
    }

    #[test]
    fn takes_come_in_grant_order_and_each_ttl_has_its_own() {
        let p = pool(4);
        assert_eq!(p.take(30), None, "empty: the caller grants");
        p.put(30, vec![2, 3]);
        assert_eq!(p.take(30), Some(2));
        assert_eq!(p.take(30), Some(3));
        assert_eq!(p.take(30), None);
        assert_eq!(p.take(10), None, "another TTL has its own leases");
    }

    #[test]
    fn a_lease_reported_lost_is_not_handed_out() {
        let p = pool(4);
        let _ = p.take(30);
        p.put(30, vec![5, 6]);
        p.lost(5);
        assert_eq!(p.take(30), Some(6));
    }

    #[test]
    fn the_pool_tops_up_ttls_in_use_and_forgets_idle_ones_but_not_the_prewarmed() {
        let p = pool(4);
        assert!(p.prune_and_count(Instant::now()).is_empty(), "nothing asked for yet");
        p.prewarm(30);
        let _ = p.take(45);
        let mut needed = p.prune_and_count(Instant::now());
        needed.sort();
        assert_eq!(needed, vec![(30, 4), (45, 4)]);
        p.put(30, vec![7, 8]);
        p.put(45, vec![9]);
        assert!(p.prune_and_count(Instant::now()).contains(&(30, 2)));
        // Ten minutes later nobody asked for either: 45 is no longer pooled, 30 still is.
        let later = Instant::now() + IDLE + Duration::from_secs(1);
        assert_eq!(p.prune_and_count(later), vec![(30, 2)]);
        assert_eq!(p.take(45), None, "the idle TTL's leases were dropped");
        assert_eq!(p.take(30), Some(7));
    }

    #[test]
    fn a_pool_of_size_zero_is_off() {
        let p = pool(0);
        p.prewarm(30);
        p.put(30, vec![1]);
        assert_eq!(p.take(30), None);
        assert!(p.prune_and_count(Instant::now()).is_empty());
    }
}
