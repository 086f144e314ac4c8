//! The keepalive driver: every lease podlease holds is renewed over ONE LeaseKeepAlive
//! stream, each at TTL/3 (as Go's clientv3 does), from one task that never waits on
//! reconcile work. A TTL-0 answer, or a lease whose deadline passes unrenewed, is reported
//! lost so the registry grants a new one and writes the key again. A lease whose remaining
//! TTL is unknown (adopted) is renewed at once. A stream that stops answering (a silently
//! dead path) is closed and reopened well before any lease can expire.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use etcd_client::{Client, LeaseKeepAliveStream, LeaseKeeper};

use crate::etcd::Connection;
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::time::{DelayQueue, delay_queue};
use tracing::{debug, info, warn};

use super::outbox::Outbox;
use super::plan::Renew;
use crate::metrics::Metrics;

/// What the driver tells the registry.
#[derive(Debug)]
pub enum Report {
    /// etcd says the lease is gone (or it could not be renewed within its TTL).
    Lost(i64),
    /// The keepalive stream broke or could not be opened: etcd is unreachable.
    Down(String),
    /// The keepalive stream is open again.
    Up,
}

#[derive(Debug)]
enum Command {
    Track { lease: i64, ttl: i64, renew: Renew },
    /// A lease of the pool: renewed like the others, counted apart, lost without a report
    /// to anyone but the pool.
    TrackPooled { lease: i64, ttl: i64 },
    Untrack(i64),
}

/// Handle to the driver task.
#[derive(Clone)]
pub struct Keepalive {
    tx: mpsc::UnboundedSender<Command>,
}

impl Keepalive {
    /// Starts the driver on `etcd`'s connection; with `own`, on a connection of its own made
    /// from that configuration instead, replaced by a fresh one whenever the stream stalls
    /// (the old connection may be the silently dead path, and its HTTP/2 pings take up to
    /// 15 s to tell), fails to open, or the credentials were rotated (`etcd` was replaced:
    /// the old material may no longer be accepted on a new connection).
    pub fn spawn(
        etcd: Connection,
        own: bool,
        reports: mpsc::UnboundedSender<Report>,
        metrics: Metrics,
        shutdown: CancellationToken,
    ) -> Keepalive {
        let (tx, rx) = mpsc::unbounded_channel();
        let driver = Driver {
            client: etcd.client(),
            generation: etcd.generation(),
            etcd,
            own,
            fresh_connection: true,
            leases: HashMap::new(),
            pooled: 0,
            renewals: DelayQueue::new(),
            outbox: Outbox::default(),
            keeper: None,
            responses: None,
            reports,
            metrics,
            // Reopening is cheap and every lease waits on it: try at least every second.
            backoff: Backoff::capped(Duration::from_secs(1)),
            ttls: BTreeMap::new(),
            outstanding: 0,
            progress_at: Instant::now(),
        };
        // A thread and runtime of its own: nothing else the process does (a 150,000-pod
        // list, an adoption's decoding) may hold the renewals up. On a shared runtime, a
        // worker busy for over a second leaves answers unread; the stream is then judged
        // stalled and reopened, and every lease is renewed again.
        let main = tokio::runtime::Handle::current();
        let run = std::sync::Arc::new(std::sync::Mutex::new(Some(driver.run(rx, shutdown))));
        let theirs = run.clone();
        let spawned = std::thread::Builder::new().name("keepalive".into()).spawn(move || {
            let Some(run) = theirs.lock().unwrap().take() else { return };
            match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt.block_on(run),
                Err(e) => {
                    warn!(error = %e, "no runtime of its own for the keepalive driver: it shares the main one");
                    main.spawn(run);
                }
            }
        });
        if let Err(e) = spawned {
            // Never without renewals: the driver runs on the main runtime then.
            warn!(error = %e, "no thread of its own for the keepalive driver: it shares the main runtime");
            if let Some(run) = run.lock().unwrap().take() {
                tokio::spawn(run);
            }
        }
        Keepalive { tx }
    }

    /// Keeps `lease` (granted with `ttl` seconds) alive; `renew` says whether its whole TTL
    /// is known to be ahead or it must be renewed at once.
    pub fn track(&self, lease: i64, ttl: i64, renew: Renew) {
        let _ = self.tx.send(Command::Track { lease, ttl, renew });
    }

    /// A handle whose driver is gone: commands go nowhere (tests of what holds one).
    #[cfg(test)]
    pub fn detached() -> Keepalive {
        Keepalive { tx: mpsc::unbounded_channel().0 }
    }

    /// Keeps a pooled lease (just granted, holding nothing) alive until it is taken.
    pub fn track_pooled(&self, lease: i64, ttl: i64) {
        let _ = self.tx.send(Command::TrackPooled { lease, ttl });
    }

    /// Stops renewing `lease` (revoked, or no longer ours).
    pub fn untrack(&self, lease: i64) {
        let _ = self.tx.send(Command::Untrack(lease));
    }
}

