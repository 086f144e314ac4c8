//! The HTTP surface: /healthz (the process serves), /readyz (caches synced and etcd
//! reachable), /metrics (Prometheus text format).

use std::net::SocketAddr;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::metrics::Metrics;
use crate::registry::SharedView;

#[derive(Clone)]
struct AppState {
    metrics: Metrics,
    view: SharedView,
}

pub async fn serve(addr: SocketAddr, metrics: Metrics, view: SharedView, shutdown: CancellationToken) {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(AppState { metrics, view });
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            error!(%addr, error = %e, "cannot listen for /metrics and health checks");
            return;
        }
    };
    info!(addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "serving /healthz /readyz /metrics");
    let _ = axum::serve(listener, app).with_graceful_shutdown(async move { shutdown.cancelled().await }).await;
}

async fn readyz(State(s): State<AppState>) -> impl IntoResponse {
    let view = s.view.read().unwrap();
    if !view.synced {
        return (StatusCode::SERVICE_UNAVAILABLE, "caches not synced\n".to_string());
    }
    if let Some(e) = &view.etcd_unavailable {
        return (StatusCode::SERVICE_UNAVAILABLE, format!("etcd unavailable: {e}\n"));
    }
    (StatusCode::OK, "ok\n".to_string())
}

async fn metrics_text(State(s): State<AppState>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], s.metrics.encode())
}
