//! The failure taxonomy: why a connection ended ([`CloseReason`], whose labels are the only
//! reason strings of the connection metrics), what failed ([`ConnectionError`], each variant
//! mapped to its reason by [`ConnectionError::close_reason`]), and why a UDP datagram was
//! dropped ([`DropReason`], which names a refused session by its close reason).

use std::{io, net::SocketAddr, sync::Arc, time::Duration};

/// Why a connection (or UDP session) ended, or was refused before it began.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum CloseReason {
    /// Both sides finished sending and both legs closed.
    #[default]
    Completed,
    /// No bytes either way for `idleTimeout`.
    IdleTimeout,
    /// Open for `maxConnectionDuration`.
    MaxDuration,
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
    /// Refused on arrival: the listener is at `maxConnections`.
    Limit,
    /// A local resource ran out while setting up the backend leg (file descriptors, buffer
    /// memory, local ports): not the backend's fault, so it does not count against its health.
    LocalError,
    /// The task serving it panicked (a bug): it was closed and logged.
    Panicked,
}

impl CloseReason {
    pub const ALL: [CloseReason; 15] = [
        Self::Completed,
        Self::IdleTimeout,
        Self::MaxDuration,
        Self::ClientError,
        Self::BackendError,
        Self::Shutdown,
        Self::ConnectFailed,
        Self::NoBackend,
        Self::NoRoute,
        Self::ProxyProtocol,
        Self::UntrustedSource,
        Self::Evicted,
        Self::Limit,
        Self::LocalError,
        Self::Panicked,
    ];

    /// The `reason` label of the connection metrics.
    pub fn label(self) -> &'static str {
        match self {
            Self::Completed => "completed",
            Self::IdleTimeout => "idle_timeout",
            Self::MaxDuration => "max_duration",
            Self::ClientError => "client_error",
            Self::BackendError => "backend_error",
            Self::Shutdown => "shutdown",
            Self::ConnectFailed => "connect_failed",
            Self::NoBackend => "no_backend",
            Self::NoRoute => "no_route",
            Self::ProxyProtocol => "proxy_protocol",
            Self::UntrustedSource => "untrusted_source",
            Self::Evicted => "evicted",
            Self::Limit => "limit",
            Self::LocalError => "local_error",
            Self::Panicked => "panicked",
        }
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }

    pub(crate) fn from_index(index: usize) -> Option<Self> {
        Self::ALL.get(index).copied()
    }
}

/// Why a UDP datagram was dropped. Labels are the `reason` of the dropped-datagrams metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// From a new client whose session was refused (at the limit, no route, no backend, ...).
    Refused(CloseReason),
    /// The socket towards the backend or the client could not take it (buffer full, error).
    SendFailed,
    /// Held while probing a new session, and the probe's datagram bound was reached.
    ProbeOverflow,
}

impl DropReason {
    pub fn label(self) -> &'static str {
        match self {
            Self::Refused(reason) => reason.label(),
            Self::SendFailed => "send_failed",
            Self::ProbeOverflow => "probe_overflow",
        }
    }
}

/// Which leg of a connection failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Leg {
    Client,
    Backend,
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    /// The listener is at its limit; the client was refused without touching a backend.
    #[error("listener {listener}: connection from {src} refused, limit of {max} connections reached")]
    LimitExceeded { listener: Arc<str>, src: SocketAddr, max: usize },

    /// A peer outside `acceptProxyProtocol.trustedSources` connected to a listener that reads
    /// PROXY headers.
    #[error("listener {listener}: {src} is not a trusted PROXY protocol source")]
    UntrustedSource { listener: Arc<str>, src: SocketAddr },

    /// A trusted peer sent no valid PROXY protocol header.
    #[error("listener {listener}: no valid PROXY protocol header from {src}: {source}")]
    ProxyHeader {
        listener: Arc<str>,
        src: SocketAddr,
        #[source]
        source: crate::proxy_protocol::ReadError,
    },

    /// Probing matched no route and the listener has no default backends.
    #[error("listener {listener}: no route matches what {src} sent, and there is no default route")]
    NoRoute { listener: Arc<str>, src: SocketAddr },

    /// A backend did not answer a connect in time.
    #[error("{src} -> {dst}: connect timed out after {after:?}")]
    ConnectTimeout { src: SocketAddr, dst: SocketAddr, after: Duration },

    /// A backend refused or could not be reached.
    #[error("{src} -> {dst}: connect failed")]
    ConnectionFailed {
        src: SocketAddr,
        dst: SocketAddr,
        #[source]
        source: io::Error,
    },

    /// A local resource ran out while opening the backend leg (descriptors, buffers, memory,
    /// local ports): the backend is not to blame, and its health is left alone.
    #[error("{src} -> {dst}: no local resources for the backend connection: {source}")]
    LocalResource {
        src: SocketAddr,
        dst: SocketAddr,
        #[source]
        source: io::Error,
    },

    /// No backend could take the connection: all ejected, failed, or without addresses.
    #[error("listener {listener}: no backend available for {src} after {attempts} attempt(s)")]
    NoBackend { listener: Arc<str>, src: SocketAddr, attempts: u32 },

    /// An established leg failed.
    #[error("{leg:?} leg broken: {source}")]
    Broken {
        leg: Leg,
        #[source]
        source: io::Error,
    },
}

