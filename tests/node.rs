//! The real node: a one-node cluster (kubelet, containerd, scheduler, controller manager)
//! comes up, runs a Deployment whose readiness kubelet really probes, and goes away leaving
//! nothing on the host.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Event, Pod};
use kube::api::{Api, ListParams, PostParams};
use serde_json::json;
use support::frameworks::{Client as FrameworkClient, Framework, addrs_of};
use support::node::*;
use support::{AbortOnDrop, wait_until};

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
    let _body = support::watchdog::body("a real node");
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

/// An annotated pod with a sidecar `proxy` (an init container with restartPolicy Always)
/// whose exec readiness probe passes while `<probe dir>/<name>-proxy` exists; the main
/// container's passes while `<probe dir>/<name>` does.
fn sidecar_pod(name: &str, probe_dir: &std::path::Path) -> Pod {
    let probe = |file: String| json!({"exec": {"command": ["/bin/sh", "-c", format!("test -f /probe/{file}")]}, "periodSeconds": 1, "failureThreshold": 1, "successThreshold": 1, "timeoutSeconds": 1});
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "annotations": {"podlease.io/service": name}},
        "spec": {
            "terminationGracePeriodSeconds": 5,
            "initContainers": [{
                "name": "proxy", "image": BUSYBOX_IMAGE, "imagePullPolicy": "Never", "restartPolicy": "Always",
                "command": ["/bin/sh", "-c", "trap 'exit 0' TERM; while true; do sleep 1; done"],
                "volumeMounts": [{"name": "probe", "mountPath": "/probe"}],
                "readinessProbe": probe(format!("{name}-proxy")),
            }],
            "containers": [{
                "name": "main", "image": BUSYBOX_IMAGE, "imagePullPolicy": "Never",
                "command": ["/bin/sh", "-c", "trap 'exit 0' TERM; while true; do sleep 1; done"],
                "ports": [{"name": "http", "containerPort": 8080}],
                "volumeMounts": [{"name": "probe", "mountPath": "/probe"}],
                "readinessProbe": probe(name.to_string()),
            }],
            "volumes": [{"name": "probe", "hostPath": {"path": probe_dir, "type": "Directory"}}],
        },
    }))
    .unwrap()
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

const PODLEASE_NS: &str = "podlease-system";

/// podlease installed by its chart on a fresh node, against a registry etcd on the host.
struct Installed {
    cluster: MiniCluster,
    registry: support::EtcdServer,
    etcd: etcd_client::Client,
    /// The values it was installed with.
    values: serde_json::Value,
    /// The two podlease pods and the leader Lease's holder.
    pods: Vec<String>,
    holder: String,
    work: tempfile::TempDir,
    /// The registry etcd's address inside the cluster's network namespace.
    etcd_in_node: std::net::SocketAddr,
}

/// The leader Lease's holder once it names one of `among` (a podlease pod); on timeout the
/// panic shows the Lease and the podlease pods' logs.
async fn leader_among(cluster: &MiniCluster, among: &[String], within: Duration) -> String {
    leader_where(cluster, &format!("one of {among:?}"), within, |h| among.iter().any(|n| h.starts_with(n.as_str()))).await
}

