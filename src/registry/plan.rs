//! The registry's decisions, pure: from one instance's slot (what it should be, what it
//! holds) and an event (a new desire, an operation's outcome, a lost lease, adoption) to the
//! next operation and the effects the actor carries out. No I/O and no clocks, so every
//! transition has a plain test below.

use std::sync::Arc;

use super::lease::Backoff;
use super::view::Shown;
use super::write::{Held, OpError, Outcome};
use crate::desired::{Desired, InstanceId};
use crate::format::Key;

/// One etcd operation for one instance.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    Register(Arc<Desired>),
    Update(Arc<Desired>, Held),
    /// Same key, new lease (TTL or pod changed): key and record move to a fresh lease in one
    /// Txn, then the old lease is revoked. Watchers see a PUT, never a DELETE.
    Reissue(Arc<Desired>, Held),
    /// A different key: the new one is written first, then the old lease is revoked.
    Replace(Arc<Desired>, Held),
    Revoke(Held),
    /// The key of the instances `.2` (which go: the source holding it, and any it was handed
    /// on through before the hand-over ran) becomes this one's: in one Txn their records
    /// are deleted, this one's written and the value, under the same lease; watchers see no
    /// DELETE.
    Transfer(Arc<Desired>, Held, Vec<InstanceId>),
}

impl Op {
    /// Every `label`.
    pub const LABELS: [&'static str; 6] = ["register", "update", "reissue", "replace", "revoke", "transfer"];

    pub fn label(&self) -> &'static str {
        match self {
            Op::Register(_) => "register",
            Op::Update(..) => "update",
            Op::Reissue(..) => "reissue",
            Op::Replace(..) => "replace",
            Op::Revoke(_) => "revoke",
            Op::Transfer(..) => "transfer",
        }
    }
}

/// How much of a lease's TTL is known to be left when it is first kept alive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renew {
    /// Just granted: the whole TTL is ahead, the first renewal is due at TTL/3.
    Granted,
    /// Adopted or taken back: it may be about to expire, so it is renewed at once.
    Unknown,
    /// Taken from the lease pool, where the keepalive driver already renews it: its
    /// renewals go on as they were (renewed at once if the driver no longer has it).
    Pooled,
}

/// What the actor does after a decision.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    Track {
        lease: i64,
        ttl: i64,
        renew: Renew,
    },
    Untrack(i64),
    Show(Option<Shown>),
    /// Someone else's key is in the way: report it (to Kubernetes only when `first`), try
    /// again after the conflict retry interval.
    Conflicted {
        message: String,
        first: bool,
        claimed_by: Option<String>,
    },
    /// Try again after the slot's backoff.
    RetryBackoff,
    /// A lost lease is being replaced.
    Regrant,
    EtcdOk,
    EtcdFailed {
        op: &'static str,
        message: String,
    },
    /// A Ready transition reached etcd (the propagation metric).
    Propagated,
    /// etcd refused the write because another replica's fence is in place: end the term.
    Fenced,
    /// Look at the slot again (dispatch decides whether anything is left to do).
    Enqueue,
    /// The service's hold was not in etcd: the instance waits until it is held again.
    Unclaimed,
}

/// What to do with an idle slot.
#[derive(Debug, Clone, PartialEq)]
pub enum Next {
    /// Nothing desired, nothing held: forget the instance.
    Forget,
    /// Already as desired.
    Hold(Shown),
    Run(Op),
}

/// One instance as the registry knows it.
#[derive(Debug, Default)]
pub struct Slot {
    pub desired: Option<Arc<Desired>>,
    pub held: Option<Held>,
    /// Rare, so boxed: a slot is in a table of every instance (150,000 at the Kubernetes
    /// maximum), and each byte here is one per instance.
    pub conflict: Option<Box<(String, String)>>,
    pub failed: Option<String>,
    /// An operation is in flight (at most one per instance).
    pub busy: bool,
    pub backoff: Backoff,
    /// Another instance's key and lease, to be taken over (see [`Op::Transfer`]).
    pub transfer: Option<Box<(Vec<InstanceId>, Held)>>,
}

