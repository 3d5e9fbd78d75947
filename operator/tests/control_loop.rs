//! The control loop end to end: a real kube-apiserver, a real operator (in this process) with
//! its config service, real `l4proxy` processes subscribed to it with real ServiceAccount
//! tokens, and real traffic on loopback.

mod support;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
};
use l4proxy_operator::{L4Proxy, Running};
use l4proxy_testenv::{TestNamespace, bins::proxy_binary, free_port, wait_for};
use serde_json::{Value, json};
use support::*;

/// Everything one test needs: a namespace, a leading operator serving proxies, its CA on disk.
struct Env {
    client: Client,
    ns: TestNamespace,
    /// Taken by a test that stops it.
    operator: Option<Running>,
    /// The operator's config service port (a restarted operator takes it again).
    port: u16,
    url: String,
    ca: PathBuf,
    dir: PathBuf,
}

impl Env {
    async fn new(prefix: &str) -> Self {
        let (client, ns) = setup(prefix).await;
        let port = free_port();
        let operator = leading(start_operator_serving(&client, ns.name(), "op-1", port).await).await;
        let url = format!("https://127.0.0.1:{port}");
        let dir = std::env::temp_dir().join(format!("l4proxy-control-{}-{}", ns.name(), std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = dir.join("ca.crt");
        let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), ns.name());
        let pem = wait_for("ConfigMap l4proxy-ca", TIMEOUT, || async {
            config_maps.get_opt("l4proxy-ca").await.ok().flatten()?.data?.get("ca.crt").cloned()
        })
        .await;
        std::fs::write(&ca, pem).unwrap();
        Self { client, ns, operator: Some(operator), port, url, ca, dir }
    }

    fn api(&self) -> Api<L4Proxy> {
        Api::namespaced(self.client.clone(), self.ns.name())
    }

    /// A token file for ServiceAccount `account` of this namespace (audience l4proxy.dev).
    async fn token_file(&self, account: &str) -> PathBuf {
        let path = self.dir.join(format!("{account}.token"));
        std::fs::write(&path, token(&self.client, self.ns.name(), account, "l4proxy.dev").await).unwrap();
        path
    }

    /// A proxy subscribed to `resource`.
    async fn proxy(&self, resource: &str, name: &str) -> Proxy {
        let token = self.token_file("proxy").await;
        Proxy::start(&self.url, &format!("{}/{resource}", self.ns.name()), &token, &self.ca, name, &self.dir)
    }
}

/// An `l4proxy run --control-plane …` process, killed on drop.
struct Proxy {
    child: Child,
    admin: SocketAddr,
    log: PathBuf,
    args: Vec<String>,
}

impl Proxy {
    fn start(url: &str, resource: &str, token: &Path, ca: &Path, name: &str, dir: &Path) -> Self {
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let args: Vec<String> = [
            "--log-format",
            "json",
            "run",
            "--control-plane",
            url,
            "--resource",
            resource,
            "--token-file",
            &token.display().to_string(),
            "--ca-file",
            &ca.display().to_string(),
            "--stats-interval",
            "1s",
            "--admin-address",
            &admin.to_string(),
        ]
        .map(String::from)
        .into();
        let log = dir.join(format!("{name}.log"));
        let child = Self::spawn(&args, &log, name);
        Self { child, admin, log, args }
    }

    fn spawn(args: &[String], log: &Path, name: &str) -> Child {
        Command::new(proxy_binary().expect("the l4proxy binary"))
            .args(args)
            .env("POD_NAMESPACE", "local")
            .env("POD_NAME", name)
            .stdout(std::fs::File::options().create(true).append(true).open(log).unwrap())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("l4proxy starts")
    }

