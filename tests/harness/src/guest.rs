//! The guest (tenant) cluster: a second control plane plus kube-controller-manager running
//! the controllers a CSI volume's life needs (PV binding, attach/detach, expansion,
//! protection finalizers, garbage collection, default service accounts), with the driver's
//! guest-side objects and one worker Node shaped the way Cluster API KubeVirt makes it.
//!
//! There is no kubelet: [`crate::kubelet::KubeletStandin`] plays its volume part.

use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, ServiceAccount};
use k8s_openapi::api::storage::v1::{CSIDriver, CSINode, StorageClass};
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::runtime::wait::await_condition;

use crate::cluster::{ClusterError, ControlPlane, ControlPlaneOptions};
use crate::crds::CrdError;
use crate::process::{ManagedProcess, ProcessError};
use crate::tools::{ToolError, Tools, repo_root};

/// The driver name the guest objects use.
pub const DRIVER: &str = "csi.kubevirt.io";

/// The controllers kube-controller-manager runs for the guest.
const CONTROLLERS: &[&str] = &[
    "persistentvolume-binder-controller",
    "persistentvolume-attach-detach-controller",
    "persistentvolume-expander-controller",
    "persistentvolumeclaim-protection-controller",
    "persistentvolume-protection-controller",
    "garbage-collector-controller",
    "serviceaccount-controller",
];

