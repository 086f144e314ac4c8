//! Service claims: a service name under a read prefix belongs to one namespace.
//!
//! Two kinds of marker live under `<owner-prefix>/@claims/<read prefix in hex>/<namespace>/
//! <cluster>/<install>/`:
//! - a **hold** (`@hold/<source>`), one per ServiceRegistration whose service is claimed
//!   and one per namespace for its annotated pods, under the install's claims lease. It is
//!   written when the source appears, whether or not a pod is ready, and deleted when the
//!   source goes: the claim lasts exactly as long as the registration. Writing one checks
//!   that no other namespace claims the same read prefix, nor one that contains it or that
//!   it contains (a consumer reading `pay` sees the keys of `payments` and of `pay/x`).
//!   New holds are serialised through one epoch key, so two nested claims cannot both pass
//!   their checks.
//! - an **instance marker** (`<pod>/<source>`) under the instance's own lease, in the Txn
//!   that writes its key; the Txn also requires the hold to exist.
//!
//! A namespace is the same namespace in every cluster (namespace sameness): the checks look
//! at namespaces, not at clusters or installs. Each leading term puts every hold under a
//! fresh claims lease, then revokes the previous term's (found through a pointer beside the
//! ownership records): holds of sources that went while no replica led vanish with it.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};

use etcd_client::{Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse};

use super::owner::Owners;
use super::write::{OpError, Writer};
use crate::desired::{Hold, InstanceId};

/// TTL of the claims lease: as long as the longest instance TTL, so a claim outlives every
/// key it covers. Every replica keeps it alive (a caretaker too); it lapses only when no
/// replica of the install has run for that long, after which other namespaces may take the
/// names.
pub const CLAIM_TTL: i64 = crate::registration::MAX_TTL_SECONDS;

/// The segment under which holds lie (`@` cannot start a pod name).
const HOLD_SEGMENT: &str = "@hold";

/// Range reads per Txn (etcd's default --max-txn-ops is 128).
const READ_BATCH: usize = 100;

/// How often a new hold is tried when other claims keep getting in first.
const ATTEMPTS: usize = 16;

/// Where one install's claims live.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Claims {
    /// `<owner-prefix>/@claims/`; empty: this writer writes no claims.
    root: String,
    /// `<cluster>/<install>`, to keep every install's markers apart.
    identity: String,
}

fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

/// The end of every key that starts with `p` followed by `/` (`'/' + 1` is `'0'`).
fn after_slash(p: &str) -> String {
    format!("{}0", &p[..p.len() - 1])
}

impl Claims {
    pub fn new(owner_prefix: &str, cluster_id: &str, install_id: &str) -> Claims {
        Claims { root: format!("{}/@claims/", owner_prefix.trim_end_matches('/')), identity: format!("{cluster_id}/{install_id}") }
    }

    pub fn enabled(&self) -> bool {
        !self.root.is_empty()
    }

    fn service_root(&self, read_prefix: &str) -> String {
        format!("{}{}/", self.root, hex(read_prefix))
    }

    /// The marker of instance `id` when its service is claimed (`claim`: the read prefix).
    pub fn marker(&self, id: &InstanceId, claim: Option<&str>) -> Option<String> {
        let claim = claim.filter(|_| self.enabled())?;
        Some(format!("{}{}/{}/{}/{}", self.service_root(claim), id.namespace, self.identity, id.pod, id.source.segment()))
    }

    /// The hold of a source.
    pub fn hold(&self, h: &Hold) -> Option<String> {
        self.enabled().then(|| format!("{}{}/{}/{HOLD_SEGMENT}/{}", self.service_root(&h.read), h.namespace, self.identity, h.holder.segment()))
    }

    /// The hold instance `id`'s writes need.
    pub fn hold_of(&self, id: &InstanceId, claim: Option<&str>) -> Option<String> {
        self.hold(&Hold::of(id, claim)?)
    }

    /// The key every new hold rewrites, so that claims are created one at a time.
    pub fn epoch_key(&self) -> String {
        format!("{}@epoch", self.root)
    }

