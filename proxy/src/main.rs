//! The `l4proxy` binary: `run` serves a config file (or the embedded quickstart), or what a
//! control plane pushes (`--control-plane`); `check` validates a file. A bad config or flag
//! exits with code 64 before anything is bound.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use l4proxy::{
    Proxy,
    config::{self, Config, ConfigDuration},
    control,
    metrics::Metrics,
    telemetry::{self, LogFormat},
};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::Notify,
};

/// sysexits' EX_USAGE: the config is wrong.
const EXIT_BAD_CONFIG: u8 = 64;
/// The config used when `run` is given none: a listener on 127.0.0.1:8080 forwarding to the
/// admin server on 127.0.0.1:9901.
const QUICKSTART: &str = include_str!("../../examples/quickstart.yaml");

#[derive(Parser)]
#[command(name = "l4proxy", version, about = "A Layer-4 (TCP/UDP) proxy for Kubernetes")]
struct Cli {
    /// Log line format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Data-plane threads (default: one per CPU): each listener gets one SO_REUSEPORT socket
    /// per worker, and a connection stays on the worker that accepted it. A sidecar usually
    /// wants 1.
    #[arg(long, global = true, value_parser = clap::value_parser!(u16).range(1..=1024))]
    workers: Option<u16>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve. From a file: reloads it on SIGHUP and when it changes. From a control plane
    /// (--control-plane): applies every pushed version; the --config file, if given, is a
    /// bootstrap served until then and is not watched. Drains on SIGTERM/SIGINT.
    Run {
        /// Config file (YAML). Without it, the embedded quickstart config is served (with
        /// --control-plane: no listeners until the first push).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// On SIGTERM/SIGINT, how long open connections may finish before they are cut.
        #[arg(long, default_value = "30s")]
        drain_timeout: ConfigDuration,
        /// How often the config file is checked for changes (not with --control-plane).
        #[arg(long, default_value = "2s")]
        watch_interval: ConfigDuration,
        #[command(flatten)]
        control: control::Flags,
    },
    /// Validate a config file: exit 0 if it is good, 64 with the field path if not.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let _log_guard = telemetry::init_logging(cli.log_format, telemetry::LogOutput::Stdout);
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(workers) = cli.workers {
        builder.worker_threads(usize::from(workers));
    }
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::error!(%error, "cannot start the runtime");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(async {
        match cli.command {
            Command::Check { config } => check(&config).await,
            Command::Run { config, drain_timeout, watch_interval, control } => {
                let source = match source(config.as_deref(), control).await {
                    Ok(source) => source,
                    Err(code) => return code,
                };
                report(run(source, drain_timeout.get(), watch_interval.get()).await)
            }
        }
    });
    // A reload still parsing on a blocking thread must not hold up the exit.
    runtime.shutdown_timeout(Duration::from_secs(1));
    code
}

fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "l4proxy failed");
            ExitCode::FAILURE
        }
    }
}

/// The config file being served and the text of the version in force.
struct ConfigFile {
    path: PathBuf,
    text: String,
}

/// Where the config comes from, checked: nothing is bound yet.
enum Source {
    /// A file (watched, reloaded on SIGHUP), or the embedded quickstart.
    File { config: Config, file: Option<ConfigFile> },
    /// A control plane; until its first push, the bootstrap config or only the admin server.
    ControlPlane { bootstrap: Option<Config>, settings: Box<control::Settings> },
}

/// Checks the flags, then loads the file (with `--control-plane`, the optional bootstrap,
/// whose admin address wins over `--admin-address`). Bad flags or config: exit 64.
async fn source(path: Option<&Path>, flags: control::Flags) -> Result<Source, ExitCode> {
    let settings = match flags.check().await {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("l4proxy: invalid flag {error}");
            tracing::error!(%error, "invalid flag");
            return Err(ExitCode::from(EXIT_BAD_CONFIG));
        }
    };
    let Some(settings) = settings else {
        let (config, file) = load(path).await?;
        return Ok(Source::File { config, file });
    };
    let bootstrap = match path {
        Some(path) => Some(load(Some(path)).await?.0),
        None => None,
    };
    Ok(Source::ControlPlane { bootstrap, settings: Box::new(settings) })
}

