//! The Helm chart as users meet it: rendered and linted by real Helm, its values validated
//! by its schema, every object accepted by the real apiserver, and the controller doing its
//! whole job under the chart's ServiceAccount with exactly the chart's RBAC.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use clap::Parser;
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::{Api, DeleteParams, PostParams};
use podlease::registration::ServiceRegistration;
use serde_json::{Value, json};
use support::etcd::{keys, wait_key};
use support::helm::{apply, lint_problems, notes, render, validate};
use support::*;

const RELEASE: &str = "rel";
const NS: &str = "podlease-system";

fn value_sets() -> Vec<(&'static str, Value)> {
    vec![
        ("defaults", json!({})),
        ("tls", json!({"etcd": {"endpoints": ["https://etcd-0.etcd:2379", "https://etcd-1.etcd:2379"], "tls": {"secretName": "etcd-client-tls"}}})),
        ("tls-ca-only", json!({"etcd": {"endpoints": ["https://etcd-0.etcd:2379"], "tls": {"secretName": "etcd-ca", "clientCertificate": false}}})),
        ("auth", json!({"etcd": {"auth": {"username": "podlease", "secretName": "etcd-auth"}}})),
        ("namespaces", json!({"watchNamespaces": ["team-a", "team-b"], "clusterId": "prod-eu-1"})),
        ("monitoring", json!({"metrics": {"serviceMonitor": {"enabled": true}, "prometheusRule": {"enabled": true}, "grafanaDashboard": {"enabled": true}}, "networkPolicy": {"enabled": true, "etcdTo": [{"ipBlock": {"cidr": "10.9.0.0/24"}}]}, "priorityClassName": "", "imagePullSecrets": [{"name": "regcred"}]})),
        ("allowlist", json!({"allowedPrefixes": ["json=/services", "etcd-naming=", "/registry/team-a"], "defaults": {"prefix": "/svc/"}})),
    ]
}

fn kinds(objects: &[Value]) -> Vec<String> {
    objects.iter().map(|o| format!("{}/{}", o["kind"].as_str().unwrap(), o["metadata"]["name"].as_str().unwrap())).collect()
}

fn find<'a>(objects: &'a [Value], kind: &str) -> Vec<&'a Value> {
    objects.iter().filter(|o| o["kind"] == kind).collect()
}

