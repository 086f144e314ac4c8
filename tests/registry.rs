//! The registry actor driven directly, against the bed's real etcd: what it does with
//! commands that reach it together.

mod support;

use std::sync::Arc;

use podlease::desired::{Desired, InstanceId, Source, Update};
use podlease::format::{Format, Key};
use podlease::metrics::Metrics;
use podlease::registry::{Command, Registry, RegistryConfig, SharedView};
use support::etcd::history;
use support::*;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

fn instance(pod: &str) -> InstanceId {
    InstanceId { namespace: "default".into(), pod: pod.into(), source: Source::Registration("r".into()) }
}

fn key(pod: &str) -> String {
    format!("/services/svc/default/{pod}")
}

fn desired(pod: &str, i: usize) -> Arc<Desired> {
    let address = format!("{}:8080", pod_ip(i));
    Arc::new(Desired {
        service: "svc".into(),
        format: Format::Json,
        key: Key::Fixed(key(pod)),
        value: format!(r#"{{"addr":"{address}"}}"#).into_bytes(),
        ttl: 30,
        address,
        pod_uid: format!("uid-{pod}"),
        ready_since: None,
        claim: None,
    })
}

/// A pod that turned not ready while the registry was busy (here: before it started, as at
/// a takeover, when the relist and the watch's next events arrive together) is never
/// written: queued updates are applied before any write starts, so consumers do not see
/// a PUT and then a DELETE for a pod that is no longer ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn updates_already_queued_are_applied_before_any_write_starts() {
    let bed = TestBed::start().await;
    let from = bed.etcd.kv_client().get("/", None).await.unwrap().header().unwrap().revision() + 1;
    // One write at a time: without the draining, "a" is written before "b" starts.
    let config = RegistryConfig { cluster_id: "c1".into(), identity: "x".into(), concurrency: 1, ..RegistryConfig::default() };
    let (notices, _keep) = mpsc::unbounded_channel();
    let term = CancellationToken::new();
    let registry = Registry::new(bed.etcd.clone().into(), config, Some(1), notices, Metrics::new(), SharedView::default(), term.clone());
    let (tx, rx) = mpsc::unbounded_channel();
    tx.send(Command::Holds(Default::default())).unwrap();
    tx.send(Command::Resync(vec![(instance("a"), desired("a", 1))])).unwrap();
    tx.send(Command::Update(Update::Remove(instance("a")))).unwrap();
    tx.send(Command::Update(Update::Upsert(instance("b"), desired("b", 2)))).unwrap();
    let task = tokio::spawn(registry.run(rx));

    let mut kv = bed.etcd.kv_client();
    wait_until("b's key in etcd", DEADLINE, || {
        let mut kv = kv.clone();
        async move { (kv.get(key("b"), None).await.ok()?.count() == 1).then_some(()) }
    })
    .await;
    let seen: Vec<String> = history(&bed.etcd, "/services/", from)
        .await
        .into_iter()
        .map(|s| format!("{} {}", if s.put { "PUT" } else { "DELETE" }, s.key))
        .collect();
    assert_eq!(seen, [format!("PUT {}", key("b"))], "only b is written; a never is");
    assert_eq!(kv.get(key("a"), None).await.unwrap().count(), 0);

    term.cancel();
    let _ = task.await;
}

/// The compatibility subset on etcd 3.5 (most clusters still run it): the same tests, each in a process of its own
/// (README, "Supported versions").
mod on_etcd_3_5 {
    use super::support::{run_on, Release};

    #[test]
    fn updates_already_queued_are_applied_before_any_write_starts() {
        run_on(Release::Etcd35);
        super::updates_already_queued_are_applied_before_any_write_starts();
    }
}
