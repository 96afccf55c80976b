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

/// Longest gRPC status message the plugins send. It travels in the `grpc-message` trailer and
/// HTTP/2 peers refuse header blocks past 16 KiB: a message quoting a hostile 64 KiB id would
/// otherwise turn our answer into the client's RESOURCE_EXHAUSTED.
pub const MAX_STATUS_MESSAGE: usize = 2048;

/// [`error_chain`], cut on a character boundary to [`MAX_STATUS_MESSAGE`] bytes, saying so.
pub fn status_message(err: &dyn std::error::Error) -> String {
    let mut message = error_chain(err);
    if message.len() > MAX_STATUS_MESSAGE {
        let total = message.len();
        let mut cut = MAX_STATUS_MESSAGE;
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
        message.push_str(&format!("… ({total} bytes, truncated)"));
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer {0}")]
    struct Outer(String, #[source] std::io::Error);

    #[test]
    fn status_messages_keep_the_chain_and_stay_bounded() {
        let small = Outer("x".into(), std::io::Error::other("inner"));
        assert_eq!(status_message(&small), "outer x: inner");
        let huge = Outer("é".repeat(40_000), std::io::Error::other("inner"));
        let m = status_message(&huge);
        assert!(m.len() < MAX_STATUS_MESSAGE + 64, "{}", m.len());
        assert!(m.ends_with("bytes, truncated)"), "{m:.40}");
    }
}
