//! l4proxy-operator: watches `L4Proxy` resources, resolves their Service backends, computes each
//! resource's effective proxy config, runs gateways, and reports status.
#![deny(rust_2018_idioms)]
#![forbid(unsafe_code)]

/// The `L4Proxy` resource, its CRD, and the labels the operator sets and reads.
pub mod api;
/// The CA and the serving certificate in Secret `l4proxy-ca`, rotated without a restart.
pub mod certs;
/// The config service: proxies subscribe over gRPC, get their config pushed, report back.
pub mod config;
/// Lease-based leader election gating writes.
pub mod lease;
/// Operator metrics.
pub mod metrics;
/// Pure decisions: spec check, Service resolution, effective config, conditions, gateway objects.
pub mod model;
/// Start and stop everything together.
pub mod operator;
/// The controller: watches and their cache, the reconciler, apply, status and Events.
pub mod reconcile;
/// TLS listeners with bounded handshakes (the config service's and the webhook's).
mod tls;
/// The sidecar-injection webhook and the `caBundle` of its configuration.
pub mod webhook;

pub use api::crd::{L4Proxy, L4ProxySpec, L4ProxyStatus};
pub use operator::{ConfigServiceConfig, OperatorConfig, Running, StartError, WebhookConfig, start};
