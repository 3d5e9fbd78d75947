//! The running proxy: binds listeners, runs their accept loops, applies reloads without
//! dropping connections, reports stats, and drains on shutdown.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use arc_swap::ArcSwap;
use serde::Serialize;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    admin,
    config::{self, Config, ConfigError, ListenerConfig, Protocol},
    connection::{
        CloseReason, ConnectionError, ConnectionManager, DropReason, ListenerSettings, TcpConnectionManager,
        UdpConnectionManager,
    },
    metrics::Metrics,
    pool::PoolStats,
};

/// Pending connections the kernel queues per listener before accept.
pub const LISTEN_BACKLOG: i32 = 1024;
/// Pause after a failed accept (e.g. out of file descriptors), so the loop does not spin.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);
/// How often host-name backends are re-resolved.
pub const RESOLVE_INTERVAL: Duration = Duration::from_secs(30);
/// After the drain period, how long cut connections get to unwind before shutdown gives up
/// waiting for them.
const CUT_GRACE: Duration = Duration::from_secs(5);

/// A listener with its accept (TCP) or receive (UDP) loop running.
struct RunningListener {
    protocol: Protocol,
    /// As configured (may have port 0); reloads match listeners on it and the protocol.
    configured: SocketAddr,
    /// As bound.
    local: SocketAddr,
    manager: Manager,
    stop_accepting: CancellationToken,
}

impl RunningListener {
    fn is(&self, listener: &ListenerConfig) -> bool {
        self.protocol == listener.protocol && self.configured == listener.address
    }
}

/// A listener's connection manager.
#[derive(Clone)]
enum Manager {
    Tcp(Arc<TcpConnectionManager>),
    Udp(Arc<UdpConnectionManager>),
}

impl Manager {
    fn settings(&self) -> Arc<ListenerSettings> {
        match self {
            Self::Tcp(m) => m.settings(),
            Self::Udp(m) => m.settings(),
        }
    }

    fn update(&self, config: ListenerConfig, metrics: &Metrics) {
        match self {
            Self::Tcp(m) => m.update(config, metrics),
            Self::Udp(m) => m.update(config, metrics),
        }
    }

    fn connection_count(&self) -> usize {
        match self {
            Self::Tcp(m) => m.connection_count(),
            Self::Udp(m) => m.connection_count(),
        }
    }

    fn max_connections(&self) -> usize {
        match self {
            Self::Tcp(m) => m.max_connections(),
            Self::Udp(m) => m.max_connections(),
        }
    }

    fn pool_stats(&self) -> PoolStats {
        match self {
            Self::Tcp(m) => m.pool_stats(),
            Self::Udp(m) => m.pool_stats(),
        }
    }
}

/// A bound socket waiting for its listener to start.
/// A new listener, bound and with its manager built: everything that can fail is done, and
/// starting it only spawns its loops.
enum Bound {
    Tcp(TcpListener, Arc<TcpConnectionManager>),
    Udp(Vec<Arc<UdpSocket>>, Arc<UdpConnectionManager>),
}

struct RunningAdmin {
    address: SocketAddr,
    local: SocketAddr,
    stop: CancellationToken,
}

#[derive(Default)]
struct State {
    listeners: Vec<RunningListener>,
    admin: Option<RunningAdmin>,
}

/// Could not (re)configure: nothing was changed.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Bind(#[from] ConnectionError),
}

impl ApplyError {
    pub fn label(&self) -> &'static str {
        match self {
            Self::Config(e) => e.label(),
            Self::Bind(e) => e.label(),
        }
    }
}

/// The proxy process's data plane.
pub struct Proxy {
    metrics: Arc<Metrics>,
    state: Mutex<State>,
    config: ArcSwap<Config>,
    /// Every connection task, across listeners past and present.
    connections: TaskTracker,
    /// Cancelled at the end of the drain period: cuts connections still open.
    cut: CancellationToken,
    /// Cancelled when shutdown begins: stops background work (re-resolution).
    stopping: CancellationToken,
    ready: AtomicBool,
}