    /// The key ranges [from, to) where other namespaces' markers of `d`'s service would be.
    pub fn others(&self, id: &InstanceId, claim: Option<&str>) -> Vec<(String, String)> {
        match claim.filter(|_| self.enabled()) {
            Some(read) => self.others_at(&self.service_root(read), &id.namespace),
            None => Vec::new(),
        }
    }

    /// Other namespaces' markers under one service root: the ranges on either side of
    /// `<service root><namespace>/`.
    fn others_at(&self, service: &str, namespace: &str) -> Vec<(String, String)> {
        let mine = format!("{service}{namespace}/");
        vec![(service.to_string(), mine.clone()), (after_slash(&mine), after_slash(service))]
    }

    /// Where other namespaces' markers of every read prefix that contains `read` would be
    /// (each shorter prefix of it, byte by byte), and `read`'s own.
    fn around(&self, read: &str, namespace: &str) -> Vec<(String, String)> {
        let h = hex(read);
        (1..=read.len()).flat_map(|n| self.others_at(&format!("{}{}/", self.root, &h[..2 * n]), namespace)).collect()
    }

    /// Every marker of a read prefix that `read` contains (longer, starting with it).
    fn within(&self, read: &str) -> (String, String) {
        let h = format!("{}{}", self.root, hex(read));
        // Hex digits follow: '0'..='9', 'a'..='f'.
        (format!("{h}0"), format!("{h}g"))
    }

    /// The namespace a marker belongs to.
    pub fn namespace_of(&self, marker: &str) -> Option<String> {
        let rest = marker.strip_prefix(&self.root)?;
        rest.split('/').nth(1).filter(|n| !n.is_empty()).map(str::to_string)
    }

    /// The read prefix a marker is under.
    fn read_of(&self, marker: &str) -> Option<String> {
        let h = marker.strip_prefix(&self.root)?.split('/').next()?;
        let bytes: Option<Vec<u8>> = (0..h.len()).step_by(2).map(|i| u8::from_str_radix(h.get(i..i + 2)?, 16).ok()).collect();
        String::from_utf8(bytes?).ok()
    }
}

/// The key naming one claims lease of this install, under that lease, beside the ownership
/// records (a record key has three segments; this one, one). One per lease: a term that
/// dies while moving the holds leaves both leases named, and the next keeps both alive.
pub fn pointer_key(owners: &Owners, lease: i64) -> String {
    format!("{}{POINTER}{lease:x}", owners.root())
}

const POINTER: &str = "@claims-";

/// What an attempt to hold a claim found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claimed {
    Held,
    /// `namespace` claims `read`, which is this hold's read prefix or contains it or lies
    /// within it.
    Refused {
        namespace: String,
        read: String,
    },
    /// Other claims kept getting in first: try again later.
    Busy,
}

/// The claims leases earlier terms left.
pub async fn read_pointers(w: &Writer, owners: &Owners) -> Result<Vec<i64>, OpError> {
    let mut out = Vec::new();
    super::adopt::scan(w, &format!("{}{POINTER}", owners.root()), true, |kv| {
        if kv.lease() != 0 {
            out.push(kv.lease());
        }
    })
    .await?;
    Ok(out)
}

/// Revokes an earlier term's claims lease once every wanted hold is on this term's own.
/// Its pointer goes first, in a fenced Txn: a newer leader finds earlier claims leases
/// through their pointers, read after it took its fence, so it never relies on one a deposed
/// term then revokes (and a deposed term revokes nothing).
async fn revoke_old(w: &Writer, owners: &Owners, lease: i64) -> Result<(), OpError> {
    w.txn(Txn::new().and_then(vec![TxnOp::delete(pointer_key(owners, lease), None)])).await?;
    w.revoke_lease(lease).await.map(|_| ())
}

