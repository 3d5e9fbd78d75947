//! The UDP connection manager: sessions keyed by (client, local address) in a
//! [`DashMapConnectionPool`], each with its own connected socket towards its backend, replies
//! sent from the address the client wrote to, bounded by `maxConnections`, expired by
//! `idleTimeout` and `maxConnectionDuration`.
//!
//! Per-datagram path: one pool lookup (an atomic store marks the session used) and one send;
//! no allocation, no log line. The listener reads in batches (recvmmsg, and GRO where the
//! kernel has it) through `quinn-udp`, which also reports the local address of each datagram.
//!
//! A new client takes its place under the limit on its first datagram: at once when the
//! listener has no routes, or when probing starts (the place is held while its first datagrams
//! are probed, and handed to [`ConnectionManager::create_connection`] with what was found).

use std::{
    cell::RefCell,
    io::{self, IoSliceMut},
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering},
    },
    time::Duration,
};

use arc_swap::ArcSwap;
use dashmap::{DashMap, mapref::entry::Entry};
use quinn_udp::{RecvMeta, Transmit, UdpSockRef, UdpSocketState};
use tokio::{io::Interest, net::UdpSocket, time::Instant};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::{
    Admitted, CloseReason, ConnectionContext, ConnectionError, ConnectionManager, ConnectionMetrics, Datagrams,
    DropReason, ListenerManager, ListenerSettings,
    pool::{ConnectionPool, DashMapConnectionPool, Expired, Expiry, PoolStats, Slot},
};
use crate::{
    backend::BackendLease,
    config::{ListenerConfig, Protocol, ProxyProtocolVersion},
    metrics::{Metrics, Open},
    probe::{MAX_QUIC_PROBE_DATAGRAMS, ProbeInfo, QuicInitialProbe, UdpProbe, UdpProbedProtocol},
    proxy_protocol,
    routing::Probed,
};

/// `UdpConnection::ended` while the session is open (no `CloseReason` index).
const OPEN: u8 = u8::MAX;
/// Datagrams read per receive call.
const RECV_BATCH: usize = 8;
/// Receive calls a listener loop makes before it lets its worker's other tasks run. Under a
/// flood its socket is never empty; without this the loop would run until tokio's budget
/// (128 readiness polls, ~1,000 datagrams) ran out, and even then be queued again ahead of
/// the I/O events, so the sessions' reply tasks starved and their replies were dropped.
const BATCHES_PER_TURN: usize = 8;
/// Largest datagram (IPv4 UDP payload limit); also each receive buffer's size.
const MAX_DATAGRAM: usize = 65_535;
/// Replies relayed per session wakeup before yielding to other sessions.
const REPLY_BATCH: usize = 32;
/// Replies read from a backend per receive call (`recvmmsg`).
const REPLY_RECV_BATCH: usize = 4;

/// The key of a UDP session: the client, and the local address it sent to.
pub type SessionKey = (SocketAddr, SocketAddr);

thread_local! {
    // Used only inside one synchronous receive-then-send step, never across an await.
    static BUFFER: RefCell<Box<[u8]>> = RefCell::new(vec![0; MAX_DATAGRAM + proxy_protocol::MAX_HEADER_LEN].into_boxed_slice());
    // The reply path's receive buffers, REPLY_RECV_BATCH of MAX_DATAGRAM; the same rule.
    static REPLIES: RefCell<Box<[u8]>> = RefCell::new(vec![0; REPLY_RECV_BATCH * MAX_DATAGRAM].into_boxed_slice());
}

/// Who a session is and where it goes.
#[derive(Clone, Debug)]
pub struct UdpConnectionInfo {
    /// `source`: the client; `destination`: the local address it sent to.
    pub context: ConnectionContext,
    pub backend: SocketAddr,
}

/// What is known of a new UDP client when its session is created.
#[derive(Debug, Default)]
pub struct UdpClient {
    /// What probing its first datagrams found; `None`: nothing (or the listener has no routes).
    pub probed: Option<(UdpProbedProtocol, ProbeInfo)>,
    /// Its place under the limit, taken when probing began; `None`: take one now.
    pub slot: Option<Slot>,
}

/// A UDP session: held by the pool, and by its reply task until the session ends. One
/// allocation per session, kept small: 100,000 sessions is an ordinary load.
pub struct UdpConnection {
    info: UdpConnectionInfo,
    upstream: UdpSocket,
    /// Prefix for every datagram to the backend (PROXY protocol v2, DGRAM), if configured.
    header: Option<Box<[u8]>>,
    lease: BackendLease,
    settings: Arc<ListenerSettings>,
    datagrams_up: AtomicU64,
    bytes_up: AtomicU64,
    datagrams_down: AtomicU64,
    bytes_down: AtomicU64,
    /// [`OPEN`] until the session leaves the pool (expiry, reload, shutdown); then the
    /// `CloseReason` index of whoever ended it first.
    ended: AtomicU8,
    /// Taken by the one caller that runs the reply task (two receive loops may both create a
    /// new client's session; the second gets the first one's).
    relay_claimed: AtomicBool,
    _open: Open,
}

