//! An install's identity (owner prefix, cluster id, install id) names where its ownership
//! records live. Changing it silently would orphan every record: the new identity adopts
//! nothing, every key conflicts, then expires. So it is checked at start: none of ours, and
//! records of the identity the leader Lease recorded (or of this cluster in the layout from
//! before install ids) in namespaces this install watches, mean the identity changed;
//! podlease refuses to start and says what to do, or, with `--migrate-from=<old identity>`,
//! moves the records over (same leases, the keys untouched: consumers see nothing).


use etcd_client::{Compare, CompareOp, KeyValue, PutOptions, Txn, TxnOp};
use tracing::{info, warn};

use super::adopt::scan;
use super::claim::Claims;
use super::owner::Owners;
use super::write::{OpError, Writer, is_lease_not_found};
use super::RegistryConfig;

/// Where a key under the owner prefix belongs: (identity, namespace of a record, or None
/// for the identity's fence key). Both layouts are known: `<cluster>/<install>/<ns>/<pod>/
/// <source>` and, from before install ids, `<cluster>/<ns>/<pod>/<source>`. Anything else
/// (claims, segments starting with `@`) is not an identity's.
pub fn classify(owner_prefix: &str, key: &str) -> Option<(String, Option<String>)> {
    let owner = owner_prefix.trim_end_matches('/');
    let rest = key.strip_prefix(owner)?.strip_prefix('/')?;
    let s: Vec<&str> = rest.split('/').collect();
    if s.iter().any(|p| p.is_empty()) || s[..s.len().min(2)].iter().any(|p| p.starts_with('@')) {
        return None;
    }
    let root = |n: usize| format!("{owner}/{}", s[..n].join("/"));
    match s.len() {
        1 => Some((root(1), None)),
        2 => Some((root(2), None)),
        4 => Some((root(1), Some(s[1].to_string()))),
        5 => Some((root(2), Some(s[2].to_string()))),
        _ => None,
    }
}

/// Checks this install's identity against what etcd holds. `previous` is the identity the
/// leader Lease recorded (the last leader's). Err: podlease must not start (the message says
/// what to do). With `migrate_from`, the records are moved when this replica first leads.
///
/// Two earlier identities are recognised, whatever their state: the one the Lease recorded
/// (any owner prefix), and this cluster's records in the layout from before install ids
/// (`<owner-prefix>/<cluster-id>/`), which a rolling upgrade finds while the old leader
/// still runs. Other installs' records are never taken for an earlier identity of this one.
pub async fn check(client: &crate::etcd::Connection, config: &RegistryConfig, previous: Option<&str>) -> Result<(), CheckError> {
    let w = &Writer { client: client.clone(), owners: config.owners(), claims: Claims::default(), timeout: config.call_timeout, fence: None, pool: Default::default() };
    let mine = config.fence_key();
    if let Some(from) = &config.migrate_from {
        let from = from.trim_end_matches('/');
        let n = count(w, from, config).await?;
        if n == 0 && count(w, &mine, config).await? == 0 {
            warn!(from, "--migrate-from names an identity with no records here, and this install has none either: check the path");
        }
        info!(from, records = n, "will take over the records of {from} when this replica leads");
        return Ok(());
    }
    if count(w, &mine, config).await? > 0 {
        return Ok(());
    }
    let legacy = format!("{}/{}", config.owner_prefix.trim_end_matches('/'), config.cluster_id);
    let mut candidates: Vec<String> = previous.map(|p| p.trim_end_matches('/').to_string()).filter(|p| *p != mine).into_iter().collect();
    if !candidates.contains(&legacy) {
        candidates.push(legacy);
    }
    let mut found = Vec::new();
    for root in candidates {
        let n = count(w, &root, config).await?;
        if n > 0 {
            found.push((root, n));
        }
    }
    let Some((first, _)) = found.first() else {
        return Ok(());
    };
    let list: Vec<String> = found.iter().map(|(root, n)| format!("{n} records of {root}")).collect();
    Err(CheckError::Refused(format!(
        "refusing to start: this install's identity is {mine}, but etcd holds none of its ownership records and holds those of an earlier identity: {}. \
         The cluster id, install id or owner prefix changed (or podlease was upgraded from a release without install ids); starting anyway would orphan them (every key would conflict, then expire, and consumers would see its instance vanish). \
         To take them over without a DELETE, start with --migrate-from={first} (the chart's migrateFrom). If they belong to an install that is gone for good, delete them with `etcdctl del --prefix {first}/` (their keys then expire within their TTL).",
        list.join("; ")
    )))
}

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// Starting would orphan records: the message says what to do.
    #[error("{0}")]
    Refused(String),
    /// etcd did not answer: try again.
    #[error("checking this install's identity in etcd: {0}")]
    Etcd(#[from] OpError),
}

