//! What the proxy and the operator share for being observed: log set-up, Prometheus text from
//! a registry, and the HTTP server for `/healthz`, `/readyz` and `/metrics` (the proxy adds its
//! own routes to it).

use std::{net::SocketAddr, sync::Arc, time::Duration};

use axum::{
    Extension, Router,
    extract::{ConnectInfo, State},
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use prometheus_client::registry::Registry;
use tokio::{net::TcpListener, sync::Semaphore};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
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
    /// What a ready process is doing, added to `/readyz`'s body (`ready: leader`).
    fn role(&self) -> Option<String> {
        None
    }
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
        Ok(()) => match target.role() {
            Some(role) => (StatusCode::OK, format!("ready: {role}\n")),
            None => (StatusCode::OK, "ready\n".to_owned()),
        },
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n")),
    }
}

async fn metrics<T: Observed>(State(target): State<Arc<T>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, OPENMETRICS)], target.metrics_text())
}

/// Bounds of the HTTP server, so that no client can starve the process of descriptors or
/// hold a connection open: at most `max_connections` at once (beyond, new ones wait in the
/// kernel's accept queue, taking no descriptor), each closed when a request's headers (or the
/// next request on a kept-alive connection) take longer than `header_read_timeout`, and in any
/// case after `lifetime`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HttpLimits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub lifetime: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self { max_connections: 64, header_read_timeout: Duration::from_secs(5), lifetime: Duration::from_secs(60) }
    }
}

/// Pause after a failed accept, so the loop does not spin (e.g. out of descriptors).
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// Serves `app` on `socket` within `limits` until `stop` is cancelled. Handlers can read the
/// peer's address with `axum::extract::ConnectInfo<SocketAddr>` (see [`loopback_only`]).
pub async fn serve(socket: TcpListener, app: Router, limits: HttpLimits, stop: CancellationToken) {
    let address = socket.local_addr().ok();
    let places = Arc::new(Semaphore::new(limits.max_connections));
    let connections = TaskTracker::new();
    let mut stopped = std::pin::pin!(stop.cancelled());
    loop {
        let place = tokio::select! {
            _ = &mut stopped => break,
            place = places.clone().acquire_owned() => place.expect("the semaphore is never closed"),
        };
        let (stream, peer) = tokio::select! {
            _ = &mut stopped => break,
            accepted = socket.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::debug!(?address, %error, "HTTP accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                    continue;
                }
            },
        };
        let service = TowerToHyperService::new(app.clone().layer(Extension(ConnectInfo(peer))));
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            .serve_connection(TokioIo::new(stream), service);
        connections.spawn(async move {
            let _place = place;
            // Past its lifetime the connection is dropped, mid-response or not.
            let _ = tokio::time::timeout(limits.lifetime, connection).await;
        });
    }
    connections.close();
    // In-flight requests get a moment to finish; the process is stopping anyway.
    let _ = tokio::time::timeout(Duration::from_secs(1), connections.wait()).await;
}

/// `router`'s routes answer only peers on loopback (a process in the same pod, or on the same
/// host); others get 403.
pub fn loopback_only(router: Router) -> Router {
    router.layer(axum::middleware::from_fn(
        |ConnectInfo(peer): ConnectInfo<SocketAddr>, request: axum::extract::Request, next: axum::middleware::Next| async move {
            if peer.ip().is_loopback() {
                next.run(request).await
            } else {
                (StatusCode::FORBIDDEN, "served on loopback only\n").into_response()
            }
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use tower::ServiceExt;

    async fn status_for(peer: &str) -> StatusCode {
        let app = loopback_only(Router::new().route("/config", get(|| async { "the config" })));
        let mut request = axum::http::Request::get("/config").body(Body::empty()).unwrap();
        request.extensions_mut().insert(ConnectInfo(peer.parse::<SocketAddr>().unwrap()));
        app.oneshot(request).await.unwrap().status()
    }

    #[tokio::test]
    async fn loopback_only_routes_answer_loopback_peers_and_refuse_others() {
        assert_eq!(status_for("127.0.0.1:40000").await, StatusCode::OK);
        assert_eq!(status_for("[::1]:40000").await, StatusCode::OK);
        assert_eq!(status_for("10.1.2.3:40000").await, StatusCode::FORBIDDEN);
        assert_eq!(status_for("[fd00::1]:40000").await, StatusCode::FORBIDDEN);
    }
}