impl Admitted for UdpConnection {
    fn context(&self) -> &ConnectionContext {
        &self.info.context
    }

    fn settings(&self) -> &Arc<ListenerSettings> {
        &self.settings
    }
}

impl UdpConnection {
    pub fn info(&self) -> &UdpConnectionInfo {
        &self.info
    }

    /// Ends the session: its reply task stops and reports `reason` (the first one given, when
    /// two callers end it at once).
    ///
    /// The end signal is the upstream socket itself: shutting its read side makes the kernel
    /// report it readable and read-closed for good, which wakes the reply task where it waits
    /// (on any thread, and also when it was busy: the read-closed readiness is never cleared).
    /// A session holds no waker or wait-list node of its own for this.
    fn end(&self, reason: CloseReason) {
        if self.ended.compare_exchange(OPEN, reason.index() as u8, Ordering::AcqRel, Ordering::Acquire).is_err() {
            return;
        }
        // Connected sockets accept SHUT_RD; should the kernel refuse, the task ends at its
        // next reply instead, so say so.
        if let Err(error) = socket2::SockRef::from(&self.upstream).shutdown(std::net::Shutdown::Read) {
            tracing::error!(%error, client = %self.info.context.source, "cannot wake an ended UDP session's reply task");
        }
    }

    /// Why the session ended, once it has.
    fn ended(&self) -> Option<CloseReason> {
        match self.ended.load(Ordering::Acquire) {
            OPEN => None,
            index => CloseReason::from_index(usize::from(index)),
        }
    }

    /// True for the one caller that should run the reply task.
    fn claim_relay(&self) -> bool {
        !self.relay_claimed.swap(true, Ordering::AcqRel)
    }

