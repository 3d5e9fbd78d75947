//! The operator against a real kube-apiserver + etcd on loopback (see tests/support).

mod support;

use std::collections::BTreeMap;

use k8s_openapi::api::{
    apps::v1::Deployment,
    coordination::v1::Lease,
    core::v1::{ConfigMap, Event, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, ResourceExt,
    api::{ListParams, Patch, PatchParams, PostParams},
};
use l4proxy_operator::L4Proxy;
use l4proxy_testenv::wait_for;
use serde_json::json;
use support::*;

const SIMPLE: &str = "apiVersion: l4proxy.dev/v1alpha1\nkind: L4Proxy\nmetadata: {name: web}\nspec:\n  listeners:\n  - {name: web, address: '127.0.0.1:8080', backends: [{address: '127.0.0.1:9000'}]}\n";

#[tokio::test]
async fn crd_installs_and_becomes_established() {
    let (client, ns) = setup("crd").await;
    // Established means the API serves it: a list in the namespace works.
    let api: Api<L4Proxy> = Api::namespaced(client, ns.name());
    assert!(api.list(&ListParams::default()).await.unwrap().items.is_empty());
}

async fn refusal(api: &Api<L4Proxy>, yaml: &str) -> String {
    match api.create(&PostParams::default(), &resource(yaml)).await {
        Ok(_) => panic!("the API server accepted an invalid resource:\n{yaml}"),
        Err(kube::Error::Api(e)) => {
            assert_eq!(e.code, 422, "{e:?}");
            e.message
        }
        Err(e) => panic!("unexpected error {e}"),
    }
}

#[tokio::test]
async fn invalid_resources_are_refused_by_the_api_server_with_the_rule_message() {
    let (client, ns) = setup("invalid").await;
    let api: Api<L4Proxy> = Api::namespaced(client, ns.name());
    let head = "apiVersion: l4proxy.dev/v1alpha1\nkind: L4Proxy\nmetadata: {name: bad}\nspec:\n  listeners:\n";
    let cases = [
        (
            "  - {name: a, address: '127.0.0.1:1', backends: [{address: '127.0.0.1:2'}]}\n  - {name: a, address: '127.0.0.1:3', backends: [{address: '127.0.0.1:2'}]}\n",
            "listener names must be unique",
        ),
        (
            "  - {name: a, address: '127.0.0.1:1', backends: [{address: '127.0.0.1:2'}]}\n  - {name: b, address: '127.0.0.1:1', backends: [{address: '127.0.0.1:2'}]}\n",
            "listener addresses must be unique per protocol",
        ),
        (
            "  - {name: a, address: '127.0.0.1:1', backends: [{address: '127.0.0.1:2', service: {name: pg, port: 5432}}]}\n",
            "a backend sets exactly one of address or service",
        ),
        (
            "  - {name: a, address: '127.0.0.1:1', backends: [], routes: [{match: {protocol: TLS}, backends: []}]}\n",
            "spec.listeners[0].routes[0].backends",
        ),
        ("  - {name: a, address: '127.0.0.1:1', backends: []}\n", "a listener needs at least one backend"),
        (
            "  - {name: a, address: '127.0.0.1:1', backends: [{address: '127.0.0.1:2'}], limits: {idleTimeout: 0s}}\n",
            "must be greater than zero",
        ),
        (
            "  - {name: a, address: '127.0.0.1:1', backends: [{address: '127.0.0.1:2'}], limits: {maxConnections: 0}}\n",
            "spec.listeners[0].limits.maxConnections",
        ),
        ("  - {name: a, address: '127.0.0.1:1', backends: [{address: '127.0.0.1:2', weight: 999}]}\n", "weight"),
        (
            "  - {name: Bad_Name, address: '127.0.0.1:1', backends: [{address: '127.0.0.1:2'}]}\n",
            "spec.listeners[0].name",
        ),
    ];
    for (listeners, want) in cases {
        let message = refusal(&api, &format!("{head}{listeners}")).await;
        assert!(message.contains(want), "want {want:?} in: {message}");
    }
    let long_name = format!(
        "apiVersion: l4proxy.dev/v1alpha1\nkind: L4Proxy\nmetadata: {{name: {}}}\nspec:\n  gateway: {{}}\n  listeners:\n  - {{name: a, address: '127.0.0.1:1', backends: [{{address: '127.0.0.1:2'}}]}}\n",
        "n".repeat(60)
    );
    assert!(refusal(&api, &long_name).await.contains("at most 55 characters"));
}

#[tokio::test]
async fn valid_resource_is_accepted_and_ready_for_its_generation() {
    let (client, ns) = setup("accepted").await;
    let operator = start_leader(&client, ns.name(), "op-1").await;
    let api: Api<L4Proxy> = Api::namespaced(client.clone(), ns.name());
    create(&api, SIMPLE).await;
    let proxy = wait_status(&api, "web", "Accepted=True and Ready=True", |p| {
        has_condition(p, "Accepted", "True") && has_condition(p, "Ready", "True")
    })
    .await;
    let status = proxy.status.clone().unwrap();
    assert_eq!(status.observed_generation, proxy.metadata.generation);
    assert_eq!(status.listeners[0].backends, 1);
    let held = operator.configs.get(ns.name(), "web").expect("effective config held");
    assert_eq!(status.config_version, Some(held.version.to_string()));

    // A spec change: a new generation, observed.
    let patch = json!({"spec": {"listeners": [{"name": "web", "address": "127.0.0.1:8080",
        "backends": [{"address": "127.0.0.1:9000"}, {"address": "127.0.0.1:9001"}]}]}});
    api.patch("web", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    let proxy = wait_status(&api, "web", "generation 2 observed", |p| {
        p.status.as_ref().and_then(|s| s.observed_generation) == Some(2) && has_condition(p, "Ready", "True")
    })
    .await;
    assert_eq!(proxy.status.unwrap().listeners[0].backends, 2);
    assert_ne!(operator.configs.get(ns.name(), "web").unwrap().version, held.version);

    // One Event per transition: Accepted and Ready each became True once.
    let events: Api<Event> = Api::namespaced(client, ns.name());
    let reasons: Vec<String> = events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.involved_object.name.as_deref() == Some("web"))
        .filter_map(|e| e.reason)
        .collect();
    assert_eq!(reasons.iter().filter(|r| *r == "Valid").count(), 1, "{reasons:?}");
    assert_eq!(reasons.iter().filter(|r| *r == "Resolved").count(), 1, "{reasons:?}");
    operator.stop().await;
}

#[tokio::test]
async fn spec_the_proxy_would_refuse_is_not_accepted_and_names_the_field() {
    let (client, ns) = setup("refused").await;
    let operator = start_leader(&client, ns.name(), "op-1").await;
    let api: Api<L4Proxy> = Api::namespaced(client, ns.name());
    // QUIC cannot be probed on a TCP listener: only the proxy's own validation knows that.
    create(
        &api,
        "apiVersion: l4proxy.dev/v1alpha1\nkind: L4Proxy\nmetadata: {name: quic}\nspec:\n  listeners:\n  - {name: q, address: '127.0.0.1:1', backends: [{address: '127.0.0.1:2'}], routes: [{match: {protocol: QUIC}, backends: [{address: '127.0.0.1:3'}]}]}\n",
    )
    .await;
    let proxy = wait_status(&api, "quic", "Accepted=False", |p| has_condition(p, "Accepted", "False")).await;
    let (_, reason, message, _) = condition(&proxy, "Accepted").unwrap();
    assert_eq!(reason, "InvalidSpec");
    assert!(message.starts_with("spec.listeners[0].routes[0].match.protocol:"), "{message}");
    assert!(operator.configs.get(ns.name(), "quic").is_none());
    operator.stop().await;
}

fn slice(name: &str, service: &str, endpoints: serde_json::Value) -> EndpointSlice {
    serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": name, "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [{"name": "sql", "port": 15432, "protocol": "TCP"}],
        "endpoints": endpoints,
    }))
    .unwrap()
}

