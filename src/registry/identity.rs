//! An install's identity (owner prefix, cluster id, install id) names where its ownership
//! records live. Changing it silently would orphan every record: the new identity adopts
//! nothing, every key conflicts, then expires. So it is checked at start: records of
//! another identity that nobody runs, in namespaces this install watches, and none of ours,
//! mean the identity changed; podlease refuses to start and says what to do, or, with
//! `--migrate-from=<old identity>`, moves the records over (same leases, the keys untouched:
//! consumers see nothing).

use std::collections::{BTreeMap, BTreeSet};

use etcd_client::{Compare, CompareOp, KeyValue, PutOptions, Txn, TxnOp};
use tracing::{info, warn};

use super::adopt::scan;
use super::owner::{Claims, Owners};
use super::write::{OpError, Writer};
use super::RegistryConfig;

/// What lives under the owner prefix, by identity.
#[derive(Debug, Default, PartialEq)]
pub struct Survey {
    pub roots: BTreeMap<String, Root>,
}

#[derive(Debug, Default, PartialEq)]
pub struct Root {
    pub records: usize,
    pub namespaces: BTreeSet<String>,
    /// Its fence key exists: a replica of that identity runs (or ran seconds ago).
    pub fence: bool,
}

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

impl Survey {
    pub fn add(&mut self, owner_prefix: &str, key: &str) {
        if let Some((root, ns)) = classify(owner_prefix, key) {
            let r = self.roots.entry(root).or_default();
            match ns {
                Some(ns) => {
                    r.records += 1;
                    r.namespaces.insert(ns);
                }
                None => r.fence = true,
            }
        }
    }

    /// Identities nobody runs that hold records in namespaces this install watches.
    pub fn orphans<'a>(&'a self, config: &'a RegistryConfig) -> impl Iterator<Item = (&'a String, &'a Root)> + 'a {
        let mine = config.fence_key();
        self.roots.iter().filter(move |(root, r)| **root != mine && r.records > 0 && !r.fence && r.namespaces.iter().any(|n| config.watches(n)))
    }
}

/// Reads every key under the owner prefix (keys only, a page at a time).
pub async fn survey(w: &Writer, owner_prefix: &str) -> Result<Survey, OpError> {
    let mut survey = Survey::default();
    let prefix = format!("{}/", owner_prefix.trim_end_matches('/'));
    scan(w, &prefix, true, |kv| {
        // podlease writes records and fences under a lease only: anything else is not one.
        if let Ok(k) = kv.key_str()
            && kv.lease() != 0
        {
            survey.add(owner_prefix, k);
        }
    })
    .await?;
    Ok(survey)
}

/// Checks this install's identity against what etcd holds. `previous` is the identity the
/// leader Lease recorded (the last leader's). Err: podlease must not start (the message says
/// what to do). With `migrate_from`, the records are moved when this replica first leads.
pub async fn check(client: &etcd_client::Client, config: &RegistryConfig, previous: Option<&str>) -> anyhow::Result<()> {
    let w = &Writer { client: client.clone(), owners: config.owners(), claims: Claims::default(), timeout: config.call_timeout, fence: None };
    let survey = survey(w, &config.owner_prefix).await?;
    let mine = config.fence_key();
    if let Some(from) = &config.migrate_from {
        let n = survey.roots.get(from.trim_end_matches('/')).map_or(0, |r| r.records);
        info!(from, records = n, "will take over the records of {from} when this replica leads");
        return Ok(());
    }
    if survey.roots.get(&mine).is_some_and(|r| r.records > 0) {
        return Ok(());
    }
    // The last leader's identity, if it differs and still holds records; then identities
    // nobody runs that hold records where this install looks.
    let mut found: Vec<(&String, &Root)> = previous
        .and_then(|p| survey.roots.get_key_value(p.trim_end_matches('/')))
        .filter(|(root, r)| **root != mine && r.records > 0)
        .into_iter()
        .collect();
    let known: Vec<String> = found.iter().map(|(r, _)| (*r).clone()).collect();
    found.extend(survey.orphans(config).filter(|(root, _)| !known.contains(root)));
    let Some((first, _)) = found.first() else {
        return Ok(());
    };
    let list: Vec<String> = found
        .iter()
        .map(|(root, r)| format!("{} records of {root} (namespaces {})", r.records, r.namespaces.iter().cloned().collect::<Vec<_>>().join(", ")))
        .collect();
    anyhow::bail!(
        "refusing to start: this install's identity is {mine}, but etcd holds none of its ownership records and holds those of an earlier identity: {}. \
         The cluster id, install id or owner prefix probably changed; starting anyway would orphan them (every key would conflict, then expire, and consumers would see its instance vanish). \
         To take them over without a DELETE, start with --migrate-from={first} (the chart's migrateFrom). If they belong to an install that is gone for good, delete them with `etcdctl del --prefix {first}/` (their keys then expire within their TTL).",
        list.join("; ")
    )
}