impl Slot {
    /// The operation that brings etcd to the desired state, if any.
    pub fn next(&self) -> Next {
        if let Some((from, h)) = self.transfer.as_deref() {
            return match &self.desired {
                Some(d) => Next::Run(Op::Transfer(d.clone(), h.clone(), from.clone())),
                // Not wanted after all: the lease (key and the other's record) goes.
                None => Next::Run(Op::Revoke(h.clone())),
            };
        }
        match (&self.desired, &self.held) {
            (None, None) => Next::Forget,
            (None, Some(h)) => Next::Run(Op::Revoke(h.clone())),
            (Some(d), None) => Next::Run(Op::Register(d.clone())),
            (Some(d), Some(h)) => {
                let same_key = d.key.matches(&h.key);
                let same_lease = d.ttl == h.ttl && d.pod_uid == h.pod_uid;
                if same_key && !same_lease && matches!(d.key, Key::Fixed(_)) {
                    Next::Run(Op::Reissue(d.clone(), h.clone()))
                } else if !same_key || !same_lease {
                    // (A key ending in its lease id changes with the lease.)
                    Next::Run(Op::Replace(d.clone(), h.clone()))
                } else if super::owner::value_hash(&d.value) != h.value_hash || d.claim != h.claim {
                    // (A changed claim: a service shared or no longer shared.)
                    Next::Run(Op::Update(d.clone(), h.clone()))
                } else {
                    Next::Hold(registered(h, d))
                }
            }
        }
    }

    /// `op` is being started.
    pub fn start(&mut self, op: &Op) -> Vec<Effect> {
        self.busy = true;
        if matches!(op, Op::Register(_)) && self.conflict.is_none() { vec![Effect::Show(Some(Shown::Pending))] } else { Vec::new() }
    }

    /// A new desired state (None: the instance should not exist).
    pub fn desire(&mut self, desired: Option<Arc<Desired>>) -> Vec<Effect> {
        let mut fx = Vec::new();
        if desired.is_some() {
            // A new desire deserves a prompt try even after a conflict or failure.
            self.backoff.reset();
            // Shown from the moment it is wanted, not only once its operation starts: a
            // registration whose instances wait in the queue is not "all revoked".
            if self.held.is_none() && self.conflict.is_none() && self.failed.is_none() {
                fx.push(Effect::Show(Some(Shown::Pending)));
            }
        }
        self.desired = desired;
        fx.push(Effect::Enqueue);
        fx
    }

    /// Adoption found this instance's ownership record under a live lease.
    pub fn adopt(&mut self, held: Held) -> Vec<Effect> {
        let mut fx = self.set_held(Some(held), Renew::Unknown);
        fx.push(Effect::Enqueue);
        fx
    }

    /// Takes over `from`'s key and lease (`held`), wanting `desired` for it.
    pub fn take_over(&mut self, from: Vec<InstanceId>, held: Held, desired: Arc<Desired>) -> Vec<Effect> {
        self.transfer = Some(Box::new((from, held)));
        self.desire(Some(desired))
    }

    /// The keepalive driver reports `lease` gone.
    pub fn lease_lost(&mut self, lease: i64) -> Vec<Effect> {
        if self.held.as_ref().map(|h| h.lease) != Some(lease) {
            return Vec::new();
        }
        let mut fx = self.set_held(None, Renew::Granted);
        if self.desired.is_some() {
            fx.push(Effect::Regrant);
        }
        fx.push(Effect::Show(Some(Shown::Pending)));
        fx.push(Effect::Enqueue);
        fx
    }

    /// Verification found the key deleted or altered out of band: force a rewrite (which
    /// recreates the key, or finds someone else's in the way). False when nothing is held.
    pub fn drifted(&mut self) -> bool {
        match self.held.as_mut() {
            Some(h) => {
                h.value_hash.clear();
                true
            }
            None => false,
        }
    }

