//! proptest strategies for hostile CSI requests.
//!
//! Every field a CO (or a tenant who controls StorageClasses, static PVs and the pods on a
//! node) can set is drawn from a mix of well-formed values (so requests get past the first
//! check and reach the infra API or the filesystem) and strings that have broken id and
//! path handling before: URL syntax, path syntax, NUL, whitespace, unicode, and lengths on
//! both sides of every limit we know of. Alternatives are ordered benign first, so that
//! shrinking a failing request moves it towards a valid one and leaves only the field that
//! matters hostile.

use std::collections::HashMap;

use csi::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
use csi_proto::v1 as csi;
use proptest::collection::{hash_map, vec};
use proptest::prelude::*;
use proptest::sample::select;
use proptest::strategy::{BoxedStrategy, Just, Union};

use super::Call;

pub const MIB: i64 = 1 << 20;

/// Alternatives with equal weight; shrinking moves towards the first.
pub fn one_of<T: std::fmt::Debug + 'static>(arms: Vec<BoxedStrategy<T>>) -> BoxedStrategy<T> {
    Union::new(arms).boxed()
}

fn weighted<T: std::fmt::Debug + 'static>(arms: Vec<(u32, BoxedStrategy<T>)>) -> BoxedStrategy<T> {
    Union::new_weighted(arms).boxed()
}

