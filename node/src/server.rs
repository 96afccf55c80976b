//! Listening on the CSI endpoint and serving until SIGTERM.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use csi_proto::v1::identity_server::IdentityServer;
use csi_proto::v1::node_server::NodeServer;
use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, UnixAddr, bind, listen, socket,
};
use nix::sys::stat::{Mode, fchmod};
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};

use crate::identity::IdentityService;
use crate::node_service::NodeService;

/// A parsed `--endpoint`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

/// Setting up or running the server failed.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("endpoint {0:?} is neither unix:///absolute/path nor tcp://host:port")]
    BadEndpoint(String),
    #[error("refusing to remove {0:?}: it exists and is not a socket")]
    NotASocket(PathBuf),
    #[error("cannot prepare unix socket {path:?}")]
    Unix {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}")]
    Tcp {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("gRPC server failed")]
    Transport(#[from] tonic::transport::Error),
}

impl std::str::FromStr for Endpoint {
    type Err = ServeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ServeError::BadEndpoint(s.to_owned());
        if let Some(path) = s.strip_prefix("unix://") {
            let path = PathBuf::from(path);
            return if path.is_absolute() {
                Ok(Endpoint::Unix(path))
            } else {
                Err(bad())
            };
        }
        if let Some(addr) = s.strip_prefix("tcp://") {
            return addr.parse().map(Endpoint::Tcp).map_err(|_| bad());
        }
        Err(bad())
    }
}

/// Binds a unix socket that is private from the start: on Linux the socket file takes the
/// mode of the socket inode at bind time, so fchmod before bind leaves no window in which
/// another user could connect. A stale socket from a previous run is removed, anything
/// else at the path is left alone.
pub fn bind_unix(path: &Path) -> Result<tokio::net::UnixListener, ServeError> {
    let io = |source: std::io::Error| ServeError::Unix {
        path: path.to_owned(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(path).map_err(io)?,
        Ok(_) => return Err(ServeError::NotASocket(path.to_owned())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    let nix_io = |e: nix::Error| io(e.into());
    let fd: OwnedFd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )
    .map_err(nix_io)?;
    fchmod(&fd, Mode::S_IRUSR | Mode::S_IWUSR).map_err(nix_io)?;
    bind(fd.as_raw_fd(), &UnixAddr::new(path).map_err(nix_io)?).map_err(nix_io)?;
    listen(&fd, Backlog::MAXCONN).map_err(nix_io)?;
    tokio::net::UnixListener::from_std(std::os::unix::net::UnixListener::from(fd)).map_err(io)
}

/// How long in-flight RPCs get after SIGTERM before we stop anyway: kubelet sends SIGKILL
/// after its own grace period, and a client that never closes its connection must not keep
/// us from exiting cleanly before that.
pub const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Serves Identity and Node until `shutdown` resolves, then lets in-flight RPCs finish
/// for at most [`SHUTDOWN_GRACE`].
pub async fn serve(
    endpoint: &Endpoint,
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
    match endpoint {
        Endpoint::Unix(path) => {
            let listener = bind_unix(path)?;
            tracing::info!(endpoint = ?path, "serving CSI Identity and Node");
            let server =
                router.serve_with_incoming_shutdown(UnixListenerStream::new(listener), graceful);
            let result = tokio::select! {
                r = server => r,
                () = deadline => Ok(()),
            };
            // Leave no socket behind for the next start to trip over.
            let _ = std::fs::remove_file(path);
            result?;
        }
        Endpoint::Tcp(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| ServeError::Tcp {
                    addr: *addr,
                    source,
                })?;
            let local = listener.local_addr().map_err(|source| ServeError::Tcp {
                addr: *addr,
                source,
            })?;
            tracing::info!(endpoint = %local, "serving CSI Identity and Node");
            let server =
                router.serve_with_incoming_shutdown(TcpListenerStream::new(listener), graceful);
            tokio::select! {
                r = server => r?,
                () = deadline => {}
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn parses_endpoints() {
        assert_eq!(
            "unix:///csi/csi.sock".parse::<Endpoint>().unwrap(),
            Endpoint::Unix("/csi/csi.sock".into())
        );
        assert_eq!(
            "tcp://127.0.0.1:10000".parse::<Endpoint>().unwrap(),
            Endpoint::Tcp("127.0.0.1:10000".parse().unwrap())
        );
        assert!("unix://relative".parse::<Endpoint>().is_err());
        assert!("http://x".parse::<Endpoint>().is_err());
    }

    #[tokio::test]
    async fn socket_is_private_and_stale_sockets_are_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("csi.sock");
        let first = bind_unix(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        drop(first);
        // The file remains after the listener is gone: a stale socket.
        assert!(path.exists());
        let _second = bind_unix(&path).unwrap();
    }

    #[tokio::test]
    async fn refuses_to_remove_a_regular_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("csi.sock");
        std::fs::write(&path, b"precious").unwrap();
        assert!(matches!(bind_unix(&path), Err(ServeError::NotASocket(_))));
        assert_eq!(std::fs::read(&path).unwrap(), b"precious");
    }
}