/// Errors bringing up the guest cluster or creating its objects.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// The control plane failed.
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    /// A tool is missing.
    #[error(transparent)]
    Tool(#[from] ToolError),
    /// kube-controller-manager could not start or died.
    #[error(transparent)]
    Process(#[from] ProcessError),
    /// The snapshot (and other upstream) CRDs could not be installed.
    #[error("cannot install the CRDs into the guest")]
    Crds(#[source] CrdError),
    /// A manifest in deploy/ could not be read or parsed.
    #[error("cannot read manifest {path}")]
    Manifest {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Creating or patching an object failed.
    #[error("cannot apply {what} in the guest")]
    Apply {
        what: String,
        #[source]
        source: kube::Error,
    },
    /// `kubectl apply` of shipped manifests failed.
    #[error("kubectl apply -f {files} failed: {stderr}")]
    Kubectl { files: String, stderr: String },
    /// kube-controller-manager did not create the default ServiceAccount in time.
    #[error(
        "kube-controller-manager did not create serviceaccount default/default within {waited:?}; last log lines:\n{log_tail}"
    )]
    ControllerManagerNotReady { waited: Duration, log_tail: String },
}

/// The guest's worker Node: its name and the infra VM behind it.
#[derive(Clone, Debug)]
pub struct GuestNode {
    pub name: String,
    pub vm_namespace: String,
    pub vm_name: String,
}

impl GuestNode {
    /// The CSI node id the node plugin reports: `<vm namespace>/<vm name>`.
    pub fn node_id(&self) -> String {
        format!("{}/{}", self.vm_namespace, self.vm_name)
    }
}

/// A running guest cluster. kube-controller-manager stops before the control plane.
pub struct GuestCluster {
    kcm: ManagedProcess,
    pub cp: ControlPlane,
}

impl GuestCluster {
    /// Starts the guest control plane and kube-controller-manager, installs the CRDs, and
    /// waits until the controller manager works (it creates the default ServiceAccount).
    pub async fn start() -> Result<Self, GuestError> {
        let tools = Tools::locate()?;
        let cp = ControlPlane::start(ControlPlaneOptions {
            name: "guest".into(),
            ..Default::default()
        })
        .await?;
        let client = cp.client().await?;
        crate::crds::install(&client)
            .await
            .map_err(GuestError::Crds)?;
        let args = vec![
            format!("--kubeconfig={}", cp.kubeconfig_path().display()),
            format!("--controllers={}", CONTROLLERS.join(",")),
            "--leader-elect=false".into(),
            // Nothing scrapes it, and a fixed port would clash between parallel runs.
            "--secure-port=0".into(),
            "--use-service-account-credentials=false".into(),
            // The ADC reconciles every 100ms by default; keep the default sync periods.
            "--v=2".into(),
        ];
        let mut kcm = ManagedProcess::spawn(
            "kube-controller-manager",
            &tools.kube_controller_manager,
            &args,
            &cp.dir().join("kube-controller-manager.log"),
        )?;
        let waited = Duration::from_secs(60);
        let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), "default");
        let ready = await_condition(sas, "default", |o: Option<&ServiceAccount>| o.is_some());
        if !matches!(tokio::time::timeout(waited, ready).await, Ok(Ok(_))) {
            kcm.check_running()?;
            return Err(GuestError::ControllerManagerNotReady {
                waited,
                log_tail: kcm.log_tail(30),
            });
        }
        Ok(Self { kcm, cp })
    }

    /// An administrator client for the guest.
    pub async fn client(&self) -> Result<kube::Client, GuestError> {
        Ok(self.cp.client().await?)
    }

    /// The guest admin kubeconfig (what the sidecars use).
    pub fn kubeconfig_path(&self) -> &Path {
        self.cp.kubeconfig_path()
    }

    /// Last lines of kube-controller-manager's log.
    pub fn kcm_log_tail(&self, lines: usize) -> String {
        self.kcm.log_tail(lines)
    }

    /// Fails if kube-controller-manager has exited.
    pub fn check_running(&mut self) -> Result<(), GuestError> {
        Ok(self.kcm.check_running()?)
    }

    /// The CSIDriver from `deploy/base/csidriver.yaml`, a StorageClass `storage_class`
    /// backed by `infra_storage_class` on `bus`, and the example VolumeSnapshotClass.
    pub async fn install_driver(
        &self,
        storage_class: &str,
        infra_storage_class: &str,
        bus: &str,
    ) -> Result<(), GuestError> {
        let client = self.client().await?;
        let pp = PatchParams::apply("kvcsi-harness").force();
        let driver: CSIDriver = read_manifest(&repo_root().join("deploy/base/csidriver.yaml"))?;
        Api::<CSIDriver>::all(client.clone())
            .patch(DRIVER, &pp, &Patch::Apply(&driver))
            .await
            .map_err(apply_err("the CSIDriver"))?;
        let sc: StorageClass = serde_json::from_value(serde_json::json!({
            "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
            "metadata": {"name": storage_class},
            "provisioner": DRIVER,
            "parameters": {
                "infraStorageClassName": infra_storage_class,
                "bus": bus,
                "csi.storage.k8s.io/fstype": "ext4",
            },
            "reclaimPolicy": "Delete",
            "volumeBindingMode": "Immediate",
            "allowVolumeExpansion": true,
        }))
        .map_err(|e| GuestError::Manifest {
            path: PathBuf::from("<storage class>"),
            source: e.into(),
        })?;
        Api::<StorageClass>::all(client.clone())
            .patch(storage_class, &pp, &Patch::Apply(&sc))
            .await
            .map_err(apply_err("the StorageClass"))?;
        let vsc: DynamicObject =
            read_manifest(&repo_root().join("deploy/example/volumesnapshotclass.yaml"))?;
        let name = vsc.metadata.name.clone().unwrap_or_default();
        Api::<DynamicObject>::all_with(client, &snapshot_class_resource())
            .patch(&name, &pp, &Patch::Apply(&vsc))
            .await
            .map_err(apply_err("the VolumeSnapshotClass"))?;
        Ok(())
    }

    /// Registers `node` the way Cluster API KubeVirt and kubelet leave it: providerID
    /// `kubevirt://<vm>`, the cluster-namespace annotation, controller-managed
    /// attach/detach, Ready, and a CSINode listing the driver with its node id.
    pub async fn register_node(&self, node: &GuestNode) -> Result<(), GuestError> {
        let client = self.client().await?;
        let pp = PatchParams::apply("kvcsi-harness").force();
        let nodes: Api<Node> = Api::all(client.clone());
        let obj: Node = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {
                "name": node.name,
                "labels": {"kubernetes.io/hostname": node.name, "kubernetes.io/os": "linux"},
                "annotations": {
                    "cluster.x-k8s.io/cluster-namespace": node.vm_namespace,
                    "volumes.kubernetes.io/controller-managed-attach-detach": "true",
                },
            },
            "spec": {"providerID": format!("kubevirt://{}", node.vm_name)},
        }))
        .map_err(|e| GuestError::Manifest {
            path: PathBuf::from("<node>"),
            source: e.into(),
        })?;
        let created = nodes
            .patch(&node.name, &pp, &Patch::Apply(&obj))
            .await
            .map_err(apply_err("the Node"))?;
        let now = chrono_now();
        let status = serde_json::json!({
            "apiVersion": "v1", "kind": "Node",
            "status": {"conditions": [{
                "type": "Ready", "status": "True", "reason": "KubeletReady",
                "message": "kubelet stand-in", "lastHeartbeatTime": now, "lastTransitionTime": now,
            }]},
        });
        nodes
            .patch_status(&node.name, &pp, &Patch::Apply(&status))
            .await
            .map_err(apply_err("the Node status"))?;
        let csinode: CSINode = serde_json::from_value(serde_json::json!({
            "apiVersion": "storage.k8s.io/v1", "kind": "CSINode",
            "metadata": {
                "name": node.name,
                "ownerReferences": [{
                    "apiVersion": "v1", "kind": "Node", "name": node.name,
                    "uid": created.metadata.uid.unwrap_or_default(),
                }],
            },
            "spec": {"drivers": [{"name": DRIVER, "nodeID": node.node_id(), "topologyKeys": null}]},
        }))
        .map_err(|e| GuestError::Manifest {
            path: PathBuf::from("<csinode>"),
            source: e.into(),
        })?;
        Api::<CSINode>::all(client)
            .patch(&node.name, &pp, &Patch::Apply(&csinode))
            .await
            .map_err(apply_err("the CSINode"))?;
        Ok(())
    }
}

