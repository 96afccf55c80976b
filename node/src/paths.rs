//! Request paths checked against the kubelet root before anything touches them.
//!
//! The CO hands us staging and target paths that we mount over and later delete. A path
//! outside the kubelet root, or one that climbs out with `..` or a symlink, could point at
//! any directory on the node, so every path is checked lexically first and, once it exists,
//! again after the kernel has resolved its symlinks.

use std::path::{Component, Path, PathBuf};

/// Why a request path was refused; always answered with INVALID_ARGUMENT.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PathError {
    /// The field was empty.
    #[error("{field} is empty")]
    Empty { field: &'static str },
    /// The path does not start at `/`.
    #[error("{field} {path:?} is not absolute")]
    Relative { field: &'static str, path: PathBuf },
    /// The path contains `..` or `.` components.
    #[error("{field} {path:?} contains '.' or '..' components")]
    NotNormal { field: &'static str, path: PathBuf },
    /// The path lies outside the kubelet root (or is the root itself).
    #[error("{field} {path:?} is not under the kubelet root {root:?}")]
    OutsideRoot {
        field: &'static str,
        path: PathBuf,
        root: PathBuf,
    },
}

/// The directory every staging and target path must live under, as configured and as the
/// kernel resolves it (they differ when the kubelet root is reached through a symlink).
#[derive(Debug, Clone)]
pub struct KubeletRoot {
    configured: PathBuf,
    resolved: PathBuf,
}

impl KubeletRoot {
    pub fn new(configured: PathBuf) -> Self {
        let resolved = std::fs::canonicalize(&configured).unwrap_or_else(|_| configured.clone());
        Self {
            configured,
            resolved,
        }
    }

    pub fn path(&self) -> &Path {
        &self.configured
    }

    /// Checks a raw request path and returns it as a `PathBuf`.
    pub fn check(&self, field: &'static str, raw: &str) -> Result<PathBuf, PathError> {
        if raw.is_empty() {
            return Err(PathError::Empty { field });
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
        let under =
            strictly_under(&path, &self.configured) || strictly_under(&path, &self.resolved);
        if !under {
            return Err(PathError::OutsideRoot {
                field,
                path,
                root: self.configured.clone(),
            });
        }
        Ok(path)
    }

    /// Resolves symlinks of an existing path and checks the result is still under the root,
    /// so a symlink planted inside the kubelet root cannot redirect a mount elsewhere.
    /// Returns `Ok(None)` when the path does not exist.
    pub fn resolve_existing(
        &self,
        field: &'static str,
        path: &Path,
    ) -> Result<Option<PathBuf>, PathError> {
        match std::fs::canonicalize(path) {
            Ok(real) if strictly_under(&real, &self.resolved) => Ok(Some(real)),
            Ok(real) => Err(PathError::OutsideRoot {
                field,
                path: real,
                root: self.resolved.clone(),
            }),
            Err(_) => Ok(None),
        }
    }
}

impl KubeletRoot {
    /// Checks that the deepest existing ancestor of `path` resolves inside the root, so
    /// creating the missing rest of `path` cannot follow a symlink out of it.
    pub fn check_ancestors(&self, field: &'static str, path: &Path) -> Result<(), PathError> {
        let existing = path
            .ancestors()
            .find(|a| a.exists())
            .unwrap_or(Path::new("/"));
        match std::fs::canonicalize(existing) {
            Ok(real) if real.starts_with(&self.resolved) => Ok(()),
            Ok(real) => Err(PathError::OutsideRoot {
                field,
                path: real,
                root: self.resolved.clone(),
            }),
            Err(_) => Err(PathError::OutsideRoot {
                field,
                path: existing.to_owned(),
                root: self.resolved.clone(),
            }),
        }
    }
}

fn strictly_under(path: &Path, root: &Path) -> bool {
    path != root && path.starts_with(root)
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
    fn refuses_empty_relative_dotted_and_outside_paths() {
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
    }

    #[test]
    fn refuses_symlink_escaping_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let kroot = dir.path().join("kubelet");
        std::fs::create_dir(&kroot).unwrap();
        std::os::unix::fs::symlink("/etc", kroot.join("evil")).unwrap();
        let r = KubeletRoot::new(kroot.clone());
        let p = r.check("f", kroot.join("evil").to_str().unwrap()).unwrap();
        assert!(matches!(
            r.resolve_existing("f", &p),
            Err(PathError::OutsideRoot { .. })
        ));
        assert_eq!(
            r.resolve_existing("f", &kroot.join("missing")).unwrap(),
            None
        );
    }
}
