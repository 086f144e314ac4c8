use super::*;
use crate::desired::Source;

fn hold(read: &str, ns: &str, holder: Source) -> Hold {
    Hold { read: read.into(), namespace: ns.into(), holder }
}

fn inside(ranges: &[(String, String)], k: &str) -> bool {
    ranges.iter().any(|(a, b)| a.as_str() <= k && k < b.as_str())
}

#[test]
fn an_instance_marker_lies_in_its_namespace_and_the_other_namespaces_are_the_ranges_around_it() {
    let c = Claims::new("/podlease/owners", "c1", "ns.rel");
    let id = InstanceId { namespace: "shop".into(), pod: "p".into(), source: Source::Registration("r".into()) };
    let root = "/podlease/owners/@claims/2f73657276696365732f7061792f/";
    let marker = c.marker(&id, Some("/services/pay/")).unwrap();
    assert_eq!(marker, format!("{root}shop/c1/ns.rel/p/r"));
    assert_eq!(c.namespace_of(&marker).as_deref(), Some("shop"));
    assert_eq!(c.read_of(&marker).as_deref(), Some("/services/pay/"));
    let others = c.others(&id, Some("/services/pay/"));
    assert_eq!(
        others,
        vec![
            (root.to_string(), format!("{root}shop/")),
            (format!("{root}shop0"), "/podlease/owners/@claims/2f73657276696365732f7061792f0".to_string())
        ]
    );
    assert!(!inside(&others, &marker), "our own namespace is not another's");
    assert!(
        inside(&others, &format!("{root}mallory/c1/x/p/r"))
            && inside(&others, &format!("{root}a/c1/x/p/r"))
            && inside(&others, &format!("{root}shopx/c9/x/p/r"))
    );
    assert!(!inside(&others, "/podlease/owners/@claims/2f73657276696365732f7061792f2f/a"), "another service's");
    // Unclaimed (shared, skydns) or a writer without claims: no marker, no check.
    assert!(c.marker(&id, None).is_none());
    assert!(Claims::default().others(&id, Some("/services/pay/")).is_empty());
    assert!(Claims::default().hold_of(&id, Some("/services/pay/")).is_none());
}

#[test]
fn a_hold_lies_beside_the_instance_markers_of_its_namespace() {
    let c = Claims::new("/podlease/owners/", "c1", "ns.rel");
    let h = hold("/services/pay/", "shop", Source::Registration("pay".into()));
    let key = c.hold(&h).unwrap();
    assert_eq!(key, "/podlease/owners/@claims/2f73657276696365732f7061792f/shop/c1/ns.rel/@hold/pay");
    let id = InstanceId { namespace: "shop".into(), pod: "p-1".into(), source: Source::Registration("pay".into()) };
    assert_eq!(c.hold_of(&id, Some("/services/pay/")).as_deref(), Some(key.as_str()));
    let annotated = InstanceId { source: Source::Annotations, ..id.clone() };
    assert!(c.hold_of(&annotated, Some("/services/pay/")).unwrap().ends_with("/shop/c1/ns.rel/@hold/@annotations"));
    // Another namespace's instances see the hold as a claim.
    let mallory = InstanceId { namespace: "mallory".into(), ..id };
    assert!(inside(&c.others(&mallory, Some("/services/pay/")), &key));
    assert!(!c.epoch_key().starts_with(&c.service_root("/services/pay/")), "the epoch is no service's");
    let owners = Owners::new("/podlease/owners", "c1", "ns.rel");
    assert_eq!(pointer_key(&owners, 0x2a), "/podlease/owners/c1/ns.rel/@claims-2a");
    assert_eq!(owners.parse_key(&pointer_key(&owners, 0x2a)), None, "the pointer is no record");
    assert_eq!(Owners::at("/podlease/owners/c1").parse_key(&pointer_key(&owners, 0x2a)), None, "nor one of the layout before install ids");
    assert_eq!(super::super::identity::classify("/podlease/owners", &pointer_key(&owners, 0x2a)), None, "nor any identity's record");
}

#[test]
fn nested_read_prefixes_are_checked_both_ways() {
    let c = Claims::new("/o", "c1", "i");
    let marker =
        |read: &str, ns: &str| c.marker(&InstanceId { namespace: ns.into(), pod: "p".into(), source: Source::Annotations }, Some(read)).unwrap();
    // Kratos reads `/microservices/pay` without a trailing slash: `payments` lies within it.
    let around = c.around("/microservices/payments", "shop");
    assert_eq!(around.len(), 2 * "/microservices/payments".len());
    assert!(inside(&around, &marker("/microservices/pay", "mallory")), "a prefix containing ours");
    assert!(inside(&around, &marker("/microservices/payments", "mallory")), "our own prefix");
    assert!(!inside(&around, &marker("/microservices/pay", "shop")), "our own namespace may nest");
    assert!(!inside(&around, &marker("/microservices/payroll", "mallory")), "a sibling");
    assert!(!inside(&around, &marker("/microservices/payments/x", "mallory")), "within: the other check");
    let (from, to) = c.within("pay/");
    let within = |k: &str| from.as_str() <= k && k < to.as_str();
    assert!(within(&marker("pay/x/", "mallory")), "go-zero `pay/x` is read by consumers of `pay`");
    assert!(!within(&marker("pay/", "mallory")) && !within(&marker("pax/", "mallory")) && !within(&marker("pay", "mallory")));
}