    /// Sends one client datagram to the backend; false if it had to be dropped.
    fn send_up(&self, data: &[u8]) -> bool {
        // A plain non-blocking send, not tokio's `try_send`: that one refuses until the reactor
        // has seen the socket writable once, which would drop a new session's first datagram.
        // A full socket buffer still fails with WouldBlock, and the datagram is dropped.
        let socket = socket2::SockRef::from(&self.upstream);
        let sent = match &self.header {
            None => socket.send(data),
            Some(header) => BUFFER.with_borrow_mut(|buf| {
                let len = header.len() + data.len();
                let Some(out) = buf.get_mut(..len) else { return Err(io::ErrorKind::InvalidInput.into()) };
                out[..header.len()].copy_from_slice(header);
                out[header.len()..].copy_from_slice(data);
                socket.send(out)
            }),
        };
        if sent.is_ok() {
            self.datagrams_up.fetch_add(1, Ordering::Relaxed);
            self.bytes_up.fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        sent.is_ok()
    }
}

/// A new client while probing decides its route: its place, and its first datagrams in order.
struct Probing {
    probe: QuicInitialProbe,
    held: Vec<Box<[u8]>>,
    started: Instant,
    /// Taken out when probing decides, for the session.
    slot: Option<Slot>,
}

/// Serves one UDP listener: a group of `SO_REUSEPORT` sockets on its address, one per worker
/// thread (the kernel hashes each client to one of them, so a session's datagrams are read on
/// one thread). Not registered with a runtime here: each worker registers its own reader.
pub struct UdpConnectionManager {
    settings: ArcSwap<ListenerSettings>,
    /// The group; replies go out of the first (any of them sends from the listener's address).
    sockets: Vec<std::net::UdpSocket>,
    state: UdpSocketState,
    local: SocketAddr,
    pool: DashMapConnectionPool<SessionKey, Arc<UdpConnection>>,
    /// New clients whose first datagrams are being probed; each holds a place in the pool's
    /// admission, so sessions and probes together stay within `maxConnections`.
    probing: DashMap<SessionKey, Probing>,
}

impl UdpConnectionManager {
    /// Serves `sockets` (non-blocking, bound to one address; at least one). Shutdown ends its
    /// sessions through [`ListenerManager::close_all`].
    pub fn new(settings: ListenerSettings, sockets: Vec<std::net::UdpSocket>) -> io::Result<Self> {
        let first = sockets.first().ok_or_else(|| io::Error::other("a UDP listener needs a socket"))?;
        let local = first.local_addr()?;
        // Each socket gets the options (packet info, GRO) the state sets; one state serves all.
        let state = UdpSocketState::new(UdpSockRef::from(first))?;
        for socket in &sockets[1..] {
            UdpSocketState::new(UdpSockRef::from(socket))?;
        }
        let pool = DashMapConnectionPool::new(settings.limits().max_connections as usize, expiry(&settings));
        for socket in &sockets {
            size_receive_buffer(socket, &settings)?;
        }
        Ok(Self { settings: ArcSwap::from_pointee(settings), sockets, state, local, pool, probing: DashMap::new() })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// A listening socket's receive buffer as the kernel sized it (all of the group's are sized
    /// alike).
    pub fn receive_buffer(&self) -> io::Result<usize> {
        effective_receive_buffer(&self.sockets[0])
    }

    /// One reader per socket of the group (a duplicate descriptor of it), for the receive loops.
    pub fn readers(&self) -> io::Result<Vec<std::net::UdpSocket>> {
        self.sockets.iter().map(std::net::UdpSocket::try_clone).collect()
    }

    /// Reads datagrams from `socket` (one of [`Self::readers`], registered here with the
    /// current runtime, where its sessions then run) until `stop`, dispatching each to its
    /// session; returns the error if the socket fails. The loop that `sweeps` also expires
    /// sessions and probes.
    pub async fn receive(
        self: Arc<Self>,
        socket: std::net::UdpSocket,
        sweeps: bool,
        stop: CancellationToken,
        sessions: TaskTracker,
    ) -> io::Result<()> {
        let socket = UdpSocket::from_std(socket)?;
        let mut buffers = vec![0u8; RECV_BATCH * MAX_DATAGRAM];
        let mut slices: Vec<IoSliceMut<'_>> = buffers.chunks_mut(MAX_DATAGRAM).map(IoSliceMut::new).collect();
        let mut metas = [RecvMeta::default(); RECV_BATCH];
        let sweep_every = (self.settings.load().limits().idle_timeout.get() / 4)
            .clamp(Duration::from_millis(50), Duration::from_secs(1));
        let mut sweep = tokio::time::interval(sweep_every);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Full batches read since the socket was last found empty.
        let mut batches = 0;
        loop {
            if batches >= BATCHES_PER_TURN {
                batches = 0;
                // Deferred until the worker has polled its I/O driver: the reply tasks it wakes
                // run before this loop reads on.
                tokio::task::yield_now().await;
            }
            tokio::select! {
                biased;
                _ = stop.cancelled() => return Ok(()),
                _ = sweep.tick(), if sweeps => { self.sweep(&sessions); continue; }
                ready = socket.readable() => ready?,
            }
            let received =
                recv_batch(&socket, RECV_BATCH, || self.state.recv(UdpSockRef::from(&socket), &mut slices, &mut metas));
            let count = match received {
                Ok((count, drained)) => {
                    batches = if drained { 0 } else { batches + 1 };
                    count
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    batches = 0;
                    continue;
                }
                Err(error) => {
                    // e.g. an ICMP error queued on the socket; the next read goes on.
                    tracing::debug!(%error, "UDP receive error");
                    continue;
                }
            };
            // One settings snapshot per batch, not per datagram.
            let settings = self.settings.load();
            for (meta, slice) in metas.iter().zip(slices.iter()).take(count) {
                let local = SocketAddr::new(meta.dst_ip.unwrap_or(self.local.ip()), self.local.port());
                let stride = meta.stride.max(1);
                for datagram in slice[..meta.len.min(slice.len())].chunks(stride) {
                    self.on_datagram(&settings, (meta.addr, local), datagram, &sessions);
                }
            }
        }
    }

    fn on_datagram(
        self: &Arc<Self>,
        settings: &ListenerSettings,
        key: SessionKey,
        data: &[u8],
        sessions: &TaskTracker,
    ) {
        settings.metrics.datagrams_received.inc();
        settings.metrics.bytes_received.inc_by(data.len() as u64);
        if let Some(sent) = self.pool.get_with(&key, |session| session.value().send_up(data)) {
            if !sent {
                settings.metrics.dropped(DropReason::SendFailed).inc();
            }
            return;
        }
        if settings.probes() {
            self.probe_datagram(settings, key, data, sessions);
        } else {
            self.start(UdpClient::default(), key, &[data], sessions);
        }
    }

    /// Holds a new client's datagrams until probing decides, then starts its session.
    fn probe_datagram(
        self: &Arc<Self>,
        settings: &ListenerSettings,
        key: SessionKey,
        data: &[u8],
        sessions: &TaskTracker,
    ) {
        let decided = {
            let mut probing = match self.probing.entry(key) {
                Entry::Occupied(probing) => probing.into_ref(),
                Entry::Vacant(place) => {
                    let Some(slot) = self.pool.admit() else {
                        settings.metrics.dropped(DropReason::Refused(CloseReason::Limit)).inc();
                        return;
                    };
                    let started = Instant::now();
                    place.insert(Probing {
                        probe: QuicInitialProbe::default(),
                        held: Vec::new(),
                        started,
                        slot: Some(slot),
                    })
                }
            };
            if probing.held.len() >= MAX_QUIC_PROBE_DATAGRAMS {
                settings.metrics.dropped(DropReason::ProbeOverflow).inc();
                return;
            }
            probing.held.push(data.into());
            match probing.probe.push(data) {
                UdpProbe::Incomplete => return,
                UdpProbe::Detected { protocol, info } => {
                    UdpClient { probed: Some((protocol, info)), slot: probing.slot.take() }
                }
                UdpProbe::Unknown => UdpClient { probed: None, slot: probing.slot.take() },
            }
        };
        self.start_probed(key, decided, sessions);
    }

    /// Starts the session of a client whose probe has decided (or timed out), with the
    /// datagrams held for it.
    fn start_probed(self: &Arc<Self>, key: SessionKey, client: UdpClient, sessions: &TaskTracker) {
        // The probing entry goes only now, after the session is in the pool: a datagram that
        // arrives meanwhile is either held here or finds the session, never starts a new probe.
        let session = self.create_connection(client, key.0, key.1);
        let held = self.probing.remove(&key).map(|(_, probing)| probing.held).unwrap_or_default();
        self.deliver(session, &held, sessions);
    }

    /// Creates the session for `client` and delivers `held` to it.
    fn start<D: AsRef<[u8]>>(self: &Arc<Self>, client: UdpClient, key: SessionKey, held: &[D], sessions: &TaskTracker) {
        let session = self.create_connection(client, key.0, key.1);
        self.deliver(session, held, sessions);
    }

    /// Sends `held` to a new session and starts its reply task, or counts them as dropped for
    /// why the session was refused.
    fn deliver<D: AsRef<[u8]>>(
        self: &Arc<Self>,
        session: Result<Arc<UdpConnection>, ConnectionError>,
        held: &[D],
        sessions: &TaskTracker,
    ) {
        match session {
            Ok(session) => {
                for datagram in held {
                    if !session.send_up(datagram.as_ref()) {
                        session.settings.metrics.dropped(DropReason::SendFailed).inc();
                    }
                }
                if session.claim_relay() {
                    super::serve(sessions, self.clone(), session);
                }
            }
            Err(error) => {
                let reason = DropReason::Refused(error.close_reason());
                self.settings.load().metrics.dropped(reason).inc_by(held.len() as u64);
                tracing::debug!(%error, reason = reason.label(), "UDP session refused");
            }
        }
    }

    /// Expires idle and old sessions, and starts probed clients whose probe timed out on the
    /// default route. Work is proportional to what expired (and to the clients being probed).
    fn sweep(self: &Arc<Self>, sessions: &TaskTracker) {
        let settings = self.settings.load();
        for (_, session, why) in self.pool.expire(Instant::now()) {
            session.end(match why {
                Expired::Idle => CloseReason::IdleTimeout,
                Expired::MaxAge => CloseReason::MaxDuration,
            });
            settings.metrics.pool_expired.inc();
        }
        settings.metrics.pool_size.set(self.pool.size() as i64);
        if self.probing.is_empty() {
            return;
        }
        let timeout = settings.limits().probe_timeout.get();
        let overdue: Vec<SessionKey> =
            self.probing.iter().filter(|p| p.started.elapsed() >= timeout).map(|p| *p.key()).collect();
        for key in overdue {
            let slot = match self.probing.entry(key) {
                Entry::Occupied(mut probing) => probing.get_mut().slot.take(),
                Entry::Vacant(_) => None,
            };
            if slot.is_some() {
                self.start_probed(key, UdpClient { probed: None, slot }, sessions);
            }
        }
    }

    /// Reads one batch of `session`'s backend replies into `buffers` and sends each to its
    /// client: the datagrams read (reading stops at the first error).
    fn relay_replies(&self, session: &UdpConnection, buffers: &mut [u8]) -> io::Result<usize> {
        let (client, local) = (session.info.context.source, session.info.context.destination);
        let mut chunks = buffers.chunks_mut(MAX_DATAGRAM);
        let mut slices: [IoSliceMut<'_>; REPLY_RECV_BATCH] =
            std::array::from_fn(|_| IoSliceMut::new(chunks.next().unwrap_or_default()));
        let mut metas = [RecvMeta::default(); REPLY_RECV_BATCH];
        let count = self.state.recv(UdpSockRef::from(&session.upstream), &mut slices, &mut metas)?;
        let metrics = &session.settings.metrics;
        for (meta, slice) in metas.iter().zip(&slices).take(count) {
            let reply = &slice[..meta.len.min(slice.len())];
            if self.send_down(client, local.ip(), reply) {
                metrics.datagrams_sent.inc();
                metrics.bytes_sent.inc_by(reply.len() as u64);
                session.datagrams_down.fetch_add(1, Ordering::Relaxed);
                session.bytes_down.fetch_add(reply.len() as u64, Ordering::Relaxed);
            } else {
                metrics.dropped(DropReason::SendFailed).inc();
            }
        }
        Ok(count)
    }

    /// Sends a backend's reply to the client, from the local address the client wrote to.
    fn send_down(&self, client: SocketAddr, local: IpAddr, data: &[u8]) -> bool {
        let transmit =
            Transmit { destination: client, ecn: None, contents: data, segment_size: None, src_ip: Some(local) };
        // Not through tokio's readiness (see `UdpConnection::send_up`): a plain non-blocking send.
        self.state.try_send(UdpSockRef::from(&self.sockets[0]), &transmit).is_ok()
    }
}

impl ListenerManager for UdpConnectionManager {
    fn settings(&self) -> Arc<ListenerSettings> {
        self.settings.load_full()
    }

    /// Sessions whose backend is still configured keep running; the others end
    /// (`reason="evicted"`).
    fn update(&self, config: ListenerConfig, metrics: &Metrics) {
        let next = ListenerSettings::new(config, Some(&self.settings.load()), metrics);
        if next.limits().receive_buffer_bytes != self.settings.load().limits().receive_buffer_bytes
            && let Err(error) = self.sockets.iter().try_for_each(|socket| size_receive_buffer(socket, &next))
        {
            tracing::warn!(listener = %next.name, %error, "cannot resize the receive buffer; it stays as it was");
        }
        self.pool.set_limits(next.limits().max_connections as usize, expiry(&next));
        let kept: Vec<String> = next.config.all_backends().map(|b| b.address.clone()).collect();
        self.settings.store(Arc::new(next));
        for (key, session) in self.pool.snapshot() {
            if !kept.iter().any(|b| **b == **session.lease.backend().address()) {
                session.end(CloseReason::Evicted);
                self.pool.remove(&key);
            }
        }
    }

    fn pool_stats(&self) -> PoolStats {
        self.pool.stats()
    }

    fn receive_drops(&self) -> Option<u64> {
        self.sockets.iter().map(crate::sys::receive_drops).sum::<io::Result<u64>>().ok()
    }

    fn close_all(&self) {
        for (_, session) in self.pool.drain() {
            session.end(CloseReason::Shutdown);
        }
        self.probing.clear();
    }
}

/// Sets the listening socket's receive buffer to the configured size, and warns when the kernel
/// grants less (it caps the request at `net.core.rmem_max`).
fn size_receive_buffer(socket: &std::net::UdpSocket, settings: &ListenerSettings) -> io::Result<()> {
    let Some(wanted) = settings.limits().receive_buffer_bytes else { return Ok(()) };
    socket2::SockRef::from(socket).set_recv_buffer_size(wanted as usize)?;
    let granted = effective_receive_buffer(socket)?;
    if granted < wanted as usize {
        tracing::warn!(
            listener = %settings.name,
            wanted,
            granted,
            "the kernel grants a smaller UDP receive buffer than configured: raise net.core.rmem_max to get it"
        );
    }
    Ok(())
}

/// The receive buffer's size for datagrams: Linux reports twice what was asked (the other half
/// is its bookkeeping), so half of the reported size.
fn effective_receive_buffer(socket: &std::net::UdpSocket) -> io::Result<usize> {
    Ok(socket2::SockRef::from(socket).recv_buffer_size()? / 2)
}

/// Runs `recv`, one batched read of at most `batch` datagrams from `socket`, under its read
/// readiness: `(count, drained)`, or `WouldBlock` when nothing was queued. A batch short of
/// `batch` emptied the queue (`drained`), so readiness is cleared then, as a `WouldBlock` would,
/// which saves the next `recvmmsg` that would only return `EAGAIN` (edge-triggered: a datagram
/// arriving later raises readiness again).
fn recv_batch(socket: &UdpSocket, batch: usize, recv: impl FnOnce() -> io::Result<usize>) -> io::Result<(usize, bool)> {
    let mut short = 0;
    let received = socket.try_io(Interest::READABLE, || {
        let count = recv()?;
        if count < batch {
            short = count;
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(count)
    });
    match received {
        Ok(count) => Ok((count, false)),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock && short > 0 => Ok((short, true)),
        Err(e) => Err(e),
    }
}

fn expiry(settings: &ListenerSettings) -> Expiry {
    let limits = settings.limits();
    Expiry { idle: limits.idle_timeout.get(), max_age: limits.max_connection_duration.map(|d| d.get()) }
}

/// Takes a session out of the pool if its reply task panics, so that no datagram goes on to a
/// session nobody relays for.
struct LeaveOnUnwind<'a> {
    pool: &'a DashMapConnectionPool<SessionKey, Arc<UdpConnection>>,
    session: &'a UdpConnection,
}

impl Drop for LeaveOnUnwind<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let context = &self.session.info.context;
            self.pool.remove(&(context.source, context.destination));
        }
    }
}

