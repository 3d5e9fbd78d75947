//! Connection management: the [`ConnectionManager`] contract, what every connection carries
//! ([`ConnectionContext`]), what it measured ([`ConnectionMetrics`], which [`record`] turns into
//! metrics and the access-log line), how it failed ([`ConnectionError`]), and the pool and
//! admission that bound connections and sessions ([`pool`]).

mod error;
pub mod pool;
mod pump;
mod settings;
mod splice;
mod tcp;
mod udp;

use std::{
    future::Future,
    net::SocketAddr,
    panic::AssertUnwindSafe,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use futures::FutureExt;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

pub use error::{CloseReason, ConnectionError, DropReason, Leg, connect_error, is_local_exhaustion};
pub use pool::{Admission, ConnectionPool, DashMapConnectionPool, PoolEntry, PoolStats, Slot};
pub use pump::COPY_BUFFER_SIZE;
pub use settings::ListenerSettings;
pub use tcp::{TcpConnection, TcpConnectionManager};
pub use udp::{UdpClient, UdpConnection, UdpConnectionInfo, UdpConnectionManager};

use crate::{
    config::{ListenerConfig, Protocol},
    metrics::{ListenerMetrics, Metrics},
};

/// Creates and serves the connections of one listener, within its limits.
///
/// `create_connection` is the admission step (cheap, synchronous: the limit is checked here,
/// and a slot is held by the returned connection until it is dropped); `handle_connection` does
/// the work, resolves when the connection is over, and reports what it measured, failure
/// included: the caller hands that to [`record`].
pub trait ConnectionManager: Send + Sync {
    /// What the listener knows of a new client when it asks for a connection.
    type Client;
    /// An admitted connection, holding its slot.
    type Connection: Admitted;

    /// Admits a client from `source` that reached the listener at `destination`, or refuses it
    /// ([`ConnectionError::LimitExceeded`], or why no backend can take it).
    fn create_connection(
        &self,
        client: Self::Client,
        source: SocketAddr,
        destination: SocketAddr,
    ) -> Result<Self::Connection, ConnectionError>;

    /// Serves an admitted connection to its end.
    fn handle_connection(&self, connection: Self::Connection) -> impl Future<Output = ConnectionMetrics> + Send;

    /// Connections admitted and not yet finished.
    fn connection_count(&self) -> usize;

    /// The admission limit in force.
    fn max_connections(&self) -> usize;

    /// Whether one more connection would be admitted now.
    fn can_accept_connection(&self) -> bool {
        self.connection_count() < self.max_connections()
    }
}

/// What every admitted connection tells about itself.
pub trait Admitted: Send {
    fn context(&self) -> &ConnectionContext;
    /// The listener settings it was admitted with (and keeps through reloads).
    fn settings(&self) -> &Arc<ListenerSettings>;
}

impl<T: Admitted + Sync> Admitted for Arc<T> {
    fn context(&self) -> &ConnectionContext {
        (**self).context()
    }

    fn settings(&self) -> &Arc<ListenerSettings> {
        (**self).settings()
    }
}

/// What the server holds of a running listener, whatever its protocol.
pub trait ListenerManager: Send + Sync {
    /// The settings new connections get.
    fn settings(&self) -> Arc<ListenerSettings>;
    /// Applies a reloaded listener config to new connections; open ones keep theirs.
    fn update(&self, config: ListenerConfig, metrics: &Metrics);
    /// Open connections (TCP) or sessions (UDP) as a pool.
    fn pool_stats(&self) -> PoolStats;
    /// Packets the kernel dropped on the listening socket, where it counts them (UDP).
    fn receive_drops(&self) -> Option<u64> {
        None
    }
    /// At shutdown, ends what does not end by itself (UDP sessions); TCP connections drain.
    fn close_all(&self) {}
}

/// Identity and origin of one connection.
#[derive(Clone, Debug)]
pub struct ConnectionContext {
    /// Unique within the process.
    pub id: u64,
    /// The client's address.
    pub source: SocketAddr,
    /// The local address the client connected to.
    pub destination: SocketAddr,
    /// The listener that admitted it.
    pub listener: Arc<str>,
    pub protocol: Protocol,
    /// When it was admitted.
    pub started: Instant,
}

impl ConnectionContext {
    pub fn new(listener: Arc<str>, protocol: Protocol, source: SocketAddr, destination: SocketAddr) -> Self {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        Self {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            source,
            destination,
            listener,
            protocol,
            started: Instant::now(),
        }
    }
}

/// Moments in a connection's life, as offsets from its admission.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Lifecycle {
    /// The backend leg was established.
    pub backend_connected: Option<Duration>,
    /// The client shut its sending side (half-close).
    pub client_finished: Option<Duration>,
    /// The backend shut its sending side.
    pub backend_finished: Option<Duration>,
    /// Both legs closed.
    pub closed: Option<Duration>,
}

