//! Connection management: the [`ConnectionManager`] contract, what every connection carries
//! ([`ConnectionContext`]), what it measured ([`ConnectionMetrics`]) and how it failed
//! ([`ConnectionError`]).

mod error;
mod pump;
mod settings;
mod tcp;
mod udp;

use std::{
    future::Future,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use tokio::time::Instant;

pub use error::ConnectionError;
pub use pump::COPY_BUFFER_SIZE;
pub use settings::ListenerSettings;
pub use tcp::{TcpConnection, TcpConnectionManager};
pub use udp::{MAX_PROBE_DATAGRAMS, UdpConnection, UdpConnectionInfo, UdpConnectionManager, UdpSessionTask};

/// Creates and serves the connections of one listener, within its limits.
///
/// `create_connection` is the admission step (cheap, synchronous: the limit is checked here and a
/// slot is held by the returned connection until it is dropped); `handle_connection` does the
/// work and resolves when both legs are closed.
pub trait ConnectionManager: Send + Sync {
    /// What the listener hands over for a new client.
    type Client;
    /// An admitted connection, holding its slot.
    type Connection: Send;

    /// Admits a client from `source` that reached the listener at `destination`, or refuses it
    /// with [`ConnectionError::LimitExceeded`].
    fn create_connection(
        &self,
        client: Self::Client,
        source: SocketAddr,
        destination: SocketAddr,
    ) -> Result<Self::Connection, ConnectionError>;

    /// Serves an admitted connection to its end.
    fn handle_connection(
        &self,
        connection: Self::Connection,
    ) -> impl Future<Output = Result<ConnectionMetrics, ConnectionError>> + Send;

    /// Connections admitted and not yet finished.
    fn connection_count(&self) -> usize;

    /// The admission limit in force.
    fn max_connections(&self) -> usize;

    /// Whether one more connection would be admitted now.
    fn can_accept_connection(&self) -> bool {
        self.connection_count() < self.max_connections()
    }
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
    /// When it was admitted (monotonic).
    pub started: Instant,
    /// When it was admitted (wall clock, for logs).
    pub started_at: SystemTime,
}

impl ConnectionContext {
    pub fn new(listener: Arc<str>, source: SocketAddr, destination: SocketAddr) -> Self {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        Self {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            source,
            destination,
            listener,
            started: Instant::now(),
            started_at: SystemTime::now(),
        }
    }
}

/// Why a connection ended. Labels are the `reason` of the closed-connections metric.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum CloseReason {
    /// Both sides finished sending and both legs closed.
    #[default]
    Completed,
    /// No bytes either way for `idleTimeout`.
    IdleTimeout,
    /// The client reset the connection or a read/write on its leg failed.
    ClientError,
    /// The backend reset the connection or a read/write on its leg failed.
    BackendError,
    /// Cut at the end of the shutdown drain period.
    Shutdown,
    /// Every backend tried failed to connect.
    ConnectFailed,
    /// No backend was available (all ejected, or all already tried).
    NoBackend,
    /// Probing matched no route and the listener has no default backends.
    NoRoute,
    /// A trusted peer sent no valid PROXY protocol header.
    ProxyProtocol,
    /// A peer outside the trusted PROXY protocol sources.
    UntrustedSource,
    /// A UDP session ended by a reload that removed its backend.
    Evicted,
}

impl CloseReason {
    pub const ALL: [CloseReason; 11] = [
        Self::Completed,
        Self::IdleTimeout,
        Self::ClientError,
        Self::BackendError,
        Self::Shutdown,
        Self::ConnectFailed,
        Self::NoBackend,
        Self::NoRoute,
        Self::ProxyProtocol,
        Self::UntrustedSource,
        Self::Evicted,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Self::Completed => "completed",
            Self::IdleTimeout => "idle_timeout",
            Self::ClientError => "client_error",
            Self::BackendError => "backend_error",
            Self::Shutdown => "shutdown",
            Self::ConnectFailed => "connect_failed",
            Self::NoBackend => "no_backend",
            Self::NoRoute => "no_route",
            Self::ProxyProtocol => "proxy_protocol",
            Self::UntrustedSource => "untrusted_source",
            Self::Evicted => "evicted",
        }
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

/// Why a UDP datagram was dropped. Labels are the `reason` of the dropped-datagrams metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// A new client beyond `maxConnections` sessions.
    Limit,
    /// No backend available for a new session.
    NoBackend,
    /// Probing matched no route and there is no default route.
    NoRoute,
    /// The socket towards the backend or the client could not take it (buffer full, error).
    SendFailed,
    /// Held while probing a new session, and the probe's datagram bound was reached.
    ProbeOverflow,
}

impl DropReason {
    pub const ALL: [DropReason; 5] =
        [Self::Limit, Self::NoBackend, Self::NoRoute, Self::SendFailed, Self::ProbeOverflow];

    pub fn label(self) -> &'static str {
        match self {
            Self::Limit => "limit",
            Self::NoBackend => "no_backend",
            Self::NoRoute => "no_route",
            Self::SendFailed => "send_failed",
            Self::ProbeOverflow => "probe_overflow",
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

/// What one connection measured.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConnectionMetrics {
    /// The backend address the connection went to.
    pub backend: Option<SocketAddr>,
    /// Bytes read from the client (and sent to the backend).
    pub bytes_received: u64,
    /// Bytes read from the backend (and sent to the client).
    pub bytes_sent: u64,
    /// Time to establish the backend leg, failed attempts included.
    pub connect_time: Option<Duration>,
    /// Backend connect attempts made.
    pub connect_attempts: u32,
    /// Admission to close.
    pub lifetime: Duration,
    pub lifecycle: Lifecycle,
    pub close_reason: CloseReason,
}
