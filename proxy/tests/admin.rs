//! The admin server under hostile clients: silent or slow ones are closed, and however many
//! there are, they take a bounded number of descriptors and never stall the data path.

mod support;

use std::time::Duration;

use l4proxy::admin::MAX_CONNECTIONS;
use support::*;
use tokio::{io::AsyncWriteExt, net::TcpStream};

async fn proxy() -> (std::sync::Arc<l4proxy::Proxy>, Echo) {
    let echo = Echo::start().await;
    let yaml = format!(
        "admin: {{address: 127.0.0.1:0}}\nlisteners:\n- name: web\n  address: 127.0.0.1:0\n  backends: [{{address: '{}'}}]\n",
        echo.address
    );
    (start_proxy(&yaml).await, echo)
}

/// A client that starts a request and never finishes its headers.
async fn slowloris(admin: std::net::SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(admin).await.unwrap();
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: admin\r\nX-Slow: ").await.unwrap();
    stream
}

#[tokio::test]
async fn admin_client_that_never_finishes_its_headers_is_closed_after_the_header_timeout() {
    let (proxy, _echo) = proxy().await;
    let mut slow = slowloris(proxy.admin_address().unwrap()).await;
    let started = tokio::time::Instant::now();
    let _ = read_to_eof(&mut slow).await;
    assert!(started.elapsed() >= Duration::from_secs(4), "closed by the 5s header timeout, not before");
}

#[tokio::test]
async fn admin_clients_beyond_the_cap_wait_and_the_data_path_goes_on() {
    let (proxy, _echo) = proxy().await;
    let admin = proxy.admin_address().unwrap();
    let mut held = Vec::new();
    for _ in 0..MAX_CONNECTIONS {
        held.push(slowloris(admin).await);
    }
    // The data path is served while every admin place is taken.
    drop(echo_through(proxy.listener_address("web").unwrap()).await);
    // One more admin client waits in the accept queue, unanswered ...
    let mut waiting = Box::pin(http_get(admin, "/healthz"));
    assert!(tokio::time::timeout(Duration::from_millis(500), &mut waiting).await.is_err(), "no place for it yet");
    // ... until the slow ones are closed by the header timeout and it gets one.
    assert_eq!(waiting.await.0, 200);
}
