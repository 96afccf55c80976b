//! Mounting through mount(2) and reading back what the kernel did.
//!
//! No `mount` binary is forked: the flags a CO asks for are translated here, the kernel
//! does the mount, and `/proc/self/mountinfo` tells us the result.

use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sys::statvfs::{FsFlags, statvfs};

/// A mount flag we do not let a CO pass: these change what kind of mount is made.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("mount flag {flag:?} is not allowed: {reason}")]
pub struct MountFlagError {
    pub flag: String,
    pub reason: &'static str,
}

/// Mount flags split into what mount(2) takes as flags and the filesystem's data string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountOptions {
    pub flags: MsFlags,
    pub data: Vec<String>,
}

impl Default for MountOptions {
    fn default() -> Self {
        Self {
            flags: MsFlags::empty(),
            data: Vec::new(),
        }
    }
}

impl MountOptions {
    /// Parses CSI `mount_flags` (each entry may itself be comma separated).
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<Self, MountFlagError> {
        let mut opts = MountOptions::default();
        for flag in entries
            .iter()
            .flat_map(|e| e.as_ref().split(','))
            .map(str::trim)
            .filter(|f| !f.is_empty())
        {
            let refuse = |reason| MountFlagError {
                flag: flag.to_owned(),
                reason,
            };
            let (set, clear) = match flag {
                "defaults" => (MsFlags::empty(), MsFlags::empty()),
                "ro" => (MsFlags::MS_RDONLY, MsFlags::empty()),
                "rw" => (MsFlags::empty(), MsFlags::MS_RDONLY),
                "nosuid" => (MsFlags::MS_NOSUID, MsFlags::empty()),
                "suid" => (MsFlags::empty(), MsFlags::MS_NOSUID),
                "nodev" => (MsFlags::MS_NODEV, MsFlags::empty()),
                "dev" => (MsFlags::empty(), MsFlags::MS_NODEV),
                "noexec" => (MsFlags::MS_NOEXEC, MsFlags::empty()),
                "exec" => (MsFlags::empty(), MsFlags::MS_NOEXEC),
                "sync" => (MsFlags::MS_SYNCHRONOUS, MsFlags::empty()),
                "async" => (MsFlags::empty(), MsFlags::MS_SYNCHRONOUS),
                "dirsync" => (MsFlags::MS_DIRSYNC, MsFlags::empty()),
                "noatime" => (MsFlags::MS_NOATIME, MsFlags::empty()),
                "atime" => (MsFlags::empty(), MsFlags::MS_NOATIME),
                "nodiratime" => (MsFlags::MS_NODIRATIME, MsFlags::empty()),
                "diratime" => (MsFlags::empty(), MsFlags::MS_NODIRATIME),
                "relatime" => (MsFlags::MS_RELATIME, MsFlags::empty()),
                "norelatime" => (MsFlags::empty(), MsFlags::MS_RELATIME),
                "strictatime" => (MsFlags::MS_STRICTATIME, MsFlags::empty()),
                "lazytime" => (MsFlags::MS_LAZYTIME, MsFlags::empty()),
                "nolazytime" => (MsFlags::empty(), MsFlags::MS_LAZYTIME),
                "silent" => (MsFlags::MS_SILENT, MsFlags::empty()),
                "bind" | "rbind" | "remount" | "move" => {
                    return Err(refuse("it changes the kind of mount"));
                }
                "shared" | "rshared" | "slave" | "rslave" | "private" | "rprivate"
                | "unbindable" | "runbindable" | "make-shared" | "make-slave" | "make-private" => {
                    return Err(refuse("mount propagation is managed by the CO"));
                }
                data if data.starts_with("x-") => {
                    // Userspace-only options (fstab, systemd) mean nothing to the kernel.
                    let _ = data;
                    (MsFlags::empty(), MsFlags::empty())
                }
                data => {
                    opts.data.push(data.to_owned());
                    (MsFlags::empty(), MsFlags::empty())
                }
            };
            opts.flags.insert(set);
            opts.flags.remove(clear);
        }
        Ok(opts)
    }

    pub fn data_string(&self) -> String {
        self.data.join(",")
    }

    /// The flags a bind remount can change (per-mount flags); data options cannot be
    /// changed on a bind.
    pub fn per_mount_flags(&self) -> MsFlags {
        self.flags
            & (MsFlags::MS_RDONLY
                | MsFlags::MS_NOSUID
                | MsFlags::MS_NODEV
                | MsFlags::MS_NOEXEC
                | MsFlags::MS_NOATIME
                | MsFlags::MS_NODIRATIME
                | MsFlags::MS_RELATIME
                | MsFlags::MS_STRICTATIME)
    }
}

