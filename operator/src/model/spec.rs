//! What the CRD schema cannot check about a spec (`Accepted`): the proxy's own validation, and
//! the namespace policy for Service backends.

use l4proxy::config::{Backend, ConfigError, Listener, Protocol, ProxyConfig, ServiceBackend};

use super::effective::substitute;

/// Why a spec is refused (`Accepted=False`): the field and what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct SpecError {
    pub reason: &'static str,
    pub field: String,
    pub message: String,
}

/// Checks what the CRD schema cannot: the proxy's own validation (with each Service backend
/// standing in as `name.namespace.svc:port`), and the namespace policy for Service backends.
pub fn check(listeners: &[Listener], namespace: &str, allow_cross_namespace: bool) -> Result<(), SpecError> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::effective::{services, tests::listeners};

    #[test]
    fn spec_error_names_the_resource_field() {
        let spec = listeners(
            "- name: web\n  address: 127.0.0.1:1\n  backends: [{address: 127.0.0.1:2}]\n  routes:\n  - match: {protocol: QUIC}\n    backends: [{address: 127.0.0.1:3}]\n",
        );
        let err = check(&spec, "shop", false).unwrap_err();
        assert_eq!(err.field, "spec.listeners[0].routes[0].match.protocol");
        assert_eq!(err.reason, "InvalidSpec");
    }

    #[test]
    fn service_in_another_namespace_is_refused_unless_allowed() {
        let spec = listeners(
            "- name: pg\n  address: 127.0.0.1:1\n  backends: [{service: {name: pg, port: 5432, namespace: db}}]\n",
        );
        let err = check(&spec, "shop", false).unwrap_err();
        assert_eq!(err.reason, "ServiceNamespaceNotAllowed");
        assert_eq!(err.field, "spec.listeners[0].backends[0].service.namespace");
        check(&spec, "shop", true).unwrap();
        assert_eq!(services(&spec, "shop")[0].namespace, "db");
    }
}
