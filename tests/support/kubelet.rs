//! The kubelet's part, played by the tests: pods bound to made-up nodes, readiness through
//! the status subresource, graceful (terminating) and forced deletion.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::Client;
use serde_json::json;

/// The node every test pod is bound to unless told otherwise.
pub const NODE: &str = "node-a";

/// A pod to create: name, labels, annotations and container ports.
#[derive(Debug, Clone, Default)]
pub struct PodSpec {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// (port name, container port)
    pub ports: Vec<(String, i32)>,
    pub readiness_gates: Vec<String>,
}

impl PodSpec {
    pub fn new(name: &str) -> PodSpec {
        PodSpec { name: name.to_string(), ports: vec![("http".into(), 8080)], ..Default::default() }
    }
    pub fn label(mut self, k: &str, v: &str) -> Self {
        self.labels.insert(k.into(), v.into());
        self
    }
    pub fn annotation(mut self, k: &str, v: &str) -> Self {
        self.annotations.insert(k.into(), v.into());
        self
    }
    /// Declares podlease's readiness gate.
    pub fn gated(mut self) -> Self {
        self.readiness_gates.push(podlease::pod::GATE.into());
        self
    }
    pub fn ports(mut self, ports: &[(&str, i32)]) -> Self {
        self.ports = ports.iter().map(|(n, p)| (n.to_string(), *p)).collect();
        self
    }
}

/// Creates the Node object pods are bound to (idempotent).
pub async fn ensure_node(client: &Client, name: &str) {
    let nodes: Api<Node> = Api::all(client.clone());
    if nodes.get_opt(name).await.expect("get node").is_some() {
        return;
    }
    let node: Node = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
    }))
    .unwrap();
    match nodes.create(&PostParams::default(), &node).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => panic!("create node {name}: {e}"),
    }
}

/// Creates a pod bound to `NODE` (so that deletion is graceful, as with a real kubelet).
pub async fn create_pod(client: &Client, ns: &str, spec: &PodSpec) -> Pod {
    ensure_node(client, NODE).await;
    let ports: Vec<_> = spec
        .ports
        .iter()
        .map(|(n, p)| if n.is_empty() { json!({"containerPort": p}) } else { json!({"name": n, "containerPort": p}) })
        .collect();
    let gates: Vec<_> = spec.readiness_gates.iter().map(|g| json!({"conditionType": g})).collect();
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": spec.name, "namespace": ns, "labels": spec.labels, "annotations": spec.annotations},
        "spec": {
            "nodeName": NODE,
            "containers": [{"name": "app", "image": "example.invalid/app:1", "ports": ports}],
            "readinessGates": gates,
        },
    }))
    .unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    pods.create(&PostParams::default(), &pod).await.unwrap_or_else(|e| panic!("create pod {}: {e}", spec.name))
}

/// The IP the tests give pod number `i` (10.x.y.z, unique for i < 16M).
pub fn pod_ip(i: usize) -> String {
    format!("10.{}.{}.{}", (i >> 16) & 0xff, (i >> 8) & 0xff, i & 0xff)
}

fn now() -> String {
    // Whole seconds, truncated, as metav1.Time serializes.
    let now = k8s_openapi::jiff::Timestamp::now().as_second();
    k8s_openapi::jiff::Timestamp::from_second(now).unwrap().to_string()
}

/// Runs an idempotent write (a patch) as the kubelet does: a 5xx from the API server (its
/// own storage hiccuping, e.g. "rpc error: code = Internal desc = unexpected EOF" seen once
/// in CI on a 200 KiB pod) is tried again, a few times, before the test gives up.
async fn kubelet_write<T, F, Fut>(what: &str, mut call: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, kube::Error>>,
{
    let mut attempt = 0;
    loop {
        match call().await {
            Ok(v) => return v,
            Err(kube::Error::Api(e)) if e.code >= 500 && attempt < 4 => {
                attempt += 1;
                eprintln!("{what}: the API server answered {} ({}); trying again", e.code, e.message);
                // A backoff between tries, not a wait for a condition.
                tokio::time::sleep(std::time::Duration::from_millis(200 * attempt)).await;
            }
            Err(e) => panic!("{what}: {e}"),
        }
    }
}

/// Marks the pod Running with `ip` and its Ready condition `ready`, as the kubelet would.
pub async fn set_ready(client: &Client, ns: &str, name: &str, ip: &str, ready: bool) -> Pod {
    let status = if ready { "True" } else { "False" };
    let t = now();
    let cond = |type_: &str, st: &str| json!({"type": type_, "status": st, "lastTransitionTime": t});
    let conditions = [cond("Initialized", "True"), cond("ContainersReady", status), cond("Ready", status), cond("PodScheduled", "True")];
    patch_running(client, ns, name, ip, &conditions).await
}

/// Patches the pod's status as the kubelet reports a running pod: phase, IPs, conditions.
async fn patch_running(client: &Client, ns: &str, name: &str, ip: &str, conditions: &[serde_json::Value]) -> Pod {
    let patch = json!({
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": "192.0.2.1", "conditions": conditions},
    });
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let (pp, patch) = (PatchParams::default(), Patch::Strategic(&patch));
    kubelet_write(&format!("patch status of {name}"), || pods.patch_status(name, &pp, &patch)).await
}

/// For a pod with podlease's readiness gate: its containers turn ready (or not), and its
/// Ready condition follows them and the gate, as the kubelet computes it (called again with
/// the same state, it folds a changed gate into Ready). Transition times change only with
/// the status, as the kubelet keeps them.
pub async fn set_containers_ready(client: &Client, ns: &str, name: &str, ip: &str, ready: bool) -> Pod {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let pod = pods.get(name).await.expect("get pod");
    let gate_open = gate_condition(&pod).is_some_and(|c| c.status == "True");
    let t = now();
    let status = |b: bool| if b { "True" } else { "False" };
    let cond = |type_: &str, st: &str| {
        let since = pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.type_ == type_ && c.status == st))
            .and_then(|c| c.last_transition_time.as_ref())
            .map(|t| t.0.to_string())
            .unwrap_or_else(|| t.clone());
        json!({"type": type_, "status": st, "lastTransitionTime": since})
    };
    let conditions = [
        cond("Initialized", "True"),
        cond("ContainersReady", status(ready)),
        cond("Ready", status(ready && gate_open)),
        cond("PodScheduled", "True"),
    ];
    patch_running(client, ns, name, ip, &conditions).await
}

