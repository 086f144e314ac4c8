//! Shared clusters on the real bed, at the defaults: several installs side by side on one
//! API server and one etcd, and identity changes that are refused or migrated, never
//! silently orphaning a record.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use etcd_client::{EventType, WatchOptions};
use kube::api::Api;
use podlease::registration::ServiceRegistration;
use serde_json::json;
use support::controller::wait_adopted;
use support::etcd::{Recorder, keys, leases_under, wait_absent, wait_key};
use support::*;

const NS: &str = "default";
const TAKEOVER: Duration = Duration::from_secs(60);

/// How many ownership records each source holds (by the record key's last segment).
async fn records_by_source(etcd: &etcd_client::Client) -> BTreeMap<String, usize> {
    let mut by_source: BTreeMap<String, usize> = BTreeMap::new();
    for kv in keys(etcd, "/podlease/owners/").await {
        let k = kv.key_str().unwrap();
        if podlease::registry::identity::classify("/podlease/owners", k).is_some_and(|(_, ns)| ns.is_some()) {
            *by_source.entry(k.rsplit('/').next().unwrap().to_string()).or_default() += 1;
        }
    }
    by_source
}

fn records_under(all: &[etcd_client::KeyValue], root: &str) -> usize {
    all.iter().filter(|kv| podlease::registry::identity::classify("/podlease/owners", kv.key_str().unwrap()).is_some_and(|(r, ns)| r == root && ns.is_some())).count()
}

#[tokio::test]
async fn a_changed_cluster_id_is_refused_and_migrating_takes_every_record_over_without_a_delete() {
    let bed = TestBed::start().await;
    bed.apply_crd().await;
    let old_root = "/podlease/owners/c1/default.podlease";
    let new_root = "/podlease/owners/c2/default.podlease";
    let mut c = Controller::start(&bed, "c", &["--cluster-id", "c1"]).await;
    create_registration(&bed.kube, NS, "web", json!({"selector": {"matchLabels": {"app": "web"}}})).await;
    for i in 0..20 {
        let name = format!("web-{i}");
        create_pod(&bed.kube, NS, &PodSpec::new(&name).label("app", "web")).await;
        set_ready(&bed.kube, NS, &name, &pod_ip(i + 1), true).await;
    }
    wait_until("20 keys", DEADLINE, || async { (keys(&bed.etcd, "/services/web/").await.len() == 20).then_some(()) }).await;
    let before = leases_under(&bed.etcd, "/services/web/").await;
    let recorder = Recorder::start(&bed.etcd, "/").await;

    // A rollout that changes the cluster id: the new replica starts while the old one leads,
    // and again once it is gone. Both times it refuses, saying what to do.
    let mut n = Controller::new(&bed, "n", bed.kubeconfig.clone(), &["--cluster-id", "c2"]);
    for round in ["while the old identity leads", "after it stopped"] {
        if round == "after it stopped" {
            c.terminate();
        }
        n.spawn();
        let status = n.wait_exit().await;
        let log = n.log_text();
        assert!(!status.success(), "{round}: started with a changed cluster id; log:\n{log}");
        assert!(log.contains("refusing to start") && log.contains(&format!("--migrate-from={old_root}")), "{round}: {log}");
    }
    assert_eq!(records_under(&keys(&bed.etcd, "/podlease/owners/").await, old_root), 20, "nothing was touched");

    // With the migration: every record moves, no key is touched.
    let m = Controller::start(&bed, "m", &["--cluster-id", "c2", "--migrate-from", old_root]).await;
    wait_adopted(&m, TAKEOVER).await;
    let all = keys(&bed.etcd, "/podlease/owners/").await;
    assert_eq!((records_under(&all, new_root), records_under(&all, old_root)), (20, 0));
    // Outlive the TTL: only the new identity keeps the leases alive now (etcd shows each
    // renewed more than a TTL from here).
    support::etcd::wait_renewed_after(&bed.etcd, "/services/web/", Instant::now() + Duration::from_secs(30), TAKEOVER).await;
    assert_eq!(leases_under(&bed.etcd, "/services/web/").await, before, "every key, under the same lease");
    let deletes: Vec<String> = recorder.deletes().into_iter().map(|e| e.key).filter(|k| k.starts_with("/services/")).collect();
    assert_eq!(deletes, Vec::<String>::new(), "watchers saw DELETEs");
    // And it goes on working under the new identity.
    set_ready(&bed.kube, NS, "web-0", &pod_ip(1), false).await;
    wait_absent(&bed.etcd, "/services/web/default/web-0", DEADLINE).await;
    let api: Api<ServiceRegistration> = Api::namespaced(bed.kube.clone(), NS);
    wait_until("status: 19 registered", DEADLINE, || async { (api.get("web").await.ok()?.status?.registered == 19).then_some(()) }).await;
}

