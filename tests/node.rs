//! The real node: a one-node cluster (kubelet, containerd, scheduler, controller manager)
//! comes up, runs a Deployment whose readiness kubelet really probes, and goes away leaving
//! nothing on the host.

mod support;

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Event, Pod};
use kube::api::{Api, ListParams, PostParams};
use serde_json::json;
use support::node::*;
use support::wait_until;

fn ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn running(pod: &Pod) -> bool {
    pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
}

/// A Deployment of hostNetwork busybox pods whose exec readiness probe passes while
/// `<probe dir>/<pod name>` exists (the probe dir is a hostPath the test writes to).
fn probed_deployment(name: &str, replicas: i32, probe_dir: &std::path::Path) -> Deployment {
    serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "hostNetwork": true,
                    "terminationGracePeriodSeconds": 5,
                    "containers": [{
                        "name": "main",
                        "image": BUSYBOX_IMAGE,
                        "imagePullPolicy": "Never",
                        "command": ["/bin/sh", "-c", "trap 'exit 0' TERM; while true; do sleep 1; done"],
                        "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                        "volumeMounts": [{"name": "probe", "mountPath": "/probe"}],
                        "readinessProbe": {
                            "exec": {"command": ["/bin/sh", "-c", "test -f /probe/$POD_NAME"]},
                            "periodSeconds": 1,
                            "failureThreshold": 1,
                            "successThreshold": 1,
                            "timeoutSeconds": 1,
                        },
                    }],
                    "volumes": [{"name": "probe", "hostPath": {"path": probe_dir, "type": "Directory"}}],
                },
            },
        },
    }))
    .unwrap()
}

#[tokio::test]
async fn a_real_node_runs_a_probed_deployment_and_leaves_nothing_behind() {
    let cluster = MiniCluster::start().await;
    eprintln!(
        "apiserver ready {:?}, containerd ready {:?}, node Ready {:?} after start",
        cluster.started.apiserver_ready, cluster.started.containerd_ready, cluster.started.node_ready
    );
    let images = cluster.images();
    for want in [PAUSE_IMAGE, BUSYBOX_IMAGE] {
        assert!(images.iter().any(|i| i.ends_with(want)), "{want} not imported: {images:?}");
    }
    cluster.wait_service_account("default", "default").await;

    let pods: Api<Pod> = Api::namespaced(cluster.kube.clone(), "default");
    let deployments: Api<Deployment> = Api::namespaced(cluster.kube.clone(), "default");
    let t0 = Instant::now();
    deployments.create(&PostParams::default(), &probed_deployment("smoke", 3, &cluster.probe_dir)).await.expect("create Deployment");
    let list = ListParams::default().labels("app=smoke");

    // kubelet runs them; with no readiness file their probes fail, so none is Ready.
    let running_pods = wait_until("3 pods Running", Duration::from_secs(90), || {
        let pods = pods.clone();
        let list = list.clone();
        async move {
            let items = pods.list(&list).await.ok()?.items;
            (items.len() == 3 && items.iter().all(running)).then_some(items)
        }
    })
    .await;
    eprintln!("3 pods Running after {:?}", t0.elapsed());
    for p in &running_pods {
        let status = p.status.as_ref().unwrap();
        assert_eq!(status.pod_ip.as_deref(), Some(NODE_ADDRESS), "hostNetwork pod has the node's address");
        assert_eq!(p.spec.as_ref().unwrap().node_name.as_deref(), Some(NODE_NAME), "scheduled onto the node");
    }
    // Their probes ran and failed (kubelet's Unhealthy events), and none is Ready.
    let events: Api<Event> = Api::namespaced(cluster.kube.clone(), "default");
    for p in &running_pods {
        let name = p.metadata.name.clone().unwrap();
        wait_until(&format!("a failed readiness probe of {name}"), Duration::from_secs(30), || {
            let events = events.clone();
            let name = name.clone();
            async move {
                let list = ListParams::default().fields(&format!("involvedObject.name={name},reason=Unhealthy"));
                (!events.list(&list).await.ok()?.items.is_empty()).then_some(())
            }
        })
        .await;
    }
    let items = pods.list(&list).await.unwrap().items;
    assert!(items.iter().all(|p| !ready(p)), "Ready without its readiness file: {:?}", items.iter().map(|p| p.status.clone()).collect::<Vec<_>>());

    let names: Vec<String> = items.iter().map(|p| p.metadata.name.clone().unwrap()).collect();
    let t_files = Instant::now();
    for n in &names {
        std::fs::write(cluster.probe_dir.join(n), "").unwrap();
    }
    wait_until("Deployment available with 3 ready replicas", Duration::from_secs(60), || {
        let deployments = deployments.clone();
        async move {
            let s = deployments.get("smoke").await.ok()?.status?;
            (s.ready_replicas == Some(3) && s.available_replicas == Some(3)).then_some(())
        }
    })
    .await;
    eprintln!("Deployment Ready {:?} after the readiness files ({:?} after create)", t_files.elapsed(), t0.elapsed());

    // Toggling one pod's file flips its readiness, and only its.
    let flip = &names[0];
    for round in 0..3 {
        let t = Instant::now();
        std::fs::remove_file(cluster.probe_dir.join(flip)).unwrap();
        wait_until(&format!("{flip} not Ready"), Duration::from_secs(20), || {
            let pods = pods.clone();
            async move { (!ready(&pods.get(flip).await.ok()?)).then_some(()) }
        })
        .await;
        let down = t.elapsed();
        for other in &names[1..] {
            assert!(ready(&pods.get(other).await.unwrap()), "{other} lost readiness when {flip}'s file went");
        }
        let t = Instant::now();
        std::fs::write(cluster.probe_dir.join(flip), "").unwrap();
        wait_until(&format!("{flip} Ready"), Duration::from_secs(20), || {
            let pods = pods.clone();
            async move { ready(&pods.get(flip).await.ok()?).then_some(()) }
        })
        .await;
        eprintln!("flip {round}: not Ready after {down:?}, Ready again after {:?}", t.elapsed());
    }
    let wide = cluster.kubectl(&["get", "pods", "-o", "wide"]);
    eprintln!("{wide}");
    assert_eq!(wide.lines().filter(|l| l.contains("smoke-") && l.contains("1/1") && l.contains("Running")).count(), 3, "{wide}");

    let containers = cluster.containers();
    assert!(containers.len() >= 6, "3 pods = 3 sandboxes + 3 containers, containerd has {containers:?}");
    let t = Instant::now();
    let traces = cluster.shutdown();
    eprintln!("torn down in {:?}", t.elapsed());
    assert_nothing_left("the mini-cluster", || Leftovers::of(&traces));
}

