//! Where the gRPC server listens: a unix socket (the normal case, shared with the
//! sidecars) or TCP on loopback (tests). Parsing, the loopback rule, private sockets and
//! lenient `:authority` handling are shared with the node plugin.

pub use kubevirt_csi_common::endpoint::{Endpoint, EndpointError, Listener, bind_unix};

/// Resolves when SIGTERM or SIGINT arrives.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers we cannot shut down gracefully; run until killed.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("shutting down");
}