impl GuestCluster {
    /// A kubeconfig for the node plugin inside the worker VM, authenticating as the
    /// `kubevirt-csi-node` ServiceAccount of `deploy/base/node-rbac.yaml` (applied here, so
    /// the plugin has exactly the shipped permissions), reaching the host's loopback
    /// apiserver at 10.0.2.2 (QEMU user networking's host address).
    ///
    /// The apiserver's serving certificate covers 10.0.2.2, so the plugin verifies it.
    pub async fn vm_node_kubeconfig(&self) -> Result<String, GuestError> {
        self.apply_files(&["deploy/base/namespace.yaml", "deploy/base/node-rbac.yaml"])?;
        let (user, groups) = service_account_user(SHIPPED_NAMESPACE, "kubevirt-csi-node");
        let server = format!("https://10.0.2.2:{}", self.cp.socket_addr().port());
        let groups: Vec<&str> = groups.iter().map(String::as_str).collect();
        Ok(self.cp.kubeconfig_for_server(&server, &user, &groups)?)
    }
}

impl GuestCluster {
    /// A kubeconfig file for the controller-side sidecars, authenticating as the
    /// `kubevirt-csi-controller` ServiceAccount bound by `deploy/base/controller-rbac.yaml`
    /// (applied here): a verb the shipped ClusterRoles miss fails the sidecar's call.
    pub fn sidecar_kubeconfig(&self) -> Result<PathBuf, GuestError> {
        self.apply_files(&[
            "deploy/base/namespace.yaml",
            "deploy/base/controller-rbac.yaml",
        ])?;
        let (user, groups) = service_account_user(SHIPPED_NAMESPACE, "kubevirt-csi-controller");
        let groups: Vec<&str> = groups.iter().map(String::as_str).collect();
        let yaml = self.cp.kubeconfig_for(&user, &groups)?;
        let path = self.cp.dir().join("sidecars.kubeconfig");
        std::fs::write(&path, yaml).map_err(|e| GuestError::Manifest {
            path: path.clone(),
            source: e.into(),
        })?;
        Ok(path)
    }

    /// `kubectl apply -f` of repository files, as the guest admin.
    fn apply_files(&self, files: &[&str]) -> Result<(), GuestError> {
        let kubectl = Tools::locate()?.kubectl;
        let mut cmd = std::process::Command::new(&kubectl);
        cmd.arg(format!("--kubeconfig={}", self.kubeconfig_path().display()))
            .args(["apply", "--server-side", "--force-conflicts"]);
        for f in files {
            cmd.arg("-f").arg(repo_root().join(f));
        }
        let out = cmd.output().map_err(|e| GuestError::Manifest {
            path: kubectl.clone(),
            source: e.into(),
        })?;
        if !out.status.success() {
            return Err(GuestError::Kubectl {
                files: files.join(" "),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        Ok(())
    }
}

/// The namespace `deploy/base` installs the driver into.
const SHIPPED_NAMESPACE: &str = "kubevirt-csi";

/// The user name and groups the apiserver gives a ServiceAccount's token; a client
/// certificate with these is matched by RBAC `ServiceAccount` subjects the same way.
fn service_account_user(ns: &str, name: &str) -> (String, Vec<String>) {
    (
        format!("system:serviceaccount:{ns}:{name}"),
        vec![
            "system:serviceaccounts".into(),
            format!("system:serviceaccounts:{ns}"),
        ],
    )
}

/// `snapshot.storage.k8s.io/v1` VolumeSnapshotClass.
pub fn snapshot_class_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("snapshot.storage.k8s.io", "v1", "VolumeSnapshotClass"),
        "volumesnapshotclasses",
    )
}

/// `snapshot.storage.k8s.io/v1` VolumeSnapshot.
pub fn snapshot_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("snapshot.storage.k8s.io", "v1", "VolumeSnapshot"),
        "volumesnapshots",
    )
}

