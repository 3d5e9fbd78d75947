//! The UDP connection manager: sessions keyed by (client, local address) in a
//! [`DashMapConnectionPool`], each with its own connected socket towards its backend, replies
//! sent from the address the client wrote to, bounded by `maxConnections` and expired by
//! `idleTimeout`.
//!
//! Per-datagram path: one pool lookup (an atomic store marks the session used) and one send;
//! no allocation, no log line. The listener reads in batches (recvmmsg, and GRO where the
//! kernel has it) through `quinn-udp`, which also reports the local address of each datagram.

use std::{
    cell::RefCell,
    io::{self, IoSliceMut},
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicU8, AtomicU64, Ordering},
    },
    time::Duration,
};

use arc_swap::ArcSwap;
use quinn_udp::{RecvMeta, Transmit, UdpSockRef, UdpSocketState};
use tokio::{io::Interest, net::UdpSocket, sync::Notify};
use tokio_util::sync::CancellationToken;

use super::{
    CloseReason, ConnectionContext, ConnectionError, ConnectionManager, ConnectionMetrics, DropReason, ListenerSettings,
};
use crate::{
    backend::{BackendLease, BackendSet},
    config::{ListenerConfig, ProxyProtocolVersion, RouteProtocol},
    metrics::Metrics,
    pool::{ConnectionPool, DashMapConnectionPool, Expiry, PoolStats, SessionKey},
    probe::{QuicInitialProbe, UdpProbe, is_wireguard_initiation},
    proxy_protocol,
    routing::Probed,
};

/// Datagrams read per receive call.
const RECV_BATCH: usize = 8;
/// Largest datagram (IPv4 UDP payload limit); also each receive buffer's size.
const MAX_DATAGRAM: usize = 65_535;
/// Replies relayed per session wakeup before yielding to other sessions.
const REPLY_BATCH: usize = 32;
/// Datagrams held per session while probing decides its route.
pub const MAX_PROBE_DATAGRAMS: usize = 4;

thread_local! {
    // Used only inside one synchronous receive-then-send step, never across an await.
    static BUFFER: RefCell<Box<[u8]>> = RefCell::new(vec![0; MAX_DATAGRAM + proxy_protocol::MAX_HEADER_LEN].into_boxed_slice());
}

/// Who a session is and where it goes.
#[derive(Clone, Debug)]
pub struct UdpConnectionInfo {
    /// `source`: the client; `destination`: the local address it sent to.
    pub context: ConnectionContext,
    pub backend: SocketAddr,
}

/// What a session shares with its reply task: identity and counters for the access-log line
/// at its end, and the signal that it ended. One allocation per session, kept small: 100,000
/// sessions is an ordinary load.
struct SessionShared {
    info: UdpConnectionInfo,
    datagrams_up: AtomicU64,
    bytes_up: AtomicU64,
    datagrams_down: AtomicU64,
    bytes_down: AtomicU64,
    /// `CloseReason` index, set by whoever ends the session, before it ends.
    reason: AtomicU8,
    /// Signalled once, when the session is dropped from the pool (expiry, reload, shutdown).
    /// `notify_one` keeps a permit, so the signal is not lost while the task is busy.
    ended: Notify,
}

/// A UDP session: the pool holds it; dropping the last handle ends its reply task.
pub struct UdpConnection {
    shared: Arc<SessionShared>,
    upstream: Arc<UdpSocket>,
    /// Prefix for every datagram to the backend (PROXY protocol v2, DGRAM), if configured.
    header: Option<Box<[u8]>>,
    lease: BackendLease,
}

impl Drop for UdpConnection {
    fn drop(&mut self) {
        self.shared.ended.notify_one();
    }
}

impl UdpConnection {
    pub fn info(&self) -> &UdpConnectionInfo {
        &self.shared.info
    }

    fn end(&self, reason: CloseReason) {
        self.shared.reason.store(reason.index() as u8, Ordering::Relaxed);
    }

