//! ControllerExpandVolume: grow the infra claim and wait for the new capacity.

use csi_proto::v1 as csi;
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use tracing::{info, instrument};

use crate::driver::{Driver, required};
use crate::error::ControllerError;
use crate::infra::wait::{Progress, wait_for};
use crate::quantity;
use crate::volumes::{is_block, size_for, wait_error};

fn claim_capacity(pvc: &PersistentVolumeClaim) -> Option<u64> {
    pvc.status
        .as_ref()?
        .capacity
        .as_ref()?
        .get("storage")
        .and_then(quantity::bytes)
}

impl Driver {
    /// ControllerExpandVolume. Spec rules honoured: volume_id and capacity_range are
    /// required; an unknown volume is NOT_FOUND; a volume already at least that large
    /// succeeds at once; a limit below the current size is OUT_OF_RANGE; filesystem volumes
    /// report node_expansion_required so the node plugin grows the filesystem.
    #[instrument(skip_all, fields(volume_id = %req.volume_id))]
    pub async fn controller_expand_volume(
        &self,
        req: csi::ControllerExpandVolumeRequest,
    ) -> Result<csi::ControllerExpandVolumeResponse, ControllerError> {
        let id = required(&req.volume_id, "volume_id")?;
        let range = req
            .capacity_range
            .as_ref()
            .ok_or_else(|| ControllerError::InvalidArgument("capacity_range is required".into()))?;
        let wanted = size_for(Some(range), self.settings.max_volume_bytes)?;
        let _guard = self.locks.try_lock(id)?;
        let dv = self.existing_volume(id).await?;
        let block = match req
            .volume_capability
            .as_ref()
            .and_then(|c| c.access_type.as_ref())
        {
            Some(csi::volume_capability::AccessType::Block(_)) => true,
            Some(csi::volume_capability::AccessType::Mount(_)) => false,
            None => is_block(&dv),
        };
        let current = self
            .capacity_of(&dv)
            .await
            .map_err(ControllerError::infra(format!("reading volume {id}")))?;
        if range.limit_bytes > 0 && current > range.limit_bytes as u64 {
            return Err(ControllerError::OutOfRange(format!(
                "volume {id} is already {current} bytes, above limit_bytes {}",
                range.limit_bytes
            )));
        }
        if current < wanted {
            let claim = self
                .infra
                .claim_of(&dv)
                .await
                .map_err(ControllerError::infra(format!("reading volume {id}")))?
                .ok_or_else(|| {
                    ControllerError::FailedPrecondition(format!(
                        "volume {id} has no infra claim yet, so it cannot be grown; retry once it is provisioned"
                    ))
                })?;
            info!(from = current, to = wanted, "growing infra claim");
            self.infra
                .request_claim_size(&claim, wanted)
                .await
                .map_err(ControllerError::infra(format!(
                    "growing the claim of volume {id}"
                )))?;
            let what = format!("claim {id} to reach {wanted} bytes");
            wait_for(
                self.infra.pvcs.clone(),
                id,
                &what,
                self.settings.timeouts.expand,
                |pvc: Option<&PersistentVolumeClaim>| match pvc {
                    None => {
                        Progress::Failed(format!("claim {id} disappeared while it was being grown"))
                    }
                    Some(p) if claim_capacity(p).is_some_and(|c| c >= wanted) => Progress::Done,
                    Some(_) => Progress::Pending,
                },
            )
            .await
            .map_err(|e| wait_error(e, format!("expanding volume {id}")))?;
        }
        Ok(csi::ControllerExpandVolumeResponse {
            capacity_bytes: current.max(wanted) as i64,
            node_expansion_required: !block,
        })
    }
}
