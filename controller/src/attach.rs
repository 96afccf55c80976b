//! The attach path: ControllerPublishVolume hotplugs the volume's DataVolume into the
//! worker VM behind a guest node; ControllerUnpublishVolume takes it out again.
//!
//! The node id is `<infra-namespace>/<vm-name>`. The disk gets a serial derived from the
//! volume id (at most 20 characters, see [`crate::names::disk_serial`]) that the node
//! plugin looks for in sysfs.

use csi::volume_capability::access_mode::Mode;
use csi_proto::v1 as csi;
use kube::ResourceExt;
use kube::api::{Patch, PatchParams};
use tracing::{info, instrument};

use crate::capability::is_multi_node;
use crate::driver::{ANN_ATTACHED_TO, Driver, HotplugMode, bounded_map, required};
use crate::error::{ControllerError, InfraError};
use crate::infra::Tenant;
use crate::infra::client::HotplugTarget;
use crate::infra::types::{
    AddVolumeOptions, DataVolume, DataVolumeRef, Disk, DiskTarget, HotplugVolumeSource,
    RemoveVolumeOptions, VOLUME_READY, VirtualMachine, VirtualMachineInstance, VmiSpec, Volume,
};
use crate::infra::wait::{Progress, wait_for};
use crate::names;
use crate::params::{PublishContext, VolumeContext};
use crate::volumes::{attached_to, bus_of, is_block, wait_error};

/// A guest node id, `<namespace>/<vm>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeId {
    pub namespace: String,
    pub vm: String,
}

impl NodeId {
    pub fn parse(id: &str) -> Result<Self, ControllerError> {
        match id.split_once('/') {
            Some((ns, vm)) if names::is_dns_label(ns) && names::is_dns_label(vm) => Ok(Self {
                namespace: ns.to_string(),
                vm: vm.to_string(),
            }),
            _ => Err(ControllerError::NotFound(format!(
                "node id {id:?} is not <infra-namespace>/<vm-name>, so no worker VM backs it"
            ))),
        }
    }
}

impl std::fmt::Display for NodeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.vm)
    }
}

fn is_hotplug(v: &Volume) -> bool {
    v.data_volume.as_ref().is_some_and(|d| d.hotpluggable)
        || v.persistent_volume_claim
            .as_ref()
            .is_some_and(|c| c.hotpluggable)
}

/// The VMI-shaped spec inside a VM's template.
fn vm_spec(vm: Option<&VirtualMachine>) -> Option<&VmiSpec> {
    vm.and_then(|v| v.spec.template.as_ref())
        .and_then(|t| t.spec.as_ref())
}

fn vmi_spec(vmi: Option<&VirtualMachineInstance>) -> Option<&VmiSpec> {
    vmi.map(|v| &v.spec)
}

fn disk_named<'a>(spec: &'a VmiSpec, name: &str) -> Option<&'a Disk> {
    spec.domain
        .as_ref()
        .and_then(|d| d.devices.disks.iter().find(|d| d.name == name))
}

/// Hotplugged volumes other than `except` in the VM or VMI spec (whichever has more).
fn hotplugged_count(
    vm: Option<&VirtualMachine>,
    vmi: Option<&VirtualMachineInstance>,
    except: &str,
) -> usize {
    let count = |spec: Option<&VmiSpec>| {
        spec.map_or(0, |s| {
            s.volumes
                .iter()
                .filter(|v| v.name != except && is_hotplug(v))
                .count()
        })
    };
    count(vm_spec(vm)).max(count(vmi_spec(vmi)))
}

/// The disk of the hotplug this driver made for volume `id` in `spec`, if it is there.
fn our_disk(tenant: &Tenant, spec: Option<&VmiSpec>, id: &str) -> Option<Disk> {
    let spec = spec?;
    let volume = spec.volumes.iter().find(|v| v.name == id)?;
    let disk = disk_named(spec, id);
    tenant
        .owns_hotplug(volume, disk)
        .then(|| disk.cloned())
        .flatten()
}

