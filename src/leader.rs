//! Leader election on a coordination.k8s.io/v1 Lease, client-go style: a holder keeps the
//! Lease by renewing it every retry period; anyone may take it once the holder has not been
//! seen renewing for a whole lease duration (measured on the local clock from when the
//! record last changed, so clock skew between replicas does not matter). A leader that
//! cannot renew within the renew deadline steps down at once.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::Client;
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
}

/// The last record seen and when it was first seen in this form.
struct Observed {
    holder: String,
    renew: Option<Timestamp>,
    transitions: i32,
    at: Instant,
}

pub struct Elector {
    api: Api<Lease>,
    cfg: LeaderConfig,
    observed: Option<Observed>,
}

impl Elector {
    pub fn new(client: Client, cfg: LeaderConfig) -> Elector {
        Elector { api: Api::namespaced(client, &cfg.namespace), cfg, observed: None }
    }

    /// Runs until `shutdown`, publishing leadership on `leader`. With `release`, a leader
    /// hands the Lease back on shutdown so a standby takes over at once.
    pub async fn run(mut self, leader: watch::Sender<bool>, shutdown: CancellationToken, release: bool) {
        loop {
            // Follower: try to acquire every retry period.
            loop {
                match self.try_acquire_or_renew().await {
                    Ok(true) => break,
                    Ok(false) => {}
                    Err(e) => warn!(error = %e, "leader election: reading or writing the Lease failed"),
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(self.cfg.retry_period) => {}
                }
            }
            info!(identity = self.cfg.identity, lease = self.cfg.name, "became leader");
            let _ = leader.send(true);

            // Leader: renew every retry period; give up when the renew deadline passes.
            let mut last_renew = Instant::now();
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => {
                        let _ = leader.send(false);
                        if release {
                            self.release().await;
                        }
                        return;
                    }
                    _ = tokio::time::sleep(self.cfg.retry_period) => {}
                }
                // After a pause (SIGSTOP, a stalled node) the deadline may already be gone:
                // step down before anything else.
                if last_renew.elapsed() > self.cfg.renew_deadline {
                    break;
                }
                let left = self.cfg.renew_deadline.saturating_sub(last_renew.elapsed());
                match tokio::time::timeout(left, self.try_acquire_or_renew()).await {
                    Ok(Ok(true)) => last_renew = Instant::now(),
                    Ok(Ok(false)) => break,
                    Ok(Err(e)) => warn!(error = %e, "renewing the leader Lease failed"),
                    Err(_) => {}
                }
                if last_renew.elapsed() > self.cfg.renew_deadline {
                    break;
                }
            }
            warn!(identity = self.cfg.identity, "lost leadership");
            let _ = leader.send(false);
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

    /// Takes the Lease if it is free or expired, or renews it if we hold it.
    async fn try_acquire_or_renew(&mut self) -> Result<bool, kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.cfg.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta { name: Some(self.cfg.name.clone()), ..Default::default() },
                spec: Some(self.spec(None, 0)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let renew = spec.renew_time.as_ref().map(|t| t.0);
        let transitions = spec.lease_transitions.unwrap_or(0);
        let changed = self
            .observed
            .as_ref()
            .is_none_or(|o| o.holder != holder || o.renew != renew || o.transitions != transitions);
        if changed {
            self.observed = Some(Observed { holder: holder.clone(), renew, transitions, at: Instant::now() });
        }
        let duration = Duration::from_secs(spec.lease_duration_seconds.unwrap_or(0).max(1) as u64);
        let seen = self.observed.as_ref().expect("set above").at;
        let ours = holder == self.cfg.identity;
        let expired = holder.is_empty() || seen.elapsed() >= duration;
        if !ours && !expired {
            return Ok(false);
        }
        lease.spec = Some(if ours {
            self.spec(spec.acquire_time.clone(), transitions)
        } else {
            self.spec(None, transitions + 1)
        });
        // The resourceVersion in `lease` makes this a compare-and-swap.
        match self.api.replace(&self.cfg.name, &PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Gives the Lease up (empty holder, 1 s duration) so a standby need not wait.
    async fn release(&mut self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.cfg.name).await else { return };
        let mut spec = lease.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.cfg.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        lease.spec = Some(spec);
        match self.api.replace(&self.cfg.name, &PostParams::default(), &lease).await {
            Ok(_) => info!("released the leader Lease"),
            Err(e) => warn!(error = %e, "releasing the leader Lease failed"),
        }
    }
}
