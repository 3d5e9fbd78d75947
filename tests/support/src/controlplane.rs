//! Starting, describing and stopping one etcd + kube-apiserver pair.

use std::fs;
use std::io;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow};

use crate::bins;
use crate::certs::{self, Pki};
use crate::clock::{self, Deadline};
use crate::kubeconfig;
use crate::ports::{self, Ports};
use crate::probe::{self, TlsProbe};
use crate::process::{Component, LOG_TAIL_LINES};
use crate::recorded;

/// How many times start-up picks fresh ports after losing a port race.
const START_ATTEMPTS: u32 = 4;

/// How long a component gets to exit on SIGTERM before SIGKILL.
///
/// Stopping kube-apiserver and then etcd gracefully takes about a second when idle; the bound
/// only matters when something hangs.
pub const STOP_GRACE: Duration = Duration::from_secs(10);

/// Grace for components of a failed start: their state is being thrown away anyway.
const FAILED_START_GRACE: Duration = Duration::from_secs(2);

/// How [`ControlPlane::start_with`] runs the components.
#[derive(Clone, Debug)]
pub struct StartOptions {
    /// Run the components in their own session, without a parent-death signal, and record their
    /// pids in `DIR/pids`: they outlive this process and dropping the [`ControlPlane`] leaves them
    /// running (used by `l4proxy-controlplane up`; stop them with [`crate::recorded::stop`]).
    /// When false (the default), the components die with the process and are stopped on drop.
    pub detached: bool,
    /// Deadline for the whole start-up (etcd healthy and kube-apiserver `/readyz` OK).
    pub ready_timeout: Duration,
    /// Where etcd, kube-apiserver and kubectl are; `None` means [`bins::locate`].
    pub bin_dir: Option<PathBuf>,
    /// Serve a real node (tests/cluster) instead of loopback only; `None` (the default) keeps the
    /// API server on 127.0.0.1 with no ServiceAccount admission.
    pub node: Option<NodeNetwork>,
}

/// The addresses of a control plane that a kubelet and its pods use.
///
/// kube-apiserver binds to and advertises [`NodeNetwork::address`] (the node's address on the
/// test bridge, so pods reach it through the `kubernetes` Service), allocates ClusterIPs from
/// the Service CIDR, admits pods with their ServiceAccount (a controller-manager is expected
/// to create them) and presents the admin client cert to kubelets. The serving cert also
/// names the node address and the `kubernetes` Service's ClusterIP.
#[derive(Clone, Debug)]
pub struct NodeNetwork {
    pub address: Ipv4Addr,
    /// The Service CIDR's network address and prefix length, e.g. `10.96.0.0` and 16.
    pub service_network: Ipv4Addr,
    pub service_prefix: u8,
}

impl NodeNetwork {
    /// The first address of the Service CIDR: the `kubernetes` Service's ClusterIP.
    pub fn kubernetes_service_ip(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.service_network) + 1)
    }

    /// `network/prefix`, as kube-apiserver's `--service-cluster-ip-range` wants it.
    pub fn service_cidr(&self) -> String {
        format!("{}/{}", self.service_network, self.service_prefix)
    }
}

impl Default for StartOptions {
    fn default() -> Self {
        StartOptions { detached: false, ready_timeout: Duration::from_secs(60), bin_dir: None, node: None }
    }
}

/// A running etcd + kube-apiserver on loopback, reachable with an admin (system:masters)
/// kubeconfig.
///
/// There is no controller-manager or scheduler: objects are stored and served, but nothing
/// reconciles them (no service accounts, pods never run, namespaces never finish deleting).
#[derive(Debug)]
pub struct ControlPlane {
    dir: PathBuf,
    bin_dir: PathBuf,
    kubeconfig: PathBuf,
    server_url: String,
    /// etcd first, kube-apiserver second; emptied by [`ControlPlane::stop`].
    components: Mutex<Vec<Component>>,
    detached: bool,
    /// Whether `dir` is a temporary directory this crate created (and so removes on stop).
    owns_dir: bool,
    startup: Duration,
}

impl ControlPlane {
    /// Starts a control plane whose state, certificates, logs and kubeconfig live in `dir`.
    ///
    /// Blocks until kube-apiserver reports ready (typically a few seconds). Calling it from a
    /// `#[tokio::test]` is fine: it uses no async runtime, so nothing it returns is tied to one.
    pub fn start(dir: &Path) -> Result<ControlPlane> {
        Self::start_with(dir, &StartOptions::default())
    }

    /// [`ControlPlane::start`] with explicit options.
    pub fn start_with(dir: &Path, options: &StartOptions) -> Result<ControlPlane> {
        Self::start_inner(dir, options, false)
    }

