//! Test support for l4proxy's Kubernetes tests: a real etcd + kube-apiserver on loopback.
//!
//! This is the envtest approach without Go: the binaries `tools/build.sh` builds are started on
//! free loopback ports with throwaway certificates, and tests talk to them through an admin
//! kubeconfig. There is no controller-manager, scheduler or kubelet, so the API behaves like a
//! real one (validation, CRDs, RBAC, watches) while nothing acts on the objects.
//!
//! ```no_run
//! # async fn example() {
//! use l4proxy_testenv::ControlPlane;
//!
//! let control_plane = ControlPlane::shared(); // started once per test binary
//! let client = control_plane.client().await; // bound to this test's runtime
//! let namespace = control_plane.namespace(&client, "my-test").await;
//! # let _ = namespace.name();
//! # }
//! ```
//!
//! Binaries are found through `$L4PROXY_TOOLS_BIN`, `$KUBEBUILDER_ASSETS` or
//! `tools/build.sh --print-dir`; when none has them, starting fails and says how to build them.
#![deny(rust_2018_idioms)]

pub mod bins;
mod certs;
mod clock;
mod controlplane;
pub mod kubeconfig;
mod namespace;
mod ports;
mod probe;
mod process;
pub mod recorded;
mod shared;
mod sys;

use std::future::Future;
use std::time::Duration;

pub use controlplane::{ControlPlane, NodeNetwork, STOP_GRACE, StartOptions};
pub use namespace::{TEST_NAMESPACE_LABEL, TestNamespace};
pub use ports::free_port;

/// How often [`wait_for`] re-evaluates its condition.
pub const WAIT_POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Polls `check` until it returns `Some`, and returns that value; panics naming `what` if
/// `timeout` passes first (including while a single `check` is still running).
///
/// Tests use this instead of sleeping: it finishes as soon as the condition holds and fails
/// with a message saying what never happened.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, check()).await {
            Ok(Some(value)) => return value,
            Ok(None) if tokio::time::Instant::now() < deadline => tokio::time::sleep(WAIT_POLL_INTERVAL).await,
            _ => panic!("timed out after {timeout:?} waiting for {what}"),
        }
    }
}
