//! What the controller and node plugins share about serving CSI: parsing `--endpoint`, the
//! rule that TCP stays on loopback unless an operator says otherwise, unix sockets that are
//! private from the moment they exist, and accepting the `:authority` that non-Go gRPC
//! clients send over unix sockets.
#![forbid(unsafe_code)]

pub mod authority;
pub mod endpoint;

pub use authority::LenientAuthority;
pub use endpoint::{Endpoint, EndpointError, Listener};

/// An error and each of its causes, joined: for messages that must say everything on one
/// line (a process's last words, a gRPC status).
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut msg = err.to_string();
    let mut cur = err.source();
    while let Some(src) = cur {
        msg.push_str(": ");
        msg.push_str(&src.to_string());
        cur = src.source();
    }
    msg
}