    /// `op` finished with `result`.
    pub fn done(&mut self, op: &'static str, result: Result<Outcome, OpError>) -> Vec<Effect> {
        self.busy = false;
        // A transfer (or the revoke that replaced it) that got an answer is over; one that
        // failed is tried again as it was (it is idempotent).
        let mut ended = None;
        if matches!(op, "transfer" | "revoke") && result.is_ok() {
            ended = self.transfer.take().map(|t| t.1.lease);
        }
        let mut fx = self.done_with(op, result);
        // The lease taken over, if the slot did not end up holding it (the key had left it
        // and was registered afresh, or it was revoked): no longer kept alive.
        if let Some(l) = ended.filter(|l| self.held.as_ref().map(|h| h.lease) != Some(*l)) {
            fx.insert(0, Effect::Untrack(l));
        }
        fx
    }

    fn done_with(&mut self, op: &'static str, result: Result<Outcome, OpError>) -> Vec<Effect> {
        let mut fx = Vec::new();
        match result {
            Ok(Outcome::Registered { held, renew }) => {
                let new_lease = self.held.as_ref().map(|h| h.lease) != Some(held.lease);
                if new_lease && op == "register" {
                    fx.push(Effect::Propagated);
                }
                let address = self.desired.as_ref().map(|d| d.address.clone()).unwrap_or_default();
                let shown =
                    Shown::Registered { key: held.key.clone(), lease: held.lease, since: held.since, address, pod_uid: held.pod_uid.clone() };
                fx.extend(self.set_held(Some(held), renew));
                self.failed = None;
                self.conflict = None;
                self.backoff.reset();
                fx.push(Effect::EtcdOk);
                fx.push(Effect::Show(Some(shown)));
            }
            Ok(Outcome::Revoked) => {
                fx.extend(self.set_held(None, Renew::Granted));
                self.failed = None;
                fx.push(Effect::EtcdOk);
                fx.push(Effect::Show(None));
            }
            Ok(Outcome::LeaseGone) => fx.extend(self.set_held(None, Renew::Granted)),
            Ok(Outcome::Unclaimed) => {
                // Nothing was written (the writer let go of any lease it used).
                fx.extend(self.set_held(None, Renew::Granted));
                fx.push(Effect::Unclaimed);
                fx.push(Effect::Show(Some(Shown::Pending)));
            }
            Ok(Outcome::Unknown { held, error }) => {
                // Whatever landed is under this lease: keep it, and rewrite under it. How
                // long ago it was granted is not known here (a pooled lease, a slow answer):
                // renewed at once.
                fx.extend(self.set_held(Some(held), Renew::Unknown));
                self.failed = Some(error.to_string());
                fx.push(Effect::RetryBackoff);
                fx.push(Effect::EtcdFailed { op: error.op(), message: error.to_string() });
                fx.push(Effect::Show(Some(Shown::Pending)));
            }
            Ok(Outcome::Conflict { key, message, claimed_by }) => {
                fx.extend(self.set_held(None, Renew::Granted));
                let first = self.conflict.as_deref().map(|(_, m)| m) != Some(&message);
                self.conflict = Some(Box::new((key.clone(), message.clone())));
                fx.push(Effect::Conflicted { message: message.clone(), first, claimed_by: claimed_by.clone() });
                fx.push(Effect::EtcdOk);
                fx.push(Effect::Show(Some(Shown::Conflict { key, message, claimed_by })));
            }
            Err(OpError::Fenced) => return vec![Effect::Fenced],
            Err(e) => {
                // The write may have landed with only its answer lost (a timeout, a reset):
                // what etcd holds is not known. The slot must not claim it: a revoke that
                // landed, then the pod ready again, would otherwise Hold a key that is gone
                // (until the next verify), and an update A→B lost, then A wanted again, a key
                // that says B. The next operation rewrites under the held lease instead; one
                // whose lease a landed revoke took finds it gone and registers afresh.
                if let Some(h) = self.held.as_mut() {
                    h.value_hash.clear();
                }
                self.failed = Some(e.to_string());
                fx.push(Effect::RetryBackoff);
                fx.push(Effect::EtcdFailed { op: e.op(), message: e.to_string() });
                // A held key stays registered as far as anyone can tell.
                if self.held.is_none() {
                    fx.push(Effect::Show(Some(Shown::Failed { message: e.to_string() })));
                }
            }
        }
        fx.push(Effect::Enqueue);
        fx
    }