async fn create_service(client: &Client, ns: &str, name: &str) {
    let service: Service = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"ports": [{"name": "sql", "port": 5432, "targetPort": 15432}]},
    }))
    .unwrap();
    Api::<Service>::namespaced(client.clone(), ns).create(&PostParams::default(), &service).await.unwrap();
}

fn backends(operator: &l4proxy_operator::Running, ns: &str, name: &str) -> Option<Vec<String>> {
    let config = operator.configs.get(ns, name)?;
    Some(config.listeners[0].backends.iter().filter_map(|b| b.address.clone()).collect())
}

const PG: &str = "apiVersion: l4proxy.dev/v1alpha1\nkind: L4Proxy\nmetadata: {name: db}\nspec:\n  listeners:\n  - name: postgres\n    address: '127.0.0.1:15432'\n    backends: [{service: {name: pg, port: 5432}}]\n";

#[tokio::test]
async fn service_backend_is_resolved_from_ready_endpoints_and_follows_slice_changes() {
    let (client, ns) = setup("service").await;
    let operator = start_leader(&client, ns.name(), "op-1").await;
    let api: Api<L4Proxy> = Api::namespaced(client.clone(), ns.name());

    // No Service yet: accepted, not ready, and the reason names it.
    create(&api, PG).await;
    let proxy = wait_status(&api, "db", "Ready=False", |p| has_condition(p, "Ready", "False")).await;
    let (_, reason, message, _) = condition(&proxy, "Ready").unwrap();
    assert!(has_condition(&proxy, "Accepted", "True"));
    assert_eq!(reason, "BackendsUnresolved");
    assert!(message.contains(&format!("service {}/pg not found", ns.name())), "{message}");

    create_service(&client, ns.name(), "pg").await;
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), ns.name());
    let endpoints = json!([
        {"addresses": ["10.1.0.1"], "conditions": {"ready": true}},
        {"addresses": ["10.1.0.2"], "conditions": {"ready": false}},
    ]);
    slices.create(&PostParams::default(), &slice("pg-1", "pg", endpoints)).await.unwrap();
    wait_status(&api, "db", "Ready=True after the slice appears", |p| has_condition(p, "Ready", "True")).await;
    assert_eq!(backends(&operator, ns.name(), "db").unwrap(), ["10.1.0.1:15432"]);

    // The second endpoint becomes ready, the first goes away: the config follows.
    let endpoints = json!([{"addresses": ["10.1.0.2"], "conditions": {"ready": true}},
                           {"addresses": ["10.1.0.3"]}]);
    let patch = json!({"endpoints": endpoints});
    slices.patch("pg-1", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    wait_for("the config to follow the slice", TIMEOUT, || async {
        let got = backends(&operator, ns.name(), "db")?;
        (got == ["10.1.0.2:15432", "10.1.0.3:15432"]).then_some(())
    })
    .await;
    wait_status(&api, "db", "status to count 2 backends", |p| {
        p.status.as_ref().is_some_and(|s| s.listeners.first().is_some_and(|l| l.backends == 2))
    })
    .await;

    // No ready endpoints left: Ready=False names the service; the last good config is kept.
    let patch = json!({"endpoints": [{"addresses": ["10.1.0.2"], "conditions": {"ready": false}}]});
    slices.patch("pg-1", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    let proxy = wait_status(&api, "db", "Ready=False without endpoints", |p| has_condition(p, "Ready", "False")).await;
    let (_, _, message, _) = condition(&proxy, "Ready").unwrap();
    assert!(message.contains("has no ready endpoints"), "{message}");
    assert_eq!(backends(&operator, ns.name(), "db").unwrap(), ["10.1.0.2:15432", "10.1.0.3:15432"]);
    operator.stop().await;
}

#[tokio::test]
async fn backends_that_exist_before_the_operator_starts_resolve_on_its_first_reconcile() {
    let (client, ns) = setup("prefilled").await;
    create_service(&client, ns.name(), "pg").await;
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), ns.name());
    let endpoints = json!([{"addresses": ["10.1.0.1"], "conditions": {"ready": true}}]);
    slices.create(&PostParams::default(), &slice("pg-1", "pg", endpoints)).await.unwrap();
    let api: Api<L4Proxy> = Api::namespaced(client.clone(), ns.name());
    create(&api, PG).await;

    let operator = start_leader(&client, ns.name(), "op-1").await;
    wait_status(&api, "db", "Ready=True", |p| has_condition(p, "Ready", "True")).await;
    // Had a reconcile run before the Service cache was filled, it would have reported the
    // Service not found first: one Event per transition shows every Ready status it had.
    let events: Api<Event> = Api::namespaced(client, ns.name());
    let reasons: Vec<String> =
        events.list(&ListParams::default()).await.unwrap().items.into_iter().filter_map(|e| e.reason).collect();
    assert!(!reasons.iter().any(|r| r == "BackendsUnresolved"), "{reasons:?}");
    operator.stop().await;
}