    /// Sends one client datagram to the backend; false if it had to be dropped.
    fn send_up(&self, data: &[u8]) -> bool {
        // A plain non-blocking send, not tokio's `try_send`: that one refuses until the reactor
        // has seen the socket writable once, which would drop a new session's first datagram.
        // A full socket buffer still fails with WouldBlock, and the datagram is dropped.
        let socket = socket2::SockRef::from(&*self.upstream);
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
            self.shared.datagrams_up.fetch_add(1, Ordering::Relaxed);
            self.shared.bytes_up.fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        sent.is_ok()
    }
}

/// A new session while probing decides its route: its first datagrams, held in order.
struct Probing {
    probe: QuicInitialProbe,
    held: Vec<Box<[u8]>>,
    started: tokio::time::Instant,
}

/// The reply side of a session, run by [`ConnectionManager::handle_connection`].
pub struct UdpSessionTask {
    key: SessionKey,
    upstream: Arc<UdpSocket>,
    shared: Arc<SessionShared>,
    settings: Arc<ListenerSettings>,
}

impl UdpSessionTask {
    fn of(key: SessionKey, session: &UdpConnection, settings: Arc<ListenerSettings>) -> Self {
        Self { key, upstream: session.upstream.clone(), shared: session.shared.clone(), settings }
    }
}

/// Serves one UDP listening socket.
pub struct UdpConnectionManager {
    settings: ArcSwap<ListenerSettings>,
    socket: Arc<UdpSocket>,
    state: UdpSocketState,
    local: SocketAddr,
    pool: DashMapConnectionPool<SessionKey, Arc<UdpConnection>>,
    /// New sessions whose first datagrams are being probed; bounded like the pool.
    probing: dashmap::DashMap<SessionKey, Probing>,
}

impl UdpConnectionManager {
    /// Serves `socket`. Shutdown ends its sessions through [`Self::close_all`].
    pub fn new(settings: ListenerSettings, socket: UdpSocket) -> io::Result<Self> {
        let state = UdpSocketState::new(UdpSockRef::from(&socket))?;
        let local = socket.local_addr()?;
        let limits = settings.limits();
        let pool =
            DashMapConnectionPool::new(settings.name.clone(), limits.max_connections as usize, expiry(&settings));
        Ok(Self {
            settings: ArcSwap::from_pointee(settings),
            socket: Arc::new(socket),
            state,
            local,
            pool,
            probing: dashmap::DashMap::new(),
        })
    }

