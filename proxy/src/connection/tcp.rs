//! The TCP connection manager: admission against `maxConnections`, backend connect with
//! failover, the two-way copy, and what each connection reports when it ends.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use arc_swap::ArcSwap;
use tokio::{net::TcpStream, time::Instant};
use tokio_util::sync::CancellationToken;

use super::{
    CloseReason, ConnectionContext, ConnectionError, ConnectionManager, ConnectionMetrics,
    pump::{ByteCounters, pump},
};
use crate::{
    backend::{BackendSet, Connected},
    config::{EffectiveLimits, ListenerConfig},
    metrics::{ListenerMetrics, Metrics},
};

/// Everything about a TCP listener that a reload may change, swapped as one unit. A connection
/// keeps the snapshot it was admitted with, so a reload never changes a connection mid-flight.
pub struct TcpListenerSettings {
    pub name: Arc<str>,
    pub config: ListenerConfig,
    pub backends: BackendSet,
    pub metrics: ListenerMetrics,
}

impl TcpListenerSettings {
    /// Settings for `config`; `previous` lends backend state to backends it also had.
    pub fn new(config: ListenerConfig, previous: Option<&TcpListenerSettings>, metrics: &Metrics) -> Self {
        let previous_backends = previous.filter(|p| *p.name == config.name).map(|p| &p.backends);
        Self {
            name: config.name.as_str().into(),
            backends: BackendSet::new(&config, previous_backends, metrics),
            metrics: metrics.listener(&config.name),
            config,
        }
    }

    pub fn limits(&self) -> &EffectiveLimits {
        &self.config.limits
    }
}

/// Serves the connections of one TCP listening socket.
pub struct TcpConnectionManager {
    settings: ArcSwap<TcpListenerSettings>,
    active: Arc<AtomicUsize>,
    /// Cancelled at the end of the shutdown drain: cuts connections still open.
    cut: CancellationToken,
}

/// An admitted TCP connection: the client socket, its context and its slot under the limit.
pub struct TcpConnection {
    pub context: ConnectionContext,
    client: TcpStream,
    settings: Arc<TcpListenerSettings>,
    _slot: Slot,
}

/// A place under `maxConnections`, given back on drop however the connection ends.
struct Slot {
    active: Arc<AtomicUsize>,
    gauge: prometheus_client::metrics::gauge::Gauge,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.active.fetch_sub(1, Ordering::AcqRel);
        self.gauge.dec();
    }
}

impl TcpConnectionManager {
    pub fn new(settings: TcpListenerSettings, cut: CancellationToken) -> Self {
        Self { settings: ArcSwap::from_pointee(settings), active: Arc::new(AtomicUsize::new(0)), cut }
    }

    /// The settings new connections get.
    pub fn settings(&self) -> Arc<TcpListenerSettings> {
        self.settings.load_full()
    }

    /// Applies a reloaded listener config to new connections; open ones keep theirs.
    pub fn update(&self, config: ListenerConfig, metrics: &Metrics) {
        let next = TcpListenerSettings::new(config, Some(&self.settings.load()), metrics);
        self.settings.store(Arc::new(next));
    }

    fn try_take_slot(&self, max: usize) -> bool {
        self.active.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1)).is_ok()
    }
}

impl ConnectionManager for TcpConnectionManager {
    type Client = TcpStream;
    type Connection = TcpConnection;

    fn create_connection(
        &self,
        client: TcpStream,
        source: SocketAddr,
        destination: SocketAddr,
    ) -> Result<TcpConnection, ConnectionError> {
        let settings = self.settings.load_full();
        let max = settings.limits().max_connections as usize;
        if !self.try_take_slot(max) {
            settings.metrics.rejected_limit.inc();
            return Err(ConnectionError::LimitExceeded { listener: settings.name.clone(), src: source, max });
        }
        settings.metrics.accepted.inc();
        settings.metrics.active.inc();
        let slot = Slot { active: self.active.clone(), gauge: settings.metrics.active.clone() };
        let context = ConnectionContext::new(settings.name.clone(), source, destination);
        Ok(TcpConnection { context, client, settings, _slot: slot })
    }

    async fn handle_connection(&self, connection: TcpConnection) -> Result<ConnectionMetrics, ConnectionError> {
        let TcpConnection { context, client, settings, _slot } = connection;
        let limits = *settings.limits();
        let mut metrics = ConnectionMetrics::default();

        let connected = settings
            .backends
            .connect(&context, limits.connect_timeout.get(), limits.ejection_cooldown.get())
            .await;
        let Connected { stream: backend, address, lease, attempts } = match connected {
            Ok(connected) => connected,
            Err(error) => {
                metrics.close_reason = match error {
                    ConnectionError::NoBackend { .. } => CloseReason::NoBackend,
                    _ => CloseReason::ConnectFailed,
                };
                finish(&context, &settings, &mut metrics, None, Some(&error as &dyn std::error::Error));
                return Err(error);
            }
        };
        let connect_time = context.started.elapsed();
        settings.metrics.connect_time.observe(connect_time.as_secs_f64());
        metrics.backend = Some(address);
        metrics.connect_attempts = attempts;
        metrics.connect_time = Some(connect_time);
        metrics.lifecycle.backend_connected = Some(connect_time);

        // Small writes (handshakes, RPCs) must not wait for Nagle; errors here only cost latency.
        let _ = client.set_nodelay(true);
        let _ = backend.set_nodelay(true);

        let counters = ByteCounters { up: &settings.metrics.bytes_received, down: &settings.metrics.bytes_sent };
        let outcome = pump(&client, &backend, limits.idle_timeout.get(), &self.cut, counters).await;
        drop((client, backend));

        let since_start = |at: Option<Instant>| at.map(|t| t.saturating_duration_since(context.started));
        metrics.bytes_received = outcome.bytes_up;
        metrics.bytes_sent = outcome.bytes_down;
        metrics.lifecycle.client_finished = since_start(outcome.client_finished);
        metrics.lifecycle.backend_finished = since_start(outcome.backend_finished);
        metrics.close_reason = outcome.reason;
        let error = outcome.error.as_ref().map(|e| e as &dyn std::error::Error);
        finish(&context, &settings, &mut metrics, Some(lease.backend().address()), error);
        Ok(metrics)
    }

    fn connection_count(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    fn max_connections(&self) -> usize {
        self.settings.load().limits().max_connections as usize
    }
}

/// Records the end of a connection: lifetime, close reason, and one access-log line.
fn finish(
    context: &ConnectionContext,
    settings: &TcpListenerSettings,
    metrics: &mut ConnectionMetrics,
    backend: Option<&str>,
    error: Option<&dyn std::error::Error>,
) {
    metrics.lifetime = context.started.elapsed();
    metrics.lifecycle.closed = Some(metrics.lifetime);
    settings.metrics.closed(metrics.close_reason).inc();
    settings.metrics.duration.observe(metrics.lifetime.as_secs_f64());
    tracing::info!(
        target: "l4proxy::access",
        connection = context.id,
        listener = %context.listener,
        source = %context.source,
        backend = backend.unwrap_or("-"),
        backend_address = metrics.backend.map(tracing::field::display),
        bytes_received = metrics.bytes_received,
        bytes_sent = metrics.bytes_sent,
        duration_ms = metrics.lifetime.as_millis() as u64,
        reason = metrics.close_reason.label(),
        error = error.map(tracing::field::display),
        "connection closed"
    );
}