    /// Starts a control plane in a fresh directory under `std::env::temp_dir()`, removed again by
    /// [`ControlPlane::stop`] / drop.
    pub fn start_in_temp_dir() -> Result<ControlPlane> {
        let dir = fresh_temp_dir()?;
        let started = Self::start_inner(&dir, &StartOptions::default(), true);
        if started.is_err() {
            // The error message already quotes the logs that matter.
            let _ = fs::remove_dir_all(&dir);
        }
        started
    }

    fn start_inner(dir: &Path, options: &StartOptions, owns_dir: bool) -> Result<ControlPlane> {
        let started = clock::now();
        let bin_dir = match &options.bin_dir {
            Some(bin_dir) => bin_dir.clone(),
            None => bins::locate()?,
        };
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let dir = std::path::absolute(dir)?;
        let extra_ips: Vec<Ipv4Addr> =
            options.node.iter().flat_map(|node| [node.address, node.kubernetes_service_ip()]).collect();
        let pki = certs::generate(&dir.join("pki"), &extra_ips)?;
        let launcher = Launcher { dir: &dir, bin_dir: &bin_dir, probe: TlsProbe::new(&pki.admin)?, pki: &pki, options };
        let (components, ports) = launcher.run()?;
        Ok(ControlPlane {
            kubeconfig: dir.join("kubeconfig"),
            server_url: launcher.server_url(ports),
            dir,
            bin_dir,
            components: Mutex::new(components),
            detached: options.detached,
            owns_dir,
            startup: started.elapsed(),
        })
    }

    /// The directory holding state, certificates (`pki/`), logs (`etcd.log`,
    /// `kube-apiserver.log`) and the kubeconfig.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where etcd, kube-apiserver and kubectl come from.
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// The admin kubeconfig (context [`kubeconfig::CONTEXT`]).
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// `https://127.0.0.1:PORT` of kube-apiserver.
    pub fn server_url(&self) -> &str {
        &self.server_url
    }

    /// How long [`ControlPlane::start`] took until kube-apiserver was ready.
    pub fn startup_time(&self) -> Duration {
        self.startup
    }

    /// Name and pid of each still-running component (empty after [`ControlPlane::stop`]).
    pub fn pids(&self) -> Vec<(&'static str, u32)> {
        self.lock_components().iter().map(|component| (component.name(), component.pid())).collect()
    }

    /// `kubectl --kubeconfig <ours>`, ready for more arguments.
    pub fn kubectl(&self) -> Command {
        let mut cmd = Command::new(self.bin_dir.join("kubectl"));
        cmd.arg("--kubeconfig").arg(&self.kubeconfig);
        cmd
    }

    /// Stops the components (kube-apiserver first: its graceful shutdown still writes to
    /// etcd), each with SIGTERM and then SIGKILL after [`STOP_GRACE`], and waits for them.
    /// Removes the directory if it is a temporary one this crate created. Idempotent.
    pub fn stop(&self) -> Result<()> {
        let mut components = self.lock_components();
        self.stop_locked(&mut components)
    }

    /// [`ControlPlane::stop`] for the exit handler: skips instead of blocking if another thread
    /// holds the lock (the parent-death signal still stops the children then).
    pub(crate) fn stop_without_blocking(&self) -> Result<()> {
        match self.components.try_lock() {
            Ok(mut components) => self.stop_locked(&mut components),
            Err(std::sync::TryLockError::Poisoned(poisoned)) => self.stop_locked(&mut poisoned.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => Ok(()),
        }
    }

    fn stop_locked(&self, components: &mut Vec<Component>) -> Result<()> {
        let mut first_error = None;
        while let Some(mut component) = components.pop() {
            if let Err(err) = component.terminate(STOP_GRACE) {
                first_error.get_or_insert(err);
            }
        }
        if self.detached {
            recorded::forget(&self.dir)?;
        }
        if self.owns_dir {
            remove_dir_if_present(&self.dir)?;
        }
        first_error.map_or(Ok(()), Err)
    }

    /// A poisoned lock only means a panic elsewhere; the process list is still accurate.
    fn lock_components(&self) -> MutexGuard<'_, Vec<Component>> {
        self.components.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Stops an attached control plane; a detached one keeps running by design.
impl Drop for ControlPlane {
    fn drop(&mut self) {
        if self.detached {
            return;
        }
        if let Err(err) = self.stop() {
            eprintln!("l4proxy-testenv: stopping the control plane in {}: {err:#}", self.dir.display());
        }
    }
}

/// `l4proxy-cp-<pid>-<n>` under the system temp dir; a leftover from an earlier process that
/// had the same pid is removed first.
fn fresh_temp_dir() -> Result<PathBuf> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("l4proxy-cp-{}-{n}", std::process::id()));
    remove_dir_if_present(&dir)?;
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

fn remove_dir_if_present(dir: &Path) -> Result<()> {
    match fs::remove_dir_all(dir) {
        Err(err) if err.kind() != io::ErrorKind::NotFound => {
            Err(anyhow!(err).context(format!("removing {}", dir.display())))
        }
        _ => Ok(()),
    }
}

/// Why one start attempt failed: a lost port race is worth retrying, anything else is not.
enum AttemptError {
    PortRace(anyhow::Error),
    Fatal(anyhow::Error),
}

impl From<anyhow::Error> for AttemptError {
    fn from(err: anyhow::Error) -> Self {
        AttemptError::Fatal(err)
    }
}

impl From<io::Error> for AttemptError {
    fn from(err: io::Error) -> Self {
        AttemptError::Fatal(err.into())
    }
}

/// Everything one start needs, shared by its attempts.
struct Launcher<'a> {
    dir: &'a Path,
    bin_dir: &'a Path,
    pki: &'a Pki,
    probe: TlsProbe,
    options: &'a StartOptions,
}

