//! Golden tests: one registration → the exact key and value bytes per format.

use std::collections::BTreeMap;

use super::*;

fn prefix(f: Format) -> Prefix {
    Prefix::parse(f.layout().default_prefix()).unwrap()
}

fn user(f: Format) -> ServiceName {
    ServiceName::parse("user", f).unwrap()
}

/// Through [`build`], the one way to a key.
fn golden(format: Format, ip: &str, options: FormatOptions, metadata: &[(&str, &str)]) -> (String, String) {
    let metadata: BTreeMap<String, String> = metadata.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let service = user(format);
    let inst = Instance {
        service: &service,
        namespace: "shop",
        pod: "user-7f9c",
        node: "node-a",
        ip: ip.parse().unwrap(),
        port: 8080,
        metadata: &metadata,
        options: &options,
    };
    let built = build(format, &prefix(format), &inst, &KeySpace::default()).unwrap();
    (built.key.with_lease(7587869279418537229), String::from_utf8(built.value).unwrap())
}

#[test]
fn json() {
    let (k, v) = golden(Format::Json, "10.1.2.3", FormatOptions::default(), &[("zone", "a")]);
    assert_eq!(k, "/services/user/shop/user-7f9c");
    assert_eq!(v, r#"{"addr":"10.1.2.3:8080","namespace":"shop","pod":"user-7f9c","node":"node-a","metadata":{"zone":"a"}}"#);
}

#[test]
fn etcd_naming_keeps_metadata_null() {
    let (k, v) = golden(Format::EtcdNaming, "10.1.2.3", FormatOptions::default(), &[("zone", "a")]);
    assert_eq!(k, "user/10.1.2.3:8080");
    assert_eq!(v, r#"{"Op":0,"Addr":"10.1.2.3:8080","Metadata":null}"#);
}

#[test]
fn go_zero_key_ends_in_the_decimal_lease_id() {
    let (k, v) = golden(Format::GoZero, "10.1.2.3", FormatOptions::default(), &[]);
    assert_eq!(k, "user/7587869279418537229");
    assert_eq!(v, "10.1.2.3:8080");
}

#[test]
fn kratos() {
    let (k, v) = golden(Format::Kratos, "10.1.2.3", FormatOptions::default(), &[("zone", "a")]);
    assert_eq!(k, "/microservices/user/shop.user-7f9c");
    assert_eq!(v, r#"{"id":"shop.user-7f9c","name":"user","version":"","metadata":{"zone":"a"},"endpoints":["grpc://10.1.2.3:8080"]}"#);
}

#[test]
fn kratos_http_scheme_and_version() {
    let opts = FormatOptions { protocol: Some("http".into()), version: Some("v2".into()), ..Default::default() };
    let (_, v) = golden(Format::Kratos, "10.1.2.3", opts, &[]);
    assert_eq!(v, r#"{"id":"shop.user-7f9c","name":"user","version":"v2","metadata":{},"endpoints":["http://10.1.2.3:8080"]}"#);
}

#[test]
fn go_micro_service_metadata_is_null() {
    let (k, v) = golden(Format::GoMicro, "10.1.2.3", FormatOptions::default(), &[("zone", "a")]);
    assert_eq!(k, "/micro/registry/user/user-shop.user-7f9c");
    assert_eq!(
        v,
        r#"{"name":"user","version":"latest","metadata":null,"endpoints":[],"nodes":[{"id":"user-shop.user-7f9c","address":"10.1.2.3:8080","metadata":{"protocol":"grpc","zone":"a"}}]}"#
    );
}

#[test]
fn kitex_and_hertz_have_no_leading_slash() {
    let (k, v) = golden(Format::Kitex, "10.1.2.3", FormatOptions::default(), &[("zone", "a")]);
    assert_eq!(k, "kitex/registry-etcd/user/10.1.2.3:8080");
    assert_eq!(v, r#"{"network":"tcp","address":"10.1.2.3:8080","weight":10,"tags":{"zone":"a"}}"#);
    let (k, v) = golden(Format::Hertz, "10.1.2.3", FormatOptions { weight: Some(3), ..Default::default() }, &[]);
    assert_eq!(k, "hertz/registry-etcd/user/10.1.2.3:8080");
    assert_eq!(v, r#"{"network":"tcp","address":"10.1.2.3:8080","weight":3,"tags":{}}"#);
}

#[test]
fn skydns_reverses_dns_labels() {
    let (k, v) = golden(Format::Skydns, "10.1.2.3", FormatOptions::default(), &[]);
    assert_eq!(k, "/skydns/local/cluster/shop/user/user-7f9c");
    assert_eq!(v, r#"{"host":"10.1.2.3","port":8080,"ttl":30}"#);
    let (_, v) = golden(Format::Skydns, "10.1.2.3", FormatOptions { dns_ttl: Some(5), zone: Some("corp.".into()), ..Default::default() }, &[]);
    assert_eq!(v, r#"{"host":"10.1.2.3","port":8080,"ttl":5}"#);
}

#[test]
fn ipv6_addresses_are_bracketed() {
    let (k, v) = golden(Format::EtcdNaming, "fd00::1", FormatOptions::default(), &[]);
    assert_eq!(k, "user/[fd00::1]:8080");
    assert_eq!(v, r#"{"Op":0,"Addr":"[fd00::1]:8080","Metadata":null}"#);
    let (_, v) = golden(Format::Skydns, "fd00::1", FormatOptions::default(), &[]);
    assert_eq!(v, r#"{"host":"fd00::1","port":8080,"ttl":30}"#);
    let (_, v) = golden(Format::Kratos, "fd00::1", FormatOptions::default(), &[]);
    assert!(v.contains(r#""endpoints":["grpc://[fd00::1]:8080"]"#), "{v}");
}

#[test]
fn lease_suffixed_keys_match_only_decimal_suffixes() {
    let k = Key::LeaseSuffixed("user/".into());
    assert!(k.matches("user/42"));
    assert!(!k.matches("user/"));
    assert!(!k.matches("user/42x"));
    assert!(!k.matches("user2/42"));
}

#[test]
fn format_names_round_trip() {
    for f in Format::ALL {
        assert_eq!(f.as_str().parse::<Format>().unwrap(), f);
        assert_eq!(serde_json::to_string(&f).unwrap(), format!("\"{f}\""));
    }
    assert!("zookeeper".parse::<Format>().unwrap_err().contains("expected one of"));
}

#[test]
fn join_adds_exactly_one_slash() {
    assert_eq!(join("/services", "a"), "/services/a");
    assert_eq!(join("/services/", "a"), "/services/a");
    assert_eq!(join("", "a"), "a");
    assert_eq!(join("/", "a"), "/a");
}

#[test]
fn service_prefixes_are_what_each_consumer_reads() {
    let o = FormatOptions::default();
    let read = |f: Format| f.layout().service_prefix(&prefix(f), &user(f), "shop", &o);
    assert_eq!(read(Format::Json), "/services/user/");
    assert_eq!(read(Format::EtcdNaming), "user");
    assert_eq!(read(Format::GoZero), "user/");
    assert_eq!(read(Format::Kratos), "/microservices/user");
    assert_eq!(read(Format::GoMicro), "/micro/registry/user/");
    assert_eq!(read(Format::Kitex), "kitex/registry-etcd/user");
    assert_eq!(read(Format::Hertz), "hertz/registry-etcd/user");
    assert_eq!(read(Format::Skydns), "/skydns/local/cluster/shop/user/");
}

#[test]
fn every_key_lies_under_its_service_prefix() {
    let metadata = BTreeMap::new();
    let o = FormatOptions::default();
    for f in Format::ALL {
        let service = user(f);
        let inst = Instance { service: &service, namespace: "shop", pod: "p.1", node: "n", ip: "10.0.0.1".parse().unwrap(), port: 80, metadata: &metadata, options: &o };
        let l = f.layout();
        let key = build(f, &prefix(f), &inst, &KeySpace::default()).unwrap().key.with_lease(42);
        let prefix = l.service_prefix(&prefix(f), &user(f), "shop", &o);
        assert!(key.starts_with(&prefix), "{f}: {key} not under {prefix}");
    }
}

#[test]
fn build_refuses_keys_outside_the_key_space_and_oversized_values() {
    let metadata: BTreeMap<String, String> = BTreeMap::new();
    let o = FormatOptions::default();
    let space = KeySpace::default();
    // The empty prefix (etcd-naming's) must not reach into kitex's.
    let service = ServiceName::parse("kitex/registry-etcd/victim", Format::EtcdNaming).unwrap();
    let inst = Instance { service: &service, namespace: "shop", pod: "p", node: "n", ip: "10.0.0.1".parse().unwrap(), port: 80, metadata: &metadata, options: &o };
    let e = build(Format::EtcdNaming, &prefix(Format::EtcdNaming), &inst, &space).unwrap_err();
    assert!(e.contains("another allowed prefix"), "{e}");
    // A pod name the API server would never accept is refused all the same.
    let service = user(Format::Json);
    let inst = Instance { pod: "../x", ..inst };
    let inst = Instance { service: &service, ..inst };
    assert!(build(Format::Json, &prefix(Format::Json), &inst, &space).unwrap_err().contains("pod \"../x\""));
    // Metadata past the value limit (only reachable by skipping validation) is refused.
    let big: BTreeMap<String, String> = (0..20).map(|i| (format!("k{i}"), "v".repeat(4000))).collect();
    let inst = Instance { pod: "p", metadata: &big, ..inst };
    assert!(build(Format::Json, &prefix(Format::Json), &inst, &space).unwrap_err().contains("at most 65536"));
}

#[test]
fn a_skydns_pod_label_is_at_most_63_bytes_and_stays_unique() {
    let metadata = BTreeMap::new();
    let o = FormatOptions::default();
    let key = |pod: &str| {
        let service = user(Format::Skydns);
        let inst = Instance { service: &service, namespace: "shop", pod, node: "n", ip: "10.0.0.1".parse().unwrap(), port: 80, metadata: &metadata, options: &o };
        build(Format::Skydns, &prefix(Format::Skydns), &inst, &KeySpace::default()).unwrap().key.with_lease(1)
    };
    let last = |k: String| k.rsplit('/').next().unwrap().to_string();
    assert_eq!(last(key("web-7cd698bdbb-d7gbn")), "web-7cd698bdbb-d7gbn");
    assert_eq!(last(key("a.b")), "a-b");
    let exact = "x".repeat(63);
    assert_eq!(last(key(&exact)), exact);
    // A pod name is a DNS subdomain: labels of at most 63 joined by dots, which the key's
    // one label turns into dashes.
    let long_a = format!("{}.{}-a", "x".repeat(40), "y".repeat(40));
    let long_b = format!("{}.{}-b", "x".repeat(40), "y".repeat(40));
    let (a, b) = (last(key(&long_a)), last(key(&long_b)));
    assert!(a.len() <= 63 && b.len() <= 63, "{a} {b}");
    assert_ne!(a, b, "two long pod names share a label");
    assert_eq!(a, last(key(&long_a)), "the label of a pod is stable");
}