/// Whether `spec` has any volume or disk named `id`, ours or not.
fn named_in(spec: Option<&VmiSpec>, id: &str) -> bool {
    spec.is_some_and(|s| s.volumes.iter().any(|v| v.name == id) || disk_named(s, id).is_some())
}

/// Whether the VMI still reports a status entry for our volume `id` (attaching or detaching):
/// an entry whose name is not held in the VMI spec by a volume someone else added.
fn in_vmi_status(tenant: &Tenant, vmi: Option<&VirtualMachineInstance>, id: &str) -> bool {
    let Some(vmi) = vmi else {
        return false;
    };
    let foreign_in_spec = vmi.spec.volumes.iter().any(|v| v.name == id)
        && our_disk(tenant, Some(&vmi.spec), id).is_none();
    !foreign_in_spec
        && vmi
            .status
            .as_ref()
            .is_some_and(|s| s.volume_status.iter().any(|e| e.name == id))
}

/// Whether the VM or VMI holds any trace of volume `id`, ours or not (for the single-node
/// check, where erring towards "in use" is the safe side).
fn vm_or_vmi_uses(
    vm: Option<&VirtualMachine>,
    vmi: Option<&VirtualMachineInstance>,
    id: &str,
) -> bool {
    named_in(vm_spec(vm), id)
        || named_in(vmi_spec(vmi), id)
        || vmi
            .and_then(|v| v.status.as_ref())
            .is_some_and(|s| s.volume_status.iter().any(|e| e.name == id))
}

impl Driver {
    /// The VM and VMI behind a node (either may be absent), fetched concurrently.
    async fn worker(
        &self,
        node: &NodeId,
    ) -> Result<(Option<VirtualMachine>, Option<VirtualMachineInstance>), InfraError> {
        let (vm, vmi) = tokio::join!(self.infra.vm(&node.vm), self.infra.vmi(&node.vm));
        Ok((vm?, vmi?))
    }

