//! l4proxy: a Layer-4 (TCP/UDP) proxy for Kubernetes.
//!
//! - [`config`]: the config schema (shared with the `L4Proxy` resource), parsing and checks.
//! - [`connection`]: the connection-management API: TCP and UDP connection managers, the pool
//!   and admission that bound them, what each connection measured and how it is recorded.
//! - [`control`]: the control protocol (gRPC) between proxies and the operator.
//! - [`backend`]: backends, their health and ejection, connecting with failover.
//! - [`balance`]: load-balancing algorithms.
//! - [`routing`]: choosing a route for what probing found.
//! - [`metrics`]: every metric, registered in one place.
//! - [`probe`]: protocol probing (TLS SNI/ALPN, HTTP, SSH, QUIC, WireGuard) for routing.
//! - [`proxy_protocol`]: PROXY protocol v1/v2 headers, read and written.
//! - [`server`]: the running proxy: binding, accept loops, listener health, reload, stats, drain.
//! - [`admin`]: the admin HTTP server.
//! - `sys`: the one module that calls the kernel directly (a socket option).
//! - [`telemetry`]: logging, metrics text and the health/metrics HTTP server, shared with the operator.

#![deny(rust_2018_idioms)]
#![deny(unsafe_code)]

pub mod admin;
pub mod backend;
pub mod balance;
pub mod config;
pub mod connection;
pub mod control;
pub mod metrics;
pub mod probe;
pub mod proxy_protocol;
pub mod routing;
pub mod server;
#[allow(unsafe_code)]
mod sys;
pub mod telemetry;

pub use connection::{
    CloseReason, ConnectionContext, ConnectionError, ConnectionManager, ConnectionMetrics, ConnectionPool,
    DashMapConnectionPool, Lifecycle, ListenerManager, ListenerSettings, PoolEntry, PoolStats, TcpConnection,
    TcpConnectionManager, UdpConnection, UdpConnectionInfo, UdpConnectionManager,
};
pub use probe::{TcpProbedProtocol, UdpProbedProtocol};
pub use server::Proxy;