fn apply_err(what: &str) -> impl FnOnce(kube::Error) -> GuestError {
    let what = what.to_string();
    move |source| GuestError::Apply { what, source }
}

fn read_manifest<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, GuestError> {
    let err = |source: Box<dyn std::error::Error + Send + Sync>| GuestError::Manifest {
        path: path.to_path_buf(),
        source,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.into()))?;
    serde_yaml::from_str(&text).map_err(|e| err(e.into()))
}

/// RFC 3339 "now" for condition timestamps, without a date-time dependency.
fn chrono_now() -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Time {
    k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now())
}

/// How [`FullStack::start`] sets things up.
#[derive(Clone, Debug)]
pub struct FullStackOptions {
    /// The infra side: tenant namespace, VM name, bus, controller config.
    pub stack: crate::stack::StackOptions,
    /// The guest StorageClass the harness creates (the example's class comes from
    /// `deploy/example`).
    pub storage_class: String,
    /// The infra StorageClass behind it.
    pub infra_storage_class: String,
    /// Resolve the node id from the guest Node (true) or pass `--node-id` (false).
    pub node_id_from_guest_node: bool,
}

impl Default for FullStackOptions {
    fn default() -> Self {
        Self {
            stack: crate::stack::StackOptions::default(),
            storage_class: "kubevirt-fast".into(),
            infra_storage_class: "fast".into(),
            node_id_from_guest_node: true,
        }
    }
}

/// Everything: the guest cluster with kube-controller-manager, the infra stack with the
/// worker VM, node plugin and controller, and the real sidecars between them. Dropped in
/// field order: sidecars, then the infra stack, then the guest cluster.
pub struct FullStack {
    pub sidecars: crate::sidecars::Sidecars,
    pub stack: crate::stack::Stack,
    pub guest: GuestCluster,
    pub node: GuestNode,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl FullStack {
    pub async fn start(opts: FullStackOptions) -> Result<Self, BoxError> {
        let guest = GuestCluster::start().await?;
        let node = GuestNode {
            name: opts.stack.vm_name.clone(),
            vm_namespace: opts.stack.namespace.clone(),
            vm_name: opts.stack.vm_name.clone(),
        };
        guest.register_node(&node).await?;
        guest
            .install_driver(
                &opts.storage_class,
                &opts.infra_storage_class,
                &opts.stack.bus,
            )
            .await?;
        let mut stack_opts = opts.stack.clone();
        if opts.node_id_from_guest_node {
            stack_opts.node_identity = crate::stack::NodeIdentity::GuestNode {
                kubeconfig: guest.vm_node_kubeconfig().await?,
                node_name: node.name.clone(),
            };
        }
        let stack = crate::stack::Stack::start(stack_opts).await?;
        let sidecars = crate::sidecars::Sidecars::start(
            stack.controller.socket(),
            &guest.sidecar_kubeconfig()?,
            guest.kubeconfig_path(),
            stack.dir(),
        )?;
        Ok(Self {
            sidecars,
            stack,
            guest,
            node,
        })
    }

    /// Log tails of every process, for failure messages.
    pub fn diagnostics(&self) -> String {
        format!(
            "--- controller ---\n{}\n--- node plugin ---\n{}\n{}\n--- kube-controller-manager ---\n{}\n{}",
            self.stack.controller.log_tail(40),
            self.stack.node_log_tail(40),
            self.stack.infra_log_tails(20),
            self.guest.kcm_log_tail(30),
            self.sidecars.log_tails(25),
        )
    }
}
