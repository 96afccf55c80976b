//! Typed publish and volume context: the contract with the controller plugin.

use std::collections::HashMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// The disk bus the controller hotplugged the volume on; it tells discovery where the
/// kernel shows the serial.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Bus {
    Scsi,
    Virtio,
    Sata,
}

impl Bus {
    /// How many hotplugged disks of this bus one worker VM can take, answered as
    /// `max_volumes_per_node` so the scheduler stops before the hypervisor refuses.
    ///
    /// - scsi: KubeVirt puts hotplugged disks on one virtio-scsi controller, one target
    ///   per disk; QEMU's virtio-scsi addresses targets 0..=255, and we keep one for the
    ///   controller's own use.
    /// - virtio: each virtio-blk disk needs a free PCIe root port, and KubeVirt reserves
    ///   only a handful of them for hotplug (the exact count depends on the VM's memory and
    ///   KubeVirt version), so the safe default is low; raise it with `--max-volumes`.
    /// - sata: the q35 AHCI controller has six ports.
    pub const fn max_hotplug_volumes(self) -> i64 {
        match self {
            Bus::Scsi => 255,
            Bus::Virtio => 3,
            Bus::Sata => 6,
        }
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Bus::Scsi => "scsi",
            Bus::Virtio => "virtio",
            Bus::Sata => "sata",
        }
    }
}

impl fmt::Display for Bus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Bus {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "scsi" => Ok(Bus::Scsi),
            "virtio" => Ok(Bus::Virtio),
            "sata" => Ok(Bus::Sata),
            other => Err(format!(
                "unknown bus {other:?} (expected scsi, virtio or sata)"
            )),
        }
    }
}

/// The controller's ControllerPublishVolume answer, handed back to us by the CO.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishContext {
    /// The disk serial the controller chose (at most 20 characters, so it survives
    /// virtio-blk's truncation).
    pub serial: String,
    pub bus: Option<Bus>,
}

/// What we read from the volume context; other keys belong to other components.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeContext {
    pub bus: Option<Bus>,
}

/// The context map did not hold what the contract promises.
#[derive(Debug, thiserror::Error)]
#[error("{which} context does not match the contract")]
pub struct ContextError {
    pub which: &'static str,
    #[source]
    pub source: serde_json::Error,
}

fn from_map<T: serde::de::DeserializeOwned>(
    which: &'static str,
    map: &HashMap<String, String>,
) -> Result<T, ContextError> {
    // Going through a JSON value gives us serde's field handling (unknown keys ignored,
    // missing keys named) without a hand-written map walker.
    let value = serde_json::to_value(map).map_err(|source| ContextError { which, source })?;
    serde_json::from_value(value).map_err(|source| ContextError { which, source })
}

impl PublishContext {
    pub fn from_map(map: &HashMap<String, String>) -> Result<Self, ContextError> {
        from_map("publish", map)
    }
}

impl VolumeContext {
    pub fn from_map(map: &HashMap<String, String>) -> Result<Self, ContextError> {
        from_map("volume", map)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn parses_publish_context_and_ignores_unknown_keys() {
        let c = PublishContext::from_map(&map(&[
            ("serial", "kvcsi-0123456789abcd"),
            ("bus", "virtio"),
            ("x", "y"),
        ]))
        .unwrap();
        assert_eq!(c.serial, "kvcsi-0123456789abcd");
        assert_eq!(c.bus, Some(Bus::Virtio));
        let c = PublishContext::from_map(&map(&[("serial", "s")])).unwrap();
        assert_eq!(c.bus, None);
    }

    #[test]
    fn rejects_missing_serial_and_unknown_bus() {
        let e = PublishContext::from_map(&map(&[("bus", "scsi")])).unwrap_err();
        assert!(e.source.to_string().contains("serial"), "{e:?}");
        assert!(PublishContext::from_map(&map(&[("serial", "s"), ("bus", "ide")])).is_err());
    }

    #[test]
    fn volume_context_reads_bus_only() {
        assert_eq!(
            VolumeContext::from_map(&map(&[
                ("bus", "sata"),
                ("storage.kubernetes.io/csiProvisionerIdentity", "x")
            ]))
            .unwrap()
            .bus,
            Some(Bus::Sata)
        );
        assert_eq!(
            VolumeContext::from_map(&map(&[])).unwrap(),
            VolumeContext::default()
        );
    }
}
