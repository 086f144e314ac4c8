//! Consumer behaviour on the real test bed: for each format, read etcd exactly the way that
//! consumer does (its prefix, with or without the trailing slash; prefix Get, then Watch
//! from revision + 1; previous values for deletes where it uses them) and decode every value
//! with the consumer's own structure.

mod support;

use std::collections::{BTreeMap, BTreeSet};

use etcd_client::{EventType, GetOptions, WatchOptions};
use kube::api::{Api, Patch, PatchParams, PostParams};
use podlease::registration::ServiceRegistration;
use serde::Deserialize;
use serde_json::json;
use support::etcd::{Recorder, keys};
use support::*;

const NS: &str = "shop";

async fn setup(spec: serde_json::Value) -> (TestBed, Controller) {
    let bed = TestBed::start().await;
    bed.apply_crd().await;
    ensure_namespace(&bed.kube, NS).await;
    let c = Controller::start(&bed, "c1", &[]).await;
    let api: Api<ServiceRegistration> = Api::namespaced(bed.kube.clone(), NS);
    let obj: ServiceRegistration = serde_json::from_value(json!({
        "apiVersion": "podlease.io/v1alpha1", "kind": "ServiceRegistration",
        "metadata": {"name": "user"}, "spec": spec,
    }))
    .unwrap();
    api.create(&PostParams::default(), &obj).await.unwrap();
    for (i, ip) in ["10.0.0.1", "10.0.0.2"].iter().enumerate() {
        let name = format!("user-{i}");
        create_pod(&bed.kube, NS, &PodSpec::new(&name).label("app", "user").label("zone", "z1").ports(&[("grpc", 9090)])).await;
        set_ready(&bed.kube, NS, &name, ip, true).await;
    }
    (bed, c)
}

/// The consumer's read: Get(prefix, WithPrefix) until `n` values are there, each decoded
/// with `decode`; then a Watch from the Get's revision + 1 with previous values.
async fn read<T>(
    bed: &TestBed,
    prefix: &str,
    n: usize,
    decode: impl Fn(&[u8]) -> Result<T, String>,
) -> (BTreeMap<String, T>, etcd_client::WatchStream) {
    let kv = bed.etcd.kv_client();
    let resp = wait_until(&format!("{n} values under {prefix:?}"), DEADLINE, || {
        let mut kv = kv.clone();
        async move {
            let r = kv.get(prefix, Some(GetOptions::new().with_prefix())).await.ok()?;
            (r.kvs().len() == n).then_some(r)
        }
    })
    .await;
    let mut out = BTreeMap::new();
    for item in resp.kvs() {
        let v = decode(item.value()).unwrap_or_else(|e| panic!("{}: consumer cannot decode {:?}: {e}", item.key_str().unwrap(), item.value_str()));
        out.insert(item.key_str().unwrap().to_string(), v);
    }
    let rev = resp.header().unwrap().revision();
    let mut w = bed.etcd.watch_client();
    let stream = w.watch(prefix, Some(WatchOptions::new().with_prefix().with_start_revision(rev + 1).with_prev_key())).await.unwrap();
    (out, stream)
}

/// Takes pod user-0 out of service and returns the DELETE the consumer's watch sees, with
/// the previous value.
async fn delete_seen(bed: &TestBed, stream: &mut etcd_client::WatchStream) -> (String, Vec<u8>) {
    set_ready(&bed.kube, NS, "user-0", "10.0.0.1", false).await;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let resp = tokio::time::timeout_at(deadline, stream.message()).await.expect("a DELETE within the deadline").unwrap().unwrap();
        for ev in resp.events() {
            if ev.event_type() == EventType::Delete {
                let key = ev.kv().unwrap().key_str().unwrap().to_string();
                let prev = ev.prev_kv().expect("etcd sends the previous value when asked").value().to_vec();
                return (key, prev);
            }
        }
    }
}

fn json<T: for<'a> Deserialize<'a>>(b: &[u8]) -> Result<T, String> {
    serde_json::from_slice(b).map_err(|e| e.to_string())
}

// --- each consumer's own structures (Go's encoding/json semantics: unknown fields ignored) ---

/// go.etcd.io/etcd/client/v3/naming/endpoints/internal.Update
#[derive(Deserialize, Debug)]
#[allow(non_snake_case)]
struct NamingUpdate {
    Op: u8,
    Addr: String,
    Metadata: serde_json::Value,
}