    pub fn settings(&self) -> Arc<ListenerSettings> {
        self.settings.load_full()
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    pub fn pool_stats(&self) -> PoolStats {
        self.pool.stats()
    }

    /// Applies a reloaded listener config. Sessions whose backend is still configured keep
    /// running; the others end (`reason="evicted"`).
    pub fn update(&self, config: ListenerConfig, metrics: &Metrics) {
        let next = ListenerSettings::new(config, Some(&self.settings.load()), metrics);
        self.pool.set_limits(next.limits().max_connections as usize, expiry(&next));
        let kept: Vec<String> = next.config.all_backends().map(|b| b.address.clone()).collect();
        self.settings.store(Arc::new(next));
        for (key, session) in self.pool.snapshot() {
            let backend = session.lease.backend().address();
            if !kept.iter().any(|b| b == backend) {
                session.end(CloseReason::Evicted);
                self.pool.remove(&key);
            }
        }
    }

    /// Ends every session (shutdown).
    pub fn close_all(&self) {
        for (_, session) in self.pool.snapshot() {
            session.end(CloseReason::Shutdown);
        }
        self.pool.clear();
        self.probing.clear();
    }

    /// Expires idle sessions and probes that waited too long; returns the probed sessions
    /// whose probe timed out, to be started on the default route. Work is proportional to
    /// what expired.
    fn sweep(self: &Arc<Self>, sessions: &tokio_util::task::TaskTracker) {
        let settings = self.settings.load();
        for (_, session) in self.pool.expire(tokio::time::Instant::now()) {
            session.end(CloseReason::IdleTimeout);
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
            if let Some((_, probing)) = self.probing.remove(&key) {
                self.start_session(key, &Probed::default(), probing.held, sessions);
            }
        }
    }

    /// Sockets to read the listener from: the listener socket and `count - 1` duplicates of it,
    /// so that `count` receive loops (one per worker thread) drain one queue in parallel.
    pub fn readers(&self, count: usize) -> io::Result<Vec<Arc<UdpSocket>>> {
        let mut readers = vec![self.socket.clone()];
        for _ in 1..count {
            let clone: std::net::UdpSocket = socket2::SockRef::from(&*self.socket).try_clone()?.into();
            readers.push(Arc::new(UdpSocket::from_std(clone)?));
        }
        Ok(readers)
    }

    /// Reads datagrams from `socket` (see [`Self::readers`]) until `stop`, dispatching each to
    /// its session. The loop that `sweeps` also expires sessions.
    pub async fn serve(
        self: Arc<Self>,
        socket: Arc<UdpSocket>,
        sweeps: bool,
        stop: CancellationToken,
        sessions: tokio_util::task::TaskTracker,
    ) {
        let mut buffers = vec![0u8; RECV_BATCH * MAX_DATAGRAM];
        let mut slices: Vec<IoSliceMut<'_>> = buffers.chunks_mut(MAX_DATAGRAM).map(IoSliceMut::new).collect();
        let mut metas = [RecvMeta::default(); RECV_BATCH];
        let sweep_every = (self.settings.load().limits().idle_timeout.get() / 4)
            .clamp(Duration::from_millis(50), Duration::from_secs(1));
        let mut sweep = tokio::time::interval(sweep_every);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                _ = sweep.tick(), if sweeps => { self.sweep(&sessions); continue; }
                ready = socket.readable() => if let Err(error) = ready {
                    tracing::warn!(listener = %self.settings.load().name, %error, "UDP socket failed");
                    return;
                }
            }
            let received = socket
                .try_io(Interest::READABLE, || self.state.recv(UdpSockRef::from(&*socket), &mut slices, &mut metas));
            let count = match received {
                Ok(count) => count,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
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
                    self.on_datagram(&settings, meta.addr, local, datagram, &sessions);
                }
            }
        }
    }

    fn on_datagram(
        self: &Arc<Self>,
        settings: &ListenerSettings,
        client: SocketAddr,
        local: SocketAddr,
        data: &[u8],
        sessions: &tokio_util::task::TaskTracker,
    ) {
        settings.metrics.datagrams_received.inc();
        settings.metrics.bytes_received.inc_by(data.len() as u64);
        let key = (client, local);
        if let Some(sent) = self.pool.get_with(&key, |session| session.send_up(data)) {
            if !sent {
                settings.metrics.dropped(DropReason::SendFailed).inc();
            }
            return;
        }
        if !settings.probes() {
            self.start_session(key, &Probed::default(), vec![data.into()], sessions);
            return;
        }
        self.probe_datagram(key, data, sessions);
    }

    /// Holds a new session's datagrams until probing decides, then starts it.
    fn probe_datagram(self: &Arc<Self>, key: SessionKey, data: &[u8], sessions: &tokio_util::task::TaskTracker) {
        let settings = self.settings.load();
        if is_wireguard_initiation(data) && !self.probing.contains_key(&key) {
            let probed = Probed { protocol: Some(RouteProtocol::WireGuard), ..Default::default() };
            self.start_session(key, &probed, vec![data.into()], sessions);
            return;
        }
        if !self.probing.contains_key(&key)
            && self.probing.len() + self.pool.size() >= settings.limits().max_connections as usize
        {
            settings.metrics.dropped(DropReason::Limit).inc();
            return;
        }
        let decided = {
            let mut probing = self.probing.entry(key).or_insert_with(|| Probing {
                probe: QuicInitialProbe::default(),
                held: Vec::new(),
                started: tokio::time::Instant::now(),
            });
            if probing.held.len() >= MAX_PROBE_DATAGRAMS {
                settings.metrics.dropped(DropReason::ProbeOverflow).inc();
                return;
            }
            probing.held.push(data.into());
            match probing.probe.push(data) {
                UdpProbe::Incomplete if probing.held.len() < MAX_PROBE_DATAGRAMS => None,
                UdpProbe::Detected { protocol, info } => Some(Some((protocol, info))),
                _ => Some(None),
            }
        };
        let Some(found) = decided else { return };
        let Some((_, probing)) = self.probing.remove(&key) else { return };
        let probed = match &found {
            Some((protocol, info)) => Probed::found((*protocol).into(), info),
            None => Probed::default(),
        };
        self.start_session(key, &probed, probing.held, sessions);
    }

    /// Creates a session on the route for `probed`, sends it the held datagrams, and starts
    /// its reply task. Drops (counted) when over the limit or without a backend.
    fn start_session(
        self: &Arc<Self>,
        key: SessionKey,
        probed: &Probed<'_>,
        held: Vec<Box<[u8]>>,
        sessions: &tokio_util::task::TaskTracker,
    ) {
        let settings = self.settings.load_full();
        let drop_all = |reason: DropReason| {
            settings.metrics.dropped(reason).inc_by(held.len() as u64);
        };
        let Some(backends) = settings.route(probed) else { return drop_all(DropReason::NoRoute) };
        let session = match self.create_session(key, backends, &settings) {
            Ok(session) => session,
            // Another receive loop created it a moment ago: use that one.
            Err(ConnectionError::Duplicate { .. }) => {
                for datagram in &held {
                    if self.pool.get_with(&key, |session| session.send_up(datagram)) != Some(true) {
                        settings.metrics.dropped(DropReason::SendFailed).inc();
                    }
                }
                return;
            }
            Err(error) => {
                tracing::debug!(%error, reason = error.label(), "UDP session refused");
                return drop_all(match error {
                    ConnectionError::LimitExceeded { .. } => DropReason::Limit,
                    _ => DropReason::NoBackend,
                });
            }
        };
        for datagram in &held {
            if !session.send_up(datagram) {
                settings.metrics.dropped(DropReason::SendFailed).inc();
            }
        }
        let task = UdpSessionTask::of(key, &session, settings);
        let manager = self.clone();
        sessions.spawn(async move {
            let _ = manager.handle_connection(task).await;
        });
    }

    fn create_session(
        &self,
        key: SessionKey,
        backends: &BackendSet,
        settings: &ListenerSettings,
    ) -> Result<Arc<UdpConnection>, ConnectionError> {
        let (client, local) = key;
        if self.pool.is_full() {
            self.pool.count_rejected();
            return Err(ConnectionError::LimitExceeded {
                listener: settings.name.clone(),
                src: client,
                max: self.pool.max_size(),
            });
        }
        let context = ConnectionContext::new(settings.name.clone(), client, local);
        let no_backend = || ConnectionError::NoBackend { listener: settings.name.clone(), src: client, attempts: 0 };
        let backend = backends.pick(client.ip()).ok_or_else(no_backend)?;
        let address = *backend.state.resolved().first().ok_or_else(no_backend)?;
        let upstream = connect_upstream(address).map_err(|source| ConnectionError::ConnectionFailed {
            src: client,
            dst: address,
            source,
        })?;
        backend.state.record_success();
        let header = backend.proxy_protocol.map(|version| {
            debug_assert_eq!(version, ProxyProtocolVersion::V2, "checked by config validation");
            let mut header = Vec::new();
            proxy_protocol::write_v2_datagram_header(client, local, &mut header);
            header.into_boxed_slice()
        });
        let shared = SessionShared {
            info: UdpConnectionInfo { context, backend: address },
            datagrams_up: AtomicU64::new(0),
            bytes_up: AtomicU64::new(0),
            datagrams_down: AtomicU64::new(0),
            bytes_down: AtomicU64::new(0),
            reason: AtomicU8::new(CloseReason::Shutdown.index() as u8),
            ended: Notify::new(),
        };
        let session = Arc::new(UdpConnection {
            shared: Arc::new(shared),
            upstream: Arc::new(upstream),
            header,
            lease: BackendLease::new(backend.state.clone()),
        });
        self.pool.insert(key, session.clone())?;
        settings.metrics.accepted.inc();
        settings.metrics.active.inc();
        Ok(session)
    }

    /// Sends a backend's reply to the client, from the local address the client wrote to.
    fn send_down(&self, client: SocketAddr, local: IpAddr, data: &[u8]) -> bool {
        let transmit =
            Transmit { destination: client, ecn: None, contents: data, segment_size: None, src_ip: Some(local) };
        // Not through tokio's readiness (see `UdpConnection::send_up`): a plain non-blocking send.
        self.state.try_send(UdpSockRef::from(&*self.socket), &transmit).is_ok()
    }
}

