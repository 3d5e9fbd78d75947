//! From the file's shape ([`ProxyConfig`]) to typed, checked values ([`Config`]).
//!
//! Every error names the field path (`listeners[1].backends[0].address`) and the bad value, so a
//! typo is found without reading the source.

use std::{collections::HashSet, net::SocketAddr, time::Duration};

use serde::Serialize;

use ipnet::IpNet;

use super::schema::MAX_LISTENERS;
use super::{
    ConfigDuration, ConfigError, LoadBalancing, Protocol, ProxyConfig, ProxyProtocolVersion, RouteProtocol, schema,
};

/// Default for `limits.maxConnections`.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 10_000;
/// Upper bound for `limits.maxConnections`.
pub const MAX_MAX_CONNECTIONS: u32 = 1_000_000;
/// Default for `limits.connectTimeout`.
pub const DEFAULT_CONNECT_TIMEOUT: ConfigDuration = ConfigDuration::from_secs(5);
/// Default for `limits.idleTimeout` on TCP listeners.
pub const DEFAULT_TCP_IDLE_TIMEOUT: ConfigDuration = ConfigDuration::from_secs(300);
/// Default for `limits.idleTimeout` on UDP listeners (sessions).
pub const DEFAULT_UDP_IDLE_TIMEOUT: ConfigDuration = ConfigDuration::from_secs(60);
/// Default for `limits.receiveBufferBytes` (UDP listeners): room for a burst of about a
/// thousand small datagrams from new clients (the kernel's own default holds about 200). Not
/// more: under a flood a larger buffer only makes the proxy carry datagrams the rest of the path
/// drops, and delivered throughput fell by half at 1 MiB in `bench/udp.sh` (docs/performance.md).
pub const DEFAULT_RECEIVE_BUFFER: u32 = 512 << 10;
/// Bounds for `limits.receiveBufferBytes`.
pub const MIN_RECEIVE_BUFFER: u32 = 4096;
pub const MAX_RECEIVE_BUFFER: u32 = 256 << 20;
/// Default for `limits.probeTimeout`.
pub const DEFAULT_PROBE_TIMEOUT: ConfigDuration = ConfigDuration::from_secs(3);
/// Most routes per listener (each new connection is matched against all of them).
pub const MAX_ROUTES: usize = 64;
/// Default for `limits.ejectionCooldown`.
pub const DEFAULT_EJECTION_COOLDOWN: ConfigDuration = ConfigDuration::from_secs(5);
/// Largest backend weight.
pub const MAX_WEIGHT: u32 = 256;
/// Most backends one listener may have (the balancers scan them per pick).
pub const MAX_BACKENDS: usize = 1024;
/// How long resolving one backend host name may take at load time.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// A checked config: every address parsed, every default filled in, every host name resolved.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Config {
    pub admin: Option<SocketAddr>,
    pub listeners: Vec<ListenerConfig>,
}

/// A checked listener.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ListenerConfig {
    pub name: String,
    pub protocol: Protocol,
    pub address: SocketAddr,
    pub load_balancing: LoadBalancing,
    pub backends: Vec<BackendConfig>,
    pub limits: EffectiveLimits,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<RouteConfig>,
    /// Peers allowed to send a PROXY protocol header; `None`: headers are not read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accept_proxy_protocol: Option<Vec<IpNet>>,
}

impl ListenerConfig {
    /// Every backend, default route first, then each route's.
    pub fn all_backends(&self) -> impl Iterator<Item = &BackendConfig> {
        self.backends.iter().chain(self.routes.iter().flat_map(|r| r.backends.iter()))
    }

    fn all_backends_mut(&mut self) -> impl Iterator<Item = (String, &mut BackendConfig)> {
        let default = self.backends.iter_mut().enumerate().map(|(i, b)| (format!("backends[{i}]"), b));
        let routes = self.routes.iter_mut().enumerate().flat_map(|(r, route)| {
            route.backends.iter_mut().enumerate().map(move |(i, b)| (format!("routes[{r}].backends[{i}]"), b))
        });
        default.chain(routes)
    }
}

