//! The grammar, one rule at a time, with the inputs of the hostile-input report.

use super::*;

fn service(s: &str, f: Format) -> Result<ServiceName, String> {
    ServiceName::parse(s, f)
}

fn p(s: &str) -> Prefix {
    Prefix::parse(s).unwrap()
}

#[test]
fn the_reported_service_names_are_refused_with_a_reason() {
    for f in Format::ALL {
        let e = service("../../etc/passwd", f).unwrap_err();
        assert!(e.contains("\"..\" segments"), "{f}: {e}");
        let e = service("a b\nc", f).unwrap_err();
        assert!(e.contains("whitespace or control characters"), "{f}: {e}");
        let e = service("evil/../../podlease/owners", f).unwrap_err();
        assert!(e.contains("\"..\" segments"), "{f}: {e}");
    }
}

#[test]
fn service_names_are_dns_labels_joined_by_what_the_format_allows() {
    for f in Format::ALL {
        assert!(service("user", f).is_ok());
        assert!(service("user.rpc", f).is_ok(), "{f}");
        assert!(service("a-1.b-2", f).is_ok(), "{f}");
        for bad in ["", "User", "user_1", "-user", "user-", "a..b", ".a", "a.", "a\u{0}", "a\u{7f}", "é", "a:b", "a*"] {
            assert!(service(bad, f).is_err(), "{f}: {bad:?} accepted");
        }
        assert!(service(&"a".repeat(64), f).unwrap_err().contains("DNS-1123 label"));
        let long = vec!["a".repeat(63); 4].join(".");
        assert!(service(&long, f).unwrap_err().contains("at most 253"));
    }
    for f in [Format::EtcdNaming, Format::GoZero] {
        assert!(service("svc/user", f).is_ok());
        assert!(service("a.b/c-d/e", f).is_ok());
        for bad in ["/user", "user/", "a//b", "a/./b", "./a"] {
            assert!(service(bad, f).is_err(), "{f}: {bad:?} accepted");
        }
    }
    for f in [Format::Json, Format::Kratos, Format::GoMicro, Format::Kitex, Format::Hertz, Format::Skydns] {
        let e = service("svc/user", f).unwrap_err();
        assert!(e.contains("takes no '/'"), "{f}: {e}");
    }
}

#[test]
fn prefixes_are_normalized_or_refused() {
    assert_eq!(p("/services/").as_str(), "/services");
    assert_eq!(p("kitex/registry-etcd").as_str(), "kitex/registry-etcd");
    assert_eq!(p("").as_str(), "");
    assert_eq!(p("/").as_str(), "/");
    assert_eq!(p("/a.b/_c-d/").as_str(), "/a.b/_c-d");
    for (bad, why) in [
        ("//", "empty segment"),
        ("/a//b", "empty segment"),
        ("/a/../b", "\"..\" segments"),
        ("/a/./b", "\"..\" segments"),
        ("..", "\"..\" segments"),
        ("/a b", "not ' '"),
        ("/a\nb", "not '\\n'"),
        ("/a=b", "not '='"),
    ] {
        let e = Prefix::parse(bad).unwrap_err();
        assert!(e.contains(why), "{bad:?}: {e}");
    }
    assert!(Prefix::parse(&format!("/{}", "a".repeat(256))).unwrap_err().contains("at most 256"));
}

#[test]
fn covers_is_segment_wise() {
    assert!(p("/a").covers("/a/b"));
    assert!(p("/a").covers("/a"));
    assert!(!p("/a").covers("/ab"));
    assert!(p("").covers("kitex/x"));
    assert!(!p("").covers("/x"));
    assert!(p("/").covers("/x"));
    assert!(!p("/").covers("x"));
}

#[test]
fn the_default_allowlist_is_each_formats_own_prefix_for_that_format_only() {
    let space = KeySpace::default();
    for f in Format::ALL {
        assert_eq!(space.permit(f, &p(f.layout().default_prefix())), Ok(()), "{f}");
    }
    let e = space.permit(Format::Json, &p("/config/payments")).unwrap_err();
    assert!(e.contains("not allowed for format json") && e.contains("\"/services\""), "{e}");
    let e = space.permit(Format::Json, &p("/skydns")).unwrap_err();
    assert!(e.contains("not allowed"), "json values under CoreDNS's prefix: {e}");
    let e = space.permit(Format::Json, &p("/podlease/owners/x")).unwrap_err();
    assert!(e.contains("owner prefix"), "{e}");
}

