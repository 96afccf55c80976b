//! Volume lifecycle: CreateVolume, DeleteVolume, ValidateVolumeCapabilities, ListVolumes,
//! ControllerGetVolume. A guest volume is one infra DataVolume named from the CSI name.

use std::collections::BTreeMap;

use csi::volume_content_source::{SnapshotSource, Type as SourceType, VolumeSource};
use csi_proto::v1 as csi;
use kube::ResourceExt;
use kube::core::ObjectMeta;
use tracing::{info, instrument};

use crate::capability::{self, Shape};
use crate::driver::{
    ANN_ATTACHED_TO, ANN_BUS, ANN_CDI_KEEP, ANN_CSI_NAME, Driver, bounded_map, csi_name, required,
};
use crate::error::{ControllerError, InfraError};
use crate::infra::types::{
    DataVolume, DataVolumeSource, DataVolumeSpec, Empty, NamespacedName, Resources, StorageSpec,
};
use crate::infra::wait::{Progress, WaitError, wait_for};
use crate::listing;
use crate::names;
use crate::params::{Bus, StorageClassParams, VolumeContext};
use crate::quantity::{self, GIB, MIB};

/// Size of a volume whose request gives no capacity.
const DEFAULT_SIZE: u64 = GIB;
/// The largest whole-MiB size that fits the i64 capacity fields of CSI.
pub const MAX_SIZE: u64 = (i64::MAX as u64) / MIB * MIB;

/// The bytes to request for a capacity range: the required size rounded up to MiB (what
/// block storage allocates in), within the limit.
///
/// `max` is the operator's ceiling (`--max-volume-size`): a size above it is OUT_OF_RANGE at
/// once, rather than a claim no provisioner can fill and a wait that times out on every
/// retry.
pub fn size_for(range: Option<&csi::CapacityRange>, max: u64) -> Result<u64, ControllerError> {
    let (required, limit) = range.map_or((0, 0), |r| (r.required_bytes, r.limit_bytes));
    if required < 0 || limit < 0 {
        return Err(ControllerError::InvalidArgument(format!(
            "capacity_range must not be negative (required {required}, limit {limit})"
        )));
    }
    let (required, limit) = (required as u64, limit as u64);
    if limit > 0 && required > limit {
        return Err(ControllerError::OutOfRange(format!(
            "required_bytes {required} exceeds limit_bytes {limit}"
        )));
    }
    let wanted = if required > 0 {
        required
    } else if limit > 0 {
        limit.min(DEFAULT_SIZE)
    } else {
        DEFAULT_SIZE
    };
    // Rounding i64::MAX up to a MiB leaves i64 (and the capacity we would report would turn
    // negative): the largest size we can provision is the last whole MiB below i64::MAX.
    let rounded = wanted.div_ceil(MIB) * MIB;
    let max = max.min(MAX_SIZE);
    if rounded > max {
        return Err(ControllerError::OutOfRange(format!(
            "required_bytes {required} is larger than the largest volume this driver provisions ({max} bytes, --max-volume-size)"
        )));
    }
    if limit > 0 && rounded > limit {
        if limit / MIB * MIB >= wanted {
            return Ok(limit / MIB * MIB);
        }
        return Err(ControllerError::OutOfRange(format!(
            "no whole-MiB size lies between required_bytes {required} and limit_bytes {limit}"
        )));
    }
    Ok(rounded)
}

/// What a DataVolume was created for, read back to answer idempotent retries.
#[derive(Debug, PartialEq)]
struct Recorded {
    size: Option<u64>,
    source: Option<DataVolumeSource>,
    volume_mode: Option<String>,
    access_modes: Vec<String>,
    storage_class: Option<String>,
    bus: Option<String>,
}

fn recorded(dv: &DataVolume) -> Recorded {
    let storage = dv.spec.storage.clone().unwrap_or_default();
    Recorded {
        size: storage
            .resources
            .requests
            .get("storage")
            .and_then(quantity::bytes),
        source: dv.spec.source.clone(),
        volume_mode: storage.volume_mode,
        access_modes: storage.access_modes,
        storage_class: storage.storage_class_name,
        bus: dv.annotations().get(ANN_BUS).cloned(),
    }
}