fn expiry(settings: &ListenerSettings) -> Expiry {
    Expiry { idle: settings.limits().idle_timeout.get(), max_age: None }
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
    /// The session key (client, local address) of a new client.
    type Client = SessionKey;
    type Connection = UdpSessionTask;

    /// Creates a session on the default route (probing, when configured, happens on the
    /// datagram path before this).
    fn create_connection(
        &self,
        client: SessionKey,
        source: SocketAddr,
        destination: SocketAddr,
    ) -> Result<UdpSessionTask, ConnectionError> {
        debug_assert_eq!(client, (source, destination));
        let settings = self.settings.load_full();
        let session = self.create_session(client, &settings.backends, &settings)?;
        Ok(UdpSessionTask::of(client, &session, settings))
    }

    /// Relays the backend's replies to the client until the session ends (expired, removed,
    /// or shutdown), then reports it.
    async fn handle_connection(&self, task: UdpSessionTask) -> Result<ConnectionMetrics, ConnectionError> {
        let UdpSessionTask { key, upstream, shared, settings } = task;
        let (client, local) = key;
        loop {
            tokio::select! {
                biased;
                _ = shared.ended.notified() => break,
                ready = upstream.readable() => if ready.is_err() { break },
            }
            // Drain what is queued (bounded per wakeup, so one busy session cannot starve the
            // others), marking the session used once per batch rather than per datagram.
            let mut relayed = 0;
            for _ in 0..REPLY_BATCH {
                let received = BUFFER.with_borrow_mut(|buf| {
                    let n = upstream.try_recv(buf)?;
                    if self.send_down(client, local.ip(), &buf[..n]) {
                        settings.metrics.datagrams_sent.inc();
                        settings.metrics.bytes_sent.inc_by(n as u64);
                        shared.datagrams_down.fetch_add(1, Ordering::Relaxed);
                        shared.bytes_down.fetch_add(n as u64, Ordering::Relaxed);
                    } else {
                        settings.metrics.dropped(DropReason::SendFailed).inc();
                    }
                    Ok::<_, io::Error>(n)
                });
                match received {
                    Ok(_) => relayed += 1,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    // ICMP port unreachable from the backend surfaces here; the session stays
                    // until it idles out, as the backend may come back.
                    Err(error) => {
                        tracing::debug!(%error, backend = %shared.info.backend, "UDP backend error");
                        break;
                    }
                }
            }
            if relayed > 0 {
                // An entry that expired meanwhile stays expired; the sweep ends it.
                self.pool.touch(&key);
            }
        }
        let reason =
            CloseReason::ALL[usize::from(shared.reason.load(Ordering::Relaxed)).min(CloseReason::ALL.len() - 1)];
        let info = &shared.info;
        let mut metrics = ConnectionMetrics {
            backend: Some(info.backend),
            bytes_received: shared.bytes_up.load(Ordering::Relaxed),
            bytes_sent: shared.bytes_down.load(Ordering::Relaxed),
            close_reason: reason,
            lifetime: info.context.started.elapsed(),
            ..Default::default()
        };
        metrics.lifecycle.closed = Some(metrics.lifetime);
        settings.metrics.closed(reason).inc();
        settings.metrics.active.dec();
        settings.metrics.duration.observe(metrics.lifetime.as_secs_f64());
        tracing::info!(
            target: "l4proxy::access",
            session = info.context.id,
            listener = %info.context.listener,
            protocol = "UDP",
            source = %client,
            backend_address = %info.backend,
            datagrams_received = shared.datagrams_up.load(Ordering::Relaxed),
            datagrams_sent = shared.datagrams_down.load(Ordering::Relaxed),
            bytes_received = metrics.bytes_received,
            bytes_sent = metrics.bytes_sent,
            duration_ms = metrics.lifetime.as_millis() as u64,
            reason = reason.label(),
            "session closed"
        );
        Ok(metrics)
    }

    fn connection_count(&self) -> usize {
        self.pool.size()
    }

    fn max_connections(&self) -> usize {
        self.pool.max_size()
    }
}
