//! What every controller and handler shares.

use crate::backend::Backends;
use crate::faults::FaultState;
use crate::files::DataDir;
use crate::update::{StatusWrites, status_writes_for};
use kube::Client;

/// Driver name used for PVs and snapshot contents the stand-in creates.
pub const DRIVER: &str = "standin.kubevirt-csi.io";
/// Field manager and finalizer prefix.
pub const MANAGER: &str = "kubevirt-standin";

/// Where status writes go, per kind (read from the installed CRDs at start-up).
#[derive(Clone, Copy, Debug)]
pub struct StatusModes {
    pub vm: StatusWrites,
    pub vmi: StatusWrites,
    pub dv: StatusWrites,
    pub vs: StatusWrites,
    pub vsc: StatusWrites,
}

impl StatusModes {
    pub async fn detect(client: &Client) -> Result<Self, kube::Error> {
        Ok(Self {
            vm: status_writes_for(client, "virtualmachines.kubevirt.io", "v1").await?,
            vmi: status_writes_for(client, "virtualmachineinstances.kubevirt.io", "v1").await?,
            dv: status_writes_for(client, "datavolumes.cdi.kubevirt.io", "v1beta1").await?,
            vs: status_writes_for(client, "volumesnapshots.snapshot.storage.k8s.io", "v1").await?,
            vsc: status_writes_for(
                client,
                "volumesnapshotcontents.snapshot.storage.k8s.io",
                "v1",
            )
            .await?,
        })
    }
}

pub struct Ctx {
    pub client: Client,
    pub data: DataDir,
    pub faults: FaultState,
    pub backends: Backends,
    pub status: StatusModes,
}