/// Whether a DataVolume was created for block access.
pub fn is_block(dv: &DataVolume) -> bool {
    dv.spec
        .storage
        .as_ref()
        .and_then(|s| s.volume_mode.as_deref())
        == Some("Block")
}

/// The bus recorded on a DataVolume, or the default.
pub fn bus_of(dv: &DataVolume, default: Bus) -> Bus {
    dv.annotations()
        .get(ANN_BUS)
        .and_then(|b| Bus::parse(b).ok())
        .unwrap_or(default)
}

/// VM names recorded as having this volume published (anything that is not a VM name is
/// dropped: the annotation is read back from the cluster and its names go into URLs).
pub fn attached_to(dv: &DataVolume) -> Vec<String> {
    dv.annotations()
        .get(ANN_ATTACHED_TO)
        .map(|s| {
            s.split(',')
                .filter(|n| names::is_dns_label(n))
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

impl Driver {
    /// The tenant's DataVolume for a volume id, or NOT_FOUND (absent or foreign alike).
    pub async fn existing_volume(&self, id: &str) -> Result<DataVolume, ControllerError> {
        self.infra
            .data_volume(id)
            .await
            .map_err(ControllerError::infra(format!("looking up volume {id}")))?
            .ok_or_else(|| ControllerError::NotFound(format!("volume {id} does not exist")))
    }

    /// The volume's size as the infra cluster reports it (PVC capacity), else as requested.
    pub async fn capacity_of(&self, dv: &DataVolume) -> Result<u64, InfraError> {
        let requested = recorded(dv).size.unwrap_or(0);
        let claim = self.infra.claim_of(dv).await?;
        Ok(claim
            .and_then(|c| c.status)
            .and_then(|s| s.capacity)
            .and_then(|c| c.get("storage").and_then(quantity::bytes))
            .unwrap_or(requested))
    }

    /// CreateVolume. Spec rules honoured: name and capabilities are required
    /// (INVALID_ARGUMENT); the same name with the same parameters returns the same volume,
    /// with different size, source or mode ALREADY_EXISTS; a capacity range that cannot be
    /// met is OUT_OF_RANGE; a missing content source is NOT_FOUND; the returned capacity is
    /// what the infra cluster provisioned; the content source is echoed back.
    #[instrument(skip_all, fields(name = %req.name))]
    pub async fn create_volume(
        &self,
        req: csi::CreateVolumeRequest,
    ) -> Result<csi::CreateVolumeResponse, ControllerError> {
        csi_name(&req.name, "name")?;
        bounded_map(&req.parameters, "parameters")?;
        bounded_map(&req.mutable_parameters, "mutable_parameters")?;
        let shape: Shape = capability::shape(&req.volume_capabilities)?;
        let params = StorageClassParams::parse(&req.parameters)
            .map_err(|e| ControllerError::InvalidArgument(e.to_string()))?;
        let bus = params.bus.unwrap_or(self.settings.default_bus);
        self.settings
            .config
            .storage_class_enforcement
            .check(params.infra_storage_class.as_deref())
            .map_err(ControllerError::InvalidArgument)?;
        let size = size_for(req.capacity_range.as_ref(), self.settings.max_volume_bytes)?;
        let dv_name = names::infra_name(&self.settings.volume_prefix, &req.name);
        let _guard = self.locks.try_lock(&dv_name)?;

        let source = self
            .content_source(req.volume_content_source.as_ref(), size)
            .await?;
        let want = Recorded {
            size: Some(size),
            source: Some(source.clone()),
            volume_mode: Some(shape.volume_mode().to_string()),
            access_modes: vec![shape.access_mode().to_string()],
            storage_class: params.infra_storage_class.clone(),
            bus: Some(bus.as_str().to_string()),
        };

        let dv = match self
            .infra
            .data_volume(&dv_name)
            .await
            .map_err(ControllerError::infra(format!(
                "looking up datavolume {dv_name}"
            )))? {
            Some(existing) => {
                if existing.annotations().get(ANN_CSI_NAME) != Some(&req.name) {
                    return Err(ControllerError::AlreadyExists(format!(
                        "infra datavolume {dv_name} belongs to another volume name"
                    )));
                }
                let have = recorded(&existing);
                if have != want {
                    return Err(ControllerError::AlreadyExists(format!(
                        "volume {:?} already exists with different parameters (have {have:?}, asked for {want:?})",
                        req.name
                    )));
                }
                existing
            }
            None => {
                self.refuse_foreign_name(&dv_name).await?;
                let dv = self.data_volume_object(&dv_name, &req.name, &want, bus);
                info!(datavolume = %dv_name, size, mode = shape.volume_mode(), "creating infra datavolume");
                match self.infra.create_data_volume(&dv).await {
                    Ok(dv) => dv,
                    // Lost a race: a retry of ourselves, or someone else's object. Only
                    // ours may be waited on.
                    Err(InfraError::Conflict { .. }) => {
                        self.refuse_foreign_name(&dv_name).await?;
                        dv
                    }
                    Err(e) => {
                        return Err(ControllerError::infra(format!(
                            "creating datavolume {dv_name}"
                        ))(e));
                    }
                }
            }
        };
        let dv = self
            .wait_provisioned(&dv_name)
            .await
            .map(|d| d.unwrap_or(dv))?;
        let capacity = self
            .capacity_of(&dv)
            .await
            .map_err(ControllerError::infra(format!(
                "reading the claim of datavolume {dv_name}"
            )))?;
        Ok(csi::CreateVolumeResponse {
            volume: Some(csi::Volume {
                capacity_bytes: capacity as i64,
                volume_id: dv_name,
                volume_context: VolumeContext { bus: Some(bus) }.to_map(),
                content_source: req.volume_content_source,
                accessible_topology: vec![],
            }),
        })
    }

    /// ALREADY_EXISTS when a DataVolume or claim that is not ours holds the name: CDI would
    /// adopt (or trip over) a claim already there, and we would then serve a foreign claim as
    /// this tenant's volume.
    async fn refuse_foreign_name(&self, dv_name: &str) -> Result<(), ControllerError> {
        let taken =
            self.infra
                .name_taken_by_foreign(dv_name)
                .await
                .map_err(ControllerError::infra(format!(
                    "looking up infra objects named {dv_name}"
                )))?;
        match taken {
            Some(kind) => Err(ControllerError::AlreadyExists(format!(
                "an infra {kind} named {dv_name} exists in {} but was not created by this driver for this tenant; remove it or use another volume name",
                self.infra.namespace()
            ))),
            None => Ok(()),
        }
    }

    fn data_volume_object(
        &self,
        dv_name: &str,
        csi_name: &str,
        want: &Recorded,
        bus: Bus,
    ) -> DataVolume {
        let mut meta = ObjectMeta {
            name: Some(dv_name.to_string()),
            annotations: Some(BTreeMap::from([
                (ANN_CSI_NAME.to_string(), csi_name.to_string()),
                (ANN_BUS.to_string(), bus.as_str().to_string()),
                (ANN_CDI_KEEP.to_string(), "false".to_string()),
            ])),
            ..Default::default()
        };
        self.infra.label(&mut meta);
        let mut dv = DataVolume::new(
            dv_name,
            &crate::infra::types::data_volume_resource(),
            DataVolumeSpec {
                source: want.source.clone(),
                storage: Some(StorageSpec {
                    access_modes: want.access_modes.clone(),
                    volume_mode: want.volume_mode.clone(),
                    resources: Resources {
                        requests: BTreeMap::from([(
                            "storage".to_string(),
                            quantity::from_bytes(want.size.unwrap_or(DEFAULT_SIZE)),
                        )]),
                    },
                    storage_class_name: want.storage_class.clone(),
                }),
            },
        );
        dv.metadata = meta;
        dv
    }

    /// The DataVolume source for a request: blank, a clone of one of our volumes, or a
    /// restore from one of our snapshots (each checked for this tenant).
    async fn content_source(
        &self,
        src: Option<&csi::VolumeContentSource>,
        size: u64,
    ) -> Result<DataVolumeSource, ControllerError> {
        let ns = self.infra.namespace().to_string();
        match src.and_then(|s| s.r#type.as_ref()) {
            None => Ok(DataVolumeSource {
                blank: Some(Empty {}),
                ..Default::default()
            }),
            Some(SourceType::Volume(VolumeSource { volume_id })) => {
                required(volume_id, "volume_content_source.volume.volume_id")?;
                // A source that is not ours is NOT_FOUND; one whose claim is not CDI's for
                // it is FAILED_PRECONDITION (capacity_of fails), before CDI copies a byte.
                let src = self
                    .infra
                    .data_volume(volume_id)
                    .await
                    .map_err(ControllerError::infra(format!(
                        "looking up source volume {volume_id}"
                    )))?
                    .ok_or_else(|| {
                        ControllerError::NotFound(format!(
                            "source volume {volume_id} does not exist"
                        ))
                    })?;
                let src_size = self
                    .capacity_of(&src)
                    .await
                    .map_err(ControllerError::infra(format!(
                        "reading source volume {volume_id}"
                    )))?;
                if src_size > size {
                    return Err(ControllerError::OutOfRange(format!(
                        "requested size {size} is smaller than source volume {volume_id} ({src_size} bytes)"
                    )));
                }
                Ok(DataVolumeSource {
                    pvc: Some(NamespacedName {
                        namespace: ns,
                        name: volume_id.clone(),
                    }),
                    ..Default::default()
                })
            }
            Some(SourceType::Snapshot(SnapshotSource { snapshot_id })) => {
                required(snapshot_id, "volume_content_source.snapshot.snapshot_id")?;
                let snap = self
                    .infra
                    .snapshot(snapshot_id)
                    .await
                    .map_err(ControllerError::infra(format!(
                        "looking up source snapshot {snapshot_id}"
                    )))?
                    .ok_or_else(|| {
                        ControllerError::NotFound(format!(
                            "source snapshot {snapshot_id} does not exist"
                        ))
                    })?;
                let restore = snap
                    .status
                    .as_ref()
                    .and_then(|s| s.restore_size.as_ref())
                    .and_then(quantity::bytes)
                    .unwrap_or(0);
                if restore > size {
                    return Err(ControllerError::OutOfRange(format!(
                        "requested size {size} is smaller than snapshot {snapshot_id} ({restore} bytes)"
                    )));
                }
                Ok(DataVolumeSource {
                    snapshot: Some(NamespacedName {
                        namespace: ns,
                        name: snapshot_id.clone(),
                    }),
                    ..Default::default()
                })
            }
        }
    }

    /// Waits on a watch until CDI reports the DataVolume Succeeded. An object under the name
    /// that is not ours ends the wait: it is never treated as our volume.
    async fn wait_provisioned(&self, name: &str) -> Result<Option<DataVolume>, ControllerError> {
        let what = format!("datavolume {name} to be provisioned");
        let tenant = self.infra.tenant().clone();
        wait_for(
            self.infra.dvs.clone(),
            name,
            &what,
            self.settings.timeouts.create,
            |dv: Option<&DataVolume>| match dv
                .and_then(|d| d.status.as_ref())
                .and_then(|s| s.phase.as_deref())
            {
                _ if dv.is_none() => Progress::Failed(format!(
                    "datavolume {name} was deleted while it was being provisioned"
                )),
                _ if !dv.is_some_and(|d| tenant.owns_created(d)) => Progress::Failed(format!(
                    "datavolume {name} was replaced by one this driver did not create"
                )),
                Some("Succeeded") => Progress::Done,
                Some("Failed") => Progress::Failed(format!("CDI reports datavolume {name} failed")),
                _ => Progress::Pending,
            },
        )
        .await
        .map_err(|e| wait_error(e, format!("provisioning datavolume {name}")))
    }

    /// DeleteVolume. Spec rules honoured: volume_id is required; deleting a volume that does
    /// not exist (or is not this tenant's) succeeds; a volume still hotplugged to a VM is
    /// FAILED_PRECONDITION rather than being pulled from under a running guest.
    #[instrument(skip_all, fields(volume_id = %req.volume_id))]
    pub async fn delete_volume(
        &self,
        req: csi::DeleteVolumeRequest,
    ) -> Result<csi::DeleteVolumeResponse, ControllerError> {
        let id = required(&req.volume_id, "volume_id")?;
        let _guard = self.locks.try_lock(id)?;
        let Some(dv) = self
            .infra
            .data_volume(id)
            .await
            .map_err(ControllerError::infra(format!("looking up volume {id}")))?
        else {
            return Ok(csi::DeleteVolumeResponse {});
        };
        if let Some(vm) = self.hotplugged_to(id).await? {
            return Err(ControllerError::FailedPrecondition(format!(
                "volume {id} is still attached to vm {}/{vm}; unpublish it first",
                self.infra.namespace()
            )));
        }
        info!(datavolume = %id, "deleting infra datavolume");
        self.infra
            .delete_data_volume(&dv)
            .await
            .map_err(ControllerError::infra(format!("deleting volume {id}")))?;
        let what = format!("datavolume {id} to be deleted");
        wait_for(
            self.infra.dvs.clone(),
            id,
            &what,
            self.settings.timeouts.delete,
            |dv: Option<&DataVolume>| {
                if dv.is_none() {
                    Progress::Done
                } else {
                    Progress::Pending
                }
            },
        )
        .await
        .map_err(|e| wait_error(e, format!("deleting volume {id}")))?;
        Ok(csi::DeleteVolumeResponse {})
    }

    /// The VM (or VMI) that still has the volume in its spec or status, if any.
    async fn hotplugged_to(&self, id: &str) -> Result<Option<String>, ControllerError> {
        let ctx = || ControllerError::infra(format!("checking whether volume {id} is in use"));
        for vm in self.infra.vms_list().await.map_err(ctx())? {
            let spec = vm.spec.template.as_ref().and_then(|t| t.spec.as_ref());
            if spec.is_some_and(|s| s.volumes.iter().any(|v| v.source_name() == Some(id))) {
                return Ok(Some(vm.name_any()));
            }
        }
        for vmi in self.infra.vmis_list().await.map_err(ctx())? {
            let in_spec = vmi.spec.volumes.iter().any(|v| v.source_name() == Some(id));
            let in_status = vmi
                .status
                .as_ref()
                .is_some_and(|s| s.volume_status.iter().any(|v| v.name == id));
            if in_spec || in_status {
                return Ok(Some(vmi.name_any()));
            }
        }
        Ok(None)
    }

    /// ValidateVolumeCapabilities. Spec rules honoured: volume_id and capabilities are
    /// required; an unknown volume is NOT_FOUND; `confirmed` is set only when every
    /// capability can be served by this volume (block or mount matching its mode), and the
    /// message says why not otherwise.
    #[instrument(skip_all, fields(volume_id = %req.volume_id))]
    pub async fn validate_volume_capabilities(
        &self,
        req: csi::ValidateVolumeCapabilitiesRequest,
    ) -> Result<csi::ValidateVolumeCapabilitiesResponse, ControllerError> {
        let id = required(&req.volume_id, "volume_id")?;
        if req.volume_capabilities.is_empty() {
            return Err(ControllerError::InvalidArgument(
                "volume_capabilities is required".into(),
            ));
        }
        if let Some(why) = req
            .volume_capabilities
            .iter()
            .find_map(capability::malformed)
        {
            return Err(ControllerError::InvalidArgument(why));
        }
        let dv = self.existing_volume(id).await?;
        let block = is_block(&dv);
        let mut problems = Vec::new();
        for cap in &req.volume_capabilities {
            if let Some(why) = capability::unsupported(cap) {
                problems.push(why);
                continue;
            }
            let wants_block = matches!(
                cap.access_type,
                Some(csi::volume_capability::AccessType::Block(_))
            );
            if wants_block != block {
                problems.push(format!(
                    "volume {id} is a {} volume and cannot be used for {} access",
                    if block { "block" } else { "filesystem" },
                    if wants_block { "block" } else { "mount" }
                ));
            }
        }
        if !problems.is_empty() {
            return Ok(csi::ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message: problems.join("; "),
            });
        }
        Ok(csi::ValidateVolumeCapabilitiesResponse {
            confirmed: Some(csi::validate_volume_capabilities_response::Confirmed {
                volume_context: req.volume_context,
                volume_capabilities: req.volume_capabilities,
                parameters: req.parameters,
                mutable_parameters: req.mutable_parameters,
            }),
            message: String::new(),
        })
    }

    /// ListVolumes. Spec rules honoured: pagination with max_entries and an opaque token
    /// (a token we did not issue is ABORTED); published node ids are reported.
    #[instrument(skip_all)]
    pub async fn list_volumes(
        &self,
        req: csi::ListVolumesRequest,
    ) -> Result<csi::ListVolumesResponse, ControllerError> {
        let dvs = self
            .infra
            .data_volumes()
            .await
            .map_err(ControllerError::infra("listing volumes"))?;
        // A volume being deleted is gone as far as CSI is concerned.
        let items: Vec<(String, DataVolume)> = dvs
            .into_iter()
            .filter(|d| d.metadata.deletion_timestamp.is_none())
            .map(|d| (d.name_any(), d))
            .collect();
        let (page, next_token) = listing::page(items, &req.starting_token, req.max_entries)?;
        let mut entries = Vec::with_capacity(page.len());
        for dv in page {
            let (volume, status) = self.describe(&dv).await?;
            entries.push(csi::list_volumes_response::Entry {
                volume: Some(volume),
                status: Some(csi::list_volumes_response::VolumeStatus {
                    published_node_ids: status.published_node_ids,
                    volume_condition: status.volume_condition,
                }),
            });
        }
        Ok(csi::ListVolumesResponse {
            entries,
            next_token,
        })
    }

    /// ControllerGetVolume. Spec rules honoured: volume_id is required; an unknown volume is
    /// NOT_FOUND; published nodes and a volume condition (abnormal when the infra claim is
    /// lost or a hotplug failed) are reported.
    #[instrument(skip_all, fields(volume_id = %req.volume_id))]
    pub async fn controller_get_volume(
        &self,
        req: csi::ControllerGetVolumeRequest,
    ) -> Result<csi::ControllerGetVolumeResponse, ControllerError> {
        let id = required(&req.volume_id, "volume_id")?;
        let dv = self.existing_volume(id).await?;
        let (volume, status) = self.describe(&dv).await?;
        Ok(csi::ControllerGetVolumeResponse {
            volume: Some(volume),
            status: Some(status),
        })
    }

    /// A volume and its status as CSI reports them.
    async fn describe(
        &self,
        dv: &DataVolume,
    ) -> Result<
        (
            csi::Volume,
            csi::controller_get_volume_response::VolumeStatus,
        ),
        ControllerError,
    > {
        let id = dv.name_any();
        let ctx = || ControllerError::infra(format!("reading volume {id}"));
        let mut problems = Vec::new();
        let claim = match self.infra.claim_of(dv).await {
            Ok(c) => c,
            // Reported on this volume, not failing the whole listing.
            Err(e @ InfraError::NotOurs { .. }) => {
                problems.push(e.to_string());
                None
            }
            Err(e) => return Err(ctx()(e)),
        };
        let capacity = claim
            .as_ref()
            .and_then(|c| c.status.as_ref())
            .and_then(|s| s.capacity.as_ref())
            .and_then(|c| c.get("storage").and_then(quantity::bytes))
            .or(recorded(dv).size)
            .unwrap_or(0);
        let dv_phase = dv.status.as_ref().and_then(|s| s.phase.as_deref());
        if dv_phase == Some("Failed") {
            problems.push(format!("CDI reports datavolume {id} failed"));
        }
        match claim
            .as_ref()
            .and_then(|c| c.status.as_ref())
            .and_then(|s| s.phase.as_deref())
        {
            Some("Lost") => problems.push(format!("infra claim {id} lost its persistent volume")),
            None if dv_phase == Some("Succeeded") && problems.is_empty() => {
                problems.push(format!("infra claim {id} is missing"))
            }
            _ => {}
        }
        let mut published = Vec::new();
        for vm in attached_to(dv) {
            let vmi = self.infra.vmi(&vm).await.map_err(ctx())?;
            let entry = vmi
                .as_ref()
                .and_then(|v| v.status.as_ref())
                .and_then(|s| s.volume_status.iter().find(|e| e.name == id).cloned());
            let in_vm_spec = self.infra.vm(&vm).await.map_err(ctx())?.is_some_and(|v| {
                v.spec
                    .template
                    .and_then(|t| t.spec)
                    .is_some_and(|s| s.volumes.iter().any(|v| v.name == id))
            });
            if entry.is_some() || in_vm_spec {
                published.push(format!("{}/{vm}", self.infra.namespace()));
            }
            if let Some(e) = entry
                && e.reason.as_deref().is_some_and(|r| r.contains("Fail"))
            {
                problems.push(format!(
                    "hotplug to {}/{vm} failed: {}",
                    self.infra.namespace(),
                    e.message.unwrap_or_default()
                ));
            }
        }
        let condition = csi::VolumeCondition {
            abnormal: !problems.is_empty(),
            message: if problems.is_empty() {
                "volume is healthy".into()
            } else {
                problems.join("; ")
            },
        };
        let volume = csi::Volume {
            capacity_bytes: capacity as i64,
            volume_id: id.clone(),
            volume_context: VolumeContext {
                bus: Some(bus_of(dv, self.settings.default_bus)),
            }
            .to_map(),
            content_source: None,
            accessible_topology: vec![],
        };
        Ok((
            volume,
            csi::controller_get_volume_response::VolumeStatus {
                published_node_ids: published,
                volume_condition: Some(condition),
            },
        ))
    }
}

/// Maps a failed wait to the RPC error, with what we were doing.
pub fn wait_error(e: WaitError, context: String) -> ControllerError {
    match e {
        WaitError::Infra(source) => ControllerError::Infra { context, source },
        WaitError::Failed(why) => ControllerError::FailedPrecondition(format!("{context}: {why}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(required: i64, limit: i64) -> csi::CapacityRange {
        csi::CapacityRange {
            required_bytes: required,
            limit_bytes: limit,
        }
    }

    #[test]
    fn sizes_round_to_mib_within_limits() {
        assert_eq!(size_for(None, MAX_SIZE).unwrap(), GIB);
        assert_eq!(size_for(Some(&range(1, 0)), MAX_SIZE).unwrap(), MIB);
        assert_eq!(
            size_for(Some(&range(10 * MIB as i64, 0)), MAX_SIZE).unwrap(),
            10 * MIB
        );
        assert_eq!(
            size_for(Some(&range(0, 100 * MIB as i64)), MAX_SIZE).unwrap(),
            100 * MIB
        );
        assert_eq!(
            size_for(Some(&range(MIB as i64 + 1, 2 * MIB as i64)), MAX_SIZE).unwrap(),
            2 * MIB
        );
        assert_eq!(
            size_for(Some(&range(MIB as i64 + 1, MIB as i64 + 100)), MAX_SIZE)
                .unwrap_err()
                .code(),
            tonic::Code::OutOfRange
        );
        assert_eq!(
            size_for(Some(&range(10, 5)), MAX_SIZE).unwrap_err().code(),
            tonic::Code::OutOfRange
        );
        assert_eq!(
            size_for(Some(&range(-1, 0)), MAX_SIZE).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        for huge in [i64::MAX, i64::MAX - 1, MAX_SIZE as i64 + 1] {
            assert_eq!(
                size_for(Some(&range(huge, 0)), MAX_SIZE)
                    .unwrap_err()
                    .code(),
                tonic::Code::OutOfRange,
                "{huge}"
            );
        }
        assert_eq!(
            size_for(Some(&range(MAX_SIZE as i64, 0)), MAX_SIZE).unwrap(),
            MAX_SIZE
        );
    }
}