const GATEWAY: &str = "apiVersion: l4proxy.dev/v1alpha1\nkind: L4Proxy\nmetadata: {name: edge}\nspec:\n  gateway: {replicas: 2}\n  listeners:\n  - {name: web, address: '127.0.0.1:8080', backends: [{address: '10.2.0.1:80'}]}\n";

fn owner_uid<K: kube::Resource>(object: &K) -> Option<String> {
    let owners = object.meta().owner_references.as_ref()?;
    owners.iter().find(|o| o.kind == "L4Proxy" && o.controller == Some(true)).map(|o| o.uid.clone())
}

#[tokio::test]
async fn gateway_objects_are_created_owned_updated_and_deleted() {
    let (client, ns) = setup("gateway").await;
    let operator = start_leader(&client, ns.name(), "op-1").await;
    let api: Api<L4Proxy> = Api::namespaced(client.clone(), ns.name());
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns.name());
    let services: Api<Service> = Api::namespaced(client.clone(), ns.name());
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), ns.name());
    let uid = create(&api, GATEWAY).await.uid();

    let deployment =
        wait_for("the gateway Deployment", TIMEOUT, || async { deployments.get_opt("edge-gateway").await.ok()? }).await;
    assert_eq!(owner_uid(&deployment), uid);
    assert_eq!(deployment.spec.replicas, Some(2));
    let service = services.get("edge-gateway").await.unwrap();
    assert_eq!(owner_uid(&service), uid);
    let config_map = config_maps.get("edge-gateway").await.unwrap();
    assert_eq!(owner_uid(&config_map), uid);
    assert!(config_map.data.unwrap()["config.yaml"].contains("0.0.0.0:8080"));
    // Pods never run here (no kubelet): Ready says so.
    let proxy = wait_status(&api, "edge", "Ready=False", |p| has_condition(p, "Ready", "False")).await;
    assert_eq!(condition(&proxy, "Ready").unwrap().1, "GatewayUnavailable");

    // Update: replicas and a second listener.
    let patch = json!({"spec": {"gateway": {"replicas": 3}, "listeners": [
        {"name": "web", "address": "127.0.0.1:8080", "backends": [{"address": "10.2.0.1:80"}]},
        {"name": "dns", "protocol": "UDP", "address": "127.0.0.1:5353", "backends": [{"address": "10.2.0.2:53"}]}]}});
    api.patch("edge", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    wait_for("the Deployment and Service to follow", TIMEOUT, || async {
        let d = deployments.get("edge-gateway").await.ok()?;
        let s = services.get("edge-gateway").await.ok()?;
        let ports = s.spec?.ports?.len();
        (d.spec.replicas == Some(3) && ports == 2).then_some(())
    })
    .await;

    // Gateway removed: objects deleted.
    let patch = json!({"spec": {"gateway": null}});
    api.patch("edge", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    wait_for("the gateway objects to be deleted", TIMEOUT, || async {
        let gone = deployments.get_opt("edge-gateway").await.ok()?.is_none()
            && services.get_opt("edge-gateway").await.ok()?.is_none()
            && config_maps.get_opt("edge-gateway").await.ok()?.is_none();
        gone.then_some(())
    })
    .await;
    operator.stop().await;
}

async fn resource_versions(client: &Client, ns: &str) -> BTreeMap<&'static str, String> {
    let rv = |o: Option<String>| o.unwrap_or_default();
    BTreeMap::from([
        ("l4proxy", rv(Api::<L4Proxy>::namespaced(client.clone(), ns).get("edge").await.unwrap().resource_version())),
        (
            "deployment",
            rv(Api::<Deployment>::namespaced(client.clone(), ns).get("edge-gateway").await.unwrap().resource_version()),
        ),
        (
            "service",
            rv(Api::<Service>::namespaced(client.clone(), ns).get("edge-gateway").await.unwrap().resource_version()),
        ),
        (
            "configmap",
            rv(Api::<ConfigMap>::namespaced(client.clone(), ns).get("edge-gateway").await.unwrap().resource_version()),
        ),
    ])
}