/// The leader Lease's holder once `pred` accepts it; on timeout the panic shows the Lease and
/// the podlease pods' logs.
async fn leader_where(cluster: &MiniCluster, what: &str, within: Duration, pred: impl Fn(&str) -> bool) -> String {
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> = Api::namespaced(cluster.kube.clone(), PODLEASE_NS);
    let start = Instant::now();
    loop {
        let h = leases.get("podlease").await.ok().and_then(|l| l.spec?.holder_identity).unwrap_or_default();
        if !h.is_empty() && pred(&h) {
            return h;
        }
        if start.elapsed() > within {
            let lease = cluster.kubectl(&["-n", PODLEASE_NS, "get", "lease", "podlease", "-o", "yaml"]);
            let mut logs = String::new();
            for p in podlease_pods(cluster).await {
                let name = p.metadata.name.unwrap_or_default();
                let out = std::process::Command::new(&support::Binaries::locate().kubectl)
                    .arg("--kubeconfig")
                    .arg(&cluster.kubeconfig)
                    .args(["-n", PODLEASE_NS, "logs", "--tail=40", &name])
                    .output()
                    .unwrap();
                logs += &format!("--- {name}:\n{}{}\n", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            }
            panic!("the leader Lease not held by {what} within {within:?} (holder {h:?}):\n{lease}\n{logs}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn podlease_pods(cluster: &MiniCluster) -> Vec<Pod> {
    let pods: Api<Pod> = Api::namespaced(cluster.kube.clone(), PODLEASE_NS);
    pods.list(&ListParams::default().labels("app.kubernetes.io/name=podlease")).await.unwrap().items
}

/// The chart installed with real Helm onto the node, from the image scripts/image.sh makes
/// (tag `tag`): two podlease pods run as the chart's ServiceAccount with in-cluster config,
/// a read-only root filesystem, kubelet probing /healthz and /readyz, one of them leading.
async fn install_podlease(tag: &str) -> Installed {
    let work = tempfile::Builder::new().prefix("podlease-node-test-").tempdir().unwrap();
    let tarball = podlease_image(work.path(), std::path::Path::new(env!("CARGO_BIN_EXE_podlease")), tag);
    let mut cluster = MiniCluster::start().await;
    eprintln!("node Ready {:?} after start", cluster.started.node_ready);
    cluster.import_image(&tarball);
    let registry = support::EtcdServer::start(work.path(), "registry");
    let etcd_in_node = cluster.expose(format!("127.0.0.1:{}", registry.client_port).parse().unwrap());
    let etcd = etcd_client::Client::connect([registry.endpoint()], None).await.unwrap();

    let values = podlease_values(tag, &[format!("http://{etcd_in_node}")]);
    let t = Instant::now();
    let release = cluster.helm_install(&podlease_chart(), "podlease", PODLEASE_NS, &values);
    assert_eq!(release["status"], "deployed", "{release}");
    let rollout = cluster.wait_deployment(PODLEASE_NS, "podlease", 2, Duration::from_secs(120)).await;
    eprintln!("helm install → 2 podlease pods ready in {:?} (install call {:?})", t.elapsed(), t.elapsed() - rollout);

    let podlease_pods = podlease_pods(&cluster).await;
    assert_eq!(podlease_pods.len(), 2);
    let names: Vec<String> = podlease_pods.iter().map(|p| p.metadata.name.clone().unwrap()).collect();
    for p in &podlease_pods {
        let spec = p.spec.as_ref().unwrap();
        assert_eq!(spec.service_account_name.as_deref(), Some("podlease"), "the chart's ServiceAccount");
        assert_ne!(spec.host_network, Some(true), "podlease runs in its own network namespace");
        let c = container_of(p);
        assert_eq!(c.image.as_deref(), Some(format!("local/podlease:{tag}").as_str()));
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
    let holder = leader_among(&cluster, &names, Duration::from_secs(60)).await;
    eprintln!("leader: {holder}");
    Installed { cluster, registry, etcd, values, pods: names, holder, work, etcd_in_node }
}

/// The chart installed with real Helm onto the node (`install_podlease`); an annotated
/// Deployment's ready pods appear in the registry etcd and a pod whose probe fails leaves it.
#[tokio::test]
async fn podlease_installed_by_its_chart_publishes_the_ready_pods_of_the_node() {
    let _body = support::watchdog::body("installed by its chart");
    let Installed { cluster, registry: _registry, etcd, work: _work, .. } = install_podlease("node-test").await;

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

    // A sidecar (an init container with restartPolicy Always, GA since 1.33) whose readiness
    // probe fails keeps its pod unpublished although the main container is ready; once the
    // sidecar turns ready, kubelet marks the pod Ready and the key appears.
    let t = Instant::now();
    apps.create(&PostParams::default(), &sidecar_pod("side", &cluster.probe_dir)).await.expect("create the sidecar pod");
    std::fs::write(cluster.probe_dir.join("side"), "").unwrap();
    wait_until("the sidecar pod Running with its main container ready and its sidecar not", Duration::from_secs(90), || {
        let apps = apps.clone();
        async move {
            let p = apps.get("side").await.ok()?;
            let s = p.status.as_ref()?;
            let main_ready = s.container_statuses.iter().flatten().any(|c| c.name == "main" && c.ready);
            let sidecar = s.init_container_statuses.iter().flatten().find(|c| c.name == "proxy")?;
            let sidecar_running = sidecar.state.as_ref().is_some_and(|st| st.running.is_some());
            (running(&p) && main_ready && sidecar_running && !sidecar.ready && !ready(&p)).then_some(())
        }
    })
    .await;
    // The sidecar's probe has failed (kubelet's Unhealthy Event) and the pod was never Ready:
    // podlease must not have published it.
    let events: Api<Event> = Api::namespaced(cluster.kube.clone(), "default");
    wait_until("a failed readiness probe of the sidecar", Duration::from_secs(30), || {
        let events = events.clone();
        async move {
            let list = ListParams::default().fields("involvedObject.name=side,reason=Unhealthy");
            (!events.list(&list).await.ok()?.items.is_empty()).then_some(())
        }
    })
    .await;
    assert!(support::etcd_dump(&etcd, "/services/side/").await.is_empty(), "a pod whose sidecar is not ready was published");
    let t_sidecar = Instant::now();
    std::fs::write(cluster.probe_dir.join("side-proxy"), "").unwrap();
    let kv = support::etcd::wait_key_within(&etcd, "/services/side/default/side", Duration::from_secs(30)).await;
    let ip = apps.get("side").await.unwrap().status.unwrap().pod_ip.unwrap();
    let v: serde_json::Value = serde_json::from_slice(kv.value()).unwrap();
    assert_eq!(v["addr"], format!("{ip}:8080"));
    eprintln!("sidecar: unpublished while its probe failed ({:?}); sidecar ready → key in {:?}", t_sidecar - t, t_sidecar.elapsed());

    eprintln!("{}", cluster.kubectl(&["get", "pods", "-A", "-o", "wide"]));
    // With pods on the bridge, still no way out of the namespace.
    cluster.assert_sealed();

    let traces = cluster.shutdown();
    assert_nothing_left("the mini-cluster", || Leftovers::of(&traces));
}

/// `annotated_deployment` as the README's "Rollouts that wait for discovery" has it: the
/// readiness gate `podlease.io/registered`, format etcd-naming (keys `<name>/<ip>:8080`, what
/// etcd's gRPC naming resolver reads), rolling with maxUnavailable 0 and maxSurge 1, and a
/// container that ignores SIGTERM with 20 s of grace (kubelet kills it only then).
fn gated_deployment(name: &str, replicas: i32, probe_dir: &std::path::Path) -> Deployment {
    let mut v = serde_json::to_value(annotated_deployment(name, replicas, probe_dir)).unwrap();
    v["spec"]["strategy"] = json!({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}});
    let t = &mut v["spec"]["template"];
    t["metadata"]["annotations"]["podlease.io/format"] = json!("etcd-naming");
    t["spec"]["readinessGates"] = json!([{"conditionType": "podlease.io/registered"}]);
    t["spec"]["terminationGracePeriodSeconds"] = json!(GRACE_SECONDS);
    // A server on 8080 (busybox httpd, in the background) for the dialling resolver to reach.
    t["spec"]["containers"][0]["command"] = json!(["/bin/sh", "-c", "trap '' TERM; httpd -p 8080 -h /tmp; while true; do sleep 1; done"]);
    serde_json::from_value(v).unwrap()
}

const GRACE_SECONDS: u64 = 20;

/// One etcd event under a watched prefix and when it reached the test.
#[derive(Debug, Clone)]
struct KeyEvent {
    at: Instant,
    put: bool,
    key: String,
}

/// Every event under a prefix from its start on, timed on arrival; the watch ends with it.
struct KeyWatch {
    events: Arc<Mutex<Vec<KeyEvent>>>,
    _task: AbortOnDrop,
}


impl KeyWatch {
    async fn start(etcd: &etcd_client::Client, prefix: &str) -> KeyWatch {
        let mut w = etcd.watch_client();
        let mut stream = w.watch(prefix, Some(etcd_client::WatchOptions::new().with_prefix())).await.expect("watch");
        let events: Arc<Mutex<Vec<KeyEvent>>> = Arc::default();
        let sink = events.clone();
        let task = tokio::spawn(async move {
            let _keep = w;
            while let Ok(Some(resp)) = stream.message().await {
                let at = Instant::now();
                for ev in resp.events() {
                    let Some(kv) = ev.kv() else { continue };
                    let put = ev.event_type() == etcd_client::EventType::Put;
                    sink.lock().unwrap().push(KeyEvent { at, put, key: kv.key_str().unwrap_or_default().to_string() });
                }
            }
        });
        KeyWatch { events, _task: AbortOnDrop(task.abort_handle()) }
    }

    fn all(&self) -> Vec<KeyEvent> {
        self.events.lock().unwrap().clone()
    }

    /// The first PUT (or DELETE) of `key` that arrived after `after`, waiting for it.
    async fn wait(&self, key: &str, put: bool, after: Instant, within: Duration) -> KeyEvent {
        let what = format!("{} of etcd key {key}", if put { "a PUT" } else { "a DELETE" });
        wait_until(&what, within, || async { self.events.lock().unwrap().iter().find(|e| e.key == key && e.put == put && e.at > after).cloned() }).await
    }
}

/// What the test's own API watch saw of one pod, timed on arrival.
#[derive(Debug, Clone)]
struct PodSeen {
    at: Instant,
    name: String,
    ready: bool,
    deleting: bool,
    gone: bool,
}

/// A watch of the app's pods. With `auto_probe` set, every new pod gets its readiness file
/// as soon as the watch sees it (a rollout's pods have names nobody knows in advance). The
/// watch ends with it.
struct PodWatch {
    seen: Arc<Mutex<Vec<PodSeen>>>,
    _task: AbortOnDrop,
}

impl PodWatch {
    fn start(api: Api<Pod>, selector: &str, probe_dir: std::path::PathBuf, auto_probe: Arc<AtomicBool>) -> PodWatch {
        use futures::StreamExt;
        use kube::runtime::{watcher, WatchStreamExt};
        let seen: Arc<Mutex<Vec<PodSeen>>> = Arc::default();
        let sink = seen.clone();
        let config = watcher::Config::default().labels(selector);
        let task = tokio::spawn(async move {
            // With backoff: without it a watcher retries a failing API server in a busy loop.
            let mut events = std::pin::pin!(watcher(api, config).default_backoff());
            while let Some(ev) = events.next().await {
                let at = Instant::now();
                let (pod, gone) = match ev {
                    Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p)) => (p, false),
                    Ok(watcher::Event::Delete(p)) => (p, true),
                    _ => continue,
                };
                let name = pod.metadata.name.clone().unwrap_or_default();
                let deleting = pod.metadata.deletion_timestamp.is_some();
                if auto_probe.load(Ordering::SeqCst) && !gone && !deleting {
                    let file = probe_dir.join(&name);
                    if !file.exists() {
                        std::fs::write(file, "").unwrap();
                    }
                }
                sink.lock().unwrap().push(PodSeen { at, name, ready: ready(&pod), deleting, gone });
            }
        });
        PodWatch { seen, _task: AbortOnDrop(task.abort_handle()) }
    }

    fn all(&self) -> Vec<PodSeen> {
        self.seen.lock().unwrap().clone()
    }

    /// The first state seen that `pred` accepts, waiting for it.
    async fn wait(&self, what: &str, within: Duration, pred: impl Fn(&PodSeen) -> bool) -> PodSeen {
        wait_until(what, within, || async { self.seen.lock().unwrap().iter().find(|s| pred(s)).cloned() }).await
    }
}

/// `later - earlier` in milliseconds, negative when `later` came first.
fn signed_ms(later: Instant, earlier: Instant) -> f64 {
    if later >= earlier { (later - earlier).as_secs_f64() * 1e3 } else { -((earlier - later).as_secs_f64() * 1e3) }
}

/// p50, p99 and max (nearest rank) of millisecond figures.
fn p50_p99_max(figures: &[f64]) -> (f64, f64, f64) {
    let mut v = figures.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let at = |p: f64| v[((v.len() as f64 - 1.0) * p).round() as usize];
    (at(0.5), at(0.99), *v.last().unwrap())
}

/// The names and IPs of the app's pods that exist, are not terminating and are Ready.
async fn serving_pods(apps: &Api<Pod>, selector: &str) -> Vec<(String, String)> {
    let items = apps.list(&ListParams::default().labels(selector)).await.map(|l| l.items).unwrap_or_default();
    let mut out: Vec<(String, String)> = items
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none() && ready(p))
        .filter_map(|p| Some((p.metadata.name.clone()?, p.status.as_ref()?.pod_ip.clone()?)))
        .collect();
    out.sort();
    out
}

/// One probe flip of one pod: file removed → key gone → file back → key back → Ready.
struct Flip {
    /// readiness file removed → the key's DELETE reached the test's etcd watch.
    file_to_gone: Duration,
    /// Ready=False on the test's API watch → the DELETE (ms; negative if etcd's came first).
    api_to_gone_ms: f64,
    /// readiness file back → the key's PUT.
    file_to_back: Duration,
    /// readiness file back → Ready again (the gate opens after the key is written).
    file_to_ready: Duration,
}

async fn flip_pod(probe_dir: &std::path::Path, keys: &KeyWatch, pods: &PodWatch, name: &str, key: &str, n: usize) -> Vec<Flip> {
    let within = Duration::from_secs(30);
    let mut out = Vec::new();
    for _ in 0..n {
        let t_rm = Instant::now();
        std::fs::remove_file(probe_dir.join(name)).unwrap();
        let del = keys.wait(key, false, t_rm, within).await;
        let not_ready = pods.wait(&format!("{name} not Ready"), within, |s| s.name == name && !s.ready && s.at > t_rm).await;
        let t_mk = Instant::now();
        std::fs::write(probe_dir.join(name), "").unwrap();
        let put = keys.wait(key, true, t_mk, within).await;
        let back = pods.wait(&format!("{name} Ready again"), within, |s| s.name == name && s.ready && s.at > t_mk).await;
        out.push(Flip {
            file_to_gone: del.at - t_rm,
            api_to_gone_ms: signed_ms(del.at, not_ready.at),
            file_to_back: put.at - t_mk,
            file_to_ready: back.at - t_mk,
        });
    }
    out
}

/// Whether every app pod in `names` stayed Ready and not terminating in everything the watch
/// saw from `since` on; the first state that did not.
fn first_unready_since(pods: &PodWatch, names: &[String], since: Instant) -> Option<PodSeen> {
    pods.all().into_iter().find(|s| s.at >= since && names.contains(&s.name) && (!s.ready || s.deleting || s.gone))
}

/// The user story of issue 14 end to end on the real node, at the chart's defaults:
/// 1. podlease installed by its chart; a Deployment annotated for etcd-naming with the
///    readiness gate: kubelet runs it, its probes pass, its keys appear, the gate opens;
/// 2. 51 probe flips over the three pods: each key gone on not-ready and back on ready
///    within a bound from the probe period (kubelet-to-etcd latencies reported);
/// 3. a rolling update (maxUnavailable 0, maxSurge 1) never leaves fewer than 3 keys, in
///    etcd's history and in what etcd's own gRPC naming resolver hands to grpc;
/// 4. `kubectl delete pod`: the key goes with the deletionTimestamp, ~20 s before the pod;
/// 5. the podlease leader deleted, then the next one force-deleted: another podlease pod
///    leads each time (the standby or the Deployment's replacement, whichever takes the
///    released Lease first) and the app's keys see no DELETE, the app pods stay Ready;
/// 6. `helm upgrade` to a new image tag replaces both podlease pods with no DELETE and no
///    value changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn the_user_story_end_to_end_a_gated_deployment_stays_discoverable_through_flips_rollout_deletes_failovers_and_upgrade() {
    let _body = support::watchdog::body("the user story");
    const APP: &str = "shop";
    const SELECTOR: &str = "app=shop";
    const REPLICAS: usize = 3;
    const MAX_UNAVAILABLE: usize = 0;
    const TAG: &str = "node-test";
    const TAG2: &str = "node-test-2";
    let t_test = Instant::now();
    let Installed { cluster, registry, etcd, values, pods: podlease_names, holder, work, etcd_in_node } = install_podlease(TAG).await;
    let prefix = format!("{APP}/");
    let key_of = |ip: &str| format!("{APP}/{ip}:8080");
    cluster.wait_service_account("default", "default").await;
    let deployments: Api<Deployment> = Api::namespaced(cluster.kube.clone(), "default");
    let apps: Api<Pod> = Api::namespaced(cluster.kube.clone(), "default");
    let keys = KeyWatch::start(&etcd, &prefix).await;
    let auto_probe = Arc::new(AtomicBool::new(false));
    let pods = PodWatch::start(apps.clone(), SELECTOR, cluster.probe_dir.clone(), auto_probe.clone());

    // The same pods, also in go-zero's and Kratos's formats (two ServiceRegistrations beside
    // the Deployment's annotations): those frameworks' own clients resolve them in step 3.
    // (`rpc.shop`: etcd-naming's reader of `shop` reads every key that starts with it.)
    for (name, format, service) in [("shop-gozero", "go-zero", "rpc.shop"), ("shop-kratos", "kratos", APP)] {
        support::create_registration(&cluster.kube, "default", name, json!({
            "selector": {"matchLabels": {"app": APP}}, "port": "http", "format": format, "service": service,
        }))
        .await;
    }

    // 1. The gated, annotated Deployment: Running, not Ready, unpublished until its probes pass.
    let t = Instant::now();
    deployments.create(&PostParams::default(), &gated_deployment(APP, REPLICAS as i32, &cluster.probe_dir)).await.expect("create Deployment");
    let started = wait_until("3 shop pods Running", Duration::from_secs(90), || {
        let apps = apps.clone();
        async move {
            let items = apps.list(&ListParams::default().labels(SELECTOR)).await.ok()?.items;
            (items.len() == REPLICAS && items.iter().all(running)).then_some(items)
        }
    })
    .await;
    eprintln!("[1] Deployment created → {REPLICAS} pods Running in {:?}", t.elapsed());
    assert!(support::etcd_dump(&etcd, &prefix).await.is_empty(), "published before any probe passed");
    assert!(started.iter().all(|p| !ready(p)), "Ready without readiness files");
    let before = cluster.kubectl(&["get", "pods", "-o", "wide"]);
    eprintln!("[1] before the readiness files:\n{before}");
    assert_eq!(before.lines().filter(|l| l.starts_with("shop-") && l.trim_end().ends_with("0/1")).count(), REPLICAS, "READINESS GATES 0/1:\n{before}");
    let t_files = Instant::now();
    for p in &started {
        std::fs::write(cluster.probe_dir.join(p.metadata.name.as_deref().unwrap()), "").unwrap();
    }
    cluster.wait_deployment("default", APP, REPLICAS as i32, Duration::from_secs(60)).await;
    let serving = serving_pods(&apps, SELECTOR).await;
    assert_eq!(serving.len(), REPLICAS);
    let kv = support::etcd_dump(&etcd, &prefix).await;
    assert_eq!(kv.len(), REPLICAS, "{kv:?}");
    for (name, ip) in &serving {
        let value = kv.get(&key_of(ip)).unwrap_or_else(|| panic!("no key for {name} ({ip}): {kv:?}"));
        let v: serde_json::Value = serde_json::from_str(value).unwrap();
        assert_eq!(v, json!({"Op": 0, "Addr": format!("{ip}:8080"), "Metadata": null}), "{value}");
        let put = keys.wait(&key_of(ip), true, t_files, Duration::from_secs(1)).await;
        let ready_at = pods.wait(&format!("{name} Ready"), Duration::from_secs(1), |s| s.name == *name && s.ready).await;
        eprintln!("[1] {name}: readiness file → key {:?}, → Ready {:?} (gate opened {:.0} ms after the key)", put.at - t_files, ready_at.at - t_files, signed_ms(ready_at.at, put.at));
        let ev = support::wait_event_about(&cluster.kube, "default", name, "Registered").await;
        eprintln!("[1] {name}: Event {} {}: {}", ev.type_.as_deref().unwrap_or(""), ev.reason.as_deref().unwrap_or(""), ev.note.as_deref().unwrap_or(""));
    }
    let wide = cluster.kubectl(&["get", "pods", "-o", "wide"]);
    eprintln!("[1] kubectl get pods -o wide:\n{wide}");
    assert_eq!(wide.lines().filter(|l| l.starts_with("shop-") && l.contains(" 1/1 ") && l.trim_end().ends_with("1/1")).count(), REPLICAS, "READY 1/1 and READINESS GATES 1/1:\n{wide}");
    eprintln!("[1] the pods' Events:\n{}", cluster.kubectl(&["get", "events", "--field-selector", "involvedObject.kind=Pod", "--sort-by=.metadata.creationTimestamp"]));

    // 2. Probe flips, 17 on each pod at once. Bound: kubelet runs the exec probe every
    // periodSeconds (1 s) with timeoutSeconds 1 and failureThreshold = successThreshold = 1,
    // so the flip is seen at most 2 s after the file changes; 3 s more for kubelet's status
    // write, podlease's watch and the etcd revoke (or put).
    const FLIPS_PER_POD: usize = 17;
    let bound = Duration::from_secs(5);
    let t = Instant::now();
    let flips: Vec<Flip> = futures::future::join_all(serving.iter().map(|(name, ip)| {
        let (keys, pods, dir) = (&keys, &pods, &cluster.probe_dir);
        async move { flip_pod(dir, keys, pods, name, &key_of(ip), FLIPS_PER_POD).await }
    }))
    .await
    .into_iter()
    .flatten()
    .collect();
    assert!(flips.len() >= 50, "{} flips", flips.len());
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let report = |what: &str, v: Vec<f64>| {
        let (p50, p99, max) = p50_p99_max(&v);
        eprintln!("[2] {what}: p50 {p50:.0} ms, p99 {p99:.0} ms, max {max:.0} ms (n={})", v.len());
        max
    };
    eprintln!("[2] {} flips in {:?}", flips.len(), t.elapsed());
    let gone_max = report("readiness file removed → key gone", flips.iter().map(|f| ms(f.file_to_gone)).collect());
    report("Ready=False on the API watch → key gone", flips.iter().map(|f| f.api_to_gone_ms).collect());
    let back_max = report("readiness file back → key back", flips.iter().map(|f| ms(f.file_to_back)).collect());
    report("readiness file back → pod Ready (gate)", flips.iter().map(|f| ms(f.file_to_ready)).collect());
    assert!(gone_max <= ms(bound), "a key outlived its pod's not-ready flip by {gone_max:.0} ms (bound {bound:?})");
    assert!(back_max <= ms(bound), "a key came back {back_max:.0} ms after its pod's file (bound {bound:?})");
    cluster.wait_deployment("default", APP, REPLICAS as i32, Duration::from_secs(30)).await;
    assert_eq!(support::etcd_dump(&etcd, &prefix).await.len(), REPLICAS);

    // 3. A rolling update, watched in etcd's history and by etcd's own naming resolver, run
    // inside the cluster's sealed network namespace and dialling what it resolves (pod
    // addresses are real only there, and no packet can leave it).
    auto_probe.store(true, Ordering::SeqCst);
    let resolver = support::consumer::Resolver::start_in(
        cluster.in_node(support::consumer::binary()),
        &[format!("http://{etcd_in_node}")],
        APP,
        work.path(),
    )
    .await;
    let addrs: Vec<String> = serving.iter().map(|(_, ip)| format!("{ip}:8080")).collect();
    resolver.wait_for(&addrs.iter().map(String::as_str).collect::<Vec<_>>(), Duration::from_secs(10)).await;
    // go-zero's discov subscriber behind zrpc and Kratos's registry behind its gRPC client,
    // in the sealed namespace too, dialling the pods (httpd answers no gRPC: the calls fail,
    // the addresses resolve).
    let endpoints_in_node = [format!("http://{etcd_in_node}")];
    let mut framework_clients = Vec::new();
    for (fw, service) in [(Framework::GoZero, "rpc.shop"), (Framework::Kratos, APP)] {
        let client = FrameworkClient::resolve_in(fw, cluster.in_node(fw.binary()), &endpoints_in_node, service, work.path()).await;
        client.wait_addrs(&addrs, Duration::from_secs(10)).await;
        eprintln!("[3] {} {} resolves the 3 pods inside the node's namespace", fw.name(), fw.version());
        framework_clients.push(client);
    }
    let rev = support::etcd::revision(&etcd).await;
    let mut present: std::collections::BTreeSet<String> = support::etcd_dump(&etcd, &prefix).await.into_keys().collect();
    let old_keys = present.clone();
    let t_roll = Instant::now();
    eprintln!("[3] {}", cluster.kubectl(&["set", "env", "deployment/shop", "VERSION=2"]).trim());
    cluster.wait_deployment("default", APP, REPLICAS as i32, Duration::from_secs(120)).await;
    let new_serving = wait_until("the keys to be the new pods' only", Duration::from_secs(30), || {
        let (apps, etcd, prefix, old_keys) = (apps.clone(), etcd.clone(), prefix.clone(), &old_keys);
        async move {
            let serving = serving_pods(&apps, SELECTOR).await;
            let want: std::collections::BTreeSet<String> = serving.iter().map(|(_, ip)| key_of(ip)).collect();
            let have: std::collections::BTreeSet<String> = support::etcd_dump(&etcd, &prefix).await.into_keys().collect();
            (serving.len() == REPLICAS && have == want && have.is_disjoint(old_keys)).then_some(serving)
        }
    })
    .await;
    let rollout_took = t_roll.elapsed();
    let history = support::etcd::history(&etcd, &prefix, rev + 1).await;
    let mut min_keys = present.len();
    let mut max_keys = present.len();
    for e in &history {
        if e.put {
            present.insert(e.key.clone());
        } else {
            present.remove(&e.key);
        }
        min_keys = min_keys.min(present.len());
        max_keys = max_keys.max(present.len());
    }
    let (puts, deletes) = (history.iter().filter(|e| e.put).count(), history.iter().filter(|e| !e.put).count());
    eprintln!(
        "[3] rollout done in {rollout_took:?}: {puts} PUTs, {deletes} DELETEs; keys present at every revision: min {min_keys}, max {max_keys}; bound replicas − maxUnavailable = {}",
        REPLICAS - MAX_UNAVAILABLE
    );
    assert!(deletes >= REPLICAS && puts >= REPLICAS, "the rollout replaced every pod's key: {history:?}");
    assert!(min_keys >= REPLICAS - MAX_UNAVAILABLE, "{min_keys} keys at one point of the rollout: {history:?}");
    let new_addrs: Vec<String> = new_serving.iter().map(|(_, ip)| format!("{ip}:8080")).collect();
    resolver.wait_for(&new_addrs.iter().map(String::as_str).collect::<Vec<_>>(), Duration::from_secs(10)).await;
    let smallest = resolver.smallest_since(t_roll).expect("the resolver had a set");
    eprintln!("[3] etcd:///{APP} smallest address set during the rollout: {} addresses {smallest:?}", smallest.len());
    assert!(smallest.len() >= REPLICAS - MAX_UNAVAILABLE, "the resolver handed grpc {smallest:?}");
    for client in &framework_clients {
        client.wait_addrs(&new_addrs, Duration::from_secs(10)).await;
        let smallest = client.smallest_since(t_roll).expect("the client had a set");
        eprintln!("[3] {}: smallest set during the rollout {} addresses, {} changes", client.framework.name(), smallest.len(), client.sets().iter().filter(|(at, _)| *at > t_roll).count());
        assert!(smallest.len() >= REPLICAS - MAX_UNAVAILABLE, "{} handed out {smallest:?}", client.framework.name());
    }
    let etcd_events = keys.all();
    let mut previous = addrs.clone();
    let mut change_ms = Vec::new();
    for (at, set) in resolver.changes().into_iter().filter(|(at, _)| *at > t_roll) {
        let added: Vec<&String> = set.iter().filter(|a| !previous.contains(a)).collect();
        let removed: Vec<&String> = previous.iter().filter(|a| !set.contains(a)).collect();
        // The latest matching etcd event that had reached the test by then (else the next one).
        let latency = added.iter().map(|a| (a, true)).chain(removed.iter().map(|a| (a, false))).map(|(a, put)| {
            let key = format!("{APP}/{a}");
            let matching: Vec<&KeyEvent> = etcd_events.iter().filter(|e| e.key == key && e.put == put && e.at > t_roll).collect();
            let ev = matching.iter().rev().find(|e| e.at <= at).or(matching.first()).unwrap_or_else(|| panic!("no etcd event for {key}"));
            signed_ms(at, ev.at)
        });
        let latency = latency.fold(f64::MIN, f64::max);
        eprintln!("[3] resolver: {} addresses (+{added:?} −{removed:?}) {latency:.1} ms after the etcd event", set.len());
        change_ms.push(latency);
        previous = set;
    }
    let (p50, _, max) = p50_p99_max(&change_ms);
    eprintln!("[3] resolver changes: {}, etcd event → resolver p50 {p50:.1} ms, max {max:.1} ms", change_ms.len());
    assert!(change_ms.len() >= 2 * REPLICAS - 1, "the resolver saw the rollout's changes: {change_ms:?}");
    assert!(max < 2000.0, "a change took {max:.0} ms from etcd to the resolver");
    assert!(resolver.undecodable_keys().is_empty(), "{:?}", resolver.undecodable_keys());
    // It dialled: grpc's channel left IDLE for CONNECTING (a subchannel per address; the
    // pods' httpd speaks HTTP/1, so the HTTP/2 handshake then fails, as a gRPC client's would
    // against the wrong server), and no address was refused.
    let events = resolver.events();
    let states: Vec<&str> = events.iter().filter(|(e, _)| e == "state").map(|(_, d)| d.as_str()).collect();
    eprintln!("[3] the resolver's channel states: {states:?}");
    assert!(states.contains(&"CONNECTING"), "the resolver never dialled: {events:?}");
    assert!(!events.iter().any(|(e, _)| e == "refused_dial"), "{events:?}");

    // 4. `kubectl delete pod` of an app pod: the key goes with the deletionTimestamp, the pod
    // only when kubelet kills the container that ignores SIGTERM, GRACE_SECONDS later.
    let (victim, victim_ip) = new_serving[0].clone();
    let t0 = Instant::now();
    eprintln!("[4] {}", cluster.kubectl(&["delete", "pod", &victim, "--wait=false"]).trim());
    let marked = pods.wait(&format!("{victim}'s deletionTimestamp"), Duration::from_secs(30), |s| s.name == victim && s.deleting).await;
    let key_gone = keys.wait(&key_of(&victim_ip), false, t0, Duration::from_secs(30)).await;
    // Polled (a watch that relists reports no Delete for what went meanwhile).
    let pod_gone = {
        let start = Instant::now();
        loop {
            match apps.get_opt(&victim).await {
                Ok(None) => break Instant::now(),
                Ok(Some(p)) if start.elapsed() > Duration::from_secs(GRACE_SECONDS + 60) => {
                    panic!("{victim} still there {:?} after kubectl delete: {:?}\nkubelet log:\n{}", t0.elapsed(), p.status, cluster.log_tail("kubelet.log", 60))
                }
                _ => tokio::time::sleep(Duration::from_millis(25)).await,
            }
        }
    };
    let key_after_mark = signed_ms(key_gone.at, marked.at);
    eprintln!(
        "[4] kubectl delete → deletionTimestamp seen {:?}, key gone {:?} ({key_after_mark:.0} ms after the deletionTimestamp), pod gone {:?} ({:?} after its key)",
        marked.at - t0,
        key_gone.at - t0,
        pod_gone - t0,
        pod_gone - key_gone.at
    );
    assert!(key_after_mark <= 2000.0, "the key stayed {key_after_mark:.0} ms after the deletionTimestamp");
    assert!(pod_gone - key_gone.at >= Duration::from_secs(GRACE_SECONDS - 5), "the pod went {:?} after its key", pod_gone - key_gone.at);
    cluster.wait_deployment("default", APP, REPLICAS as i32, Duration::from_secs(60)).await;
    let app_names: Vec<String> = wait_until("3 keys again after the replacement", Duration::from_secs(30), || {
        let (apps, etcd, prefix) = (apps.clone(), etcd.clone(), prefix.clone());
        async move {
            let serving = serving_pods(&apps, SELECTOR).await;
            let want: std::collections::BTreeSet<String> = serving.iter().map(|(_, ip)| key_of(ip)).collect();
            let have: std::collections::BTreeSet<String> = support::etcd_dump(&etcd, &prefix).await.into_keys().collect();
            (serving.len() == REPLICAS && have == want).then(|| serving.into_iter().map(|(n, _)| n).collect())
        }
    })
    .await;

    // 5. Failover: the leader deleted gracefully, then the next leader force-deleted.
    // From here on (both failovers, then the upgrade) go-zero's and Kratos's clients must
    // see no change: first they hold the set of the pods serving now.
    let serving_now: Vec<String> = serving_pods(&apps, SELECTOR).await.iter().map(|(_, ip)| format!("{ip}:8080")).collect();
    for client in &framework_clients {
        client.wait_addrs(&serving_now, Duration::from_secs(10)).await;
    }
    let framework_sets: Vec<usize> = framework_clients.iter().map(|c| c.sets().len()).collect();
    let steady = support::etcd_dump(&etcd, &prefix).await;
    let rev5 = support::etcd::revision(&etcd).await;
    let t5 = Instant::now();
    // Every podlease pod's log from here, the deleted ones' included (shown on a failure).
    let tap = cluster.tap_logs(PODLEASE_NS, "app.kubernetes.io/name=podlease", &work.path().join("logs-5"));
    // The leader: the pod the Lease names now. Whoever leads next must be another podlease
    // pod: the standby, or the Deployment's replacement if it starts and tries first (a
    // standby retries every 2 s at the defaults, a new pod tries at once).
    let leader_of = |h: &str, names: &[String]| names.iter().find(|n| h.starts_with(n.as_str())).cloned();
    let holder1 = leader_among(&cluster, &podlease_names, Duration::from_secs(30)).await;
    let leader = leader_of(&holder1, &podlease_names).unwrap();
    let standby: Vec<String> = podlease_names.iter().filter(|n| **n != leader).cloned().collect();
    eprintln!("[5] leader {holder1} (at install: {holder}), standby {standby:?}");
    let t = Instant::now();
    eprintln!("[5] {}", cluster.kubectl(&["-n", PODLEASE_NS, "delete", "pod", &leader, "--wait=false"]).trim());
    let holder2 = leader_where(&cluster, &format!("a pod other than {leader}"), Duration::from_secs(60), |h| !h.starts_with(leader.as_str())).await;
    let graceful_took = t.elapsed();
    let who = if standby.iter().any(|n| holder2.starts_with(n.as_str())) { "the standby" } else { "the Deployment's replacement pod" };
    eprintln!("[5] graceful delete of leader {leader} → {holder2} ({who}) leads after {graceful_took:?}");
    cluster.wait_deployment(PODLEASE_NS, "podlease", 2, Duration::from_secs(120)).await;
    let live: Vec<String> = podlease_pods(&cluster).await.into_iter().filter(|p| p.metadata.deletion_timestamp.is_none()).filter_map(|p| p.metadata.name).collect();
    let leader2 = leader_of(&holder2, &live).unwrap_or_else(|| panic!("{holder2} is none of the live podlease pods {live:?}"));
    let others: Vec<String> = live.iter().filter(|n| **n != leader2).cloned().collect();
    assert_eq!(others.len(), 1, "one replica besides the leader: {live:?}");
    let t = Instant::now();
    eprintln!("[5] {}", cluster.kubectl(&["-n", PODLEASE_NS, "delete", "pod", &leader2, "--grace-period=0", "--force"]).trim());
    let holder3 = leader_where(&cluster, &format!("a pod other than {leader2}"), Duration::from_secs(60), |h| !h.starts_with(leader2.as_str())).await;
    let who = if others.iter().any(|n| holder3.starts_with(n.as_str())) { "the standby" } else { "the Deployment's replacement pod" };
    eprintln!("[5] force delete of leader {leader2} → {holder3} ({who}) leads after {:?} (leaseDurationSeconds 15 at the defaults)", t.elapsed());
    cluster.wait_deployment(PODLEASE_NS, "podlease", 2, Duration::from_secs(120)).await;
    let failover = support::etcd::history(&etcd, &prefix, rev5 + 1).await;
    let failover_deletes = failover.iter().filter(|e| !e.put).count();
    eprintln!("[5] over both failovers ({:?}): {failover_deletes} DELETE and {} PUT events of the app's keys", t5.elapsed(), failover.len() - failover_deletes);
    if failover_deletes > 0 {
        // What wrote what: every key's events over the failovers (fence values name the
        // epoch and holder), and the podlease pods' logs while they still exist.
        for e in support::etcd::history(&etcd, "", rev5 + 1).await {
            eprintln!("[5] etcd rev {} {} {} = {}", e.revision, if e.put { "PUT" } else { "DELETE" }, e.key, if e.put { &e.value } else { e.prev_value.as_deref().unwrap_or("") });
        }
        eprintln!("{}", cluster.pods_explained(PODLEASE_NS, "app.kubernetes.io/name=podlease"));
        eprintln!("[5] every podlease pod's log since the step began:\n{}", tap.dump(400));
    }
    drop(tap);
    assert_eq!(failover_deletes, 0, "{failover:?}");
    assert_eq!(support::etcd_dump(&etcd, &prefix).await, steady, "the app's keys changed over the failovers");
    assert!(first_unready_since(&pods, &app_names, t5).is_none(), "an app pod stopped being ready: {:?}", first_unready_since(&pods, &app_names, t5));

    // 6. helm upgrade to a new image tag: both podlease pods replaced, keys untouched.
    let t = Instant::now();
    let tarball2 = podlease_image(work.path(), std::path::Path::new(env!("CARGO_BIN_EXE_podlease")), TAG2);
    cluster.import_image(&tarball2);
    eprintln!("[6] image {TAG2} built and imported in {:?}", t.elapsed());
    let before_upgrade: Vec<String> = podlease_pods(&cluster).await.into_iter().filter_map(|p| p.metadata.name).collect();
    let steady = support::etcd_dump(&etcd, &prefix).await;
    let leases = support::etcd::leases_under(&etcd, &prefix).await;
    let rev6 = support::etcd::revision(&etcd).await;
    let t6 = Instant::now();
    let mut values2 = values.clone();
    values2["image"]["tag"] = json!(TAG2);
    let release = cluster.helm_upgrade(&podlease_chart(), "podlease", PODLEASE_NS, &values2);
    assert_eq!(release["status"], "deployed", "{release}");
    let image2 = format!("local/podlease:{TAG2}");
    let upgraded = wait_until("2 podlease pods of the new image, Ready, none else", Duration::from_secs(180), || {
        let (cluster, image2) = (&cluster, &image2);
        async move {
            let pods = podlease_pods(cluster).await;
            let done = pods.len() == 2
                && pods.iter().all(|p| container_of(p).image.as_deref() == Some(image2.as_str()) && ready(p) && p.metadata.deletion_timestamp.is_none());
            done.then(|| pods.into_iter().filter_map(|p| p.metadata.name).collect::<Vec<_>>())
        }
    })
    .await;
    let holder4 = leader_among(&cluster, &upgraded, Duration::from_secs(60)).await;
    eprintln!("[6] helm upgrade → {upgraded:?} ({image2}) ready in {:?}, {holder4} leads", t6.elapsed());
    assert!(upgraded.iter().all(|n| !before_upgrade.contains(n)), "both pods replaced: {before_upgrade:?} → {upgraded:?}");
    let upgrade = support::etcd::history(&etcd, &prefix, rev6 + 1).await;
    let upgrade_deletes = upgrade.iter().filter(|e| !e.put).count();
    let leases_after = support::etcd::leases_under(&etcd, &prefix).await;
    eprintln!(
        "[6] over the upgrade: {upgrade_deletes} DELETE and {} PUT events of the app's keys; leases {}",
        upgrade.len() - upgrade_deletes,
        if leases_after == leases { "unchanged (adopted)" } else { "changed" }
    );
    assert_eq!(upgrade_deletes, 0, "{upgrade:?}");
    assert_eq!(support::etcd_dump(&etcd, &prefix).await, steady, "the app's keys or values changed over the upgrade");
    assert!(first_unready_since(&pods, &app_names, t6).is_none(), "an app pod stopped being ready: {:?}", first_unready_since(&pods, &app_names, t6));

    // Over both failovers and the upgrade, go-zero's and Kratos's clients saw no change.
    for (client, before) in framework_clients.iter().zip(&framework_sets) {
        let after: Vec<Vec<String>> = client.sets()[*before..].iter().map(|(_, s)| addrs_of(s)).collect();
        assert!(after.is_empty(), "{} saw changes across the failovers and the upgrade: {after:?}", client.framework.name());
    }
    eprintln!("[6] go-zero's and Kratos's clients: no change over the failovers and the upgrade");
    drop(framework_clients);
    drop(resolver);
    // The test's own watches end before the API server and etcd they watch.
    drop((pods, keys));
    eprintln!("{}", cluster.kubectl(&["get", "pods", "-A", "-o", "wide"]));
    cluster.assert_sealed();
    let traces = cluster.shutdown();
    assert_nothing_left("the mini-cluster", || Leftovers::of(&traces));
    drop(registry);
    eprintln!("the whole story in {:?}", t_test.elapsed());
}

/// The compatibility subset on the oldest supported Kubernetes (1.34): the same tests, each in a process of its own
/// (README, "Supported versions").
mod on_kubernetes_1_34 {
    use super::support::{run_on, Release};

    #[test]
    fn podlease_installed_by_its_chart_publishes_the_ready_pods_of_the_node() {
        run_on(Release::OldestKubernetes);
        super::podlease_installed_by_its_chart_publishes_the_ready_pods_of_the_node();
    }
}
