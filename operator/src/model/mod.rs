//! Pure decisions, no I/O: the spec check, Service resolution, the effective config, conditions
//! and the desired gateway objects. Unit tested; the reconciler feeds them what the cluster holds.

pub mod conditions;
pub mod configs;
pub mod effective;
pub mod gateway;
pub mod injection;
pub mod proxies;
pub mod resolve;
pub mod selector;
pub mod spec;