/// Loads the given file, or the embedded quickstart. A bad config is reported and mapped to 64.
async fn load(path: Option<&Path>) -> Result<(Config, Option<ConfigFile>), ExitCode> {
    let loaded = match path {
        Some(path) => config::load_with_text(path)
            .await
            .map(|(config, text)| (config, Some(ConfigFile { path: path.to_owned(), text }))),
        None => match config::parse_yaml(QUICKSTART) {
            Ok(file) => Config::from_file_config(file).await.map(|config| (config, None)),
            Err(e) => Err(e),
        },
    };
    match loaded {
        Ok(loaded) => Ok(loaded),
        Err(error) => {
            let source = path.map_or_else(|| "embedded quickstart".to_owned(), |p| p.display().to_string());
            eprintln!("l4proxy: invalid config {source}: {error}");
            tracing::error!(config = %source, %error, "invalid config");
            Err(ExitCode::from(EXIT_BAD_CONFIG))
        }
    }
}

async fn check(path: &Path) -> ExitCode {
    match load(Some(path)).await {
        Ok((config, _)) => {
            println!("{}: ok ({} listener(s))", path.display(), config.listeners.len());
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

async fn run(source: Source, drain: Duration, watch_interval: Duration) -> anyhow::Result<()> {
    let mut terminate = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut hangup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;

    // Every connection takes two descriptors and every UDP session one: use all the hard limit
    // allows, so maxConnections, not a default soft limit of 1024, is what bounds them.
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::info!(limit, "open-file limit"),
        Err(error) => tracing::warn!(%error, "could not raise the open-file limit"),
    }
    let metrics = Arc::new(Metrics::new());
    // What SIGHUP does: ask for a reload of the file, or nothing, and why.
    let (proxy, reload, client) = match source {
        Source::File { config, file } => {
            let proxy = Proxy::start(config, metrics).await.context("starting listeners")?;
            let reload = match file {
                Some(file) => {
                    // Reloads run on their own task, so that a slow one never delays a signal:
                    // the loop below only asks for them (several asks while one runs make one
                    // more reload, not a queue).
                    let reload = Arc::new(Notify::new());
                    tokio::spawn(reload_on_request(proxy.clone(), file.path.clone(), reload.clone()));
                    tokio::spawn(watch_file(file, watch_interval, reload.clone()));
                    Ok(reload)
                }
                None => Err("serving the embedded config, there is no file to reload"),
            };
            (proxy, reload, None)
        }
        Source::ControlPlane { bootstrap, settings } => {
            tracing::info!(
                control_plane = %settings.url,
                resource = %settings.resource,
                identity = %settings.identity,
                bootstrap = bootstrap.is_some(),
                "following the control plane"
            );
            let (proxy, client) = control::start(*settings, bootstrap, metrics).await.context("starting listeners")?;
            (proxy, Err("the control plane pushes the config"), Some(client))
        }
    };
    tracing::info!(listeners = proxy.config().listeners.len(), "l4proxy started");

    loop {
        tokio::select! {
            _ = terminate.recv() => { tracing::info!(signal = "SIGTERM", "shutdown requested"); break; }
            _ = interrupt.recv() => { tracing::info!(signal = "SIGINT", "shutdown requested"); break; }
            _ = hangup.recv() => match &reload {
                Ok(reload) => reload.notify_one(),
                Err(why) => tracing::warn!("SIGHUP ignored: {why}"),
            },
        }
    }
    // No push may start a reload during the drain.
    if let Some(client) = client {
        client.abort();
    }
    proxy.shutdown(drain).await;
    Ok(())
}

/// Reloads the file each time one is asked for.
async fn reload_on_request(proxy: Arc<Proxy>, path: PathBuf, asked: Arc<Notify>) {
    loop {
        asked.notified().await;
        let _ = proxy.reload_from(&path).await;
    }
}

/// Asks for a reload when the file's contents change. It compares with the text that was
/// loaded, not with what it reads after start-up: a change made while the listeners were binding
/// is still seen as a change. Contents, not timestamps: Kubernetes swaps mounted ConfigMaps by
/// symlink.
async fn watch_file(file: ConfigFile, every: Duration, reload: Arc<Notify>) {
    let mut watched = Some(file.text.into_bytes());
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let current = config::read_bounded(&file.path).await.ok();
        if current != watched {
            watched = current;
            reload.notify_one();
        }
    }
}