impl Proxy {
    /// Binds every listener (and the admin server) of `config` and starts serving. On error
    /// nothing stays bound.
    pub async fn start(config: Config, metrics: Arc<Metrics>) -> Result<Arc<Self>, ApplyError> {
        let proxy = Arc::new(Self {
            metrics,
            state: Mutex::new(State::default()),
            config: ArcSwap::from_pointee(Config { admin: None, listeners: Vec::new() }),
            connections: TaskTracker::new(),
            cut: CancellationToken::new(),
            stopping: CancellationToken::new(),
            ready: AtomicBool::new(false),
        });
        proxy.apply(config)?;
        proxy.ready.store(true, Ordering::Release);
        tokio::spawn(proxy.clone().re_resolve_periodically());
        Ok(proxy)
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The config in force.
    pub fn config(&self) -> Arc<Config> {
        self.config.load_full()
    }

    /// True while every configured listener is bound and accepting.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// `Ok` while ready for traffic, else why not.
    pub fn readiness(&self) -> Result<(), String> {
        if self.is_ready() { Ok(()) } else { Err("shutting down".into()) }
    }

    /// Bound address of the listener named `name`.
    pub fn listener_address(&self, name: &str) -> Option<SocketAddr> {
        let state = self.lock_state();
        state.listeners.iter().find(|l| *l.manager.settings().name == *name).map(|l| l.local)
    }

    /// Bound address of the admin server.
    pub fn admin_address(&self) -> Option<SocketAddr> {
        self.lock_state().admin.as_ref().map(|a| a.local)
    }

    fn lock_state(&self) -> std::sync::MutexGuard<'_, State> {
        // Holders never panic between related updates, so a poisoned state is still consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies a checked config: binds what is new first (an error changes nothing), then
    /// updates kept listeners in place (same address: the bound socket stays, so no connection
    /// is refused), starts new ones and stops accepting on removed ones. Established
    /// connections of every listener run on untouched.
    pub fn apply(self: &Arc<Self>, config: Config) -> Result<(), ApplyError> {
        let mut state = self.lock_state();
        let mut fresh = Vec::new();
        for (i, listener) in config.listeners.iter().enumerate() {
            if !state.listeners.iter().any(|r| r.is(listener)) {
                fresh.push((i, self.prepare_listener(listener)?));
            }
        }
        let admin = match config.admin {
            Some(address) if state.admin.as_ref().map(|a| a.address) != Some(address) => {
                Some((address, bind(address)?))
            }
            _ => None,
        };

        let mut next = Vec::with_capacity(config.listeners.len());
        let mut fresh = fresh.into_iter().peekable();
        for (i, listener) in config.listeners.iter().enumerate() {
            if let Some(pos) = state.listeners.iter().position(|r| r.is(listener)) {
                let running = state.listeners.swap_remove(pos);
                running.manager.update(listener.clone(), &self.metrics);
                next.push(running);
                continue;
            }
            let Some((_, bound)) = fresh.next_if(|(j, _)| *j == i) else {
                unreachable!("every listener not running was bound above, in order")
            };
            next.push(self.start_listener(listener, bound));
        }
        for removed in state.listeners.drain(..) {
            removed.stop_accepting.cancel();
            tracing::info!(listener = %removed.manager.settings().name, address = %removed.local, "listener removed; its open connections continue");
        }
        state.listeners = next;

        // The admin server moves when its address changes and stops when it is removed.
        if (admin.is_some() || config.admin.is_none())
            && let Some(old) = state.admin.take()
        {
            old.stop.cancel();
        }
        if let Some((address, socket)) = admin {
            state.admin = Some(self.spawn_admin(address, socket));
        }
        self.config.store(Arc::new(config));
        Ok(())
    }

    /// Loads `path` and applies it. A bad file or a failed bind changes nothing; either way
    /// the attempt is counted and logged.
    pub async fn reload_from(self: &Arc<Self>, path: &Path) -> Result<(), ApplyError> {
        let result = match config::load(path).await {
            Ok(config) if config == **self.config.load() => {
                tracing::debug!(path = %path.display(), "config unchanged");
                return Ok(());
            }
            Ok(config) => self.apply(config),
            Err(e) => Err(e.into()),
        };
        self.metrics.reload(result.is_ok());
        match &result {
            Ok(()) => {
                tracing::info!(path = %path.display(), listeners = self.config.load().listeners.len(), "config reloaded")
            }
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, reason = e.label(), "config reload rejected; the previous config stays in force")
            }
        }
        result
    }

    /// Binds a new listener and builds its manager; nothing is started yet.
    fn prepare_listener(&self, listener: &ListenerConfig) -> Result<Bound, ApplyError> {
        let settings = ListenerSettings::new(listener.clone(), None, &self.metrics);
        let failed = |source| ConnectionError::BindFailed { address: listener.address, source };
        Ok(match listener.protocol {
            Protocol::Tcp => {
                let socket = bind(listener.address)?;
                Bound::Tcp(socket, Arc::new(TcpConnectionManager::new(settings, self.cut.clone())))
            }
            Protocol::Udp => {
                let manager = UdpConnectionManager::new(settings, bind_udp(listener.address)?).map_err(failed)?;
                // One receive loop per worker thread, so a flood is read on every core.
                let workers = tokio::runtime::Handle::current().metrics().num_workers();
                Bound::Udp(manager.readers(workers).map_err(failed)?, Arc::new(manager))
            }
        })
    }

    /// Spawns a prepared listener's accept or receive loops.
    fn start_listener(&self, listener: &ListenerConfig, bound: Bound) -> RunningListener {
        let stop_accepting = CancellationToken::new();
        let (local, manager) = match bound {
            Bound::Tcp(socket, manager) => {
                let local = socket.local_addr().unwrap_or(listener.address);
                tokio::spawn(accept_loop(socket, manager.clone(), stop_accepting.clone(), self.connections.clone()));
                (local, Manager::Tcp(manager))
            }
            Bound::Udp(readers, manager) => {
                for (i, reader) in readers.into_iter().enumerate() {
                    let serve = manager.clone().serve(reader, i == 0, stop_accepting.clone(), self.connections.clone());
                    tokio::spawn(serve);
                }
                (manager.local_addr(), Manager::Udp(manager))
            }
        };
        tracing::info!(listener = %listener.name, protocol = ?listener.protocol, address = %local, "listening");
        RunningListener { protocol: listener.protocol, configured: listener.address, local, manager, stop_accepting }
    }

    fn spawn_admin(self: &Arc<Self>, address: SocketAddr, socket: TcpListener) -> RunningAdmin {
        let local = socket.local_addr().unwrap_or(address);
        let stop = CancellationToken::new();
        tracing::info!(address = %local, "admin server listening");
        tokio::spawn(admin::serve(socket, self.clone(), stop.clone()));
        RunningAdmin { address, local, stop }
    }

    async fn re_resolve_periodically(self: Arc<Self>) {
        let mut tick = tokio::time::interval(RESOLVE_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await; // the first tick is immediate; the config was just resolved
        loop {
            tokio::select! {
                _ = self.stopping.cancelled() => return,
                _ = tick.tick() => {}
            }
            let settings: Vec<_> = self.lock_state().listeners.iter().map(|l| l.manager.settings()).collect();
            for listener in settings {
                for backend in listener.backend_sets().flat_map(|set| set.backends()) {
                    backend.state.refresh().await;
                }
            }
        }
    }

    /// Per-listener counters, gauges and backend health.
    pub fn stats(&self) -> Stats {
        let state = self.lock_state();
        let listeners = state
            .listeners
            .iter()
            .map(|running| {
                let settings = running.manager.settings();
                let m = &settings.metrics;
                let udp = (settings.config.protocol == Protocol::Udp).then(|| UdpStats {
                    datagrams_received: m.datagrams_received.get(),
                    datagrams_sent: m.datagrams_sent.get(),
                    dropped: DropReason::ALL.iter().map(|&r| (r.label(), m.dropped(r).get())).collect(),
                });
                ListenerStats {
                    name: settings.name.to_string(),
                    protocol: settings.config.protocol,
                    address: running.local,
                    active: running.manager.connection_count(),
                    max_connections: running.manager.max_connections(),
                    accepted: m.accepted.get(),
                    rejected: m.rejected_limit.get(),
                    closed: CloseReason::ALL.iter().map(|&r| (r.label(), m.closed(r).get())).collect(),
                    bytes_received: m.bytes_received.get(),
                    bytes_sent: m.bytes_sent.get(),
                    pool_stats: running.manager.pool_stats(),
                    udp,
                    backends: settings
                        .backend_sets()
                        .flat_map(|set| set.backends())
                        .map(|b| BackendStats {
                            address: b.state.address().to_owned(),
                            resolved: b.state.resolved().to_vec(),
                            weight: b.weight,
                            active: b.state.active(),
                            ejected: b.state.is_ejected(),
                            consecutive_failures: b.state.consecutive_failures(),
                        })
                        .collect(),
                }
            })
            .collect();
        Stats { ready: self.is_ready(), open_connections: self.connections.len(), listeners }
    }

    /// Stops accepting on every listener, lets open connections finish for up to `drain`, then
    /// cuts the rest. Returns how many were cut. The admin server stays up until the end, with
    /// `/readyz` failing.
    pub async fn shutdown(&self, drain: Duration) -> usize {
        self.ready.store(false, Ordering::Release);
        self.stopping.cancel();
        let admin = {
            let mut state = self.lock_state();
            for listener in state.listeners.drain(..) {
                listener.stop_accepting.cancel();
                // UDP sessions have no end of their own to wait for: end them now.
                if let Manager::Udp(udp) = &listener.manager {
                    udp.close_all();
                }
            }
            state.admin.take()
        };
        self.connections.close();
        tracing::info!(open = self.connections.len(), drain = ?drain, "shutting down: stopped accepting, draining");
        let cut = match tokio::time::timeout(drain, self.connections.wait()).await {
            Ok(()) => 0,
            Err(_) => {
                let open = self.connections.len();
                self.cut.cancel();
                if tokio::time::timeout(CUT_GRACE, self.connections.wait()).await.is_err() {
                    tracing::warn!(left = self.connections.len(), "connections still unwinding after the cut");
                }
                open
            }
        };
        if let Some(admin) = admin {
            admin.stop.cancel();
        }
        tracing::info!(cut, "shutdown complete");
        cut
    }
}

