//! Each consumer framework's own discovery client resolves what podlease writes: go-zero,
//! Kratos, go-micro, Kitex, Hertz, CoreDNS and etcd's gRPC naming resolver
//! (tools/consumers/<framework>, built from the framework's own module at a pinned version),
//! against the real bed at the defaults (TTL 30 s, the
//! chart's leader Lease, etcd's own timings).
//!
//! One story per framework:
//! 1. podlease publishes three ready pods in the framework's format;
//! 2. the client hands out exactly those instances, compared field by field (address, and
//!    where the format has them id, name, version, metadata, weight, tags);
//! 3. a pod turning not ready leaves the client's view (the time it takes is printed);
//! 4. a rollout (three new pods ready, the old ones terminating) converges to the new set;
//! 5. the leader is SIGKILLed: the client sees no change at all, and etcd no DELETE;
//! 6. coexistence: an instance registered by the framework's own server-side code (its
//!    register and keepalive) beside podlease's: the client resolves both, and neither writer
//!    touches the other's key.
//!
//! Pods get loopback addresses (127.0.0.x): a client that dials (`--dial`: zrpc, Kratos gRPC,
//! Kitex, Hertz) calls test servers the test starts on exactly those addresses.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::controller::{wait_adopted, wait_leader};
use support::frameworks::{Client, Framework, addrs_of};
use support::*;

const NS: &str = "shop";
/// The pods of the first set and of the rollout.
const FIRST: [(&str, &str); 3] = [("user-a", "127.0.0.2"), ("user-b", "127.0.0.3"), ("user-c", "127.0.0.4")];
const SECOND: [(&str, &str); 3] = [("user-d", "127.0.0.5"), ("user-e", "127.0.0.6"), ("user-f", "127.0.0.7")];
/// Where the framework's own server registers itself (coexistence).
const OWN: &str = "127.0.0.9";

/// What one framework needs of the story.
struct Case {
    fw: Framework,
    format: &'static str,
    /// The service podlease publishes and the client resolves.
    service: &'static str,
    /// What the client asks for, when it is not `service` (CoreDNS: the DNS name).
    resolves: Option<&'static str>,
    /// Format options of the registration (version, weight, ...).
    options: Value,
    /// Whether the client's RPC client dials (then test servers answer on the pods' addresses).
    dial: bool,
    /// The fields the client must hand out for a pod (`addr` and the format's own).
    expect: fn(&Pod) -> Value,
    /// The etcd prefix of the framework's keys for this service (the coexistence check).
    prefix: &'static str,
    /// Who writes the other instance of the coexistence step.
    own: Own,
}

/// The writer beside podlease in the coexistence step.
enum Own {
    /// The framework's own server-side registration (`<program> register`).
    Register,
    /// Another writer of the layout (CoreDNS has no registration of its own: a SkyDNS
    /// record written by another tool), at this key, for this host (at the story's port).
    Record(&'static str, &'static str),
}

/// One pod as podlease publishes it. Its port is the story's own (a free port), so that the
/// test servers of stories running side by side never share an address.
struct Pod {
    name: &'static str,
    ip: &'static str,
    port: u16,
}

impl Pod {
    fn addr(&self) -> String {
        format!("{}:{}", self.ip, self.port)
    }
}

fn metadata() -> Value {
    json!({"zone": "a", "team": "shop"})
}

