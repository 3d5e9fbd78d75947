//! `l4proxy-controlplane`: start or stop a detached test control plane by hand.
//!
//! ```text
//! l4proxy-controlplane up DIR [--node-ip IP --service-cidr CIDR]
//!                                         start etcd + kube-apiserver, print `export KUBECONFIG=...`
//! l4proxy-controlplane down DIR [--clean] stop them; --clean also removes DIR
//! ```
//!
//! With `--node-ip` and `--service-cidr` the API server serves a real node (tests/cluster/up):
//! see [`NodeNetwork`].
//!
//! The processes run in their own session and keep running after `up` returns; their pids are
//! recorded in `DIR/pids` for `down`. Only the export line goes to stdout, so
//! `eval "$(l4proxy-controlplane up DIR)"` works.
#![deny(rust_2018_idioms)]

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, Result, bail};
use l4proxy_testenv::recorded::{self, StopOutcome};
use l4proxy_testenv::{ControlPlane, NodeNetwork, STOP_GRACE, StartOptions};

const USAGE: &str = "usage: l4proxy-controlplane up DIR [--node-ip IP --service-cidr CIDR] | \
                     l4proxy-controlplane down DIR [--clean]";

enum Action {
    Up(PathBuf, Option<NodeNetwork>),
    Down { dir: PathBuf, clean: bool },
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = parse(&args).and_then(|action| match action {
        Action::Up(dir, node) => up(&dir, node),
        Action::Down { dir, clean } => down(&dir, clean),
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("l4proxy-controlplane: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn parse(args: &[String]) -> Result<Action> {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["up", dir] => Ok(Action::Up(absolute(dir)?, None)),
        ["up", dir, "--node-ip", ip, "--service-cidr", cidr] => {
            Ok(Action::Up(absolute(dir)?, Some(node_network(ip, cidr)?)))
        }
        ["down", dir] => Ok(Action::Down { dir: absolute(dir)?, clean: false }),
        ["down", dir, "--clean"] | ["down", "--clean", dir] => Ok(Action::Down { dir: absolute(dir)?, clean: true }),
        _ => bail!("{USAGE}"),
    }
}

fn node_network(ip: &str, cidr: &str) -> Result<NodeNetwork> {
    let address: Ipv4Addr = ip.parse().with_context(|| format!("--node-ip {ip:?} is not an IPv4 address"))?;
    let bad_cidr = || format!("--service-cidr {cidr:?} is not an IPv4 network like 10.96.0.0/16");
    let (network, prefix) = cidr.split_once('/').with_context(bad_cidr)?;
    let service_network: Ipv4Addr = network.parse().with_context(bad_cidr)?;
    let service_prefix: u8 = prefix.parse().with_context(bad_cidr)?;
    if !(1..=30).contains(&service_prefix) {
        bail!("{}", bad_cidr());
    }
    Ok(NodeNetwork { address, service_network, service_prefix })
}

fn absolute(dir: &str) -> Result<PathBuf> {
    std::path::absolute(dir).with_context(|| format!("resolving {dir}"))
}

/// Starts a detached control plane in `dir`, or reports the one already running there.
fn up(dir: &Path, node: Option<NodeNetwork>) -> Result<()> {
    let recorded = recorded::read(dir)?;
    let running = recorded.iter().filter(|process| process.is_running()).count();
    if running > 0 && running == recorded.len() {
        eprintln!("a control plane is already running in {} ({})", dir.display(), describe(&recorded));
        print_export(dir);
        return Ok(());
    }
    if running > 0 {
        eprintln!("stopping the remains of a partial control plane in {}", dir.display());
        report(recorded::stop(dir, STOP_GRACE)?);
    } else if !recorded.is_empty() {
        eprintln!("ignoring the stale pids file in {} (nothing recorded there runs)", dir.display());
        recorded::stop(dir, STOP_GRACE)?;
    }
    let options = StartOptions { detached: true, node, ..StartOptions::default() };
    let control_plane = ControlPlane::start_with(dir, &options)?;
    let pids = control_plane.pids();
    let pids: Vec<String> = pids.iter().map(|(name, pid)| format!("{name} pid {pid}")).collect();
    eprintln!(
        "control plane ready in {:.1}s at {} ({}); logs in {}",
        control_plane.startup_time().as_secs_f64(),
        control_plane.server_url(),
        pids.join(", "),
        dir.display()
    );
    print_export(dir);
    // Detached: dropping the handle leaves the processes running for `down`.
    Ok(())
}

/// Stops whatever `dir` records; nothing running is not an error.
fn down(dir: &Path, clean: bool) -> Result<()> {
    if dir.exists() {
        let stopped = recorded::stop(dir, STOP_GRACE)?;
        if stopped.is_empty() {
            eprintln!("no control plane recorded in {}", dir.display());
        }
        report(stopped);
    } else {
        eprintln!("{} does not exist; nothing to stop", dir.display());
    }
    if clean && dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
        eprintln!("removed {}", dir.display());
    }
    Ok(())
}

fn report(outcomes: Vec<(recorded::RecordedProcess, StopOutcome)>) {
    for (process, outcome) in outcomes {
        let what = match outcome {
            StopOutcome::Terminated => "stopped",
            StopOutcome::Killed => "killed (did not exit on SIGTERM)",
            StopOutcome::NotRunning => "was not running",
        };
        eprintln!("{} (pid {}) {what}", process.name, process.pid);
    }
}

fn describe(processes: &[recorded::RecordedProcess]) -> String {
    let parts: Vec<String> = processes.iter().map(|process| format!("{} pid {}", process.name, process.pid)).collect();
    parts.join(", ")
}

fn print_export(dir: &Path) {
    println!("export KUBECONFIG={}", dir.join("kubeconfig").display());
}
