//! The node service's error type and its one table of gRPC codes.

use std::path::PathBuf;

use tonic::{Code, Status};

use crate::context::ContextError;
use crate::devno::DevNo;
use crate::discovery::DiscoveryError;
use crate::fs::FsError;
use crate::mountinfo::MountInfoError;
use crate::mounts::{MountError, MountFlagError};
use crate::paths::PathError;
use crate::state::StateError;

/// Everything a Node RPC can fail with.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// A field the spec marks REQUIRED is empty.
    #[error("{field} is required")]
    MissingField { field: &'static str },
    /// A staging, target or volume path was refused.
    #[error(transparent)]
    Path(#[from] PathError),
    /// Publish or volume context does not follow the controller contract.
    #[error("volume {volume_id}: invalid context")]
    Context {
        volume_id: String,
        #[source]
        source: ContextError,
    },
    /// The CO asked for a mount flag we refuse.
    #[error("volume {volume_id}: invalid mount flags")]
    MountFlags {
        volume_id: String,
        #[source]
        source: MountFlagError,
    },
    /// The volume capability asks for something this plugin cannot do.
    #[error("volume {volume_id}: unsupported capability: {reason}")]
    Capability { volume_id: String, reason: String },
    /// Another RPC on the same volume is still running.
    #[error("an operation on volume {volume_id} is already in progress")]
    InFlight { volume_id: String },
    /// Finding the volume's disk failed.
    #[error("volume {volume_id}: disk discovery failed")]
    Discovery {
        volume_id: String,
        #[source]
        source: DiscoveryError,
    },
    /// NodePublish came before NodeStage.
    #[error("volume {volume_id} is not staged at {staging_path:?}")]
    NotStaged {
        volume_id: String,
        staging_path: PathBuf,
    },
    /// The path already holds something other than this volume.
    #[error("volume {volume_id}: {path:?} already holds {found}, not {expected}")]
    DifferentDevice {
        volume_id: String,
        path: PathBuf,
        found: String,
        expected: String,
    },
    /// The path holds this volume, but published with other options.
    #[error("volume {volume_id}: {path:?} is already published {reason}")]
    Incompatible {
        volume_id: String,
        path: PathBuf,
        reason: String,
    },
    /// The disk holds data we will not format over and cannot mount as asked.
    #[error("volume {volume_id}: {device:?} holds {found}, not {requested}; refusing to format it")]
    DiskNotBlank {
        volume_id: String,
        device: PathBuf,
        found: String,
        requested: &'static str,
    },
    /// A filesystem tool failed or the disk's contents could not be told.
    #[error("volume {volume_id}: {action} failed")]
    Fs {
        volume_id: String,
        action: String,
        // Boxed: tool output makes FsError the largest cause, and every Result would pay.
        #[source]
        source: Box<FsError>,
    },
    /// The path is not a volume this plugin published (stats, expand).
    #[error("{path:?} is not a published volume")]
    NotAVolume { path: PathBuf },
    /// The path cannot hold a volume of ours at all (relative, outside the kubelet root):
    /// for stats and expand that means no such volume is there, which the spec calls
    /// NOT_FOUND.
    #[error("no volume can be at {path:?}")]
    NoVolumeAt {
        path: String,
        #[source]
        source: PathError,
    },
    /// A mount at the path exists but was not made by this plugin; we leave it alone.
    #[error(
        "volume {volume_id}: {path:?} holds a {fs_type} mount of {source_desc} that this plugin did not make"
    )]
    NotOurs {
        volume_id: String,
        path: PathBuf,
        fs_type: String,
        source_desc: String,
    },
    /// The target directory still holds entries after our mounts are gone: kubelet creates
    /// it empty and nothing of ours writes there, so they are someone else's; we do not
    /// delete them.
    #[error(
        "volume {volume_id}: target {path:?} is a directory that holds entries this plugin did not put there"
    )]
    TargetNotEmpty { volume_id: String, path: PathBuf },
    /// The disk behind a volume has gone from the node.
    #[error("volume {volume_id}: disk {devno} behind {path:?} is gone")]
    DiskGone {
        volume_id: String,
        path: PathBuf,
        devno: DevNo,
    },
    /// A capacity bound is negative, which CapacityRange forbids: a malformed request.
    #[error("volume {volume_id}: capacity_range.{field} is negative ({value})")]
    NegativeCapacity {
        volume_id: String,
        field: &'static str,
        value: i64,
    },
    /// limit_bytes is below required_bytes: a well-formed range no size can satisfy.
    #[error(
        "volume {volume_id}: capacity_range asks for at least {required} bytes but at most {limit}"
    )]
    EmptyCapacityRange {
        volume_id: String,
        required: i64,
        limit: i64,
    },
    /// NodeExpand came before the disk grew.
    #[error("volume {volume_id}: {device:?} is {size} bytes, less than the {required} requested")]
    NotGrown {
        volume_id: String,
        device: PathBuf,
        size: u64,
        required: u64,
    },
    /// The plugin's own records could not be read or written.
    #[error("volume {volume_id}: plugin state")]
    State {
        volume_id: String,
        #[source]
        source: StateError,
    },
    #[error("reading the mount table failed")]
    MountInfo(#[from] MountInfoError),
    #[error("volume {volume_id}: mount operation failed")]
    Mount {
        volume_id: String,
        #[source]
        source: MountError,
    },
    #[error("volume {volume_id}: cannot {action} {path:?}")]
    Io {
        volume_id: String,
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl NodeError {
    /// The gRPC code for each failure. No catch-all: a new variant must be placed here.
    pub fn code(&self) -> Code {
        match self {
            NodeError::MissingField { .. } => Code::InvalidArgument,
            NodeError::Path(source) => match source {
                PathError::Empty { .. } => Code::InvalidArgument,
                PathError::Nul { .. } => Code::InvalidArgument,
                PathError::TooLong { .. } => Code::InvalidArgument,
                PathError::Relative { .. } => Code::InvalidArgument,
                PathError::NotNormal { .. } => Code::InvalidArgument,
                PathError::OutsideRoot { .. } => Code::InvalidArgument,
                PathError::InStateDir { .. } => Code::InvalidArgument,
                PathError::Symlink { .. } => Code::InvalidArgument,
                PathError::NotADirectory { .. } => Code::InvalidArgument,
                PathError::NoParent { .. } => Code::InvalidArgument,
                // The kernel refused for its own reasons (EACCES, EIO): the node's fault.
                PathError::Resolve { .. } => Code::Internal,
            },
            NodeError::Context { .. } => Code::InvalidArgument,
            NodeError::MountFlags { .. } => Code::InvalidArgument,
            NodeError::Capability { .. } => Code::InvalidArgument,
            NodeError::InFlight { .. } => Code::Aborted,
            NodeError::Discovery { source, .. } => match source {
                // The disk is not on this node (yet): kubelet retries.
                DiscoveryError::Timeout { .. } => Code::NotFound,
                DiscoveryError::Ambiguous { .. } => Code::FailedPrecondition,
                DiscoveryError::NodeMismatch { .. } => Code::FailedPrecondition,
                DiscoveryError::ReadSysfs { .. } => Code::Internal,
                DiscoveryError::BadDevFile { .. } => Code::Internal,
                DiscoveryError::Events { .. } => Code::Internal,
            },
            NodeError::NotStaged { .. } => Code::FailedPrecondition,
            NodeError::DifferentDevice { .. } => Code::AlreadyExists,
            NodeError::Incompatible { .. } => Code::AlreadyExists,
            NodeError::DiskNotBlank { .. } => Code::FailedPrecondition,
            NodeError::Fs { source, .. } => match source.as_ref() {
                FsError::Unsupported { .. } => Code::InvalidArgument,
                FsError::Ambiguous { .. } => Code::FailedPrecondition,
                FsError::ToolMissing { .. } => Code::Internal,
                FsError::Spawn { .. } => Code::Internal,
                FsError::Failed { .. } => Code::Internal,
                FsError::ReadDevice { .. } => Code::Internal,
            },
            NodeError::NotAVolume { .. } => Code::NotFound,
            NodeError::NoVolumeAt { .. } => Code::NotFound,
            NodeError::NotOurs { .. } => Code::FailedPrecondition,
            NodeError::TargetNotEmpty { .. } => Code::FailedPrecondition,
            NodeError::DiskGone { .. } => Code::NotFound,
            NodeError::NegativeCapacity { .. } => Code::InvalidArgument,
            NodeError::EmptyCapacityRange { .. } => Code::OutOfRange,
            NodeError::NotGrown { .. } => Code::FailedPrecondition,
            NodeError::State { source, .. } => match source {
                StateError::Io { .. } => Code::Internal,
                StateError::Foreign { .. } => Code::Internal,
                StateError::MountInfo(_) => Code::Internal,
            },
            NodeError::MountInfo(_) => Code::Internal,
            NodeError::Mount { source, .. } => match source {
                // The target is busy (another request, for another volume id and so not
                // serialised by our per-volume lock, is mounting there, or something holds
                // the mount open), or it vanished under us after we resolved it: the state
                // moved while we acted. Retry.
                MountError::Mount { errno, .. }
                | MountError::Bind { errno, .. }
                | MountError::Unmount { errno, .. }
                    if matches!(*errno, nix::errno::Errno::EBUSY | nix::errno::Errno::ENOENT) =>
                {
                    Code::Aborted
                }
                MountError::Mount { .. }
                | MountError::Bind { .. }
                | MountError::Remount { .. }
                | MountError::Unmount { .. } => Code::Internal,
            },
            NodeError::Io { .. } => Code::Internal,
        }
    }
}

/// The error and each of its causes, joined (one rule for both plugins, in the shared crate).
pub use kubevirt_csi_common::error_chain as chain;

/// gRPC carries one message string: the whole chain, bounded so that a message quoting a
/// hostile path still fits the trailer.
impl From<NodeError> for Status {
    fn from(err: NodeError) -> Self {
        Status::new(err.code(), kubevirt_csi_common::status_message(&err))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_mount_target_is_retried_other_mount_failures_are_internal() {
        let mount = |errno| NodeError::Mount {
            volume_id: "v".into(),
            source: MountError::Mount {
                source_path: "/dev/x".into(),
                target: "/t".into(),
                fs_type: "ext4".into(),
                errno,
            },
        };
        assert_eq!(mount(nix::errno::Errno::EBUSY).code(), Code::Aborted);
        assert_eq!(mount(nix::errno::Errno::EIO).code(), Code::Internal);
    }

    #[test]
    fn status_carries_code_and_source_chain() {
        let err = NodeError::Discovery {
            volume_id: "pvc-1".into(),
            source: DiscoveryError::Ambiguous {
                serial: "kvcsi-x".into(),
                disks: vec!["sda".into(), "sdb".into()],
            },
        };
        let status = Status::from(err);
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert_eq!(
            status.message(),
            "volume pvc-1: disk discovery failed: serial \"kvcsi-x\" matches more than one disk: [\"sda\", \"sdb\"]"
        );
    }

    #[test]
    fn in_flight_is_aborted_and_missing_fields_invalid() {
        assert_eq!(
            NodeError::InFlight {
                volume_id: "v".into()
            }
            .code(),
            Code::Aborted
        );
        assert_eq!(
            NodeError::MissingField { field: "volume_id" }.code(),
            Code::InvalidArgument
        );
    }
}
