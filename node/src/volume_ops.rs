//! What each Node RPC does to the machine, as plain blocking functions.
//!
//! The gRPC layer (`node_service`) validates requests into the types here and runs these
//! on the blocking pool. Every function is idempotent: it first looks at what the kernel
//! says is already there (mountinfo, stat, sysfs) and only then acts.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use nix::mount::MsFlags;

use crate::config::NodeConfig;
use crate::context::Bus;
use crate::devno::DevNo;
use crate::discovery::{DiscoveryError, Disk};
use crate::error::NodeError;
use crate::fs::{FsType, Signature, probe};
use crate::mountinfo::{MountEntry, MountTable};
use crate::mounts::{MountOptions, bind, mount_device, remount_bind, unmount};
use crate::paths::{Kind, PathError, Resolved, create_in, remove_in};
use crate::state::{MountedAs, StagedBlock, StateError};
use crate::uevent::{DiskEvents, UeventSocket};

/// Mount or raw block, as the volume capability asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    Mount { fs: FsType, options: MountOptions },
    Block,
}

#[derive(Debug, Clone)]
pub struct Stage {
    pub volume_id: String,
    pub staging_path: PathBuf,
    pub serial: String,
    pub bus: Option<Bus>,
    pub access: Access,
    /// A reader-only access mode: the filesystem is mounted read-only.
    pub read_only: bool,
}

#[derive(Debug, Clone)]
pub struct Publish {
    pub volume_id: String,
    pub staging_path: PathBuf,
    pub target_path: PathBuf,
    pub access: Access,
    pub read_only: bool,
    /// From the publish context; must agree with what NodeStage recorded.
    pub serial: Option<String>,
}

/// Usage of a published volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeStats {
    pub bytes: Usage,
    pub inodes: Option<Usage>,
    /// `Some(message)` when the volume is unhealthy.
    pub abnormal: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub total: u64,
    pub available: u64,
    pub used: u64,
}

/// Where earlier versions kept a staged block volume's record: in the staging directory.
/// Never read any more (for a filesystem volume that directory is the tenant's filesystem);
/// only removed from a block volume's unmounted staging directory on unstage, so kubelet
/// can remove the directory.
pub const LEGACY_BLOCK_FILE: &str = "kubevirt-csi-block.json";

fn io_err(
    volume_id: &str,
    action: &'static str,
    path: &Path,
) -> impl FnOnce(std::io::Error) -> NodeError {
    let (volume_id, path) = (volume_id.to_owned(), path.to_owned());
    move |source| NodeError::Io {
        volume_id,
        action,
        path,
        source,
    }
}

fn discovery_err(volume_id: &str) -> impl FnOnce(DiscoveryError) -> NodeError {
    let volume_id = volume_id.to_owned();
    move |source| NodeError::Discovery { volume_id, source }
}

fn mount_err(volume_id: &str) -> impl FnOnce(crate::mounts::MountError) -> NodeError {
    let volume_id = volume_id.to_owned();
    move |source| NodeError::Mount { volume_id, source }
}

/// Waits for the disk with `serial`: subscribe to uevents first, then scan, then wait.
fn discover(
    cfg: &NodeConfig,
    volume_id: &str,
    serial: &str,
    bus: Option<Bus>,
) -> Result<Disk, NodeError> {
    let mut socket = match UeventSocket::subscribe() {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot subscribe to kernel uevents; scanning sysfs once");
            None
        }
    };
    let events = socket.as_mut().map(|s| s as &mut dyn DiskEvents);
    let disk = cfg
        .sysfs
        .wait_for(serial, bus, events, cfg.discovery_timeout)
        .map_err(discovery_err(volume_id))?;
    tracing::debug!(disk = %disk.name, devno = %disk.devno, "found disk by serial");
    Ok(disk)
}

fn state_err(volume_id: &str) -> impl FnOnce(StateError) -> NodeError {
    let volume_id = volume_id.to_owned();
    move |source| NodeError::State { volume_id, source }
}

fn describe(m: &MountEntry) -> String {
    format!("{} ({}, {})", m.source, m.fs_type, m.devno)
}

/// A symlink where the CO must give a directory or file: refused, never followed.
fn no_symlink(field: &'static str, path: &Path, r: &Resolved) -> Result<(), NodeError> {
    match r.kind {
        Kind::Symlink => Err(PathError::Symlink {
            field,
            path: path.to_owned(),
        }
        .into()),
        _ => Ok(()),
    }
}

