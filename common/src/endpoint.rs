//! `--endpoint` parsing and listening.
//!
//! CSI has no authentication of its own: whoever can connect to the endpoint can stage,
//! publish and delete volumes. A unix socket is therefore created readable by its owner only,
//! and a TCP endpoint is refused unless it is on loopback or the operator passed
//! `--insecure-tcp` (worker VMs reached through a forwarded port need that, and say so).

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use futures::{Stream, StreamExt};
use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, UnixAddr, bind, listen, socket,
};
use nix::sys::stat::{Mode, fchmod};
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};

use crate::authority::LenientAuthority;

/// A parsed `--endpoint`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

/// Why an endpoint cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error(
        "endpoint {0:?} is neither unix:///absolute/path nor tcp://ip:port (or tcp://localhost:port)"
    )]
    Malformed(String),
    #[error(
        "refusing to serve CSI on {0}: TCP endpoints carry no authentication, so only loopback addresses are allowed; pass --insecure-tcp to serve on {0} anyway"
    )]
    NotLoopback(SocketAddr),
    #[error("refusing to remove {0:?}: it exists and is not a socket")]
    NotASocket(PathBuf),
    #[error("refusing to replace {0:?}: another process is serving on it")]
    InUse(PathBuf),
    #[error("cannot prepare unix socket {path:?}")]
    Unix {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot listen on {addr}")]
    Tcp {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

impl std::str::FromStr for Endpoint {
    type Err = EndpointError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || EndpointError::Malformed(s.to_owned());
        if let Some(path) = s.strip_prefix("unix://") {
            let path = PathBuf::from(path);
            // A NUL cannot be part of a socket path; the kernel would silently cut it there.
            return if path.is_absolute() && !path.as_os_str().as_encoded_bytes().contains(&0) {
                Ok(Endpoint::Unix(path))
            } else {
                Err(bad())
            };
        }
        if let Some(addr) = s.strip_prefix("tcp://") {
            if let Ok(addr) = addr.parse::<SocketAddr>() {
                return Ok(Endpoint::Tcp(addr));
            }
            // Only the one name whose meaning does not depend on a resolver is accepted:
            // the loopback rule must be decided on the address actually bound.
            if let Some(port) = addr.strip_prefix("localhost:")
                && let Ok(port) = port.parse::<u16>()
            {
                return Ok(Endpoint::Tcp(SocketAddr::new(
                    IpAddr::V4(Ipv4Addr::LOCALHOST),
                    port,
                )));
            }
        }
        Err(bad())
    }
}

impl Endpoint {
    pub fn parse(s: &str) -> Result<Self, EndpointError> {
        s.parse()
    }

    /// Applies the loopback rule: a TCP endpoint must be on loopback unless `insecure_tcp`.
    pub fn check_exposure(&self, insecure_tcp: bool) -> Result<(), EndpointError> {
        match self {
            Endpoint::Unix(_) => Ok(()),
            Endpoint::Tcp(addr) if insecure_tcp || addr.ip().to_canonical().is_loopback() => Ok(()),
            Endpoint::Tcp(addr) => Err(EndpointError::NotLoopback(*addr)),
        }
    }

    /// Checks the loopback rule, then binds.
    pub async fn listen(&self, insecure_tcp: bool) -> Result<Listener, EndpointError> {
        self.check_exposure(insecure_tcp)?;
        match self {
            Endpoint::Unix(path) => Ok(Listener::Unix {
                listener: bind_unix(path)?,
                path: path.clone(),
            }),
            Endpoint::Tcp(addr) => {
                let tcp = |source| EndpointError::Tcp {
                    addr: *addr,
                    source,
                };
                let listener = tokio::net::TcpListener::bind(addr).await.map_err(tcp)?;
                if insecure_tcp && !addr.ip().to_canonical().is_loopback() {
                    tracing::warn!(endpoint = %addr, "serving CSI on a non-loopback TCP address without authentication (--insecure-tcp)");
                }
                let local = listener.local_addr().map_err(tcp)?;
                Ok(Listener::Tcp { listener, local })
            }
        }
    }
}

/// A bound endpoint.
#[derive(Debug)]
pub enum Listener {
    Unix {
        listener: tokio::net::UnixListener,
        path: PathBuf,
    },
    Tcp {
        listener: tokio::net::TcpListener,
        local: SocketAddr,
    },
}

/// Connections of a unix listener, each wrapped so any `:authority` is accepted.
pub type UnixConn = LenientAuthority<tokio::net::UnixStream>;
/// Connections of a TCP listener, each wrapped so any `:authority` is accepted.
pub type TcpConn = LenientAuthority<tokio::net::TcpStream>;

impl Listener {
    /// Where we listen, for logs.
    pub fn describe(&self) -> String {
        match self {
            Listener::Unix { path, .. } => format!("unix://{}", path.display()),
            Listener::Tcp { local, .. } => format!("tcp://{local}"),
        }
    }

    /// Accepted connections of a unix listener.
    pub fn unix_incoming(
        listener: tokio::net::UnixListener,
    ) -> impl Stream<Item = io::Result<UnixConn>> + Send + 'static {
        UnixListenerStream::new(listener).map(|c| c.map(LenientAuthority::new))
    }

    /// Accepted connections of a TCP listener.
    pub fn tcp_incoming(
        listener: tokio::net::TcpListener,
    ) -> impl Stream<Item = io::Result<TcpConn>> + Send + 'static {
        TcpListenerStream::new(listener).map(|c| c.map(LenientAuthority::new))
    }
}

