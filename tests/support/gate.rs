//! One timeline of what users see during a readiness-gate scenario: every change of a
//! pod's `podlease.io/registered` condition (from a pod watch) and every etcd event under a
//! prefix (from an etcd watch), each with the instant it arrived, to check their order.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{EventType, WatchOptions};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::runtime::{watcher, WatchStreamExt};

use super::kubelet::gate_condition;
use super::{DEADLINE, wait_until};

/// A change of one pod's gate condition.
#[derive(Debug, Clone, PartialEq)]
pub struct GateSeen {
    pub pod: String,
    pub uid: String,
    pub status: String,
    pub reason: String,
    pub message: String,
    pub since: String,
    pub at: Instant,
}

/// An etcd event.
#[derive(Debug, Clone, PartialEq)]
pub struct KeySeen {
    pub key: String,
    pub put: bool,
    pub lease: i64,
    pub at: Instant,
}

#[derive(Clone, Default)]
pub struct Timeline {
    pub gates: Arc<Mutex<Vec<GateSeen>>>,
    pub keys: Arc<Mutex<Vec<KeySeen>>>,
}

impl Timeline {
    /// Watches the gates of pods in `ns` and etcd under `prefix`, from now on; returns once
    /// both watches are established.
    pub async fn start(kube: &kube::Client, ns: &str, etcd: &etcd_client::Client, prefix: &str) -> Timeline {
        let t = Timeline::default();
        let mut w = etcd.watch_client();
        let mut stream = w.watch(prefix, Some(WatchOptions::new().with_prefix())).await.expect("etcd watch");
        let keys = t.keys.clone();
        tokio::spawn(async move {
            let _keep = w;
            while let Ok(Some(resp)) = stream.message().await {
                let at = Instant::now();
                for ev in resp.events() {
                    let kv = ev.kv().unwrap();
                    keys.lock().unwrap().push(KeySeen {
                        key: kv.key_str().unwrap().to_string(),
                        put: ev.event_type() == EventType::Put,
                        lease: kv.lease(),
                        at,
                    });
                }
            }
        });
        let pods: Api<Pod> = Api::namespaced(kube.clone(), ns);
        let gates = t.gates.clone();
        let (synced_tx, synced_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let mut synced_tx = Some(synced_tx);
            let mut last: std::collections::HashMap<(String, String), GateSeen> = Default::default();
            // With backoff: without it a watcher retries a failing API server in a busy loop.
            let mut events = watcher(pods, watcher::Config::default()).default_backoff().boxed();
            while let Some(ev) = events.next().await {
                let at = Instant::now();
                let pod = match ev {
                    Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p)) => p,
                    Ok(watcher::Event::InitDone) => {
                        if let Some(tx) = synced_tx.take() {
                            let _ = tx.send(());
                        }
                        continue;
                    }
                    _ => continue,
                };
                let Some(c) = gate_condition(&pod) else { continue };
                let seen = GateSeen {
                    pod: pod.metadata.name.clone().unwrap_or_default(),
                    uid: pod.metadata.uid.clone().unwrap_or_default(),
                    status: c.status,
                    reason: c.reason.unwrap_or_default(),
                    message: c.message.unwrap_or_default(),
                    since: c.last_transition_time.map(|t| t.0.to_string()).unwrap_or_default(),
                    at,
                };
                let id = (seen.pod.clone(), seen.uid.clone());
                let changed = last.get(&id).is_none_or(|l| (&l.status, &l.reason, &l.message, &l.since) != (&seen.status, &seen.reason, &seen.message, &seen.since));
                if changed {
                    last.insert(id, seen.clone());
                    gates.lock().unwrap().push(seen);
                }
            }
        });
        tokio::time::timeout(DEADLINE, synced_rx).await.expect("pod watch listed").unwrap();
        t
    }

    /// Waits until pod `pod` shows the gate with `status` and `reason`, and returns when it
    /// was first seen so.
    pub async fn wait_gate(&self, pod: &str, status: &str, reason: &str, within: Duration) -> GateSeen {
        wait_until(&format!("gate of {pod}: {status} {reason}"), within, || async {
            self.gates.lock().unwrap().iter().find(|g| g.pod == pod && g.status == status && g.reason == reason).cloned()
        })
        .await
    }

    /// The first PUT (or DELETE) of `key` at or after `after`.
    pub async fn wait_key_event(&self, key: &str, put: bool, after: Instant, within: Duration) -> KeySeen {
        wait_until(&format!("{} of {key}", if put { "PUT" } else { "DELETE" }), within, || async {
            self.keys.lock().unwrap().iter().find(|k| k.key == key && k.put == put && k.at >= after).cloned()
        })
        .await
    }

    pub fn gate_changes(&self, pod: &str) -> Vec<GateSeen> {
        self.gates.lock().unwrap().iter().filter(|g| g.pod == pod).cloned().collect()
    }
}
