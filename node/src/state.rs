//! The plugin's own records, kept in its state directory and nowhere else.
//!
//! Two things must survive a plugin restart: which block volumes are staged (a block volume
//! has no staging mount to look at), and which mounts this plugin made (so it unmounts those
//! and nothing else). Earlier versions kept the first inside the staging directory, which for
//! a filesystem volume is the tenant's own filesystem: a pod could put a FIFO, a symlink or
//! garbage there. Records now live under `--state-dir`, which no pod can write, and are read
//! as untrusted anyway: never through a symlink, never blocking, never more than
//! [`MAX_RECORD_BYTES`].
//!
//! Records are keyed by the SHA-256 of the kernel-resolved path and carry the path itself,
//! so a key collision reads as "no record", never as someone else's.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{OFlag, open};
use nix::sys::stat::Mode;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::context::Bus;
use crate::devno::DevNo;
use crate::fs::FsType;
use crate::mountinfo::{MountEntry, MountInfoError, MountTable};

/// Records are a few hundred bytes; anything larger was not written by us.
pub const MAX_RECORD_BYTES: u64 = 64 * 1024;

const MOUNTS: &str = "mounts";
const BLOCK: &str = "staged-block";
const BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";

/// Reading or writing the state directory failed.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot {action} {path:?}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The state directory or a record is not what this plugin creates there.
    #[error("{path:?} is not a plugin record: {reason}")]
    Foreign { path: PathBuf, reason: String },
    #[error("reading the mount table failed")]
    MountInfo(#[from] MountInfoError),
}

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StateError {
    let path = path.to_owned();
    move |source| StateError::Io {
        action,
        path,
        source,
    }
}

/// What a block volume's NodeStage leaves: which disk was staged at which path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagedBlock {
    pub staging_path: PathBuf,
    pub volume_id: String,
    pub serial: String,
    pub bus: Option<Bus>,
}

/// How to recognise a mount this plugin made, in terms the kernel reports back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum MountedAs {
    /// A filesystem on one of our disks, or a bind of one: mountinfo's device and root.
    Filesystem { devno: DevNo, root: PathBuf },
    /// A disk's device node bound onto a file: the target's `st_rdev`.
    Device { rdev: DevNo },
}

/// A mount this plugin made (or was about to make: the record is written first, so a crash
/// between the two leaves a record without a mount, which is harmless, rather than a mount
/// without a record, which no later call would remove).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MountRecord {
    pub path: PathBuf,
    pub volume_id: String,
    pub mounted_as: MountedAs,
    /// Mounts do not survive a reboot; a record from another boot describes nothing.
    pub boot_id: String,
}

impl MountRecord {
    /// Whether `top`, the topmost mount at the recorded path, is the one recorded.
    /// `target_rdev` is the path's `st_rdev` when it is a block device.
    pub fn matches(&self, top: &MountEntry, target_rdev: Option<DevNo>) -> bool {
        match &self.mounted_as {
            MountedAs::Filesystem { devno, root } => top.devno == *devno && top.root == *root,
            MountedAs::Device { rdev } => target_rdev == Some(*rdev),
        }
    }
}

/// The state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    dir: PathBuf,
    boot_id: String,
}

