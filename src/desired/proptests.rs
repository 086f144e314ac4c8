//! Hostile input, property-tested: arbitrary annotation maps and ServiceRegistration specs,
//! under arbitrary allowlists, through parsing, planning and key building. Whatever comes
//! in, every key that comes out lies below a prefix the admin allowed for its format and
//! outside the owner prefix, has no empty / `.` / `..` segment and no whitespace or control
//! character, and its value decodes as that format's consumer reads it; every message is
//! bounded; nothing panics.
//!
//! `PROPTEST_CASES` sets the number of cases: 256 by default (`make test`), more in
//! `make soak`.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use proptest::prelude::*;
use serde::Deserialize;
use serde_json::{Value, json};

use super::*;

/// Strings a namespace user might write: plausible names, paths, the reported attacks,
/// control characters, anything at all, and the odd huge one.
fn hostile() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[a-z0-9]{1,8}(\\.[a-z0-9]{1,8}){0,2}",
        3 => "[a-z0-9./-]{0,24}",
        2 => "/?[a-zA-Z0-9._-]{0,8}(/[a-zA-Z0-9._-]{0,8}){0,4}/?",
        2 => any::<String>(),
        1 => "[ \\t\\n\\r\\x00-\\x1f\\x7f]{0,3}[a-z/.]{0,4}[ \\t\\n\\x00]{0,2}",
        3 => prop::sample::select(vec![
            "../../etc/passwd", "a b\nc", "evil/../../podlease/owners", "/config/payments", "/podlease/owners", "/podlease",
            "/", "", "kitex/registry-etcd/victim", "kitex/registry-etcd", "podlease/owners", "owners", "..", ".", "/services",
            "/skydns", "hertz", "svc/user", "user.rpc", "grpc", "http", "v1.2.3", "corp.", "example.org",
        ])
        .prop_map(String::from),
        1 => (17_000usize..300_000).prop_map(|n| "a".repeat(n)),
    ]
}

fn format_name() -> impl Strategy<Value = String> {
    prop_oneof![4 => prop::sample::select(Format::ALL.to_vec()).prop_map(|f| f.to_string()), 1 => hostile()]
}

fn metadata() -> impl Strategy<Value = BTreeMap<String, String>> {
    prop_oneof![
        3 => prop::collection::btree_map("[a-z]{1,6}", "[ -~]{0,12}", 0..4),
        1 => prop::collection::btree_map(hostile(), hostile(), 0..4),
        // Keys from a million, not a thousand: a map of 60+ drawn from ~1,100 keys collides
        // often, and at `make soak`'s 10,000 cases the redraws exceeded proptest's limit.
        1 => prop::collection::btree_map("k[0-9]{6}", "[a-z]{0,40}", 60..70),
    ]
}

/// A pod's `podlease.io/` annotations.
fn annotation_map() -> impl Strategy<Value = BTreeMap<String, String>> {
    let key = prop::sample::select(annotations::ALL.to_vec()).prop_map(String::from);
    (
        prop::option::weighted(0.9, hostile()),
        prop::option::of(format_name()),
        prop::option::of(prop_oneof![metadata().prop_map(|m| serde_json::to_string(&m).unwrap()), hostile()]),
        prop::collection::btree_map(key, prop_oneof![hostile(), "[0-9]{1,5}".prop_map(String::from)], 0..5),
    )
        .prop_map(|(service, format, metadata, mut rest)| {
            let mut set = |k: &str, v: Option<String>| {
                if let Some(v) = v {
                    rest.insert(k.to_string(), v);
                }
            };
            set(annotations::SERVICE, service);
            set(annotations::FORMAT, format);
            set(annotations::METADATA, metadata);
            rest
        })
}

/// A ServiceRegistration spec as JSON (what the API server would store without a schema).
fn spec() -> impl Strategy<Value = Value> {
    (
        prop::option::of(hostile()),
        prop::option::of(hostile()),
        prop::option::of(prop::sample::select(Format::ALL.to_vec())),
        prop::option::of(prop_oneof![(-5i32..70_000).prop_map(Value::from), hostile().prop_map(Value::from)]),
        prop_oneof![3 => Just(30i64), 1 => -5i64..4000],
        metadata(),
        prop::collection::vec(hostile(), 0..3),
        (prop::option::of(hostile()), prop::option::of(hostile()), prop::option::of(hostile()), prop::option::of(-5i32..20), prop::option::of(0u32..5)),
    )
        .prop_map(|(service, prefix, format, port, ttl, metadata, from_labels, (version, protocol, zone, weight, dns_ttl))| {
            let mut s = json!({"selector": {"matchLabels": {"app": "x"}}, "ttlSeconds": ttl, "metadata": metadata, "metadataFromLabels": from_labels,
                "options": {"version": version, "protocol": protocol, "zone": zone, "weight": weight, "dnsTtl": dns_ttl}});
            s["service"] = json!(service);
            s["prefix"] = json!(prefix);
            if let Some(f) = format {
                s["format"] = json!(f);
            }
            if let Some(p) = port {
                s["port"] = p;
            }
            s
        })
}

