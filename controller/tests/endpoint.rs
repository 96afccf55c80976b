//! The controller binary's endpoint as clients other than Go's see it: a Python gRPC client
//! on the unix socket, and the refusal of TCP beyond loopback. GetPluginInfo needs no infra
//! cluster, so the kubeconfig here points at a port nothing listens on.

#[path = "../../tests/support/python_client.rs"]
mod python_client;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use prost::Message;
use python_client::{python_call, python_grpc};

const BIN: &str = env!("CARGO_BIN_EXE_kubevirt-csi-controller");

const KUBECONFIG: &str = "apiVersion: v1
kind: Config
clusters:
- name: nowhere
  cluster:
    server: https://127.0.0.1:1
    insecure-skip-tls-verify: true
users:
- name: nobody
  user:
    token: not-a-token
contexts:
- name: nowhere
  context:
    cluster: nowhere
    user: nobody
current-context: nowhere
";

struct Controller(Child);

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn command(dir: &Path, endpoint: &str) -> Command {
    let kubeconfig = dir.join("infra.kubeconfig");
    std::fs::write(&kubeconfig, KUBECONFIG).expect("write kubeconfig");
    let mut c = Command::new(BIN);
    c.args(["--endpoint", endpoint, "--infra-namespace", "tenant-a"])
        .args(["--tenant-label", "cluster=a"])
        .arg("--infra-kubeconfig")
        .arg(&kubeconfig)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null());
    c
}

#[test]
fn a_python_grpc_client_is_served_on_the_unix_socket() {
    let python = python_grpc();
    let dir = tempfile::Builder::new()
        .prefix("kvcsi-ctrl-")
        .tempdir()
        .expect("tempdir");
    let socket = dir.path().join("csi/csi.sock");
    let _controller = Controller(
        command(dir.path(), &format!("unix://{}", socket.display()))
            .spawn()
            .expect("start controller"),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        assert!(Instant::now() < deadline, "controller never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
    for target in [
        format!("unix://{}", socket.display()),
        format!("unix:{}", socket.display()),
    ] {
        let bytes = python_call(&python, &target, "/csi.v1.Identity/GetPluginInfo")
            .unwrap_or_else(|e| panic!("GetPluginInfo from Python over {target}: {e}"));
        let info = csi_proto::v1::GetPluginInfoResponse::decode(bytes.as_slice()).expect("decode");
        assert_eq!(info.name, "csi.kubevirt.io");
    }
}

#[test]
fn tcp_beyond_loopback_needs_insecure_tcp() {
    let dir = tempfile::tempdir().expect("tempdir");
    for endpoint in ["tcp://0.0.0.0:1", "tcp://[::]:1"] {
        let out = command(dir.path(), endpoint)
            .output()
            .expect("run controller");
        assert!(!out.status.success(), "{endpoint} must be refused");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("only loopback addresses are allowed") && err.contains("--insecure-tcp"),
            "{err}"
        );
    }
}
