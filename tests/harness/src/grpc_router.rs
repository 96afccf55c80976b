//! One gRPC endpoint in front of two plugins, as a container orchestrator pairs them: Node
//! RPCs go to the node plugin, Identity and Controller RPCs to the controller plugin.
//!
//! csi-sanity learns whether a driver has a controller from the Identity service on its
//! node endpoint; with the plugins in separate processes (and the node plugin in a VM), this
//! router gives it the view a CO has. It forwards requests unchanged and answers nothing
//! itself.

use std::net::SocketAddr;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tower::ServiceExt;

/// A running router; stops when dropped.
#[derive(Debug)]
pub struct GrpcRouter {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl GrpcRouter {
    pub async fn start(controller: Channel, node: Channel) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (controller, node) = (controller.clone(), node.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: http::Request<hyper::body::Incoming>| {
                            let target = if req.uri().path().starts_with("/csi.v1.Node/") {
                                node.clone()
                            } else {
                                controller.clone()
                            };
                            let req = req.map(tonic::body::Body::new);
                            // oneshot waits for readiness first, as tower's contract requires.
                            target.oneshot(req)
                        },
                    );
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .http2_only()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Ok(Self { addr, task })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for GrpcRouter {
    fn drop(&mut self) {
        self.task.abort();
    }
}
