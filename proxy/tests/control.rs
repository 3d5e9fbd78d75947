//! The proxy following a control plane, end to end over real sockets: a config service that
//! speaks the real protocol over TLS (support/control_server.rs), the client of
//! `l4proxy::control`, and traffic through the listeners it pushes. The last tests run the
//! binary.

#[path = "support/control_server.rs"]
mod control_server;
mod support;

use std::{
    net::SocketAddr,
    process::{Command, Stdio},
    sync::Arc,
    time::Duration,
};

use control_server::ControlServer;
use l4proxy::{
    Proxy,
    control::{self, Backoff, Flags, State},
    metrics::Metrics,
};
use serde_json::{Value, json};
use support::*;
use tokio::net::TcpStream;

const BIN: &str = env!("CARGO_BIN_EXE_l4proxy");
const RESOURCE: &str = "shop/db";

/// The flags a proxy following `server` is given (admin on a free port, stats every 100ms).
fn flags(server: &ControlServer) -> Flags {
    Flags {
        control_plane: Some(server.url.clone()),
        resource: Some(RESOURCE.to_owned()),
        token_file: Some(server.token_file.clone()),
        ca_file: Some(server.ca_file.clone()),
        ca_pem: None,
        stats_interval: Some("100ms".to_owned()),
        admin_address: Some("127.0.0.1:0".to_owned()),
    }
}

/// A proxy following `server`, serving `bootstrap` (YAML) until the first push, reconnecting
/// under `backoff` (default: the real policy).
async fn follow_with(server: &ControlServer, bootstrap: Option<&str>, backoff: Option<Backoff>) -> Arc<Proxy> {
    let mut settings = flags(server).check().await.expect("flags are good").expect("--control-plane given");
    if let Some(backoff) = backoff {
        settings.backoff = backoff;
    }
    let bootstrap = match bootstrap {
        Some(yaml) => Some(config(yaml).await),
        None => None,
    };
    let (proxy, _client) = control::start(settings, bootstrap, Arc::new(Metrics::new())).await.expect("proxy starts");
    proxy
}

async fn follow(server: &ControlServer) -> Arc<Proxy> {
    follow_with(server, None, None).await
}

/// A pushed listener, as the operator writes it (the shared schema, camelCase JSON).
fn listener(name: &str, port: u16, backend: SocketAddr) -> Value {
    json!({"name": name, "address": format!("127.0.0.1:{port}"), "backends": [{"address": backend.to_string()}]})
}

