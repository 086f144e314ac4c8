//! Leader election on a coordination.k8s.io/v1 Lease, client-go style: a holder keeps the
//! Lease by renewing it every retry period; anyone may take it once the holder has not been
//! seen renewing for a whole lease duration (measured on the local clock from when the
//! record last changed, so clock skew between replicas does not matter). A leader that
//! cannot renew within the renew deadline steps down at once; so does a leader that cannot
//! reach etcd (it releases the Lease so that a replica that can reach etcd takes over), and
//! only a replica that reaches etcd tries to take the Lease.
//!
//! The Lease's `leaseTransitions` when this replica took it is the leadership epoch that
//! fences its etcd writes (see `registry::fence`).

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, ObjectMeta, PostParams};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

#[derive(Debug, Clone)]
pub struct LeaderConfig {
    pub namespace: String,
    pub name: String,
    /// This replica's identity in the Lease.
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
}

impl LeaderConfig {
    /// client-go's defaults scaled from one lease duration: renew within 2/3 of it, retry
    /// every 2/15 of it (15 s → 10 s and 2 s).
    pub fn new(namespace: String, name: String, identity: String, lease_duration: Duration) -> LeaderConfig {
        LeaderConfig {
            namespace,
            name,
            identity,
            lease_duration,
            renew_deadline: lease_duration * 2 / 3,
            retry_period: (lease_duration * 2 / 15).max(Duration::from_millis(200)),
        }
    }

    /// The longest a standby may take to lead once the leader dies: the Lease runs out
    /// `lease_duration` after the standby last saw it change (it looks every `retry_period`,
    /// so up to one period late), and the look after that takes it (15 s → 19 s).
    pub fn worst_failover(&self) -> Duration {
        self.lease_duration + self.retry_period * 2
    }
}

/// Whether keys with `ttl` seconds outlive a failover of `failover`: leases are renewed
/// every third of their TTL, so when the leader dies a lease has at least two thirds left.
pub fn ttl_outlives(ttl: i64, failover: Duration) -> bool {
    // 2/3 · ttl > failover, in whole nanoseconds.
    ttl.max(0) as u128 * 2_000_000_000 > 3 * failover.as_nanos()
}

/// The smallest TTL (seconds) that outlives `failover`.
pub fn min_ttl(failover: Duration) -> i64 {
    (3 * failover.as_nanos() / 2_000_000_000) as i64 + 1
}

/// Why keys with `ttl` do not outlive `failover`, or None when they do.
pub fn short_ttl(ttl: i64, failover: Duration) -> Option<String> {
    (!ttl_outlives(ttl, failover)).then(|| {
        format!(
            "a TTL of {ttl} s is shorter than a leader failover: a lease has two thirds of its TTL left ({:.1} s) when the leader dies, and a standby may take {:.0} s to take over; keys would expire meanwhile. Use at least {} s",
            ttl as f64 * 2.0 / 3.0,
            failover.as_secs_f64(),
            min_ttl(failover)
        )
    })
}

/// Whether a Lease write starts a term or renews the running one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Term {
    Acquiring,
    Renewing,
}

/// The epoch a new term takes: above the Lease's `leaseTransitions` (each term is a new
/// transition) and above the fence's epoch (the fence refuses any epoch not above the one
/// it holds, so a Lease deleted, restored or edited back to a lower count would otherwise
/// leave a leader that can never write).
fn start_epoch(transitions: Option<i64>, fence: Option<i64>) -> i64 {
    let after_lease = transitions.map_or(0, |t| t + 1);
    let after_fence = fence.map_or(0, |f| f + 1);
    after_lease.max(after_fence)
}

/// The last record seen and when it was first seen in this form.
struct Observed {
    holder: String,
    renew: Option<Timestamp>,
    transitions: i32,
    at: Instant,
}

/// What happened to the Lease when this replica shut down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handover {
    /// This replica did not lead.
    NotLeader,
    /// Another replica took the released Lease: it adopts every lease.
    TakenOver,
    /// Nobody took the Lease within the wait: no other replica will take over.
    NoTaker,
    /// The API server could not be asked: whether anyone takes over is unknown.
    Unknown,
}