/// The admin's side: default format and prefix, and an allowlist (empty: the default one).
fn defaults() -> impl Strategy<Value = Defaults> {
    let entry = prop::sample::select(vec![
        "", "/", "/services", "json=/config/payments", "etcd-naming=", "go-zero=", "kitex=kitex/registry-etcd", "/podlease", "/registry/team-a",
        "go-zero=/apps", "skydns=/skydns", "kratos=/microservices", "/micro/registry", "hertz=hertz/registry-etcd", "json=/services/team-a",
    ]);
    (
        prop::sample::select(Format::ALL.to_vec()),
        prop::option::of(prop::sample::select(vec!["/services", "/svc", "", "apps", "/"])),
        prop::collection::vec(entry, 0..5),
    )
        .prop_map(|(format, prefix, allowed)| {
            let allowed = allowed.into_iter().map(|a| a.parse().unwrap()).collect();
            Defaults::new(format, prefix.map(|p| Prefix::parse(p).unwrap()), 30, allowed, Prefix::parse("/podlease/owners").unwrap()).unwrap()
        })
}

fn pod() -> impl Strategy<Value = PodInfo> {
    (
        prop::sample::select(vec!["shop", "owners", "kitex", "podlease"]),
        prop::sample::select(vec!["p1", "p.2", "podlease", "owners", "a-b.c"]),
        annotation_map(),
        prop_oneof![Just("10.0.0.7"), Just("fd00::1")],
        any::<bool>(),
    )
        .prop_map(|(ns, name, annotations, ip, labelled)| PodInfo {
            namespace: ns.into(),
            name: name.into(),
            uid: format!("uid-{name}"),
            labels: if labelled { [("app".into(), "x".into()), ("zone".into(), "z1".into())].into_iter().collect() } else { Default::default() },
            annotations: annotations.into_iter().collect(),
            ip: Some(ip.parse().unwrap()),
            node: "n1".into(),
            phase: "Running".into(),
            ready: true,
            ready_since: None,
            gated: false,
            gate: None,
            terminating: false,
            ports: vec![(Some("http".into()), 8080), (Some("grpc".into()), 9090)],
        })
}

fn registration() -> impl Strategy<Value = (String, String, Value)> {
    (
        prop::sample::select(vec!["shop", "owners", "kitex"]),
        prop::sample::select(vec!["user", "podlease", "owners", "a.b", "Bad_Name", "x"]),
        spec(),
    )
        .prop_map(|(ns, name, spec)| (ns.to_string(), name.to_string(), spec))
}

fn addr(s: &str) -> Result<SocketAddr, String> {
    s.parse().map_err(|e| format!("address {s:?}: {e}"))
}

fn decode<'a, T: Deserialize<'a>>(v: &'a [u8]) -> Result<T, String> {
    serde_json::from_slice(v).map_err(|e| e.to_string())
}

/// The value as the format's consumer decodes it (Go's encoding/json: unknown fields
/// ignored, so only what the consumer reads is checked).
fn consumer_reads(format: Format, service: &str, value: &[u8]) -> Result<(), String> {
    #[derive(Deserialize)]
    struct JsonDoc {
        addr: String,
        namespace: String,
        pod: String,
        #[allow(dead_code)]
        node: String,
        #[allow(dead_code)]
        metadata: BTreeMap<String, String>,
    }
    #[derive(Deserialize)]
    #[allow(non_snake_case)]
    struct Naming {
        Op: u8,
        Addr: String,
        Metadata: Value,
    }
    #[derive(Deserialize)]
    struct Kratos {
        #[allow(dead_code)]
        id: String,
        name: String,
        #[allow(dead_code)]
        version: String,
        #[allow(dead_code)]
        metadata: Option<BTreeMap<String, String>>,
        endpoints: Vec<String>,
    }
    #[derive(Deserialize)]
    struct Micro {
        name: String,
        #[allow(dead_code)]
        version: String,
        metadata: Option<BTreeMap<String, String>>,
        nodes: Vec<MicroNode>,
    }
    #[derive(Deserialize)]
    struct MicroNode {
        #[allow(dead_code)]
        id: String,
        address: String,
        #[allow(dead_code)]
        metadata: BTreeMap<String, String>,
    }
    #[derive(Deserialize)]
    struct InstanceInfo {
        network: String,
        address: String,
        weight: i32,
        #[allow(dead_code)]
        tags: BTreeMap<String, String>,
    }
    #[derive(Deserialize)]
    struct Sky {
        host: IpAddr,
        #[allow(dead_code)]
        port: u16,
        ttl: u32,
    }
    match format {
        Format::Json => {
            let d: JsonDoc = decode(value)?;
            addr(&d.addr)?;
            validate::object_name(&d.namespace, false)?;
            validate::object_name(&d.pod, true)
        }
        Format::EtcdNaming => {
            let d: Naming = decode(value)?;
            if d.Op != 0 || !d.Metadata.is_null() {
                return Err("Op must be 0 and Metadata null".into());
            }
            addr(&d.Addr).map(drop)
        }
        Format::GoZero => addr(std::str::from_utf8(value).map_err(|e| e.to_string())?).map(drop),
        Format::Kratos => {
            let d: Kratos = decode(value)?;
            let [endpoint] = &d.endpoints[..] else { return Err("one endpoint".into()) };
            let (scheme, rest) = endpoint.split_once("://").ok_or("endpoint without a scheme")?;
            validate::protocol(scheme)?;
            addr(rest)?;
            (d.name == service).then_some(()).ok_or_else(|| "name".into())
        }
        Format::GoMicro => {
            let d: Micro = decode(value)?;
            if d.name != service || d.metadata.is_some() || d.nodes.len() != 1 {
                return Err("name, null metadata and one node".into());
            }
            addr(&d.nodes[0].address).map(drop)
        }
        Format::Kitex | Format::Hertz => {
            let d: InstanceInfo = decode(value)?;
            if d.network != "tcp" || d.weight < 0 {
                return Err("network tcp and a weight".into());
            }
            addr(&d.address).map(drop)
        }
        Format::Skydns => {
            let d: Sky = decode(value)?;
            let _ = d.host;
            (d.ttl >= 1).then_some(()).ok_or_else(|| "ttl".into())
        }
    }
}