fn container_args(objects: &[Value]) -> Vec<String> {
    let d = find(objects, "Deployment")[0];
    d["spec"]["template"]["spec"]["containers"][0]["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap().to_string()).collect()
}

#[test]
fn the_chart_lints_clean_for_every_value_set() {
    for (name, values) in value_sets() {
        assert_eq!(lint_problems(&values), Vec::<String>::new(), "{name}");
    }
}

#[test]
fn the_schema_rejects_bad_values() {
    assert_eq!(validate(&json!({})), Ok(()));
    for good in [
        json!({"replicaCount": 1, "leaderElection": {"enabled": false}}),
        json!({"etcd": {"auth": {"username": "podlease", "secretName": "etcd-auth"}}}),
        json!({"etcd": {"tls": {"secretName": "etcd-client-tls"}, "endpoints": ["https://a:2379", "b:2379"]}}),
        json!({"global": {"imageRegistry": "r"}}),
    ] {
        assert_eq!(validate(&good), Ok(()), "{good}");
    }
    for (bad, expect) in [
        (json!({"defaults": {"ttlSeconds": 2}}), "ttlSeconds"),
        (json!({"defaults": {"ttlSeconds": 4000}}), "ttlSeconds"),
        (json!({"etcd": {"endpoints": []}}), "endpoints"),
        (json!({"etcd": {"endpoints": [""]}}), "endpoints"),
        (json!({"defaults": {"format": "zookeeper"}}), "format"),
        (json!({"leaderElection": {"leaseDurationSeconds": 0}}), "leaseDurationSeconds"),
        (json!({"watchNamespaces": ["Team_A"]}), "watchNamespaces"),
        (json!({"log": {"format": "xml"}}), "format"),
        (json!({"allowedPrefixes": ["/a/../b"]}), "allowedPrefixes"),
        (json!({"allowedPrefixes": ["zk=/x"]}), "allowedPrefixes"),
        (json!({"allowedPrefixes": ["/a b"]}), "allowedPrefixes"),
        (json!({"defaults": {"prefix": "/config//x"}}), "prefix"),
        (json!({"ownerPrefix": "podlease/owners"}), "ownerPrefix"),
        // Two unfenced writers; the default replicaCount is 2.
        (json!({"replicaCount": 2, "leaderElection": {"enabled": false}}), "replicaCount"),
        (json!({"leaderElection": {"enabled": false}}), "replicaCount"),
        (json!({"etcd": {"auth": {"username": "podlease"}}}), "secretName"),
        (json!({"etcd": {"tls": {"secretName": "etcd-client-tls"}, "endpoints": ["https://a:2379", "http://b:2379"]}}), "endpoints"),
        // Typos are errors, not values silently ignored.
        (json!({"replicas": 3}), "replicas"),
        (json!({"etcd": {"endpoint": ["http://a:2379"]}}), "endpoint"),
        (json!({"leaderElection": {"leaseDuration": 10}}), "leaseDuration"),
    ] {
        let err = validate(&bad).expect_err(&format!("{bad} must be rejected"));
        assert!(err.contains(expect), "{bad}: {err}");
    }
}

#[test]
fn the_charts_crd_is_the_generated_crd() {
    let chart = std::fs::read_to_string(format!("{}/crds/serviceregistrations.podlease.io.yaml", support::helm::CHART)).unwrap();
    assert!(chart == podlease::registration::crd_yaml(), "charts/podlease/crds drifted: run `make crd`");
}

#[test]
fn rendered_objects_are_what_each_value_set_asks_for() {
    for (name, values) in value_sets() {
        let objects = render(&values, RELEASE, NS);
        println!("{name}: {}", kinds(&objects).join(", "));
        let args = container_args(&objects);
        let deploy = find(&objects, "Deployment")[0];
        let pod = &deploy["spec"]["template"]["spec"];
        let c = &pod["containers"][0];
        // Hardened by default, whatever the values.
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{name}");
        assert_eq!(pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault");
        assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
        assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
        assert_eq!(c["securityContext"]["capabilities"]["drop"], json!(["ALL"]));
        assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
        assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
        assert_eq!(deploy["spec"]["replicas"], 2);
        assert!(args.contains(&"--leader-elect=true".to_string()));
        assert!(args.contains(&"--lease-pool-size=16".to_string()), "{name}: {args:?}");
        // Each install its own identity: the release's namespace and name.
        assert!(args.contains(&format!("--install-id={NS}.{RELEASE}")), "{name}: {args:?}");
        // No secret ever lands in args or env.
        assert!(!serde_json::to_string(c).unwrap().to_lowercase().contains("password="), "{name}");
        match name {
            "tls" => {
                assert!(args.contains(&"--etcd-endpoints=https://etcd-0.etcd:2379,https://etcd-1.etcd:2379".to_string()));
                assert!(args.contains(&"--etcd-ca=/etc/podlease/etcd-tls/ca.crt".to_string()));
                assert!(args.contains(&"--etcd-key=/etc/podlease/etcd-tls/tls.key".to_string()));
                assert_eq!(pod["volumes"][0]["secret"]["secretName"], "etcd-client-tls");
                // Root's files, readable by podlease's user through the pod's group only.
                assert_eq!(pod["volumes"][0]["secret"]["defaultMode"], 0o440);
                assert_eq!(pod["securityContext"]["fsGroup"], 65532);
                assert_eq!(pod["securityContext"]["runAsUser"], 65532);
            }
            "tls-ca-only" => {
                assert!(args.contains(&"--etcd-ca=/etc/podlease/etcd-tls/ca.crt".to_string()));
                assert!(!args.iter().any(|a| a.starts_with("--etcd-cert") || a.starts_with("--etcd-key")), "{args:?}");
            }
            "auth" => {
                assert!(args.contains(&"--etcd-username=podlease".to_string()));
                assert_eq!(pod["volumes"][0]["secret"]["defaultMode"], 0o440);
                assert!(args.contains(&"--etcd-password-file=/etc/podlease/etcd-auth/password".to_string()));
                assert_eq!(pod["volumes"][0]["secret"]["secretName"], "etcd-auth");
            }
            "namespaces" => {
                assert!(args.contains(&"--watch-namespace=team-a".to_string()) && args.contains(&"--watch-namespace=team-b".to_string()));
                assert!(args.contains(&"--cluster-id=prod-eu-1".to_string()));
                // Cluster-wide, only the read of podlease's own CRD object.
                let cluster_roles = find(&objects, "ClusterRole");
                assert_eq!(cluster_roles.len(), 1, "{cluster_roles:?}");
                assert_eq!(
                    cluster_roles[0]["rules"],
                    json!([{"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"], "resourceNames": ["serviceregistrations.podlease.io"], "verbs": ["get"]}])
                );
                let roles: BTreeSet<&str> = find(&objects, "Role").iter().map(|r| r["metadata"]["namespace"].as_str().unwrap()).collect();
                assert_eq!(roles, BTreeSet::from(["team-a", "team-b", NS]));
            }
            "allowlist" => {
                for a in ["--allowed-prefix=json=/services", "--allowed-prefix=etcd-naming=", "--allowed-prefix=/registry/team-a", "--default-prefix=/svc/"] {
                    assert!(args.contains(&a.to_string()), "{a} not in {args:?}");
                }
                // The binary takes the rendered arguments as they are.
                let cli = podlease::cli::Cli::try_parse_from(std::iter::once("podlease".to_string()).chain(args.iter().cloned())).expect("podlease accepts the chart's args");
                let podlease::cli::Commands::Run(run) = cli.command else { panic!("not run") };
                let defaults = run.defaults().unwrap();
                let allowed: Vec<String> = defaults.key_space.allowed().iter().map(|a| a.to_string()).collect();
                assert_eq!(allowed, ["json=/services", "etcd-naming=", "/registry/team-a", "json=/svc"]);
            }
            "monitoring" => {
                assert_eq!(find(&objects, "ServiceMonitor").len(), 1);
                // The rules and the dashboard exactly as the repository's files have them.
                let rules = find(&objects, "PrometheusRule");
                assert_eq!(rules.len(), 1);
                let file: Value = serde_saphyr::from_str(&std::fs::read_to_string(format!("{}/files/alerts.yaml", support::helm::CHART)).unwrap()).unwrap();
                assert_eq!(rules[0]["spec"], file);
                let dashboard = find(&objects, "ConfigMap").into_iter().find(|c| c["metadata"]["name"].as_str().unwrap().ends_with("-dashboard")).expect("dashboard ConfigMap");
                assert_eq!(dashboard["metadata"]["labels"]["grafana_dashboard"], "1", "Grafana's sidecar looks for this label");
                let file: Value = serde_json::from_str(&std::fs::read_to_string(format!("{}/files/dashboard.json", support::helm::CHART)).unwrap()).unwrap();
                let rendered: Value = serde_json::from_str(dashboard["data"]["podlease.json"].as_str().unwrap()).unwrap();
                assert_eq!(rendered, file);
                let np = find(&objects, "NetworkPolicy");
                assert_eq!(np.len(), 1);
                // Egress: etcd's port to the named peers only, the API server's and DNS to any.
                let egress = np[0]["spec"]["egress"].as_array().unwrap();
                assert_eq!(egress[0], json!({"ports": [{"port": 2379, "protocol": "TCP"}], "to": [{"ipBlock": {"cidr": "10.9.0.0/24"}}]}));
                assert_eq!(egress[1], json!({"ports": [{"port": 443, "protocol": "TCP"}, {"port": 6443, "protocol": "TCP"}]}));
                assert_eq!(egress[2]["ports"][0]["port"], 53);
                assert_eq!(pod["imagePullSecrets"][0]["name"], "regcred");
            }
            _ => {
                assert!(find(&objects, "ServiceMonitor").is_empty() && find(&objects, "NetworkPolicy").is_empty());
                assert!(find(&objects, "PrometheusRule").is_empty() && find(&objects, "ConfigMap").is_empty());
                assert_eq!(find(&objects, "PodDisruptionBudget")[0]["apiVersion"], "policy/v1");
            }
        }
    }
    let n = notes(&json!({}));
    assert!(n.contains("podlease.io/service") && n.contains("kubectl get serviceregistrations"), "{n}");
}

#[tokio::test]
async fn every_rendered_object_is_accepted_by_the_api_server() {
    let bed = TestBed::start().await;
    // The ServiceMonitor and PrometheusRule kinds come from prometheus-operator; stand-in CRDs
    // serve them here.
    let stub: Value = json!({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "servicemonitors.monitoring.coreos.com"},
        "spec": {"group": "monitoring.coreos.com", "scope": "Namespaced",
            "names": {"kind": "ServiceMonitor", "plural": "servicemonitors", "singular": "servicemonitor"},
            "versions": [{"name": "v1", "served": true, "storage": true,
                "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}}]},
    });
    apply(&bed.kube, &stub).await;
    let mut rules = stub.clone();
    rules["metadata"]["name"] = "prometheusrules.monitoring.coreos.com".into();
    rules["spec"]["names"] = json!({"kind": "PrometheusRule", "plural": "prometheusrules", "singular": "prometheusrule"});
    apply(&bed.kube, &rules).await;
    for kind in ["ServiceMonitor", "PrometheusRule"] {
        let gvk = kube::core::GroupVersionKind::gvk("monitoring.coreos.com", "v1", kind);
        wait_until(&format!("{kind} served"), DEADLINE, || async { kube::discovery::pinned_kind(&bed.kube, &gvk).await.ok().map(|_| ()) }).await;
    }
    for ns in [NS, "team-a", "team-b"] {
        ensure_namespace(&bed.kube, ns).await;
    }
    for (name, values) in value_sets() {
        let objects = render(&values, &format!("{RELEASE}-{name}"), NS);
        for obj in &objects {
            apply(&bed.kube, obj).await;
            if obj["kind"] == "CustomResourceDefinition" {
                apply_crd(&bed.kube).await; // waits for Established before the rest
            }
        }
    }
}

/// (apiGroup, resource[/subresource], verb) granted by the rendered RBAC objects.
fn granted(objects: &[Value]) -> BTreeSet<(String, String, String)> {
    let mut out = BTreeSet::new();
    for role in objects.iter().filter(|o| o["kind"] == "ClusterRole" || o["kind"] == "Role") {
        for rule in role["rules"].as_array().unwrap() {
            for g in rule["apiGroups"].as_array().unwrap() {
                for r in rule["resources"].as_array().unwrap() {
                    for v in rule["verbs"].as_array().unwrap() {
                        out.insert((g.as_str().unwrap().into(), r.as_str().unwrap().into(), v.as_str().unwrap().into()));
                    }
                }
            }
        }
    }
    out
}

/// The chart rendered with `values` and applied to the bed as Helm would (CRDs served
/// before anything uses them); returns the objects, a kubeconfig with a token of the chart's
/// ServiceAccount (as the kubelet would mount it) and the Deployment's own arguments, but
/// for the metrics port (tests run side by side).
async fn install_rendered(bed: &TestBed, values: &Value) -> (Vec<Value>, std::path::PathBuf, Vec<String>) {
    ensure_namespace(&bed.kube, NS).await;
    let objects = render(values, RELEASE, NS);
    for obj in &objects {
        apply(&bed.kube, obj).await;
        if obj["kind"] == "CustomResourceDefinition" {
            apply_crd(&bed.kube).await;
        }
    }
    let sa = find(&objects, "ServiceAccount")[0]["metadata"]["name"].as_str().unwrap().to_string();
    let sas: Api<ServiceAccount> = Api::namespaced(bed.kube.clone(), NS);
    let req = json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {"expirationSeconds": 3600}});
    let tr: Value = sas.create_subresource("token", &sa, &PostParams::default(), &req).await.expect("TokenRequest");
    let kubeconfig = bed.kubeconfig_with_token("sa", tr["status"]["token"].as_str().unwrap());
    let args: Vec<String> = container_args(&objects).into_iter().skip(1).filter(|a| !a.starts_with("--metrics-addr")).collect();
    (objects, kubeconfig, args)
}

#[tokio::test]
async fn the_controller_does_its_whole_job_with_exactly_the_charts_rbac() {
    let bed = TestBed::start_audited().await;
    let values = json!({"etcd": {"endpoints": [bed.etcd_endpoint()]}, "leaderElection": {"leaseDurationSeconds": 4}, "verifyIntervalSeconds": 1});
    let (objects, kubeconfig, args) = install_rendered(&bed, &values).await;
    let sa = find(&objects, "ServiceAccount")[0]["metadata"]["name"].as_str().unwrap().to_string();
    let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let c = Controller::start_as(&bed, "rel-podlease-0", kubeconfig, &arg_refs).await;

    // The whole job: register, write status and finalizers, report problems, deregister.
    let regs: Api<ServiceRegistration> = Api::namespaced(bed.kube.clone(), "default");
    let sreg: ServiceRegistration = serde_json::from_value(json!({
        "apiVersion": "podlease.io/v1alpha1", "kind": "ServiceRegistration",
        "metadata": {"name": "user"}, "spec": {"selector": {"matchLabels": {"app": "user"}}},
    }))
    .unwrap();
    regs.create(&PostParams::default(), &sreg).await.unwrap();
    for i in 0..2 {
        create_pod(&bed.kube, "default", &PodSpec::new(&format!("user-{i}")).label("app", "user")).await;
        set_ready(&bed.kube, "default", &format!("user-{i}"), &pod_ip(i + 1), true).await;
    }
    // A pod with the readiness gate: its condition is patched (pods/status).
    create_pod(&bed.kube, "default", &PodSpec::new("user-gated").label("app", "user").gated()).await;
    set_containers_ready(&bed.kube, "default", "user-gated", &pod_ip(3), true).await;
    wait_key(&bed.etcd, "/services/user/default/user-0").await;
    wait_until("status written", DEADLINE, || async { (regs.get("user").await.ok()?.status?.registered == 3).then_some(()) }).await;
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(bed.kube.clone(), "default");
    wait_until("the readiness gate opened", DEADLINE, || async {
        (gate_condition(&pods.get("user-gated").await.ok()?)?.status == "True").then_some(())
    })
    .await;
    // An invalid annotation, fixed, then broken the same way again: the Event is created,
    // then updated (a series) the second time.
    create_pod(&bed.kube, "default", &PodSpec::new("bad").annotation("podlease.io/service", "x").annotation("podlease.io/ttl", "1")).await;
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(bed.kube.clone(), "default");
    let invalid = || async {
        events.list(&Default::default()).await.ok()?.items.into_iter().find(|e| e.reason.as_deref() == Some("InvalidAnnotation"))
    };
    wait_until("InvalidAnnotation event", DEADLINE, invalid).await;
    patch_annotations(&bed.kube, "default", "bad", json!({"podlease.io/ttl": "10"})).await;
    patch_annotations(&bed.kube, "default", "bad", json!({"podlease.io/ttl": "1"})).await;
    wait_until("the event became a series", DEADLINE, || async { invalid().await?.series.map(|_| ()) }).await;
    regs.delete("user", &DeleteParams::default()).await.unwrap();
    wait_until("ServiceRegistration gone (finalizer released)", DEADLINE, || async { regs.get_opt("user").await.ok()?.is_none().then_some(()) }).await;
    assert!(keys(&bed.etcd, "/services/user/").await.is_empty());
    // At least one leader Lease renewal (an update) has happened by now.
    wait_until("a Lease renewal", DEADLINE, || async {
        let user = format!("system:serviceaccount:{NS}:{sa}");
        bed.audit_events().iter().any(|e| e["user"]["username"] == user.as_str() && e["verb"] == "update" && e["objectRef"]["resource"] == "leases").then_some(())
    })
    .await;

    let log = c.log_text();
    assert!(!log.to_lowercase().contains("forbidden"), "RBAC refused something:\n{log}");

    // What the controller actually asked for, from the apiserver's audit log.
    let user = format!("system:serviceaccount:{NS}:{sa}");
    let used: BTreeSet<(String, String, String)> = bed
        .audit_events()
        .iter()
        .filter(|e| e["user"]["username"] == user.as_str() && e["objectRef"].is_object())
        .map(|e| {
            let r = &e["objectRef"];
            let mut resource = r["resource"].as_str().unwrap_or_default().to_string();
            if let Some(sub) = r["subresource"].as_str() {
                resource = format!("{resource}/{sub}");
            }
            (r["apiGroup"].as_str().unwrap_or_default().to_string(), resource, e["verb"].as_str().unwrap().to_string())
        })
        .collect();
    let granted = granted(&objects);
    println!("RBAC rules granted (group, resource, verb): {granted:?}");
    assert_eq!(used, granted, "the chart grants exactly what the controller uses");
}

/// NOTES.txt shows the key the binary writes for the configured default format and prefix.
/// Installed by Helm on a cluster, the replicas are given kube-system's UID as their cluster
/// id (the value they would read themselves, so an upgrade keeps the identity): a replica
/// that starts while the API server is down knows it and keeps the recorded leases alive.
/// Rendered offline (helm template), the chart cannot look it up: podlease reads it at start,
/// with the one `get` that needs.
#[tokio::test]
async fn installed_on_a_cluster_the_replicas_are_given_kube_system_s_uid_as_cluster_id() {
    use k8s_openapi::api::apps::v1::Deployment;
    use k8s_openapi::api::core::v1::Namespace;
    use k8s_openapi::api::rbac::v1::ClusterRole;
    let bed = TestBed::start().await;
    let uid = Api::<Namespace>::all(bed.kube.clone()).get("kube-system").await.expect("kube-system").metadata.uid.expect("its UID");
    let values = json!({"etcd": {"endpoints": [bed.etcd_endpoint()]}});
    let args_on_cluster = || async {
        let d = Api::<Deployment>::namespaced(bed.kube.clone(), NS).get(&format!("{RELEASE}-podlease")).await.expect("the Deployment");
        d.spec.unwrap().template.spec.unwrap().containers[0].args.clone().unwrap_or_default()
    };
    let cluster_id_role = || async { Api::<ClusterRole>::all(bed.kube.clone()).get_opt(&format!("{RELEASE}-podlease-cluster-id")).await.unwrap() };
    for action in ["install", "upgrade"] {
        let release = support::helm::release(action, std::path::Path::new(support::helm::CHART), RELEASE, NS, &bed.kubeconfig, &values);
        assert_eq!(release["status"], "deployed", "{action}: {release}");
        let args = args_on_cluster().await;
        assert!(args.contains(&format!("--cluster-id={uid}")), "{action}: {args:?}");
        assert!(cluster_id_role().await.is_none(), "{action}: the get on kube-system is not needed");
    }
    // An install that sets the id through extraEnv keeps it: a flag would override the
    // variable and change the install's identity.
    let mut by_env = values.clone();
    by_env["extraEnv"] = json!([{"name": "PODLEASE_CLUSTER_ID", "value": "prod-eu-1"}]);
    support::helm::release("upgrade", std::path::Path::new(support::helm::CHART), RELEASE, NS, &bed.kubeconfig, &by_env);
    let args = args_on_cluster().await;
    assert!(!args.iter().any(|a| a.starts_with("--cluster-id")), "the flag would override PODLEASE_CLUSTER_ID: {args:?}");
    let offline = render(&values, RELEASE, NS);
    assert!(!container_args(&offline).iter().any(|a| a.starts_with("--cluster-id")), "helm template cannot know the cluster id");
    let roles: Vec<&str> = find(&offline, "ClusterRole").iter().filter_map(|r| r["metadata"]["name"].as_str()).collect();
    assert!(roles.contains(&format!("{RELEASE}-podlease-cluster-id").as_str()), "{roles:?}");
}

#[test]
fn the_notes_show_the_key_of_the_default_format() {
    use podlease::format::{Format, FormatOptions, Instance};
    use podlease::validate::{Prefix, ServiceName};
    let ip: std::net::IpAddr = "10.1.2.3".parse().unwrap();
    let metadata = Default::default();
    let options = FormatOptions::default();
    for format in Format::ALL {
        for prefix in ["", "/custom/root/", "team"] {
            let n = notes(&json!({"defaults": {"format": format.to_string(), "prefix": prefix}}));
            let line = n.lines().skip_while(|l| !l.contains("gets its own etcd lease and the key")).nth(1).unwrap_or_else(|| panic!("{n}"));
            let shown = line.trim().split("   ").next().unwrap();
            assert!(line.contains(&format!("(format {format})")), "{line}");
            let service = ServiceName::parse("my-service", format).unwrap();
            let root = Prefix::parse(if prefix.is_empty() { format.layout().default_prefix() } else { prefix }).unwrap();
            let inst = Instance { service: &service, namespace: "shop", pod: "my-service-0", node: "n", ip, port: 8080, metadata: &metadata, options: &options };
            let want = format.layout().key(&root, &inst).with_lease(7587);
            let filled = shown
                .replace("<namespace>", "shop")
                .replace("<pod IP>", "10.1.2.3")
                .replace("<port>", "8080")
                .replace("<pod>", "my-service-0")
                .replace("<lease id>", "7587");
            assert_eq!(filled, want, "format {format}, prefix {prefix:?}: NOTES show {shown}");
        }
    }
}

/// `helm uninstall` with revokeOnShutdown: Helm deletes the Deployment and, right after it,
/// the RBAC, so the terminating leader can no longer release or read its Lease. It decides
/// from the fence in etcd instead: no newer term took over within the worst failover, so it
/// revokes, within the pod's 30 s grace period. (Deleting a ServiceRegistration first
/// remains the way to deregister without waiting.)
#[tokio::test]
async fn an_uninstall_with_revoke_on_shutdown_revokes_although_the_rbac_is_gone_first() {
    let bed = TestBed::start().await;
    let values = json!({"etcd": {"endpoints": [bed.etcd_endpoint()]}, "revokeOnShutdown": true});
    let (objects, kubeconfig, args) = install_rendered(&bed, &values).await;
    let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
    assert!(arg_refs.contains(&"--revoke-on-shutdown"), "{arg_refs:?}");
    // The chart's two replicas (POD_NAMESPACE as the Deployment sets it).
    let mut replicas = Vec::new();
    for name in ["rel-podlease-a", "rel-podlease-b"] {
        let mut c = Controller::new(&bed, name, kubeconfig.clone(), &arg_refs);
        c.env.push(("POD_NAMESPACE".into(), NS.into()));
        c.restart().await;
        replicas.push(c);
    }
    let leader = support::controller::wait_leader(&replicas.iter().collect::<Vec<_>>()).await;
    create_registration(&bed.kube, "default", "user", json!({"selector": {"matchLabels": {"app": "user"}}})).await;
    for i in 0..3 {
        create_pod(&bed.kube, "default", &PodSpec::new(&format!("user-{i}")).label("app", "user")).await;
        set_ready(&bed.kube, "default", &format!("user-{i}"), &pod_ip(i + 1), true).await;
        wait_key(&bed.etcd, &format!("/services/user/default/user-{i}")).await;
    }

    // The uninstall: the RBAC goes, and both replicas get SIGTERM.
    for kind in ["RoleBinding", "ClusterRoleBinding"] {
        for obj in find(&objects, kind) {
            let name = obj["metadata"]["name"].as_str().unwrap();
            let ns = obj["metadata"]["namespace"].as_str();
            let gvk = kube::api::GroupVersionKind::gvk("rbac.authorization.k8s.io", "v1", kind);
            let ar = kube::api::ApiResource::from_gvk(&gvk);
            let api: Api<kube::api::DynamicObject> = match ns {
                Some(ns) => Api::namespaced_with(bed.kube.clone(), ns, &ar),
                None => Api::all_with(bed.kube.clone(), &ar),
            };
            api.delete(name, &DeleteParams::default()).await.expect("deleting the RBAC");
        }
    }
    let start = std::time::Instant::now();
    for c in &replicas {
        c.signal(libc::SIGTERM);
    }
    let status = replicas[leader].terminate(); // asserts the exit within 30 s
    println!("measured: the leader revoked and exited {:?} after SIGTERM", start.elapsed());
    assert!(status.success());
    assert!(keys(&bed.etcd, "/services/").await.is_empty(), "the uninstall left keys behind: {}", replicas[leader].log_text());
    assert!(replicas[leader].log_text().contains("revok"), "{}", replicas[leader].log_text());
}

/// The NetworkPolicy's API server egress rule: `apiServerPorts` and `apiServerTo` render as
/// given, beside the etcd and DNS rules, which they leave alone; by default ports 443 (the
/// Service's) and 6443 (where kubeadm's and k3s' API servers listen: plugins may match egress
/// after the Service address is translated) to any address (only the values can name them).
#[test]
fn the_network_policys_api_server_egress_renders_as_its_values_say() {
    let egress = |values: Value| -> Vec<Value> {
        let objects = render(&values, RELEASE, NS);
        let np = find(&objects, "NetworkPolicy");
        assert_eq!(np.len(), 1, "{values}");
        assert_eq!(np[0]["spec"]["policyTypes"], json!(["Ingress", "Egress"]), "egress is restricted at all");
        np[0]["spec"]["egress"].as_array().unwrap().clone()
    };
    let etcd = json!({"ports": [{"port": 2379, "protocol": "TCP"}]});
    let dns = json!({"ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]});

    // Off unless enabled; on at the defaults: three rules, each to any address.
    assert!(find(&render(&json!({}), RELEASE, NS), "NetworkPolicy").is_empty());
    assert_eq!(egress(json!({"networkPolicy": {"enabled": true}})), [etcd.clone(), json!({"ports": [{"port": 443, "protocol": "TCP"}, {"port": 6443, "protocol": "TCP"}]}), dns.clone()]);

    // Peers and port as the values say, the other rules untouched.
    let peers = json!([
        {"ipBlock": {"cidr": "192.0.2.10/32"}},
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}}, "podSelector": {"matchLabels": {"component": "kube-apiserver"}}},
    ]);
    let rules = egress(json!({"networkPolicy": {"enabled": true, "apiServerPorts": [6443], "apiServerTo": peers}}));
    assert_eq!(rules, [etcd.clone(), json!({"ports": [{"port": 6443, "protocol": "TCP"}], "to": peers}), dns.clone()]);
    // etcdTo does not leak into the API server's rule.
    let rules = egress(json!({"networkPolicy": {"enabled": true, "etcdTo": [{"ipBlock": {"cidr": "10.9.0.0/24"}}]}}));
    assert_eq!(rules[1], json!({"ports": [{"port": 443, "protocol": "TCP"}, {"port": 6443, "protocol": "TCP"}]}));
    assert_eq!(lint_problems(&json!({"networkPolicy": {"enabled": true, "apiServerPorts": [6443], "apiServerTo": peers}})), Vec::<String>::new());

    // The schema refuses what could not be a port or a peer list.
    for bad in [json!({"apiServerPorts": [0]}), json!({"apiServerPorts": [65536]}), json!({"apiServerPorts": ["443"]}), json!({"apiServerPorts": []}), json!({"apiServerPorts": 443}), json!({"apiServerTo": "10.0.0.1/32"}), json!({"apiServerTo": ["10.0.0.1/32"]})] {
        let mut values = json!({"networkPolicy": {"enabled": true}});
        values["networkPolicy"].as_object_mut().unwrap().extend(bad.as_object().unwrap().clone());
        assert!(validate(&values).is_err(), "{values} must be refused");
    }
}