#[tokio::test]
async fn restarted_operator_with_nothing_changed_writes_nothing() {
    let (client, ns) = setup("restart").await;
    let first = start_leader(&client, ns.name(), "op-1").await;
    let api: Api<L4Proxy> = Api::namespaced(client.clone(), ns.name());
    create(&api, GATEWAY).await;
    wait_status(&api, "edge", "a settled status", |p| {
        has_condition(p, "Accepted", "True") && has_condition(p, "Ready", "False")
    })
    .await;
    // Settled: one more full reconcile as leader changes nothing. The status is visible before
    // the first reconcile has published its Events, so count writes once it has completed.
    wait_for("the first reconcile to complete", TIMEOUT, || async {
        (first.metrics.leader_reconciles() >= 1).then_some(())
    })
    .await;
    let settled = first.metrics.writes();
    wait_for("a reconcile that writes nothing", TIMEOUT, || async {
        (first.metrics.leader_reconciles() >= 2 && first.metrics.writes() == settled).then_some(())
    })
    .await;
    let before = resource_versions(&client, ns.name()).await;
    first.stop().await;

    let second = start_leader(&client, ns.name(), "op-2").await;
    wait_for("the new leader to reconcile", TIMEOUT, || async {
        (second.metrics.leader_reconciles() >= 1).then_some(())
    })
    .await;
    assert_eq!(second.metrics.writes(), 0, "{}", second.metrics.encode());
    assert_eq!(resource_versions(&client, ns.name()).await, before);
    second.stop().await;
}

