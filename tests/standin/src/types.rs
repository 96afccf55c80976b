//! Server-side serde views of the KubeVirt, CDI and snapshot objects the stand-in touches.
//!
//! Every struct that the stand-in writes back keeps the fields it does not model in a
//! flattened `extra` map, so an update never drops what a client or a newer schema put there.

use kube::core::{ApiResource, GroupVersionKind, Object};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Fields not modelled here, preserved on round trips.
pub type Extra = Map<String, Value>;

fn ar(group: &str, version: &str, kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural)
}

/// `kubevirt.io/v1` VirtualMachine.
pub fn vm_resource() -> ApiResource {
    ar("kubevirt.io", "v1", "VirtualMachine", "virtualmachines")
}
/// `kubevirt.io/v1` VirtualMachineInstance.
pub fn vmi_resource() -> ApiResource {
    ar(
        "kubevirt.io",
        "v1",
        "VirtualMachineInstance",
        "virtualmachineinstances",
    )
}
/// `cdi.kubevirt.io/v1beta1` DataVolume.
pub fn dv_resource() -> ApiResource {
    ar("cdi.kubevirt.io", "v1beta1", "DataVolume", "datavolumes")
}
/// `snapshot.storage.k8s.io/v1` VolumeSnapshot.
pub fn vs_resource() -> ApiResource {
    ar(
        "snapshot.storage.k8s.io",
        "v1",
        "VolumeSnapshot",
        "volumesnapshots",
    )
}
/// `snapshot.storage.k8s.io/v1` VolumeSnapshotContent (cluster scoped).
pub fn vsc_resource() -> ApiResource {
    ar(
        "snapshot.storage.k8s.io",
        "v1",
        "VolumeSnapshotContent",
        "volumesnapshotcontents",
    )
}

pub type VirtualMachine = Object<VmSpec, VmStatus>;
pub type VirtualMachineInstance = Object<VmiSpec, VmiStatus>;
pub type DataVolume = Object<DvSpec, DvStatus>;
pub type VolumeSnapshot = Object<VsSpec, VsStatus>;
pub type VolumeSnapshotContent = Object<VscSpec, VscStatus>;

// ---------------------------------------------------------------- KubeVirt

#[derive(Serialize, Deserialize, Clone, Debug, Default)]
#[serde(rename_all = "camelCase")]
pub struct VmSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<VmiTemplate>,
    #[serde(flatten)]
    pub extra: Extra,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default)]
#[serde(rename_all = "camelCase")]
pub struct VmiTemplate {
    #[serde(default)]
    pub spec: VmiSpec,
    #[serde(flatten)]
    pub extra: Extra,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default)]
#[serde(rename_all = "camelCase")]
pub struct VmStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volume_requests: Vec<VolumeRequest>,
    #[serde(flatten)]
    pub extra: Extra,
}

/// One entry of `vm.status.volumeRequests`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VolumeRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub add_volume_options: Option<AddVolumeOptions>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remove_volume_options: Option<RemoveVolumeOptions>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default)]
#[serde(rename_all = "camelCase")]
pub struct VmiSpec {
    #[serde(default)]
    pub domain: Domain,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<Volume>,
    #[serde(flatten)]
    pub extra: Extra,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default)]
#[serde(rename_all = "camelCase")]
pub struct Domain {
    #[serde(default)]
    pub devices: Devices,
    #[serde(flatten)]
    pub extra: Extra,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default)]
#[serde(rename_all = "camelCase")]
pub struct Devices {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<Disk>,
    #[serde(flatten)]
    pub extra: Extra,
}

/// `domain.devices.disks[]`; also the `disk` of AddVolumeOptions.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Disk {
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<DiskTarget>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lun: Option<DiskTarget>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    #[serde(flatten)]
    pub extra: Extra,
}

impl Disk {
    /// The bus the disk asks for (`disk.bus` or `lun.bus`), if any.
    pub fn bus(&self) -> Option<&str> {
        self.disk
            .as_ref()
            .or(self.lun.as_ref())
            .and_then(|t| t.bus.as_deref())
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DiskTarget {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bus: Option<String>,
    #[serde(flatten)]
    pub extra: Extra,
}

/// `spec.volumes[]` of a VMI (or of a VM template).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Volume {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_volume: Option<DataVolumeSource>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent_volume_claim: Option<PvcVolumeSource>,
    #[serde(flatten)]
    pub extra: Extra,
}

impl Volume {
    /// The claim (or DataVolume, whose PVC has the same name) behind the volume.
    pub fn claim_name(&self) -> Option<&str> {
        if let Some(dv) = &self.data_volume {
            Some(&dv.name)
        } else {
            self.persistent_volume_claim
                .as_ref()
                .map(|p| p.claim_name.as_str())
        }
    }

