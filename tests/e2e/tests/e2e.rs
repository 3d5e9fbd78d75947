//! The end-to-end suite: the chart installed with the locally built images on a real cluster
//! (the node `tests/cluster/up` starts here, or kind), real pods, real injected sidecars with
//! real projected tokens and startup probes, a real gateway, and faults.
//!
//! Runs against the cluster named by `$L4PROXY_E2E_KUBECONFIG`, with `kubectl` and `helm` from
//! `$L4PROXY_TOOLS_BIN` (else `$PATH`) and the images `localhost/{l4proxy,l4proxy-operator,
//! l4proxy-echo}:$L4PROXY_E2E_IMAGE_TAG` (default `dev`) already on the node (`make e2e` builds and
//! imports them). Ignored by a plain `cargo test`: `make e2e` runs it with `--ignored`.
//!
//! Every traffic check runs inside a pod (`kubectl exec` of the echo image's client commands), so
//! the suite needs no route from the test host to pod or Service addresses, as on kind.

use std::{
    collections::BTreeSet,
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    time::Duration,
};

use k8s_openapi::api::{
    coordination::v1::Lease,
    core::v1::{Namespace, Pod, Service},
};
use kube::{
    Api, Client, Config, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
};
use l4proxy_operator::L4Proxy;
use l4proxy_testenv::wait_for;
use serde_json::{Value, json};

/// Pods start on a real node in seconds; images are local, never pulled.
const TIMEOUT: Duration = Duration::from_secs(120);
/// Status follows the proxies' reports every `--status-interval` (10 s in the chart).
const STATUS_TIMEOUT: Duration = Duration::from_secs(60);
const RELEASE_NS: &str = "l4proxy-system";
const OPERATOR: &str = "l4proxy-operator";
const ECHO_PORT: u16 = 7000;
/// The client resource's listeners, in the client pod's network namespace.
const SIDECAR_PORT: u16 = 15000;
const SIDECAR_PORT_2: u16 = 15001;
/// Below 1024: the non-root gateway proxy binds it through the pod's unprivileged-port sysctl.
const GATEWAY_PORT: u16 = 443;

struct Cluster {
    kubeconfig: PathBuf,
    kubectl: PathBuf,
    helm: PathBuf,
    tag: String,
    client: Client,
}

impl Cluster {
    async fn from_env() -> Self {
        let kubeconfig: PathBuf = std::env::var_os("L4PROXY_E2E_KUBECONFIG")
            .expect("L4PROXY_E2E_KUBECONFIG names the cluster (make e2e sets it; see tests/e2e/README.md)")
            .into();
        let tool = |name: &str| match std::env::var_os("L4PROXY_TOOLS_BIN") {
            Some(dir) => PathBuf::from(dir).join(name),
            None => PathBuf::from(name),
        };
        let tag = std::env::var("L4PROXY_E2E_IMAGE_TAG").unwrap_or_else(|_| "dev".into());
        let config = Kubeconfig::read_from(&kubeconfig).expect("the kubeconfig reads");
        let config = Config::from_custom_kubeconfig(config, &KubeConfigOptions::default()).await.unwrap();
        let client = Client::try_from(config).unwrap();
        Self { kubeconfig, kubectl: tool("kubectl"), helm: tool("helm"), tag, client }
    }

    fn command(&self, program: &PathBuf, args: &[&str]) -> Command {
        let mut command = Command::new(program);
        command.args(args).env("KUBECONFIG", &self.kubeconfig);
        command
    }

    /// Runs kubectl or helm to its end, off the runtime's threads.
    async fn run(&self, program: &PathBuf, args: &[&str]) -> Output {
        let mut command = self.command(program, args);
        tokio::task::spawn_blocking(move || command.output().expect("the tool runs")).await.unwrap()
    }

    async fn kubectl(&self, args: &[&str]) -> Output {
        self.run(&self.kubectl, args).await
    }

    /// `kubectl exec` in the client pod's app container: one of the echo image's commands.
    async fn exec(&self, ns: &str, pod: &str, args: &[&str]) -> Output {
        let mut all = vec!["exec", "-n", ns, pod, "-c", "app", "--", "/l4proxy-echo"];
        all.extend_from_slice(args);
        self.kubectl(&all).await
    }

    /// The same, left running (for connections held open across a change).
    fn exec_background(&self, ns: &str, pod: &str, args: &[&str]) -> Child {
        let mut all = vec!["exec", "-n", ns, pod, "-c", "app", "--", "/l4proxy-echo"];
        all.extend_from_slice(args);
        self.command(&self.kubectl, &all).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
    }

