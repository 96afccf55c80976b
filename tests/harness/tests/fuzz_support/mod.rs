//! The fuzz test's vocabulary: one request of any CSI RPC, how to send it, and the CSI
//! spec's table of answers each RPC may give.

pub mod hostile;

use std::collections::BTreeSet;
use std::time::Duration;

use csi_proto::v1 as csi;
use csi_proto::v1::controller_client::ControllerClient;
use csi_proto::v1::identity_client::IdentityClient;
use csi_proto::v1::node_client::NodeClient;
use tonic::Code;
use tonic::transport::Channel;

/// Which plugin an Identity call goes to (both serve Identity).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plugin {
    Controller,
    Node,
}

/// One request of any RPC.
#[derive(Clone, Debug)]
pub enum Call {
    GetPluginInfo(Plugin),
    GetPluginCapabilities(Plugin),
    Probe(Plugin),
    CreateVolume(csi::CreateVolumeRequest),
    DeleteVolume(csi::DeleteVolumeRequest),
    ControllerPublishVolume(csi::ControllerPublishVolumeRequest),
    ControllerUnpublishVolume(csi::ControllerUnpublishVolumeRequest),
    ValidateVolumeCapabilities(csi::ValidateVolumeCapabilitiesRequest),
    ListVolumes(csi::ListVolumesRequest),
    GetCapacity(csi::GetCapacityRequest),
    ControllerGetCapabilities,
    CreateSnapshot(csi::CreateSnapshotRequest),
    DeleteSnapshot(csi::DeleteSnapshotRequest),
    ListSnapshots(csi::ListSnapshotsRequest),
    GetSnapshot(csi::GetSnapshotRequest),
    ControllerExpandVolume(csi::ControllerExpandVolumeRequest),
    ControllerGetVolume(csi::ControllerGetVolumeRequest),
    ControllerModifyVolume(csi::ControllerModifyVolumeRequest),
    NodeStageVolume(csi::NodeStageVolumeRequest),
    NodeUnstageVolume(csi::NodeUnstageVolumeRequest),
    NodePublishVolume(csi::NodePublishVolumeRequest),
    NodeUnpublishVolume(csi::NodeUnpublishVolumeRequest),
    NodeGetVolumeStats(csi::NodeGetVolumeStatsRequest),
    NodeExpandVolume(csi::NodeExpandVolumeRequest),
    NodeGetCapabilities,
    NodeGetInfo,
}

impl Call {
    pub fn rpc(&self) -> &'static str {
        let plugin = |p: &Plugin, c: &'static str, n: &'static str| match p {
            Plugin::Controller => c,
            Plugin::Node => n,
        };
        match self {
            Call::GetPluginInfo(p) => plugin(p, "controller/GetPluginInfo", "node/GetPluginInfo"),
            Call::GetPluginCapabilities(p) => plugin(
                p,
                "controller/GetPluginCapabilities",
                "node/GetPluginCapabilities",
            ),
            Call::Probe(p) => plugin(p, "controller/Probe", "node/Probe"),
            Call::CreateVolume(_) => "CreateVolume",
            Call::DeleteVolume(_) => "DeleteVolume",
            Call::ControllerPublishVolume(_) => "ControllerPublishVolume",
            Call::ControllerUnpublishVolume(_) => "ControllerUnpublishVolume",
            Call::ValidateVolumeCapabilities(_) => "ValidateVolumeCapabilities",
            Call::ListVolumes(_) => "ListVolumes",
            Call::GetCapacity(_) => "GetCapacity",
            Call::ControllerGetCapabilities => "ControllerGetCapabilities",
            Call::CreateSnapshot(_) => "CreateSnapshot",
            Call::DeleteSnapshot(_) => "DeleteSnapshot",
            Call::ListSnapshots(_) => "ListSnapshots",
            Call::GetSnapshot(_) => "GetSnapshot",
            Call::ControllerExpandVolume(_) => "ControllerExpandVolume",
            Call::ControllerGetVolume(_) => "ControllerGetVolume",
            Call::ControllerModifyVolume(_) => "ControllerModifyVolume",
            Call::NodeStageVolume(_) => "NodeStageVolume",
            Call::NodeUnstageVolume(_) => "NodeUnstageVolume",
            Call::NodePublishVolume(_) => "NodePublishVolume",
            Call::NodeUnpublishVolume(_) => "NodeUnpublishVolume",
            Call::NodeGetVolumeStats(_) => "NodeGetVolumeStats",
            Call::NodeExpandVolume(_) => "NodeExpandVolume",
            Call::NodeGetCapabilities => "NodeGetCapabilities",
            Call::NodeGetInfo => "NodeGetInfo",
        }
    }

    /// The request as Rust source would write it, with long runs of one character folded
    /// (`{'a'×65536}`), so a 64 KiB id stays readable in a report.
    pub fn describe(&self) -> String {
        fold_runs(&format!("{self:?}"))
    }
}

