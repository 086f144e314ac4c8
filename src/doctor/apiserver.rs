//! Reaching the API server: GET /version, which any authenticated identity may read, and
//! the Date header of its answer for the clock check.

use std::time::SystemTime;

use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::client::Body;

use super::clock::DateSample;
use super::{Finding, KUBE_TIMEOUT, chain};

const CHECK: &str = "kubernetes";

/// Whether the API server answers with these credentials (Err: why not), and its clock as
/// seen then.
pub async fn reach(client: &Client) -> Result<(Finding, Option<DateSample>), Finding> {
    let request = http::Request::get("/version").body(Body::empty()).expect("a valid request");
    let before = SystemTime::now();
    let sent = tokio::time::timeout(KUBE_TIMEOUT, client.send(request)).await;
    let after = SystemTime::now();
    let response = match sent {
        Err(_) => return Err(Finding::fail(CHECK, format!("the API server did not answer within {KUBE_TIMEOUT:?}"), "check the kubeconfig's server address and the network path to it")),
        Ok(Err(e)) => return Err(Finding::fail(CHECK, format!("the API server cannot be reached: {}", chain(&e)), "check the kubeconfig's server address, its CA and the network path to it")),
        Ok(Ok(r)) => r,
    };
    let status = response.status();
    let date = response.headers().get(http::header::DATE).and_then(|d| d.to_str().ok()).map(str::to_string);
    let body = tokio::time::timeout(KUBE_TIMEOUT, response.into_body().collect_bytes()).await.ok().and_then(Result::ok).unwrap_or_default();
    if status == http::StatusCode::UNAUTHORIZED {
        return Err(Finding::fail(CHECK, "the API server refuses these credentials (401 Unauthorized)", "renew the token or client certificate in the kubeconfig (in a pod: the ServiceAccount token)"));
    }
    if !status.is_success() {
        return Err(Finding::fail(CHECK, format!("GET /version answered {status}"), "check that the kubeconfig points at a Kubernetes API server"));
    }
    let version = serde_json::from_slice::<serde_json::Value>(&body).ok().and_then(|v| v["gitVersion"].as_str().map(str::to_string)).unwrap_or_else(|| "unknown version".into());
    let finding = Finding::ok(CHECK, format!("the API server answers ({version})"));
    let sample = date.and_then(|d| parse_http_date(&d)).map(|server| DateSample { before, after, server });
    Ok((finding, sample))
}

/// An HTTP Date header (IMF-fixdate, `Tue, 02 Dec 2025 20:21:34 GMT`).
pub fn parse_http_date(s: &str) -> Option<SystemTime> {
    let t: Timestamp = k8s_openapi::jiff::fmt::rfc2822::DateTimeParser::new().parse_timestamp(s).ok()?;
    Some(SystemTime::from(t))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn http_dates_parse() {
        let t = parse_http_date("Wed, 02 Dec 2026 20:21:34 GMT").unwrap();
        assert_eq!(t.duration_since(UNIX_EPOCH).unwrap(), Duration::from_secs(1_796_242_894));
        assert_eq!(parse_http_date("yesterday"), None);
    }
}
