//! Tenant-checked access to the infra objects the controller uses.
//!
//! Reads return `None` for objects that are absent *or* foreign (see [`Tenant::owns`]);
//! writes only ever target objects we created with the tenant labels.

use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions};
use serde::Serialize;

use super::tenant::Tenant;
use super::types::{
    AddVolumeOptions, DataVolume, RemoveVolumeOptions, VirtualMachine, VirtualMachineInstance,
    VolumeSnapshot, data_volume_resource, vm_resource, vmi_resource, volume_snapshot_resource,
};
use crate::error::InfraError;

/// Where a hotplug request goes: the VM (persists across restarts) or only the VMI.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HotplugTarget {
    Vm,
    Vmi,
}

impl HotplugTarget {
    fn plural(self) -> &'static str {
        match self {
            HotplugTarget::Vm => "virtualmachines",
            HotplugTarget::Vmi => "virtualmachineinstances",
        }
    }
}

/// The infra cluster, as one tenant sees it.
#[derive(Clone)]
pub struct Infra {
    client: kube::Client,
    tenant: Tenant,
    pub dvs: Api<DataVolume>,
    pub vms: Api<VirtualMachine>,
    pub vmis: Api<VirtualMachineInstance>,
    pub pvcs: Api<PersistentVolumeClaim>,
    pub snapshots: Api<VolumeSnapshot>,
}

impl std::fmt::Debug for Infra {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Infra")
            .field("tenant", &self.tenant)
            .finish_non_exhaustive()
    }
}

impl Infra {
    pub fn new(client: kube::Client, tenant: Tenant) -> Self {
        let ns = tenant.namespace.as_str();
        Self {
            dvs: Api::namespaced_with(client.clone(), ns, &data_volume_resource()),
            vms: Api::namespaced_with(client.clone(), ns, &vm_resource()),
            vmis: Api::namespaced_with(client.clone(), ns, &vmi_resource()),
            pvcs: Api::namespaced(client.clone(), ns),
            snapshots: Api::namespaced_with(client.clone(), ns, &volume_snapshot_resource()),
            client,
            tenant,
        }
    }

    pub fn tenant(&self) -> &Tenant {
        &self.tenant
    }

    pub fn namespace(&self) -> &str {
        &self.tenant.namespace
    }

    fn err(&self, kind: &'static str, name: &str) -> impl FnOnce(kube::Error) -> InfraError {
        let (ns, name) = (self.tenant.namespace.clone(), name.to_string());
        move |e| InfraError::from_kube(kind, &ns, &name, e)
    }

    /// Gets an object, treating a foreign one as absent.
    async fn get_owned<K>(
        &self,
        api: &Api<K>,
        kind: &'static str,
        name: &str,
    ) -> Result<Option<K>, InfraError>
    where
        K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned,
    {
        let obj = api.get_opt(name).await.map_err(self.err(kind, name))?;
        Ok(obj.filter(|o| {
            let ours = self.tenant.owns(o);
            if !ours {
                tracing::warn!(kind, %name, "infra object exists but lacks this tenant's labels; treating it as absent");
            }
            ours
        }))
    }

    /// Lists the tenant's objects of one kind (label-selected server-side, checked again here).
    async fn list_owned<K>(&self, api: &Api<K>, kind: &'static str) -> Result<Vec<K>, InfraError>
    where
        K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned,
    {
        let lp = ListParams::default().labels(&self.tenant.selector());
        let list = api.list(&lp).await.map_err(self.err(kind, "(list)"))?;
        Ok(list
            .items
            .into_iter()
            .filter(|o| self.tenant.owns(o))
            .collect())
    }

    /// Adds the tenant labels to `meta` (overriding any that collide).
    pub fn label(&self, meta: &mut kube::core::ObjectMeta) {
        meta.namespace = Some(self.tenant.namespace.clone());
        let labels = meta.labels.get_or_insert_with(Default::default);
        for (k, v) in &self.tenant.labels {
            labels.insert(k.clone(), v.clone());
        }
    }

    pub async fn data_volume(&self, name: &str) -> Result<Option<DataVolume>, InfraError> {
        self.get_owned(&self.dvs, "DataVolume", name).await
    }

    /// Whether a DataVolume of that name exists at all, ours or not (for name clashes).
    pub async fn data_volume_exists_unowned(&self, name: &str) -> Result<bool, InfraError> {
        Ok(self
            .dvs
            .get_opt(name)
            .await
            .map_err(self.err("DataVolume", name))?
            .is_some_and(|o| !self.tenant.owns(&o)))
    }

    pub async fn data_volumes(&self) -> Result<Vec<DataVolume>, InfraError> {
        self.list_owned(&self.dvs, "DataVolume").await
    }

    pub async fn create_data_volume(&self, dv: &DataVolume) -> Result<DataVolume, InfraError> {
        let name = dv.name_any();
        self.dvs
            .create(&PostParams::default(), dv)
            .await
            .map_err(self.err("DataVolume", &name))
    }

    /// Deletes the DataVolume with exactly this UID (so a recreated namesake is safe).
    pub async fn delete_data_volume(&self, dv: &DataVolume) -> Result<(), InfraError> {
        let name = dv.name_any();
        let dp = DeleteParams {
            preconditions: Some(Preconditions {
                uid: dv.uid(),
                resource_version: None,
            }),
            ..DeleteParams::background()
        };
        match self.dvs.delete(&name, &dp).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            Err(e) => Err(self.err("DataVolume", &name)(e)),
        }
    }