/// Folds runs of 16 or more identical characters, and repeated short patterns such as
/// `a/a/a/`, into `{…×n}`.
pub fn fold_runs(s: &str) -> String {
    let chars: Vec<char> = s.chars().collect();
    let mut out = String::new();
    let mut i = 0;
    'outer: while i < chars.len() {
        for width in 1..=3 {
            if i + width > chars.len() {
                break;
            }
            let unit = &chars[i..i + width];
            let mut reps = 1;
            while i + (reps + 1) * width <= chars.len()
                && &chars[i + reps * width..i + (reps + 1) * width] == unit
            {
                reps += 1;
            }
            if reps * width >= 16 {
                let unit: String = unit.iter().collect();
                out.push_str(&format!("{{{unit:?}×{reps}}}"));
                i += reps * width;
                continue 'outer;
            }
        }
        out.push(chars[i]);
        i += 1;
    }
    out
}

/// The gRPC clients of both plugins.
#[derive(Clone)]
pub struct Clients {
    pub controller: ControllerClient<Channel>,
    pub controller_identity: IdentityClient<Channel>,
    pub node: NodeClient<Channel>,
    pub node_identity: IdentityClient<Channel>,
}

/// What came back, reduced to what the table and the reply checks need.
#[derive(Clone, Debug)]
pub enum Outcome {
    Ok {
        /// Every capacity or size the reply reports (bytes).
        capacities: Vec<i64>,
    },
    Err {
        code: Code,
        message: String,
    },
    /// No answer within the client's deadline.
    Hang,
}

impl Outcome {
    /// The key counts are kept under: "OK", a gRPC code name, or "HANG".
    pub fn label(&self) -> String {
        match self {
            Outcome::Ok { .. } => "OK".into(),
            Outcome::Err { code, .. } => code_name(*code).into(),
            Outcome::Hang => "HANG".into(),
        }
    }
}

pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Sends one request, bounded by `deadline` (longer than any wait the plugins are
/// configured with, so running into it means the plugin would never have answered).
pub async fn send(c: &Clients, call: Call, deadline: Duration) -> Outcome {
    let fut = async move {
        let mut c = c.clone();
        let caps = |v: Vec<i64>| Outcome::Ok { capacities: v };
        macro_rules! reply {
            ($e:expr, |$r:ident| $caps:expr) => {
                match $e.await {
                    Ok(r) => {
                        let $r = r.into_inner();
                        caps($caps)
                    }
                    Err(s) => Outcome::Err {
                        code: s.code(),
                        message: s.message().to_owned(),
                    },
                }
            };
        }
        let identity = |p: Plugin| match p {
            Plugin::Controller => c.controller_identity.clone(),
            Plugin::Node => c.node_identity.clone(),
        };
        match call {
            Call::GetPluginInfo(p) => {
                reply!(
                    identity(p).get_plugin_info(csi::GetPluginInfoRequest {}),
                    |_r| vec![]
                )
            }
            Call::GetPluginCapabilities(p) => reply!(
                identity(p).get_plugin_capabilities(csi::GetPluginCapabilitiesRequest {}),
                |_r| vec![]
            ),
            Call::Probe(p) => reply!(identity(p).probe(csi::ProbeRequest {}), |_r| vec![]),
            Call::CreateVolume(r) => reply!(c.controller.create_volume(r), |r| r
                .volume
                .map(|v| vec![v.capacity_bytes])
                .unwrap_or_default()),
            Call::DeleteVolume(r) => reply!(c.controller.delete_volume(r), |_r| vec![]),
            Call::ControllerPublishVolume(r) => {
                reply!(c.controller.controller_publish_volume(r), |_r| vec![])
            }
            Call::ControllerUnpublishVolume(r) => {
                reply!(c.controller.controller_unpublish_volume(r), |_r| vec![])
            }
            Call::ValidateVolumeCapabilities(r) => {
                reply!(c.controller.validate_volume_capabilities(r), |_r| vec![])
            }
            Call::ListVolumes(r) => reply!(c.controller.list_volumes(r), |r| r
                .entries
                .iter()
                .filter_map(|e| e.volume.as_ref().map(|v| v.capacity_bytes))
                .collect()),
            Call::GetCapacity(r) => {
                reply!(c.controller.get_capacity(r), |r| vec![r.available_capacity])
            }
            Call::ControllerGetCapabilities => reply!(
                c.controller
                    .controller_get_capabilities(csi::ControllerGetCapabilitiesRequest {}),
                |_r| vec![]
            ),
            Call::CreateSnapshot(r) => reply!(c.controller.create_snapshot(r), |r| r
                .snapshot
                .map(|s| vec![s.size_bytes])
                .unwrap_or_default()),
            Call::DeleteSnapshot(r) => reply!(c.controller.delete_snapshot(r), |_r| vec![]),
            Call::ListSnapshots(r) => reply!(c.controller.list_snapshots(r), |r| r
                .entries
                .iter()
                .filter_map(|e| e.snapshot.as_ref().map(|s| s.size_bytes))
                .collect()),
            Call::GetSnapshot(r) => reply!(c.controller.get_snapshot(r), |r| r
                .snapshot
                .map(|s| vec![s.size_bytes])
                .unwrap_or_default()),
            Call::ControllerExpandVolume(r) => {
                reply!(c.controller.controller_expand_volume(r), |r| vec![
                    r.capacity_bytes
                ])
            }
            Call::ControllerGetVolume(r) => reply!(c.controller.controller_get_volume(r), |r| r
                .volume
                .map(|v| vec![v.capacity_bytes])
                .unwrap_or_default()),
            Call::ControllerModifyVolume(r) => {
                reply!(c.controller.controller_modify_volume(r), |_r| vec![])
            }
            Call::NodeStageVolume(r) => reply!(c.node.node_stage_volume(r), |_r| vec![]),
            Call::NodeUnstageVolume(r) => reply!(c.node.node_unstage_volume(r), |_r| vec![]),
            Call::NodePublishVolume(r) => reply!(c.node.node_publish_volume(r), |_r| vec![]),
            Call::NodeUnpublishVolume(r) => {
                reply!(c.node.node_unpublish_volume(r), |_r| vec![])
            }
            Call::NodeGetVolumeStats(r) => reply!(c.node.node_get_volume_stats(r), |r| r
                .usage
                .iter()
                .flat_map(|u| [u.available, u.total, u.used])
                .collect()),
            Call::NodeExpandVolume(r) => {
                reply!(c.node.node_expand_volume(r), |r| vec![r.capacity_bytes])
            }
            Call::NodeGetCapabilities => reply!(
                c.node
                    .node_get_capabilities(csi::NodeGetCapabilitiesRequest {}),
                |_r| vec![]
            ),
            Call::NodeGetInfo => {
                reply!(
                    c.node.node_get_info(csi::NodeGetInfoRequest {}),
                    |_r| vec![]
                )
            }
        }
    };
    tokio::time::timeout(deadline, fut)
        .await
        .unwrap_or(Outcome::Hang)
}

/// RPCs whose capability the plugin does not advertise; for these, and only these,
/// UNIMPLEMENTED is an answer the spec allows ("Call not implemented").
#[derive(Clone, Debug, Default)]
pub struct Unadvertised(pub BTreeSet<&'static str>);

/// Spec conditions every RPC may report (CSI spec, "Error Scheme"): missing or invalid
/// field, permission denied, operation pending for the volume, not authenticated.
const GENERAL: &[Code] = &[
    Code::InvalidArgument,
    Code::PermissionDenied,
    Code::Aborted,
    Code::Unauthenticated,
];

/// The codes the CSI spec v1.12 lists for each RPC (the "Errors" table under each RPC in
/// spec.md; csi.proto carries the messages only), besides OK and [`GENERAL`]. RPCs the spec
/// says a plugin MUST implement and that take no input answer OK only.
pub fn table(rpc: &str) -> Option<&'static [Code]> {
    use Code::*;
    Some(match rpc {
        // Source incompatible (INVALID_ARGUMENT), source does not exist, volume exists but
        // is incompatible, cannot provision in the topology, unsupported capacity.
        "CreateVolume" => &[NotFound, AlreadyExists, ResourceExhausted, OutOfRange],
        // Volume in use. An id that names no volume is OK ("MUST reply 0 OK").
        "DeleteVolume" => &[FailedPrecondition],
        // Volume / node does not exist, published with incompatible capability, published
        // to another node, max volumes attached.
        "ControllerPublishVolume" => &[
            NotFound,
            AlreadyExists,
            FailedPrecondition,
            ResourceExhausted,
        ],
        // Volume / node does not exist (or OK when it can be regarded as unpublished).
        "ControllerUnpublishVolume" => &[NotFound],
        "ValidateVolumeCapabilities" => &[NotFound],
        // Invalid starting_token is ABORTED (in GENERAL).
        "ListVolumes" => &[],
        "GetCapacity" => &[],
        // Snapshot exists with another source, not enough space. NOT_FOUND for a source
        // volume that does not exist is not in the table, but is the answer every other
        // table gives for "volume does not exist", and the one external-snapshotter treats
        // as final; accepting it here keeps this test about the boundary, not wording.
        "CreateSnapshot" => &[AlreadyExists, ResourceExhausted, NotFound],
        // Snapshot in use. Unknown id is OK.
        "DeleteSnapshot" => &[FailedPrecondition],
        "ListSnapshots" => &[],
        "GetSnapshot" => &[NotFound],
        // Exceeds capabilities (INVALID_ARGUMENT), volume does not exist, volume in use,
        // unsupported capacity.
        "ControllerExpandVolume" => &[NotFound, FailedPrecondition, OutOfRange],
        "ControllerGetVolume" => &[NotFound],
        "ControllerModifyVolume" => &[NotFound],
        // Volume does not exist, published with incompatible capability, exceeds
        // capabilities.
        "NodeStageVolume" => &[NotFound, AlreadyExists, FailedPrecondition],
        "NodeUnstageVolume" => &[NotFound],
        // As stage, plus staging path not set (FAILED_PRECONDITION).
        "NodePublishVolume" => &[NotFound, AlreadyExists, FailedPrecondition],
        "NodeUnpublishVolume" => &[NotFound],
        "NodeGetVolumeStats" => &[NotFound],
        // Exceeds capabilities, volume not found, volume in use, unsupported capacity.
        "NodeExpandVolume" => &[NotFound, FailedPrecondition, OutOfRange],
        "ControllerGetCapabilities"
        | "NodeGetCapabilities"
        | "NodeGetInfo"
        | "controller/GetPluginInfo"
        | "controller/GetPluginCapabilities"
        | "controller/Probe"
        | "node/GetPluginInfo"
        | "node/GetPluginCapabilities"
        | "node/Probe" => return Some(&[]),
        _ => return None,
    })
}

/// Answers outside the spec's tables that this driver gives on purpose, each with its
/// reason. Kept apart from [`table`] so the deviation stays visible.
///
/// - NodeUnpublishVolume / NodeUnstageVolume: FAILED_PRECONDITION when the path holds a
///   mount or files the plugin did not make. The plugin never unmounts or deletes what is
///   not its own; the spec has no row for that case, and FAILED_PRECONDITION ("the system
///   is not in a state required for the operation") tells the CO that a retry cannot succeed
///   until someone else cleans up, where INVALID_ARGUMENT would blame a path the CO
///   generated correctly.
pub fn driver_extensions(rpc: &str) -> &'static [Code] {
    match rpc {
        "NodeUnpublishVolume" | "NodeUnstageVolume" => &[Code::FailedPrecondition],
        _ => &[],
    }
}

