//! A parser for `/proc/self/mountinfo`, the kernel's own table of what is mounted where.
//!
//! We read it instead of forking `mount` or `findmnt` so each RPC can tell, without a
//! process or a guess, whether a path is a mount point and which device backs it.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

use crate::devno::DevNo;

/// One line of mountinfo (see proc_pid_mountinfo(5)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub mount_id: u64,
    pub parent_id: u64,
    /// `st_dev` of files in this mount: the block device for disk filesystems.
    pub devno: DevNo,
    /// The directory of the filesystem that is the root of this mount (differs from `/`
    /// for bind mounts of subdirectories or of single files).
    pub root: PathBuf,
    pub mount_point: PathBuf,
    /// Per-mount options (`ro`, `nodev`, ...).
    pub mount_options: Vec<String>,
    pub fs_type: String,
    pub source: String,
    /// Per-superblock options; `ro` here while the mount is `rw` means the filesystem itself
    /// went read-only, e.g. after an ext4 error with `errors=remount-ro`.
    pub super_options: Vec<String>,
}

impl MountEntry {
    pub fn mount_is_read_only(&self) -> bool {
        self.mount_options.iter().any(|o| o == "ro")
    }

    pub fn super_is_read_only(&self) -> bool {
        self.super_options.iter().any(|o| o == "ro")
    }
}

/// mountinfo could not be read or parsed.
#[derive(Debug, thiserror::Error)]
pub enum MountInfoError {
    #[error("cannot read {path:?}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("malformed mountinfo line {line}: {reason}")]
    Malformed { line: usize, reason: &'static str },
}

pub const SELF_MOUNTINFO: &str = "/proc/self/mountinfo";

/// The mount table as it is now.
#[derive(Debug, Clone, Default)]
pub struct MountTable {
    pub entries: Vec<MountEntry>,
}

impl MountTable {
    pub fn read() -> Result<Self, MountInfoError> {
        Self::read_from(Path::new(SELF_MOUNTINFO))
    }

    pub fn read_from(path: &Path) -> Result<Self, MountInfoError> {
        let bytes = std::fs::read(path).map_err(|source| MountInfoError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&bytes)
    }

    pub fn parse(bytes: &[u8]) -> Result<Self, MountInfoError> {
        let entries = bytes
            .split(|b| *b == b'\n')
            .enumerate()
            .filter(|(_, l)| !l.is_empty())
            .map(|(i, l)| parse_line(i + 1, l))
            .collect::<Result<_, _>>()?;
        Ok(Self { entries })
    }

    /// Mounts whose mount point is exactly `path`, bottom first: the last one is what a
    /// lookup of `path` sees. A path merely *inside* a mount is not listed, which is what
    /// keeps us from ever unmounting a parent mount.
    pub fn at(&self, path: &Path) -> Vec<&MountEntry> {
        self.entries
            .iter()
            .filter(|e| e.mount_point == path)
            .collect()
    }

    /// The topmost mount at exactly `path`.
    pub fn top_at(&self, path: &Path) -> Option<&MountEntry> {
        self.at(path).into_iter().next_back()
    }
}

fn parse_line(line: usize, raw: &[u8]) -> Result<MountEntry, MountInfoError> {
    let bad = |reason| MountInfoError::Malformed { line, reason };
    let fields: Vec<&[u8]> = raw.split(|b| *b == b' ').collect();
    let sep = fields
        .iter()
        .position(|f| *f == b"-")
        .ok_or(bad("no '-' separator"))?;
    if sep < 6 || fields.len() < sep + 4 {
        return Err(bad("too few fields"));
    }
    let text = |f: &[u8]| String::from_utf8_lossy(&unescape(f)).into_owned();
    let number = |f: &[u8], what| text(f).parse::<u64>().map_err(|_| bad(what));
    let path = |f: &[u8]| PathBuf::from(OsString::from_vec(unescape(f)));
    let options = |f: &[u8]| text(f).split(',').map(str::to_owned).collect::<Vec<_>>();
    Ok(MountEntry {
        mount_id: number(fields[0], "mount id")?,
        parent_id: number(fields[1], "parent id")?,
        devno: text(fields[2]).parse().map_err(|_| bad("major:minor"))?,
        root: path(fields[3]),
        mount_point: path(fields[4]),
        mount_options: options(fields[5]),
        fs_type: text(fields[sep + 1]),
        source: text(fields[sep + 2]),
        super_options: options(fields[sep + 3]),
    })
}

/// Undoes the kernel's `\ooo` octal escaping of space, tab, newline and backslash.
fn unescape(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        let octal = field
            .get(i + 1..i + 4)
            .filter(|d| field[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) => {
                let value = d.iter().fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
                // Values above 0o377 cannot come from the kernel; keep the text as it was.
                match u8::try_from(value) {
                    Ok(b) => out.push(b),
                    Err(_) => out.extend_from_slice(&field[i..i + 4]),
                }
                i += 4;
            }
            None => {
                out.push(field[i]);
                i += 1;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &[u8] = b"22 27 0:21 / /proc rw,relatime - proc proc rw\n\
36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n\
40 27 7:3 / /var/lib/kubelet/my\\040vol\\134x rw shared:5 master:2 - ext4 /dev/loop3 ro,seclabel\n\
41 27 0:6 /loop3 /var/lib/kubelet/pods/p/dev ro,nosuid - devtmpfs devtmpfs rw,size=10k\n";

    #[test]
    fn parses_fields_and_optional_tags() {
        let t = MountTable::parse(SAMPLE).unwrap();
        assert_eq!(t.entries.len(), 4);
        let e = &t.entries[1];
        assert_eq!(e.mount_id, 36);
        assert_eq!(e.parent_id, 35);
        assert_eq!(e.devno, DevNo::new(98, 0));
        assert_eq!(e.root, PathBuf::from("/mnt1"));
        assert_eq!(e.mount_point, PathBuf::from("/mnt2"));
        assert_eq!(e.mount_options, vec!["rw", "noatime"]);
        assert_eq!(e.fs_type, "ext3");
        assert_eq!(e.source, "/dev/root");
        assert_eq!(e.super_options, vec!["rw", "errors=continue"]);
    }

    #[test]
    fn unescapes_octal_sequences() {
        let t = MountTable::parse(SAMPLE).unwrap();
        let e = t.top_at(Path::new("/var/lib/kubelet/my vol\\x")).unwrap();
        assert_eq!(e.devno, DevNo::new(7, 3));
        assert!(e.super_is_read_only());
        assert!(!e.mount_is_read_only());
        assert_eq!(unescape(b"a\\011b\\012c"), b"a\tb\nc");
        assert_eq!(unescape(b"trailing\\04"), b"trailing\\04");
    }

    #[test]
    fn at_matches_exact_mount_points_only() {
        let t = MountTable::parse(SAMPLE).unwrap();
        assert!(t.at(Path::new("/proc/self")).is_empty());
        assert_eq!(t.at(Path::new("/proc")).len(), 1);
        let dev = t.top_at(Path::new("/var/lib/kubelet/pods/p/dev")).unwrap();
        assert!(dev.mount_is_read_only());
        assert_eq!(dev.root, PathBuf::from("/loop3"));
    }

    #[test]
    fn rejects_malformed_lines() {
        assert!(MountTable::parse(b"1 2 3:4 / /x rw proc proc rw\n").is_err());
        assert!(MountTable::parse(b"1 2 x / /x rw - proc proc rw\n").is_err());
    }

    #[test]
    fn reads_this_process_table() {
        let t = MountTable::read().unwrap();
        assert!(t.top_at(Path::new("/")).is_some());
    }
}