impl Launcher<'_> {
    /// Starts both components, retrying with fresh ports after a lost port race.
    fn run(&self) -> Result<(Vec<Component>, Ports)> {
        let mut lost_race = None;
        for _ in 0..START_ATTEMPTS {
            let ports = ports::pick().context("picking free loopback ports")?;
            kubeconfig::write(self.dir, &self.server_url(ports), &self.pki.admin)?;
            match self.attempt(ports) {
                Ok(components) => return Ok((components, ports)),
                Err(AttemptError::PortRace(err)) => lost_race = Some(err),
                Err(AttemptError::Fatal(err)) => return Err(err),
            }
        }
        let err = lost_race.unwrap_or_else(|| anyhow!("no start attempt was made"));
        Err(err.context(format!("lost the race for free ports {START_ATTEMPTS} times")))
    }

    /// One start on `ports`; on failure every component it started is stopped again.
    fn attempt(&self, ports: Ports) -> Result<Vec<Component>, AttemptError> {
        // Fresh etcd state per attempt: a data dir remembers its old peer URL.
        remove_dir_if_present(&self.etcd_data_dir())?;
        let deadline = Deadline::after(self.options.ready_timeout);
        let mut running = Vec::new();
        match self.start_components(ports, deadline, &mut running) {
            Ok(()) => Ok(running),
            Err(err) => {
                for component in running.iter_mut().rev() {
                    let _ = component.terminate(FAILED_START_GRACE);
                }
                if self.options.detached {
                    let _ = recorded::forget(self.dir);
                }
                Err(err)
            }
        }
    }

    /// etcd first and healthy, then kube-apiserver until `/readyz` says 200.
    ///
    /// Waiting for etcd before starting kube-apiserver costs little (etcd is up in a fraction of
    /// a second) and makes an etcd failure show up as such rather than as an apiserver timeout.
    fn start_components(
        &self,
        ports: Ports,
        deadline: Deadline,
        running: &mut Vec<Component>,
    ) -> Result<(), AttemptError> {
        running.push(self.spawn("etcd", self.etcd_args(ports))?);
        self.record(running)?;
        wait_ready(running, deadline, || {
            probe::http_status(ports.etcd_client, "/health").is_ok_and(|code| code == 200)
        })?;
        running.push(self.spawn("kube-apiserver", self.apiserver_args(ports))?);
        self.record(running)?;
        let host = self.apiserver_host();
        wait_ready(running, deadline, || {
            self.probe.status(host, ports.apiserver, "/readyz").is_ok_and(|code| code == 200)
        })
    }

    fn spawn(&self, name: &'static str, args: Vec<String>) -> Result<Component> {
        let mut cmd = Command::new(self.bin_dir.join(name));
        cmd.args(args).current_dir(self.dir);
        // etcd reads every ETCD_* variable as a flag; the caller's environment must not leak in.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("ETCD_") {
                cmd.env_remove(&key);
            }
        }
        Component::spawn(name, cmd, self.dir.join(format!("{name}.log")), self.options.detached)
    }

    /// Detached components are recorded as soon as they exist, so `down` can clean up even
    /// after an interrupted `up`.
    fn record(&self, running: &[Component]) -> Result<()> {
        if !self.options.detached {
            return Ok(());
        }
        let pids: Vec<(&str, u32)> = running.iter().map(|component| (component.name(), component.pid())).collect();
        recorded::write(self.dir, &pids)
    }

    /// Loopback, or the node's address when serving a node.
    fn apiserver_host(&self) -> Ipv4Addr {
        self.options.node.as_ref().map_or(Ipv4Addr::LOCALHOST, |node| node.address)
    }

    fn server_url(&self, ports: Ports) -> String {
        format!("https://{}:{}", self.apiserver_host(), ports.apiserver)
    }

    fn etcd_data_dir(&self) -> PathBuf {
        self.dir.join("etcd-data")
    }

    fn etcd_args(&self, ports: Ports) -> Vec<String> {
        let client = format!("http://127.0.0.1:{}", ports.etcd_client);
        let peer = format!("http://127.0.0.1:{}", ports.etcd_peer);
        vec![
            "--name=default".into(),
            format!("--data-dir={}", self.etcd_data_dir().display()),
            format!("--listen-client-urls={client}"),
            format!("--advertise-client-urls={client}"),
            format!("--listen-peer-urls={peer}"),
            format!("--initial-advertise-peer-urls={peer}"),
            format!("--initial-cluster=default={peer}"),
            // Test data is thrown away; fsync would only slow every write down.
            "--unsafe-no-fsync=true".into(),
        ]
    }

    fn apiserver_args(&self, ports: Ports) -> Vec<String> {
        let files = &self.pki.files;
        let path = |path: &Path| path.display().to_string();
        let host = self.apiserver_host();
        let mut args = vec![
            format!("--etcd-servers=http://127.0.0.1:{}", ports.etcd_client),
            format!("--secure-port={}", ports.apiserver),
            format!("--bind-address={host}"),
            format!("--advertise-address={host}"),
            format!("--cert-dir={}", path(&self.dir.join("pki/generated"))),
            format!("--tls-cert-file={}", path(&files.serving_cert)),
            format!("--tls-private-key-file={}", path(&files.serving_key)),
            format!("--client-ca-file={}", path(&files.ca_cert)),
            format!("--service-account-key-file={}", path(&files.service_account_pub)),
            format!("--service-account-signing-key-file={}", path(&files.service_account_key)),
            "--service-account-issuer=https://kubernetes.default.svc".into(),
            "--authorization-mode=RBAC".into(),
            "--allow-privileged=true".into(),
        ];
        match &self.options.node {
            None => args.extend([
                // The lease reconciler rejects a loopback advertise address; nothing here needs
                // the `kubernetes` Service's endpoints anyway.
                "--endpoint-reconciler-type=none".into(),
                "--service-cluster-ip-range=10.0.0.0/24".into(),
                // No controller-manager creates service accounts, so pods would be rejected.
                "--disable-admission-plugins=ServiceAccount".into(),
            ]),
            Some(node) => args.extend([
                format!("--service-cluster-ip-range={}", node.service_cidr()),
                // For logs, exec and port-forward; the kubelet trusts the test CA's clients.
                format!("--kubelet-client-certificate={}", path(&files.admin_cert)),
                format!("--kubelet-client-key={}", path(&files.admin_key)),
                "--kubelet-preferred-address-types=InternalIP".into(),
            ]),
        }
        args
    }
}

