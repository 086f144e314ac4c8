//! Rotated etcd credentials, picked up without a restart. Client certificates, the CA and
//! the password are files mounted from Secrets that cert-manager or an operator replaces;
//! a client that keeps the material it started with dies when its certificate expires (the
//! classic `UNAVAILABLE: transport is closing`). So the files are read again every
//! [`RECHECK`]; when they change, a fresh connection is made with them and every later
//! request uses it (requests in flight finish on the old one; no lease is touched). The
//! client certificate's expiry is a metric, and is warned about well before it comes.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::etcd::{Connection, EtcdConfig};
use crate::http::Health;
use crate::metrics::Metrics;

/// How often the credential files are read again. The kubelet refreshes a mounted Secret
/// within about a minute of its update; ten more seconds are nothing beside that.
pub const RECHECK: Duration = Duration::from_secs(10);

/// Warn when a third of the client certificate's validity is left (cert-manager renews at
/// two thirds: less than a third left means renewal did not happen), at most this long
/// before it expires (a one-year certificate: a month before).
pub const WARN_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);

/// Watches the credential files of `config` and replaces `etcd`'s connection when they
/// change; keeps the certificate expiry metric and the readiness warning current.
pub fn watch(etcd: Connection, config: EtcdConfig, metrics: Metrics, health: Arc<Health>, shutdown: CancellationToken) {
    if config.files().is_empty() {
        return;
    }
    tokio::spawn(async move {
        let mut applied = fingerprint(&config);
        check_expiry(&config, &metrics, &health);
        let mut tick = tokio::time::interval(RECHECK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let now = fingerprint(&config);
            if now != applied && reconnect(&etcd, &config, &metrics).await {
                applied = now;
            }
            check_expiry(&config, &metrics, &health);
        }
    });
}

/// Makes a connection from the files as they are now and puts it in use, unless it fails
/// while the one in use still works (a half-written rotation, a wrong new password: the
/// old material keeps podlease registered meanwhile). Whether the change is done with.
async fn reconnect(etcd: &Connection, config: &EtcdConfig, metrics: &Metrics) -> bool {
    let before = fingerprint(config);
    let fresh = match config.connect().await {
        Ok(c) => c,
        Err(e) => {
            metrics.credential_reloads.get_or_create(&crate::metrics::ResultLabels { result: "failed".into() }).inc();
            warn!(error = %e, "the etcd credential files changed but cannot be used yet; keeping the connection in use");
            return false;
        }
    };
    // A Secret update swaps every file at once (an atomic symlink flip), but a read may
    // straddle it: only a connection made from one consistent set counts.
    if fingerprint(config) != before {
        return false;
    }
    let works = |mut c: etcd_client::Client| async move { matches!(tokio::time::timeout(config.call_timeout, c.status()).await, Ok(Ok(_))) };
    if !works(fresh.clone()).await && works(etcd.client()).await {
        metrics.credential_reloads.get_or_create(&crate::metrics::ResultLabels { result: "failed".into() }).inc();
        warn!("the etcd credential files changed, but etcd refuses the new ones while it still accepts the ones in use: keeping the connection in use and trying again");
        return false;
    }
    etcd.replace(fresh);
    metrics.credential_reloads.get_or_create(&crate::metrics::ResultLabels { result: "applied".into() }).inc();
    info!("the etcd credential files changed: new connections use them");
    true
}

/// The files' contents, hashed: a change of any of them is a rotation.
fn fingerprint(config: &EtcdConfig) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for f in config.files() {
        std::fs::read(f).ok().hash(&mut h);
    }
    h.finish()
}

fn check_expiry(config: &EtcdConfig, metrics: &Metrics, health: &Health) {
    let Some(path) = &config.cert else { return };
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    let warning = match std::fs::read(path).ok().and_then(|pem| validity(&pem)) {
        Some((not_before, not_after)) => {
            metrics.etcd_client_cert_expiry.set(not_after);
            expiry_warning(not_before, not_after, now)
        }
        None => Some(format!("cannot read the expiry of the etcd client certificate {}", path.display())),
    };
    metrics.etcd_client_cert_expiring.set(warning.is_some() as i64);
    let mut current = health.warning.lock().unwrap_or_else(|e| e.into_inner());
    if warning != *current {
        match &warning {
            Some(w) => warn!("{w}"),
            None => info!("the etcd client certificate is no longer close to its expiry"),
        }
        *current = warning;
    }
}

