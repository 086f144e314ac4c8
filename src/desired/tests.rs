//! The index in isolation: objects in, exact updates out.


use serde_json::json;

use super::*;

fn pod(name: &str, labels: &[(&str, &str)], ready: bool) -> PodInfo {
    PodInfo {
        namespace: "shop".into(),
        name: name.into(),
        uid: format!("uid-{name}"),
        labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        annotations: Default::default(),
        ip: Some("10.0.0.7".parse().unwrap()),
        node: "n1".into(),
        phase: "Running".into(),
        ready,
        ready_since: None,
        gated: false,
        gate: None,
        terminating: false,
        ports: vec![(Some("http".into()), 8080), (Some("grpc".into()), 9090)],
    }
}

fn sreg(name: &str, spec: serde_json::Value) -> ServiceRegistration {
    serde_json::from_value(json!({
        "apiVersion": "podlease.io/v1alpha1", "kind": "ServiceRegistration",
        "metadata": {"name": name, "namespace": "shop", "generation": 1},
        "spec": spec,
    }))
    .unwrap()
}

fn upserted(c: &Changes) -> Vec<(String, String)> {
    c.updates
        .iter()
        .filter_map(|u| match u {
            Update::Upsert(id, d) => Some((id.pod.clone(), d.key.with_lease(1))),
            Update::Remove(_) | Update::Transfer { .. } => None,
        })
        .collect()
}