/// Moves every record of identity `from` (in namespaces this install watches) to this
/// install's root: the same lease and value, put at the new path and deleted at the old one
/// in one Txn, if the old one is unchanged. The published keys are not touched. Run by a new
/// leader before it adopts (the previous leader writes nothing by then).
pub async fn migrate(w: &Writer, config: &RegistryConfig, from: &str) -> Result<(), OpError> {
    let from = from.trim_end_matches('/');
    let old = Owners::at(from);
    let new = config.owners();
    if old == new {
        return Ok(());
    }
    let mut found: Vec<KeyValue> = Vec::new();
    scan(w, &format!("{from}/"), false, |kv| found.push(kv.clone())).await?;
    let (mut moved, mut gone, mut skipped) = (0usize, 0usize, 0usize);
    for kv in found {
        let Some(id) = kv.key_str().ok().and_then(|k| old.parse_key(k)) else { continue };
        if kv.lease() == 0 || !config.watches(&id.namespace) {
            skipped += 1;
            continue;
        }
        let txn = Txn::new()
            .when(vec![Compare::mod_revision(kv.key(), CompareOp::Equal, kv.mod_revision())])
            .and_then(vec![TxnOp::put(new.key(&id), kv.value(), Some(PutOptions::new().with_lease(kv.lease()))), TxnOp::delete(kv.key(), None)]);
        let mut client = w.client.kv_client();
        match w.call("txn", client.txn(txn)).await {
            Ok(r) if r.succeeded() => moved += 1,
            Ok(_) => gone += 1,
            // Its lease expired meanwhile: nothing to move.
            Err(OpError::Etcd { source, .. }) if source.to_string().contains("requested lease not found") => gone += 1,
            Err(e) => return Err(e),
        }
    }
    if moved + gone + skipped > 0 {
        info!(from, to = new.identity(), moved, gone, skipped, "migrated ownership records to this install's identity");
    } else {
        warn!(from, "--migrate-from: no records there (already migrated?)");
    }
    Ok(())
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

    #[test]
    fn an_orphan_is_an_identity_nobody_runs_with_records_where_this_install_looks() {
        let o = "/podlease/owners";
        let mut s = Survey::default();
        for k in [
            "/podlease/owners/old/shop/p1/web",               // the layout before install ids, no fence
            "/podlease/owners/c1/team-b.podlease/other/p/web", // another install, running
            "/podlease/owners/c1/team-b.podlease",
            "/podlease/owners/c1/gone.podlease/elsewhere/p/web", // nobody runs it, but not our namespace
        ] {
            s.add(o, k);
        }
        let config = RegistryConfig { cluster_id: "c1".into(), install_id: "shop.podlease".into(), namespaces: vec!["shop".into()], ..Default::default() };
        let orphans: Vec<&String> = s.orphans(&config).map(|(r, _)| r).collect();
        assert_eq!(orphans, ["/podlease/owners/old"]);
        let all = RegistryConfig { namespaces: vec![], ..config };
        let orphans: Vec<&String> = s.orphans(&all).map(|(r, _)| r).collect();
        assert_eq!(orphans, ["/podlease/owners/c1/gone.podlease", "/podlease/owners/old"]);
    }
}
