//! Listening sockets, for every worker thread: a TCP listener is one socket with a descriptor
//! per worker, a UDP listener a group of `SO_REUSEPORT` sockets, one per worker. They share the
//! set-up (address reuse, so a restart does not wait out TIME_WAIT; non-blocking; bind). The
//! admin server has one socket.

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

/// A listening TCP socket for `count` workers: one socket, bound exclusively (a second proxy on
/// the same address gets "address in use", atomically), and `count` descriptors of it, one for
/// each worker to register with its own runtime and accept from. A new connection wakes every
/// idle worker; one accepts it, the others find nothing. Not registered with a runtime here.
///
/// Not a `SO_REUSEPORT` group as for UDP ([`udp_group`]): a group can be joined by any socket
/// of the same user, so two proxies applying the same address at the same moment would both
/// bind it and split its connections; a check before binding ([`refuse_if_taken`]) cannot
/// close that window.
pub fn tcp_shared(address: SocketAddr, count: usize) -> Result<Vec<std::net::TcpListener>, BindError> {
    let listen = || {
        let socket = bound(address, Type::STREAM, false)?;
        socket.listen(LISTEN_BACKLOG)?;
        let socket: std::net::TcpListener = socket.into();
        let mut shared = Vec::with_capacity(count.max(1));
        for _ in 1..count.max(1) {
            shared.push(socket.try_clone()?);
        }
        shared.push(socket);
        Ok(shared)
    };
    listen().map_err(BindError::at(address))
}

/// Fails, as one socket's bind would, when another socket holds `address`: with
/// `SO_REUSEPORT` a second process of the same user (say, a second proxy started on the same
/// file) would otherwise join the group silently and take a share of the traffic. A socket
/// without `SO_REUSEPORT` is bound and closed at once to find out (for TCP with
/// `SO_REUSEADDR`, so an earlier run's TIME_WAIT connections do not count; for UDP without it,
/// since on UDP it would let the probe share the port). Best effort: a second process binding
/// the address at the same moment can still pass it (before `SO_REUSEPORT`, UDP listeners
/// could be shared through `SO_REUSEADDR` alone).
fn refuse_if_taken(address: SocketAddr, kind: Type) -> io::Result<()> {
    if address.port() == 0 {
        return Ok(());
    }
    let probe = Socket::new(Domain::for_address(address), kind, None)?;
    probe.set_reuse_address(kind == Type::STREAM)?;
    probe.bind(&address.into())
}

/// `count` sockets of `kind` bound to `address` with `SO_REUSEPORT`, each finished by `ready`;
/// the first bind picks the port if `address` has none.
fn group<T>(
    address: SocketAddr,
    count: usize,
    kind: Type,
    ready: impl Fn(Socket) -> io::Result<T>,
) -> Result<Vec<T>, BindError> {
    refuse_if_taken(address, kind).map_err(BindError::at(address))?;
    let mut at = address;
    let mut open = || {
        let socket = bound(at, kind, true)?;
        at = socket.local_addr()?.as_socket().unwrap_or(at);
        ready(socket)
    };
    (0..count.max(1)).map(|_| open().map_err(BindError::at(address))).collect()
}

/// A UDP listener's sockets: `count` of them on one address with `SO_REUSEPORT` (one per worker
/// thread; the kernel hashes each client's address to one socket, so a session's datagrams are
/// read on one thread). Their receive buffers stay at the kernel default (net.core.rmem_default) unless
/// `receiveBufferBytes` says otherwise: a larger one absorbs bursts of new clients, but under
/// a flood it only queues datagrams that the rest of the path cannot carry, and delivered
/// throughput fell by half in the benchmark.
pub fn udp_group(address: SocketAddr, count: usize) -> Result<Vec<std::net::UdpSocket>, BindError> {
    group(address, count, Type::DGRAM, |socket| Ok(socket.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listener_binds_one_port_for_all_its_workers_and_a_second_one_on_it_is_refused() {
        let tcp = tcp_shared("127.0.0.1:0".parse().unwrap(), 3).unwrap();
        let at = tcp[0].local_addr().unwrap();
        assert!(tcp.len() == 3 && tcp.iter().all(|s| s.local_addr().unwrap() == at));
        let again = tcp_shared(at, 2).expect_err("the address is taken");
        assert_eq!(again.source.kind(), io::ErrorKind::AddrInUse, "{again}");

        let udp = udp_group("127.0.0.1:0".parse().unwrap(), 2).unwrap();
        let at = udp[0].local_addr().unwrap();
        assert_eq!(udp[1].local_addr().unwrap(), at);
        let again = udp_group(at, 2).expect_err("the address is taken");
        assert_eq!(again.source.kind(), io::ErrorKind::AddrInUse, "{again}");
    }

    #[test]
    fn a_listener_binds_an_address_that_was_freed() {
        let at = udp_group("127.0.0.1:0".parse().unwrap(), 2).unwrap()[0].local_addr().unwrap();
        // The group above is dropped: its sockets are closed.
        assert_eq!(udp_group(at, 2).unwrap().len(), 2);
        let at = tcp_shared("127.0.0.1:0".parse().unwrap(), 2).unwrap()[0].local_addr().unwrap();
        assert_eq!(tcp_shared(at, 2).unwrap().len(), 2);
    }
}
