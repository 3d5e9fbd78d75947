//! One running operator: the lease elector, the controller and the HTTP endpoints, started
//! together and stopped in an order that keeps the lease honest (the controller finishes its
//! in-flight reconciles before the lease is released, so nothing writes after the release).

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::{
    Api, Client,
    runtime::{WatchStreamExt, reflector, watcher},
};
use l4proxy::telemetry;
use tokio::{net::TcpListener, sync::mpsc, task::JoinHandle};
use tokio_util::sync::CancellationToken;

use crate::{
    certs::{Certificates, CertsConfig, CertsError},
    config::{self, Registry},
    lease::{Elector, Leadership, LeaseConfig},
    metrics::Metrics,
    model::configs::ConfigStore,
    model::gateway::GatewayControl,
    model::injection::{self, Sidecar},
    reconcile::{
        self, Cache, Context, Options,
        proxies::{self, ProxyStatus, REPORT_LABEL},
    },
    webhook::{self, Injector},
};

async fn bind(
    what: &'static str,
    address: Option<SocketAddr>,
) -> Result<(Option<TcpListener>, Option<SocketAddr>), StartError> {
    let Some(address) = address else { return Ok((None, None)) };
    let failed = |source| StartError::Bind { what, address, source };
    let socket = TcpListener::bind(address).await.map_err(failed)?;
    let local = socket.local_addr().map_err(failed)?;
    Ok((Some(socket), Some(local)))
}

/// Reconciles asked for by proxy changes and not started yet (one per resource per status
/// interval at most; beyond, the next interval asks again).
const TRIGGER_QUEUE: usize = 1024;

pub struct OperatorConfig {
    pub options: Options,
    pub lease: LeaseConfig,
    /// Where `/metrics`, `/healthz` and `/readyz` are served; `None`: nowhere.
    pub http_address: Option<SocketAddr>,
    /// The config service; `None`: no proxy is served (the reconciler still holds configs).
    pub config_service: Option<ConfigServiceConfig>,
    /// How often the proxies' reports are summed up into status (`--status-interval`).
    pub status_interval: Duration,
    /// The sidecar-injection webhook; `None`: not served. Needs the config service (its
    /// certificate, and the URL sidecars dial).
    pub webhook: Option<WebhookConfig>,
}

/// Where the injection webhook listens, which configuration's `caBundle` it keeps, and what
/// sidecars get.
pub struct WebhookConfig {
    pub address: SocketAddr,
    /// The MutatingWebhookConfiguration whose webhooks get the CA; `None`: someone else sets it.
    pub configuration: Option<String>,
    /// The sidecar's image.
    pub image: String,
    /// The sidecar's default resources (pods' annotations override them).
    pub resources: injection::Resources,
}

/// Where the config service listens and what its certificate says.
pub struct ConfigServiceConfig {
    pub address: SocketAddr,
    /// The serving certificate's names (127.0.0.1 is always added).
    pub dns_names: Vec<String>,
    /// What pods (gateways, injected sidecars) dial; `None`: gateway pods read only their
    /// ConfigMap, and no sidecar can be injected.
    pub pod_url: Option<String>,
    /// Most proxies this replica serves at once.
    pub max_proxies: usize,
}

