//! Shared helpers for the operator's control-plane tests: CRD install, operators in-process
//! with short lease timings, and readers for status and conditions.
#![allow(dead_code)] // each test binary uses a different subset

mod net;

use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
};
use l4proxy_operator::{ConfigServiceConfig, L4Proxy, OperatorConfig, Running, lease::LeaseConfig, reconcile::Options};
use l4proxy_testenv::{ControlPlane, TestNamespace, wait_for};

#[allow(unused_imports)] // each test binary uses a different subset
pub use net::*;

pub const TIMEOUT: Duration = Duration::from_secs(30);

/// The shared control plane, a client on this test's runtime, the CRD installed and
/// Established, and a fresh namespace.
pub async fn setup(prefix: &str) -> (Client, TestNamespace) {
    let control_plane = ControlPlane::shared();
    let client = control_plane.client().await;
    install_crd(&client).await;
    let namespace = control_plane.namespace(&client, prefix).await;
    (client, namespace)
}

/// Applies the CRD (idempotent) and waits until it is Established.
pub async fn install_crd(client: &Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd = l4proxy_operator::api::crd::crd();
    let name = crd.metadata.name.clone().unwrap();
    crds.patch(&name, &PatchParams::apply("l4proxy-tests").force(), &Patch::Apply(&crd)).await.expect("CRD applies");
    wait_for("the CRD to be Established", TIMEOUT, || async {
        let crd = crds.get(&name).await.ok()?;
        let established = crd.status?.conditions?.iter().any(|c| c.type_ == "Established" && c.status == "True");
        established.then_some(())
    })
    .await;
}

/// Lease timings short enough for tests, long enough for a loaded 2-CPU machine.
pub fn lease(namespace: &str, identity: &str) -> LeaseConfig {
    LeaseConfig {
        namespace: namespace.to_owned(),
        name: "l4proxy-operator".into(),
        identity: identity.to_owned(),
        lease_duration: Duration::from_secs(6),
        renew_deadline: Duration::from_secs(4),
        retry_period: Duration::from_millis(200),
    }
}

/// An operator watching only `namespace`, without a config service.
pub async fn start_operator(client: &Client, namespace: &str, identity: &str) -> Running {
    l4proxy_operator::start(client.clone(), operator_config(namespace, identity, None)).await.expect("operator starts")
}

/// How long the operator sums up its proxies' reports in tests.
pub const STATUS_INTERVAL: Duration = Duration::from_secs(1);

/// An operator watching only `namespace`, serving proxies on 127.0.0.1:`port`; its CA and
/// serving certificate live in `namespace` (the Lease's).
pub async fn start_operator_serving(client: &Client, namespace: &str, identity: &str, port: u16) -> Running {
    let service = ConfigServiceConfig {
        address: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        dns_names: vec!["localhost".into()],
        pod_url: None,
        max_proxies: 100,
    };
    let config = operator_config(namespace, identity, Some(service));
    l4proxy_operator::start(client.clone(), config).await.expect("operator starts")
}

fn operator_config(namespace: &str, identity: &str, config_service: Option<ConfigServiceConfig>) -> OperatorConfig {
    OperatorConfig {
        options: Options {
            namespace: Some(namespace.to_owned()),
            proxy_image: "example.invalid/l4proxy:test".into(),
            allow_cross_namespace_services: false,
            resync: Duration::from_secs(300),
            identity: identity.to_owned(),
            max_concurrent_reconciles: 4,
            gateway_control: None,
        },
        lease: lease(namespace, identity),
        http_address: None,
        config_service,
        status_interval: STATUS_INTERVAL,
        webhook: None,
    }
}

/// Starts an operator and waits until it holds the lease.
pub async fn start_leader(client: &Client, namespace: &str, identity: &str) -> Running {
    leading(start_operator(client, namespace, identity).await).await
}

/// Waits until `running` holds the lease and its cache is filled.
pub async fn leading(running: Running) -> Running {
    wait_for("the operator to become leader and ready", TIMEOUT, || async {
        (running.leadership.is_leader() && running.is_ready()).then_some(())
    })
    .await;
    running
}

pub fn resource(yaml: &str) -> L4Proxy {
    serde_yaml_ng::from_str(yaml).expect("test resource parses")
}

pub async fn create(api: &Api<L4Proxy>, yaml: &str) -> L4Proxy {
    api.create(&PostParams::default(), &resource(yaml)).await.expect("resource is created")
}

/// A condition's (status, reason, message, observedGeneration), if present.
pub fn condition(proxy: &L4Proxy, type_: &str) -> Option<(String, String, String, Option<i64>)> {
    let status = proxy.status.as_ref()?;
    let c = status.conditions.iter().find(|c| c.type_ == type_)?;
    Some((c.status.clone(), c.reason.clone(), c.message.clone(), c.observed_generation))
}

/// Waits until `name`'s status satisfies `check` and returns the resource; on timeout, the
/// panic shows the last status seen.
pub async fn wait_status(api: &Api<L4Proxy>, name: &str, what: &str, check: impl Fn(&L4Proxy) -> bool) -> L4Proxy {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    let mut last = None;
    loop {
        if let Ok(Ok(proxy)) = tokio::time::timeout_at(deadline, api.get(name)).await {
            if check(&proxy) {
                return proxy;
            }
            last = Some(proxy.status);
        }
        if tokio::time::Instant::now() >= deadline {
            let last = serde_json::to_string_pretty(&last).unwrap_or_default();
            panic!("timed out after {TIMEOUT:?} waiting for {what} of {name}; last status: {last}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether `type_` is `status` for the resource's current generation.
pub fn has_condition(proxy: &L4Proxy, type_: &str, status: &str) -> bool {
    condition(proxy, type_).is_some_and(|(s, _, _, generation)| s == status && generation == proxy.metadata.generation)
}
