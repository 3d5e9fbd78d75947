//! `l4proxy-operator`: `crd` prints the CRD; `run` runs the operator.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use kube::{Client, Config, config::KubeConfigOptions};
use l4proxy::{
    config::ConfigDuration,
    telemetry::{self, LogFormat},
};
use l4proxy_operator::{
    ConfigServiceConfig, OperatorConfig, WebhookConfig, api::crd::crd_yaml, certs, lease::LeaseConfig,
    model::injection, reconcile::Options,
};

/// The operator's Services in the chart: the names proxies reach the config service by, and the
/// API server the webhook.
const SERVICE_NAME: &str = "l4proxy-operator";
const WEBHOOK_SERVICE_NAME: &str = "l4proxy-operator-webhook";

#[derive(Parser)]
#[command(name = "l4proxy-operator", version, about = "Kubernetes operator for l4proxy")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the L4Proxy CustomResourceDefinition as YAML.
    Crd,
    /// Run the operator.
    Run(Box<RunArgs>),
}

#[derive(Parser)]
struct RunArgs {
    /// Kubeconfig file. Default: $KUBECONFIG, ~/.kube/config, or the in-cluster service account.
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Watch only this namespace. Default: all namespaces.
    #[arg(long, env = "WATCH_NAMESPACE")]
    namespace: Option<String>,
    /// Where /metrics, /healthz and /readyz are served.
    #[arg(long, default_value = "0.0.0.0:8080")]
    http_address: SocketAddr,
    /// Image of gateway pods (an L4Proxy's spec.gateway.image overrides it).
    #[arg(long, env = "L4PROXY_IMAGE", default_value = concat!("ghcr.io/l4proxy/l4proxy:", env!("CARGO_PKG_VERSION")))]
    proxy_image: String,
    /// Allow Service backends in namespaces other than the L4Proxy's.
    #[arg(long)]
    allow_cross_namespace_services: bool,
    /// Reconcile every resource at least this often, even without changes.
    #[arg(long, default_value = "5m")]
    resync: ConfigDuration,
    /// Most reconciles running at once.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=1024))]
    max_concurrent_reconciles: u16,
    /// This replica's identity in the Lease and in Events. Default: $POD_NAME, else host name and pid.
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Namespace of the leader-election Lease. Default: $POD_NAMESPACE, else --namespace, else "default".
    #[arg(long, env = "POD_NAMESPACE")]
    lease_namespace: Option<String>,
    /// Name of the leader-election Lease.
    #[arg(long, default_value = "l4proxy-operator")]
    lease_name: String,
    /// How long a lease holder that stopped renewing keeps the lease from others.
    #[arg(long, default_value = "15s")]
    lease_duration: ConfigDuration,
    /// How long the holder keeps writing after its last successful renewal (< lease duration).
    #[arg(long, default_value = "10s")]
    lease_renew_deadline: ConfigDuration,
    /// How often the lease is renewed or tried.
    #[arg(long, default_value = "2s")]
    lease_retry_period: ConfigDuration,
    /// Where the config service (gRPC over TLS) listens for proxies.
    #[arg(long, default_value = "0.0.0.0:8443")]
    config_service_address: SocketAddr,
    /// Names in the serving certificate of the config service and the webhook (comma-separated;
    /// 127.0.0.1 is always added). Default: the chart's Services,
    /// `l4proxy-operator[.NAMESPACE[.svc]]` and `l4proxy-operator-webhook[.NAMESPACE[.svc]]`.
    #[arg(long, value_delimiter = ',')]
    config_service_dns_names: Vec<String>,
    /// What pods (gateways, injected sidecars) dial to reach the config service. Default:
    /// `https://l4proxy-operator.NAMESPACE.svc:PORT` (the port of --config-service-address).
    #[arg(long)]
    config_service_url: Option<String>,
    /// Most proxies this replica serves at once (beyond, a connection is refused and the proxy
    /// tries again, reaching another replica through the Service).
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    max_proxies: u32,
    /// How often the proxies' reports are summed up and a resource's status may be written.
    #[arg(long, default_value = "10s")]
    status_interval: ConfigDuration,
    /// Where the sidecar-injection webhook (HTTPS, path /inject) listens.
    #[arg(long, default_value = "0.0.0.0:9443")]
    webhook_address: SocketAddr,
    /// The MutatingWebhookConfiguration whose webhooks' caBundle this operator writes and keeps
    /// (the chart's); "" for none.
    #[arg(long, default_value = "l4proxy-operator")]
    webhook_configuration: String,
    /// An injected sidecar's CPU request ("" for none; annotation l4proxy.dev/proxy-cpu-request).
    #[arg(long, default_value = "10m")]
    sidecar_cpu_request: String,
    /// An injected sidecar's CPU limit ("" for none; annotation l4proxy.dev/proxy-cpu-limit).
    #[arg(long, default_value = "")]
    sidecar_cpu_limit: String,
    /// An injected sidecar's memory request (annotation l4proxy.dev/proxy-memory-request).
    #[arg(long, default_value = "32Mi")]
    sidecar_memory_request: String,
    /// An injected sidecar's memory limit (annotation l4proxy.dev/proxy-memory-limit).
    #[arg(long, default_value = "256Mi")]
    sidecar_memory_limit: String,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd => {
            print!("{}", crd_yaml());
            ExitCode::SUCCESS
        }
        Command::Run(args) => {
            let args = *args;
            let _log_guard = telemetry::init_logging(args.log_format, telemetry::LogOutput::Stderr);
            if args.lease_renew_deadline >= args.lease_duration {
                eprintln!(
                    "error: --lease-renew-deadline ({}) must be shorter than --lease-duration ({})",
                    args.lease_renew_deadline, args.lease_duration
                );
                return ExitCode::from(64);
            }
            let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
            match runtime.block_on(run(args)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = format!("{e:#}"), "operator failed");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

async fn client(kubeconfig: Option<&PathBuf>) -> anyhow::Result<Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("loading kubeconfig {}", path.display()))?
        }
        None => Config::infer().await.context("no kubeconfig and not in a cluster")?,
    };
    Client::try_from(config).context("building the Kubernetes client")
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let client = client(args.kubeconfig.as_ref()).await?;
    let identity = args.identity.unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_else(|_| "unknown".into());
        format!("{}-{}", host.trim(), std::process::id())
    });
    let lease_namespace = args.lease_namespace.or_else(|| args.namespace.clone()).unwrap_or_else(|| "default".into());
    let dns_names = if args.config_service_dns_names.is_empty() {
        let mut names = certs::service_dns_names(SERVICE_NAME, &lease_namespace);
        names.extend(certs::service_dns_names(WEBHOOK_SERVICE_NAME, &lease_namespace));
        names
    } else {
        args.config_service_dns_names
    };
    let pod_url = args.config_service_url.unwrap_or_else(|| {
        format!("https://{SERVICE_NAME}.{lease_namespace}.svc:{}", args.config_service_address.port())
    });
    let given = |value: String| Some(value).filter(|v| !v.is_empty());
    let webhook = WebhookConfig {
        address: args.webhook_address,
        configuration: given(args.webhook_configuration),
        image: args.proxy_image.clone(),
        resources: injection::Resources {
            cpu_request: given(args.sidecar_cpu_request),
            cpu_limit: given(args.sidecar_cpu_limit),
            memory_request: given(args.sidecar_memory_request),
            memory_limit: given(args.sidecar_memory_limit),
        },
    };
    let config = OperatorConfig {
        options: Options {
            namespace: args.namespace,
            proxy_image: args.proxy_image,
            allow_cross_namespace_services: args.allow_cross_namespace_services,
            resync: args.resync.get(),
            identity: identity.clone(),
            max_concurrent_reconciles: args.max_concurrent_reconciles,
            gateway_control: None,
        },
        lease: LeaseConfig {
            namespace: lease_namespace,
            name: args.lease_name,
            identity,
            lease_duration: args.lease_duration.get(),
            renew_deadline: args.lease_renew_deadline.get(),
            retry_period: args.lease_retry_period.get(),
        },
        http_address: Some(args.http_address),
        config_service: Some(ConfigServiceConfig {
            address: args.config_service_address,
            dns_names,
            pod_url: Some(pod_url),
            max_proxies: args.max_proxies as usize,
        }),
        status_interval: args.status_interval.get(),
        webhook: Some(webhook),
    };
    let running = l4proxy_operator::start(client, config).await.context("starting the operator")?;
    tracing::info!(
        http = ?running.http_address,
        config_service = ?running.config_service_address,
        webhook = ?running.webhook_address,
        "operator started"
    );
    shutdown_signal().await;
    tracing::info!("stopping: finishing reconciles, then releasing the lease");
    match tokio::time::timeout(Duration::from_secs(30), running.stop()).await {
        Ok(()) => tracing::info!("stopped"),
        Err(_) => tracing::warn!("stop took longer than 30s; exiting anyway"),
    }
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
