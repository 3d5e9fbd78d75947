//! TCP proxying with real sockets on loopback: forwarding, half-close, idle timeout, limits,
//! failover and ejection, connect timeout, reload, metrics.

mod support;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use l4proxy::Proxy;
use support::*;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

fn listener_yaml(name: &str, backends: &[SocketAddr], extra: &str) -> String {
    let backends: Vec<String> = backends.iter().map(|b| format!("{{address: '{b}'}}")).collect();
    format!("- name: {name}\n  address: 127.0.0.1:0\n  backends: [{}]\n{extra}", backends.join(", "))
}

async fn proxy_to(backends: &[SocketAddr], extra: &str) -> (Arc<Proxy>, SocketAddr) {
    let yaml = format!("admin: {{address: 127.0.0.1:0}}\nlisteners:\n{}", listener_yaml("web", backends, extra));
    let proxy = start_proxy(&yaml).await;
    let address = proxy.listener_address("web").unwrap();
    (proxy, address)
}

async fn metrics_text(proxy: &Proxy) -> String {
    let (status, body) = http_get(proxy.admin_address().unwrap(), "/metrics").await;
    assert_eq!(status, 200);
    body
}

#[tokio::test]
async fn bytes_are_forwarded_both_ways() {
    let echo = Echo::start().await;
    let (_proxy, address) = proxy_to(&[echo.address], "").await;
    let mut stream = TcpStream::connect(address).await.unwrap();
    let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let (mut r, mut w) = stream.split();
    let (_, reply) = tokio::join!(async { w.write_all(&payload).await.unwrap() }, async {
        let mut reply = vec![0; payload.len()];
        r.read_exact(&mut reply).await.unwrap();
        reply
    });
    assert_eq!(reply, payload);
    assert_eq!(echo.accepted(), 1);
}

#[tokio::test]
async fn client_that_half_closes_still_receives_the_whole_reply() {
    // The backend replies only after it sees the client's EOF, then closes.
    let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = server.local_addr().unwrap();
    let reply: Vec<u8> = (0..1_000_000u32).map(|i| (i % 253) as u8).collect();
    let expected = reply.clone();
    tokio::spawn(async move {
        let (mut stream, _) = server.accept().await.unwrap();
        let mut request = Vec::new();
        stream.read_to_end(&mut request).await.unwrap();
        assert_eq!(request, b"whole request");
        stream.write_all(&reply).await.unwrap();
        stream.shutdown().await.unwrap();
    });
    let (_proxy, address) = proxy_to(&[backend], "").await;
    let mut client = TcpStream::connect(address).await.unwrap();
    client.write_all(b"whole request").await.unwrap();
    client.shutdown().await.unwrap();
    assert_eq!(read_to_eof(&mut client).await.unwrap(), expected);
}

#[tokio::test]
async fn idle_connection_is_closed_on_both_legs_after_idle_timeout() {
    let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = server.local_addr().unwrap();
    let (backend_closed_tx, backend_closed) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut stream, _) = server.accept().await.unwrap();
        let mut buf = [0u8; 16];
        let n = stream.read(&mut buf).await.unwrap();
        stream.write_all(&buf[..n]).await.unwrap();
        // Now idle: the next read ends when the proxy closes the backend leg.
        let eof = stream.read(&mut buf).await.map(|n| n == 0).unwrap_or(true);
        let _ = backend_closed_tx.send(eof);
    });
    let (proxy, address) = proxy_to(&[backend], "  limits: {idleTimeout: 300ms}\n").await;
    let started = tokio::time::Instant::now();
    let mut client = echo_through(address).await;
    assert!(read_to_eof(&mut client).await.map(|b| b.is_empty()).unwrap_or(true), "client leg closed");
    assert!(tokio::time::timeout(DEADLINE, backend_closed).await.unwrap().unwrap(), "backend leg closed");
    assert!(started.elapsed() >= Duration::from_millis(300), "not before the idle timeout");
    // Counted once both legs are closed, a moment after the client sees its EOF.
    let idle = r#"l4proxy_connections_closed_total{listener="web",reason="idle_timeout"}"#;
    wait_until_async("the idle close is counted", || async { metric(&metrics_text(&proxy).await, idle) == 1.0 }).await;
}

