//! Shared helpers for the proxy's integration tests: real servers on loopback, a proxy started
//! from YAML, and waiting on conditions with deadlines (never sleeping to synchronise).

#![allow(dead_code)] // each test binary uses a different subset

use std::{
    future::Future,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use l4proxy::{Proxy, config, metrics::Metrics};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

/// How long any condition in a test may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// Polls `condition` until it holds, failing the test with `what` after [`DEADLINE`].
pub async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !condition() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Like [`wait_until`] for conditions that need to await.
pub async fn wait_until_async<F: Future<Output = bool>>(what: &str, mut condition: impl FnMut() -> F) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !condition().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A fresh, empty directory for one test's files.
pub fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("l4proxy-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Parses, checks and resolves a YAML config.
pub async fn config(yaml: &str) -> config::Config {
    let file = config::parse_yaml(yaml).unwrap_or_else(|e| panic!("test config: {e}\n{yaml}"));
    config::Config::from_file_config(file).await.unwrap_or_else(|e| panic!("test config: {e}\n{yaml}"))
}

/// Starts a proxy from YAML (use port 0 for listeners and admin).
pub async fn start_proxy(yaml: &str) -> Arc<Proxy> {
    Proxy::start(config(yaml).await, Arc::new(Metrics::new())).await.expect("proxy starts")
}

/// A real upstream on 127.0.0.1 that echoes what it reads and counts connections.
pub struct Echo {
    pub address: SocketAddr,
    pub accepted: Arc<AtomicUsize>,
}

impl Echo {
    pub async fn start() -> Self {
        Self::start_on("127.0.0.1:0".parse().unwrap()).await
    }

    pub async fn start_on(address: SocketAddr) -> Self {
        let listener = TcpListener::bind(address).await.expect("bind echo server");
        let address = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let (mut r, mut w) = stream.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
            }
        });
        Self { address, accepted }
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

/// A UDP echo server on 127.0.0.1 that prefixes each reply with the port it was sent from
/// (`"<port>:"`), so a client behind the proxy sees which session carried it.
pub async fn udp_echo() -> SocketAddr {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let address = socket.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            let mut reply = format!("{}:", from.port()).into_bytes();
            reply.extend_from_slice(&buf[..n]);
            let _ = socket.send_to(&reply, from).await;
        }
    });
    address
}

/// Breaks this process's listening TCP socket bound to `address` from outside its owner, as a
/// kernel or operator fault would: `shutdown(2)` makes every later `accept` fail (EINVAL).
pub fn break_listening_socket(address: SocketAddr) {
    for entry in std::fs::read_dir("/proc/self/fd").unwrap() {
        let Some(fd) = entry.unwrap().file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
        // SAFETY: the descriptor is open (listed by /proc/self/fd) and only borrowed for the
        // calls below; one that closed meanwhile makes them fail, which skips it.
        let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        let socket = socket2::SockRef::from(&borrowed);
        let bound = socket.local_addr().ok().and_then(|a| a.as_socket());
        if bound == Some(address) && socket.is_listener().unwrap_or(false) {
            socket.shutdown(std::net::Shutdown::Both).expect("shutdown of the listening socket");
            return;
        }
    }
    panic!("no listening socket bound to {address} in this process");
}

/// An address on 127.0.0.1 where nothing listens: connects are refused.
/// Distinct sockets of this process of `kind` bound to `address` (for TCP, listening ones),
/// however many descriptors each has.
#[allow(dead_code)] // not every test file uses every helper
pub fn sockets_bound_at(address: SocketAddr, kind: socket2::Type) -> usize {
    let mut sockets = std::collections::HashSet::new();
    for entry in std::fs::read_dir("/proc/self/fd").unwrap() {
        let Ok(entry) = entry else { continue };
        let Some(fd) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
        let Ok(target) = std::fs::read_link(entry.path()) else { continue };
        // SAFETY: only borrowed for the calls below; a descriptor that closed meanwhile makes
        // them fail, which skips it.
        let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        let socket = socket2::SockRef::from(&borrowed);
        let bound = socket.local_addr().ok().and_then(|a| a.as_socket()) == Some(address);
        let listening = kind != socket2::Type::STREAM || socket.is_listener().unwrap_or(false);
        if bound && listening && socket.r#type().is_ok_and(|t| t == kind) {
            sockets.insert(target);
        }
    }
    sockets.len()
}