pub struct Elector {
    api: Api<Lease>,
    cfg: LeaderConfig,
    observed: Option<Observed>,
    /// Where the fence lives (etcd client, key, call deadline): a Lease created afresh
    /// starts its epochs above the fence's.
    fence: Option<(crate::etcd::Connection, String, Duration)>,
}

impl Elector {
    pub fn new(client: Client, cfg: LeaderConfig) -> Elector {
        Elector { api: Api::namespaced(client, &cfg.namespace), cfg, observed: None, fence: None }
    }

    /// Runs until `shutdown`, publishing leadership on `leader` (the epoch while leading).
    /// Only tries to lead while `eligible` (etcd reachable). On shutdown a leader hands the
    /// Lease back so a standby takes over at once; with `wait_for_taker` it then waits up to
    /// one Lease duration to see whether one does.
    pub async fn run(
        mut self,
        leader: watch::Sender<Option<i64>>,
        mut eligible: watch::Receiver<crate::registry::fence::Probe>,
        shutdown: CancellationToken,
        wait_for_taker: bool,
    ) -> Handover {
        loop {
            // Follower: try to acquire every retry period, while etcd is reachable.
            let epoch = loop {
                if eligible.borrow_and_update().reachable {
                    match self.try_acquire_or_renew(Term::Acquiring).await {
                        Ok(Some(epoch)) => break epoch,
                        Ok(None) => {}
                        Err(e) => {
                            warn!(error = %e, "leader election: reading or writing the Lease failed")
                        }
                    }
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return Handover::NotLeader,
                    _ = tokio::time::sleep(self.cfg.retry_period) => {}
                    _ = eligible.changed() => {}
                }
            };
            info!(identity = self.cfg.identity, lease = self.cfg.name, epoch, "became leader");
            let _ = leader.send(Some(epoch));

            // Leader: renew every retry period; give up when the renew deadline passes.
            let mut last_renew = Instant::now();
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => {
                        let _ = leader.send(None);
                        return self.hand_over(epoch, wait_for_taker).await;
                    }
                    _ = tokio::time::sleep(self.cfg.retry_period) => {}
                    _ = eligible.changed() => {}
                }
                if !eligible.borrow_and_update().reachable {
                    warn!(identity = self.cfg.identity, "etcd is unreachable from this replica: stepping down so that another replica takes over");
                    let _ = leader.send(None);
                    let _ = tokio::time::timeout(self.cfg.retry_period * 2, self.release()).await;
                    break;
                }
                // After a pause (SIGSTOP, a stalled node) the deadline may already be gone:
                // step down before anything else.
                if last_renew.elapsed() > self.cfg.renew_deadline {
                    warn!(identity = self.cfg.identity, "lost leadership (renew deadline passed)");
                    let _ = leader.send(None);
                    break;
                }
                let left = self.cfg.renew_deadline.saturating_sub(last_renew.elapsed());
                match tokio::time::timeout(left, self.try_acquire_or_renew(Term::Renewing)).await {
                    Ok(Ok(Some(e))) if e == epoch => last_renew = Instant::now(),
                    Ok(Ok(_)) => {
                        warn!(identity = self.cfg.identity, "lost leadership (another replica holds the Lease)");
                        let _ = leader.send(None);
                        break;
                    }
                    Ok(Err(e)) => warn!(error = %e, "renewing the leader Lease failed"),
                    Err(_) => {}
                }
                if last_renew.elapsed() > self.cfg.renew_deadline {
                    warn!(identity = self.cfg.identity, "lost leadership (renew deadline passed)");
                    let _ = leader.send(None);
                    break;
                }
            }
        }
    }

    /// Epochs of a Lease this elector creates start above the fence in etcd (`key`).
    pub fn with_fence(mut self, client: crate::etcd::Connection, key: String, timeout: Duration) -> Elector {
        self.fence = Some((client, key, timeout));
        self
    }

    /// Releases the Lease and, if asked, waits to see whether another replica takes it.
    async fn hand_over(&mut self, epoch: i64, wait_for_taker: bool) -> Handover {
        // Shutdown must not hang on an API server that does not answer (the pod's grace
        // period has the wait for a taker and the revokes to hold as well).
        let released = tokio::time::timeout(Duration::from_secs(3), self.release()).await.unwrap_or(false);
        if !wait_for_taker {
            return Handover::Unknown;
        }
        match self.fence.clone() {
            Some((etcd, key, timeout)) => self.wait_for_fence(&etcd, &key, timeout, epoch, released).await,
            None if released => self.wait_for_lease_holder().await,
            None => Handover::Unknown,
        }
    }

    /// Whether another replica takes over. A newer term's fence in etcd says so at once; it
    /// needs no API server, which may be gone with this replica's RBAC (an uninstall deletes
    /// both at once). Another holder of the Lease is a taker that has not fenced yet (it
    /// relists first): it counts if it still holds the Lease at the end; one that let it go
    /// again without fencing was stopping too (a scale to zero). Nobody took over only on
    /// evidence to the end: etcd answered, and so did the Lease read (free, ours, gone, or
    /// refused because this ServiceAccount's RBAC is gone: no replica running as it can take
    /// over), both within the last two retry periods. A read that timed out or failed
    /// otherwise proves nothing: revoking while a slow API server delays the standby would
    /// deregister every pod in a rollout. Released, a standby takes the Lease within a retry
    /// period; not released, once it has expired: then wait for the worst failover. Every
    /// read is cut to the time left, so the wait ends on time.
    async fn wait_for_fence(&self, etcd: &crate::etcd::Connection, key: &str, timeout: Duration, epoch: i64, released: bool) -> Handover {
        let wait = if released { self.cfg.lease_duration.max(self.cfg.retry_period * 3) } else { self.cfg.worst_failover() + self.cfg.retry_period };
        let deadline = Instant::now() + wait;
        let (mut etcd_answered, mut lease_answered): (Option<Instant>, Option<Instant>) = (None, None);
        let mut other_holder: Option<String> = None;
        loop {
            let read_timeout = deadline.saturating_duration_since(Instant::now()).clamp(Duration::from_millis(200), Duration::from_secs(2));
            match crate::registry::fence::current_epoch(etcd, timeout.min(read_timeout), key).await {
                Ok(Some(e)) if e > epoch => {
                    info!(epoch = e, "another replica took over (its fence is in etcd)");
                    return Handover::TakenOver;
                }
                Ok(_) => etcd_answered = Some(Instant::now()),
                Err(e) => warn!(error = %e, "reading the fence while handing over failed"),
            }
            match tokio::time::timeout(read_timeout, self.api.get_opt(&self.cfg.name)).await {
                Ok(Ok(lease)) => {
                    lease_answered = Some(Instant::now());
                    let holder = lease.and_then(|l| l.spec).and_then(|s| s.holder_identity).unwrap_or_default();
                    let other = (!holder.is_empty() && holder != self.cfg.identity).then_some(holder);
                    if other.is_some() && other != other_holder {
                        info!(holder = other.as_deref(), "another replica holds the Lease; waiting for its fence");
                    }
                    other_holder = other;
                }
                Ok(Err(kube::Error::Api(e))) if e.code == 401 || e.code == 403 => {
                    lease_answered = Some(Instant::now());
                    other_holder = None;
                }
                Ok(Err(e)) => warn!(error = %e, "reading the leader Lease while handing over failed"),
                Err(_) => warn!("reading the leader Lease while handing over timed out"),
            }
            if Instant::now() >= deadline {
                if let Some(holder) = other_holder {
                    info!(holder, "another replica took over the Lease");
                    return Handover::TakenOver;
                }
                let recent = |t: Option<Instant>| t.is_some_and(|t| t.elapsed() <= self.cfg.retry_period * 2);
                return if recent(etcd_answered) && recent(lease_answered) { Handover::NoTaker } else { Handover::Unknown };
            }
            tokio::time::sleep(deadline.saturating_duration_since(Instant::now()).min(Duration::from_millis(200))).await;
        }
    }

    /// Without a fence (tests of the elector alone): whether another replica holds the
    /// released Lease within one Lease duration.
    async fn wait_for_lease_holder(&self) -> Handover {
        let deadline = Instant::now() + self.cfg.lease_duration.max(self.cfg.retry_period * 3);
        while Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let Ok(got) = tokio::time::timeout(Duration::from_secs(2), self.api.get_opt(&self.cfg.name)).await else {
                return Handover::Unknown;
            };
            match got {
                Ok(Some(l)) => {
                    let holder = l.spec.and_then(|s| s.holder_identity).unwrap_or_default();
                    if !holder.is_empty() && holder != self.cfg.identity {
                        info!(holder, "another replica took over the Lease");
                        return Handover::TakenOver;
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    warn!(error = %e, "reading the leader Lease after releasing it failed");
                    return Handover::Unknown;
                }
            }
        }
        Handover::NoTaker
    }

    /// The Lease as written: its spec, and the identity whose fence this leader takes (so a
    /// replica started with another identity can tell that it changed).
    fn stamp(&self, lease: &mut Lease) {
        if let Some((_, key, _)) = &self.fence {
            lease.metadata.annotations.get_or_insert_with(Default::default).insert(IDENTITY_ANNOTATION.into(), key.clone());
        }
    }

    fn spec(&self, acquire: Option<MicroTime>, transitions: i32) -> LeaseSpec {
        let now = MicroTime(Timestamp::now());
        LeaseSpec {
            holder_identity: Some(self.cfg.identity.clone()),
            lease_duration_seconds: Some(self.cfg.lease_duration.as_secs().max(1) as i32),
            acquire_time: Some(acquire.unwrap_or_else(|| now.clone())),
            renew_time: Some(now),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }

    /// The epoch a new term must start above: the fence's, read from etcd. None (with a
    /// warning) when etcd did not answer: no term starts then.
    async fn fence_floor(&self) -> Option<Option<i64>> {
        let Some((client, key, timeout)) = &self.fence else { return Some(None) };
        match crate::registry::fence::current_epoch(client, *timeout, key).await {
            Ok(e) => Some(e),
            Err(e) => {
                warn!(error = %e, "reading the fence before taking the leader Lease failed");
                None
            }
        }
    }

    /// Takes the Lease if it is free or expired, or renews it if we hold it: Some(epoch)
    /// while we hold it. A term that starts (`Term::Acquiring`) takes an epoch above the
    /// fence's even where the Lease says less (a deleted Lease, or one restored or edited
    /// back to a lower `leaseTransitions`): the fence refuses every epoch not above its own.
    async fn try_acquire_or_renew(&mut self, term: Term) -> Result<Option<i64>, kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.cfg.name).await? else {
            let Some(fence) = self.fence_floor().await else { return Ok(None) };
            let transitions = i32::try_from(start_epoch(None, fence)).unwrap_or(i32::MAX);
            let mut lease = Lease {
                metadata: ObjectMeta { name: Some(self.cfg.name.clone()), ..Default::default() },
                spec: Some(self.spec(None, transitions)),
            };
            self.stamp(&mut lease);
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(Some(i64::from(transitions))),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(None),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let renew = spec.renew_time.as_ref().map(|t| t.0);
        let transitions = spec.lease_transitions.unwrap_or(0);
        let changed = self.observed.as_ref().is_none_or(|o| o.holder != holder || o.renew != renew || o.transitions != transitions);
        if changed {
            self.observed = Some(Observed { holder: holder.clone(), renew, transitions, at: Instant::now() });
        }
        let duration = Duration::from_secs(spec.lease_duration_seconds.unwrap_or(0).max(1) as u64);
        let seen = self.observed.as_ref().expect("set above").at;
        let ours = holder == self.cfg.identity;
        let expired = holder.is_empty() || seen.elapsed() >= duration;
        if !ours && !expired {
            return Ok(None);
        }
        let epoch = match term {
            Term::Renewing if ours => transitions,
            // Not ours while leading: the caller steps down, whatever this returns.
            Term::Renewing => transitions.saturating_add(1),
            Term::Acquiring => {
                let Some(fence) = self.fence_floor().await else { return Ok(None) };
                i32::try_from(start_epoch(Some(i64::from(transitions)), fence)).unwrap_or(i32::MAX)
            }
        };
        lease.spec = Some(if ours && term == Term::Renewing { self.spec(spec.acquire_time.clone(), epoch) } else { self.spec(None, epoch) });
        self.stamp(&mut lease);
        // The resourceVersion in `lease` makes this a compare-and-swap.
        match self.api.replace(&self.cfg.name, &PostParams::default(), &lease).await {
            Ok(_) => Ok(Some(i64::from(epoch))),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Gives the Lease up (empty holder, 1 s duration) so a standby need not wait. False
    /// when the API server could not be reached.
    async fn release(&mut self) -> bool {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.cfg.name).await else {
            return false;
        };
        let mut spec = lease.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.cfg.identity.as_str()) {
            return true;
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        lease.spec = Some(spec);
        match self.api.replace(&self.cfg.name, &PostParams::default(), &lease).await {
            Ok(_) => {
                info!("released the leader Lease");
                true
            }
            Err(e) => {
                warn!(error = %e, "releasing the leader Lease failed");
                false
            }
        }
    }
}