/// Live records (under a lease) of identity `root` in namespaces this install watches.
async fn count(w: &Writer, root: &str, config: &RegistryConfig) -> Result<usize, OpError> {
    let owners = Owners::at(root);
    let mut n = 0;
    scan(w, &format!("{root}/"), true, |kv| {
        if kv.lease() != 0
            && let Some(id) = kv.key_str().ok().and_then(|k| owners.parse_key(k))
            && config.watches(&id.namespace)
        {
            n += 1;
        }
    })
    .await?;
    Ok(n)
}

/// Moves every record of identity `from` (in namespaces this install watches) to this
/// install's root: the same lease and value, put at the new path and deleted at the old one,
/// each only if the old one is unchanged. The published keys are not touched. Run by a new
/// leader before it adopts (the previous leader writes nothing by then). `keep` is called
/// with each record's lease and TTL first: nobody else renews them meanwhile, and moving
/// thousands of records must not outlast their TTL.
pub async fn migrate(w: &Writer, config: &RegistryConfig, from: &str, mut keep: impl FnMut(i64, i64)) -> Result<(), OpError> {
    let from = from.trim_end_matches('/');
    let old = Owners::at(from);
    let new = config.owners();
    if old == new {
        return Ok(());
    }
    let mut found: Vec<KeyValue> = Vec::new();
    scan(w, &format!("{from}/"), false, |kv| found.push(kv.clone())).await?;
    let mut moves = Vec::new();
    let mut skipped = 0usize;
    for kv in found {
        let Some(id) = kv.key_str().ok().and_then(|k| old.parse_key(k)) else { continue };
        if kv.lease() == 0 || !config.watches(&id.namespace) {
            skipped += 1;
            continue;
        }
        let ttl = serde_json::from_slice::<super::owner::OwnerRecord>(kv.value()).map_or(MIN_TTL, |r| r.ttl);
        keep(kv.lease(), ttl);
        moves.push((new.key(&id), kv));
    }
    let (mut moved, mut gone) = (0usize, 0usize);
    // A batch per Txn; one whose record changed meanwhile is moved a record at a time.
    for batch in moves.chunks(BATCH) {
        match move_records(w, batch).await? {
            true => moved += batch.len(),
            false => {
                for one in batch {
                    if move_records(w, std::slice::from_ref(one)).await? {
                        moved += 1;
                    } else {
                        gone += 1;
                    }
                }
            }
        }
    }
    if moved + gone + skipped > 0 {
        info!(from, to = new.identity(), moved, gone, skipped, "migrated ownership records to this install's identity");
    } else {
        warn!(from, "--migrate-from: no records there (already migrated?)");
    }
    Ok(())
}

/// Records moved per Txn (two operations and a compare each; etcd allows 128 operations).
const BATCH: usize = 32;
/// TTL assumed for a record that does not say (the least any lease has).
const MIN_TTL: i64 = crate::registration::MIN_TTL_SECONDS;

/// Moves records in one Txn if none changed; false if one did (or its lease is gone).
async fn move_records(w: &Writer, batch: &[(String, KeyValue)]) -> Result<bool, OpError> {
    let when: Vec<Compare> = batch.iter().map(|(_, kv)| Compare::mod_revision(kv.key(), CompareOp::Equal, kv.mod_revision())).collect();
    // A record says which term wrote it: the moved one names this term's fence.
    let rewritten = |kv: &KeyValue| match serde_json::from_slice::<super::owner::OwnerRecord>(kv.value()) {
        Ok(r) => serde_json::to_vec(&super::owner::OwnerRecord { fence: w.fence.as_ref().map(|f| f.revision), ..r }).expect("serializes"),
        Err(_) => kv.value().to_vec(),
    };
    let then: Vec<TxnOp> = batch
        .iter()
        .flat_map(|(to, kv)| [TxnOp::put(to.as_str(), rewritten(kv), Some(PutOptions::new().with_lease(kv.lease()))), TxnOp::delete(kv.key(), None)])
        .collect();
    // Fenced as every write: a leader deposed while migrating moves nothing more.
    match w.txn(Txn::new().when(when).and_then(then)).await {
        Ok(r) => Ok(r.succeeded()),
        Err(OpError::Etcd { source, .. }) if is_lease_not_found(&source) => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_classified_by_layout() {
        let o = "/podlease/owners";
        assert_eq!(classify(o, "/podlease/owners/c1/ns.rel/shop/p/web"), Some(("/podlease/owners/c1/ns.rel".into(), Some("shop".into()))));
        assert_eq!(classify(o, "/podlease/owners/c1/ns.rel"), Some(("/podlease/owners/c1/ns.rel".into(), None)));
        // Before install ids: one root per cluster.
        assert_eq!(classify(o, "/podlease/owners/c1/shop/p/@annotations"), Some(("/podlease/owners/c1".into(), Some("shop".into()))));
        assert_eq!(classify(o, "/podlease/owners/c1"), Some(("/podlease/owners/c1".into(), None)));
        for other in ["/podlease/owners/c1/@claims/x", "/podlease/owners/c1/a/b", "/podlease/owners//x", "/podlease/ownersx/c1", "/elsewhere"] {
            assert_eq!(classify(o, other), None, "{other}");
        }
    }
}
