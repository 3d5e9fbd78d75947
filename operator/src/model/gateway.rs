//! Gateway mode: the Deployment, Service and ConfigMap that run an `L4Proxy`'s listeners as a
//! standalone proxy. Pure functions from the resource to the objects to apply; the reconciler
//! applies them (server-side apply) or deletes them when `spec.gateway` goes away.
//!
//! With the operator's config service ([`GatewayControl`]), gateway pods subscribe to it like
//! any proxy (a projected token of audience `l4proxy.dev`, the CA from their ConfigMap) and the
//! ConfigMap's config is only their bootstrap: what they serve before the first push. Without
//! it, they watch the ConfigMap's file and reload it without dropping connections.

use std::{collections::BTreeMap, net::SocketAddr};

use k8s_openapi::{
    api::{
        apps::v1::{Deployment, DeploymentSpec},
        core::v1::{
            Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EnvVar, EnvVarSource,
            HTTPGetAction, ObjectFieldSelector, PodSecurityContext, PodSpec, PodTemplateSpec, Probe,
            ProjectedVolumeSource, SecurityContext, Service, ServiceAccountTokenProjection, ServicePort, ServiceSpec,
            Sysctl, Volume, VolumeMount, VolumeProjection,
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
const CA_FILE: &str = "ca.crt";
/// Where gateway pods and injected sidecars find their projected token.
pub const TOKEN_DIR: &str = "/var/run/secrets/l4proxy.dev";
pub const TOKEN_FILE: &str = "token";
/// How long a gateway pod's projected token lives (the kubelet rotates it well before).
pub const TOKEN_EXPIRY_SECONDS: i64 = 3600;

/// How gateway pods reach the operator's config service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewayControl {
    /// `https://HOST:PORT` of the config service (its Service, from inside the cluster).
    pub url: String,
    /// The CA that signs the config service's certificate.
    pub ca_pem: String,
}

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

/// The proxy config file the gateway runs (or starts with, under a config service), from the
/// effective listeners, and the config service's CA.
pub fn config_map(proxy: &L4Proxy, effective: &[Listener], control: Option<&GatewayControl>) -> ConfigMap {
    let config = ProxyConfig {
        admin: Some(AdminConfig { address: format!("0.0.0.0:{ADMIN_PORT}") }),
        listeners: gateway_listeners(effective),
    };
    let yaml = serde_yaml_ng::to_string(&config).expect("a config always serialises");
    let mut data = BTreeMap::from([(CONFIG_FILE.to_owned(), yaml)]);
    if let Some(control) = control {
        data.insert(CA_FILE.to_owned(), control.ca_pem.clone());
    }
    ConfigMap { metadata: metadata(proxy), data: Some(data), ..Default::default() }
}

/// The Deployment running `image` with the ConfigMap's config, subscribed to the config
/// service when there is one.
pub fn deployment(proxy: &L4Proxy, gateway: &GatewaySpec, image: &str, control: Option<&GatewayControl>) -> Deployment {
    let mut volumes = vec![Volume {
        name: "config".into(),
        config_map: Some(ConfigMapVolumeSource { name: name(proxy), ..Default::default() }),
        ..Default::default()
    }];
    if control.is_some() {
        volumes.push(token_volume("token"));
    }
    let pod = PodSpec {
        containers: vec![container(proxy, gateway.image.as_deref().unwrap_or(image), control)],
        volumes: Some(volumes),
        security_context: lowest_port_sysctl(&proxy.spec.listeners)
            .map(|sysctl| PodSecurityContext { sysctls: Some(vec![sysctl]), ..Default::default() }),
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

/// For listeners on ports below 1024: the pod's `net.ipv4.ip_unprivileged_port_start` lowered to
/// the lowest of them, so the non-root proxy may bind them. (A capability would not do: a
/// non-root process loses an added NET_BIND_SERVICE at exec unless its binary carries it as a
/// file capability.) The sysctl is namespaced to the pod and Kubernetes counts it as safe.
pub fn lowest_port_sysctl(listeners: &[Listener]) -> Option<Sysctl> {
    let lowest = listeners.iter().map(port_of).filter(|p| (1..1024).contains(p)).min()?;
    Some(Sysctl { name: UNPRIVILEGED_PORT_START.into(), value: lowest.to_string() })
}

/// The sysctl that decides which ports a process without privileges may bind.
pub const UNPRIVILEGED_PORT_START: &str = "net.ipv4.ip_unprivileged_port_start";

/// A projected ServiceAccount token for the config service (audience `l4proxy.dev`, bound to
/// the pod by the kubelet), as volume `name`: gateway pods' and injected sidecars'.
pub fn token_volume(name: &str) -> Volume {
    Volume {
        name: name.into(),
        projected: Some(ProjectedVolumeSource {
            sources: Some(vec![VolumeProjection {
                service_account_token: Some(ServiceAccountTokenProjection {
                    audience: Some(l4proxy::control::TOKEN_AUDIENCE.into()),
                    expiration_seconds: Some(TOKEN_EXPIRY_SECONDS),
                    path: TOKEN_FILE.into(),
                    ..Default::default()
                }),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The proxy's arguments: the config file, and the config service when there is one.
fn args(proxy: &L4Proxy, control: Option<&GatewayControl>) -> Vec<String> {
    let mut args: Vec<String> =
        ["run", "--config", &format!("{CONFIG_DIR}/{CONFIG_FILE}"), "--log-format", "json"].map(String::from).into();
    if let Some(control) = control {
        let resource = format!("{}/{}", proxy.namespace().unwrap_or_default(), proxy.name_any());
        args.extend(
            [
                "--control-plane",
                &control.url,
                "--resource",
                &resource,
                "--token-file",
                &format!("{TOKEN_DIR}/{TOKEN_FILE}"),
                "--ca-file",
                &format!("{CONFIG_DIR}/{CA_FILE}"),
            ]
            .map(String::from),
        );
    }
    args
}

/// `POD_NAME` and `POD_NAMESPACE` from the downward API: the proxy's identity.
pub fn pod_identity_env() -> Vec<EnvVar> {
    let field = |name: &str, path: &str| EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector { field_path: path.into(), ..Default::default() }),
            ..Default::default()
        }),
        ..Default::default()
    };
    vec![field("POD_NAME", "metadata.name"), field("POD_NAMESPACE", "metadata.namespace")]
}

/// The proxy container: a port per listener and the admin port, probes on the admin port,
/// no capabilities (ports below 1024: [`lowest_port_sysctl`] on the pod).
fn container(proxy: &L4Proxy, image: &str, control: Option<&GatewayControl>) -> Container {
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
        args: Some(args(proxy, control)),
        env: control.is_some().then(pod_identity_env),
        ports: Some(ports),
        readiness_probe: Some(probe("/readyz")),
        liveness_probe: Some(probe("/healthz")),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), add: None }),
            ..Default::default()
        }),
        volume_mounts: Some(
            std::iter::once(("config", CONFIG_DIR))
                .chain(control.map(|_| ("token", TOKEN_DIR)))
                .map(|(name, path)| VolumeMount {
                    name: name.into(),
                    mount_path: path.into(),
                    read_only: Some(true),
                    ..Default::default()
                })
                .collect(),
        ),
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

        let deploy = deployment(&p, &gateway, "example/l4proxy:1", None);
        assert!(owned_by(&deploy, &p));
        let spec = deploy.spec;
        assert_eq!(spec.replicas, Some(2));
        let pod = spec.template.spec.unwrap();
        let container = &pod.containers[0];
        assert_eq!(container.image.as_deref(), Some("example/l4proxy:1"));
        let caps = container.security_context.as_ref().unwrap().capabilities.as_ref().unwrap();
        assert_eq!(caps.add, None, "no capability: a non-root process would not keep it");
        let sysctls = pod.security_context.unwrap().sysctls.unwrap();
        assert_eq!(sysctls, [Sysctl { name: UNPRIVILEGED_PORT_START.into(), value: "53".into() }], "port 53 needs it");
    }

    #[test]
    fn gateway_config_listens_on_all_addresses_at_the_listener_port() {
        let p = proxy(DB);
        let cm = config_map(&p, &p.spec.listeners, None);
        let text = &cm.data.unwrap()[CONFIG_FILE];
        let config = l4proxy::config::parse_yaml(text).unwrap();
        l4proxy::config::check(&config).unwrap();
        let addresses: Vec<_> = config.listeners.iter().map(|l| l.address.as_str()).collect();
        assert_eq!(addresses, ["0.0.0.0:15432", "[::]:53"]);
    }

    #[test]
    fn with_a_config_service_gateway_pods_subscribe_with_a_projected_token_and_the_ca() {
        let p = proxy(DB);
        let control = GatewayControl { url: "https://l4proxy-operator.ops.svc:8443".into(), ca_pem: "PEM".into() };
        let cm = config_map(&p, &p.spec.listeners, Some(&control));
        assert_eq!(cm.data.as_ref().unwrap()[CA_FILE], "PEM");
        let deploy = deployment(&p, &GatewaySpec::default(), "example/l4proxy:1", Some(&control));
        let pod = deploy.spec.template.spec.unwrap();
        let args = pod.containers[0].args.clone().unwrap();
        let after = |flag: &str| args.iter().position(|a| a == flag).map(|i| args[i + 1].clone());
        assert_eq!(after("--control-plane").as_deref(), Some("https://l4proxy-operator.ops.svc:8443"));
        assert_eq!(after("--resource").as_deref(), Some("shop/db"));
        assert_eq!(after("--token-file").as_deref(), Some("/var/run/secrets/l4proxy.dev/token"));
        assert_eq!(after("--ca-file").as_deref(), Some("/etc/l4proxy/ca.crt"));
        let env: Vec<_> = pod.containers[0].env.iter().flatten().map(|e| e.name.as_str()).collect();
        assert_eq!(env, ["POD_NAME", "POD_NAMESPACE"]);
        let token = pod.volumes.iter().flatten().find(|v| v.name == "token").unwrap();
        let projection =
            token.projected.as_ref().unwrap().sources.as_ref().unwrap()[0].service_account_token.clone().unwrap();
        assert_eq!(projection.audience.as_deref(), Some("l4proxy.dev"));
        // Without one, the pod only reads its ConfigMap, as before.
        let plain = deployment(&p, &GatewaySpec::default(), "example/l4proxy:1", None).spec.template.spec.unwrap();
        assert!(!plain.containers[0].args.clone().unwrap().contains(&"--control-plane".to_owned()));
        assert_eq!(plain.volumes.unwrap().len(), 1);
    }

    #[test]
    fn image_override_wins_over_the_operator_default() {
        let p = proxy(DB);
        let gateway = GatewaySpec { image: Some("mine:2".into()), ..Default::default() };
        let deploy = deployment(&p, &gateway, "example/l4proxy:1", None);
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
