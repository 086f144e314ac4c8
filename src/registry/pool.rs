//! Pre-granted leases. A pod turning Ready used to cost a lease grant and then the Txn that
//! writes its key: two raft writes in series on the way to consumers. With a few leases per
//! TTL granted ahead of time, a registration takes one and writes its key in one Txn.
//!
//! A pooled lease holds nothing and is not kept alive: one not taken while at least half of
//! its TTL is left is dropped and expires on its own. So podlease dying with a full pool
//! loses nothing and leaves nothing behind for longer than a TTL. A TTL nobody asked for
//! in [`IDLE`] stops being pooled.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::write::call;
use crate::etcd::Connection;
use crate::metrics::Metrics;

/// A TTL not asked for in this long is no longer pooled.
pub const IDLE: Duration = Duration::from_secs(600);
/// Grants in flight at once while refilling.
const REFILL_CONCURRENCY: usize = 8;
/// How often the pool drops stale leases and tops up, besides right after a take.
const TICK: Duration = Duration::from_secs(1);

/// A pooled lease handed to a registration: its id and when it was granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pooled {
    pub lease: i64,
    pub granted_at: Instant,
}

#[derive(Default)]
struct Inner {
    free: HashMap<i64, VecDeque<Pooled>>,
    /// TTLs in use, and when each was last asked for.
    wanted: HashMap<i64, Instant>,
}

/// Cheap to clone; clones share the pool. `size` 0 turns pooling off.
#[derive(Clone, Default)]
pub struct Pool {
    size: usize,
    inner: Arc<Mutex<Inner>>,
    wake: Arc<Notify>,
    metrics: Option<Metrics>,
}

/// Whether a lease granted at `granted_at` with `ttl` seconds is still worth handing out
/// at `now`: at least half of its TTL left (its first renewal, due at a third, may then be
/// already due: the keepalive driver sends it at once).
pub fn fresh(granted_at: Instant, ttl: i64, now: Instant) -> bool {
    now.saturating_duration_since(granted_at) < Duration::from_millis(ttl.max(1) as u64 * 500)
}

impl Pool {
    pub fn new(size: usize, metrics: Metrics) -> Pool {
        Pool { size, inner: Arc::default(), wake: Arc::default(), metrics: Some(metrics) }
    }

    pub fn enabled(&self) -> bool {
        self.size > 0
    }

    /// A fresh lease of `ttl` from the pool, if one is there; either way `ttl` counts as in
    /// use and the pool tops it up.
    pub fn take(&self, ttl: i64) -> Option<Pooled> {
        if !self.enabled() {
            return None;
        }
        let now = Instant::now();
        let taken = {
            let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            inner.wanted.insert(ttl, now);
            let free = inner.free.entry(ttl).or_default();
            let mut taken = None;
            while let Some(p) = free.pop_front() {
                if fresh(p.granted_at, ttl, now) {
                    taken = Some(p);
                    break;
                }
                self.count(|m| m.lease_pool_expired.inc());
            }
            self.gauge(&inner);
            taken
        };
        self.count(|m| if taken.is_some() { m.lease_pool_taken.inc() } else { m.lease_pool_missed.inc() });
        self.wake.notify_one();
        taken
    }

    /// Starts pooling `ttl` before anything asks for it (the default TTL).
    pub fn prewarm(&self, ttl: i64) {
        if self.enabled() {
            self.inner.lock().unwrap_or_else(|e| e.into_inner()).wanted.insert(ttl, Instant::now());
            self.wake.notify_one();
        }
    }

    fn count<T>(&self, f: impl FnOnce(&Metrics) -> T) {
        if let Some(m) = &self.metrics {
            let _ = f(m);
        }
    }