impl StateDir {
    /// Opens (creating, mode 0700) the state directory.
    ///
    /// When the mount records directory does not exist yet, this is the first start of a
    /// plugin that records its mounts on this node, and the mounts an earlier version made
    /// are still there without records. Those are adopted once, by the rule earlier versions
    /// unmounted by (an ext4/xfs filesystem on a disk, or a device node bound onto a file,
    /// under the kubelet root); from then on only recorded mounts are ever unmounted.
    pub fn open(dir: &Path, kubelet_root: &Path) -> Result<Self, StateError> {
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true).mode(0o700);
        builder.create(dir).map_err(io("create", dir))?;
        let meta = std::fs::symlink_metadata(dir).map_err(io("stat", dir))?;
        if !meta.is_dir() {
            return Err(StateError::Foreign {
                path: dir.to_owned(),
                reason: "not a directory".into(),
            });
        }
        let boot_id = std::fs::read_to_string(BOOT_ID)
            .map_err(io("read", Path::new(BOOT_ID)))?
            .trim()
            .to_owned();
        let state = Self {
            dir: dir.to_owned(),
            boot_id,
        };
        builder.recursive(false);
        let block = dir.join(BLOCK);
        match builder.create(&block) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io("create", &block)(e)),
        }
        let mounts = dir.join(MOUNTS);
        match builder.create(&mounts) {
            Ok(()) => state.adopt_legacy_mounts(kubelet_root)?,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => state.prune_other_boots(),
            Err(e) => return Err(io("create", &mounts)(e)),
        }
        Ok(state)
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    fn file(&self, kind: &str, path: &Path) -> PathBuf {
        let digest = Sha256::digest(path.as_os_str().as_encoded_bytes());
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        self.dir.join(kind).join(format!("{hex}.json"))
    }

    /// The staged block record for `staging`, if any.
    pub fn staged_block(&self, staging: &Path) -> Result<Option<StagedBlock>, StateError> {
        let rec: Option<StagedBlock> = read_record(&self.file(BLOCK, staging))?;
        Ok(rec.filter(|r| r.staging_path == staging))
    }

    pub fn put_staged_block(&self, rec: &StagedBlock) -> Result<(), StateError> {
        write_record(&self.file(BLOCK, &rec.staging_path), rec)
    }

    pub fn remove_staged_block(&self, staging: &Path) -> Result<(), StateError> {
        remove_record(&self.file(BLOCK, staging))
    }

    /// The record of the mount this plugin made at `path` in this boot, if any.
    pub fn mount(&self, path: &Path) -> Result<Option<MountRecord>, StateError> {
        let rec: Option<MountRecord> = read_record(&self.file(MOUNTS, path))?;
        Ok(rec.filter(|r| r.path == path && r.boot_id == self.boot_id))
    }

    /// Records a mount about to be made at `path`.
    pub fn put_mount(
        &self,
        path: &Path,
        volume_id: &str,
        mounted_as: MountedAs,
    ) -> Result<(), StateError> {
        let rec = MountRecord {
            path: path.to_owned(),
            volume_id: volume_id.to_owned(),
            mounted_as,
            boot_id: self.boot_id.clone(),
        };
        write_record(&self.file(MOUNTS, path), &rec)
    }

    pub fn remove_mount(&self, path: &Path) -> Result<(), StateError> {
        remove_record(&self.file(MOUNTS, path))
    }

    fn adopt_legacy_mounts(&self, kubelet_root: &Path) -> Result<(), StateError> {
        let root = std::fs::canonicalize(kubelet_root).unwrap_or_else(|_| kubelet_root.into());
        let table = MountTable::read()?;
        for m in &table.entries {
            if m.mount_point == root || !m.mount_point.starts_with(&root) {
                continue;
            }
            // Only the topmost mount at a path is what a lookup there sees.
            if table.top_at(&m.mount_point) != Some(m) {
                continue;
            }
            let device = std::fs::symlink_metadata(&m.mount_point)
                .ok()
                .filter(|md| md.file_type().is_block_device())
                .map(|md| DevNo::from_raw(md.rdev()));
            let mounted_as = match device {
                Some(rdev) => MountedAs::Device { rdev },
                None if !m.devno.is_anonymous() && FsType::from_mount(&m.fs_type).is_some() => {
                    MountedAs::Filesystem {
                        devno: m.devno,
                        root: m.root.clone(),
                    }
                }
                None => continue,
            };
            tracing::info!(path = ?m.mount_point, ?mounted_as, "adopting a mount made before mounts were recorded");
            self.put_mount(&m.mount_point, "", mounted_as)?;
        }
        Ok(())
    }

    /// Drops mount records from earlier boots; they describe mounts that no longer exist.
    fn prune_other_boots(&self) {
        let dir = self.dir.join(MOUNTS);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            match read_record::<MountRecord>(&path) {
                Ok(Some(rec)) if rec.boot_id == self.boot_id => {}
                Ok(None) => {}
                Ok(Some(_)) | Err(_) => {
                    tracing::info!(record = ?path, "removing a mount record from another boot");
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
    }
}

/// Opens a record without following a symlink, without blocking on a FIFO, and refuses
/// anything that is not a small regular file.
fn read_record<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>, StateError> {
    let fd: OwnedFd = match open(
        path,
        OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(nix::errno::Errno::ENOENT) => return Ok(None),
        Err(e) => return Err(io("open", path)(e.into())),
    };
    let file = File::from(fd);
    let meta = file.metadata().map_err(io("stat", path))?;
    let foreign = |reason: String| StateError::Foreign {
        path: path.to_owned(),
        reason,
    };
    if !meta.file_type().is_file() {
        return Err(foreign("not a regular file".into()));
    }
    if meta.len() > MAX_RECORD_BYTES {
        return Err(foreign(format!("{} bytes", meta.len())));
    }
    let mut bytes = Vec::new();
    file.take(MAX_RECORD_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(io("read", path))?;
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| foreign(e.to_string()))
}

/// Writes a record aside and renames it into place, so a crash never leaves half a record.
fn write_record<T: Serialize>(path: &Path, record: &T) -> Result<(), StateError> {
    let bytes = serde_json::to_vec(record).map_err(|e| StateError::Io {
        action: "encode",
        path: path.to_owned(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
    })?;
    // A name of its own per write: two requests recording the same path at once (for two
    // volume ids) must not remove or rename each other's half-written file.
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_extension(format!("{}.{n}.tmp", std::process::id()));
    let fd = open(
        &tmp,
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::S_IRUSR | Mode::S_IWUSR,
    )
    .map_err(|e| io("create", &tmp)(e.into()))?;
    let mut file = File::from(fd);
    file.write_all(&bytes).map_err(io("write", &tmp))?;
    file.sync_all().map_err(io("sync", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io("rename into place", path))
}

fn remove_record(path: &Path) -> Result<(), StateError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io("remove", path)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> (tempfile::TempDir, StateDir) {
        let dir = tempfile::tempdir().unwrap();
        let kubelet = dir.path().join("kubelet");
        std::fs::create_dir(&kubelet).unwrap();
        let state = StateDir::open(&dir.path().join("state"), &kubelet).unwrap();
        (dir, state)
    }

    #[test]
    fn records_round_trip_and_are_private() {
        let (_dir, s) = state();
        let mode = std::fs::metadata(s.path()).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o700);
        let rec = StagedBlock {
            staging_path: "/k/staging/a".into(),
            volume_id: "v".into(),
            serial: "kvabc".into(),
            bus: Some(Bus::Scsi),
        };
        assert_eq!(s.staged_block(&rec.staging_path).unwrap(), None);
        s.put_staged_block(&rec).unwrap();
        assert_eq!(
            s.staged_block(&rec.staging_path).unwrap(),
            Some(rec.clone())
        );
        assert_eq!(s.staged_block(Path::new("/k/staging/b")).unwrap(), None);
        s.remove_staged_block(&rec.staging_path).unwrap();
        assert_eq!(s.staged_block(&rec.staging_path).unwrap(), None);

        let at = Path::new("/k/pods/x/mount");
        let how = MountedAs::Filesystem {
            devno: DevNo::new(7, 1),
            root: "/".into(),
        };
        s.put_mount(at, "v", how.clone()).unwrap();
        assert_eq!(s.mount(at).unwrap().unwrap().mounted_as, how);
    }

    #[test]
    fn records_from_another_boot_do_not_count() {
        let (_dir, s) = state();
        let at = Path::new("/k/pods/y/mount");
        let other = StateDir {
            dir: s.dir.clone(),
            boot_id: "another-boot".into(),
        };
        other
            .put_mount(
                at,
                "v",
                MountedAs::Device {
                    rdev: DevNo::new(8, 0),
                },
            )
            .unwrap();
        assert_eq!(s.mount(at).unwrap(), None);
        s.prune_other_boots();
        assert!(!s.file(MOUNTS, at).exists());
    }

    #[test]
    fn fifos_symlinks_and_garbage_are_refused_without_blocking() {
        let (dir, s) = state();
        let at = Path::new("/k/staging/z");
        let file = s.file(BLOCK, at);
        nix::unistd::mkfifo(&file, Mode::S_IRUSR | Mode::S_IWUSR).unwrap();
        assert!(matches!(
            s.staged_block(at),
            Err(StateError::Foreign { .. })
        ));
        std::fs::remove_file(&file).unwrap();
        let big = dir.path().join("big");
        std::fs::File::create(&big)
            .unwrap()
            .set_len(1 << 30)
            .unwrap();
        std::os::unix::fs::symlink(&big, &file).unwrap();
        assert!(matches!(s.staged_block(at), Err(StateError::Io { .. })));
        std::fs::remove_file(&file).unwrap();
        std::fs::write(&file, b"{not json").unwrap();
        assert!(matches!(
            s.staged_block(at),
            Err(StateError::Foreign { .. })
        ));
    }
}