    /// Stops the process (SIGKILL: no drain) and starts it again with the same arguments.
    fn restart(&mut self, name: &str) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = Self::spawn(&self.args, &self.log, name);
    }

    async fn stats(&self) -> Option<Value> {
        let (status, body) = http_get(self.admin, "/stats").await?;
        (status == 200).then(|| serde_json::from_str(&body).ok()).flatten()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn listener_at(name: &str, address: &str, backends: &[SocketAddr]) -> Value {
    let backends: Vec<Value> = backends.iter().map(|b| json!({"address": b.to_string()})).collect();
    json!({"name": name, "address": address, "backends": backends})
}

fn listener(name: &str, port: u16, backends: &[SocketAddr], limits: &str) -> Value {
    let mut listener = listener_at(name, &format!("127.0.0.1:{port}"), backends);
    if !limits.is_empty() {
        listener["limits"] = serde_json::from_str(limits).unwrap();
    }
    listener
}

async fn create_resource(api: &Api<L4Proxy>, name: &str, listeners: Vec<Value>) {
    let resource: L4Proxy = serde_json::from_value(json!({
        "apiVersion": "l4proxy.dev/v1alpha1", "kind": "L4Proxy",
        "metadata": {"name": name}, "spec": {"listeners": listeners},
    }))
    .unwrap();
    api.create(&PostParams::default(), &resource).await.expect("the resource is created");
}

async fn set_listeners(api: &Api<L4Proxy>, name: &str, listeners: Vec<Value>) {
    let patch = json!({"spec": {"listeners": listeners}});
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await.expect("the spec change is accepted");
}

/// The condition `type_`'s (status, reason, message), if present.
fn condition_of(proxy: &L4Proxy, type_: &str) -> Option<(String, String, String)> {
    condition(proxy, type_).map(|(status, reason, message, _)| (status, reason, message))
}

fn proxies_of(proxy: &L4Proxy) -> (u32, u32) {
    proxy.status.as_ref().map_or((0, 0), |s| (s.proxies.connected, s.proxies.in_sync))
}

fn pool_size(proxy: &L4Proxy, listener: &str) -> Option<u64> {
    let status = proxy.status.as_ref()?;
    status.listeners.iter().find(|l| l.name == listener)?.pool_stats.as_ref().map(|p| p.size)
}

#[tokio::test]
async fn a_subscribed_proxy_serves_the_resource_and_status_shows_it_programmed_with_its_pool() {
    let env = Env::new("loop").await;
    let backend = echo().await;
    let port = free_port();
    let api = env.api();
    create_resource(&api, "web", vec![listener("web", port, &[backend], "")]).await;
    let proxy = env.proxy("web", "web-1").await;
    let address: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();

    wait_for("traffic through the pushed listener", TIMEOUT, || round_trip(address)).await;
    let programmed = wait_status(&api, "web", "Programmed=True with 1/1 proxies", |p| {
        has_condition(p, "Programmed", "True") && proxies_of(p) == (1, 1)
    })
    .await;
    assert_eq!(programmed.status.as_ref().unwrap().proxies.summary, "1/1");
    let stats = proxy.stats().await.unwrap();
    assert_eq!(stats["controlPlane"]["appliedVersion"], json!(programmed.status.unwrap().config_version.unwrap()));

    // N connections open: poolStats.size follows within two stats intervals, then falls back.
    let mut open = Vec::new();
    for _ in 0..5 {
        open.push(round_trip(address).await.expect("a connection"));
    }
    wait_status(&api, "web", "poolStats.size 5", |p| pool_size(p, "web") == Some(5)).await;
    drop(open);
    wait_status(&api, "web", "poolStats.size back to 0", |p| pool_size(p, "web") == Some(0)).await;
}

#[tokio::test]
async fn spec_changes_reach_the_proxy_within_two_seconds_without_dropping_an_open_connection() {
    let env = Env::new("changes").await;
    let (first, second) = (echo().await, echo().await);
    let (port, other_port) = (free_port(), free_port());
    let api = env.api();
    create_resource(&api, "web", vec![listener("web", port, &[first], "")]).await;
    let proxy = env.proxy("web", "web-1").await;
    let address: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut open = wait_for("traffic through the pushed listener", TIMEOUT, || round_trip(address)).await;
    let applied = || async { proxy.stats().await.map(|s| s["controlPlane"]["appliedVersion"].clone()) };
    let deadline = Duration::from_secs(2);

    let changes: [(&str, Vec<Value>); 4] = [
        ("a new backend", vec![listener("web", port, &[first, second], "")]),
        ("a new limit", vec![listener("web", port, &[first, second], r#"{"maxConnections": 50}"#)]),
        (
            "a new listener",
            vec![
                listener("web", port, &[first, second], r#"{"maxConnections": 50}"#),
                listener("other", other_port, &[second], ""),
            ],
        ),
        ("a removed listener", vec![listener("web", port, &[first, second], r#"{"maxConnections": 50}"#)]),
    ];
    for (what, listeners) in changes {
        let before = applied().await;
        set_listeners(&api, "web", listeners).await;
        wait_for(&format!("{what} applied within 2s"), deadline, || async {
            let now = applied().await;
            (now.is_some() && now != before).then_some(())
        })
        .await;
        assert!(ping(&mut open).await, "the connection opened first still works after {what}");
    }
    let stats = proxy.stats().await.unwrap();
    let web = stats["listeners"].as_array().unwrap().iter().find(|l| l["name"] == "web").unwrap().clone();
    assert_eq!(web["maxConnections"], 50);
    assert_eq!(web["backends"].as_array().unwrap().len(), 2);
    assert_eq!(stats["listeners"].as_array().unwrap().len(), 1, "the listener added, then removed");
}

/// Subscribes over the real protocol with `token` and returns the refusal.
async fn refusal(env: &Env, token: Option<&str>, namespace: &str, name: &str) -> tonic::Status {
    use l4proxy::control::proto::{Hello, ProxyMessage, config_service_client::ConfigServiceClient, proxy_message};
    let ca = std::fs::read_to_string(&env.ca).unwrap();
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(ca))
        .domain_name("127.0.0.1");
    let channel = tonic::transport::Endpoint::from_shared(env.url.clone())
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = ConfigServiceClient::new(channel);
    let hello = Hello { namespace: namespace.into(), name: name.into(), proxy: "test".into(), ..Default::default() };
    let messages = futures::stream::iter([ProxyMessage { message: Some(proxy_message::Message::Hello(hello)) }])
        .chain(futures::stream::pending());
    let mut request = tonic::Request::new(messages);
    if let Some(token) = token {
        request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    match client.subscribe(request).await {
        Ok(_) => panic!("subscribed with {token:?} to {namespace}/{name}"),
        Err(status) => status,
    }
}

use futures::StreamExt;

#[tokio::test]
async fn subscriptions_without_a_valid_token_for_the_namespace_are_refused_with_their_reason() {
    let env = Env::new("refusals").await;
    let api = env.api();
    create_resource(&api, "web", vec![listener("web", free_port(), &[echo().await], "")]).await;
    let ns = env.ns.name().to_owned();
    let good = token(&env.client, &ns, "proxy", "l4proxy.dev").await;

    let none = refusal(&env, None, &ns, "web").await;
    assert_eq!(none.code(), tonic::Code::Unauthenticated);
    assert!(none.message().starts_with("no token"), "{}", none.message());
    let bad = refusal(&env, Some("not-a-token"), &ns, "web").await;
    assert_eq!(bad.code(), tonic::Code::Unauthenticated);
    assert!(bad.message().starts_with("invalid token"), "{}", bad.message());
    let audience = token(&env.client, &ns, "proxy", "https://kubernetes.default.svc").await;
    let wrong = refusal(&env, Some(&audience), &ns, "web").await;
    assert_eq!(wrong.code(), tonic::Code::Unauthenticated);
    assert!(wrong.message().contains("audiences"), "{}", wrong.message());
    let other = control_plane_namespace(&env.client, "refusals-other").await;
    let foreign = token(&env.client, other.name(), "proxy", "l4proxy.dev").await;
    let elsewhere = refusal(&env, Some(&foreign), &ns, "web").await;
    assert_eq!(elsewhere.code(), tonic::Code::PermissionDenied);
    assert!(elsewhere.message().contains(other.name()), "{}", elsewhere.message());
    let missing = refusal(&env, Some(&good), &ns, "nothing-here").await;
    assert_eq!(missing.code(), tonic::Code::NotFound);

    let metrics = env.operator.as_ref().unwrap().metrics.encode();
    for reason in ["no_token", "invalid_token", "wrong_audience", "other_namespace", "not_found"] {
        assert!(
            metrics.contains(&format!("l4proxy_operator_proxies_refused_total{{reason=\"{reason}\"}} 1")),
            "{reason}: {metrics}"
        );
    }
}

/// Another fresh namespace on the shared control plane.
async fn control_plane_namespace(client: &Client, prefix: &str) -> TestNamespace {
    l4proxy_testenv::ControlPlane::shared().namespace(client, prefix).await
}

/// Where a proxy's listener is bound, from its `/stats`.
async fn bound(proxy: &Proxy, listener: &str) -> Option<SocketAddr> {
    let stats = proxy.stats().await?;
    let listeners = stats["listeners"].as_array()?;
    listeners.iter().find(|l| l["name"] == listener)?["address"].as_str()?.parse().ok()
}

#[tokio::test]
async fn a_version_one_proxy_cannot_apply_is_programmed_false_naming_it_while_the_other_applies() {
    let env = Env::new("reject").await;
    let backend = echo().await;
    let api = env.api();
    // Port 0: two proxies on one host bind their own ports for the same listener.
    create_resource(&api, "web", vec![listener_at("web", "127.0.0.1:0", &[backend])]).await;
    let first = env.proxy("web", "web-1").await;
    let second = env.proxy("web", "web-2").await;
    wait_status(&api, "web", "two proxies in sync", |p| proxies_of(p) == (2, 2)).await;

    // A listener on a fixed port: the first proxy to bind it wins, the other cannot apply.
    let fixed = format!("127.0.0.1:{}", free_port());
    set_listeners(
        &api,
        "web",
        vec![listener_at("web", "127.0.0.1:0", &[backend]), listener_at("extra", &fixed, &[backend])],
    )
    .await;
    let rejected = wait_status(&api, "web", "Programmed=False naming the proxy that could not bind", |p| {
        condition_of(p, "Programmed").is_some_and(|(status, reason, _)| status == "False" && reason == "Rejected")
    })
    .await;
    let (_, _, message) = condition_of(&rejected, "Programmed").unwrap();
    assert!(message.starts_with("1 of 2 proxies rejected"), "{message}");
    assert!(message.contains("local/web-") && message.contains(&fixed), "names the proxy and the address: {message}");
    assert_eq!(proxies_of(&rejected), (2, 1), "the other applied it");
    // The one that rejected keeps serving its previous version.
    for proxy in [&first, &second] {
        let address = bound(proxy, "web").await.expect("web is bound on both");
        assert!(round_trip(address).await.is_some());
    }
}

#[tokio::test]
async fn after_an_operator_restart_traffic_keeps_flowing_and_status_recovers() {
    let mut env = Env::new("restart").await;
    let backend = echo().await;
    let port = free_port();
    let api = env.api();
    create_resource(&api, "web", vec![listener("web", port, &[backend], "")]).await;
    let proxy = env.proxy("web", "web-1").await;
    let address: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut open = wait_for("traffic", TIMEOUT, || round_trip(address)).await;
    wait_status(&api, "web", "1/1", |p| proxies_of(p) == (1, 1)).await;

    env.operator.take().unwrap().stop().await;
    assert!(ping(&mut open).await, "the proxy serves on while no operator is there");
    assert!(round_trip(address).await.is_some(), "and accepts new connections");
    wait_for("the proxy to notice", TIMEOUT, || async {
        (proxy.stats().await?["controlPlane"]["state"] != "connected").then_some(())
    })
    .await;
    env.operator = Some(leading(start_operator_serving(&env.client, env.ns.name(), "op-2", env.port).await).await);
    wait_for("the proxy to reconnect", TIMEOUT, || async {
        (proxy.stats().await?["controlPlane"]["state"] == "connected").then_some(())
    })
    .await;
    wait_status(&api, "web", "Programmed and 1/1 again", |p| {
        proxies_of(p) == (1, 1) && has_condition(p, "Programmed", "True")
    })
    .await;
    assert!(ping(&mut open).await);
}

#[tokio::test]
async fn after_a_proxy_restart_status_recovers() {
    let env = Env::new("proxy-restart").await;
    let port = free_port();
    let api = env.api();
    create_resource(&api, "web", vec![listener("web", port, &[echo().await], "")]).await;
    let mut proxy = env.proxy("web", "web-1").await;
    wait_status(&api, "web", "1/1", |p| proxies_of(p) == (1, 1)).await;
    proxy.restart("web-1");
    let address: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    wait_for("traffic through the restarted proxy", TIMEOUT, || round_trip(address)).await;
    wait_status(&api, "web", "1/1 after the restart", |p| {
        proxies_of(p) == (1, 1) && has_condition(p, "Programmed", "True")
    })
    .await;
}

/// An `l4proxy` in front of an operator's config service, as its Service would be: reloaded
/// (`set`) when the Service's endpoints change.
struct LoadBalancer {
    _proxy: Proxy,
    config: PathBuf,
    admin: u16,
    front: u16,
}

impl LoadBalancer {
    fn start(env: &Env, port: u16) -> Self {
        let (front, admin) = (free_port(), free_port());
        let config = env.dir.join("lb.yaml");
        Self::write(&config, admin, front, port);
        let args: Vec<String> =
            ["run", "--config", &config.display().to_string(), "--watch-interval", "100ms"].map(String::from).into();
        let log = env.dir.join("lb.log");
        let child = Proxy::spawn(&args, &log, "lb");
        let proxy = Proxy { child, admin: format!("127.0.0.1:{admin}").parse().unwrap(), log, args };
        Self { _proxy: proxy, config, admin, front }
    }

    /// Sends to the config service on `port` from now on.
    fn set(&self, port: u16) {
        Self::write(&self.config, self.admin, self.front, port);
    }

    fn write(config: &Path, admin: u16, front: u16, port: u16) {
        let text = format!(
            "admin: {{address: 127.0.0.1:{admin}}}\nlisteners:\n- name: operators\n  address: 127.0.0.1:{front}\n  backends: [{{address: '127.0.0.1:{port}'}}]\n"
        );
        let tmp = config.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, config).unwrap();
    }

    fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.front)
    }
}

#[tokio::test]
async fn with_two_operators_status_covers_every_proxy_and_survives_the_leaders_death() {
    let mut env = Env::new("failover").await;
    let follower_port = free_port();
    let follower = start_operator_serving(&env.client, env.ns.name(), "op-2", follower_port).await;
    let lb = LoadBalancer::start(&env, env.port);
    let backend = echo().await;
    let api = env.api();
    create_resource(&api, "web", vec![listener_at("web", "127.0.0.1:0", &[backend])]).await;
    let token = env.token_file("proxy").await;
    let resource = format!("{}/web", env.ns.name());
    // One proxy reaches the leader through the "Service", the other the follower directly.
    let on_leader = Proxy::start(&lb.url(), &resource, &token, &env.ca, "web-1", &env.dir);
    let follower_url = format!("https://127.0.0.1:{follower_port}");
    let _on_follower = Proxy::start(&follower_url, &resource, &token, &env.ca, "web-2", &env.dir);
    let status = wait_status(&api, "web", "2/2 over both replicas", |p| proxies_of(p) == (2, 2)).await;
    assert!(has_condition(&status, "Programmed", "True"));
    assert_eq!(
        (env.operator.as_ref().unwrap().registry.connected(), follower.registry.connected()),
        (1, 1),
        "one on each: the leader's status counts the follower's proxy"
    );

    let address = wait_for("web-1's listener", TIMEOUT, || bound(&on_leader, "web")).await;
    let mut open = wait_for("traffic", TIMEOUT, || round_trip(address)).await;
    // The leader dies; its endpoint leaves the Service, the follower's takes its place.
    env.operator.take().unwrap().stop().await;
    lb.set(follower_port);
    let follower = leading(follower).await;
    // Until web-1 has reconnected, the old leader's last report may still count it.
    wait_for("both proxies on the surviving replica", TIMEOUT, || async {
        (follower.registry.connected() == 2).then_some(())
    })
    .await;
    wait_status(&api, "web", "2/2 again, written by the new leader", |p| {
        proxies_of(p) == (2, 2) && has_condition(p, "Programmed", "True")
    })
    .await;
    assert!(ping(&mut open).await, "traffic never stopped");
}
