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
