//! The fault suite's observer checked on its own: with no podlease running, the test plays
//! podlease by hand and plants each kind of violation; every invariant check must flag its
//! own and let the harmless cases pass. Also: the observer's etcd watch misses no event while
//! registry members die one after another, and the failure tests' DELETE recorder neither
//! misses an event across its member's outage nor reads as empty once it cannot see.

mod support;

use std::time::Duration;

use etcd_client::{LeaseGrantOptions, PutOptions};
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use podlease::registration::{FINALIZER, ServiceRegistration};
use serde_json::json;
use support::observer::{CAUSE_SLACK, Observer, ObserverConfig, RECONNECT, cut_excuses_expiry_after};
use support::*;

const NS: &str = "default";

async fn observer(bed: &TestBed) -> Observer {
    Observer::start(ObserverConfig::new(bed.etcd_endpoints(), bed.kubeconfig.clone(), NS, "c1")).await
}

async fn ready_pod(bed: &TestBed, name: &str, app: &str, i: usize) {
    create_pod(&bed.kube, NS, &PodSpec::new(name).label("app", app)).await;
    set_ready(&bed.kube, NS, name, &pod_ip(i), true).await;
}

fn value(pod: &str, i: usize) -> String {
    json!({"addr": format!("{}:8080", pod_ip(i)), "namespace": NS, "pod": pod, "node": NODE, "metadata": {}}).to_string()
}

/// Waits until the observer has seen the pod in the given publishable state.
async fn seen_publishable(obs: &Observer, pod: &str, publishable: bool) {
    wait_until(&format!("observer sees {pod} publishable={publishable}"), DEADLINE, || async {
        (obs.current().0.get(pod)?.publishable() == publishable).then_some(())
    })
    .await;
}