struct Tracked {
    ttl: i64,
    /// In the lease pool: not an instance's lease (not in leases_held, lost silently).
    pooled: bool,
    /// When etcd will expire the lease unless renewed (as far as we know).
    deadline: Instant,
    sent_at: Option<Instant>,
    timer: delay_queue::Key,
}

struct Driver {
    /// The connection the stream runs on ...
    client: Client,
    /// ... made at this generation of `etcd` (the credentials in use).
    generation: u64,
    etcd: Connection,
    /// Whether the stream runs on connections of its own (made with the credentials in use).
    own: bool,
    /// The next stream opens on a new connection (first open, or after a stall).
    fresh_connection: bool,
    leases: HashMap<i64, Tracked>,
    /// How many of them are the pool's.
    pooled: usize,
    renewals: DelayQueue<i64>,
    /// Renewal requests waiting for room in the stream's send buffer (never block the loop).
    outbox: Outbox,
    /// The one stream's send half (its request type is only reachable through it) ...
    keeper: Option<LeaseKeeper>,
    /// ... and its answers.
    responses: Option<LeaseKeepAliveStream>,
    reports: mpsc::UnboundedSender<Report>,
    metrics: Metrics,
    backoff: Backoff,
    /// How many tracked leases have each TTL (the smallest bounds the stall timeout).
    ttls: BTreeMap<i64, usize>,
    /// Requests sent on the current stream and not yet answered ...
    outstanding: u64,
    /// ... and when the stream last made progress (an answer, or the first request after
    /// a quiet spell).
    progress_at: Instant,
}

/// A stream with nothing to say for this long renews one lease early, as a heartbeat.
const HEARTBEAT: Duration = Duration::from_secs(2);

/// How long a stream may leave requests unanswered before it is recycled: a sixth of the
/// smallest TTL (half of its renewal interval), between 1 s and 5 s.
pub fn stall_timeout(min_ttl: i64) -> Duration {
    Duration::from_millis((min_ttl.max(1) as u64 * 1000 / 6).clamp(1000, 5000))
}

fn renew_interval(ttl: i64) -> Duration {
    Duration::from_millis((ttl.max(1) as u64 * 1000) / 3)
}

/// An empty keepalive request of the stream's own type: etcd-client does not export the
/// type, but its `LeaseKeeper.sender` field is public with `pub-response-field`.
fn request_like<T: Default>(_: &tokio::sync::mpsc::Sender<T>) -> T {
    T::default()
}

