//! The CSI specification v1.12.0 (`csi.v1`) as Rust types with tonic client and server stubs.
//!
//! The generated server traits come with default methods only where the spec lets a plugin
//! decline an RPC; [`unimplemented`] gives the one answer we use for those.
#![forbid(unsafe_code)]

/// Generated from `proto/csi.proto` at build time.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod v1 {
    tonic::include_proto!("csi.v1");
}

/// The status an RPC we do not serve answers with, naming the RPC so a caller can tell
/// a missing capability from a bug.
pub fn unimplemented(rpc: &str) -> tonic::Status {
    tonic::Status::unimplemented(format!("{rpc} is not implemented by this plugin"))
}
