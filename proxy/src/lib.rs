//! l4proxy: a Layer-4 (TCP/UDP) proxy for Kubernetes.
//!
//! - [`config`]: the config schema (shared with the `L4Proxy` resource), parsing and checks.
//! - [`connection`]: the connection-management API and the TCP connection manager.
//! - [`backend`]: backends, their health and ejection, connecting with failover.
//! - [`balance`]: load-balancing algorithms.
//! - [`routing`]: choosing a route for what probing found.
//! - [`metrics`]: every metric, registered in one place.
//! - [`pool`]: the bounded connection pool with expiry and `PoolStats`.
//! - [`probe`]: protocol probing (TLS SNI/ALPN, HTTP, SSH, QUIC, WireGuard) for routing.
//! - [`proxy_protocol`]: PROXY protocol v1/v2 headers, read and written.
//! - [`server`]: the running proxy: listeners, reload, stats, drain.
//! - [`admin`]: the admin HTTP server.
//! - [`telemetry`]: logging, metrics text and the health/metrics HTTP server, shared with the operator.

#![deny(rust_2018_idioms)]
#![forbid(unsafe_code)]

pub mod admin;
pub mod backend;
pub mod balance;
pub mod config;
pub mod connection;
pub mod metrics;
pub mod pool;
pub mod probe;
pub mod proxy_protocol;
pub mod routing;
pub mod server;
pub mod telemetry;

pub use connection::{
    CloseReason, ConnectionContext, ConnectionError, ConnectionManager, ConnectionMetrics, Lifecycle, ListenerSettings,
    TcpConnection, TcpConnectionManager, UdpConnection, UdpConnectionInfo, UdpConnectionManager,
};
pub use pool::{ConnectionPool, DashMapConnectionPool, PoolEntry, PoolStats};
pub use probe::{TcpProbedProtocol, UdpProbedProtocol};
pub use server::Proxy;
