//! The Helm chart against a real kube-apiserver: `helm install`, the operator run (in this
//! process) with the chart's ServiceAccount — a TokenRequest token, not the admin certificate,
//! so every RBAC rule the chart grants is exercised — and the real API server calling its
//! webhook (the chart's `webhook.url` points it at 127.0.0.1). Then an `l4proxy` process with
//! exactly an injected container's arguments and environment and a token bound to that pod
//! subscribes and carries traffic: the sidecar path short of the kubelet.

mod support;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
};

use k8s_openapi::api::{
    admissionregistration::v1::MutatingWebhookConfiguration,
    apps::v1::Deployment,
    core::v1::{ConfigMap, Container, Namespace, Pod},
    events::v1::Event,
};
use kube::{
    Api, Client, Config, ResourceExt,
    api::{ListParams, Patch, PatchParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
};
use l4proxy_operator::{
    ConfigServiceConfig, L4Proxy, OperatorConfig, Running, WebhookConfig, model::injection, reconcile::Options,
};
use l4proxy_testenv::{ControlPlane, bins, free_port, wait_for};
use serde_json::json;
use support::*;

/// The chart's fixed object name (its `fullnameOverride` is empty).
const FULLNAME: &str = "l4proxy-operator";
const PROXY_IMAGE: &str = "localhost/l4proxy:dev";

fn chart_dir() -> PathBuf {
    bins::repo_root().join("charts/l4proxy")
}

/// Runs helm (built by tools/build.sh next to kube-apiserver) on the shared control plane, off
/// the runtime's thread: the operator in this process must keep answering the API server's
/// webhook calls meanwhile.
async fn helm(args: &[&str]) -> Output {
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        let control_plane = ControlPlane::shared();
        Command::new(control_plane.bin_dir().join("helm"))
            .args(&args)
            .env("KUBECONFIG", control_plane.kubeconfig_path())
            .env("HELM_CACHE_HOME", control_plane.dir().join("helm/cache"))
            .env("HELM_CONFIG_HOME", control_plane.dir().join("helm/config"))
            .env("HELM_DATA_HOME", control_plane.dir().join("helm/data"))
            .output()
            .expect("helm runs")
    })
    .await
    .unwrap()
}

