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
    let node_ip = cluster.node_ip.clone();
    for p in &running_pods {
        let status = p.status.as_ref().unwrap();
        assert_eq!(status.pod_ip.as_deref(), Some(node_ip.as_str()), "hostNetwork pod has the node's address");
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