/// NodeStage: find the disk, format it if (and only if) it is blank, mount it. Nothing
/// inside the staging directory is read: whether the volume is staged comes from mountinfo
/// and the plugin's own records.
pub fn stage(cfg: &NodeConfig, req: &Stage) -> Result<(), NodeError> {
    let disk = discover(cfg, &req.volume_id, &req.serial, req.bus)?;
    let staging = cfg
        .kubelet_root
        .create_dir_all("staging_target_path", &req.staging_path)?;
    let table = MountTable::read()?;
    let mounted = table.top_at(&staging.real);
    let record = cfg
        .state
        .staged_block(&staging.real)
        .map_err(state_err(&req.volume_id))?;
    let expected = || format!("{} ({})", disk.dev_path.display(), disk.devno);
    match &req.access {
        Access::Block => {
            if let Some(m) = mounted {
                return Err(NodeError::DifferentDevice {
                    volume_id: req.volume_id.clone(),
                    path: staging.real.clone(),
                    found: describe(m),
                    expected: "no mount (block volume)".into(),
                });
            }
            match record {
                Some(old) if old.serial == req.serial => Ok(()),
                Some(old) => Err(NodeError::DifferentDevice {
                    volume_id: req.volume_id.clone(),
                    path: staging.real.clone(),
                    found: format!("staged block disk with serial {}", old.serial),
                    expected: expected(),
                }),
                None => cfg
                    .state
                    .put_staged_block(&StagedBlock {
                        staging_path: staging.real.clone(),
                        volume_id: req.volume_id.clone(),
                        serial: req.serial.clone(),
                        bus: req.bus,
                    })
                    .map_err(state_err(&req.volume_id)),
            }
        }
        Access::Mount { fs, options } => {
            let ours = MountedAs::Filesystem {
                devno: disk.devno,
                root: PathBuf::from("/"),
            };
            if let Some(m) = mounted {
                if m.devno == disk.devno {
                    // This volume's disk, at the path the CO gave for it: a retry if we
                    // recorded it.
                    return require_recorded(cfg, &req.volume_id, &staging.real, m, ours);
                }
                return Err(NodeError::DifferentDevice {
                    volume_id: req.volume_id.clone(),
                    path: staging.real.clone(),
                    found: describe(m),
                    expected: expected(),
                });
            }
            if record.is_some() {
                return Err(NodeError::Incompatible {
                    volume_id: req.volume_id.clone(),
                    path: staging.real.clone(),
                    reason: "as a block volume".into(),
                });
            }
            let fs_err = |action: String| {
                let volume_id = req.volume_id.clone();
                move |source: crate::fs::FsError| NodeError::Fs {
                    volume_id,
                    action,
                    source: Box::new(source),
                }
            };
            match probe(&disk.dev_path).map_err(fs_err(format!(
                "checking {:?} for signatures",
                disk.dev_path
            )))? {
                Signature::Blank => {
                    tracing::info!(device = ?disk.dev_path, fs = fs.as_str(), "formatting blank disk");
                    fs.format(&disk.dev_path).map_err(fs_err(format!(
                        "formatting {:?} as {}",
                        disk.dev_path,
                        fs.as_str()
                    )))?;
                }
                Signature::Filesystem(found) if found == fs.as_str() => {}
                Signature::Filesystem(found) | Signature::Other(found) => {
                    return Err(NodeError::DiskNotBlank {
                        volume_id: req.volume_id.clone(),
                        device: disk.dev_path,
                        found,
                        requested: fs.as_str(),
                    });
                }
            }
            let mut options = options.clone();
            options
                .data
                .extend(fs.default_data_options().iter().map(|s| (*s).to_owned()));
            if req.read_only {
                options.flags.insert(MsFlags::MS_RDONLY);
            }
            cfg.state
                .put_mount(&staging.real, &req.volume_id, ours)
                .map_err(state_err(&req.volume_id))?;
            mount_device(&disk.dev_path, &staging.proc_path(), fs.as_str(), &options)
                .map_err(|e| forget_failed(cfg, &staging.real, mount_err(&req.volume_id)(e)))
        }
    }
}

