//! Gateway mode: the Deployment, Service and ConfigMap that run an `L4Proxy`'s listeners as a
//! standalone proxy. Pure functions from the resource to the objects to apply; the reconciler
//! applies them (server-side apply) or deletes them when `spec.gateway` goes away.
//!
//! Until proxies receive config from the operator's config service, gateway pods read the
//! effective config from the ConfigMap (mounted as a file, which the proxy watches and reloads
//! without dropping connections).

use std::net::SocketAddr;

use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{ConfigMap, Service},
};
use kube::{Resource, ResourceExt};
use l4proxy::config::{AdminConfig, Listener, Protocol, ProxyConfig};
use serde_json::json;

use crate::api::crd::{GatewaySpec, L4Proxy};

/// Where the gateway's proxy serves `/healthz`, `/readyz` and `/metrics`.
pub const ADMIN_PORT: u16 = 9901;
const CONFIG_DIR: &str = "/etc/l4proxy";
const CONFIG_FILE: &str = "config.yaml";
/// The label that selects one resource's gateway pods.
pub const INSTANCE_LABEL: &str = "l4proxy.dev/gateway";
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "l4proxy-operator");

/// The name shared by a resource's gateway Deployment, Service and ConfigMap.
pub fn name(proxy: &L4Proxy) -> String {
    format!("{}-gateway", proxy.name_any())
}

fn labels(proxy: &L4Proxy) -> serde_json::Value {
    json!({
        "app.kubernetes.io/name": "l4proxy",
        "app.kubernetes.io/instance": proxy.name_any(),
        "app.kubernetes.io/component": "gateway",
        MANAGED_BY.0: MANAGED_BY.1,
        INSTANCE_LABEL: proxy.name_any(),
    })
}

fn metadata(proxy: &L4Proxy) -> serde_json::Value {
    let owner = proxy.controller_owner_ref(&()).expect("an L4Proxy read from the API has a uid");
    json!({
        "name": name(proxy),
        "namespace": proxy.namespace(),
        "labels": labels(proxy),
        "ownerReferences": [owner],
    })
}

/// The gateway's listeners: each listens on all addresses (of its family) at its port, so the
/// Service can reach it.
fn gateway_listeners(listeners: &[Listener]) -> Vec<Listener> {
    listeners
        .iter()
        .map(|l| {
            let mut l = l.clone();
            if let Ok(addr) = l.address.parse::<SocketAddr>() {
                let any: SocketAddr = if addr.is_ipv6() {
                    (std::net::Ipv6Addr::UNSPECIFIED, addr.port()).into()
                } else {
                    (std::net::Ipv4Addr::UNSPECIFIED, addr.port()).into()
                };
                l.address = any.to_string();
            }
            l
        })
        .collect()
}

fn port_of(listener: &Listener) -> u16 {
    listener.address.parse::<SocketAddr>().map(|a| a.port()).unwrap_or(0)
}

fn protocol(listener: &Listener) -> &'static str {
    match listener.protocol {
        Protocol::Tcp => "TCP",
        Protocol::Udp => "UDP",
    }
}

/// The proxy config file the gateway runs, from the effective listeners.
pub fn config_map(proxy: &L4Proxy, effective: &[Listener]) -> ConfigMap {
    let config = ProxyConfig {
        admin: Some(AdminConfig { address: format!("0.0.0.0:{ADMIN_PORT}") }),
        listeners: gateway_listeners(effective),
    };
    let yaml = serde_yaml_ng::to_string(&config).expect("a config always serialises");
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(proxy),
        "data": { CONFIG_FILE: yaml },
    }))
    .expect("a valid ConfigMap")
}

/// The Deployment running `image` with the ConfigMap's config.
pub fn deployment(proxy: &L4Proxy, gateway: &GatewaySpec, image: &str) -> Deployment {
    let listeners = &proxy.spec.listeners;
    let ports: Vec<_> = listeners
        .iter()
        .map(|l| json!({"containerPort": port_of(l), "protocol": protocol(l)}))
        .chain(std::iter::once(json!({"name": "admin", "containerPort": ADMIN_PORT, "protocol": "TCP"})))
        .collect();
    let privileged_port = listeners.iter().any(|l| port_of(l) < 1024);
    let capabilities =
        if privileged_port { json!({"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]}) } else { json!({"drop": ["ALL"]}) };
    let probe = |path: &str| json!({"httpGet": {"path": path, "port": ADMIN_PORT}, "periodSeconds": 5});
    serde_json::from_value(json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(proxy),
        "spec": {
            "replicas": gateway.replicas.unwrap_or(1),
            "selector": {"matchLabels": {INSTANCE_LABEL: proxy.name_any()}},
            "template": {
                "metadata": {"labels": labels(proxy)},
                "spec": {
                    "containers": [{
                        "name": "l4proxy",
                        "image": gateway.image.as_deref().unwrap_or(image),
                        "args": ["run", "--config", format!("{CONFIG_DIR}/{CONFIG_FILE}"), "--log-format", "json"],
                        "ports": ports,
                        "readinessProbe": probe("/readyz"),
                        "livenessProbe": probe("/healthz"),
                        "securityContext": {
                            "allowPrivilegeEscalation": false,
                            "readOnlyRootFilesystem": true,
                            "runAsNonRoot": true,
                            "capabilities": capabilities,
                        },
                        "volumeMounts": [{"name": "config", "mountPath": CONFIG_DIR, "readOnly": true}],
                    }],
                    "volumes": [{"name": "config", "configMap": {"name": name(proxy)}}],
                },
            },
        },
    }))
    .expect("a valid Deployment")
}

/// The Service exposing every listener at its port.
pub fn service(proxy: &L4Proxy, gateway: &GatewaySpec) -> Service {
    let ports: Vec<_> = proxy
        .spec
        .listeners
        .iter()
        .map(|l| json!({"name": l.name, "port": port_of(l), "targetPort": port_of(l), "protocol": protocol(l)}))
        .collect();
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(proxy),
        "spec": {
            "type": gateway.service_type.as_str(),
            "selector": {INSTANCE_LABEL: proxy.name_any()},
            "ports": ports,
        },
    }))
    .expect("a valid Service")
}