#[tokio::test]
async fn a_changed_cluster_id_is_refused_even_when_the_api_server_is_down_at_start() {
    let mut bed = TestBed::start().await;
    bed.apply_crd().await;
    let old_root = "/podlease/owners/c1/default.podlease";
    let _c = Controller::start(&bed, "c", &["--cluster-id", "c1"]).await;
    create_registration(&bed.kube, NS, "web", json!({"selector": {"matchLabels": {"app": "web"}}})).await;
    for i in 0..5 {
        let name = format!("web-{i}");
        create_pod(&bed.kube, NS, &PodSpec::new(&name).label("app", "web")).await;
        set_ready(&bed.kube, NS, &name, &pod_ip(i + 1), true).await;
    }
    wait_until("5 keys", DEADLINE, || async { (keys(&bed.etcd, "/services/web/").await.len() == 5).then_some(()) }).await;
    let recorder = Recorder::start(&bed.etcd, "/").await;

    // A rollout that changes the cluster id while the API server is down: the Lease that
    // names the last identity cannot be read, so the start goes on (this replica may keep
    // leases alive), but the check is made again once the Lease answers.
    bed.stall_apiserver();
    let mut n = Controller::new(&bed, "n", bed.kubeconfig.clone(), &["--cluster-id", "c2"]);
    n.spawn();
    wait_until("the replica past its start steps (/readyz no longer says starting)", DEADLINE, || async {
        let (_, body) = support::controller::http_get(&format!("http://127.0.0.1:{}/readyz", n.metrics_port)).await?;
        (!body.starts_with("starting")).then_some(())
    })
    .await;
    bed.resume_apiserver();
    let status = n.wait_exit().await;
    let log = n.log_text();
    assert!(log.contains("the last leader's identity is unknown for now"), "{log}");
    assert!(!status.success(), "led with a changed cluster id; log:\n{log}");
    assert!(log.contains("refusing to start") && log.contains(&format!("--migrate-from={old_root}")), "{log}");
    assert_eq!(records_under(&keys(&bed.etcd, "/podlease/owners/").await, old_root), 5, "nothing was touched");
    let deletes: Vec<String> = recorder.deletes().into_iter().map(|e| e.key).filter(|k| k.starts_with("/services/")).collect();
    assert_eq!(deletes, Vec::<String>::new(), "watchers saw DELETEs");
}

/// One namespace's churn: pods made ready, unready and deleted, each step waited for.
struct Churn {
    ns: &'static str,
    service: &'static str,
    next: usize,
    /// Pods and whether they are ready now.
    pods: BTreeMap<String, bool>,
    /// Steps that must have made watchers see a DELETE (a ready pod made unready or deleted).
    unpublished: usize,
    rng: u64,
}

impl Churn {
    fn key(&self, pod: &str) -> String {
        format!("/services/{}/{}/{pod}", self.service, self.ns)
    }

    fn roll(&mut self) -> u64 {
        // xorshift: the same schedule every run.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    async fn step(&mut self, bed: &TestBed) {
        let r = self.roll();
        let pick = self.pods.keys().nth((r as usize / 7) % self.pods.len().max(1)).cloned();
        match (r % 4, pick) {
            (0, _) | (_, None) => {
                self.next += 1;
                let name = format!("{}-{}", self.service, self.next);
                let ip = pod_ip(self.next + if self.ns == "team-a" { 0 } else { 5000 });
                create_pod(&bed.kube, self.ns, &PodSpec::new(&name).label("app", self.service)).await;
                set_ready(&bed.kube, self.ns, &name, &ip, true).await;
                wait_key(&bed.etcd, &self.key(&name)).await;
                self.pods.insert(name, true);
            }
            (1 | 2, Some(name)) => {
                let ready = !self.pods[&name];
                let i: usize = name.rsplit('-').next().unwrap().parse().unwrap();
                let ip = pod_ip(i + if self.ns == "team-a" { 0 } else { 5000 });
                set_ready(&bed.kube, self.ns, &name, &ip, ready).await;
                if ready {
                    wait_key(&bed.etcd, &self.key(&name)).await;
                } else {
                    wait_absent(&bed.etcd, &self.key(&name), DEADLINE).await;
                    self.unpublished += 1;
                }
                self.pods.insert(name, ready);
            }
            (_, Some(name)) => {
                force_delete(&bed.kube, self.ns, &name).await;
                wait_absent(&bed.etcd, &self.key(&name), DEADLINE).await;
                if self.pods.remove(&name) == Some(true) {
                    self.unpublished += 1;
                }
            }
        }
    }
}

