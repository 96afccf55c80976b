//! Request paths, checked and then resolved inside the kubelet root.
//!
//! The CO hands us staging and target paths that we mount over and later delete. A path
//! outside the kubelet root, or one that climbs out with `..` or a symlink, could point at
//! any directory on the node. Every path is checked lexically first, then resolved by the
//! kernel with `openat2(RESOLVE_BENEATH)` from a descriptor of the kubelet root, so no
//! symlink (and no `..` a symlink introduces) can lead out of it; the final component is
//! never followed. Mounts then act on the descriptor (`/proc/self/fd/N`), so what was
//! checked is what gets mounted on, even if a path component changes meanwhile.

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag, open, openat, openat2, readlink};
use nix::sys::stat::{FileStat, Mode, SFlag, fstat, mkdirat};
use nix::unistd::{UnlinkatFlags, unlinkat};

use crate::devno::DevNo;

/// Linux's PATH_MAX, counting the terminating NUL: longer paths cannot name anything.
pub const PATH_MAX: usize = 4096;
/// Linux's NAME_MAX: the longest file name any of our filesystems takes.
pub const NAME_MAX: usize = 255;

/// Why a request path was refused, and what kind of refusal it is.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PathError {
    /// The field was empty.
    #[error("{field} is empty")]
    Empty { field: &'static str },
    /// The path contains a NUL byte, which no path can hold.
    #[error("{field} contains a NUL byte")]
    Nul { field: &'static str },
    /// The path or one of its components is longer than the kernel takes.
    #[error("{field} is too long ({len} bytes; paths stop at {PATH_MAX}, names at {NAME_MAX})")]
    TooLong { field: &'static str, len: usize },
    /// The path does not start at `/`.
    #[error("{field} {path:?} is not absolute")]
    Relative { field: &'static str, path: PathBuf },
    /// The path contains `..` or `.` components.
    #[error("{field} {path:?} contains '.' or '..' components")]
    NotNormal { field: &'static str, path: PathBuf },
    /// The path lies outside the kubelet root (or is the root itself), or a symlink on the
    /// way leads out of it.
    #[error("{field} {path:?} is not under the kubelet root {root:?}")]
    OutsideRoot {
        field: &'static str,
        path: PathBuf,
        root: PathBuf,
    },
    /// The path lies inside the plugin's own state directory.
    #[error("{field} {path:?} is inside the plugin's state directory")]
    InStateDir { field: &'static str, path: PathBuf },
    /// The path itself is a symlink (dangling or not), where the CO must give a directory
    /// or file; or symlinks on the way loop.
    #[error("{field} {path:?} is a symlink")]
    Symlink { field: &'static str, path: PathBuf },
    /// A component on the way is not a directory.
    #[error("{field} {path:?}, or a component on the way, is not a directory")]
    NotADirectory { field: &'static str, path: PathBuf },
    /// The parent the CO must create is missing.
    #[error("{field} {path:?}: the parent directory does not exist")]
    NoParent { field: &'static str, path: PathBuf },
    /// The kernel refused to resolve the path for another reason.
    #[error("{field} {path:?} cannot be resolved")]
    Resolve {
        field: &'static str,
        path: PathBuf,
        #[source]
        errno: Errno,
    },
}

impl PathError {
    /// Whether the request, not the node, is at fault: every refusal except a resolution
    /// failure the kernel reports for its own reasons (EACCES, EIO, ...).
    pub fn is_request_error(&self) -> bool {
        !matches!(self, PathError::Resolve { .. })
    }
}

/// What a path resolved to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Directory,
    File,
    BlockDevice,
    Symlink,
    Other,
}

/// A path resolved inside the kubelet root: an `O_PATH` descriptor and the path the kernel
/// gives for it (what mountinfo shows).
#[derive(Debug)]
pub struct Resolved {
    fd: OwnedFd,
    pub real: PathBuf,
    pub kind: Kind,
    pub stat: FileStat,
}

impl Resolved {
    /// A path that reaches exactly the resolved file, for syscalls that take paths.
    pub fn proc_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.fd.as_raw_fd()))
    }

    /// The device number of a block device node.
    pub fn rdev(&self) -> Option<DevNo> {
        (self.kind == Kind::BlockDevice).then(|| DevNo::from_raw(self.stat.st_rdev))
    }
}

/// The directory every staging and target path must live under, as configured and as the
/// kernel resolves it (they differ when the kubelet root is reached through a symlink).
#[derive(Debug, Clone)]
pub struct KubeletRoot {
    configured: PathBuf,
    resolved: PathBuf,
    /// The plugin's state directory when it lies under the root: CO paths must stay out.
    state_dir: Option<PathBuf>,
}

impl KubeletRoot {
    pub fn new(configured: PathBuf) -> Self {
        let resolved = std::fs::canonicalize(&configured).unwrap_or_else(|_| configured.clone());
        Self {
            configured,
            resolved,
            state_dir: None,
        }
    }

    /// Keeps CO paths out of `state_dir` (when it lies under the root).
    pub fn with_state_dir(mut self, state_dir: &Path) -> Self {
        let real = std::fs::canonicalize(state_dir).unwrap_or_else(|_| state_dir.to_owned());
        self.state_dir = Some(real);
        self
    }

    pub fn path(&self) -> &Path {
        &self.configured
    }

    /// Checks a raw request path and returns it as a `PathBuf`.
    pub fn check(&self, field: &'static str, raw: &str) -> Result<PathBuf, PathError> {
        if raw.is_empty() {
            return Err(PathError::Empty { field });
        }
        if raw.contains('\0') {
            return Err(PathError::Nul { field });
        }
        if raw.len() >= PATH_MAX || raw.split('/').any(|seg| seg.len() > NAME_MAX) {
            return Err(PathError::TooLong {
                field,
                len: raw.len(),
            });
        }
        let path = PathBuf::from(raw);
        if !path.is_absolute() {
            return Err(PathError::Relative { field, path });
        }
        // `Path::components` silently drops interior `.` and trailing `/`, so look at the raw
        // segments as well.
        let dotted = raw.split('/').any(|seg| seg == "." || seg == "..");
        let abnormal = path
            .components()
            .any(|c| !matches!(c, Component::RootDir | Component::Normal(_)));
        if dotted || abnormal {
            return Err(PathError::NotNormal { field, path });
        }
        if self.relative(&path).is_none() {
            return Err(PathError::OutsideRoot {
                field,
                path,
                root: self.configured.clone(),
            });
        }
        if self.in_state_dir(&path) {
            return Err(PathError::InStateDir { field, path });
        }
        Ok(path)
    }

    fn in_state_dir(&self, path: &Path) -> bool {
        self.state_dir
            .as_deref()
            .is_some_and(|s| path.starts_with(s))
    }

    /// `path` below the root, or `None` when it is not strictly under it.
    fn relative<'a>(&self, path: &'a Path) -> Option<&'a Path> {
        [&self.configured, &self.resolved]
            .into_iter()
            .filter_map(|root| path.strip_prefix(root).ok())
            .find(|rel| !rel.as_os_str().is_empty())
    }

    fn open_root(&self, field: &'static str) -> Result<OwnedFd, PathError> {
        open(
            &self.resolved,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|errno| PathError::Resolve {
            field,
            path: self.resolved.clone(),
            errno,
        })
    }

    fn beneath(
        &self,
        field: &'static str,
        dir: &OwnedFd,
        rel: &Path,
        shown: &Path,
        flags: OFlag,
    ) -> Result<Option<OwnedFd>, PathError> {
        let how = OpenHow::new()
            .flags(OFlag::O_PATH | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW | flags)
            .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS);
        let path = || shown.to_owned();
        match openat2(dir, rel, how) {
            Ok(fd) => Ok(Some(fd)),
            Err(Errno::ENOENT) => Ok(None),
            Err(Errno::EXDEV) => Err(PathError::OutsideRoot {
                field,
                path: path(),
                root: self.resolved.clone(),
            }),
            Err(Errno::ELOOP) => Err(PathError::Symlink {
                field,
                path: path(),
            }),
            Err(Errno::ENOTDIR) => Err(PathError::NotADirectory {
                field,
                path: path(),
            }),
            Err(Errno::ENAMETOOLONG) => Err(PathError::TooLong {
                field,
                len: shown.as_os_str().len(),
            }),
            Err(errno) => Err(PathError::Resolve {
                field,
                path: path(),
                errno,
            }),
        }
    }

    fn resolved_from(
        &self,
        field: &'static str,
        fd: OwnedFd,
        shown: &Path,
    ) -> Result<Resolved, PathError> {
        let err = |errno| PathError::Resolve {
            field,
            path: shown.to_owned(),
            errno,
        };
        let stat = fstat(&fd).map_err(err)?;
        let kind = match SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT {
            SFlag::S_IFDIR => Kind::Directory,
            SFlag::S_IFREG => Kind::File,
            SFlag::S_IFBLK => Kind::BlockDevice,
            SFlag::S_IFLNK => Kind::Symlink,
            _ => Kind::Other,
        };
        let real = PathBuf::from(
            readlink(format!("/proc/self/fd/{}", fd.as_raw_fd()).as_str()).map_err(err)?,
        );
        // Resolution stayed beneath the root; the kernel's name for it must say the same,
        // and must not be our own state.
        if !real.starts_with(&self.resolved) || real == self.resolved {
            return Err(PathError::OutsideRoot {
                field,
                path: real,
                root: self.resolved.clone(),
            });
        }
        if self.in_state_dir(&real) {
            return Err(PathError::InStateDir { field, path: real });
        }
        Ok(Resolved {
            fd,
            real,
            kind,
            stat,
        })
    }

    /// Resolves an existing path inside the root without following its last component;
    /// `Ok(None)` when it does not exist. A symlink comes back as [`Kind::Symlink`].
    pub fn open(&self, field: &'static str, path: &Path) -> Result<Option<Resolved>, PathError> {
        let rel = self.rel_or_err(field, path)?;
        let root = self.open_root(field)?;
        match self.beneath(field, &root, rel, path, OFlag::empty())? {
            Some(fd) => self.resolved_from(field, fd, path).map(Some),
            None => Ok(None),
        }
    }

    fn rel_or_err<'a>(&self, field: &'static str, path: &'a Path) -> Result<&'a Path, PathError> {
        self.relative(path).ok_or_else(|| PathError::OutsideRoot {
            field,
            path: path.to_owned(),
            root: self.configured.clone(),
        })
    }

    /// Resolves the parent of `path` (which must exist and be a directory) and returns it
    /// with the last component's name, for creating or removing that entry without
    /// following it.
    pub fn open_parent(
        &self,
        field: &'static str,
        path: &Path,
    ) -> Result<(Resolved, OsString), PathError> {
        let name = path
            .file_name()
            .ok_or_else(|| PathError::NotNormal {
                field,
                path: path.to_owned(),
            })?
            .to_owned();
        let parent = path.parent().unwrap_or(Path::new("/"));
        let rel = self.rel_or_err(field, path)?;
        let root = self.open_root(field)?;
        let rel_parent = rel.parent().filter(|p| !p.as_os_str().is_empty());
        let fd = match rel_parent {
            // The parent is the root itself.
            None => root,
            Some(rp) => self
                .beneath(field, &root, rp, parent, OFlag::O_DIRECTORY)?
                .ok_or_else(|| PathError::NoParent {
                    field,
                    path: path.to_owned(),
                })?,
        };
        let stat = fstat(&fd).map_err(|errno| PathError::Resolve {
            field,
            path: parent.to_owned(),
            errno,
        })?;
        let real = PathBuf::from(
            readlink(format!("/proc/self/fd/{}", fd.as_raw_fd()).as_str()).map_err(|errno| {
                PathError::Resolve {
                    field,
                    path: parent.to_owned(),
                    errno,
                }
            })?,
        );
        Ok((
            Resolved {
                fd,
                real,
                kind: Kind::Directory,
                stat,
            },
            name,
        ))
    }

    /// Creates `path` as a directory where it is missing, with every missing parent, one
    /// component at a time beneath the deepest existing ancestor and never through a
    /// symlink; returns it resolved.
    pub fn create_dir_all(&self, field: &'static str, path: &Path) -> Result<Resolved, PathError> {
        let rel = self.rel_or_err(field, path)?;
        let root = self.open_root(field)?;
        let mut dir = root;
        let mut so_far = PathBuf::new();
        for component in rel.components() {
            let name: &OsStr = component.as_os_str();
            so_far.push(name);
            let shown = self.resolved.join(&so_far);
            match mkdirat(&dir, name, Mode::from_bits_truncate(0o750)) {
                Ok(()) | Err(Errno::EEXIST) => {}
                Err(errno) => {
                    return Err(PathError::Resolve {
                        field,
                        path: shown,
                        errno,
                    });
                }
            }
            dir = self
                .beneath(field, &dir, Path::new(name), &shown, OFlag::O_DIRECTORY)?
                .ok_or(PathError::Resolve {
                    field,
                    path: shown,
                    errno: Errno::ENOENT,
                })?;
        }
        self.resolved_from(field, dir, path)
    }
}

/// Creates the entry `name` in `parent` as an empty directory or file; an existing entry
/// is left as it is (the caller checks what it is).
pub fn create_in(parent: &Resolved, name: &OsStr, dir: bool) -> Result<(), Errno> {
    let made = if dir {
        mkdirat(&parent.fd, name, Mode::from_bits_truncate(0o750))
    } else {
        openat(
            &parent.fd,
            name,
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o640),
        )
        .map(drop)
    };
    match made {
        Err(Errno::EEXIST) => Ok(()),
        other => other,
    }
}

