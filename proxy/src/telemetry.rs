//! What the proxy and the operator share for being observed: log set-up, Prometheus text from
//! a registry, and the HTTP server for `/healthz`, `/readyz` and `/metrics` (the proxy adds its
//! own routes to it).

use std::sync::Arc;

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// Log line format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (colours only when the output is a terminal).
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Where log lines go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogOutput {
    Stdout,
    Stderr,
}

/// Installs the global subscriber: level from `RUST_LOG` (default `info`), one line per event.
/// Lines go through a bounded queue to a writer thread, so a slow output never stalls a worker;
/// when the queue is full, callers wait rather than lose lines. Keep the guard alive until exit:
/// dropping it flushes what is queued.
pub fn init_logging(format: LogFormat, output: LogOutput) -> tracing_appender::non_blocking::WorkerGuard {
    let (writer, guard, terminal) = match output {
        LogOutput::Stdout => {
            let (writer, guard) = non_blocking(std::io::stdout());
            (writer, guard, std::io::IsTerminal::is_terminal(&std::io::stdout()))
        }
        LogOutput::Stderr => {
            let (writer, guard) = non_blocking(std::io::stderr());
            (writer, guard, std::io::IsTerminal::is_terminal(&std::io::stderr()))
        }
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(writer).with_ansi(terminal);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
    guard
}

fn non_blocking<W: std::io::Write + Send + 'static>(
    out: W,
) -> (tracing_appender::non_blocking::NonBlocking, tracing_appender::non_blocking::WorkerGuard) {
    tracing_appender::non_blocking::NonBlockingBuilder::default().lossy(false).finish(out)
}

/// The content type of [`encode`]'s output.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Prometheus (OpenMetrics) text of every metric in `registry`.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::with_capacity(16 * 1024);
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}

/// A process that can be observed over HTTP.
pub trait Observed: Send + Sync + 'static {
    /// The `/metrics` body.
    fn metrics_text(&self) -> String;
    /// `Ok` when ready for traffic; otherwise why not (the body of a 503 from `/readyz`).
    fn readiness(&self) -> Result<(), String>;
}

/// `/healthz` (200 while the process runs), `/readyz` and `/metrics` for `target`; merge
/// further routes into it before [`serve`].
pub fn router<T: Observed>(target: Arc<T>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz::<T>))
        .route("/metrics", get(metrics::<T>))
        .with_state(target)
}

async fn readyz<T: Observed>(State(target): State<Arc<T>>) -> impl IntoResponse {
    match target.readiness() {
        Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n")),
    }
}

async fn metrics<T: Observed>(State(target): State<Arc<T>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, OPENMETRICS)], target.metrics_text())
}

/// Serves `app` on `socket` until `stop` is cancelled.
pub async fn serve(socket: TcpListener, app: Router, stop: CancellationToken) {
    let address = socket.local_addr().ok();
    if let Err(error) = axum::serve(socket, app).with_graceful_shutdown(stop.cancelled_owned()).await {
        tracing::error!(?address, %error, "HTTP server failed");
    }
}
