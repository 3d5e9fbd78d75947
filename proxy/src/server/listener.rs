//! A running listener: its manager behind the one interface the server needs
//! ([`ListenerManager`]), the loops that feed it, and whether they still run ([`Health`]).

use std::{
    io,
    net::SocketAddr,
    sync::{Arc, OnceLock},
};

use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::{
    accept::accept_loop,
    bind::{self, AddressLock, BindError},
    workers::Workers,
};
use crate::{
    config::{ListenerConfig, Protocol},
    connection::{ListenerManager, ListenerSettings, TcpConnectionManager, UdpConnectionManager},
    metrics::Metrics,
};

/// A listener with its accept (TCP) or receive (UDP) loops running.
pub(super) struct RunningListener {
    pub protocol: Protocol,
    /// As configured (may have port 0); reloads match listeners on it and the protocol.
    pub configured: SocketAddr,
    /// As bound.
    pub local: SocketAddr,
    pub manager: Arc<dyn ListenerManager>,
    pub health: Arc<Health>,
    stop_accepting: CancellationToken,
    /// Keeps the address this listener's while it exists ([`bind::Group`]).
    _lock: AddressLock,
}

impl RunningListener {
    pub fn is(&self, listener: &ListenerConfig) -> bool {
        self.protocol == listener.protocol && self.configured == listener.address
    }

    /// Stops the loops; open connections run on.
    pub fn stop_accepting(&self) {
        self.stop_accepting.cancel();
    }
}

/// Whether a listener's loops run. A loop that ends without being stopped (its socket failed,
/// or it panicked) takes the listener down for good: `/readyz` fails naming it, until a
/// restart. Set once, so the failure is logged and counted once however many loops die.
#[derive(Debug, Default)]
pub(super) struct Health {
    down: OnceLock<String>,
}

impl Health {
    /// Why the listener is down, if it is.
    pub fn down(&self) -> Option<&str> {
        self.down.get().map(String::as_str)
    }

    /// Records the first failure; true if this was it.
    fn fail(&self, why: String) -> bool {
        self.down.set(why).is_ok()
    }
}

/// A new listener, bound and with its manager built: everything that can fail is done, and
/// starting it only spawns its loops.
pub(super) struct Bound {
    kind: BoundKind,
    lock: AddressLock,
}

enum BoundKind {
    /// One listening socket per worker.
    Tcp(Vec<std::net::TcpListener>, Arc<TcpConnectionManager>),
    /// One reader per worker.
    Udp(Vec<std::net::UdpSocket>, Arc<UdpConnectionManager>),
}

impl Bound {
    /// Binds `listener`'s socket and builds its manager. `cut` ends TCP connections at the end
    /// of the shutdown drain.
    pub fn new(
        listener: &ListenerConfig,
        metrics: &Metrics,
        cut: &CancellationToken,
        workers: &Workers,
    ) -> Result<Self, BindError> {
        let settings = ListenerSettings::new(listener.clone(), None, metrics);
        Ok(match listener.protocol {
            Protocol::Tcp => {
                let bind::Group { sockets, lock } = bind::tcp_group(listener.address, workers.len())?;
                let manager = Arc::new(TcpConnectionManager::new(settings, cut.clone()));
                Self { kind: BoundKind::Tcp(sockets, manager), lock }
            }
            Protocol::Udp => {
                let bind::Group { sockets, lock } = bind::udp_group(listener.address, workers.len())?;
                let manager = UdpConnectionManager::new(settings, sockets).map_err(BindError::at(listener.address))?;
                let readers = manager.readers().map_err(BindError::at(listener.address))?;
                Self { kind: BoundKind::Udp(readers, Arc::new(manager)), lock }
            }
        })
    }

    /// Spawns the loops; each is supervised, so that one that dies takes the listener down.
    pub fn start(
        self,
        listener: &ListenerConfig,
        connections: &TaskTracker,
        metrics: &Arc<Metrics>,
        workers: &Workers,
    ) -> RunningListener {
        let stop = CancellationToken::new();
        let health = Arc::new(Health::default());
        let supervised = Supervised { listener: listener.name.as_str().into(), health: &health, stop: &stop, metrics };
        let (local, manager): (_, Arc<dyn ListenerManager>) = match self.kind {
            BoundKind::Tcp(sockets, manager) => {
                let local = sockets.first().and_then(|s| s.local_addr().ok()).unwrap_or(listener.address);
                for (socket, worker) in sockets.into_iter().zip(workers.handles()) {
                    let (manager, stop, connections) = (manager.clone(), stop.clone(), connections.clone());
                    // Registered with the worker's runtime there, so its connections stay on it.
                    let accept =
                        async move { accept_loop(TcpListener::from_std(socket)?, manager, stop, connections).await };
                    supervised.spawn_on(worker, "accept", accept);
                }
                (local, manager)
            }
            BoundKind::Udp(readers, manager) => {
                for (i, (reader, worker)) in readers.into_iter().zip(workers.handles()).enumerate() {
                    let receive = manager.clone().receive(reader, i == 0, stop.clone(), connections.clone());
                    supervised.spawn_on(worker, "receive", receive);
                }
                (manager.local_addr(), manager)
            }
        };
        tracing::info!(listener = %listener.name, protocol = ?listener.protocol, address = %local, "listening");
        RunningListener {
            protocol: listener.protocol,
            configured: listener.address,
            local,
            manager,
            health,
            stop_accepting: stop,
            _lock: self.lock,
        }
    }
}

/// What a supervised loop reports to.
struct Supervised<'a> {
    listener: Arc<str>,
    health: &'a Arc<Health>,
    stop: &'a CancellationToken,
    metrics: &'a Arc<Metrics>,
}

impl Supervised<'_> {
    /// Runs `task` on `runtime` (a worker's), and on the current one a watcher that marks the
    /// listener down if the task ends before `stop`.
    fn spawn_on(
        &self,
        runtime: &tokio::runtime::Handle,
        kind: &'static str,
        task: impl Future<Output = io::Result<()>> + Send + 'static,
    ) {
        let task: JoinHandle<io::Result<()>> = runtime.spawn(task);
        let (listener, health, stop, metrics) =
            (self.listener.clone(), self.health.clone(), self.stop.clone(), self.metrics.clone());
        tokio::spawn(async move {
            let why = match task.await {
                Ok(Ok(())) if stop.is_cancelled() => return,
                Ok(Ok(())) => format!("its {kind} loop ended"),
                Ok(Err(error)) => format!("its {kind} loop failed: {error}"),
                Err(error) if error.is_panic() => format!("its {kind} loop panicked"),
                Err(_) => format!("its {kind} loop was aborted"),
            };
            if health.fail(why.clone()) {
                metrics.listener_failed(&listener);
                tracing::error!(%listener, why, "listener down: it accepts nothing more until the proxy restarts");
            }
        });
    }
}
