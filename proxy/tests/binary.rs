//! The `l4proxy` binary as users run it: exit codes, signals, reload from the file.

mod support;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
};

use support::*;
use tokio::net::TcpStream;

const BIN: &str = env!("CARGO_BIN_EXE_l4proxy");

/// A running `l4proxy run`, killed on drop; its stdout (JSON logs) goes to a file.
struct Running {
    child: Child,
    log: PathBuf,
    admin: SocketAddr,
}

impl Running {
    async fn start(dir: &Path, config: &Path, extra: &[&str], admin: SocketAddr) -> Self {
        Self::start_under(&[], dir, config, extra, admin).await
    }

    /// Like [`Self::start`], run by `wrapper` (e.g. `prlimit --nofile=256:256`).
    async fn start_under(wrapper: &[&str], dir: &Path, config: &Path, extra: &[&str], admin: SocketAddr) -> Self {
        let log = dir.join("l4proxy.log");
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg(BIN);
                command
            }
            None => Command::new(BIN),
        };
        let child = command
            .args(["--log-format", "json", "run", "--config"])
            .arg(config)
            .args(extra)
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start l4proxy");
        let mut running = Self { child, log, admin };
        // Ready only once every listener is bound: the admin server may answer 503 before that.
        // A proxy that exits instead (e.g. a port already taken) fails the test with its log.
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            if let Some(status) = running.child.try_wait().unwrap() {
                panic!("l4proxy exited during start-up ({status}):\n{}", running.log());
            }
            if TcpStream::connect(admin).await.is_ok() && http_get(admin, "/readyz").await.0 == 200 {
                return running;
            }
            assert!(tokio::time::Instant::now() < deadline, "l4proxy not ready in time:\n{}", running.log());
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill").args([&format!("-{name}"), &self.child.id().to_string()]).status().unwrap();
        assert!(status.success(), "kill -{name}");
    }

    async fn wait_exit(&mut self) -> ExitStatus {
        let mut status = None;
        wait_until("the proxy exits", || {
            status = self.child.try_wait().unwrap();
            status.is_some()
        })
        .await;
        status.unwrap()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap()
    }

    async fn metrics(&self) -> String {
        http_get(self.admin, "/metrics").await.1
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn write_config(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("config.yaml");
    // Write then rename, so the file watcher never reads half a file.
    let tmp = dir.join("config.yaml.tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    path
}

fn listener(name: &str, port: u16, backend: SocketAddr) -> String {
    format!("- name: {name}\n  address: 127.0.0.1:{port}\n  backends: [{{address: '{backend}'}}]\n")
}

/// A running proxy with one listener, "web", in front of an echo server; returns the proxy, the
/// echo server and the listener's address.
async fn proxy_with_one_listener(test: &str, extra: &[&str]) -> (Running, Echo, SocketAddr) {
    let dir = temp_dir(test);
    let echo = Echo::start().await;
    let (port, admin) = (free_port(), free_port());
    let config = write_config(
        &dir,
        &format!("admin: {{address: 127.0.0.1:{admin}}}\nlisteners:\n{}", listener("web", port, echo.address)),
    );
    let admin: SocketAddr = format!("127.0.0.1:{admin}").parse().unwrap();
    let proxy = Running::start(&dir, &config, extra, admin).await;
    (proxy, echo, format!("127.0.0.1:{port}").parse().unwrap())
}

fn check(config: &Path) -> Output {
    Command::new(BIN).args(["check", "--config"]).arg(config).output().unwrap()
}

#[test]
fn check_accepts_the_quickstart_example() {
    let quickstart = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/quickstart.yaml");
    let out = check(&quickstart);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn check_rejects_a_typo_with_the_field_path_and_exit_code_64() {
    let dir = temp_dir("typo");
    let config = write_config(
        &dir,
        "listeners:\n- name: web\n  address: 127.0.0.1:8080\n  backends: [{address: 127.0.0.1:9000}]\n  limits: {maxConection: 10}\n",
    );
    let out = check(&config);
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("listeners[0].limits.maxConection"), "{stderr}");
}

#[test]
fn run_with_a_bad_value_exits_64_naming_field_and_value_before_binding() {
    let dir = temp_dir("badvalue");
    let port = free_port();
    let config = write_config(
        &dir,
        &format!(
            "listeners:\n- name: web\n  address: 127.0.0.1:{port}\n  backends: [{{address: '127.0.0.1:9000'}}, {{address: 'db:port'}}]\n"
        ),
    );
    let out = Command::new(BIN).args(["run", "--config"]).arg(&config).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("listeners[0].backends[1].address") && stderr.contains("db:port"), "{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("listening"), "nothing was bound: {stdout}");
}

#[test]
fn check_refuses_a_duration_beyond_720h_naming_the_field_with_exit_code_64() {
    let dir = temp_dir("duration");
    let config = write_config(
        &dir,
        "listeners:\n- name: web\n  address: 127.0.0.1:8080\n  backends: [{address: 127.0.0.1:9000}]\n  limits: {idleTimeout: 18446744073709551615s}\n",
    );
    let out = check(&config);
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("listeners[0].limits.idleTimeout") && stderr.contains("at most 720h"), "{stderr}");
}

#[test]
fn check_refuses_hostile_nesting_and_size_before_parsing_naming_the_limit() {
    let dir = temp_dir("nesting");
    let nested = format!("listeners: {}{}\n", "[".repeat(100_000), "]".repeat(100_000));
    let out = check(&write_config(&dir, &nested));
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("nested deeper than 32"), "{stderr}");

    let huge = format!("# {}\nlisteners: []\n", "x".repeat(9 << 20));
    let out = check(&write_config(&dir, &huge));
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("larger than the 8 MiB"), "{stderr}");
}

