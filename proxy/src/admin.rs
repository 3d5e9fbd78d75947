//! The admin HTTP server: `/healthz`, `/readyz`, `/metrics`, `/stats`, `/config`.

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::server::Proxy;

/// Serves until `stop` is cancelled.
pub async fn serve(socket: TcpListener, proxy: Arc<Proxy>, stop: CancellationToken) {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/stats", get(|State(p): State<Arc<Proxy>>| async move { Json(p.stats()) }))
        .route("/config", get(|State(p): State<Arc<Proxy>>| async move { Json(p.config()) }))
        .with_state(proxy);
    if let Err(error) = axum::serve(socket, app).with_graceful_shutdown(stop.cancelled_owned()).await {
        tracing::error!(%error, "admin server failed");
    }
}

async fn readyz(State(proxy): State<Arc<Proxy>>) -> impl IntoResponse {
    if proxy.is_ready() { (StatusCode::OK, "ready\n") } else { (StatusCode::SERVICE_UNAVAILABLE, "not ready\n") }
}

async fn metrics(State(proxy): State<Arc<Proxy>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], proxy.metrics().encode())
}