#[tokio::test]
async fn i1_flags_only_the_delete_of_a_key_whose_pod_stayed_publishable() {
    let bed = TestBed::start().await;
    bed.apply_crd().await;
    create_registration(&bed.kube, NS, "r", json!({"service": "svc-r", "selector": {"matchLabels": {"app": "r"}}, "ttlSeconds": 5})).await;
    for i in 0..6 {
        ready_pod(&bed, &format!("r-{i}"), "r", i + 1).await;
    }
    let obs = observer(&bed).await;
    obs.track_replica("x");
    for i in 0..6 {
        seen_publishable(&obs, &format!("r-{i}"), true).await;
    }
    let mut kv = bed.etcd.kv_client();
    let key = |pod: &str| format!("/services/svc-r/{NS}/{pod}");
    for i in [0, 1, 2, 5] {
        kv.put(key(&format!("r-{i}")), value(&format!("r-{i}"), i + 1), None).await.unwrap();
    }
    // r-1: the pod stopped being ready first. Fine.
    set_ready(&bed.kube, NS, "r-1", &pod_ip(2), false).await;
    seen_publishable(&obs, "r-1", false).await;
    kv.delete(key("r-1"), None).await.unwrap();
    let ready = |pod: &'static str, ip: String, ready: bool| {
        let (kube, obs) = (bed.kube.clone(), &obs);
        async move {
            set_ready(&kube, NS, pod, &ip, ready).await;
            seen_publishable(obs, pod, ready).await;
        }
    };
    // r-3: the pod flapped, then its key was PUT (podlease acting on "ready" while "not
    // ready" is still queued behind it), then DELETEd for the flap. Fine.
    ready("r-3", pod_ip(4), false).await;
    ready("r-3", pod_ip(4), true).await;
    kv.put(key("r-3"), value("r-3", 4), None).await.unwrap();
    kv.delete(key("r-3"), None).await.unwrap();
    // r-5: the flap was answered (DELETE), the key PUT again, then DELETEd again: the
    // second DELETE has no cause. The first is fine; the second a violation.
    ready("r-5", pod_ip(6), false).await;
    kv.delete(key("r-5"), None).await.unwrap();
    ready("r-5", pod_ip(6), true).await;
    kv.put(key("r-5"), value("r-5", 6), None).await.unwrap();
    kv.delete(key("r-5"), None).await.unwrap();
    // r-6: a new pod turns ready, is PUT and DELETEd at once: not being there before is no
    // drop. A violation.
    ready_pod(&bed, "r-6", "r", 7).await;
    seen_publishable(&obs, "r-6", true).await;
    kv.put(key("r-6"), value("r-6", 7), None).await.unwrap();
    kv.delete(key("r-6"), None).await.unwrap();
    // r-4: as r-3, but the flap is longer ago than any reaction. A violation.
    ready("r-4", pod_ip(5), false).await;
    ready("r-4", pod_ip(5), true).await;
    tokio::time::sleep(CAUSE_SLACK + Duration::from_millis(300)).await; // the window itself
    kv.put(key("r-4"), value("r-4", 5), None).await.unwrap();
    kv.delete(key("r-4"), None).await.unwrap();
    // r-0: deleted while ready. A violation.
    kv.delete(key("r-0"), None).await.unwrap();
    // r-7: every replica cut from etcd, but for less than a 5 s lease needs to expire, and
    // the key deleted during that cut. A violation.
    for i in [7, 8] {
        ready_pod(&bed, &format!("r-{i}"), "r", i + 1).await;
        seen_publishable(&obs, &format!("r-{i}"), true).await;
        kv.put(key(&format!("r-{i}")), value(&format!("r-{i}"), i + 1), None).await.unwrap();
    }
    obs.set_cut("x", true);
    kv.delete(key("r-7"), None).await.unwrap();
    obs.set_cut("x", false);
    // r-2: every replica cut from etcd for long enough that a 5 s lease may expire. Fine.
    obs.set_cut("x", true);
    tokio::time::sleep(cut_excuses_expiry_after(5) + Duration::from_millis(300)).await; // the cut itself
    kv.delete(key("r-2"), None).await.unwrap();
    obs.set_cut("x", false);
    // r-8: its key outlived that cut and was deleted long after it healed (later than a
    // reconnect and the slack): the cut explains nothing then. A violation.
    tokio::time::sleep(RECONNECT + CAUSE_SLACK + Duration::from_millis(500)).await; // the time since the heal
    kv.delete(key("r-8"), None).await.unwrap();
    assert!(obs.catch_up(DEADLINE).await);

    let violations = obs.check_i1();
    let flagged: Vec<&str> = violations.iter().map(|v| ["r-5", "r-6", "r-4", "r-0", "r-7", "r-8"].into_iter().find(|p| v.message.contains(&key(p))).unwrap_or("?")).collect();
    assert_eq!(flagged, ["r-5", "r-6", "r-4", "r-0", "r-7", "r-8"], "{}", obs.explain(&violations));
    let explained = obs.explain(&violations);
    assert!(explained.contains("etcd DELETE") && explained.contains("pod  r-5"), "the log around it:\n{explained}");
    let fine: Vec<String> = obs.deletes_explained().into_iter().map(|(_, k, why)| format!("{k}: {why}")).collect();
    assert_eq!(fine.len(), 4, "{fine:?}");
    assert!(fine[0].starts_with("/services/svc-r/default/r-1: not published at +"), "{fine:?}");
    assert!(fine[1].starts_with("/services/svc-r/default/r-3: not published at +") && fine[1].contains("not yet answered"), "{fine:?}");
    assert!(fine[2].starts_with("/services/svc-r/default/r-5: not published"), "{fine:?}");
    assert!(fine[3].starts_with("/services/svc-r/default/r-2: every replica cut"), "{fine:?}");
}

