//! The Identity service: who we are, what we offer, and whether we can work right now.

use std::time::Duration;

use csi::plugin_capability::{Service, Type, VolumeExpansion, service, volume_expansion};
use csi_proto::v1 as csi;
use tonic::{Request, Response, Status};

/// The CSI driver name registered in the guest cluster.
pub const DRIVER_NAME: &str = "csi.kubevirt.io";

#[derive(Clone)]
pub struct Identity {
    /// Probe asks the infra apiserver for its version; an answer within this time is ready.
    client: kube::Client,
    probe_timeout: Duration,
}

impl Identity {
    pub fn new(client: kube::Client) -> Self {
        Self {
            client,
            probe_timeout: Duration::from_secs(3),
        }
    }
}

#[tonic::async_trait]
impl csi::identity_server::Identity for Identity {
    /// GetPluginInfo: name and vendor version are required and stable.
    async fn get_plugin_info(
        &self,
        _: Request<csi::GetPluginInfoRequest>,
    ) -> Result<Response<csi::GetPluginInfoResponse>, Status> {
        Ok(Response::new(csi::GetPluginInfoResponse {
            name: DRIVER_NAME.into(),
            vendor_version: env!("CARGO_PKG_VERSION").into(),
            manifest: Default::default(),
        }))
    }

    /// GetPluginCapabilities: the controller service and online plus offline expansion.
    /// No topology: every worker VM of the tenant can reach every infra volume.
    async fn get_plugin_capabilities(
        &self,
        _: Request<csi::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<csi::GetPluginCapabilitiesResponse>, Status> {
        let cap = |t| csi::PluginCapability { r#type: Some(t) };
        Ok(Response::new(csi::GetPluginCapabilitiesResponse {
            capabilities: vec![
                cap(Type::Service(Service {
                    r#type: service::Type::ControllerService as i32,
                })),
                cap(Type::VolumeExpansion(VolumeExpansion {
                    r#type: volume_expansion::Type::Online as i32,
                })),
                cap(Type::VolumeExpansion(VolumeExpansion {
                    r#type: volume_expansion::Type::Offline as i32,
                })),
            ],
        }))
    }

    /// Probe: ready=false (not an error) while the infra apiserver cannot be reached, so
    /// the liveness probe does not restart us for someone else's outage.
    async fn probe(
        &self,
        _: Request<csi::ProbeRequest>,
    ) -> Result<Response<csi::ProbeResponse>, Status> {
        let ready = matches!(
            tokio::time::timeout(self.probe_timeout, self.client.apiserver_version()).await,
            Ok(Ok(_))
        );
        if !ready {
            tracing::warn!("probe: the infra apiserver is not reachable");
        }
        Ok(Response::new(csi::ProbeResponse { ready: Some(ready) }))
    }
}