/// Datagrams a UDP session relayed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Datagrams {
    /// From the client (and sent to the backend).
    pub received: u64,
    /// From the backend (and sent to the client).
    pub sent: u64,
}

/// What one connection measured, and how it ended.
#[derive(Debug)]
pub struct ConnectionMetrics {
    /// Whose: with a PROXY protocol header, `source` and `destination` are the ones it carried.
    pub context: ConnectionContext,
    /// The backend as configured (its identity in metrics and health).
    pub backend_name: Option<Arc<str>>,
    /// The backend address the connection went to.
    pub backend: Option<SocketAddr>,
    /// Bytes read from the client (and sent to the backend).
    pub bytes_received: u64,
    /// Bytes read from the backend (and sent to the client).
    pub bytes_sent: u64,
    /// UDP sessions only.
    pub datagrams: Option<Datagrams>,
    /// Time to establish the backend leg, failed attempts included.
    pub connect_time: Option<Duration>,
    /// Backend connect attempts made.
    pub connect_attempts: u32,
    /// Admission to close.
    pub lifetime: Duration,
    pub lifecycle: Lifecycle,
    pub close_reason: CloseReason,
    /// What failed, when something did; its [`ConnectionError::close_reason`] is `close_reason`.
    pub error: Option<ConnectionError>,
}

impl ConnectionMetrics {
    /// Nothing measured yet.
    pub(crate) fn new(context: ConnectionContext) -> Self {
        Self {
            context,
            backend_name: None,
            backend: None,
            bytes_received: 0,
            bytes_sent: 0,
            datagrams: None,
            connect_time: None,
            connect_attempts: 0,
            lifetime: Duration::ZERO,
            lifecycle: Lifecycle::default(),
            close_reason: CloseReason::Completed,
            error: None,
        }
    }

    /// A connection that failed before any byte was relayed.
    pub(crate) fn failed(context: ConnectionContext, error: ConnectionError) -> Self {
        let mut metrics = Self::new(context);
        metrics.close_reason = error.close_reason();
        metrics.error = Some(error);
        metrics.close();
        metrics
    }

    /// Marks the end, now.
    pub(crate) fn close(&mut self) {
        self.lifetime = self.context.started.elapsed();
        self.lifecycle.closed = Some(self.lifetime);
    }
}

/// `at + by`, never panicking: every configured duration is at most
/// [`crate::config::MAX_DURATION`], so the sum always exists; were it ever not to, the latest
/// representable moment stands in, not a panic on the connection path.
pub(crate) fn later(at: Instant, by: Duration) -> Instant {
    at.checked_add(by).or_else(|| at.checked_add(crate::config::MAX_DURATION)).unwrap_or(at)
}

/// Records how a connection ended: its close reason and lifetime in its listener's metrics,
/// and one access-log line.
pub fn record(listener: &ListenerMetrics, metrics: &ConnectionMetrics) {
    let context = &metrics.context;
    listener.closed(metrics.close_reason).inc();
    listener.duration.observe(metrics.lifetime.as_secs_f64());
    tracing::info!(
        target: "l4proxy::access",
        connection = context.id,
        listener = %context.listener,
        protocol = context.protocol.label(),
        source = %context.source,
        backend = metrics.backend_name.as_deref().unwrap_or("-"),
        backend_address = metrics.backend.map(tracing::field::display),
        bytes_received = metrics.bytes_received,
        bytes_sent = metrics.bytes_sent,
        datagrams_received = metrics.datagrams.map(|d| d.received),
        datagrams_sent = metrics.datagrams.map(|d| d.sent),
        duration_ms = metrics.lifetime.as_millis() as u64,
        reason = metrics.close_reason.label(),
        error = metrics.error.as_ref().map(tracing::field::display),
        "connection closed"
    );
}