#[tokio::test]
async fn i2_lists_every_difference_until_etcd_holds_exactly_the_desired_state() {
    let bed = TestBed::start().await;
    bed.apply_crd().await;
    create_registration(&bed.kube, NS, "r", json!({"service": "svc-r", "selector": {"matchLabels": {"app": "r"}}, "ttlSeconds": 40})).await;
    ready_pod(&bed, "r-0", "r", 1).await;
    create_pod(&bed.kube, NS, &PodSpec::new("r-1").label("app", "r")).await; // never ready
    create_pod(&bed.kube, NS, &PodSpec::new("g-0").annotation("podlease.io/service", "svc-g")).await;
    set_ready(&bed.kube, NS, "g-0", &pod_ip(3), true).await;
    let obs = observer(&bed).await;
    obs.seed_foreign(&[("/foreign/k", "v")]).await;
    seen_publishable(&obs, "g-0", true).await;
    let replicas = vec!["a".to_string()];

    let diff = obs.diff_i2(&bed.etcd, &replicas).await;
    let text = diff.join("\n");
    assert!(text.contains("missing /services/svc-r/default/r-0"), "{text}");
    assert!(text.contains("missing /services/svc-g/default/g-0"), "{text}");
    assert!(text.contains("missing fence key /podlease/owners/c1/default.podlease"), "{text}");
    assert!(!text.contains("r-1"), "r-1 is not ready: {text}");
    assert!(obs.wait_converged(&bed.etcd, &replicas, Duration::from_secs(1)).await.is_err());

    // Play podlease: keys and records under leases of the right TTLs, and the fence.
    let mut lc = bed.etcd.lease_client();
    let mut kv = bed.etcd.kv_client();
    let l40 = lc.grant(40, None).await.unwrap().id();
    let l30 = lc.grant(30, None).await.unwrap().id();
    let fence = lc.grant(15, Some(LeaseGrantOptions::new())).await.unwrap().id();
    let under = |l| Some(PutOptions::new().with_lease(l));
    kv.put("/services/svc-r/default/r-0", value("r-0", 1), under(l40)).await.unwrap();
    kv.put("/podlease/owners/c1/default.podlease/default/r-0/r", "{}", under(l40)).await.unwrap();
    kv.put("/services/svc-g/default/g-0", value("g-0", 3), under(l30)).await.unwrap();
    kv.put("/podlease/owners/c1/default.podlease/default/g-0/@annotations", "{}", under(l30)).await.unwrap();
    kv.put("/podlease/owners/c1/default.podlease", "7/a", under(fence)).await.unwrap();
    // The service claims: one marker per instance, under its lease.
    let claim = |read: &str, rest: &str| {
        let hex: String = read.bytes().map(|b| format!("{b:02x}")).collect();
        format!("/podlease/owners/@claims/{hex}/default/c1/default.podlease/{rest}")
    };
    kv.put(claim("/services/svc-r/", "r-0/r"), "", under(l40)).await.unwrap();
    kv.put(claim("/services/svc-g/", "g-0/@annotations"), "", under(l30)).await.unwrap();
    // The holds: one per registration and per annotated service, under the claims lease
    // the pointer names; the epoch every new hold rewrote.
    let text = obs.diff_i2(&bed.etcd, &replicas).await.join("\n");
    assert!(text.contains("missing claims lease pointer /podlease/owners/c1/default.podlease/@claims-"), "{text}");
    assert!(text.contains(&format!("missing claim hold {}", claim("/services/svc-r/", "@hold/r"))), "{text}");
    let claims = lc.grant(300, None).await.unwrap().id();
    kv.put(format!("/podlease/owners/c1/default.podlease/@claims-{claims:x}"), "", under(claims)).await.unwrap();
    kv.put(claim("/services/svc-r/", "@hold/r"), "", under(claims)).await.unwrap();
    kv.put(claim("/services/svc-g/", "@hold/@annotations"), "", under(l30)).await.unwrap();
    kv.put("/podlease/owners/@claims/@epoch", "", None).await.unwrap();
    let text = obs.diff_i2(&bed.etcd, &replicas).await.join("\n");
    assert!(text.contains(&format!("claim hold {} under lease", claim("/services/svc-g/", "@hold/@annotations"))), "{text}");
    kv.put(claim("/services/svc-g/", "@hold/@annotations"), "", under(claims)).await.unwrap();
    let took = obs.wait_converged(&bed.etcd, &replicas, DEADLINE).await.unwrap_or_else(|v| panic!("{v}"));
    println!("converged after {took:?}");

    // Each kind of drift is reported.
    kv.put("/services/svc-r/default/r-1", value("r-1", 2), under(l40)).await.unwrap();
    kv.put("/services/svc-g/default/g-0", value("g-0", 99), under(l30)).await.unwrap();
    kv.put("/podlease/owners/c1/default.podlease/default/r-0/r", "{}", under(l30)).await.unwrap();
    kv.put("/foreign/k", "changed", None).await.unwrap();
    kv.put("/podlease/owners/c1/default.podlease", "7/stranger", under(fence)).await.unwrap();
    kv.delete(claim("/services/svc-g/", "g-0/@annotations"), None).await.unwrap();
    let text = obs.diff_i2(&bed.etcd, &replicas).await.join("\n");
    for want in [
        "missing claim marker /podlease/owners/@claims/2f73657276696365732f7376632d672f/default/c1/default.podlease/g-0/@annotations",
        "unexpected key /services/svc-r/default/r-1",
        "/services/svc-g/default/g-0 = ",
        "ownership record /podlease/owners/c1/default.podlease/default/r-0/r under lease",
        "foreign key /foreign/k",
        "names \"stranger\"",
    ] {
        assert!(text.contains(want), "{want:?} not in:\n{text}");
    }
    // A lease of the wrong TTL.
    let l10 = lc.grant(10, None).await.unwrap().id();
    kv.put("/services/svc-r/default/r-0", value("r-0", 1), under(l10)).await.unwrap();
    let text = obs.diff_i2(&bed.etcd, &replicas).await.join("\n");
    assert!(text.contains("granted 10 s, want 40 s"), "{text}");
}

