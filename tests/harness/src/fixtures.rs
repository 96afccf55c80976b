//! Infra-side objects a test needs: a tenant namespace whose controller runs with the
//! shipped Role, and worker VMs shaped the way KubeVirt creates them (a VirtualMachine
//! owning a running VirtualMachineInstance).

use std::collections::BTreeMap;
use std::path::Path;

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::runtime::wait::await_condition;

use crate::cluster::{ClusterError, ControlPlane};
use crate::csi::{CsiError, controller_token, enforce_admission_policy};

/// Annotation telling the stand-in which QMP socket attaches disks to this VMI.
pub const QMP_SOCKET_ANNOTATION: &str = "standin.kubevirt-csi.io/qmp-socket";

#[derive(Debug, thiserror::Error)]
pub enum FixtureError {
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error(transparent)]
    Csi(#[from] CsiError),
    #[error("{what} did not start running within 20s (is the stand-in up?)")]
    NotRunning { what: String },
    #[error("cannot create {what}")]
    Create {
        what: String,
        #[source]
        source: kube::Error,
    },
}

pub fn vm_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("kubevirt.io", "v1", "VirtualMachine"),
        "virtualmachines",
    )
}

pub fn vmi_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("kubevirt.io", "v1", "VirtualMachineInstance"),
        "virtualmachineinstances",
    )
}

pub fn data_volume_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("cdi.kubevirt.io", "v1beta1", "DataVolume"),
        "datavolumes",
    )
}

/// The infra StorageClasses the tests name: `fast` and `slow`, plus `standard` as the
/// default. All allow expansion, which the apiserver's PVC resize admission requires.
pub async fn infra_storage_classes(client: &kube::Client) -> Result<(), FixtureError> {
    let api: Api<StorageClass> = Api::all(client.clone());
    for (name, default) in [("fast", false), ("slow", false), ("standard", true)] {
        let sc: StorageClass = serde_json::from_value(serde_json::json!({
            "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
            "metadata": {"name": name, "annotations": {"storageclass.kubernetes.io/is-default-class": default.to_string()}},
            "provisioner": "standin.kubevirt-csi.io",
            "allowVolumeExpansion": true,
            "volumeBindingMode": "Immediate"
        }))
        .expect("static storage class");
        api.patch(
            name,
            &PatchParams::apply("kvcsi-harness"),
            &Patch::Apply(&sc),
        )
        .await
        .map_err(|source| FixtureError::Create {
            what: format!("storage class {name}"),
            source,
        })?;
    }
    Ok(())
}

/// One tenant on the infra cluster: its namespace, labels, and the kubeconfig its
/// controller uses (a user bound only to `deploy/infra/role.yaml`, and held by
/// `deploy/infra/admission-policy.yaml`).
#[derive(Clone, Debug)]
pub struct TenantFixture {
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub controller_kubeconfig: String,
}

impl TenantFixture {
    /// `key=value` strings for `--tenant-label`.
    pub fn label_args(&self) -> Vec<String> {
        self.labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect()
    }
}

/// Creates the tenant's namespace and a controller identity bound to the shipped Role and
/// held by the shipped admission policy (the whole of `deploy/infra`, rendered as the
/// overlays render it, with the tenant's labels). The CDI CRDs must be installed.
/// `server` overrides the apiserver URL in the kubeconfig (e.g. a cuttable proxy).
pub async fn tenant(
    cp: &ControlPlane,
    namespace: &str,
    labels: &[(&str, &str)],
    server: Option<&str>,
) -> Result<TenantFixture, FixtureError> {
    let client = cp.client().await?;
    let ns: Namespace =
        serde_json::from_value(serde_json::json!({"metadata": {"name": namespace}}))
            .expect("static namespace");
    Api::<Namespace>::all(client.clone())
        .patch(
            namespace,
            &PatchParams::apply("kvcsi-harness"),
            &Patch::Apply(&ns),
        )
        .await
        .map_err(|source| FixtureError::Create {
            what: format!("namespace {namespace}"),
            source,
        })?;
    let token = controller_token(&client, namespace).await?;
    let user = format!("system:serviceaccount:{namespace}:kubevirt-csi-controller");
    let controller_kubeconfig =
        cp.kubeconfig_with_token_server(server.unwrap_or(cp.url()), &user, &token);
    let fixture = TenantFixture {
        namespace: namespace.to_string(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        controller_kubeconfig,
    };
    // Every test's controller runs under the shipped admission policy too, so a write the
    // policy would refuse in production fails the tests.
    let controller = cp
        .client_from_kubeconfig(&user, &cp.kubeconfig_with_token(&user, &token))
        .await?;
    enforce_admission_policy(&client, &controller, namespace, &fixture.label_args()).await?;
    Ok(fixture)
}

/// Creates a running VirtualMachine, labelled for the tenant, and waits (on a watch) for
/// the VirtualMachineInstance the stand-in's virt-controller makes for it, as KubeVirt does.
/// With `qmp_socket`, the stand-in attaches disks to that QEMU for real.
pub async fn worker_vm(
    client: &kube::Client,
    tenant: &TenantFixture,
    name: &str,
    qmp_socket: Option<&Path>,
) -> Result<(), FixtureError> {
    let ns = tenant.namespace.as_str();
    let labels = &tenant.labels;
    let mut annotations = BTreeMap::new();
    if let Some(sock) = qmp_socket {
        annotations.insert(
            QMP_SOCKET_ANNOTATION.to_string(),
            sock.display().to_string(),
        );
    }
    let domain = serde_json::json!({"devices": {"disks": [{"name": "root", "disk": {"bus": "virtio"}}]}, "resources": {"requests": {"memory": "1Gi"}}});
    let volumes = serde_json::json!([{"name": "root", "containerDisk": {"image": "quay.io/containerdisks/fedora:latest"}}]);
    let vm: DynamicObject = serde_json::from_value(serde_json::json!({
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {"runStrategy": "Always", "template": {
            "metadata": {"labels": labels, "annotations": annotations},
            "spec": {"domain": domain, "volumes": volumes}}}
    }))
    .expect("static vm");
    let vms: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &vm_resource());
    vms.create(&PostParams::default(), &vm)
        .await
        .map_err(|source| FixtureError::Create {
            what: format!("vm {ns}/{name}"),
            source,
        })?;
    let vmis: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &vmi_resource());
    let running = await_condition(vmis, name, |o: Option<&DynamicObject>| {
        o.is_some_and(|o| o.data["status"]["phase"] == "Running")
    });
    match tokio::time::timeout(std::time::Duration::from_secs(20), running).await {
        Ok(Ok(_)) => Ok(()),
        _ => Err(FixtureError::NotRunning {
            what: format!("vmi {ns}/{name}"),
        }),
    }
}