fn succeeded(what: &str, out: &Output) -> String {
    assert!(
        out.status.success(),
        "{what}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// kubectl on the shared control plane, with `stdin` when given (off the runtime's thread, as
/// [`helm`]).
async fn kubectl(args: &[&str], stdin: Option<&str>) -> Output {
    use std::io::Write;
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    let stdin = stdin.unwrap_or_default().to_owned();
    tokio::task::spawn_blocking(move || {
        let mut command = ControlPlane::shared().kubectl();
        command.args(&args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = command.spawn().expect("kubectl runs");
        let mut input = child.stdin.take().unwrap();
        input.write_all(stdin.as_bytes()).unwrap();
        drop(input);
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap()
}

/// A client that authenticates as ServiceAccount `account` of `namespace` with a TokenRequest
/// token (the admin kubeconfig's cluster and CA, another user).
async fn client_as(admin: &Client, namespace: &str, account: &str) -> Client {
    let token = token(admin, namespace, account, "https://kubernetes.default.svc").await;
    let mut kubeconfig = Kubeconfig::read_from(ControlPlane::shared().kubeconfig_path()).unwrap();
    let user = kubeconfig.auth_infos[0].auth_info.as_mut().unwrap();
    *user = kube::config::AuthInfo { token: Some(token.into()), ..Default::default() };
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await.unwrap();
    Client::try_from(config).unwrap()
}

/// The operator as the chart's Deployment runs it, on loopback ports: watching all namespaces,
/// its Lease, CA and reports in `namespace`, serving proxies and the webhook.
async fn start_chart_operator(client: Client, namespace: &str, config_port: u16, webhook_port: u16) -> Running {
    let identity = "chart-op-1";
    let mut lease = lease(namespace, identity);
    lease.name = FULLNAME.into();
    let config = OperatorConfig {
        options: Options {
            namespace: None,
            proxy_image: PROXY_IMAGE.into(),
            allow_cross_namespace_services: false,
            resync: std::time::Duration::from_secs(300),
            identity: identity.into(),
            max_concurrent_reconciles: 4,
            gateway_control: None,
        },
        lease,
        http_address: None,
        config_service: Some(ConfigServiceConfig {
            address: ([127, 0, 0, 1], config_port).into(),
            dns_names: vec![format!("{FULLNAME}.{namespace}.svc")],
            pod_url: Some(format!("https://127.0.0.1:{config_port}")),
            max_proxies: 100,
        }),
        status_interval: STATUS_INTERVAL,
        webhook: Some(WebhookConfig {
            address: ([127, 0, 0, 1], webhook_port).into(),
            configuration: Some(FULLNAME.into()),
            image: PROXY_IMAGE.into(),
            resources: injection::Resources {
                cpu_request: Some("10m".into()),
                memory_request: Some("32Mi".into()),
                memory_limit: Some("256Mi".into()),
                ..Default::default()
            },
        }),
    };
    leading(l4proxy_operator::start(client, config).await.expect("the operator starts with the chart's RBAC")).await
}

fn pod(name: &str, labels: &[(&str, &str)], annotations: &[(&str, &str)]) -> Pod {
    let map = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    };
    serde_json::from_value(json!({
        "metadata": { "name": name, "labels": map(labels), "annotations": map(annotations) },
        "spec": {
            "serviceAccountName": "web",
            "containers": [{ "name": "app", "image": "example.invalid/app:1" }],
        },
    }))
    .unwrap()
}

fn init_names(pod: &Pod) -> Vec<String> {
    pod.spec.iter().flat_map(|s| s.init_containers.iter().flatten()).map(|c| c.name.clone()).collect()
}

fn sidecar(pod: &Pod) -> Container {
    let spec = pod.spec.as_ref().unwrap();
    spec.init_containers.iter().flatten().find(|c| c.name == injection::SIDECAR_NAME).cloned().expect("a sidecar")
}

/// `l4proxy` run as the kubelet would run `container` of `pod`: its arguments and environment
/// (downward-API values filled in), but for the two paths a pod has and this host has not:
/// the token file (a bound token written here) and the admin address (a free loopback port,
/// as the pod's own network namespace would have).
fn run_sidecar(container: &Container, pod: &Pod, token: &Path, admin_port: u16, log: &Path) -> Child {
    let mut args = container.args.clone().unwrap();
    let mut replace = |flag: &str, value: String| {
        let at = args.iter().position(|a| a == flag).unwrap_or_else(|| panic!("the sidecar has {flag}"));
        args[at + 1] = value;
    };
    replace("--token-file", token.display().to_string());
    replace("--admin-address", format!("127.0.0.1:{admin_port}"));
    let mut command = Command::new(bins::proxy_binary().expect("the l4proxy binary"));
    command.args(&args).env_clear();
    for var in container.env.iter().flatten() {
        let value = match (&var.value, var.value_from.as_ref().and_then(|v| v.field_ref.as_ref())) {
            (Some(value), _) => value.clone(),
            (None, Some(field)) if field.field_path == "metadata.name" => pod.name_any(),
            (None, Some(field)) if field.field_path == "metadata.namespace" => pod.namespace().unwrap(),
            other => panic!("env {} from {other:?}", var.name),
        };
        command.env(&var.name, value);
    }
    let log = std::fs::File::create(log).unwrap();
    command.stdout(log.try_clone().unwrap()).stderr(log).spawn().expect("l4proxy starts")
}

#[tokio::test]
async fn chart_renders_objects_the_api_server_accepts() {
    let (client, ns) = setup("chart-render").await;
    // Its own names: the other test installs the chart's default ones in the same API server.
    let name = "fullnameOverride=l4proxy-render";
    for values in [&[][..], &["--set", "webhook.url=https://127.0.0.1:9443", "--set", "networkPolicy.enabled=true"]] {
        let chart = chart_dir();
        let mut args = vec!["template", "l4proxy", chart.to_str().unwrap(), "--namespace", ns.name(), "--set", name];
        args.extend_from_slice(values);
        let rendered = succeeded("helm template", &helm(&args).await);
        let out = kubectl(&["apply", "--dry-run=server", "-n", ns.name(), "-f", "-"], Some(&rendered)).await;
        succeeded(&format!("kubectl apply --dry-run=server of helm template {values:?}"), &out);
    }
    // A typo in a value is refused naming it.
    let chart = chart_dir();
    let out = helm(&["template", "l4proxy", chart.to_str().unwrap(), "--set", "webhok.url=x"]).await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("webhok"), "{stderr}");
    drop(client);
}

/// The whole installation story, in order (one release: its cluster-scoped objects are named).
#[tokio::test]
async fn helm_installed_operator_injects_sidecars_that_subscribe_and_carry_traffic() {
    let (admin, release_ns) = setup("l4proxy-system").await;
    let (config_port, webhook_port) = (free_port(), free_port());

    // 1. helm install: CRDs established, `kubectl get l4p` works.
    let chart = chart_dir();
    let webhook_url = format!("webhook.url=https://127.0.0.1:{webhook_port}");
    let install = ["install", "l4proxy", chart.to_str().unwrap(), "-n", release_ns.name(), "--set", &webhook_url];
    succeeded("helm install", &helm(&install).await);
    install_crd(&admin).await;
    succeeded("kubectl get l4p", &kubectl(&["get", "l4p", "-A"], None).await);

    // 2. The operator with the chart's ServiceAccount; it writes its CA into the webhooks.
    let operator_client = client_as(&admin, release_ns.name(), FULLNAME).await;
    let operator = start_chart_operator(operator_client.clone(), release_ns.name(), config_port, webhook_port).await;
    let config_maps: Api<ConfigMap> = Api::namespaced(admin.clone(), release_ns.name());
    let ca = wait_for("ConfigMap l4proxy-ca", TIMEOUT, || async {
        config_maps.get_opt("l4proxy-ca").await.ok().flatten()?.data?.get("ca.crt").cloned()
    })
    .await;
    let webhooks: Api<MutatingWebhookConfiguration> = Api::all(admin.clone());
    let bundled = || async {
        let configuration = webhooks.get(FULLNAME).await.ok()?;
        let all = configuration.webhooks?.iter().all(|w| {
            w.client_config.ca_bundle.as_ref().is_some_and(|b| b.0 == ca.as_bytes())
                && w.client_config.url.as_deref() == Some(&format!("https://127.0.0.1:{webhook_port}/inject"))
        });
        all.then_some(())
    };
    wait_for("the CA in both webhooks' caBundle", TIMEOUT, bundled).await;
    // ... and kept there: a bundle changed behind its back is written again.
    let other =
        json!({ "webhooks": [{ "name": "pod.inject.l4proxy.dev", "clientConfig": { "caBundle": "T1RIRVI=" } }] });
    webhooks.patch(FULLNAME, &PatchParams::default(), &Patch::Strategic(&other)).await.unwrap();
    wait_for("the CA written back into caBundle", TIMEOUT, bundled).await;

    // 3. An app namespace with a resource that selects app=web (and a gateway: the operator's
    //    Deployment, Service and ConfigMap rights are exercised too).
    let app = ControlPlane::shared().namespace(&admin, "shop").await;
    let upstream = echo().await;
    let listen_port = free_port();
    let proxies: Api<L4Proxy> = Api::namespaced(admin.clone(), app.name());
    create(
        &proxies,
        &format!(
            "apiVersion: l4proxy.dev/v1alpha1\nkind: L4Proxy\nmetadata: {{name: web}}\nspec:\n  selector: {{matchLabels: {{app: web}}}}\n  gateway: {{replicas: 1}}\n  listeners:\n  - {{name: db, address: '127.0.0.1:{listen_port}', backends: [{{address: '{upstream}'}}]}}\n"
        ),
    )
    .await;
    // No kubelet runs the gateway's pod, so it is never Ready: its objects are what counts here.
    wait_status(&proxies, "web", "Accepted=True", |p| has_condition(p, "Accepted", "True")).await;
    let deployments: Api<Deployment> = Api::namespaced(admin.clone(), app.name());
    wait_for("the gateway Deployment", TIMEOUT, || async { deployments.get_opt("web-gateway").await.ok().flatten() })
        .await;
    service_account(&admin, app.name(), "web").await;
    let pods: Api<Pod> = Api::namespaced(admin.clone(), app.name());
    let post = PostParams::default();

    // 4. A labelled pod gets the sidecar through the real API server.
    let enabled = [("app", "web"), ("l4proxy.dev/inject", "enabled")];
    let web = pods.create(&post, &pod("web-1", &enabled, &[])).await.expect("web-1 is created");
    assert_eq!(init_names(&web), ["l4proxy"]);
    let container = sidecar(&web);
    let args = container.args.clone().unwrap();
    let after = |flag: &str| args.iter().position(|a| a == flag).map(|i| args[i + 1].clone());
    assert_eq!(after("--control-plane"), Some(format!("https://127.0.0.1:{config_port}")));
    assert_eq!(after("--resource"), Some(format!("{}/web", app.name())));
    assert_eq!(container.image.as_deref(), Some(PROXY_IMAGE));
    assert_eq!(container.restart_policy.as_deref(), Some("Always"));
    assert!(container.startup_probe.is_some());
    let env: BTreeMap<_, _> = container.env.iter().flatten().map(|e| (e.name.clone(), e.value.clone())).collect();
    assert_eq!(env["L4PROXY_CA_PEM"].as_deref(), Some(ca.as_str()));
    assert!(env.contains_key("POD_NAME") && env.contains_key("POD_NAMESPACE"), "{env:?}");
    let security = container.security_context.clone().unwrap();
    assert_eq!(
        (security.run_as_non_root, security.read_only_root_filesystem, security.allow_privilege_escalation),
        (Some(true), Some(true), Some(false))
    );
    assert_eq!(security.seccomp_profile.unwrap().type_, "RuntimeDefault");
    let volumes = web.spec.as_ref().unwrap().volumes.clone().unwrap();
    let token_volume = volumes.iter().find(|v| v.name == "l4proxy-token").expect("the token volume");
    let projection = token_volume.projected.clone().unwrap().sources.unwrap()[0].service_account_token.clone().unwrap();
    assert_eq!(projection.audience.as_deref(), Some("l4proxy.dev"));
    assert_eq!(web.annotations()[injection::INJECTED_ANNOTATION], format!("{}/web", app.name()));

    // 5. Admitting an injected pod again changes nothing.
    let mut again = pod("web-2", &enabled, &[]);
    again.spec = web.spec.clone();
    let again = pods.create(&post, &again).await.expect("web-2 is created");
    assert_eq!(init_names(&again), ["l4proxy"]);
    let token_volumes = again.spec.as_ref().unwrap().volumes.iter().flatten().filter(|v| v.name == "l4proxy-token");
    assert_eq!(token_volumes.count(), 1);

    // 6. Untouched: an unlabelled pod, a pod in kube-system.
    let plain = pods.create(&post, &pod("plain", &[("app", "web")], &[])).await.unwrap();
    assert!(init_names(&plain).is_empty());
    let system: Api<Pod> = Api::namespaced(admin.clone(), "kube-system");
    let name = format!("system-{}", app.name());
    let in_system = system.create(&post, &pod(&name, &enabled, &[])).await.unwrap();
    assert!(init_names(&in_system).is_empty());
    let _ = system.delete(&name, &Default::default()).await;

    // 7. A namespace that opts in: its unlabelled pods get the sidecar, `disabled` wins.
    let namespaces: Api<Namespace> = Api::all(admin.clone());
    let label = json!({ "metadata": { "labels": { "l4proxy.dev/inject": "enabled" } } });
    namespaces.patch(app.name(), &PatchParams::default(), &Patch::Merge(&label)).await.unwrap();
    let by_namespace = pods.create(&post, &pod("by-namespace", &[("app", "web")], &[])).await.unwrap();
    assert_eq!(init_names(&by_namespace), ["l4proxy"]);
    let disabled = [("app", "web"), ("l4proxy.dev/inject", "disabled")];
    let opted_out = pods.create(&post, &pod("opted-out", &disabled, &[])).await.unwrap();
    assert!(init_names(&opted_out).is_empty());

    // 8. Unmatched: admitted unchanged, with a warning and an Event on the resource.
    let manifest = serde_json::to_string(&pod("other", &[("app", "other")], &[])).unwrap();
    let out = kubectl(&["create", "-n", app.name(), "-f", "-"], Some(&manifest)).await;
    succeeded("kubectl create an unmatched pod", &out);
    let warnings = String::from_utf8_lossy(&out.stderr);
    assert!(warnings.contains("Warning: l4proxy: no sidecar: no L4Proxy in namespace"), "{warnings}");
    let other = pods.get("other").await.unwrap();
    assert!(init_names(&other).is_empty());
    let events: Api<Event> = Api::namespaced(admin.clone(), app.name());
    wait_for("a SidecarNotInjected Event on web", TIMEOUT, || async {
        let list = events.list(&ListParams::default()).await.ok()?;
        list.items
            .iter()
            .find(|e| {
                e.reason.as_deref() == Some("SidecarNotInjected")
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("web")
            })
            .map(|_| ())
    })
    .await;

    // 9. A bad override refuses the pod, naming the annotation.
    let bad = pod("bad", &enabled, &[("l4proxy.dev/proxy-memory-limit", "lots")]);
    let refused = pods.create(&post, &bad).await.expect_err("a bad annotation refuses the pod");
    assert!(refused.to_string().contains("l4proxy.dev/proxy-memory-limit: \"lots\" is not a quantity"), "{refused}");

    // 10. The sidecar itself, with a token bound to web-1: it subscribes and carries traffic.
    let dir = std::env::temp_dir().join(format!("l4proxy-chart-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let token_file = dir.join("token");
    let bound = token_bound(&admin, app.name(), "web", "l4proxy.dev", Some(("web-1", &web.uid().unwrap()))).await;
    std::fs::write(&token_file, bound).unwrap();
    let admin_port = free_port();
    let mut proxy = run_sidecar(&container, &web, &token_file, admin_port, &dir.join("sidecar.log"));
    let admin_address = ([127, 0, 0, 1], admin_port).into();
    wait_for("the sidecar's /readyz (its startup probe)", TIMEOUT, || async {
        http_get(admin_address, "/readyz").await.filter(|(code, _)| *code == 200).map(|_| ())
    })
    .await;
    let listener = ([127, 0, 0, 1], listen_port).into();
    wait_for("traffic through the sidecar", TIMEOUT, || round_trip(listener)).await;
    wait_status(&proxies, "web", "Programmed=True with one proxy", |p| {
        has_condition(p, "Programmed", "True") && p.status.as_ref().is_some_and(|s| s.proxies.connected == 1)
    })
    .await;
    let _ = proxy.kill();
    let _ = proxy.wait();

    // 11. With the webhook down: Ignore creates pods without a sidecar, Fail refuses them.
    operator.stop().await;
    let unserved = pods.create(&post, &pod("unserved", &enabled, &[])).await.expect("Ignore admits the pod");
    assert!(init_names(&unserved).is_empty());
    let upgrade = [
        "upgrade",
        "l4proxy",
        chart.to_str().unwrap(),
        "-n",
        release_ns.name(),
        "--reuse-values",
        "--set",
        "webhook.failurePolicy=Fail",
    ];
    succeeded("helm upgrade to failurePolicy Fail", &helm(&upgrade).await);
    let refused = pods.create(&post, &pod("refused", &enabled, &[])).await.expect_err("Fail refuses the pod");
    assert!(refused.to_string().contains("inject.l4proxy.dev"), "{refused}");
    succeeded("helm uninstall", &helm(&["uninstall", "l4proxy", "-n", release_ns.name()]).await);
    let _ = std::fs::remove_dir_all(&dir);
    drop(operator_client);
}
