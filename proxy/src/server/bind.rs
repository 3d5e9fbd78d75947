//! Listening sockets. A listener is a group of `SO_REUSEPORT` sockets, one per worker thread,
//! held exclusively ([`Group`]); TCP and UDP share the set-up (address reuse, so a restart does
//! not wait out TIME_WAIT; non-blocking; bind) and differ only in what follows. The admin
//! server has one socket.

use std::{
    io,
    net::SocketAddr,
    os::{
        linux::net::SocketAddrExt,
        unix::net::{SocketAddr as UnixAddr, UnixDatagram},
    },
};

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

/// `count` listening TCP sockets on one address with `SO_REUSEPORT`, one per worker thread:
/// the kernel spreads new connections over them evenly (one shared socket would wake every
/// idle worker for each connection and let whichever runs first take it). Not registered with
/// a runtime: each is handed to the worker that accepts from it.
pub fn tcp_group(address: SocketAddr, count: usize) -> Result<Group<std::net::TcpListener>, BindError> {
    group(address, count, Type::STREAM, |socket| {
        socket.listen(LISTEN_BACKLOG)?;
        Ok(socket.into())
    })
}

/// A UDP listener's sockets: `count` of them on one address with `SO_REUSEPORT` (one per worker
/// thread; the kernel hashes each client's address to one socket, so a session's datagrams are
/// read on one thread). Their receive buffers stay at the kernel default (net.core.rmem_default)
/// unless `receiveBufferBytes` says otherwise: a larger one absorbs bursts of new clients, but
/// under a flood it only queues datagrams that the rest of the path cannot carry, and delivered
/// throughput fell by half in the benchmark.
pub fn udp_group(address: SocketAddr, count: usize) -> Result<Group<std::net::UdpSocket>, BindError> {
    group(address, count, Type::DGRAM, |socket| Ok(socket.into()))
}

/// A listener's sockets, and what keeps the address its own while they are bound.
///
/// A `SO_REUSEPORT` group can be joined by any socket of the same user that sets the option,
/// so a second proxy on the same address (a second one started on the same file; two proxies
/// applying one pushed address at the same moment) would bind it too and take a share of its
/// traffic, where one socket's bind says "address in use". So every group takes a lock first:
/// an abstract Unix socket named after the protocol and address (`@l4proxy/tcp/ADDR`), which
/// only one socket in the network namespace can bind, released when the listener's sockets
/// are dropped or the process dies. A socket of another program on the address (without
/// `SO_REUSEPORT`, or another user's) is refused by the kernel as before; one with
/// `SO_REUSEPORT` of the same user is caught by [`refuse_if_taken`] unless it binds at the
/// same moment.
pub struct Group<T> {
    pub sockets: Vec<T>,
    /// To hold as long as any of the sockets is open.
    pub lock: AddressLock,
}

