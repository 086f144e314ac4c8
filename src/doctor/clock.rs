//! Is the clock sane? Two comparisons, each with its measurement error kept, so that only a
//! skew that is certain gets reported:
//!
//! - wall clock against the API server: the Date header of one answer (whole seconds) says
//!   the server's time at some moment between sending the request and reading the answer.
//!   podlease writes wall-clock times the cluster reads (the leader Lease's renewTime, Event
//!   and status timestamps) and judges certificate validity by its own clock.
//! - clock rate against etcd: etcd counts a lease's TTL down on its leader's monotonic clock,
//!   and reports it in whole seconds, truncated, so the reported TTL ticks exactly once per
//!   etcd second. Timing two ticks on the local monotonic clock gives the rate of etcd's
//!   clock against ours. The rate is what decides when a lease expires (its wall-clock offset
//!   does not matter to leases: etcd never compares wall clocks), and a fast etcd clock eats
//!   the margin the TTL keeps over a leader failover.

use std::time::{Duration, Instant, SystemTime};

use etcd_client::Client;

use super::Finding;

/// Beyond this wall-clock skew (certain, seconds) the clock check warns.
pub const MAX_SKEW_SECONDS: f64 = 2.0;

/// Beyond this deviation of etcd's clock rate from ours (certain, as a fraction) it warns.
/// NTP slews a clock by at most 0.05 %; a few percent is a broken clock source.
pub const MAX_RATE_DEVIATION: f64 = 0.02;

/// The local clock just before a request and just after its answer, and the server's
/// clock (the Date header, truncated to the second) in between.
#[derive(Debug, Clone, Copy)]
pub struct DateSample {
    pub before: SystemTime,
    pub after: SystemTime,
    pub server: SystemTime,
}

/// Server clock minus local clock, in seconds: somewhere in `low..=high`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Skew {
    pub low: f64,
    pub high: f64,
}

fn secs(t: SystemTime) -> f64 {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    }
}

impl DateSample {
    pub fn skew(&self) -> Skew {
        // The server stamped its second at a moment in [before, after]; its clock then read
        // somewhere in [server, server + 1 s).
        let server = secs(self.server);
        Skew { low: server - secs(self.after), high: server + 1.0 - secs(self.before) }
    }
}

impl Skew {
    /// The least skew consistent with the measurement (0 when it may be none).
    pub fn certain(&self) -> f64 {
        if self.low > 0.0 {
            self.low
        } else if self.high < 0.0 {
            -self.high
        } else {
            0.0
        }
    }
}

/// `x` without the sign of a value that prints as zero ("-0.0").
fn shown(x: f64) -> f64 {
    if x.abs() < 0.05 { 0.0 } else { x }
}

/// A lower bound printed whole: rounded down (but not below what float noise leaves).
fn at_least(x: f64) -> f64 {
    (x + 1e-9).floor()
}

/// The wall-clock finding for a skew measured against the API server.
pub fn skew_finding(skew: &Skew) -> Finding {
    let mid = (skew.low + skew.high) / 2.0;
    let err = (skew.high - skew.low) / 2.0;
    let certain = skew.certain();
    if certain <= MAX_SKEW_SECONDS {
        return Finding::ok("clock", format!("local clock agrees with the API server's: {:+.1} s ± {err:.1} s (its Date header counts whole seconds)", shown(mid)));
    }
    let (way, side) = if skew.low > 0.0 { ("behind", "server ahead") } else { ("ahead of", "server behind") };
    Finding::warn(
        "clock",
        format!("the local clock is at least {} s {way} the API server's ({side} by {mid:+.0} s ± {err:.1} s)", at_least(certain)),
        "sync both clocks (NTP/chrony): lease timing is unaffected (monotonic clocks), but the leader Lease's renewTime, Events and status times podlease writes are off by as much, and certificate validity is judged by each side's own clock",
    )
}

/// etcd's clock rate against ours: etcd seconds elapsed per local second, in `low..=high`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub low: f64,
    pub high: f64,
}

impl Rate {
    /// The least deviation from 1 consistent with the measurement.
    pub fn certain_deviation(&self) -> f64 {
        if self.low > 1.0 {
            self.low - 1.0
        } else if self.high < 1.0 {
            1.0 - self.high
        } else {
            0.0
        }
    }
}