/// The pod's `podlease.io/registered` condition, if it has one.
pub fn gate_condition(pod: &Pod) -> Option<k8s_openapi::api::core::v1::PodCondition> {
    pod.status.as_ref()?.conditions.as_ref()?.iter().find(|c| c.type_ == podlease::pod::GATE).cloned()
}

/// Sets the pod's phase (e.g. "Succeeded") keeping everything else.
pub async fn set_phase(client: &Client, ns: &str, name: &str, phase: &str) -> Pod {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let patch = json!({"status": {"phase": phase}});
    let (pp, patch) = (PatchParams::default(), Patch::Merge(&patch));
    kubelet_write(&format!("patch phase of {name}"), || pods.patch_status(name, &pp, &patch)).await
}

/// Merge-patches the pod's labels (a `null` value removes a label).
pub async fn patch_labels(client: &Client, ns: &str, name: &str, labels: serde_json::Value) -> Pod {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let patch = json!({"metadata": {"labels": labels}});
    let (pp, patch) = (PatchParams::default(), Patch::Merge(&patch));
    kubelet_write(&format!("patch labels of {name}"), || pods.patch(name, &pp, &patch)).await
}

/// Merge-patches the pod's annotations (a `null` value removes one).
pub async fn patch_annotations(client: &Client, ns: &str, name: &str, annotations: serde_json::Value) -> Pod {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let patch = json!({"metadata": {"annotations": annotations}});
    let (pp, patch) = (PatchParams::default(), Patch::Merge(&patch));
    kubelet_write(&format!("patch annotations of {name}"), || pods.patch(name, &pp, &patch)).await
}

/// Deletes the pod gracefully: it stays, terminating, until `force_delete`.
pub async fn delete_graceful(client: &Client, ns: &str, name: &str) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    pods.delete(name, &DeleteParams::default().grace_period(30))
        .await
        .unwrap_or_else(|e| panic!("delete {name}: {e}"));
}

/// Deletes the pod at once (grace period 0), as the kubelet confirms a termination.
pub async fn force_delete(client: &Client, ns: &str, name: &str) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    match pods.delete(name, &DeleteParams::default().grace_period(0)).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => panic!("force delete {name}: {e}"),
    }
}

/// Creates a namespace (idempotent).
pub async fn ensure_namespace(client: &Client, name: &str) {
    use k8s_openapi::api::core::v1::Namespace;
    let api: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})).unwrap();
    match api.create(&PostParams::default(), &ns).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => panic!("create namespace {name}: {e}"),
    }
}

/// Creates a ServiceRegistration `name` in `ns` with the given spec.
pub async fn create_registration(client: &Client, ns: &str, name: &str, spec: serde_json::Value) -> podlease::registration::ServiceRegistration {
    let api: Api<podlease::registration::ServiceRegistration> = Api::namespaced(client.clone(), ns);
    let obj = serde_json::from_value(json!({
        "apiVersion": "podlease.io/v1alpha1", "kind": "ServiceRegistration",
        "metadata": {"name": name}, "spec": spec,
    }))
    .unwrap();
    api.create(&PostParams::default(), &obj).await.unwrap_or_else(|e| panic!("create ServiceRegistration {name}: {e}"))
}

/// Every Event in `ns` about the object named `name` (a pod, a ServiceRegistration).
pub async fn events_about(client: &Client, ns: &str, name: &str) -> Vec<k8s_openapi::api::events::v1::Event> {
    let api: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), ns);
    let all = api.list(&Default::default()).await.unwrap_or_else(|e| panic!("list events in {ns}: {e}"));
    all.items.into_iter().filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)).collect()
}

/// Waits for an Event with `reason` about the object named `name` in `ns`, and returns it.
pub async fn wait_event_about(client: &Client, ns: &str, name: &str, reason: &str) -> k8s_openapi::api::events::v1::Event {
    super::wait_until(&format!("a {reason} Event about {name}"), super::DEADLINE, || async {
        events_about(client, ns, name).await.into_iter().find(|e| e.reason.as_deref() == Some(reason))
    })
    .await
}
