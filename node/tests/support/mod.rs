//! Shared test scaffolding: real loop devices, a sysfs fixture that points at them, and
//! guards that clean up mounts and loop devices even when a test fails.
#![allow(dead_code)]

use std::collections::HashMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use csi_proto::v1::volume_capability::access_mode::Mode;
use csi_proto::v1::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
use csi_proto::v1::{
    NodePublishVolumeRequest, NodeStageVolumeRequest, NodeUnpublishVolumeRequest,
    NodeUnstageVolumeRequest, VolumeCapability,
};
use kubevirt_csi_node::config::NodeConfig;
use kubevirt_csi_node::devno::DevNo;
use kubevirt_csi_node::discovery::Sysfs;
use kubevirt_csi_node::mountinfo::MountTable;
use kubevirt_csi_node::node_service::NodeService;
use kubevirt_csi_node::paths::KubeletRoot;
use kubevirt_csi_node::state::StateDir;
use nix::mount::{MntFlags, umount2};

/// Finds a tool the way the plugin does, failing the test loudly when it is missing.
pub fn require_tool(tool: &'static str) -> PathBuf {
    kubevirt_csi_node::fs::find_tool(tool).unwrap_or_else(|e| {
        panic!("{e}: install it (hack/tools.sh installs e2fsprogs, xfsprogs, util-linux)")
    })
}

fn run(tool: &'static str, args: &[&str]) -> String {
    let out = Command::new(require_tool(tool))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {tool}: {e}"));
    assert!(
        out.status.success(),
        "{tool} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A loop device over a sparse file; detached on drop.
#[derive(Debug)]
pub struct LoopDevice {
    pub dev: PathBuf,
    pub devno: DevNo,
    pub backing: PathBuf,
}

impl LoopDevice {
    pub fn new(backing: PathBuf, size: u64) -> Self {
        std::fs::File::create(&backing)
            .and_then(|f| f.set_len(size))
            .expect("create backing file");
        let dev = PathBuf::from(run(
            "losetup",
            &["--find", "--show", backing.to_str().expect("utf-8 path")],
        ));
        let meta = std::fs::metadata(&dev).expect("stat loop device");
        assert!(meta.file_type().is_block_device());
        Self {
            devno: DevNo::from_raw(meta.rdev()),
            dev,
            backing,
        }
    }

    pub fn name(&self) -> String {
        self.dev
            .file_name()
            .and_then(|n| n.to_str())
            .expect("loop name")
            .to_owned()
    }

    /// Grows the backing file and tells the loop driver, as a hypervisor resize would.
    pub fn grow(&self, size: u64) {
        std::fs::OpenOptions::new()
            .write(true)
            .open(&self.backing)
            .and_then(|f| f.set_len(size))
            .expect("grow backing file");
        run(
            "losetup",
            &["--set-capacity", self.dev.to_str().expect("utf-8 path")],
        );
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

/// Unmounts everything below a directory on drop, deepest first, so a failing test leaves
/// no mounts behind (and the loop devices under them can be detached).
#[derive(Debug)]
pub struct MountSweeper(pub PathBuf);

impl Drop for MountSweeper {
    fn drop(&mut self) {
        for _ in 0..8 {
            let Ok(table) = MountTable::read() else {
                return;
            };
            let mut under: Vec<PathBuf> = table
                .entries
                .iter()
                .map(|e| e.mount_point.clone())
                .filter(|m| m.starts_with(&self.0))
                .collect();
            if under.is_empty() {
                return;
            }
            under.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
            for m in under {
                let _ = umount2(&m, MntFlags::MNT_DETACH);
            }
        }
    }
}

/// One test's world: a kubelet root, a sysfs fixture naming real loop devices, and the
/// node service configured on both. Fields drop in order: mounts, then loop devices,
/// then the directory.
pub struct Env {
    sweeper: MountSweeper,
    pub disks: Vec<LoopDevice>,
    pub dir: tempfile::TempDir,
    pub kubelet: PathBuf,
    pub sysfs: PathBuf,
    pub state_dir: PathBuf,
    pub timeout: Duration,
    pub svc: NodeService,
}

fn config(kubelet: &Path, sysfs: &Path, state_dir: &Path, timeout: Duration) -> NodeConfig {
    NodeConfig {
        node_id: "tenant-ns/vm-1".parse().expect("node id"),
        kubelet_root: KubeletRoot::new(kubelet.to_owned()).with_state_dir(state_dir),
        state: StateDir::open(state_dir, kubelet).expect("state dir"),
        sysfs: Sysfs::new(sysfs, "/dev"),
        discovery_timeout: timeout,
        max_volumes_per_node: 255,
    }
}

pub const GIB: u64 = 1 << 30;
pub const MIB: u64 = 1 << 20;

impl Env {
    pub fn new() -> Self {
        Self::with_timeout(Duration::from_secs(10))
    }

    pub fn with_timeout(timeout: Duration) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("kvcsi-node-")
            .tempdir()
            .expect("tempdir");
        let root = std::fs::canonicalize(dir.path()).expect("canonical tempdir");
        let kubelet = root.join("kubelet");
        let sysfs = root.join("sys");
        std::fs::create_dir_all(&kubelet).expect("kubelet dir");
        std::fs::create_dir_all(sysfs.join("block")).expect("sysfs dir");
        let state_dir = root.join("state");
        let cfg = config(&kubelet, &sysfs, &state_dir, timeout);
        Self {
            sweeper: MountSweeper(root),
            disks: Vec::new(),
            dir,
            kubelet,
            sysfs,
            state_dir,
            timeout,
            svc: NodeService::new(cfg),
        }
    }

    /// A node service as a restarted plugin would be: same kubelet root and sysfs, its
    /// state read from `state_dir` (the test's own for a restart, a fresh one for the first
    /// start of a version that records its mounts).
    pub fn restarted(&self, state_dir: &Path) -> NodeService {
        NodeService::new(config(&self.kubelet, &self.sysfs, state_dir, self.timeout))
    }

    /// A loop device that the fixture sysfs shows with `serial` (virtio-style `serial`
    /// attribute), so discovery finds a real disk.
    pub fn add_disk(&mut self, serial: &str, size: u64) -> usize {
        let idx = self.disks.len();
        let disk = LoopDevice::new(self.dir.path().join(format!("disk{idx}.img")), size);
        let block = self.sysfs.join("block").join(disk.name());
        std::fs::create_dir_all(&block).expect("fixture disk dir");
        std::fs::write(block.join("dev"), format!("{}\n", disk.devno)).expect("dev");
        std::fs::write(block.join("size"), format!("{}\n", size / 512)).expect("size");
        std::fs::write(block.join("serial"), serial).expect("serial");
        self.disks.push(disk);
        idx
    }

    /// Makes the fixture forget a disk, as if it had been unplugged.
    pub fn unplug_from_sysfs(&self, idx: usize) {
        std::fs::remove_dir_all(self.sysfs.join("block").join(self.disks[idx].name()))
            .expect("remove fixture disk");
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.kubelet.join(rel)
    }

    pub fn mkdir(&self, rel: &str) -> PathBuf {
        let p = self.path(rel);
        std::fs::create_dir_all(&p).expect("mkdir");
        p
    }
}

pub fn mount_cap(fs_type: &str, flags: &[&str], mode: Mode) -> VolumeCapability {
    VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: fs_type.to_owned(),
            mount_flags: flags.iter().map(|s| (*s).to_owned()).collect(),
            volume_mount_group: String::new(),
        })),
        access_mode: Some(AccessMode { mode: mode as i32 }),
    }
}

