//! Wires the pieces together: watches → index → registry (etcd) → status writer, plus the
//! HTTP surface. Everything runs until the shutdown token fires.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use kube::Client;
use kube::runtime::watcher::Event;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::desired::{Changes, Defaults, Index};
use crate::etcd::EtcdConfig;
use crate::http;
use crate::kubernetes::events::Events;
use crate::kubernetes::status::{Signal, StatusWriter};
use crate::kubernetes::watch::{self, Input};
use crate::metrics::Metrics;
use crate::registry::{Command, Registry, RegistryConfig};

/// Everything `podlease run` is configured with.
#[derive(Debug, Clone)]
pub struct Settings {
    pub defaults: Defaults,
    pub etcd: EtcdConfig,
    pub registry: RegistryConfig,
    /// Explicit cluster id; default: the UID of namespace kube-system.
    pub cluster_id: Option<String>,
    /// Namespaces to watch; empty = all.
    pub namespaces: Vec<String>,
    pub metrics_addr: SocketAddr,
    /// This replica's name (Events' reporting instance).
    pub instance: String,
}

pub async fn run(client: Client, settings: Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    let metrics = Metrics::new();
    let etcd = settings.etcd.connect().await?;

    let mut registry_config = settings.registry.clone();
    registry_config.cluster_id = match &settings.cluster_id {
        Some(id) => id.clone(),
        None => wait_cluster_id(&client, &shutdown).await?,
    };
    info!(cluster_id = registry_config.cluster_id, "starting");

    let (notice_tx, notice_rx) = mpsc::unbounded_channel();
    let (registry, view) = Registry::new(etcd, registry_config, notice_tx, metrics.clone(), shutdown.clone());
    let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
    let registry_task = tokio::spawn(registry.run(cmd_rx, shutdown.clone()));

    let index = Arc::new(Mutex::new(Index::new(settings.defaults.clone())));
    let events = Events::spawn(client.clone(), settings.instance.clone());
    let (signal_tx, signal_rx) = mpsc::unbounded_channel();
    let writer = StatusWriter::new(client.clone(), index.clone(), view.clone(), events);
    let writer_task = tokio::spawn(writer.run(signal_rx, notice_rx, shutdown.clone()));

    let http_task = tokio::spawn(http::serve(settings.metrics_addr, metrics.clone(), view.clone(), shutdown.clone()));

    let (mut inputs, scopes) = watch::inputs(&client, &settings.namespaces);
    let mut feed = Feed { index, cmd_tx, signal_tx, metrics, scopes, synced: HashSet::new(), seen: HashMap::new(), resynced: false };
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            input = inputs.next() => match input {
                Some(input) => feed.handle(input),
                None => break,
            },
        }
    }
    info!("shutting down; leases are left for the next leader to adopt");
    let _ = tokio::join!(registry_task, writer_task, http_task);
    Ok(())
}

/// Feeds watch events into the index and passes the resulting changes on.
struct Feed {
    index: Arc<Mutex<Index>>,
    cmd_tx: mpsc::UnboundedSender<Command>,
    signal_tx: mpsc::UnboundedSender<Signal>,
    metrics: Metrics,
    /// Watch streams that must list once before the registry may act.
    scopes: usize,
    synced: HashSet<(bool, Option<String>)>,
    /// Objects seen during a (re-)list, per stream, to drop the ones that vanished.
    seen: HashMap<(bool, Option<String>), HashSet<(String, String)>>,
    resynced: bool,
}

impl Feed {
    fn handle(&mut self, input: Input) {
        let changes = {
            let mut index = self.index.lock().unwrap();
            match input {
                Input::Error(e) => {
                    warn!("{e}");
                    return;
                }
                Input::Pod(scope, ev) => {
                    let stream = (true, scope.clone());
                    match ev {
                        Event::Apply(p) => index.apply_pod(p),
                        Event::Delete(p) => index.delete_pod(&p.namespace, &p.name),
                        Event::Init => {
                            self.seen.insert(stream, HashSet::new());
                            Changes::default()
                        }
                        Event::InitApply(p) => {
                            self.seen.entry(stream).or_default().insert((p.namespace.clone(), p.name.clone()));
                            index.apply_pod(p)
                        }
                        Event::InitDone => {
                            let seen = self.seen.remove(&stream).unwrap_or_default();
                            let mut all = Changes::default();
                            for (ns, name) in index.pod_keys() {
                                if scope.as_ref().is_none_or(|s| *s == ns) && !seen.contains(&(ns.clone(), name.clone())) {
                                    merge(&mut all, index.delete_pod(&ns, &name));
                                }
                            }
                            self.synced.insert(stream);
                            all
                        }
                    }
                }
                Input::Registration(scope, ev) => {
                    let stream = (false, scope.clone());
                    match ev {
                        Event::Apply(r) => index.apply_registration(&r),
                        Event::Delete(r) => index.delete_registration(
                            r.metadata.namespace.as_deref().unwrap_or_default(),
                            r.metadata.name.as_deref().unwrap_or_default(),
                        ),
                        Event::Init => {
                            self.seen.insert(stream, HashSet::new());
                            Changes::default()
                        }
                        Event::InitApply(r) => {
                            let key = (r.metadata.namespace.clone().unwrap_or_default(), r.metadata.name.clone().unwrap_or_default());
                            self.seen.entry(stream).or_default().insert(key);
                            index.apply_registration(&r)
                        }
                        Event::InitDone => {
                            let seen = self.seen.remove(&stream).unwrap_or_default();
                            let gone: Vec<(String, String)> = index
                                .registrations()
                                .filter(|(ns, _)| scope.as_ref().is_none_or(|s| s == ns))
                                .filter(|k| !seen.contains(*k))
                                .cloned()
                                .collect();
                            let mut all = Changes::default();
                            for (ns, name) in gone {
                                merge(&mut all, index.delete_registration(&ns, &name));
                            }
                            self.synced.insert(stream);
                            all
                        }
                    }
                }
            }
        };
        if self.resynced {
            for u in changes.updates {
                let _ = self.cmd_tx.send(Command::Update(u));
            }
        }
        for k in changes.registrations {
            let _ = self.signal_tx.send(Signal::Dirty(k));
        }
        for p in changes.problems {
            self.metrics.invalid_annotations.inc();
            let _ = self.signal_tx.send(Signal::Problem(p));
        }
        if !self.resynced && self.synced.len() == self.scopes {
            // Caches are complete: adoption may now tell live registrations from stale ones.
            let index = self.index.lock().unwrap();
            let desired = index.desired();
            info!(instances = desired.len(), "caches synced");
            let _ = self.cmd_tx.send(Command::Resync(desired));
            for k in index.registrations() {
                let _ = self.signal_tx.send(Signal::Dirty(k.clone()));
            }
            self.resynced = true;
        }
    }
}

fn merge(into: &mut Changes, from: Changes) {
    into.updates.extend(from.updates);
    into.registrations.extend(from.registrations);
    into.problems.extend(from.problems);
}

async fn wait_cluster_id(client: &Client, shutdown: &CancellationToken) -> anyhow::Result<String> {
    let mut backoff = crate::registry::lease::Backoff::default();
    loop {
        match crate::kubernetes::cluster_id(client).await {
            Ok(id) => return Ok(id),
            Err(e) => {
                let d = backoff.next();
                warn!(error = %e, retry_in = ?d, "reading the kube-system namespace UID for the cluster id failed (set --cluster-id to skip)");
                tokio::select! {
                    _ = shutdown.cancelled() => anyhow::bail!("shut down before the cluster id was known"),
                    _ = tokio::time::sleep(d) => {}
                }
            }
        }
    }
}
