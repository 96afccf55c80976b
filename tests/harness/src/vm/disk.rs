//! Disk hotplug over QMP, the way KubeVirt's hotplug lands in a worker VM: a block node from
//! `blockdev-add`, then a `scsi-hd` on the virtio-scsi controller or a `virtio-blk-pci` in an
//! empty PCIe root port, each with the serial the controller plugin chose.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Value, json};

use super::qmp::{Qmp, QmpError};

/// Id of the virtio-scsi controller every worker VM has.
pub const SCSI_CONTROLLER: &str = "scsi0";

/// Which bus a hotplugged disk sits on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskBus {
    /// `scsi-hd` on the virtio-scsi controller: the guest sees `sdX`, serial in VPD page 0x80.
    Scsi,
    /// `virtio-blk-pci` in a free PCIe root port: the guest sees `vdX`, serial (20 bytes at most)
    /// in `/sys/block/vdX/serial`.
    Virtio,
}

/// A disk to hotplug.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    /// QEMU device id, also the handle for [`super::WorkerVm::unplug_disk`]: a letter, then
    /// letters, digits, `-` or `_`, at most 24 characters.
    pub id: String,
    /// Backing regular file (raw) or block device on the host.
    pub file_path: PathBuf,
    /// Serial the guest sees.
    pub serial: String,
    /// Bus to plug it into.
    pub bus: DiskBus,
    /// Attach read-only.
    pub read_only: bool,
}

/// Why a hotplug or unplug was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The id cannot be a QEMU id (or node name, which is derived from it).
    #[error("invalid disk id {0:?}: want a letter then [A-Za-z0-9_-], at most 24 characters")]
    InvalidId(String),
    /// The serial is empty or has characters QEMU or the guest would mangle.
    #[error(
        "invalid disk serial {0:?}: want 1-36 printable ascii characters without spaces or commas"
    )]
    InvalidSerial(String),
    /// The backing file cannot be used.
    #[error("cannot use {path} as a disk")]
    Backing {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A disk with this id is already attached.
    #[error("disk {0} is already attached")]
    AlreadyAttached(String),
    /// No disk with this id is attached.
    #[error("disk {0} is not attached")]
    NotAttached(String),
    /// Every PCIe root port already holds a virtio disk.
    #[error("no free pcie root port for virtio disk {id} (the vm has {slots})")]
    NoFreeSlot { id: String, slots: usize },
    /// A QMP step failed.
    #[error("qmp {step} for disk {id} failed")]
    Qmp {
        step: &'static str,
        id: String,
        #[source]
        source: QmpError,
    },
}

#[derive(Debug)]
struct Attached {
    root_port: Option<String>,
}

/// Which disks are attached and which root ports they hold.
#[derive(Debug)]
pub(crate) struct DiskSlots {
    root_ports: Vec<String>,
    attached: HashMap<String, Attached>,
}

/// Id of the `n`th empty PCIe root port the VM is started with.
pub(crate) fn root_port_id(n: usize) -> String {
    format!("hp{n}")
}

/// QEMU's block-node name for a disk id (also used to resize a plugged disk).
pub(crate) fn node_name(id: &str) -> String {
    format!("blk-{id}")
}

fn validate(spec: &DiskSpec) -> Result<(), DiskError> {
    let id = &spec.id;
    let id_ok = id.len() <= 24
        && id.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if !id_ok {
        return Err(DiskError::InvalidId(id.clone()));
    }
    let serial = &spec.serial;
    let serial_ok = !serial.is_empty()
        && serial.len() <= 36
        && serial.chars().all(|c| c.is_ascii_graphic() && c != ',');
    if !serial_ok {
        return Err(DiskError::InvalidSerial(serial.clone()));
    }
    Ok(())
}

impl DiskSlots {
    pub(crate) fn new(root_ports: usize) -> Self {
        Self {
            root_ports: (0..root_ports).map(root_port_id).collect(),
            attached: HashMap::new(),
        }
    }

    fn free_root_port(&self) -> Option<String> {
        self.root_ports
            .iter()
            .find(|port| {
                !self
                    .attached
                    .values()
                    .any(|a| a.root_port.as_deref() == Some(port.as_str()))
            })
            .cloned()
    }

