//! Typed views of the string maps CSI carries: StorageClass parameters, the volume context
//! we hand to publish and the node plugin, and the publish context the node plugin reads.
//! Nothing past this module deals with raw maps.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// Keys with this prefix belong to the CSI sidecars (secrets, PVC metadata); we ignore them.
const SIDECAR_PREFIX: &str = "csi.storage.k8s.io/";

/// Disk bus for the hotplugged disk, as KubeVirt names it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Bus {
    /// KubeVirt's default for hotplug; keeps 36-character serials, many disks per controller.
    #[default]
    Scsi,
    /// Hotpluggable since KubeVirt 1.6; one PCIe port per disk; serials truncated at 20 bytes.
    Virtio,
    Sata,
}

impl Bus {
    pub fn as_str(self) -> &'static str {
        match self {
            Bus::Scsi => "scsi",
            Bus::Virtio => "virtio",
            Bus::Sata => "sata",
        }
    }

    pub fn parse(s: &str) -> Result<Self, ParamError> {
        match s {
            "scsi" => Ok(Bus::Scsi),
            "virtio" => Ok(Bus::Virtio),
            "sata" => Ok(Bus::Sata),
            other => Err(ParamError::Invalid {
                key: "bus".into(),
                value: other.into(),
                expected: "one of scsi, virtio, sata",
            }),
        }
    }
}

/// A parameter map that could not be understood.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParamError {
    #[error("unknown parameter {key:?} (known: {known})")]
    Unknown { key: String, known: &'static str },
    #[error("parameter {key}={value:?} is invalid: expected {expected}")]
    Invalid {
        key: String,
        value: String,
        expected: &'static str,
    },
    #[error("{what} is missing key {key:?}")]
    Missing {
        what: &'static str,
        key: &'static str,
    },
}

/// Parameters of the guest StorageClass (CreateVolume `parameters`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StorageClassParams {
    /// The infra StorageClass the DataVolume uses; `None` means the infra default.
    pub infra_storage_class: Option<String>,
    /// `None` when the StorageClass names no bus: the controller's `--default-bus` applies.
    pub bus: Option<Bus>,
}

impl StorageClassParams {
    const KNOWN: &'static str = "infraStorageClassName, bus";

    pub fn parse(map: &HashMap<String, String>) -> Result<Self, ParamError> {
        let mut out = Self::default();
        for (k, v) in map {
            match k.as_str() {
                "infraStorageClassName" => {
                    if !v.is_empty() {
                        out.infra_storage_class = Some(v.clone());
                    }
                }
                "bus" => out.bus = Some(Bus::parse(v)?),
                k if k.starts_with(SIDECAR_PREFIX) => {}
                _ => {
                    return Err(ParamError::Unknown {
                        key: k.clone(),
                        known: Self::KNOWN,
                    });
                }
            }
        }
        Ok(out)
    }
}

/// The volume context CreateVolume returns; CSI hands it back on publish and to the node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeContext {
    /// `None` when the context carries no bus (a volume made outside this driver version):
    /// publish then uses the bus recorded on the DataVolume.
    pub bus: Option<Bus>,
}

impl VolumeContext {
    pub fn to_map(&self) -> HashMap<String, String> {
        self.bus
            .map(|b| ("bus".to_string(), b.as_str().to_string()))
            .into_iter()
            .collect()
    }

    pub fn from_map(map: &HashMap<String, String>) -> Result<Self, ParamError> {
        Ok(Self {
            bus: map.get("bus").map(|b| Bus::parse(b)).transpose()?,
        })
    }
}

/// What ControllerPublishVolume tells the node plugin: how to find the disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishContext {
    pub serial: String,
    pub bus: Bus,
}

impl PublishContext {
    pub fn to_map(&self) -> HashMap<String, String> {
        HashMap::from([
            ("serial".to_string(), self.serial.clone()),
            ("bus".to_string(), self.bus.as_str().to_string()),
        ])
    }
}

/// Which infra StorageClasses tenants may name (from the mounted config file).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StorageClassEnforcement {
    /// Any infra StorageClass may be named.
    #[serde(default)]
    pub allow_all: bool,
    /// A guest StorageClass without `infraStorageClassName` uses the infra default.
    #[serde(default)]
    pub allow_default: bool,
    /// Infra StorageClasses that may be named.
    #[serde(default)]
    pub allow_list: Vec<String>,
}