fn pick(items: &[&'static str]) -> BoxedStrategy<String> {
    select(items.to_vec()).prop_map(str::to_owned).boxed()
}

fn pick_owned(items: &[String]) -> BoxedStrategy<String> {
    select(items.to_vec()).boxed()
}

/// Pieces that mean something to a URL, a path, a shell, JSON or a label validator.
const FRAGMENTS: &[&str] = &[
    "a",
    "A",
    "0",
    "-",
    "_",
    ".",
    "..",
    "/",
    "?",
    "#",
    "%2F",
    "%2f",
    "%00",
    "%",
    "%zz",
    "/status",
    "/../",
    "/./",
    "//",
    " ",
    "\t",
    "\n",
    "\r\n",
    "\0",
    "\u{7f}",
    "\u{1b}[2J",
    "é",
    "ß",
    "\u{202e}",
    "\u{200b}",
    "\u{fffd}",
    "💥",
    "Ａ",
    "*",
    ":",
    "\\",
    "\"",
    "'",
    "{}",
    "$(id)",
    ";",
    "&",
    "=",
    ",",
    "~",
    "@",
    "+",
    "kvcsi-",
    "default",
    "kube-system",
    "tenant-f",
    "worker-0",
];

/// Suffixes that turned a real volume name into an alias of it (query, fragment,
/// subresource, encoded slash, trailing dot or whitespace).
const ALIAS_SUFFIXES: &[&str] = &[
    "?",
    "?x=1",
    "?watch=true",
    "?dryRun=All",
    "#",
    "#x",
    "/",
    "/status",
    "/x",
    "/..",
    "/.",
    "%2F",
    "%2Fstatus",
    "%3F",
    "%23",
    " ",
    "\0",
    ".",
    "..",
    "-",
    "x",
    "\n",
    "\t",
    "&",
    ";",
    ":",
    "\u{200b}",
];

const ALIAS_PREFIXES: &[&str] = &["/", "./", "../", " ", "%2F", "tenant-f/", "../tenant-g/"];

/// Lengths on both sides of DNS-1123 (63), CSI names (128), DNS subdomains (253), PATH_MAX
/// (4096), name lengths past any limit, and protobuf-ish 64 KiB.
const LENGTHS: &[usize] = &[
    63, 64, 128, 129, 253, 254, 255, 256, 4096, 5000, 65535, 65536, 65537,
];

/// Strings nothing should trust.
pub fn hostile() -> BoxedStrategy<String> {
    weighted(vec![
        (4, pick(FRAGMENTS)),
        (
            5,
            vec(pick(FRAGMENTS), 1..6)
                .prop_map(|parts| parts.concat())
                .boxed(),
        ),
        (
            2,
            vec(any::<char>(), 0..12)
                .prop_map(String::from_iter)
                .boxed(),
        ),
        (
            1,
            (select(LENGTHS.to_vec()), pick(&["a", "é", "-", "/", "a/"]))
                .prop_map(|(n, unit)| unit.repeat(n.div_ceil(unit.len())))
                .boxed(),
        ),
        (1, Just(String::new()).boxed()),
    ])
}

/// An id drawn from `real` (exact), an alias of one of them, or hostile.
pub fn id_from(real: &[String]) -> BoxedStrategy<String> {
    let real = real.to_vec();
    weighted(vec![
        (6, pick_owned(&real)),
        (
            5,
            (pick_owned(&real), pick(ALIAS_SUFFIXES))
                .prop_map(|(r, s)| r + &s)
                .boxed(),
        ),
        (
            1,
            (pick(ALIAS_PREFIXES), pick_owned(&real))
                .prop_map(|(p, r)| p + &r)
                .boxed(),
        ),
        (
            1,
            pick_owned(&real)
                .prop_map(|r| r.to_ascii_uppercase())
                .boxed(),
        ),
        (4, hostile()),
    ])
}

pub fn size() -> BoxedStrategy<i64> {
    weighted(vec![
        (3, Just(10 * MIB).boxed()),
        (3, Just(MIB).boxed()),
        (3, (1..64 * MIB).boxed()),
        (1, Just(0).boxed()),
        (1, Just(1).boxed()),
        (1, Just(-1).boxed()),
        (1, Just(i64::MAX).boxed()),
        (1, Just(i64::MAX - 1).boxed()),
        (1, Just(i64::MAX / 2 + 1).boxed()),
        (1, Just(i64::MIN).boxed()),
        (1, Just(1 << 40).boxed()),
        (1, Just(1 << 62).boxed()),
        (1, any::<i64>().boxed()),
    ])
}

/// None, or a range whose limit is unset, equal, smaller or larger.
pub fn capacity_range() -> BoxedStrategy<Option<csi::CapacityRange>> {
    weighted(vec![
        (
            6,
            size()
                .prop_map(|required_bytes| {
                    Some(csi::CapacityRange {
                        required_bytes,
                        limit_bytes: 0,
                    })
                })
                .boxed(),
        ),
        (1, Just(None).boxed()),
        (
            2,
            (size(), size())
                .prop_map(|(required_bytes, limit_bytes)| {
                    Some(csi::CapacityRange {
                        required_bytes,
                        limit_bytes,
                    })
                })
                .boxed(),
        ),
    ])
}

fn access_mode() -> BoxedStrategy<Option<AccessMode>> {
    // 1..=7 are the spec's modes, 0 is UNKNOWN, the rest are not in the enum.
    weighted(vec![
        (
            8,
            select(vec![1, 5, 2, 3, 4, 6, 7])
                .prop_map(|mode| Some(AccessMode { mode }))
                .boxed(),
        ),
        (1, Just(None).boxed()),
        (
            1,
            select(vec![0, -1, 8, 99, i32::MAX, i32::MIN])
                .prop_map(|mode| Some(AccessMode { mode }))
                .boxed(),
        ),
    ])
}

const FS_TYPES: &[&str] = &[
    "", "ext4", "xfs", "EXT4", "ext3", "ext2", "btrfs", "tmpfs", "proc", "sysfs", "nfs", "ntfs",
    "ext4,rw", "ext4\0", "ext4 ", "../ext4", "-F", "--help",
];

const MOUNT_FLAGS: &[&str] = &[
    "noatime",
    "ro",
    "rw",
    "nodiratime",
    "nosuid",
    "nodev",
    "noexec",
    "sync",
    "discard",
    "defaults",
    "bind",
    "rbind",
    "remount",
    "move",
    "shared",
    "rshared",
    "loop",
    "uid=0",
    "context=\"system_u:object_r:container_file_t:s0\"",
    "errors=remount-ro",
    "data=journal",
    "nouuid",
    "x-mount.mkdir",
    "suid",
    "dev",
    "exec",
    "ro,remount",
    "",
    ",",
    "=",
    "dax=always",
    "lazytime",
];

fn mount_volume() -> BoxedStrategy<AccessType> {
    (
        one_of(vec![pick(FS_TYPES), hostile()]),
        vec(one_of(vec![pick(MOUNT_FLAGS), hostile()]), 0..4),
        one_of(vec![
            Just(String::new()).boxed(),
            pick(&["1000", "0", "-1", "root", "4294967296"]),
            hostile(),
        ]),
    )
        .prop_map(|(fs_type, mount_flags, volume_mount_group)| {
            AccessType::Mount(MountVolume {
                fs_type,
                mount_flags,
                volume_mount_group,
            })
        })
        .boxed()
}

pub fn capability() -> BoxedStrategy<csi::VolumeCapability> {
    (
        weighted(vec![
            (
                4,
                Just(Some(AccessType::Mount(MountVolume::default()))).boxed(),
            ),
            (3, Just(Some(AccessType::Block(BlockVolume {}))).boxed()),
            (3, mount_volume().prop_map(Some).boxed()),
            (1, Just(None).boxed()),
        ]),
        access_mode(),
    )
        .prop_map(|(access_type, access_mode)| csi::VolumeCapability {
            access_type,
            access_mode,
        })
        .boxed()
}

/// A capability every part of the driver accepts for some volume, so that requests get
/// past capability checks to the code behind them.
pub fn benign_capability() -> BoxedStrategy<csi::VolumeCapability> {
    let mount = |fs: &str, mode: i32| csi::VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: fs.to_owned(),
            ..Default::default()
        })),
        access_mode: Some(AccessMode { mode }),
    };
    let block = |mode: i32| csi::VolumeCapability {
        access_type: Some(AccessType::Block(BlockVolume {})),
        access_mode: Some(AccessMode { mode }),
    };
    select(vec![
        mount("", 1),
        mount("ext4", 1),
        mount("xfs", 7),
        block(1),
        block(5),
        block(2),
    ])
    .boxed()
}