/// A checked route.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteConfig {
    pub protocol: Option<RouteProtocol>,
    pub server_names: Vec<ServerName>,
    pub alpn: Vec<String>,
    pub backends: Vec<BackendConfig>,
}

/// A server name to match: exact, or every name under a suffix (`*.example.com`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServerName {
    Exact(String),
    /// Stored with its leading dot: `.example.com`.
    Suffix(String),
}

impl ServerName {
    /// How specifically this matches `name` (longer is more specific; exact beats any
    /// wildcard), or `None` if it does not.
    pub fn specificity(&self, name: &str) -> Option<(u8, usize)> {
        match self {
            Self::Exact(exact) => (exact.as_str() == name).then_some((2, exact.len())),
            Self::Suffix(suffix) => {
                (name.len() > suffix.len() && name.ends_with(suffix.as_str())).then_some((1, suffix.len()))
            }
        }
    }
}

impl Serialize for ServerName {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Exact(name) => serializer.serialize_str(name),
            Self::Suffix(suffix) => serializer.collect_str(&format_args!("*{suffix}")),
        }
    }
}

/// A checked backend.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BackendConfig {
    /// As written in the config; the backend's identity in metrics, hashing and health.
    pub address: String,
    pub weight: u32,
    /// The addresses it resolved to when the config was loaded.
    pub resolved: Vec<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy_protocol: Option<ProxyProtocolVersion>,
    #[serde(skip)]
    pub target: BackendTarget,
}

/// What a backend address names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackendTarget {
    Ip(SocketAddr),
    /// Re-resolved periodically while the proxy runs.
    Dns {
        host: String,
        port: u16,
    },
}

/// Limits with every default applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EffectiveLimits {
    pub max_connections: u32,
    pub connect_timeout: ConfigDuration,
    pub idle_timeout: ConfigDuration,
    pub ejection_cooldown: ConfigDuration,
    pub probe_timeout: ConfigDuration,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connection_duration: Option<ConfigDuration>,
    /// UDP listeners only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub receive_buffer_bytes: Option<u32>,
}

impl Config {
    /// Checks a parsed file and resolves its backend host names.
    pub async fn from_file_config(file: ProxyConfig) -> Result<Self, ConfigError> {
        let mut config = check(&file)?;
        for (li, listener) in config.listeners.iter_mut().enumerate() {
            for (path, backend) in listener.all_backends_mut() {
                let path = format!("listeners[{li}].{path}.address");
                backend.resolved = resolve(&backend.target, &path, &backend.address).await?;
            }
        }
        Ok(config)
    }
}

/// Resolves a backend target to socket addresses; a name that resolves to nothing is an error.
pub async fn resolve(target: &BackendTarget, path: &str, written: &str) -> Result<Vec<SocketAddr>, ConfigError> {
    let (host, port) = match target {
        BackendTarget::Ip(addr) => return Ok(vec![*addr]),
        BackendTarget::Dns { host, port } => (host.as_str(), *port),
    };
    let failed = |why: String| ConfigError::invalid(path, format!("cannot resolve {written:?}: {why}"));
    match tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((host, port))).await {
        Err(_) => Err(failed(format!("no answer within {}", ConfigDuration(RESOLVE_TIMEOUT)))),
        Ok(Err(e)) => Err(failed(e.to_string())),
        Ok(Ok(addrs)) => {
            let addrs: Vec<SocketAddr> = addrs.collect();
            if addrs.is_empty() { Err(failed("no addresses".into())) } else { Ok(addrs) }
        }
    }
}

