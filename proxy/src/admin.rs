//! The admin HTTP server: the shared `/healthz`, `/readyz` and `/metrics`
//! ([`crate::telemetry`]), served to anyone who can reach the address (in a pod: the kubelet's
//! probes, Prometheus), plus `/stats` and `/config`, served on loopback only (they show
//! backends and the whole config, which nobody outside the pod needs).

use std::sync::Arc;

use axum::{Json, Router, extract::State, routing::get};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{server::Proxy, telemetry};

impl telemetry::Observed for Proxy {
    fn metrics_text(&self) -> String {
        self.follow_kernel_counters();
        self.metrics().encode()
    }

    fn readiness(&self) -> Result<(), String> {
        self.readiness()
    }
}

/// Most admin connections at once (see [`telemetry::HttpLimits`]): descriptors stay for the
/// data path whatever admin clients do.
pub const MAX_CONNECTIONS: usize = 64;

/// Serves until `stop` is cancelled.
pub async fn serve(socket: TcpListener, proxy: Arc<Proxy>, stop: CancellationToken) {
    let own = Router::new()
        .route("/stats", get(|State(p): State<Arc<Proxy>>| async move { Json(p.stats()) }))
        .route("/config", get(|State(p): State<Arc<Proxy>>| async move { Json(p.config()) }))
        .with_state(proxy.clone());
    let app = telemetry::router(proxy).merge(telemetry::loopback_only(own));
    let limits = telemetry::HttpLimits { max_connections: MAX_CONNECTIONS, ..Default::default() };
    telemetry::serve(socket, app, limits, stop).await;
}