pub fn opt_capability() -> BoxedStrategy<Option<csi::VolumeCapability>> {
    weighted(vec![
        (6, benign_capability().prop_map(Some).boxed()),
        (6, capability().prop_map(Some).boxed()),
        (1, Just(None).boxed()),
    ])
}

/// None, one, or mount and block together, or three.
pub fn capabilities() -> BoxedStrategy<Vec<csi::VolumeCapability>> {
    weighted(vec![
        (8, vec(benign_capability(), 1..2).boxed()),
        (8, vec(capability(), 1..2).boxed()),
        (1, Just(Vec::new()).boxed()),
        (2, vec(capability(), 2..4).boxed()),
    ])
}

/// A map drawn from known keys and values, hostile ones, or one too big for any sane limit.
pub fn map(
    keys: &'static [&'static str],
    values: &'static [&'static str],
) -> BoxedStrategy<HashMap<String, String>> {
    let key = weighted(vec![(3, pick(keys)), (1, hostile())]);
    let value = weighted(vec![(3, pick(values)), (1, hostile())]);
    weighted(vec![
        (10, Just(HashMap::new()).boxed()),
        (8, hash_map(key, value, 1..5).boxed()),
        (
            1,
            (1usize..4)
                .prop_map(|wide| {
                    // 1000 or 2000 entries of 100 bytes, or one 256 KiB value.
                    if wide == 3 {
                        HashMap::from([("k".to_owned(), "v".repeat(256 << 10))])
                    } else {
                        (0..1000 * wide)
                            .map(|i| (format!("k{i}"), "v".repeat(100)))
                            .collect()
                    }
                })
                .boxed(),
        ),
    ])
}

pub const SC_KEYS: &[&str] = &[
    "infraStorageClassName",
    "bus",
    "csi.storage.k8s.io/pvc/name",
    "csi.storage.k8s.io/pvc/namespace",
    "csi.storage.k8s.io/pv/name",
    "csi.storage.k8s.io/fstype",
    "infraStorageClass",
    "storageClassName",
    "volumeMode",
];
pub const SC_VALUES: &[&str] = &[
    "fast",
    "slow",
    "standard",
    "virtio",
    "scsi",
    "sata",
    "ide",
    "",
    "forbidden",
    "Block",
    "fast ",
    "../fast",
    "FAST",
];
pub const SECRET_KEYS: &[&str] = &[
    "token",
    "password",
    "kubeconfig",
    "csi.storage.k8s.io/secret",
];
pub const SECRET_VALUES: &[&str] = &["x", "", "apiVersion: v1\nkind: Config\n"];
pub const CONTEXT_KEYS: &[&str] = &[
    "bus",
    "serial",
    "storage.kubernetes.io/csiProvisionerIdentity",
    "fsType",
];
pub const CONTEXT_VALUES: &[&str] = &[
    "virtio",
    "scsi",
    "sata",
    "ide",
    "kvabcdefghijklmnopqr",
    "ext4",
    "",
];

