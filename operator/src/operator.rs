//! One running operator: the lease elector, the controller and the HTTP endpoints, started
//! together and stopped in an order that keeps the lease honest (the controller finishes its
//! in-flight reconciles before the lease is released, so nothing writes after the release).

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use kube::Client;
use l4proxy::telemetry;
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;

use crate::{
    lease::{Elector, Leadership, LeaseConfig},
    metrics::Metrics,
    model::configs::ConfigStore,
    reconcile::{self, Cache, Context, Options},
};

pub struct OperatorConfig {
    pub options: Options,
    pub lease: LeaseConfig,
    /// Where `/metrics`, `/healthz` and `/readyz` are served; `None`: nowhere.
    pub http_address: Option<SocketAddr>,
}

/// A started operator. [`Running::stop`] shuts it down gracefully.
pub struct Running {
    pub metrics: Arc<Metrics>,
    pub configs: Arc<ConfigStore>,
    pub leadership: Leadership,
    /// The bound HTTP address (useful with port 0).
    pub http_address: Option<SocketAddr>,
    health: Arc<Health>,
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

/// The operator as `/metrics` and `/readyz` show it.
struct Health {
    metrics: Arc<Metrics>,
    leadership: Leadership,
    /// Set when the first full list of `L4Proxy` resources is in (the last watch to list).
    ready: AtomicBool,
}

impl telemetry::Observed for Health {
    fn metrics_text(&self) -> String {
        self.metrics.encode()
    }

    fn readiness(&self) -> Result<(), String> {
        if self.ready.load(Ordering::Acquire) { Ok(()) } else { Err("L4Proxy cache not filled yet".into()) }
    }

    /// A follower is ready too (it serves proxies); `/readyz` says which it is.
    fn role(&self) -> Option<String> {
        Some(self.leadership.role().to_owned())
    }
}

impl Running {
    /// Whether the `L4Proxy` cache is filled.
    pub fn is_ready(&self) -> bool {
        self.health.ready.load(Ordering::Acquire)
    }

    /// Stops accepting work, lets in-flight reconciles finish, releases the lease, stops HTTP.
    pub async fn stop(self) {
        self.stop.cancel();
        for task in self.tasks {
            if let Err(e) = task.await {
                tracing::error!(error = %e, "operator task panicked");
            }
        }
    }
}

/// Binds the HTTP address (the only step that can fail) and starts everything.
pub async fn start(client: Client, config: OperatorConfig) -> std::io::Result<Running> {
    let http_socket = match config.http_address {
        Some(addr) => Some(TcpListener::bind(addr).await?),
        None => None,
    };
    let http_address = http_socket.as_ref().map(TcpListener::local_addr).transpose()?;
    let metrics = Arc::new(Metrics::new());
    let configs = Arc::new(ConfigStore::default());

    let stop = CancellationToken::new();
    // Cancelled when the controller has stopped: the lease is released and HTTP stops after it.
    let controller_done = CancellationToken::new();

    let (elector, leadership) = Elector::new(client.clone(), config.lease, metrics.clone());
    let health =
        Arc::new(Health { metrics: metrics.clone(), leadership: leadership.clone(), ready: AtomicBool::new(false) });
    let mut leader_changes = leadership.clone();
    let leader_metrics = metrics.clone();
    let lease_until = controller_done.clone();
    let elector_task = tokio::spawn(async move {
        let mirror = async move {
            loop {
                // `acquisitions` only yields on gaining; poll the flag for the gauge too.
                leader_metrics.set_leader(leader_changes.is_leader());
                if leader_changes.wait_changed().await.is_err() {
                    break;
                }
            }
        };
        tokio::select! {
            () = elector.run(lease_until.cancelled_owned()) => {}
            () = mirror => {}
        }
    });

    let (cache, writers) = Cache::new();
    let ctx = Arc::new(Context {
        recorder: reconcile::recorder(client.clone(), &config.options.identity),
        client,
        cache,
        options: config.options,
        configs: configs.clone(),
        leadership: leadership.clone(),
        metrics: metrics.clone(),
    });
    let controller_health = health.clone();
    let controller_stop = stop.clone();
    let done = controller_done.clone();
    let controller_task = tokio::spawn(async move {
        reconcile::run(ctx, writers, controller_stop.cancelled_owned(), move || {
            controller_health.ready.store(true, Ordering::Release)
        })
        .await;
        tracing::info!("controller stopped");
        done.cancel();
    });
    let mut tasks = vec![controller_task, elector_task];
    if let Some(socket) = http_socket {
        let app = telemetry::router(health.clone());
        tasks.push(tokio::spawn(telemetry::serve(socket, app, telemetry::HttpLimits::default(), controller_done)));
    }
    Ok(Running { metrics, configs, leadership, http_address, health, stop, tasks })
}
