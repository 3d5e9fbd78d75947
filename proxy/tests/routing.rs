//! Routing by probed protocol and server name, with real clients: rustls for TLS, quinn for
//! QUIC; and the PROXY protocol in both directions.

mod support;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use l4proxy::proxy_protocol::{self, Addresses, Version};
use support::*;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream, UdpSocket},
    sync::mpsc,
};

fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A TLS server for `name` on loopback that answers `identity` after the handshake.
async fn tls_backend(name: &str, identity: &'static str) -> (SocketAddr, rustls::pki_types::CertificateDer<'static>) {
    install_crypto();
    let certified = rcgen::generate_simple_self_signed(vec![name.to_owned()]).unwrap();
    let cert = certified.cert.der().clone();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(certified.signing_key.serialize_der().into());
    let config =
        rustls::ServerConfig::builder().with_no_client_auth().with_single_cert(vec![cert.clone()], key).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(mut tls) = acceptor.accept(stream).await {
                    let _ = tls.write_all(identity.as_bytes()).await;
                    let _ = tls.shutdown().await;
                }
            });
        }
    });
    (address, cert)
}

/// Connects with rustls through the proxy to `name` and returns what the server said.
async fn tls_hello(proxy: SocketAddr, name: &str, trusted: &[rustls::pki_types::CertificateDer<'static>]) -> String {
    let mut roots = rustls::RootCertStore::empty();
    for cert in trusted {
        roots.add(cert.clone()).unwrap();
    }
    let config = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let stream = TcpStream::connect(proxy).await.unwrap();
    let server_name = rustls::pki_types::ServerName::try_from(name.to_owned()).unwrap();
    let mut tls = tokio::time::timeout(DEADLINE, connector.connect(server_name, stream))
        .await
        .unwrap()
        .expect("TLS handshake through the proxy");
    let mut reply = String::new();
    let _ = tls.read_to_string(&mut reply).await;
    reply
}

#[tokio::test]
async fn tls_connections_are_routed_by_sni_and_the_handshake_passes_unchanged() {
    let (api, api_cert) = tls_backend("api.example.com", "api").await;
    let (www, www_cert) = tls_backend("www.example.com", "wildcard").await;
    let (default, default_cert) = tls_backend("other.org", "default").await;
    let yaml = format!(
        "listeners:\n- name: tls\n  address: 127.0.0.1:0\n  backends: [{{address: '{default}'}}]\n  routes:\n  - match: {{protocol: TLS, serverNames: ['*.example.com']}}\n    backends: [{{address: '{www}'}}]\n  - match: {{protocol: TLS, serverNames: [api.example.com]}}\n    backends: [{{address: '{api}'}}]\n"
    );
    let proxy = start_proxy(&yaml).await;
    let address = proxy.listener_address("tls").unwrap();
    let certs = [api_cert, www_cert, default_cert];
    assert_eq!(tls_hello(address, "api.example.com", &certs).await, "api", "exact name beats the wildcard");
    assert_eq!(tls_hello(address, "www.example.com", &certs).await, "wildcard");
    assert_eq!(tls_hello(address, "other.org", &certs).await, "default", "unmatched goes to the default route");
}

/// A TCP backend that reports the first bytes of each connection and answers `identity`.
async fn recording_backend(identity: &'static str) -> (SocketAddr, mpsc::UnboundedReceiver<Vec<u8>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let n = stream.read(&mut buf).await.unwrap_or(0);
                let _ = tx.send(buf[..n].to_vec());
                let _ = stream.write_all(identity.as_bytes()).await;
            });
        }
    });
    (address, rx)
}

async fn ask(proxy: SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(proxy).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut reply = vec![0u8; 64];
    let n = tokio::time::timeout(DEADLINE, stream.read(&mut reply)).await.unwrap().unwrap();
    String::from_utf8_lossy(&reply[..n]).into_owned()
}

