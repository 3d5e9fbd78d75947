//! The control protocol's messages and gRPC stubs, generated from
//! `proto/l4proxy/control/v1/control.proto` (the protocol's reference).

#![allow(clippy::all, clippy::pedantic, missing_docs, unreachable_pub)]

tonic::include_proto!("l4proxy.control.v1");