/// go-kratos registry.ServiceInstance
#[derive(Deserialize, Debug)]
struct KratosInstance {
    id: String,
    name: String,
    #[allow(dead_code)]
    version: String,
    metadata: Option<BTreeMap<String, String>>,
    endpoints: Vec<String>,
}

/// go-micro registry.Service / registry.Node
#[derive(Deserialize, Debug)]
struct MicroService {
    name: String,
    version: String,
    metadata: Option<BTreeMap<String, String>>,
    nodes: Vec<MicroNode>,
}
#[derive(Deserialize, Debug)]
struct MicroNode {
    id: String,
    address: String,
    metadata: BTreeMap<String, String>,
}

/// kitex / hertz instanceInfo
#[derive(Deserialize, Debug)]
struct InstanceInfo {
    network: String,
    address: String,
    weight: i32,
    tags: BTreeMap<String, String>,
}

/// CoreDNS msg.Service (the fields podlease may set)
#[derive(Deserialize, Debug)]
struct SkyService {
    host: String,
    port: u16,
    ttl: u32,
}

#[tokio::test]
async fn etcd_naming_resolver_reads_addresses_and_decodes_deletes_from_the_key() {
    let (bed, _c) = setup(json!({"selector": {"matchLabels": {"app": "user"}}, "port": "grpc", "format": "etcd-naming", "service": "svc/user"})).await;
    // endpoints.NewWatchChannel: Get(target, WithPrefix) — no trailing slash.
    let (got, mut stream) = read(&bed, "svc/user", 2, json::<NamingUpdate>).await;
    let addrs: BTreeSet<&str> = got.values().map(|u| u.Addr.as_str()).collect();
    assert_eq!(addrs, BTreeSet::from(["10.0.0.1:9090", "10.0.0.2:9090"]));
    assert!(got.values().all(|u| u.Op == 0 && u.Metadata.is_null()), "Metadata must stay null: {got:?}");
    assert!(got.contains_key("svc/user/10.0.0.1:9090"));
    let (key, prev) = delete_seen(&bed, &mut stream).await;
    assert_eq!(key, "svc/user/10.0.0.1:9090");
    assert_eq!(json::<NamingUpdate>(&prev).unwrap().Addr, "10.0.0.1:9090", "the old grpc naming decodes a delete from the previous value");
}

#[tokio::test]
async fn go_zero_subscriber_reads_plain_addresses_under_lease_keys() {
    let (bed, _c) = setup(json!({"selector": {"matchLabels": {"app": "user"}}, "port": "grpc", "format": "go-zero", "service": "user.rpc"})).await;
    // discov: Get(key + "/", WithPrefix); values are the plain address.
    let (got, mut stream) = read(&bed, "user.rpc/", 2, |b| String::from_utf8(b.to_vec()).map_err(|e| e.to_string())).await;
    assert_eq!(got.values().cloned().collect::<BTreeSet<_>>(), BTreeSet::from(["10.0.0.1:9090".to_string(), "10.0.0.2:9090".to_string()]));
    for kv in keys(&bed.etcd, "user.rpc/").await {
        assert_eq!(kv.key_str().unwrap(), format!("user.rpc/{}", kv.lease()), "go-zero keys end in the decimal lease id");
    }
    let (key, prev) = delete_seen(&bed, &mut stream).await;
    assert!(key.starts_with("user.rpc/"));
    assert_eq!(prev, b"10.0.0.1:9090");
}

#[tokio::test]
async fn kratos_reads_only_valid_instances_with_scheme_endpoints() {
    let (bed, _c) = setup(json!({
        "selector": {"matchLabels": {"app": "user"}}, "port": "grpc", "format": "kratos",
        "metadataFromLabels": ["zone"], "options": {"version": "v1.2.0"},
    }))
    .await;
    // Registry.GetService: Get("/microservices/user", WithPrefix) — every value must decode,
    // one bad value fails the whole lookup.
    let (got, mut stream) = read(&bed, "/microservices/user", 2, json::<KratosInstance>).await;
    for (k, inst) in &got {
        assert_eq!(inst.name, "user");
        assert_eq!(k, &format!("/microservices/user/{}", inst.id));
        assert_eq!(inst.metadata.as_ref().unwrap()["zone"], "z1");
    }
    let endpoints: BTreeSet<&str> = got.values().flat_map(|i| i.endpoints.iter().map(String::as_str)).collect();
    assert_eq!(endpoints, BTreeSet::from(["grpc://10.0.0.1:9090", "grpc://10.0.0.2:9090"]));
    let (key, _) = delete_seen(&bed, &mut stream).await;
    assert_eq!(key, "/microservices/user/shop.user-0");
}

