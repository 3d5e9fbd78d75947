//! UDP sessions with real sockets on loopback: per-client replies, limits, idle expiry, reload.

mod support;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use l4proxy::Proxy;
use support::*;
use tokio::net::UdpSocket;

fn udp_yaml(backends: &[SocketAddr], limits: &str) -> String {
    let backends: Vec<String> = backends.iter().map(|b| format!("{{address: '{b}'}}")).collect();
    format!(
        "admin: {{address: 127.0.0.1:0}}\nlisteners:\n- name: dns\n  protocol: UDP\n  address: 127.0.0.1:0\n  backends: [{}]\n  limits: {{{limits}}}\n",
        backends.join(", ")
    )
}

async fn udp_proxy(backends: &[SocketAddr], limits: &str) -> (Arc<Proxy>, SocketAddr) {
    let proxy = start_proxy(&udp_yaml(backends, limits)).await;
    let address = proxy.listener_address("dns").unwrap();
    (proxy, address)
}

/// Sends `payload` and waits for one reply.
async fn exchange(client: &UdpSocket, proxy: SocketAddr, payload: &[u8]) -> Option<Vec<u8>> {
    client.send_to(payload, proxy).await.unwrap();
    let mut buf = vec![0u8; 65_536];
    match tokio::time::timeout(Duration::from_millis(500), client.recv_from(&mut buf)).await {
        Ok(Ok((n, from))) => {
            assert_eq!(from, proxy, "replies leave from the address the client sent to");
            Some(buf[..n].to_vec())
        }
        _ => None,
    }
}

async fn client() -> UdpSocket {
    UdpSocket::bind("127.0.0.1:0").await.unwrap()
}

// Two workers: two receive loops drain the listener in parallel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_udp_clients_each_get_their_own_replies() {
    let echo = udp_echo().await;
    let (proxy, address) = udp_proxy(&[echo], "").await;
    let mut clients = Vec::new();
    for i in 0..50 {
        clients.push(tokio::spawn(async move {
            let socket = client().await;
            let mut upstream_ports = Vec::new();
            for round in 0..3 {
                let payload = format!("client {i} round {round}");
                let reply = exchange(&socket, address, payload.as_bytes()).await.expect("a reply");
                let reply = String::from_utf8(reply).unwrap();
                let (port, echoed) = reply.split_once(':').unwrap();
                assert_eq!(echoed, payload, "each client gets its own replies");
                upstream_ports.push(port.to_owned());
            }
            upstream_ports.dedup();
            assert_eq!(upstream_ports.len(), 1, "one session (one upstream socket) per client");
        }));
    }
    for c in clients {
        c.await.unwrap();
    }
    // A reply is counted just after it is sent: wait for the last count rather than race it.
    let counts = |proxy: &Proxy| {
        let stats = proxy.stats();
        let udp = stats.listeners[0].udp.as_ref().map(|u| (u.datagrams_received, u.datagrams_sent));
        (stats.listeners[0].pool_stats.size, stats.listeners[0].accepted, udp)
    };
    wait_until("every datagram is counted", || counts(&proxy) == (50, 50, Some((150, 150)))).await;
}

#[tokio::test]
async fn idle_udp_session_expires_after_idle_timeout() {
    let echo = udp_echo().await;
    let (proxy, address) = udp_proxy(&[echo], "idleTimeout: 200ms").await;
    let socket = client().await;
    let first = exchange(&socket, address, b"one").await.unwrap();
    wait_until("the session expires", || proxy.stats().listeners[0].pool_stats.expired_count == 1).await;
    assert_eq!(proxy.stats().listeners[0].pool_stats.size, 0);
    let second = exchange(&socket, address, b"two").await.unwrap();
    let port = |r: &[u8]| String::from_utf8_lossy(r).split_once(':').unwrap().0.to_owned();
    assert_ne!(port(&first), port(&second), "a new session has a new upstream socket");
    // The session's task counts its close as it ends, just after the pool expired it.
    let idle = r#"l4proxy_connections_closed_total{listener="dns",reason="idle_timeout"}"#;
    let admin = proxy.admin_address().unwrap();
    wait_until_async("the idle close is counted", || async {
        metric(&http_get(admin, "/metrics").await.1, idle) == 1.0
    })
    .await;
}

