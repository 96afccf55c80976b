//! The whole driver stack on one machine: an infra control plane with the upstream CRDs
//! and an infra bed (see [`Bed`]), one tenant, the controller plugin under the shipped infra
//! Role, and the node plugin either on the host or inside a real QEMU worker VM whose
//! disks are hotplugged over QMP. csi-sanity, the e2e suite and the local demo run on it.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::cluster::{ControlPlane, ControlPlaneOptions};
use crate::csi::{ControllerOptions, ControllerPlugin, connect_tcp, connect_unix};
use crate::fixtures::{self, TenantFixture};
use crate::grpc_router::GrpcRouter;
use crate::kubevirt::{GateProfile, KubeVirt, KubeVirtOptions};
use crate::process::{ManagedProcess, ScratchDir};
use crate::standin::{Standin, StandinOptions};
use crate::tools::workspace_bin;
use crate::vm::{VmOptions, WorkerVm};

/// Guest port the node plugin listens on inside the VM.
const NODE_PORT: u16 = 10000;

/// Where the node plugin runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodePlacement {
    /// On the host, for controller-side runs (no disk ever reaches it).
    Host,
    /// Inside a QEMU worker VM; disks are hotplugged for real.
    Vm,
}

/// Who plays KubeVirt on the infra side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bed {
    /// `tests/standin` plays virt-api, virt-controller, virt-handler and CDI. Kept for
    /// tests that need a fault KubeVirt's own code cannot be made to produce on demand
    /// (the stand-in's fault knobs).
    Standin,
    /// KubeVirt's own virt-api and virt-controller with the feature gates of the profile
    /// (see [`crate::kubevirt`]); the stand-in plays only CDI (`--cdi-only`), and
    /// [`crate::kubevirt_node`] plays kubelet and virt-handler, plugging disks into the
    /// QEMU worker through its QMP socket.
    KubeVirt(GateProfile),
}

/// The command-line names of the beds (`--bed` of kvcsi-sanity and kvcsi-local-up).
impl std::str::FromStr for Bed {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "standin" => Ok(Self::Standin),
            "hotplug" => Ok(Self::KubeVirt(GateProfile::HotplugVolumes)),
            "declarative" => Ok(Self::KubeVirt(GateProfile::DeclarativeOnly)),
            other => Err(format!(
                "unknown bed '{other}' (standin|hotplug|declarative)"
            )),
        }
    }
}

#[derive(Clone, Debug)]
pub struct StackOptions {
    pub bed: Bed,
    pub node: NodePlacement,
    /// `scsi` or `virtio`: the StorageClass `bus` and the controller's default.
    pub bus: String,
    pub namespace: String,
    pub vm_name: String,
    pub controller_args: Vec<String>,
    /// The controller's config file (YAML).
    pub controller_config: String,
    /// How the node plugin learns its node id.
    pub node_identity: NodeIdentity,
}

/// How the node plugin learns which infra VM backs its node.
#[derive(Clone, Debug, Default)]
pub enum NodeIdentity {
    /// `--node-id <namespace>/<vm>`.
    #[default]
    Flag,
    /// `--node-name`, read from the guest Node object through `kubeconfig` (YAML text; in
    /// VM mode its server must be reachable from the guest, e.g. `https://10.0.2.2:<port>`).
    GuestNode {
        kubeconfig: String,
        node_name: String,
    },
}

impl Default for StackOptions {
    fn default() -> Self {
        Self {
            bed: Bed::Standin,
            node: NodePlacement::Vm,
            bus: "scsi".into(),
            namespace: "tenant-a".into(),
            vm_name: "worker-0".into(),
            controller_args: Vec::new(),
            controller_config: CONTROLLER_CONFIG.into(),
            node_identity: NodeIdentity::Flag,
        }
    }
}

/// Controller config used by the stack: the test infra StorageClasses are allowed, and
/// `standard`, which `deploy/example` names.
pub const CONTROLLER_CONFIG: &str = "storageClassEnforcement:\n  allowList: [fast, slow, standard]\n  allowDefault: true\nsnapshotClasses:\n- infraStorageClass: fast\n  infraSnapshotClass: fast-snap\n- infraStorageClass: standard\n  infraSnapshotClass: fast-snap\n";