async fn story(case: Case) {
    let _body = support::watchdog::body(case.fw.name());
    let t_test = Instant::now();
    let port = support::free_server_port();
    let bed = TestBed::start().await;
    bed.apply_crd().await;
    ensure_namespace(&bed.kube, NS).await;
    let mut a = Controller::start(&bed, "a", &["--watch-namespace", NS]).await;
    let mut b = Controller::start(&bed, "b", &["--watch-namespace", NS]).await;
    let endpoints = bed.etcd_endpoints();
    let mut spec = json!({
        "selector": {"matchLabels": {"app": "user"}}, "port": "grpc", "format": case.format,
        "service": case.service, "metadata": metadata(),
    });
    if !case.options.is_null() {
        spec["options"] = case.options.clone();
    }
    create_registration(&bed.kube, NS, "user", spec).await;

    // Servers on the pods' loopback addresses, for a client that dials: the framework's
    // own server, registered under another service name so it is not resolved here.
    let mut servers = Vec::new();
    if case.dial {
        for (_, ip) in FIRST.iter().chain(&SECOND) {
            let addr = format!("{ip}:{port}");
            servers.push(Client::register(case.fw, &endpoints, "test-servers", &addr, &[], bed.dir.path()).await);
        }
    }
    let coredns = match case.fw {
        Framework::CoreDns => Some(support::frameworks::CoreDns::start("cluster.local", &endpoints, bed.dir.path()).await),
        _ => None,
    };
    let extra: Vec<String> = coredns.iter().map(|d| format!("--dns={}", d.addr)).collect();
    let client = Client::resolve(case.fw, &endpoints, case.resolves.unwrap_or(case.service), case.dial, &extra, bed.dir.path()).await;

    // 1-2. Three ready pods, exactly those instances, field by field.
    for (name, ip) in FIRST {
        create_pod(&bed.kube, NS, &PodSpec::new(name).label("app", "user").ports(&[("grpc", port as i32)])).await;
        set_ready(&bed.kube, NS, name, ip, true).await;
    }
    let first: Vec<Pod> = FIRST.iter().map(|(name, ip)| Pod { name, ip, port }).collect();
    let (_, set) = client.wait_addrs(&first.iter().map(Pod::addr).collect::<Vec<_>>(), DEADLINE).await;
    compare(&case, &set, &first);
    eprintln!("[{}] {} {}: the client hands out the 3 instances, fields equal", case.fw.name(), case.fw.name(), case.fw.version());
    if case.dial {
        wait_called(&client, &first.iter().map(Pod::addr).collect::<Vec<_>>()).await;
    }

    // 3. Not ready: gone from the client's view.
    let sent = Instant::now();
    set_ready(&bed.kube, NS, FIRST[0].0, FIRST[0].1, false).await;
    let (at, _) = client.wait_addrs(&first[1..].iter().map(Pod::addr).collect::<Vec<_>>(), DEADLINE).await;
    eprintln!("[{}] not ready → gone from the client's view in {:?}", case.fw.name(), at.saturating_duration_since(sent));
    set_ready(&bed.kube, NS, FIRST[0].0, FIRST[0].1, true).await;
    client.wait_addrs(&first.iter().map(Pod::addr).collect::<Vec<_>>(), DEADLINE).await;

    // 4. A rollout: the new pods turn ready, then the old ones terminate.
    let t_roll = Instant::now();
    for (name, ip) in SECOND {
        create_pod(&bed.kube, NS, &PodSpec::new(name).label("app", "user").ports(&[("grpc", port as i32)])).await;
        set_ready(&bed.kube, NS, name, ip, true).await;
    }
    // As a rollout with maxUnavailable 0 goes: the old pods terminate once the new ones are
    // available (here: in the client's view).
    let second: Vec<Pod> = SECOND.iter().map(|(name, ip)| Pod { name, ip, port }).collect();
    let all: Vec<String> = first.iter().chain(&second).map(Pod::addr).collect();
    client.wait_addrs(&all, DEADLINE).await;
    for (name, _) in FIRST {
        delete_graceful(&bed.kube, NS, name).await;
    }
    let (_, set) = client.wait_addrs(&second.iter().map(Pod::addr).collect::<Vec<_>>(), DEADLINE).await;
    compare(&case, &set, &second);
    let smallest = client.sets().into_iter().filter(|(at, _)| *at >= t_roll).map(|(_, s)| s.len()).min().unwrap_or(0);
    assert!(smallest >= 3, "the client's set fell to {smallest} instances during the rollout");
    eprintln!("[{}] rollout converged in {:?} (smallest set {smallest})", case.fw.name(), t_roll.elapsed());
    for (name, _) in FIRST {
        force_delete(&bed.kube, NS, name).await;
    }

    // 5. The leader dies; the client sees nothing.
    let sets_before = client.sets().len();
    let rev = support::etcd::revision(&bed.etcd).await;
    let leader = wait_leader(&[&a, &b]).await;
    let (dead, standby) = if leader == 0 { (&mut a, &mut b) } else { (&mut b, &mut a) };
    let leases: Vec<i64> = support::etcd::leases_under(&bed.etcd, case.prefix).await.into_iter().map(|(_, l)| l).collect();
    assert_eq!(leases.len(), second.len(), "podlease's keys under {}", case.prefix);
    let at_kill = lease_ttls(&bed.etcd, &leases).await;
    let killed = Instant::now();
    dead.kill();
    wait_adopted(standby, Duration::from_secs(60)).await;
    // Until the new leader has renewed every lease (each has more time left than it had at
    // the kill, less the time since): nothing the dead leader held is left to expire later.
    wait_until("every lease renewed by the new leader", Duration::from_secs(40), || async {
        let now = lease_ttls(&bed.etcd, &leases).await;
        let since = killed.elapsed().as_secs() as i64;
        now.iter().zip(&at_kill).all(|(n, k)| *n > k - since + 1).then_some(())
    })
    .await;
    let after: Vec<_> = client.sets()[sets_before..].iter().map(|(_, s)| addrs_of(s)).collect();
    assert!(after.is_empty(), "the client saw changes across the failover: {after:?}");
    let history = support::etcd::history(&bed.etcd, case.prefix, rev + 1).await;
    assert!(history.iter().all(|e| e.put), "DELETE events across the failover: {history:?}");
    eprintln!("[{}] leader SIGKILLed: 0 changes in the client, 0 DELETE", case.fw.name());

    // 6. Coexistence with the framework's own registration.
    let rev = support::etcd::revision(&bed.etcd).await;
    let podlease_keys = keys_under(&bed.etcd, case.prefix).await;
    let own_addr = format!("{OWN}:{port}");
    let own = match case.own {
        Own::Register => Some(Client::register(case.fw, &endpoints, case.service, &own_addr, &[], bed.dir.path()).await),
        Own::Record(key, host) => {
            let value = json!({"host": host, "port": port}).to_string();
            bed.etcd.kv_client().put(key, value, None).await.expect("the other writer's record");
            None
        }
    };
    let mut both: Vec<String> = second.iter().map(Pod::addr).collect();
    both.push(own_addr.clone());
    client.wait_addrs(&both, DEADLINE).await;
    // Their writes: the framework's own only under keys podlease does not hold, podlease's
    // keys untouched.
    let history = support::etcd::history(&bed.etcd, case.prefix, rev + 1).await;
    let touched: Vec<_> = history.iter().filter(|e| podlease_keys.contains_key(&e.key)).collect();
    assert!(touched.is_empty(), "podlease's keys were written or deleted while the framework registered its own: {touched:?}");
    let now = keys_under(&bed.etcd, case.prefix).await;
    for (k, v) in &podlease_keys {
        assert_eq!(now.get(k), Some(v), "podlease's key {k} changed");
    }
    let own_keys: Vec<&String> = now.keys().filter(|k| !podlease_keys.contains_key(*k)).collect();
    assert!(!own_keys.is_empty(), "the framework's own registration wrote no key under {}", case.prefix);
    let rev_leave = support::etcd::revision(&bed.etcd).await;
    match (own, &case.own) {
        (Some(own), _) => own.stop().await,
        (None, Own::Record(key, _)) => {
            bed.etcd.kv_client().delete(*key, None).await.expect("the other writer's delete");
        }
        (None, Own::Register) => unreachable!(),
    }
    // The other writer's key goes first (its deregistration or delete), then the client's view.
    wait_until("the other writer's key gone from etcd", DEADLINE, || async {
        let now = keys_under(&bed.etcd, case.prefix).await;
        now.keys().all(|k| podlease_keys.contains_key(k)).then_some(())
    })
    .await;
    client.wait_addrs(&second.iter().map(Pod::addr).collect::<Vec<_>>(), DEADLINE).await;
    // The other writer's key is gone (its own deregistration or delete), podlease's stay.
    let left: Vec<String> = support::etcd::keys(&bed.etcd, case.prefix).await.iter().map(|kv| kv.key_str().unwrap().to_string()).collect();
    assert!(left.iter().all(|k| podlease_keys.contains_key(k)) && left.len() == podlease_keys.len(), "after the other writer left: {left:?}");
    let history = support::etcd::history(&bed.etcd, case.prefix, rev_leave + 1).await;
    assert!(history.iter().all(|e| !podlease_keys.contains_key(&e.key)), "podlease's keys moved when the framework deregistered: {history:?}");
    eprintln!("[{}] coexistence: both resolved, neither writer touched the other's key ({own_keys:?}); whole story {:?}", case.fw.name(), t_test.elapsed());
    drop(servers);
}

