//! What each Node RPC does to the machine, as plain blocking functions.
//!
//! The gRPC layer (`node_service`) validates requests into the types here and runs these
//! on the blocking pool. Every function is idempotent: it first looks at what the kernel
//! says is already there (mountinfo, stat, sysfs) and only then acts.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use nix::mount::MsFlags;
use serde::{Deserialize, Serialize};

use crate::config::NodeConfig;
use crate::context::Bus;
use crate::devno::DevNo;
use crate::discovery::{DiscoveryError, Disk};
use crate::error::NodeError;
use crate::fs::{FsType, Signature, probe};
use crate::mountinfo::{MountEntry, MountTable};
use crate::mounts::{MountOptions, bind_mount, mount_device, unmount};
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

/// What NodeStage of a block volume leaves in the staging directory: a block volume needs
/// no staging mount, but NodePublish must still be able to tell "staged" from "not staged"
/// and which disk was staged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagedBlock {
    pub volume_id: String,
    pub serial: String,
    pub bus: Option<Bus>,
}

pub const STAGED_BLOCK_FILE: &str = "kubevirt-csi-block.json";

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

/// Creates a directory the CO should have created, then resolves it inside the root.
fn ensure_dir(
    cfg: &NodeConfig,
    volume_id: &str,
    field: &'static str,
    path: &Path,
) -> Result<PathBuf, NodeError> {
    cfg.kubelet_root.check_ancestors(field, path)?;
    std::fs::create_dir_all(path).map_err(io_err(volume_id, "create directory", path))?;
    resolved(cfg, field, path)?.ok_or_else(|| NodeError::Io {
        volume_id: volume_id.to_owned(),
        action: "resolve",
        path: path.to_owned(),
        source: std::io::ErrorKind::NotFound.into(),
    })
}

fn resolved(
    cfg: &NodeConfig,
    field: &'static str,
    path: &Path,
) -> Result<Option<PathBuf>, NodeError> {
    Ok(cfg.kubelet_root.resolve_existing(field, path)?)
}

fn describe(m: &MountEntry) -> String {
    format!("{} ({}, {})", m.source, m.fs_type, m.devno)
}