fn at(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn state(proxy: &Proxy) -> State {
    proxy.stats().control_plane.expect("a control plane is followed").state
}

#[tokio::test]
async fn pushed_config_is_applied_and_traffic_flows_through_its_listener() {
    let server = ControlServer::start(&temp_dir("control-push")).await;
    let proxy = follow(&server).await;
    let hello = server.stream(0).await.hello;
    assert_eq!((hello.namespace.as_str(), hello.name.as_str()), ("shop", "db"));
    assert_eq!(hello.proxy_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(hello.applied_version, "", "nothing applied yet");

    let echo = Echo::start().await;
    let port = free_port();
    let ack = server.push("v1", "n1", json!([listener("web", port, echo.address)])).await;
    assert!(ack.applied && ack.error.is_empty(), "{ack:?}");
    echo_through(at(port)).await;
    assert_eq!(echo.accepted(), 1);
    assert_eq!(proxy.stats().control_plane.unwrap().applied_version.as_deref(), Some("v1"));
}

#[tokio::test]
async fn readyz_is_503_until_the_first_pushed_config_is_applied_then_200() {
    let server = ControlServer::start(&temp_dir("control-readyz")).await;
    let proxy = follow(&server).await;
    let admin = proxy.admin_address().expect("the admin server runs from the start");
    let (status, body) = http_get(admin, "/readyz").await;
    assert_eq!(status, 503);
    assert!(body.contains("waiting for the first config from the control plane"), "{body}");

    server.stream(0).await;
    assert_eq!(http_get(admin, "/readyz").await.0, 503, "connected is not configured");
    let echo = Echo::start().await;
    assert!(server.push("v1", "n1", json!([listener("web", free_port(), echo.address)])).await.applied);
    assert_eq!(http_get(admin, "/readyz").await, (200, "ready\n".to_owned()));
}

#[tokio::test]
async fn a_bootstrap_config_is_ready_at_once_and_the_first_push_replaces_its_listeners() {
    let server = ControlServer::start(&temp_dir("control-bootstrap")).await;
    let echo = Echo::start().await;
    let (boot, web) = (free_port(), free_port());
    let yaml = format!(
        "admin: {{address: 127.0.0.1:0}}\nlisteners:\n- name: boot\n  address: 127.0.0.1:{boot}\n  backends: [{{address: '{}'}}]\n",
        echo.address
    );
    let proxy = follow_with(&server, Some(&yaml), None).await;
    let admin = proxy.admin_address().unwrap();
    assert_eq!(http_get(admin, "/readyz").await.0, 200, "the bootstrap serves before any push");
    echo_through(at(boot)).await;

    server.stream(0).await;
    assert!(server.push("v1", "n1", json!([listener("web", web, echo.address)])).await.applied);
    echo_through(at(web)).await;
    assert!(TcpStream::connect(at(boot)).await.is_err(), "the bootstrap listener is gone");
    assert_eq!(proxy.admin_address(), Some(admin), "pushes keep the bootstrap's admin server");
}

#[tokio::test]
async fn later_versions_change_backends_add_and_remove_listeners_without_dropping_open_connections() {
    let server = ControlServer::start(&temp_dir("control-versions")).await;
    let _proxy = follow(&server).await;
    server.stream(0).await;
    let (first, second) = (Echo::start().await, Echo::start().await);
    let (web, extra) = (free_port(), free_port());
    assert!(server.push("v1", "n1", json!([listener("web", web, first.address)])).await.applied);
    let mut open = echo_through(at(web)).await;

    let v2 = json!([listener("web", web, second.address), listener("extra", extra, second.address)]);
    assert!(server.push("v2", "n2", v2).await.applied);
    assert_eq!(round_trip(&mut open, b"kept").await, b"kept", "the open connection survives the new backend");
    echo_through(at(web)).await;
    assert_eq!((first.accepted(), second.accepted()), (1, 1), "new connections go to the new backend");
    echo_through(at(extra)).await;

    assert!(server.push("v3", "n3", json!([listener("extra", extra, second.address)])).await.applied);
    assert_eq!(round_trip(&mut open, b"still").await, b"still", "a removed listener's connections run on");
    assert!(TcpStream::connect(at(web)).await.is_err(), "the removed listener stops accepting");
    echo_through(at(extra)).await;
}

#[tokio::test]
async fn a_version_whose_address_is_taken_is_rejected_with_the_reason_and_the_old_config_keeps_serving() {
    let server = ControlServer::start(&temp_dir("control-taken")).await;
    let proxy = follow(&server).await;
    server.stream(0).await;
    let echo = Echo::start().await;
    let web = free_port();
    assert!(server.push("v1", "n1", json!([listener("web", web, echo.address)])).await.applied);
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let _holder = std::net::TcpListener::bind(taken).unwrap();

    let v2 = json!([listener("web", web, echo.address), listener("taken", taken.port(), echo.address)]);
    let ack = server.push("v2", "n2", v2).await;
    assert_eq!((ack.version.as_str(), ack.nonce.as_str(), ack.applied), ("v2", "n2", false));
    assert!(ack.error.contains(&format!("cannot bind {taken}")) && ack.error.contains("in use"), "{}", ack.error);

    echo_through(at(web)).await;
    let stats = proxy.stats().control_plane.unwrap();
    assert_eq!(stats.applied_version.as_deref(), Some("v1"));
    let rejection = stats.last_rejection.expect("the rejection is shown");
    assert_eq!((rejection.version.as_str(), rejection.error.as_str()), ("v2", ack.error.as_str()));
    let metrics = proxy.metrics().encode();
    assert_eq!(metric(&metrics, r#"l4proxy_config_updates_total{result="applied"}"#), 1.0);
    assert_eq!(metric(&metrics, r#"l4proxy_config_updates_total{result="rejected"}"#), 1.0);
}

#[tokio::test]
async fn a_version_with_a_misspelt_field_or_bad_json_is_rejected_naming_the_field() {
    let server = ControlServer::start(&temp_dir("control-typo")).await;
    let proxy = follow(&server).await;
    server.stream(0).await;
    let echo = Echo::start().await;
    let mut web = listener("web", free_port(), echo.address);
    web["limits"] = json!({"maxConection": 5});
    let ack = server.push("v1", "n1", json!([web])).await;
    assert!(!ack.applied);
    assert!(ack.error.starts_with("listeners[0].limits.maxConection:"), "{}", ack.error);

    let ack = server.push("v2", "n2", json!({"listeners": []})).await;
    assert!(!ack.applied && ack.error.starts_with("listeners:"), "{}", ack.error);
    let ack = server.push("v3", "n3", json!([{"name": "Web", "address": "127.0.0.1:1", "backends": []}])).await;
    assert!(!ack.applied && ack.error.starts_with("listeners[0].name:"), "{}", ack.error);
    assert!(proxy.readiness().is_err(), "nothing applied: still waiting for a config");
}

#[tokio::test]
async fn every_update_is_acked_with_its_own_version_and_nonce_even_a_repeated_version() {
    let server = ControlServer::start(&temp_dir("control-acks")).await;
    let _proxy = follow(&server).await;
    server.stream(0).await;
    let echo = Echo::start().await;
    let listeners = json!([listener("web", free_port(), echo.address)]);
    for (version, nonce) in [("v1", "a"), ("v1", "b"), ("v2", "c")] {
        let ack = server.push(version, nonce, listeners.clone()).await;
        assert_eq!((ack.version.as_str(), ack.nonce.as_str(), ack.applied), (version, nonce, true), "{ack:?}");
    }
    let acks: Vec<_> = server.seen(0).acks().map(|a| a.nonce.clone()).collect();
    assert_eq!(acks, ["a", "b", "c"], "one Ack per update, in order");
}

#[tokio::test]
async fn stats_reports_arrive_every_interval_with_the_listeners_pool_stats_and_counters() {
    let server = ControlServer::start(&temp_dir("control-stats")).await;
    let _proxy = follow(&server).await;
    server.stream(0).await;
    let echo = Echo::start().await;
    let port = free_port();
    let mut web = listener("web", port, echo.address);
    web["limits"] = json!({"maxConnections": 50});
    assert!(server.push("v1", "n1", json!([web])).await.applied);
    let _open = echo_through(at(port)).await;

    let report = server
        .wait_for(0, "a report with the open connection", |seen| {
            seen.stats().find(|r| r.listeners.first().is_some_and(|l| l.active == 1)).cloned()
        })
        .await;
    assert_eq!(report.applied_version, "v1");
    let web = &report.listeners[0];
    assert_eq!((web.name.as_str(), web.accepted, web.rejected), ("web", 1, 0));
    assert_eq!((web.bytes_received, web.bytes_sent), (4, 4), "one 4-byte round trip");
    let pool = web.pool_stats.expect("pool stats");
    assert_eq!((pool.size, pool.max_size, pool.expired_count), (1, 50, 0));
    assert!(pool.average_age_seconds >= 0.0);
    // Every 100ms: more keep coming while the stream is open.
    let seen = server.seen(0).stats().count();
    server.wait_for(0, "three more reports", |s| (s.stats().count() >= seen + 3).then_some(())).await;
}

#[tokio::test]
async fn when_the_server_goes_away_the_proxy_keeps_serving_and_reconnects_with_its_applied_version() {
    let mut server = ControlServer::start(&temp_dir("control-away")).await;
    let proxy = follow(&server).await;
    server.stream(0).await;
    let echo = Echo::start().await;
    let port = free_port();
    assert!(server.push("v1", "n1", json!([listener("web", port, echo.address)])).await.applied);
    let mut open = echo_through(at(port)).await;
    let admin = proxy.admin_address().unwrap();
    wait_until("the proxy says it is connected", || state(&proxy) == State::Connected).await;

    server.stop().await;
    wait_until("the proxy says it is disconnected", || state(&proxy) == State::Disconnected).await;
    assert_eq!(round_trip(&mut open, b"kept").await, b"kept");
    echo_through(at(port)).await;
    assert_eq!(http_get(admin, "/readyz").await.0, 200, "the last good config serves on");
    let metrics = http_get(admin, "/metrics").await.1;
    assert_eq!(metric(&metrics, "l4proxy_control_plane_connected"), 0.0);
    let stats: Value = serde_json::from_str(&http_get(admin, "/stats").await.1).unwrap();
    assert_eq!(stats["controlPlane"]["state"], "disconnected", "{stats}");
    assert_eq!(stats["controlPlane"]["appliedVersion"], "v1", "{stats}");
    assert!(stats["controlPlane"]["lastError"].is_string(), "{stats}");

    server.restart().await;
    let hello = server.stream(1).await.hello;
    assert_eq!(hello.applied_version, "v1", "the Hello says what serves");
    wait_until("the proxy says it is connected again", || state(&proxy) == State::Connected).await;
    assert_eq!(metric(&proxy.metrics().encode(), "l4proxy_control_plane_connected"), 1.0);
    assert!(server.push("v1", "n2", json!([listener("web", port, echo.address)])).await.applied);
    assert_eq!(round_trip(&mut open, b"still").await, b"still");
}

#[tokio::test]
async fn a_clean_close_by_the_server_reconnects_at_once() {
    let server = ControlServer::start(&temp_dir("control-clean")).await;
    // Any failure would wait an hour: only a reconnect without backoff passes.
    let hour = Duration::from_secs(3600);
    let _proxy = follow_with(&server, None, Some(Backoff { initial: hour, max: hour })).await;
    server.stream(0).await;
    server.close_cleanly();
    server.stream(1).await;
    server.close_cleanly();
    server.stream(2).await;
}

#[tokio::test]
async fn a_rotated_token_is_read_from_the_file_for_the_next_stream() {
    let server = ControlServer::start(&temp_dir("control-token")).await;
    let _proxy = follow(&server).await;
    assert_eq!(server.stream(0).await.token, "Bearer first-token");
    server.rotate_token("second-token");
    server.close_cleanly();
    assert_eq!(server.stream(1).await.token, "Bearer second-token");
}

/// `l4proxy run` with `args`, and what it wrote; it must exit by itself.
fn run_binary(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(BIN).arg("run").args(args).output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn bad_control_plane_flags_exit_64_naming_the_flag_and_value_before_binding() {
    let dir = temp_dir("control-flags");
    let server = ControlServer::start(&dir).await;
    let (token, ca) = (server.token_file.to_str().unwrap(), server.ca_file.to_str().unwrap());
    let not_pem = dir.join("not-a-ca.pem");
    std::fs::write(&not_pem, "hello\n").unwrap();
    let not_pem = not_pem.to_str().unwrap();
    let good = |url: &str, resource: &str, token: &str, ca: &str| {
        ["--control-plane", url, "--resource", resource, "--token-file", token, "--ca-file", ca].map(str::to_owned)
    };
    let url = server.url.as_str();
    let cases: Vec<(Vec<String>, [&str; 2])> = vec![
        (good("http://127.0.0.1:1", RESOURCE, token, ca).to_vec(), ["--control-plane", "http://127.0.0.1:1"]),
        (good(url, "db", token, ca).to_vec(), ["--resource", "\"db\""]),
        (good(url, RESOURCE, "/nonexistent/token", ca).to_vec(), ["--token-file", "/nonexistent/token"]),
        (good(url, RESOURCE, token, "/nonexistent/ca.crt").to_vec(), ["--ca-file", "/nonexistent/ca.crt"]),
        (good(url, RESOURCE, token, not_pem).to_vec(), ["--ca-file", not_pem]),
        (vec!["--control-plane".into(), url.into()], ["--resource", "required"]),
        (
            [&good(url, RESOURCE, token, ca)[..], &["--stats-interval".into(), "0s".into()]].concat(),
            ["--stats-interval", "0s"],
        ),
        (
            [&good(url, RESOURCE, token, ca)[..], &["--admin-address".into(), "nowhere".into()]].concat(),
            ["--admin-address", "nowhere"],
        ),
        (vec!["--resource".into(), RESOURCE.into()], ["--resource", "only used with --control-plane"]),
    ];
    for (args, [flag, value]) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, stdout, stderr) = run_binary(&args);
        assert_eq!(code, Some(64), "{args:?}: {stderr}");
        assert!(stderr.contains(flag) && stderr.contains(value), "{args:?} must name {flag} and {value}: {stderr}");
        assert!(!stdout.contains("listening"), "{args:?}: nothing was bound: {stdout}");
    }
    assert_eq!(server.count(), 0, "no stream was opened");
}

/// A child process killed on drop.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn run_follows_the_control_plane_named_in_environment_variables_and_drains_on_sigterm() {
    let dir = temp_dir("control-env");
    let server = ControlServer::start(&dir).await;
    let admin = at(free_port());
    let log = dir.join("l4proxy.log");
    let mut child = Child(
        Command::new(BIN)
            .args(["--log-format", "json", "run"])
            .env("L4PROXY_CONTROL_PLANE", &server.url)
            .env("L4PROXY_RESOURCE", RESOURCE)
            .env("L4PROXY_TOKEN_FILE", &server.token_file)
            .env("L4PROXY_CA_FILE", &server.ca_file)
            .env("L4PROXY_STATS_INTERVAL", "100ms")
            .env("L4PROXY_ADMIN_ADDRESS", admin.to_string())
            .env("POD_NAMESPACE", "shop")
            .env("POD_NAME", "web-0")
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let read_log = || std::fs::read_to_string(&log).unwrap();
    let hello = server.stream(0).await.hello;
    assert_eq!(hello.proxy, "shop/web-0", "identity from POD_NAMESPACE/POD_NAME");
    assert_eq!((hello.namespace.as_str(), hello.name.as_str()), ("shop", "db"));
    wait_until_async("the admin server answers", || async { TcpStream::connect(admin).await.is_ok() }).await;
    assert_eq!(http_get(admin, "/readyz").await.0, 503);

    let echo = Echo::start().await;
    let port = free_port();
    assert!(server.push("v1", "n1", json!([listener("web", port, echo.address)])).await.applied);
    echo_through(at(port)).await;
    assert_eq!(http_get(admin, "/readyz").await.0, 200);
    server.wait_for(0, "a stats report of v1", |s| s.stats().find(|r| r.applied_version == "v1").map(drop)).await;
    wait_until("the connection and the push are logged", || {
        let log = read_log();
        log.contains("control plane connected") && log.contains("pushed config applied")
    })
    .await;

    let status = Command::new("kill").args(["-TERM", &child.0.id().to_string()]).status().unwrap();
    assert!(status.success());
    let mut exit = None;
    wait_until("the proxy exits", || {
        exit = child.0.try_wait().unwrap();
        exit.is_some()
    })
    .await;
    assert!(exit.unwrap().success(), "{}", read_log());
    server.wait_for(0, "the proxy's side of the stream ends", |s| (!s.open).then_some(())).await;
}