/// A fresh claims lease, named by its pointer.
pub async fn grant(w: &Writer, owners: &Owners) -> Result<i64, OpError> {
    let mut lc = w.client.lease_client();
    let lease = w.call("grant", lc.grant(CLAIM_TTL, None)).await?.id();
    let put = TxnOp::put(pointer_key(owners, lease), "", Some(PutOptions::new().with_lease(lease)));
    match w.txn(Txn::new().and_then(vec![put])).await {
        Ok(_) => Ok(lease),
        // Fenced: nothing was written. Otherwise the pointer may have landed; the lease
        // then holds nothing else and lapses on its own (revoking it could not hurt either).
        Err(e) => {
            let _ = w.revoke_lease(lease).await;
            Err(e)
        }
    }
}

/// Holds `h` under `lease`: rewrites our own hold under it, or writes a new one once no other
/// namespace claims the prefix, any prefix containing it or any within it.
pub async fn claim(w: &Writer, h: &Hold, lease: i64) -> Result<Claimed, OpError> {
    let Some(marker) = w.claims.hold(h) else { return Ok(Claimed::Held) };
    let epoch_key = w.claims.epoch_key();
    for _ in 0..ATTEMPTS {
        let mut kv = w.client.kv_client();
        let now = w.call("get", kv.txn(Txn::new().and_then(vec![TxnOp::get(marker.as_str(), None), TxnOp::get(epoch_key.as_str(), None)]))).await?;
        let mut got = now.op_responses().into_iter().map(|r| match r {
            TxnOpResponse::Get(g) => g.kvs().first().cloned(),
            _ => None,
        });
        let (mine, epoch) = (got.next().flatten(), got.next().flatten());
        if let Some(mine) = mine {
            // Ours already (an earlier term's): moved under this term's lease, if still there.
            if mine.lease() == lease {
                return Ok(Claimed::Held);
            }
            let txn = Txn::new()
                .when(vec![Compare::create_revision(marker.as_str(), CompareOp::Equal, mine.create_revision())])
                .and_then(vec![TxnOp::put(marker.as_str(), h.read.as_str(), Some(PutOptions::new().with_lease(lease)))]);
            if w.txn(txn).await?.succeeded() {
                return Ok(Claimed::Held);
            }
            continue;
        }
        // A new hold: whatever claims existed when the epoch was read are found below; any
        // created since has rewritten the epoch, and the write fails.
        let epoch_rev = epoch.map(|kv| kv.mod_revision()).unwrap_or(0);
        if let Some(refused) = claimant(w, h).await? {
            return Ok(refused);
        }
        let txn = Txn::new()
            .when(vec![
                Compare::mod_revision(epoch_key.as_str(), CompareOp::Equal, epoch_rev),
                Compare::create_revision(marker.as_str(), CompareOp::Equal, 0),
            ])
            .and_then(vec![
                TxnOp::put(marker.as_str(), h.read.as_str(), Some(PutOptions::new().with_lease(lease))),
                TxnOp::put(epoch_key.as_str(), "", None),
            ]);
        if w.txn(txn).await?.succeeded() {
            return Ok(Claimed::Held);
        }
    }
    Ok(Claimed::Busy)
}

/// Another namespace's claim on `h.read`, on a prefix containing it, or within it.
async fn claimant(w: &Writer, h: &Hold) -> Result<Option<Claimed>, OpError> {
    let c = &w.claims;
    let refused = |key: &str| {
        let namespace = c.namespace_of(key)?;
        (namespace != h.namespace).then(|| Claimed::Refused { namespace, read: c.read_of(key).unwrap_or_default() })
    };
    for batch in c.around(&h.read, &h.namespace).chunks(READ_BATCH) {
        let gets: Vec<TxnOp> = batch
            .iter()
            .map(|(from, to)| TxnOp::get(from.as_str(), Some(GetOptions::new().with_range(to.as_str()).with_limit(1).with_keys_only())))
            .collect();
        let mut kv = w.client.kv_client();
        let resp = w.call("get", kv.txn(Txn::new().and_then(gets))).await?;
        for r in resp.op_responses() {
            if let TxnOpResponse::Get(g) = r
                && let Some(found) = g.kvs().first().and_then(|kv| refused(kv.key_str().ok()?))
            {
                return Ok(Some(found));
            }
        }
    }
    let (from, to) = c.within(&h.read);
    let mut found = None;
    super::adopt::scan_range(w, &from, &to, true, |kv| {
        if found.is_none() {
            found = kv.key_str().ok().and_then(refused);
        }
    })
    .await?;
    Ok(found)
}