/// What every key and value handed to the registry must be.
fn check(defaults: &Defaults, d: &Desired) -> Result<(), String> {
    let space = &defaults.key_space;
    for lease in [1, i64::MAX] {
        let key = d.key.with_lease(lease);
        if key.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(format!("{key:?}: control character or whitespace"));
        }
        if key.strip_prefix('/').unwrap_or(&key).split('/').any(|s| s.is_empty() || s == "." || s == "..") {
            return Err(format!("{key:?}: empty, . or .. segment"));
        }
        if space.owner().covers(&key) {
            return Err(format!("{key:?}: inside the owner prefix"));
        }
        let allowed = space.allowed().iter().any(|a| a.format.is_none_or(|f| f == d.format) && a.prefix.covers(&key) && key != a.prefix.as_str());
        if !allowed {
            return Err(format!("{key:?}: not below a prefix allowed for {}", d.format));
        }
        if key.len() > validate::MAX_KEY {
            return Err(format!("{key:?}: too long"));
        }
    }
    if d.value.len() > validate::MAX_VALUE {
        return Err(format!("value of {} bytes", d.value.len()));
    }
    consumer_reads(d.format, &d.service, &d.value).map_err(|e| format!("{:?}: {} consumer cannot read {:?}: {e}", d.key, d.format, String::from_utf8_lossy(&d.value)))
}

fn sreg_in(ns: &str, name: &str, spec: &Value) -> Option<ServiceRegistration> {
    serde_json::from_value(json!({
        "apiVersion": "podlease.io/v1alpha1", "kind": "ServiceRegistration",
        "metadata": {"name": name, "namespace": ns, "generation": 1},
        "spec": spec,
    }))
    .ok()
}

proptest! {
    #[test]
    fn annotations_never_panic_and_errors_stay_short(map in annotation_map()) {
        if let Err(e) = annotations::parse(&map.clone().into_iter().collect()) {
            prop_assert!(e.to_string().len() < 512, "{}", e);
        }
    }

    #[test]
    fn every_key_produced_is_allowed_well_formed_and_readable(
        defaults in defaults(),
        registrations in prop::collection::vec(registration(), 0..4),
        pods in prop::collection::vec(pod(), 1..4),
    ) {
        let mut idx = Index::new(defaults.clone());
        let mut problems = Vec::new();
        let apply = |c: Changes, problems: &mut Vec<PodProblem>| problems.extend(c.problems);
        for (ns, name, spec) in &registrations {
            // A spec that does not deserialize is refused by the API server itself.
            if let Some(s) = sreg_in(ns, name, spec) {
                apply(idx.apply_registration(&s), &mut problems);
            }
        }
        for p in pods {
            apply(idx.apply_pod(p), &mut problems);
        }
        for (id, d) in idx.desired() {
            let checked = check(&defaults, &d);
            prop_assert!(checked.is_ok(), "{:?}: {}", id, checked.unwrap_err());
        }
        for p in &problems {
            prop_assert!(p.message.len() < 2048, "a problem of {} bytes: {}", p.message.len(), p.message);
        }
        for key in idx.registrations().cloned().collect::<Vec<_>>() {
            let s = idx.summary(&key.0, &key.1).unwrap();
            prop_assert!(s.invalid.as_ref().is_none_or(|m| m.len() < 2048), "{:?}", s.invalid);
        }
    }
}