/// A mount(2) or umount2(2) call failed.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("mounting {source_path:?} on {target:?} as {fs_type} failed")]
    Mount {
        source_path: PathBuf,
        target: PathBuf,
        fs_type: String,
        #[source]
        errno: nix::Error,
    },
    #[error("bind mounting {source_path:?} on {target:?} failed")]
    Bind {
        source_path: PathBuf,
        target: PathBuf,
        #[source]
        errno: nix::Error,
    },
    #[error("remounting bind {target:?} with {flags:?} failed")]
    Remount {
        target: PathBuf,
        flags: MsFlags,
        #[source]
        errno: nix::Error,
    },
    #[error("unmounting {target:?} failed")]
    Unmount {
        target: PathBuf,
        #[source]
        errno: nix::Error,
    },
}

/// Mounts a block device's filesystem.
pub fn mount_device(
    device: &Path,
    target: &Path,
    fs_type: &str,
    opts: &MountOptions,
) -> Result<(), MountError> {
    let data = opts.data_string();
    let data = (!data.is_empty()).then_some(data.as_str());
    mount(Some(device), target, Some(fs_type), opts.flags, data).map_err(|errno| {
        MountError::Mount {
            source_path: device.to_owned(),
            target: target.to_owned(),
            fs_type: fs_type.to_owned(),
            errno,
        }
    })
}

/// Bind mounts `source` on `target`. A bind ignores flags given with it: read-only and
/// the like take [`remount_bind`] on the new mount afterwards.
pub fn bind(source: &Path, target: &Path) -> Result<(), MountError> {
    mount(
        Some(source),
        target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|errno| MountError::Bind {
        source_path: source.to_owned(),
        target: target.to_owned(),
        errno,
    })
}

/// Applies per-mount flags to the bind mount at `target` (which must reach the new mount,
/// not the directory under it). MS_BIND|MS_REMOUNT *replaces* the per-mount flags, so the
/// flags the mount already has (e.g. `nodev` from staging) are carried over, not dropped.
pub fn remount_bind(target: &Path, flags: MsFlags) -> Result<(), MountError> {
    let inherited = statvfs(target)
        .map(|s| flags_of(s.flags()))
        .unwrap_or(MsFlags::empty());
    let all = flags | inherited | MsFlags::MS_BIND | MsFlags::MS_REMOUNT;
    mount(None::<&str>, target, None::<&str>, all, None::<&str>).map_err(|errno| {
        MountError::Remount {
            target: target.to_owned(),
            flags: all,
            errno,
        }
    })
}

/// Unmounts exactly one mount at `target`.
pub fn unmount(target: &Path) -> Result<(), MountError> {
    umount2(target, MntFlags::UMOUNT_NOFOLLOW).map_err(|errno| MountError::Unmount {
        target: target.to_owned(),
        errno,
    })
}

/// Per-mount flags as statvfs reports them, translated back to mount(2) flags.
fn flags_of(f: FsFlags) -> MsFlags {
    let table = [
        (FsFlags::ST_RDONLY, MsFlags::MS_RDONLY),
        (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
        (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
    ];
    table
        .iter()
        .filter(|(st, _)| f.contains(*st))
        .fold(MsFlags::empty(), |acc, (_, ms)| acc | *ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_flags_from_data() {
        let o = MountOptions::parse(&[
            "noatime",
            "nodev,discard",
            "errors=remount-ro",
            "x-systemd.automount",
            "ro",
        ])
        .unwrap();
        assert_eq!(
            o.flags,
            MsFlags::MS_NOATIME | MsFlags::MS_NODEV | MsFlags::MS_RDONLY
        );
        assert_eq!(o.data_string(), "discard,errors=remount-ro");
        assert_eq!(
            o.per_mount_flags(),
            MsFlags::MS_NOATIME | MsFlags::MS_NODEV | MsFlags::MS_RDONLY
        );
    }

    #[test]
    fn later_flags_win() {
        let o = MountOptions::parse(&["ro", "rw"]).unwrap();
        assert!(!o.flags.contains(MsFlags::MS_RDONLY));
    }

    #[test]
    fn refuses_flags_that_change_the_mount_kind() {
        assert_eq!(MountOptions::parse(&["bind"]).unwrap_err().flag, "bind");
        assert!(MountOptions::parse(&["rshared"]).is_err());
        assert!(MountOptions::parse::<&str>(&[]).unwrap().flags.is_empty());
    }
}