    pub fn is_hotpluggable(&self) -> bool {
        self.data_volume
            .as_ref()
            .map(|d| d.hotpluggable.unwrap_or(false))
            .or(self
                .persistent_volume_claim
                .as_ref()
                .map(|p| p.hotpluggable.unwrap_or(false)))
            .unwrap_or(false)
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DataVolumeSource {
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hotpluggable: Option<bool>,
    #[serde(flatten)]
    pub extra: Extra,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PvcVolumeSource {
    #[serde(default)]
    pub claim_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_only: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hotpluggable: Option<bool>,
    #[serde(flatten)]
    pub extra: Extra,
}

/// Body of `PUT .../addvolume` (`AddVolumeOptions`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AddVolumeOptions {
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<Disk>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_source: Option<HotplugVolumeSource>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dry_run: Vec<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HotplugVolumeSource {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_volume: Option<DataVolumeSource>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent_volume_claim: Option<PvcVolumeSource>,
}

/// Body of `PUT .../removevolume` (`RemoveVolumeOptions`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RemoveVolumeOptions {
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dry_run: Vec<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default)]
#[serde(rename_all = "camelCase")]
pub struct VmiStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volume_status: Vec<VolumeStatus>,
    #[serde(flatten)]
    pub extra: Extra,
}

/// `vmi.status.volumeStatus[]`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VolumeStatus {
    pub name: String,
    #[serde(default)]
    pub target: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hotplug_volume: Option<HotplugVolumeStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent_volume_claim_info: Option<Value>,
    #[serde(flatten)]
    pub extra: Extra,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HotplugVolumeStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attach_pod_name: Option<String>,
    #[serde(
        default,
        rename = "attachPodUID",
        skip_serializing_if = "Option::is_none"
    )]
    pub attach_pod_uid: Option<String>,
}

// ---------------------------------------------------------------- CDI

#[derive(Serialize, Deserialize, Clone, Debug, Default)]
#[serde(rename_all = "camelCase")]
pub struct DvSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<DvContentSource>,
    /// `spec.pvc`: the PVC spec taken exactly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pvc: Option<k8s_openapi::api::core::v1::PersistentVolumeClaimSpec>,
    /// `spec.storage`: CDI fills in what is missing (here: RWO, Filesystem).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<k8s_openapi::api::core::v1::PersistentVolumeClaimSpec>,
    #[serde(flatten)]
    pub extra: Extra,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default)]
#[serde(rename_all = "camelCase")]
pub struct DvContentSource {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blank: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pvc: Option<NamespacedName>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<NamespacedName>,
    #[serde(flatten)]
    pub extra: Extra,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NamespacedName {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default)]
    pub name: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default)]
#[serde(rename_all = "camelCase")]
pub struct DvStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim_name: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(flatten)]
    pub extra: Extra,
}

/// A CDI DataVolume condition.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat_time: Option<String>,
}

// ---------------------------------------------------------------- snapshots

#[derive(Serialize, Deserialize, Clone, Debug, Default)]
#[serde(rename_all = "camelCase")]
pub struct VsSpec {
    #[serde(default)]
    pub source: VsSource,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_snapshot_class_name: Option<String>,
    #[serde(flatten)]
    pub extra: Extra,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default)]
#[serde(rename_all = "camelCase")]
pub struct VsSource {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent_volume_claim_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_snapshot_content_name: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default)]
#[serde(rename_all = "camelCase")]
pub struct VsStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bound_volume_snapshot_content_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_to_use: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_size: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<SnapshotError>,
    #[serde(flatten)]
    pub extra: Extra,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotError {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default)]
#[serde(rename_all = "camelCase")]
pub struct VscSpec {
    pub deletion_policy: String,
    pub driver: String,
    pub source: VscSource,
    pub volume_snapshot_ref: k8s_openapi::api::core::v1::ObjectReference,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_snapshot_class_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_volume_mode: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default)]
#[serde(rename_all = "camelCase")]
pub struct VscSource {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_handle: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_handle: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default)]
#[serde(rename_all = "camelCase")]
pub struct VscStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_handle: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_to_use: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_size: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_time: Option<i64>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn vmi_round_trip_keeps_unknown_fields() {
        let input = json!({
            "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
            "metadata": {"name": "w", "namespace": "t"},
            "spec": {
                "domain": {"cpu": {"cores": 2}, "devices": {"interfaces": [{"name": "default"}],
                    "disks": [{"name": "root", "disk": {"bus": "virtio"}, "bootOrder": 1}]}},
                "networks": [{"name": "default", "pod": {}}],
                "volumes": [{"name": "root", "containerDisk": {"image": "x"}}]
            },
            "status": {"phase": "Running", "nodeName": "n1"}
        });
        let vmi: VirtualMachineInstance = serde_json::from_value(input.clone()).unwrap();
        assert_eq!(vmi.spec.domain.devices.disks[0].bus(), Some("virtio"));
        assert_eq!(serde_json::to_value(&vmi).unwrap(), input);
    }

    #[test]
    fn add_volume_options_parse() {
        let body = json!({"name": "v1", "disk": {"name": "v1", "disk": {"bus": "scsi"}, "serial": "abc"},
            "volumeSource": {"dataVolume": {"name": "dv1", "hotpluggable": true}}, "dryRun": ["All"]});
        let o: AddVolumeOptions = serde_json::from_value(body).unwrap();
        assert_eq!(
            o.disk.as_ref().and_then(|d| d.serial.as_deref()),
            Some("abc")
        );
        assert_eq!(o.dry_run, vec!["All"]);
        let v = o.volume_source.unwrap().data_volume.unwrap();
        assert_eq!((v.name.as_str(), v.hotpluggable), ("dv1", Some(true)));
    }

    #[test]
    fn hotplug_status_uses_upper_case_uid() {
        let s = HotplugVolumeStatus {
            attach_pod_name: Some("hp".into()),
            attach_pod_uid: Some("u".into()),
        };
        assert_eq!(
            serde_json::to_value(s).unwrap(),
            json!({"attachPodName": "hp", "attachPodUID": "u"})
        );
    }
}
