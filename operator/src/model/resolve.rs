//! Service backends → endpoint addresses, from the Service and its EndpointSlices.
//!
//! A Service port (`spec.ports[].port`) is matched to EndpointSlice ports by its name (the
//! EndpointSlice controller copies the Service port's name); each ready endpoint address with
//! that slice port's number is one backend. Only `ready` endpoints count (an absent `ready` means
//! ready, as the API documents); FQDN slices are skipped.

use std::{collections::BTreeSet, fmt, net::SocketAddr};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use l4proxy::config::Protocol;

/// A Service backend that could not be resolved, with why; its `Display` is what `Ready=False`
/// says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unresolved {
    pub namespace: String,
    pub name: String,
    pub port: u16,
    pub why: Why,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Why {
    ServiceNotFound,
    NoSuchPort,
    ProtocolMismatch { service: String, listener: Protocol },
    NoReadyEndpoints,
}

impl fmt::Display for Unresolved {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Self { namespace, name, port, why } = self;
        match why {
            Why::ServiceNotFound => write!(f, "service {namespace}/{name} not found"),
            Why::NoSuchPort => write!(f, "service {namespace}/{name} has no port {port}"),
            Why::ProtocolMismatch { service, listener } => {
                write!(f, "port {port} of service {namespace}/{name} is {service}, the listener is {listener:?}")
            }
            Why::NoReadyEndpoints => write!(f, "service {namespace}/{name} port {port} has no ready endpoints"),
        }
    }
}

/// The ready addresses behind `port` of `service` (sorted, without duplicates), or why there are
/// none. `service` is `None` when it does not exist.
pub fn endpoints<'a>(
    namespace: &str,
    name: &str,
    port: u16,
    protocol: Protocol,
    service: Option<&Service>,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
) -> Result<Vec<SocketAddr>, Unresolved> {
    let unresolved = |why| Unresolved { namespace: namespace.to_owned(), name: name.to_owned(), port, why };
    let service = service.ok_or_else(|| unresolved(Why::ServiceNotFound))?;
    let service_port = service
        .spec
        .iter()
        .flat_map(|spec| spec.ports.iter().flatten())
        .find(|p| p.port == i32::from(port))
        .ok_or_else(|| unresolved(Why::NoSuchPort))?;
    let port_protocol = service_port.protocol.as_deref().unwrap_or("TCP");
    if port_protocol != protocol_name(protocol) {
        return Err(unresolved(Why::ProtocolMismatch { service: port_protocol.to_owned(), listener: protocol }));
    }
    let port_name = service_port.name.as_deref().unwrap_or("");
    let mut addresses = BTreeSet::new();
    for slice in slices.into_iter().filter(|s| s.address_type == "IPv4" || s.address_type == "IPv6") {
        let Some(target_port) = slice_port(slice, port_name, port_protocol) else { continue };
        for endpoint in slice.endpoints.iter().flatten() {
            if endpoint.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
                continue;
            }
            for ip in endpoint.addresses.iter().filter_map(|a| a.parse().ok()) {
                addresses.insert(SocketAddr::new(ip, target_port));
            }
        }
    }
    if addresses.is_empty() {
        return Err(unresolved(Why::NoReadyEndpoints));
    }
    Ok(addresses.into_iter().collect())
}

/// The number of the slice's port named `name` (unnamed ports have the empty name).
fn slice_port(slice: &EndpointSlice, name: &str, protocol: &str) -> Option<u16> {
    slice
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref().unwrap_or("") == name && p.protocol.as_deref().unwrap_or("TCP") == protocol)
        .and_then(|p| p.port)
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| *p != 0)
}

fn protocol_name(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::Tcp => "TCP",
        Protocol::Udp => "UDP",
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::api::labels::SERVICE_NAME_LABEL;

    pub(crate) fn service(name: &str, ports: serde_json::Value) -> Service {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "shop"},
            "spec": {"ports": ports}
        }))
        .unwrap()
    }

    pub(crate) fn slice(service: &str, ports: serde_json::Value, endpoints: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": format!("{service}-abc"), "namespace": "shop",
                         "labels": {SERVICE_NAME_LABEL: service}},
            "addressType": "IPv4",
            "ports": ports,
            "endpoints": endpoints
        }))
        .unwrap()
    }

    fn resolve(service: Option<&Service>, slices: &[EndpointSlice]) -> Result<Vec<SocketAddr>, Unresolved> {
        endpoints("shop", "pg", 5432, Protocol::Tcp, service, slices)
    }

    #[test]
    fn ready_endpoints_resolve_to_the_target_port_of_the_named_service_port() {
        let svc = service("pg", serde_json::json!([{"name": "sql", "port": 5432, "targetPort": 15432}]));
        let slices = [slice(
            "pg",
            serde_json::json!([{"name": "sql", "port": 15432, "protocol": "TCP"}]),
            serde_json::json!([
                {"addresses": ["10.0.0.2"], "conditions": {"ready": true}},
                {"addresses": ["10.0.0.1"]},
                {"addresses": ["10.0.0.3"], "conditions": {"ready": false}}
            ]),
        )];
        let got = resolve(Some(&svc), &slices).unwrap();
        assert_eq!(got, vec!["10.0.0.1:15432".parse().unwrap(), "10.0.0.2:15432".parse().unwrap()]);
    }

    #[test]
    fn missing_service_port_and_endpoints_are_named() {
        let err = resolve(None, &[]).unwrap_err();
        assert_eq!(err.to_string(), "service shop/pg not found");
        let svc = service("pg", serde_json::json!([{"port": 80}]));
        assert_eq!(resolve(Some(&svc), &[]).unwrap_err().why, Why::NoSuchPort);
        let svc = service("pg", serde_json::json!([{"port": 5432}]));
        let err = resolve(Some(&svc), &[]).unwrap_err();
        assert_eq!(err.to_string(), "service shop/pg port 5432 has no ready endpoints");
    }

    #[test]
    fn only_not_ready_endpoints_is_unresolved() {
        let svc = service("pg", serde_json::json!([{"port": 5432}]));
        let slices = [slice(
            "pg",
            serde_json::json!([{"port": 5432}]),
            serde_json::json!([{"addresses": ["10.0.0.3"], "conditions": {"ready": false}}]),
        )];
        assert_eq!(resolve(Some(&svc), &slices).unwrap_err().why, Why::NoReadyEndpoints);
    }

    #[test]
    fn udp_listener_on_a_tcp_service_port_is_a_protocol_mismatch() {
        let svc = service("dns", serde_json::json!([{"port": 53, "protocol": "TCP"}]));
        let err = endpoints("shop", "dns", 53, Protocol::Udp, Some(&svc), &[]).unwrap_err();
        assert!(matches!(err.why, Why::ProtocolMismatch { .. }), "{err}");
        assert!(err.to_string().contains("is TCP"), "{err}");
    }
}
