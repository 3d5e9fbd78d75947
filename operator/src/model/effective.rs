//! From a checked `L4Proxy` spec to the config its proxies run: Service backends replaced by
//! their ready endpoints, and a version over the result.

use std::{
    collections::{BTreeMap, HashSet},
    fmt,
    net::SocketAddr,
};

use l4proxy::config::{Backend, Listener, Protocol, ProxyConfig, ServiceBackend};
use serde::Serialize;
use xxhash_rust::xxh3::xxh3_64;

use crate::model::resolve::Unresolved;

/// A Service port a listener sends to: what is resolved from EndpointSlices.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceKey {
    pub namespace: String,
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
}

impl ServiceKey {
    fn new(service: &ServiceBackend, own_namespace: &str, protocol: Protocol) -> Self {
        Self {
            namespace: service.namespace.clone().unwrap_or_else(|| own_namespace.to_owned()),
            name: service.name.clone(),
            port: service.port,
            protocol,
        }
    }
}

/// The Service ports the spec's backends name, in a stable order.
pub fn services(listeners: &[Listener], namespace: &str) -> Vec<ServiceKey> {
    let mut keys: Vec<_> = listeners
        .iter()
        .flat_map(|l| {
            all_backends(l).filter_map(move |b| b.service.as_ref().map(|s| ServiceKey::new(s, namespace, l.protocol)))
        })
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    keys.sort();
    keys
}

fn all_backends(listener: &Listener) -> impl Iterator<Item = &Backend> {
    listener.backends.iter().chain(listener.routes.iter().flat_map(|r| r.backends.iter()))
}

/// The listeners with each Service backend replaced by one address backend per
/// `addresses(service, listener protocol)` (same weight and PROXY protocol); duplicates (two
/// Services sharing an endpoint) keep the first.
pub(super) fn substitute(
    listeners: &[Listener],
    mut addresses: impl FnMut(&ServiceBackend, Protocol) -> Vec<String>,
) -> Vec<Listener> {
    let mut expand = |backends: &[Backend], protocol: Protocol| {
        let mut seen = HashSet::new();
        let mut out = Vec::with_capacity(backends.len());
        for backend in backends {
            let expanded = match &backend.service {
                None => vec![backend.clone()],
                Some(service) => addresses(service, protocol)
                    .into_iter()
                    .map(|address| Backend { address: Some(address), service: None, ..backend.clone() })
                    .collect(),
            };
            out.extend(expanded.into_iter().filter(|b| seen.insert(b.address.clone())));
        }
        out
    };
    listeners
        .iter()
        .map(|listener| {
            let mut listener = listener.clone();
            listener.backends = expand(&listener.backends, listener.protocol);
            for route in &mut listener.routes {
                route.backends = expand(&route.backends, listener.protocol);
            }
            listener
        })
        .collect()
}

/// A resource's config as its proxies run it.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EffectiveConfig {
    /// Changes exactly when `listeners` change (a hash of them, so every operator replica and
    /// every restart computes the same version for the same config).
    pub version: ConfigVersion,
    /// The resource generation it was computed from.
    pub generation: i64,
    pub listeners: Vec<Listener>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConfigVersion(pub u64);

