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

/// A listening TCP socket.
pub fn tcp(address: SocketAddr) -> Result<TcpListener, BindError> {
    let listen = || {
        let socket = bound(address, Type::STREAM)?;
        socket.listen(LISTEN_BACKLOG)?;
        TcpListener::from_std(socket.into())
    };
    listen().map_err(BindError::at(address))
}

/// A UDP listener's socket. Its receive buffer stays at the kernel default
/// (net.core.rmem_default): a larger one absorbs bursts of new clients, but under a flood it
/// only queues datagrams that the rest of the path cannot carry, and delivered throughput fell
/// by half in the benchmark.
pub fn udp(address: SocketAddr) -> Result<UdpSocket, BindError> {
    let open = || UdpSocket::from_std(bound(address, Type::DGRAM)?.into());
    open().map_err(BindError::at(address))
}