fn takes_input(rpc: &str) -> bool {
    !matches!(
        rpc,
        "ControllerGetCapabilities"
            | "NodeGetCapabilities"
            | "NodeGetInfo"
            | "controller/GetPluginInfo"
            | "controller/GetPluginCapabilities"
            | "controller/Probe"
            | "node/GetPluginInfo"
            | "node/GetPluginCapabilities"
            | "node/Probe"
    )
}

/// Why an answer is wrong. `class` groups findings for the report (and for shrinking: a
/// simpler request still fails "the same way" when its class is equal).
#[derive(Clone, Debug)]
pub struct Finding {
    pub class: String,
    pub detail: String,
}

fn bad_capability(c: &csi::VolumeCapability) -> bool {
    c.access_type.is_none() || c.access_mode.is_none()
}

/// A REQUIRED field that is empty: the spec's "Missing required field" → INVALID_ARGUMENT.
pub fn missing_required(call: &Call) -> Option<&'static str> {
    let cap = |c: &Option<csi::VolumeCapability>| c.as_ref().is_none_or(bad_capability);
    let caps = |v: &[csi::VolumeCapability]| v.is_empty() || v.iter().any(bad_capability);
    match call {
        Call::CreateVolume(r) if r.name.is_empty() => Some("name"),
        Call::CreateVolume(r) if caps(&r.volume_capabilities) => Some("volume_capabilities"),
        Call::DeleteVolume(r) if r.volume_id.is_empty() => Some("volume_id"),
        Call::ControllerPublishVolume(r) if r.volume_id.is_empty() => Some("volume_id"),
        Call::ControllerPublishVolume(r) if r.node_id.is_empty() => Some("node_id"),
        Call::ControllerPublishVolume(r) if cap(&r.volume_capability) => Some("volume_capability"),
        Call::ControllerUnpublishVolume(r) if r.volume_id.is_empty() => Some("volume_id"),
        Call::ValidateVolumeCapabilities(r) if r.volume_id.is_empty() => Some("volume_id"),
        Call::ValidateVolumeCapabilities(r) if caps(&r.volume_capabilities) => {
            Some("volume_capabilities")
        }
        Call::CreateSnapshot(r) if r.source_volume_id.is_empty() => Some("source_volume_id"),
        Call::CreateSnapshot(r) if r.name.is_empty() => Some("name"),
        Call::DeleteSnapshot(r) if r.snapshot_id.is_empty() => Some("snapshot_id"),
        Call::GetSnapshot(r) if r.snapshot_id.is_empty() => Some("snapshot_id"),
        Call::ControllerExpandVolume(r) if r.volume_id.is_empty() => Some("volume_id"),
        Call::ControllerExpandVolume(r) if r.capacity_range.is_none() => Some("capacity_range"),
        Call::ControllerGetVolume(r) if r.volume_id.is_empty() => Some("volume_id"),
        Call::ControllerModifyVolume(r) if r.volume_id.is_empty() => Some("volume_id"),
        Call::ControllerModifyVolume(r) if r.mutable_parameters.is_empty() => {
            Some("mutable_parameters")
        }
        Call::NodeStageVolume(r) if r.volume_id.is_empty() => Some("volume_id"),
        Call::NodeStageVolume(r) if r.staging_target_path.is_empty() => Some("staging_target_path"),
        Call::NodeStageVolume(r) if cap(&r.volume_capability) => Some("volume_capability"),
        Call::NodeUnstageVolume(r) if r.volume_id.is_empty() => Some("volume_id"),
        Call::NodeUnstageVolume(r) if r.staging_target_path.is_empty() => {
            Some("staging_target_path")
        }
        Call::NodePublishVolume(r) if r.volume_id.is_empty() => Some("volume_id"),
        Call::NodePublishVolume(r) if r.target_path.is_empty() => Some("target_path"),
        Call::NodePublishVolume(r) if cap(&r.volume_capability) => Some("volume_capability"),
        Call::NodeUnpublishVolume(r) if r.volume_id.is_empty() => Some("volume_id"),
        Call::NodeUnpublishVolume(r) if r.target_path.is_empty() => Some("target_path"),
        Call::NodeGetVolumeStats(r) if r.volume_id.is_empty() => Some("volume_id"),
        Call::NodeGetVolumeStats(r) if r.volume_path.is_empty() => Some("volume_path"),
        Call::NodeExpandVolume(r) if r.volume_id.is_empty() => Some("volume_id"),
        Call::NodeExpandVolume(r) if r.volume_path.is_empty() => Some("volume_path"),
        _ => None,
    }
}

