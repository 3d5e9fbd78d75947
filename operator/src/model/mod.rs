//! Pure decisions, no I/O: the effective config, Service resolution, conditions and the
//! desired gateway objects. Unit tested; the reconciler feeds them what the cluster holds.

pub mod conditions;
pub mod effective;
pub mod gateway;
pub mod resolve;