    /// ControllerPublishVolume. Spec rules honoured: volume_id, node_id and
    /// volume_capability are required (INVALID_ARGUMENT); an unknown volume or node is
    /// NOT_FOUND; a single-node volume published on another node is FAILED_PRECONDITION;
    /// past the per-VM volume limit is RESOURCE_EXHAUSTED; publishing again with the same
    /// arguments succeeds with the same publish context, with different (read-only) ones
    /// ALREADY_EXISTS. Returns only once the disk is Ready inside the VM.
    #[instrument(skip_all, fields(volume_id = %req.volume_id, node_id = %req.node_id))]
    pub async fn controller_publish_volume(
        &self,
        req: csi::ControllerPublishVolumeRequest,
    ) -> Result<csi::ControllerPublishVolumeResponse, ControllerError> {
        let id = required(&req.volume_id, "volume_id")?;
        required(&req.node_id, "node_id")?;
        let cap = req.volume_capability.as_ref().ok_or_else(|| {
            ControllerError::InvalidArgument("volume_capability is required".into())
        })?;
        if let Some(why) = crate::capability::unsupported(cap) {
            return Err(ControllerError::InvalidArgument(why));
        }
        bounded_map(&req.volume_context, "volume_context")?;
        let node = NodeId::parse(&req.node_id)?;
        let _guard = self.locks.try_lock(id)?;
        let ctx = |what: &str| {
            ControllerError::infra(format!("{what} for volume {id} on {}", req.node_id))
        };

        let dv = self.existing_volume(id).await?;
        let wants_block = matches!(
            cap.access_type,
            Some(csi::volume_capability::AccessType::Block(_))
        );
        if wants_block != is_block(&dv) {
            return Err(ControllerError::InvalidArgument(format!(
                "volume {id} is a {} volume; it cannot be published for {} access",
                if is_block(&dv) { "block" } else { "filesystem" },
                if wants_block { "block" } else { "mount" }
            )));
        }
        if node.namespace != self.infra.namespace() {
            return Err(ControllerError::NotFound(format!(
                "node {node} is not a worker VM of this tenant (infra namespace {})",
                self.infra.namespace()
            )));
        }
        let (vm, vmi) = self
            .worker(&node)
            .await
            .map_err(ctx("looking up the worker VM"))?;
        if vm.is_none() && vmi.is_none() {
            return Err(ControllerError::NotFound(format!(
                "no worker VM backs node {node}"
            )));
        }
        let vmi_obj = vmi.as_ref().ok_or_else(|| {
            ControllerError::FailedPrecondition(format!(
                "worker VM {node} is not running; a disk can only be hotplugged into a running VM"
            ))
        })?;

        // The bus the volume context names, else (no or unreadable bus) the one recorded
        // on the DataVolume at creation.
        let bus = VolumeContext::from_map(&req.volume_context)
            .ok()
            .and_then(|c| c.bus)
            .unwrap_or_else(|| bus_of(&dv, self.settings.default_bus));
        let publish = PublishContext {
            serial: names::disk_serial(id),
            bus,
        };
        let wanted_disk = Disk {
            name: id.to_string(),
            disk: Some(DiskTarget {
                bus: Some(bus.as_str().to_string()),
                readonly: req.readonly,
            }),
            serial: Some(publish.serial.clone()),
        };

        // The volume is hotplugged by name and KubeVirt resolves that name to the claim: the
        // claim under it must be the one CDI made for our DataVolume.
        self.infra
            .claim_of(&dv)
            .await
            .map_err(ctx("checking the volume's infra claim"))?;

        // Already there (a retry): the same disk waits for Ready, a different one conflicts.
        let tenant = self.infra.tenant();
        let ours = our_disk(tenant, vm_spec(vm.as_ref()), id)
            .or_else(|| our_disk(tenant, vmi_spec(Some(vmi_obj)), id));
        if let Some(existing) = ours {
            if existing != wanted_disk {
                return Err(ControllerError::AlreadyExists(format!(
                    "volume {id} is already published to {node} with a different disk ({existing:?})"
                )));
            }
        } else if named_in(vm_spec(vm.as_ref()), id) || named_in(vmi_spec(Some(vmi_obj)), id) {
            return Err(ControllerError::AlreadyExists(format!(
                "worker VM {node} already has a volume or disk named {id} that this driver did not hotplug"
            )));
        } else if in_vmi_status(tenant, Some(vmi_obj), id) {
            return Err(ControllerError::Aborted(format!(
                "volume {id} is still being detached from {node}; retry once it is gone"
            )));
        } else {
            self.check_single_node(&dv, cap, &node).await?;
            let count = hotplugged_count(vm.as_ref(), Some(vmi_obj), id);
            if count >= self.settings.max_volumes_per_vm {
                return Err(ControllerError::ResourceExhausted(format!(
                    "worker VM {node} already has {count} hotplugged volumes (limit {})",
                    self.settings.max_volumes_per_vm
                )));
            }
            self.record_attachment(&dv, &node.vm, true).await?;
            let target = if vm.is_some() {
                HotplugTarget::Vm
            } else {
                HotplugTarget::Vmi
            };
            info!(serial = %publish.serial, bus = bus.as_str(), ?target, "hotplugging volume");
            self.hotplug(target, &node.vm, vm.as_ref(), &wanted_disk)
                .await
                .map_err(|e| match e {
                    // KubeVirt's admission refused the disk we built from this request (its
                    // bus, serial or read-only flag): retrying the same request cannot help.
                    InfraError::Rejected { message, .. } => ControllerError::InvalidArgument(
                        format!("KubeVirt refused to hotplug volume {id} into {node}: {message}"),
                    ),
                    other => ctx("hotplugging")(other),
                })?;
        }

        self.wait_attached(&node, id).await?;
        info!(serial = %publish.serial, "volume is ready in the worker VM");
        Ok(csi::ControllerPublishVolumeResponse {
            publish_context: publish.to_map(),
        })
    }