pub fn refused_address() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// A free port on 127.0.0.1 for a test to bind later (configs handed to the binary must name
/// one). Ports come from below the kernel's ephemeral range, so no `bind(..:0)` elsewhere in
/// the tests can take one in the meantime, and each is handed out once per test process; the
/// process id spreads concurrent test processes apart.
pub fn free_port() -> u16 {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    const SPAN: usize = 8_000;
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next().and_then(|p| p.parse::<usize>().ok()))
        .unwrap_or(32_768);
    let base = ephemeral_low.saturating_sub(SPAN).max(1_024);
    let offset = (std::process::id() as usize * 997) % SPAN;
    for _ in 0..SPAN {
        let port = (base + (offset + NEXT.fetch_add(1, Ordering::Relaxed)) % SPAN) as u16;
        let tcp = std::net::TcpListener::bind(("127.0.0.1", port));
        let udp = std::net::UdpSocket::bind(("127.0.0.1", port));
        if tcp.is_ok() && udp.is_ok() {
            return port;
        }
    }
    panic!("no free port below the ephemeral range");
}

/// Sends `payload` and reads the same number of bytes back.
pub async fn round_trip(stream: &mut TcpStream, payload: &[u8]) -> Vec<u8> {
    stream.write_all(payload).await.expect("write through proxy");
    let mut reply = vec![0; payload.len()];
    tokio::time::timeout(DEADLINE, stream.read_exact(&mut reply)).await.expect("reply in time").expect("read reply");
    reply
}

/// Connects to the proxy and checks one echo round trip.
pub async fn echo_through(proxy: SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(proxy).await.expect("connect to proxy");
    assert_eq!(round_trip(&mut stream, b"ping").await, b"ping");
    stream
}

/// Reads until EOF, failing after the deadline; returns what was read, or the read error.
pub async fn read_to_eof(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    tokio::time::timeout(DEADLINE, stream.read_to_end(&mut out)).await.expect("EOF in time")?;
    Ok(out)
}

/// A minimal HTTP/1.0 GET for the admin server: (status, body).
pub async fn http_get(address: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(address).await.expect("connect to admin");
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: admin\r\n\r\n").as_bytes()).await.unwrap();
    let raw = read_to_eof(&mut stream).await.expect("admin response");
    let text = String::from_utf8(raw).expect("utf-8 response");
    let (head, body) = text.split_once("\r\n\r\n").expect("HTTP response");
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).expect("status code");
    (status, body.to_owned())
}

/// The value of one Prometheus sample line (`name{labels} value`), or 0 if absent.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .map(|v| v.trim().parse().expect("metric value"))
        .unwrap_or(0.0)
}

/// A listening socket that never accepts, with its accept queue already full: connects to it
/// hang (SYNs are dropped) until they time out. Holds the queued clients alive.
pub struct Blackhole {
    pub address: SocketAddr,
    _listener: socket2::Socket,
    _queued: Vec<TcpStream>,
}

impl Blackhole {
    pub async fn start() -> Self {
        let listener = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        listener.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into()).unwrap();
        listener.listen(0).unwrap();
        let address = listener.local_addr().unwrap().as_socket().unwrap();
        let mut queued = Vec::new();
        for _ in 0..16 {
            match tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(address)).await {
                Ok(Ok(stream)) => queued.push(stream),
                Ok(Err(e)) => panic!("blackhole connect failed: {e}"),
                Err(_) => return Self { address, _listener: listener, _queued: queued },
            }
        }
        panic!("the accept queue of a backlog-0 listener never filled");
    }
}
