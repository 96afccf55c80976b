//! Listening on the CSI endpoint and serving until SIGTERM.

use csi_proto::v1::identity_server::IdentityServer;
use csi_proto::v1::node_server::NodeServer;
pub use kubevirt_csi_common::endpoint::{Endpoint, EndpointError, Listener};

use crate::identity::IdentityService;
use crate::node_service::NodeService;

/// Setting up or running the server failed.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    #[error("gRPC server failed")]
    Transport(#[from] tonic::transport::Error),
}

/// How long in-flight RPCs get after SIGTERM before we stop anyway: kubelet sends SIGKILL
/// after its own grace period, and a client that never closes its connection must not keep
/// us from exiting cleanly before that.
pub const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Serves Identity and Node until `shutdown` resolves, then lets in-flight RPCs finish
/// for at most [`SHUTDOWN_GRACE`].
pub async fn serve(
    listener: Listener,
    node: NodeService,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let graceful = {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };
    let deadline = async move {
        shutdown.await;
        let _ = stop_tx.send(true);
        tokio::time::sleep(SHUTDOWN_GRACE).await;
        tracing::warn!(grace = ?SHUTDOWN_GRACE, "connections still open after the grace period; stopping anyway");
    };
    let router = tonic::transport::Server::builder()
        .add_service(IdentityServer::new(IdentityService))
        .add_service(NodeServer::new(node));
    tracing::info!(endpoint = %listener.describe(), "serving CSI Identity and Node");
    match listener {
        Listener::Unix { listener, path } => {
            let server =
                router.serve_with_incoming_shutdown(Listener::unix_incoming(listener), graceful);
            let result = tokio::select! {
                r = server => r,
                () = deadline => Ok(()),
            };
            // Leave no socket behind for the next start to trip over.
            let _ = std::fs::remove_file(&path);
            result?;
        }
        Listener::Tcp { listener, .. } => {
            let server =
                router.serve_with_incoming_shutdown(Listener::tcp_incoming(listener), graceful);
            tokio::select! {
                r = server => r?,
                () = deadline => {}
            }
        }
    }
    Ok(())
}