/// The synchronous checks: shapes, ranges, uniqueness. Host names are left unresolved.
pub fn check(file: &ProxyConfig) -> Result<Config, ConfigError> {
    let admin = match &file.admin {
        Some(admin) => Some(parse_socket_addr("admin.address", &admin.address)?),
        None => None,
    };
    if file.listeners.len() > MAX_LISTENERS {
        return Err(ConfigError::invalid(
            "listeners",
            format!("{} listeners, at most {MAX_LISTENERS} are allowed", file.listeners.len()),
        ));
    }
    let mut names = HashSet::new();
    let mut addresses = HashSet::new();
    let mut listeners = Vec::with_capacity(file.listeners.len());
    for (i, listener) in file.listeners.iter().enumerate() {
        let checked = check_listener(&format!("listeners[{i}]"), listener)?;
        if !names.insert(checked.name.clone()) {
            return Err(ConfigError::invalid(
                format!("listeners[{i}].name"),
                format!("duplicate listener name {:?}", checked.name),
            ));
        }
        if !addresses.insert((checked.protocol, checked.address)) {
            return Err(ConfigError::invalid(
                format!("listeners[{i}].address"),
                format!("{} is used by another {:?} listener", checked.address, checked.protocol),
            ));
        }
        listeners.push(checked);
    }
    Ok(Config { admin, listeners })
}

fn check_listener(path: &str, listener: &schema::Listener) -> Result<ListenerConfig, ConfigError> {
    check_name(&format!("{path}.name"), &listener.name)?;
    let address = parse_socket_addr(&format!("{path}.address"), &listener.address)?;
    // With routes, the default route may be left empty: unmatched traffic is then closed.
    let backends = if listener.backends.is_empty() && !listener.routes.is_empty() {
        Vec::new()
    } else {
        check_backends(&format!("{path}.backends"), &listener.backends, listener.protocol)?
    };
    if listener.routes.len() > MAX_ROUTES {
        return Err(ConfigError::invalid(
            format!("{path}.routes"),
            format!("{} routes, at most {MAX_ROUTES} are allowed", listener.routes.len()),
        ));
    }
    let routes = listener
        .routes
        .iter()
        .enumerate()
        .map(|(i, route)| check_route(&format!("{path}.routes[{i}]"), route, listener.protocol))
        .collect::<Result<Vec<_>, _>>()?;
    let accept_proxy_protocol = match &listener.accept_proxy_protocol {
        Some(accept) => Some(check_trusted_sources(&format!("{path}.acceptProxyProtocol.trustedSources"), accept)?),
        None => None,
    };
    Ok(ListenerConfig {
        name: listener.name.clone(),
        protocol: listener.protocol,
        address,
        load_balancing: listener.load_balancing,
        backends,
        limits: check_limits(&format!("{path}.limits"), &listener.limits, listener.protocol)?,
        routes,
        accept_proxy_protocol,
    })
}

fn check_backends(
    path: &str,
    backends: &[schema::Backend],
    protocol: Protocol,
) -> Result<Vec<BackendConfig>, ConfigError> {
    if backends.is_empty() {
        return Err(ConfigError::invalid(path, "at least one backend is required"));
    }
    if backends.len() > MAX_BACKENDS {
        return Err(ConfigError::invalid(
            path,
            format!("{} backends, at most {MAX_BACKENDS} are allowed", backends.len()),
        ));
    }
    let mut seen = HashSet::new();
    let mut checked = Vec::with_capacity(backends.len());
    for (i, backend) in backends.iter().enumerate() {
        let bpath = format!("{path}[{i}]");
        let backend = check_backend(&bpath, backend, protocol)?;
        if !seen.insert(backend.address.clone()) {
            return Err(ConfigError::invalid(
                format!("{bpath}.address"),
                format!("duplicate backend {:?}", backend.address),
            ));
        }
        checked.push(backend);
    }
    Ok(checked)
}