/// Drops the record written ahead of a mount that did not happen (a record without a mount
/// is harmless, but a later mount of the same disk there by someone else would match it).
fn forget_failed(cfg: &NodeConfig, path: &Path, err: NodeError) -> NodeError {
    if let Err(e) = cfg.state.remove_mount(path) {
        tracing::warn!(path = ?path, error = %crate::error::chain(&e), "cannot remove the record of a failed mount");
    }
    err
}

/// The mount at `path` looks like this volume's: it is ours only if we recorded it. The
/// record is written before every mount we make, so an unrecorded one (after the one-time
/// adoption of an earlier version's mounts at start-up) was made by someone else, even on
/// this volume's own disk, and must never be adopted and later unmounted.
fn require_recorded(
    cfg: &NodeConfig,
    volume_id: &str,
    path: &Path,
    mounted: &crate::mountinfo::MountEntry,
    how: MountedAs,
) -> Result<(), NodeError> {
    if cfg
        .state
        .mount(path)
        .map_err(state_err(volume_id))?
        .is_some_and(|r| r.mounted_as == how)
    {
        return Ok(());
    }
    Err(NodeError::NotOurs {
        volume_id: volume_id.to_owned(),
        path: path.to_owned(),
        fs_type: mounted.fs_type.clone(),
        source_desc: mounted.source.clone(),
    })
}

/// NodePublish: bind the staged filesystem (or the disk's device node) onto the target.
pub fn publish(cfg: &NodeConfig, req: &Publish) -> Result<(), NodeError> {
    let not_staged = || NodeError::NotStaged {
        volume_id: req.volume_id.clone(),
        staging_path: req.staging_path.clone(),
    };
    let staging = cfg
        .kubelet_root
        .open("staging_target_path", &req.staging_path)?
        .ok_or_else(not_staged)?;
    no_symlink("staging_target_path", &req.staging_path, &staging)?;
    if staging.kind != Kind::Directory {
        return Err(not_staged());
    }
    let table = MountTable::read()?;
    let mut flags = match &req.access {
        Access::Mount { options, .. } => options.per_mount_flags(),
        Access::Block => MsFlags::empty(),
    };
    if req.read_only {
        flags.insert(MsFlags::MS_RDONLY);
    }
    match &req.access {
        Access::Mount { .. } => {
            let staged = table
                .top_at(&staging.real)
                .filter(|m| !m.devno.is_anonymous())
                .ok_or_else(not_staged)?;
            let ours = MountedAs::Filesystem {
                devno: staged.devno,
                root: staged.root.clone(),
            };
            let target = prepare_target(cfg, req, true)?;
            if let Some(m) = table.top_at(&target.real) {
                if m.devno != staged.devno || m.root != staged.root {
                    return Err(NodeError::DifferentDevice {
                        volume_id: req.volume_id.clone(),
                        path: target.real.clone(),
                        found: describe(m),
                        expected: describe(staged),
                    });
                }
                same_read_only(req, &target.real, m.mount_is_read_only())?;
                return require_recorded(cfg, &req.volume_id, &target.real, m, ours);
            }
            cfg.state
                .put_mount(&target.real, &req.volume_id, ours)
                .map_err(state_err(&req.volume_id))?;
            // The staging descriptor was opened with the staging mount in place, so it is
            // that mount's root: exactly what gets bound.
            bind(&staging.proc_path(), &target.proc_path())
                .map_err(|e| forget_failed(cfg, &target.real, mount_err(&req.volume_id)(e)))?;
            apply_flags(cfg, req, target, flags)
        }
        Access::Block => {
            let record = cfg
                .state
                .staged_block(&staging.real)
                .map_err(state_err(&req.volume_id))?
                .ok_or_else(not_staged)?;
            if let Some(serial) = req.serial.as_deref().filter(|s| *s != record.serial) {
                return Err(NodeError::DifferentDevice {
                    volume_id: req.volume_id.clone(),
                    path: staging.real.clone(),
                    found: format!("staged block disk with serial {}", record.serial),
                    expected: format!("serial {serial}"),
                });
            }
            let disk = discover(cfg, &req.volume_id, &record.serial, record.bus)?;
            let ours = MountedAs::Device { rdev: disk.devno };
            let target = prepare_target(cfg, req, false)?;
            if let Some(m) = table.top_at(&target.real) {
                if target.rdev() != Some(disk.devno) {
                    return Err(NodeError::DifferentDevice {
                        volume_id: req.volume_id.clone(),
                        path: target.real.clone(),
                        found: describe(m),
                        expected: format!("{} ({})", disk.dev_path.display(), disk.devno),
                    });
                }
                same_read_only(req, &target.real, m.mount_is_read_only())?;
                return require_recorded(cfg, &req.volume_id, &target.real, m, ours);
            }
            cfg.state
                .put_mount(&target.real, &req.volume_id, ours)
                .map_err(state_err(&req.volume_id))?;
            // MS_RDONLY on this bind is what the spec asks for, but the kernel does not stop
            // writes through a device node on a read-only mount; enforcing it would take
            // BLKROSET on the whole disk, which would also hit read-write publishes of the
            // same volume on this node.
            bind(&disk.dev_path, &target.proc_path())
                .map_err(|e| forget_failed(cfg, &target.real, mount_err(&req.volume_id)(e)))?;
            apply_flags(cfg, req, target, flags)
        }
    }
}

