//! The `l4proxy` binary: `run` serves a config file (or the embedded quickstart), `check`
//! validates one. A bad config exits with code 64 before anything is bound.

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
    /// Worker threads serving connections (default: one per CPU). A sidecar usually wants 1.
    #[arg(long, global = true, value_parser = clap::value_parser!(u16).range(1..=1024))]
    workers: Option<u16>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve. Reloads the config on SIGHUP and when the file changes; drains on SIGTERM/SIGINT.
    Run {
        /// Config file (YAML). Without it, the embedded quickstart config is served.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// On SIGTERM/SIGINT, how long open connections may finish before they are cut.
        #[arg(long, default_value = "30s")]
        drain_timeout: ConfigDuration,
        /// How often the config file is checked for changes.
        #[arg(long, default_value = "2s")]
        watch_interval: ConfigDuration,
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
            Command::Run { config, drain_timeout, watch_interval } => {
                let (config, file) = match load(config.as_deref()).await {
                    Ok(loaded) => loaded,
                    Err(code) => return code,
                };
                report(run(config, file, drain_timeout.get(), watch_interval.get()).await)
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

async fn run(
    config: Config,
    file: Option<ConfigFile>,
    drain: Duration,
    watch_interval: Duration,
) -> anyhow::Result<()> {
    let mut terminate = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut hangup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;

    // Every connection takes two descriptors and every UDP session one: use all the hard limit
    // allows, so maxConnections, not a default soft limit of 1024, is what bounds them.
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::info!(limit, "open-file limit"),
        Err(error) => tracing::warn!(%error, "could not raise the open-file limit"),
    }
    let proxy = Proxy::start(config, Arc::new(Metrics::new())).await.context("starting listeners")?;
    tracing::info!(listeners = proxy.config().listeners.len(), "l4proxy started");

    // Reloads run on their own task, so that a slow one never delays a signal: the loop below
    // only asks for them (several asks while one runs make one more reload, not a queue).
    let reload = Arc::new(Notify::new());
    let reloadable = file.is_some();
    if let Some(file) = file {
        tokio::spawn(reload_on_request(proxy.clone(), file.path.clone(), reload.clone()));
        tokio::spawn(watch_file(file, watch_interval, reload.clone()));
    }
    loop {
        tokio::select! {
            _ = terminate.recv() => { tracing::info!(signal = "SIGTERM", "shutdown requested"); break; }
            _ = interrupt.recv() => { tracing::info!(signal = "SIGINT", "shutdown requested"); break; }
            _ = hangup.recv() => if reloadable {
                reload.notify_one();
            } else {
                tracing::warn!("SIGHUP ignored: serving the embedded config, there is no file to reload");
            },
        }
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