#[tokio::test]
async fn go_micro_decodes_a_delete_from_the_previous_value_and_finds_the_node() {
    let (bed, _c) = setup(json!({"selector": {"matchLabels": {"app": "user"}}, "port": "grpc", "format": "go-micro"})).await;
    // GetService: Get(servicePath(name) + "/", WithPrefix).
    let (got, mut stream) = read(&bed, "/micro/registry/user/", 2, json::<MicroService>).await;
    for (k, s) in &got {
        assert_eq!((s.name.as_str(), s.version.as_str()), ("user", "latest"));
        assert!(s.metadata.is_none(), "service-level metadata is null");
        assert_eq!(s.nodes.len(), 1);
        assert_eq!(k, &format!("/micro/registry/user/{}", s.nodes[0].id));
        assert_eq!(s.nodes[0].metadata["protocol"], "grpc");
    }
    // The watcher decodes a DELETE from the previous value and removes that node id.
    let (key, prev) = delete_seen(&bed, &mut stream).await;
    let s: MicroService = json(&prev).unwrap();
    assert_eq!(s.nodes[0].address, "10.0.0.1:9090");
    assert_eq!(key, format!("/micro/registry/user/{}", s.nodes[0].id));
}

#[tokio::test]
async fn kitex_and_hertz_resolvers_read_keys_without_a_leading_slash() {
    let (bed, _c) = setup(json!({"selector": {"matchLabels": {"app": "user"}}, "port": "grpc", "format": "kitex", "options": {"weight": 5}})).await;
    // Also a hertz registration of the same pods.
    let api: Api<ServiceRegistration> = Api::namespaced(bed.kube.clone(), NS);
    let obj: ServiceRegistration = serde_json::from_value(json!({
        "apiVersion": "podlease.io/v1alpha1", "kind": "ServiceRegistration",
        "metadata": {"name": "user-http"}, "spec": {"selector": {"matchLabels": {"app": "user"}}, "port": "grpc", "format": "hertz", "service": "user"},
    }))
    .unwrap();
    api.create(&PostParams::default(), &obj).await.unwrap();

    for root in ["kitex/registry-etcd", "hertz/registry-etcd"] {
        // etcdResolver.Resolve: Get("<root>/<svc>", WithPrefix) — no slash at either end.
        let (got, _) = read(&bed, &format!("{root}/user"), 2, json::<InstanceInfo>).await;
        for (k, info) in &got {
            assert!(!k.starts_with('/'), "{k}");
            assert_eq!(k, &format!("{root}/user/{}", info.address));
            assert_eq!(info.network, "tcp");
            assert_eq!(info.weight, if root.starts_with("kitex") { 5 } else { 10 });
            assert!(info.tags.is_empty());
        }
    }
}

#[tokio::test]
async fn coredns_reads_reversed_labels_and_only_valid_records() {
    let (bed, _c) = setup(json!({"selector": {"matchLabels": {"app": "user"}}, "port": "grpc", "format": "skydns", "options": {"zone": "example.org"}})).await;
    // user.shop.example.org → /skydns/org/example/shop/user/ (Etcd.get appends the slash).
    let (got, _) = read(&bed, "/skydns/org/example/shop/user/", 2, json::<SkyService>).await;
    let hosts: BTreeSet<(String, u16)> = got.values().map(|s| (s.host.clone(), s.port)).collect();
    assert_eq!(hosts, BTreeSet::from([("10.0.0.1".into(), 9090), ("10.0.0.2".into(), 9090)]));
    assert!(got.values().all(|s| s.ttl == 30), "a short DNS TTL is always set");
    assert!(got.contains_key("/skydns/org/example/shop/user/user-0"));
}