/// A new leader whose caches cannot lead yet keeps the recorded leases alive meanwhile.
/// At 150,000 pods the first list outlasts the 30 s TTL. Here the chart's roles lose their
/// pods rule before the new replica starts (it cannot list pods at all), at the defaults,
/// in a rollout: the leader gets SIGTERM and releases the Lease, the new replica takes it at
/// once, the old one keeps the leases alive for a Lease duration and exits, and its fence
/// goes with it. From then on only the new leader can renew the leases, and it must,
/// although it cannot adopt yet. Then the rule comes back: it leads over the same leases.
/// No consumer sees a DELETE.
#[tokio::test]
async fn a_new_leader_that_cannot_list_pods_yet_keeps_the_recorded_leases_alive() {
    use k8s_openapi::api::rbac::v1::ClusterRole;
    use support::etcd::Recorder;
    let bed = TestBed::start().await;
    let values = json!({"etcd": {"endpoints": [bed.etcd_endpoint()]}});
    let (objects, kubeconfig, args) = install_rendered(&bed, &values).await;
    let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut a = Controller::start_as(&bed, "rel-podlease-a", kubeconfig.clone(), &arg_refs).await;
    let regs: Api<ServiceRegistration> = Api::namespaced(bed.kube.clone(), "default");
    let sreg: ServiceRegistration = serde_json::from_value(json!({
        "apiVersion": "podlease.io/v1alpha1", "kind": "ServiceRegistration",
        "metadata": {"name": "slow"}, "spec": {"selector": {"matchLabels": {"app": "slow"}}},
    }))
    .unwrap();
    regs.create(&PostParams::default(), &sreg).await.unwrap();
    const N: usize = 20;
    for i in 0..N {
        create_pod(&bed.kube, "default", &PodSpec::new(&format!("slow-{i}")).label("app", "slow")).await;
        set_ready(&bed.kube, "default", &format!("slow-{i}"), &pod_ip(i + 1), true).await;
    }
    let leased = || async {
        keys(&bed.etcd, "/services/slow/").await.iter().map(|kv| (kv.key_str().unwrap().to_string(), kv.lease())).collect::<BTreeSet<_>>()
    };
    wait_until("every key", DEADLINE, || async { (leased().await.len() == N).then_some(()) }).await;
    wait_until("a leads", DEADLINE, || async { a.leads().await.then_some(()) }).await;
    let before = leased().await;

    // The chart's roles without the pods rule (pods/status stays): no list, no watch.
    let roles: Api<ClusterRole> = Api::all(bed.kube.clone());
    let mut intact = Vec::new();
    for obj in find(&objects, "ClusterRole") {
        let name = obj["metadata"]["name"].as_str().unwrap().to_string();
        let mut role = roles.get(&name).await.unwrap();
        intact.push((name.clone(), role.rules.clone()));
        for rule in role.rules.iter_mut().flatten() {
            rule.resources.iter_mut().flatten().for_each(|r| {
                if r == "pods" {
                    *r = "pods-withheld".into();
                }
            });
        }
        role.metadata.managed_fields = None;
        roles.replace(&name, &PostParams::default(), &role).await.unwrap();
    }
    let recorder = Recorder::start(&bed.etcd, "/services/").await;
    let mut b = Controller::new(&bed, "rel-podlease-b", kubeconfig.clone(), &arg_refs);
    b.spawn();
    wait_until("b is a standby", DEADLINE, || async { b.log_text().contains("leader election on").then_some(()) }).await;
    // The rollout: a releases the Lease and exits; b takes it within a retry period.
    assert!(a.terminate_within(Duration::from_secs(30)), "a exits within the kubelet's default grace");
    let exited = std::time::Instant::now();
    let deadline = exited + Duration::from_secs(20);
    for line in ["became leader"] {
        while !b.log_text().contains(line) {
            assert!(std::time::Instant::now() < deadline, "b's log has no {line:?} within 20 s of a's exit:\n{}", b.log_text());
            tokio::time::sleep(Duration::from_millis(100)).await; // polling period
        }
    }
    // Past the TTL of a's last renewals (30 s after its exit at the latest) and a renewal
    // round beyond: only b can have kept the leases.
    tokio::time::sleep(Duration::from_secs(40).saturating_sub(exited.elapsed())).await; // the fault's length: outlive the TTL
    assert!(!b.leads().await, "b cannot list pods, so it must not lead yet");
    assert_eq!(recorder.deletes().iter().map(|e| e.key.clone()).collect::<Vec<_>>(), Vec::<String>::new(), "no key may go while the new leader cannot list pods; b's log:\n{}", b.log_text());
    // b renewed them: etcd shows each lease renewed after the TTL of a's last renewals ran out.
    support::etcd::wait_renewed_after(&bed.etcd, "/services/slow/", exited + Duration::from_secs(30), DEADLINE).await;
    assert_eq!(leased().await, before, "every key under its recorded lease");

    // The rule back: b lists, leads and adopts the same leases.
    for (name, rules) in intact {
        let mut role = roles.get(&name).await.unwrap();
        role.rules = rules;
        role.metadata.managed_fields = None;
        roles.replace(&name, &PostParams::default(), &role).await.unwrap();
    }
    wait_until("b leads and has adopted", Duration::from_secs(90), || async {
        let (code, body) = support::controller::http_get(&format!("http://127.0.0.1:{}/readyz", b.metrics_port)).await?;
        (code == 200 && body.contains("leader")).then_some(())
    })
    .await;
    assert_eq!(recorder.deletes().len(), 0, "b's log:\n{}", b.log_text());
    assert_eq!(leased().await, before, "adopted under the same leases");
}

/// The compatibility subset on the oldest supported Kubernetes (1.34): the same tests, each in a process of its own
/// (README, "Supported versions").
mod on_kubernetes_1_34 {
    use super::support::{run_on, Release};

    #[test]
    fn every_rendered_object_is_accepted_by_the_api_server() {
        run_on(Release::OldestKubernetes);
        super::every_rendered_object_is_accepted_by_the_api_server();
    }

    #[test]
    fn the_controller_does_its_whole_job_with_exactly_the_charts_rbac() {
        run_on(Release::OldestKubernetes);
        super::the_controller_does_its_whole_job_with_exactly_the_charts_rbac();
    }
}