/// Lets go of a hold.
pub async fn release(w: &Writer, h: &Hold) -> Result<(), OpError> {
    if let Some(marker) = w.claims.hold(h) {
        w.txn(Txn::new().and_then(vec![TxnOp::delete(marker, None)])).await?;
    }
    Ok(())
}

/// What the registry knows of one wanted hold in this term.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HoldState {
    Held,
    Refused { namespace: String, read: String },
}

/// A piece of claims work for the registry to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Job {
    /// A fresh claims lease for this term.
    Grant,
    Claim(Hold, i64),
    Release(Hold),
    /// Every wanted hold is under this term's lease: the previous term's lease goes, and
    /// with it every hold nobody wants any more.
    RevokeOld(i64),
}

/// A job's result.
#[derive(Debug)]
pub enum Done {
    Granted(i64),
    Claimed(Hold, Claimed),
    Released(Hold),
    RevokedOld(i64),
    /// The job failed (etcd): tried again at the next retry tick.
    Failed(Job, String),
}

/// The claims side of a registry term, pure: which holds are wanted, what etcd answered,
/// what to do next.
#[derive(Debug, Default)]
pub struct Keeper {
    wanted: BTreeSet<Hold>,
    state: HashMap<Hold, HoldState>,
    /// This term's claims lease, once granted.
    pub lease: Option<i64>,
    granting: bool,
    /// Earlier terms' claims leases, kept alive until every wanted hold is moved.
    pub old: BTreeSet<i64>,
    queue: VecDeque<Hold>,
    queued: HashSet<Hold>,
    busy: HashSet<Hold>,
    /// Holds to try again at the next retry tick (failed, or refused: the other namespace
    /// may let go).
    later: HashSet<Hold>,
    revoking: bool,
    /// A grant or revoke failed: not tried again before the next retry tick.
    resting: bool,
}

impl Keeper {
    /// The complete set of holds wanted now. Returns the holds that are no longer wanted.
    pub fn want(&mut self, holds: BTreeSet<Hold>) -> Vec<Hold> {
        let gone: Vec<Hold> = self.wanted.difference(&holds).cloned().collect();
        let new: Vec<Hold> = holds.difference(&self.wanted).cloned().collect();
        self.wanted = holds;
        for h in gone.iter().chain(&new) {
            self.enqueue(h.clone());
        }
        gone
    }

    fn enqueue(&mut self, h: Hold) {
        if self.queued.insert(h.clone()) {
            self.queue.push_back(h);
        }
    }

    pub fn state(&self, h: &Hold) -> Option<&HoldState> {
        self.state.get(h)
    }

    /// The leases earlier terms left.
    pub fn adopt(&mut self, leases: Vec<i64>) {
        self.old = leases.into_iter().filter(|l| Some(*l) != self.lease).collect();
    }

    /// A claims lease expired: every hold under it is gone and is written again.
    pub fn lease_lost(&mut self, lease: i64) -> bool {
        if self.old.remove(&lease) {
            return true;
        }
        if self.lease != Some(lease) {
            return false;
        }
        self.lease = None;
        self.state.retain(|_, s| !matches!(s, HoldState::Held));
        for h in self.wanted.clone() {
            self.enqueue(h);
        }
        true
    }