fn check_route(path: &str, route: &schema::Route, protocol: Protocol) -> Result<RouteConfig, ConfigError> {
    let m = &route.matches;
    if m.protocol.is_none() && m.server_names.is_empty() && m.alpn.is_empty() {
        return Err(ConfigError::invalid(
            format!("{path}.match"),
            "a route must match on protocol, serverNames or alpn",
        ));
    }
    if let Some(p) = m.protocol.filter(|p| !p.fits(protocol)) {
        return Err(ConfigError::invalid(
            format!("{path}.match.protocol"),
            format!("{p:?} cannot be detected on a {protocol:?} listener"),
        ));
    }
    let named = matches!(m.protocol, None | Some(RouteProtocol::Tls | RouteProtocol::Http | RouteProtocol::Quic));
    if !m.server_names.is_empty() && !named {
        return Err(ConfigError::invalid(
            format!("{path}.match.serverNames"),
            format!("{:?} carries no server name", m.protocol),
        ));
    }
    let with_alpn = matches!(m.protocol, None | Some(RouteProtocol::Tls | RouteProtocol::Quic));
    if !m.alpn.is_empty() && !with_alpn {
        return Err(ConfigError::invalid(format!("{path}.match.alpn"), format!("{:?} carries no ALPN", m.protocol)));
    }
    let server_names = m
        .server_names
        .iter()
        .enumerate()
        .map(|(i, name)| parse_server_name(&format!("{path}.match.serverNames[{i}]"), name))
        .collect::<Result<Vec<_>, _>>()?;
    if let Some((i, _)) = m.alpn.iter().enumerate().find(|(_, a)| a.is_empty() || a.len() > 255) {
        return Err(ConfigError::invalid(format!("{path}.match.alpn[{i}]"), "an ALPN id has 1 to 255 bytes"));
    }
    Ok(RouteConfig {
        protocol: m.protocol,
        server_names,
        alpn: m.alpn.clone(),
        backends: check_backends(&format!("{path}.backends"), &route.backends, protocol)?,
    })
}

fn parse_server_name(path: &str, text: &str) -> Result<ServerName, ConfigError> {
    let (wildcard, host) = match text.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let valid = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        });
    if !valid {
        return Err(ConfigError::invalid(
            path,
            format!("invalid server name {text:?}: use a lowercase DNS name, optionally starting with \"*.\""),
        ));
    }
    Ok(if wildcard { ServerName::Suffix(format!(".{host}")) } else { ServerName::Exact(host.to_owned()) })
}

fn check_trusted_sources(path: &str, accept: &schema::AcceptProxyProtocol) -> Result<Vec<IpNet>, ConfigError> {
    if accept.trusted_sources.is_empty() {
        return Err(ConfigError::invalid(path, "at least one trusted source CIDR is required"));
    }
    accept
        .trusted_sources
        .iter()
        .enumerate()
        .map(|(i, cidr)| {
            cidr.parse::<IpNet>().map_err(|_| {
                ConfigError::invalid(
                    format!("{path}[{i}]"),
                    format!("invalid CIDR {cidr:?}: expected like 10.0.0.0/8 or ::1/128"),
                )
            })
        })
        .collect()
}

fn check_name(path: &str, name: &str) -> Result<(), ConfigError> {
    let valid = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if valid {
        Ok(())
    } else {
        Err(ConfigError::invalid(
            path,
            format!(
                "invalid name {name:?}: use 1 to 63 lowercase letters, digits or '-', not starting or ending with '-'"
            ),
        ))
    }
}

fn check_backend(path: &str, backend: &schema::Backend, protocol: Protocol) -> Result<BackendConfig, ConfigError> {
    let address = match (&backend.address, &backend.service) {
        (Some(address), None) => address,
        (None, Some(service)) => {
            return Err(ConfigError::invalid(
                format!("{path}.service"),
                format!(
                    "service {:?} can only be resolved by the operator (in an L4Proxy resource); a config file names backends by address",
                    service.name
                ),
            ));
        }
        (Some(_), Some(_)) => {
            return Err(ConfigError::invalid(path, "set either address or service, not both"));
        }
        (None, None) => return Err(ConfigError::invalid(path, "set address (ip:port or host:port)")),
    };
    if protocol == Protocol::Udp && backend.proxy_protocol == Some(ProxyProtocolVersion::V1) {
        return Err(ConfigError::invalid(
            format!("{path}.proxyProtocol"),
            "\"v1\" cannot carry UDP; use \"v2\" (one header per datagram)",
        ));
    }
    if !(1..=MAX_WEIGHT).contains(&backend.weight) {
        return Err(ConfigError::invalid(
            format!("{path}.weight"),
            format!("weight {} is out of range 1..={MAX_WEIGHT}", backend.weight),
        ));
    }
    let target = parse_backend_address(&format!("{path}.address"), address)?;
    let resolved = match target {
        BackendTarget::Ip(addr) => vec![addr],
        BackendTarget::Dns { .. } => Vec::new(),
    };
    Ok(BackendConfig {
        address: address.clone(),
        weight: backend.weight,
        resolved,
        proxy_protocol: backend.proxy_protocol,
        target,
    })
}