/// NodeStage: find the disk, format it if (and only if) it is blank, mount it.
pub fn stage(cfg: &NodeConfig, req: &Stage) -> Result<(), NodeError> {
    let disk = discover(cfg, &req.volume_id, &req.serial, req.bus)?;
    let staging = ensure_dir(
        cfg,
        &req.volume_id,
        "staging_target_path",
        &req.staging_path,
    )?;
    let table = MountTable::read()?;
    let mounted = table.top_at(&staging);
    let marker = read_staged_block(&req.volume_id, &staging)?;
    let expected = || format!("{} ({})", disk.dev_path.display(), disk.devno);
    match &req.access {
        Access::Block => {
            if let Some(m) = mounted {
                return Err(NodeError::DifferentDevice {
                    volume_id: req.volume_id.clone(),
                    path: staging,
                    found: describe(m),
                    expected: "no mount (block volume)".into(),
                });
            }
            match marker {
                Some(old) if old.serial == req.serial => Ok(()),
                Some(old) => Err(NodeError::DifferentDevice {
                    volume_id: req.volume_id.clone(),
                    path: staging,
                    found: format!("staged block disk with serial {}", old.serial),
                    expected: expected(),
                }),
                None => write_staged_block(
                    &req.volume_id,
                    &staging,
                    &StagedBlock {
                        volume_id: req.volume_id.clone(),
                        serial: req.serial.clone(),
                        bus: req.bus,
                    },
                ),
            }
        }
        Access::Mount { fs, options } => {
            if let Some(m) = mounted {
                if m.devno == disk.devno {
                    return Ok(());
                }
                return Err(NodeError::DifferentDevice {
                    volume_id: req.volume_id.clone(),
                    path: staging,
                    found: describe(m),
                    expected: expected(),
                });
            }
            if marker.is_some() {
                return Err(NodeError::Incompatible {
                    volume_id: req.volume_id.clone(),
                    path: staging,
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
            mount_device(&disk.dev_path, &staging, fs.as_str(), &options)
                .map_err(mount_err(&req.volume_id))
        }
    }
}

fn read_staged_block(volume_id: &str, staging: &Path) -> Result<Option<StagedBlock>, NodeError> {
    let path = staging.join(STAGED_BLOCK_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| NodeError::Io {
                volume_id: volume_id.to_owned(),
                action: "parse",
                path,
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(volume_id, "read", &path)(e)),
    }
}

fn write_staged_block(
    volume_id: &str,
    staging: &Path,
    record: &StagedBlock,
) -> Result<(), NodeError> {
    let path = staging.join(STAGED_BLOCK_FILE);
    let tmp = staging.join(format!(".{STAGED_BLOCK_FILE}.tmp"));
    let bytes = serde_json::to_vec(record).map_err(|e| NodeError::Io {
        volume_id: volume_id.to_owned(),
        action: "encode",
        path: path.clone(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
    })?;
    // Written aside and renamed, so a crash never leaves a half record that reads as staged.
    std::fs::write(&tmp, bytes).map_err(io_err(volume_id, "write", &tmp))?;
    std::fs::rename(&tmp, &path).map_err(io_err(volume_id, "rename into place", &path))
}

/// NodePublish: bind the staged filesystem (or the disk's device node) onto the target.
pub fn publish(cfg: &NodeConfig, req: &Publish) -> Result<(), NodeError> {
    let not_staged = || NodeError::NotStaged {
        volume_id: req.volume_id.clone(),
        staging_path: req.staging_path.clone(),
    };
    let staging =
        resolved(cfg, "staging_target_path", &req.staging_path)?.ok_or_else(not_staged)?;
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
                .top_at(&staging)
                .filter(|m| !m.devno.is_anonymous())
                .ok_or_else(not_staged)?;
            let target = prepare_target(cfg, req, true)?;
            if let Some(m) = table.top_at(&target) {
                if m.devno != staged.devno || m.root != staged.root {
                    return Err(NodeError::DifferentDevice {
                        volume_id: req.volume_id.clone(),
                        path: target,
                        found: describe(m),
                        expected: describe(staged),
                    });
                }
                return same_read_only(req, &target, m.mount_is_read_only());
            }
            bind_mount(&staging, &target, flags).map_err(mount_err(&req.volume_id))
        }
        Access::Block => {
            let record = read_staged_block(&req.volume_id, &staging)?.ok_or_else(not_staged)?;
            if let Some(serial) = req.serial.as_deref().filter(|s| *s != record.serial) {
                return Err(NodeError::DifferentDevice {
                    volume_id: req.volume_id.clone(),
                    path: staging,
                    found: format!("staged block disk with serial {}", record.serial),
                    expected: format!("serial {serial}"),
                });
            }
            let disk = discover(cfg, &req.volume_id, &record.serial, record.bus)?;
            let target = prepare_target(cfg, req, false)?;
            if let Some(m) = table.top_at(&target) {
                let rdev = std::fs::metadata(&target)
                    .ok()
                    .filter(|md| md.file_type().is_block_device())
                    .map(|md| DevNo::from_raw(md.rdev()));
                if rdev != Some(disk.devno) {
                    return Err(NodeError::DifferentDevice {
                        volume_id: req.volume_id.clone(),
                        path: target,
                        found: describe(m),
                        expected: format!("{} ({})", disk.dev_path.display(), disk.devno),
                    });
                }
                return same_read_only(req, &target, m.mount_is_read_only());
            }
            // MS_RDONLY on this bind is what the spec asks for, but the kernel does not stop
            // writes through a device node on a read-only mount; enforcing it would take
            // BLKROSET on the whole disk, which would also hit read-write publishes of the
            // same volume on this node.
            bind_mount(&disk.dev_path, &target, flags).map_err(mount_err(&req.volume_id))
        }
    }
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

/// The SP creates the target: a directory for a filesystem, a file for a block device.
/// The CO guarantees the parent exists.
fn prepare_target(cfg: &NodeConfig, req: &Publish, dir: bool) -> Result<PathBuf, NodeError> {
    let path = &req.target_path;
    cfg.kubelet_root.check_ancestors("target_path", path)?;
    let made = if dir {
        std::fs::create_dir(path)
    } else {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .map(drop)
    };
    match made {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io_err(&req.volume_id, "create target", path)(e)),
    }
    let target = resolved(cfg, "target_path", path)?.ok_or_else(|| {
        io_err(&req.volume_id, "resolve", path)(std::io::ErrorKind::NotFound.into())
    })?;
    let is_dir = target.is_dir();
    if is_dir != dir {
        return Err(NodeError::Incompatible {
            volume_id: req.volume_id.clone(),
            path: target,
            reason: if is_dir {
                "as a directory (filesystem volume)".into()
            } else {
                "as a file (block volume)".into()
            },
        });
    }
    Ok(target)
}

/// A mount this plugin could have made at `path`: a disk filesystem we format, or a
/// device node bound onto a file. Anything else (tmpfs, overlay, NFS...) is someone else's.
fn check_ours(volume_id: &str, path: &Path, m: &MountEntry) -> Result<(), NodeError> {
    let disk_fs = !m.devno.is_anonymous() && FsType::from_mount(&m.fs_type).is_some();
    let device_bind = std::fs::metadata(path)
        .map(|md| md.file_type().is_block_device())
        .unwrap_or(false);
    if disk_fs || device_bind {
        return Ok(());
    }
    Err(NodeError::NotOurs {
        volume_id: volume_id.to_owned(),
        path: path.to_owned(),
        fs_type: m.fs_type.clone(),
        source_desc: m.source.clone(),
    })
}

/// Unmounts every mount of ours stacked at exactly `path` (a retried publish can leave
/// two); mounts at parents of `path` are never touched.
fn unmount_all(volume_id: &str, path: &Path) -> Result<(), NodeError> {
    // Bounded so a mount that keeps coming back cannot spin us forever.
    for _ in 0..16 {
        let table = MountTable::read()?;
        let Some(m) = table.top_at(path) else {
            return Ok(());
        };
        check_ours(volume_id, path, m)?;
        unmount(path).map_err(mount_err(volume_id))?;
    }
    Err(NodeError::Io {
        volume_id: volume_id.to_owned(),
        action: "unmount all mounts at",
        path: path.to_owned(),
        source: std::io::Error::other("mounts keep reappearing"),
    })
}

/// NodeUnpublish: unmount the target and delete it.
pub fn unpublish(cfg: &NodeConfig, volume_id: &str, target: &Path) -> Result<(), NodeError> {
    let Some(real) = resolved(cfg, "target_path", target)? else {
        // Gone already (or a dangling symlink): idempotent success, but do not leave a
        // dangling link we may have made behind.
        return match std::fs::symlink_metadata(target) {
            Ok(_) => std::fs::remove_file(target).map_err(io_err(volume_id, "remove", target)),
            Err(_) => Ok(()),
        };
    };
    unmount_all(volume_id, &real)?;
    let removed = if real.is_dir() {
        std::fs::remove_dir(&real)
    } else {
        std::fs::remove_file(&real)
    };
    match removed {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(volume_id, "remove target", &real)(e)),
    }
}

/// NodeUnstage: unmount the staging path and forget a staged block volume. The staging
/// directory itself belongs to the CO and stays.
pub fn unstage(cfg: &NodeConfig, volume_id: &str, staging: &Path) -> Result<(), NodeError> {
    let Some(real) = resolved(cfg, "staging_target_path", staging)? else {
        return Ok(());
    };
    unmount_all(volume_id, &real)?;
    let marker = real.join(STAGED_BLOCK_FILE);
    match std::fs::remove_file(&marker) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(volume_id, "remove", &marker)(e)),
    }
}