    async fn hotplug(
        &self,
        target: HotplugTarget,
        vm_name: &str,
        vm: Option<&VirtualMachine>,
        disk: &Disk,
    ) -> Result<(), InfraError> {
        let name = disk.name.clone();
        match (self.settings.hotplug_mode, target, vm) {
            (HotplugMode::Declarative, HotplugTarget::Vm, Some(vm)) => {
                // A JSON patch appends to the lists and leaves the rest of the spec alone.
                let ops = vec![
                    serde_json::json!({"op": "add", "path": "/spec/template/spec/volumes/-", "value": {"name": name, "dataVolume": {"name": name, "hotpluggable": true}}}),
                    serde_json::json!({"op": "add", "path": "/spec/template/spec/domain/devices/disks/-", "value": disk}),
                ];
                self.infra.patch_vm_json(vm, ops).await
            }
            _ => {
                let body = AddVolumeOptions {
                    name: name.clone(),
                    disk: disk.clone(),
                    volume_source: HotplugVolumeSource {
                        data_volume: Some(DataVolumeRef {
                            name,
                            hotpluggable: true,
                        }),
                        persistent_volume_claim: None,
                    },
                };
                match self.infra.add_volume(target, vm_name, &body).await {
                    // KubeVirt says 409 when the volume is already being added: a retry of ours.
                    Err(InfraError::Conflict { message, .. }) if message.contains("already") => {
                        Ok(())
                    }
                    other => other,
                }
            }
        }
    }

    /// FAILED_PRECONDITION if a single-node volume is published to another VM. The
    /// attachment annotation names the candidates; each is confirmed against its VM, so a
    /// stale annotation never blocks an attach.
    async fn check_single_node(
        &self,
        dv: &DataVolume,
        cap: &csi::VolumeCapability,
        node: &NodeId,
    ) -> Result<(), ControllerError> {
        let mode = cap
            .access_mode
            .as_ref()
            .and_then(|m| Mode::try_from(m.mode).ok())
            .unwrap_or(Mode::Unknown);
        if is_multi_node(mode) {
            return Ok(());
        }
        let id = dv.name_any();
        for other in attached_to(dv).into_iter().filter(|o| *o != node.vm) {
            let ctx = || ControllerError::infra(format!("checking where volume {id} is attached"));
            let vm = self.infra.vm(&other).await.map_err(ctx())?;
            let vmi = self.infra.vmi(&other).await.map_err(ctx())?;
            if vm_or_vmi_uses(vm.as_ref(), vmi.as_ref(), &id) {
                return Err(ControllerError::FailedPrecondition(format!(
                    "volume {id} allows single-node access and is published to {}/{other}",
                    self.infra.namespace()
                )));
            }
        }
        Ok(())
    }