/// Applies per-mount flags to a fresh bind at the target. The descriptor taken before the
/// bind names the directory under it, so the target is resolved again to reach the new
/// mount. If the flags cannot be applied the bind is undone, so a caller never gets a
/// writable mount it asked to be read-only.
fn apply_flags(
    cfg: &NodeConfig,
    req: &Publish,
    before: Resolved,
    flags: MsFlags,
) -> Result<(), NodeError> {
    let real = before.real.clone();
    drop(before);
    if flags.is_empty() {
        return Ok(());
    }
    let top = cfg
        .kubelet_root
        .open("target_path", &req.target_path)?
        .filter(|t| t.real == real)
        .ok_or_else(|| NodeError::Io {
            volume_id: req.volume_id.clone(),
            action: "resolve the new mount at",
            path: real.clone(),
            source: std::io::ErrorKind::NotFound.into(),
        })?;
    if let Err(e) = remount_bind(&top.proc_path(), flags) {
        // An open descriptor keeps a mount busy: let go of it first.
        drop(top);
        if unmount(&real).is_ok() {
            return Err(forget_failed(cfg, &real, mount_err(&req.volume_id)(e)));
        }
        return Err(mount_err(&req.volume_id)(e));
    }
    Ok(())
}

fn same_read_only(req: &Publish, target: &Path, is_ro: bool) -> Result<(), NodeError> {
    if is_ro == req.read_only {
        return Ok(());
    }
    Err(NodeError::Incompatible {
        volume_id: req.volume_id.clone(),
        path: target.to_owned(),
        reason: if is_ro {
            "read-only".into()
        } else {
            "read-write".into()
        },
    })
}

/// The SP creates the target: a directory for a filesystem, a file for a block device. The
/// CO guarantees the parent exists; the entry is created in the resolved parent without
/// following anything, then resolved itself.
fn prepare_target(cfg: &NodeConfig, req: &Publish, dir: bool) -> Result<Resolved, NodeError> {
    let path = &req.target_path;
    let (parent, name) = cfg.kubelet_root.open_parent("target_path", path)?;
    create_in(&parent, &name, dir)
        .map_err(|e| io_err(&req.volume_id, "create target", path)(e.into()))?;
    let target = cfg.kubelet_root.open("target_path", path)?.ok_or_else(|| {
        io_err(&req.volume_id, "resolve", path)(std::io::ErrorKind::NotFound.into())
    })?;
    no_symlink("target_path", path, &target)?;
    let is_dir = target.kind == Kind::Directory;
    if is_dir != dir {
        return Err(NodeError::Incompatible {
            volume_id: req.volume_id.clone(),
            path: target.real.clone(),
            reason: if is_dir {
                "as a directory (filesystem volume)".into()
            } else {
                "as a file (block volume)".into()
            },
        });
    }
    Ok(target)
}