#[tokio::test]
async fn with_two_operators_only_the_lease_holder_writes() {
    let (client, ns) = setup("lease").await;
    let leader = start_leader(&client, ns.name(), "op-a").await;
    let follower = start_operator(&client, ns.name(), "op-b").await;
    let api: Api<L4Proxy> = Api::namespaced(client.clone(), ns.name());
    create(&api, SIMPLE).await;
    wait_status(&api, "web", "Ready=True", |p| has_condition(p, "Ready", "True")).await;
    // Both reconciled (both hold the effective config); only the leader wrote.
    wait_for("the follower to compute the config", TIMEOUT, || async {
        follower.configs.get(ns.name(), "web").map(|_| ())
    })
    .await;
    assert!(follower.metrics.reconciles() >= 1);
    assert!(!follower.leadership.is_leader());
    assert_eq!(follower.metrics.writes(), 0);
    assert!(leader.metrics.writes() > 0);
    let lease = Api::<Lease>::namespaced(client.clone(), ns.name()).get("l4proxy-operator").await.unwrap();
    assert_eq!(lease.spec.unwrap().holder_identity.as_deref(), Some("op-a"));

    // The leader stops and releases the lease: the follower takes over and writes.
    leader.stop().await;
    wait_for("the follower to take over", TIMEOUT, || async { follower.leadership.is_leader().then_some(()) }).await;
    let patch = json!({"spec": {"listeners": [{"name": "web", "address": "127.0.0.1:8080",
        "backends": [{"address": "127.0.0.1:9002"}]}]}});
    api.patch("web", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    wait_status(&api, "web", "generation 2 observed by the new leader", |p| {
        p.status.as_ref().and_then(|s| s.observed_generation) == Some(2)
    })
    .await;
    assert!(follower.metrics.writes() > 0);
    follower.stop().await;
}

/// Runs kubectl (blocking, off the runtime that drives the operator).
async fn kubectl(args: &[&str]) -> String {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let out = l4proxy_testenv::ControlPlane::shared().kubectl().args(&args).output().unwrap();
        assert!(out.status.success(), "kubectl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn kubectl_get_shows_ready_proxies_and_listeners_and_explain_describes_fields() {
    let (client, ns) = setup("kubectl").await;
    let operator = start_leader(&client, ns.name(), "op-1").await;
    let api: Api<L4Proxy> = Api::namespaced(client.clone(), ns.name());
    create(&api, SIMPLE).await;
    wait_status(&api, "web", "Ready=True", |p| has_condition(p, "Ready", "True")).await;
    let table = kubectl(&["get", "l4p", "-n", ns.name()]).await;
    let mut lines = table.lines();
    let header: Vec<_> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["NAME", "READY", "PROGRAMMED", "PROXIES", "LISTENERS", "AGE"], "{table}");
    // This operator serves no config service: no proxy has reported, so Programmed is Unknown.
    let row: Vec<_> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(&row[..5], ["web", "True", "Unknown", "0/0", "web"], "{table}");

    // The API server publishes the CRD's OpenAPI shortly after it is Established.
    let explained = wait_for("kubectl explain to know the CRD", TIMEOUT, || async {
        let args = ["explain", "l4proxy.spec.listeners.limits"].map(String::from);
        let out = tokio::task::spawn_blocking(move || {
            l4proxy_testenv::ControlPlane::shared().kubectl().args(&args).output().unwrap()
        })
        .await
        .unwrap();
        out.status.success().then(|| String::from_utf8(out.stdout).unwrap())
    })
    .await;
    assert!(explained.contains("maxConnections"), "{explained}");
    assert!(explained.contains("Concurrent connections (TCP) or sessions (UDP)"), "{explained}");
    operator.stop().await;
}

#[tokio::test]
async fn gateway_is_kept_running_when_a_spec_change_is_not_accepted() {
    let (client, ns) = setup("keepgw").await;
    let operator = start_leader(&client, ns.name(), "op-1").await;
    let api: Api<L4Proxy> = Api::namespaced(client.clone(), ns.name());
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns.name());
    create(&api, GATEWAY).await;
    let before =
        wait_for("the gateway Deployment", TIMEOUT, || async { deployments.get_opt("edge-gateway").await.ok()? }).await;
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), ns.name());
    let config_before = config_maps.get("edge-gateway").await.unwrap();

    // A change only the proxy's validation refuses: QUIC cannot be probed on TCP.
    let patch = json!({"spec": {"listeners": [{"name": "web", "address": "127.0.0.1:8080",
        "backends": [{"address": "10.2.0.1:80"}],
        "routes": [{"match": {"protocol": "QUIC"}, "backends": [{"address": "10.2.0.9:80"}]}]}]}});
    api.patch("edge", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    wait_status(&api, "edge", "Accepted=False for generation 2", |p| has_condition(p, "Accepted", "False")).await;

    let after = deployments.get("edge-gateway").await.unwrap();
    assert_eq!(after.resource_version(), before.resource_version());
    let config_after = config_maps.get("edge-gateway").await.unwrap();
    assert_eq!(config_after.data, config_before.data, "the last good config keeps being served");
    operator.stop().await;
}