#[tokio::test]
async fn two_installs_side_by_side_for_two_minutes_of_churn_do_not_touch_each_other() {
    let bed = TestBed::start().await;
    bed.apply_crd().await;
    for ns in ["team-a", "team-b"] {
        ensure_namespace(&bed.kube, ns).await;
    }
    // Two installs as the chart makes them: each its own Lease, install id and namespaces;
    // two replicas each, at the defaults.
    let install = |ns: &str| {
        vec!["--cluster-id".to_string(), "c1".into(), "--watch-namespace".into(), ns.into(), "--install-id".into(), format!("{ns}.podlease"), "--leader-election-name".into(), format!("podlease-{ns}")]
    };
    let (a_args, b_args) = (install("team-a"), install("team-b"));
    let a_refs: Vec<&str> = a_args.iter().map(String::as_str).collect();
    let b_refs: Vec<&str> = b_args.iter().map(String::as_str).collect();
    let _a = [Controller::start(&bed, "a1", &a_refs).await, Controller::start(&bed, "a2", &a_refs).await];
    let _b = [Controller::start(&bed, "b1", &b_refs).await, Controller::start(&bed, "b2", &b_refs).await];
    create_registration(&bed.kube, "team-a", "web-a", json!({"selector": {"matchLabels": {"app": "web-a"}}})).await;
    create_registration(&bed.kube, "team-b", "web-b", json!({"selector": {"matchLabels": {"app": "web-b"}}})).await;

    for ns in ["team-a", "team-b"] {
        wait_key(&bed.etcd, &format!("/podlease/owners/c1/{ns}.podlease")).await;
    }
    // Every write to a fence key from now on: a steal, or a leader taking its own again.
    let fences: std::sync::Arc<std::sync::Mutex<Vec<(String, String)>>> = Default::default();
    let mut w = bed.etcd.watch_client();
    let mut stream = w.watch("/podlease/owners/c1/", Some(WatchOptions::new().with_prefix())).await.unwrap();
    let seen = fences.clone();
    tokio::spawn(async move {
        let _keep = w;
        while let Ok(Some(resp)) = stream.message().await {
            for ev in resp.events() {
                let kv = ev.kv().unwrap();
                let key = kv.key_str().unwrap().to_string();
                if ev.event_type() == EventType::Put && podlease::registry::identity::classify("/podlease/owners", &key).is_some_and(|(_, ns)| ns.is_none()) {
                    seen.lock().unwrap().push((key, kv.value_str().unwrap_or_default().to_string()));
                }
            }
        }
    });
    let recorder = Recorder::start(&bed.etcd, "/services/").await;

    let mut churn = [
        Churn { ns: "team-a", service: "web-a", next: 0, pods: BTreeMap::new(), unpublished: 0, rng: 0x9e3779b97f4a7c15 },
        Churn { ns: "team-b", service: "web-b", next: 0, pods: BTreeMap::new(), unpublished: 0, rng: 0x2545f4914f6cdd1d },
    ];
    let start = Instant::now();
    let mut steps = 0;
    while start.elapsed() < Duration::from_secs(120) {
        let [a, b] = &mut churn;
        tokio::join!(a.step(&bed), b.step(&bed));
        steps += 2;
    }

    for c in &churn {
        let prefix = format!("/services/{}/", c.service);
        let deletes = recorder.deletes().into_iter().filter(|e| e.key.starts_with(&prefix)).count();
        println!("measured: {}: {} pods at the end, {} DELETE events for {} unpublishing steps", c.ns, c.pods.len(), deletes, c.unpublished);
        assert_eq!(deletes, c.unpublished, "{}: a DELETE the test did not cause, or one missing", c.ns);
        let want: Vec<String> = c.pods.iter().filter(|(_, r)| **r).map(|(p, _)| c.key(p)).collect();
        let mut got: Vec<String> = keys(&bed.etcd, &prefix).await.iter().map(|kv| kv.key_str().unwrap().to_string()).collect();
        got.sort();
        assert_eq!(got, want, "{}: etcd holds exactly its ready pods", c.ns);
        let api: Api<ServiceRegistration> = Api::namespaced(bed.kube.clone(), c.ns);
        wait_until(&format!("{} status", c.ns), DEADLINE, || async {
            let st = api.get(c.service).await.ok()?.status?;
            (st.registered as usize == want.len() && st.ready_pods as usize == want.len()).then_some(())
        })
        .await;
    }
    // Each install's records lie in its own root and namespace only.
    let all = keys(&bed.etcd, "/podlease/owners/").await;
    for kv in &all {
        if let Some((root, Some(ns))) = podlease::registry::identity::classify("/podlease/owners", kv.key_str().unwrap()) {
            assert_eq!(root, format!("/podlease/owners/c1/{ns}.podlease"), "{}", kv.key_str().unwrap());
        }
    }
    // Each install's leader took its own fence once, before, and kept it.
    let fences = fences.lock().unwrap().clone();
    println!("measured: {steps} churn steps in 2 minutes; fence writes during them: {}", fences.len());
    assert_eq!(fences, Vec::<(String, String)>::new(), "fences were written during the churn");
}

#[tokio::test]
async fn two_sources_of_one_key_have_one_owner_and_hand_it_over_without_a_delete() {
    let bed = TestBed::start().await;
    bed.apply_crd().await;
    let c = Controller::start(&bed, "c", &[]).await;
    // Two registrations publishing the same key for the same pods (same format, prefix and
    // service), and one pod whose annotations publish it too.
    for name in ["a", "b"] {
        create_registration(&bed.kube, NS, name, json!({"selector": {"matchLabels": {"app": "web"}}, "service": "web"})).await;
    }
    for i in 0..10 {
        let name = format!("web-{i}");
        let mut spec = PodSpec::new(&name).label("app", "web");
        if i == 0 {
            spec = spec.annotation("podlease.io/service", "web");
        }
        create_pod(&bed.kube, NS, &spec).await;
        set_ready(&bed.kube, NS, &name, &pod_ip(i + 1), true).await;
    }
    wait_until("10 keys", DEADLINE, || async { (keys(&bed.etcd, "/services/web/").await.len() == 10).then_some(()) }).await;
    let records = || records_by_source(&bed.etcd);
    // The owner: the annotations, then registrations by name. The other is served by it.
    wait_until("one owner per key", DEADLINE, || async {
        (records().await == BTreeMap::from([("@annotations".to_string(), 1), ("a".to_string(), 9)])).then_some(())
    })
    .await;
    let api: Api<ServiceRegistration> = Api::namespaced(bed.kube.clone(), NS);
    for name in ["a", "b"] {
        wait_until(&format!("{name}: all 10 registered, no conflict"), DEADLINE, || async {
            let st = api.get(name).await.ok()?.status?;
            let conflict = st.conditions.iter().any(|c| c.type_ == "Conflict" && c.status == "True");
            (st.registered == 10 && st.ready_pods == 10 && !conflict).then_some(())
        })
        .await;
    }
    assert_eq!(c.metric("podlease_conflicts_total").await, 0.0);
    let before = leases_under(&bed.etcd, "/services/web/").await;
    let recorder = Recorder::start(&bed.etcd, "/").await;

    // The owners go: the next source takes each key over in place.
    api.delete("a", &Default::default()).await.unwrap();
    patch_annotations(&bed.kube, NS, "web-0", json!({"podlease.io/service": null})).await;
    wait_until("b owns every key", DEADLINE, || async { (records().await == BTreeMap::from([("b".to_string(), 10)])).then_some(()) }).await;
    wait_until("registration a is gone (its finalizer released)", DEADLINE, || async { api.get_opt("a").await.ok()?.is_none().then_some(()) }).await;
    assert_eq!(leases_under(&bed.etcd, "/services/web/").await, before, "every key under the same lease");
    let deletes: Vec<String> = recorder.deletes().into_iter().map(|e| e.key).filter(|k| k.starts_with("/services/")).collect();
    assert_eq!(deletes, Vec::<String>::new(), "watchers saw DELETEs");
    wait_until("b: all 10 registered", DEADLINE, || async { (api.get("b").await.ok()?.status?.registered == 10).then_some(()) }).await;
    // Outlive the TTL: the leases are kept alive as b's (etcd shows each renewed more than
    // a TTL from here).
    support::etcd::wait_renewed_after(&bed.etcd, "/services/web/", Instant::now() + Duration::from_secs(30), TAKEOVER).await;
    assert_eq!(keys(&bed.etcd, "/services/web/").await.len(), 10);
}