impl Driver {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Command>, shutdown: CancellationToken) {
        let mut reconnect_at: Option<tokio::time::Instant> = None;
        let mut stall_check = tokio::time::interval(Duration::from_millis(250));
        stall_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if self.keeper.is_none() && !self.leases.is_empty() && reconnect_at.is_none() {
                reconnect_at = Some(tokio::time::Instant::now());
            }
            let has_outbox = !self.outbox.is_empty() && self.keeper.is_some();
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                cmd = rx.recv() => match cmd {
                    None => return,
                    Some(Command::Track { lease, ttl, renew }) => self.track(lease, ttl, renew),
                    Some(Command::TrackPooled { lease, ttl }) => self.track_pooled(lease, ttl),
                    Some(Command::Untrack(lease)) => { self.forget(lease); }
                },
                // Answers first: a stall is judged only once every answer that came was read.
                resp = next_response(&mut self.responses) => self.on_response(resp),
                _ = stall_check.tick(), if self.keeper.is_some() => {
                    let limit = stall_timeout(self.ttls.keys().next().copied().unwrap_or(1));
                    if self.outstanding > 0 && self.progress_at.elapsed() > limit {
                        self.close_stream(&format!("{} renewals unanswered for {limit:?}", self.outstanding), false);
                        self.fresh_connection = true;
                    } else if self.outstanding == 0 && self.progress_at.elapsed() > HEARTBEAT
                        && let Some(&lease) = self.leases.keys().next()
                    {
                        // A quiet stream proves nothing: renew one lease early so that a dead
                        // path shows within HEARTBEAT + the stall timeout, not a TTL/3 later.
                        self.outbox.push(lease);
                    }
                }
                Some(expired) = self.renewals.next(), if !self.renewals.is_empty() => {
                    let lease = expired.into_inner();
                    self.due(lease);
                }
                open = has_room(&self.keeper), if has_outbox => {
                    if open { self.flush_outbox() } else { self.drop_stream("send side closed") }
                }
                _ = sleep_until(reconnect_at), if reconnect_at.is_some() && self.keeper.is_none() => {
                    reconnect_at = None;
                    if let Err(delay) = self.open_stream().await {
                        reconnect_at = Some(tokio::time::Instant::now() + delay);
                    }
                }
            }
        }
    }

    /// Sends queued renewals while the stream's buffer has room.
    fn flush_outbox(&mut self) {
        let Some(keeper) = &self.keeper else { return };
        while let Some(lease) = self.outbox.front() {
            let Some(t) = self.leases.get_mut(&lease) else {
                self.outbox.pop_front();
                continue;
            };
            let mut req = request_like(&keeper.sender);
            req.id = lease;
            match keeper.sender.try_send(req) {
                Ok(()) => {
                    self.outbox.pop_front();
                    t.sent_at = Some(Instant::now());
                    self.metrics.keepalive_requests.inc();
                    if self.outstanding == 0 {
                        self.progress_at = Instant::now();
                    }
                    self.outstanding += 1;
                }
                Err(tokio::sync::mpsc::error::TrySendError::Full(_)) => return,
                Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => {
                    self.drop_stream("send side closed");
                    return;
                }
            }
        }
    }

    fn track(&mut self, lease: i64, ttl: i64, renew: Renew) {
        if renew == Renew::Pooled
            && let Some(t) = self.leases.get_mut(&lease)
            && t.pooled
        {
            // Taken from the pool: its renewals go on as scheduled, now as an instance's.
            t.pooled = false;
            self.pooled -= 1;
            self.count();
            return;
        }
        self.forget(lease);
        let first = match renew {
            Renew::Granted => renew_interval(ttl),
            Renew::Unknown | Renew::Pooled => Duration::ZERO,
        };
        self.insert(lease, ttl, first, false);
    }

    fn track_pooled(&mut self, lease: i64, ttl: i64) {
        self.forget(lease);
        self.insert(lease, ttl, renew_interval(ttl), true);
    }

    fn insert(&mut self, lease: i64, ttl: i64, first: Duration, pooled: bool) {
        let timer = self.renewals.insert(lease, first);
        let deadline = Instant::now() + Duration::from_secs(ttl.max(1) as u64);
        self.leases.insert(lease, Tracked { ttl, pooled, deadline, sent_at: None, timer });
        *self.ttls.entry(ttl).or_default() += 1;
        self.pooled += pooled as usize;
        self.count();
    }

    /// Instances' leases held (the pool's apart).
    fn count(&self) {
        self.metrics.leases_held.set((self.leases.len() - self.pooled) as i64);
    }

    /// The one place a lease stops being tracked.
    /// Whether it was tracked, and if so whether it was the pool's.
    fn forget(&mut self, lease: i64) -> Option<bool> {
        let t = self.leases.remove(&lease)?;
        self.renewals.remove(&t.timer);
        if let Some(n) = self.ttls.get_mut(&t.ttl) {
            *n -= 1;
            if *n == 0 {
                self.ttls.remove(&t.ttl);
            }
        }
        self.pooled -= t.pooled as usize;
        self.count();
        Some(t.pooled)
    }

    /// A lease's renewal time came: queue a request, schedule the next, and give up on it
    /// if etcd must already have expired it.
    fn due(&mut self, lease: i64) {
        let Some(t) = self.leases.get_mut(&lease) else {
            return;
        };
        // Only a live stream that left renewals unanswered for a whole TTL proves the lease
        // gone. With etcd unreachable we cannot know (etcd extends leases across its own
        // restarts and leader changes): keep it, and ask again once the stream is back.
        if self.keeper.is_some() && Instant::now() >= t.deadline {
            // No renewal got through within the TTL: etcd has expired it (or will).
            let pooled = self.forget(lease).unwrap_or(false);
            self.report_lost(lease, pooled, "not renewed within its TTL");
            return;
        }
        t.timer = self.renewals.insert(lease, renew_interval(t.ttl));
        // Without a stream there is nobody to send to; reopening it renews everyone anyway.
        if self.keeper.is_some() {
            self.outbox.push(lease);
        }
    }

    fn on_response(&mut self, resp: Option<Result<etcd_client::LeaseKeepAliveResponse, etcd_client::Error>>) {
        match resp {
            Some(Ok(r)) => {
                self.backoff.reset();
                self.outstanding = self.outstanding.saturating_sub(1);
                self.progress_at = Instant::now();
                let lease = r.id();
                if r.ttl() <= 0 {
                    if let Some(pooled) = self.forget(lease) {
                        self.report_lost(lease, pooled, "etcd answered TTL 0");
                    }
                } else if let Some(t) = self.leases.get_mut(&lease) {
                    t.deadline = Instant::now() + Duration::from_secs(r.ttl() as u64);
                    if let Some(sent) = t.sent_at.take() {
                        self.metrics.keepalive_rtt.observe(sent.elapsed().as_secs_f64());
                    }
                }
            }
            Some(Err(e)) => self.drop_stream(&format!("error: {e}")),
            None => self.drop_stream("closed by etcd"),
        }
    }

    /// `pooled`: the lost lease was the pool's (nobody's key was under it).
    fn report_lost(&mut self, lease: i64, pooled: bool, why: &str) {
        if pooled {
            debug!(lease = format!("{lease:x}"), why, "pooled lease lost");
        } else {
            info!(lease = format!("{lease:x}"), why, "lease lost");
            self.metrics.leases_lost.inc();
        }
        let _ = self.reports.send(Report::Lost(lease));
    }

    fn drop_stream(&mut self, why: &str) {
        self.close_stream(why, true);
    }

    /// Closes the stream; `down` tells the registry etcd is unavailable (a recycled stall
    /// does not: reopening says so if it fails).
    fn close_stream(&mut self, why: &str, down: bool) {
        self.responses = None;
        self.outstanding = 0;
        if self.keeper.take().is_some() {
            warn!(why, "keepalive stream ended; reopening");
            self.metrics.etcd_errors.get_or_create(&crate::metrics::OpLabels { op: "keepalive".into() }).inc();
            if down {
                let _ = self.reports.send(Report::Down(format!("keepalive stream: {why}")));
            }
        }
        self.outbox.clear();
    }

    /// Opens the one stream, with any live lease as its first request. On failure returns
    /// how long to wait before trying again.
    async fn open_stream(&mut self) -> Result<(), Duration> {
        let generation = self.etcd.generation();
        if generation != self.generation {
            // Rotated credentials: a new stream must not reconnect with the old ones.
            self.fresh_connection = true;
            if !self.own {
                self.client = self.etcd.client();
                self.generation = generation;
            }
        }
        if self.fresh_connection && self.own {
            // With the credentials in use, never the files (etcd may not accept those yet).
            // Connecting is lazy without auth (this only builds the channel); with auth it
            // logs in, within the call timeout.
            match self.etcd.fresh().await {
                Ok(c) => {
                    self.client = c;
                    self.generation = generation;
                    self.fresh_connection = false;
                }
                Err(e) => {
                    self.metrics.etcd_error("keepalive");
                    let _ = self.reports.send(Report::Down(format!("connecting for keepalives: {e}")));
                    return Err(self.backoff.next());
                }
            }
        }
        let mut candidates: Vec<i64> = self.leases.keys().copied().collect();
        candidates.sort_unstable();
        for lease in candidates {
            let mut lc = self.client.lease_client();
            // The etcd call timeout (--etcd-timeout), like every other call.
            let limit = self.etcd.call_timeout();
            match tokio::time::timeout(limit, lc.keep_alive(lease)).await {
                Ok(Ok((keeper, stream))) => {
                    debug!(lease = format!("{lease:x}"), "keepalive stream open");
                    self.keeper = Some(keeper);
                    self.responses = Some(stream);
                    // Opening consumed the first answer: nothing is owed yet.
                    self.outstanding = 0;
                    self.progress_at = Instant::now();
                    self.backoff.reset();
                    let _ = self.reports.send(Report::Up);
                    // Fresh deadlines from now: every lease gets asked about again at once.
                    let now = Instant::now();
                    for t in self.leases.values_mut() {
                        t.deadline = now + Duration::from_secs(t.ttl as u64);
                    }
                    // Anything may be overdue after an outage: renew everyone now.
                    self.outbox.clear();
                    for &other in self.leases.keys().filter(|l| **l != lease) {
                        self.outbox.push(other);
                    }
                    return Ok(());
                }
                Ok(Err(etcd_client::Error::LeaseKeepAliveError(msg))) if msg.contains("not found") => {
                    let pooled = self.forget(lease).unwrap_or(false);
                    self.report_lost(lease, pooled, "not found when opening the keepalive stream");
                }
                Ok(Err(e)) => {
                    debug!(error = %e, "opening keepalive stream failed");
                    self.metrics.etcd_error("keepalive");
                    let _ = self.reports.send(Report::Down(format!("opening the keepalive stream: {e}")));
                    // The next try on a new connection, made from the files as they are then.
                    self.fresh_connection = true;
                    return Err(self.backoff.next());
                }
                Err(_) => {
                    self.metrics.etcd_error("keepalive");
                    let _ = self.reports.send(Report::Down("opening the keepalive stream timed out".into()));
                    self.fresh_connection = true;
                    return Err(self.backoff.next());
                }
            }
        }
        Ok(())
    }
}