/// Unmounts the one mount this plugin recorded at exactly `path`, if it is the topmost one
/// there, and forgets the record. One record stands for one mount: a mount of the same disk
/// stacked beneath ours (someone else's, indistinguishable by device and root) is never
/// taken for a second one of ours. Mounts at parents of `path` are never touched, and an
/// unrecorded mount is left in place and reported.
fn unmount_recorded(
    cfg: &NodeConfig,
    volume_id: &str,
    field: &'static str,
    path: &Path,
) -> Result<(), NodeError> {
    let Some(at) = cfg.kubelet_root.open(field, path)? else {
        return Ok(());
    };
    let table = MountTable::read()?;
    let Some(top) = table.top_at(&at.real) else {
        return cfg
            .state
            .remove_mount(&at.real)
            .map_err(state_err(volume_id));
    };
    let record = cfg.state.mount(&at.real).map_err(state_err(volume_id))?;
    if !record.is_some_and(|r| r.matches(top, at.rdev())) {
        return Err(NodeError::NotOurs {
            volume_id: volume_id.to_owned(),
            path: at.real.clone(),
            fs_type: top.fs_type.clone(),
            source_desc: top.source.clone(),
        });
    }
    // umount2 cannot act on a descriptor (an open one keeps the mount busy), so this is by
    // name: the kernel's own name for what was just checked, never following a final
    // symlink.
    let real = at.real.clone();
    drop(at);
    unmount(&real).map_err(mount_err(volume_id))?;
    // Whatever is still mounted there was there before ours and is not ours: left alone
    // (unpublish then cannot remove the target, and says so).
    cfg.state.remove_mount(&real).map_err(state_err(volume_id))
}