/// Every instance the client handed out equals what the format says for its pod, field by
/// field (each field `expect` names; the client may hand out more).
fn compare(case: &Case, set: &[Value], pods: &[Pod]) {
    assert_eq!(set.len(), pods.len(), "{set:?}");
    for pod in pods {
        let want = (case.expect)(pod);
        let got = set.iter().find(|i| i["addr"] == want["addr"]).unwrap_or_else(|| panic!("no instance {} in {set:?}", want["addr"]));
        for (field, value) in want.as_object().unwrap() {
            assert_eq!(&got[field], value, "{} instance of {}: field {field}\n got {got}\nwant {want}", case.fw.name(), pod.name);
        }
    }
}

/// Every key under `prefix` with its value and lease, as etcd holds them now.
async fn keys_under(etcd: &etcd_client::Client, prefix: &str) -> BTreeMap<String, (String, i64)> {
    support::etcd::keys(etcd, prefix).await.iter().map(|kv| (kv.key_str().unwrap().to_string(), (kv.value_str().unwrap().to_string(), kv.lease()))).collect()
}

/// The seconds each lease has left (-1: gone).
async fn lease_ttls(etcd: &etcd_client::Client, leases: &[i64]) -> Vec<i64> {
    let mut out = Vec::new();
    for l in leases {
        out.push(etcd.lease_client().time_to_live(*l, None).await.map(|r| r.ttl()).unwrap_or(-1));
    }
    out
}

