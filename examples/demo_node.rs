//! `make demo` (= `make demo-node`): the real one-node mini-cluster (kubelet, containerd, scheduler,
//! controller manager, in namespaces of its own with no way off the machine), podlease
//! installed by its Helm chart from its own image, and a Deployment taken through a
//! scale-up, a failing readiness probe, a rollout and a scale-down. Every step prints the
//! real output of the commands a user would type (`kubectl ...`), and `podlease get --watch`
//! follows the service's keys in etcd the whole time.
//!
//! `make demo-shell` (`--shell`): the same cluster, podlease and a 3-replica Deployment are
//! left running; it prints KUBECONFIG and ETCDCTL_ENDPOINTS (ports on the host's 127.0.0.1
//! that reach the API server and the registry etcd) and waits for Ctrl-C, then tears it all
//! down.

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::BTreeSet;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use support::node::*;
use support::frameworks::Framework;
use support::{Binaries, EtcdServer, wait_until};

const TAG: &str = "demo";
const NS: &str = "podlease-system";
const WAIT: Duration = Duration::from_secs(120);

fn say(start: Instant, what: &str) {
    println!("\n[{:>6.2}s] {what}", start.elapsed().as_secs_f64());
}

/// Runs the real kubectl against the cluster and prints the command and its output as a user
/// sees them, line by line as it comes (`rollout status` reports while it waits).
fn kubectl(cluster: &MiniCluster, args: &[&str]) {
    println!("         $ kubectl {}", args.join(" "));
    let mut child = std::process::Command::new(&Binaries::locate().kubectl)
        .arg("--kubeconfig")
        .arg(&cluster.kubeconfig)
        .arg("--cache-dir")
        .arg(cluster.dir().join("kubecache"))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("kubectl");
    for line in std::io::BufReader::new(child.stdout.take().unwrap()).lines().map_while(Result::ok) {
        println!("         {line}");
    }
    let out = child.wait_with_output().expect("kubectl");
    for line in String::from_utf8_lossy(&out.stderr).lines() {
        println!("         {line}");
    }
    assert!(out.status.success(), "kubectl {args:?} failed");
}

/// The app: a Deployment of busybox pods (their own network namespace, a pod IP from the
/// bridge) whose exec readiness probe fails while `/probe/<pod name>.fail` exists (a hostPath
/// the demo writes to), and a ServiceRegistration `web` publishing them by their `http` port.
fn manifests(probe_dir: &Path, replicas: u32) -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: default
spec:
  replicas: {replicas}
  selector:
    matchLabels: {{app: web}}
  template:
    metadata:
      labels: {{app: web}}
    spec:
      terminationGracePeriodSeconds: 5
      containers:
        - name: web
          image: {BUSYBOX_IMAGE}
          imagePullPolicy: Never
          command: ["/bin/sh", "-c", "trap 'exit 0' TERM; while true; do sleep 1; done"]
          ports: [{{name: http, containerPort: 8080}}]
          env: [{{name: POD_NAME, valueFrom: {{fieldRef: {{fieldPath: metadata.name}}}}}}]
          readinessProbe:
            exec: {{command: ["/bin/sh", "-c", "test ! -e /probe/$POD_NAME.fail"]}}
            periodSeconds: 1
            failureThreshold: 1
          volumeMounts: [{{name: probe, mountPath: /probe}}]
      volumes: [{{name: probe, hostPath: {{path: {probe}, type: Directory}}}}]
---
apiVersion: podlease.io/v1alpha1
kind: ServiceRegistration
metadata:
  name: web
  namespace: default
spec:
  selector:
    matchLabels: {{app: web}}
  port: http
---
apiVersion: podlease.io/v1alpha1
kind: ServiceRegistration
metadata:
  name: web-gozero
  namespace: default
spec:
  selector:
    matchLabels: {{app: web}}
  port: http
  format: go-zero
  service: web.rpc
---
apiVersion: podlease.io/v1alpha1
kind: ServiceRegistration
metadata:
  name: web-kratos
  namespace: default
spec:
  selector:
    matchLabels: {{app: web}}
  port: http
  format: kratos
  service: web
"#,
        probe = probe_dir.display()
    )
}

