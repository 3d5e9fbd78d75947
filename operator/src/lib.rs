//! l4proxy-operator: watches `L4Proxy` resources, resolves their Service backends, computes each
//! resource's effective proxy config, runs gateways, and reports status.
#![deny(rust_2018_idioms)]
#![forbid(unsafe_code)]

/// The reconciler and its watches.
pub mod controller;
/// The `L4Proxy` custom resource and its CRD.
pub mod crd;
/// Spec → effective proxy config, versioned, held for the config service.
pub mod effective;
/// Gateway Deployment, Service and ConfigMap.
pub mod gateway;
/// `/metrics`, `/healthz`, `/readyz`.
pub mod http;
/// Lease-based leader election gating writes.
pub mod lease;
/// Operator metrics.
pub mod metrics;
/// Start and stop everything together.
pub mod operator;
/// Service backends → ready endpoint addresses.
pub mod resolve;
/// Conditions: merge, transitions.
pub mod status;

pub use crd::{L4Proxy, L4ProxySpec, L4ProxyStatus};
pub use operator::{OperatorConfig, Running, start};