    /// Keeps the pool topped up until `term` ends (then what is left expires on its own).
    pub fn spawn_refill(&self, etcd: Connection, timeout: Duration, term: CancellationToken) {
        if !self.enabled() {
            return;
        }
        let pool = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = term.cancelled() => break,
                    _ = pool.wake.notified() => {}
                    _ = tokio::time::sleep(TICK) => {}
                }
                let needed = pool.prune_and_count(Instant::now());
                for (ttl, n) in needed {
                    let granted: Vec<Pooled> = futures::stream::iter(0..n)
                        .map(|_| {
                            let mut lc = etcd.lease_client();
                            async move {
                                let lease = call(timeout, "grant", lc.grant(ttl, None)).await.ok()?.id();
                                Some(Pooled { lease, granted_at: Instant::now() })
                            }
                        })
                        .buffer_unordered(REFILL_CONCURRENCY)
                        .filter_map(|p| async move { p })
                        .collect()
                        .await;
                    if granted.len() < n {
                        debug!(ttl, wanted = n, granted = granted.len(), "lease pool: grants failed; trying again at the next tick");
                    }
                    pool.put(ttl, granted);
                }
            }
            pool.clear();
        });
    }

    /// Drops stale leases and TTLs no longer in use; how many leases each TTL lacks.
    fn prune_and_count(&self, now: Instant) -> Vec<(i64, usize)> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.wanted.retain(|_, last| now.saturating_duration_since(*last) < IDLE);
        let wanted: Vec<i64> = inner.wanted.keys().copied().collect();
        let mut expired = 0;
        inner.free.retain(|ttl, q| {
            let before = q.len();
            q.retain(|p| fresh(p.granted_at, *ttl, now));
            expired += before - q.len();
            wanted.contains(ttl)
        });
        self.count(|m| m.lease_pool_expired.inc_by(expired as u64));
        let mut needed = Vec::new();
        for ttl in wanted {
            let have = inner.free.get(&ttl).map_or(0, VecDeque::len);
            if have < self.size {
                needed.push((ttl, self.size - have));
            }
        }
        self.gauge(&inner);
        needed
    }

    fn put(&self, ttl: i64, granted: Vec<Pooled>) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if inner.wanted.contains_key(&ttl) {
            inner.free.entry(ttl).or_default().extend(granted);
        }
        self.gauge(&inner);
    }

    fn clear(&self) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.free.clear();
        inner.wanted.clear();
        self.gauge(&inner);
    }

    fn gauge(&self, inner: &Inner) {
        let free: usize = inner.free.values().map(VecDeque::len).sum();
        self.count(|m| m.lease_pool_free.set(free as i64));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(size: usize) -> Pool {
        Pool::new(size, Metrics::new())
    }

    #[test]
    fn a_lease_is_handed_out_while_half_its_ttl_is_left() {
        let t0 = Instant::now();
        assert!(fresh(t0, 30, t0 + Duration::from_millis(14_999)));
        assert!(!fresh(t0, 30, t0 + Duration::from_secs(15)));
        assert!(!fresh(t0, 1, t0 + Duration::from_millis(500)));
    }

    #[test]
    fn takes_come_in_grant_order_and_skip_stale_leases() {
        let p = pool(4);
        assert_eq!(p.take(30), None, "empty: the caller grants");
        let now = Instant::now();
        let stale = Pooled { lease: 1, granted_at: now - Duration::from_secs(20) };
        let a = Pooled { lease: 2, granted_at: now };
        let b = Pooled { lease: 3, granted_at: now };
        p.put(30, vec![stale, a, b]);
        assert_eq!(p.take(30), Some(a));
        assert_eq!(p.take(30), Some(b));
        assert_eq!(p.take(30), None);
        assert_eq!(p.take(10), None, "another TTL has its own leases");
    }

    #[test]
    fn the_pool_tops_up_ttls_in_use_and_forgets_idle_ones() {
        let p = pool(4);
        assert!(p.prune_and_count(Instant::now()).is_empty(), "nothing asked for yet");
        p.prewarm(30);
        let _ = p.take(45);
        let mut needed = p.prune_and_count(Instant::now());
        needed.sort();
        assert_eq!(needed, vec![(30, 4), (45, 4)]);
        let now = Instant::now();
        p.put(30, vec![Pooled { lease: 7, granted_at: now }, Pooled { lease: 8, granted_at: now }]);
        assert!(p.prune_and_count(now).contains(&(30, 2)));
        // Ten minutes later nobody asked for either: neither is pooled any more.
        assert!(p.prune_and_count(now + IDLE + Duration::from_secs(1)).is_empty());
        assert_eq!(p.take(30), None, "the idle TTL's leases were dropped");
    }

    #[test]
    fn a_pool_of_size_zero_is_off() {
        let p = pool(0);
        p.prewarm(30);
        p.put(30, vec![Pooled { lease: 1, granted_at: Instant::now() }]);
        assert_eq!(p.take(30), None);
        assert!(p.prune_and_count(Instant::now()).is_empty());
    }
}