#[test]
fn run_with_a_missing_file_exits_64_naming_it() {
    let out = Command::new(BIN).args(["run", "--config", "/nonexistent/l4proxy.yaml"]).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/l4proxy.yaml"));
}

#[tokio::test]
async fn sigterm_stops_accepting_lets_open_connections_finish_and_exits_zero() {
    let (mut proxy, _echo, address) = proxy_with_one_listener("sigterm", &[]).await;
    let mut open = echo_through(address).await;

    proxy.signal("TERM");
    wait_until_async("new connections are refused", || async { TcpStream::connect(address).await.is_err() }).await;
    assert_eq!(round_trip(&mut open, b"still served").await, b"still served");
    assert!(proxy.child.try_wait().unwrap().is_none(), "waits for the open connection");
    drop(open);
    assert!(proxy.wait_exit().await.success());
    assert!(proxy.log().contains(r#""cut":0"#), "{}", proxy.log());
}

#[tokio::test]
async fn sigterm_cuts_connections_still_open_after_the_drain_timeout() {
    let (mut proxy, _echo, address) = proxy_with_one_listener("drain", &["--drain-timeout", "300ms"]).await;
    let mut open = echo_through(address).await;

    proxy.signal("TERM");
    assert!(read_to_eof(&mut open).await.map(|b| b.is_empty()).unwrap_or(true), "cut after the drain timeout");
    assert!(proxy.wait_exit().await.success());
    assert!(proxy.log().contains(r#""cut":1"#), "{}", proxy.log());
}

#[tokio::test]
async fn sighup_reload_adds_a_listener_without_dropping_open_connections() {
    let dir = temp_dir("sighup");
    let echo = Echo::start().await;
    let (a, b, admin) = (free_port(), free_port(), free_port());
    let head = format!("admin: {{address: 127.0.0.1:{admin}}}\nlisteners:\n");
    let config = write_config(&dir, &format!("{head}{}", listener("a", a, echo.address)));
    let admin: SocketAddr = format!("127.0.0.1:{admin}").parse().unwrap();
    // A long watch interval: this test is about SIGHUP, not the file watcher.
    let proxy = Running::start(&dir, &config, &["--watch-interval", "1h"], admin).await;
    let mut open = echo_through(format!("127.0.0.1:{a}").parse().unwrap()).await;

    write_config(&dir, &format!("{head}{}{}", listener("a", a, echo.address), listener("b", b, echo.address)));
    proxy.signal("HUP");
    let b_address: SocketAddr = format!("127.0.0.1:{b}").parse().unwrap();
    wait_until_async("listener b accepts", || async { TcpStream::connect(b_address).await.is_ok() }).await;
    echo_through(b_address).await;
    assert_eq!(round_trip(&mut open, b"kept").await, b"kept");
    // Counted just after the new listener starts accepting: wait for it rather than race it.
    let success = r#"l4proxy_config_reloads_total{result="success"}"#;
    wait_until_async("the reload is counted", || async { metric(&proxy.metrics().await, success) == 1.0 }).await;
}

#[tokio::test]
async fn changed_file_is_reloaded_and_an_invalid_one_changes_nothing_and_is_counted() {
    let dir = temp_dir("watch");
    let echo = Echo::start().await;
    let (a, b, admin) = (free_port(), free_port(), free_port());
    let head = format!("admin: {{address: 127.0.0.1:{admin}}}\nlisteners:\n");
    let config = write_config(&dir, &format!("{head}{}", listener("a", a, echo.address)));
    let admin: SocketAddr = format!("127.0.0.1:{admin}").parse().unwrap();
    let proxy = Running::start(&dir, &config, &["--watch-interval", "50ms"], admin).await;
    let a_address: SocketAddr = format!("127.0.0.1:{a}").parse().unwrap();

    write_config(&dir, &format!("{head}{}  limits: {{maxConections: 5}}\n", listener("a", a, echo.address)));
    let failure = r#"l4proxy_config_reloads_total{result="failure"}"#;
    wait_until_async("the bad file is counted", || async { metric(&proxy.metrics().await, failure) == 1.0 }).await;
    // The log line goes through the writer thread: wait for it rather than race it.
    wait_until("the rejection is logged with the field path", || {
        proxy.log().contains("listeners[0].limits.maxConections")
    })
    .await;
    echo_through(a_address).await;

    write_config(&dir, &format!("{head}{}{}", listener("a", a, echo.address), listener("b", b, echo.address)));
    let b_address: SocketAddr = format!("127.0.0.1:{b}").parse().unwrap();
    wait_until_async("listener b accepts", || async { TcpStream::connect(b_address).await.is_ok() }).await;
    echo_through(b_address).await;
    echo_through(a_address).await;
}

#[tokio::test]
async fn sigterm_right_after_the_reload_of_a_hostile_file_exits_at_once() {
    let (mut proxy, _echo, _address) = proxy_with_one_listener("hostile", &["--watch-interval", "1h"]).await;
    let dir = proxy.log.parent().unwrap().to_owned();
    // 300 KB of nested flow sequences: 65 s of parsing before nesting was bounded.
    write_config(&dir, &format!("listeners: {}{}\n", "[".repeat(150_000), "]".repeat(150_000)));
    proxy.signal("HUP");
    wait_until("the reload has begun", || proxy.log().contains("reloading the config")).await;
    proxy.signal("TERM");
    assert!(proxy.wait_exit().await.success(), "{}", proxy.log());
}

#[tokio::test]
async fn start_warns_when_the_limits_need_more_descriptors_than_the_process_may_open() {
    let dir = temp_dir("nofile");
    let echo = Echo::start().await;
    let (port, admin) = (free_port(), free_port());
    let config = write_config(
        &dir,
        &format!(
            "admin: {{address: 127.0.0.1:{admin}}}\nlisteners:\n{}  limits: {{maxConnections: 10000}}\n",
            listener("web", port, echo.address)
        ),
    );
    let admin: SocketAddr = format!("127.0.0.1:{admin}").parse().unwrap();
    let proxy = Running::start_under(&["prlimit", "--nofile=256:256"], &dir, &config, &[], admin).await;
    wait_until("the descriptor warning is logged", || proxy.log().contains("need more file descriptors")).await;
    let line = proxy.log().lines().find(|l| l.contains("need more file descriptors")).unwrap().to_owned();
    let line: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!((line["limit"].as_u64(), line["needed"].as_u64()), (Some(256), Some(20_128)), "{line}");
    echo_through(format!("127.0.0.1:{port}").parse().unwrap()).await;
}

#[tokio::test]
async fn access_log_has_one_line_per_closed_connection() {
    let (proxy, echo, address) = proxy_with_one_listener("access", &[]).await;
    for _ in 0..3 {
        let stream = echo_through(address).await;
        drop(stream);
    }
    let lines =
        || proxy.log().lines().filter(|l| l.contains("connection closed")).map(str::to_owned).collect::<Vec<_>>();
    wait_until("three access-log lines", || lines().len() == 3).await;
    let line: serde_json::Value = serde_json::from_str(&lines()[0]).unwrap();
    assert_eq!(line["target"], "l4proxy::access");
    assert_eq!(line["listener"], "web");
    assert_eq!(line["backend"], echo.address.to_string());
    assert_eq!(line["bytes_received"], 4);
    assert_eq!(line["bytes_sent"], 4);
    assert!(line["source"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert!(line["duration_ms"].is_u64());
    assert!(line["reason"].is_string());
}

#[tokio::test]
async fn run_without_config_serves_the_embedded_quickstart() {
    // The quickstart uses its documented fixed ports, 8080 and 9901.
    for port in [8080, 9901] {
        assert!(std::net::TcpListener::bind(("127.0.0.1", port)).is_ok(), "port {port} must be free for this test");
    }
    let mut child = Command::new(BIN).arg("run").stdout(Stdio::null()).spawn().unwrap();
    let admin: SocketAddr = "127.0.0.1:9901".parse().unwrap();
    wait_until_async("the quickstart is up", || async { TcpStream::connect(admin).await.is_ok() }).await;
    let (status, body) = http_get("127.0.0.1:8080".parse().unwrap(), "/stats").await;
    assert_eq!(status, 200, "the quickstart listener forwards to the admin server");
    assert!(body.contains(r#""name":"web""#), "{body}");
    let _ = child.kill();
    let _ = child.wait();
}
