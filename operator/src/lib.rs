//! l4proxy-operator: watches `L4Proxy` resources, resolves their Service backends, computes each
//! resource's effective proxy config, runs gateways, and reports status.
#![deny(rust_2018_idioms)]
#![forbid(unsafe_code)]

pub mod crd;

pub use crd::{L4Proxy, L4ProxySpec, L4ProxyStatus};
pub mod effective;
pub mod resolve;