/// Why the certificate valid from `not_before` to `not_after` (Unix seconds) deserves a
/// warning at `now`, or None.
pub fn expiry_warning(not_before: i64, not_after: i64, now: i64) -> Option<String> {
    let left = not_after - now;
    if left <= 0 {
        return Some(format!("the etcd client certificate expired {} ago: new connections to etcd will fail until it is renewed", human(-left)));
    }
    let threshold = ((not_after - not_before) / 3).min(WARN_BEFORE.as_secs() as i64);
    (left <= threshold).then(|| format!("the etcd client certificate expires in {}: renew it (podlease picks the new files up without a restart)", human(left)))
}

fn human(secs: i64) -> String {
    match secs {
        s if s < 120 => format!("{s} s"),
        s if s < 7200 => format!("{} min", s / 60),
        s if s < 172_800 => format!("{} h", s / 3600),
        s => format!("{} days", s / 86_400),
    }
}

/// (notBefore, notAfter) of the first certificate in `pem`, in Unix seconds.
pub fn validity(pem: &[u8]) -> Option<(i64, i64)> {
    let text = std::str::from_utf8(pem).ok()?;
    let start = text.find("-----BEGIN CERTIFICATE-----")? + "-----BEGIN CERTIFICATE-----".len();
    let end = start + text[start..].find("-----END CERTIFICATE-----")?;
    let der = base64(&text[start..end])?;
    // Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] version OPTIONAL, serial,
    // signature, issuer, validity SEQUENCE { notBefore, notAfter }, … } … }
    let (_, cert, _) = tlv(&der)?;
    let (_, mut tbs, _) = tlv(cert)?;
    let (tag, _, rest) = tlv(tbs)?;
    if tag == 0xa0 {
        tbs = rest; // the explicit version
    }
    for _ in 0..3 {
        tbs = tlv(tbs)?.2; // serial, signature algorithm, issuer
    }
    let (_, validity, _) = tlv(tbs)?;
    let (t1, before, rest) = tlv(validity)?;
    let (t2, after, _) = tlv(rest)?;
    Some((time(t1, before)?, time(t2, after)?))
}

/// One DER element: (tag, contents, what follows).
fn tlv(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let tag = *b.first()?;
    let first = *b.get(1)? as usize;
    let (len, head) = if first < 0x80 {
        (first, 2)
    } else {
        let n = first & 0x7f;
        if n == 0 || n > 4 {
            return None;
        }
        let mut len = 0usize;
        for i in 0..n {
            len = (len << 8) | *b.get(2 + i)? as usize;
        }
        (len, 2 + n)
    };
    let body = b.get(head..head + len)?;
    Some((tag, body, &b[head + len..]))
}

/// UTCTime (YYMMDDHHMMSSZ) or GeneralizedTime (YYYYMMDDHHMMSSZ) as Unix seconds.
fn time(tag: u8, b: &[u8]) -> Option<i64> {
    let s = std::str::from_utf8(b).ok()?.strip_suffix('Z')?;
    let (year, rest) = match tag {
        0x17 => {
            let yy: i64 = s.get(0..2)?.parse().ok()?;
            (if yy < 50 { 2000 + yy } else { 1900 + yy }, s.get(2..)?)
        }
        0x18 => (s.get(0..4)?.parse().ok()?, s.get(4..)?),
        _ => return None,
    };
    let n = |r: std::ops::Range<usize>| -> Option<i64> { rest.get(r)?.parse().ok() };
    let (month, day, hour, min, sec) = (n(0..2)?, n(2..4)?, n(4..6)?, n(6..8)?, n(8..10)?);
    Some(days_from_civil(year, month, day) * 86_400 + hour * 3600 + min * 60 + sec)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn base64(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.bytes().filter(|c| !c.is_ascii_whitespace()) {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => break,
            _ => return None,
        };
        acc = (acc << 6) | v as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests;