#[tokio::test]
async fn gateway_name_taken_by_a_foreign_object_is_reported_not_taken_over() {
    let (client, ns) = setup("foreign").await;
    let operator = start_leader(&client, ns.name(), "op-1").await;
    let services: Api<Service> = Api::namespaced(client.clone(), ns.name());
    let theirs: Service = serde_json::from_value(json!({
        "metadata": {"name": "edge-gateway", "labels": {"team": "theirs"}},
        "spec": {"ports": [{"port": 1234}]},
    }))
    .unwrap();
    let theirs = services.create(&PostParams::default(), &theirs).await.unwrap();

    let api: Api<L4Proxy> = Api::namespaced(client.clone(), ns.name());
    create(&api, GATEWAY).await;
    let proxy = wait_status(&api, "edge", "Ready=False", |p| has_condition(p, "Ready", "False")).await;
    let (_, reason, message, _) = condition(&proxy, "Ready").unwrap();
    assert_eq!(reason, "GatewayConflict");
    assert!(message.contains(&format!("Service {}/edge-gateway exists and is not owned", ns.name())), "{message}");
    let after = services.get("edge-gateway").await.unwrap();
    assert_eq!(after.resource_version(), theirs.resource_version(), "their Service is untouched");
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns.name());
    assert!(deployments.get_opt("edge-gateway").await.unwrap().is_none(), "nothing applied");
    operator.stop().await;
}