/// Why the operator could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("binding {what} {address}")]
    Bind {
        what: &'static str,
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the config service's certificates")]
    Certificates(#[from] CertsError),
    #[error("the webhook: {0}")]
    Webhook(String),
}

/// A started operator. [`Running::stop`] shuts it down gracefully.
pub struct Running {
    pub metrics: Arc<Metrics>,
    pub configs: Arc<ConfigStore>,
    pub leadership: Leadership,
    /// The bound HTTP address (useful with port 0).
    pub http_address: Option<SocketAddr>,
    /// The bound config service address (useful with port 0).
    pub config_service_address: Option<SocketAddr>,
    /// The bound webhook address (useful with port 0).
    pub webhook_address: Option<SocketAddr>,
    /// The proxies connected to this replica.
    pub registry: Arc<Registry>,
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

/// Binds the HTTP and config service addresses and loads the certificates (the steps that can
/// fail), then starts everything.
pub async fn start(client: Client, mut config: OperatorConfig) -> Result<Running, StartError> {
    let (http_socket, http_address) = bind("--http-address", config.http_address).await?;
    let (config_socket, config_service_address) =
        bind("--config-service-address", config.config_service.as_ref().map(|s| s.address)).await?;
    let (webhook_socket, webhook_address) =
        bind("--webhook-address", config.webhook.as_ref().map(|w| w.address)).await?;
    let pod_url = config.config_service.as_ref().and_then(|s| s.pod_url.clone());
    if let Some(webhook) = &config.webhook {
        if pod_url.is_none() {
            return Err(StartError::Webhook("injected sidecars need the config service and the URL pods dial".into()));
        }
        let flags = injection::RESOURCE_FLAGS;
        webhook.resources.check_as(flags).map_err(StartError::Webhook)?;
    }
    let metrics = Arc::new(Metrics::new());
    let configs = Arc::new(ConfigStore::default());

    let stop = CancellationToken::new();
    // Cancelled when the controller has stopped: the lease is released and HTTP stops after it.
    let controller_done = CancellationToken::new();

    let lease_namespace = config.lease.namespace.clone();
    let certificates = match &config.config_service {
        Some(service) => {
            let certs = CertsConfig::new(lease_namespace.clone(), service.dns_names.clone());
            let certificates = Certificates::start(client.clone(), certs, metrics.clone(), stop.clone()).await?;
            config.options.gateway_control =
                service.pod_url.clone().map(|url| GatewayControl { url, ca_pem: certificates.ca_pem() });
            Some(certificates)
        }
        None => None,
    };
    let identity = config.lease.identity.clone();
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
    let proxy_status = Arc::new(ProxyStatus::default());
    let max_proxies = config.config_service.as_ref().map_or(0, |s| s.max_proxies);
    let registry = Registry::new(max_proxies);
    let ctx = Arc::new(Context {
        recorder: reconcile::recorder(client.clone(), &config.options.identity),
        client: client.clone(),
        cache: cache.clone(),
        options: config.options,
        configs: configs.clone(),
        proxy_status: proxy_status.clone(),
        leadership: leadership.clone(),
        metrics: metrics.clone(),
    });
    // Proxy streams end as soon as the operator stops (a clean close: proxies reconnect to
    // another replica at once).
    let mut tasks = Vec::new();
    if let (Some(socket), Some(certificates)) = (config_socket, &certificates) {
        let shared = Arc::new(config::Shared {
            auth: config::auth::Authenticator::new(client.clone()),
            configs: configs.clone(),
            resources: cache.resources().clone(),
            registry: registry.clone(),
            metrics: metrics.clone(),
            shutdown: stop.clone(),
        });
        if let Some(address) = config_service_address {
            tracing::info!(address = %config::describe(address), "config service listening");
        }
        tasks.push(tokio::spawn(config::serve(socket, certificates.server_config(), shared)));
    }
    if let (Some(webhook), Some(socket), Some(certificates), Some(pod_url)) =
        (config.webhook, webhook_socket, &certificates, pod_url)
    {
        let ca_pem = certificates.ca_pem();
        let sidecar = Sidecar {
            image: webhook.image,
            control_plane: pod_url,
            ca_pem: ca_pem.clone(),
            resources: webhook.resources,
        };
        let injector = Injector::new(
            sidecar,
            client.clone(),
            cache.resources().clone(),
            &lease_namespace,
            reconcile::recorder(client.clone(), &identity),
            metrics.clone(),
        );
        if let Some(address) = webhook_address {
            tracing::info!(address = %format!("https://{address}{}", webhook::PATH), "injection webhook listening");
        }
        tasks.push(tokio::spawn(webhook::serve(
            socket,
            certificates.server_config(),
            Arc::new(injector),
            stop.clone(),
        )));
        if let Some(name) = webhook.configuration {
            tasks.push(tokio::spawn(webhook::ca_bundle::keep(
                client.clone(),
                name,
                ca_pem,
                metrics.clone(),
                stop.clone(),
            )));
        }
    }
    if let Some(certificates) = certificates {
        tasks.push(tokio::spawn(certificates.stopped()));
    }
    let (triggers, triggered) = mpsc::channel(TRIGGER_QUEUE);
    let (reports, reports_writer) = reflector::store();
    let report_watch = watcher(
        Api::<ConfigMap>::namespaced(client.clone(), &lease_namespace),
        watcher::Config::default().labels(&format!("{REPORT_LABEL}=true")),
    )
    .default_backoff()
    .reflect(reports_writer)
    .take_until(stop.clone().cancelled_owned())
    .for_each(|_| std::future::ready(()));
    tasks.push(tokio::spawn(report_watch));
    let aggregation = proxies::Aggregation {
        client,
        namespace: lease_namespace,
        identity,
        interval: config.status_interval,
        registry: registry.clone(),
        configs: configs.clone(),
        status: proxy_status,
        leadership: leadership.clone(),
        reports,
        triggers,
    };
    tasks.push(tokio::spawn(proxies::run(aggregation, stop.clone())));
    let controller_health = health.clone();
    let controller_stop = stop.clone();
    let done = controller_done.clone();
    let controller_task = tokio::spawn(async move {
        let triggered = futures::stream::unfold(triggered, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) });
        reconcile::run(ctx, writers, triggered, controller_stop.cancelled_owned(), move || {
            controller_health.ready.store(true, Ordering::Release)
        })
        .await;
        tracing::info!("controller stopped");
        done.cancel();
    });
    tasks.extend([controller_task, elector_task]);
    if let Some(socket) = http_socket {
        let app = telemetry::router(health.clone());
        tasks.push(tokio::spawn(telemetry::serve(socket, app, telemetry::HttpLimits::default(), controller_done)));
    }
    Ok(Running {
        metrics,
        configs,
        leadership,
        http_address,
        config_service_address,
        webhook_address,
        registry,
        health,
        stop,
        tasks,
    })
}