#[tokio::test]
async fn i3_i4_i5_catch_a_write_under_a_stale_fence_a_touched_foreign_key_and_an_early_finalizer_release() {
    let bed = TestBed::start().await;
    bed.apply_crd().await;
    let obs = observer(&bed).await;
    let mut kv = bed.etcd.kv_client();

    // I4: one foreign key overwritten, one left alone.
    obs.seed_foreign(&[("/services/svc-d/foreign/x", "mine"), ("/elsewhere", "mine")]).await;
    kv.put("/elsewhere", "clobbered", None).await.unwrap();

    // I5: "d" releases its finalizer while its key and record are still there; "e" releases
    // it with nothing left.
    let api: Api<ServiceRegistration> = Api::namespaced(bed.kube.clone(), NS);
    for (name, svc) in [("d", "svc-d"), ("e", "svc-e")] {
        create_registration(&bed.kube, NS, name, json!({"service": svc, "selector": {"matchLabels": {"app": name}}})).await;
        api.patch(name, &PatchParams::default(), &Patch::Merge(&json!({"metadata": {"finalizers": [FINALIZER]}}))).await.unwrap();
    }
    kv.put("/services/svc-d/default/p", "{}", None).await.unwrap();
    kv.put("/podlease/owners/c1/default.podlease/default/p/d", "{}", None).await.unwrap();
    for name in ["d", "e"] {
        api.delete(name, &DeleteParams::default()).await.unwrap();
        api.patch(name, &PatchParams::default(), &Patch::Merge(&json!({"metadata": {"finalizers": null}}))).await.unwrap();
    }
    wait_until("both releases checked", DEADLINE, || async { (obs.i5_checks() == 2).then_some(()) }).await;

    // I3, on an observer of its own (the records above carry no fence): a writes under the
    // fence it took; b takes a newer one and writes under it; a, deposed, writes still naming
    // its own; a record names no fence; one is written while no fence exists.
    let obs3 = observer(&bed).await;
    assert!(obs3.catch_up(DEADLINE).await);
    let (none, _) = obs3.check_i3();
    assert!(none[0].message.contains("saw nothing"), "an empty check is not a pass");
    let fence_key = "/podlease/owners/c1/default.podlease";
    let record = |pod: &str| format!("{fence_key}/{NS}/{pod}/i3");
    let fence_a = kv.put(fence_key, "3/a", None).await.unwrap().header().unwrap().revision();
    kv.put(record("p1"), json!({"fence": fence_a}).to_string(), None).await.unwrap();
    let fence_b = kv.put(fence_key, "4/b", None).await.unwrap().header().unwrap().revision();
    kv.put(record("p2"), json!({"fence": fence_b}).to_string(), None).await.unwrap();
    let stale = kv.put(record("p3"), json!({"fence": fence_a}).to_string(), None).await.unwrap().header().unwrap().revision();
    let unnamed = kv.put(record("p4"), "{}", None).await.unwrap().header().unwrap().revision();
    kv.delete(fence_key, None).await.unwrap();
    let fenceless = kv.put(record("p5"), json!({"fence": fence_b}).to_string(), None).await.unwrap().header().unwrap().revision();
    // Not records: the fence key itself, and a key beside the records.
    kv.put(format!("{fence_key}/@claims-1"), "", None).await.unwrap();
    assert!(obs3.catch_up(DEADLINE).await);
    let (i3, checked) = obs3.check_i3();
    assert_eq!(checked, 5);
    let i3: Vec<String> = i3.iter().map(|v| v.to_string()).collect();
    assert_eq!(i3.len(), 3, "{i3:#?}");
    assert!(i3.iter().any(|v| v.contains(&format!("written at revision {stale} names fence revision Some({fence_a}), but the fence in force was {fence_b} (held by \"b\")"))), "{i3:#?}");
    assert!(i3.iter().any(|v| v.contains(&format!("written at revision {unnamed} names fence revision None"))), "{i3:#?}");
    assert!(i3.iter().any(|v| v.contains(&format!("written at revision {fenceless} names fence revision Some({fence_b}), but the fence in force was")) && v.contains("(deleted)")), "{i3:#?}");

    let i4 = obs.check_i4();
    assert_eq!(i4.len(), 1, "{i4:?}");
    assert!(i4[0].message.contains("/elsewhere overwritten"), "{}", i4[0]);

    let i5 = obs.check_i5();
    assert_eq!(i5.len(), 1, "{i5:?}");
    assert!(i5[0].message.contains("ServiceRegistration d released its finalizer"), "{}", i5[0]);
    assert!(i5[0].message.contains("/podlease/owners/c1/default.podlease/default/p/d") && i5[0].message.contains("/services/svc-d/default/p"), "{}", i5[0]);
    assert!(!i5[0].message.contains("foreign"), "foreign keys are not the registration's: {}", i5[0]);
}