#[tokio::test]
async fn an_owner_that_changes_its_service_hands_its_keys_over_without_a_delete() {
    let bed = TestBed::start().await;
    bed.apply_crd().await;
    let c = Controller::start(&bed, "c", &[]).await;
    for name in ["a", "b"] {
        create_registration(&bed.kube, NS, name, json!({"selector": {"matchLabels": {"app": "web"}}, "service": "web"})).await;
    }
    for i in 0..10 {
        let name = format!("web-{i}");
        create_pod(&bed.kube, NS, &PodSpec::new(&name).label("app", "web")).await;
        set_ready(&bed.kube, NS, &name, &pod_ip(i + 1), true).await;
    }
    let api: Api<ServiceRegistration> = Api::namespaced(bed.kube.clone(), NS);
    for name in ["a", "b"] {
        wait_until(&format!("{name}: all 10 registered"), DEADLINE, || async { (api.get(name).await.ok()?.status?.registered == 10).then_some(()) }).await;
    }
    let before = leases_under(&bed.etcd, "/services/web/").await;
    assert_eq!(before.len(), 10);
    let recorder = Recorder::start(&bed.etcd, "/").await;

    // a, the owner (first by name), now publishes another service: b takes every web key
    // over in place, and a's new keys appear beside them.
    let patch = json!({"spec": {"service": "cart"}});
    api.patch("a", &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&patch)).await.unwrap();
    wait_until("10 cart keys", DEADLINE, || async { (keys(&bed.etcd, "/services/cart/").await.len() == 10).then_some(()) }).await;
    wait_until("b: all 10 registered, no conflict", DEADLINE, || async {
        let st = api.get("b").await.ok()?.status?;
        let conflict = st.conditions.iter().any(|c| c.type_ == "Conflict" && c.status == "True");
        (st.registered == 10 && !conflict).then_some(())
    })
    .await;
    assert_eq!(leases_under(&bed.etcd, "/services/web/").await, before, "every web key under the same lease");
    let deletes: Vec<String> = recorder.deletes().into_iter().map(|e| e.key).filter(|k| k.starts_with("/services/")).collect();
    assert_eq!(deletes, Vec::<String>::new(), "watchers saw DELETEs");
    assert_eq!(c.metric("podlease_conflicts_total").await, 0.0);
}

#[tokio::test]
async fn a_key_handed_on_twice_in_a_row_reaches_the_last_source_without_a_delete() {
    let bed = TestBed::start().await;
    handed_on_twice(&bed, &[]).await;
}

/// The same, with the second hand-over arriving while the first ones still wait in the
/// queue (one etcd operation at a time, each 20 ms away): `b` is asked to pass on keys it
/// has yet to take over (a run at the defaults once saw that schedule, and the key was
/// revoked and registered again).
#[tokio::test]
async fn a_key_handed_on_before_its_first_hand_over_ran_reaches_the_last_source_without_a_delete() {
    let bed = TestBed::start().await;
    let proxy = support::proxy::FaultProxy::to_url(&bed.etcd_endpoint());
    proxy.set_mode(support::proxy::Mode::Latency(Duration::from_millis(20)));
    handed_on_twice(&bed, &["--etcd-endpoints", &proxy.endpoint("http"), "--concurrency", "1"]).await;
}