    /// Adds the block node and the device; on a failed `device_add` the node is removed again.
    pub(crate) async fn attach(&mut self, qmp: &Qmp, spec: &DiskSpec) -> Result<(), DiskError> {
        validate(spec)?;
        if self.attached.contains_key(&spec.id) {
            return Err(DiskError::AlreadyAttached(spec.id.clone()));
        }
        let meta = std::fs::metadata(&spec.file_path).map_err(|source| DiskError::Backing {
            path: spec.file_path.clone(),
            source,
        })?;
        let file_driver = if std::os::unix::fs::FileTypeExt::is_block_device(&meta.file_type()) {
            "host_device"
        } else {
            "file"
        };
        let root_port = match spec.bus {
            DiskBus::Scsi => None,
            DiskBus::Virtio => {
                Some(self.free_root_port().ok_or_else(|| DiskError::NoFreeSlot {
                    id: spec.id.clone(),
                    slots: self.root_ports.len(),
                })?)
            }
        };
        let node = node_name(&spec.id);
        let qmp_err = |step, source| DiskError::Qmp {
            step,
            id: spec.id.clone(),
            source,
        };

        qmp.execute(
            "blockdev-add",
            Some(json!({
                "driver": "raw",
                "node-name": node,
                "read-only": spec.read_only,
                "file": {
                    "driver": file_driver,
                    "filename": spec.file_path,
                    "read-only": spec.read_only,
                },
            })),
        )
        .await
        .map_err(|e| qmp_err("blockdev-add", e))?;

        let device = match &root_port {
            None => json!({
                "driver": "scsi-hd",
                "id": spec.id,
                "bus": format!("{SCSI_CONTROLLER}.0"),
                "drive": node,
                "serial": spec.serial,
            }),
            Some(port) => json!({
                "driver": "virtio-blk-pci",
                "id": spec.id,
                "bus": port,
                "drive": node,
                "serial": spec.serial,
            }),
        };
        if let Err(e) = qmp.execute("device_add", Some(device)).await {
            if let Err(cleanup) = qmp
                .execute("blockdev-del", Some(json!({ "node-name": node })))
                .await
            {
                tracing::warn!(error = %cleanup, %node, "could not remove the block node of a failed hotplug");
            }
            return Err(qmp_err("device_add", e));
        }
        self.attached
            .insert(spec.id.clone(), Attached { root_port });
        Ok(())
    }

    /// `device_del`, waits for the guest to let go (`DEVICE_DELETED`), then removes the node.
    pub(crate) async fn detach(
        &mut self,
        qmp: &Qmp,
        id: &str,
        timeout: Duration,
    ) -> Result<(), DiskError> {
        if !self.attached.contains_key(id) {
            return Err(DiskError::NotAttached(id.to_owned()));
        }
        let qmp_err = |step, source| DiskError::Qmp {
            step,
            id: id.to_owned(),
            source,
        };
        let mut events = qmp.subscribe();
        qmp.execute("device_del", Some(json!({ "id": id })))
            .await
            .map_err(|e| qmp_err("device_del", e))?;
        Qmp::wait_event(&mut events, "DEVICE_DELETED", id, timeout, |data| {
            data.get("device").and_then(Value::as_str) == Some(id)
        })
        .await
        .map_err(|e| qmp_err("wait for DEVICE_DELETED", e))?;
        // The device is gone from here on, so its port is free whatever blockdev-del says.
        self.attached.remove(id);
        qmp.execute("blockdev-del", Some(json!({ "node-name": node_name(id) })))
            .await
            .map_err(|e| qmp_err("blockdev-del", e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(id: &str, serial: &str) -> DiskSpec {
        DiskSpec {
            id: id.into(),
            file_path: "/dev/null".into(),
            serial: serial.into(),
            bus: DiskBus::Scsi,
            read_only: false,
        }
    }

    #[test]
    fn ids_must_be_qemu_ids() {
        assert!(validate(&spec("pvc-1_a", "S")).is_ok());
        for bad in ["", "1abc", "a b", "a.b", "abcdefghijklmnopqrstuvwxy"] {
            assert!(
                matches!(validate(&spec(bad, "S")), Err(DiskError::InvalidId(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn serials_must_survive_the_guest() {
        assert!(validate(&spec("d", "0123456789abcdefghij")).is_ok());
        for bad in ["", "a b", "a,b", &"x".repeat(37)] {
            assert!(
                matches!(validate(&spec("d", bad)), Err(DiskError::InvalidSerial(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn virtio_disks_take_the_first_free_root_port() {
        let mut slots = DiskSlots::new(2);
        assert_eq!(slots.free_root_port().as_deref(), Some("hp0"));
        slots.attached.insert(
            "a".into(),
            Attached {
                root_port: Some("hp0".into()),
            },
        );
        assert_eq!(slots.free_root_port().as_deref(), Some("hp1"));
        slots.attached.insert(
            "b".into(),
            Attached {
                root_port: Some("hp1".into()),
            },
        );
        assert_eq!(slots.free_root_port(), None);
        slots.attached.remove("a");
        assert_eq!(slots.free_root_port().as_deref(), Some("hp0"));
    }
}