#[tokio::test]
async fn the_observer_misses_no_etcd_event_while_members_die_one_after_another() {
    let mut bed = TestBed::start_with_registry_cluster(3).await;
    bed.apply_crd().await;
    let obs = observer(&bed).await;
    let writer = {
        let kv = bed.etcd.kv_client();
        tokio::spawn(async move {
            let mut revisions = Vec::new();
            for i in 0..600 {
                let rev = wait_until("a write", DEADLINE, || {
                    let mut kv = kv.clone();
                    async move { Some(kv.put(format!("/w/{i:04}"), "x", None).await.ok()?.header()?.revision()) }
                })
                .await;
                revisions.push(rev);
            }
            revisions
        })
    };
    for m in 0..3 {
        // Kill each member after some writes went through; the others keep a quorum.
        let target = obs.last_revision() + 50;
        assert!(obs.caught_up_to(target, DEADLINE).await);
        bed.kill_registry_member(m);
        let target = obs.last_revision() + 50;
        assert!(obs.caught_up_to(target, DEADLINE).await, "the observer stalled with member {m} down");
        bed.resume_registry_member(m);
    }
    let revisions = writer.await.unwrap();
    assert!(obs.caught_up_to(*revisions.last().unwrap(), DEADLINE).await);
    let seen: Vec<(i64, String)> = obs.etcd_events().into_iter().map(|(_, e)| (e.revision, e.key)).filter(|(_, k)| k.starts_with("/w/")).collect();
    // Only the writer writes: its revisions are contiguous, and so must be what was seen (a
    // put retried after an error that had applied it after all shows up too, and fills its
    // own revision).
    let revs: Vec<i64> = seen.iter().map(|(r, _)| *r).collect();
    let first = revs[0];
    assert_eq!(revs, (first..first + revs.len() as i64).collect::<Vec<_>>(), "events missed, doubled or out of order");
    for (i, r) in revisions.iter().enumerate() {
        assert!(seen.contains(&(*r, format!("/w/{i:04}"))), "the write of /w/{i:04} at revision {r} was not seen");
    }
    let watch_lines: Vec<String> = obs.entries().iter().filter(|e| matches!(e.what, support::observer::Record::Watch(_))).map(support::observer::render).collect();
    println!("the observer's watch trouble and recoveries:\n{}", watch_lines.join("\n"));
}