/// The annotation on the leader Lease naming the identity (fence key) of its last leader.
pub const IDENTITY_ANNOTATION: &str = "podlease.io/identity";

/// The identity the leader Lease recorded: None when there is no Lease or no annotation,
/// Err when the Lease could not be read (then nothing is known: the caller must not take a
/// missing record for "no earlier identity").
pub async fn recorded_identity(client: &Client, cfg: &LeaderConfig, within: Duration) -> Result<Option<String>, String> {
    let api: Api<Lease> = Api::namespaced(client.clone(), &cfg.namespace);
    match tokio::time::timeout(within, api.get_opt(&cfg.name)).await {
        Ok(Ok(Some(l))) => Ok(l.metadata.annotations.and_then(|a| a.get(IDENTITY_ANNOTATION).cloned())),
        Ok(Ok(None)) => Ok(None),
        Ok(Err(e)) => Err(format!("reading the leader Lease {}/{}: {e}", cfg.namespace, cfg.name)),
        Err(_) => Err(format!("reading the leader Lease {}/{}: no answer within {within:?}", cfg.namespace, cfg.name)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_ttl_outlives_the_default_failover_and_shorter_ones_do_not() {
        let cfg = LeaderConfig::new("ns".into(), "podlease".into(), "a".into(), Duration::from_secs(15));
        let failover = cfg.worst_failover();
        assert_eq!(failover, Duration::from_secs(19));
        assert_eq!(min_ttl(failover), 29);
        assert!(ttl_outlives(30, failover) && ttl_outlives(29, failover));
        assert!(!ttl_outlives(28, failover) && !ttl_outlives(10, failover));
        assert_eq!(short_ttl(30, failover), None);
        let why = short_ttl(10, failover).unwrap();
        assert!(why.contains("(6.7 s)") && why.contains("19 s") && why.ends_with("Use at least 29 s"), "{why}");
        // min_ttl is the boundary for other Lease durations too.
        for secs in [2, 4, 10, 60, 300] {
            let f = LeaderConfig::new("ns".into(), "p".into(), "a".into(), Duration::from_secs(secs)).worst_failover();
            assert!(ttl_outlives(min_ttl(f), f) && !ttl_outlives(min_ttl(f) - 1, f), "{secs}");
        }
    }

    #[test]
    fn a_new_term_starts_above_both_the_lease_and_the_fence() {
        // First install: no Lease, no fence.
        assert_eq!(start_epoch(None, None), 0);
        // A Lease deleted while the fence names epoch 4.
        assert_eq!(start_epoch(None, Some(4)), 5);
        // The usual take-over: the Lease is ahead of (or at) the fence.
        assert_eq!(start_epoch(Some(4), Some(4)), 5);
        assert_eq!(start_epoch(Some(7), None), 8);
        // A Lease restored or edited back to 0 while the fence names 6: above the fence,
        // or the fence refuses the new leader's every write.
        assert_eq!(start_epoch(Some(0), Some(6)), 7);
    }
}
