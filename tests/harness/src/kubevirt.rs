//! KubeVirt's own virt-api and virt-controller (built by `hack/tools.sh kubevirt`) on a
//! [`ControlPlane`], installed the way virt-operator would install them, without
//! virt-operator: every CRD, the RBAC, the `KubeVirt` CR with the test's feature gates and
//! `status.phase: Deployed`, certificates, the aggregated APIService and virt-api's webhooks.
//! Node-side parts (virt-handler, kubelet) are stand-ins, see [`crate::kubevirt_node`].
//!
//! The objects come from `hack/kubevirt-manifests`, which calls virt-operator's own
//! constructors; this module only fills in what a cluster would (CA bundles, where virt-api
//! listens) and applies them server-side.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine as _;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::kube_aggregator::pkg::apis::apiregistration::v1::APIService;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::runtime::wait::{await_condition, conditions};
use serde::Deserialize as _;

use crate::certs::CertError;
use crate::cluster::{ClusterError, ControlPlane};
use crate::kubevirt_node::{NodeStandin, NodeStandinError};
use crate::process::{ManagedProcess, ProcessError, free_port};
use crate::tools::{ToolError, script_env};

/// The namespace virt-api and virt-controller run in. They read it from a service-account
/// file that does not exist outside a pod and then fall back to this name.
pub const NAMESPACE: &str = "kubevirt";
/// Users KubeVirt's admission recognises as its own components (vmi-update-admitter).
pub const API_USER: &str = "system:serviceaccount:kubevirt:kubevirt-apiserver";
pub const CONTROLLER_USER: &str = "system:serviceaccount:kubevirt:kubevirt-controller";
/// Groups a ServiceAccount token would carry; client certificates name them explicitly.
const SA_GROUPS: &[&str] = &["system:serviceaccounts", "system:serviceaccounts:kubevirt"];
const MANAGER: &str = "kvcsi-kubevirt";

/// The feature-gate sets the tests run KubeVirt with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GateProfile {
    /// `HotplugVolumes`: hotplug requests queue in `vm.status.volumeRequests` (v1.7's way).
    HotplugVolumes,
    /// `DeclarativeHotplugVolumes` only: hotplug edits the VM spec (KubeVirt main's way).
    DeclarativeOnly,
}