#[tokio::test]
async fn ipv6_pods_get_bracketed_addresses() {
    let (bed, _c) = setup(json!({"selector": {"matchLabels": {"app": "v6"}}, "port": "grpc", "format": "etcd-naming", "service": "v6"})).await;
    create_pod(&bed.kube, NS, &PodSpec::new("v6-0").label("app", "v6").ports(&[("grpc", 9090)])).await;
    set_ready(&bed.kube, NS, "v6-0", "fd00::7", true).await;
    let (got, _) = read(&bed, "v6", 1, json::<NamingUpdate>).await;
    assert_eq!(got["v6/[fd00::7]:9090"].Addr, "[fd00::7]:9090");
}

#[tokio::test]
async fn switching_the_format_revokes_the_old_keys_and_writes_the_new() {
    let (bed, _c) = setup(json!({"selector": {"matchLabels": {"app": "user"}}, "port": "grpc"})).await;
    read(&bed, "/services/user/", 2, json::<serde_json::Value>).await;
    let recorder = Recorder::start(&bed.etcd, "").await;
    let api: Api<ServiceRegistration> = Api::namespaced(bed.kube.clone(), NS);
    api.patch("user", &PatchParams::default(), &Patch::Merge(&json!({"spec": {"format": "kitex"}}))).await.unwrap();
    read(&bed, "kitex/registry-etcd/user", 2, json::<InstanceInfo>).await;
    wait_until("old keys gone", DEADLINE, || async { keys(&bed.etcd, "/services/").await.is_empty().then_some(()) }).await;
    let deleted: BTreeSet<String> = recorder.deletes().into_iter().map(|e| e.key).filter(|k| k.starts_with("/services/")).collect();
    assert_eq!(deleted, BTreeSet::from(["/services/user/shop/user-0".to_string(), "/services/user/shop/user-1".to_string()]));
}

#[tokio::test]
async fn a_service_reading_another_services_keys_is_reported() {
    let (bed, _c) = setup(json!({"selector": {"matchLabels": {"app": "user"}}, "port": "grpc", "format": "kitex"})).await;
    let api: Api<ServiceRegistration> = Api::namespaced(bed.kube.clone(), NS);
    let obj: ServiceRegistration = serde_json::from_value(json!({
        "apiVersion": "podlease.io/v1alpha1", "kind": "ServiceRegistration",
        "metadata": {"name": "user2"}, "spec": {"selector": {"matchLabels": {"app": "user2"}}, "format": "kitex"},
    }))
    .unwrap();
    api.create(&PostParams::default(), &obj).await.unwrap();
    let st = wait_until("PrefixOverlap on user", DEADLINE, || async {
        let st = api.get("user").await.ok()?.status?;
        st.conditions.iter().any(|c| c.type_ == "Conflict" && c.status == "True" && c.reason == "PrefixOverlap").then_some(st)
    })
    .await;
    let c = st.conditions.iter().find(|c| c.type_ == "Conflict").unwrap();
    assert!(c.message.contains("kitex/registry-etcd/user2"), "{}", c.message);
    // An Event says so too, and the keys are still published.
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(bed.kube.clone(), NS);
    wait_until("PrefixOverlap event", DEADLINE, || async {
        events.list(&Default::default()).await.ok()?.items.into_iter().find(|e| e.reason.as_deref() == Some("PrefixOverlap"))
    })
    .await;
    assert_eq!(keys(&bed.etcd, "kitex/registry-etcd/user/").await.len(), 2);
}

/// The compatibility subset on etcd 3.5 (most clusters still run it): the same tests, each in a process of its own
/// (README, "Supported versions").
mod on_etcd_3_5 {
    use super::support::{run_on, Release};

    #[test]
    fn etcd_naming_resolver_reads_addresses_and_decodes_deletes_from_the_key() {
        run_on(Release::Etcd35);
        super::etcd_naming_resolver_reads_addresses_and_decodes_deletes_from_the_key();
    }

    #[test]
    fn go_zero_subscriber_reads_plain_addresses_under_lease_keys() {
        run_on(Release::Etcd35);
        super::go_zero_subscriber_reads_plain_addresses_under_lease_keys();
    }

    #[test]
    fn kratos_reads_only_valid_instances_with_scheme_endpoints() {
        run_on(Release::Etcd35);
        super::kratos_reads_only_valid_instances_with_scheme_endpoints();
    }

    #[test]
    fn go_micro_decodes_a_delete_from_the_previous_value_and_finds_the_node() {
        run_on(Release::Etcd35);
        super::go_micro_decodes_a_delete_from_the_previous_value_and_finds_the_node();
    }
}