#[test]
fn allowlist_entries_name_a_format_or_none() {
    let a: AllowedPrefix = "json=/services/team-a".parse().unwrap();
    assert_eq!((a.format, a.prefix.as_str()), (Some(Format::Json), "/services/team-a"));
    let a: AllowedPrefix = "etcd-naming=".parse().unwrap();
    assert_eq!((a.format, a.prefix.as_str()), (Some(Format::EtcdNaming), ""));
    let a: AllowedPrefix = "/registry/".parse().unwrap();
    assert_eq!((a.format, a.prefix.as_str()), (None, "/registry"));
    assert_eq!(a.to_string(), "/registry");
    assert!("zk=/x".parse::<AllowedPrefix>().unwrap_err().contains("unknown format"));
    assert!("/a/../b".parse::<AllowedPrefix>().is_err());

    let space = KeySpace::new(vec!["/registry".parse().unwrap()], p("/podlease/owners")).unwrap();
    assert_eq!(space.permit(Format::Kitex, &p("/registry")), Ok(()));
    assert!(space.permit(Format::Json, &p("/services")).is_err(), "a list replaces the defaults");
}

#[test]
fn the_owner_prefix_is_absolute_and_no_allowed_prefix_lies_in_it() {
    assert!(KeySpace::new(vec![], p("podlease")).is_err());
    assert!(KeySpace::new(vec![], p("/")).is_err());
    let e = KeySpace::new(vec!["/podlease/owners/x".parse().unwrap()], p("/podlease/owners")).unwrap_err();
    assert!(e.contains("inside the owner prefix"), "{e}");
    assert!(KeySpace::new(vec!["/".parse().unwrap()], p("/podlease/owners")).is_ok(), "a prefix covering it is checked key by key");
}

#[test]
fn every_key_is_checked_last() {
    let space = KeySpace::new(vec!["/".parse().unwrap(), "".parse().unwrap(), "kitex/registry-etcd".parse().unwrap()], p("/podlease/owners")).unwrap();
    assert_eq!(space.check_key(&p("/"), "/services/user/ns/pod"), Ok(()));
    // Through a prefix that covers the owner prefix: still never inside it.
    let e = space.check_key(&p("/"), "/podlease/owners/pod").unwrap_err();
    assert!(e.contains("owner prefix"), "{e}");
    // The empty prefix does not reach into another allowed prefix.
    let e = space.check_key(&p(""), "kitex/registry-etcd/victim/1.2.3.4:80").unwrap_err();
    assert!(e.contains("another allowed prefix"), "{e}");
    assert_eq!(space.check_key(&p("kitex/registry-etcd"), "kitex/registry-etcd/user/1.2.3.4:80"), Ok(()));
    for bad in ["/a//b", "/a/../b", "/a/./b", "/a/b/", "/a b", "/a\nb", "/a\u{0}"] {
        assert!(space.check_key(&p("/"), bad).is_err(), "{bad:?} accepted");
    }
    assert!(space.check_key(&p("/services"), "/services").unwrap_err().contains("not below"));
    assert!(space.check_key(&p("/services"), "/servicesx/a").unwrap_err().contains("not below"));
    assert!(space.check_key(&p("/"), &format!("/{}", "a".repeat(MAX_KEY))).unwrap_err().contains("longer than"));
}