    /// The PVC behind a DataVolume, if CDI made it for one of our DataVolumes.
    pub async fn claim_of(
        &self,
        dv: &DataVolume,
    ) -> Result<Option<PersistentVolumeClaim>, InfraError> {
        let name = dv.name_any();
        let pvc = self
            .pvcs
            .get_opt(&name)
            .await
            .map_err(self.err("PersistentVolumeClaim", &name))?;
        Ok(pvc.filter(|p| {
            self.tenant.owns(p)
                || p.owner_references()
                    .iter()
                    .any(|o| o.kind == "DataVolume" && Some(&o.uid) == dv.uid().as_ref())
        }))
    }

    /// Raises the PVC's storage request (CDI does not resize through the DataVolume).
    pub async fn request_claim_size(&self, name: &str, bytes: u64) -> Result<(), InfraError> {
        let patch = serde_json::json!({"spec": {"resources": {"requests": {"storage": bytes.to_string()}}}});
        self.pvcs
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map(|_| ())
            .map_err(self.err("PersistentVolumeClaim", name))
    }

    /// Applies a JSON patch to a VM (declarative hotplug edits its spec this way).
    pub async fn patch_vm_json(
        &self,
        name: &str,
        ops: serde_json::Value,
    ) -> Result<(), InfraError> {
        let patch: json_patch::Patch =
            serde_json::from_value(ops).map_err(|e| InfraError::Rejected {
                kind: "VirtualMachine",
                name: name.to_string(),
                message: format!("invalid json patch: {e}"),
            })?;
        self.vms
            .patch(name, &PatchParams::default(), &Patch::<()>::Json(patch))
            .await
            .map(|_| ())
            .map_err(self.err("VirtualMachine", name))
    }

    pub async fn vm(&self, name: &str) -> Result<Option<VirtualMachine>, InfraError> {
        self.get_owned(&self.vms, "VirtualMachine", name).await
    }

    pub async fn vmi(&self, name: &str) -> Result<Option<VirtualMachineInstance>, InfraError> {
        self.get_owned(&self.vmis, "VirtualMachineInstance", name)
            .await
    }

    pub async fn vms_list(&self) -> Result<Vec<VirtualMachine>, InfraError> {
        self.list_owned(&self.vms, "VirtualMachine").await
    }

    pub async fn vmis_list(&self) -> Result<Vec<VirtualMachineInstance>, InfraError> {
        self.list_owned(&self.vmis, "VirtualMachineInstance").await
    }

    pub async fn snapshot(&self, name: &str) -> Result<Option<VolumeSnapshot>, InfraError> {
        self.get_owned(&self.snapshots, "VolumeSnapshot", name)
            .await
    }

    pub async fn snapshots_list(&self) -> Result<Vec<VolumeSnapshot>, InfraError> {
        self.list_owned(&self.snapshots, "VolumeSnapshot").await
    }

    pub async fn create_snapshot(&self, vs: &VolumeSnapshot) -> Result<VolumeSnapshot, InfraError> {
        let name = vs.name_any();
        self.snapshots
            .create(&PostParams::default(), vs)
            .await
            .map_err(self.err("VolumeSnapshot", &name))
    }

    pub async fn delete_snapshot(&self, vs: &VolumeSnapshot) -> Result<(), InfraError> {
        let name = vs.name_any();
        let dp = DeleteParams {
            preconditions: Some(Preconditions {
                uid: vs.uid(),
                resource_version: None,
            }),
            ..DeleteParams::background()
        };
        match self.snapshots.delete(&name, &dp).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            Err(e) => Err(self.err("VolumeSnapshot", &name)(e)),
        }
    }

    /// PUT `.../{vm|vmi}/{name}/addvolume`. KubeVirt answers 202 with an empty body.
    pub async fn add_volume(
        &self,
        target: HotplugTarget,
        name: &str,
        body: &AddVolumeOptions,
    ) -> Result<(), InfraError> {
        self.hotplug(target, name, "addvolume", body).await
    }

    /// PUT `.../{vm|vmi}/{name}/removevolume`.
    pub async fn remove_volume(
        &self,
        target: HotplugTarget,
        name: &str,
        body: &RemoveVolumeOptions,
    ) -> Result<(), InfraError> {
        self.hotplug(target, name, "removevolume", body).await
    }

    async fn hotplug(
        &self,
        target: HotplugTarget,
        name: &str,
        verb: &str,
        body: &impl Serialize,
    ) -> Result<(), InfraError> {
        let kind = match target {
            HotplugTarget::Vm => "VirtualMachine",
            HotplugTarget::Vmi => "VirtualMachineInstance",
        };
        let path = format!(
            "/apis/subresources.kubevirt.io/v1/namespaces/{}/{}/{}/{}",
            self.tenant.namespace,
            target.plural(),
            name,
            verb
        );
        let bytes = serde_json::to_vec(body).map_err(|e| InfraError::Rejected {
            kind,
            name: name.to_string(),
            message: format!("cannot encode {verb} request: {e}"),
        })?;
        let req = http::Request::put(path)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(bytes)
            .map_err(|e| InfraError::Rejected {
                kind,
                name: name.to_string(),
                message: format!("cannot build {verb} request: {e}"),
            })?;
        // The body of a 202 is empty: read it as text, never decode an object from it.
        self.client
            .request_text(req)
            .await
            .map(|_| ())
            .map_err(self.err(kind, name))
    }
}
