//! The node binary as the CO sees it: a gRPC server on a unix socket or TCP, started and
//! stopped like a DaemonSet container, and small while it serves.

mod support;

#[path = "../../tests/support/python_client.rs"]
mod python_client;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use csi_proto::v1::identity_client::IdentityClient;
use csi_proto::v1::node_client::NodeClient;
use csi_proto::v1::volume_capability::access_mode::Mode;
use csi_proto::v1::{
    GetPluginInfoRequest, NodeGetCapabilitiesRequest, NodeGetInfoRequest, ProbeRequest,
};
use hyper_util::rt::TokioIo;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use python_client::{python_call, python_grpc};
use support::*;
use tonic::transport::{Channel, Endpoint, Uri};

const BIN: &str = env!("CARGO_BIN_EXE_kubevirt-csi-node");
const RSS_LIMIT_KIB: u64 = 15 * 1024;

/// The running plugin; killed on drop if a test fails before stopping it.
struct Plugin {
    child: Child,
}

impl Plugin {
    fn start(args: &[&str]) -> Self {
        let child = Command::new(BIN)
            .args(args)
            .env_remove("KUBECONFIG")
            .env_remove("NODE_NAME")
            .env_remove("KUBEVIRT_CSI_NODE_ID")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .spawn()
            .expect("start node plugin");
        Plugin { child }
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(i32::try_from(self.child.id()).expect("pid"))
    }

    fn vm_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("read status");
        let line = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .expect("VmRSS line");
        line.split_whitespace()
            .nth(1)
            .expect("VmRSS value")
            .parse()
            .expect("VmRSS number")
    }

    /// Sends SIGTERM and waits for a clean exit, keeping the test's runtime free to let
    /// clients close their connections.
    async fn terminate(mut self) -> std::process::ExitStatus {
        kill(self.pid(), Signal::SIGTERM).expect("SIGTERM");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "plugin did not stop within 10 s of SIGTERM"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Plugin {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn wait_for_socket(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::UnixStream::connect(path).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "plugin never listened on {path:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn unix_channel(path: PathBuf) -> Channel {
    Endpoint::try_from("http://[::]:50051")
        .expect("endpoint")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                tokio::net::UnixStream::connect(path)
                    .await
                    .map(TokioIo::new)
            }
        }))
        .await
        .expect("connect over unix socket")
}

#[tokio::test]
async fn serves_on_a_unix_socket_stays_small_and_stops_on_sigterm() {
    let mut env = Env::new();
    env.add_disk("kvcsi-binary-e2e", 32 * MIB);
    let socket = env.dir.path().join("plugin/csi.sock");
    let endpoint = format!("unix://{}", socket.display());
    let plugin = Plugin::start(&[
        "--endpoint",
        &endpoint,
        "--node-id",
        "tenant-ns/vm-1",
        "--kubelet-root",
        env.kubelet.to_str().expect("utf-8"),
        "--sysfs-root",
        env.sysfs.to_str().expect("utf-8"),
        "--bus",
        "virtio",
        "--log-format",
        "json",
    ]);
    wait_for_socket(&socket).await;
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&socket)
            .expect("socket")
            .permissions()
            .mode()
            & 0o777,
        0o600
    );

    let channel = unix_channel(socket.clone()).await;
    let mut identity = IdentityClient::new(channel.clone());
    let info = identity
        .get_plugin_info(GetPluginInfoRequest {})
        .await
        .expect("GetPluginInfo")
        .into_inner();
    assert_eq!(info.name, "csi.kubevirt.io");
    assert_eq!(info.vendor_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(
        identity
            .probe(ProbeRequest {})
            .await
            .expect("Probe")
            .into_inner()
            .ready,
        Some(true)
    );

    let mut node = NodeClient::new(channel);
    let info = node
        .node_get_info(NodeGetInfoRequest {})
        .await
        .expect("NodeGetInfo")
        .into_inner();
    assert_eq!(info.node_id, "tenant-ns/vm-1");
    assert_eq!(info.max_volumes_per_node, 3, "virtio bus limit");
    let caps = node
        .node_get_capabilities(NodeGetCapabilitiesRequest {})
        .await
        .expect("caps")
        .into_inner();
    assert_eq!(caps.capabilities.len(), 5);

    // A real stage and publish through the socket.
    let staging = env.mkdir("staging/e2e");
    let target = env.mkdir("pods/e2e").join("mount");
    let cap = mount_cap("ext4", &[], Mode::SingleNodeWriter);
    node.node_stage_volume(stage_req("e2e", &staging, "kvcsi-binary-e2e", cap.clone()))
        .await
        .expect("stage");
    node.node_publish_volume(publish_req("e2e", &staging, &target, cap, false))
        .await
        .expect("publish");
    assert!(
        mount_at(&target).is_some(),
        "published (mount namespaces are shared with the plugin)"
    );

    let rss = plugin.vm_rss_kib();
    eprintln!("node plugin VmRSS while serving: {rss} KiB");
    assert!(
        rss < RSS_LIMIT_KIB,
        "VmRSS {rss} KiB is over the {RSS_LIMIT_KIB} KiB budget"
    );

    node.node_unpublish_volume(unpublish_req("e2e", &target))
        .await
        .expect("unpublish");
    node.node_unstage_volume(unstage_req("e2e", &staging))
        .await
        .expect("unstage");
    drop(node);
    drop(identity);

    let started = Instant::now();
    let status = plugin.terminate().await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "clean shutdown should not need the grace period"
    );
    assert!(status.success(), "exit status after SIGTERM: {status}");
    assert!(!socket.exists(), "socket removed on shutdown");
}

