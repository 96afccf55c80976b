//! The Controller service: tonic glue from each RPC to the [`Driver`] method that does it,
//! mapping [`crate::error::ControllerError`] to a gRPC status in one place.

use csi::controller_service_capability::{Rpc, rpc::Type as RpcType};
use csi_proto::v1 as csi;
use tonic::{Request, Response, Status};

use crate::driver::Driver;

/// Serves the CSI Controller service from a [`Driver`].
#[derive(Clone)]
pub struct ControllerService {
    driver: Driver,
}

impl ControllerService {
    pub fn new(driver: Driver) -> Self {
        Self { driver }
    }
}

fn reply<T>(r: Result<T, crate::error::ControllerError>) -> Result<Response<T>, Status> {
    match r {
        Ok(v) => Ok(Response::new(v)),
        Err(e) => {
            let status = Status::from(e);
            tracing::warn!(code = ?status.code(), message = %status.message(), "rpc failed");
            Err(status)
        }
    }
}

/// Capabilities we advertise. GetCapacity is not among them: the infra cluster cannot
/// answer how much a StorageClass can still provision, and a made-up number would mislead
/// the scheduler.
const CAPABILITIES: &[RpcType] = &[
    RpcType::CreateDeleteVolume,
    RpcType::PublishUnpublishVolume,
    RpcType::ListVolumes,
    RpcType::ListVolumesPublishedNodes,
    RpcType::GetVolume,
    RpcType::VolumeCondition,
    RpcType::ExpandVolume,
    RpcType::CreateDeleteSnapshot,
    RpcType::ListSnapshots,
    RpcType::CloneVolume,
    RpcType::PublishReadonly,
];

#[tonic::async_trait]
impl csi::controller_server::Controller for ControllerService {
    async fn create_volume(
        &self,
        r: Request<csi::CreateVolumeRequest>,
    ) -> Result<Response<csi::CreateVolumeResponse>, Status> {
        reply(self.driver.create_volume(r.into_inner()).await)
    }
    async fn delete_volume(
        &self,
        r: Request<csi::DeleteVolumeRequest>,
    ) -> Result<Response<csi::DeleteVolumeResponse>, Status> {
        reply(self.driver.delete_volume(r.into_inner()).await)
    }
    async fn controller_publish_volume(
        &self,
        r: Request<csi::ControllerPublishVolumeRequest>,
    ) -> Result<Response<csi::ControllerPublishVolumeResponse>, Status> {
        reply(self.driver.controller_publish_volume(r.into_inner()).await)
    }
    async fn controller_unpublish_volume(
        &self,
        r: Request<csi::ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<csi::ControllerUnpublishVolumeResponse>, Status> {
        reply(
            self.driver
                .controller_unpublish_volume(r.into_inner())
                .await,
        )
    }
    async fn validate_volume_capabilities(
        &self,
        r: Request<csi::ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<csi::ValidateVolumeCapabilitiesResponse>, Status> {
        reply(
            self.driver
                .validate_volume_capabilities(r.into_inner())
                .await,
        )
    }
    async fn list_volumes(
        &self,
        r: Request<csi::ListVolumesRequest>,
    ) -> Result<Response<csi::ListVolumesResponse>, Status> {
        reply(self.driver.list_volumes(r.into_inner()).await)
    }
    async fn controller_get_volume(
        &self,
        r: Request<csi::ControllerGetVolumeRequest>,
    ) -> Result<Response<csi::ControllerGetVolumeResponse>, Status> {
        reply(self.driver.controller_get_volume(r.into_inner()).await)
    }
    async fn controller_expand_volume(
        &self,
        r: Request<csi::ControllerExpandVolumeRequest>,
    ) -> Result<Response<csi::ControllerExpandVolumeResponse>, Status> {
        reply(self.driver.controller_expand_volume(r.into_inner()).await)
    }
    async fn create_snapshot(
        &self,
        r: Request<csi::CreateSnapshotRequest>,
    ) -> Result<Response<csi::CreateSnapshotResponse>, Status> {
        reply(self.driver.create_snapshot(r.into_inner()).await)
    }
    async fn delete_snapshot(
        &self,
        r: Request<csi::DeleteSnapshotRequest>,
    ) -> Result<Response<csi::DeleteSnapshotResponse>, Status> {
        reply(self.driver.delete_snapshot(r.into_inner()).await)
    }
    async fn list_snapshots(
        &self,
        r: Request<csi::ListSnapshotsRequest>,
    ) -> Result<Response<csi::ListSnapshotsResponse>, Status> {
        reply(self.driver.list_snapshots(r.into_inner()).await)
    }

    /// ControllerGetCapabilities: the RPCs above, nothing we do not serve.
    async fn controller_get_capabilities(
        &self,
        _: Request<csi::ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<csi::ControllerGetCapabilitiesResponse>, Status> {
        Ok(Response::new(csi::ControllerGetCapabilitiesResponse {
            capabilities: CAPABILITIES
                .iter()
                .map(|t| csi::ControllerServiceCapability {
                    r#type: Some(csi::controller_service_capability::Type::Rpc(Rpc {
                        r#type: *t as i32,
                    })),
                })
                .collect(),
        }))
    }
}