/// Removes the entry `name` in `parent` (a directory when `dir`); a missing entry is fine.
pub fn remove_in(parent: &Resolved, name: &OsStr, dir: bool) -> Result<(), Errno> {
    let flag = if dir {
        UnlinkatFlags::RemoveDir
    } else {
        UnlinkatFlags::NoRemoveDir
    };
    match unlinkat(&parent.fd, name, flag) {
        Err(Errno::ENOENT) => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> KubeletRoot {
        KubeletRoot::new(PathBuf::from("/nonexistent/kubelet"))
    }

    #[test]
    fn accepts_paths_under_the_root() {
        let p = root()
            .check("target_path", "/nonexistent/kubelet/pods/x/mount")
            .unwrap();
        assert_eq!(p, PathBuf::from("/nonexistent/kubelet/pods/x/mount"));
    }

    #[test]
    fn refuses_empty_relative_dotted_nul_long_and_outside_paths() {
        let r = root();
        assert!(matches!(r.check("f", ""), Err(PathError::Empty { .. })));
        assert!(matches!(
            r.check("f", "pods/x"),
            Err(PathError::Relative { .. })
        ));
        assert!(matches!(
            r.check("f", "/nonexistent/kubelet/../etc"),
            Err(PathError::NotNormal { .. })
        ));
        assert!(matches!(
            r.check("f", "/nonexistent/kubelet/./x"),
            Err(PathError::NotNormal { .. })
        ));
        assert!(matches!(
            r.check("f", "/etc/passwd"),
            Err(PathError::OutsideRoot { .. })
        ));
        assert!(matches!(
            r.check("f", "/nonexistent/kubelet"),
            Err(PathError::OutsideRoot { .. })
        ));
        assert!(matches!(
            r.check("f", "/nonexistent/kubelet-other/x"),
            Err(PathError::OutsideRoot { .. })
        ));
        assert!(matches!(
            r.check("f", "/nonexistent/kubelet/a\0b"),
            Err(PathError::Nul { .. })
        ));
        let long_name = format!("/nonexistent/kubelet/{}", "n".repeat(NAME_MAX + 1));
        assert!(matches!(
            r.check("f", &long_name),
            Err(PathError::TooLong { .. })
        ));
        let long_path = format!("/nonexistent/kubelet{}", "/dir".repeat(PATH_MAX / 4));
        assert!(matches!(
            r.check("f", &long_path),
            Err(PathError::TooLong { .. })
        ));
    }

    #[test]
    fn refuses_paths_in_the_state_dir() {
        let r = root().with_state_dir(Path::new("/nonexistent/kubelet/plugins/me/state"));
        assert!(matches!(
            r.check("f", "/nonexistent/kubelet/plugins/me/state/x"),
            Err(PathError::InStateDir { .. })
        ));
        r.check("f", "/nonexistent/kubelet/plugins/me/other")
            .unwrap();
    }

    #[test]
    fn resolution_stays_beneath_the_root_and_never_follows_the_last_link() {
        let dir = tempfile::tempdir().unwrap();
        let kroot = std::fs::canonicalize(dir.path()).unwrap().join("kubelet");
        std::fs::create_dir_all(kroot.join("inner/real")).unwrap();
        std::os::unix::fs::symlink("/etc", kroot.join("evil")).unwrap();
        std::os::unix::fs::symlink("../../..", kroot.join("inner/up")).unwrap();
        std::os::unix::fs::symlink("real", kroot.join("inner/ok")).unwrap();
        std::os::unix::fs::symlink("nowhere", kroot.join("dangling")).unwrap();
        let r = KubeletRoot::new(kroot.clone());

        // Through a symlink out of the root: refused.
        for escaping in [kroot.join("evil/passwd"), kroot.join("inner/up/x")] {
            assert!(
                matches!(r.open("f", &escaping), Err(PathError::OutsideRoot { .. })),
                "{escaping:?}"
            );
        }
        // The last component is never followed, dangling or not.
        for link in [
            kroot.join("evil"),
            kroot.join("dangling"),
            kroot.join("inner/ok"),
        ] {
            assert_eq!(r.open("f", &link).unwrap().unwrap().kind, Kind::Symlink);
        }
        // A symlink on the way that stays inside is fine.
        std::fs::create_dir(kroot.join("inner/real/x")).unwrap();
        let x = r.open("f", &kroot.join("inner/ok/x")).unwrap().unwrap();
        assert_eq!(x.kind, Kind::Directory);
        assert_eq!(x.real, kroot.join("inner/real/x"));
        assert!(r.open("f", &kroot.join("missing")).unwrap().is_none());

        // Creating never goes through a symlink, even one that stays inside.
        assert!(r.create_dir_all("f", &kroot.join("evil/created")).is_err());
        assert!(!Path::new("/etc/created").exists());
        assert!(r.create_dir_all("f", &kroot.join("dangling/x")).is_err());
        assert!(!kroot.join("nowhere").exists());
        let made = r.create_dir_all("f", &kroot.join("a/b/c")).unwrap();
        assert_eq!(made.real, kroot.join("a/b/c"));
        assert_eq!(made.kind, Kind::Directory);
    }
}