impl StorageClassEnforcement {
    /// `Err` carries the reason a tenant may not use `requested`.
    pub fn check(&self, requested: Option<&str>) -> Result<(), String> {
        match requested {
            None if self.allow_default || self.allow_all => Ok(()),
            None => Err("no infraStorageClassName was given and the infra default storage class is not allowed".into()),
            Some(_) if self.allow_all => Ok(()),
            Some(sc) if self.allow_list.iter().any(|a| a == sc) => Ok(()),
            Some(sc) => Err(format!(
                "infra storage class {sc:?} is not in the allow list ({})",
                self.allow_list.join(", ")
            )),
        }
    }
}

/// Maps an infra StorageClass to the infra VolumeSnapshotClass for its volumes.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SnapshotClassMapping {
    pub infra_storage_class: String,
    pub infra_snapshot_class: String,
}

/// The controller's config file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConfigFile {
    #[serde(default)]
    pub storage_class_enforcement: StorageClassEnforcement,
    #[serde(default)]
    pub snapshot_classes: Vec<SnapshotClassMapping>,
}

impl ConfigFile {
    /// The snapshot class for volumes of `infra_storage_class`; `None` lets the infra
    /// cluster pick its default VolumeSnapshotClass.
    pub fn snapshot_class_for(&self, infra_storage_class: Option<&str>) -> Option<&str> {
        let sc = infra_storage_class?;
        self.snapshot_classes
            .iter()
            .find(|m| m.infra_storage_class == sc)
            .map(|m| m.infra_snapshot_class.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn storage_class_params_parse_and_reject_typos() {
        let p = StorageClassParams::parse(&map(&[
            ("infraStorageClassName", "fast"),
            ("bus", "virtio"),
            ("csi.storage.k8s.io/pvc/name", "data"),
        ]))
        .unwrap();
        assert_eq!(p.infra_storage_class.as_deref(), Some("fast"));
        assert_eq!(p.bus, Some(Bus::Virtio));
        assert!(matches!(
            StorageClassParams::parse(&map(&[("infraStorageclassName", "x")])),
            Err(ParamError::Unknown { .. })
        ));
        assert!(matches!(
            StorageClassParams::parse(&map(&[("bus", "ide")])),
            Err(ParamError::Invalid { .. })
        ));
        assert_eq!(StorageClassParams::parse(&map(&[])).unwrap().bus, None);
    }

    #[test]
    fn contexts_round_trip() {
        let vc = VolumeContext {
            bus: Some(Bus::Sata),
        };
        assert_eq!(VolumeContext::from_map(&vc.to_map()).unwrap(), vc);
        assert_eq!(VolumeContext::from_map(&HashMap::new()).unwrap().bus, None);
        assert!(VolumeContext::from_map(&[("bus".to_string(), "ide".to_string())].into()).is_err());
        let pc = PublishContext {
            serial: "kvabc".into(),
            bus: Bus::Virtio,
        };
        assert_eq!(pc.to_map()["serial"], "kvabc");
        assert_eq!(pc.to_map()["bus"], "virtio");
    }

    #[test]
    fn enforcement_rules() {
        let cfg: ConfigFile = serde_yaml::from_str(
            "storageClassEnforcement:\n  allowList: [fast]\n  allowDefault: true\nsnapshotClasses:\n- infraStorageClass: fast\n  infraSnapshotClass: fast-snap\n",
        )
        .unwrap();
        let e = &cfg.storage_class_enforcement;
        assert!(e.check(Some("fast")).is_ok());
        assert!(e.check(None).is_ok());
        assert!(e.check(Some("slow")).unwrap_err().contains("allow list"));
        assert!(StorageClassEnforcement::default().check(None).is_err());
        assert!(
            StorageClassEnforcement {
                allow_all: true,
                ..Default::default()
            }
            .check(Some("x"))
            .is_ok()
        );
        assert_eq!(cfg.snapshot_class_for(Some("fast")), Some("fast-snap"));
        assert_eq!(cfg.snapshot_class_for(Some("slow")), None);
        assert!(serde_yaml::from_str::<ConfigFile>("storageClassEnforcment: {}").is_err());
    }
}