fn ready(p: &Pod) -> bool {
    p.metadata.deletion_timestamp.is_none()
        && p.status.as_ref().and_then(|s| s.conditions.as_ref()).is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Waits until the keys under /services/web/default/ name exactly the web pods that are
/// Ready and not terminating, `n` of them; returns their names.
async fn published(pods: &Api<Pod>, etcd: &etcd_client::Client, n: usize) -> BTreeSet<String> {
    wait_until(&format!("{n} ready web pods, each with its key in etcd and no other key"), WAIT, || async move {
        let ready: BTreeSet<String> =
            pods.list(&ListParams::default().labels("app=web")).await.ok()?.items.iter().filter(|p| ready(p)).filter_map(|p| p.metadata.name.clone()).collect();
        let keys: BTreeSet<String> = support::etcd_dump(etcd, "/services/web/default/").await.keys().map(|k| k.trim_start_matches("/services/web/default/").to_string()).collect();
        (ready.len() == n && ready == keys).then_some(keys)
    })
    .await
}

#[tokio::main]
async fn main() {
    let shell = std::env::args().any(|a| a == "--shell");
    let bin = PathBuf::from(std::env::var("PODLEASE_BIN").expect("PODLEASE_BIN: the podlease binary to package (make demo-node sets it)"));
    let start = Instant::now();
    let work = tempfile::Builder::new().prefix("podlease-demo-").tempdir().unwrap();

    say(start, "packaging podlease as the image local/podlease:demo (scripts/image.sh)");
    let image = podlease_image(work.path(), &bin, TAG);
    say(start, &format!("starting the mini-cluster: etcd, kube-apiserver, controller manager, scheduler, containerd, kubelet ({})", support::Binaries::locate().kube_version));
    let mut cluster = MiniCluster::start().await;
    println!("         node Ready after {:.1}s", cluster.started.node_ready.as_secs_f64());
    kubectl(&cluster, &["version"]);
    cluster.import_image(&image);
    let registry = EtcdServer::start(work.path(), "registry");
    let etcd_in_node = cluster.expose(format!("127.0.0.1:{}", registry.client_port).parse().unwrap());
    let etcd = etcd_client::Client::connect([registry.endpoint()], None).await.unwrap();
    let etcd_version = etcd.maintenance_client().status().await.map(|s| s.version().to_string()).unwrap_or_default();
    println!("         registry etcd {etcd_version}: {} on this machine, {etcd_in_node} from the pods", registry.endpoint());

    let interrupted = tokio::select! {
        _ = run(&mut cluster, &etcd, &registry, etcd_in_node, &bin, start, shell, work.path()) => false,
        _ = tokio::signal::ctrl_c() => true,
    };
    if interrupted {
        println!();
    }
    say(start, "stopping the mini-cluster");
    let traces = cluster.shutdown();
    assert_nothing_left("the mini-cluster", || Leftovers::of(&traces));
    println!("         nothing left on the host (processes, mounts, cgroups, files)");
}

#[allow(clippy::too_many_arguments)]
async fn run(cluster: &mut MiniCluster, etcd: &etcd_client::Client, registry: &EtcdServer, etcd_in_node: std::net::SocketAddr, bin: &Path, start: Instant, shell: bool, work: &Path) {
    say(start, "installing podlease with its Helm chart (two replicas, leader election)");
    let values = podlease_values(TAG, &[format!("http://{etcd_in_node}")]);
    println!(
        "         $ helm install podlease charts/podlease -n {NS} --create-namespace --set image.repository=local/podlease,image.tag={TAG},image.pullPolicy=Never \\\n             --set 'etcd.endpoints={{http://{etcd_in_node}}}' (+ extraEnv: the API server at {NODE_ADDRESS}:{APISERVER_PORT}, no kube-proxy here)"
    );
    let release = cluster.helm_install(&podlease_chart(), "podlease", NS, &values);
    println!("         release podlease: {}", release["status"].as_str().unwrap_or("?"));
    cluster.wait_deployment_explained(NS, "podlease", "app.kubernetes.io/name=podlease", 2, WAIT).await;
    kubectl(cluster, &["get", "pods", "-n", NS, "-o", "wide"]);

    // `podlease get --watch`, as a user follows a service: the keys now, then every change.
    let endpoint = registry.endpoint();
    say(start, "following the service in etcd (it prints each change as it comes):");
    println!("         $ podlease get --service web --watch --etcd-endpoints {endpoint}");
    let mut watch = std::process::Command::new(bin)
        .args(["get", "--service", "web", "--watch", "--etcd-endpoints", &endpoint, "--log-level", "warn"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("podlease get --watch");
    let out = watch.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            println!("[{:>6.2}s]   podlease get --watch | {line}", start.elapsed().as_secs_f64());
        }
    });
    let _stop_watch = KillOnDrop(watch);

    // go-zero's and Kratos's own discovery clients, inside the cluster's sealed network
    // namespace (pod addresses are real only there), dialling what they resolve: the same
    // pods, as those frameworks' services see them.
    let mut clients = Vec::new();
    for (fw, service) in [(Framework::GoZero, "web.rpc"), (Framework::Kratos, "web")] {
        say(start, &format!("{} {}'s own client resolving {service} inside the cluster's network namespace:", fw.name(), fw.version()));
        let mut cmd = cluster.in_node(fw.binary());
        cmd.args(["resolve", &format!("--endpoints=http://{etcd_in_node}"), &format!("--service={service}"), "--dial", "--dial-any"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null());
        let mut child = cmd.spawn().expect("the framework's client");
        let out = child.stdout.take().unwrap();
        let name = fw.name();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else { continue };
                if let Some(set) = v["instances"].as_array() {
                    let addrs: Vec<&str> = set.iter().filter_map(|i| i["addr"].as_str()).collect();
                    println!("[{:>6.2}s]   {name} client | {} instances: {}", start.elapsed().as_secs_f64(), addrs.len(), addrs.join(" "));
                }
            }
        });
        clients.push(KillOnDrop(child));
    }

    cluster.wait_service_account("default", "default").await;
    let pods: Api<Pod> = Api::namespaced(cluster.kube.clone(), "default");
    let manifest = work.join("web.yaml");
    std::fs::write(&manifest, manifests(&cluster.probe_dir, 1)).unwrap();
    say(start, "the app: a Deployment `web` (1 replica, exec readiness probe) and ServiceRegistrations `web` (json), `web-gozero` and `web-kratos`");
    kubectl(cluster, &["apply", "-f", manifest.to_str().unwrap()]);
    published(&pods, etcd, 1).await;
    kubectl(cluster, &["get", "serviceregistrations"]);

    say(start, "scale-up to 3: each new pod is published once kubelet finds it Ready");
    kubectl(cluster, &["scale", "deployment/web", "--replicas=3"]);
    let names = published(&pods, etcd, 3).await;
    kubectl(cluster, &["get", "pods", "-l", "app=web", "-o", "wide"]);
    kubectl(cluster, &["get", "serviceregistrations"]);

    if shell {
        let kubeconfig = cluster.kubeconfig.display().to_string();
        say(start, "left running; in another shell:");
        println!("         export KUBECONFIG={kubeconfig}");
        println!("         export ETCDCTL_API=3 ETCDCTL_ENDPOINTS={endpoint}");
        println!("         kubectl get serviceregistrations; kubectl get pods -A -o wide");
        println!("         {} get --prefix /services/web/", Binaries::locate().etcdctl.display());
        println!("         {} get --service web --watch --etcd-endpoints {endpoint}", bin.display());
        println!("         kubectl scale deployment/web --replicas=5");
        println!("         touch {}/<pod name>.fail    # that pod's readiness probe fails", cluster.probe_dir.display());
        println!("         (pod addresses are inside the mini-cluster's network namespace only: never dial them from here)");
        println!("\n         Ctrl-C stops everything.");
        std::future::pending::<()>().await;
    }

    let sick = names.iter().next().unwrap().clone();
    say(start, &format!("{sick}'s readiness probe starts failing: kubelet marks it not Ready, podlease revokes its lease"));
    let fail = cluster.probe_dir.join(format!("{sick}.fail"));
    std::fs::write(&fail, "").unwrap();
    published(&pods, etcd, 2).await;
    kubectl(cluster, &["get", "pods", "-l", "app=web"]);
    kubectl(cluster, &["get", "serviceregistrations"]);
    say(start, &format!("{sick}'s probe passes again: published again under a new lease"));
    std::fs::remove_file(&fail).unwrap();
    published(&pods, etcd, 3).await;

    say(start, "a rollout (new pod template): new pods are published as they turn Ready, old ones leave as they start terminating");
    kubectl(cluster, &["set", "env", "deployment/web", "VERSION=2"]);
    kubectl(cluster, &["rollout", "status", "deployment/web", "--timeout=120s"]);
    let after = published(&pods, etcd, 3).await;
    assert!(after.is_disjoint(&names), "every key is a new pod's after the rollout: {after:?} / {names:?}");
    kubectl(cluster, &["get", "pods", "-l", "app=web", "-o", "wide"]);

    say(start, "scale-down to 1");
    kubectl(cluster, &["scale", "deployment/web", "--replicas=1"]);
    published(&pods, etcd, 1).await;
    kubectl(cluster, &["get", "serviceregistrations"]);
    println!("         $ ETCDCTL_API=3 etcdctl --endpoints={endpoint} get --prefix /services/web/");
    let out = support::etcd::etcdctl(&endpoint, None, &["get", "--prefix", "/services/web/"]);
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        println!("         {line}");
    }
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
