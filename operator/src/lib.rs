//! l4proxy-operator: watches `L4Proxy` resources, resolves their Service backends, computes each
//! resource's effective proxy config, runs gateways, and reports status.
#![deny(rust_2018_idioms)]
#![forbid(unsafe_code)]

/// The `L4Proxy` custom resource and its CRD.
pub mod api;
/// Lease-based leader election gating writes.
pub mod lease;
/// Operator metrics.
pub mod metrics;
/// Pure decisions: effective config, Service resolution, conditions, gateway objects.
pub mod model;
/// Start and stop everything together.
pub mod operator;
/// The reconciler and its watches.
pub mod reconcile;

pub use api::crd::{L4Proxy, L4ProxySpec, L4ProxyStatus};
pub use operator::{OperatorConfig, Running, start};