/// Binds a unix socket that is private from the start: on Linux the socket file takes the
/// mode of the socket inode at bind time, so fchmod before bind leaves no window in which
/// another user could connect (and, unlike umask, touches no process-wide state).
///
/// A socket file left by an earlier run is replaced only when nothing answers on it, so a
/// second copy started by mistake cannot steal a live plugin's socket; any other kind of
/// file is left alone.
pub fn bind_unix(path: &Path) -> Result<tokio::net::UnixListener, EndpointError> {
    let io = |source: io::Error| EndpointError::Unix {
        path: path.to_owned(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => return Err(EndpointError::InUse(path.to_owned())),
                Err(_) => std::fs::remove_file(path).map_err(io)?,
            }
        }
        Ok(_) => return Err(EndpointError::NotASocket(path.to_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
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
            Endpoint::parse("tcp://127.0.0.1:10000").unwrap(),
            Endpoint::Tcp("127.0.0.1:10000".parse().unwrap())
        );
        assert_eq!(
            Endpoint::parse("tcp://[::1]:1").unwrap(),
            Endpoint::Tcp("[::1]:1".parse().unwrap())
        );
        assert_eq!(
            Endpoint::parse("tcp://localhost:7").unwrap(),
            Endpoint::Tcp("127.0.0.1:7".parse().unwrap())
        );
        for bad in [
            "/csi.sock",
            "unix://rel.sock",
            "unix:///a\0b",
            "tcp://",
            "tcp://example.com:1",
            "tcp://127.0.0.1",
            "http://x",
        ] {
            assert!(Endpoint::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn tcp_is_loopback_only_unless_insecure() {
        for ok in [
            "tcp://127.0.0.1:1",
            "tcp://127.1.2.3:1",
            "tcp://[::1]:1",
            "tcp://[::ffff:127.0.0.1]:1",
            "unix:///x",
        ] {
            Endpoint::parse(ok).unwrap().check_exposure(false).unwrap();
        }
        for exposed in ["tcp://0.0.0.0:1", "tcp://[::]:1", "tcp://10.0.2.15:1"] {
            let e = Endpoint::parse(exposed).unwrap();
            let err = e.check_exposure(false).unwrap_err();
            assert!(matches!(err, EndpointError::NotLoopback(_)), "{exposed}");
            assert!(err.to_string().contains("--insecure-tcp"), "{err}");
            e.check_exposure(true).unwrap();
        }
    }

    #[tokio::test]
    async fn socket_is_private_stale_sockets_go_live_ones_and_files_stay() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/csi.sock");
        let first = bind_unix(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // Someone is listening: not stale.
        assert!(matches!(bind_unix(&path), Err(EndpointError::InUse(_))));
        drop(first);
        // The file remains after the listener is gone: a stale socket, replaced.
        assert!(path.exists());
        let _second = bind_unix(&path).unwrap();

        let file = dir.path().join("not-a-socket");
        std::fs::write(&file, b"precious").unwrap();
        assert!(matches!(
            bind_unix(&file),
            Err(EndpointError::NotASocket(_))
        ));
        assert_eq!(std::fs::read(&file).unwrap(), b"precious");
    }
}