/// Waits until calls through the framework's RPC client reached every address.
async fn wait_called(client: &Client, addrs: &[String]) {
    wait_until("calls reaching every published server", DEADLINE, || async {
        let called: std::collections::BTreeSet<String> = client.events("called").iter().filter_map(|l| l.json["addr"].as_str().map(str::to_string)).collect();
        addrs.iter().all(|a| called.contains(a)).then_some(())
    })
    .await;
}

#[tokio::test]
async fn go_zero_discov_and_zrpc_resolve_what_podlease_writes() {
    story(Case {
        fw: Framework::GoZero,
        format: "go-zero",
        service: "user.rpc",
        resolves: None,
        options: Value::Null,
        dial: true,
        expect: |p| json!({"addr": p.addr()}),
        prefix: "user.rpc/",
        own: Own::Register,
    })
    .await;
}

#[tokio::test]
async fn kratos_registry_resolves_what_podlease_writes() {
    story(Case {
        fw: Framework::Kratos,
        format: "kratos",
        service: "user",
        resolves: None,
        options: json!({"version": "v1.2.0"}),
        dial: true,
        expect: |p| {
            json!({
                "addr": p.addr(), "id": format!("{NS}.{}", p.name), "name": "user", "version": "v1.2.0",
                "metadata": metadata(), "endpoints": [format!("grpc://{}", p.addr())],
            })
        },
        prefix: "/microservices/user/",
        own: Own::Register,
    })
    .await;
}

#[tokio::test]
async fn go_micro_registry_resolves_what_podlease_writes() {
    story(Case {
        fw: Framework::GoMicro,
        format: "go-micro",
        service: "user",
        resolves: None,
        options: json!({"version": "v1.2.0"}),
        dial: false,
        expect: |p| {
            let mut md = metadata();
            md["protocol"] = json!("grpc");
            json!({"addr": p.addr(), "id": format!("user-{NS}.{}", p.name), "name": "user", "version": "v1.2.0", "metadata": md})
        },
        prefix: "/micro/registry/user/",
        own: Own::Register,
    })
    .await;
}

#[tokio::test]
async fn kitex_resolver_resolves_what_podlease_writes() {
    story(Case {
        fw: Framework::Kitex,
        format: "kitex",
        service: "user",
        resolves: None,
        options: json!({"weight": 20}),
        dial: true,
        expect: |p| json!({"addr": p.addr(), "weight": 20, "tags": metadata()}),
        prefix: "kitex/registry-etcd/user/",
        own: Own::Register,
    })
    .await;
}

#[tokio::test]
async fn hertz_resolver_resolves_what_podlease_writes() {
    story(Case {
        fw: Framework::Hertz,
        format: "hertz",
        service: "user",
        resolves: None,
        options: json!({"weight": 20}),
        dial: true,
        expect: |p| json!({"addr": p.addr(), "weight": 20, "tags": metadata()}),
        prefix: "hertz/registry-etcd/user/",
        own: Own::Register,
    })
    .await;
}

#[tokio::test]
async fn coredns_serves_what_podlease_writes_as_a_and_srv_records() {
    story(Case {
        fw: Framework::CoreDns,
        format: "skydns",
        service: "user",
        resolves: Some("user.shop.cluster.local"),
        options: Value::Null,
        dial: false,
        // The record TTL CoreDNS serves: min(the lease's time left clamped to at least
        // min-lease-ttl 30 s, the value's ttl 30).
        expect: |p| json!({"addr": p.addr(), "port": p.port, "ttl": 30}),
        prefix: "/skydns/local/cluster/shop/user/",
        own: Own::Record("/skydns/local/cluster/shop/user/other-writer", "127.0.0.9"),
    })
    .await;
}

#[tokio::test]
async fn etcd_naming_resolver_resolves_what_podlease_writes() {
    story(Case {
        fw: Framework::EtcdNaming,
        format: "etcd-naming",
        service: "user",
        resolves: None,
        options: Value::Null,
        // Its dialling is the node story's and tests/consumer.rs's (grpc's round_robin).
        dial: false,
        expect: |p| json!({"addr": p.addr()}),
        prefix: "user/",
        own: Own::Register,
    })
    .await;
}