/// The finding for etcd's clock rate.
pub fn rate_finding(endpoint: &str, rate: &Rate) -> Finding {
    let mid = (rate.low + rate.high) / 2.0;
    let err = (rate.high - rate.low) / 2.0;
    let deviation = rate.certain_deviation();
    if deviation <= MAX_RATE_DEVIATION {
        return Finding::ok(
            "clock",
            format!("etcd's lease clock (via {endpoint}) runs at our rate: {:+.1} % ± {:.1} % (a lease's TTL countdown timed over two ticks)", shown((mid - 1.0) * 100.0), err * 100.0),
        );
    }
    let way = if rate.low > 1.0 { "fast" } else { "slow" };
    Finding::warn(
        "clock",
        format!("etcd's lease clock (via {endpoint}) runs at least {} % {way} against ours ({mid:.3} ± {err:.3})", at_least(deviation * 100.0)),
        if way == "fast" {
            "fix the clock source of the etcd leader's host: leases expire early by as much, eating the TTL's margin over a leader failover"
        } else {
            "fix the clock source of this host or of the etcd leader's: leases outlive their TTL by as much when podlease is gone"
        },
    )
}

/// One TimeToLive answer: sent at `sent`, read at `read`, with the TTL etcd reported.
#[derive(Debug, Clone, Copy)]
pub struct Poll {
    pub sent: Instant,
    pub read: Instant,
    pub ttl: i64,
}

/// The rate from polls of a counting-down TTL, once `ticks` ticks after the first were seen:
/// each tick happened between the last poll showing the old value (etcd read it no earlier
/// than that poll was sent) and the first showing the new one (read no later than it came
/// back); between the first tick and the last, exactly `ticks` etcd seconds passed.
pub fn rate_from(polls: &[Poll], ticks: i64) -> Option<Rate> {
    // (last poll before, first poll after) for every tick seen alone: a change of two at once
    // (a slow poll) is two ticks at unknown moments.
    let ticked: Vec<(&Poll, &Poll)> = polls.windows(2).filter(|w| w[1].ttl == w[0].ttl - 1).map(|w| (&w[0], &w[1])).collect();
    let (first, last) = (ticked.first()?, ticked.last()?);
    let etcd = (first.0.ttl - last.0.ttl) as f64;
    if etcd < ticks as f64 {
        return None;
    }
    let shortest = last.0.sent.saturating_duration_since(first.1.read).as_secs_f64();
    let longest = last.1.read.saturating_duration_since(first.0.sent).as_secs_f64();
    (longest > 0.0).then(|| Rate { low: etcd / longest, high: if shortest > 0.0 { etcd / shortest } else { f64::INFINITY } })
}

