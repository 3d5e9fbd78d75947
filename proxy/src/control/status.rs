//! Where the proxy stands with its control plane: the stream's state, the version in force and
//! the last rejection. `/readyz` waits on it, `/stats` shows it, the metrics follow it, and
//! every change of state is logged here, once (a retry that fails like the one before is not a
//! change).

use std::sync::Mutex;

use serde::Serialize;

use crate::metrics::{ControlPlaneMetrics, Metrics};

/// The stream to the control plane.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Before the first stream, and right after a clean close (reconnecting at once).
    Connecting,
    /// A stream is open.
    Connected,
    /// The last attempt failed; retrying with backoff.
    Disconnected,
}

/// The control-plane part of `/stats`.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ControlPlaneStats {
    pub address: String,
    pub resource: String,
    pub state: State,
    /// The pushed version in force; `None` before the first push (bootstrap config or nothing).
    pub applied_version: Option<String>,
    /// The last version refused, and why (it stays until another version is refused).
    pub last_rejection: Option<Rejection>,
    /// Why the stream last ended or could not be opened.
    pub last_error: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Rejection {
    pub version: String,
    pub error: String,
}

/// Shared by the client (which moves it) and the proxy (which reads it).
pub struct Status {
    metrics: ControlPlaneMetrics,
    /// A bootstrap config was applied at start: the proxy is ready before any push.
    bootstrapped: bool,
    inner: Mutex<Inner>,
}

struct Inner {
    stats: ControlPlaneStats,
    /// The label of the last failure: a failure with another label is a change worth a line.
    failure: Option<&'static str>,
}

impl Status {
    pub(crate) fn new(metrics: &Metrics, address: &str, resource: &str, bootstrapped: bool) -> Self {
        let stats = ControlPlaneStats {
            address: address.to_owned(),
            resource: resource.to_owned(),
            state: State::Connecting,
            applied_version: None,
            last_rejection: None,
            last_error: None,
        };
        Self { metrics: metrics.control_plane(), bootstrapped, inner: Mutex::new(Inner { stats, failure: None }) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Every update is a few assignments that cannot panic: a poisoned lock is still whole.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn stats(&self) -> ControlPlaneStats {
        self.lock().stats.clone()
    }

    /// True once a config serves: the bootstrap, or a pushed version.
    pub fn configured(&self) -> bool {
        self.bootstrapped || self.lock().stats.applied_version.is_some()
    }

    /// True if the pushed version `version` is in force.
    pub fn serves(&self, version: &str) -> bool {
        self.lock().stats.applied_version.as_deref() == Some(version)
    }

    /// The pushed version in force, or empty (the protocol's "none").
    pub fn applied_version(&self) -> String {
        self.lock().stats.applied_version.clone().unwrap_or_default()
    }

    pub(crate) fn connected(&self) {
        let mut inner = self.lock();
        inner.stats.state = State::Connected;
        inner.failure = None;
        self.metrics.connected.set(1);
        tracing::info!(control_plane = %inner.stats.address, resource = %inner.stats.resource, "control plane connected");
    }

    /// The control plane ended the stream with status OK (it is shutting down): reconnecting
    /// at once, to another replica.
    pub(crate) fn closed_cleanly(&self) {
        let mut inner = self.lock();
        inner.stats.state = State::Connecting;
        self.metrics.connected.set(0);
        tracing::info!(control_plane = %inner.stats.address, "control plane closed the stream; reconnecting at once");
    }

    /// A stream failed or could not be opened. Logged when the state or the kind of failure
    /// changes, not for every retry.
    pub(crate) fn failed(&self, label: &'static str, error: String) {
        let mut inner = self.lock();
        let was = inner.stats.state;
        let changed = was != State::Disconnected || inner.failure != Some(label);
        inner.stats.state = State::Disconnected;
        inner.failure = Some(label);
        self.metrics.connected.set(0);
        if changed {
            let address = &inner.stats.address;
            if was == State::Connected {
                tracing::warn!(control_plane = %address, reason = label, %error, "control plane stream ended; serving the last config, reconnecting with backoff");
            } else {
                tracing::warn!(control_plane = %address, reason = label, %error, "cannot reach the control plane; retrying with backoff");
            }
        } else {
            tracing::debug!(reason = label, %error, "control plane still unreachable");
        }
        inner.stats.last_error = Some(error);
    }

    /// `version` serves now (`changed`: it replaced another config; otherwise it was already
    /// in force).
    pub(crate) fn applied(&self, version: &str, changed: bool, listeners: usize) {
        let mut inner = self.lock();
        inner.stats.applied_version = Some(version.to_owned());
        self.metrics.updates_applied.inc();
        if changed {
            tracing::info!(version, listeners, "pushed config applied");
        } else {
            tracing::debug!(version, "pushed config already in force");
        }
    }

    /// `version` could not apply; the previous config keeps serving.
    pub(crate) fn rejected(&self, version: &str, reason: &'static str, error: &str) {
        let mut inner = self.lock();
        inner.stats.last_rejection = Some(Rejection { version: version.to_owned(), error: error.to_owned() });
        self.metrics.updates_rejected.inc();
        tracing::error!(version, reason, error, "pushed config rejected; the previous config stays in force");
    }
}