impl GateProfile {
    pub fn feature_gates(self) -> &'static [&'static str] {
        match self {
            Self::HotplugVolumes => &["HotplugVolumes"],
            Self::DeclarativeOnly => &["DeclarativeHotplugVolumes"],
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KubeVirtError {
    #[error(transparent)]
    Tool(#[from] ToolError),
    #[error(transparent)]
    Process(#[from] ProcessError),
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error(transparent)]
    Cert(#[from] CertError),
    #[error(transparent)]
    Node(#[from] NodeStandinError),
    #[error("{what} not found at {path}: run hack/tools.sh kubevirt")]
    Missing { what: &'static str, path: PathBuf },
    #[error("cannot read or write {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{file} is not valid YAML")]
    Parse {
        file: PathBuf,
        #[source]
        source: serde_yaml::Error,
    },
    #[error("{kind} {name}: the bed does not know where this kind is served")]
    UnknownKind { kind: String, name: String },
    #[error("{file} has no {what}")]
    Malformed { file: PathBuf, what: &'static str },
    #[error("the apiserver refused {what}")]
    Apply {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error("no free loopback port")]
    Port(#[source] std::io::Error),
    #[error("{what} not ready after {waited:?}; {detail}")]
    NotReady {
        what: String,
        waited: Duration,
        detail: String,
    },
}

/// Knobs for [`KubeVirt::start`].
#[derive(Clone, Debug)]
pub struct KubeVirtOptions {
    pub profile: GateProfile,
    /// Extra feature gates on top of the profile's.
    pub extra_feature_gates: Vec<String>,
    /// The node the stand-ins play kubelet and virt-handler on.
    pub node_name: String,
    pub ready_timeout: Duration,
}

impl Default for KubeVirtOptions {
    fn default() -> Self {
        Self {
            profile: GateProfile::HotplugVolumes,
            extra_feature_gates: Vec::new(),
            node_name: "kvcsi-infra-node".into(),
            ready_timeout: Duration::from_secs(60),
        }
    }
}

/// Where `hack/tools.sh kubevirt` put the binaries and manifests.
#[derive(Clone, Debug)]
pub struct KubeVirtTools {
    pub virt_api: PathBuf,
    pub virt_controller: PathBuf,
    pub manifests: PathBuf,
}

impl KubeVirtTools {
    /// From the environment `hack/test.sh` exports, else `hack/tools.sh --env` (which only
    /// prints paths).
    pub fn locate() -> Result<Self, KubeVirtError> {
        let from_script = script_env("tools.sh", "--env")?;
        let get = |var: &'static str| -> PathBuf {
            std::env::var_os(var)
                .map(PathBuf::from)
                .or_else(|| {
                    from_script
                        .iter()
                        .find(|(k, _)| k == var)
                        .map(|(_, v)| PathBuf::from(v))
                })
                .unwrap_or_default()
        };
        let t = Self {
            virt_api: get("VIRT_API"),
            virt_controller: get("VIRT_CONTROLLER"),
            manifests: get("KUBEVIRT_MANIFESTS"),
        };
        for (what, path) in [
            ("virt-api", &t.virt_api),
            ("virt-controller", &t.virt_controller),
        ] {
            if !path.is_file() {
                return Err(KubeVirtError::Missing {
                    what,
                    path: path.clone(),
                });
            }
        }
        if !t.manifests.join("crds.yaml").is_file() {
            return Err(KubeVirtError::Missing {
                what: "kubevirt manifests",
                path: t.manifests.clone(),
            });
        }
        Ok(t)
    }
}

/// When each start-up step finished, counted from the start, for the README's warm-start
/// figure.
#[derive(Clone, Debug, Default)]
pub struct StartTimings {
    pub milestones: Vec<(&'static str, Duration)>,
    pub total: Duration,
}

impl StartTimings {
    fn mark(&mut self, what: &'static str, since: Instant) {
        self.milestones.push((what, since.elapsed()));
    }
}

/// Running virt-api and virt-controller plus the node stand-ins; all stop on drop.
#[derive(Debug)]
pub struct KubeVirt {
    // Field order is drop order: the stand-in tasks go first, then the processes.
    node: NodeStandin,
    virt_controller: ManagedProcess,
    virt_api: ManagedProcess,
    api_port: u16,
    dir: PathBuf,
    timings: StartTimings,
}

impl KubeVirt {
    /// Installs KubeVirt into `cp` and starts virt-api, virt-controller and the node
    /// stand-ins; returns once the APIService is Available, the webhooks refuse an invalid
    /// object, virt-controller holds its lease and the node is labelled schedulable.
    pub async fn start(cp: &ControlPlane, opts: KubeVirtOptions) -> Result<Self, KubeVirtError> {
        let started = Instant::now();
        let tools = KubeVirtTools::locate()?;
        let admin = cp.client().await?;
        let dir = cp.dir().join("kubevirt");
        mkdir(&dir)?;

        apply_value(
            &admin,
            &serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}),
        )
        .await?;
        let mut timings = StartTimings::default();
        install_crds(&admin, &tools.manifests.join("crds.yaml")).await?;
        timings.mark("CRDs established", started);
        for file in ["rbac.yaml", "vap.yaml"] {
            let path = tools.manifests.join(file);
            for obj in read_manifests(&path)? {
                apply_value(&admin, &obj).await?;
            }
        }
        let mut gates: Vec<String> = opts
            .profile
            .feature_gates()
            .iter()
            .map(|g| g.to_string())
            .collect();
        gates.extend(opts.extra_feature_gates.iter().cloned());
        install_kubevirt_cr(&admin, &gates).await?;

        // CA for virt-api's client certificates to virt-handler (unused here, but virt-api
        // watches it) and the extension-apiserver-authentication ConfigMap kube-apiserver
        // writes when its aggregation flags are set (checked, not written).
        apply_value(
            &admin,
            &serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "kubevirt-ca", "namespace": NAMESPACE},
                "data": {"ca-bundle": cp.ca_pem()}}),
        )
        .await?;
        wait_for_auth_configmap(&admin, opts.ready_timeout).await?;
        timings.mark("RBAC, KubeVirt CR, ConfigMaps", started);

        // Certificates, one directory per watcher: KubeVirt reloads on any change in it.
        let api_port = free_port().map_err(KubeVirtError::Port)?;
        let controller_port = free_port().map_err(KubeVirtError::Port)?;
        let svc = format!("virt-api.{NAMESPACE}.svc");
        let serving = cp.issue_serving_cert(&[&svc, "localhost", "127.0.0.1"])?;
        let api_certs = dir.join("virt-api-certs");
        mkdir(&api_certs)?;
        let (api_crt, api_key) = serving.write(&api_certs, "tls")?;
        // virt-api's client identity towards virt-handler (console, VNC): never used here,
        // but virt-api loads it; any certificate the cluster CA signed will do.
        let handler_client = cp.issue_serving_cert(&["virt-api-handler-client"])?;
        let api_handler_certs = dir.join("virt-api-handler-certs");
        mkdir(&api_handler_certs)?;
        let (handler_crt, handler_key) = handler_client.write(&api_handler_certs, "tls")?;
        let prom = cp.issue_serving_cert(&["virt-controller", "localhost", "127.0.0.1"])?;
        let controller_certs = dir.join("virt-controller-certs");
        mkdir(&controller_certs)?;
        let (prom_crt, prom_key) = prom.write(&controller_certs, "tls")?;

        let api_kubeconfig = write_file(
            &dir.join("virt-api.kubeconfig"),
            &cp.kubeconfig_for(API_USER, SA_GROUPS)?,
        )?;
        let controller_kubeconfig = write_file(
            &dir.join("virt-controller.kubeconfig"),
            &cp.kubeconfig_for(CONTROLLER_USER, SA_GROUPS)?,
        )?;

        let p = |x: &Path| x.display().to_string();
        let virt_api = ManagedProcess::spawn(
            "virt-api",
            &tools.virt_api,
            &[
                format!("--kubeconfig={}", p(&api_kubeconfig)),
                "--listen=127.0.0.1".into(),
                format!("--port={api_port}"),
                format!("--tls-cert-file={}", p(&api_crt)),
                format!("--tls-key-file={}", p(&api_key)),
                format!("--handler-cert-file={}", p(&handler_crt)),
                format!("--handler-key-file={}", p(&handler_key)),
                "--ca-configmap-name=kubevirt-ca".into(),
            ],
            &cp.dir().join("virt-api.log"),
        )?;
        let virt_controller = ManagedProcess::spawn(
            "virt-controller",
            &tools.virt_controller,
            &[
                format!("--kubeconfig={}", p(&controller_kubeconfig)),
                "--listen=127.0.0.1".into(),
                format!("--port={controller_port}"),
                format!("--prom-cert-file={}", p(&prom_crt)),
                format!("--prom-key-file={}", p(&prom_key)),
                "--launcher-image=quay.io/kubevirt/virt-launcher:v1.7.0".into(),
            ],
            &cp.dir().join("virt-controller.log"),
        )?;

        timings.mark("processes spawned", started);
        register_api(cp, &admin, &tools.manifests, api_port).await?;
        timings.mark("APIService and webhooks registered", started);

        let node = NodeStandin::start(cp, &opts.node_name).await?;
        timings.mark("node stand-ins running", started);

        let mut kv = Self {
            node,
            virt_controller,
            virt_api,
            api_port,
            dir,
            timings,
        };
        kv.wait_ready(&admin, opts.ready_timeout, started).await?;
        kv.timings.total = started.elapsed();
        tracing::info!(timings = ?kv.timings, "kubevirt ready");
        Ok(kv)
    }

    async fn wait_ready(
        &mut self,
        admin: &kube::Client,
        timeout: Duration,
        started: Instant,
    ) -> Result<(), KubeVirtError> {
        let deadline = Instant::now() + timeout;
        let left = || deadline.saturating_duration_since(Instant::now());

        let apiservices: Api<APIService> = Api::all(admin.clone());
        let available = await_condition(
            apiservices.clone(),
            "v1.subresources.kubevirt.io",
            |a: Option<&APIService>| {
                a.and_then(|a| a.status.as_ref())
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|c| {
                        c.iter()
                            .any(|c| c.type_ == "Available" && c.status == "True")
                    })
            },
        );
        if !matches!(tokio::time::timeout(left(), available).await, Ok(Ok(_))) {
            self.check_running()?;
            let last = apiservices
                .get_opt("v1.subresources.kubevirt.io")
                .await
                .ok()
                .flatten()
                .and_then(|a| a.status)
                .and_then(|s| serde_json::to_string(&s).ok())
                .unwrap_or_default();
            return Err(self.not_ready("APIService v1.subresources.kubevirt.io", timeout, &last));
        }
        self.timings.mark("APIService Available", started);

        let leases: Api<Lease> = Api::namespaced(admin.clone(), NAMESPACE);
        let led = await_condition(leases, "virt-controller", |l: Option<&Lease>| {
            l.and_then(|l| l.spec.as_ref())
                .and_then(|s| s.holder_identity.as_ref())
                .is_some_and(|h| !h.is_empty())
        });
        if !matches!(tokio::time::timeout(left(), led).await, Ok(Ok(_))) {
            self.check_running()?;
            return Err(self.not_ready("virt-controller leader lease", timeout, ""));
        }
        self.timings.mark("virt-controller leads", started);

        // Webhook configurations reach kube-apiserver's admission chain asynchronously;
        // a dry-run create of an invalid VMI shows when virt-api's validator is in it.
        let vmis: Api<DynamicObject> =
            Api::namespaced_with(admin.clone(), NAMESPACE, &vmi_resource());
        let probe: DynamicObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
            "metadata": {"name": "kvcsi-webhook-probe", "namespace": NAMESPACE},
            "spec": {"domain": {"devices": {"disks": [{"name": "missing", "disk": {"bus": "virtio"}}]}}}
        }))
        .expect("static probe");
        let pp = PostParams {
            dry_run: true,
            ..Default::default()
        };
        let mut last;
        loop {
            self.check_running()?;
            match vmis.create(&pp, &probe).await {
                Err(kube::Error::Api(s))
                    if s.message
                        .contains("virtualmachineinstances-create-validator.kubevirt.io") =>
                {
                    break;
                }
                Err(e) => last = e.to_string(),
                Ok(_) => last = "the invalid probe VMI was admitted".into(),
            }
            if left().is_zero() {
                return Err(self.not_ready("virt-api's VMI webhook", timeout, &last));
            }
            // kube-apiserver announces no event when its webhook informer catches up.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.timings.mark("webhooks admitting", started);
        Ok(())
    }

    fn not_ready(&self, what: &str, waited: Duration, detail: &str) -> KubeVirtError {
        KubeVirtError::NotReady {
            what: what.to_string(),
            waited,
            detail: format!(
                "{detail}\nvirt-api log:\n{}\nvirt-controller log:\n{}",
                self.virt_api.log_tail(20),
                self.virt_controller.log_tail(20)
            ),
        }
    }

    /// Fails with the log tail of whichever process has exited.
    pub fn check_running(&mut self) -> Result<(), ProcessError> {
        self.virt_api.check_running()?;
        self.virt_controller.check_running()
    }

    pub fn timings(&self) -> &StartTimings {
        &self.timings
    }

    /// The port virt-api serves HTTPS on (127.0.0.1).
    pub fn api_port(&self) -> u16 {
        self.api_port
    }

    /// Certificates, kubeconfigs of the KubeVirt identities.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn node(&self) -> &NodeStandin {
        &self.node
    }

    pub fn virt_api_log_tail(&self, lines: usize) -> String {
        self.virt_api.log_tail(lines)
    }

    pub fn virt_controller_log_tail(&self, lines: usize) -> String {
        self.virt_controller.log_tail(lines)
    }
}

