//! The test bed is real: a kube-apiserver v1.37.2 that stores pods, a registry etcd 3.6
//! with working leases, and two beds side by side without clashing.

mod support;

use std::time::{Duration, Instant};

use etcd_client::PutOptions;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use support::*;

#[tokio::test]
async fn the_api_server_is_v1_37_2_the_registry_etcd_3_6_and_pods_are_stored() {
    let bed = TestBed::start().await;
    let version = bed.kube.apiserver_version().await.expect("version");
    assert_eq!(version.git_version, "v1.37.2", "{version:?}");
    assert_eq!(Binaries::locate().kube_version, "v1.37.2");
    let status = bed.etcd.maintenance_client().status().await.expect("etcd status");
    assert!(status.version().starts_with("3.6."), "the registry etcd is {}", status.version());

    create_pod(&bed.kube, "default", &PodSpec::new("p1").label("app", "a")).await;
    let pods: Api<Pod> = Api::namespaced(bed.kube.clone(), "default");
    let pod = pods.get("p1").await.expect("stored pod");
    assert_eq!(pod.spec.unwrap().node_name.as_deref(), Some(NODE));
}

#[tokio::test]
async fn a_pod_patched_ready_reads_back_ready() {
    let bed = TestBed::start().await;
    create_pod(&bed.kube, "default", &PodSpec::new("p1")).await;
    set_ready(&bed.kube, "default", "p1", "10.0.0.1", true).await;
    let pods: Api<Pod> = Api::namespaced(bed.kube.clone(), "default");
    let status = pods.get("p1").await.unwrap().status.unwrap();
    assert_eq!(status.pod_ip.as_deref(), Some("10.0.0.1"));
    let ready = status.conditions.unwrap().into_iter().find(|c| c.type_ == "Ready").unwrap();
    assert_eq!(ready.status, "True");

    set_ready(&bed.kube, "default", "p1", "10.0.0.1", false).await;
    let ready = pods.get("p1").await.unwrap().status.unwrap().conditions.unwrap().into_iter().find(|c| c.type_ == "Ready").unwrap();
    assert_eq!(ready.status, "False");
}

#[tokio::test]
async fn a_graceful_delete_leaves_the_pod_terminating_until_forced() {
    let bed = TestBed::start().await;
    create_pod(&bed.kube, "default", &PodSpec::new("p1")).await;
    delete_graceful(&bed.kube, "default", "p1").await;
    let pods: Api<Pod> = Api::namespaced(bed.kube.clone(), "default");
    let pod = pods.get("p1").await.expect("still there while terminating");
    assert!(pod.metadata.deletion_timestamp.is_some());
    force_delete(&bed.kube, "default", "p1").await;
    wait_until("pod gone", DEADLINE, || async { pods.get_opt("p1").await.ok()?.is_none().then_some(()) }).await;
}

#[tokio::test]
async fn the_registry_etcd_expires_leases() {
    let bed = TestBed::start().await;

    let mut lc = bed.etcd.lease_client();
    let lease = lc.grant(2, None).await.unwrap().id();
    let mut kv = bed.etcd.kv_client();
    kv.put("/smoke/k", "v", Some(PutOptions::new().with_lease(lease))).await.unwrap();
    let start = Instant::now();
    support::etcd::wait_key(&bed.etcd, "/smoke/k").await;
    support::etcd::wait_absent(&bed.etcd, "/smoke/k", Duration::from_secs(10)).await;
    let gone_after = start.elapsed();
    // etcd expires a 2 s lease after 2 s (plus its checkpoint tick), never before.
    assert!(gone_after >= Duration::from_millis(1500), "vanished too early: {gone_after:?}");
}

#[tokio::test]
async fn two_test_beds_run_side_by_side() {
    let (a, b) = tokio::join!(TestBed::start(), TestBed::start());
    assert_ne!(a.apiserver.port, b.apiserver.port);
    assert_ne!(a.etcd_endpoint(), b.etcd_endpoint());
    create_pod(&a.kube, "default", &PodSpec::new("only-in-a")).await;
    let pods_b: Api<Pod> = Api::namespaced(b.kube.clone(), "default");
    assert!(pods_b.get_opt("only-in-a").await.unwrap().is_none());
    let mut kv = a.etcd.kv_client();
    kv.put("/only/a", "1", None).await.unwrap();
    assert!(support::etcd::keys(&b.etcd, "/only/").await.is_empty());
}

#[tokio::test]
async fn dropping_the_bed_stops_its_processes() {
    let bed = TestBed::start().await;
    let pids = [bed.registry.pid().unwrap()];
    let port = bed.apiserver.port;
    drop(bed);
    for pid in pids {
        assert!(support::proc::has_exited(pid), "etcd {pid} survived");
    }
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err(), "apiserver still listening");
}

#[tokio::test]
async fn the_apiserver_restarts_on_its_port_and_can_be_stalled() {
    let mut bed = TestBed::start().await;
    let (port, pid) = (bed.apiserver.port, bed.apiserver.pid());
    create_pod(&bed.kube, "default", &PodSpec::new("before")).await;
    bed.restart_apiserver().await;
    assert_eq!(bed.apiserver.port, port, "same port");
    assert_ne!(bed.apiserver.pid(), pid, "a new process");
    let pods: Api<Pod> = Api::namespaced(bed.kube.clone(), "default");
    assert!(pods.get_opt("before").await.unwrap().is_some(), "same storage");

    bed.stall_apiserver();
    let stalled = tokio::time::timeout(Duration::from_secs(2), pods.get("before")).await;
    assert!(stalled.is_err(), "a stalled apiserver answered: {stalled:?}");
    bed.resume_apiserver();
    wait_until("the apiserver answers again", DEADLINE, || async { pods.get("before").await.ok() }).await;
}

