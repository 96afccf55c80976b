//! Where an attach lands: nowhere but the API (status only), or a real QEMU over QMP.
//!
//! The backend is chosen per VMI: a VMI annotated with [`QMP_SOCKET_ANNOTATION`] is attached
//! through QMP on that socket; every other VMI uses the API-only backend.

pub mod api_only;
#[cfg(feature = "qemu")]
pub mod qemu;

use futures::future::BoxFuture;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use thiserror::Error;

/// The VMI annotation naming the QMP socket of the QEMU that backs it.
pub const QMP_SOCKET_ANNOTATION: &str = "standin.kubevirt-csi.io/qmp-socket";

/// The bus a hotplugged disk sits on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bus {
    Scsi,
    Virtio,
    Sata,
}

impl Bus {
    /// Parses a KubeVirt bus name; `None` for a bus hotplug does not support.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "scsi" => Some(Self::Scsi),
            "virtio" => Some(Self::Virtio),
            "sata" => Some(Self::Sata),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Scsi => "scsi",
            Self::Virtio => "virtio",
            Self::Sata => "sata",
        }
    }

    /// The guest device name prefix KubeVirt reports as `target`.
    pub fn target_prefix(self) -> &'static str {
        match self {
            Self::Virtio => "vd",
            Self::Scsi | Self::Sata => "sd",
        }
    }
}

/// One disk to attach or detach.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttachRequest {
    pub namespace: String,
    pub vmi: String,
    pub volume: String,
    pub serial: Option<String>,
    pub bus: Bus,
    /// The PV's backing file.
    pub path: PathBuf,
    pub read_only: bool,
    /// The VMI's annotations, for backends configured per VMI.
    pub vmi_annotations: BTreeMap<String, String>,
}

#[derive(Debug, Error)]
pub enum BackendError {
    /// The VMI asks for a backend this build does not have.
    #[error(
        "vmi {vmi} asks for qmp socket {socket} but this stand-in was built without the qemu backend"
    )]
    #[cfg_attr(feature = "qemu", allow(dead_code))]
    QemuUnavailable { vmi: String, socket: String },
    /// A QMP step failed.
    #[error("qmp {step} for volume {volume} on {socket} failed: {message}")]
    Qmp {
        step: &'static str,
        volume: String,
        socket: String,
        message: String,
    },
    /// No free slot for a virtio disk.
    #[error("no free pcie root port for volume {0}")]
    NoFreeSlot(String),
}

/// Attaches and detaches disks; `attach` returns only once the disk is really there.
pub trait AttachBackend: Send + Sync {
    fn name(&self) -> &'static str;
    fn attach<'a>(&'a self, req: &'a AttachRequest) -> BoxFuture<'a, Result<(), BackendError>>;
    fn detach<'a>(&'a self, req: &'a AttachRequest) -> BoxFuture<'a, Result<(), BackendError>>;
}

/// The backends and the per-VMI choice between them.
#[derive(Clone)]
pub struct Backends {
    api_only: Arc<api_only::ApiOnly>,
    #[cfg(feature = "qemu")]
    qemu: Arc<qemu::Qemu>,
}

impl Default for Backends {
    fn default() -> Self {
        Self {
            api_only: Arc::new(api_only::ApiOnly),
            #[cfg(feature = "qemu")]
            qemu: Arc::new(qemu::Qemu::default()),
        }
    }
}

impl Backends {
    /// A volume's backing file grew: tell the hypervisors that have it attached.
    pub async fn resized(&self, path: &std::path::Path, size: u64) {
        #[cfg(feature = "qemu")]
        self.qemu.resized(path, size).await;
        #[cfg(not(feature = "qemu"))]
        let _ = (path, size);
    }

    /// The backend for a VMI with these annotations.
    pub fn for_vmi(&self, annotations: &BTreeMap<String, String>) -> Arc<dyn AttachBackend> {
        match annotations.get(QMP_SOCKET_ANNOTATION) {
            None => self.api_only.clone(),
            #[cfg(feature = "qemu")]
            Some(_) => self.qemu.clone(),
            #[cfg(not(feature = "qemu"))]
            Some(socket) => Arc::new(api_only::Unavailable(socket.clone())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chooses_by_annotation() {
        let b = Backends::default();
        assert_eq!(b.for_vmi(&BTreeMap::new()).name(), "api-only");
        let ann = BTreeMap::from([(QMP_SOCKET_ANNOTATION.to_string(), "/tmp/q.sock".to_string())]);
        assert_ne!(b.for_vmi(&ann).name(), "api-only");
    }

    #[test]
    fn bus_names() {
        assert_eq!(Bus::parse("scsi"), Some(Bus::Scsi));
        assert_eq!(Bus::parse("virtio").map(Bus::target_prefix), Some("vd"));
        assert_eq!(Bus::parse("ide"), None);
    }
}
