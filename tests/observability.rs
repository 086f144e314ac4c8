//! What operators see: /metrics parsed as Prometheus would, /healthz and /readyz through an
//! etcd outage and on a standby, and JSON logs.

mod support;

use std::time::Duration;

use kube::api::{Api, PostParams};
use podlease::registration::ServiceRegistration;
use prometheus_parse::{Scrape, Value};
use serde_json::json;
use support::controller::http_get;
use support::*;

const NS: &str = "default";

async fn scrape(c: &Controller) -> Scrape {
    let (code, body) = http_get(&format!("http://127.0.0.1:{}/metrics", c.metrics_port)).await.expect("/metrics answers");
    assert_eq!(code, 200);
    Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).expect("valid Prometheus text")
}

fn sample<'a>(s: &'a Scrape, name: &str, label: Option<(&str, &str)>) -> &'a Value {
    &s.samples
        .iter()
        .find(|x| x.metric == name && label.is_none_or(|(k, v)| x.labels.get(k) == Some(v)))
        .unwrap_or_else(|| panic!("no sample {name} {label:?}; have {:?}", s.samples.iter().map(|x| &x.metric).collect::<Vec<_>>()))
        .value
}

fn number(v: &Value) -> f64 {
    match v {
        Value::Counter(n) | Value::Gauge(n) | Value::Untyped(n) => *n,
        other => panic!("not a number: {other:?}"),
    }
}

fn histogram_count(v: &Value) -> f64 {
    match v {
        Value::Histogram(buckets) => buckets.iter().map(|b| b.count).fold(0.0, f64::max),
        other => panic!("not a histogram: {other:?}"),
    }
}

async fn readyz(c: &Controller) -> (u16, String) {
    http_get(&format!("http://127.0.0.1:{}/readyz", c.metrics_port)).await.expect("/readyz answers")
}

