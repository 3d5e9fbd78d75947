//! One control plane per test process, shared by every test in the binary.
//!
//! Starting kube-apiserver takes seconds, so tests share one and isolate themselves with
//! [`ControlPlane::namespace`]. A `static` is never dropped, so cleanup relies on two other
//! mechanisms: an `atexit(3)` handler stops the processes and removes the temp dir when the
//! test binary exits normally (libtest ends with `exit`, even after failed tests), and the
//! parent-death signal set on every attached child stops them if the process dies any other way.

use std::sync::OnceLock;

use anyhow::{Result, anyhow};

use crate::controlplane::ControlPlane;
use crate::sys;

/// The shared control plane, or the message of its failed start (cached so that every test
/// fails fast with the same cause instead of each waiting for its own timeout).
static SHARED: OnceLock<Result<ControlPlane, String>> = OnceLock::new();

impl ControlPlane {
    /// The process-wide control plane, started (in a temp dir) on first use.
    ///
    /// Panics if it cannot start: this is for tests, where a clear panic is the right outcome.
    /// Do not call [`ControlPlane::stop`] on it; other tests are still using it.
    pub fn shared() -> &'static ControlPlane {
        Self::try_shared().unwrap_or_else(|err| panic!("{err:#}"))
    }

    /// [`ControlPlane::shared`] without the panic.
    pub fn try_shared() -> Result<&'static ControlPlane> {
        SHARED
            .get_or_init(start_shared)
            .as_ref()
            .map_err(|err| anyhow!("the shared test control plane failed to start: {err}"))
    }
}

fn start_shared() -> Result<ControlPlane, String> {
    sys::at_exit(stop_shared_at_exit).map_err(|err| format!("registering the exit handler: {err}"))?;
    ControlPlane::start_in_temp_dir().map_err(|err| format!("{err:#}"))
}

/// Runs inside `exit(3)`: must not panic (that would abort) and must not block on a lock.
extern "C" fn stop_shared_at_exit() {
    if let Some(Ok(control_plane)) = SHARED.get()
        && let Err(err) = control_plane.stop_without_blocking()
    {
        eprintln!("l4proxy-testenv: stopping the shared control plane at exit: {err:#}");
    }
}
