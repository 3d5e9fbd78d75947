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
}

fn default_weight() -> u32 {
    1
}

/// Bounds on a listener. Every field is optional; defaults are documented per field.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Limits {
    /// Concurrent connections (TCP). Beyond it new connections are closed at once and counted
    /// as rejected. Default 10000; 1 to 1000000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// How long a connect to one backend may take before the next backend is tried. Default 5s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_timeout: Option<ConfigDuration>,
    /// A connection with no bytes either way for this long is closed on both legs. Default 5m.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<ConfigDuration>,
    /// How long a backend stays out after 3 consecutive failures; doubles on each repeat
    /// ejection up to 5m, and resets after a successful connection. Default 5s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ejection_cooldown: Option<ConfigDuration>,
}