    /// The next job, if any may start now (`running`: jobs in flight).
    pub fn next(&mut self, running: usize) -> Option<Job> {
        let Some(lease) = self.lease else {
            if self.granting || self.resting {
                return None;
            }
            self.granting = true;
            return Some(Job::Grant);
        };
        while let Some(h) = self.queue.pop_front() {
            self.queued.remove(&h);
            if self.busy.contains(&h) {
                self.later.insert(h);
                continue;
            }
            let job = match (self.wanted.contains(&h), self.state.get(&h)) {
                (true, Some(HoldState::Held)) => continue,
                (true, _) => Job::Claim(h.clone(), lease),
                (false, Some(HoldState::Held)) => Job::Release(h.clone()),
                (false, _) => {
                    self.state.remove(&h);
                    continue;
                }
            };
            self.busy.insert(h);
            return Some(job);
        }
        // Once every wanted hold has an answer under this lease, the earlier ones go.
        let settled = self.wanted.iter().all(|h| self.state.contains_key(h));
        match self.old.first() {
            Some(old) if settled && running == 0 && !self.revoking && !self.resting => {
                self.revoking = true;
                Some(Job::RevokeOld(*old))
            }
            _ => None,
        }
    }

    /// A job finished. Returns the holds whose answer changed (their instances wait on it).
    pub fn done(&mut self, done: Done) -> Vec<Hold> {
        match done {
            Done::Granted(lease) => {
                self.granting = false;
                self.lease = Some(lease);
                Vec::new()
            }
            Done::Claimed(h, claimed) => {
                self.busy.remove(&h);
                let state = match claimed {
                    Claimed::Held => HoldState::Held,
                    Claimed::Refused { namespace, read } => {
                        self.later.insert(h.clone());
                        HoldState::Refused { namespace, read }
                    }
                    Claimed::Busy => {
                        // Someone else's claim got in each time: each round one wins.
                        self.enqueue(h);
                        return Vec::new();
                    }
                };
                if !self.wanted.contains(&h) {
                    // Let go of while it was being written: released next.
                    self.state.insert(h.clone(), state);
                    self.enqueue(h);
                    return Vec::new();
                }
                let changed = self.state.get(&h) != Some(&state);
                self.state.insert(h.clone(), state);
                if changed { vec![h] } else { Vec::new() }
            }
            Done::Released(h) => {
                self.busy.remove(&h);
                self.state.remove(&h);
                if self.wanted.contains(&h) {
                    self.enqueue(h);
                }
                Vec::new()
            }
            Done::RevokedOld(lease) => {
                self.revoking = false;
                self.old.remove(&lease);
                Vec::new()
            }
            Done::Failed(job, _) => {
                match job {
                    Job::Grant => (self.granting, self.resting) = (false, true),
                    Job::Claim(h, _) | Job::Release(h) => {
                        self.busy.remove(&h);
                        self.later.insert(h);
                    }
                    Job::RevokeOld(_) => (self.revoking, self.resting) = (false, true),
                }
                Vec::new()
            }
        }
    }

    /// An instance found the hold missing from etcd: it is written again.
    pub fn recheck(&mut self, h: &Hold) {
        if self.state.get(h) == Some(&HoldState::Held) {
            self.state.remove(h);
            self.enqueue(h.clone());
        }
    }

    /// The retry tick: holds that failed, met contention or were refused are tried again.
    pub fn retry(&mut self) {
        self.resting = false;
        for h in std::mem::take(&mut self.later) {
            // A refused hold keeps its answer (and its instances their Conflict) until
            // the next one differs.
            self.enqueue(h);
        }
    }
}

/// Runs one job.
pub async fn run(w: Writer, owners: Owners, job: Job) -> Result<Done, OpError> {
    let result = match &job {
        Job::Grant => grant(&w, &owners).await.map(Done::Granted),
        Job::Claim(h, lease) => claim(&w, h, *lease).await.map(|c| Done::Claimed(h.clone(), c)),
        Job::Release(h) => release(&w, h).await.map(|()| Done::Released(h.clone())),
        Job::RevokeOld(lease) => revoke_old(&w, &owners, *lease).await.map(|_| Done::RevokedOld(*lease)),
    };
    match result {
        Err(OpError::Fenced) => Err(OpError::Fenced),
        Err(e) => Ok(Done::Failed(job, e.to_string())),
        ok => ok,
    }
}

#[cfg(test)]
mod tests;