#[tokio::test]
async fn http_and_ssh_are_routed_by_protocol_and_bytes_arrive_unchanged() {
    let (http, mut http_seen) = recording_backend("http").await;
    let (ssh, mut ssh_seen) = recording_backend("ssh").await;
    let (default, _) = recording_backend("default").await;
    let yaml = format!(
        "listeners:\n- name: mux\n  address: 127.0.0.1:0\n  backends: [{{address: '{default}'}}]\n  routes:\n  - match: {{protocol: HTTP}}\n    backends: [{{address: '{http}'}}]\n  - match: {{protocol: SSH}}\n    backends: [{{address: '{ssh}'}}]\n"
    );
    let proxy = start_proxy(&yaml).await;
    let address = proxy.listener_address("mux").unwrap();
    let request = b"GET /index.html HTTP/1.1\r\nHost: shop.example.com\r\n\r\n";
    assert_eq!(ask(address, request).await, "http");
    assert_eq!(http_seen.recv().await.unwrap(), request, "byte for byte");
    let banner = b"SSH-2.0-OpenSSH_9.6\r\n";
    assert_eq!(ask(address, banner).await, "ssh");
    assert_eq!(ssh_seen.recv().await.unwrap(), banner);
    assert_eq!(ask(address, b"\x00\x01binary junk").await, "default");
}

#[tokio::test]
async fn http_is_routed_by_host_header() {
    let (shop, _) = recording_backend("shop").await;
    let (default, _) = recording_backend("default").await;
    let yaml = format!(
        "listeners:\n- name: web\n  address: 127.0.0.1:0\n  backends: [{{address: '{default}'}}]\n  routes:\n  - match: {{protocol: HTTP, serverNames: [shop.example.com]}}\n    backends: [{{address: '{shop}'}}]\n"
    );
    let proxy = start_proxy(&yaml).await;
    let address = proxy.listener_address("web").unwrap();
    assert_eq!(ask(address, b"GET / HTTP/1.1\r\nHost: shop.example.com:8080\r\n\r\n").await, "shop");
    assert_eq!(ask(address, b"GET / HTTP/1.1\r\nHost: blog.example.com\r\n\r\n").await, "default");
}

/// A server-speaks-first backend (like SMTP or MySQL): greets, then echoes one line.
async fn greeting_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = stream.write_all(b"220 ready\r\n").await;
                let mut buf = [0u8; 64];
                if let Ok(n) = stream.read(&mut buf).await {
                    let _ = stream.write_all(&buf[..n]).await;
                }
            });
        }
    });
    address
}

async fn greeted(address: SocketAddr) -> (TcpStream, Duration) {
    let started = tokio::time::Instant::now();
    let mut stream = TcpStream::connect(address).await.unwrap();
    let mut greeting = [0u8; 11];
    tokio::time::timeout(DEADLINE, stream.read_exact(&mut greeting)).await.unwrap().unwrap();
    assert_eq!(&greeting, b"220 ready\r\n");
    (stream, started.elapsed())
}

#[tokio::test]
async fn server_first_protocol_works_untouched_without_routes() {
    let backend = greeting_backend().await;
    let proxy = start_proxy(&format!(
        "listeners:\n- name: smtp\n  address: 127.0.0.1:0\n  backends: [{{address: '{backend}'}}]\n"
    ))
    .await;
    let (mut stream, waited) = greeted(proxy.listener_address("smtp").unwrap()).await;
    assert!(waited < Duration::from_secs(1), "no probing delay without routes: {waited:?}");
    assert_eq!(round_trip(&mut stream, b"HELO\r\n").await, b"HELO\r\n");
}

#[tokio::test]
async fn silent_client_goes_to_the_default_route_after_the_probe_timeout() {
    let backend = greeting_backend().await;
    let (tls, _) = recording_backend("tls").await;
    let yaml = format!(
        "listeners:\n- name: mixed\n  address: 127.0.0.1:0\n  backends: [{{address: '{backend}'}}]\n  limits: {{probeTimeout: 200ms}}\n  routes:\n  - match: {{protocol: TLS}}\n    backends: [{{address: '{tls}'}}]\n"
    );
    let proxy = start_proxy(&yaml).await;
    let (mut stream, waited) = greeted(proxy.listener_address("mixed").unwrap()).await;
    assert!(waited >= Duration::from_millis(200), "waited for the probe timeout: {waited:?}");
    assert_eq!(round_trip(&mut stream, b"HELO\r\n").await, b"HELO\r\n");
}

