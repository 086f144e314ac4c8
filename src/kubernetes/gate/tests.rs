use super::*;
use crate::pod::GateCondition;

fn reg(name: &str) -> Source {
    Source::Registration(name.into())
}

fn ok(key: &str) -> Result<Key, String> {
    Ok(Key::Fixed(key.into()))
}

fn pod(publishable: bool, current: Option<(bool, &str)>, sources: Vec<(Source, Result<Key, String>)>) -> GatedPod {
    GatedPod {
        uid: "u1".into(),
        publishable,
        terminating: false,
        ready_since: None,
        current: current.map(|(status, reason)| GateCondition { status, reason: reason.into(), message: String::new(), since: None }),
        candidates: vec![reg("a"), reg("b"), Source::Annotations],
        sources,
    }
}

fn registered(key: &str, uid: &str) -> Shown {
    Shown::Registered { key: key.into(), lease: 1, since: Timestamp::now(), address: "10.0.0.1:80".into(), pod_uid: uid.into() }
}

fn decide_with(p: &GatedPod, shown: &[(Source, Shown)], etcd: Option<&str>) -> Option<Decision> {
    decide(p, |s| shown.iter().find(|(x, _)| x == s).map(|(_, v)| v), etcd)
}

#[test]
fn opens_only_once_every_key_of_the_pod_is_registered() {
    let p = pod(true, None, vec![(reg("a"), ok("/s/a")), (Source::Annotations, ok("/s/b"))]);
    let one = [(reg("a"), registered("/s/a", "u1")), (Source::Annotations, Shown::Pending)];
    assert_eq!(decide_with(&p, &one, None), None, "an absent condition already says the pod waits");
    let mut was_conflict = p.clone();
    was_conflict.current = Some(GateCondition { status: false, reason: REASON_CONFLICT.into(), message: String::new(), since: None });
    let d = decide_with(&was_conflict, &one, None).unwrap();
    assert_eq!((d.status, d.reason), (false, REASON_PENDING), "a reason that no longer holds is replaced");
    assert_eq!(d.message, "1 of 2 keys registered; writing the rest");
    let both = [(reg("a"), registered("/s/a", "u1")), (Source::Annotations, registered("/s/b", "u1"))];
    let d = decide_with(&p, &both, None).unwrap();
    assert_eq!((d.status, d.reason), (true, REASON_REGISTERED));
    assert_eq!(d.message, "registered in etcd under 2 keys (/s/a, …)");
}

#[test]
fn a_key_written_for_an_earlier_pod_of_the_same_name_does_not_open_the_gate() {
    let p = pod(true, Some((false, REASON_DEREGISTERED)), vec![(reg("a"), ok("/s/a"))]);
    assert_eq!(decide_with(&p, &[(reg("a"), registered("/s/a", "old-uid"))], None), None);
    let d = decide_with(&p, &[(reg("a"), registered("/s/a", "u1"))], None).unwrap();
    assert_eq!((d.status, d.reason), (true, REASON_REGISTERED));
}

#[test]
fn reasons_name_what_holds_the_gate() {
    let p = pod(true, None, vec![(reg("a"), ok("/s/a"))]);
    let conflict = Shown::Conflict { key: "/s/a".into(), message: "held by someone else".into(), claimed_by: None };
    let d = decide_with(&p, &[(reg("a"), conflict)], Some("down")).unwrap();
    assert_eq!((d.status, d.reason), (false, REASON_CONFLICT), "a conflict is named before etcd's state");
    assert!(d.message.contains("held by someone else"), "{}", d.message);
    let d = decide_with(&p, &[(reg("a"), Shown::Pending)], Some("connection refused")).unwrap();
    assert_eq!((d.status, d.reason), (false, REASON_ETCD_UNAVAILABLE));
    assert!(d.message.ends_with("etcd: connection refused"), "{}", d.message);
    let d = decide_with(&p, &[(reg("a"), Shown::Failed { message: "timed out".into() })], None).unwrap();
    assert_eq!(d.reason, REASON_ETCD_UNAVAILABLE);
    let invalid = pod(true, None, vec![(reg("a"), ok("/s/a")), (reg("b"), Err("ServiceRegistration b: bad port".into()))]);
    let d = decide_with(&invalid, &[(reg("a"), registered("/s/a", "u1"))], None).unwrap();
    assert_eq!((d.status, d.reason, d.message.as_str()), (false, REASON_INVALID_SPEC, "ServiceRegistration b: bad port"));
}

#[test]
fn a_pod_no_source_selects_is_let_through_and_told_why() {
    let d = decide_with(&pod(true, None, vec![]), &[], None).unwrap();
    assert_eq!((d.status, d.reason), (true, REASON_NOT_SELECTED));
}

