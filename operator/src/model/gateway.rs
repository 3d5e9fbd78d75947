//! Gateway mode: the Deployment, Service and ConfigMap that run an `L4Proxy`'s listeners as a
//! standalone proxy. Pure functions from the resource to the objects to apply; the reconciler
//! applies them (server-side apply) or deletes them when `spec.gateway` goes away.
//!
//! Until proxies receive config from the operator's config service, gateway pods read the
//! effective config from the ConfigMap (mounted as a file, which the proxy watches and reloads
//! without dropping connections).

use std::{collections::BTreeMap, net::SocketAddr};

use k8s_openapi::{
    api::{
        apps::v1::{Deployment, DeploymentSpec},
        core::v1::{
            Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, HTTPGetAction, PodSpec,
            PodTemplateSpec, Probe, SecurityContext, Service, ServicePort, ServiceSpec, Volume, VolumeMount,
        },
    },
    apimachinery::pkg::{apis::meta::v1::LabelSelector, util::intstr::IntOrString},
};
use kube::{Resource, ResourceExt, api::ObjectMeta};
use l4proxy::config::{AdminConfig, Listener, Protocol, ProxyConfig};

use crate::api::{
    crd::{GatewaySpec, L4Proxy},
    labels::{INSTANCE_LABEL, MANAGED_BY},
};

/// Where the gateway's proxy serves `/healthz`, `/readyz` and `/metrics`.
pub const ADMIN_PORT: u16 = 9901;
const CONFIG_DIR: &str = "/etc/l4proxy";
const CONFIG_FILE: &str = "config.yaml";

/// The name shared by a resource's gateway Deployment, Service and ConfigMap.
pub fn name(proxy: &L4Proxy) -> String {
    format!("{}-gateway", proxy.name_any())
}

fn labels(proxy: &L4Proxy) -> BTreeMap<String, String> {
    [
        ("app.kubernetes.io/name", "l4proxy".to_owned()),
        ("app.kubernetes.io/instance", proxy.name_any()),
        ("app.kubernetes.io/component", "gateway".to_owned()),
        (MANAGED_BY.0, MANAGED_BY.1.to_owned()),
        (INSTANCE_LABEL, proxy.name_any()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// Selects the resource's gateway pods.
fn selector(proxy: &L4Proxy) -> BTreeMap<String, String> {
    BTreeMap::from([(INSTANCE_LABEL.to_owned(), proxy.name_any())])
}

fn metadata(proxy: &L4Proxy) -> ObjectMeta {
    let owner = proxy.controller_owner_ref(&()).expect("an L4Proxy read from the API has a uid");
    ObjectMeta {
        name: Some(name(proxy)),
        namespace: proxy.namespace(),
        labels: Some(labels(proxy)),
        owner_references: Some(vec![owner]),
        ..Default::default()
    }
}

/// The gateway's listeners: each listens on all addresses (of its family) at its port, so the
/// Service can reach it.
pub fn gateway_listeners(listeners: &[Listener]) -> Vec<Listener> {
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

fn port_of(listener: &Listener) -> i32 {
    listener.address.parse::<SocketAddr>().map(|a| i32::from(a.port())).unwrap_or(0)
}

fn protocol(listener: &Listener) -> Option<String> {
    let name = match listener.protocol {
        Protocol::Tcp => "TCP",
        Protocol::Udp => "UDP",
    };
    Some(name.to_owned())
}

/// The proxy config file the gateway runs, from the effective listeners.
pub fn config_map(proxy: &L4Proxy, effective: &[Listener]) -> ConfigMap {
    let config = ProxyConfig {
        admin: Some(AdminConfig { address: format!("0.0.0.0:{ADMIN_PORT}") }),
        listeners: gateway_listeners(effective),
    };
    let yaml = serde_yaml_ng::to_string(&config).expect("a config always serialises");
    ConfigMap {
        metadata: metadata(proxy),
        data: Some(BTreeMap::from([(CONFIG_FILE.to_owned(), yaml)])),
        ..Default::default()
    }
}

/// The Deployment running `image` with the ConfigMap's config.
pub fn deployment(proxy: &L4Proxy, gateway: &GatewaySpec, image: &str) -> Deployment {
    let pod = PodSpec {
        containers: vec![container(proxy, gateway.image.as_deref().unwrap_or(image))],
        volumes: Some(vec![Volume {
            name: "config".into(),
            config_map: Some(ConfigMapVolumeSource { name: name(proxy), ..Default::default() }),
            ..Default::default()
        }]),
        ..Default::default()
    };
    Deployment {
        metadata: metadata(proxy),
        spec: DeploymentSpec {
            replicas: Some(gateway.replicas.unwrap_or(1)),
            selector: LabelSelector { match_labels: Some(selector(proxy)), ..Default::default() },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta { labels: Some(labels(proxy)), ..Default::default() }),
                spec: Some(pod),
            },
            ..Default::default()
        },
        ..Default::default()
    }
}

/// The proxy container: a port per listener and the admin port, probes on the admin port,
/// no privileges beyond binding a port below 1024 when a listener needs one.
fn container(proxy: &L4Proxy, image: &str) -> Container {
    let listeners = &proxy.spec.listeners;
    let ports = listeners
        .iter()
        .map(|l| ContainerPort { container_port: port_of(l), protocol: protocol(l), ..Default::default() })
        .chain(std::iter::once(ContainerPort {
            name: Some("admin".into()),
            container_port: i32::from(ADMIN_PORT),
            protocol: Some("TCP".into()),
            ..Default::default()
        }))
        .collect();
    let privileged_port = listeners.iter().any(|l| port_of(l) < 1024);
    let probe = |path: &str| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::Int(i32::from(ADMIN_PORT)),
            ..Default::default()
        }),
        period_seconds: Some(5),
        ..Default::default()
    };
    Container {
        name: "l4proxy".into(),
        image: Some(image.into()),
        args: Some(
            ["run", "--config", &format!("{CONFIG_DIR}/{CONFIG_FILE}"), "--log-format", "json"]
                .map(String::from)
                .into(),
        ),
        ports: Some(ports),
        readiness_probe: Some(probe("/readyz")),
        liveness_probe: Some(probe("/healthz")),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                add: privileged_port.then(|| vec!["NET_BIND_SERVICE".into()]),
            }),
            ..Default::default()
        }),
        volume_mounts: Some(vec![VolumeMount {
            name: "config".into(),
            mount_path: CONFIG_DIR.into(),
            read_only: Some(true),
            ..Default::default()
        }]),
        ..Default::default()
    }
}

/// The Service exposing every listener at its port.
pub fn service(proxy: &L4Proxy, gateway: &GatewaySpec) -> Service {
    let ports = proxy
        .spec
        .listeners
        .iter()
        .map(|l| ServicePort {
            name: Some(l.name.clone()),
            port: port_of(l),
            target_port: Some(IntOrString::Int(port_of(l))),
            protocol: protocol(l),
            ..Default::default()
        })
        .collect();
    Service {
        metadata: metadata(proxy),
        spec: Some(ServiceSpec {
            type_: Some(gateway.service_type.as_str().into()),
            selector: Some(selector(proxy)),
            ports: Some(ports),
            ..Default::default()
        }),
        ..Default::default()
    }
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