#[tokio::test]
async fn active_connection_is_not_closed_by_idle_timeout() {
    let echo = Echo::start().await;
    let (_proxy, address) = proxy_to(&[echo.address], "  limits: {idleTimeout: 300ms}\n").await;
    let mut client = echo_through(address).await;
    // Traffic every 100ms for 1s: three times the idle timeout in total, never idle for it.
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(100)).await; // pacing the traffic, not synchronising
        assert_eq!(round_trip(&mut client, b"tick").await, b"tick");
    }
}

#[tokio::test]
async fn connection_over_max_connections_is_closed_at_once_and_counted() {
    let echo = Echo::start().await;
    let (proxy, address) = proxy_to(&[echo.address], "  limits: {maxConnections: 2}\n").await;
    let _first = echo_through(address).await;
    let _second = echo_through(address).await;
    let mut third = TcpStream::connect(address).await.unwrap();
    let _ = third.write_all(b"must not arrive").await;
    let read = read_to_eof(&mut third).await;
    assert!(read.map(|b| b.is_empty()).unwrap_or(true), "the third connection gets no reply");
    assert_eq!(echo.accepted(), 2, "nothing of the rejected connection reaches a backend");
    let stats = proxy.stats();
    assert_eq!(stats.listeners[0].rejected, 1);
    assert_eq!(stats.listeners[0].active, 2);
    let metrics = metrics_text(&proxy).await;
    assert_eq!(metric(&metrics, r#"l4proxy_connections_rejected_total{listener="web",reason="limit"}"#), 1.0);
}

#[tokio::test]
async fn slot_is_freed_when_a_connection_ends() {
    let echo = Echo::start().await;
    let (proxy, address) = proxy_to(&[echo.address], "  limits: {maxConnections: 1}\n").await;
    for _ in 0..3 {
        let mut stream = echo_through(address).await;
        stream.shutdown().await.unwrap();
        read_to_eof(&mut stream).await.unwrap();
        wait_until("the slot is given back", || proxy.stats().listeners[0].active == 0).await;
    }
    assert_eq!(proxy.stats().listeners[0].rejected, 0);
}

#[tokio::test]
async fn refused_backend_is_skipped_for_the_next() {
    let echo = Echo::start().await;
    let dead = refused_address();
    let (proxy, address) = proxy_to(&[dead, echo.address], "").await;
    for _ in 0..4 {
        echo_through(address).await;
    }
    assert_eq!(echo.accepted(), 4);
    let metrics = metrics_text(&proxy).await;
    let failures =
        format!(r#"l4proxy_backend_failures_total{{listener="web",backend="{dead}",reason="connect_failed"}}"#);
    assert!(metric(&metrics, &failures) >= 1.0, "{metrics}");
}

#[tokio::test]
async fn backend_is_ejected_after_three_failures_and_readmitted_after_cooldown() {
    let echo = Echo::start().await;
    let dead = refused_address();
    let (proxy, address) = proxy_to(&[dead, echo.address], "  limits: {ejectionCooldown: 500ms}\n").await;
    // Round robin alternates; each connection that picks `dead` first fails over to `echo`.
    for _ in 0..6 {
        echo_through(address).await;
    }
    let dead_stats = |proxy: &Proxy| {
        let stats = proxy.stats();
        let b = stats.listeners[0].backends.iter().find(|b| b.address == dead.to_string()).unwrap();
        (b.ejected, b.consecutive_failures)
    };
    assert!(dead_stats(&proxy).0, "ejected after three consecutive failures");
    let metrics = metrics_text(&proxy).await;
    assert_eq!(metric(&metrics, &format!(r#"l4proxy_backend_ejected{{listener="web",backend="{dead}"}}"#)), 1.0);
    // While ejected it is not tried: no new failures.
    let failures_before = metric(
        &metrics,
        &format!(r#"l4proxy_backend_failures_total{{listener="web",backend="{dead}",reason="connect_failed"}}"#),
    );
    for _ in 0..4 {
        echo_through(address).await;
    }
    let metrics = metrics_text(&proxy).await;
    assert_eq!(
        metric(
            &metrics,
            &format!(r#"l4proxy_backend_failures_total{{listener="web",backend="{dead}",reason="connect_failed"}}"#)
        ),
        failures_before
    );
    // The backend comes back; after the cooldown it is readmitted and gets traffic again.
    let revived = Echo::start_on(dead).await;
    wait_until("the cooldown ends", || !dead_stats(&proxy).0).await;
    for _ in 0..4 {
        echo_through(address).await;
    }
    assert!(revived.accepted() >= 1, "the readmitted backend gets connections");
}

#[tokio::test]
async fn client_is_closed_and_counted_when_all_backends_are_down() {
    let (proxy, address) = proxy_to(&[refused_address(), refused_address()], "").await;
    let mut client = TcpStream::connect(address).await.unwrap();
    assert!(read_to_eof(&mut client).await.map(|b| b.is_empty()).unwrap_or(true));
    wait_until("the failure is counted", || proxy.stats().listeners[0].closed["connect_failed"] == 1).await;
    // Both backends were tried once each.
    let metrics = metrics_text(&proxy).await;
    assert_eq!(metric(&metrics, r#"l4proxy_connections_closed_total{listener="web",reason="connect_failed"}"#), 1.0);
}

#[tokio::test]
async fn client_is_closed_as_no_backend_when_all_backends_are_ejected() {
    let (proxy, address) = proxy_to(&[refused_address()], "  limits: {ejectionCooldown: 1m}\n").await;
    for _ in 0..3 {
        let mut client = TcpStream::connect(address).await.unwrap();
        let _ = read_to_eof(&mut client).await;
    }
    let mut client = TcpStream::connect(address).await.unwrap();
    let _ = read_to_eof(&mut client).await;
    wait_until("the no-backend close is counted", || proxy.stats().listeners[0].closed["no_backend"] == 1).await;
    assert_eq!(proxy.stats().listeners[0].closed["connect_failed"], 3);
}

#[tokio::test]
async fn backend_over_connect_timeout_is_skipped_for_the_next() {
    let blackhole = Blackhole::start().await;
    let echo = Echo::start().await;
    let (proxy, address) = proxy_to(&[blackhole.address, echo.address], "  limits: {connectTimeout: 200ms}\n").await;
    let started = tokio::time::Instant::now();
    // Round robin's first pick is the first backend: the blackhole.
    echo_through(address).await;
    assert!(started.elapsed() >= Duration::from_millis(200), "waited for the connect timeout");
    let metrics = metrics_text(&proxy).await;
    let series = format!(
        r#"l4proxy_backend_failures_total{{listener="web",backend="{}",reason="connect_timeout"}}"#,
        blackhole.address
    );
    assert_eq!(metric(&metrics, &series), 1.0);
}

#[tokio::test]
async fn reload_keeps_established_connections_and_applies_to_new_ones() {
    let old_backend = Echo::start().await;
    let new_backend = Echo::start().await;
    let yaml = |backend: SocketAddr| {
        format!(
            "admin: {{address: 127.0.0.1:0}}\nlisteners:\n- name: web\n  address: 127.0.0.1:0\n  backends: [{{address: '{backend}'}}]\n"
        )
    };
    let proxy = start_proxy(&yaml(old_backend.address)).await;
    let address = proxy.listener_address("web").unwrap();
    let mut established = echo_through(address).await;

    proxy.apply(config(&yaml(new_backend.address)).await).unwrap();

    assert_eq!(proxy.listener_address("web"), Some(address), "the bound socket is kept");
    assert_eq!(round_trip(&mut established, b"still here").await, b"still here");
    echo_through(address).await;
    assert_eq!(new_backend.accepted(), 1, "new connections use the new backends");
    assert_eq!(old_backend.accepted(), 1);
}

#[tokio::test]
async fn no_connection_is_refused_while_reloading() {
    let echo = Echo::start().await;
    let port = free_port();
    let yaml = |max: u32| {
        format!(
            "listeners:\n- name: web\n  address: 127.0.0.1:{port}\n  backends: [{{address: '{}'}}]\n  limits: {{maxConnections: {max}}}\n",
            echo.address
        )
    };
    let proxy = start_proxy(&yaml(1000)).await;
    let address = proxy.listener_address("web").unwrap();
    let clients = tokio::spawn(async move {
        for _ in 0..200 {
            let mut stream = TcpStream::connect(address).await.expect("never refused during reload");
            assert_eq!(round_trip(&mut stream, b"x").await, b"x");
        }
    });
    for max in 0..20 {
        proxy.apply(config(&yaml(1000 + max)).await).unwrap();
        tokio::task::yield_now().await;
    }
    clients.await.unwrap();
}

#[tokio::test]
async fn reload_adds_and_removes_listeners_and_removed_ones_keep_open_connections() {
    let echo = Echo::start().await;
    let one = format!("listeners:\n{}", listener_yaml("a", &[echo.address], ""));
    let proxy = start_proxy(&one).await;
    let a = proxy.listener_address("a").unwrap();
    let mut on_a = echo_through(a).await;

    let b_port = free_port();
    let two = format!(
        "listeners:\n- name: b\n  address: 127.0.0.1:{b_port}\n  backends: [{{address: '{}'}}]\n",
        echo.address
    );
    proxy.apply(config(&two).await).unwrap();

    let b = proxy.listener_address("b").unwrap();
    echo_through(b).await;
    assert!(proxy.listener_address("a").is_none());
    wait_until_async("listener a stops accepting", || async { TcpStream::connect(a).await.is_err() }).await;
    assert_eq!(round_trip(&mut on_a, b"open connection survives").await, b"open connection survives");
}

#[tokio::test]
async fn reload_that_cannot_bind_changes_nothing() {
    let echo = Echo::start().await;
    let proxy = start_proxy(&format!("listeners:\n{}", listener_yaml("web", &[echo.address], ""))).await;
    let address = proxy.listener_address("web").unwrap();
    let occupied = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let before = proxy.config();
    let bad = format!(
        "listeners:\n{}- name: other\n  address: '{}'\n  backends: [{{address: '{}'}}]\n",
        listener_yaml("web", &[refused_address()], ""),
        occupied.local_addr().unwrap(),
        echo.address
    );
    let error = proxy.apply(config(&bad).await).unwrap_err();
    assert_eq!(error.label(), "bind_failed");
    assert_eq!(*proxy.config(), *before);
    echo_through(address).await; // still the old backend, not the refused one
}

#[tokio::test]
async fn ipv6_listener_and_backend_forward() {
    let echo = Echo::start_on("[::1]:0".parse().unwrap()).await;
    let yaml = format!("listeners:\n- name: v6\n  address: '[::1]:0'\n  backends: [{{address: '{}'}}]\n", echo.address);
    let proxy = start_proxy(&yaml).await;
    let address = proxy.listener_address("v6").unwrap();
    assert!(address.is_ipv6());
    echo_through(address).await;
}

#[tokio::test]
async fn host_name_backend_is_resolved_and_used() {
    let echo = Echo::start().await;
    let yaml = format!(
        "listeners:\n- name: dns\n  address: 127.0.0.1:0\n  backends: [{{address: 'localhost:{}'}}]\n",
        echo.address.port()
    );
    let proxy = start_proxy(&yaml).await;
    echo_through(proxy.listener_address("dns").unwrap()).await;
    assert_eq!(echo.accepted(), 1);
}

#[tokio::test]
async fn admin_endpoints_report_health_stats_config_and_metrics() {
    let echo = Echo::start().await;
    let (proxy, address) = proxy_to(&[echo.address], "  limits: {maxConnections: 7}\n").await;
    let mut stream = echo_through(address).await;
    stream.shutdown().await.unwrap();
    read_to_eof(&mut stream).await.unwrap();
    wait_until("the connection is finished", || proxy.stats().listeners[0].active == 0).await;
    let admin = proxy.admin_address().unwrap();

    assert_eq!(http_get(admin, "/healthz").await.0, 200);
    assert_eq!(http_get(admin, "/readyz").await.0, 200);

    let (status, body) = http_get(admin, "/stats").await;
    assert_eq!(status, 200);
    let stats: serde_json::Value = serde_json::from_str(&body).unwrap();
    let web = &stats["listeners"][0];
    assert_eq!(web["name"], "web");
    assert_eq!(web["protocol"], "TCP");
    assert_eq!(web["active"], 0);
    assert_eq!(web["maxConnections"], 7);
    assert_eq!(web["accepted"], 1);
    assert_eq!(web["rejected"], 0);
    assert_eq!(web["bytesReceived"], 4);
    assert_eq!(web["bytesSent"], 4);
    assert_eq!(web["backends"][0]["address"], echo.address.to_string());
    assert_eq!(web["backends"][0]["ejected"], false);

    let (status, body) = http_get(admin, "/config").await;
    assert_eq!(status, 200);
    let config: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(config["listeners"][0]["limits"]["maxConnections"], 7);
    assert_eq!(config["listeners"][0]["limits"]["idleTimeout"], "5m", "defaults are shown");

    let metrics = metrics_text(&proxy).await;
    for (series, value) in [
        (r#"l4proxy_connections_accepted_total{listener="web"}"#, 1.0),
        (r#"l4proxy_connections_active{listener="web"}"#, 0.0),
        (r#"l4proxy_connections_closed_total{listener="web",reason="completed"}"#, 1.0),
        (r#"l4proxy_bytes_received_total{listener="web"}"#, 4.0),
        (r#"l4proxy_bytes_sent_total{listener="web"}"#, 4.0),
        (r#"l4proxy_connect_duration_seconds_count{listener="web"}"#, 1.0),
        (r#"l4proxy_connection_duration_seconds_count{listener="web"}"#, 1.0),
    ] {
        assert_eq!(metric(&metrics, series), value, "{series} in\n{metrics}");
    }
    let backend = format!(r#"l4proxy_backend_connections_active{{listener="web",backend="{}"}}"#, echo.address);
    assert!(metrics.contains(&backend), "{metrics}");
}

#[tokio::test]
async fn readiness_fails_while_draining() {
    let echo = Echo::start().await;
    let (proxy, address) = proxy_to(&[echo.address], "").await;
    let admin = proxy.admin_address().unwrap();
    let open = echo_through(address).await;
    let draining = tokio::spawn({
        let proxy = proxy.clone();
        async move { proxy.shutdown(DEADLINE).await }
    });
    wait_until("shutdown has begun", || !proxy.is_ready()).await;
    assert_eq!(http_get(admin, "/readyz").await.0, 503);
    drop(open);
    assert_eq!(draining.await.unwrap(), 0, "nothing was cut");
}

#[tokio::test]
async fn shutdown_cuts_connections_left_after_the_drain_period() {
    let echo = Echo::start().await;
    let (proxy, address) = proxy_to(&[echo.address], "").await;
    let mut open = echo_through(address).await;
    let cut = proxy.shutdown(Duration::from_millis(200)).await;
    assert_eq!(cut, 1);
    assert!(read_to_eof(&mut open).await.map(|b| b.is_empty()).unwrap_or(true), "the cut connection is closed");
    assert_eq!(proxy.stats().open_connections, 0);
}

#[tokio::test]
async fn busy_connection_is_closed_on_both_legs_at_max_connection_duration() {
    let echo = Echo::start().await;
    let (proxy, address) = proxy_to(&[echo.address], "  limits: {maxConnectionDuration: 300ms}\n").await;
    let mut stream = echo_through(address).await;
    let opened = tokio::time::Instant::now();
    // Keep it busy: round trips back to back until the proxy closes it.
    let mut buf = [0u8; 4];
    let closed = tokio::time::timeout(DEADLINE, async {
        loop {
            if stream.write_all(b"busy").await.is_err() {
                return;
            }
            match stream.read_exact(&mut buf).await {
                Ok(_) => assert_eq!(&buf, b"busy"),
                Err(_) => return,
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the connection is closed");
    assert!(opened.elapsed() >= Duration::from_millis(250), "not before its time: {:?}", opened.elapsed());
    wait_until("the close is counted", || proxy.stats().listeners[0].closed["max_duration"] == 1).await;
    assert_eq!(proxy.stats().listeners[0].pool_stats.expired_count, 1);
}

#[tokio::test]
async fn readiness_fails_naming_a_listener_whose_accept_loop_died() {
    let echo = Echo::start().await;
    let (proxy, address) = proxy_to(&[echo.address], "").await;
    let admin = proxy.admin_address().unwrap();
    assert_eq!(http_get(admin, "/readyz").await.0, 200);

    break_listening_socket(address);

    wait_until("the listener is reported down", || !proxy.is_ready()).await;
    let (status, body) = http_get(admin, "/readyz").await;
    assert_eq!(status, 503);
    assert!(body.contains("listener web is down") && body.contains("accept loop failed"), "{body}");
    let failures = metric(&metrics_text(&proxy).await, r#"l4proxy_listener_failures_total{listener="web"}"#);
    assert_eq!(failures, 1.0, "counted once");
    assert!(!proxy.stats().ready);
}

/// Reads until the stream ends; the error that ended it, or `None` for a clean EOF.
async fn end_of(stream: &mut TcpStream) -> Option<std::io::ErrorKind> {
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(DEADLINE, stream.read(&mut buf)).await.expect("the stream ends in time") {
            Ok(0) => return None,
            Ok(_) => continue,
            Err(e) => return Some(e.kind()),
        }
    }
}

#[tokio::test]
async fn a_backend_reset_reaches_the_client_as_a_reset() {
    // Asked for something, the backend sends a part and resets the connection (RST, not FIN).
    let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = server.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = server.accept().await {
            let mut request = [0u8; 2];
            let _ = stream.read_exact(&mut request).await;
            let _ = stream.write_all(b"partial").await;
            let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
        }
    });
    let (proxy, address) = proxy_to(&[backend], "").await;
    for _ in 0..20 {
        let mut client = TcpStream::connect(address).await.unwrap();
        client.write_all(b"go").await.unwrap();
        assert_eq!(end_of(&mut client).await, Some(std::io::ErrorKind::ConnectionReset));
    }
    wait_until("every close is counted", || proxy.stats().listeners[0].closed["backend_error"] == 20).await;
}

#[tokio::test]
async fn a_client_reset_reaches_the_backend_as_a_reset() {
    let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = server.local_addr().unwrap();
    let (ends_tx, mut ends) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = server.accept().await {
            let ends_tx = ends_tx.clone();
            tokio::spawn(async move {
                let _ = stream.write_all(b"hello").await;
                let _ = ends_tx.send(end_of(&mut stream).await);
            });
        }
    });
    let (_proxy, address) = proxy_to(&[backend], "").await;
    for _ in 0..20 {
        let mut client = TcpStream::connect(address).await.unwrap();
        let mut hello = [0u8; 5];
        client.read_exact(&mut hello).await.unwrap();
        socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO)).unwrap();
        drop(client);
        let end = tokio::time::timeout(DEADLINE, ends.recv()).await.unwrap().unwrap();
        assert_eq!(end, Some(std::io::ErrorKind::ConnectionReset));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn a_tcp_listener_has_a_socket_per_worker_and_every_one_is_served() {
    let echo = Echo::start().await;
    let (_proxy, address) = proxy_to(&[echo.address], "").await;
    assert_eq!(sockets_bound_at(address, socket2::Type::STREAM), 3, "one SO_REUSEPORT socket per worker");
    // The kernel spreads connections over the sockets by their addresses: with 60 of them,
    // each socket gets some (all but certainly), and one whose worker did not accept would
    // leave its connections unanswered.
    let mut clients = Vec::new();
    for _ in 0..60 {
        clients.push(echo_through(address).await);
    }
    for client in &mut clients {
        assert_eq!(round_trip(client, b"again").await, b"again");
    }
    assert_eq!(echo.accepted(), 60);
}

#[tokio::test]
async fn a_second_proxy_on_a_listeners_address_cannot_bind_it() {
    let echo = Echo::start().await;
    let (_proxy, address) = proxy_to(&[echo.address], "").await;
    let yaml =
        format!("listeners:\n- name: web\n  address: '{address}'\n  backends: [{{address: '{}'}}]\n", echo.address);
    let error =
        Proxy::start(config(&yaml).await, Arc::new(l4proxy::metrics::Metrics::new())).await.err().expect("refused");
    let chain = format!("{:#}", anyhow::Error::from(error));
    assert!(chain.contains(&format!("cannot bind {address}")) && chain.contains("another l4proxy"), "{chain}");
}
