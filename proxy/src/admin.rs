//! The admin HTTP server: the shared `/healthz`, `/readyz` and `/metrics`
//! ([`crate::telemetry`]), plus `/stats` and `/config`.

use std::sync::Arc;

use axum::{Json, Router, extract::State, routing::get};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{server::Proxy, telemetry};

impl telemetry::Observed for Proxy {
    fn metrics_text(&self) -> String {
        self.metrics().encode()
    }

    fn readiness(&self) -> Result<(), String> {
        self.readiness()
    }
}

/// Serves until `stop` is cancelled.
pub async fn serve(socket: TcpListener, proxy: Arc<Proxy>, stop: CancellationToken) {
    let own = Router::new()
        .route("/stats", get(|State(p): State<Arc<Proxy>>| async move { Json(p.stats()) }))
        .route("/config", get(|State(p): State<Arc<Proxy>>| async move { Json(p.config()) }))
        .with_state(proxy.clone());
    telemetry::serve(socket, telemetry::router(proxy).merge(own), stop).await;
}