/// Handed back before the hand-over ran: each pod's annotations publish its key and a
/// registration is served by them; the annotations go and come back while the hand-overs to
/// the registration still wait in the queue. The key never leaves its lease.
#[tokio::test]
async fn a_key_handed_back_before_its_hand_over_ran_keeps_its_lease() {
    let bed = TestBed::start().await;
    bed.apply_crd().await;
    let proxy = support::proxy::FaultProxy::to_url(&bed.etcd_endpoint());
    let _c = Controller::start(&bed, "c", &["--etcd-endpoints", &proxy.endpoint("http"), "--concurrency", "1"]).await;
    create_registration(&bed.kube, NS, "a", json!({"selector": {"matchLabels": {"app": "web"}}, "service": "web"})).await;
    const PODS: usize = 20;
    for i in 0..PODS {
        let name = format!("web-{i}");
        create_pod(&bed.kube, NS, &PodSpec::new(&name).label("app", "web").annotation("podlease.io/service", "web")).await;
        set_ready(&bed.kube, NS, &name, &pod_ip(i + 1), true).await;
    }
    let owners = || records_by_source(&bed.etcd);
    let annotated = BTreeMap::from([("@annotations".to_string(), PODS)]);
    wait_until("the annotations own every key", DEADLINE, || async { (owners().await == annotated).then_some(()) }).await;
    let before = leases_under(&bed.etcd, "/services/web/").await;
    assert_eq!(before.len(), PODS);
    let recorder = Recorder::start(&bed.etcd, "/services/").await;
    // Every etcd operation 50 ms away, one at a time: the hand-overs queue up behind it.
    proxy.set_mode(support::proxy::Mode::Latency(Duration::from_millis(50)));
    for value in [serde_json::Value::Null, json!("web")] {
        for i in 0..PODS {
            patch_annotations(&bed.kube, NS, &format!("web-{i}"), json!({"podlease.io/service": value})).await;
        }
    }
    proxy.set_mode(support::proxy::Mode::Pass);
    wait_until("the annotations own every key again", DEADLINE, || async { (owners().await == annotated).then_some(()) }).await;
    assert_eq!(leases_under(&bed.etcd, "/services/web/").await, before, "every key under the same lease");
    let deletes: Vec<String> = recorder.deletes().into_iter().map(|e| e.key).collect();
    assert_eq!(deletes, Vec::<String>::new(), "watchers saw DELETEs");
}

async fn handed_on_twice(bed: &TestBed, args: &[&str]) {
    bed.apply_crd().await;
    let _c = Controller::start(bed, "c", args).await;
    // Three registrations of one key per pod: a owns it, b and c are served.
    for name in ["a", "b", "c"] {
        create_registration(&bed.kube, NS, name, json!({"selector": {"matchLabels": {"app": "web"}}, "service": "web"})).await;
    }
    const PODS: usize = 30;
    for i in 0..PODS {
        let name = format!("web-{i}");
        create_pod(&bed.kube, NS, &PodSpec::new(&name).label("app", "web")).await;
        set_ready(&bed.kube, NS, &name, &pod_ip(i + 1), true).await;
    }
    let api: Api<ServiceRegistration> = Api::namespaced(bed.kube.clone(), NS);
    wait_until("c: every pod registered (served by a)", DEADLINE, || async {
        (api.get("c").await.ok()?.status?.registered as usize == PODS && keys(&bed.etcd, "/services/web/").await.len() == PODS).then_some(())
    })
    .await;
    let before = leases_under(&bed.etcd, "/services/web/").await;
    let recorder = Recorder::start(&bed.etcd, "/services/").await;
    // a goes, and b right after it, while a's keys are being handed to b.
    api.delete("a", &Default::default()).await.unwrap();
    api.delete("b", &Default::default()).await.unwrap();
    for name in ["a", "b"] {
        wait_until(&format!("registration {name} is gone"), DEADLINE, || async { api.get_opt(name).await.ok()?.is_none().then_some(()) }).await;
    }
    wait_until("c owns every key", DEADLINE, || async {
        let records: Vec<String> = keys(&bed.etcd, "/podlease/owners/")
            .await
            .iter()
            .filter_map(|kv| kv.key_str().ok().map(str::to_string))
            .filter(|k| podlease::registry::identity::classify("/podlease/owners", k).is_some_and(|(_, ns)| ns.is_some()))
            .collect();
        let owned = records.iter().filter(|k| k.ends_with("/c")).count();
        (owned == PODS && records.iter().all(|k| !k.ends_with("/a") && !k.ends_with("/b"))).then_some(())
    })
    .await;
    assert_eq!(leases_under(&bed.etcd, "/services/web/").await, before, "every key under the same lease");
    let deletes: Vec<String> = recorder.deletes().into_iter().map(|e| e.key).collect();
    assert_eq!(deletes, Vec::<String>::new(), "watchers saw DELETEs");
}

