//! The HTTP surface: /healthz (the process serves, from the first moment), /readyz (started,
//! caches synced, and etcd reachable while leading), /metrics (Prometheus text format).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::metrics::Metrics;
use crate::registry::SharedView;

/// What /readyz reports on.
#[derive(Default)]
pub struct Health {
    /// Every watch has listed once.
    pub caches_synced: AtomicBool,
    /// This replica runs a registry term.
    pub leading: AtomicBool,
    /// The start-up step not done yet (connecting to etcd…), and why, if it failed.
    pub starting: std::sync::Mutex<Option<String>>,
    /// Something an operator must act on soon that does not stop this replica serving (the
    /// etcd client certificate about to expire): shown in /readyz's body, never a 503.
    pub warning: std::sync::Mutex<Option<String>>,
}

#[derive(Clone)]
struct AppState {
    metrics: Metrics,
    view: SharedView,
    health: Arc<Health>,
}

/// Binds the health and metrics listener: a port that cannot be bound is a start-up error
/// (probes would otherwise fail with nothing saying why).
pub async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr} for /healthz, /readyz and /metrics (--metrics-addr): {e}"))?;
    info!(addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "serving /healthz /readyz /metrics");
    Ok(listener)
}

pub async fn serve(listener: tokio::net::TcpListener, metrics: Metrics, view: SharedView, health: Arc<Health>, shutdown: CancellationToken) {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(AppState { metrics, view, health });
    if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(async move { shutdown.cancelled().await }).await {
        error!(error = %e, "the /healthz /readyz /metrics server stopped");
    }
}

async fn readyz(State(s): State<AppState>) -> impl IntoResponse {
    let (code, body) = readiness(&s);
    match s.health.warning.lock().unwrap_or_else(|e| e.into_inner()).as_deref() {
        Some(w) => (code, format!("{body}warning: {w}\n")),
        None => (code, body),
    }
}

fn readiness(s: &AppState) -> (StatusCode, String) {
    if let Some(step) = s.health.starting.lock().unwrap().clone() {
        return (StatusCode::SERVICE_UNAVAILABLE, format!("starting: {step}\n"));
    }
    if !s.health.caches_synced.load(Ordering::Relaxed) {
        return (StatusCode::SERVICE_UNAVAILABLE, "caches not synced\n".to_string());
    }
    if !s.health.leading.load(Ordering::Relaxed) {
        return (StatusCode::OK, "ok (standby)\n".to_string());
    }
    let view = s.view.read().unwrap();
    if !view.synced {
        return (StatusCode::SERVICE_UNAVAILABLE, "leading; adopting existing registrations\n".to_string());
    }
    if let Some(e) = &view.etcd_unavailable {
        return (StatusCode::SERVICE_UNAVAILABLE, format!("etcd unavailable: {e}\n"));
    }
    (StatusCode::OK, "ok (leader)\n".to_string())
}

async fn metrics_text(State(s): State<AppState>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], s.metrics.encode())
}