#[tokio::test]
async fn metrics_health_and_logs_tell_what_podlease_is_doing() {
    let mut bed = TestBed::start().await;
    bed.apply_crd().await;
    let c = Controller::start(&bed, "a", &["--log-format", "json", "--leader-lease-duration", "4", "--etcd-timeout", "2"]).await;
    let api: Api<ServiceRegistration> = Api::namespaced(bed.kube.clone(), NS);
    let sreg: ServiceRegistration = serde_json::from_value(json!({
        "apiVersion": "podlease.io/v1alpha1", "kind": "ServiceRegistration",
        "metadata": {"name": "m"}, "spec": {"selector": {"matchLabels": {"app": "m"}}, "ttlSeconds": 5},
    }))
    .unwrap();
    api.create(&PostParams::default(), &sreg).await.unwrap();
    for i in 0..10 {
        create_pod(&bed.kube, NS, &PodSpec::new(&format!("m-{i}")).label("app", "m")).await;
        set_ready(&bed.kube, NS, &format!("m-{i}"), &pod_ip(i + 1), true).await;
    }
    wait_until("10 registered and renewed", DEADLINE, || async {
        let s = scrape(&c).await;
        let ok = number(sample(&s, "podlease_instances", Some(("state", "registered")))) == 10.0
            && histogram_count(sample(&s, "podlease_keepalive_rtt_seconds", None)) >= 10.0;
        ok.then_some(())
    })
    .await;

    let s = scrape(&c).await;
    assert_eq!(number(sample(&s, "podlease_leases_held", None)), 12.0, "10 instances + the leader fence + the install's claims lease");
    assert_eq!(number(sample(&s, "podlease_leader", None)), 1.0);
    assert_eq!(number(sample(&s, "podlease_etcd_available", None)), 1.0);
    assert_eq!(histogram_count(sample(&s, "podlease_propagation_seconds", None)), 10.0, "one per registration");
    assert_eq!(histogram_count(sample(&s, "podlease_etcd_op_duration_seconds", Some(("op", "register")))), 10.0);
    assert!(histogram_count(sample(&s, "podlease_reconcile_duration_seconds", None)) >= 20.0, "every watch event is timed");
    // OpenMetrics names a counter's family without `_total` (the parser, written for the
    // older text format, types its samples as untyped): check the declared type instead.
    let (_, raw) = http_get(&format!("http://127.0.0.1:{}/metrics", c.metrics_port)).await.unwrap();
    for counter in ["keepalive_requests", "leases_lost", "leases_regranted", "conflicts", "fenced_writes", "drift_repairs", "invalid_annotations"] {
        assert!(raw.contains(&format!("# TYPE podlease_{counter} counter")), "{counter} is declared a counter");
        number(sample(&s, &format!("podlease_{counter}_total"), None));
    }
    assert_eq!(http_get(&format!("http://127.0.0.1:{}/healthz", c.metrics_port)).await.unwrap().0, 200);
    let (code, body) = readyz(&c).await;
    assert_eq!((code, body.trim()), (200, "ok (leader)"));

    // A standby is ready (its caches are warm) but does not write.
    let standby = Controller::start(&bed, "b", &["--leader-lease-duration", "4"]).await;
    let (code, body) = readyz(&standby).await;
    assert_eq!((code, body.trim()), (200, "ok (standby)"));
    assert_eq!(number(sample(&scrape(&standby).await, "podlease_leader", None)), 0.0);
    drop(standby);

    // etcd gone: the leader is not ready, and says why; errors are counted by operation.
    bed.registry.kill();
    wait_until("readyz 503 while etcd is down", DEADLINE, || async {
        let (code, body) = readyz(&c).await;
        (code == 503 && body.contains("etcd unavailable")).then_some(())
    })
    .await;
    let s = scrape(&c).await;
    assert_eq!(number(sample(&s, "podlease_etcd_available", None)), 0.0);
    let errors: f64 = s.samples.iter().filter(|x| x.metric == "podlease_etcd_errors_total").map(|x| number(&x.value)).sum();
    assert!(errors >= 1.0, "etcd errors counted");
    // The leader's fence re-read (every 2 s) fails too, and is counted under its own name.
    wait_until("a failed fence read counted", DEADLINE, || async {
        let s = scrape(&c).await;
        s.samples.iter().any(|x| x.metric == "podlease_etcd_errors_total" && x.labels.get("op") == Some("fence") && number(&x.value) >= 1.0).then_some(())
    })
    .await;
    bed.registry.resume();
    wait_until("ready again", Duration::from_secs(60), || async { (readyz(&c).await.0 == 200).then_some(()) }).await;

    // --log-format json: every line is a JSON object with a level and a message.
    let log = c.log_text();
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() > 5);
    for line in lines {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v["level"].is_string() && v["fields"]["message"].is_string(), "{line}");
    }
}

/// The README's promise for the gauges of the replica that led: once a successor holds the
/// leases (a newer fence), its term ends and it reports what a standby does, not its last
/// counts. At the defaults: the leader is frozen (SIGSTOP) long enough to lose the Lease.
#[tokio::test]
async fn a_former_leader_reports_no_instances_and_no_leases_once_a_successor_holds_them() {
    let bed = TestBed::start().await;
    bed.apply_crd().await;
    let a = Controller::start(&bed, "a", &[]).await;
    wait_until("a leads", DEADLINE, || async { a.leads().await.then_some(()) }).await;
    let b = Controller::start(&bed, "b", &[]).await;
    create_registration(&bed.kube, NS, "m", json!({"selector": {"matchLabels": {"app": "m"}}})).await;
    for i in 0..10 {
        create_pod(&bed.kube, NS, &PodSpec::new(&format!("m-{i}")).label("app", "m")).await;
        set_ready(&bed.kube, NS, &format!("m-{i}"), &pod_ip(i + 1), true).await;
    }
    let registered = |s: &Scrape| -> f64 {
        s.samples.iter().filter(|x| x.metric == "podlease_instances" && x.labels.get("state") == Some("registered")).map(|x| number(&x.value)).sum()
    };
    wait_until("10 registered by a", DEADLINE, || async { (registered(&scrape(&a).await) == 10.0).then_some(()) }).await;
    assert_eq!(number(sample(&scrape(&a).await, "podlease_leases_held", None)), 12.0, "10 instances + the fence + the claims lease");
    let s = scrape(&b).await;
    assert_eq!((registered(&s), number(sample(&s, "podlease_leases_held", None))), (0.0, 0.0), "a standby holds nothing");

    a.signal(libc::SIGSTOP);
    support::controller::wait_adopted(&b, Duration::from_secs(60)).await;
    wait_until("b holds the 10 instances", DEADLINE, || async { (registered(&scrape(&b).await) == 10.0).then_some(()) }).await;
    a.signal(libc::SIGCONT);
    wait_until("the former leader's gauges back to 0", Duration::from_secs(60), || async {
        let s = scrape(&a).await;
        let instances: f64 = s.samples.iter().filter(|x| x.metric == "podlease_instances").map(|x| number(&x.value)).sum();
        let held = number(sample(&s, "podlease_leases_held", None));
        let leader = number(sample(&s, "podlease_leader", None));
        (instances == 0.0 && held == 0.0 && leader == 0.0).then_some(())
    })
    .await;
    assert_eq!(registered(&scrape(&b).await), 10.0, "the successor still holds them");
}