#[tokio::test]
async fn a_service_name_belongs_to_one_namespace_unless_the_admin_shares_it() {
    let bed = TestBed::start().await;
    bed.apply_crd().await;
    for ns in ["shop", "mallory"] {
        ensure_namespace(&bed.kube, ns).await;
    }
    let mut c = Controller::start(&bed, "c", &[]).await;
    create_registration(&bed.kube, "shop", "payments", json!({"selector": {"matchLabels": {"app": "payments"}}})).await;
    for i in 0..2 {
        let name = format!("payments-{i}");
        create_pod(&bed.kube, "shop", &PodSpec::new(&name).label("app", "payments")).await;
        set_ready(&bed.kube, "shop", &name, &pod_ip(i + 1), true).await;
    }
    wait_key(&bed.etcd, "/services/payments/shop/payments-1").await;

    // mallory joins the service two ways: a registration and an annotated pod.
    create_registration(&bed.kube, "mallory", "pay", json!({"selector": {"matchLabels": {"app": "evil"}}, "service": "payments"})).await;
    create_pod(&bed.kube, "mallory", &PodSpec::new("evil-0").label("app", "evil")).await;
    set_ready(&bed.kube, "mallory", "evil-0", "10.66.0.1", true).await;
    create_pod(&bed.kube, "mallory", &PodSpec::new("evil-1").annotation("podlease.io/service", "payments")).await;
    set_ready(&bed.kube, "mallory", "evil-1", "10.66.0.2", true).await;
    let regs: Api<ServiceRegistration> = Api::namespaced(bed.kube.clone(), "mallory");
    let conflict = wait_until("mallory's registration refused: ServiceClaimed", DEADLINE, || async {
        let st = regs.get("pay").await.ok()?.status?;
        st.conditions.into_iter().find(|c| c.type_ == "Conflict" && c.status == "True" && c.reason == "ServiceClaimed")
    })
    .await;
    assert!(conflict.message.contains("belongs to namespace \"shop\""), "{}", conflict.message);
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(bed.kube.clone(), "mallory");
    for regarding in ["pay", "evil-1"] {
        wait_until(&format!("a Warning ServiceClaimed Event on {regarding}"), DEADLINE, || async {
            events.list(&Default::default()).await.ok()?.items.into_iter().find(|e| {
                e.reason.as_deref() == Some("ServiceClaimed")
                    && e.type_.as_deref() == Some("Warning")
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(regarding)
                    && e.note.as_deref().is_some_and(|n| n.contains("\"shop\""))
            })
        })
        .await;
    }
    // Nothing of mallory's anywhere a consumer reads.
    let evil: Vec<String> = keys(&bed.etcd, "").await.iter().filter(|kv| kv.value_str().is_ok_and(|v| v.contains("10.66."))).map(|kv| kv.key_str().unwrap().to_string()).collect();
    assert_eq!(evil, Vec::<String>::new(), "mallory's address was published");

    // A registration with no pod at all is refused too (the claim, not a key, is checked).
    create_registration(&bed.kube, "mallory", "idle", json!({"selector": {"matchLabels": {"app": "none"}}, "service": "payments"})).await;
    wait_until("mallory's idle registration refused: ServiceClaimed", DEADLINE, || async {
        let st = regs.get("idle").await.ok()?.status?;
        st.conditions.into_iter().find(|c| c.type_ == "Conflict" && c.status == "True" && c.reason == "ServiceClaimed" && c.message.contains("\"shop\""))
    })
    .await;

    // shop's pods stop being ready: no key of shop's is left, but its registration still
    // holds the name. mallory's instances are tried again (each try counts a conflict) and
    // refused every time.
    for i in 0..2 {
        set_ready(&bed.kube, "shop", &format!("payments-{i}"), &pod_ip(i + 1), false).await;
    }
    wait_until("shop's keys gone", DEADLINE, || async { keys(&bed.etcd, "/services/payments/").await.is_empty().then_some(()) }).await;
    // The claim outlives a restart (a new term moves it to its own claims lease).
    c.kill();
    let mut c = Controller::start(&bed, "c1", &[]).await;
    let tried = c.metric("podlease_conflicts_total").await + 4.0;
    wait_until("mallory's two instances tried twice more (or one got in)", DEADLINE, || async {
        (c.metric("podlease_conflicts_total").await >= tried || !keys(&bed.etcd, "/services/payments/").await.is_empty()).then_some(())
    })
    .await;
    let taken: Vec<String> = keys(&bed.etcd, "/services/payments/").await.iter().map(|kv| kv.key_str().unwrap().to_string()).collect();
    assert_eq!(taken, Vec::<String>::new(), "mallory took the name while shop's registration holds it");

    // The claim goes with shop's registration: mallory may have the name then.
    Api::<ServiceRegistration>::namespaced(bed.kube.clone(), "shop").delete("payments", &Default::default()).await.unwrap();
    wait_key(&bed.etcd, "/services/payments/mallory/evil-0").await;
    wait_key(&bed.etcd, "/services/payments/mallory/evil-1").await;

    // Shared by the cluster admin: both namespaces publish it.
    for i in 0..2 {
        set_ready(&bed.kube, "shop", &format!("payments-{i}"), &pod_ip(i + 1), true).await;
    }
    c.kill();
    let _c = Controller::start(&bed, "c2", &["--shared-service", "payments"]).await;
    create_registration(&bed.kube, "shop", "payments", json!({"selector": {"matchLabels": {"app": "payments"}}})).await;
    wait_key(&bed.etcd, "/services/payments/shop/payments-0").await;
    wait_until("both namespaces published", DEADLINE, || async {
        (keys(&bed.etcd, "/services/payments/").await.len() == 4).then_some(())
    })
    .await;

    // No longer shared: one namespace's hold is written first; the other's keys, published
    // while it was shared, go, and its registration shows who holds the name.
    drop(_c);
    let _c = Controller::start(&bed, "c3", &[]).await;
    let owner = wait_until("one namespace left publishing payments", DEADLINE, || async {
        let namespaces: std::collections::BTreeSet<String> =
            keys(&bed.etcd, "/services/payments/").await.iter().map(|kv| kv.key_str().unwrap().split('/').nth(3).unwrap().to_string()).collect();
        (namespaces.len() == 1).then(|| namespaces.into_iter().next().unwrap())
    })
    .await;
    let (loser, registration) = if owner == "shop" { ("mallory", "pay") } else { ("shop", "payments") };
    let st = wait_until(&format!("{loser}/{registration} refused: ServiceClaimed"), DEADLINE, || async {
        let st = Api::<ServiceRegistration>::namespaced(bed.kube.clone(), loser).get(registration).await.ok()?.status?;
        // The status is written as each instance settles: Conflict first, the count after.
        (st.conditions.iter().any(|c| c.type_ == "Conflict" && c.status == "True" && c.reason == "ServiceClaimed") && st.registered == 0).then_some(st)
    })
    .await;
    assert_eq!(keys(&bed.etcd, "/services/payments/").await.len(), 2, "{owner}'s two pods");
    assert_eq!(st.registered, 0, "{loser} still counts registered pods");
}