/// Keeps a listener's address exclusive while held ([`Group`]).
#[derive(Debug)]
pub struct AddressLock(#[allow(dead_code)] UnixDatagram);

/// Takes the lock on `address` for `kind`.
fn lock(address: SocketAddr, kind: Type) -> io::Result<AddressLock> {
    let protocol = if kind == Type::STREAM { "tcp" } else { "udp" };
    let name = format!("l4proxy/{protocol}/{address}");
    match UnixDatagram::bind_addr(&UnixAddr::from_abstract_name(name.as_bytes())?) {
        Ok(socket) => Ok(AddressLock(socket)),
        Err(error) if error.kind() == io::ErrorKind::AddrInUse => {
            Err(io::Error::new(io::ErrorKind::AddrInUse, "another l4proxy listens on this address"))
        }
        Err(error) => Err(error),
    }
}

/// Fails, as one socket's bind would, when another socket holds `address` (see [`Group`]): a
/// socket without `SO_REUSEPORT` is bound and closed at once to find out (for TCP with
/// `SO_REUSEADDR`, so an earlier run's TIME_WAIT connections do not count; for UDP without it,
/// since on UDP it would let the probe share the port).
fn refuse_if_taken(address: SocketAddr, kind: Type) -> io::Result<()> {
    if address.port() == 0 {
        return Ok(());
    }
    let probe = Socket::new(Domain::for_address(address), kind, None)?;
    probe.set_reuse_address(kind == Type::STREAM)?;
    probe.bind(&address.into())
}

/// `count` sockets of `kind` bound to `address` with `SO_REUSEPORT`, each finished by `ready`,
/// under the address's lock; the first bind picks the port if `address` has none.
fn group<T>(
    address: SocketAddr,
    count: usize,
    kind: Type,
    ready: impl Fn(Socket) -> io::Result<T>,
) -> Result<Group<T>, BindError> {
    let bind = || {
        // A fixed address is locked before anything binds it; a port the kernel picks, once
        // the first bind has picked it.
        let mut held = if address.port() == 0 { None } else { Some(lock(address, kind)?) };
        refuse_if_taken(address, kind)?;
        let mut at = address;
        let mut sockets = Vec::with_capacity(count.max(1));
        for _ in 0..count.max(1) {
            let socket = bound(at, kind, true)?;
            at = socket.local_addr()?.as_socket().unwrap_or(at);
            if held.is_none() {
                held = Some(lock(at, kind)?);
            }
            sockets.push(ready(socket)?);
        }
        let lock = held.ok_or_else(|| io::Error::other("no socket was bound"))?;
        Ok(Group { sockets, lock })
    };
    bind().map_err(BindError::at(address))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_group_binds_one_port_for_all_its_sockets_and_a_second_group_on_it_is_refused() {
        let tcp = tcp_group("127.0.0.1:0".parse().unwrap(), 3).unwrap();
        let at = tcp.sockets[0].local_addr().unwrap();
        assert!(tcp.sockets.len() == 3 && tcp.sockets.iter().all(|s| s.local_addr().unwrap() == at));
        let again = tcp_group(at, 2).err().expect("the address is taken");
        assert_eq!(again.source.kind(), io::ErrorKind::AddrInUse, "{again}");

        let udp = udp_group("127.0.0.1:0".parse().unwrap(), 2).unwrap();
        let at = udp.sockets[0].local_addr().unwrap();
        assert_eq!(udp.sockets[1].local_addr().unwrap(), at);
        let again = udp_group(at, 2).err().expect("the address is taken");
        assert_eq!(again.source.kind(), io::ErrorKind::AddrInUse, "{again}");
    }

    #[test]
    fn two_groups_binding_one_address_at_the_same_moment_do_not_both_get_it() {
        // What the check alone cannot stop: both find the port free, then both would bind
        // SO_REUSEPORT groups. The lock lets one through.
        for _ in 0..20 {
            let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            let at: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
            let barrier = std::sync::Barrier::new(2);
            let won = std::thread::scope(|scope| {
                let racers: Vec<_> = (0..2)
                    .map(|_| {
                        scope.spawn(|| {
                            barrier.wait();
                            tcp_group(at, 2)
                        })
                    })
                    .collect();
                // Every result is kept until both are counted: a group dropped as soon as it
                // is counted would free the address for a racer that has not bound yet.
                let results: Vec<_> = racers.into_iter().map(|r| r.join().unwrap()).collect();
                results.iter().filter(|r| r.is_ok()).count()
            });
            assert_eq!(won, 1, "exactly one group holds {at}");
        }
    }

    #[test]
    fn a_group_binds_an_address_that_was_freed() {
        let at = tcp_group("127.0.0.1:0".parse().unwrap(), 2).unwrap().sockets[0].local_addr().unwrap();
        // The group above is dropped: its sockets and its lock are released.
        assert_eq!(tcp_group(at, 2).unwrap().sockets.len(), 2);
        let at = udp_group("127.0.0.1:0".parse().unwrap(), 2).unwrap().sockets[0].local_addr().unwrap();
        assert_eq!(udp_group(at, 2).unwrap().sockets.len(), 2);
    }
}