fn topology() -> BoxedStrategy<csi::Topology> {
    map(
        &["topology.kubernetes.io/zone", "kubernetes.io/hostname"],
        &["zone-a", "worker-0", ""],
    )
    .prop_map(|segments| csi::Topology { segments })
    .boxed()
}

fn topology_requirement() -> BoxedStrategy<Option<csi::TopologyRequirement>> {
    one_of(vec![
        Just(None).boxed(),
        Just(None).boxed(),
        Just(None).boxed(),
        (vec(topology(), 0..3), vec(topology(), 0..3))
            .prop_map(|(requisite, preferred)| {
                Some(csi::TopologyRequirement {
                    requisite,
                    preferred,
                })
            })
            .boxed(),
    ])
}

/// Ids and names the strategies draw from: real objects of the bed, so that exact ids reach
/// real objects and aliases of them are tried.
#[derive(Clone, Debug)]
pub struct Pools {
    /// Volume ids the fuzz may address exactly (and delete, expand, publish...); also the
    /// ids CreateVolume gives `create_names`. The first is the tenant's worker.
    pub volumes: Vec<String>,
    /// Volume ids of volumes the fuzz must never change: only aliases of them are sent.
    pub anchor_volumes: Vec<String>,
    /// Names of infra objects the driver did not create (foreign DataVolumes, claims, root
    /// disks of workers).
    pub foreign_names: Vec<String>,
    pub snapshots: Vec<String>,
    pub anchor_snapshots: Vec<String>,
    /// CSI names CreateVolume / CreateSnapshot may really create.
    pub create_names: Vec<String>,
    pub node_ids: Vec<String>,
    /// Node side.
    pub node: NodePools,
}

#[derive(Clone, Debug)]
pub struct NodePools {
    /// Absolute paths under the kubelet root: existing staging directories, target paths
    /// (whose parents exist), symlinks, a FIFO, files.
    pub paths: Vec<String>,
    /// The kubelet root itself (appended to, to build paths below it).
    pub kubelet: String,
    /// Volume ids the node side sees.
    pub volume_ids: Vec<String>,
    /// The serial of the one disk the fixture sysfs shows.
    pub serial: String,
}

impl Pools {
    fn any_volume(&self) -> BoxedStrategy<String> {
        let exact: Vec<String> = self
            .volumes
            .iter()
            .chain(&self.foreign_names)
            .cloned()
            .collect();
        // Anchors only ever appear altered.
        let anchors = self.anchor_volumes.clone();
        weighted(vec![
            // Volumes that exist (or that CreateVolume may have made), exactly: so that
            // publish, expand and delete get past the lookup with hostile other fields.
            (4, pick_owned(&self.volumes)),
            (6, id_from(&exact)),
            (
                3,
                (pick_owned(&anchors), pick(ALIAS_SUFFIXES))
                    .prop_map(|(r, s)| r + &s)
                    .boxed(),
            ),
            (
                1,
                pick_owned(&anchors)
                    .prop_map(|r| r.to_ascii_uppercase())
                    .boxed(),
            ),
        ])
    }

    fn any_snapshot(&self) -> BoxedStrategy<String> {
        let exact: Vec<String> = self
            .snapshots
            .iter()
            .chain(&self.foreign_names)
            .cloned()
            .collect();
        let anchors = self.anchor_snapshots.clone();
        weighted(vec![
            (6, id_from(&exact)),
            (
                3,
                (pick_owned(&anchors), pick(ALIAS_SUFFIXES))
                    .prop_map(|(r, s)| r + &s)
                    .boxed(),
            ),
        ])
    }

    fn node_id(&self) -> BoxedStrategy<String> {
        weighted(vec![
            (4, pick_owned(&self.node_ids[..1])),
            (5, id_from(&self.node_ids)),
        ])
    }

    fn create_name(&self) -> BoxedStrategy<String> {
        weighted(vec![
            (3, pick_owned(&self.create_names)),
            (4, id_from(&self.create_names)),
        ])
    }

