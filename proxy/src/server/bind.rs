//! Listening sockets. TCP and UDP share the set-up (address reuse, so a restart does not wait
//! out TIME_WAIT; non-blocking; bind) and differ only in what follows.

use std::{io, net::SocketAddr};

use socket2::{Domain, Socket, Type};
use tokio::net::{TcpListener, UdpSocket};

/// Pending connections the kernel queues per TCP listener before accept.
pub const LISTEN_BACKLOG: i32 = 1024;

/// A listening socket could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("cannot bind {address}")]
pub struct BindError {
    pub address: SocketAddr,
    #[source]
    pub source: io::Error,
}

impl BindError {
    pub fn at(address: SocketAddr) -> impl FnOnce(io::Error) -> Self {
        move |source| Self { address, source }
    }
}

fn bound(address: SocketAddr, kind: Type) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(address), kind, None)?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&address.into())?;
    Ok(socket)
}

/// A listening TCP socket (the admin server's).
pub fn tcp(address: SocketAddr) -> Result<TcpListener, BindError> {
    let listen = || {
        let socket = bound(address, Type::STREAM)?;
        socket.listen(LISTEN_BACKLOG)?;
        TcpListener::from_std(socket.into())
    };
    listen().map_err(BindError::at(address))
}

/// `count` listening TCP sockets on one address, all with `SO_REUSEPORT`, so that the kernel
/// spreads new connections over them (one per worker thread, see `workers`). A port of 0
/// is chosen by the first bind and taken by the others. Not registered with a runtime: each is
/// handed to the worker that accepts from it.
///
/// `SO_REUSEPORT` lets another socket of the same user join the group, so a second proxy
/// started by the same user on the same address shares its connections instead of failing to
/// bind (as with nginx's and HAProxy's `reuseport`); a socket without the option, or of
/// another user, still makes the bind fail.
pub fn tcp_group(address: SocketAddr, count: usize) -> Result<Vec<std::net::TcpListener>, BindError> {
    let mut at = address;
    let mut listen = || {
        let socket = Socket::new(Domain::for_address(at), Type::STREAM, None)?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&at.into())?;
        socket.listen(LISTEN_BACKLOG)?;
        at = socket.local_addr()?.as_socket().unwrap_or(at);
        Ok(socket.into())
    };
    (0..count.max(1)).map(|_| listen().map_err(BindError::at(address))).collect()
}

/// A UDP listener's socket. Its receive buffer stays at the kernel default
/// (net.core.rmem_default): a larger one absorbs bursts of new clients, but under a flood it
/// only queues datagrams that the rest of the path cannot carry, and delivered throughput fell
/// by half in the benchmark.
pub fn udp(address: SocketAddr) -> Result<UdpSocket, BindError> {
    let open = || UdpSocket::from_std(bound(address, Type::DGRAM)?.into());
    open().map_err(BindError::at(address))
}
