//! What a set of CSI volume capabilities asks of the infra volume.

use csi_proto::v1::VolumeCapability;
use csi_proto::v1::volume_capability::AccessType;
use csi_proto::v1::volume_capability::access_mode::Mode;

use crate::error::ControllerError;

/// The infra volume shape a request needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    pub block: bool,
    pub multi_node: bool,
}

impl Shape {
    /// `Block` or `Filesystem`, as the DataVolume's volumeMode.
    pub fn volume_mode(self) -> &'static str {
        if self.block { "Block" } else { "Filesystem" }
    }

    /// Multi-node block volumes are ReadWriteMany so the worker VM can live-migrate.
    pub fn access_mode(self) -> &'static str {
        if self.multi_node {
            "ReadWriteMany"
        } else {
            "ReadWriteOnce"
        }
    }
}

pub fn is_multi_node(mode: Mode) -> bool {
    matches!(
        mode,
        Mode::MultiNodeReaderOnly | Mode::MultiNodeSingleWriter | Mode::MultiNodeMultiWriter
    )
}

/// Why a capability is malformed (a required field missing), if it is: the request itself
/// is wrong, whatever volume it names, so callers check this before any lookup.
pub fn malformed(cap: &VolumeCapability) -> Option<String> {
    let mode = cap
        .access_mode
        .as_ref()
        .and_then(|m| Mode::try_from(m.mode).ok())
        .unwrap_or(Mode::Unknown);
    match (&cap.access_type, mode) {
        (None, _) => Some("volume capability has no access type (mount or block)".into()),
        (_, Mode::Unknown) => Some("volume capability has no access mode".into()),
        _ => None,
    }
}

/// Why one capability cannot be served (malformed, or asking what we cannot do), or `None`.
pub fn unsupported(cap: &VolumeCapability) -> Option<String> {
    if let Some(why) = malformed(cap) {
        return Some(why);
    }
    let mode = cap
        .access_mode
        .as_ref()
        .and_then(|m| Mode::try_from(m.mode).ok())
        .unwrap_or(Mode::Unknown);
    match &cap.access_type {
        Some(AccessType::Mount(_)) if is_multi_node(mode) => Some(format!(
            "multi-node access ({}) is supported for block volumes only; a filesystem on a shared disk would be corrupted",
            mode.as_str_name()
        )),
        Some(AccessType::Mount(m)) if !matches!(m.fs_type.as_str(), "" | "ext4" | "xfs") => {
            Some(format!(
                "filesystem type {:?} is not supported (ext4, xfs)",
                m.fs_type
            ))
        }
        _ => None,
    }
}

/// The shape a CreateVolume request needs: every capability must be servable and all
/// must agree on block versus filesystem.
pub fn shape(caps: &[VolumeCapability]) -> Result<Shape, ControllerError> {
    if caps.is_empty() {
        return Err(ControllerError::InvalidArgument(
            "volume_capabilities is required".into(),
        ));
    }
    let mut block = None;
    let mut multi_node = false;
    for cap in caps {
        if let Some(why) = unsupported(cap) {
            return Err(ControllerError::InvalidArgument(why));
        }
        let is_block = matches!(cap.access_type, Some(AccessType::Block(_)));
        if block.is_some_and(|b| b != is_block) {
            return Err(ControllerError::InvalidArgument(
                "volume capabilities mix block and mount access; a volume is one or the other"
                    .into(),
            ));
        }
        block = Some(is_block);
        multi_node |= cap
            .access_mode
            .as_ref()
            .and_then(|m| Mode::try_from(m.mode).ok())
            .is_some_and(is_multi_node);
    }
    Ok(Shape {
        block: block.unwrap_or(false),
        multi_node,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use csi_proto::v1::volume_capability::{AccessMode, BlockVolume, MountVolume};

    pub(crate) fn cap(block: bool, mode: Mode) -> VolumeCapability {
        VolumeCapability {
            access_type: Some(if block {
                AccessType::Block(BlockVolume {})
            } else {
                AccessType::Mount(MountVolume::default())
            }),
            access_mode: Some(AccessMode { mode: mode as i32 }),
        }
    }

    #[test]
    fn shapes() {
        assert_eq!(
            shape(&[cap(false, Mode::SingleNodeWriter)]).unwrap(),
            Shape {
                block: false,
                multi_node: false
            }
        );
        let s = shape(&[cap(true, Mode::MultiNodeMultiWriter)]).unwrap();
        assert_eq!(
            (s.volume_mode(), s.access_mode()),
            ("Block", "ReadWriteMany")
        );
        assert!(shape(&[cap(false, Mode::MultiNodeMultiWriter)]).is_err());
        assert!(
            shape(&[
                cap(false, Mode::SingleNodeWriter),
                cap(true, Mode::SingleNodeWriter)
            ])
            .is_err()
        );
        assert!(shape(&[]).is_err());
        assert!(shape(&[VolumeCapability::default()]).is_err());
    }
}