impl ConnectionError {
    /// How a connection that fails with this error ends.
    pub fn close_reason(&self) -> CloseReason {
        match self {
            Self::LimitExceeded { .. } => CloseReason::Limit,
            Self::UntrustedSource { .. } => CloseReason::UntrustedSource,
            Self::ProxyHeader { .. } => CloseReason::ProxyProtocol,
            Self::NoRoute { .. } => CloseReason::NoRoute,
            Self::ConnectTimeout { .. } | Self::ConnectionFailed { .. } => CloseReason::ConnectFailed,
            Self::NoBackend { .. } => CloseReason::NoBackend,
            Self::LocalResource { .. } => CloseReason::LocalError,
            Self::Broken { leg: Leg::Client, .. } => CloseReason::ClientError,
            Self::Broken { leg: Leg::Backend, .. } => CloseReason::BackendError,
        }
    }
}

/// Whether an error means this process or host ran out of something (file descriptors, kernel
/// buffers, memory, local ports), rather than that the peer failed.
pub fn is_local_exhaustion(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::EADDRNOTAVAIL)
    )
}

/// The error for a failed connect from `src` to `dst`: local exhaustion, or the backend's fault.
pub fn connect_error(src: SocketAddr, dst: SocketAddr, source: io::Error) -> ConnectionError {
    if is_local_exhaustion(&source) {
        ConnectionError::LocalResource { src, dst, source }
    } else {
        ConnectionError::ConnectionFailed { src, dst, source }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error;

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    #[test]
    fn connection_errors_map_to_their_close_reasons() {
        let src = addr("127.0.0.1:1000");
        let dst = addr("127.0.0.1:2000");
        let timeout = ConnectionError::ConnectTimeout { src, dst, after: Duration::from_secs(1) };
        assert_eq!(timeout.close_reason(), CloseReason::ConnectFailed);
        let limit = ConnectionError::LimitExceeded { listener: "web".into(), src, max: 3 };
        assert_eq!(limit.close_reason().label(), "limit");
        let reset = ConnectionError::Broken { leg: Leg::Backend, source: io::ErrorKind::ConnectionReset.into() };
        assert_eq!(reset.close_reason(), CloseReason::BackendError);
        assert_eq!(DropReason::Refused(limit.close_reason()).label(), "limit");
    }

    #[test]
    fn running_out_of_descriptors_is_local_and_a_refusal_is_the_backends() {
        let (src, dst) = (addr("127.0.0.1:1"), addr("127.0.0.1:2"));
        let emfile = connect_error(src, dst, io::Error::from_raw_os_error(libc::EMFILE));
        assert_eq!(emfile.close_reason(), CloseReason::LocalError);
        assert!(emfile.to_string().contains("os error 24"), "the errno is in the message: {emfile}");
        let refused = connect_error(src, dst, io::Error::from_raw_os_error(libc::ECONNREFUSED));
        assert_eq!(refused.close_reason(), CloseReason::ConnectFailed);
    }

    #[test]
    fn close_reasons_round_trip_through_their_index_and_have_distinct_labels() {
        let labels: std::collections::HashSet<_> = CloseReason::ALL.iter().map(|r| r.label()).collect();
        assert_eq!(labels.len(), CloseReason::ALL.len());
        for reason in CloseReason::ALL {
            assert_eq!(CloseReason::from_index(reason.index()), Some(reason));
        }
    }

    #[test]
    fn connection_error_keeps_source_chain_and_addresses() {
        let err = ConnectionError::ConnectionFailed {
            src: addr("127.0.0.1:1000"),
            dst: addr("[::1]:2000"),
            source: io::Error::new(io::ErrorKind::ConnectionRefused, "refused by peer"),
        };
        let text = err.to_string();
        assert!(text.contains("127.0.0.1:1000") && text.contains("[::1]:2000"), "{text}");
        assert_eq!(err.source().unwrap().to_string(), "refused by peer");
    }
}