/// The failure tests' oracle for "no DELETE": the recorder. Watching one member, it must
/// deliver a DELETE made through another member while its own was down, and once etcd has
/// compacted the history it would resume from, every read must fail (never "no DELETE").
#[tokio::test]
async fn the_delete_recorder_misses_no_event_across_an_outage_and_fails_once_it_cannot_see() {
    use support::etcd::Recorder;
    let mut bed = TestBed::start_with_registry_cluster(3).await;
    let endpoint = |bed: &TestBed, i: usize| bed.registry_members().nth(i).unwrap().endpoint();
    let watched = etcd_client::Client::connect([endpoint(&bed, 0)], None).await.unwrap();
    let other = etcd_client::Client::connect([endpoint(&bed, 1)], None).await.unwrap();
    // A write right after a member dies may time out while etcd elects a leader: retried.
    let write = |what: &'static str, op: Box<dyn Fn() -> etcd_client::TxnOp + Send + Sync>| {
        let other = other.clone();
        async move {
            wait_until(what, DEADLINE, || {
                let (mut kv, txn) = (other.kv_client(), etcd_client::Txn::new().and_then(vec![op()]));
                async move { Some(kv.txn(txn).await.ok()?.header()?.revision()) }
            })
            .await
        }
    };
    other.kv_client().put("/r/a", "1", None).await.unwrap();
    let recorder = Recorder::start(&watched, "/r/").await;
    other.kv_client().put("/r/b", "1", None).await.unwrap();
    wait_until("the recorder sees /r/b", DEADLINE, || async { recorder.all().iter().any(|e| e.key == "/r/b").then_some(()) }).await;

    // Its member down: a DELETE through another member, then the member back.
    bed.kill_registry_member(0);
    write("delete /r/a", Box::new(|| etcd_client::TxnOp::delete("/r/a", None))).await;
    bed.resume_registry_member(0);
    wait_until("the recorder sees the DELETE made while its member was down", DEADLINE, || async {
        recorder.deletes().iter().any(|e| e.key == "/r/a").then_some(())
    })
    .await;

    // Down again; meanwhile history it has not seen is compacted away.
    bed.kill_registry_member(0);
    write("put /r/c", Box::new(|| etcd_client::TxnOp::put("/r/c", "1", None))).await;
    let rev = write("delete /r/b", Box::new(|| etcd_client::TxnOp::delete("/r/b", None))).await;
    wait_until("compact", DEADLINE, || {
        let mut kv = other.kv_client();
        async move { kv.compact(rev, None).await.ok().map(|_| ()) }
    })
    .await;
    bed.resume_registry_member(0);
    let failed = wait_until("every read of the recorder fails", DEADLINE, || async {
        let r = recorder.clone();
        std::panic::catch_unwind(move || r.deletes()).err().map(|e| e.downcast_ref::<String>().cloned().unwrap_or_default())
    })
    .await;
    assert!(failed.contains("compacted"), "{failed}");
}

/// The failure tests' renewal oracle reads etcd's remaining TTLs: a lease nobody renews
/// after the point asked fails it, one renewed after that point passes.
#[tokio::test]
async fn the_renewal_oracle_fails_on_a_lease_nobody_renews_and_passes_once_it_is_renewed() {
    use support::etcd::wait_renewed_after;
    let dir = tempfile::tempdir().unwrap();
    let server = EtcdServer::start(dir.path(), "oracle");
    let etcd = etcd_client::Client::connect([server.endpoint()], None).await.unwrap();
    let lease = etcd.lease_client().grant(30, None).await.unwrap().id();
    etcd.kv_client().put("/o/k", "v", Some(PutOptions::new().with_lease(lease))).await.unwrap();
    let granted = std::time::Instant::now();
    // Not renewed after `granted`: the oracle gives up within its 4 s.
    let unrenewed = tokio::spawn({
        let etcd = etcd.clone();
        async move { wait_renewed_after(&etcd, "/o/", granted, Duration::from_secs(4)).await }
    })
    .await;
    assert!(unrenewed.is_err_and(|e| e.is_panic()), "a lease nobody renewed passed the oracle");
    // Renewed now, well after `granted`: it passes at once.
    let (mut keeper, _) = etcd.lease_client().keep_alive(lease).await.unwrap();
    keeper.keep_alive().await.unwrap();
    let since = granted + Duration::from_secs(1);
    assert_eq!(wait_renewed_after(&etcd, "/o/", since, Duration::from_secs(10)).await, 1);
}
