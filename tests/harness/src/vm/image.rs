//! Where the guest kernel and initramfs come from: `hack/guest.sh` builds and caches them, and
//! prints their paths with `--env`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// Environment variable naming the guest kernel (an ELF vmlinux booted through PVH).
pub const KERNEL_ENV: &str = "KVCSI_GUEST_KERNEL";
/// Environment variable naming the guest initramfs.
pub const INITRD_ENV: &str = "KVCSI_GUEST_INITRD";

/// The guest's kernel and initramfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestImage {
    /// Kernel image passed to `-kernel`.
    pub kernel: PathBuf,
    /// Initramfs passed to `-initrd`.
    pub initrd: PathBuf,
}

/// Why the guest image could not be found or built.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// `hack/guest.sh` could not be run.
    #[error("cannot run {script}")]
    Spawn {
        script: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `hack/guest.sh` failed; its stderr says why.
    #[error("{script} failed with {status}:\n{stderr}")]
    Script {
        script: PathBuf,
        status: std::process::ExitStatus,
        stderr: String,
    },
    /// `hack/guest.sh --env` printed something we cannot read.
    #[error("cannot parse the output of {script} --env: {output:?}")]
    Parse { script: PathBuf, output: String },
    /// A path that was named does not exist.
    #[error("guest {what} {path} does not exist")]
    Missing { what: &'static str, path: PathBuf },
}

/// The workspace root, found from this crate's manifest directory (`tests/harness`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

static LOCATED: Mutex<Option<GuestImage>> = Mutex::new(None);

impl GuestImage {
    /// The image named by `KVCSI_GUEST_KERNEL`/`KVCSI_GUEST_INITRD` when both are set;
    /// otherwise whatever `hack/guest.sh --env` builds or finds in its cache. The answer is
    /// memoised per process, and concurrent callers wait for one build instead of racing it.
    pub fn locate() -> Result<Self, ImageError> {
        let mut located = LOCATED
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(image) = located.as_ref() {
            return Ok(image.clone());
        }
        let image = match (std::env::var_os(KERNEL_ENV), std::env::var_os(INITRD_ENV)) {
            (Some(kernel), Some(initrd)) => Self {
                kernel: kernel.into(),
                initrd: initrd.into(),
            },
            _ => Self::build(&repo_root().join("hack/guest.sh"))?,
        };
        image.check()?;
        *located = Some(image.clone());
        Ok(image)
    }

    /// Runs `script --env` (building the image if it is not cached) and reads its paths.
    pub fn build(script: &Path) -> Result<Self, ImageError> {
        let output = Command::new(script)
            .arg("--env")
            .output()
            .map_err(|source| ImageError::Spawn {
                script: script.to_owned(),
                source,
            })?;
        if !output.status.success() {
            return Err(ImageError::Script {
                script: script.to_owned(),
                status: output.status,
                stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            });
        }
        let stdout = String::from_utf8_lossy(&output.stdout);
        parse_env(&stdout).ok_or_else(|| ImageError::Parse {
            script: script.to_owned(),
            output: stdout.into_owned(),
        })
    }

    fn check(&self) -> Result<(), ImageError> {
        for (what, path) in [("kernel", &self.kernel), ("initrd", &self.initrd)] {
            if !path.is_file() {
                return Err(ImageError::Missing {
                    what,
                    path: path.clone(),
                });
            }
        }
        Ok(())
    }
}

/// Reads `export KVCSI_GUEST_KERNEL=... KVCSI_GUEST_INITRD=...`. Shell-quoted values (paths
/// with spaces) are refused rather than half-unquoted.
fn parse_env(output: &str) -> Option<GuestImage> {
    let line = output.lines().find(|l| l.starts_with("export "))?;
    let (mut kernel, mut initrd) = (None, None);
    for word in line.split_whitespace().skip(1) {
        let (key, value) = word.split_once('=')?;
        if value.is_empty() || value.contains(['\'', '"', '\\', '$']) {
            return None;
        }
        match key {
            KERNEL_ENV => kernel = Some(PathBuf::from(value)),
            INITRD_ENV => initrd = Some(PathBuf::from(value)),
            _ => {}
        }
    }
    Some(GuestImage {
        kernel: kernel?,
        initrd: initrd?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_export_line() {
        let image =
            parse_env("export KVCSI_GUEST_KERNEL=/c/vmlinux KVCSI_GUEST_INITRD=/c/initrd.img\n")
                .unwrap();
        assert_eq!(image.kernel, Path::new("/c/vmlinux"));
        assert_eq!(image.initrd, Path::new("/c/initrd.img"));
    }

    #[test]
    fn refuses_quoted_or_partial_output() {
        assert!(parse_env("export KVCSI_GUEST_KERNEL=/c/vmlinux\n").is_none());
        assert!(parse_env("export KVCSI_GUEST_KERNEL='/a b' KVCSI_GUEST_INITRD=/i\n").is_none());
        assert!(parse_env("nothing here").is_none());
    }
}
