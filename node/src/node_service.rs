//! The CSI Node service: request validation, per-volume exclusion, tracing, and the hand
//! off of the blocking work in [`crate::volume_ops`] to tokio's blocking pool.

use std::sync::Arc;

use csi_proto::v1::node_server::Node;
use csi_proto::v1::node_service_capability::{Rpc, Type as CapType, rpc::Type as RpcType};
use csi_proto::v1::volume_capability::access_mode::Mode;
use csi_proto::v1::volume_capability::{AccessType, MountVolume};
use csi_proto::v1::volume_usage::Unit;
use csi_proto::v1::{
    CapacityRange, NodeExpandVolumeRequest, NodeExpandVolumeResponse, NodeGetCapabilitiesRequest,
    NodeGetCapabilitiesResponse, NodeGetInfoRequest, NodeGetInfoResponse,
    NodeGetVolumeStatsRequest, NodeGetVolumeStatsResponse, NodePublishVolumeRequest,
    NodePublishVolumeResponse, NodeServiceCapability, NodeStageVolumeRequest,
    NodeStageVolumeResponse, NodeUnpublishVolumeRequest, NodeUnpublishVolumeResponse,
    NodeUnstageVolumeRequest, NodeUnstageVolumeResponse, VolumeCapability, VolumeCondition,
    VolumeUsage,
};
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::config::NodeConfig;
use crate::context::{PublishContext, VolumeContext};
use crate::error::NodeError;
use crate::fs::FsType;
use crate::inflight::{InFlight, InFlightGuard};
use crate::mounts::MountOptions;
use crate::paths::PathError;
use crate::volume_ops::{self, Access, Publish, Stage, Usage};

#[derive(Debug, Clone)]
pub struct NodeService {
    cfg: Arc<NodeConfig>,
    inflight: InFlight,
}

impl NodeService {
    pub fn new(cfg: NodeConfig) -> Self {
        Self {
            cfg: Arc::new(cfg),
            inflight: InFlight::default(),
        }
    }

    pub fn config(&self) -> &NodeConfig {
        &self.cfg
    }

    fn claim(&self, volume_id: &str) -> Result<InFlightGuard, NodeError> {
        self.claim_with(volume_id, &[])
    }

    /// Claims the volume together with the disk and paths the RPC mutates, so that a request
    /// for another volume id naming the same disk or path waits its turn (ABORTED) instead
    /// of formatting, mounting or recording it at the same time.
    fn claim_with(&self, volume_id: &str, also: &[String]) -> Result<InFlightGuard, NodeError> {
        let mut keys = vec![volume_id.to_owned()];
        keys.extend(also.iter().cloned());
        self.inflight
            .try_claim_all(&keys)
            .ok_or_else(|| NodeError::InFlight {
                volume_id: volume_id.to_owned(),
            })
    }

    /// Runs blocking volume work off the async runtime. The in-flight guard moves along,
    /// so the volume stays claimed until the work is really done, even if the caller
    /// gives up and the RPC future is dropped.
    async fn blocking<T, F>(&self, guard: InFlightGuard, work: F) -> Result<T, Status>
    where
        T: Send + 'static,
        F: FnOnce(&NodeConfig) -> Result<T, NodeError> + Send + 'static,
    {
        let cfg = self.cfg.clone();
        let span = tracing::Span::current();
        let joined = tokio::task::spawn_blocking(move || {
            let _entered = span.enter();
            let _guard = guard;
            work(&cfg)
        })
        .await;
        match joined {
            Ok(result) => result.map_err(|e| {
                tracing::warn!(error = %crate::error::chain(&e), "request failed");
                Status::from(e)
            }),
            Err(join) => Err(Status::internal(format!(
                "volume operation did not complete: {join}"
            ))),
        }
    }

    fn span(&self, rpc: &'static str, volume_id: &str) -> tracing::Span {
        tracing::info_span!("rpc", rpc, volume_id, node_id = %self.cfg.node_id)
    }
}