#[tokio::test]
async fn unmatched_traffic_without_a_default_route_is_closed_and_counted() {
    let (ssh, _) = recording_backend("ssh").await;
    let yaml = format!(
        "listeners:\n- name: only-ssh\n  address: 127.0.0.1:0\n  backends: []\n  routes:\n  - match: {{protocol: SSH}}\n    backends: [{{address: '{ssh}'}}]\n"
    );
    let proxy = start_proxy(&yaml).await;
    let mut stream = TcpStream::connect(proxy.listener_address("only-ssh").unwrap()).await.unwrap();
    stream.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    assert!(read_to_eof(&mut stream).await.map(|b| b.is_empty()).unwrap_or(true));
    wait_until("the close is counted", || proxy.stats().listeners[0].closed["no_route"] == 1).await;
}

#[tokio::test]
async fn quic_is_routed_by_sni_with_a_real_quinn_client() {
    install_crypto();
    // Backends that count the datagrams they get; no QUIC server is needed to see the route.
    async fn counting_udp() -> (SocketAddr, mpsc::UnboundedReceiver<usize>) {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let address = socket.local_addr().unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65_536];
            while let Ok(n) = socket.recv(&mut buf).await {
                let _ = tx.send(n);
            }
        });
        (address, rx)
    }
    let (quic, mut quic_seen) = counting_udp().await;
    let (default, mut default_seen) = counting_udp().await;
    let yaml = format!(
        "listeners:\n- name: h3\n  protocol: UDP\n  address: 127.0.0.1:0\n  backends: [{{address: '{default}'}}]\n  routes:\n  - match: {{protocol: QUIC, serverNames: [quic.example.com], alpn: [h3]}}\n    backends: [{{address: '{quic}'}}]\n"
    );
    let proxy = start_proxy(&yaml).await;
    let address = proxy.listener_address("h3").unwrap();

    let mut roots = rustls::RootCertStore::empty();
    let cert = rcgen::generate_simple_self_signed(vec!["quic.example.com".to_owned()]).unwrap();
    roots.add(cert.cert.der().clone()).unwrap();
    let mut tls = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    tls.alpn_protocols = vec![b"h3".to_vec()];
    let client_config =
        quinn::ClientConfig::new(Arc::new(quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap()));
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(client_config);
    let connecting = endpoint.connect(address, "quic.example.com").unwrap();
    // The handshake cannot finish (the backend is no QUIC server); the Initial is what routes.
    let handshake = tokio::spawn(async move { tokio::time::timeout(Duration::from_secs(3), connecting).await });
    let first = tokio::time::timeout(DEADLINE, quic_seen.recv()).await.expect("the QUIC route gets the Initial");
    assert!(first.unwrap() >= 1200, "a client Initial is padded to 1200 bytes");
    assert!(default_seen.try_recv().is_err(), "nothing went to the default route");
    handshake.abort();
    let stats = proxy.stats();
    assert_eq!(stats.listeners[0].pool_stats.size, 1);
}

#[tokio::test]
async fn udp_datagrams_to_an_unmatched_route_use_the_default() {
    let echo = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let backend = echo.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = echo.recv_from(&mut buf).await {
            let _ = echo.send_to(&buf[..n], from).await;
        }
    });
    let yaml = format!(
        "listeners:\n- name: mixed\n  protocol: UDP\n  address: 127.0.0.1:0\n  backends: [{{address: '{backend}'}}]\n  routes:\n  - match: {{protocol: WireGuard}}\n    backends: [{{address: '{}'}}]\n",
        refused_address()
    );
    let proxy = start_proxy(&yaml).await;
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    client.send_to(b"plain datagram", proxy.listener_address("mixed").unwrap()).await.unwrap();
    let mut buf = [0u8; 64];
    let (n, _) = tokio::time::timeout(DEADLINE, client.recv_from(&mut buf)).await.unwrap().unwrap();
    assert_eq!(&buf[..n], b"plain datagram");
}