pub fn vm_resource() -> ApiResource {
    crate::fixtures::vm_resource()
}

pub fn vmi_resource() -> ApiResource {
    crate::fixtures::vmi_resource()
}

fn kubevirt_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("kubevirt.io", "v1", "KubeVirt"),
        "kubevirts",
    )
}

fn mkdir(path: &Path) -> Result<(), KubeVirtError> {
    std::fs::create_dir_all(path).map_err(|source| KubeVirtError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn write_file(path: &Path, text: &str) -> Result<PathBuf, KubeVirtError> {
    std::fs::write(path, text).map_err(|source| KubeVirtError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(path.to_path_buf())
}

/// Every document of a multi-document YAML file, as JSON.
pub fn read_manifests(path: &Path) -> Result<Vec<serde_json::Value>, KubeVirtError> {
    let text = std::fs::read_to_string(path).map_err(|source| KubeVirtError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut out = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let v = serde_json::Value::deserialize(doc).map_err(|source| KubeVirtError::Parse {
            file: path.to_path_buf(),
            source,
        })?;
        if !v.is_null() {
            out.push(v);
        }
    }
    Ok(out)
}

/// The REST resource of each kind the manifests hold: (group, version, plural).
fn resource_of(api_version: &str, kind: &str) -> Option<ApiResource> {
    let plural = match kind {
        "Namespace" => "namespaces",
        "ConfigMap" => "configmaps",
        "Service" => "services",
        "ServiceAccount" => "serviceaccounts",
        "ClusterRole" => "clusterroles",
        "ClusterRoleBinding" => "clusterrolebindings",
        "Role" => "roles",
        "RoleBinding" => "rolebindings",
        "CustomResourceDefinition" => "customresourcedefinitions",
        "ValidatingWebhookConfiguration" => "validatingwebhookconfigurations",
        "MutatingWebhookConfiguration" => "mutatingwebhookconfigurations",
        "APIService" => "apiservices",
        "ValidatingAdmissionPolicy" => "validatingadmissionpolicies",
        "ValidatingAdmissionPolicyBinding" => "validatingadmissionpolicybindings",
        "KubeVirt" => "kubevirts",
        _ => return None,
    };
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    Some(ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(group, version, kind),
        plural,
    ))
}

/// Server-side applies one object (status and creationTimestamp dropped: the generated
/// objects carry empty ones the apiserver owns).
async fn apply_value(client: &kube::Client, obj: &serde_json::Value) -> Result<(), KubeVirtError> {
    let mut obj = obj.clone();
    if let Some(m) = obj.as_object_mut() {
        m.remove("status");
    }
    if let Some(m) = obj["metadata"].as_object_mut() {
        m.remove("creationTimestamp");
    }
    let api_version = obj["apiVersion"].as_str().unwrap_or_default().to_string();
    let kind = obj["kind"].as_str().unwrap_or_default().to_string();
    let name = obj["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let what = format!("{kind} {name}");
    let ar = resource_of(&api_version, &kind).ok_or_else(|| KubeVirtError::UnknownKind {
        kind: kind.clone(),
        name: name.clone(),
    })?;
    let api: Api<DynamicObject> = match obj["metadata"]["namespace"].as_str() {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &ar),
        None => Api::all_with(client.clone(), &ar),
    };
    api.patch(
        &name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&obj),
    )
    .await
    .map_err(|source| KubeVirtError::Apply { what, source })?;
    Ok(())
}

/// Applies every CRD at once and then waits for all of them: the apiserver handles the
/// 4 MB of schemas faster concurrently than one by one.
async fn install_crds(client: &kube::Client, file: &Path) -> Result<(), KubeVirtError> {
    let crds = read_manifests(file)?;
    futures::future::try_join_all(crds.iter().map(|crd| apply_value(client, crd))).await?;
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let waited = Duration::from_secs(30);
    let established = crds.iter().map(|crd| {
        let name = crd["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let api = api.clone();
        async move {
            let est = await_condition(api, &name, conditions::is_crd_established());
            match tokio::time::timeout(waited, est).await {
                Ok(Ok(_)) => Ok(()),
                _ => Err(KubeVirtError::NotReady {
                    what: format!("CRD {name}"),
                    waited,
                    detail: "not Established".into(),
                }),
            }
        }
    });
    futures::future::try_join_all(established).await?;
    Ok(())
}

/// CDI's other CRDs (`hack/crds.sh` provides only DataVolume), with open schemas: once the
/// DataVolume CRD exists, virt-controller and virt-api take CDI for installed and watch CDI,
/// CDIConfig, StorageProfile and DataSource too, and virt-controller's informers never sync
/// without them. No CDI object is created, so virt-controller uses its default filesystem
/// overhead as it does when it finds no CDI instance. CDI itself remains a stand-in.
pub async fn install_cdi_companion_crds(client: &kube::Client) -> Result<(), KubeVirtError> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut names = Vec::new();
    for (kind, plural, scope) in [
        ("CDI", "cdis", "Cluster"),
        ("CDIConfig", "cdiconfigs", "Cluster"),
        ("StorageProfile", "storageprofiles", "Cluster"),
        ("DataSource", "datasources", "Namespaced"),
    ] {
        let name = format!("{plural}.cdi.kubevirt.io");
        apply_value(
            client,
            &serde_json::json!({
                "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
                "metadata": {"name": name},
                "spec": {"group": "cdi.kubevirt.io", "scope": scope,
                    "names": {"kind": kind, "plural": plural, "singular": kind.to_lowercase(),
                        "listKind": format!("{kind}List")},
                    "versions": [{"name": "v1beta1", "served": true, "storage": true,
                        "subresources": {"status": {}},
                        "schema": {"openAPIV3Schema": {"type": "object",
                            "x-kubernetes-preserve-unknown-fields": true}}}]}
            }),
        )
        .await?;
        names.push(name);
    }
    let waited = Duration::from_secs(30);
    for name in names {
        let est = await_condition(api.clone(), &name, conditions::is_crd_established());
        if !matches!(tokio::time::timeout(waited, est).await, Ok(Ok(_))) {
            return Err(KubeVirtError::NotReady {
                what: format!("CRD {name}"),
                waited,
                detail: "not Established".into(),
            });
        }
    }
    Ok(())
}

/// The KubeVirt CR virt-operator would own: the feature gates, and the status virt-operator
/// writes: `phase` (only then do virt-api and virt-controller take their configuration from
/// the CR) and `defaultArchitecture` (the VM mutator copies it into every VM, and the VMI
/// validator refuses an empty one).
async fn install_kubevirt_cr(client: &kube::Client, gates: &[String]) -> Result<(), KubeVirtError> {
    apply_value(
        client,
        &serde_json::json!({
            "apiVersion": "kubevirt.io/v1", "kind": "KubeVirt",
            "metadata": {"name": "kubevirt", "namespace": NAMESPACE},
            "spec": {"configuration": {"developerConfiguration": {"featureGates": gates}}}
        }),
    )
    .await?;
    let api: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), NAMESPACE, &kubevirt_resource());
    api.patch_status(
        "kubevirt",
        &PatchParams::default(),
        &Patch::Merge(
            serde_json::json!({"status": {"phase": "Deployed", "defaultArchitecture": "amd64"}}),
        ),
    )
    .await
    .map_err(|source| KubeVirtError::Apply {
        what: "KubeVirt status".into(),
        source,
    })?;
    Ok(())
}