/// A capacity range no volume can satisfy: a negative bound, or a limit below the
/// requirement. The spec answer is OUT_OF_RANGE (or INVALID_ARGUMENT); never OK.
fn impossible_range(r: Option<&csi::CapacityRange>) -> Option<String> {
    let r = r?;
    if r.required_bytes < 0 || r.limit_bytes < 0 {
        return Some("negative bound".into());
    }
    if r.limit_bytes > 0 && r.limit_bytes < r.required_bytes {
        return Some("limit below required".into());
    }
    None
}

fn range_of(call: &Call) -> Option<&csi::CapacityRange> {
    match call {
        Call::CreateVolume(r) => r.capacity_range.as_ref(),
        Call::ControllerExpandVolume(r) => r.capacity_range.as_ref(),
        Call::NodeExpandVolume(r) => r.capacity_range.as_ref(),
        _ => None,
    }
}

/// Judges one answer against the table and the request. `None` when it is allowed.
pub fn judge(call: &Call, outcome: &Outcome, unadvertised: &Unadvertised) -> Option<Finding> {
    let rpc = call.rpc();
    let finding = |class: String, detail: String| {
        Some(Finding {
            class: format!("{rpc}: {class}"),
            detail,
        })
    };
    let allowed = table(rpc).expect("every RPC has a table");
    match outcome {
        Outcome::Hang => finding(
            "no answer (hang)".into(),
            "no answer within the client deadline".into(),
        ),
        Outcome::Err { code, message } => {
            if *code == Code::Unimplemented && unadvertised.0.contains(rpc) {
                return None;
            }
            if let Some(field) = missing_required(call) {
                if *code != Code::InvalidArgument {
                    return finding(
                        format!("{} for missing {field}", code_name(*code)),
                        format!(
                            "spec: missing required field → INVALID_ARGUMENT; got {}: {message}",
                            code_name(*code)
                        ),
                    );
                }
                return None;
            }
            if message.is_empty() {
                return finding(
                    format!("{} without a message", code_name(*code)),
                    "spec: the status message MUST describe the error".into(),
                );
            }
            let in_table = takes_input(rpc)
                && (GENERAL.contains(code)
                    || allowed.contains(code)
                    || driver_extensions(rpc).contains(code));
            if in_table {
                None
            } else {
                finding(
                    code_name(*code).into(),
                    format!(
                        "{} is not in the spec's table for {rpc}: {message}",
                        code_name(*code)
                    ),
                )
            }
        }
        Outcome::Ok { capacities } => {
            if let Some(field) = missing_required(call) {
                return finding(
                    format!("OK for missing {field}"),
                    "spec: missing required field → INVALID_ARGUMENT".into(),
                );
            }
            if let Some(why) = impossible_range(range_of(call)) {
                return finding(
                    format!("OK for impossible capacity range ({why})"),
                    format!("{:?}", range_of(call)),
                );
            }
            if let Some(c) = capacities.iter().find(|c| **c < 0) {
                return finding(
                    "OK with a negative capacity".into(),
                    format!("reply reports {c} bytes"),
                );
            }
            if let (Call::CreateVolume(_) | Call::ControllerExpandVolume(_), Some(r), Some(&got)) =
                (call, range_of(call), capacities.first())
                && got != 0
                && (got < r.required_bytes || (r.limit_bytes > 0 && got > r.limit_bytes))
            {
                return finding(
                    "OK with a capacity outside the requested range".into(),
                    format!("asked {r:?}, got {got}"),
                );
            }
            None
        }
    }
}
