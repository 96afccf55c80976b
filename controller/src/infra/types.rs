//! The fields of KubeVirt, CDI and snapshot objects this driver reads and writes, as the
//! client sees them. Objects are read with every field optional so an object written by a
//! newer KubeVirt still parses; we never write these objects back whole (hotplug goes
//! through subresources, status is never ours), so unknown fields cannot be lost.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::core::{ApiResource, GroupVersionKind, Object};
use serde::{Deserialize, Serialize};

fn resource(group: &str, version: &str, kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural)
}

pub fn data_volume_resource() -> ApiResource {
    resource("cdi.kubevirt.io", "v1beta1", "DataVolume", "datavolumes")
}
pub fn vm_resource() -> ApiResource {
    resource("kubevirt.io", "v1", "VirtualMachine", "virtualmachines")
}
pub fn vmi_resource() -> ApiResource {
    resource(
        "kubevirt.io",
        "v1",
        "VirtualMachineInstance",
        "virtualmachineinstances",
    )
}
pub fn volume_snapshot_resource() -> ApiResource {
    resource(
        "snapshot.storage.k8s.io",
        "v1",
        "VolumeSnapshot",
        "volumesnapshots",
    )
}

pub type DataVolume = Object<DataVolumeSpec, DataVolumeStatus>;
pub type VirtualMachine = Object<VirtualMachineSpec, VirtualMachineStatus>;
pub type VirtualMachineInstance = Object<VmiSpec, VmiStatus>;
pub type VolumeSnapshot = Object<VolumeSnapshotSpec, VolumeSnapshotStatus>;

/// An empty object, as in `blank: {}`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Empty {}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DataVolumeSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<DataVolumeSource>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<StorageSpec>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DataVolumeSource {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blank: Option<Empty>,
    /// Clone of another PVC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pvc: Option<NamespacedName>,
    /// Restore from a VolumeSnapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<NamespacedName>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamespacedName {
    pub namespace: String,
    pub name: String,
}

/// CDI's `storage:` API: CDI fills what is left out from the StorageProfile; we set the
/// mode and access modes ourselves because the guest capability decides them.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StorageSpec {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub access_modes: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_mode: Option<String>,
    #[serde(default)]
    pub resources: Resources,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Resources {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub requests: BTreeMap<String, Quantity>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DataVolumeStatus {
    #[serde(default)]
    pub phase: Option<String>,
    #[serde(default)]
    pub claim_name: Option<String>,
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    #[serde(default)]
    pub status: String,
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub message: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VirtualMachineSpec {
    #[serde(default)]
    pub template: Option<VmTemplate>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmTemplate {
    #[serde(default)]
    pub spec: Option<VmiSpec>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VirtualMachineStatus {
    #[serde(default)]
    pub volume_requests: Vec<serde_json::Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmiSpec {
    #[serde(default)]
    pub volumes: Vec<Volume>,
    #[serde(default)]
    pub domain: Option<Domain>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Domain {
    #[serde(default)]
    pub devices: Devices,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Devices {
    #[serde(default)]
    pub disks: Vec<Disk>,
}

/// A KubeVirt disk: `{name, disk:{bus, readonly}, serial}`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Disk {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<DiskTarget>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DiskTarget {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bus: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub readonly: bool,
}

/// A KubeVirt volume; we only model the two hotpluggable sources.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Volume {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_volume: Option<DataVolumeRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent_volume_claim: Option<ClaimRef>,
}

impl Volume {
    /// The DataVolume or PVC this volume uses.
    pub fn source_name(&self) -> Option<&str> {
        self.data_volume.as_ref().map(|d| d.name.as_str()).or(self
            .persistent_volume_claim
            .as_ref()
            .map(|c| c.claim_name.as_str()))
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DataVolumeRef {
    pub name: String,
    #[serde(default)]
    pub hotpluggable: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClaimRef {
    pub claim_name: String,
    #[serde(default)]
    pub hotpluggable: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmiStatus {
    #[serde(default)]
    pub phase: Option<String>,
    #[serde(default)]
    pub volume_status: Vec<VolumeStatus>,
}

/// One entry of `vmi.status.volumeStatus`: where a hotplug stands.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeStatus {
    pub name: String,
    #[serde(default)]
    pub target: Option<String>,
    #[serde(default)]
    pub phase: Option<String>,
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default)]
    pub hotplug_volume: Option<serde_json::Value>,
}

/// The phase KubeVirt reports once a hotplugged disk is usable in the guest.
pub const VOLUME_READY: &str = "Ready";

/// Body of PUT `.../addvolume`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AddVolumeOptions {
    pub name: String,
    pub disk: Disk,
    pub volume_source: HotplugVolumeSource,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HotplugVolumeSource {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_volume: Option<DataVolumeRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent_volume_claim: Option<ClaimRef>,
}

/// Body of PUT `.../removevolume`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoveVolumeOptions {
    pub name: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshotSpec {
    pub source: VolumeSnapshotSource,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_snapshot_class_name: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshotSource {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent_volume_claim_name: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshotStatus {
    #[serde(default)]
    pub ready_to_use: Option<bool>,
    #[serde(default)]
    pub restore_size: Option<Quantity>,
    #[serde(default)]
    pub creation_time: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    #[serde(default)]
    pub error: Option<SnapshotError>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotError {
    #[serde(default)]
    pub message: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_volume_options_match_kubevirt_wire_shape() {
        let body = AddVolumeOptions {
            name: "vol".into(),
            disk: Disk {
                name: "vol".into(),
                disk: Some(DiskTarget {
                    bus: Some("scsi".into()),
                    readonly: false,
                }),
                serial: Some("kvabc".into()),
            },
            volume_source: HotplugVolumeSource {
                data_volume: Some(DataVolumeRef {
                    name: "vol".into(),
                    hotpluggable: true,
                }),
                persistent_volume_claim: None,
            },
        };
        assert_eq!(
            serde_json::to_value(&body).unwrap(),
            serde_json::json!({
                "name": "vol",
                "disk": {"name": "vol", "disk": {"bus": "scsi"}, "serial": "kvabc"},
                "volumeSource": {"dataVolume": {"name": "vol", "hotpluggable": true}}
            })
        );
    }

    #[test]
    fn vmi_with_unknown_fields_parses() {
        let vmi: VirtualMachineInstance = serde_json::from_value(serde_json::json!({
            "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
            "metadata": {"name": "w", "namespace": "t"},
            "spec": {"domain": {"devices": {"disks": [{"name": "root", "disk": {"bus": "virtio"}}]}, "cpu": {"cores": 2}},
                     "volumes": [{"name": "root", "containerDisk": {"image": "x"}}]},
            "status": {"phase": "Running", "volumeStatus": [
                {"name": "v1", "phase": "Ready", "target": "sda", "hotplugVolume": {"attachPodName": "p"}, "size": 1}]}
        }))
        .unwrap();
        let st = vmi.status.unwrap();
        assert_eq!(st.volume_status[0].phase.as_deref(), Some(VOLUME_READY));
        assert_eq!(vmi.spec.volumes[0].source_name(), None);
    }
}
