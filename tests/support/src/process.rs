//! Child processes of a control plane: spawning (attached or detached), log capture, liveness
//! checks and bounded termination.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow};

use crate::clock::{self, Deadline};
use crate::sys;

/// How many log lines an error message quotes.
pub(crate) const LOG_TAIL_LINES: usize = 40;

/// One running component (etcd or kube-apiserver) and where its output goes.
#[derive(Debug)]
pub(crate) struct Component {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Component {
    /// Starts `cmd` with stdout and stderr written to `log` (truncated first).
    ///
    /// Attached children die with the test process (see [`spawner`]); detached ones get their
    /// own session and outlive the command that started them.
    pub(crate) fn spawn(name: &'static str, mut cmd: Command, log: PathBuf, detached: bool) -> Result<Component> {
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let program = PathBuf::from(cmd.get_program());
        let child = if detached {
            sys::new_session(&mut cmd);
            cmd.spawn()
        } else {
            sys::die_with_parent(&mut cmd);
            spawner::spawn(cmd)
        };
        let child = child.with_context(|| format!("starting {name} ({})", program.display()))?;
        Ok(Component { name, child, log })
    }

    pub(crate) fn name(&self) -> &'static str {
        self.name
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `Some(status)` once the process has exited (reaping it).
    pub(crate) fn exited(&mut self) -> io::Result<Option<ExitStatus>> {
        self.child.try_wait()
    }

    /// The last [`LOG_TAIL_LINES`] lines of the component's log, for error messages.
    pub(crate) fn log_tail(&self) -> String {
        log_tail(&self.log, LOG_TAIL_LINES)
    }

    /// Whether the log says a listener could not bind: the signature of a lost port race.
    pub(crate) fn lost_port_race(&self) -> bool {
        fs::read_to_string(&self.log).is_ok_and(|log| log.contains("address already in use"))
    }

    /// SIGTERM, up to `grace` for a clean exit, then SIGKILL; always reaps the process.
    pub(crate) fn terminate(&mut self, grace: Duration) -> Result<()> {
        if self.exited()?.is_some() {
            return Ok(());
        }
        if let Err(err) = sys::send_signal(self.pid(), libc::SIGTERM) {
            // ESRCH: it exited between the check and the signal; the wait below reaps it.
            if err.raw_os_error() != Some(libc::ESRCH) {
                return Err(anyhow!(err).context(format!("sending SIGTERM to {} ({})", self.name, self.pid())));
            }
        }
        let deadline = Deadline::after(grace);
        while !deadline.expired() {
            if self.exited()?.is_some() {
                return Ok(());
            }
            clock::pause();
        }
        // Child::kill sends SIGKILL and tolerates an already exited process.
        self.child.kill().with_context(|| format!("sending SIGKILL to {} ({})", self.name, self.pid()))?;
        self.child.wait().with_context(|| format!("reaping {} ({})", self.name, self.pid()))?;
        Ok(())
    }
}

/// The last `lines` lines of the file at `path`, or a note why there are none.
pub(crate) fn log_tail(path: &Path, lines: usize) -> String {
    match fs::read_to_string(path) {
        Ok(text) => {
            let all: Vec<&str> = text.lines().collect();
            let tail = &all[all.len().saturating_sub(lines)..];
            if tail.is_empty() { format!("({} is empty)", path.display()) } else { tail.join("\n") }
        }
        Err(err) => format!("(cannot read {}: {err})", path.display()),
    }
}

/// The never-ending thread that forks every attached child.
///
/// `PR_SET_PDEATHSIG` fires when the thread that forked the child exits, not the process. Test
/// threads come and go (one per test), so forking from them would kill the shared control plane
/// when the first test finishes. Forking from this thread, which lives until the process dies,
/// makes the signal fire exactly when the test process dies, however it dies.
mod spawner {
    use super::*;

    type Request = (Command, mpsc::Sender<io::Result<Child>>);

    static SPAWNER: OnceLock<Result<mpsc::Sender<Request>, String>> = OnceLock::new();

    /// Spawns `cmd` on the spawner thread and hands back the child.
    pub(super) fn spawn(cmd: Command) -> io::Result<Child> {
        let requests = SPAWNER.get_or_init(start).as_ref().map_err(|err| io::Error::other(err.clone()))?;
        let (reply, replies) = mpsc::channel();
        requests.send((cmd, reply)).map_err(|_| io::Error::other("the spawner thread is gone"))?;
        replies.recv().map_err(|_| io::Error::other("the spawner thread dropped the request"))?
    }

    fn start() -> Result<mpsc::Sender<Request>, String> {
        let (requests, incoming) = mpsc::channel::<Request>();
        std::thread::Builder::new()
            .name("l4proxy-testenv-spawner".into())
            .spawn(move || serve(incoming))
            .map_err(|err| format!("cannot start the spawner thread: {err}"))?;
        Ok(requests)
    }

    fn serve(incoming: mpsc::Receiver<Request>) {
        for (mut cmd, reply) in incoming {
            // The requester may have given up; nothing to do about it here.
            let _ = reply.send(cmd.spawn());
        }
        // Unreachable while the static sender exists, but if the channel ever closed the thread
        // must still not exit: that would kill every child it forked.
        loop {
            std::thread::park();
        }
    }
}
