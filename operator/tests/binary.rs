//! The `l4proxy-operator` binary: `crd`, and `run` against the real control plane (kubeconfig,
//! health and metrics endpoints, graceful shutdown that releases the lease).

mod support;

use std::{
    path::Path,
    process::{Child, Command, Stdio},
};

use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use l4proxy_operator::L4Proxy;
use l4proxy_testenv::{ControlPlane, wait_for};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BIN: &str = env!("CARGO_BIN_EXE_l4proxy-operator");

#[test]
fn crd_command_prints_the_checked_in_crd() {
    let out = Command::new(BIN).arg("crd").output().unwrap();
    assert!(out.status.success());
    let checked_in =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds/l4proxy.dev_l4proxies.yaml"))
            .unwrap();
    assert!(
        String::from_utf8(out.stdout).unwrap() == checked_in,
        "crds/l4proxy.dev_l4proxies.yaml is out of date: run `make crds`"
    );
}

#[test]
fn renew_deadline_not_shorter_than_lease_duration_is_a_usage_error() {
    let out = Command::new(BIN)
        .args(["run", "--kubeconfig", "/nonexistent", "--lease-duration", "5s", "--lease-renew-deadline", "5s"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--lease-renew-deadline (5s)"), "{stderr}");
}

#[test]
fn unreadable_kubeconfig_fails_naming_the_file() {
    let out = Command::new(BIN).args(["run", "--kubeconfig", "/nonexistent/kubeconfig"]).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/nonexistent/kubeconfig"), "{stderr}");
}

/// Kills the operator if a test fails before it stops it.
struct Operator(Child);

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    let code = response.split(' ').nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    Some((code, body))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[tokio::test]
async fn run_serves_health_and_metrics_reconciles_and_releases_the_lease_on_sigterm() {
    let (client, ns) = setup("binary").await;
    let port = free_port();
    let kubeconfig = ControlPlane::shared().kubeconfig_path();
    let log_path = std::env::temp_dir().join(format!("l4proxy-operator-{}-{port}.log", std::process::id()));
    let child = Command::new(BIN)
        .args(["run", "--kubeconfig"])
        .arg(kubeconfig)
        .args(["--namespace", ns.name(), "--lease-namespace", ns.name(), "--identity", "bin-op"])
        .args(["--http-address", &format!("127.0.0.1:{port}")])
        .args(["--lease-duration", "6s", "--lease-renew-deadline", "4s", "--lease-retry-period", "200ms"])
        .env_remove("KUBECONFIG")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let mut operator = Operator(child);

    assert_eq!(wait_for("/healthz", TIMEOUT, || http_get(port, "/healthz")).await.0, 200);
    wait_for("/readyz to say it leads", TIMEOUT, || async {
        (http_get(port, "/readyz").await? == (200, "ready: leader\n".to_owned())).then_some(())
    })
    .await;

    let api: Api<L4Proxy> = Api::namespaced(client.clone(), ns.name());
    create(
        &api,
        "apiVersion: l4proxy.dev/v1alpha1\nkind: L4Proxy\nmetadata: {name: web}\nspec:\n  listeners:\n  - {name: web, address: '127.0.0.1:8080', backends: [{address: '127.0.0.1:9000'}]}\n",
    )
    .await;
    wait_status(&api, "web", "Accepted=True", |p| has_condition(p, "Accepted", "True")).await;
    let (_, metrics) = http_get(port, "/metrics").await.unwrap();
    assert!(metrics.contains("l4proxy_operator_leader 1"), "{metrics}");
    assert!(metrics.contains("l4proxy_operator_writes_total{kind=\"status\"}"), "{metrics}");
    assert!(metrics.contains("l4proxy_operator_reconcile_duration_seconds_count"), "{metrics}");

    // SIGTERM: a clean exit, and the lease is free for the next replica at once.
    let pid = i32::try_from(operator.0.id()).unwrap();
    assert!(Command::new("kill").args(["-TERM", &pid.to_string()]).status().unwrap().success());
    let status = wait_for("the operator to exit", TIMEOUT, || {
        let exited = operator.0.try_wait().unwrap();
        async move { exited }
    })
    .await;
    assert!(status.success(), "{status}");
    let lease = Api::<Lease>::namespaced(client, ns.name()).get("l4proxy-operator").await.unwrap();
    assert_eq!(lease.spec.unwrap().holder_identity, None);
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(log.contains("became leader"), "{log}");
    assert!(!log.contains('\x1b'), "no colour codes in a log that is not a terminal: {log}");
    let _ = std::fs::remove_file(&log_path);
}
