//! Snapshots: CreateSnapshot, DeleteSnapshot, ListSnapshots through infra VolumeSnapshots
//! of the volume's claim, with the VolumeSnapshotClass chosen by the config's mapping.

use std::collections::BTreeMap;

use csi_proto::v1 as csi;
use kube::core::ObjectMeta;
use kube::{Resource, ResourceExt};
use tracing::{info, instrument};

use crate::driver::{ANN_CSI_NAME, Driver, bounded_map, csi_name, required};
use crate::error::{ControllerError, InfraError};
use crate::infra::types::{
    VolumeSnapshot, VolumeSnapshotSource, VolumeSnapshotSpec, volume_snapshot_resource,
};
use crate::infra::wait::{Progress, WaitError, wait_for};
use crate::listing;
use crate::names;
use crate::quantity;

fn source_of(vs: &VolumeSnapshot) -> String {
    vs.spec
        .source
        .persistent_volume_claim_name
        .clone()
        .unwrap_or_default()
}

fn to_csi(vs: &VolumeSnapshot) -> csi::Snapshot {
    let status = vs.status.clone().unwrap_or_default();
    csi::Snapshot {
        size_bytes: status
            .restore_size
            .as_ref()
            .and_then(quantity::bytes)
            .unwrap_or(0) as i64,
        snapshot_id: vs.name_any(),
        source_volume_id: source_of(vs),
        creation_time: status.creation_time.as_ref().map(|t| {
            let ts = t.0.as_second();
            prost_types::Timestamp {
                seconds: ts,
                nanos: 0,
            }
        }),
        ready_to_use: status.ready_to_use.unwrap_or(false),
        group_snapshot_id: String::new(),
    }
}

impl Driver {
    /// CreateSnapshot. Spec rules honoured: name and source_volume_id are required; an
    /// unknown source is NOT_FOUND; the same name for the same source returns the same
    /// snapshot, for another source ALREADY_EXISTS; the response carries the creation time
    /// and size, and ready_to_use once the infra snapshot is ready.
    #[instrument(skip_all, fields(name = %req.name, volume_id = %req.source_volume_id))]
    pub async fn create_snapshot(
        &self,
        req: csi::CreateSnapshotRequest,
    ) -> Result<csi::CreateSnapshotResponse, ControllerError> {
        csi_name(&req.name, "name")?;
        bounded_map(&req.parameters, "parameters")?;
        let volume = required(&req.source_volume_id, "source_volume_id")?;
        let name = names::infra_name(&self.settings.volume_prefix, &req.name);
        let _guard = self.locks.try_lock(&name)?;
        let existing = self
            .infra
            .snapshot(&name)
            .await
            .map_err(ControllerError::infra(format!(
                "looking up snapshot {name}"
            )))?;
        let vs = match existing {
            Some(vs) => {
                if source_of(&vs) != volume || vs.annotations().get(ANN_CSI_NAME) != Some(&req.name)
                {
                    return Err(ControllerError::AlreadyExists(format!(
                        "snapshot {:?} already exists for volume {}",
                        req.name,
                        source_of(&vs)
                    )));
                }
                vs
            }
            None => {
                let dv = self
                    .infra
                    .data_volume(volume)
                    .await
                    .map_err(ControllerError::infra(format!(
                        "looking up volume {volume}"
                    )))?
                    .ok_or_else(|| {
                        ControllerError::NotFound(format!("source volume {volume} does not exist"))
                    })?;
                // The snapshot source is the claim by name: it must be the one CDI made for
                // our DataVolume, never a foreign claim under that name.
                let claim = self
                    .infra
                    .claim_of(&dv)
                    .await
                    .map_err(ControllerError::infra(format!("reading volume {volume}")))?;
                let bound = claim
                    .as_ref()
                    .and_then(|c| c.status.as_ref())
                    .and_then(|s| s.phase.as_deref())
                    == Some("Bound");
                if !bound {
                    // Still provisioning (external-snapshotter would only wait on an unbound
                    // source): ABORTED now, and the snapshotter retries.
                    return Err(ControllerError::Aborted(format!(
                        "volume {volume} is not provisioned yet (its infra claim is not Bound); it can be snapshotted once it is"
                    )));
                }
                let storage_class = dv
                    .spec
                    .storage
                    .as_ref()
                    .and_then(|s| s.storage_class_name.as_deref());
                let class = self
                    .settings
                    .config
                    .snapshot_class_for(storage_class)
                    .map(str::to_string);
                let mut meta = ObjectMeta {
                    name: Some(name.clone()),
                    annotations: Some(BTreeMap::from([(
                        ANN_CSI_NAME.to_string(),
                        req.name.clone(),
                    )])),
                    ..Default::default()
                };
                self.infra.label(&mut meta);
                let mut vs = VolumeSnapshot::new(
                    &name,
                    &volume_snapshot_resource(),
                    VolumeSnapshotSpec {
                        source: VolumeSnapshotSource {
                            persistent_volume_claim_name: Some(volume.to_string()),
                        },
                        volume_snapshot_class_name: class,
                    },
                );
                vs.metadata = meta;
                info!(snapshot = %name, "creating infra volumesnapshot");
                match self.infra.create_snapshot(&vs).await {
                    Ok(vs) => vs,
                    // A retry of ourselves wins the race; anything else under the name is
                    // not ours to report as this snapshot.
                    Err(InfraError::Conflict { .. }) => self
                        .infra
                        .snapshot(&name)
                        .await
                        .map_err(ControllerError::infra(format!("looking up snapshot {name}")))?
                        .ok_or_else(|| {
                            ControllerError::AlreadyExists(format!(
                                "an infra VolumeSnapshot named {name} exists but was not created by this driver for this tenant"
                            ))
                        })?,
                    Err(e) => {
                        return Err(ControllerError::infra(format!("creating snapshot {name}"))(
                            e,
                        ));
                    }
                }
            }
        };
        let what = format!("snapshot {name} to be ready");
        let tenant = self.infra.tenant().clone();
        let mut last_error: Option<String> = None;
        let ready = wait_for(
            self.infra.snapshots.clone(),
            &name,
            &what,
            self.settings.timeouts.snapshot,
            |vs: Option<&VolumeSnapshot>| {
                let Some(vs) = vs.filter(|v| tenant.owns_created(*v)) else {
                    return Progress::Failed(format!(
                        "snapshot {name} was deleted (or replaced) while it was being taken"
                    ));
                };
                let status = vs.status.as_ref();
                // external-snapshotter reports errors it retries itself (e.g. a source claim
                // not bound yet) in status.error: keep waiting, and say it if time runs out.
                if let Some(msg) = status
                    .and_then(|s| s.error.as_ref())
                    .and_then(|e| e.message.clone())
                {
                    last_error = Some(msg);
                }
                if status.and_then(|s| s.ready_to_use) == Some(true) {
                    Progress::Done
                } else {
                    Progress::Pending
                }
            },
        )
        .await;
        let vs = match ready {
            Ok(Some(vs)) => vs,
            Ok(None) => vs,
            // Cut but not yet ready: CSI lets us report ready_to_use=false and be asked again.
            Err(WaitError::Infra(InfraError::Timeout { .. }))
                if vs
                    .status
                    .as_ref()
                    .and_then(|s| s.creation_time.as_ref())
                    .is_some() =>
            {
                vs
            }
            // The only state this wait gives up on: the snapshot was deleted (a concurrent
            // DeleteSnapshot) or replaced under us. Start over.
            Err(WaitError::Failed(why)) => {
                return Err(ControllerError::Aborted(format!(
                    "taking snapshot {name} of volume {volume}: {why}"
                )));
            }
            // Not cut within our bound: the spec's "operation pending for snapshot", which
            // the snapshotter retries; say what the infra snapshot reports meanwhile.
            Err(WaitError::Infra(InfraError::Timeout { waited, .. })) => {
                let reported = last_error
                    .map(|m| format!(" (the infra snapshot reports: {m})"))
                    .unwrap_or_default();
                return Err(ControllerError::Aborted(format!(
                    "snapshot {name} of volume {volume} is not cut after {waited:?}{reported}; still pending, retry"
                )));
            }
            Err(e) => {
                return Err(crate::volumes::wait_error(
                    e,
                    format!("taking snapshot {name} of volume {volume}"),
                ));
            }
        };
        Ok(csi::CreateSnapshotResponse {
            snapshot: Some(to_csi(&vs)),
        })
    }

