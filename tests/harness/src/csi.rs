//! Running our CSI plugins as real processes and talking gRPC to them.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use csi_proto::v1::controller_client::ControllerClient;
use csi_proto::v1::identity_client::IdentityClient;
use csi_proto::v1::node_client::NodeClient;
use hyper_util::rt::TokioIo;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Api, Patch, PatchParams};
use tonic::transport::{Channel, Endpoint};

use crate::process::{ManagedProcess, ProcessError, ScratchDir};
use crate::tools::{ToolError, repo_root, workspace_bin};

/// Errors starting or reaching a plugin.
#[derive(Debug, thiserror::Error)]
pub enum CsiError {
    #[error(transparent)]
    Tool(#[from] ToolError),
    #[error(transparent)]
    Process(#[from] ProcessError),
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot connect to {target}")]
    Connect {
        target: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("cannot read or apply {what}")]
    Rbac {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// A gRPC channel to a plugin on a unix socket.
pub async fn connect_unix(path: &Path) -> Result<Channel, CsiError> {
    let path = path.to_path_buf();
    let target = path.display().to_string();
    Endpoint::try_from("http://localhost")
        .map_err(|source| CsiError::Connect {
            target: target.clone(),
            source,
        })?
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                tokio::net::UnixStream::connect(path)
                    .await
                    .map(TokioIo::new)
            }
        }))
        .await
        .map_err(|source| CsiError::Connect { target, source })
}

/// A gRPC channel to a plugin on TCP.
pub async fn connect_tcp(addr: std::net::SocketAddr) -> Result<Channel, CsiError> {
    let target = format!("http://{addr}");
    Endpoint::try_from(target.clone())
        .map_err(|source| CsiError::Connect {
            target: target.clone(),
            source,
        })?
        .connect()
        .await
        .map_err(|source| CsiError::Connect { target, source })
}

/// Grants `user` the controller's infra Role from `deploy/infra/role.yaml` in `namespace`,
/// so tests run the controller with exactly the permissions we ship.
pub async fn grant_controller_role(
    client: &kube::Client,
    namespace: &str,
    user: &str,
) -> Result<(), CsiError> {
    let path = repo_root().join("deploy/infra/role.yaml");
    let rbac = |what: &str| {
        let what = what.to_string();
        move |e: Box<dyn std::error::Error + Send + Sync>| CsiError::Rbac { what, source: e }
    };
    let text =
        std::fs::read_to_string(&path).map_err(|e| rbac(&path.display().to_string())(e.into()))?;
    let role: Role =
        serde_yaml::from_str(&text).map_err(|e| rbac(&path.display().to_string())(e.into()))?;
    let name = role.metadata.name.clone().unwrap_or_default();
    let pp = PatchParams::apply("kvcsi-harness").force();
    Api::<Role>::namespaced(client.clone(), namespace)
        .patch(&name, &pp, &Patch::Apply(&role))
        .await
        .map_err(|e| rbac("the controller Role")(e.into()))?;
    let binding: RoleBinding = serde_json::from_value(serde_json::json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": format!("{name}-{user}")},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}]
    }))
    .map_err(|e| rbac("the controller RoleBinding")(e.into()))?;
    Api::<RoleBinding>::namespaced(client.clone(), namespace)
        .patch(&format!("{name}-{user}"), &pp, &Patch::Apply(&binding))
        .await
        .map_err(|e| rbac("the controller RoleBinding")(e.into()))?;
    Ok(())
}

/// How to start the controller plugin.
#[derive(Clone, Debug)]
pub struct ControllerOptions {
    /// Kubeconfig (YAML text) for the infra cluster.
    pub infra_kubeconfig: String,
    pub namespace: String,
    pub tenant_labels: Vec<String>,
    /// Contents of the config file, if any.
    pub config_yaml: Option<String>,
    /// More flags, e.g. `--attach-timeout=2s`.
    pub extra_args: Vec<String>,
}

/// The `kubevirt-csi-controller` binary serving on a unix socket; killed on drop.
#[derive(Debug)]
pub struct ControllerPlugin {
    process: ManagedProcess,
    socket: PathBuf,
    channel: Channel,
    _dir: ScratchDir,
}

impl ControllerPlugin {
    pub async fn start(opts: ControllerOptions) -> Result<Self, CsiError> {
        let bin = workspace_bin("kubevirt-csi-controller")?;
        let dir = ScratchDir::new("controller")?;
        let write = |name: &str, text: &str| -> Result<PathBuf, CsiError> {
            let path = dir.path().join(name);
            std::fs::write(&path, text).map_err(|source| CsiError::Write {
                path: path.clone(),
                source,
            })?;
            Ok(path)
        };
        let kubeconfig = write("infra.kubeconfig", &opts.infra_kubeconfig)?;
        let socket = dir.path().join("csi.sock");
        let mut args = vec![
            format!("--endpoint=unix://{}", socket.display()),
            format!("--infra-kubeconfig={}", kubeconfig.display()),
            format!("--infra-namespace={}", opts.namespace),
        ];
        for l in &opts.tenant_labels {
            args.push(format!("--tenant-label={l}"));
        }
        if let Some(cfg) = &opts.config_yaml {
            args.push(format!("--config={}", write("config.yaml", cfg)?.display()));
        }
        args.extend(opts.extra_args.iter().cloned());
        let mut process = ManagedProcess::spawn_with(
            "kubevirt-csi-controller",
            &bin,
            &args,
            &dir.path().join("controller.log"),
            |c| {
                c.env(
                    "RUST_LOG",
                    std::env::var("KVCSI_LOG").unwrap_or_else(|_| "info".into()),
                );
            },
        )?;
        let channel = wait_for_socket(&mut process, &socket, Duration::from_secs(20)).await?;
        Ok(Self {
            process,
            socket,
            channel,
            _dir: dir,
        })
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn identity(&self) -> IdentityClient<Channel> {
        IdentityClient::new(self.channel.clone())
    }

    pub fn controller(&self) -> ControllerClient<Channel> {
        ControllerClient::new(self.channel.clone())
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        self.process.log_tail(lines)
    }

    /// SIGTERM, and wait for a graceful exit.
    pub async fn stop(self) {
        self.process.stop(Duration::from_secs(5)).await;
    }
}

/// A node client on any channel (the node plugin may sit inside a VM, reached over TCP).
pub fn node_client(channel: Channel) -> NodeClient<Channel> {
    NodeClient::new(channel)
}

async fn wait_for_socket(
    process: &mut ManagedProcess,
    socket: &Path,
    timeout: Duration,
) -> Result<Channel, CsiError> {
    let deadline = Instant::now() + timeout;
    loop {
        process.check_running()?;
        if socket.exists()
            && let Ok(channel) = connect_unix(socket).await
        {
            let mut id = IdentityClient::new(channel.clone());
            if id
                .get_plugin_info(csi_proto::v1::GetPluginInfoRequest {})
                .await
                .is_ok()
            {
                return Ok(channel);
            }
        }
        if Instant::now() > deadline {
            return Err(ProcessError::NotReady {
                name: process.name().to_string(),
                waited: timeout,
                log_tail: process.log_tail(30),
            }
            .into());
        }
        // Our own process, but it offers no readiness signal besides the socket answering.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