#[tokio::test]
async fn a_claim_covers_the_names_its_consumers_read_and_the_names_that_read_it() {
    let bed = TestBed::start().await;
    bed.apply_crd().await;
    for ns in ["shop", "mallory"] {
        ensure_namespace(&bed.kube, ns).await;
    }
    let _c = Controller::start(&bed, "c", &[]).await;
    let shop = |format: &str, service: &str| json!({"selector": {"matchLabels": {"app": "pay"}}, "format": format, "service": service});
    let mallory = |format: &str, service: &str| json!({"selector": {"matchLabels": {"app": "evil"}}, "format": format, "service": service});
    // go-zero consumers of `pay` read `pay/`, where `pay/x` publishes; kratos consumers of
    // `pay` read `/microservices/pay`, where `payments` publishes.
    create_registration(&bed.kube, "shop", "zero", shop("go-zero", "pay")).await;
    create_registration(&bed.kube, "shop", "kratos", shop("kratos", "payments")).await;
    create_pod(&bed.kube, "shop", &PodSpec::new("pay-0").label("app", "pay")).await;
    set_ready(&bed.kube, "shop", "pay-0", &pod_ip(1), true).await;
    let shop_regs: Api<ServiceRegistration> = Api::namespaced(bed.kube.clone(), "shop");
    for name in ["zero", "kratos"] {
        wait_until(&format!("shop/{name} registered"), DEADLINE, || async { (shop_regs.get(name).await.ok()?.status?.registered == 1).then_some(()) }).await;
    }
    create_registration(&bed.kube, "mallory", "within", mallory("go-zero", "pay/x")).await;
    create_registration(&bed.kube, "mallory", "around", mallory("kratos", "pay")).await;
    create_pod(&bed.kube, "mallory", &PodSpec::new("evil-0").label("app", "evil")).await;
    set_ready(&bed.kube, "mallory", "evil-0", "10.66.0.1", true).await;
    let regs: Api<ServiceRegistration> = Api::namespaced(bed.kube.clone(), "mallory");
    for (name, claimed) in [("within", "\"pay/\""), ("around", "\"/microservices/payments\"")] {
        let c = wait_until(&format!("mallory/{name} refused: ServiceClaimed"), DEADLINE, || async {
            let st = regs.get(name).await.ok()?.status?;
            st.conditions.into_iter().find(|c| c.type_ == "Conflict" && c.status == "True" && c.reason == "ServiceClaimed")
        })
        .await;
        assert!(c.message.contains("\"shop\"") && c.message.contains(claimed), "{}", c.message);
    }
    // skydns: the name is in the key, but a zone is chosen per registration, and zone
    // `user.shop.cluster.local` in mallory answers for shop's `user.shop.cluster.local`.
    create_registration(&bed.kube, "shop", "user", shop("skydns", "user")).await;
    wait_until("shop/user registered", DEADLINE, || async { (shop_regs.get("user").await.ok()?.status?.registered == 1).then_some(()) }).await;
    let mut zoned = mallory("skydns", "x");
    zoned["options"] = json!({"zone": "user.shop.cluster.local"});
    create_registration(&bed.kube, "mallory", "zone", zoned).await;
    let c = wait_until("mallory/zone refused: ServiceClaimed", DEADLINE, || async {
        let st = regs.get("zone").await.ok()?.status?;
        st.conditions.into_iter().find(|c| c.type_ == "Conflict" && c.status == "True" && c.reason == "ServiceClaimed")
    })
    .await;
    assert!(c.message.contains("\"shop\"") && c.message.contains("/skydns/local/cluster/shop/user/"), "{}", c.message);
    let evil: Vec<String> = keys(&bed.etcd, "").await.iter().filter(|kv| kv.value_str().is_ok_and(|v| v.contains("10.66."))).map(|kv| kv.key_str().unwrap().to_string()).collect();
    assert_eq!(evil, Vec::<String>::new(), "mallory's address was published");
}

