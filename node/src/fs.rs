//! Filesystems we create and grow, and the check that keeps us from formatting a disk
//! that already holds something.
//!
//! These are the one place the node plugin runs other programs: mkfs, resize2fs,
//! xfs_growfs and blkid come from the host's e2fsprogs, xfsprogs and util-linux.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A filesystem type a volume can be formatted with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsType {
    Ext4,
    Xfs,
}

impl FsType {
    /// ext4 unless the capability names another type.
    pub fn from_capability(fs_type: &str) -> Result<Self, FsError> {
        match fs_type {
            "" | "ext4" => Ok(FsType::Ext4),
            "xfs" => Ok(FsType::Xfs),
            other => Err(FsError::Unsupported {
                fs_type: other.to_owned(),
            }),
        }
    }

    pub fn from_mount(fs_type: &str) -> Option<Self> {
        match fs_type {
            "ext4" => Some(FsType::Ext4),
            "xfs" => Some(FsType::Xfs),
            _ => None,
        }
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            FsType::Ext4 => "ext4",
            FsType::Xfs => "xfs",
        }
    }

    /// Data options we always add. XFS refuses to mount two filesystems with the same
    /// UUID, which is exactly what a clone or a restored snapshot is; `nouuid` lets both
    /// be used on one node.
    pub fn default_data_options(self) -> &'static [&'static str] {
        match self {
            FsType::Ext4 => &[],
            FsType::Xfs => &["nouuid"],
        }
    }

    /// Creates the filesystem. ext4 gets `-F` because mke2fs otherwise asks before
    /// writing a whole disk; mkfs.xfs gets no `-f`, so it still refuses a disk where it
    /// sees an old signature: a second safeguard behind [`probe`].
    pub fn format(self, device: &Path) -> Result<(), FsError> {
        let (tool, args): (&str, &[&str]) = match self {
            FsType::Ext4 => ("mkfs.ext4", &["-F", "-q", "-m", "0"]),
            FsType::Xfs => ("mkfs.xfs", &["-q"]),
        };
        run(tool, args, device.as_os_str())
    }

    /// Grows a mounted filesystem to fill its device: resize2fs works on the device of a
    /// mounted ext4, xfs_growfs only on the mount point.
    pub fn grow(self, device: &Path, mount_point: &Path) -> Result<(), FsError> {
        match self {
            FsType::Ext4 => run("resize2fs", &[], device.as_os_str()),
            FsType::Xfs => run("xfs_growfs", &["-d"], mount_point.as_os_str()),
        }
    }
}

/// What a disk holds according to the probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signature {
    /// Nothing recognisable: safe to format.
    Blank,
    /// A filesystem of this type.
    Filesystem(String),
    /// Something that is not a filesystem (partition table, LVM, LUKS, swap, ...).
    Other(String),
}

/// A filesystem tool failed or the disk's contents could not be told.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("filesystem type {fs_type:?} is not supported (ext4 or xfs)")]
    Unsupported { fs_type: String },
    #[error("{tool} not found in PATH or the sbin directories")]
    ToolMissing { tool: &'static str },
    #[error("running {tool} on {target:?} failed")]
    Spawn {
        tool: &'static str,
        target: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{tool} on {target:?} exited with {status}: {stderr}")]
    Failed {
        tool: &'static str,
        target: PathBuf,
        status: String,
        stderr: String,
    },
    /// blkid found several signatures, or blkid and our own magic check disagree.
    #[error("contents of {device:?} are ambiguous ({detail}); refusing to format it")]
    Ambiguous { device: PathBuf, detail: String },
    #[error("cannot read the start of {device:?} to check for signatures")]
    ReadDevice {
        device: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Directories searched after PATH: DaemonSets and chroots often run with a PATH that
/// lacks the sbin directories where these tools live.
const FALLBACK_DIRS: &[&str] = &["/usr/sbin", "/sbin", "/usr/bin", "/bin"];

pub fn find_tool(tool: &'static str) -> Result<PathBuf, FsError> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(FALLBACK_DIRS.iter().map(PathBuf::from))
        .map(|dir| dir.join(tool))
        .find(|p| p.is_file())
        .ok_or(FsError::ToolMissing { tool })
}

fn run(tool: &'static str, args: &[&str], target: &std::ffi::OsStr) -> Result<(), FsError> {
    let out = Command::new(find_tool(tool)?)
        .args(args)
        .arg(target)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| FsError::Spawn {
            tool,
            target: target.into(),
            source,
        })?;
    if out.status.success() {
        return Ok(());
    }
    Err(FsError::Failed {
        tool,
        target: target.into(),
        status: out.status.to_string(),
        stderr: last_lines(&out.stderr),
    })
}

fn last_lines(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(3)..].join("; ")
}

/// Tells whether the disk holds anything. Both blkid's low-level probe and our own check
/// of the best-known magic numbers must agree that the disk is blank; any failure or
/// disagreement is an error, never "blank".
pub fn probe(device: &Path) -> Result<Signature, FsError> {
    let out = Command::new(find_tool("blkid")?)
        .args(["-p", "-o", "export", "--"])
        .arg(device)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| FsError::Spawn {
            tool: "blkid",
            target: device.to_owned(),
            source,
        })?;
    let from_blkid = match out.status.code() {
        Some(0) => parse_blkid_export(&String::from_utf8_lossy(&out.stdout)),
        // blkid: 2 = no signature found.
        Some(2) => Signature::Blank,
        // blkid: 8 = ambivalent probing result (several signatures).
        Some(8) => {
            return Err(FsError::Ambiguous {
                device: device.to_owned(),
                detail: "blkid found conflicting signatures".into(),
            });
        }
        _ => {
            return Err(FsError::Failed {
                tool: "blkid",
                target: device.to_owned(),
                status: out.status.to_string(),
                stderr: last_lines(&out.stderr),
            });
        }
    };
    let head = read_head(device)?;
    match (&from_blkid, magic_signature(&head)) {
        (Signature::Blank, Some(magic)) => Err(FsError::Ambiguous {
            device: device.to_owned(),
            detail: format!("blkid sees nothing but the disk starts with a {magic} signature"),
        }),
        _ => Ok(from_blkid),
    }
}

