//! The control plane, from the proxy's side: a proxy dials the operator's config service,
//! receives its listeners, acknowledges each version and reports its stats (the protocol's
//! reference is `proto/l4proxy/control/v1/control.proto`).
//!
//! - [`options`]: the `run --control-plane` flags, checked into [`Settings`] before anything binds.
//! - [`client`]: the stream loop: connect, Hello, apply and acknowledge, report, reconnect.
//! - [`backoff`]: the reconnect delays.
//! - `token`: the ServiceAccount token, read fresh for every stream.
//! - `update`: a pushed version, from its JSON to `Proxy::apply` and the Ack.
//! - `report`: `Proxy::stats()` as a `StatsReport`.
//! - [`status`]: where the proxy stands with its control plane (`/readyz`, `/stats`, metrics).
//! - [`proto`]: the generated messages and gRPC stubs.

pub mod backoff;
pub mod client;
pub mod options;
pub mod proto;
mod report;
pub mod status;
mod token;
mod update;

pub use backoff::Backoff;
pub use client::start;
pub use options::{Flags, Resource, Settings};
pub use status::{ControlPlaneStats, State, Status};

/// The largest message either side accepts (a config of 64 listeners of 1024 backends each is
/// about 5 MiB of JSON).
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;
/// The audience a proxy's ServiceAccount token must carry.
pub const TOKEN_AUDIENCE: &str = "l4proxy.dev";

/// An error and its sources, `outer: inner: innermost` (tonic's and rustls's errors say little
/// at the top: "transport error").
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        // thiserror's `transparent` and some wrappers repeat their source's text.
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