#[tokio::test]
async fn example_resource_applies_and_becomes_ready_and_a_typo_is_refused_naming_the_field() {
    let (client, ns) = setup("example").await;
    let operator = start_leader(&client, ns.name(), "op-1").await;
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/l4proxy.yaml");
    kubectl(&["apply", "-n", ns.name(), "-f", example]).await;
    let api: Api<L4Proxy> = Api::namespaced(client.clone(), ns.name());
    // The gateway's pods never run here, so Ready stays False; the backends resolved.
    let proxy = wait_status(&api, "db", "the example accepted and resolved", |p| {
        has_condition(p, "Accepted", "True")
            && condition(p, "Ready").is_some_and(|(_, reason, _, _)| reason == "GatewayUnavailable")
    })
    .await;
    assert_eq!(proxy.status.unwrap().listeners[0].backends, 1);

    let typo = std::env::temp_dir().join(format!("l4proxy-typo-{}.yaml", std::process::id()));
    let text = std::fs::read_to_string(example).unwrap().replace("maxConnections: 512", "maxConection: 512");
    std::fs::write(&typo, text).unwrap();
    let args = ["apply", "-n", ns.name(), "-f", typo.to_str().unwrap()].map(String::from);
    let out = tokio::task::spawn_blocking(move || {
        l4proxy_testenv::ControlPlane::shared().kubectl().args(&args).output().unwrap()
    })
    .await
    .unwrap();
    std::fs::remove_file(&typo).unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("unknown field \"spec.listeners[0].limits.maxConection\""), "{stderr}");
    operator.stop().await;
}

#[tokio::test]
async fn lease_of_a_vanished_holder_is_taken_over_only_after_its_duration() {
    let (client, ns) = setup("vanished").await;
    // A holder that renewed just now and then disappeared without releasing.
    let leases: Api<Lease> = Api::namespaced(client.clone(), ns.name());
    let lease: Lease = serde_json::from_value(json!({
        "metadata": {"name": "l4proxy-operator"},
        "spec": {"holderIdentity": "ghost", "leaseDurationSeconds": 3,
                 "renewTime": k8s_openapi::jiff::Timestamp::now().to_string()},
    }))
    .unwrap();
    leases.create(&PostParams::default(), &lease).await.unwrap();

    let started = tokio::time::Instant::now();
    let operator = start_operator(&client, ns.name(), "op-1").await;
    wait_for("the operator to take the lease over", TIMEOUT, || async {
        operator.leadership.is_leader().then_some(())
    })
    .await;
    // Not before the ghost's 3 s have passed unchanged by the taker's own clock.
    assert!(started.elapsed() >= std::time::Duration::from_secs(3), "took over after {:?}", started.elapsed());
    let spec = leases.get("l4proxy-operator").await.unwrap().spec.unwrap();
    assert_eq!(spec.holder_identity.as_deref(), Some("op-1"));
    assert_eq!(spec.lease_transitions, Some(1));
    operator.stop().await;
}