#[tokio::test]
async fn a_registry_cluster_serves_with_a_member_down_and_takes_it_back() {
    let mut bed = TestBed::start_with_registry_cluster(3).await;
    assert_eq!(bed.etcd_endpoints().len(), 3);
    let kv = bed.etcd.kv_client();
    kv.clone().put("/c/1", "a", None).await.unwrap();
    bed.kill_registry_member(1);
    assert!(!bed.registry_member(1).is_running());
    wait_until("a write with a member down", DEADLINE, || {
        let mut kv = kv.clone();
        async move { kv.put("/c/2", "b", None).await.ok() }
    })
    .await;
    bed.resume_registry_member(1);
    // The restarted member catches up: read from it alone.
    let alone = etcd_client::Client::connect([bed.registry_member(1).endpoint()], None).await.unwrap();
    wait_until("member 1 caught up", DEADLINE, || {
        let mut kv = alone.kv_client();
        async move {
            let n = kv.get("/c/", Some(etcd_client::GetOptions::new().with_prefix())).await.ok()?.kvs().len();
            (n == 2).then_some(())
        }
    })
    .await;
}

/// The project's shell scripts never pipe into a reader that may stop early (`head`,
/// `grep -q`, `grep -m`, `grep -l`, an awk program that exits): under `set -o pipefail` the
/// writer's SIGPIPE fails the whole pipeline at random, which once made the setup fail one
/// run in seven on a busy machine. Every file under scripts/ (every directory, scripts/node/
/// included) and .ci/, and the Makefile; a line ending in `\` is read together with the next.
#[test]
fn no_script_pipes_into_a_reader_that_stops_early() {
    // A pipe (`|` or `|&`, not `||`) into such a reader.
    let early = regex::Regex::new(r"(?:^|[^|])\|&?\s*(head\b|grep\s+(-[a-zA-Z]*[qml]|--quiet|--silent|--max-count|--files-with)|awk\s+'[^']*\bexit\b)").unwrap();
    // The first line number of each command that does, comments left out and a line ending
    // in `\` joined with the next.
    let flagged = |text: &str| -> Vec<(usize, String)> {
        let mut found = Vec::new();
        let mut command: Option<(usize, String)> = None;
        for (i, line) in text.lines().enumerate() {
            let code = if line.trim_start().starts_with('#') { "" } else { line.split(" #").next().unwrap_or("") };
            let (code, continued) = match code.trim_end().strip_suffix('\\') {
                Some(rest) => (rest, true),
                None => (code, false),
            };
            let c = command.get_or_insert_with(|| (i + 1, String::new()));
            c.1.push_str(code);
            c.1.push(' ');
            if !continued && let Some((n, c)) = command.take() && early.is_match(&c) {
                found.push((n, c.split_whitespace().collect::<Vec<_>>().join(" ")));
            }
        }
        found.extend(command.filter(|(_, c)| early.is_match(c)));
        found
    };
    // The check itself: a continued line is one command; comments and `||` are no pipe.
    let sample = "set -o pipefail\nv=$(cmd --version \\\n  | head -1)\n# cmd | head\ncmd || head\ncmd # | grep -q x\nyes |& grep -qE y\nls | awk '{print; exit}'\nls | awk '{print}' || exit 1\n";
    assert_eq!(flagged(sample).iter().map(|(n, _)| *n).collect::<Vec<_>>(), [2, 7, 8], "{:#?}", flagged(sample));

    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    fn walk(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())).map(|e| e.unwrap().path()).collect();
        entries.sort();
        for p in entries {
            if p.is_dir() {
                walk(&p, out);
            } else if p.is_file() && std::fs::read_to_string(&p).is_ok() {
                out.push(p);
            }
        }
    }
    let mut scripts = vec![root.join("Makefile")];
    for dir in ["scripts", ".ci"] {
        walk(&root.join(dir), &mut scripts);
    }
    assert!(scripts.iter().any(|p| p.starts_with(root.join("scripts/node"))), "scripts/node/ was not read: {scripts:#?}");
    let mut found = Vec::new();
    for p in &scripts {
        for (n, command) in flagged(&std::fs::read_to_string(p).unwrap()) {
            found.push(format!("{}:{n}: {command}", p.strip_prefix(root).unwrap_or(p).display()));
        }
    }
    assert!(found.is_empty(), "pipes into an early-exiting reader: {found:#?}");
}

/// The same on etcd 3.5, the registry's compatibility run.
mod on_etcd_3_5 {
    use super::support::{run_on, Release};

    #[test]
    fn the_registry_etcd_is_3_5_and_expires_leases() {
        run_on(Release::Etcd35);
        let version = super::support::Binaries::locate().describe();
        assert!(version.contains("etcd Version: 3.5."), "{version}");
        super::the_registry_etcd_expires_leases();
    }
}
