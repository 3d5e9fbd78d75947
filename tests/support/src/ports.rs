//! Free loopback ports for the components.
//!
//! Binding port 0 and closing the socket is inherently racy (another process may take the port
//! before our component binds it); `controlplane` detects the resulting "address already in
//! use" exit and retries with fresh ports.

use std::io;
use std::net::{Ipv4Addr, TcpListener};

#[derive(Clone, Copy, Debug)]
pub(crate) struct Ports {
    pub(crate) etcd_client: u16,
    pub(crate) etcd_peer: u16,
    pub(crate) apiserver: u16,
}

/// Picks three distinct free ports: all listeners are held at once so the kernel cannot hand
/// out the same port twice.
pub(crate) fn pick() -> io::Result<Ports> {
    let listeners = [bind()?, bind()?, bind()?];
    let [etcd_client, etcd_peer, apiserver] =
        [listeners[0].local_addr()?.port(), listeners[1].local_addr()?.port(), listeners[2].local_addr()?.port()];
    Ok(Ports { etcd_client, etcd_peer, apiserver })
}

fn bind() -> io::Result<TcpListener> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
}

/// A free port on 127.0.0.1 for a test to bind later (a proxy process's listener, say). Ports
/// come from below the kernel's ephemeral range, so no `bind(..:0)` or outgoing connection
/// anywhere in the tests can take one in the meantime, and each is handed out once per test
/// process; the process id spreads concurrent test processes apart.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    const SPAN: usize = 8_000;
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next().and_then(|p| p.parse::<usize>().ok()))
        .unwrap_or(32_768);
    let base = ephemeral_low.saturating_sub(2 * SPAN).max(1_024);
    let offset = (std::process::id() as usize * 997) % SPAN;
    for _ in 0..SPAN {
        let port = (base + (offset + NEXT.fetch_add(1, Ordering::Relaxed)) % SPAN) as u16;
        let tcp = TcpListener::bind((Ipv4Addr::LOCALHOST, port));
        let udp = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, port));
        if tcp.is_ok() && udp.is_ok() {
            return port;
        }
    }
    panic!("no free port below the ephemeral range");
}