#[tokio::test]
async fn proxy_header_from_a_trusted_source_is_read_and_passed_on_as_v1() {
    // A backend that reads until the v1 header and the payload are in (the proxy serves on
    // threads of its own, so they may come in reads of their own), then replies.
    let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = server.local_addr().unwrap();
    let (seen_tx, seen) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut stream, _) = server.accept().await.unwrap();
        let mut received = Vec::new();
        let mut buf = [0u8; 256];
        while proxy_protocol::parse(&received).unwrap().is_none_or(|p| received.len() < p.len + b"payload".len()) {
            let n = stream.read(&mut buf).await.unwrap();
            assert!(n > 0, "the stream ended after {received:?}");
            received.extend_from_slice(&buf[..n]);
        }
        stream.write_all(b"ok").await.unwrap();
        let _ = seen_tx.send(received);
    });
    let yaml = format!(
        "listeners:\n- name: behind-lb\n  address: 127.0.0.1:0\n  acceptProxyProtocol: {{trustedSources: ['127.0.0.0/8']}}\n  loadBalancing: SourceHash\n  backends: [{{address: '{backend}', proxyProtocol: v1}}]\n"
    );
    let proxy = start_proxy(&yaml).await;
    let address = proxy.listener_address("behind-lb").unwrap();
    let client: SocketAddr = "203.0.113.7:4000".parse().unwrap();
    let original: SocketAddr = "198.51.100.1:443".parse().unwrap();
    let mut header = Vec::new();
    proxy_protocol::write_header(Version::V2, client, original, &mut header);
    let mut stream = TcpStream::connect(address).await.unwrap();
    stream.write_all(&header).await.unwrap();
    stream.write_all(b"payload").await.unwrap();
    let mut reply = [0u8; 2];
    tokio::time::timeout(DEADLINE, stream.read_exact(&mut reply)).await.unwrap().unwrap();
    let received = seen.await.unwrap();
    let parsed = proxy_protocol::parse(&received).unwrap().expect("a v1 header reaches the backend");
    assert_eq!(parsed.version, Version::V1);
    assert_eq!(parsed.addresses, Addresses::Proxied { source: client, destination: original });
    assert_eq!(&received[parsed.len..], b"payload", "the payload follows, unchanged");
}

#[tokio::test]
async fn proxy_header_v2_is_sent_to_the_backend_with_the_client_address() {
    let (backend, mut seen) = recording_backend("ok").await;
    let yaml = format!(
        "listeners:\n- name: pp\n  address: 127.0.0.1:0\n  backends: [{{address: '{backend}', proxyProtocol: v2}}]\n"
    );
    let proxy = start_proxy(&yaml).await;
    let address = proxy.listener_address("pp").unwrap();
    let mut stream = TcpStream::connect(address).await.unwrap();
    let local = stream.local_addr().unwrap();
    stream.write_all(b"hi").await.unwrap();
    let mut reply = [0u8; 2];
    stream.read_exact(&mut reply).await.unwrap();
    let mut received = seen.recv().await.unwrap();
    while proxy_protocol::parse(&received).unwrap().is_none() {
        received.extend(seen.recv().await.unwrap());
    }
    let parsed = proxy_protocol::parse(&received).unwrap().unwrap();
    assert_eq!(parsed.version, Version::V2);
    assert_eq!(parsed.addresses, Addresses::Proxied { source: local, destination: address });
}

#[tokio::test]
async fn trusted_peer_without_a_proxy_header_is_closed_and_counted() {
    let (backend, _) = recording_backend("ok").await;
    let yaml = format!(
        "listeners:\n- name: pp\n  address: 127.0.0.1:0\n  acceptProxyProtocol: {{trustedSources: ['127.0.0.1/32']}}\n  backends: [{{address: '{backend}'}}]\n"
    );
    let proxy = start_proxy(&yaml).await;
    let mut stream = TcpStream::connect(proxy.listener_address("pp").unwrap()).await.unwrap();
    stream.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    assert!(read_to_eof(&mut stream).await.map(|b| b.is_empty()).unwrap_or(true));
    wait_until("the close is counted", || proxy.stats().listeners[0].closed["proxy_protocol"] == 1).await;
}