    fn token(&self) -> BoxedStrategy<String> {
        let mut real = self.volumes.clone();
        real.extend(self.snapshots.iter().cloned());
        real.extend(self.anchor_volumes.iter().cloned());
        one_of(vec![Just(String::new()).boxed(), id_from(&real)])
    }

    fn content_source(&self) -> BoxedStrategy<Option<csi::VolumeContentSource>> {
        use csi::volume_content_source::{SnapshotSource, Type, VolumeSource};
        one_of(vec![
            Just(None).boxed(),
            Just(None).boxed(),
            Just(None).boxed(),
            Just(None).boxed(),
            self.any_snapshot()
                .prop_map(|snapshot_id| {
                    Some(csi::VolumeContentSource {
                        r#type: Some(Type::Snapshot(SnapshotSource { snapshot_id })),
                    })
                })
                .boxed(),
            self.any_volume()
                .prop_map(|volume_id| {
                    Some(csi::VolumeContentSource {
                        r#type: Some(Type::Volume(VolumeSource { volume_id })),
                    })
                })
                .boxed(),
            Just(Some(csi::VolumeContentSource { r#type: None })).boxed(),
        ])
    }

    /// A path for the node plugin: mostly below the kubelet root, sometimes climbing out,
    /// relative, with NUL, or too long. Every candidate stays inside the test's scratch
    /// directory even if the plugin failed to check it (see `NodePools::contained`).
    fn node_path(&self) -> BoxedStrategy<String> {
        let n = self.node.clone();
        let paths = n.paths.clone();
        let kubelet = n.kubelet.clone();
        let kubelet2 = n.kubelet.clone();
        let kubelet3 = n.kubelet.clone();
        weighted(vec![
            (12, pick_owned(&paths)),
            (
                3,
                (
                    pick_owned(&paths),
                    pick(&[
                        "/",
                        "//",
                        "/.",
                        "/..",
                        "/../..",
                        "/x",
                        "/\0",
                        "/ ",
                        "/%2F..",
                        "/kubevirt-csi-block.json",
                    ]),
                )
                    .prop_map(|(p, s)| p + &s)
                    .boxed(),
            ),
            (
                2,
                hostile()
                    .prop_map(move |h| format!("{kubelet}/{h}"))
                    .boxed(),
            ),
            // Relative: resolved against the plugin's working directory (a scratch dir).
            (1, hostile().prop_map(|h| h.replace('/', "")).boxed()),
            (1, Just(format!("{kubelet2}/{}", "a".repeat(5000))).boxed()),
            (1, Just(format!("{kubelet3}/{}", "a/".repeat(2100))).boxed()),
            (1, Just(n.kubelet.clone()).boxed()),
            (1, Just(String::new()).boxed()),
        ])
        .prop_map(move |p| n.contained(p))
        .boxed()
    }

    fn node_volume_id(&self) -> BoxedStrategy<String> {
        id_from(&self.node.volume_ids)
    }

    fn publish_context(&self) -> BoxedStrategy<HashMap<String, String>> {
        let serial = self.node.serial.clone();
        let s2 = serial.clone();
        one_of(vec![
            Just(HashMap::from([
                ("serial".to_owned(), serial.clone()),
                ("bus".to_owned(), "virtio".to_owned()),
            ]))
            .boxed(),
            Just(HashMap::from([
                ("serial".to_owned(), serial.clone()),
                ("bus".to_owned(), "virtio".to_owned()),
            ]))
            .boxed(),
            Just(HashMap::from([
                ("serial".to_owned(), serial.clone()),
                ("bus".to_owned(), "virtio".to_owned()),
            ]))
            .boxed(),
            Just(HashMap::from([("serial".to_owned(), serial.clone())])).boxed(),
            Just(HashMap::from([
                ("serial".to_owned(), "kvaaaaaaaaaaaaaaaaaa".to_owned()),
                ("bus".to_owned(), "virtio".to_owned()),
            ]))
            .boxed(),
            Just(HashMap::new()).boxed(),
            hostile()
                .prop_map(|s| HashMap::from([("serial".to_owned(), s)]))
                .boxed(),
            (pick(&["scsi", "sata", "ide", "", "VIRTIO"]), Just(s2))
                .prop_map(|(bus, serial)| {
                    HashMap::from([("serial".to_owned(), serial), ("bus".to_owned(), bus)])
                })
                .boxed(),
            map(CONTEXT_KEYS, CONTEXT_VALUES),
        ])
    }
}

impl NodePools {
    /// Keeps a generated path inside the scratch directory that holds the kubelet root: the
    /// plugin runs as root, and a path it failed to check must not reach the host's own
    /// files. Absolute paths that climb above the scratch directory are cut back to it.
    pub fn contained(&self, p: String) -> String {
        let scratch = std::path::Path::new(&self.kubelet)
            .parent()
            .expect("kubelet root has a parent")
            .to_string_lossy()
            .into_owned();
        if !p.starts_with('/') {
            return p;
        }
        let mut depth: Vec<&str> = Vec::new();
        for seg in p.split('/') {
            match seg {
                "" | "." => {}
                ".." => {
                    depth.pop();
                }
                s => depth.push(s),
            }
        }
        let normal = format!("/{}", depth.join("/"));
        if normal.starts_with(&scratch) {
            p
        } else {
            format!("{scratch}/outside/escaped")
        }
    }
}

/// One strategy per RPC, with its weight in the mix.
pub fn strategies(p: &Pools) -> Vec<(&'static str, u32, BoxedStrategy<Call>)> {
    let secrets = || map(SECRET_KEYS, SECRET_VALUES);
    let mut out: Vec<(&'static str, u32, BoxedStrategy<Call>)> = Vec::new();

    out.push((
        "CreateVolume",
        12,
        (
            p.create_name(),
            capacity_range(),
            capabilities(),
            map(SC_KEYS, SC_VALUES),
            secrets(),
            p.content_source(),
            topology_requirement(),
            map(&["iops", "bus"], &["100", "virtio"]),
        )
            .prop_map(
                |(
                    name,
                    capacity_range,
                    volume_capabilities,
                    parameters,
                    secrets,
                    src,
                    topo,
                    mutable,
                )| {
                    Call::CreateVolume(csi::CreateVolumeRequest {
                        name,
                        capacity_range,
                        volume_capabilities,
                        parameters,
                        secrets,
                        volume_content_source: src,
                        accessibility_requirements: topo,
                        mutable_parameters: mutable,
                    })
                },
            )
            .boxed(),
    ));
    out.push((
        "DeleteVolume",
        8,
        (p.any_volume(), secrets())
            .prop_map(|(volume_id, secrets)| {
                Call::DeleteVolume(csi::DeleteVolumeRequest { volume_id, secrets })
            })
            .boxed(),
    ));
    out.push((
        "ControllerPublishVolume",
        10,
        (
            p.any_volume(),
            p.node_id(),
            weighted(vec![
                (2, benign_capability().prop_map(Some).boxed()),
                (1, opt_capability()),
            ]),
            any::<bool>(),
            secrets(),
            weighted(vec![
                (2, Just(HashMap::new()).boxed()),
                (1, map(CONTEXT_KEYS, CONTEXT_VALUES)),
            ]),
        )
            .prop_map(
                |(volume_id, node_id, volume_capability, readonly, secrets, volume_context)| {
                    Call::ControllerPublishVolume(csi::ControllerPublishVolumeRequest {
                        volume_id,
                        node_id,
                        volume_capability,
                        readonly,
                        secrets,
                        volume_context,
                    })
                },
            )
            .boxed(),
    ));
    out.push((
        "ControllerUnpublishVolume",
        10,
        (
            p.any_volume(),
            one_of(vec![p.node_id(), Just(String::new()).boxed()]),
            secrets(),
        )
            .prop_map(|(volume_id, node_id, secrets)| {
                Call::ControllerUnpublishVolume(csi::ControllerUnpublishVolumeRequest {
                    volume_id,
                    node_id,
                    secrets,
                })
            })
            .boxed(),
    ));
    out.push((
        "ValidateVolumeCapabilities",
        6,
        (
            p.any_volume(),
            map(CONTEXT_KEYS, CONTEXT_VALUES),
            capabilities(),
            map(SC_KEYS, SC_VALUES),
            secrets(),
        )
            .prop_map(
                |(volume_id, volume_context, volume_capabilities, parameters, secrets)| {
                    Call::ValidateVolumeCapabilities(csi::ValidateVolumeCapabilitiesRequest {
                        volume_id,
                        volume_context,
                        volume_capabilities,
                        parameters,
                        secrets,
                        mutable_parameters: HashMap::new(),
                    })
                },
            )
            .boxed(),
    ));
    out.push((
        "ListVolumes",
        5,
        (
            one_of(vec![
                Just(0).boxed(),
                (1..5i32).boxed(),
                select(vec![-1, i32::MIN, i32::MAX]).boxed(),
            ]),
            p.token(),
        )
            .prop_map(|(max_entries, starting_token)| {
                Call::ListVolumes(csi::ListVolumesRequest {
                    max_entries,
                    starting_token,
                })
            })
            .boxed(),
    ));
    out.push((
        "GetCapacity",
        2,
        (
            capabilities(),
            map(SC_KEYS, SC_VALUES),
            proptest::option::of(topology()),
        )
            .prop_map(|(volume_capabilities, parameters, accessible_topology)| {
                Call::GetCapacity(csi::GetCapacityRequest {
                    volume_capabilities,
                    parameters,
                    accessible_topology,
                })
            })
            .boxed(),
    ));
    out.push((
        "ControllerGetCapabilities",
        1,
        Just(Call::ControllerGetCapabilities).boxed(),
    ));
    out.push((
        "CreateSnapshot",
        6,
        (
            p.any_volume(),
            p.create_name(),
            secrets(),
            map(
                &["snapshotClass", "infraSnapshotClassName"],
                &["fast-snap", "x", ""],
            ),
        )
            .prop_map(|(source_volume_id, name, secrets, parameters)| {
                Call::CreateSnapshot(csi::CreateSnapshotRequest {
                    source_volume_id,
                    name,
                    secrets,
                    parameters,
                })
            })
            .boxed(),
    ));
    out.push((
        "DeleteSnapshot",
        5,
        (p.any_snapshot(), secrets())
            .prop_map(|(snapshot_id, secrets)| {
                Call::DeleteSnapshot(csi::DeleteSnapshotRequest {
                    snapshot_id,
                    secrets,
                })
            })
            .boxed(),
    ));
    out.push((
        "ListSnapshots",
        5,
        (
            one_of(vec![
                Just(0).boxed(),
                (1..5i32).boxed(),
                select(vec![-1, i32::MIN, i32::MAX]).boxed(),
            ]),
            p.token(),
            one_of(vec![Just(String::new()).boxed(), p.any_volume()]),
            one_of(vec![Just(String::new()).boxed(), p.any_snapshot()]),
            secrets(),
        )
            .prop_map(
                |(max_entries, starting_token, source_volume_id, snapshot_id, secrets)| {
                    Call::ListSnapshots(csi::ListSnapshotsRequest {
                        max_entries,
                        starting_token,
                        source_volume_id,
                        snapshot_id,
                        secrets,
                    })
                },
            )
            .boxed(),
    ));
    out.push((
        "GetSnapshot",
        2,
        (p.any_snapshot(), secrets())
            .prop_map(|(snapshot_id, secrets)| {
                Call::GetSnapshot(csi::GetSnapshotRequest {
                    snapshot_id,
                    secrets,
                })
            })
            .boxed(),
    ));
    out.push((
        "ControllerExpandVolume",
        7,
        (
            p.any_volume(),
            capacity_range(),
            secrets(),
            opt_capability(),
        )
            .prop_map(|(volume_id, capacity_range, secrets, volume_capability)| {
                Call::ControllerExpandVolume(csi::ControllerExpandVolumeRequest {
                    volume_id,
                    capacity_range,
                    secrets,
                    volume_capability,
                })
            })
            .boxed(),
    ));
    out.push((
        "ControllerGetVolume",
        5,
        p.any_volume()
            .prop_map(|volume_id| {
                Call::ControllerGetVolume(csi::ControllerGetVolumeRequest { volume_id })
            })
            .boxed(),
    ));
    out.push((
        "ControllerModifyVolume",
        2,
        (
            p.any_volume(),
            secrets(),
            map(&["iops", "bus"], &["100", "virtio"]),
        )
            .prop_map(|(volume_id, secrets, mutable_parameters)| {
                Call::ControllerModifyVolume(csi::ControllerModifyVolumeRequest {
                    volume_id,
                    secrets,
                    mutable_parameters,
                })
            })
            .boxed(),
    ));
    for target in [super::Plugin::Controller, super::Plugin::Node] {
        let name = match target {
            super::Plugin::Controller => [
                "controller/GetPluginInfo",
                "controller/GetPluginCapabilities",
                "controller/Probe",
            ],
            super::Plugin::Node => [
                "node/GetPluginInfo",
                "node/GetPluginCapabilities",
                "node/Probe",
            ],
        };
        out.push((name[0], 1, Just(Call::GetPluginInfo(target)).boxed()));
        out.push((
            name[1],
            1,
            Just(Call::GetPluginCapabilities(target)).boxed(),
        ));
        out.push((name[2], 1, Just(Call::Probe(target)).boxed()));
    }

    // Node.
    out.push((
        "NodeStageVolume",
        9,
        (
            p.node_volume_id(),
            p.publish_context(),
            p.node_path(),
            opt_capability(),
            secrets(),
            map(CONTEXT_KEYS, CONTEXT_VALUES),
        )
            .prop_map(
                |(
                    volume_id,
                    publish_context,
                    staging_target_path,
                    volume_capability,
                    secrets,
                    volume_context,
                )| {
                    Call::NodeStageVolume(csi::NodeStageVolumeRequest {
                        volume_id,
                        publish_context,
                        staging_target_path,
                        volume_capability,
                        secrets,
                        volume_context,
                    })
                },
            )
            .boxed(),
    ));
    out.push((
        "NodeUnstageVolume",
        6,
        (p.node_volume_id(), p.node_path())
            .prop_map(|(volume_id, staging_target_path)| {
                Call::NodeUnstageVolume(csi::NodeUnstageVolumeRequest {
                    volume_id,
                    staging_target_path,
                })
            })
            .boxed(),
    ));
    out.push((
        "NodePublishVolume",
        9,
        (
            p.node_volume_id(),
            p.publish_context(),
            p.node_path(),
            p.node_path(),
            opt_capability(),
            any::<bool>(),
            (secrets(), map(CONTEXT_KEYS, CONTEXT_VALUES)),
        )
            .prop_map(
                |(
                    volume_id,
                    publish_context,
                    staging_target_path,
                    target_path,
                    volume_capability,
                    readonly,
                    (secrets, volume_context),
                )| {
                    Call::NodePublishVolume(csi::NodePublishVolumeRequest {
                        volume_id,
                        publish_context,
                        staging_target_path,
                        target_path,
                        volume_capability,
                        readonly,
                        secrets,
                        volume_context,
                    })
                },
            )
            .boxed(),
    ));
    out.push((
        "NodeUnpublishVolume",
        6,
        (p.node_volume_id(), p.node_path())
            .prop_map(|(volume_id, target_path)| {
                Call::NodeUnpublishVolume(csi::NodeUnpublishVolumeRequest {
                    volume_id,
                    target_path,
                })
            })
            .boxed(),
    ));
    out.push((
        "NodeGetVolumeStats",
        5,
        (
            p.node_volume_id(),
            p.node_path(),
            one_of(vec![Just(String::new()).boxed(), p.node_path()]),
        )
            .prop_map(|(volume_id, volume_path, staging_target_path)| {
                Call::NodeGetVolumeStats(csi::NodeGetVolumeStatsRequest {
                    volume_id,
                    volume_path,
                    staging_target_path,
                })
            })
            .boxed(),
    ));
    out.push((
        "NodeExpandVolume",
        5,
        (
            p.node_volume_id(),
            p.node_path(),
            capacity_range(),
            one_of(vec![Just(String::new()).boxed(), p.node_path()]),
            opt_capability(),
            secrets(),
        )
            .prop_map(
                |(
                    volume_id,
                    volume_path,
                    capacity_range,
                    staging_target_path,
                    volume_capability,
                    secrets,
                )| {
                    Call::NodeExpandVolume(csi::NodeExpandVolumeRequest {
                        volume_id,
                        volume_path,
                        capacity_range,
                        staging_target_path,
                        volume_capability,
                        secrets,
                    })
                },
            )
            .boxed(),
    ));
    out.push((
        "NodeGetCapabilities",
        1,
        Just(Call::NodeGetCapabilities).boxed(),
    ));
    out.push(("NodeGetInfo", 1, Just(Call::NodeGetInfo).boxed()));
    out
}