fn require<'a>(field: &'static str, value: &'a str) -> Result<&'a str, NodeError> {
    if value.is_empty() {
        Err(NodeError::MissingField { field })
    } else {
        Ok(value)
    }
}

/// Turns a volume capability into what we do, refusing what we cannot do safely.
/// Returns the access and whether the mode is reader-only.
fn access_of(volume_id: &str, cap: Option<&VolumeCapability>) -> Result<(Access, bool), NodeError> {
    let cap = cap.ok_or(NodeError::MissingField {
        field: "volume_capability",
    })?;
    let unsupported = |reason: String| NodeError::Capability {
        volume_id: volume_id.to_owned(),
        reason,
    };
    let mode = cap.access_mode.as_ref().ok_or(NodeError::MissingField {
        field: "volume_capability.access_mode",
    })?;
    let mode = Mode::try_from(mode.mode)
        .map_err(|_| unsupported(format!("unknown access mode {}", mode.mode)))?;
    let (read_only, multi_node_writer) = match mode {
        Mode::Unknown => return Err(unsupported("access mode is UNKNOWN".into())),
        Mode::SingleNodeWriter | Mode::SingleNodeSingleWriter | Mode::SingleNodeMultiWriter => {
            (false, false)
        }
        Mode::SingleNodeReaderOnly | Mode::MultiNodeReaderOnly => (true, false),
        Mode::MultiNodeSingleWriter | Mode::MultiNodeMultiWriter => (false, true),
    };
    let access = match cap.access_type.as_ref().ok_or(NodeError::MissingField {
        field: "volume_capability.access_type",
    })? {
        AccessType::Block(_) => Access::Block,
        AccessType::Mount(MountVolume {
            fs_type,
            mount_flags,
            ..
        }) => {
            if multi_node_writer {
                // ext4 and xfs are not cluster filesystems: writers on two nodes corrupt them.
                return Err(unsupported(format!(
                    "{} needs a block volume",
                    mode.as_str_name()
                )));
            }
            let fs = FsType::from_capability(fs_type).map_err(|source| NodeError::Fs {
                volume_id: volume_id.to_owned(),
                action: "choosing the filesystem".into(),
                source: Box::new(source),
            })?;
            let options =
                MountOptions::parse(mount_flags).map_err(|source| NodeError::MountFlags {
                    volume_id: volume_id.to_owned(),
                    source,
                })?;
            Access::Mount { fs, options }
        }
    };
    Ok((access, read_only))
}

/// The size NodeExpandVolume must reach, after checking the range is one the spec allows.
///
/// A negative bound breaks CapacityRange's own contract ("MUST NOT be negative"), so the
/// request is malformed: INVALID_ARGUMENT. `limit_bytes < required_bytes` (with a limit
/// set; 0 means none) is well-formed but no size satisfies it, which the spec's
/// NodeExpandVolume table calls "capacity range not allowed": OUT_OF_RANGE. The limit is
/// not checked against the disk afterwards: the node cannot shrink what the infra cluster
/// grew, and an error would only make kubelet retry forever.
fn required_bytes(volume_id: &str, range: &CapacityRange) -> Result<u64, NodeError> {
    let negative = |field, value| NodeError::NegativeCapacity {
        volume_id: volume_id.to_owned(),
        field,
        value,
    };
    let required = u64::try_from(range.required_bytes)
        .map_err(|_| negative("required_bytes", range.required_bytes))?;
    if range.limit_bytes < 0 {
        return Err(negative("limit_bytes", range.limit_bytes));
    }
    if range.limit_bytes > 0 && range.limit_bytes < range.required_bytes {
        return Err(NodeError::EmptyCapacityRange {
            volume_id: volume_id.to_owned(),
            required: range.required_bytes,
            limit: range.limit_bytes,
        });
    }
    Ok(required)
}

fn usage(u: Usage, unit: Unit) -> VolumeUsage {
    let clamp = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    VolumeUsage {
        total: clamp(u.total),
        available: clamp(u.available),
        used: clamp(u.used),
        unit: unit as i32,
    }
}

