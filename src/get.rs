//! `podlease get`: what a consumer of one service sees, read the reliable way: a full Get,
//! then (with --watch) a Watch from the Get's revision + 1, so nothing falls in between.

use std::io::Write;

use etcd_client::{EventType, GetOptions, WatchOptions};

use crate::cli::GetArgs;
use crate::format::FormatOptions;
use crate::validate::{Prefix, ServiceName, shown};

pub async fn run(args: GetArgs) -> anyhow::Result<()> {
    // Like `run`: endpoints of different etcd clusters are refused.
    let client = args.etcd.config().connect_checked().await?;
    let layout = args.format.layout();
    let prefix = args.prefix.as_deref().unwrap_or(layout.default_prefix());
    let prefix = Prefix::parse(prefix).map_err(|e| anyhow::anyhow!("--prefix {}: {e}", shown(prefix)))?;
    let service = ServiceName::parse(&args.service, args.format).map_err(|e| anyhow::anyhow!("--service {}: {e}", shown(&args.service)))?;
    let mut options = FormatOptions::default();
    if let Some(zone) = &args.zone {
        anyhow::ensure!(args.format == crate::format::Format::Skydns, "--zone is for --format skydns only");
        options.zone = Some(crate::validate::zone(zone, &service, &args.namespace).map_err(|e| anyhow::anyhow!("--zone {}: {e}", shown(zone)))?);
    }
    let service_prefix = layout.service_prefix(&prefix, &service, &args.namespace, &options);
    let timeout = args.etcd.config().call_timeout;

    let mut kv = client.kv_client();
    let resp = tokio::time::timeout(timeout, kv.get(service_prefix.as_str(), Some(GetOptions::new().with_prefix())))
        .await
        .map_err(|_| anyhow::anyhow!("etcd get timed out after {timeout:?}"))??;
    let mut out = std::io::stdout().lock();
    for kv in resp.kvs() {
        writeln!(out, "{} {}", String::from_utf8_lossy(kv.key()), String::from_utf8_lossy(kv.value()))?;
    }
    out.flush()?;
    drop(out);
    if !args.watch {
        return Ok(());
    }
    let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
    let mut watch = client.watch_client();
    // Opening the watch has the deadline of every call; the stream itself lives until it ends.
    let mut stream = tokio::time::timeout(timeout, watch.watch(service_prefix.as_str(), Some(WatchOptions::new().with_prefix().with_start_revision(revision + 1))))
        .await
        .map_err(|_| anyhow::anyhow!("opening the etcd watch timed out after {timeout:?}"))??;
    while let Some(resp) = stream.message().await? {
        let mut out = std::io::stdout().lock();
        for ev in resp.events() {
            let Some(kv) = ev.kv() else { continue };
            match ev.event_type() {
                EventType::Put => writeln!(out, "PUT {} {}", String::from_utf8_lossy(kv.key()), String::from_utf8_lossy(kv.value()))?,
                EventType::Delete => writeln!(out, "DELETE {}", String::from_utf8_lossy(kv.key()))?,
            }
        }
        out.flush()?;
    }
    Ok(())
}
