//! The controller's state and settings, shared by every RPC.

use std::time::Duration;

use crate::infra::Infra;
use crate::locks::Locks;
use crate::params::{Bus, ConfigFile};

/// Annotation holding the CSI name a DataVolume or VolumeSnapshot was created for; it
/// catches the (astronomically unlikely) case of two names hashing alike.
pub const ANN_CSI_NAME: &str = "csi.kubevirt.io/csi-name";
/// Annotation holding the bus the guest StorageClass asked for.
pub const ANN_BUS: &str = "csi.kubevirt.io/bus";
/// Annotation listing the VMs a volume is published to (comma-separated names), so that
/// publish checks one object instead of listing every VMI.
pub const ANN_ATTACHED_TO: &str = "csi.kubevirt.io/attached-to";
/// Stops CDI from garbage-collecting a finished DataVolume (the guest PV points at it).
pub const ANN_CDI_KEEP: &str = "cdi.kubevirt.io/storage.deleteAfterCompletion";

/// Default `--max-volume-size`: 64 TiB, the largest block volume of the common clouds'
/// disk offerings; operators whose infra provisions more raise it.
pub const DEFAULT_MAX_VOLUME_BYTES: u64 = 64 << 40;

/// How long each kind of operation may wait on the infra cluster. Each must stay below
/// the timeout of the sidecar that calls it, so the sidecar sees our error, not its own.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    pub create: Duration,
    pub delete: Duration,
    pub attach: Duration,
    pub detach: Duration,
    pub expand: Duration,
    pub snapshot: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        // external-provisioner and external-resizer default to 10 s, external-attacher
        // to 15 s.
        Self {
            create: Duration::from_secs(8),
            delete: Duration::from_secs(8),
            attach: Duration::from_secs(12),
            detach: Duration::from_secs(12),
            expand: Duration::from_secs(8),
            snapshot: Duration::from_secs(8),
        }
    }
}

/// How volumes are hotplugged into worker VMs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum HotplugMode {
    /// The addvolume/removevolume subresources (works on every KubeVirt with hotplug).
    #[default]
    Subresource,
    /// Edit the VM spec directly (KubeVirt's DeclarativeHotplugVolumes feature gate).
    Declarative,
}

/// Settings that do not change while the controller runs.
#[derive(Clone, Debug)]
pub struct Settings {
    pub volume_prefix: String,
    pub default_bus: Bus,
    pub max_volumes_per_vm: usize,
    /// The largest volume CreateVolume and ControllerExpandVolume accept (OUT_OF_RANGE above).
    pub max_volume_bytes: u64,
    pub hotplug_mode: HotplugMode,
    pub timeouts: Timeouts,
    pub config: ConfigFile,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            volume_prefix: "kvcsi-".into(),
            default_bus: Bus::Scsi,
            max_volumes_per_vm: 64,
            max_volume_bytes: DEFAULT_MAX_VOLUME_BYTES,
            hotplug_mode: HotplugMode::Subresource,
            timeouts: Timeouts::default(),
            config: ConfigFile::default(),
        }
    }
}

/// Everything an RPC needs.
#[derive(Clone, Debug)]
pub struct Driver {
    pub infra: Infra,
    pub settings: Settings,
    pub locks: Locks,
}

impl Driver {
    pub fn new(infra: Infra, settings: Settings) -> Self {
        Self {
            infra: infra.with_prefix(&settings.volume_prefix),
            settings,
            locks: Locks::default(),
        }
    }
}

/// Longest CSI name or id we accept: the spec's general limit for string fields.
pub const MAX_STRING_BYTES: usize = 128;
/// Largest map (parameters, contexts, secrets), keys and values together: the spec's limit.
pub const MAX_MAP_BYTES: usize = 4096;

/// Checks a CSI name given by the CO (volume or snapshot name): required, within the spec's
/// size limit, and free of NUL (it is stored in an annotation).
pub fn csi_name<'a>(value: &'a str, field: &str) -> Result<&'a str, crate::error::ControllerError> {
    required(value, field)?;
    if value.len() > MAX_STRING_BYTES || value.contains('\0') {
        return Err(crate::error::ControllerError::InvalidArgument(format!(
            "{field} must be at most {MAX_STRING_BYTES} bytes without NUL (got {} bytes)",
            value.len()
        )));
    }
    Ok(value)
}

/// Checks that a string map from the CO stays within the spec's size limit.
pub fn bounded_map(
    map: &std::collections::HashMap<String, String>,
    field: &str,
) -> Result<(), crate::error::ControllerError> {
    let bytes: usize = map.iter().map(|(k, v)| k.len() + v.len()).sum();
    if bytes > MAX_MAP_BYTES {
        return Err(crate::error::ControllerError::InvalidArgument(format!(
            "{field} holds {bytes} bytes; at most {MAX_MAP_BYTES} are accepted"
        )));
    }
    Ok(())
}

/// Checks a required string field.
pub fn required<'a>(value: &'a str, field: &str) -> Result<&'a str, crate::error::ControllerError> {
    if value.is_empty() {
        Err(crate::error::ControllerError::InvalidArgument(format!(
            "{field} is required"
        )))
    } else {
        Ok(value)
    }
}