#[test]
fn other_parts() {
    let user = service("user", Format::Skydns).unwrap();
    assert_eq!(zone("example.org.", &user, "shop"), Ok("example.org".into()));
    assert!(zone("example..org", &user, "shop").is_err());
    assert!(zone("Example.org", &user, "shop").is_err());
    let long = format!("{}.{}", vec!["a".repeat(63); 3].join("."), "b".repeat(60));
    assert!(zone(&long, &user, "shop").unwrap_err().contains("<service>.<namespace>.<zone> is 262 characters; at most 253"));
    assert!(version("v1.2.3+build_7").is_ok());
    assert!(version("v1 2").is_err() && version(&"1".repeat(129)).is_err());
    assert!(protocol("grpc").is_ok() && protocol("h2c+tls").is_ok());
    assert!(protocol("GRPC").is_err() && protocol("1http").is_err() && protocol("").is_err());
    for ok in ["http", "grpc-web", "h2c"] {
        assert!(port_name(ok).is_ok(), "{ok}");
    }
    for bad in ["", "123", "-a", "a-", "a--b", "Http", "a_b", "abcdefghijklmnop"] {
        assert!(port_name(bad).is_err(), "{bad:?}");
    }
    for ok in ["zone", "app.kubernetes.io/name", "a_b.c-D"] {
        assert!(label_key(ok).is_ok(), "{ok}");
    }
    for bad in ["", "/a", "a/", "-a", "a/b/c", "A.b/c", "a b"] {
        assert!(label_key(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn metadata_is_bounded_in_count_and_size() {
    let m = |pairs: Vec<(String, String)>| pairs.into_iter().collect::<BTreeMap<_, _>>();
    assert!(metadata(&m(vec![("zone".into(), "a b: \"quoted\" ünïcode".into())])).is_ok());
    assert!(metadata(&m((0..65).map(|i| (format!("k{i}"), "v".into())).collect())).unwrap_err().contains("at most 64"));
    assert!(metadata(&m(vec![("k".into(), "v".repeat(4097))])).unwrap_err().contains("at most 4096"));
    assert!(metadata(&m((0..5).map(|i| (format!("k{i}"), "v".repeat(4000))).collect())).unwrap_err().contains("at most 16384"));
    assert!(metadata(&m(vec![("k".into(), "a\nb".into())])).unwrap_err().contains("control character"));
    assert!(metadata(&m(vec![("../k".into(), "v".into())])).unwrap_err().contains("not a label key"));
}

#[test]
fn messages_show_at_most_64_bytes_of_a_value() {
    let huge = "é".repeat(128 * 1024);
    let s = shown(&huge);
    assert!(s.len() < 100 && s.ends_with("(262144 bytes)"), "{s}");
    assert!(cut(&huge).len() <= 64 + "…".len());
}

/// The CRD's patterns (what the API server checks before storage) accept exactly what the
/// controller accepts: the union over formats for service names.
#[test]
fn the_crd_patterns_are_the_same_grammar() {
    use proptest::prelude::*;
    let service_re = regex::Regex::new(&pattern::service()).unwrap();
    let prefix_re = regex::Regex::new(&pattern::prefix()).unwrap();
    let zone_re = regex::Regex::new(&pattern::zone()).unwrap();
    let label_key_re = regex::Regex::new(&pattern::label_key()).unwrap();
    let user = service("user", Format::Skydns).unwrap();
    let mut runner = proptest::test_runner::TestRunner::default();
    runner
        .run(&prop_oneof!["[a-z0-9./_A-Z -]{0,80}", "(/?[a-z0-9-]{0,4}[./]{0,2}){0,8}", "([a-z0-9]{1,3}\\.){0,3}[a-z0-9]{1,3}/[A-Za-z0-9._-]{1,5}"], |s| {
            prop_assert_eq!(service_re.is_match(&s), service(&s, Format::EtcdNaming).is_ok(), "service {:?}", s);
            prop_assert_eq!(prefix_re.is_match(&s), Prefix::parse(&s).is_ok(), "prefix {:?}", s);
            prop_assert_eq!(zone_re.is_match(&s), s.is_empty() || zone(&s, &user, "ns").is_ok(), "zone {:?}", s);
            prop_assert_eq!(label_key_re.is_match(&s), label_key(&s).is_ok(), "label key {:?}", s);
            Ok(())
        })
        .unwrap();
    let version_re = regex::Regex::new(pattern::VERSION).unwrap();
    let protocol_re = regex::Regex::new(pattern::PROTOCOL).unwrap();
    runner
        .run(&"[a-zA-Z0-9+._ :-]{0,40}", |s| {
            prop_assert_eq!(version_re.is_match(&s), version(&s).is_ok(), "version {:?}", s);
            prop_assert_eq!(protocol_re.is_match(&s), s.is_empty() || protocol(&s).is_ok(), "protocol {:?}", s);
            Ok(())
        })
        .unwrap();
}
