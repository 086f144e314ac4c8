//! Rotated etcd credentials, picked up without a restart. Client certificates, the CA and
//! the password are files mounted from Secrets that cert-manager or an operator replaces;
//! a client that keeps the material it started with dies when its certificate expires (the
//! classic `UNAVAILABLE: transport is closing`). So the files are read again every
//! [`RECHECK`]; when they differ from the material in use, a connection is made with them
//! and put in use only once etcd has accepted it for what podlease does (a read and a
//! write permission check): a half-done rotation, a CA etcd does not trust yet or a password
//! it does not know yet never replaces a working connection, and is tried again. Requests
//! in flight finish on the old connection; no lease is touched. The expiry of the client
//! certificate in use is a metric, and is warned about well before it comes.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::etcd::{Connection, EtcdConfig, Material};
use crate::http::Health;
use crate::metrics::{Metrics, ResultLabels};

/// How often the credential files are read again. The kubelet refreshes a mounted Secret
/// within about a minute of its update; ten more seconds are nothing beside that.
pub const RECHECK: Duration = Duration::from_secs(10);

/// Warn when a third of the client certificate's validity is left (cert-manager renews at
/// two thirds: less than a third left means renewal did not happen), at most this long
/// before it expires (a one-year certificate: a month before).
pub const WARN_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);

/// Before the first connection: the expiry of the certificate in the files, so that a start
/// that cannot connect because it expired says why.
pub fn check_files(config: &EtcdConfig, metrics: &Metrics, health: &Health) {
    if config.cert.is_some() {
        let material = config.read_material().ok();
        report(material.as_ref().and_then(|m| m.cert.as_deref()), None, metrics, health);
    }
}

/// Watches the credential files of `config` and replaces `etcd`'s connection when they
/// change and etcd accepts the new ones; keeps the certificate expiry metric and the
/// readiness warning current. `probe_key` is a key podlease reads and writes (its fence).
pub fn watch(etcd: Connection, config: EtcdConfig, probe_key: String, metrics: Metrics, health: Arc<Health>, shutdown: CancellationToken) {
    if config.files().is_empty() {
        return;
    }
    tokio::spawn(async move {
        report(etcd.material().cert.as_deref(), None, &metrics, &health);
        // The files' fingerprint last refused, so that a refusal is counted and logged once.
        let mut refused: Option<u64> = None;
        let mut tick = tokio::time::interval(RECHECK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let pending = match config.read_material() {
                Err(e) => Some(format!("the etcd credential files cannot be read ({e}): still using the ones read before")),
                Ok(files) if files.fingerprint() == etcd.material().fingerprint() => None,
                Ok(files) => {
                    let fingerprint = files.fingerprint();
                    match apply(&etcd, &config, files, &probe_key).await {
                        Ok(()) => {
                            metrics.credential_reloads.get_or_create(&ResultLabels { result: "applied".into() }).inc();
                            info!("the etcd credential files changed: new connections use them");
                            refused = None;
                            None
                        }
                        Err(why) => {
                            if refused != Some(fingerprint) {
                                metrics.credential_reloads.get_or_create(&ResultLabels { result: "failed".into() }).inc();
                                warn!("the etcd credential files changed, but {why}: still using the ones in use, trying again every {RECHECK:?}");
                                refused = Some(fingerprint);
                            }
                            Some(format!("the etcd credential files changed, but {why}: still using the previous ones"))
                        }
                    }
                }
            };
            report(etcd.material().cert.as_deref(), pending.as_deref(), &metrics, &health);
        }
    });
}

/// Connects with `files` and puts the connection in use once etcd accepts it for reading
/// and writing `probe_key`; why not otherwise.
async fn apply(etcd: &Connection, config: &EtcdConfig, files: Material, probe_key: &str) -> Result<(), String> {
    let client = config.connect_with(&files).await.map_err(|e| format!("connecting with them fails ({e})"))?;
    accepts(client.clone(), probe_key, config.call_timeout).await.map_err(|e| format!("etcd does not accept them ({e})"))?;
    etcd.replace(client, files);
    Ok(())
}

/// Whether etcd serves `client` what podlease needs: a read, and a Txn whose branch that
/// never runs puts a key (etcd checks the permissions of both branches; nothing is
/// written). A status call would pass with any certificate of a trusted CA.
async fn accepts(mut client: etcd_client::Client, key: &str, timeout: Duration) -> Result<(), String> {
    let check = async {
        client.get(key, None).await?;
        let never = Txn::new().when(vec![Compare::version(key, CompareOp::Less, 0)]).and_then(vec![TxnOp::put(key, "", None)]);
        client.txn(never).await?;
        Ok::<(), etcd_client::Error>(())
    };
    match tokio::time::timeout(timeout, check).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {timeout:?}")),
    }
}

/// The metrics and the readiness warning for the client certificate `cert` (PEM) in use and
/// a rotation still `pending`.
fn report(cert: Option<&[u8]>, pending: Option<&str>, metrics: &Metrics, health: &Health) {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    let expiry = match cert.map(validity) {
        None => None,
        Some(Some((not_before, not_after))) => {
            metrics.etcd_client_cert_expiry.set(not_after);
            expiry_warning(not_before, not_after, now)
        }
        Some(None) => Some("the expiry of the etcd client certificate cannot be read (not a PEM certificate?)".to_string()),
    };
    metrics.etcd_client_cert_expiring.set(expiry.is_some() as i64);
    let warning = match (expiry, pending) {
        (Some(e), Some(p)) => Some(format!("{e}; {p}")),
        (e, p) => e.or(p.map(str::to_string)),
    };
    let mut current = health.warning.lock().unwrap_or_else(|e| e.into_inner());
    if warning != *current {
        match &warning {
            Some(w) => warn!("{w}"),
            None => info!("no warning about the etcd credentials any more"),
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