/// Polls `ready` until it holds, failing early if any component exits and at `deadline` with
/// the log tail of the component being waited for (the last one started).
fn wait_ready(
    running: &mut [Component],
    deadline: Deadline,
    mut ready: impl FnMut() -> bool,
) -> Result<(), AttemptError> {
    loop {
        for component in running.iter_mut() {
            if let Some(status) = component.exited()? {
                return Err(exited_early(component, status));
            }
        }
        if ready() {
            return Ok(());
        }
        if deadline.expired() {
            return Err(not_ready(running.last(), deadline.timeout()).into());
        }
        clock::pause();
    }
}

fn exited_early(component: &Component, status: ExitStatus) -> AttemptError {
    let err = anyhow!(
        "{} (pid {}) exited with {status} during start-up; last {LOG_TAIL_LINES} lines of its log:\n{}",
        component.name(),
        component.pid(),
        component.log_tail()
    );
    if component.lost_port_race() { AttemptError::PortRace(err) } else { AttemptError::Fatal(err) }
}

fn not_ready(component: Option<&Component>, timeout: Duration) -> anyhow::Error {
    match component {
        Some(component) => anyhow!(
            "{} (pid {}) did not become ready within {timeout:?}; last {LOG_TAIL_LINES} lines of its log:\n{}",
            component.name(),
            component.pid(),
            component.log_tail()
        ),
        None => anyhow!("the control plane did not become ready within {timeout:?}"),
    }
}