#[tokio::test]
async fn datagrams_from_new_clients_beyond_the_session_limit_are_dropped_and_counted() {
    let echo = udp_echo().await;
    let (proxy, address) = udp_proxy(&[echo], "maxConnections: 2").await;
    let (a, b, c) = (client().await, client().await, client().await);
    assert!(exchange(&a, address, b"a").await.is_some());
    assert!(exchange(&b, address, b"b").await.is_some());
    assert!(exchange(&c, address, b"c").await.is_none(), "the third client gets no session");
    assert!(exchange(&a, address, b"a again").await.is_some(), "existing sessions keep working");
    let stats = proxy.stats();
    let dns = &stats.listeners[0];
    assert_eq!(dns.udp.as_ref().unwrap().dropped["limit"], 1);
    assert_eq!(dns.pool_stats.rejected_inserts, 1);
    let (_, metrics) = http_get(proxy.admin_address().unwrap(), "/metrics").await;
    assert_eq!(metric(&metrics, r#"l4proxy_datagrams_dropped_total{listener="dns",reason="limit"}"#), 1.0);
}

#[tokio::test]
async fn udp_sessions_survive_a_reload_that_keeps_their_backend() {
    let echo = udp_echo().await;
    let other = udp_echo().await;
    let port = free_port();
    let yaml = |backends: &[SocketAddr], max: u32| {
        let backends: Vec<String> = backends.iter().map(|b| format!("{{address: '{b}'}}")).collect();
        format!(
            "listeners:\n- name: dns\n  protocol: UDP\n  address: 127.0.0.1:{port}\n  backends: [{}]\n  limits: {{maxConnections: {max}}}\n",
            backends.join(", ")
        )
    };
    let proxy = start_proxy(&yaml(&[echo], 10)).await;
    let address = proxy.listener_address("dns").unwrap();
    let socket = client().await;
    let before = exchange(&socket, address, b"before").await.unwrap();

    proxy.apply(config(&yaml(&[echo, other], 20)).await).unwrap();

    let after = exchange(&socket, address, b"after").await.unwrap();
    let port_of = |r: &[u8]| String::from_utf8_lossy(r).split_once(':').unwrap().0.to_owned();
    assert_eq!(port_of(&before), port_of(&after), "the same session, the same upstream socket");
    assert_eq!(proxy.stats().listeners[0].pool_stats.max_size, 20);
    assert_eq!(proxy.stats().listeners[0].accepted, 1);

    // A reload that removes the session's backend ends the session.
    proxy.apply(config(&yaml(&[other], 20)).await).unwrap();
    assert_eq!(proxy.stats().listeners[0].pool_stats.size, 0);
    let moved = exchange(&socket, address, b"moved").await.unwrap();
    assert_ne!(port_of(&moved), port_of(&before));
}

#[tokio::test]
async fn udp_listener_reports_pool_stats_in_stats_json() {
    let echo = udp_echo().await;
    let (proxy, address) = udp_proxy(&[echo], "maxConnections: 64").await;
    let socket = client().await;
    exchange(&socket, address, b"hello").await.unwrap();
    let (status, body) = http_get(proxy.admin_address().unwrap(), "/stats").await;
    assert_eq!(status, 200);
    let stats: serde_json::Value = serde_json::from_str(&body).unwrap();
    let dns = &stats["listeners"][0];
    assert_eq!(dns["protocol"], "UDP");
    assert_eq!(dns["poolStats"]["size"], 1);
    assert_eq!(dns["poolStats"]["maxSize"], 64);
    assert_eq!(dns["poolStats"]["expiredCount"], 0);
    assert!(dns["poolStats"]["averageAgeSeconds"].is_number());
    assert_eq!(dns["udp"]["datagramsReceived"], 1);
    assert_eq!(dns["bytesReceived"], 5);
}

#[tokio::test]
async fn busy_udp_session_ends_at_max_connection_duration_and_the_next_datagram_starts_another() {
    let echo = udp_echo().await;
    let (proxy, address) = udp_proxy(&[echo], "maxConnectionDuration: 300ms, idleTimeout: 1m").await;
    let socket = client().await;
    let first = exchange(&socket, address, b"first").await.expect("a reply");
    let port_of = |r: &[u8]| String::from_utf8_lossy(r).split_once(':').unwrap().0.to_owned();
    // Busy all along: a datagram every round trip, until the session is ended for its age.
    wait_until_async("the session ends for its age", || async {
        exchange(&socket, address, b"busy").await;
        proxy.stats().listeners[0].closed["max_duration"] == 1
    })
    .await;
    let next = exchange(&socket, address, b"next").await.expect("a reply from a new session");
    assert_ne!(port_of(&first), port_of(&next), "a new session, a new upstream socket");
    assert_eq!(proxy.stats().listeners[0].accepted, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_from_500_new_clients_is_held_by_the_receive_buffer_and_none_is_lost() {
    let rmem_max: usize = std::fs::read_to_string("/proc/sys/net/core/rmem_max").unwrap().trim().parse().unwrap();
    assert!(
        rmem_max >= 512 << 10,
        "this test needs net.core.rmem_max >= 512 KiB for the default buffer, not {rmem_max}"
    );
    // 500 client sockets and 500 session sockets: more than a default soft limit of 1024.
    rlimit::increase_nofile_limit(4096).unwrap();
    let echo = udp_echo().await;
    let (proxy, address) = udp_proxy(&[echo], "maxConnections: 1000").await;
    let clients: Vec<std::net::UdpSocket> =
        (0..500).map(|_| std::net::UdpSocket::bind("127.0.0.1:0").unwrap()).collect();
    // All at once: the datagrams wait in the listener's receive buffer while sessions are set up.
    for client in &clients {
        client.send_to(&[7u8; 64], address).unwrap();
    }
    let received = || proxy.stats().listeners[0].udp.as_ref().unwrap().datagrams_received;
    wait_until("every datagram is read", || received() == 500).await;
    assert_eq!(proxy.stats().listeners[0].udp.as_ref().unwrap().kernel_drops, 0);
    assert_eq!(proxy.stats().listeners[0].accepted, 500);
    let (_, metrics) = http_get(proxy.admin_address().unwrap(), "/metrics").await;
    assert!(metrics.contains(r#"l4proxy_udp_receive_drops_total{listener="dns"} 0"#), "the series is there");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn a_udp_listener_has_a_socket_per_worker_and_every_one_is_served() {
    let backend = udp_echo().await;
    let (_proxy, address) = udp_proxy(&[backend], "").await;
    assert_eq!(sockets_bound_at(address, socket2::Type::DGRAM), 3, "one SO_REUSEPORT socket per worker");
    // The kernel hashes each client's address to one of the sockets: with 60 clients each
    // socket gets some (all but certainly), and one that no worker read would leave its
    // clients unanswered.
    let mut clients = Vec::new();
    for i in 0..60u8 {
        let client = client().await;
        let reply = exchange(&client, address, &[i; 8]).await;
        assert!(reply.as_ref().is_some_and(|r| r.ends_with(&[i; 8])), "client {i}: {reply:?}");
        clients.push(client);
    }
}

#[tokio::test]
async fn a_burst_of_replies_larger_than_one_read_batch_all_reach_the_client() {
    // The backend answers one datagram with 50 at once: the proxy reads replies in batches and
    // stops reading once a batch comes back short, so none may be left behind in its queue.
    let backend = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let backend_address = backend.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 64];
        while let Ok((_, from)) = backend.recv_from(&mut buf).await {
            for i in 0..50u8 {
                let _ = backend.send_to(&[i; 16], from).await;
            }
        }
    });
    let (_proxy, address) = udp_proxy(&[backend_address], "").await;
    let client = client().await;
    client.send_to(b"go", address).await.unwrap();
    let mut buf = [0u8; 64];
    for i in 0..50u8 {
        let (n, _) = tokio::time::timeout(DEADLINE, client.recv_from(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("reply {i} did not come"))
            .unwrap();
        assert_eq!(&buf[..n], &[i; 16]);
    }
}