#[tonic::async_trait]
impl Node for NodeService {
    /// NodeStageVolume (CSI "NodeStageVolume"): volume_id, staging_target_path and
    /// volume_capability are REQUIRED (INVALID_ARGUMENT); the disk is found by the serial in
    /// the publish context; a filesystem is created only on a blank disk and mounted at the
    /// staging path; a repeat call with the same disk succeeds (idempotent), a staging path
    /// holding another device is ALREADY_EXISTS; a concurrent call on the volume is ABORTED.
    async fn node_stage_volume(
        &self,
        request: Request<NodeStageVolumeRequest>,
    ) -> Result<Response<NodeStageVolumeResponse>, Status> {
        let req = request.into_inner();
        let span = self.span("NodeStageVolume", &req.volume_id);
        let run = async {
            let volume_id = require("volume_id", &req.volume_id)?.to_owned();
            let staging_path = self
                .cfg
                .kubelet_root
                .check("staging_target_path", &req.staging_target_path)?;
            let (access, read_only) = access_of(&volume_id, req.volume_capability.as_ref())?;
            let context_err = |source| NodeError::Context {
                volume_id: volume_id.clone(),
                source,
            };
            let publish = PublishContext::from_map(&req.publish_context).map_err(context_err)?;
            let volume = VolumeContext::from_map(&req.volume_context).map_err(context_err)?;
            require("publish_context.serial", &publish.serial)?;
            let guard = self.claim_with(
                &volume_id,
                &[
                    format!("disk:{}", publish.serial),
                    format!("path:{}", req.staging_target_path),
                ],
            )?;
            let bus = publish.bus.or(volume.bus);
            let stage = Stage {
                volume_id,
                staging_path,
                serial: publish.serial,
                bus,
                access,
                read_only,
            };
            Ok::<_, NodeError>((guard, stage))
        };
        let (guard, stage) = run.instrument(span.clone()).await?;
        self.blocking(guard, move |cfg| volume_ops::stage(cfg, &stage))
            .instrument(span)
            .await?;
        Ok(Response::new(NodeStageVolumeResponse {}))
    }

    /// NodeUnstageVolume: volume_id and staging_target_path are REQUIRED; unmounts only a
    /// mount this plugin made at exactly that path; a volume not staged is success
    /// (idempotent).
    async fn node_unstage_volume(
        &self,
        request: Request<NodeUnstageVolumeRequest>,
    ) -> Result<Response<NodeUnstageVolumeResponse>, Status> {
        let req = request.into_inner();
        let span = self.span("NodeUnstageVolume", &req.volume_id);
        let run = async {
            let volume_id = require("volume_id", &req.volume_id)?.to_owned();
            let staging = self
                .cfg
                .kubelet_root
                .check("staging_target_path", &req.staging_target_path)?;
            let guard =
                self.claim_with(&volume_id, &[format!("path:{}", req.staging_target_path)])?;
            Ok::<_, NodeError>((guard, volume_id, staging))
        };
        let (guard, volume_id, staging) = run.instrument(span.clone()).await?;
        self.blocking(guard, move |cfg| {
            volume_ops::unstage(cfg, &volume_id, &staging)
        })
        .instrument(span)
        .await?;
        Ok(Response::new(NodeUnstageVolumeResponse {}))
    }

