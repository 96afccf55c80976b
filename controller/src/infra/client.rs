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
use crate::names;

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
    /// The same infra view with the tenant's object-name prefix (part of the ownership rule).
    pub fn with_prefix(mut self, prefix: &str) -> Self {
        self.tenant = self.tenant.with_prefix(prefix);
        self
    }

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

    /// Gets an object, treating one that fails `ours` as absent. The object read back must
    /// carry exactly the name asked for, whatever the server made of the path.
    async fn get_owned<K>(
        &self,
        api: &Api<K>,
        kind: &'static str,
        name: &str,
        ours: impl Fn(&Tenant, &K) -> bool,
    ) -> Result<Option<K>, InfraError>
    where
        K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned,
    {
        let obj = api.get_opt(name).await.map_err(self.err(kind, name))?;
        Ok(obj.filter(|o| {
            let ok = o.meta().name.as_deref() == Some(name) && ours(&self.tenant, o);
            if !ok {
                tracing::warn!(kind, %name, "infra object exists but is not this tenant's driver's; treating it as absent");
            }
            ok
        }))
    }

    /// Lists the tenant's objects of one kind (label-selected server-side, checked again here
    /// with `ours`).
    async fn list_owned<K>(
        &self,
        api: &Api<K>,
        kind: &'static str,
        ours: impl Fn(&Tenant, &K) -> bool,
    ) -> Result<Vec<K>, InfraError>
    where
        K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned,
    {
        let lp = ListParams::default().labels(&self.tenant.selector());
        let list = api.list(&lp).await.map_err(self.err(kind, "(list)"))?;
        Ok(list
            .items
            .into_iter()
            .filter(|o| ours(&self.tenant, o))
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

    /// One of our DataVolumes by volume id; `None` for an id we could not have made (no
    /// request is sent), an absent object, or a foreign one.
    pub async fn data_volume(&self, name: &str) -> Result<Option<DataVolume>, InfraError> {
        if !self.tenant.is_our_id(name) {
            return Ok(None);
        }
        self.get_owned(&self.dvs, "DataVolume", name, Tenant::owns_created)
            .await
    }

    /// Whether `name` is held by a DataVolume or claim that is not ours (for name clashes on
    /// create: CDI would adopt, or fail on, a claim already under that name).
    pub async fn name_taken_by_foreign(
        &self,
        name: &str,
    ) -> Result<Option<&'static str>, InfraError> {
        let dv = self
            .dvs
            .get_opt(name)
            .await
            .map_err(self.err("DataVolume", name))?;
        if let Some(dv) = dv {
            return Ok((!self.tenant.owns_created(&dv)).then_some("DataVolume"));
        }
        let pvc = self
            .pvcs
            .get_opt(name)
            .await
            .map_err(self.err("PersistentVolumeClaim", name))?;
        Ok(pvc.map(|_| "PersistentVolumeClaim"))
    }

    pub async fn data_volumes(&self) -> Result<Vec<DataVolume>, InfraError> {
        self.list_owned(&self.dvs, "DataVolume", Tenant::owns_created)
            .await
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

    /// The claim CDI made for one of our DataVolumes: `None` while it does not exist yet,
    /// [`InfraError::NotOurs`] if a claim we did not get from CDI sits under the name (it must
    /// never be hotplugged, resized, cloned or snapshotted as if it were the volume).
    pub async fn claim_of(
        &self,
        dv: &DataVolume,
    ) -> Result<Option<PersistentVolumeClaim>, InfraError> {
        let name = dv.name_any();
        match self
            .pvcs
            .get_opt(&name)
            .await
            .map_err(self.err("PersistentVolumeClaim", &name))?
        {
            None => Ok(None),
            Some(pvc) if self.tenant.owns_claim(&pvc, dv) => Ok(Some(pvc)),
            Some(_) => Err(InfraError::NotOurs {
                kind: "PersistentVolumeClaim",
                namespace: self.tenant.namespace.clone(),
                name,
            }),
        }
    }

    /// Raises the claim's storage request (CDI does not resize through the DataVolume). The
    /// patch carries the UID and resourceVersion we read, so it lands only on that claim in
    /// that state: a claim replaced or changed since is a conflict, not a silent write.
    pub async fn request_claim_size(
        &self,
        pvc: &PersistentVolumeClaim,
        bytes: u64,
    ) -> Result<(), InfraError> {
        let name = pvc.name_any();
        let patch = serde_json::json!({
            "metadata": {"uid": pvc.uid(), "resourceVersion": pvc.resource_version()},
            "spec": {"resources": {"requests": {"storage": bytes.to_string()}}}
        });
        self.pvcs
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map(|_| ())
            .map_err(self.err("PersistentVolumeClaim", &name))
    }

    /// Applies a JSON patch to a VM (declarative hotplug edits its spec this way). A leading
    /// `test` of the UID we read makes the patch fail on a VM recreated under the same name.
    pub async fn patch_vm_json(
        &self,
        vm: &VirtualMachine,
        ops: Vec<serde_json::Value>,
    ) -> Result<(), InfraError> {
        let name = vm.name_any();
        let mut all =
            vec![serde_json::json!({"op": "test", "path": "/metadata/uid", "value": vm.uid()})];
        all.extend(ops);
        let patch: json_patch::Patch = serde_json::from_value(serde_json::Value::Array(all))
            .map_err(|e| InfraError::Rejected {
                kind: "VirtualMachine",
                name: name.clone(),
                message: format!("invalid json patch: {e}"),
            })?;
        self.vms
            .patch(&name, &PatchParams::default(), &Patch::<()>::Json(patch))
            .await
            .map(|_| ())
            .map_err(self.err("VirtualMachine", &name))
    }

    /// A worker VM by name; `None` for a name that is not a DNS-1123 label (no request is
    /// sent), an absent VM, or one without the tenant's labels.
    pub async fn vm(&self, name: &str) -> Result<Option<VirtualMachine>, InfraError> {
        if !names::is_dns_label(name) {
            return Ok(None);
        }
        self.get_owned(&self.vms, "VirtualMachine", name, Tenant::owns)
            .await
    }

    pub async fn vmi(&self, name: &str) -> Result<Option<VirtualMachineInstance>, InfraError> {
        if !names::is_dns_label(name) {
            return Ok(None);
        }
        self.get_owned(&self.vmis, "VirtualMachineInstance", name, Tenant::owns)
            .await
    }

    pub async fn vms_list(&self) -> Result<Vec<VirtualMachine>, InfraError> {
        self.list_owned(&self.vms, "VirtualMachine", Tenant::owns)
            .await
    }

    pub async fn vmis_list(&self) -> Result<Vec<VirtualMachineInstance>, InfraError> {
        self.list_owned(&self.vmis, "VirtualMachineInstance", Tenant::owns)
            .await
    }

    /// One of our VolumeSnapshots by snapshot id (same rules as [`Self::data_volume`]).
    pub async fn snapshot(&self, name: &str) -> Result<Option<VolumeSnapshot>, InfraError> {
        if !self.tenant.is_our_id(name) {
            return Ok(None);
        }
        self.get_owned(
            &self.snapshots,
            "VolumeSnapshot",
            name,
            Tenant::owns_created,
        )
        .await
    }

    pub async fn snapshots_list(&self) -> Result<Vec<VolumeSnapshot>, InfraError> {
        self.list_owned(&self.snapshots, "VolumeSnapshot", Tenant::owns_created)
            .await
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
        // Callers pass names they validated; this keeps any other string out of the path.
        if !names::is_dns_label(name) {
            return Err(InfraError::Rejected {
                kind,
                name: name.to_string(),
                message: "not a DNS-1123 label".into(),
            });
        }
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