/// Binds a UDP socket for a listener.
pub fn bind_udp(address: SocketAddr) -> Result<UdpSocket, ConnectionError> {
    let bind = || -> std::io::Result<UdpSocket> {
        let socket = socket2::Socket::new(socket2::Domain::for_address(address), socket2::Type::DGRAM, None)?;
        socket.set_reuse_address(true)?;
        socket.set_nonblocking(true)?;
        // The receive buffer stays at the kernel default (net.core.rmem_default): a larger one
        // absorbs bursts of new clients, but under a flood it only queues datagrams that the
        // rest of the path cannot carry, and delivered throughput fell by half in the benchmark.
        socket.bind(&address.into())?;
        UdpSocket::from_std(socket.into())
    };
    bind().map_err(|source| ConnectionError::BindFailed { address, source })
}

/// Binds a listening TCP socket with address reuse, so a restart does not wait out TIME_WAIT.
pub fn bind(address: SocketAddr) -> Result<TcpListener, ConnectionError> {
    let bind = || -> std::io::Result<TcpListener> {
        let socket = socket2::Socket::new(socket2::Domain::for_address(address), socket2::Type::STREAM, None)?;
        socket.set_reuse_address(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&address.into())?;
        socket.listen(LISTEN_BACKLOG)?;
        TcpListener::from_std(socket.into())
    };
    bind().map_err(|source| ConnectionError::BindFailed { address, source })
}

