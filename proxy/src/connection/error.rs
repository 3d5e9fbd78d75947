//! Why a connection could not be made or served. Each variant carries the addresses involved,
//! keeps its `io::Error` source, and has a short [`ConnectionError::label`] for metrics.

use std::{io, net::SocketAddr, sync::Arc, time::Duration};

#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    /// The listener (or its pool) is at its limit; the client was refused without touching a
    /// backend.
    #[error("listener {listener}: connection from {src} refused, limit of {max} connections reached")]
    LimitExceeded { listener: Arc<str>, src: SocketAddr, max: usize },

    /// A peer outside `acceptProxyProtocol.trustedSources` connected to a listener that reads
    /// PROXY headers.
    #[error("listener {listener}: {src} is not a trusted PROXY protocol source")]
    UntrustedSource { listener: Arc<str>, src: SocketAddr },

    /// A trusted peer sent no valid PROXY protocol header.
    #[error("listener {listener}: no valid PROXY protocol header from {src}")]
    ProxyHeader {
        listener: Arc<str>,
        src: SocketAddr,
        #[source]
        source: crate::proxy_protocol::ReadError,
    },

    /// A pool already holds an entry for this key (two first packets raced); the first wins.
    #[error("listener {listener}: {src} already has an entry")]
    Duplicate { listener: Arc<str>, src: SocketAddr },

    /// An operation on a leg did not finish in time.
    #[error("{src} -> {dst}: {operation} timed out after {after:?}")]
    Timeout { src: SocketAddr, dst: SocketAddr, operation: &'static str, after: Duration },

    /// An established leg failed.
    #[error("{src} -> {dst}: connection broken while {operation}")]
    Broken {
        src: SocketAddr,
        dst: SocketAddr,
        operation: &'static str,
        #[source]
        source: io::Error,
    },

    /// A backend refused or could not be reached.
    #[error("{src} -> {dst}: connect failed")]
    ConnectionFailed {
        src: SocketAddr,
        dst: SocketAddr,
        #[source]
        source: io::Error,
    },

    /// A listening socket could not be bound.
    #[error("cannot bind {address}")]
    BindFailed {
        address: SocketAddr,
        #[source]
        source: io::Error,
    },

    /// No backend could take the connection: all ejected, failed, or without addresses.
    #[error("listener {listener}: no backend available for {src} after {attempts} attempt(s)")]
    NoBackend { listener: Arc<str>, src: SocketAddr, attempts: u32 },
}

impl ConnectionError {
    /// Short, fixed label for metrics (`reason="connect_timeout"`).
    pub fn label(&self) -> &'static str {
        match self {
            Self::LimitExceeded { .. } => "limit",
            Self::Duplicate { .. } => "duplicate",
            Self::UntrustedSource { .. } => "untrusted_source",
            Self::ProxyHeader { .. } => "proxy_protocol",
            Self::Timeout { operation: "connect", .. } => "connect_timeout",
            Self::Timeout { .. } => "timeout",
            Self::Broken { .. } => "broken",
            Self::ConnectionFailed { .. } => "connect_failed",
            Self::BindFailed { .. } => "bind_failed",
            Self::NoBackend { .. } => "no_backend",
        }
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
    fn connection_error_labels_are_short_and_fixed() {
        let src = addr("127.0.0.1:1000");
        let dst = addr("127.0.0.1:2000");
        let timeout = ConnectionError::Timeout { src, dst, operation: "connect", after: Duration::from_secs(1) };
        assert_eq!(timeout.label(), "connect_timeout");
        let limit = ConnectionError::LimitExceeded { listener: "web".into(), src, max: 3 };
        assert_eq!(limit.label(), "limit");
        let refused = ConnectionError::ConnectionFailed { src, dst, source: io::ErrorKind::ConnectionRefused.into() };
        assert_eq!(refused.label(), "connect_failed");
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