async fn wait_for_auth_configmap(
    client: &kube::Client,
    timeout: Duration,
) -> Result<(), KubeVirtError> {
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "kube-system");
    let has_ca = await_condition(
        cms,
        "extension-apiserver-authentication",
        |c: Option<&ConfigMap>| {
            c.and_then(|c| c.data.as_ref())
                .is_some_and(|d| d.contains_key("requestheader-client-ca-file"))
        },
    );
    match tokio::time::timeout(timeout, has_ca).await {
        Ok(Ok(_)) => Ok(()),
        _ => Err(KubeVirtError::NotReady {
            what: "kube-system/extension-apiserver-authentication".into(),
            waited: timeout,
            detail: "kube-apiserver writes it when its --requestheader-* flags are set".into(),
        }),
    }
}

/// The APIService and webhooks, pointed at virt-api on 127.0.0.1. The aggregator needs a
/// Service: an ExternalName one resolving to localhost stands for virt-api's (Endpoints
/// may not name loopback addresses). Webhooks take a URL directly.
async fn register_api(
    cp: &ControlPlane,
    client: &kube::Client,
    manifests: &Path,
    port: u16,
) -> Result<(), KubeVirtError> {
    let ca_b64 = base64::engine::general_purpose::STANDARD.encode(cp.ca_pem());
    apply_value(
        client,
        &serde_json::json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "virt-api", "namespace": NAMESPACE},
            "spec": {"type": "ExternalName", "externalName": "localhost",
                "ports": [{"name": "https", "port": port, "protocol": "TCP"}]}}),
    )
    .await?;

    let file = manifests.join("apiservices.yaml");
    for mut a in read_manifests(&file)? {
        let spec = a["spec"]
            .as_object_mut()
            .ok_or_else(|| KubeVirtError::Malformed {
                file: file.clone(),
                what: "APIService spec",
            })?;
        spec.insert("caBundle".into(), ca_b64.clone().into());
        spec.insert(
            "service".into(),
            serde_json::json!({"namespace": NAMESPACE, "name": "virt-api", "port": port}),
        );
        apply_value(client, &a).await?;
    }

    let file = manifests.join("webhooks.yaml");
    for mut cfg in read_manifests(&file)? {
        let hooks = cfg["webhooks"]
            .as_array_mut()
            .ok_or_else(|| KubeVirtError::Malformed {
                file: file.clone(),
                what: "webhooks list",
            })?;
        for hook in hooks {
            let path = hook["clientConfig"]["service"]["path"]
                .as_str()
                .ok_or_else(|| KubeVirtError::Malformed {
                    file: file.clone(),
                    what: "webhook service path",
                })?
                .to_string();
            hook["clientConfig"] = serde_json::json!({
                "url": format!("https://127.0.0.1:{port}{path}"),
                "caBundle": ca_b64,
            });
        }
        apply_value(client, &cfg).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles_name_one_hotplug_gate_each() {
        assert_eq!(
            GateProfile::HotplugVolumes.feature_gates(),
            ["HotplugVolumes"]
        );
        assert_eq!(
            GateProfile::DeclarativeOnly.feature_gates(),
            ["DeclarativeHotplugVolumes"]
        );
    }

    #[test]
    fn resources_of_generated_kinds() {
        let r = resource_of("rbac.authorization.k8s.io/v1", "ClusterRole").expect("known");
        assert_eq!(
            (r.group.as_str(), r.plural.as_str()),
            ("rbac.authorization.k8s.io", "clusterroles")
        );
        let r = resource_of("v1", "ServiceAccount").expect("known");
        assert_eq!((r.group.as_str(), r.version.as_str()), ("", "v1"));
        assert!(resource_of("v1", "Pod").is_none());
    }
}