#[tokio::test]
async fn serves_on_tcp() {
    let env = Env::new();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("free port")
        .local_addr()
        .expect("addr")
        .port();
    let endpoint = format!("tcp://127.0.0.1:{port}");
    let plugin = Plugin::start(&[
        "--endpoint",
        &endpoint,
        "--node-id",
        "ns/vm",
        "--kubelet-root",
        env.kubelet.to_str().expect("utf-8"),
    ]);
    // Retry connect and the first RPC together: the plugin may not be listening yet.
    let deadline = Instant::now() + Duration::from_secs(20);
    let info = loop {
        let attempt = async {
            let channel = Endpoint::try_from(format!("http://127.0.0.1:{port}"))
                .expect("endpoint")
                .connect()
                .await
                .map_err(|e| e.to_string())?;
            NodeClient::new(channel)
                .node_get_info(NodeGetInfoRequest {})
                .await
                .map_err(|e| e.to_string())
        };
        match attempt.await {
            Ok(r) => break r.into_inner(),
            Err(e) => assert!(
                Instant::now() < deadline,
                "NodeGetInfo over tcp never answered: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(info.node_id, "ns/vm");
    assert_eq!(info.max_volumes_per_node, 255, "scsi is the default bus");
    assert!(plugin.terminate().await.success());
}

fn start_fails(args: &[&str]) -> String {
    let out = Command::new(BIN)
        .args(args)
        .env_remove("KUBECONFIG")
        .env_remove("NODE_NAME")
        .env_remove("KUBEVIRT_CSI_NODE_ID")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .stdin(Stdio::null())
        .output()
        .expect("run plugin");
    assert!(
        !out.status.success(),
        "expected a start-up failure for {args:?}"
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn start_up_errors_are_clear() {
    let dir = tempfile::Builder::new()
        .prefix("kvcsi-bin-")
        .tempdir()
        .expect("tempdir");
    let sock = format!("unix://{}", dir.path().join("csi.sock").display());
    let err = start_fails(&["--endpoint", &sock]);
    assert!(
        err.contains("cannot resolve the node id") && err.contains("--node-name"),
        "{err}"
    );
    let err = start_fails(&["--endpoint", &sock, "--node-id", "just-a-name"]);
    assert!(err.contains("just-a-name"), "{err}");
    let err = start_fails(&["--endpoint", &sock, "--node-name", "worker-1"]);
    assert!(
        err.contains("cannot resolve the node id") && err.contains("worker-1"),
        "{err}"
    );
    let err = start_fails(&["--endpoint", "udp://x", "--node-id", "ns/vm"]);
    assert!(err.contains("udp://x"), "{err}");

    let precious = dir.path().join("not-a-socket");
    std::fs::write(&precious, b"keep").expect("write");
    let err = start_fails(&[
        "--endpoint",
        &format!("unix://{}", precious.display()),
        "--node-id",
        "ns/vm",
    ]);
    assert!(err.contains("not a socket"), "{err}");
    assert_eq!(std::fs::read(&precious).expect("still there"), b"keep");

    // The state directory must be a directory the plugin can create and own.
    let err = start_fails(&[
        "--endpoint",
        &sock,
        "--node-id",
        "ns/vm",
        "--kubelet-root",
        dir.path().to_str().expect("utf-8"),
        "--state-dir",
        precious.to_str().expect("utf-8"),
    ]);
    assert!(
        err.contains("cannot open the state directory") && err.contains("not-a-socket"),
        "{err}"
    );
    assert_eq!(std::fs::read(&precious).expect("still there"), b"keep");
}

#[tokio::test]
async fn a_python_grpc_client_is_served_on_the_unix_socket() {
    use prost::Message;
    let python = python_grpc();
    let env = Env::new();
    let socket = env.dir.path().join("py/csi.sock");
    let plugin = Plugin::start(&[
        "--endpoint",
        &format!("unix://{}", socket.display()),
        "--node-id",
        "tenant-ns/vm-py",
        "--kubelet-root",
        env.kubelet.to_str().expect("utf-8"),
    ]);
    wait_for_socket(&socket).await;
    // Both spellings gRPC core accepts; each makes it send a percent-encoded path.
    for target in [
        format!("unix://{}", socket.display()),
        format!("unix:{}", socket.display()),
    ] {
        let python = python.clone();
        let (info, node) = tokio::task::spawn_blocking(move || {
            (
                python_call(&python, &target, "/csi.v1.Identity/GetPluginInfo"),
                python_call(&python, &target, "/csi.v1.Node/NodeGetInfo"),
            )
        })
        .await
        .expect("join");
        let info = csi_proto::v1::GetPluginInfoResponse::decode(
            info.expect("GetPluginInfo from Python").as_slice(),
        )
        .expect("decode");
        assert_eq!(info.name, "csi.kubevirt.io");
        let node = csi_proto::v1::NodeGetInfoResponse::decode(
            node.expect("NodeGetInfo from Python").as_slice(),
        )
        .expect("decode");
        assert_eq!(node.node_id, "tenant-ns/vm-py");
    }
    assert!(plugin.terminate().await.success());
}

#[test]
fn tcp_beyond_loopback_needs_insecure_tcp() {
    let dir = tempfile::Builder::new()
        .prefix("kvcsi-bin-")
        .tempdir()
        .expect("tempdir");
    for endpoint in ["tcp://0.0.0.0:1", "tcp://[::]:1"] {
        let err = start_fails(&[
            "--endpoint",
            endpoint,
            "--node-id",
            "ns/vm",
            "--kubelet-root",
            dir.path().to_str().expect("utf-8"),
        ]);
        assert!(
            err.contains("only loopback addresses are allowed") && err.contains("--insecure-tcp"),
            "{err}"
        );
    }
}
