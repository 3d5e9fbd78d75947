//! The config file's types, as users write them. The `listeners` type is shared with the
//! `L4Proxy` resource's spec, so one schema serves both (see shared/design.md).
//!
//! These types only describe shape; [`super::validate`] turns them into typed, checked values.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::ConfigDuration;

/// The proxy's config file.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProxyConfig {
    /// The admin HTTP server (`/healthz`, `/readyz`, `/metrics`, `/stats`, `/config`).
    /// Absent: no admin server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin: Option<AdminConfig>,
    /// The listeners to serve.
    #[serde(default)]
    pub listeners: Vec<Listener>,
}

/// Where the admin HTTP server listens.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AdminConfig {
    /// `ip:port`, e.g. `127.0.0.1:9901` or `[::1]:9901`.
    pub address: String,
}

/// One listening socket and where its traffic goes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Listener {
    /// Unique name of the listener; used in metrics, logs and status.
    pub name: String,
    /// Transport protocol.
    #[serde(default)]
    pub protocol: Protocol,
    /// Where the proxy listens: `ip:port`, e.g. `0.0.0.0:8080` or `[::]:8080`.
    pub address: String,
    /// How a backend is chosen for each new connection.
    #[serde(default)]
    pub load_balancing: LoadBalancing,
    /// Where connections go. At least one.
    pub backends: Vec<Backend>,
    /// Bounds on this listener's connections.
    #[serde(default)]
    pub limits: Limits,
    /// Routes by probed protocol and TLS/QUIC server name; the most specific match wins and
    /// unmatched traffic uses `backends`. A listener without routes never probes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
    /// Read a PROXY protocol (v1 or v2) header from each connection, and use the client address
    /// it carries. Only peers in `trustedSources` may send one; others are closed and counted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accept_proxy_protocol: Option<AcceptProxyProtocol>,
}

/// Which peers may send a PROXY protocol header.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AcceptProxyProtocol {
    /// CIDRs, e.g. `10.0.0.0/8`, `127.0.0.1/32`, `::1/128`. At least one.
    pub trusted_sources: Vec<String>,
}

/// A route: traffic matching `match` goes to its `backends`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Route {
    #[serde(rename = "match")]
    pub matches: RouteMatch,
    /// Where matching traffic goes. At least one.
    pub backends: Vec<Backend>,
}

/// What a route matches; every field given must match.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteMatch {
    /// The probed protocol: TLS, HTTP, SSH (TCP listeners); QUIC, WireGuard (UDP listeners).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<RouteProtocol>,
    /// TLS/QUIC server names (SNI) or HTTP Host: exact (`api.example.com`) or a suffix
    /// wildcard (`*.example.com`, which does not match `example.com` itself).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub server_names: Vec<String>,
    /// TLS/QUIC ALPN protocol ids; matches if the client offers any of them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub alpn: Vec<String>,
}

/// A protocol that probing recognises.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum RouteProtocol {
    #[serde(rename = "TLS")]
    Tls,
    #[serde(rename = "HTTP")]
    Http,
    #[serde(rename = "SSH")]
    Ssh,
    #[serde(rename = "QUIC")]
    Quic,
    WireGuard,
}

impl RouteProtocol {
    /// Whether listeners of `protocol` can detect this.
    pub fn fits(self, protocol: Protocol) -> bool {
        match self {
            Self::Tls | Self::Http | Self::Ssh => protocol == Protocol::Tcp,
            Self::Quic | Self::WireGuard => protocol == Protocol::Udp,
        }
    }
}

/// Transport protocol of a listener.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum Protocol {
    #[default]
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
}

/// Load-balancing algorithm.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum LoadBalancing {
    /// Smooth weighted round robin.
    #[default]
    RoundRobin,
    /// Fewest active connections relative to weight.
    LeastConnections,
    /// Power of two random choices: the less loaded of two random backends.
    Random,
    /// The client IP picks the backend (rendezvous hashing): stable across restarts and
    /// replicas, and only the clients of a removed backend move.
    SourceHash,
}

/// A backend.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Backend {
    /// `ip:port` or `host:port`; a host name is resolved at start and re-resolved periodically.
    pub address: String,
    /// Relative share of new connections, 1 to 256.
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Send the client's addresses to this backend in a PROXY protocol header (`v1` or `v2`;
    /// UDP listeners: `v2` only, one header per datagram).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_protocol: Option<ProxyProtocolVersion>,
}

/// PROXY protocol version sent to a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ProxyProtocolVersion {
    #[serde(rename = "v1")]
    V1,
    #[serde(rename = "v2")]
    V2,
}

fn default_weight() -> u32 {
    1
}

/// Bounds on a listener. Every field is optional; defaults are documented per field.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Limits {
    /// Concurrent connections (TCP) or sessions (UDP). Beyond it new TCP connections are closed
    /// at once, and datagrams from new UDP clients are dropped; both are counted. Default 10000;
    /// 1 to 1000000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// How long a connect to one backend may take before the next backend is tried. Default 5s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_timeout: Option<ConfigDuration>,
    /// A connection (or UDP session) with no bytes either way for this long is closed on both
    /// legs. Default 5m for TCP, 60s for UDP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<ConfigDuration>,
    /// How long a backend stays out after 3 consecutive failures; doubles on each repeat
    /// ejection up to 5m, and resets after a successful connection. Default 5s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ejection_cooldown: Option<ConfigDuration>,
    /// With routes: how long to wait for the client's first bytes before using the default
    /// route (a client that sends nothing, e.g. a server-speaks-first protocol, is never
    /// dropped for it). Default 3s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe_timeout: Option<ConfigDuration>,
}