    /// Adds or removes `vm` in the DataVolume's attachment annotation. The patch carries the
    /// resourceVersion we read, so concurrent writers conflict (ABORTED, retried) instead of
    /// overwriting each other.
    async fn record_attachment(
        &self,
        dv: &DataVolume,
        vm: &str,
        attached: bool,
    ) -> Result<(), ControllerError> {
        let mut current = attached_to(dv);
        current.sort();
        let mut names: Vec<String> = current.iter().filter(|n| *n != vm).cloned().collect();
        if attached {
            names.push(vm.to_string());
            names.sort();
        }
        if names == current {
            return Ok(());
        }
        let value = if names.is_empty() {
            serde_json::Value::Null
        } else {
            names.join(",").into()
        };
        let patch = serde_json::json!({
            "metadata": {"uid": dv.uid(), "resourceVersion": dv.resource_version(), "annotations": {ANN_ATTACHED_TO: value}}
        });
        let id = dv.name_any();
        self.infra
            .dvs
            .patch(&id, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map(|_| ())
            .map_err(|e| {
                ControllerError::infra(format!("recording the attachment of volume {id}"))(
                    InfraError::from_kube("DataVolume", self.infra.namespace(), &id, e),
                )
            })
    }

    /// Waits on a watch of the VMI until the volume's status entry is Ready.
    async fn wait_attached(&self, node: &NodeId, id: &str) -> Result<(), ControllerError> {
        let what = format!("volume {id} to become Ready in {node}");
        let mut reached_vmi = false;
        let waited = wait_for(
            self.infra.vmis.clone(),
            &node.vm,
            &what,
            self.settings.timeouts.attach,
            |vmi: Option<&VirtualMachineInstance>| {
                let Some(vmi) = vmi else {
                    return Progress::Failed(format!(
                        "worker VM {node} stopped while volume {id} was being attached"
                    ));
                };
                reached_vmi |= vmi.spec.volumes.iter().any(|v| v.name == id);
                match vmi
                    .status
                    .as_ref()
                    .and_then(|s| s.volume_status.iter().find(|e| e.name == id))
                {
                    Some(e) if e.phase.as_deref() == Some(VOLUME_READY) => Progress::Done,
                    Some(e) if e.reason.as_deref().is_some_and(|r| r.contains("Fail")) => {
                        Progress::Failed(format!(
                            "KubeVirt reports {}: {}",
                            e.reason.clone().unwrap_or_default(),
                            e.message.clone().unwrap_or_default()
                        ))
                    }
                    _ => Progress::Pending,
                }
            },
        )
        .await;
        // KubeVirt copies VM-spec hotplugs to the VMI only with DeclarativeHotplugVolumes on
        // and HotplugVolumes off (pkg/virt-controller/watch/vm/vm.go); otherwise a declarative
        // publish waits for nothing. Say so rather than leave a bare timeout.
        let hint = if self.settings.hotplug_mode == HotplugMode::Declarative && !reached_vmi {
            " (the VM spec holds the volume but KubeVirt never copied it to the VMI: declarative hotplug needs KubeVirt's DeclarativeHotplugVolumes gate on and HotplugVolumes off; --hotplug-mode=subresource works with either)"
        } else {
            ""
        };
        waited
            .map(|_| ())
            .map_err(|e| wait_error(e, format!("attaching volume {id} to {node}{hint}")))
    }

    /// ControllerUnpublishVolume. Spec rules honoured: volume_id and node_id are required;
    /// a volume or node that does not exist (or is not this tenant's) is already
    /// unpublished, so the answer is OK; returns only once the disk is gone from the VM.
    ///
    /// Only a hotplug this driver made is ever removed (see [`Tenant::owns_hotplug`]): an id
    /// naming a worker's root disk, or any volume someone else added, leaves the VM untouched.
    /// An id we could not have issued is answered OK before any request.
    #[instrument(skip_all, fields(volume_id = %req.volume_id, node_id = %req.node_id))]
    pub async fn controller_unpublish_volume(
        &self,
        req: csi::ControllerUnpublishVolumeRequest,
    ) -> Result<csi::ControllerUnpublishVolumeResponse, ControllerError> {
        let id = required(&req.volume_id, "volume_id")?;
        required(&req.node_id, "node_id")?;
        let done = Ok(csi::ControllerUnpublishVolumeResponse {});
        if !self.infra.tenant().is_our_id(id) {
            info!("no volume of this driver can have that id; nothing to unpublish");
            return done;
        }
        let Ok(node) = NodeId::parse(&req.node_id) else {
            return done;
        };
        if node.namespace != self.infra.namespace() {
            return done;
        }
        let _guard = self.locks.try_lock(id)?;
        let ctx = |what: &str| ControllerError::infra(format!("{what} for volume {id} on {node}"));
        let dv = self
            .infra
            .data_volume(id)
            .await
            .map_err(ctx("looking up the volume"))?;
        let (vm, vmi) = self
            .worker(&node)
            .await
            .map_err(ctx("looking up the worker VM"))?;
        let tenant = self.infra.tenant();
        let target = if let Some(disk) = our_disk(tenant, vm_spec(vm.as_ref()), id) {
            Some((HotplugTarget::Vm, disk))
        } else {
            our_disk(tenant, vmi_spec(vmi.as_ref()), id).map(|d| (HotplugTarget::Vmi, d))
        };
        let unplugged = target.is_some();
        if let Some((target, _)) = target {
            info!(?target, "unplugging volume");
            let vm = vm.as_ref().filter(|_| target == HotplugTarget::Vm);
            self.unplug(target, &node.vm, vm, id)
                .await
                .map_err(ctx("unplugging"))?;
        }
        // Wait only for what we unplugged, or for a hotplug of ours still leaving the VMI; a
        // foreign volume of that name is none of our business.
        if vmi.is_some() && (unplugged || in_vmi_status(tenant, vmi.as_ref(), id)) {
            let what = format!("volume {id} to leave {node}");
            wait_for(
                self.infra.vmis.clone(),
                &node.vm,
                &what,
                self.settings.timeouts.detach,
                |vmi: Option<&VirtualMachineInstance>| {
                    if our_disk(tenant, vmi_spec(vmi), id).is_some()
                        || in_vmi_status(tenant, vmi, id)
                    {
                        Progress::Pending
                    } else {
                        Progress::Done
                    }
                },
            )
            .await
            .map_err(|e| wait_error(e, format!("detaching volume {id} from {node}")))?;
        }
        if let Some(dv) = dv {
            self.record_attachment(&dv, &node.vm, false).await?;
        }
        info!("volume detached");
        done
    }

    /// Removes our hotplug `id` from the VM (declarative: a JSON patch of the VM spec whose
    /// `test` ops pin the entries we checked) or through removevolume.
    async fn unplug(
        &self,
        target: HotplugTarget,
        vm_name: &str,
        vm: Option<&VirtualMachine>,
        id: &str,
    ) -> Result<(), InfraError> {
        if let (HotplugMode::Declarative, Some(vm)) = (self.settings.hotplug_mode, vm) {
            let Some(spec) = vm_spec(Some(vm)) else {
                return Ok(());
            };
            let vol_idx = spec.volumes.iter().position(|v| v.name == id);
            let disk_idx = spec
                .domain
                .as_ref()
                .and_then(|d| d.devices.disks.iter().position(|d| d.name == id));
            let mut ops = Vec::new();
            if let Some(i) = vol_idx {
                let vol = &spec.volumes[i];
                let source = if vol.data_volume.is_some() {
                    "dataVolume"
                } else {
                    "persistentVolumeClaim"
                };
                let base = format!("/spec/template/spec/volumes/{i}");
                ops.push(
                    serde_json::json!({"op": "test", "path": format!("{base}/name"), "value": id}),
                );
                ops.push(serde_json::json!({"op": "test", "path": format!("{base}/{source}/hotpluggable"), "value": true}));
                ops.push(serde_json::json!({"op": "remove", "path": base}));
            }
            if let Some(i) = disk_idx {
                let base = format!("/spec/template/spec/domain/devices/disks/{i}");
                ops.push(
                    serde_json::json!({"op": "test", "path": format!("{base}/name"), "value": id}),
                );
                ops.push(serde_json::json!({"op": "test", "path": format!("{base}/serial"), "value": names::disk_serial(id)}));
                ops.push(serde_json::json!({"op": "remove", "path": base}));
            }
            if ops.is_empty() {
                return Ok(());
            }
            // The test ops make the patch fail, rather than remove the wrong entry, if the
            // lists changed since we read them.
            return self.infra.patch_vm_json(vm, ops).await;
        }
        match self
            .infra
            .remove_volume(
                target,
                vm_name,
                &RemoveVolumeOptions {
                    name: id.to_string(),
                },
            )
            .await
        {
            Err(InfraError::NotFound { .. }) => Ok(()),
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids() {
        assert_eq!(
            NodeId::parse("tenant-a/worker-0").unwrap(),
            NodeId {
                namespace: "tenant-a".into(),
                vm: "worker-0".into()
            }
        );
        for bad in ["", "worker", "a/b/c", "/vm", "ns/", "NS/vm", "ns/vm_1"] {
            assert_eq!(
                NodeId::parse(bad).unwrap_err().code(),
                tonic::Code::NotFound,
                "{bad:?}"
            );
        }
    }
}