#[tokio::test]
async fn proxy_header_announcing_a_datagram_transport_on_a_tcp_listener_is_refused() {
    let (backend, mut seen) = recording_backend("ok").await;
    let yaml = format!(
        "listeners:\n- name: pp\n  address: 127.0.0.1:0\n  acceptProxyProtocol: {{trustedSources: ['127.0.0.1/32']}}\n  backends: [{{address: '{backend}'}}]\n"
    );
    let proxy = start_proxy(&yaml).await;
    let mut header = Vec::new();
    proxy_protocol::write_v2_datagram_header(
        "10.0.0.1:1000".parse().unwrap(),
        "10.0.0.2:53".parse().unwrap(),
        &mut header,
    );
    let mut stream = TcpStream::connect(proxy.listener_address("pp").unwrap()).await.unwrap();
    // In one write: the proxy may refuse the header (and reset) before a second write.
    header.extend_from_slice(b"hello");
    stream.write_all(&header).await.unwrap();
    assert!(read_to_eof(&mut stream).await.map(|b| b.is_empty()).unwrap_or(true));
    wait_until("the close is counted", || proxy.stats().listeners[0].closed["proxy_protocol"] == 1).await;
    assert!(seen.try_recv().is_err(), "nothing reached the backend");
}

#[tokio::test]
async fn untrusted_peer_is_closed_and_counted() {
    let (backend, _) = recording_backend("ok").await;
    let yaml = format!(
        "listeners:\n- name: pp\n  address: 127.0.0.1:0\n  acceptProxyProtocol: {{trustedSources: ['10.0.0.0/8']}}\n  backends: [{{address: '{backend}'}}]\n"
    );
    let proxy = start_proxy(&yaml).await;
    let mut stream = TcpStream::connect(proxy.listener_address("pp").unwrap()).await.unwrap();
    let mut header = Vec::new();
    proxy_protocol::write_header(
        Version::V1,
        "203.0.113.7:4000".parse().unwrap(),
        "198.51.100.1:443".parse().unwrap(),
        &mut header,
    );
    let _ = stream.write_all(&header).await;
    assert!(read_to_eof(&mut stream).await.map(|b| b.is_empty()).unwrap_or(true));
    wait_until("the close is counted", || proxy.stats().listeners[0].closed["untrusted_source"] == 1).await;
}

#[tokio::test]
async fn udp_backend_gets_a_v2_header_on_every_datagram() {
    let backend = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let backend_address = backend.local_addr().unwrap();
    let yaml = format!(
        "listeners:\n- name: dns\n  protocol: UDP\n  address: 127.0.0.1:0\n  backends: [{{address: '{backend_address}', proxyProtocol: v2}}]\n"
    );
    let proxy = start_proxy(&yaml).await;
    let address = proxy.listener_address("dns").unwrap();
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for payload in [&b"first"[..], b"second"] {
        client.send_to(payload, address).await.unwrap();
        let mut buf = [0u8; 1024];
        let n = tokio::time::timeout(DEADLINE, backend.recv(&mut buf)).await.unwrap().unwrap();
        let header = proxy_protocol::parse(&buf[..n]).unwrap().expect("a header on each datagram");
        assert!(header.datagram);
        assert_eq!(header.addresses, Addresses::Proxied { source: client.local_addr().unwrap(), destination: address });
        assert_eq!(&buf[header.len..n], payload);
    }
}

#[tokio::test]
async fn wireguard_handshake_initiation_is_routed_to_its_route() {
    let wireguard = udp_echo().await;
    let default = udp_echo().await;
    let yaml = format!(
        "listeners:\n- name: vpn\n  protocol: UDP\n  address: 127.0.0.1:0\n  backends: [{{address: '{default}'}}]\n  routes:\n  - match: {{protocol: WireGuard}}\n    backends: [{{address: '{wireguard}'}}]\n"
    );
    let proxy = start_proxy(&yaml).await;
    let address = proxy.listener_address("vpn").unwrap();
    let mut initiation = vec![0u8; 148];
    initiation[0] = 1; // message type 1, three reserved zero bytes, fixed length 148
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    client.send_to(&initiation, address).await.unwrap();
    let mut buf = [0u8; 256];
    let (n, _) = tokio::time::timeout(DEADLINE, client.recv_from(&mut buf)).await.unwrap().unwrap();
    assert!(buf[..n].ends_with(&initiation), "the initiation reaches a backend unchanged and is answered");
    let stats = proxy.stats();
    let backends = &stats.listeners[0].backends;
    let wg = backends.iter().find(|b| b.address == wireguard.to_string()).unwrap();
    assert_eq!(wg.active, 1, "the session went to the WireGuard route");
}