#[tokio::test]
async fn a_metrics_port_that_cannot_be_bound_stops_the_process_with_a_clear_error() {
    let bed = TestBed::start().await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let log = bed.dir.path().join("bind.log");
    let mut cmd = std::process::Command::new(support::controller::binary());
    cmd.args(["run", "--etcd-endpoints", &bed.etcd_endpoint(), "--metrics-addr", &addr]).arg("--kubeconfig").arg(&bed.kubeconfig);
    let mut child = spawn_owned(&mut cmd, &log);
    let status = wait_until("podlease exits", DEADLINE, || {
        let s = child.try_wait().unwrap();
        async move { s }
    })
    .await;
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!status.success(), "exited with {status}; log:\n{text}");
    assert!(text.contains(&format!("cannot listen on {addr} for /healthz, /readyz and /metrics")), "{text}");
}

#[tokio::test]
async fn only_the_leader_publishes_events_and_a_new_leader_reports_what_is_current() {
    let bed = TestBed::start().await;
    bed.apply_crd().await;
    let mut a = Controller::start(&bed, "replica-a", &[]).await;
    let mut b = Controller::start(&bed, "replica-b", &[]).await;
    let leader = ["replica-a", "replica-b"][support::controller::wait_leader(&[&a, &b]).await];
    create_pod(&bed.kube, NS, &PodSpec::new("bad").annotation("podlease.io/service", "x").annotation("podlease.io/ttl", "1")).await;
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(bed.kube.clone(), NS);
    // (reporting instance, when) of every InvalidAnnotation Event.
    let reported = || async {
        let list = events.list(&Default::default()).await.ok()?;
        let who: Vec<(String, k8s_openapi::jiff::Timestamp)> = list
            .items
            .into_iter()
            .filter(|e| e.reason.as_deref() == Some("InvalidAnnotation"))
            .map(|e| (e.reporting_instance.unwrap_or_default(), e.event_time.map(|t| t.0).unwrap_or_default()))
            .collect();
        (!who.is_empty()).then_some(who)
    };
    wait_until("an InvalidAnnotation Event", DEADLINE, reported).await;
    wait_until("the standby has seen the pod too", DEADLINE, || async {
        let standby = if leader == "replica-a" { &b } else { &a };
        (standby.metric("podlease_invalid_annotations_total").await >= 1.0).then_some(())
    })
    .await;

    // The leader goes; the new one reports the problem that is still there.
    let (dead, new) = if leader == "replica-a" { (&mut a, "replica-b") } else { (&mut b, "replica-a") };
    let killed = k8s_openapi::jiff::Timestamp::now();
    dead.kill();
    let all = wait_until("the new leader reports the current problem", Duration::from_secs(60), || async {
        let all = reported().await?;
        all.iter().any(|(w, _)| w == new).then_some(all)
    })
    .await;
    // Every Event before the kill came from the leader of that time.
    for (who, at) in &all {
        assert!(who == leader || (who == new && *at >= killed), "an Event from the standby while it stood by: {all:?} (leader {leader}, killed at {killed})");
    }
}
