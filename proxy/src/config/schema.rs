//! The config file's types, as users write them. The `listeners` type is shared with the
//! `L4Proxy` resource's spec, so one schema serves both (see shared/design.md).
//!
//! These types only describe shape; [`super::validate`] turns them into typed, checked values.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::ConfigDuration;
use super::validate::{
    MAX_BACKENDS, MAX_MAX_CONNECTIONS, MAX_RECEIVE_BUFFER, MAX_ROUTES, MAX_WEIGHT, MIN_RECEIVE_BUFFER,
};

/// Most listeners in one config or resource (bounds the uniqueness checks, in the proxy and in
/// the API server's CEL rules).
pub const MAX_LISTENERS: usize = 64;
/// Most entries in `serverNames`, `alpn` and `trustedSources` lists.
pub const MAX_MATCH_ITEMS: usize = 64;
/// Most backend entries one route may list in a resource (the API server's CEL cost budget
/// multiplies per-backend rules by listeners × routes × backends; a Service entry may still
/// expand to more addresses, up to the proxy's own bound).
pub const MAX_ROUTE_BACKENDS: usize = 256;
/// Longest `ip:port` or `host:port` (a 253-character DNS name, ':' and a port).
pub const MAX_ADDRESS_LEN: usize = 259;

/// The proxy's config file.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProxyConfig {
    /// The admin HTTP server (`/healthz`, `/readyz`, `/metrics`, `/stats`, `/config`).
    /// Absent: no admin server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin: Option<AdminConfig>,
    /// The listeners to serve: unique names, and unique addresses per protocol.
    #[serde(default)]
    #[schemars(length(max = MAX_LISTENERS))]
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
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "self.backends.size() > 0 || (has(self.routes) && self.routes.size() > 0)",
    "message": "a listener needs at least one backend (or routes that carry their own)"
}]))]
pub struct Listener {
    /// Unique name of the listener; used in metrics, logs and status. 1 to 63 lowercase letters,
    /// digits or '-'.
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    pub name: String,
    /// Transport protocol.
    #[serde(default)]
    pub protocol: Protocol,
    /// Where the proxy listens: `ip:port`, e.g. `0.0.0.0:8080` or `[::]:8080`. A gateway
    /// (operator-managed Deployment) listens on all addresses at this port.
    #[schemars(length(min = 1, max = 64))]
    pub address: String,
    /// How a backend is chosen for each new connection.
    #[serde(default)]
    pub load_balancing: LoadBalancing,
    /// Where connections go. At least one, unless `routes` are given: unmatched traffic is then
    /// closed (and counted).
    #[schemars(length(max = MAX_BACKENDS))]
    pub backends: Vec<Backend>,
    /// Bounds on this listener's connections.
    #[serde(default)]
    pub limits: Limits,
    /// Routes by probed protocol and TLS/QUIC server name; the most specific match wins and
    /// unmatched traffic uses `backends`. A listener without routes never probes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_ROUTES))]
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
    #[schemars(length(min = 1, max = MAX_MATCH_ITEMS))]
    pub trusted_sources: Vec<String>,
}

/// A route: traffic matching `match` goes to its `backends`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Route {
    /// What the route matches.
    #[serde(rename = "match")]
    pub matches: RouteMatch,
    /// Where matching traffic goes. At least one.
    #[schemars(length(min = 1, max = MAX_ROUTE_BACKENDS))]
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
    #[schemars(length(max = MAX_MATCH_ITEMS))]
    pub server_names: Vec<String>,
    /// TLS/QUIC ALPN protocol ids; matches if the client offers any of them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_MATCH_ITEMS))]
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
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema)]
pub enum Protocol {
    #[default]
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
}

impl Protocol {
    /// As written in configs and Kubernetes objects: `TCP`, `UDP`.
    pub fn label(self) -> &'static str {
        match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
        }
    }
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

/// A backend: exactly one of `address` or `service`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.address) != has(self.service)",
    "message": "a backend sets exactly one of address or service"
}]))]
pub struct Backend {
    /// `ip:port` or `host:port`; a host name is resolved at start and re-resolved periodically.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = MAX_ADDRESS_LEN))]
    pub address: Option<String>,
    /// A Kubernetes Service whose ready endpoints are the backends, kept current by the
    /// operator from EndpointSlices. Only in `L4Proxy` resources; a config file uses `address`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<ServiceBackend>,
    /// Relative share of new connections, 1 to 256 (for a service: per endpoint).
    #[serde(default = "default_weight")]
    #[schemars(range(min = 1, max = MAX_WEIGHT))]
    pub weight: u32,
    /// Send the client's addresses to this backend in a PROXY protocol header (`v1` or `v2`;
    /// UDP listeners: `v2` only, one header per datagram).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_protocol: Option<ProxyProtocolVersion>,
}

impl Backend {
    /// A backend at `address` with weight 1.
    pub fn at(address: impl Into<String>) -> Self {
        Self { address: Some(address.into()), service: None, weight: default_weight(), proxy_protocol: None }
    }
}

/// A Service port whose ready endpoints are backends.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceBackend {
    /// The Service's name.
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"))]
    pub name: String,
    /// The Service's port (`spec.ports[].port`); traffic goes to the endpoints' matching target
    /// port.
    #[schemars(range(min = 1, max = 65535))]
    pub port: u16,
    /// The Service's namespace. Default: the resource's own. Another namespace is refused
    /// unless the operator runs with `--allow-cross-namespace-services`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    pub namespace: Option<String>,
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
    #[schemars(range(min = 1, max = MAX_MAX_CONNECTIONS))]
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
    /// The longest a connection (or UDP session) may stay open, busy or not; it is then closed
    /// on both legs (`reason="max_duration"`). Default: no limit. Like Envoy's
    /// `max_downstream_connection_duration`: it makes long-lived clients move to new backends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connection_duration: Option<ConfigDuration>,
    /// UDP listeners only: the listening socket's receive buffer, which holds datagrams the
    /// proxy has not read yet (a burst of new clients, whose sessions take longer to set up).
    /// Default 524288 (512 KiB); 4096 to 268435456. The kernel caps it at `net.core.rmem_max`
    /// (a warning says so); datagrams it drops show in `l4proxy_udp_receive_drops_total`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = MIN_RECEIVE_BUFFER, max = MAX_RECEIVE_BUFFER))]
    pub receive_buffer_bytes: Option<u32>,
    /// With routes: how long to wait for the client's first bytes before using the default
    /// route (a client that sends nothing, e.g. a server-speaks-first protocol, is never
    /// dropped for it). Default 3s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe_timeout: Option<ConfigDuration>,
}