/// NodeUnpublish: unmount the target (only what this plugin mounted there) and delete it.
/// A target that is gone is success; a symlink there (dangling or not) is not a volume of
/// ours and is removed as the target without being followed.
pub fn unpublish(cfg: &NodeConfig, volume_id: &str, target: &Path) -> Result<(), NodeError> {
    let (parent, name) = match cfg.kubelet_root.open_parent("target_path", target) {
        Ok(found) => found,
        // No parent, no target: already unpublished.
        Err(PathError::NoParent { .. }) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    let remove = |dir: bool| {
        remove_in(&parent, &name, dir).map_err(|e| match e {
            // Not empty, or still a mount point of someone else's mount.
            nix::errno::Errno::ENOTEMPTY | nix::errno::Errno::EBUSY => NodeError::TargetNotEmpty {
                volume_id: volume_id.to_owned(),
                path: target.to_owned(),
            },
            e => io_err(volume_id, "remove target", target)(e.into()),
        })
    };
    match cfg.kubelet_root.open("target_path", target)? {
        None => return Ok(()),
        Some(t) if t.kind == Kind::Symlink => return remove(false),
        Some(_) => {}
    }
    unmount_recorded(cfg, volume_id, "target_path", target)?;
    match cfg.kubelet_root.open("target_path", target)? {
        None => Ok(()),
        Some(t) => remove(t.kind == Kind::Directory),
    }
}

/// NodeUnstage: unmount the staging path (only what this plugin mounted there) and forget a
/// staged block volume. The staging directory itself belongs to the CO and stays.
pub fn unstage(cfg: &NodeConfig, volume_id: &str, staging: &Path) -> Result<(), NodeError> {
    let real = match cfg.kubelet_root.open("staging_target_path", staging)? {
        Some(s) if s.kind == Kind::Directory => s.real.clone(),
        // Missing, or not a directory (a symlink, say): nothing of ours is staged there.
        _ => return Ok(()),
    };
    unmount_recorded(cfg, volume_id, "staging_target_path", staging)?;
    cfg.state
        .remove_staged_block(&real)
        .map_err(state_err(volume_id))?;
    // Nothing is mounted there any more, so this directory is the CO's, not a volume.
    if let Some(dir) = cfg.kubelet_root.open("staging_target_path", staging)?
        && dir.kind == Kind::Directory
        && MountTable::read()?.top_at(&dir.real).is_none()
    {
        match remove_in(&dir, OsStr::new(LEGACY_BLOCK_FILE), false) {
            // A directory of that name is not the file an earlier version wrote: not ours.
            Ok(()) | Err(nix::errno::Errno::EISDIR) => {}
            Err(e) => {
                return Err(io_err(volume_id, "remove", &real.join(LEGACY_BLOCK_FILE))(
                    e.into(),
                ));
            }
        }
    }
    Ok(())
}

/// What a volume path points at: a filesystem mount or a bound device node.
enum Published {
    Filesystem { at: Resolved, mount: MountEntry },
    Block { at: Resolved, devno: DevNo },
}

fn published(cfg: &NodeConfig, volume_path: &Path) -> Result<Published, NodeError> {
    let not_a_volume = || NodeError::NotAVolume {
        path: volume_path.to_owned(),
    };
    let at = match cfg.kubelet_root.open("volume_path", volume_path) {
        Ok(Some(at)) if at.kind != Kind::Symlink => at,
        Ok(_) => return Err(not_a_volume()),
        // A path that cannot be resolved inside the root cannot hold a volume of ours.
        Err(e) if e.is_request_error() => return Err(not_a_volume()),
        Err(e) => return Err(e.into()),
    };
    let table = MountTable::read()?;
    let mount = table.top_at(&at.real).ok_or_else(not_a_volume)?.clone();
    if let Some(devno) = at.rdev() {
        return Ok(Published::Block { at, devno });
    }
    if mount.devno.is_anonymous() || FsType::from_mount(&mount.fs_type).is_none() {
        return Err(not_a_volume());
    }
    Ok(Published::Filesystem { at, mount })
}

/// NodeGetVolumeStats.
pub fn stats(
    cfg: &NodeConfig,
    volume_id: &str,
    volume_path: &Path,
) -> Result<VolumeStats, NodeError> {
    match published(cfg, volume_path)? {
        Published::Block { at, devno } => {
            let size = std::fs::File::open(at.proc_path())
                .and_then(|mut f| std::io::Seek::seek(&mut f, std::io::SeekFrom::End(0)))
                .map_err(io_err(volume_id, "read size of", &at.real))?;
            Ok(VolumeStats {
                bytes: Usage {
                    total: size,
                    ..Usage::default()
                },
                inodes: None,
                abnormal: disk_gone(cfg, devno),
            })
        }
        Published::Filesystem { at, mount } => {
            let sv = nix::sys::statvfs::statvfs(&at.proc_path())
                .map_err(|e| io_err(volume_id, "statvfs", &at.real)(e.into()))?;
            let frsize = sv.fragment_size();
            let bytes = Usage {
                total: sv.blocks() * frsize,
                available: sv.blocks_available() * frsize,
                used: sv.blocks().saturating_sub(sv.blocks_free()) * frsize,
            };
            let inodes = Usage {
                total: sv.files(),
                available: sv.files_available(),
                used: sv.files().saturating_sub(sv.files_free()),
            };
            let went_ro = (mount.super_is_read_only() && !mount.mount_is_read_only())
                .then(|| format!("filesystem on {} went read-only", mount.source));
            Ok(VolumeStats {
                bytes,
                inodes: Some(inodes),
                abnormal: disk_gone(cfg, mount.devno).or(went_ro),
            })
        }
    }
}

fn disk_gone(cfg: &NodeConfig, devno: DevNo) -> Option<String> {
    match cfg.sysfs.disk_by_devno(devno) {
        Ok(Some(_)) => None,
        Ok(None) => Some(format!("disk {devno} is no longer attached")),
        Err(e) => Some(format!(
            "cannot tell whether disk {devno} is attached: {}",
            crate::error::chain(&e)
        )),
    }
}

/// NodeExpandVolume: make the guest see the new size, then grow the filesystem online.
/// Returns the device size in bytes.
pub fn expand(
    cfg: &NodeConfig,
    volume_id: &str,
    volume_path: &Path,
    required: u64,
) -> Result<u64, NodeError> {
    let target = published(cfg, volume_path)?;
    let (devno, path, fs) = match &target {
        Published::Block { at, devno } => (*devno, at.real.clone(), None),
        Published::Filesystem { at, mount } => (
            mount.devno,
            at.real.clone(),
            FsType::from_mount(&mount.fs_type),
        ),
    };
    let gone = || NodeError::DiskGone {
        volume_id: volume_id.to_owned(),
        path: path.clone(),
        devno,
    };
    let disk = cfg
        .sysfs
        .disk_by_devno(devno)
        .map_err(discovery_err(volume_id))?
        .ok_or_else(gone)?;
    cfg.sysfs
        .rescan(&disk.name)
        .map_err(discovery_err(volume_id))?;
    let size = disk
        .size_bytes()
        .map_err(io_err(volume_id, "read size of", &disk.dev_path))?;
    if size < required {
        return Err(NodeError::NotGrown {
            volume_id: volume_id.to_owned(),
            device: disk.dev_path,
            size,
            required,
        });
    }
    if let Some(fs) = fs {
        fs.grow(&disk.dev_path, &path)
            .map_err(|source| NodeError::Fs {
                volume_id: volume_id.to_owned(),
                action: format!("growing {} on {:?}", fs.as_str(), disk.dev_path),
                source: Box::new(source),
            })?;
    }
    Ok(size)
}
