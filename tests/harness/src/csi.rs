//! Running our CSI plugins as real processes and talking gRPC to them.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use csi_proto::v1::controller_client::ControllerClient;
use csi_proto::v1::identity_client::IdentityClient;
use csi_proto::v1::node_client::NodeClient;
use hyper_util::rt::TokioIo;
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Api, Patch, PatchParams, PostParams};
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
    #[error("cannot render, apply or enforce {what}")]
    InfraManifests {
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

/// Applies `deploy/infra` (the controller's Role, ServiceAccount and RoleBinding) into
/// `namespace` the way its kustomize overlays do (namespace set on every object and on the
/// binding's ServiceAccount subject), and returns a token of that ServiceAccount from the
/// TokenRequest API. Tests run the controller with it, so a verb missing from the shipped
/// Role, or a broken binding, fails them.
pub async fn controller_token(client: &kube::Client, namespace: &str) -> Result<String, CsiError> {
    let rbac = |what: String| {
        move |e: Box<dyn std::error::Error + Send + Sync>| CsiError::Rbac { what, source: e }
    };
    let read = |file: &str| -> Result<String, CsiError> {
        let path = repo_root().join("deploy/infra").join(file);
        std::fs::read_to_string(&path).map_err(|e| rbac(path.display().to_string())(e.into()))
    };
    let pp = PatchParams::apply("kvcsi-harness").force();

    let mut role: Role = serde_yaml::from_str(&read("role.yaml")?)
        .map_err(|e| rbac("deploy/infra/role.yaml".into())(e.into()))?;
    role.metadata.namespace = Some(namespace.to_string());
    let role_name = role.metadata.name.clone().unwrap_or_default();
    Api::<Role>::namespaced(client.clone(), namespace)
        .patch(&role_name, &pp, &Patch::Apply(&role))
        .await
        .map_err(|e| rbac("the controller Role".into())(e.into()))?;

    let mut sa: ServiceAccount = serde_yaml::from_str(&read("serviceaccount.yaml")?)
        .map_err(|e| rbac("deploy/infra/serviceaccount.yaml".into())(e.into()))?;
    sa.metadata.namespace = Some(namespace.to_string());
    let sa_name = sa.metadata.name.clone().unwrap_or_default();
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    sas.patch(&sa_name, &pp, &Patch::Apply(&sa))
        .await
        .map_err(|e| rbac("the controller ServiceAccount".into())(e.into()))?;

    let mut binding: RoleBinding = serde_yaml::from_str(&read("rolebinding.yaml")?)
        .map_err(|e| rbac("deploy/infra/rolebinding.yaml".into())(e.into()))?;
    binding.metadata.namespace = Some(namespace.to_string());
    for subject in binding.subjects.iter_mut().flatten() {
        if subject.kind == "ServiceAccount" {
            subject.namespace = Some(namespace.to_string());
        }
    }
    let binding_name = binding.metadata.name.clone().unwrap_or_default();
    Api::<RoleBinding>::namespaced(client.clone(), namespace)
        .patch(&binding_name, &pp, &Patch::Apply(&binding))
        .await
        .map_err(|e| rbac("the controller RoleBinding".into())(e.into()))?;

    let request: TokenRequest = serde_json::from_value(serde_json::json!({
        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
        "spec": {"audiences": [], "expirationSeconds": 86400}
    }))
    .map_err(|e| rbac("a TokenRequest".into())(e.into()))?;
    let issued = sas
        .create_token_request(&sa_name, &PostParams::default(), &request)
        .await
        .map_err(|e| rbac(format!("a token for {namespace}/{sa_name}"))(e.into()))?;
    Ok(issued.status.map(|s| s.token).unwrap_or_default())
}

/// The admission policy and binding of one tenant, named after its infra namespace by
/// `deploy/infra/tenant-names` (both objects carry this name).
pub fn admission_policy_name(namespace: &str) -> String {
    format!("kubevirt-csi-controller.{namespace}")
}

/// Renders `deploy/infra` with the pinned kubectl as its overlays do: a kustomization in a
/// scratch directory that sets `namespace`, lists `deploy/infra/tenant-names` as transformer
/// and sets the ServiceAccount's tenant-labels annotation to `tenant_labels` (`k=v`). Returns
/// the rendered objects, so tests apply exactly what an overlay would.
pub fn render_infra(
    kubectl: &Path,
    namespace: &str,
    tenant_labels: &[String],
) -> Result<Vec<serde_json::Value>, CsiError> {
    let failed = |what: String| {
        move |e: Box<dyn std::error::Error + Send + Sync>| CsiError::InfraManifests {
            what,
            source: e,
        }
    };
    let dir = ScratchDir::new("infra-overlay")?;
    // kustomize takes only relative paths to other kustomizations: climb from the scratch
    // directory to `/` and descend to deploy/infra.
    let infra_abs = std::fs::canonicalize(repo_root().join("deploy/infra"))
        .map_err(|e| failed("deploy/infra".into())(e.into()))?;
    let scratch = std::fs::canonicalize(dir.path())
        .map_err(|e| failed("the scratch overlay directory".into())(e.into()))?;
    let up = scratch.components().count().saturating_sub(1);
    let infra =
        Path::new(&"../".repeat(up)).join(infra_abs.strip_prefix("/").unwrap_or(&infra_abs));
    let patch = serde_json::json!([{
        "op": "add",
        "path": "/metadata/annotations/csi.kubevirt.io~1tenant-labels",
        "value": tenant_labels.join(","),
    }]);
    // JSON is YAML: no quoting to get wrong.
    let kustomization = serde_json::json!({
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": namespace,
        "resources": [infra.display().to_string()],
        "transformers": [infra.join("tenant-names").display().to_string()],
        "patches": [{
            "target": {"kind": "ServiceAccount", "name": "kubevirt-csi-controller"},
            "patch": patch.to_string(),
        }],
    });
    let file = dir.path().join("kustomization.yaml");
    std::fs::write(&file, kustomization.to_string()).map_err(|source| CsiError::Write {
        path: file.clone(),
        source,
    })?;
    let out = std::process::Command::new(kubectl)
        .arg("kustomize")
        .arg(dir.path())
        .output()
        .map_err(|e| failed(format!("kubectl kustomize ({})", kubectl.display()))(e.into()))?;
    if !out.status.success() {
        return Err(failed("deploy/infra rendered by kubectl kustomize".into())(
            String::from_utf8_lossy(&out.stderr).into_owned().into(),
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut objects = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let v = <serde_json::Value as serde::Deserialize>::deserialize(doc)
            .map_err(|e| failed("the rendered deploy/infra".into())(e.into()))?;
        if !v.is_null() {
            objects.push(v);
        }
    }
    Ok(objects)
}

/// Server-side applies rendered objects as `field_manager`, each at the scope discovery
/// reports for its kind (kustomize sets a namespace on every kind it does not know to be
/// cluster-scoped, such as the admission policy; the apiserver would drop it, we do too).
pub async fn apply_rendered(
    client: &kube::Client,
    objects: &[serde_json::Value],
    field_manager: &str,
) -> Result<(), CsiError> {
    let failed = |what: String| {
        move |e: Box<dyn std::error::Error + Send + Sync>| CsiError::InfraManifests {
            what,
            source: e,
        }
    };
    let pp = PatchParams::apply(field_manager).force();
    for obj in objects {
        let kind = obj["kind"].as_str().unwrap_or_default();
        let name = obj["metadata"]["name"].as_str().unwrap_or_default();
        let what = format!("{kind} {name}");
        let (group, version) = match obj["apiVersion"]
            .as_str()
            .unwrap_or_default()
            .split_once('/')
        {
            Some((g, v)) => (g.to_string(), v.to_string()),
            None => (
                String::new(),
                obj["apiVersion"].as_str().unwrap_or_default().to_string(),
            ),
        };
        let gvk = kube::core::GroupVersionKind::gvk(&group, &version, kind);
        let (ar, caps) = kube::discovery::pinned_kind(client, &gvk)
            .await
            .map_err(|e| failed(format!("the API of {what}"))(e.into()))?;
        let mut dynamic: kube::api::DynamicObject =
            serde_json::from_value(obj.clone()).map_err(|e| failed(what.clone())(e.into()))?;
        let api: Api<kube::api::DynamicObject> = match caps.scope {
            kube::discovery::Scope::Namespaced => {
                let ns = dynamic.metadata.namespace.clone().unwrap_or_default();
                Api::namespaced_with(client.clone(), &ns, &ar)
            }
            kube::discovery::Scope::Cluster => {
                dynamic.metadata.namespace = None;
                Api::all_with(client.clone(), &ar)
            }
        };
        api.patch(name, &pp, &Patch::Apply(&dynamic))
            .await
            .map_err(|e| failed(what.clone())(e.into()))?;
    }
    Ok(())
}

/// Applies the whole rendered `deploy/infra` (Role, ServiceAccount with the tenant labels,
/// RoleBinding, admission policy and binding) for `namespace`, then waits until the policy
/// is enforced: until a forged write with the controller's `kubeconfig` (a server-side dry
/// run creating an unlabelled DataVolume) is refused by it. Policies and their parameters
/// reach the apiserver's admission through informers, so there is a short window after
/// the apply in which nothing is enforced yet; tests must not start in it. The CDI CRDs
/// must be installed.
pub async fn enforce_admission_policy(
    client: &kube::Client,
    controller: &kube::Client,
    namespace: &str,
    tenant_labels: &[String],
) -> Result<(), CsiError> {
    let kubectl = crate::tools::Tools::locate()?.kubectl;
    let objects = render_infra(&kubectl, namespace, tenant_labels)?;
    apply_rendered(client, &objects, "kvcsi-harness-infra").await?;

    let dvs: Api<kube::api::DynamicObject> = Api::namespaced_with(
        controller.clone(),
        namespace,
        &kube::core::ApiResource::from_gvk_with_plural(
            &kube::core::GroupVersionKind::gvk("cdi.kubevirt.io", "v1beta1", "DataVolume"),
            "datavolumes",
        ),
    );
    let probe: kube::api::DynamicObject = serde_json::from_value(serde_json::json!({
        "apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
        "metadata": {"name": "kvcsi-admission-probe", "annotations": {"csi.kubevirt.io/csi-name": "probe"}},
        "spec": {"source": {"blank": {}}, "storage": {"resources": {"requests": {"storage": "1Mi"}}}}
    }))
    .map_err(|e| CsiError::InfraManifests {
        what: "the admission probe".into(),
        source: e.into(),
    })?;
    let dry_run = PostParams {
        dry_run: true,
        ..Default::default()
    };
    let policy = admission_policy_name(namespace);
    // The label rule's message: a refusal for any other reason (the parameter informer not
    // yet synced, which fails closed for everyone) does not mean the policy is in force.
    let refused = |e: &kube::Error| {
        matches!(e, kube::Error::Api(s)
            if s.message.contains(&format!("ValidatingAdmissionPolicy '{policy}'"))
                && s.message.contains("must carry the tenant labels"))
    };
    let mut last = String::from("no attempt");
    for _ in 0..300 {
        match dvs.create(&dry_run, &probe).await {
            Err(e) if refused(&e) => return Ok(()),
            Ok(_) => last = "the unlabelled probe DataVolume was admitted".into(),
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(CsiError::InfraManifests {
        what: format!("admission policy {policy} (never enforced)"),
        source: last.into(),
    })
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