fn check_limits(path: &str, limits: &schema::Limits, protocol: Protocol) -> Result<EffectiveLimits, ConfigError> {
    let max_connections = limits.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS);
    if !(1..=MAX_MAX_CONNECTIONS).contains(&max_connections) {
        return Err(ConfigError::invalid(
            format!("{path}.maxConnections"),
            format!("{max_connections} is out of range 1..={MAX_MAX_CONNECTIONS}"),
        ));
    }
    let positive = |field: &str, value: Option<ConfigDuration>, default: ConfigDuration| match value {
        Some(d) if d.get().is_zero() => {
            Err(ConfigError::invalid(format!("{path}.{field}"), format!("{d} must be greater than zero")))
        }
        Some(d) => Ok(d),
        None => Ok(default),
    };
    Ok(EffectiveLimits {
        max_connections,
        connect_timeout: positive("connectTimeout", limits.connect_timeout, DEFAULT_CONNECT_TIMEOUT)?,
        idle_timeout: positive(
            "idleTimeout",
            limits.idle_timeout,
            if protocol == Protocol::Udp { DEFAULT_UDP_IDLE_TIMEOUT } else { DEFAULT_TCP_IDLE_TIMEOUT },
        )?,
        ejection_cooldown: positive("ejectionCooldown", limits.ejection_cooldown, DEFAULT_EJECTION_COOLDOWN)?,
        probe_timeout: positive("probeTimeout", limits.probe_timeout, DEFAULT_PROBE_TIMEOUT)?,
        max_connection_duration: match limits.max_connection_duration {
            Some(d) => Some(positive("maxConnectionDuration", Some(d), d)?),
            None => None,
        },
        receive_buffer_bytes: check_receive_buffer(path, limits.receive_buffer_bytes, protocol)?,
    })
}

fn check_receive_buffer(path: &str, bytes: Option<u32>, protocol: Protocol) -> Result<Option<u32>, ConfigError> {
    match (protocol, bytes) {
        (Protocol::Tcp, None) => Ok(None),
        (Protocol::Tcp, Some(_)) => Err(ConfigError::invalid(
            format!("{path}.receiveBufferBytes"),
            "applies to UDP listeners only (a TCP connection's buffers are the kernel's to size)",
        )),
        (Protocol::Udp, None) => Ok(Some(DEFAULT_RECEIVE_BUFFER)),
        (Protocol::Udp, Some(b)) if (MIN_RECEIVE_BUFFER..=MAX_RECEIVE_BUFFER).contains(&b) => Ok(Some(b)),
        (Protocol::Udp, Some(b)) => Err(ConfigError::invalid(
            format!("{path}.receiveBufferBytes"),
            format!("{b} is out of range {MIN_RECEIVE_BUFFER}..={MAX_RECEIVE_BUFFER}"),
        )),
    }
}

fn parse_socket_addr(path: &str, text: &str) -> Result<SocketAddr, ConfigError> {
    text.parse().map_err(|_| {
        ConfigError::invalid(
            path,
            format!("invalid address {text:?}: expected ip:port, like 127.0.0.1:8080 or [::1]:8080"),
        )
    })
}