fn run_to_rest(k: &mut Keeper, answer: impl Fn(&Job) -> Done) -> Vec<Job> {
    let mut jobs = Vec::new();
    while let Some(j) = k.next(0) {
        jobs.push(j.clone());
        k.done(answer(&j));
    }
    jobs
}

#[test]
fn a_term_grants_its_lease_claims_every_wanted_hold_then_revokes_the_previous_lease() {
    let mut k = Keeper::default();
    let (a, b) = (hold("/s/a/", "shop", Source::Registration("a".into())), hold("/s/b/", "shop", Source::Annotations));
    assert!(k.want([a.clone(), b.clone()].into()).is_empty());
    k.adopt(vec![7]);
    let answer = |j: &Job| match j {
        Job::Grant => Done::Granted(9),
        Job::Claim(h, 9) => {
            Done::Claimed(h.clone(), if h.read == "/s/a/" { Claimed::Held } else { Claimed::Refused { namespace: "x".into(), read: "/s/".into() } })
        }
        Job::RevokeOld(l) => Done::RevokedOld(*l),
        other => panic!("unexpected {other:?}"),
    };
    let jobs = run_to_rest(&mut k, answer);
    assert_eq!(jobs, vec![Job::Grant, Job::Claim(a.clone(), 9), Job::Claim(b.clone(), 9), Job::RevokeOld(7)]);
    assert_eq!(k.state(&a), Some(&HoldState::Held));
    assert_eq!(k.state(&b), Some(&HoldState::Refused { namespace: "x".into(), read: "/s/".into() }));
    assert!(k.old.is_empty());
    // A source that goes releases its hold; a refused one is asked again at the retry tick.
    assert_eq!(k.want([b.clone()].into()), vec![a.clone()]);
    assert_eq!(k.next(0), Some(Job::Release(a.clone())));
    k.done(Done::Released(a.clone()));
    assert_eq!(k.state(&a), None);
    assert_eq!(k.next(0), None);
    k.retry();
    assert_eq!(k.next(0), Some(Job::Claim(b.clone(), 9)));
    assert_eq!(k.done(Done::Claimed(b.clone(), Claimed::Held)), vec![b.clone()], "its instances may go on");
}

#[test]
fn the_previous_lease_outlives_failures_and_a_lost_lease_claims_everything_again() {
    let mut k = Keeper::default();
    let a = hold("/s/a/", "shop", Source::Annotations);
    k.want([a.clone()].into());
    k.adopt(vec![7, 8]);
    assert_eq!(k.next(0), Some(Job::Grant));
    assert_eq!(k.next(0), None, "one grant at a time");
    k.done(Done::Failed(Job::Grant, "etcd down".into()));
    assert_eq!(k.next(0), None, "a failed grant waits for the retry tick");
    k.retry();
    assert_eq!(k.next(0), Some(Job::Grant));
    k.done(Done::Granted(9));
    let job = k.next(0).unwrap();
    k.done(Done::Failed(job, "etcd down".into()));
    assert_eq!(k.next(0), None, "not revoked while a hold is unanswered");
    k.retry();
    let job = k.next(0).unwrap();
    assert_eq!(k.next(1), None);
    k.done(Done::Claimed(a.clone(), Claimed::Busy));
    assert_eq!(k.state(&a), None);
    k.retry();
    assert_eq!(k.next(0), Some(job));
    k.done(Done::Claimed(a.clone(), Claimed::Held));
    assert_eq!(k.next(0), Some(Job::RevokeOld(7)));
    k.done(Done::Failed(Job::RevokeOld(7), "etcd down".into()));
    assert_eq!(k.next(0), None, "a failed revoke waits for the retry tick");
    k.retry();
    assert_eq!(k.next(0), Some(Job::RevokeOld(7)));
    k.done(Done::RevokedOld(7));
    assert_eq!(k.next(0), Some(Job::RevokeOld(8)), "every earlier lease goes");
    k.done(Done::RevokedOld(8));
    assert_eq!(k.next(0), None);
    assert!(k.lease_lost(9));
    assert_eq!(k.state(&a), None, "its hold went with the lease");
    assert_eq!(k.next(0), Some(Job::Grant));
    k.done(Done::Granted(10));
    assert_eq!(k.next(0), Some(Job::Claim(a, 10)));
    assert!(!k.lease_lost(3), "not a claims lease");
}

#[test]
fn a_hold_let_go_of_while_being_claimed_is_released_after() {
    let mut k = Keeper::default();
    let a = hold("/s/a/", "shop", Source::Annotations);
    k.want([a.clone()].into());
    k.next(0);
    k.done(Done::Granted(9));
    assert_eq!(k.next(0), Some(Job::Claim(a.clone(), 9)));
    k.want(BTreeSet::new());
    assert_eq!(k.next(1), None, "one job per hold");
    assert!(k.done(Done::Claimed(a.clone(), Claimed::Held)).is_empty());
    k.retry();
    assert_eq!(k.next(0), Some(Job::Release(a.clone())));
}