#[test]
fn a_serving_pod_is_never_failed_for_a_discovery_problem() {
    // Open, containers still ready, its key lost (etcd down, a conflict, an invalid edit).
    let p = pod(true, Some((true, REASON_REGISTERED)), vec![(reg("a"), ok("/s/a"))]);
    assert_eq!(decide_with(&p, &[(reg("a"), Shown::Pending)], Some("down")), None);
    let conflict = Shown::Conflict { key: "/s/a".into(), message: "x".into(), claimed_by: None };
    assert_eq!(decide_with(&p, &[(reg("a"), conflict)], None), None);
    let invalid = pod(true, Some((true, REASON_REGISTERED)), vec![(reg("a"), Err("bad".into()))]);
    assert_eq!(decide_with(&invalid, &[], None), None);
}

#[test]
fn closes_when_containers_turn_unready_once_the_keys_are_gone() {
    let p = pod(false, Some((true, REASON_REGISTERED)), vec![]);
    assert_eq!(decide_with(&p, &[(reg("b"), registered("/s/b", "u1"))], None), None, "still registered: wait for the revoke");
    let d = decide_with(&p, &[], None).unwrap();
    assert_eq!((d.status, d.reason), (false, REASON_DEREGISTERED));
    // Already closed, or never opened: nothing to write for a pod whose containers are not ready.
    assert_eq!(decide_with(&pod(false, Some((false, REASON_DEREGISTERED)), vec![]), &[], None), None);
    assert_eq!(decide_with(&pod(false, None, vec![]), &[], None), None);
}

#[test]
fn terminating_pods_and_unchanged_conditions_are_not_written() {
    let mut p = pod(false, Some((true, REASON_REGISTERED)), vec![]);
    p.terminating = true;
    assert_eq!(decide_with(&p, &[], None), None);
    let mut open = pod(true, None, vec![(reg("a"), ok("/s/a"))]);
    let shown = [(reg("a"), registered("/s/a", "u1"))];
    let d = decide_with(&open, &shown, None).unwrap();
    open.current = Some(GateCondition { status: true, reason: d.reason.into(), message: d.message.clone(), since: None });
    assert_eq!(decide_with(&open, &shown, None), None);
}

#[test]
fn long_messages_are_cut_on_a_char_boundary() {
    let p = pod(true, None, vec![(reg("a"), Err("é".repeat(2000)))]);
    let d = decide_with(&p, &[], None).unwrap();
    assert!(d.message.len() <= MAX_MESSAGE + '…'.len_utf8());
    assert!(d.message.ends_with('…'));
}

#[test]
fn a_key_still_being_moved_elsewhere_does_not_open_the_gate() {
    // The pod's service changed: the held key is the old one until the new one is written.
    let p = pod(true, None, vec![(reg("a"), ok("/s/new"))]);
    assert_eq!(decide_with(&p, &[(reg("a"), registered("/s/old", "u1"))], None), None);
    assert_eq!(decide_with(&p, &[(reg("a"), registered("/s/new", "u1"))], None).unwrap().reason, REASON_REGISTERED);
}

#[test]
fn a_source_that_publishes_unready_pods_keeps_the_gate_open() {
    // publishNotReady: the key stays while the containers are not ready; nothing to close.
    let p = pod(false, Some((true, REASON_REGISTERED)), vec![(reg("a"), ok("/s/a"))]);
    assert_eq!(decide_with(&p, &[(reg("a"), registered("/s/a", "u1"))], None), None);
    assert_eq!(decide_with(&p, &[(reg("a"), Shown::Pending)], None), None);
}

#[test]
fn containers_that_flapped_after_the_gate_opened_make_the_pod_wait_for_its_key_again() {
    let at = |s: &str| Some(s.parse::<Timestamp>().unwrap());
    let mut p = pod(true, None, vec![(reg("a"), ok("/s/a"))]);
    p.current = Some(GateCondition { status: true, reason: REASON_REGISTERED.into(), message: String::new(), since: at("2026-01-01T00:00:10Z") });
    // Ready before the gate opened: serving, never failed.
    p.ready_since = at("2026-01-01T00:00:10Z");
    assert_eq!(decide_with(&p, &[(reg("a"), Shown::Pending)], None), None);
    // Ready again after a flap the gate did not see close: the key must be back first.
    p.ready_since = at("2026-01-01T00:00:12Z");
    let d = decide_with(&p, &[(reg("a"), Shown::Pending)], None).unwrap();
    assert_eq!((d.status, d.reason), (false, REASON_PENDING));
}
