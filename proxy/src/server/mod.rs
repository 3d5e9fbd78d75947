//! The running proxy: its lifecycle (start, reloads that drop nothing, drain on shutdown).
//!
//! - [`bind`]: listening sockets.
//! - `listener`: a running listener, its loops and its health.
//! - `accept`: the TCP accept loop (the UDP receive loop is the UDP manager's).
//! - [`stats`]: the `/stats` document.
//! - `workers`: the data-plane threads, one single-threaded runtime each.

mod accept;
pub mod bind;
mod listener;
pub mod stats;
mod workers;

use std::{
    net::SocketAddr,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    admin,
    config::{self, Config, ConfigError},
    control,
    metrics::Metrics,
};
use bind::BindError;
use listener::{Bound, RunningListener};
use workers::Workers;

/// How often host-name backends are re-resolved.
pub const RESOLVE_INTERVAL: Duration = Duration::from_secs(30);
/// After the drain period, how long cut connections get to unwind before shutdown gives up
/// waiting for them.
const CUT_GRACE: Duration = Duration::from_secs(5);

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

/// Descriptors the process needs besides its connections (runtime, listeners, admin server,
/// log output, config reads), with room to spare.
const BASE_DESCRIPTORS: u64 = 64 + admin::MAX_CONNECTIONS as u64;

/// Warns when the listeners' limits need more file descriptors than the process may open:
/// past that, connections fail with `reason="local_error"` (and accepts fail) before
/// `maxConnections` is reached. A TCP connection takes two descriptors, a UDP session one.
fn warn_if_descriptors_short(config: &Config) {
    let needed: u64 = BASE_DESCRIPTORS
        + config
            .listeners
            .iter()
            .map(|l| {
                let per = if l.protocol == crate::config::Protocol::Tcp { 2 } else { 1 };
                per * u64::from(l.limits.max_connections)
            })
            .sum::<u64>();
    match rlimit::getrlimit(rlimit::Resource::NOFILE) {
        Ok((soft, _)) if soft < needed => tracing::warn!(
            needed,
            limit = soft,
            "the listeners' maxConnections need more file descriptors than the process may open (RLIMIT_NOFILE); \
             beyond the limit new connections fail with reason=local_error: raise the limit or lower maxConnections"
        ),
        Ok(_) => {}
        Err(error) => tracing::warn!(%error, "cannot read the open-file limit"),
    }
}

/// Could not (re)configure: nothing was changed.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error("the proxy is shutting down")]
    ShuttingDown,
    #[error("cannot start the worker threads")]
    Workers(#[source] std::io::Error),
}

impl ApplyError {
    pub fn label(&self) -> &'static str {
        match self {
            Self::Config(e) => e.label(),
            Self::Bind(_) => "bind_failed",
            Self::ShuttingDown => "shutting_down",
            Self::Workers(_) => "workers_failed",
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
    draining: AtomicBool,
    /// Set when a control plane pushes the config: `/readyz` waits for a config to serve and
    /// `/stats` shows the stream's state.
    control: Option<Arc<control::Status>>,
    /// Where connections and sessions are accepted and served: as many as the runtime has
    /// workers.
    workers: Workers,
}

impl Proxy {
    /// Binds every listener (and the admin server) of `config` and starts serving. On error
    /// nothing stays bound.
    pub async fn start(config: Config, metrics: Arc<Metrics>) -> Result<Arc<Self>, ApplyError> {
        Self::start_with(config, metrics, None).await
    }

    /// Like [`Self::start`], for a proxy whose config a control plane pushes (`config` is the
    /// bootstrap, or only the admin server): ready once `control` says a config serves.
    pub(crate) async fn start_controlled(
        config: Config,
        metrics: Arc<Metrics>,
        control: Arc<control::Status>,
    ) -> Result<Arc<Self>, ApplyError> {
        Self::start_with(config, metrics, Some(control)).await
    }