/// A socket connected to the backend: the kernel filters out datagrams from anyone else.
fn connect_upstream(backend: SocketAddr) -> io::Result<UdpSocket> {
    let any: SocketAddr = match backend {
        SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = std::net::UdpSocket::bind(any)?;
    socket.connect(backend)?;
    socket.set_nonblocking(true)?;
    UdpSocket::from_std(socket)
}

impl ConnectionManager for UdpConnectionManager {
    type Client = UdpClient;
    type Connection = Arc<UdpConnection>;

    /// Admits a new client (unless it holds a place already), picks its backend on the route
    /// for what probing found, and adds its session to the pool. When another receive loop
    /// created this client's session a moment earlier, that session is returned instead.
    fn create_connection(
        &self,
        client: UdpClient,
        source: SocketAddr,
        destination: SocketAddr,
    ) -> Result<Arc<UdpConnection>, ConnectionError> {
        let settings = self.settings.load_full();
        let listener = || settings.name.clone();
        let slot = match client.slot {
            Some(slot) => slot,
            None => self.pool.admit().ok_or_else(|| ConnectionError::LimitExceeded {
                listener: listener(),
                src: source,
                max: self.pool.max_size(),
            })?,
        };
        let probed = match &client.probed {
            Some((protocol, info)) => Probed::found((*protocol).into(), info),
            None => Probed::default(),
        };
        let backends =
            settings.route(&probed).ok_or_else(|| ConnectionError::NoRoute { listener: listener(), src: source })?;
        let no_backend = || ConnectionError::NoBackend { listener: listener(), src: source, attempts: 0 };
        let backend = backends.pick(source.ip()).ok_or_else(no_backend)?;
        let address = *backend.state.resolved().first().ok_or_else(no_backend)?;
        let upstream = connect_upstream(address).map_err(|e| super::connect_error(source, address, e))?;
        backend.state.record_success();
        let header = backend.proxy_protocol.map(|version| {
            debug_assert_eq!(version, ProxyProtocolVersion::V2, "checked by config validation");
            let mut header = Vec::new();
            proxy_protocol::write_v2_datagram_header(source, destination, &mut header);
            header.into_boxed_slice()
        });
        let context = ConnectionContext::new(settings.name.clone(), Protocol::Udp, source, destination);
        let session = Arc::new(UdpConnection {
            info: UdpConnectionInfo { context, backend: address },
            upstream,
            header,
            lease: BackendLease::new(backend.state.clone()),
            _open: Open::new(&settings.metrics.active),
            settings: settings.clone(),
            datagrams_up: AtomicU64::new(0),
            bytes_up: AtomicU64::new(0),
            datagrams_down: AtomicU64::new(0),
            bytes_down: AtomicU64::new(0),
            ended: AtomicU8::new(OPEN),
            relay_claimed: AtomicBool::new(false),
        });
        match self.pool.insert_admitted((source, destination), session.clone(), slot) {
            Ok(()) => {
                settings.metrics.accepted.inc();
                Ok(session)
            }
            Err(existing) => Ok(existing),
        }
    }

    /// Relays the backend's replies to the client until the session ends (expired, removed,
    /// or shutdown), then reports it.
    async fn handle_connection(&self, session: Arc<UdpConnection>) -> ConnectionMetrics {
        // Should this task die, the session leaves the pool with it (the guard runs as it unwinds).
        let _leave = LeaveOnUnwind { pool: &self.pool, session: &session };
        // Waits through the socket's own reader slot (no future to keep between wakeups);
        // `end` wakes it through the same readiness.
        while session.ended().is_none() {
            let ready = std::future::poll_fn(|cx| session.upstream.poll_recv_ready(cx)).await;
            if ready.is_err() || session.ended().is_some() {
                break;
            }
            // Drain what is queued (bounded per wakeup, so one busy session cannot starve the
            // others), marking the session used once per batch rather than per datagram.
            let mut relayed = 0;
            while relayed < REPLY_BATCH {
                let received = recv_batch(&session.upstream, REPLY_RECV_BATCH, || {
                    REPLIES.with_borrow_mut(|buffers| self.relay_replies(&session, buffers))
                });
                match received {
                    Ok((count, drained)) => {
                        relayed += count;
                        if drained {
                            break;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    // ICMP port unreachable from the backend surfaces here; the session stays
                    // until it idles out, as the backend may come back.
                    Err(error) => {
                        tracing::debug!(%error, backend = %session.info.backend, "UDP backend error");
                        break;
                    }
                }
            }
            if relayed > 0 {
                // An entry that expired meanwhile stays expired; the sweep ends it.
                // The key is built here, not kept: the task's state is kept small.
                self.pool.touch(&(session.info.context.source, session.info.context.destination));
            }
        }
        // Ended by `end`, or by the runtime's I/O driver going away (the only error waiting
        // for readiness has), which happens only as the proxy shuts down.
        let reason = session.ended().unwrap_or(CloseReason::Shutdown);
        let mut report = ConnectionMetrics::new(session.info.context.clone());
        report.backend_name = Some(session.lease.backend().address().clone());
        report.backend = Some(session.info.backend);
        report.bytes_received = session.bytes_up.load(Ordering::Relaxed);
        report.bytes_sent = session.bytes_down.load(Ordering::Relaxed);
        report.datagrams = Some(Datagrams {
            received: session.datagrams_up.load(Ordering::Relaxed),
            sent: session.datagrams_down.load(Ordering::Relaxed),
        });
        report.close_reason = reason;
        report.close();
        report
    }

    fn connection_count(&self) -> usize {
        self.pool.size()
    }

    fn max_connections(&self) -> usize {
        self.pool.max_size()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::check;
    use tokio::task::JoinHandle;

    /// A manager for a listener on a fresh loopback socket, sending to `backend`.
    fn manager(max: u32, backend: SocketAddr) -> (Arc<UdpConnectionManager>, Metrics) {
        let yaml = format!(
            "listeners:\n- name: dns\n  protocol: UDP\n  address: 127.0.0.1:0\n  backends: [{{address: '{backend}'}}]\n  limits: {{maxConnections: {max}}}\n"
        );
        let config = check(&crate::config::parse_yaml(&yaml).unwrap()).unwrap();
        let metrics = Metrics::new();
        let settings = ListenerSettings::new(config.listeners[0].clone(), None, &metrics);
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.set_nonblocking(true).unwrap();
        (Arc::new(UdpConnectionManager::new(settings, vec![socket]).unwrap()), metrics)
    }

    /// A UDP server on loopback that answers every datagram with "re:" and the datagram.
    async fn answering_backend() -> SocketAddr {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let address = socket.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 1500];
            while let Ok((n, from)) = socket.recv_from(&mut buf).await {
                let _ = socket.send_to(&[b"re:", &buf[..n]].concat(), from).await;
            }
        });
        address
    }

    #[tokio::test]
    async fn udp_session_from_create_connection_relays_replies_and_reports_its_datagrams() {
        let backend = answering_backend().await;
        let (manager, _metrics) = manager(10, backend);
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let (source, local) = (client.local_addr().unwrap(), manager.local_addr());
        let session = manager.create_connection(UdpClient::default(), source, local).unwrap();
        assert_eq!(manager.connection_count(), 1);
        assert_eq!(session.info().backend, backend);
        assert!(session.send_up(b"ping"));
        let relay = tokio::spawn({
            let manager = manager.clone();
            async move { manager.handle_connection(session).await }
        });
        let mut reply = [0u8; 64];
        let (n, from) =
            tokio::time::timeout(Duration::from_secs(10), client.recv_from(&mut reply)).await.unwrap().unwrap();
        assert_eq!((&reply[..n], from), (&b"re:ping"[..], local));

        manager.close_all();
        let report = tokio::time::timeout(Duration::from_secs(10), relay).await.unwrap().unwrap();
        assert_eq!(report.close_reason, CloseReason::Shutdown);
        assert_eq!(report.datagrams, Some(Datagrams { received: 1, sent: 1 }));
        assert_eq!((report.bytes_received, report.bytes_sent), (4, 7));
        assert_eq!(manager.connection_count(), 0);
    }

    /// A session whose backend says nothing: its reply task waits, with nothing to wake it but
    /// the end.
    async fn waiting_session(
        manager: &Arc<UdpConnectionManager>,
    ) -> (Arc<UdpConnection>, JoinHandle<ConnectionMetrics>) {
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let session = manager
            .create_connection(UdpClient::default(), client.local_addr().unwrap(), manager.local_addr())
            .unwrap();
        let relay = tokio::spawn({
            let (manager, session) = (manager.clone(), session.clone());
            async move { manager.handle_connection(session).await }
        });
        // On this current-thread runtime the reply task runs until it waits.
        tokio::task::yield_now().await;
        assert!(!relay.is_finished());
        (session, relay)
    }

    #[tokio::test]
    async fn ending_a_waiting_session_from_another_thread_wakes_its_reply_task() {
        let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let (manager, _metrics) = manager(10, silent.local_addr().unwrap());
        let (session, relay) = waiting_session(&manager).await;
        std::thread::spawn(move || session.end(CloseReason::Evicted)).join().unwrap();
        let report = tokio::time::timeout(Duration::from_secs(10), relay).await.expect("the task woke").unwrap();
        assert_eq!(report.close_reason, CloseReason::Evicted);
    }

    #[tokio::test]
    async fn a_session_ended_twice_reports_the_first_reason() {
        let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let (manager, _metrics) = manager(10, silent.local_addr().unwrap());
        let (session, relay) = waiting_session(&manager).await;
        session.end(CloseReason::IdleTimeout);
        session.end(CloseReason::Shutdown);
        let report = tokio::time::timeout(Duration::from_secs(10), relay).await.unwrap().unwrap();
        assert_eq!(report.close_reason, CloseReason::IdleTimeout);
    }

    #[tokio::test]
    async fn a_flooded_listener_loop_lets_the_workers_other_tasks_run_after_a_turn_of_batches() {
        let (manager, _metrics) = manager(10, "127.0.0.1:9".parse().unwrap());
        // More than two turns' worth, queued before the loop starts (loopback delivers within
        // the send): the socket stays full for the whole first turn, as under a flood.
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        for _ in 0..2 * BATCHES_PER_TURN * RECV_BATCH + 1 {
            client.send_to(b"x", manager.local_addr()).unwrap();
        }
        let (stop, sessions) = (CancellationToken::new(), TaskTracker::new());
        let reader = manager.readers().unwrap().remove(0);
        let receive = tokio::spawn(manager.clone().receive(reader, false, stop.clone(), sessions.clone()));
        // On this current-thread runtime: waits, as the loop does, for the driver's first poll
        // (which finds the socket readable), and then runs when the loop lets it.
        let read_before_other_tasks_ran = tokio::spawn({
            let manager = manager.clone();
            async move {
                tokio::task::yield_now().await;
                manager.settings().metrics.datagrams_received.get()
            }
        });
        let read = read_before_other_tasks_ran.await.unwrap();
        assert_eq!(read, (BATCHES_PER_TURN * RECV_BATCH) as u64, "datagrams read in the loop's first turn");
        stop.cancel();
        receive.await.unwrap().unwrap();
        manager.close_all();
    }

    #[tokio::test]
    async fn udp_sessions_beyond_the_limit_are_refused_and_the_place_comes_back() {
        let (manager, _metrics) = manager(1, "127.0.0.1:9".parse().unwrap());
        let local = manager.local_addr();
        let first: SocketAddr = "127.0.0.1:1001".parse().unwrap();
        let _session = manager.create_connection(UdpClient::default(), first, local).unwrap();
        assert!(!manager.can_accept_connection());
        let refused = manager.create_connection(UdpClient::default(), "127.0.0.1:1002".parse().unwrap(), local);
        assert_eq!(refused.err().map(|e| e.close_reason()), Some(CloseReason::Limit));
        assert_eq!(manager.pool_stats().rejected_inserts, 1);
        manager.close_all();
        assert!(manager.can_accept_connection());
    }

    #[tokio::test]
    async fn second_create_for_the_same_client_gets_the_first_session_and_no_second_relay() {
        let (manager, _metrics) = manager(10, "127.0.0.1:9".parse().unwrap());
        let (source, local) = ("127.0.0.1:1001".parse().unwrap(), manager.local_addr());
        let first = manager.create_connection(UdpClient::default(), source, local).unwrap();
        let second = manager.create_connection(UdpClient::default(), source, local).unwrap();
        assert!(Arc::ptr_eq(&first, &second));
        assert_eq!(manager.connection_count(), 1);
        assert!(first.claim_relay());
        assert!(!second.claim_relay(), "one reply task per session");
    }

    #[tokio::test]
    async fn a_held_place_is_used_for_the_session_and_not_taken_twice() {
        let (manager, _metrics) = manager(1, "127.0.0.1:9".parse().unwrap());
        let slot = manager.pool.admit().expect("a place");
        let client = UdpClient { probed: None, slot: Some(slot) };
        manager.create_connection(client, "127.0.0.1:1001".parse().unwrap(), manager.local_addr()).unwrap();
        assert_eq!(manager.pool_stats().size, 1);
        assert_eq!(manager.pool_stats().rejected_inserts, 0);
    }

    /// A session's memory is mostly its reply task and its `UdpConnection`: 100,000 sessions is
    /// an ordinary load, so both have a bound (state 64 bytes, 96 with the task's wrapper, and
    /// 264; 1,419 B per session in `bench/udp.sh` with the pool entry, the socket's
    /// registration and allocator overhead).
    #[tokio::test]
    async fn a_sessions_task_state_stays_small() {
        let backend = answering_backend().await;
        let (manager, _metrics) = manager(10, backend);
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let (source, local) = (client.local_addr().unwrap(), manager.local_addr());
        let session = manager.create_connection(UdpClient::default(), source, local).unwrap();
        let state = std::mem::size_of_val(&manager.handle_connection(session.clone()));
        let task = std::mem::size_of_val(&super::super::serving(manager.clone(), session));
        assert!(state <= 80, "handle_connection's state is {state} bytes");
        // tokio rounds a task's cell (about 110 bytes of its own around the future) up to a
        // multiple of 128 bytes: up to 144 bytes of future, the cell is 256.
        assert!(task <= 144, "a session's task is {task} bytes");
        let session = std::mem::size_of::<UdpConnection>();
        assert!(session <= 272, "a UdpConnection is {session} bytes");
    }
}
