//! The chart through real Helm (helm-python-sdk, see scripts/helm.py) and applied to the
//! test bed's apiserver.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};

use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::core::GroupVersionKind;
use kube::discovery::{Scope, pinned_kind};
use kube::Client;
use serde_json::Value;

use super::Binaries;

pub const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/charts/podlease");
const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/helm.py");

/// scripts/helm.py with `args`, `values` as JSON on its stdin.
fn run(args: &[&std::ffi::OsStr], values: &Value) -> std::process::Output {
    let mut child = Command::new(&Binaries::locate().helm_python)
        .arg(SCRIPT)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run scripts/helm.py");
    child.stdin.take().unwrap().write_all(values.to_string().as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

fn helm(args: &[&str], values: &Value) -> (bool, String) {
    let os: Vec<&std::ffi::OsStr> = args.iter().map(std::ffi::OsStr::new).collect();
    let out = run(&os, values);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    if !out.status.success() && text.is_empty() {
        panic!("helm.py {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    (out.status.success(), text)
}

/// `helm install` (creating the namespace) or `helm upgrade` of release `name` in `ns` on
/// the cluster of `kubeconfig`, with real Helm (scripts/helm.py); the release summary.
/// Panics with Helm's error.
pub fn release(action: &str, chart: &std::path::Path, name: &str, ns: &str, kubeconfig: &std::path::Path, values: &Value) -> Value {
    let out = run(&[action.as_ref(), chart.as_os_str(), name.as_ref(), ns.as_ref(), kubeconfig.as_os_str()], values);
    assert!(out.status.success(), "helm {action} {name}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("helm {action} printed no release ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

/// Rendered manifests as objects, CRDs first, for the test bed's Kubernetes release.
pub fn render(values: &Value, release: &str, namespace: &str) -> Vec<Value> {
    let (ok, out) = helm(&["render", CHART, release, namespace, &super::Binaries::locate().kube_version], values);
    assert!(ok, "render failed: {out}");
    let files: BTreeMap<String, String> = serde_json::from_str(&out).expect("render output");
    let mut objects: Vec<Value> = Vec::new();
    for (path, text) in &files {
        if path.ends_with("NOTES.txt") {
            continue;
        }
        let docs: Vec<Value> = serde_saphyr::from_multiple(text).unwrap_or_else(|e| panic!("{path}: {e}"));
        objects.extend(docs.into_iter().filter(|d| d.is_object()));
    }
    objects.sort_by_key(|o| if o["kind"] == "CustomResourceDefinition" { 0 } else { 1 });
    objects
}

/// NOTES.txt as rendered.
pub fn notes(values: &Value) -> String {
    let (ok, out) = helm(&["render", CHART, "rel", "podlease-system", &super::Binaries::locate().kube_version], values);
    assert!(ok);
    let files: BTreeMap<String, String> = serde_json::from_str(&out).unwrap();
    files.into_iter().find(|(p, _)| p.ends_with("NOTES.txt")).map(|(_, t)| t).unwrap_or_default()
}

/// `helm lint --strict` findings of warning level or worse.
pub fn lint_problems(values: &Value) -> Vec<String> {
    let (_, out) = helm(&["lint", CHART, &super::Binaries::locate().kube_version], values);
    let report: Value = serde_json::from_str(&out).expect("lint report");
    let mut problems: Vec<String> = report["errors"].as_array().unwrap().iter().map(|e| e.to_string()).collect();
    for m in report["messages"].as_array().unwrap() {
        if m["severity"].as_i64().unwrap_or(0) >= 2 {
            problems.push(m.to_string());
        }
    }
    problems
}

/// Schema validation: Err(message) when the values are rejected.
pub fn validate(values: &Value) -> Result<(), String> {
    match helm(&["validate", CHART], values) {
        (true, _) => Ok(()),
        (false, msg) => Err(msg),
    }
}

/// Server-side applies one object; panics with the apiserver's answer if it is refused.
pub async fn apply(client: &Client, obj: &Value) {
    let api_version = obj["apiVersion"].as_str().unwrap();
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let gvk = GroupVersionKind::gvk(group, version, obj["kind"].as_str().unwrap());
    let (ar, caps) = pinned_kind(client, &gvk).await.unwrap_or_else(|e| panic!("{gvk:?} is not served: {e}"));
    let name = obj["metadata"]["name"].as_str().unwrap();
    let api: Api<DynamicObject> = match caps.scope {
        Scope::Cluster => Api::all_with(client.clone(), &ar),
        Scope::Namespaced => Api::namespaced_with(client.clone(), obj["metadata"]["namespace"].as_str().unwrap_or("default"), &ar),
    };
    api.patch(name, &PatchParams::apply("helm-test").force(), &Patch::Apply(obj))
        .await
        .unwrap_or_else(|e| panic!("the apiserver refused {} {name}: {e}", obj["kind"]));
}
