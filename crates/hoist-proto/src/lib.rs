//! hoist-proto owns the wire API between the hoist client and a builder: the
//! `proto/hoist.proto` service definition and its generated tonic/prost code.

#![forbid(unsafe_code)]
#![allow(clippy::all, missing_docs)]

/// Encoding of the messages (both sides digest a manifest the same way).
pub use prost::Message;

/// Version 1 of the builder API.
pub mod v1 {
    tonic::include_proto!("hoist.v1");
}
