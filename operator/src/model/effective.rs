//! From an `L4Proxy` spec to the config its proxies run: the spec checked by the proxy's own
//! validation, Service backends replaced by their ready endpoints, and a version over the result.
//!
//! [`ConfigStore`] holds each resource's current effective config for the config service.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt,
    net::SocketAddr,
    sync::{Arc, RwLock},
};

use l4proxy::config::{Backend, ConfigError, Listener, Protocol, ProxyConfig, ServiceBackend};
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

/// Why a spec is refused (`Accepted=False`): the field and what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct SpecError {
    pub reason: &'static str,
    pub field: String,
    pub message: String,
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

/// Checks what the CRD schema cannot: the proxy's own validation (with each Service backend
/// standing in as `name.namespace.svc:port`), and the namespace policy for Service backends.
pub fn check_spec(listeners: &[Listener], namespace: &str, allow_cross_namespace: bool) -> Result<(), SpecError> {
    for (path, backend) in backend_paths(listeners) {
        if let Some(ns) = backend.service.as_ref().and_then(|s| s.namespace.as_deref())
            && ns != namespace
            && !allow_cross_namespace
        {
            return Err(SpecError {
                reason: "ServiceNamespaceNotAllowed",
                field: format!("spec.{path}.service.namespace"),
                message: format!(
                    "{ns:?} is not this resource's namespace; the operator allows only same-namespace Services (--allow-cross-namespace-services)"
                ),
            });
        }
    }
    let stand_in = |service: &ServiceBackend, _: Protocol| {
        let ns = service.namespace.as_deref().unwrap_or(namespace);
        vec![format!("{}.{ns}.svc:{}", service.name, service.port)]
    };
    let config = ProxyConfig { admin: None, listeners: substitute(listeners, stand_in) };
    l4proxy::config::check(&config).map(drop).map_err(|e| match e {
        ConfigError::Invalid { path, message } => {
            SpecError { reason: "InvalidSpec", field: format!("spec.{path}"), message }
        }
        other => SpecError { reason: "InvalidSpec", field: "spec".into(), message: other.to_string() },
    })
}

/// Every backend with its path (`listeners[0].routes[1].backends[2]`).
fn backend_paths(listeners: &[Listener]) -> impl Iterator<Item = (String, &Backend)> {
    listeners.iter().enumerate().flat_map(|(li, l)| {
        let own = l.backends.iter().enumerate().map(move |(i, b)| (format!("listeners[{li}].backends[{i}]"), b));
        let routed = l.routes.iter().enumerate().flat_map(move |(ri, r)| {
            r.backends.iter().enumerate().map(move |(i, b)| (format!("listeners[{li}].routes[{ri}].backends[{i}]"), b))
        });
        own.chain(routed)
    })
}

/// The listeners with each Service backend replaced by one address backend per
/// `addresses(service, listener protocol)` (same weight and PROXY protocol); duplicates (two
/// Services sharing an endpoint) keep the first.
fn substitute(
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

/// Resource key: (namespace, name).
pub type ResourceKey = (String, String);

/// The effective config of every `L4Proxy` this operator knows, for the config service. It
/// mirrors the API server's set of resources (entries are removed when a resource is deleted),
/// so it is bounded by what the cluster holds.
#[derive(Debug, Default)]
pub struct ConfigStore {
    configs: RwLock<HashMap<ResourceKey, Arc<EffectiveConfig>>>,
}

impl ConfigStore {
    /// Stores `config` for `key`; returns whether the version changed.
    pub fn put(&self, key: ResourceKey, config: EffectiveConfig) -> bool {
        let version = config.version;
        let mut configs = self.configs.write().unwrap_or_else(|e| e.into_inner());
        configs.insert(key, Arc::new(config)).is_none_or(|old| old.version != version)
    }

    pub fn get(&self, namespace: &str, name: &str) -> Option<Arc<EffectiveConfig>> {
        let configs = self.configs.read().unwrap_or_else(|e| e.into_inner());
        configs.get(&(namespace.to_owned(), name.to_owned())).cloned()
    }

    pub fn remove(&self, namespace: &str, name: &str) {
        let mut configs = self.configs.write().unwrap_or_else(|e| e.into_inner());
        configs.remove(&(namespace.to_owned(), name.to_owned()));
    }

    /// Drops every entry `keep` rejects (after a relist, for deletions the watch missed).
    pub fn retain(&self, mut keep: impl FnMut(&ResourceKey) -> bool) {
        let mut configs = self.configs.write().unwrap_or_else(|e| e.into_inner());
        configs.retain(|key, _| keep(key));
    }

    pub fn len(&self) -> usize {
        self.configs.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::resolve::Why;

    fn listeners(yaml: &str) -> Vec<Listener> {
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

    #[test]
    fn spec_error_names_the_resource_field() {
        let spec = listeners(
            "- name: web\n  address: 127.0.0.1:1\n  backends: [{address: 127.0.0.1:2}]\n  routes:\n  - match: {protocol: QUIC}\n    backends: [{address: 127.0.0.1:3}]\n",
        );
        let err = check_spec(&spec, "shop", false).unwrap_err();
        assert_eq!(err.field, "spec.listeners[0].routes[0].match.protocol");
        assert_eq!(err.reason, "InvalidSpec");
    }

    #[test]
    fn service_in_another_namespace_is_refused_unless_allowed() {
        let spec = listeners(
            "- name: pg\n  address: 127.0.0.1:1\n  backends: [{service: {name: pg, port: 5432, namespace: db}}]\n",
        );
        let err = check_spec(&spec, "shop", false).unwrap_err();
        assert_eq!(err.reason, "ServiceNamespaceNotAllowed");
        assert_eq!(err.field, "spec.listeners[0].backends[0].service.namespace");
        check_spec(&spec, "shop", true).unwrap();
        assert_eq!(services(&spec, "shop")[0].namespace, "db");
    }

    #[test]
    fn store_reports_version_changes_only() {
        let store = ConfigStore::default();
        let config = |v, generation| EffectiveConfig { version: ConfigVersion(v), generation, listeners: vec![] };
        let key = ("shop".to_string(), "db".to_string());
        assert!(store.put(key.clone(), config(1, 1)));
        assert!(!store.put(key.clone(), config(1, 2)));
        assert_eq!(store.get("shop", "db").unwrap().generation, 2);
        assert!(store.put(key, config(2, 2)));
        store.remove("shop", "db");
        assert!(store.is_empty());
    }
}