/// A running stack; everything stops, in reverse order of start, when dropped.
pub struct Stack {
    router: GrpcRouter,
    _node_process: Option<ManagedProcess>,
    pub controller: ControllerPlugin,
    pub vm: Option<WorkerVm>,
    pub standin: Standin,
    /// KubeVirt's own processes and the node stand-ins, on [`Bed::KubeVirt`].
    pub kubevirt: Option<KubeVirt>,
    pub tenant: TenantFixture,
    pub cp: ControlPlane,
    node_endpoint: String,
    options: StackOptions,
    dir: ScratchDir,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl Stack {
    pub async fn start(options: StackOptions) -> Result<Self, BoxError> {
        let t = Instant::now();
        let dir = ScratchDir::new("stack")?;
        let kubelet = dir.path().join("kubelet");
        std::fs::create_dir_all(&kubelet)?;

        let cp = ControlPlane::start(ControlPlaneOptions::default()).await?;
        let client = cp.client().await?;
        let (standin, kubevirt) = match options.bed {
            Bed::Standin => {
                crate::crds::install(&client).await?;
                fixtures::infra_storage_classes(&client).await?;
                (Standin::start(&cp, StandinOptions::default()).await?, None)
            }
            Bed::KubeVirt(profile) => {
                // Order matters: virt-controller's informers only sync once CDI's CRDs
                // exist, and KubeVirt's own CRDs come from its manifests, not hack/crds.sh.
                crate::crds::install_beside_kubevirt(&client).await?;
                crate::kubevirt::install_cdi_companion_crds(&client).await?;
                let kv = KubeVirt::start(
                    &cp,
                    KubeVirtOptions {
                        profile,
                        // Without it KubeVirt v1.7 never passes a claim's new size on to
                        // the running guest, and online expansion (NodeExpandVolume) finds
                        // the old size: an infra cluster must enable it for expansion.
                        extra_feature_gates: vec!["ExpandDisks".into()],
                        ..Default::default()
                    },
                )
                .await?;
                tracing::info!(timings = ?kv.timings(), "kubevirt up");
                fixtures::infra_storage_classes(&client).await?;
                let standin = Standin::start(
                    &cp,
                    StandinOptions {
                        extra_args: vec!["--cdi-only".into()],
                        ..Default::default()
                    },
                )
                .await?;
                (standin, Some(kv))
            }
        };
        let tenant = fixtures::tenant(&cp, &options.namespace, &[("cluster", "a")], None).await?;
        tracing::info!(took = ?t.elapsed(), "infra cluster up");

        let node_id = format!("{}/{}", options.namespace, options.vm_name);
        let node_bin = workspace_bin("kubevirt-csi-node")?;
        // The node plugin gets its id from a flag, or reads it from the guest Node through
        // a kubeconfig in the stack dir (which the VM mounts at the same path).
        let (identity_flag, node_kubeconfig) = match &options.node_identity {
            NodeIdentity::Flag => (format!("--node-id={node_id}"), None),
            NodeIdentity::GuestNode {
                kubeconfig,
                node_name,
            } => {
                let path = dir.path().join("node.kubeconfig");
                std::fs::write(&path, kubeconfig)?;
                (format!("--node-name={node_name}"), Some(path))
            }
        };
        let node_args = |endpoint: String| -> Vec<String> {
            vec![
                format!("--endpoint={endpoint}"),
                identity_flag.clone(),
                format!("--kubelet-root={}", kubelet.display()),
                format!("--bus={}", options.bus),
                "--discovery-timeout-secs=30".into(),
            ]
        };
        let (vm, node_process, node_endpoint) = match options.node {
            NodePlacement::Host => {
                fixtures::worker_vm(&client, &tenant, &options.vm_name, None).await?;
                let sock = dir.path().join("node.sock");
                let args = node_args(format!("unix://{}", sock.display()));
                let process = ManagedProcess::spawn_with(
                    "kubevirt-csi-node",
                    &node_bin,
                    &args,
                    &dir.path().join("node.log"),
                    |c| {
                        if let Some(k) = &node_kubeconfig {
                            c.env("KUBECONFIG", k);
                        }
                    },
                )?;
                wait_until(Duration::from_secs(20), || {
                    let sock = sock.clone();
                    async move { connect_unix(&sock).await.is_ok() && sock.exists() }
                })
                .await
                .map_err(|_| format!("node plugin did not listen on {}", sock.display()))?;
                (None, Some(process), format!("unix://{}", sock.display()))
            }
            NodePlacement::Vm => {
                let mut vm_opts = VmOptions::new(workspace_bin("kvcsi-guest-agent")?);
                vm_opts.shared_dir = Some(dir.path().to_path_buf());
                vm_opts.forwarded_ports = vec![NODE_PORT];
                let vm = WorkerVm::boot(vm_opts).await?;
                tracing::info!(took = ?vm.boot_duration(), "worker VM booted");
                fixtures::worker_vm(
                    &client,
                    &tenant,
                    &options.vm_name,
                    Some(&vm.external_qmp_socket()),
                )
                .await?;
                // The agent has no per-command environment here: `env` sets it.
                let mut argv: Vec<String> = match &node_kubeconfig {
                    Some(k) => vec!["/usr/bin/env".into(), format!("KUBECONFIG={}", k.display())],
                    None => Vec::new(),
                };
                argv.push(node_bin.display().to_string());
                argv.extend(node_args(format!("tcp://0.0.0.0:{NODE_PORT}")));
                // QEMU's user network forwards the host port to the guest's own address, not
                // its loopback: this VM-only endpoint has to be explicitly insecure.
                argv.push("--insecure-tcp".into());
                vm.spawn_background(argv, Some(&format!("{}/node.log", dir.path().display())))
                    .await?;
                let port = vm
                    .host_port(NODE_PORT)
                    .ok_or("node port is not forwarded")?;
                let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
                wait_until(Duration::from_secs(30), || async move {
                    match connect_tcp(addr).await {
                        Ok(ch) => csi_proto::v1::identity_client::IdentityClient::new(ch)
                            .get_plugin_info(csi_proto::v1::GetPluginInfoRequest {})
                            .await
                            .is_ok(),
                        Err(_) => false,
                    }
                })
                .await
                .map_err(|_| {
                    format!(
                        "node plugin in the VM did not answer on {addr}; see {}/node.log",
                        dir.path().display()
                    )
                })?;
                (Some(vm), None, addr.to_string())
            }
        };

        let mut controller_args = vec![format!("--default-bus={}", options.bus)];
        controller_args.extend(options.controller_args.iter().cloned());
        let controller = ControllerPlugin::start(ControllerOptions {
            infra_kubeconfig: tenant.controller_kubeconfig.clone(),
            namespace: tenant.namespace.clone(),
            tenant_labels: tenant.label_args(),
            config_yaml: Some(options.controller_config.clone()),
            extra_args: controller_args,
        })
        .await?;
        let node_channel = match options.node {
            NodePlacement::Host => {
                connect_unix(Path::new(node_endpoint.trim_start_matches("unix://"))).await?
            }
            NodePlacement::Vm => connect_tcp(node_endpoint.parse()?).await?,
        };
        let router =
            GrpcRouter::start(connect_unix(controller.socket()).await?, node_channel).await?;
        tracing::info!(took = ?t.elapsed(), "stack up");
        Ok(Self {
            router,
            _node_process: node_process,
            controller,
            vm,
            standin,
            kubevirt,
            tenant,
            cp,
            node_endpoint,
            options,
            dir,
        })
    }

    /// The node plugin's own endpoint (`unix:///...` or `host:port`).
    pub fn node_endpoint(&self) -> &str {
        &self.node_endpoint
    }

    /// One endpoint serving the node plugin's Node service and the controller's Identity
    /// and Controller services, as a CO pairs them (see [`GrpcRouter`]).
    pub fn driver_endpoint(&self) -> SocketAddr {
        self.router.addr()
    }

    /// The kubelet root the node plugin accepts paths under (shared with the VM).
    pub fn kubelet_root(&self) -> PathBuf {
        self.dir.path().join("kubelet")
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// csi-sanity's flags for this stack and an access type (`mount` or `block`).
    pub fn sanity_args(&self, access_type: &str) -> Result<Vec<String>, BoxError> {
        let d = self.dir.path();
        let params = d.join("sanity-params.yaml");
        std::fs::write(
            &params,
            format!("infraStorageClassName: fast\nbus: {}\n", self.options.bus),
        )?;
        let root = self.kubelet_root().join("sanity");
        // Without path hooks csi-sanity makes its directories with mkdir, not mkdir -p.
        std::fs::create_dir_all(&root)?;
        let mut args = vec![
            format!("-csi.endpoint={}", self.router.addr()),
            format!(
                "-csi.controllerendpoint=unix://{}",
                self.controller.socket().display()
            ),
            format!("-csi.mountdir={}", root.join("target").display()),
            format!("-csi.stagingdir={}", root.join("staging").display()),
            format!("-csi.testvolumesize={}", 64 << 20),
            format!("-csi.testvolumeexpandsize={}", 128 << 20),
            format!("-csi.testvolumeaccesstype={access_type}"),
            format!("-csi.testvolumeparameters={}", params.display()),
        ];
        if let Some(vm) = &self.vm {
            // Paths are created, removed and checked inside the guest, where the mounts are.
            let exec = workspace_bin("kvcsi-guest-exec")?;
            let addr = vm.agent_addr();
            let hook = |name: &str, script: &str| -> Result<String, BoxError> {
                let path = d.join(name);
                std::fs::write(
                    &path,
                    format!(
                        "#!/bin/sh\nexec {} --addr {addr} -- sh -c '{script}' hook \"$1\"\n",
                        exec.display()
                    ),
                )?;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
                Ok(path.display().to_string())
            };
            let mkdir = hook("create-dir", "mkdir -p \"$1\" && echo \"$1\"")?;
            let rmdir = hook("remove-path", "rm -rf \"$1\"")?;
            let check = hook(
                "check-path",
                "if [ ! -e \"$1\" ]; then echo not_found; elif [ -d \"$1\" ]; then echo directory; elif [ -f \"$1\" ]; then echo file; else echo other; fi",
            )?;
            args.extend([
                format!("-csi.createmountpathcmd={mkdir}"),
                format!("-csi.createstagingpathcmd={mkdir}"),
                format!("-csi.removemountpathcmd={rmdir}"),
                format!("-csi.removestagingpathcmd={rmdir}"),
                format!("-csi.checkpathcmd={check}"),
            ]);
        }
        Ok(args)
    }

    /// Log tails of the infra bed: the stand-in, and on [`Bed::KubeVirt`] the node
    /// stand-ins' recent errors and KubeVirt's own processes.
    pub fn infra_log_tails(&self, lines: usize) -> String {
        let mut out = format!("--- stand-in ---\n{}", self.standin.log_tail(lines));
        if let Some(kv) = &self.kubevirt {
            out.push_str(&format!(
                "\n--- node stand-ins (recent errors) ---\n{:#?}\n--- virt-controller ---\n{}\n--- virt-api ---\n{}",
                kv.node().recent_errors(),
                kv.virt_controller_log_tail(lines),
                kv.virt_api_log_tail(lines),
            ));
        }
        out
    }

    /// Last lines of the node plugin's log (host file, or the shared-dir file in VM mode).
    pub fn node_log_tail(&self, lines: usize) -> String {
        crate::process::log_tail(&self.dir.path().join("node.log"), lines)
    }
}

/// Retries `check` until it is true or `timeout` passes. For processes that give no
/// readiness signal but answering; the interval is short so start-up stays quick.
async fn wait_until<F, Fut>(timeout: Duration, mut check: F) -> Result<(), ()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