    /// NodePublishVolume: volume_id, target_path and volume_capability are REQUIRED, and
    /// staging_target_path too since we advertise STAGE_UNSTAGE_VOLUME; FAILED_PRECONDITION
    /// when the volume is not staged; `readonly` and reader-only modes give a read-only
    /// mount; mount flags are applied; the SP creates the target (directory or file); a
    /// repeat call succeeds, a different or differently-published volume at the target is
    /// ALREADY_EXISTS.
    async fn node_publish_volume(
        &self,
        request: Request<NodePublishVolumeRequest>,
    ) -> Result<Response<NodePublishVolumeResponse>, Status> {
        let req = request.into_inner();
        let span = self.span("NodePublishVolume", &req.volume_id);
        let run = async {
            let volume_id = require("volume_id", &req.volume_id)?.to_owned();
            let staging_path = self
                .cfg
                .kubelet_root
                .check("staging_target_path", &req.staging_target_path)?;
            let target_path = self
                .cfg
                .kubelet_root
                .check("target_path", &req.target_path)?;
            let (access, mode_ro) = access_of(&volume_id, req.volume_capability.as_ref())?;
            // The publish context is optional here: NodeStage already recorded the disk.
            let serial = match req.publish_context.is_empty() {
                true => None,
                false => Some(
                    PublishContext::from_map(&req.publish_context)
                        .map_err(|source| NodeError::Context {
                            volume_id: volume_id.clone(),
                            source,
                        })?
                        .serial,
                ),
            };
            let guard = self.claim_with(&volume_id, &[format!("path:{}", req.target_path)])?;
            let publish = Publish {
                volume_id,
                staging_path,
                target_path,
                access,
                read_only: req.readonly || mode_ro,
                serial,
            };
            Ok::<_, NodeError>((guard, publish))
        };
        let (guard, publish) = run.instrument(span.clone()).await?;
        self.blocking(guard, move |cfg| volume_ops::publish(cfg, &publish))
            .instrument(span)
            .await?;
        Ok(Response::new(NodePublishVolumeResponse {}))
    }

    /// NodeUnpublishVolume: volume_id and target_path are REQUIRED; the target is unmounted
    /// (only if we mounted it) and deleted, as the spec requires of the SP; an absent target
    /// is success (idempotent).
    async fn node_unpublish_volume(
        &self,
        request: Request<NodeUnpublishVolumeRequest>,
    ) -> Result<Response<NodeUnpublishVolumeResponse>, Status> {
        let req = request.into_inner();
        let span = self.span("NodeUnpublishVolume", &req.volume_id);
        let run = async {
            let volume_id = require("volume_id", &req.volume_id)?.to_owned();
            let target = self
                .cfg
                .kubelet_root
                .check("target_path", &req.target_path)?;
            let guard = self.claim_with(&volume_id, &[format!("path:{}", req.target_path)])?;
            Ok::<_, NodeError>((guard, volume_id, target))
        };
        let (guard, volume_id, target) = run.instrument(span.clone()).await?;
        self.blocking(guard, move |cfg| {
            volume_ops::unpublish(cfg, &volume_id, &target)
        })
        .instrument(span)
        .await?;
        Ok(Response::new(NodeUnpublishVolumeResponse {}))
    }

    /// NodeGetVolumeStats: volume_id and volume_path are REQUIRED; NOT_FOUND when the path
    /// is not a published volume; bytes and inodes for filesystems, total bytes for block;
    /// VolumeCondition (we advertise VOLUME_CONDITION) is abnormal when the disk is gone
    /// or the filesystem turned read-only under a read-write mount. Stats take no
    /// in-flight claim: they change nothing and kubelet polls them.
    async fn node_get_volume_stats(
        &self,
        request: Request<NodeGetVolumeStatsRequest>,
    ) -> Result<Response<NodeGetVolumeStatsResponse>, Status> {
        let req = request.into_inner();
        let span = self.span("NodeGetVolumeStats", &req.volume_id);
        let run = async {
            let volume_id = require("volume_id", &req.volume_id)?.to_owned();
            let path = self
                .cfg
                .kubelet_root
                .check("volume_path", &req.volume_path)
                .map_err(|source| match source {
                    // A path no file can have is a malformed request, not a missing volume.
                    PathError::Empty { .. } | PathError::Nul { .. } | PathError::TooLong { .. } => {
                        NodeError::Path(source)
                    }
                    _ => NodeError::NoVolumeAt {
                        path: req.volume_path.clone(),
                        source,
                    },
                })?;
            Ok::<_, NodeError>((volume_id, path))
        };
        let (volume_id, path) = run.instrument(span.clone()).await?;
        let cfg = self.cfg.clone();
        let stats = tokio::task::spawn_blocking(move || volume_ops::stats(&cfg, &volume_id, &path))
            .instrument(span)
            .await
            .map_err(|join| Status::internal(format!("volume stats did not complete: {join}")))??;
        let mut usage_list = vec![usage(stats.bytes, Unit::Bytes)];
        usage_list.extend(stats.inodes.map(|i| usage(i, Unit::Inodes)));
        Ok(Response::new(NodeGetVolumeStatsResponse {
            usage: usage_list,
            volume_condition: Some(VolumeCondition {
                abnormal: stats.abnormal.is_some(),
                message: stats.abnormal.unwrap_or_else(|| "volume is healthy".into()),
            }),
        }))
    }