/// Whether `object` is owned by `proxy` (so deleting it never touches someone else's object).
pub fn owned_by(object: &impl Resource, proxy: &L4Proxy) -> bool {
    let uid = proxy.meta().uid.as_deref();
    object.meta().owner_references.iter().flatten().any(|o| Some(o.uid.as_str()) == uid && o.kind == "L4Proxy")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxy(yaml: &str) -> L4Proxy {
        let mut p: L4Proxy = serde_yaml_ng::from_str(yaml).unwrap();
        p.metadata.uid = Some("u-1".into());
        p
    }

    const DB: &str = "apiVersion: l4proxy.dev/v1alpha1\nkind: L4Proxy\nmetadata: {name: db, namespace: shop}\nspec:\n  gateway: {replicas: 2, serviceType: LoadBalancer}\n  listeners:\n  - {name: postgres, address: '127.0.0.1:15432', backends: [{address: '10.0.0.1:5432'}]}\n  - {name: dns, protocol: UDP, address: '[::1]:53', backends: [{address: '10.0.0.2:53'}]}\n";

    #[test]
    fn gateway_objects_are_owned_named_and_expose_every_listener() {
        let p = proxy(DB);
        let gateway = p.spec.gateway.clone().unwrap();
        let svc = service(&p, &gateway);
        assert_eq!(svc.metadata.name.as_deref(), Some("db-gateway"));
        assert!(owned_by(&svc, &p));
        let spec = svc.spec.unwrap();
        assert_eq!(spec.type_.as_deref(), Some("LoadBalancer"));
        let ports: Vec<_> = spec
            .ports
            .unwrap()
            .iter()
            .map(|p| (p.name.clone().unwrap(), p.port, p.protocol.clone().unwrap()))
            .collect();
        assert_eq!(ports, vec![("postgres".into(), 15432, "TCP".into()), ("dns".into(), 53, "UDP".into())]);

        let deploy = deployment(&p, &gateway, "example/l4proxy:1");
        assert!(owned_by(&deploy, &p));
        let spec = deploy.spec;
        assert_eq!(spec.replicas, Some(2));
        let container = &spec.template.spec.unwrap().containers[0];
        assert_eq!(container.image.as_deref(), Some("example/l4proxy:1"));
        let caps = container.security_context.as_ref().unwrap().capabilities.as_ref().unwrap();
        assert_eq!(caps.add.as_deref(), Some(&["NET_BIND_SERVICE".to_string()][..]), "port 53 needs it");
    }

    #[test]
    fn gateway_config_listens_on_all_addresses_at_the_listener_port() {
        let p = proxy(DB);
        let cm = config_map(&p, &p.spec.listeners);
        let text = &cm.data.unwrap()[CONFIG_FILE];
        let config = l4proxy::config::parse_yaml(text).unwrap();
        l4proxy::config::check(&config).unwrap();
        let addresses: Vec<_> = config.listeners.iter().map(|l| l.address.as_str()).collect();
        assert_eq!(addresses, ["0.0.0.0:15432", "[::]:53"]);
    }

    #[test]
    fn image_override_wins_over_the_operator_default() {
        let p = proxy(DB);
        let gateway = GatewaySpec { image: Some("mine:2".into()), ..Default::default() };
        let deploy = deployment(&p, &gateway, "example/l4proxy:1");
        let image = deploy.spec.template.spec.unwrap().containers[0].image.clone();
        assert_eq!(image.as_deref(), Some("mine:2"));
    }

    #[test]
    fn objects_of_another_owner_are_not_ours() {
        let p = proxy(DB);
        let mut other = p.clone();
        other.metadata.uid = Some("u-2".into());
        assert!(!owned_by(&service(&other, &GatewaySpec::default()), &p));
    }
}