    /// DeleteSnapshot. Spec rules honoured: snapshot_id is required; an unknown (or
    /// foreign) snapshot is already deleted, so the answer is OK.
    #[instrument(skip_all, fields(snapshot_id = %req.snapshot_id))]
    pub async fn delete_snapshot(
        &self,
        req: csi::DeleteSnapshotRequest,
    ) -> Result<csi::DeleteSnapshotResponse, ControllerError> {
        let id = required(&req.snapshot_id, "snapshot_id")?;
        let _guard = self.locks.try_lock(id)?;
        if let Some(vs) = self
            .infra
            .snapshot(id)
            .await
            .map_err(ControllerError::infra(format!("looking up snapshot {id}")))?
        {
            info!("deleting infra volumesnapshot");
            self.infra
                .delete_snapshot(&vs)
                .await
                .map_err(ControllerError::infra(format!("deleting snapshot {id}")))?;
        }
        Ok(csi::DeleteSnapshotResponse {})
    }

    /// ListSnapshots. Spec rules honoured: filtering by snapshot_id (an unknown id gives an
    /// empty list) and by source_volume_id; pagination with a token we issue (ABORTED for
    /// any other).
    #[instrument(skip_all)]
    pub async fn list_snapshots(
        &self,
        req: csi::ListSnapshotsRequest,
    ) -> Result<csi::ListSnapshotsResponse, ControllerError> {
        let all = if req.snapshot_id.is_empty() {
            self.infra
                .snapshots_list()
                .await
                .map_err(ControllerError::infra("listing snapshots"))?
        } else {
            self.infra
                .snapshot(&req.snapshot_id)
                .await
                .map_err(ControllerError::infra(format!(
                    "looking up snapshot {}",
                    req.snapshot_id
                )))?
                .into_iter()
                .collect()
        };
        let items: Vec<(String, VolumeSnapshot)> = all
            .into_iter()
            .filter(|vs| vs.meta().deletion_timestamp.is_none())
            .filter(|vs| req.source_volume_id.is_empty() || source_of(vs) == req.source_volume_id)
            .map(|vs| (vs.name_any(), vs))
            .collect();
        let (page, next_token) = listing::page(items, &req.starting_token, req.max_entries)?;
        Ok(csi::ListSnapshotsResponse {
            entries: page
                .iter()
                .map(|vs| csi::list_snapshots_response::Entry {
                    snapshot: Some(to_csi(vs)),
                })
                .collect(),
            next_token,
        })
    }
}
