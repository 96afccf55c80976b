//! Where the gRPC server listens: a unix socket (the normal case, shared with the
//! sidecars) or TCP (tests, and a node plugin inside a VM).

use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use nix::sys::stat::{Mode, umask};

/// A listen address parsed from `unix:///path` or `tcp://host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp(String),
}

#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("endpoint {0:?} must be unix:///absolute/path or tcp://host:port")]
    Malformed(String),
    #[error("{0} exists and is not a socket; refusing to remove it")]
    NotASocket(PathBuf),
    #[error("cannot prepare socket path {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl Endpoint {
    pub fn parse(s: &str) -> Result<Self, EndpointError> {
        if let Some(path) = s.strip_prefix("unix://") {
            let path = Path::new(path);
            if path.is_absolute() {
                return Ok(Endpoint::Unix(path.to_path_buf()));
            }
        } else if let Some(addr) = s.strip_prefix("tcp://")
            && !addr.is_empty()
        {
            return Ok(Endpoint::Tcp(addr.to_string()));
        }
        Err(EndpointError::Malformed(s.to_string()))
    }
}

/// Binds a unix socket readable and writable by its owner only. A stale socket from a
/// previous run is removed; anything else at that path is left alone and reported.
pub fn bind_unix(path: &Path) -> Result<tokio::net::UnixListener, EndpointError> {
    let io = |source| EndpointError::Io {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(path).map_err(io)?,
        Ok(_) => return Err(EndpointError::NotASocket(path.to_path_buf())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    // The socket inherits its mode from the umask at bind time: set it so the socket is
    // never, even briefly, open to other users.
    let old = umask(Mode::from_bits_truncate(0o177));
    let listener = tokio::net::UnixListener::bind(path);
    umask(old);
    listener.map_err(io)
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn parses_endpoints() {
        assert_eq!(
            Endpoint::parse("unix:///csi/csi.sock").unwrap(),
            Endpoint::Unix("/csi/csi.sock".into())
        );
        assert_eq!(
            Endpoint::parse("tcp://127.0.0.1:1").unwrap(),
            Endpoint::Tcp("127.0.0.1:1".into())
        );
        for bad in ["/csi.sock", "unix://rel.sock", "tcp://", "http://x"] {
            assert!(Endpoint::parse(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn socket_is_private_stale_sockets_go_files_stay() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("csi.sock");
        let l = bind_unix(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        drop(l);
        bind_unix(&path).expect("a stale socket is replaced");
        let file = dir.path().join("not-a-socket");
        std::fs::write(&file, "data").unwrap();
        assert!(matches!(
            bind_unix(&file),
            Err(EndpointError::NotASocket(_))
        ));
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "data");
    }
}
