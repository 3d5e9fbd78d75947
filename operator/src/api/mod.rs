//! What the operator shares with the API server: the `L4Proxy` resource and its CRD.

pub mod crd;