async fn accept_loop(
    socket: TcpListener,
    manager: Arc<TcpConnectionManager>,
    stop: CancellationToken,
    connections: TaskTracker,
) {
    let local = socket.local_addr().ok();
    // One cancellation future for the loop's life: registering a fresh one per accept costs a
    // lock on the token each time.
    let mut stopped = std::pin::pin!(stop.cancelled());
    loop {
        let accepted: std::io::Result<(TcpStream, SocketAddr)> = tokio::select! {
            biased;
            _ = &mut stopped => return,
            accepted = socket.accept() => accepted,
        };
        let (client, source) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                manager.settings().metrics.accept_errors.inc();
                tracing::warn!(listener = %manager.settings().name, %error, "accept failed");
                tokio::select! {
                    _ = &mut stopped => return,
                    _ = tokio::time::sleep(ACCEPT_ERROR_BACKOFF) => continue,
                }
            }
        };
        let destination = local.unwrap_or(source);
        match manager.create_connection(client, source, destination) {
            Ok(connection) => {
                let manager = manager.clone();
                connections.spawn(async move {
                    // The outcome is already counted and logged by the manager.
                    let _ = manager.handle_connection(connection).await;
                });
            }
            Err(error) => tracing::debug!(%error, reason = error.label(), "connection rejected"),
        }
    }
}

/// `/stats` body.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Stats {
    pub ready: bool,
    pub open_connections: usize,
    pub listeners: Vec<ListenerStats>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ListenerStats {
    pub name: String,
    pub protocol: Protocol,
    pub address: SocketAddr,
    pub active: usize,
    pub max_connections: usize,
    pub accepted: u64,
    pub rejected: u64,
    pub closed: BTreeMap<&'static str, u64>,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    /// TCP: open connections as pool entries; UDP: the session pool.
    pub pool_stats: PoolStats,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub udp: Option<UdpStats>,
    pub backends: Vec<BackendStats>,
}

/// UDP listener counters.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UdpStats {
    pub datagrams_received: u64,
    pub datagrams_sent: u64,
    pub dropped: BTreeMap<&'static str, u64>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BackendStats {
    pub address: String,
    pub resolved: Vec<SocketAddr>,
    pub weight: u32,
    pub active: usize,
    pub ejected: bool,
    pub consecutive_failures: u32,
}
