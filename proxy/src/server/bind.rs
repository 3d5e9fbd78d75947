//! Listening sockets. Listeners get a group of `SO_REUSEPORT` sockets, one per worker thread;
//! TCP and UDP share the set-up (address reuse, so a restart does not wait out TIME_WAIT;
//! non-blocking; bind) and differ only in what follows. The admin server has one socket.

use std::{io, net::SocketAddr};

use socket2::{Domain, Socket, Type};
use tokio::net::TcpListener;

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

fn bound(address: SocketAddr, kind: Type, reuse_port: bool) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(address), kind, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(reuse_port)?;
    socket.set_nonblocking(true)?;
    socket.bind(&address.into())?;
    Ok(socket)
}

/// A listening TCP socket (the admin server's).
pub fn tcp(address: SocketAddr) -> Result<TcpListener, BindError> {
    let listen = || {
        let socket = bound(address, Type::STREAM, false)?;
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
    group(address, count, Type::STREAM, |socket| {
        socket.listen(LISTEN_BACKLOG)?;
        Ok(socket.into())
    })
}

/// `count` sockets of `kind` bound to `address` with `SO_REUSEPORT`, each finished by `ready`;
/// the first bind picks the port if `address` has none.
fn group<T>(
    address: SocketAddr,
    count: usize,
    kind: Type,
    ready: impl Fn(Socket) -> io::Result<T>,
) -> Result<Vec<T>, BindError> {
    let mut at = address;
    let mut open = || {
        let socket = bound(at, kind, true)?;
        at = socket.local_addr()?.as_socket().unwrap_or(at);
        ready(socket)
    };
    (0..count.max(1)).map(|_| open().map_err(BindError::at(address))).collect()
}

/// A UDP listener's sockets: `count` of them on one address with `SO_REUSEPORT` (one per worker
/// thread; the kernel hashes each client's address to one socket), as [`tcp_group`] does for
/// TCP. Their receive buffers stay at the kernel default (net.core.rmem_default) unless
/// `receiveBufferBytes` says otherwise: a larger one absorbs bursts of new clients, but under
/// a flood it only queues datagrams that the rest of the path cannot carry, and delivered
/// throughput fell by half in the benchmark.
pub fn udp_group(address: SocketAddr, count: usize) -> Result<Vec<std::net::UdpSocket>, BindError> {
    group(address, count, Type::DGRAM, |socket| Ok(socket.into()))
}