impl fmt::Display for ConfigVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl Serialize for ConfigVersion {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// What resolving a spec's Service backends produced.
#[derive(Debug)]
pub struct Resolved {
    /// The effective config, or `None` when what resolved does not make a valid config (e.g. a
    /// listener whose only Service has no ready endpoints).
    pub config: Option<EffectiveConfig>,
    /// The Service backends that did not resolve, in a stable order.
    pub unresolved: Vec<Unresolved>,
    /// Backend addresses per listener name, in spec order.
    pub backends_per_listener: Vec<(String, u32)>,
}

/// Builds the effective config from a checked spec and each Service key's resolution.
pub fn build(
    listeners: &[Listener],
    namespace: &str,
    generation: i64,
    resolutions: &BTreeMap<ServiceKey, Result<Vec<SocketAddr>, Unresolved>>,
) -> Resolved {
    let lookup = |service: &ServiceBackend, protocol: Protocol| -> Vec<String> {
        match resolutions.get(&ServiceKey::new(service, namespace, protocol)) {
            Some(Ok(addresses)) => addresses.iter().map(ToString::to_string).collect(),
            _ => Vec::new(),
        }
    };
    let effective = substitute(listeners, lookup);
    let unresolved = resolutions.values().filter_map(|r| r.as_ref().err().cloned()).collect();
    let backends_per_listener = effective
        .iter()
        .map(|l| (l.name.clone(), u32::try_from(all_backends(l).count()).unwrap_or(u32::MAX)))
        .collect();
    let valid = l4proxy::config::check(&ProxyConfig { admin: None, listeners: effective.clone() }).is_ok();
    let config = valid.then(|| EffectiveConfig { version: version_of(&effective), generation, listeners: effective });
    Resolved { config, unresolved, backends_per_listener }
}

fn version_of(listeners: &[Listener]) -> ConfigVersion {
    let bytes = serde_json::to_vec(listeners).expect("listeners always serialise");
    ConfigVersion(xxh3_64(&bytes))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::resolve::Why;

    pub(crate) fn listeners(yaml: &str) -> Vec<Listener> {
        serde_yaml_ng::from_str(yaml).unwrap()
    }

    const PG: &str = "- name: postgres\n  address: 127.0.0.1:15432\n  backends:\n  - service: {name: pg, port: 5432}\n    weight: 3\n  - address: 10.9.9.9:5432\n";

    fn key(name: &str, port: u16) -> ServiceKey {
        ServiceKey { namespace: "shop".into(), name: name.into(), port, protocol: Protocol::Tcp }
    }

    #[test]
    fn service_backends_expand_to_one_backend_per_endpoint_with_the_same_weight() {
        let spec = listeners(PG);
        assert_eq!(services(&spec, "shop"), vec![key("pg", 5432)]);
        let resolutions = BTreeMap::from([(
            key("pg", 5432),
            Ok(vec!["10.0.0.1:15432".parse().unwrap(), "10.0.0.2:15432".parse().unwrap()]),
        )]);
        let resolved = build(&spec, "shop", 4, &resolutions);
        let config = resolved.config.unwrap();
        let backends: Vec<_> =
            config.listeners[0].backends.iter().map(|b| (b.address.clone().unwrap(), b.weight)).collect();
        assert_eq!(
            backends,
            vec![("10.0.0.1:15432".into(), 3), ("10.0.0.2:15432".into(), 3), ("10.9.9.9:5432".into(), 1)]
        );
        assert_eq!(config.generation, 4);
        assert!(resolved.unresolved.is_empty());
        assert_eq!(resolved.backends_per_listener, vec![("postgres".into(), 3)]);
    }

    #[test]
    fn version_changes_with_endpoints_and_not_with_generation() {
        let spec = listeners(PG);
        let at = |addr: &str, generation| {
            let resolutions = BTreeMap::from([(key("pg", 5432), Ok(vec![addr.parse().unwrap()]))]);
            build(&spec, "shop", generation, &resolutions).config.unwrap().version
        };
        assert_eq!(at("10.0.0.1:1", 1), at("10.0.0.1:1", 2));
        assert_ne!(at("10.0.0.1:1", 1), at("10.0.0.2:1", 1));
    }

    #[test]
    fn listener_left_without_backends_yields_no_config_and_names_the_service() {
        let spec = listeners(
            "- name: postgres\n  address: 127.0.0.1:15432\n  backends:\n  - service: {name: pg, port: 5432}\n",
        );
        let unresolved =
            Unresolved { namespace: "shop".into(), name: "pg".into(), port: 5432, why: Why::NoReadyEndpoints };
        let resolutions = BTreeMap::from([(key("pg", 5432), Err(unresolved.clone()))]);
        let resolved = build(&spec, "shop", 1, &resolutions);
        assert!(resolved.config.is_none());
        assert_eq!(resolved.unresolved, vec![unresolved]);
    }
}