#[tokio::test]
async fn an_upgrade_from_the_layout_before_install_ids_is_refused_then_migrated_without_a_delete() {
    let bed = TestBed::start().await;
    bed.apply_crd().await;
    create_registration(&bed.kube, NS, "web", json!({"selector": {"matchLabels": {"app": "web"}}})).await;
    let pod = create_pod(&bed.kube, NS, &PodSpec::new("web-0").label("app", "web")).await;
    set_ready(&bed.kube, NS, "web-0", &pod_ip(1), true).await;
    // What the release before install ids left, its leader still running (a rolling
    // upgrade): the key and its record under one lease, the record at
    // <owner-prefix>/<cluster-id>/<ns>/<pod>/<registration>, and the leader's fence.
    let mut lc = bed.etcd.lease_client();
    let lease = lc.grant(60, None).await.unwrap().id();
    let fence_lease = lc.grant(60, None).await.unwrap().id();
    let mut kv = bed.etcd.kv_client();
    let key = "/services/web/default/web-0";
    let opts = || Some(etcd_client::PutOptions::new().with_lease(lease));
    kv.put(key, r#"{"addr":"10.0.0.1:8080"}"#, opts()).await.unwrap();
    let record = json!({"key": key, "ttl": 30, "value_hash": "0", "pod_uid": pod.metadata.uid.unwrap()});
    kv.put("/podlease/owners/c1/default/web-0/web", record.to_string(), opts()).await.unwrap();
    kv.put("/podlease/owners/c1", "00000000000000000003/old-0", Some(etcd_client::PutOptions::new().with_lease(fence_lease))).await.unwrap();
    let recorder = Recorder::start(&bed.etcd, "/").await;

    let mut n = Controller::new(&bed, "new", bed.kubeconfig.clone(), &["--cluster-id", "c1"]);
    n.spawn();
    let status = n.wait_exit().await;
    let log = n.log_text();
    assert!(!status.success() && log.contains("--migrate-from=/podlease/owners/c1 "), "{log}");

    let m = Controller::start(&bed, "new2", &["--cluster-id", "c1", "--migrate-from", "/podlease/owners/c1"]).await;
    wait_adopted(&m, TAKEOVER).await;
    // The value is brought up to date in place (the old record carried no claim).
    wait_until("the key rewritten as this release writes it", DEADLINE, || async {
        let kv = keys(&bed.etcd, key).await.into_iter().next()?;
        kv.value_str().ok()?.contains("\"pod\":\"web-0\"").then_some(kv)
    })
    .await;
    let all = keys(&bed.etcd, "/podlease/owners/").await;
    assert_eq!((records_under(&all, "/podlease/owners/c1/default.podlease"), records_under(&all, "/podlease/owners/c1")), (1, 0));
    assert_eq!(keys(&bed.etcd, key).await[0].lease(), lease, "the same lease");
    let deletes: Vec<String> = recorder.deletes().into_iter().map(|e| e.key).filter(|k| k.starts_with("/services/")).collect();
    assert_eq!(deletes, Vec::<String>::new(), "watchers saw DELETEs");
}

/// Two installs whose namespaces overlap and that select the same pod's same key: the one
/// that comes second reports Conflict (metric, Warning Event naming the key) and writes no
/// key and no ownership record; once the first install is gone for good and its lease has
/// run out, the second takes the key.
#[tokio::test]
async fn a_second_install_that_selects_a_published_key_reports_conflict_and_writes_nothing() {
    let bed = TestBed::start().await;
    bed.apply_crd().await;
    let ns = "shared";
    ensure_namespace(&bed.kube, ns).await;
    let install = |id: &str| -> Vec<String> {
        ["--cluster-id", "c1", "--watch-namespace", ns, "--install-id", id, "--leader-election-name", &format!("podlease-{id}")].map(String::from).to_vec()
    };
    let (a_args, b_args) = (install("first"), install("second"));
    let mut a = Controller::start(&bed, "a", &a_args.iter().map(String::as_str).collect::<Vec<_>>()).await;
    let spec = PodSpec::new("web-0").annotation("podlease.io/service", "web").ports(&[("http", 8080)]);
    create_pod(&bed.kube, ns, &spec).await;
    set_ready(&bed.kube, ns, "web-0", "10.70.0.1", true).await;
    let key = "/services/web/shared/web-0";
    let published = wait_key(&bed.etcd, key).await;
    let recorder = Recorder::start(&bed.etcd, "/").await;

    let b = Controller::start(&bed, "b", &b_args.iter().map(String::as_str).collect::<Vec<_>>()).await;
    wait_until("the second install counts a conflict", DEADLINE, || async {
        (b.metric("podlease_instances{state=\"conflict\"}").await == 1.0).then_some(())
    })
    .await;
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(bed.kube.clone(), ns);
    let note = wait_until("a Conflict Event on the pod from the second install", DEADLINE, || {
        let events = events.clone();
        async move {
            events.list(&Default::default()).await.ok()?.items.into_iter().find_map(|e| {
                let on_pod = e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("web-0");
                (on_pod && e.reason.as_deref() == Some("Conflict") && e.reporting_instance.as_deref() == Some("b") && e.type_.as_deref() == Some("Warning"))
                    .then(|| e.note.unwrap_or_default())
            })
        }
    })
    .await;
    println!("measured: the second install's Event: {note}");
    assert!(note.contains(key), "the Event names the key: {note}");
    // Nothing of the second install's in etcd: the key is the first's, untouched.
    let now = wait_key(&bed.etcd, key).await;
    assert_eq!((now.mod_revision(), now.lease(), now.value()), (published.mod_revision(), published.lease(), published.value()));
    // (Its claims lease pointer aside: the install's own bookkeeping, no instance.)
    let records: Vec<_> = keys(&bed.etcd, "/podlease/owners/c1/second/").await.into_iter().filter(|kv| !kv.key_str().unwrap().contains("@claims")).collect();
    assert!(records.is_empty(), "the second install wrote an ownership record: {:?}", records.iter().map(|kv| kv.key_str().unwrap().to_string()).collect::<Vec<_>>());
    let writes: Vec<String> = recorder.all().into_iter().filter(|e| !e.key.contains("/@claims/") && !e.key.starts_with("/podlease/owners/c1/second")).map(|e| e.key).collect();
    assert!(writes.is_empty(), "writes other than the second install's fence and claim: {writes:?}");

    // The first install gone for good (no revoke: SIGKILL); once its lease runs out the
    // second install's retry takes the key.
    a.kill();
    let taken = wait_until("the second install takes the key over", Duration::from_secs(90), || async {
        let kv = support::etcd::keys(&bed.etcd, key).await.into_iter().next()?;
        (kv.lease() != published.lease()).then_some(kv)
    })
    .await;
    let records = keys(&bed.etcd, "/podlease/owners/c1/second/").await.into_iter().filter(|kv| !kv.key_str().unwrap().contains("@claims")).count();
    assert_eq!(records, 1, "the second install's record");
    assert_eq!(taken.value(), published.value());
}
