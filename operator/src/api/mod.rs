//! What the operator shares with the API server: the `L4Proxy` resource, its CRD, and labels.

pub mod crd;
pub mod labels;
