//! The CSI Identity service of the node plugin.

use csi_proto::v1::identity_server::Identity;
use csi_proto::v1::{
    GetPluginCapabilitiesRequest, GetPluginCapabilitiesResponse, GetPluginInfoRequest,
    GetPluginInfoResponse, ProbeRequest, ProbeResponse,
};
use tonic::{Request, Response, Status};

/// The driver name the CO registers; shared with the controller plugin.
pub const DRIVER_NAME: &str = "csi.kubevirt.io";

#[derive(Debug, Clone, Default)]
pub struct IdentityService;

#[tonic::async_trait]
impl Identity for IdentityService {
    /// GetPluginInfo: name and vendor_version are REQUIRED; the name is the same for the
    /// controller and node plugins so the CO pairs them.
    async fn get_plugin_info(
        &self,
        _: Request<GetPluginInfoRequest>,
    ) -> Result<Response<GetPluginInfoResponse>, Status> {
        Ok(Response::new(GetPluginInfoResponse {
            name: DRIVER_NAME.to_owned(),
            vendor_version: env!("CARGO_PKG_VERSION").to_owned(),
            manifest: Default::default(),
        }))
    }

    /// GetPluginCapabilities: the node plugin serves no Controller service and reports no
    /// topology, so it advertises nothing.
    async fn get_plugin_capabilities(
        &self,
        _: Request<GetPluginCapabilitiesRequest>,
    ) -> Result<Response<GetPluginCapabilitiesResponse>, Status> {
        Ok(Response::new(GetPluginCapabilitiesResponse {
            capabilities: Vec::new(),
        }))
    }

    /// Probe: everything the plugin needs (node id, sockets) is settled before the server
    /// starts, so a serving plugin is ready.
    async fn probe(&self, _: Request<ProbeRequest>) -> Result<Response<ProbeResponse>, Status> {
        Ok(Response::new(ProbeResponse { ready: Some(true) }))
    }
}