/// What a volume path points at: a filesystem mount or a bound device node.
enum Published {
    Filesystem { path: PathBuf, mount: MountEntry },
    Block { path: PathBuf, devno: DevNo },
}

fn published(cfg: &NodeConfig, volume_path: &Path) -> Result<Published, NodeError> {
    let not_a_volume = || NodeError::NotAVolume {
        path: volume_path.to_owned(),
    };
    let path = resolved(cfg, "volume_path", volume_path)?.ok_or_else(not_a_volume)?;
    let table = MountTable::read()?;
    let mount = table.top_at(&path).ok_or_else(not_a_volume)?.clone();
    let meta = std::fs::metadata(&path).map_err(|_| not_a_volume())?;
    if meta.file_type().is_block_device() {
        return Ok(Published::Block {
            path,
            devno: DevNo::from_raw(meta.rdev()),
        });
    }
    if mount.devno.is_anonymous() || FsType::from_mount(&mount.fs_type).is_none() {
        return Err(not_a_volume());
    }
    Ok(Published::Filesystem { path, mount })
}

/// NodeGetVolumeStats.
pub fn stats(
    cfg: &NodeConfig,
    volume_id: &str,
    volume_path: &Path,
) -> Result<VolumeStats, NodeError> {
    match published(cfg, volume_path)? {
        Published::Block { path, devno } => {
            let size = std::fs::File::open(&path)
                .and_then(|mut f| std::io::Seek::seek(&mut f, std::io::SeekFrom::End(0)))
                .map_err(io_err(volume_id, "read size of", &path))?;
            Ok(VolumeStats {
                bytes: Usage {
                    total: size,
                    ..Usage::default()
                },
                inodes: None,
                abnormal: disk_gone(cfg, devno),
            })
        }
        Published::Filesystem { path, mount } => {
            let sv = nix::sys::statvfs::statvfs(&path)
                .map_err(|e| io_err(volume_id, "statvfs", &path)(e.into()))?;
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
        Published::Block { path, devno } => (*devno, path.clone(), None),
        Published::Filesystem { path, mount } => (
            mount.devno,
            path.clone(),
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