fn parse_backend_address(path: &str, text: &str) -> Result<BackendTarget, ConfigError> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        if addr.port() == 0 {
            return Err(ConfigError::invalid(path, format!("invalid address {text:?}: port 0")));
        }
        return Ok(BackendTarget::Ip(addr));
    }
    let bad = |why: &str| ConfigError::invalid(path, format!("invalid address {text:?}: {why}"));
    let (host, port) = text.rsplit_once(':').ok_or_else(|| bad("expected ip:port or host:port"))?;
    let port: u16 = port.parse().map_err(|_| bad("the port must be a number from 1 to 65535"))?;
    if port == 0 {
        return Err(bad("port 0"));
    }
    let host_ok = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty() && label.len() <= 63 && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if !host_ok {
        return Err(bad("expected ip:port or host:port with a valid host name"));
    }
    Ok(BackendTarget::Dns { host: host.to_owned(), port })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_yaml;

    fn checked(yaml: &str) -> Result<Config, ConfigError> {
        check(&parse_yaml(yaml)?)
    }

    const MINIMAL: &str =
        "listeners:\n- name: web\n  address: 127.0.0.1:8080\n  backends: [{address: 127.0.0.1:9000}]\n";

    #[test]
    fn minimal_listener_gets_documented_defaults() {
        let config = checked(MINIMAL).unwrap();
        let listener = &config.listeners[0];
        assert_eq!(listener.protocol, Protocol::Tcp);
        assert_eq!(listener.load_balancing, LoadBalancing::RoundRobin);
        assert_eq!(listener.limits.max_connections, DEFAULT_MAX_CONNECTIONS);
        assert_eq!(listener.limits.connect_timeout, DEFAULT_CONNECT_TIMEOUT);
        assert_eq!(listener.limits.idle_timeout, DEFAULT_TCP_IDLE_TIMEOUT);
        assert_eq!(listener.backends[0].weight, 1);
        assert_eq!(config.admin, None);
    }

    #[test]
    fn ipv6_addresses_are_accepted() {
        let config =
            checked("listeners:\n- name: v6\n  address: '[::1]:8080'\n  backends: [{address: '[::1]:9000'}]\n")
                .unwrap();
        assert_eq!(config.listeners[0].address, "[::1]:8080".parse().unwrap());
        assert_eq!(config.listeners[0].backends[0].target, BackendTarget::Ip("[::1]:9000".parse().unwrap()));
    }

    #[test]
    fn host_name_backend_is_kept_for_resolution() {
        let config =
            checked("listeners:\n- name: web\n  address: 127.0.0.1:1\n  backends: [{address: 'localhost:9000'}]\n")
                .unwrap();
        assert_eq!(config.listeners[0].backends[0].target, BackendTarget::Dns { host: "localhost".into(), port: 9000 });
    }

    fn error_of(yaml: &str) -> String {
        checked(yaml).unwrap_err().to_string()
    }

    #[test]
    fn bad_listener_address_names_field_and_value() {
        let err = error_of("listeners:\n- name: web\n  address: 127.0.0.1\n  backends: [{address: 127.0.0.1:9000}]\n");
        assert!(err.starts_with("listeners[0].address:"), "{err}");
        assert!(err.contains("\"127.0.0.1\""), "{err}");
    }

    #[test]
    fn bad_backend_address_names_field_and_value() {
        let err = error_of(
            "listeners:\n- name: web\n  address: 127.0.0.1:1\n  backends: [{address: 127.0.0.1:9000}, {address: 'bad host:x'}]\n",
        );
        assert!(err.starts_with("listeners[0].backends[1].address:"), "{err}");
        assert!(err.contains("bad host:x"), "{err}");
    }

    #[test]
    fn duplicate_listener_names_are_rejected() {
        let err = error_of(&format!(
            "{MINIMAL}- name: web\n  address: 127.0.0.1:8081\n  backends: [{{address: 127.0.0.1:9000}}]\n"
        ));
        assert!(err.starts_with("listeners[1].name:"), "{err}");
    }

    #[test]
    fn duplicate_listener_addresses_are_rejected() {
        let err = error_of(&format!(
            "{MINIMAL}- name: web2\n  address: 127.0.0.1:8080\n  backends: [{{address: 127.0.0.1:9000}}]\n"
        ));
        assert!(err.starts_with("listeners[1].address:"), "{err}");
    }

    #[test]
    fn empty_backends_are_rejected() {
        let err = error_of("listeners:\n- name: web\n  address: 127.0.0.1:1\n  backends: []\n");
        assert!(err.starts_with("listeners[0].backends:"), "{err}");
    }

    #[test]
    fn service_backend_in_a_file_is_rejected_naming_the_operator() {
        let err = error_of(
            "listeners:\n- name: web\n  address: 127.0.0.1:1\n  backends: [{service: {name: pg, port: 5432}}]\n",
        );
        assert!(err.starts_with("listeners[0].backends[0].service:"), "{err}");
        assert!(err.contains("\"pg\"") && err.contains("operator"), "{err}");
    }

    #[test]
    fn backend_needs_exactly_one_of_address_and_service() {
        let both = error_of(
            "listeners:\n- name: web\n  address: 127.0.0.1:1\n  backends: [{address: 127.0.0.1:2, service: {name: pg, port: 1}}]\n",
        );
        assert!(both.starts_with("listeners[0].backends[0]:") && both.contains("not both"), "{both}");
        let neither = error_of("listeners:\n- name: web\n  address: 127.0.0.1:1\n  backends: [{weight: 2}]\n");
        assert!(neither.starts_with("listeners[0].backends[0]:") && neither.contains("set address"), "{neither}");
    }

    #[test]
    fn weight_out_of_range_is_rejected() {
        let err = error_of(
            "listeners:\n- name: web\n  address: 127.0.0.1:1\n  backends: [{address: 127.0.0.1:2, weight: 0}]\n",
        );
        assert!(err.starts_with("listeners[0].backends[0].weight:"), "{err}");
    }

    #[test]
    fn zero_max_connections_is_rejected() {
        let err = error_of(
            "listeners:\n- name: web\n  address: 127.0.0.1:1\n  backends: [{address: 127.0.0.1:2}]\n  limits: {maxConnections: 0}\n",
        );
        assert!(err.starts_with("listeners[0].limits.maxConnections:"), "{err}");
    }

    #[test]
    fn zero_timeout_is_rejected() {
        let err = error_of(
            "listeners:\n- name: web\n  address: 127.0.0.1:1\n  backends: [{address: 127.0.0.1:2}]\n  limits: {idleTimeout: 0s}\n",
        );
        assert!(err.starts_with("listeners[0].limits.idleTimeout:"), "{err}");
    }

    #[test]
    fn udp_listener_gets_udp_idle_default() {
        let config = checked(
            "listeners:\n- name: dns\n  protocol: UDP\n  address: 127.0.0.1:1\n  backends: [{address: 127.0.0.1:2}]\n",
        )
        .unwrap();
        assert_eq!(config.listeners[0].limits.idle_timeout, DEFAULT_UDP_IDLE_TIMEOUT);
    }

    #[test]
    fn receive_buffer_is_for_udp_listeners_within_its_range() {
        let udp = checked(
            "listeners:\n- name: dns\n  protocol: UDP\n  address: 127.0.0.1:1\n  backends: [{address: 127.0.0.1:2}]\n",
        )
        .unwrap();
        assert_eq!(udp.listeners[0].limits.receive_buffer_bytes, Some(DEFAULT_RECEIVE_BUFFER));
        let err = error_of(
            "listeners:\n- name: web\n  address: 127.0.0.1:1\n  backends: [{address: 127.0.0.1:2}]\n  limits: {receiveBufferBytes: 65536}\n",
        );
        assert!(err.starts_with("listeners[0].limits.receiveBufferBytes:") && err.contains("UDP"), "{err}");
        let err = error_of(
            "listeners:\n- name: dns\n  protocol: UDP\n  address: 127.0.0.1:1\n  backends: [{address: 127.0.0.1:2}]\n  limits: {receiveBufferBytes: 100}\n",
        );
        assert!(err.starts_with("listeners[0].limits.receiveBufferBytes:") && err.contains("100"), "{err}");
    }

    #[test]
    fn proxy_protocol_v1_to_a_udp_backend_is_rejected() {
        let err = error_of(
            "listeners:\n- name: dns\n  protocol: UDP\n  address: 127.0.0.1:1\n  backends: [{address: 127.0.0.1:2, proxyProtocol: v1}]\n",
        );
        assert!(err.starts_with("listeners[0].backends[0].proxyProtocol:"), "{err}");
    }

    const ROUTED: &str =
        "listeners:\n- name: web\n  address: 127.0.0.1:1\n  backends: [{address: 127.0.0.1:2}]\n  routes:\n";

    fn routed(route: &str) -> String {
        format!("{ROUTED}  - match: {route}\n    backends: [{{address: 127.0.0.1:3}}]\n")
    }

    #[test]
    fn routes_are_checked_and_keep_their_matches() {
        let config =
            checked(&routed("{protocol: TLS, serverNames: ['*.example.com', api.example.com], alpn: [h2]}")).unwrap();
        let route = &config.listeners[0].routes[0];
        assert_eq!(
            route.server_names,
            vec![ServerName::Suffix(".example.com".into()), ServerName::Exact("api.example.com".into())]
        );
        assert_eq!(route.alpn, vec!["h2".to_owned()]);
    }

    #[test]
    fn route_errors_name_their_paths() {
        let err = error_of(&routed("{protocol: QUIC}"));
        assert!(err.starts_with("listeners[0].routes[0].match.protocol:"), "{err}");
        let err = error_of(&routed("{serverNames: ['Bad_Name']}"));
        assert!(err.starts_with("listeners[0].routes[0].match.serverNames[0]:") && err.contains("Bad_Name"), "{err}");
        let err = error_of(&routed("{}"));
        assert!(err.starts_with("listeners[0].routes[0].match:"), "{err}");
        let err = error_of(&routed("{protocol: SSH, alpn: [h2]}"));
        assert!(err.starts_with("listeners[0].routes[0].match.alpn:"), "{err}");
        let err = error_of(&format!("{ROUTED}  - match: {{protocol: SSH}}\n    backends: []\n"));
        assert!(err.starts_with("listeners[0].routes[0].backends:"), "{err}");
    }

    #[test]
    fn wildcard_server_name_matches_subdomains_only_and_exact_is_more_specific() {
        let suffix = ServerName::Suffix(".example.com".into());
        assert!(suffix.specificity("a.example.com").is_some());
        assert!(suffix.specificity("example.com").is_none());
        assert!(suffix.specificity("aexample.com").is_none());
        let exact = ServerName::Exact("a.example.com".into());
        assert!(exact.specificity("a.example.com") > suffix.specificity("a.example.com"));
    }

    #[test]
    fn trusted_sources_must_be_cidrs() {
        let err = error_of(
            "listeners:\n- name: web\n  address: 127.0.0.1:1\n  backends: [{address: 127.0.0.1:2}]\n  acceptProxyProtocol: {trustedSources: ['10.0.0.0/8', 'nonsense']}\n",
        );
        assert!(
            err.starts_with("listeners[0].acceptProxyProtocol.trustedSources[1]:") && err.contains("nonsense"),
            "{err}"
        );
    }

    #[test]
    fn invalid_listener_name_is_rejected() {
        let err = error_of("listeners:\n- name: Web_1\n  address: 127.0.0.1:1\n  backends: [{address: 127.0.0.1:2}]\n");
        assert!(err.starts_with("listeners[0].name:"), "{err}");
        assert!(err.contains("Web_1"), "{err}");
    }

    #[tokio::test]
    async fn unresolvable_host_is_an_error_naming_it() {
        let file = parse_yaml(
            "listeners:\n- name: web\n  address: 127.0.0.1:1\n  backends: [{address: 'no-such-host.invalid:80'}]\n",
        )
        .unwrap();
        let err = Config::from_file_config(file).await.unwrap_err().to_string();
        assert!(err.starts_with("listeners[0].backends[0].address:"), "{err}");
        assert!(err.contains("no-such-host.invalid"), "{err}");
    }
}