pub fn block_cap(mode: Mode) -> VolumeCapability {
    VolumeCapability {
        access_type: Some(AccessType::Block(BlockVolume {})),
        access_mode: Some(AccessMode { mode: mode as i32 }),
    }
}

pub fn publish_context(serial: &str) -> HashMap<String, String> {
    HashMap::from([("serial".to_owned(), serial.to_owned())])
}

pub fn stage_req(
    volume_id: &str,
    staging: &Path,
    serial: &str,
    cap: VolumeCapability,
) -> NodeStageVolumeRequest {
    NodeStageVolumeRequest {
        volume_id: volume_id.to_owned(),
        publish_context: publish_context(serial),
        staging_target_path: staging.to_str().expect("utf-8").to_owned(),
        volume_capability: Some(cap),
        ..Default::default()
    }
}

pub fn publish_req(
    volume_id: &str,
    staging: &Path,
    target: &Path,
    cap: VolumeCapability,
    readonly: bool,
) -> NodePublishVolumeRequest {
    NodePublishVolumeRequest {
        volume_id: volume_id.to_owned(),
        staging_target_path: staging.to_str().expect("utf-8").to_owned(),
        target_path: target.to_str().expect("utf-8").to_owned(),
        volume_capability: Some(cap),
        readonly,
        ..Default::default()
    }
}

pub fn unpublish_req(volume_id: &str, target: &Path) -> NodeUnpublishVolumeRequest {
    NodeUnpublishVolumeRequest {
        volume_id: volume_id.to_owned(),
        target_path: target.to_str().expect("utf-8").to_owned(),
    }
}

pub fn unstage_req(volume_id: &str, staging: &Path) -> NodeUnstageVolumeRequest {
    NodeUnstageVolumeRequest {
        volume_id: volume_id.to_owned(),
        staging_target_path: staging.to_str().expect("utf-8").to_owned(),
    }
}

/// The topmost mount at exactly `path`, if any.
pub fn mount_at(path: &Path) -> Option<kubevirt_csi_node::mountinfo::MountEntry> {
    MountTable::read().expect("mountinfo").top_at(path).cloned()
}

/// `blkid -p` TYPE of a device, or "" when blank.
pub fn fs_type_on(dev: &Path) -> String {
    let out = Command::new(require_tool("blkid"))
        .args(["-p", "-o", "value", "-s", "TYPE"])
        .arg(dev)
        .output()
        .expect("blkid");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

pub fn format(tool: &'static str, dev: &Path) {
    let args: &[&str] = if tool == "mkfs.ext4" {
        &["-F", "-q"]
    } else {
        &["-q", "-f"]
    };
    let mut all: Vec<&str> = args.to_vec();
    all.push(dev.to_str().expect("utf-8"));
    run(tool, &all);
}