fn container_of(pod: &Pod) -> &k8s_openapi::api::core::v1::Container {
    &pod.spec.as_ref().unwrap().containers[0]
}

/// A Deployment of pods (own network namespace, pod IP from the bridge) annotated for
/// podlease, ready while `<probe dir>/<pod name>` exists.
fn annotated_deployment(name: &str, replicas: i32, probe_dir: &std::path::Path) -> Deployment {
    let mut d = probed_deployment(name, replicas, probe_dir);
    let mut v = serde_json::to_value(&d).unwrap();
    let spec = &mut v["spec"]["template"];
    spec["metadata"]["annotations"] = json!({"podlease.io/service": name});
    spec["spec"]["hostNetwork"] = json!(false);
    spec["spec"]["containers"][0]["ports"] = json!([{"name": "http", "containerPort": 8080}]);
    d = serde_json::from_value(v).unwrap();
    d
}

/// The chart installed with real Helm onto the node, from the image scripts/image.sh makes:
/// two podlease pods run as the chart's ServiceAccount with in-cluster config (the API
/// server at the node's address: no kube-proxy here), a read-only root filesystem, kubelet
/// probing /healthz and /readyz, one of them leading; an annotated Deployment's ready pods
/// appear in the registry etcd and a pod whose probe fails leaves it.
#[tokio::test]
async fn podlease_installed_by_its_chart_publishes_the_ready_pods_of_the_node() {
    const NS: &str = "podlease-system";
    const TAG: &str = "node-test";
    let work = tempfile::Builder::new().prefix("podlease-node-test-").tempdir().unwrap();
    let tarball = work.path().join("podlease.tar");
    let image = std::process::Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/image.sh"))
        .arg(&tarball)
        .arg(format!("local/podlease:{TAG}"))
        .env("PODLEASE_BIN", env!("CARGO_BIN_EXE_podlease"))
        .output()
        .unwrap();
    assert!(image.status.success(), "scripts/image.sh: {}", String::from_utf8_lossy(&image.stderr));

    let mut cluster = MiniCluster::start().await;
    eprintln!("node Ready {:?} after start", cluster.started.node_ready);
    cluster.import_image(&tarball);
    let registry = support::EtcdServer::start(work.path(), "registry");
    let etcd_in_node = cluster.expose(format!("127.0.0.1:{}", registry.client_port).parse().unwrap());
    let etcd = etcd_client::Client::connect([registry.endpoint()], None).await.unwrap();

    let values = json!({
        "image": {"repository": "local/podlease", "tag": TAG, "pullPolicy": "Never"},
        "etcd": {"endpoints": [format!("http://{etcd_in_node}")]},
        "extraEnv": [
            {"name": "KUBERNETES_SERVICE_HOST", "value": NODE_ADDRESS},
            {"name": "KUBERNETES_SERVICE_PORT", "value": APISERVER_PORT.to_string()},
        ],
    });
    let t = Instant::now();
    let release = cluster.helm_install(std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/charts/podlease")), "podlease", NS, &values);
    assert_eq!(release["status"], "deployed", "{release}");
    let rollout = cluster.wait_deployment(NS, "podlease", 2, Duration::from_secs(120)).await;
    eprintln!("helm install → 2 podlease pods ready in {:?} (install call {:?})", t.elapsed(), t.elapsed() - rollout);

    let pods: Api<Pod> = Api::namespaced(cluster.kube.clone(), NS);
    let podlease_pods = pods.list(&ListParams::default().labels("app.kubernetes.io/name=podlease")).await.unwrap().items;
    assert_eq!(podlease_pods.len(), 2);
    let names: Vec<String> = podlease_pods.iter().map(|p| p.metadata.name.clone().unwrap()).collect();
    for p in &podlease_pods {
        let spec = p.spec.as_ref().unwrap();
        assert_eq!(spec.service_account_name.as_deref(), Some("podlease"), "the chart's ServiceAccount");
        assert_ne!(spec.host_network, Some(true), "podlease runs in its own network namespace");
        let c = container_of(p);
        assert_eq!(c.image.as_deref(), Some(format!("local/podlease:{TAG}").as_str()));
        assert_eq!(c.security_context.as_ref().and_then(|s| s.read_only_root_filesystem), Some(true));
        let probe_path = |pr: &Option<k8s_openapi::api::core::v1::Probe>| pr.as_ref().and_then(|p| p.http_get.as_ref()).and_then(|h| h.path.clone());
        assert_eq!(probe_path(&c.liveness_probe).as_deref(), Some("/healthz"));
        assert_eq!(probe_path(&c.readiness_probe).as_deref(), Some("/readyz"));
        let volumes: Vec<String> = c.volume_mounts.iter().flatten().map(|m| m.mount_path.clone()).collect();
        assert!(volumes.iter().any(|m| m == "/var/run/secrets/kubernetes.io/serviceaccount"), "the ServiceAccount token is mounted: {volumes:?}");
        let ip = p.status.as_ref().and_then(|s| s.pod_ip.clone()).unwrap_or_default();
        assert!(ip.starts_with("10.88."), "a pod address from the bridge: {ip}");
        assert!(ready(p), "{} Ready", p.metadata.name.as_deref().unwrap());
    }
    // One leads: the chart's Lease names one of the two pods.
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> = Api::namespaced(cluster.kube.clone(), NS);
    let holder = wait_until("the leader Lease held by a podlease pod", Duration::from_secs(60), || {
        let leases = leases.clone();
        let names = names.clone();
        async move {
            let h = leases.get("podlease").await.ok()?.spec?.holder_identity?;
            names.iter().any(|n| h.starts_with(n.as_str())).then_some(h)
        }
    })
    .await;
    eprintln!("leader: {holder}");

    // An annotated Deployment: its ready pods appear in etcd under the defaults' format.
    cluster.wait_service_account("default", "default").await;
    let deployments: Api<Deployment> = Api::namespaced(cluster.kube.clone(), "default");
    let apps: Api<Pod> = Api::namespaced(cluster.kube.clone(), "default");
    let t = Instant::now();
    deployments.create(&PostParams::default(), &annotated_deployment("web", 3, &cluster.probe_dir)).await.expect("create Deployment");
    let web = wait_until("3 web pods Running", Duration::from_secs(90), || {
        let apps = apps.clone();
        async move {
            let items = apps.list(&ListParams::default().labels("app=web")).await.ok()?.items;
            (items.len() == 3 && items.iter().all(running)).then_some(items)
        }
    })
    .await;
    assert!(support::etcd_dump(&etcd, "/services/web/").await.is_empty(), "published before any pod was ready");
    for p in &web {
        std::fs::write(cluster.probe_dir.join(p.metadata.name.as_deref().unwrap()), "").unwrap();
    }
    let keys = wait_until("3 keys in etcd", Duration::from_secs(60), || {
        let etcd = etcd.clone();
        async move {
            let kv = support::etcd_dump(&etcd, "/services/web/").await;
            (kv.len() == 3).then_some(kv)
        }
    })
    .await;
    eprintln!("annotated Deployment created → 3 keys in etcd in {:?}", t.elapsed());
    for p in &web {
        let name = p.metadata.name.clone().unwrap();
        let ip = apps.get(&name).await.unwrap().status.unwrap().pod_ip.unwrap();
        let value = keys.get(&format!("/services/web/default/{name}")).unwrap_or_else(|| panic!("no key for {name}: {keys:?}"));
        let v: serde_json::Value = serde_json::from_str(value).unwrap();
        assert_eq!(v["addr"], format!("{ip}:8080"), "{value}");
        assert_eq!(v["node"], NODE_NAME, "{value}");
    }

    // kubelet marks one not ready: its key goes.
    let gone = web[0].metadata.name.clone().unwrap();
    let t = Instant::now();
    std::fs::remove_file(cluster.probe_dir.join(&gone)).unwrap();
    support::etcd::wait_absent(&etcd, &format!("/services/web/default/{gone}"), Duration::from_secs(30)).await;
    eprintln!("readiness file removed → key gone in {:?}", t.elapsed());
    assert_eq!(support::etcd_dump(&etcd, "/services/web/").await.len(), 2);
    eprintln!("{}", cluster.kubectl(&["get", "pods", "-A", "-o", "wide"]));
    // With pods on the bridge, still no way out of the namespace.
    cluster.assert_sealed();

    let traces = cluster.shutdown();
    assert_nothing_left("the mini-cluster", || Leftovers::of(&traces));
}