fn removed(c: &Changes) -> Vec<String> {
    c.updates
        .iter()
        .filter_map(|u| match u {
            Update::Remove(id) => Some(id.pod.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn a_ready_selected_pod_becomes_one_instance() {
    let mut idx = Index::new(Defaults::default());
    idx.apply_registration(&sreg("user", json!({"selector": {"matchLabels": {"app": "user"}}})));
    let c = idx.apply_pod(pod("u1", &[("app", "user")], true));
    assert_eq!(upserted(&c), vec![("u1".into(), "/services/user/shop/u1".into())]);
    assert!(c.registrations.contains(&("shop".into(), "user".into())));
    let Update::Upsert(_, d) = &c.updates[0] else { panic!() };
    assert_eq!(d.address, "10.0.0.7:8080", "the first declared port by default");
    assert_eq!(d.ttl, 30);
}

#[test]
fn not_ready_and_unselected_pods_are_removed() {
    let mut idx = Index::new(Defaults::default());
    idx.apply_registration(&sreg("user", json!({"selector": {"matchLabels": {"app": "user"}}})));
    idx.apply_pod(pod("u1", &[("app", "user")], true));
    let c = idx.apply_pod(pod("u1", &[("app", "user")], false));
    assert_eq!(removed(&c), vec!["u1"]);
    let c = idx.apply_pod(pod("u1", &[("app", "user")], true));
    assert_eq!(upserted(&c).len(), 1);
    let c = idx.apply_pod(pod("u1", &[("app", "other")], true));
    assert_eq!(removed(&c), vec!["u1"]);
    assert!(c.registrations.contains(&("shop".into(), "user".into())), "the registration lost a pod");
}

#[test]
fn an_unchanged_pod_produces_nothing() {
    let mut idx = Index::new(Defaults::default());
    idx.apply_registration(&sreg("user", json!({"selector": {"matchLabels": {"app": "user"}}})));
    idx.apply_pod(pod("u1", &[("app", "user")], true));
    assert_eq!(idx.apply_pod(pod("u1", &[("app", "user")], true)), Changes::default());
}

#[test]
fn a_metadata_change_is_an_upsert_of_the_same_key() {
    let mut idx = Index::new(Defaults::default());
    idx.apply_registration(&sreg("user", json!({"selector": {"matchLabels": {"app": "user"}}, "metadata": {"v": "1"}})));
    idx.apply_pod(pod("u1", &[("app", "user")], true));
    let c = idx.apply_registration(&sreg("user", json!({"selector": {"matchLabels": {"app": "user"}}, "metadata": {"v": "2"}})));
    assert_eq!(upserted(&c), vec![("u1".into(), "/services/user/shop/u1".into())]);
    assert!(removed(&c).is_empty());
}

#[test]
fn a_deleting_registration_removes_its_instances() {
    let mut idx = Index::new(Defaults::default());
    let mut s = sreg("user", json!({"selector": {"matchLabels": {"app": "user"}}}));
    idx.apply_registration(&s);
    idx.apply_pod(pod("u1", &[("app", "user")], true));
    s.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Timestamp::now()));
    let c = idx.apply_registration(&s);
    assert_eq!(removed(&c), vec!["u1"]);
    assert!(idx.summary("shop", "user").unwrap().deleting);
}

#[test]
fn invalid_selectors_and_ports_are_reported_not_published() {
    let mut idx = Index::new(Defaults::default());
    idx.apply_pod(pod("u1", &[("app", "user")], true));
    let c = idx.apply_registration(&sreg(
        "bad",
        json!({"selector": {"matchExpressions": [{"key": "app", "operator": "Near", "values": ["x"]}]}}),
    ));
    assert!(c.updates.is_empty());
    let s = idx.summary("shop", "bad").unwrap();
    assert!(s.invalid.unwrap().contains("operator \"Near\""));

    let c = idx.apply_registration(&sreg("grpc", json!({"selector": {"matchLabels": {"app": "user"}}, "port": "metrics"})));
    assert!(c.updates.is_empty());
    let s = idx.summary("shop", "grpc").unwrap();
    assert_eq!(s.invalid.as_deref(), Some("port \"metrics\" is not declared by pod u1"));
    assert_eq!((s.matching, s.ready), (1, 1));

    let c = idx.apply_registration(&sreg("empty", json!({"selector": {}})));
    assert!(c.updates.is_empty());
    assert!(idx.summary("shop", "empty").unwrap().invalid.unwrap().contains("selector is empty"));
}

#[test]
fn a_named_port_and_metadata_from_labels_are_used() {
    let mut idx = Index::new(Defaults::default());
    idx.apply_registration(&sreg(
        "user",
        json!({"selector": {"matchLabels": {"app": "user"}}, "port": "grpc", "format": "kitex", "metadataFromLabels": ["zone"]}),
    ));
    let c = idx.apply_pod(pod("u1", &[("app", "user"), ("zone", "z1")], true));
    let Update::Upsert(_, d) = &c.updates[0] else { panic!() };
    assert_eq!(d.key.with_lease(0), "kitex/registry-etcd/user/10.0.0.7:9090");
    assert_eq!(String::from_utf8(d.value.clone()).unwrap(), r#"{"network":"tcp","address":"10.0.0.7:9090","weight":10,"tags":{"zone":"z1"}}"#);
}

#[test]
fn annotated_pods_use_the_defaults_and_report_bad_values_once() {
    let mut idx = Index::new(Defaults::new(Format::Json, Some(Prefix::parse("/svc").unwrap()), 12, vec![], Prefix::parse("/podlease/owners").unwrap()).unwrap());
    let mut p = pod("a1", &[], true);
    p.annotations.insert("podlease.io/service".into(), "cart".into());
    let c = idx.apply_pod(p.clone());
    assert_eq!(upserted(&c), vec![("a1".into(), "/svc/cart/shop/a1".into())]);
    let Update::Upsert(id, d) = &c.updates[0] else { panic!() };
    assert_eq!(id.source, Source::Annotations);
    assert_eq!(d.ttl, 12);

    p.annotations.insert("podlease.io/ttl".into(), "forever".into());
    let c = idx.apply_pod(p.clone());
    assert_eq!(removed(&c), vec!["a1"]);
    assert_eq!(c.problems.len(), 1);
    assert!(c.problems[0].message.contains("podlease.io/ttl"));
    p.labels.insert("touch".into(), "1".into());
    let c = idx.apply_pod(p);
    assert!(c.problems.is_empty(), "the same problem is reported once");
}

/// The annotated pod's counterpart of a registration's ShortTTL: a `podlease.io/ttl` that
/// does not outlive the leader failover is published all the same, and warned about once.
#[test]
fn an_annotated_ttl_below_the_failover_is_published_and_warned_about_once() {
    let failover = crate::leader::LeaderConfig::new("ns".into(), "p".into(), "a".into(), std::time::Duration::from_secs(15)).worst_failover();
    let mut defaults = Defaults::default();
    defaults.failover = Some(failover);
    let mut idx = Index::new(defaults.clone());
    let mut p = annotated("a1", &[("podlease.io/service", "cart"), ("podlease.io/ttl", "10")]);
    let c = idx.apply_pod(p.clone());
    assert_eq!(upserted(&c), vec![("a1".into(), "/services/cart/shop/a1".into())], "published all the same");
    let Update::Upsert(_, d) = &c.updates[0] else { panic!() };
    assert_eq!(d.ttl, 10);
    assert_eq!(c.problems.len(), 1, "{c:?}");
    let warning = &c.problems[0];
    assert_eq!((warning.kind, warning.pod.as_str(), warning.uid.as_str()), (ProblemKind::ShortTtl, "a1", "uid-a1"));
    assert!(warning.message.starts_with("annotation podlease.io/ttl=\"10\": a TTL of 10 s is shorter than a leader failover"), "{}", warning.message);
    assert!(warning.message.ends_with("Use at least 29 s"), "{}", warning.message);
    assert_eq!(idx.problems(), vec![warning.clone()], "a new leader reports it too");

    // Once per distinct warning, whatever else changes on the pod.
    p.labels.insert("touch".into(), "1".into());
    p.ready = false;
    let c = idx.apply_pod(p.clone());
    assert_eq!(removed(&c), vec!["a1"]);
    assert!(c.problems.is_empty(), "{c:?}");
    p.ready = true;
    assert!(idx.apply_pod(p.clone()).problems.is_empty());

    // At the boundary (29 s) nothing; back below it, warned again.
    p.annotations.insert("podlease.io/ttl".into(), "29".into());
    let c = idx.apply_pod(p.clone());
    assert!(c.problems.is_empty() && idx.problems().is_empty(), "{c:?}");
    p.annotations.insert("podlease.io/ttl".into(), "28".into());
    let c = idx.apply_pod(p.clone());
    assert_eq!(c.problems.iter().map(|w| w.kind).collect::<Vec<_>>(), vec![ProblemKind::ShortTtl]);
    assert!(c.problems[0].message.contains("podlease.io/ttl=\"28\""), "{}", c.problems[0].message);
    idx.delete_pod("shop", "a1");
    assert!(idx.problems().is_empty(), "a deleted pod's warning goes with it");

    // Not for the default TTL (--default-ttl is checked at start), nor without leader election.
    let mut short_default = defaults.clone();
    short_default.ttl = 10;
    let c = Index::new(short_default).apply_pod(annotated("a2", &[("podlease.io/service", "cart")]));
    assert!(c.problems.is_empty() && upserted(&c).len() == 1, "{c:?}");
    let c = Index::new(Defaults::default()).apply_pod(annotated("a3", &[("podlease.io/service", "cart"), ("podlease.io/ttl", "10")]));
    assert!(c.problems.is_empty() && upserted(&c).len() == 1, "{c:?}");
    // An invalid TTL stays an invalid annotation, not a warning.
    let c = Index::new(defaults).apply_pod(annotated("a4", &[("podlease.io/service", "cart"), ("podlease.io/ttl", "2")]));
    assert_eq!(c.problems.iter().map(|w| w.kind).collect::<Vec<_>>(), vec![ProblemKind::Invalid]);
}

#[test]
fn a_pod_in_two_registrations_gets_two_instances() {
    let mut idx = Index::new(Defaults::default());
    idx.apply_registration(&sreg("a", json!({"selector": {"matchLabels": {"app": "user"}}})));
    idx.apply_registration(&sreg("b", json!({"selector": {"matchLabels": {"app": "user"}}, "format": "go-zero"})));
    let c = idx.apply_pod(pod("u1", &[("app", "user")], true));
    assert_eq!(c.updates.len(), 2);
    assert_eq!(idx.desired().len(), 2);
    let c = idx.delete_pod("shop", "u1");
    assert_eq!(removed(&c).len(), 2);
    assert!(idx.desired().is_empty());
}

#[test]
fn registrations_only_select_pods_in_their_namespace() {
    let mut idx = Index::new(Defaults::default());
    idx.apply_registration(&sreg("user", json!({"selector": {"matchLabels": {"app": "user"}}})));
    let mut p = pod("u1", &[("app", "user")], true);
    p.namespace = "other".into();
    assert!(idx.apply_pod(p).updates.is_empty());
}

#[test]
fn a_service_whose_consumers_read_another_services_keys_is_reported() {
    let mut idx = Index::new(Defaults::default());
    // Kitex reads `kitex/registry-etcd/user` with no trailing slash: it would see user2's keys.
    idx.apply_registration(&sreg("user", json!({"selector": {"matchLabels": {"app": "u"}}, "format": "kitex"})));
    assert_eq!(idx.summary("shop", "user").unwrap().overlap, None);
    let c = idx.apply_registration(&sreg("user2", json!({"selector": {"matchLabels": {"app": "u2"}}, "format": "kitex"})));
    assert!(c.registrations.contains(&("shop".into(), "user".into())), "the older registration is re-examined");
    let o = idx.summary("shop", "user").unwrap().overlap.expect("overlap reported");
    assert!(o.contains("kitex/registry-etcd/user2"), "{o}");
    assert_eq!(idx.summary("shop", "user2").unwrap().overlap, None, "user2's consumers are not misled");

    // json consumers read `/services/user/` (with the slash): no overlap.
    idx.apply_registration(&sreg("j1", json!({"selector": {"matchLabels": {"a": "1"}}, "service": "cart"})));
    idx.apply_registration(&sreg("j2", json!({"selector": {"matchLabels": {"a": "1"}}, "service": "cart2"})));
    assert_eq!(idx.summary("shop", "j1").unwrap().overlap, None);

    // Removing user2 clears it.
    idx.delete_registration("shop", "user2");
    assert_eq!(idx.summary("shop", "user").unwrap().overlap, None);
}

/// Defaults whose allowlist also holds `extra` (`[FORMAT=]PREFIX` entries).
fn allowing(extra: &[&str]) -> Defaults {
    let mut allowed = crate::validate::KeySpace::default_allowlist(Format::Json, None);
    allowed.extend(extra.iter().map(|e| e.parse().unwrap()));
    Defaults::new(Format::Json, None, 30, allowed, Prefix::parse("/podlease/owners").unwrap()).unwrap()
}

#[test]
fn a_prefix_covering_the_ownership_records_is_reported() {
    let mut idx = Index::new(allowing(&["/"]));
    idx.apply_registration(&sreg("p", json!({"selector": {"matchLabels": {"a": "1"}}, "service": "podlease", "prefix": "/"})));
    let o = idx.summary("shop", "p").unwrap().overlap.expect("overlap reported");
    assert!(o.contains("ownership records"), "{o}");
}

#[test]
fn two_registrations_of_the_same_service_do_not_overlap() {
    let mut idx = Index::new(Defaults::default());
    idx.apply_registration(&sreg("a", json!({"selector": {"matchLabels": {"a": "1"}}, "service": "user", "format": "kitex"})));
    idx.apply_registration(&sreg("b", json!({"selector": {"matchLabels": {"a": "2"}}, "service": "user", "format": "kitex"})));
    assert_eq!(idx.summary("shop", "a").unwrap().overlap, None);
}

fn annotated(name: &str, annotations: &[(&str, &str)]) -> PodInfo {
    let mut p = pod(name, &[], true);
    p.annotations = annotations.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    p
}

fn invalid(idx: &Index, name: &str) -> String {
    idx.summary("shop", name).unwrap().invalid.unwrap_or_else(|| panic!("{name} is not reported invalid"))
}

#[test]
fn the_reported_hostile_annotations_are_refused_and_a_good_pod_still_published() {
    let mut idx = Index::new(Defaults::default());
    for (name, annotations, why) in [
        ("a", &[("podlease.io/service", "../../etc/passwd")][..], "annotation podlease.io/service \"../../etc/passwd\": a service name may not have \".\" or \"..\" segments"),
        ("b", &[("podlease.io/service", "a b\nc")][..], "annotation podlease.io/service \"a b\\nc\": a service name may not contain whitespace or control characters"),
        ("c", &[("podlease.io/service", "evil/../../podlease/owners")][..], "\"..\" segments"),
        ("c2", &[("podlease.io/service", "evil/podlease/owners"), ("podlease.io/format", "go-zero")][..], ""),
        ("d", &[("podlease.io/service", "x"), ("podlease.io/prefix", "/config/payments")][..], "annotation podlease.io/prefix \"/config/payments\": prefix \"/config/payments\" is not allowed for format json; the cluster admin allows \"/services\""),
    ] {
        let c = idx.apply_pod(annotated(name, annotations));
        if why.is_empty() {
            // A path service name is fine for go-zero: relative keys never reach the owner prefix.
            assert_eq!(upserted(&c)[0].1, "evil/podlease/owners/1");
            continue;
        }
        assert!(c.updates.is_empty(), "{name}: {:?}", c.updates);
        assert_eq!(c.problems.len(), 1, "{name}");
        assert!(c.problems[0].message.contains(why), "{name}: {}", c.problems[0].message);
    }
    let c = idx.apply_pod(annotated("good", &[("podlease.io/service", "cart")]));
    assert_eq!(upserted(&c), vec![("good".into(), "/services/cart/shop/good".into())]);
}

#[test]
fn the_same_inputs_in_a_registration_are_an_invalid_spec() {
    let mut idx = Index::new(Defaults::default());
    idx.apply_pod(pod("u1", &[("app", "user")], true));
    for (name, spec, why) in [
        ("a", json!({"service": "../../etc/passwd"}), "spec.service \"../../etc/passwd\""),
        ("b", json!({"service": "a b\nc"}), "whitespace"),
        ("c", json!({"service": "evil/../../podlease/owners", "format": "etcd-naming"}), "\"..\" segments"),
        ("d", json!({"prefix": "/config/payments"}), "spec.prefix \"/config/payments\": prefix \"/config/payments\" is not allowed for format json"),
        ("e", json!({"prefix": "/podlease/owners"}), "lies inside podlease's owner prefix"),
        ("f", json!({"format": "etcd-naming", "service": "kitex/registry-etcd/victim"}), "another allowed prefix"),
        ("g", json!({"metadata": {"../k": "v"}}), "spec.metadata: key \"../k\" is not a label key"),
        ("h", json!({"metadataFromLabels": ["a b"]}), "spec.metadataFromLabels"),
        ("i", json!({"options": {"version": "1\n2"}}), "spec.options.version"),
        ("j", json!({"options": {"protocol": "grpc://x"}}), "spec.options.protocol"),
        ("k", json!({"format": "skydns", "options": {"zone": "../corp"}}), "spec.options.zone"),
        ("l", json!({"port": "a/b"}), "spec.port \"a/b\""),
        ("m", json!({"options": {"weight": -1}}), "spec.options.weight -1"),
        ("n", json!({"ttlSeconds": 1}), "ttlSeconds 1"),
    ] {
        let mut spec = spec;
        spec["selector"] = json!({"matchLabels": {"app": "user"}});
        let c = idx.apply_registration(&sreg(name, spec));
        assert!(c.updates.is_empty(), "{name}: {:?}", c.updates);
        let msg = invalid(&idx, name);
        assert!(msg.contains(why), "{name}: {msg}");
    }
    assert!(idx.desired().is_empty());
}

#[test]
fn a_prefix_in_the_allowlist_is_accepted_and_one_outside_refused() {
    let mut idx = Index::new(allowing(&["json=/config/payments", "/shared"]));
    idx.apply_pod(pod("u1", &[("app", "user")], true));
    let c = idx.apply_registration(&sreg("p", json!({"selector": {"matchLabels": {"app": "user"}}, "prefix": "/config/payments/"})));
    assert_eq!(upserted(&c), vec![("u1".into(), "/config/payments/p/shop/u1".into())]);
    let c = idx.apply_registration(&sreg("k", json!({"selector": {"matchLabels": {"app": "user"}}, "prefix": "/shared", "format": "kitex"})));
    assert_eq!(upserted(&c), vec![("u1".into(), "/shared/k/10.0.0.7:8080".into())], "an entry without a format allows every format");
    let c = idx.apply_registration(&sreg("q", json!({"selector": {"matchLabels": {"app": "user"}}, "prefix": "/config/payments", "format": "kitex"})));
    assert!(c.updates.is_empty());
    assert!(invalid(&idx, "q").contains("not allowed for format kitex"));
    let c = idx.apply_pod(annotated("a1", &[("podlease.io/service", "x"), ("podlease.io/prefix", "/config")]));
    assert!(c.updates.is_empty() && c.problems[0].message.contains("not allowed"), "{c:?}");
}

#[test]
fn the_owner_prefix_is_not_writable_through_a_prefix_that_covers_it() {
    let mut idx = Index::new(allowing(&["/", "/podlease"]));
    idx.apply_pod(pod("u1", &[("app", "user")], true));
    idx.apply_registration(&sreg("a", json!({"selector": {"matchLabels": {"app": "user"}}, "prefix": "/", "service": "podlease/owners", "format": "etcd-naming"})));
    assert!(invalid(&idx, "a").contains("owner prefix"), "{}", invalid(&idx, "a"));
    idx.apply_registration(&sreg("b", json!({"selector": {"matchLabels": {"app": "user"}}, "prefix": "/podlease", "service": "owners", "format": "go-zero"})));
    assert!(invalid(&idx, "b").contains("owner prefix"), "{}", invalid(&idx, "b"));
    // json under "/podlease": /podlease/owners/<ns>/<pod> only if the service is named "owners".
    let c = idx.apply_registration(&sreg("c", json!({"selector": {"matchLabels": {"app": "user"}}, "prefix": "/podlease", "service": "owners"})));
    assert!(c.updates.is_empty());
    assert!(invalid(&idx, "c").contains("owner prefix"));
    assert!(idx.desired().is_empty());
}

#[test]
fn a_per_pod_failure_shows_in_the_registrations_summary() {
    let mut idx = Index::new(Defaults::default());
    let mut p = pod("u1", &[("app", "user")], true);
    p.name = "Not_A_Name".into();
    idx.apply_pod(p);
    idx.apply_pod(pod("u2", &[("app", "user")], true));
    let c = idx.apply_registration(&sreg("user", json!({"selector": {"matchLabels": {"app": "user"}}})));
    assert_eq!(upserted(&c), vec![("u2".into(), "/services/user/shop/u2".into())]);
    assert!(invalid(&idx, "user").contains("pod \"Not_A_Name\" is not a valid Kubernetes name"));
}

#[test]
fn a_registration_change_touches_only_the_pods_it_selects_or_selected() {
    let mut idx = Index::new(Defaults::default());
    idx.apply_registration(&sreg("a", json!({"selector": {"matchLabels": {"app": "a"}}})));
    idx.apply_pod(pod("a1", &[("app", "a")], true));
    idx.apply_pod(pod("b1", &[("app", "b")], true));
    let c = idx.apply_registration(&sreg("a", json!({"selector": {"matchLabels": {"app": "b"}}})));
    assert_eq!(upserted(&c), vec![("b1".into(), "/services/a/shop/b1".into())]);
    assert_eq!(removed(&c), vec!["a1"]);
    let c = idx.delete_registration("shop", "a");
    assert_eq!(removed(&c), vec!["b1"]);
    assert!(idx.desired().is_empty());
}

fn gated(name: &str, labels: &[(&str, &str)], ready: bool) -> PodInfo {
    PodInfo { gated: true, ..pod(name, labels, ready) }
}

#[test]
fn a_gated_pod_shows_what_each_source_that_selects_it_publishes_or_why_not() {
    let mut idx = Index::new(Defaults::default());
    idx.apply_registration(&sreg("user", json!({"selector": {"matchLabels": {"app": "user"}}})));
    // Selects the pod, but its spec is invalid (the selector itself is fine).
    idx.apply_registration(&sreg("broken", json!({"selector": {"matchLabels": {"app": "user"}}, "ttlSeconds": 1})));
    idx.apply_registration(&sreg("other", json!({"selector": {"matchLabels": {"app": "other"}}})));
    let c = idx.apply_pod(gated("u1", &[("app", "user")], true));
    assert!(c.gated.contains(&("shop".into(), "u1".into())));
    let g = idx.gated("shop", "u1").unwrap();
    assert!(g.publishable);
    assert_eq!(g.sources.len(), 2, "{g:?}");
    assert!(g.sources.contains(&(Source::Registration("user".into()), Ok(Key::Fixed("/services/user/shop/u1".into())))));
    let (_, broken) = g.sources.iter().find(|(s, _)| *s == Source::Registration("broken".into())).unwrap();
    assert!(broken.as_ref().unwrap_err().starts_with("ServiceRegistration broken: ttlSeconds 1"), "{broken:?}");
    assert_eq!(g.candidates.len(), 4, "every registration of the namespace and the annotations");
    // Not gated: no gate to decide.
    idx.apply_pod(pod("plain", &[("app", "user")], true));
    assert!(idx.gated("shop", "plain").is_none());
    assert_eq!(idx.gated_pods(), vec![("shop".to_string(), "u1".to_string())]);
}

#[test]
fn a_registration_change_marks_the_gated_pods_it_selects() {
    let mut idx = Index::new(Defaults::default());
    idx.apply_pod(gated("u1", &[("app", "user")], true));
    idx.apply_pod(pod("plain", &[("app", "user")], true));
    let c = idx.apply_registration(&sreg("user", json!({"selector": {"matchLabels": {"app": "user"}}})));
    assert_eq!(c.gated, BTreeSet::from([("shop".to_string(), "u1".to_string())]));
    let c = idx.apply_registration(&sreg("user", json!({"selector": {"matchLabels": {"app": "user"}}, "ttlSeconds": 1})));
    assert!(c.gated.contains(&("shop".into(), "u1".into())), "turning invalid changes the gate");
    assert!(idx.gated("shop", "u1").unwrap().sources[0].1.is_err());
}

#[test]
fn gate_counts_follow_pods() {
    let mut idx = Index::new(Defaults::default());
    idx.apply_pod(gated("a", &[], true));
    let mut b = gated("b", &[], true);
    b.gate = Some(crate::pod::GateCondition { status: true, reason: "Registered".into(), message: String::new(), since: None });
    idx.apply_pod(b.clone());
    idx.apply_pod(pod("plain", &[], true));
    assert_eq!(idx.gate_counts(), GateCounts { r#true: 1, r#false: 0, unset: 1 });
    b.gate.as_mut().unwrap().status = false;
    idx.apply_pod(b);
    assert_eq!(idx.gate_counts(), GateCounts { r#true: 0, r#false: 1, unset: 1 });
    idx.delete_pod("shop", "b");
    idx.delete_pod("shop", "a");
    assert_eq!(idx.gate_counts(), GateCounts::default());
}

#[test]
fn one_source_owns_a_key_the_others_are_served_and_take_it_over_when_it_goes() {
    let mut idx = Index::new(Defaults::default());
    for name in ["b", "a"] {
        idx.apply_registration(&sreg(name, json!({"selector": {"matchLabels": {"app": "user"}}, "service": "user"})));
    }
    let c = idx.apply_pod(pod("u1", &[("app", "user")], true));
    let ids: Vec<&Source> = c.updates.iter().map(|u| match u {
        Update::Upsert(id, _) => &id.source,
        other => panic!("{other:?}"),
    }).collect();
    assert_eq!(ids, [&Source::Registration("a".into())], "the first by name owns the key");
    let b = idx.summary("shop", "b").unwrap();
    assert_eq!(b.served, vec![("u1".to_string(), Source::Registration("a".into()))]);
    assert_eq!(b.ready, 1);
    // The owner goes: b takes the key over, no remove.
    let c = idx.delete_registration("shop", "a");
    let transfer = c.updates.iter().find_map(|u| match u {
        Update::Transfer { from, to, desired } => Some((from.source.clone(), to.source.clone(), desired.key.with_lease(1))),
        _ => None,
    });
    assert_eq!(transfer, Some((Source::Registration("a".into()), Source::Registration("b".into()), "/services/user/shop/u1".to_string())));
    assert!(removed(&c).is_empty() && upserted(&c).is_empty(), "{c:?}");
    assert!(idx.summary("shop", "b").unwrap().served.is_empty());
    // Annotations come first: they take the key, b is served again.
    let mut annotated = pod("u1", &[("app", "user")], true);
    annotated.annotations.insert("podlease.io/service".into(), "user".into());
    let c = idx.apply_pod(annotated);
    assert!(c.updates.iter().any(|u| matches!(u, Update::Transfer { from, to, .. } if from.source == Source::Registration("b".into()) && to.source == Source::Annotations)), "{c:?}");
}

#[test]
fn an_owner_that_changes_its_key_hands_the_old_one_over_first_then_registers_the_new_one() {
    let mut idx = Index::new(Defaults::default());
    for name in ["a", "b"] {
        idx.apply_registration(&sreg(name, json!({"selector": {"matchLabels": {"app": "user"}}, "service": "user"})));
    }
    idx.apply_pod(pod("u1", &[("app", "user")], true));
    // a (the owner) now publishes another service: b takes /services/user/ over in place, and
    // only then does a register its new key (an upsert first would replace, so delete, it).
    let c = idx.apply_registration(&sreg("a", json!({"selector": {"matchLabels": {"app": "user"}}, "service": "cart"})));
    let seen: Vec<String> = c
        .updates
        .iter()
        .map(|u| match u {
            Update::Transfer { from, to, desired } => format!("transfer {:?} -> {:?} {}", from.source, to.source, desired.key.with_lease(1)),
            Update::Upsert(id, d) => format!("upsert {:?} {}", id.source, d.key.with_lease(1)),
            Update::Remove(id) => format!("remove {:?}", id.source),
        })
        .collect();
    assert_eq!(
        seen,
        [
            r#"transfer Registration("a") -> Registration("b") /services/user/shop/u1"#.to_string(),
            r#"upsert Registration("a") /services/cart/shop/u1"#.to_string(),
        ]
    );
    assert!(idx.summary("shop", "b").unwrap().served.is_empty());
}

#[test]
fn holds_follow_registrations_and_annotated_pods_not_readiness() {
    let mut defaults = Defaults::default();
    defaults.shared.insert("open".into());
    let mut idx = Index::new(defaults);
    let hold = |read: &str, holder: Source| Hold { read: read.into(), namespace: "shop".into(), holder };
    assert!(idx.apply_registration(&sreg("user", json!({"selector": {"matchLabels": {"app": "user"}}}))).holds);
    // Shared names are not claimed; skydns names are (a zone can sit under another
    // namespace's name).
    idx.apply_registration(&sreg("open", json!({"selector": {"matchLabels": {"app": "o"}}})));
    idx.apply_registration(&sreg("dns", json!({"selector": {"matchLabels": {"app": "d"}}, "format": "skydns"})));
    assert_eq!(
        idx.holds(),
        BTreeSet::from([
            hold("/services/user/", Source::Registration("user".into())),
            hold("/skydns/local/cluster/shop/dns/", Source::Registration("dns".into()))
        ])
    );
    idx.delete_registration("shop", "dns");
    // Annotated pods hold their service while any of them exists, ready or not.
    let c = idx.apply_pod(annotated_not_ready("a1", "pay"));
    assert!(c.holds);
    assert!(!idx.apply_pod(annotated_not_ready("a2", "pay")).holds, "the same hold");
    let want = BTreeSet::from([hold("/services/user/", Source::Registration("user".into())), hold("/services/pay/", Source::Annotations)]);
    assert_eq!(idx.holds(), want);
    assert!(!idx.delete_pod("shop", "a1").holds);
    assert_eq!(idx.holds(), want);
    assert!(idx.delete_pod("shop", "a2").holds);
    // A registration being deleted lets go at once.
    let mut s = sreg("user", json!({"selector": {"matchLabels": {"app": "user"}}}));
    s.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Timestamp::now()));
    assert!(idx.apply_registration(&s).holds);
    assert!(idx.holds().is_empty());
}

fn annotated_not_ready(name: &str, service: &str) -> PodInfo {
    let mut p = annotated(name, &[("podlease.io/service", service)]);
    p.ready = false;
    p
}

#[test]
fn a_name_whose_consumers_would_read_another_allowed_prefix_is_refused() {
    let mut idx = Index::new(Defaults::default());
    // etcd-naming's prefix is empty and its consumers read without a trailing slash: `k`
    // would read every kitex key.
    for (name, service) in [("k", "k"), ("kitex", "kitex")] {
        idx.apply_registration(&sreg(name, json!({"selector": {"matchLabels": {"app": "k"}}, "format": "etcd-naming", "service": service})));
        let why = invalid(&idx, name);
        assert!(why.contains("kitex/registry-etcd"), "{why}");
    }
    idx.apply_registration(&sreg("ok", json!({"selector": {"matchLabels": {"app": "k"}}, "format": "etcd-naming", "service": "orders"})));
    assert!(idx.summary("shop", "ok").unwrap().invalid.is_none());
}

/// An annotated service whose consumers would read another service's keys is reported once,
/// not again on every change of the pod, and cleared when the other service goes.
#[test]
fn a_lasting_overlap_of_an_annotated_service_is_reported_once() {
    let mut idx = Index::new(Defaults::default());
    idx.apply_registration(&sreg("user2", json!({"selector": {"matchLabels": {"app": "u2"}}, "format": "kitex"})));
    let mut p = annotated("a1", &[("podlease.io/service", "user"), ("podlease.io/format", "kitex")]);
    let c = idx.apply_pod(p.clone());
    assert_eq!(c.problems.len(), 1, "{c:?}");
    assert!(c.problems[0].message.contains("kitex/registry-etcd/user2"), "{}", c.problems[0].message);
    for i in 0..3 {
        p.labels.insert("touch".into(), i.to_string());
        let c = idx.apply_pod(p.clone());
        assert!(c.problems.is_empty(), "reported again on change {i}: {c:?}");
    }
    assert_eq!(idx.problems().len(), 1, "a new leader reports it");
    idx.delete_registration("shop", "user2");
    p.labels.insert("touch".into(), "cleared".into());
    idx.apply_pod(p);
    assert!(idx.problems().is_empty(), "{:?}", idx.problems());
}