    /// NodeExpandVolume: volume_id and volume_path are REQUIRED; NOT_FOUND when the path is
    /// not a published volume; a negative bound is INVALID_ARGUMENT and a limit below the
    /// requirement OUT_OF_RANGE (see [`required_bytes`]); SCSI disks are rescanned so the guest sees the new size,
    /// then ext4/xfs grow online; capacity_bytes reports the device size.
    async fn node_expand_volume(
        &self,
        request: Request<NodeExpandVolumeRequest>,
    ) -> Result<Response<NodeExpandVolumeResponse>, Status> {
        let req = request.into_inner();
        let span = self.span("NodeExpandVolume", &req.volume_id);
        let run = async {
            let volume_id = require("volume_id", &req.volume_id)?.to_owned();
            let path = self
                .cfg
                .kubelet_root
                .check("volume_path", &req.volume_path)
                .map_err(|source| match source {
                    // A path no file can have is a malformed request, not a missing volume.
                    PathError::Empty { .. } | PathError::Nul { .. } | PathError::TooLong { .. } => {
                        NodeError::Path(source)
                    }
                    _ => NodeError::NoVolumeAt {
                        path: req.volume_path.clone(),
                        source,
                    },
                })?;
            if req.volume_capability.is_some() {
                access_of(&volume_id, req.volume_capability.as_ref())?;
            }
            let required = match req.capacity_range.as_ref() {
                Some(range) => required_bytes(&volume_id, range)?,
                None => 0,
            };
            let guard = self.claim(&volume_id)?;
            Ok::<_, NodeError>((guard, volume_id, path, required))
        };
        let (guard, volume_id, path, required) = run.instrument(span.clone()).await?;
        let size = self
            .blocking(guard, move |cfg| {
                volume_ops::expand(cfg, &volume_id, &path, required)
            })
            .instrument(span)
            .await?;
        Ok(Response::new(NodeExpandVolumeResponse {
            capacity_bytes: i64::try_from(size).unwrap_or(i64::MAX),
        }))
    }

    /// NodeGetCapabilities.
    async fn node_get_capabilities(
        &self,
        _: Request<NodeGetCapabilitiesRequest>,
    ) -> Result<Response<NodeGetCapabilitiesResponse>, Status> {
        let capabilities = [
            RpcType::StageUnstageVolume,
            RpcType::GetVolumeStats,
            RpcType::ExpandVolume,
            RpcType::VolumeCondition,
            RpcType::SingleNodeMultiWriter,
        ]
        .into_iter()
        .map(|t| NodeServiceCapability {
            r#type: Some(CapType::Rpc(Rpc { r#type: t as i32 })),
        })
        .collect();
        Ok(Response::new(NodeGetCapabilitiesResponse { capabilities }))
    }

    /// NodeGetInfo: node_id is REQUIRED and is what the controller receives in
    /// ControllerPublishVolume: `<namespace>/<vm-name>` of the infra VM.
    async fn node_get_info(
        &self,
        _: Request<NodeGetInfoRequest>,
    ) -> Result<Response<NodeGetInfoResponse>, Status> {
        Ok(Response::new(NodeGetInfoResponse {
            node_id: self.cfg.node_id.to_string(),
            max_volumes_per_node: self.cfg.max_volumes_per_node,
            accessible_topology: None,
        }))
    }
}