    /// The one place a slot's lease changes hands: the old one stops being kept alive, the
    /// new one starts.
    fn set_held(&mut self, new: Option<Held>, renew: Renew) -> Vec<Effect> {
        let old = self.held.as_ref().map(|h| h.lease);
        let mut fx = Vec::new();
        if old != new.as_ref().map(|h| h.lease) {
            if let Some(l) = old {
                fx.push(Effect::Untrack(l));
            }
            if let Some(h) = &new {
                fx.push(Effect::Track { lease: h.lease, ttl: h.ttl, renew });
            }
        }
        self.held = new;
        fx
    }
}

fn registered(h: &Held, d: &Desired) -> Shown {
    Shown::Registered { key: h.key.clone(), lease: h.lease, since: h.since, address: d.address.clone(), pod_uid: h.pod_uid.clone() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{Format, Key};
    use k8s_openapi::jiff::Timestamp;
    use std::time::Duration;

    fn desired(key: &str, value: &str, ttl: i64) -> Arc<Desired> {
        Arc::new(Desired {
            service: "svc".into(),
            format: Format::Json,
            key: Key::Fixed(key.into()),
            value: value.as_bytes().to_vec(),
            ttl,
            address: "10.0.0.1:80".into(),
            pod_uid: "uid-1".into(),
            ready_since: None,
            claim: None,
        })
    }

    fn held_for(d: &Desired, lease: i64) -> Held {
        Held {
            lease,
            key: d.key.with_lease(lease),
            ttl: d.ttl,
            value_hash: super::super::owner::value_hash(&d.value),
            pod_uid: d.pod_uid.clone(),
            since: Timestamp::UNIX_EPOCH,
            claim: None,
        }
    }

    fn registered_outcome(h: Held, renew: Renew) -> Result<Outcome, OpError> {
        Ok(Outcome::Registered { held: h, renew })
    }

    #[test]
    fn a_new_instance_is_granted_and_its_lease_kept_alive_from_a_full_ttl() {
        let d = desired("/s/a", "v", 30);
        let mut s = Slot::default();
        assert_eq!(s.desire(Some(d.clone())), vec![Effect::Show(Some(Shown::Pending)), Effect::Enqueue]);
        let Next::Run(op) = s.next() else { panic!("expected an operation") };
        assert_eq!(op, Op::Register(d.clone()));
        assert_eq!(s.start(&op), vec![Effect::Show(Some(Shown::Pending))]);
        let fx = s.done("register", registered_outcome(held_for(&d, 7), Renew::Granted));
        assert_eq!(fx[0], Effect::Propagated);
        assert_eq!(fx[1], Effect::Track { lease: 7, ttl: 30, renew: Renew::Granted });
        assert!(fx.contains(&Effect::EtcdOk));
        assert!(matches!(fx.iter().find(|e| matches!(e, Effect::Show(_))), Some(Effect::Show(Some(Shown::Registered { lease: 7, .. })))));
        assert!(!s.busy);
        assert!(matches!(s.next(), Next::Hold(Shown::Registered { lease: 7, .. })));
    }

    #[test]
    fn an_adopted_lease_is_renewed_at_once_and_needs_no_write_when_it_matches() {
        let d = desired("/s/a", "v", 30);
        let mut s = Slot::default();
        let fx = s.adopt(held_for(&d, 9));
        assert_eq!(fx, vec![Effect::Track { lease: 9, ttl: 30, renew: Renew::Unknown }, Effect::Enqueue]);
        s.desire(Some(d));
        assert!(matches!(s.next(), Next::Hold(Shown::Registered { lease: 9, .. })));
    }

    #[test]
    fn an_adopted_lease_nobody_wants_is_revoked_and_then_forgotten() {
        let d = desired("/s/a", "v", 30);
        let mut s = Slot::default();
        s.adopt(held_for(&d, 9));
        let Next::Run(op) = s.next() else { panic!() };
        assert_eq!(op, Op::Revoke(held_for(&d, 9)));
        assert_eq!(s.start(&op), vec![]);
        let fx = s.done("revoke", Ok(Outcome::Revoked));
        assert_eq!(fx, vec![Effect::Untrack(9), Effect::EtcdOk, Effect::Show(None), Effect::Enqueue]);
        assert_eq!(s.next(), Next::Forget);
    }

    #[test]
    fn a_key_taken_back_after_an_outage_is_renewed_at_once() {
        let d = desired("/s/a", "v", 30);
        let mut s = Slot::default();
        s.desire(Some(d.clone()));
        s.start(&Op::Register(d.clone()));
        let fx = s.done("register", registered_outcome(held_for(&d, 5), Renew::Unknown));
        assert!(fx.contains(&Effect::Track { lease: 5, ttl: 30, renew: Renew::Unknown }));
    }

    #[test]
    fn a_changed_value_is_updated_in_place_under_the_same_lease() {
        let d = desired("/s/a", "v1", 30);
        let mut s = Slot::default();
        s.adopt(held_for(&d, 3));
        let d2 = desired("/s/a", "v2", 30);
        s.desire(Some(d2.clone()));
        let Next::Run(op) = s.next() else { panic!() };
        assert_eq!(op, Op::Update(d2.clone(), held_for(&d, 3)));
        s.start(&op);
        let fx = s.done("update", registered_outcome(held_for(&d2, 3), Renew::Granted));
        assert!(!fx.iter().any(|e| matches!(e, Effect::Track { .. } | Effect::Untrack(_) | Effect::Propagated)), "{fx:?}");
    }

    #[test]
    fn a_changed_ttl_reissues_the_same_key_and_a_changed_key_replaces_it() {
        let d = desired("/s/a", "v", 30);
        let mut s = Slot::default();
        s.adopt(held_for(&d, 3));
        let d2 = desired("/s/a", "v", 10);
        s.desire(Some(d2.clone()));
        assert_eq!(s.next(), Next::Run(Op::Reissue(d2.clone(), held_for(&d, 3))));
        s.start(&Op::Reissue(d2.clone(), held_for(&d, 3)));
        let fx = s.done("reissue", registered_outcome(held_for(&d2, 5), Renew::Granted));
        assert_eq!(&fx[..2], &[Effect::Untrack(3), Effect::Track { lease: 5, ttl: 10, renew: Renew::Granted }]);
        let d3 = desired("/s/b", "v", 10);
        s.desire(Some(d3.clone()));
        let Next::Run(Op::Replace(new, old)) = s.next() else { panic!("expected a replace") };
        assert_eq!((new, old.lease), (d3, 5));
        let mut s = Slot::default();
        s.adopt(held_for(&d, 3));
        let d2 = desired("/s/b", "v", 30);
        s.start(&Op::Replace(d2.clone(), held_for(&d, 3)));
        let fx = s.done("replace", registered_outcome(held_for(&d2, 4), Renew::Granted));
        assert_eq!(&fx[..2], &[Effect::Untrack(3), Effect::Track { lease: 4, ttl: 30, renew: Renew::Granted }]);
    }

    #[test]
    fn a_lost_lease_shows_pending_and_is_registered_again() {
        let d = desired("/s/a", "v", 30);
        let mut s = Slot::default();
        s.desire(Some(d.clone()));
        s.adopt(held_for(&d, 3));
        assert_eq!(s.lease_lost(99), vec![], "another lease: nothing to do");
        let fx = s.lease_lost(3);
        assert_eq!(fx, vec![Effect::Untrack(3), Effect::Regrant, Effect::Show(Some(Shown::Pending)), Effect::Enqueue]);
        assert_eq!(s.next(), Next::Run(Op::Register(d)));
    }

    #[test]
    fn a_conflict_lets_go_of_the_lease_and_is_reported_once() {
        let d = desired("/s/a", "v", 30);
        let mut s = Slot::default();
        s.desire(Some(d.clone()));
        s.adopt(held_for(&d, 3));
        let conflict = || Ok(Outcome::Conflict { key: "/s/a".into(), message: "someone else".into(), claimed_by: None });
        let fx = s.done("update", conflict());
        assert_eq!(fx[0], Effect::Untrack(3));
        assert!(fx.contains(&Effect::Conflicted { message: "someone else".into(), first: true, claimed_by: None }));
        assert!(fx.contains(&Effect::Show(Some(Shown::Conflict { key: "/s/a".into(), message: "someone else".into(), claimed_by: None }))));
        // The retry keeps the conflict shown (no Pending flicker) and reports it no more.
        assert_eq!(s.start(&Op::Register(d)), vec![]);
        assert!(s.done("register", conflict()).contains(&Effect::Conflicted { message: "someone else".into(), first: false, claimed_by: None }));
    }

    #[test]
    fn a_fenced_write_ends_the_term_and_changes_nothing() {
        let d = desired("/s/a", "v", 30);
        let mut s = Slot::default();
        s.desire(Some(d.clone()));
        s.adopt(held_for(&d, 3));
        assert_eq!(s.done("update", Err(OpError::Fenced)), vec![Effect::Fenced]);
        assert_eq!(s.held.as_ref().map(|h| h.lease), Some(3));
    }

    #[test]
    fn a_failure_keeps_a_held_key_registered_and_backs_off() {
        let d = desired("/s/a", "v", 30);
        let timeout = || Err(OpError::Timeout { op: "txn", after: Duration::from_secs(5) });
        let mut s = Slot::default();
        s.desire(Some(d.clone()));
        let fx = s.done("register", timeout());
        assert!(fx.contains(&Effect::RetryBackoff));
        assert!(fx.iter().any(|e| matches!(e, Effect::Show(Some(Shown::Failed { .. })))));
        s.adopt(held_for(&d, 3));
        let fx = s.done("update", timeout());
        assert!(!fx.iter().any(|e| matches!(e, Effect::Show(_) | Effect::Untrack(_))), "{fx:?}");
        assert!(fx.contains(&Effect::EtcdFailed { op: "txn", message: "etcd txn timed out after 5s".into() }));
    }

    #[test]
    fn a_register_whose_answer_was_lost_keeps_its_lease_and_rewrites_under_it() {
        let d = desired("/s/a", "v", 30);
        let mut s = Slot::default();
        s.desire(Some(d.clone()));
        s.start(&Op::Register(d.clone()));
        let mut h = held_for(&d, 8);
        h.value_hash.clear();
        let fx = s.done("register", Ok(Outcome::Unknown { held: h.clone(), error: OpError::Timeout { op: "txn", after: Duration::from_secs(5) } }));
        assert_eq!(fx[0], Effect::Track { lease: 8, ttl: 30, renew: Renew::Unknown }, "renewed at once: its age is not known");
        assert!(!fx.iter().any(|e| matches!(e, Effect::Untrack(_))), "the lease is not given up: {fx:?}");
        assert!(fx.contains(&Effect::RetryBackoff));
        assert_eq!(s.next(), Next::Run(Op::Update(d, h)));
    }

    #[test]
    fn drift_forces_a_rewrite_of_a_held_key() {
        let d = desired("/s/a", "v", 30);
        let mut s = Slot::default();
        assert!(!s.drifted());
        s.desire(Some(d.clone()));
        s.adopt(held_for(&d, 3));
        assert!(s.drifted());
        assert!(matches!(s.next(), Next::Run(Op::Update(..))));
    }

    #[test]
    fn an_expired_lease_under_an_operation_registers_again() {
        let d = desired("/s/a", "v", 30);
        let mut s = Slot::default();
        s.desire(Some(d.clone()));
        s.adopt(held_for(&d, 3));
        let fx = s.done("update", Ok(Outcome::LeaseGone));
        assert_eq!(fx, vec![Effect::Untrack(3), Effect::Enqueue]);
        assert_eq!(s.next(), Next::Run(Op::Register(d)));
    }

    #[test]
    fn a_key_taken_over_from_another_source_keeps_its_lease_until_the_transfer_lands() {
        let d = desired("/s/a", "v2", 30);
        let theirs = held_for(&desired("/s/a", "v1", 30), 7);
        let from = InstanceId { namespace: "ns".into(), pod: "p".into(), source: crate::desired::Source::Annotations };
        let mut s = Slot::default();
        s.take_over(vec![from.clone()], theirs.clone(), d.clone());
        assert_eq!(s.next(), Next::Run(Op::Transfer(d.clone(), theirs.clone(), vec![from.clone()])));
        // No answer: tried again as it was (the Txn is idempotent).
        s.start(&Op::Transfer(d.clone(), theirs.clone(), vec![from.clone()]));
        s.done("transfer", Err(OpError::Timeout { op: "txn", after: Duration::from_secs(5) }));
        assert_eq!(s.next(), Next::Run(Op::Transfer(d.clone(), theirs.clone(), vec![from.clone()])));
        // Landed: the same lease is ours, renewed at once (its TTL left is not known).
        let mut mine = held_for(&d, 7);
        mine.ttl = 30;
        let fx = s.done("transfer", registered_outcome(mine, Renew::Unknown));
        assert!(fx.contains(&Effect::Track { lease: 7, ttl: 30, renew: Renew::Unknown }), "{fx:?}");
        assert!(s.transfer.is_none());
        assert!(matches!(s.next(), Next::Hold(Shown::Registered { lease: 7, .. })));
        // Not wanted any more before it landed: the lease goes, key and record with it.
        let mut s = Slot::default();
        s.take_over(vec![from.clone()], theirs.clone(), d);
        s.desire(None);
        assert_eq!(s.next(), Next::Run(Op::Revoke(theirs)));
    }

    #[test]
    fn a_lease_taken_over_but_not_kept_is_no_longer_renewed() {
        let d = desired("/s/a", "v2", 30);
        let theirs = held_for(&desired("/s/a", "v1", 30), 7);
        let from = InstanceId { namespace: "ns".into(), pod: "p".into(), source: crate::desired::Source::Annotations };
        // The key had left the lease: registered afresh under lease 9; lease 7 goes.
        let mut s = Slot::default();
        s.take_over(vec![from.clone()], theirs.clone(), d.clone());
        s.start(&Op::Transfer(d.clone(), theirs.clone(), vec![from.clone()]));
        let fx = s.done("transfer", registered_outcome(held_for(&d, 9), Renew::Granted));
        assert!(fx.contains(&Effect::Untrack(7)) && fx.contains(&Effect::Track { lease: 9, ttl: 30, renew: Renew::Granted }), "{fx:?}");
        // Not wanted after all, revoked: lease 7 goes too.
        let mut s = Slot::default();
        s.take_over(vec![from.clone()], theirs.clone(), d);
        s.desire(None);
        s.start(&Op::Revoke(theirs));
        let fx = s.done("revoke", Ok(Outcome::Revoked));
        assert!(fx.contains(&Effect::Untrack(7)), "{fx:?}");
    }

    #[test]
    fn a_revoke_or_update_whose_answer_was_lost_is_never_taken_for_the_held_state() {
        let lost = || Err(OpError::Timeout { op: "txn", after: Duration::from_secs(5) });
        let a = desired("/s/a", "A", 30);
        // A revoke that may have landed, then the pod ready again: rewrite, not Hold.
        let mut s = Slot::default();
        s.desire(Some(a.clone()));
        s.adopt(held_for(&a, 3));
        assert!(matches!(s.next(), Next::Hold(_)));
        s.desire(None);
        let Next::Run(op @ Op::Revoke(_)) = s.next() else { panic!("{:?}", s.next()) };
        s.start(&op);
        s.done("revoke", lost());
        s.desire(Some(a.clone()));
        assert!(matches!(s.next(), Next::Run(Op::Update(_, ref h)) if h.lease == 3), "{:?}", s.next());
        // ...and if the revoke had landed, the rewrite finds the lease gone and registers.
        s.start(&Op::Update(a.clone(), s.held.clone().unwrap()));
        s.done("update", Ok(Outcome::LeaseGone));
        assert_eq!(s.next(), Next::Run(Op::Register(a.clone())));

        // An update A→B that may have landed, then A wanted again: A is written, not held.
        let b = desired("/s/a", "B", 30);
        let mut s = Slot::default();
        s.desire(Some(a.clone()));
        s.adopt(held_for(&a, 4));
        s.desire(Some(b.clone()));
        let Next::Run(op @ Op::Update(..)) = s.next() else { panic!("{:?}", s.next()) };
        s.start(&op);
        s.done("update", lost());
        s.desire(Some(a.clone()));
        assert!(matches!(s.next(), Next::Run(Op::Update(ref d, _)) if d.value == a.value), "{:?}", s.next());
    }
}