/// Serves an admitted connection on `tracker`, and records how it ended. A panic in serving it
/// is caught: the connection is closed (the unwinding drops what it held and gives its slot
/// back), counted as `reason="panicked"` and logged, so no connection ever vanishes
/// unaccounted.
pub fn serve<M>(tracker: &TaskTracker, manager: Arc<M>, connection: M::Connection)
where
    M: ConnectionManager + 'static,
    M::Connection: 'static,
{
    tracker.spawn(serving(manager, connection));
}

/// The task [`serve`] spawns (its size is what every open connection costs, so tests bound it).
pub(crate) fn serving<M>(manager: Arc<M>, connection: M::Connection) -> impl Future<Output = ()>
where
    M: ConnectionManager + 'static,
    M::Connection: 'static,
{
    let settings = connection.settings().clone();
    async move {
        match AssertUnwindSafe(manager.handle_connection(connection)).catch_unwind().await {
            Ok(metrics) => record(&settings.metrics, &metrics),
            Err(panic) => {
                let message = panic
                    .downcast_ref::<&str>()
                    .copied()
                    .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
                    .unwrap_or("(not a string)");
                settings.metrics.closed(CloseReason::Panicked).inc();
                tracing::error!(
                    listener = %settings.name,
                    protocol = settings.config.protocol.label(),
                    panic = message,
                    "connection task panicked; the connection was closed"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    /// A manager whose connections hit a bug while being served.
    struct Buggy;

    /// A connection that notes that it was dropped.
    struct Doomed {
        context: ConnectionContext,
        settings: Arc<ListenerSettings>,
        dropped: Arc<AtomicBool>,
    }

    impl Drop for Doomed {
        fn drop(&mut self) {
            self.dropped.store(true, Ordering::Relaxed);
        }
    }

    impl Admitted for Doomed {
        fn context(&self) -> &ConnectionContext {
            &self.context
        }

        fn settings(&self) -> &Arc<ListenerSettings> {
            &self.settings
        }
    }

    impl ConnectionManager for Buggy {
        type Client = ();
        type Connection = Doomed;

        fn create_connection(&self, _: (), src: SocketAddr, _: SocketAddr) -> Result<Doomed, ConnectionError> {
            Err(ConnectionError::NoBackend { listener: "web".into(), src, attempts: 0 })
        }

        async fn handle_connection(&self, doomed: Doomed) -> ConnectionMetrics {
            let _held = doomed;
            panic!("a bug in serving")
        }

        fn connection_count(&self) -> usize {
            0
        }

        fn max_connections(&self) -> usize {
            1
        }
    }

    #[tokio::test]
    async fn a_connection_whose_task_panics_is_dropped_and_counted_as_panicked() {
        let yaml = "listeners:\n- name: web\n  address: 127.0.0.1:1\n  backends: [{address: 127.0.0.1:2}]\n";
        let config = crate::config::check(&crate::config::parse_yaml(yaml).unwrap()).unwrap();
        let metrics = Metrics::new();
        let settings = Arc::new(ListenerSettings::new(config.listeners[0].clone(), None, &metrics));
        let address: SocketAddr = "127.0.0.1:1000".parse().unwrap();
        let context = ConnectionContext::new("web".into(), Protocol::Tcp, address, address);
        let tracker = TaskTracker::new();
        let dropped = Arc::new(AtomicBool::new(false));
        serve(&tracker, Arc::new(Buggy), Doomed { context, settings: settings.clone(), dropped: dropped.clone() });
        tracker.close();
        tracker.wait().await;
        assert!(dropped.load(Ordering::Relaxed), "what the connection held is let go");
        assert_eq!(settings.metrics.closed(CloseReason::Panicked).get(), 1);
    }
}