    async fn start_with(
        config: Config,
        metrics: Arc<Metrics>,
        control: Option<Arc<control::Status>>,
    ) -> Result<Arc<Self>, ApplyError> {
        let proxy = Arc::new(Self {
            metrics,
            state: Mutex::new(State::default()),
            config: ArcSwap::from_pointee(Config { admin: None, listeners: Vec::new() }),
            connections: TaskTracker::new(),
            cut: CancellationToken::new(),
            stopping: CancellationToken::new(),
            draining: AtomicBool::new(false),
            control,
            workers: Workers::start(tokio::runtime::Handle::current().metrics().num_workers())
                .map_err(ApplyError::Workers)?,
        });
        proxy.apply(config)?;
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

    /// `Ok` while every listener is accepting; otherwise why not (shutting down, no config
    /// from the control plane yet, or the listeners that are down and why).
    pub fn readiness(&self) -> Result<(), String> {
        if self.draining.load(Ordering::Acquire) {
            return Err("shutting down".into());
        }
        if self.control.as_ref().is_some_and(|c| !c.configured()) {
            return Err("waiting for the first config from the control plane".into());
        }
        let state = self.lock_state();
        let down: Vec<String> = state
            .listeners
            .iter()
            .filter_map(|l| l.health.down().map(|why| format!("listener {} is down: {why}", l.manager.settings().name)))
            .collect();
        if down.is_empty() { Ok(()) } else { Err(down.join("; ")) }
    }

    /// True while every listener is accepting.
    pub fn is_ready(&self) -> bool {
        self.readiness().is_ok()
    }

    /// Brings the counters the kernel keeps (UDP receive drops) into the metrics.
    pub fn follow_kernel_counters(&self) {
        let state = self.lock_state();
        for listener in &state.listeners {
            if let Some(total) = listener.manager.receive_drops() {
                listener.manager.settings().metrics.follow_receive_drops(total);
            }
        }
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
        // Checked under the state lock that shutdown takes after setting it: a reload that
        // finishes during the drain binds nothing new.
        if self.draining.load(Ordering::Acquire) {
            return Err(ApplyError::ShuttingDown);
        }
        let mut fresh = Vec::new();
        for (i, listener) in config.listeners.iter().enumerate() {
            if !state.listeners.iter().any(|r| r.is(listener)) {
                fresh.push((i, Bound::new(listener, &self.metrics, &self.cut, &self.workers)?));
            }
        }
        let admin = match config.admin {
            Some(address) if state.admin.as_ref().map(|a| a.address) != Some(address) => {
                Some((address, bind::tcp(address)?))
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
            next.push(bound.start(listener, &self.connections, &self.metrics, &self.workers));
        }
        for removed in state.listeners.drain(..) {
            removed.stop_accepting();
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
        warn_if_descriptors_short(&config);
        self.config.store(Arc::new(config));
        Ok(())
    }

    /// Applies `config` unless it is the one in force (re-applying would rebuild every
    /// listener's settings: backend health and ejections would start over). True if it was
    /// applied.
    pub fn apply_if_changed(self: &Arc<Self>, config: Config) -> Result<bool, ApplyError> {
        if config == **self.config.load() {
            return Ok(false);
        }
        self.apply(config).map(|()| true)
    }

    /// Loads `path` and applies it. A bad file or a failed bind changes nothing; either way
    /// the attempt is counted and logged.
    pub async fn reload_from(self: &Arc<Self>, path: &Path) -> Result<(), ApplyError> {
        tracing::info!(path = %path.display(), "reloading the config");
        let result = match config::load(path).await {
            Ok(config) => self.apply_if_changed(config),
            Err(e) => Err(e.into()),
        };
        match &result {
            Ok(false) => {
                tracing::debug!(path = %path.display(), "config unchanged");
                return Ok(());
            }
            Ok(true) => {
                tracing::info!(path = %path.display(), listeners = self.config.load().listeners.len(), "config reloaded")
            }
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, reason = e.label(), "config reload rejected; the previous config stays in force")
            }
        }
        self.metrics.reload(result.is_ok());
        result.map(drop)
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

    /// Stops accepting on every listener, lets open connections finish for up to `drain`, then
    /// cuts the rest. Returns how many were cut. The admin server stays up until the end, with
    /// `/readyz` failing.
    pub async fn shutdown(&self, drain: Duration) -> usize {
        self.draining.store(true, Ordering::Release);
        self.stopping.cancel();
        let admin = {
            let mut state = self.lock_state();
            for listener in state.listeners.drain(..) {
                listener.stop_accepting();
                listener.manager.close_all();
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