async fn next_response(responses: &mut Option<LeaseKeepAliveStream>) -> Option<Result<etcd_client::LeaseKeepAliveResponse, etcd_client::Error>> {
    match responses {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}

/// Resolves when the stream's send buffer has room (true) or is closed (false).
async fn has_room(keeper: &Option<LeaseKeeper>) -> bool {
    match keeper {
        Some(k) => k.sender.reserve().await.is_ok(),
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Exponential backoff with jitter, 100 ms .. 5 s (or a smaller cap).
#[derive(Debug, Default)]
pub struct Backoff {
    attempt: u32,
    /// Longest wait in milliseconds (0: the default 5 s).
    cap_ms: u64,
}

impl Backoff {
    pub fn capped(cap: Duration) -> Backoff {
        Backoff { attempt: 0, cap_ms: cap.as_millis() as u64 }
    }

    pub fn next(&mut self) -> Duration {
        let limit = if self.cap_ms == 0 { 5000 } else { self.cap_ms.max(100) };
        let cap = 100u64.saturating_mul(1 << self.attempt.min(6)).min(limit);
        self.attempt += 1;
        Duration::from_millis(rand::random_range(cap / 2..=cap))
    }
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stalled_stream_is_recycled_well_before_the_first_renewal_is_late() {
        assert_eq!(stall_timeout(30), Duration::from_secs(5));
        assert_eq!(stall_timeout(12), Duration::from_secs(2));
        assert_eq!(stall_timeout(2), Duration::from_secs(1));
        for ttl in [5, 10, 30, 60, 3600] {
            assert!(stall_timeout(ttl) < renew_interval(ttl), "ttl {ttl}");
        }
    }
}