/// Grants a lease of 10 s, polls its TTL until two ticks were timed, revokes it.
pub async fn etcd_rate(client: &mut Client, call_timeout: Duration) -> Result<Rate, String> {
    const TICKS: i64 = 2;
    let bounded = |what: &'static str| move |_| format!("{what} did not answer within {call_timeout:?}");
    let lease = tokio::time::timeout(call_timeout, client.lease_grant(10, None)).await.map_err(bounded("granting a lease"))?.map_err(|e| format!("granting a lease: {e}"))?;
    let id = lease.id();
    let mut polls = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(TICKS as u64 + 3);
    let result = loop {
        let sent = Instant::now();
        let answer = tokio::time::timeout(call_timeout, client.lease_time_to_live(id, None)).await;
        let read = Instant::now();
        match answer {
            Ok(Ok(r)) => polls.push(Poll { sent, read, ttl: r.ttl() }),
            Ok(Err(e)) => break Err(format!("reading the lease's TTL: {e}")),
            Err(_) => break Err(format!("reading the lease's TTL did not answer within {call_timeout:?}")),
        }
        if let Some(rate) = rate_from(&polls, TICKS) {
            break Ok(rate);
        }
        if read > deadline {
            break Err(format!("the lease's TTL did not count down {TICKS} ticks within {} s", TICKS + 3));
        }
        // The poll period bounds the measurement error; 20 ms over 2 s is 1 %.
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let _ = tokio::time::timeout(call_timeout, client.lease_revoke(id)).await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::Level;

    fn sample(offset_ms: i64, rtt_ms: u64) -> DateSample {
        // A server whose clock reads local + offset, answering in the middle of the request.
        let before = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000) + Duration::from_millis(300);
        let after = before + Duration::from_millis(rtt_ms);
        let at = before + Duration::from_millis(rtt_ms / 2);
        let server = if offset_ms >= 0 { at + Duration::from_millis(offset_ms as u64) } else { at - Duration::from_millis((-offset_ms) as u64) };
        let whole = server.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
        DateSample { before, after, server: SystemTime::UNIX_EPOCH + Duration::from_secs(whole) }
    }

    #[test]
    fn the_true_skew_is_always_inside_the_measured_interval() {
        for offset in [-90_000, -3_500, -1_000, -200, 0, 200, 999, 2_500, 3_600_000] {
            for rtt in [0, 5, 400] {
                let s = sample(offset, rtt).skew();
                let o = offset as f64 / 1000.0;
                assert!(s.low <= o + 1e-9 && o <= s.high + 1e-9, "{offset} {rtt}: {s:?}");
                assert!(s.high - s.low <= 1.0 + rtt as f64 / 1000.0 + 1e-9);
            }
        }
    }

    #[test]
    fn only_a_certain_skew_beyond_two_seconds_warns() {
        for offset in [0, 900, -900, 1_900, -1_900, 2_500] {
            assert_eq!(skew_finding(&sample(offset, 5).skew()).level, Level::Ok, "{offset}");
        }
        let ahead = skew_finding(&sample(-4_000, 5).skew());
        assert_eq!(ahead.level, Level::Warn);
        assert!(ahead.found.contains("ahead of the API server's"), "{}", ahead.found);
        let behind = skew_finding(&sample(90_000, 5).skew());
        assert_eq!(behind.level, Level::Warn);
        assert!(behind.found.contains("at least 89 s behind"), "{}", behind.found);
        assert!(behind.todo.unwrap().contains("NTP"));
    }

    fn polls(rate: f64, period_ms: u64, rtt_ms: u64, start_ttl: f64) -> Vec<Poll> {
        // etcd's remaining TTL, truncated, as `rate` etcd seconds pass per local second.
        let t0 = Instant::now();
        (0..400)
            .map(|i| {
                let sent = t0 + Duration::from_millis(i * period_ms);
                let at = sent + Duration::from_millis(rtt_ms / 2);
                let remaining = start_ttl - at.duration_since(t0).as_secs_f64() * rate;
                Poll { sent, read: sent + Duration::from_millis(rtt_ms), ttl: remaining.floor() as i64 }
            })
            .collect()
    }

    #[test]
    fn the_rate_is_timed_over_whole_ticks_and_brackets_the_truth() {
        for rate in [0.8, 0.97, 1.0, 1.03, 1.25] {
            for (period, rtt) in [(20, 1), (20, 15), (50, 3)] {
                let p = polls(rate, period, rtt, 9.63);
                let n = (1..p.len()).find(|&n| rate_from(&p[..n], 2).is_some()).expect("two ticks");
                let r = rate_from(&p[..n], 2).unwrap();
                assert!(r.low <= rate && rate <= r.high, "{rate} {period} {rtt}: {r:?}");
                assert!(r.high - r.low < 0.1, "{r:?}");
            }
        }
        assert_eq!(rate_from(&polls(1.0, 20, 1, 9.5)[..10], 2), None, "no tick yet");
    }

    #[test]
    fn a_rate_certainly_off_by_more_than_two_percent_warns() {
        assert_eq!(rate_finding("e", &Rate { low: 0.99, high: 1.02 }).level, Level::Ok);
        assert_eq!(rate_finding("e", &Rate { low: 1.01, high: 1.03 }).level, Level::Ok);
        let fast = rate_finding("e", &Rate { low: 1.10, high: 1.12 });
        assert_eq!(fast.level, Level::Warn);
        assert!(fast.found.contains("10 % fast") && fast.todo.unwrap().contains("expire early"), "{}", fast.found);
        let slow = rate_finding("e", &Rate { low: 0.5, high: 0.52 });
        assert!(slow.found.contains("48 % slow"), "{}", slow.found);
    }
}