/// Interprets `blkid -p -o export` output.
pub fn parse_blkid_export(text: &str) -> Signature {
    let get = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
            .map(str::to_owned)
    };
    match (get("TYPE"), get("USAGE"), get("PTTYPE")) {
        (Some(t), Some(u), _) if u == "filesystem" => Signature::Filesystem(t),
        (Some(t), _, _) => Signature::Other(t),
        (None, _, Some(pt)) => Signature::Other(format!("{pt} partition table")),
        // Exit 0 with no type means blkid saw something it could not name.
        (None, _, None) => Signature::Other(format!(
            "unnamed signature ({})",
            text.trim().replace('\n', " ")
        )),
    }
}

const HEAD_BYTES: usize = 68 * 1024;

fn read_head(device: &Path) -> Result<Vec<u8>, FsError> {
    let mut buf = Vec::with_capacity(HEAD_BYTES);
    std::fs::File::open(device)
        .and_then(|f| f.take(HEAD_BYTES as u64).read_to_end(&mut buf))
        .map_err(|source| FsError::ReadDevice {
            device: device.to_owned(),
            source,
        })?;
    Ok(buf)
}

/// Magic numbers of what we most fear overwriting, as an independent check on blkid.
pub fn magic_signature(head: &[u8]) -> Option<&'static str> {
    let at = |off: usize, magic: &[u8]| head.get(off..off + magic.len()) == Some(magic);
    [
        (at(0, b"XFSB"), "xfs"),
        (at(1080, &[0x53, 0xef]), "ext2/3/4"),
        (at(0, b"LUKS\xba\xbe"), "LUKS"),
        (at(512, b"LABELONE"), "LVM2"),
        (at(512, b"EFI PART"), "GPT"),
        (at(0x10040, b"_BHRfS_M"), "btrfs"),
        (at(4086, b"SWAPSPACE2"), "swap"),
        (at(510, &[0x55, 0xaa]), "MBR/boot sector"),
    ]
    .into_iter()
    .find_map(|(hit, name)| hit.then_some(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capability_fs_type_defaults_to_ext4() {
        assert_eq!(FsType::from_capability("").unwrap(), FsType::Ext4);
        assert_eq!(FsType::from_capability("xfs").unwrap(), FsType::Xfs);
        assert!(matches!(
            FsType::from_capability("ntfs"),
            Err(FsError::Unsupported { .. })
        ));
    }

    #[test]
    fn reads_blkid_export_output() {
        assert_eq!(
            parse_blkid_export("DEVNAME=/dev/vdb\nUUID=x\nTYPE=ext4\nUSAGE=filesystem\n"),
            Signature::Filesystem("ext4".into())
        );
        assert_eq!(
            parse_blkid_export("DEVNAME=/dev/vdb\nTYPE=crypto_LUKS\nUSAGE=crypto\n"),
            Signature::Other("crypto_LUKS".into())
        );
        assert_eq!(
            parse_blkid_export("DEVNAME=/dev/vdb\nPTTYPE=gpt\n"),
            Signature::Other("gpt partition table".into())
        );
        assert!(matches!(
            parse_blkid_export("DEVNAME=/dev/vdb\n"),
            Signature::Other(_)
        ));
    }

    #[test]
    fn finds_magic_numbers() {
        let mut head = vec![0u8; HEAD_BYTES];
        assert_eq!(magic_signature(&head), None);
        head[1080] = 0x53;
        head[1081] = 0xef;
        assert_eq!(magic_signature(&head), Some("ext2/3/4"));
        let mut head = vec![0u8; HEAD_BYTES];
        head[..4].copy_from_slice(b"XFSB");
        assert_eq!(magic_signature(&head), Some("xfs"));
    }

    #[test]
    fn probe_of_a_zeroed_file_is_blank_and_of_ext4_is_ext4() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(16 << 20)
            .unwrap();
        assert_eq!(probe(&img).unwrap(), Signature::Blank);
        FsType::Ext4.format(&img).unwrap();
        assert_eq!(probe(&img).unwrap(), Signature::Filesystem("ext4".into()));
    }
}