    fn image(&self, name: &str) -> String {
        format!("localhost/{name}:{}", self.tag)
    }
}

fn ok(what: &str, out: Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{what}: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    stdout
}

/// The answers of `who` (one pod name per line), when it succeeded.
fn names(out: &Output) -> Option<BTreeSet<String>> {
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect())
}

async fn wait_child(mut child: Child) -> Output {
    tokio::task::spawn_blocking(move || {
        let status = child.wait().unwrap();
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        use std::io::Read;
        child.stdout.take().unwrap().read_to_end(&mut stdout).unwrap();
        child.stderr.take().unwrap().read_to_end(&mut stderr).unwrap();
        Output { status, stdout, stderr }
    })
    .await
    .unwrap()
}

fn is_ready(pod: &Pod) -> bool {
    let status = pod.status.as_ref();
    status.and_then(|s| s.phase.as_deref()) == Some("Running")
        && status
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

async fn ready_pods(api: &Api<Pod>, selector: &str) -> Vec<Pod> {
    let pods = api.list(&ListParams::default().labels(selector)).await.map(|l| l.items).unwrap_or_default();
    pods.into_iter().filter(|p| is_ready(p) && p.metadata.deletion_timestamp.is_none()).collect()
}

async fn wait_ready_pods(api: &Api<Pod>, selector: &str, count: usize) -> Vec<Pod> {
    wait_for(&format!("{count} ready pods {selector}"), TIMEOUT, || async {
        let pods = ready_pods(api, selector).await;
        (pods.len() == count).then_some(pods)
    })
    .await
}

fn condition(proxy: &L4Proxy, type_: &str) -> Option<String> {
    let status = proxy.status.as_ref()?;
    let c =
        status.conditions.iter().find(|c| c.type_ == type_ && c.observed_generation == proxy.metadata.generation)?;
    Some(c.status.clone())
}

async fn wait_status(api: &Api<L4Proxy>, name: &str, what: &str, check: impl Fn(&L4Proxy) -> bool) -> L4Proxy {
    wait_for(&format!("{name}: {what}"), STATUS_TIMEOUT, || async {
        let proxy = api.get(name).await.ok()?;
        check(&proxy).then_some(proxy)
    })
    .await
}

fn pool_size(proxy: &L4Proxy, listener: &str) -> Option<u64> {
    let status = proxy.status.as_ref()?;
    status.listeners.iter().find(|l| l.name == listener)?.pool_stats.as_ref().map(|p| p.size)
}

async fn apply(client: &Client, ns: &str, value: Value) {
    let object: kube::api::DynamicObject = serde_json::from_value(value).unwrap();
    let name = object.name_any();
    let gvk = kube::api::GroupVersionKind::try_from(object.types.as_ref().unwrap()).unwrap();
    let (resource, _) = kube::discovery::pinned_kind(client, &gvk).await.unwrap();
    let api: Api<kube::api::DynamicObject> = Api::namespaced_with(client.clone(), ns, &resource);
    api.patch(&name, &PatchParams::apply("l4proxy-e2e").force(), &Patch::Apply(&object)).await.unwrap();
}

fn echo_objects(cluster: &Cluster) -> [Value; 2] {
    let deployment = json!({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": { "name": "echo" },
        "spec": {
            "replicas": 2,
            "selector": { "matchLabels": { "app": "echo" } },
            "template": {
                "metadata": { "labels": { "app": "echo" } },
                "spec": { "containers": [{
                    "name": "echo", "image": cluster.image("l4proxy-echo"), "imagePullPolicy": "Never",
                    "args": ["serve", ECHO_PORT.to_string()],
                    "env": [{ "name": "POD_NAME", "valueFrom": { "fieldRef": { "fieldPath": "metadata.name" } } }],
                    "ports": [{ "containerPort": ECHO_PORT, "protocol": "TCP" }, { "containerPort": ECHO_PORT, "protocol": "UDP" }],
                    "readinessProbe": { "tcpSocket": { "port": ECHO_PORT }, "periodSeconds": 1 },
                }]},
            },
        },
    });
    let service = json!({
        "apiVersion": "v1", "kind": "Service", "metadata": { "name": "echo" },
        "spec": {
            "selector": { "app": "echo" },
            "ports": [
                { "name": "tcp", "port": ECHO_PORT, "protocol": "TCP" },
                { "name": "udp", "port": ECHO_PORT, "protocol": "UDP" },
            ],
        },
    });
    [deployment, service]
}

fn client_resource(listeners: Value) -> Value {
    json!({
        "apiVersion": "l4proxy.dev/v1alpha1", "kind": "L4Proxy", "metadata": { "name": "client" },
        "spec": { "selector": { "matchLabels": { "app": "client" } }, "listeners": listeners },
    })
}

fn listener(name: &str, port: u16, max_connections: u32) -> Value {
    json!({
        "name": name, "protocol": "TCP", "address": format!("127.0.0.1:{port}"),
        "backends": [{ "service": { "name": "echo", "port": ECHO_PORT } }],
        "limits": { "maxConnections": max_connections },
    })
}

fn client_pod(cluster: &Cluster) -> Pod {
    serde_json::from_value(json!({
        "metadata": { "name": "client", "labels": { "app": "client", "l4proxy.dev/inject": "enabled" } },
        "spec": {
            // The app's PID 1 ignores SIGTERM: the grace period bounds the deletion test.
            "terminationGracePeriodSeconds": 10,
            "containers": [{
                "name": "app", "image": cluster.image("l4proxy-echo"), "imagePullPolicy": "Never",
                "args": ["serve", "7100"],
            }],
        },
    }))
    .unwrap()
}

/// When a container (or init container) of `pod` started running, or finished.
fn moment(pod: &Pod, init: bool, name: &str, finished: bool) -> Option<k8s_openapi::jiff::Timestamp> {
    let status = pod.status.as_ref()?;
    let list = if init { status.init_container_statuses.as_ref() } else { status.container_statuses.as_ref() }?;
    let state = list.iter().find(|c| c.name == name)?.state.as_ref()?;
    if finished {
        Some(state.terminated.as_ref()?.finished_at.as_ref()?.0)
    } else {
        Some(state.running.as_ref()?.started_at.as_ref()?.0)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a cluster: `make e2e` (a real node on this machine) or tests/kind/e2e.sh"]
async fn chart_sidecars_and_gateways_on_a_real_cluster() {
    let cluster = Cluster::from_env().await;
    let client = cluster.client.clone();

    // 1. The chart with the local images: both operator replicas Running and Ready (in-cluster
    //    config; the webhook is reached through its Service from here on).
    let chart = l4proxy_testenv::bins::repo_root().join("charts/l4proxy");
    let operator_image = format!("image.operator.tag={}", cluster.tag);
    let proxy_image = format!("image.proxy.tag={}", cluster.tag);
    let install = [
        "upgrade",
        "--install",
        "l4proxy",
        chart.to_str().unwrap(),
        "-n",
        RELEASE_NS,
        "--create-namespace",
        "--set",
        "image.operator.repository=localhost/l4proxy-operator",
        "--set",
        &operator_image,
        "--set",
        "image.proxy.repository=localhost/l4proxy",
        "--set",
        &proxy_image,
        "--set",
        "image.pullPolicy=Never",
        "--wait",
        "--timeout",
        "3m",
    ];
    ok("helm install", cluster.run(&cluster.helm, &install).await);
    let operator_pods: Api<Pod> = Api::namespaced(client.clone(), RELEASE_NS);
    let selector = "app.kubernetes.io/name=l4proxy-operator,app.kubernetes.io/instance=l4proxy";
    wait_ready_pods(&operator_pods, selector, 2).await;

    // 2. A fresh namespace: the echo Deployment (2 replicas) behind a Service.
    let ns = format!("e2e-{}", std::process::id());
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let namespace = Namespace {
        metadata: kube::api::ObjectMeta { name: Some(ns.clone()), ..Default::default() },
        ..Default::default()
    };
    namespaces.create(&PostParams::default(), &namespace).await.expect("the test namespace");
    for object in echo_objects(&cluster) {
        apply(&client, &ns, object).await;
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let echo_names = |pods: &[Pod]| pods.iter().map(|p| p.name_any()).collect::<BTreeSet<_>>();
    let echoes = echo_names(&wait_ready_pods(&pods, "app=echo", 2).await);

    // 3. The resource for the client's sidecar, then the client pod: injected, the sidecar
    //    started (its startup probe passed) before the app container.
    apply(&client, &ns, client_resource(json!([listener("echo", SIDECAR_PORT, 512)]))).await;
    // The webhook answers through its Service once the Service's rules are in place (kube-proxy
    // follows the endpoints within seconds): a server-side dry run admits the pod through it.
    let dry_run = PostParams { dry_run: true, ..Default::default() };
    wait_for("the webhook through its Service (a dry-run pod gets the sidecar)", TIMEOUT, || async {
        let admitted = pods.create(&dry_run, &client_pod(&cluster)).await.ok()?;
        let injected = admitted.spec?.init_containers?.iter().any(|c| c.name == "l4proxy");
        injected.then_some(())
    })
    .await;
    pods.create(&PostParams::default(), &client_pod(&cluster)).await.expect("the client pod");
    let client_pod = wait_ready_pods(&pods, "app=client", 1).await.remove(0);
    let inits: Vec<_> =
        client_pod.spec.as_ref().unwrap().init_containers.iter().flatten().map(|c| c.name.clone()).collect();
    assert_eq!(inits, ["l4proxy"], "the sidecar is injected");
    let (sidecar_started, app_started) =
        (moment(&client_pod, true, "l4proxy", false).unwrap(), moment(&client_pod, false, "app", false).unwrap());
    assert!(sidecar_started <= app_started, "the sidecar ({sidecar_started}) starts before the app ({app_started})");

    // 4. Traffic from the app container to 127.0.0.1:PORT reaches both echo pods.
    let target = format!("127.0.0.1:{SIDECAR_PORT}");
    let reached = wait_for("both echo pods through the sidecar", TIMEOUT, || async {
        let seen = names(&cluster.exec(&ns, "client", &["who", &target, "20"]).await)?;
        (seen == echoes).then_some(seen)
    })
    .await;
    assert_eq!(reached, echoes);

    // 5. Status: Programmed, 1/1, and `kubectl get l4p` says so.
    let proxies: Api<L4Proxy> = Api::namespaced(client.clone(), &ns);
    wait_status(&proxies, "client", "Programmed with 1/1", |p| {
        condition(p, "Programmed").as_deref() == Some("True")
            && p.status.as_ref().is_some_and(|s| s.proxies.summary == "1/1")
    })
    .await;
    let table = ok("kubectl get l4p", cluster.kubectl(&["get", "l4p", "-n", &ns]).await);
    let row: Vec<_> = table.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(&row[..4], ["client", "True", "True", "1/1"], "{table}");

    // 6. N open connections show as poolStats.size N; a spec change (a new limit, a new listener)
    //    reaches the sidecar and drops none of them.
    let held = cluster.exec_background(&ns, "client", &["hold", &target, "5", "60"]);
    wait_status(&proxies, "client", "poolStats.size 5", |p| pool_size(p, "echo") == Some(5)).await;
    let changed = client_resource(json!([listener("echo", SIDECAR_PORT, 100), listener("echo2", SIDECAR_PORT_2, 100)]));
    apply(&client, &ns, changed).await;
    let target_2 = format!("127.0.0.1:{SIDECAR_PORT_2}");
    wait_for("the new listener in the sidecar", TIMEOUT, || async {
        names(&cluster.exec(&ns, "client", &["who", &target_2, "1"]).await)
            .filter(|n| n.is_subset(&echoes) && !n.is_empty())
    })
    .await;
    let out = wait_child(held).await;
    assert!(out.status.success(), "a held connection was dropped: {}", String::from_utf8_lossy(&out.stderr));

    // 7. Scaling the echo Deployment is followed.
    ok("kubectl scale", cluster.kubectl(&["scale", "-n", &ns, "deployment/echo", "--replicas=3"]).await);
    let three = echo_names(&wait_ready_pods(&pods, "app=echo", 3).await);
    wait_for("all three echo pods through the sidecar", TIMEOUT, || async {
        let seen = names(&cluster.exec(&ns, "client", &["who", &target, "30"]).await)?;
        (seen == three).then_some(())
    })
    .await;

    // 8. A gateway: its pods Running and Ready, counted in status.proxies, and traffic through
    //    the gateway Service's ClusterIP reaches the echo pods.
    let gateway = json!({
        "apiVersion": "l4proxy.dev/v1alpha1", "kind": "L4Proxy", "metadata": { "name": "gw" },
        "spec": { "gateway": { "replicas": 1 }, "listeners": [{
            "name": "echo", "protocol": "TCP", "address": format!("0.0.0.0:{GATEWAY_PORT}"),
            "backends": [{ "service": { "name": "echo", "port": ECHO_PORT } }],
        }]},
    });
    apply(&client, &ns, gateway).await;
    wait_ready_pods(&pods, "l4proxy.dev/gateway=gw", 1).await;
    wait_status(&proxies, "gw", "Ready and 1/1", |p| {
        condition(p, "Ready").as_deref() == Some("True")
            && p.status.as_ref().is_some_and(|s| s.proxies.summary == "1/1")
    })
    .await;
    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    let cluster_ip = services.get("gw-gateway").await.unwrap().spec.unwrap().cluster_ip.unwrap();
    let through_gateway = format!("{cluster_ip}:{GATEWAY_PORT}");
    wait_for("echo pods through the gateway Service", TIMEOUT, || async {
        names(&cluster.exec(&ns, "client", &["who", &through_gateway, "10"]).await)
            .filter(|n| !n.is_empty() && n.is_subset(&three))
    })
    .await;

    // 9. The leading operator pod deleted: traffic keeps flowing, the other replica takes over
    //    (and writes: a spec change after it is in status).
    let leases: Api<Lease> = Api::namespaced(client.clone(), RELEASE_NS);
    let holder = || async { leases.get(OPERATOR).await.ok()?.spec?.holder_identity };
    let leader = wait_for("a lease holder", TIMEOUT, holder).await;
    let held = cluster.exec_background(&ns, "client", &["hold", &target, "3", "30"]);
    operator_pods.delete(&leader, &DeleteParams::default()).await.expect("the leader's pod is deleted");
    wait_for("another replica holding the lease", TIMEOUT, || async { holder().await.filter(|h| *h != leader) }).await;
    apply(&client, &ns, client_resource(json!([listener("echo", SIDECAR_PORT, 200)]))).await;
    wait_status(&proxies, "client", "the change after the failover accepted", |p| {
        condition(p, "Accepted").as_deref() == Some("True") && condition(p, "Programmed").as_deref() == Some("True")
    })
    .await;
    let out = wait_child(held).await;
    assert!(out.status.success(), "traffic stopped during the failover: {}", String::from_utf8_lossy(&out.stderr));
    wait_ready_pods(&operator_pods, selector, 2).await;

    // 10. The client pod deleted with a connection open: the app container ends first, the
    //     sidecar drains and exits after it, cleanly, within the grace period.
    let open = cluster.exec_background(&ns, "client", &["hold", &target, "1", "600"]);
    wait_status(&proxies, "client", "the held connection counted", |p| pool_size(p, "echo") == Some(1)).await;
    let started = tokio::time::Instant::now();
    pods.delete("client", &DeleteParams::default()).await.unwrap();
    // Polled until the pod is gone (bounded by the grace period and a margin). The kubelet stops
    // the app container first and the sidecar after it: some snapshot shows the app terminated
    // while the sidecar runs, or the last one shows both ended in that order, the sidecar on its
    // own (exit 0: it drained and stopped on SIGTERM, it was not killed at the deadline).
    let mut sidecar_outlived_app = false;
    let mut last = None;
    while let Some(pod) = pods.get_opt("client").await.unwrap() {
        assert!(started.elapsed() < Duration::from_secs(25), "the client pod outlived its 10 s grace period");
        let app_done = moment(&pod, false, "app", true).is_some();
        let sidecar_running = moment(&pod, true, "l4proxy", false).is_some();
        sidecar_outlived_app |= app_done && sidecar_running;
        last = Some(pod);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let last = last.expect("the pod was seen terminating");
    let sidecar_exit = last
        .status
        .as_ref()
        .and_then(|s| s.init_container_statuses.as_ref())
        .and_then(|s| s.iter().find(|c| c.name == "l4proxy"))
        .and_then(|c| c.state.as_ref()?.terminated.as_ref().map(|t| t.exit_code));
    let ended_in_order = match (moment(&last, false, "app", true), moment(&last, true, "l4proxy", true)) {
        (Some(app), Some(sidecar)) => app <= sidecar && sidecar_exit == Some(0),
        _ => false,
    };
    assert!(
        sidecar_outlived_app || ended_in_order,
        "the sidecar was not seen ending after the app container, on its own; last status: {}",
        serde_json::to_string_pretty(&last.status).unwrap()
    );
    // The exec ends with its container (it fails: its connection was cut by the deletion).
    let _ = wait_child(open).await;

    // Clean up what this run made (the release stays for the next run).
    let _ = namespaces.delete(&ns, &DeleteParams::default()).await;
}
