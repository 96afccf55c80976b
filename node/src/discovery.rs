//! Finding a hotplugged disk by its serial, straight from sysfs.
//!
//! The kernel publishes what we need without udev: virtio-blk shows the serial in
//! `block/vdX/serial` (truncated to 20 bytes), SCSI and SATA disks (libata translates)
//! in VPD page 0x80 at `block/sdX/device/vpd_pg80`. Reading those files needs no fork and
//! no udev database, and a serial that matches two disks is refused rather than guessed.

use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::context::Bus;
use crate::devno::{DevNo, DevNoParseError};
use crate::uevent::{DiskEvents, Wakeup};

/// The longest serial virtio-blk passes to the guest (VIRTIO_BLK_ID_BYTES).
pub const VIRTIO_SERIAL_BYTES: usize = 20;

/// A disk the kernel knows, with a device node we checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// Kernel name (`vdb`, `sdc`).
    pub name: String,
    pub devno: DevNo,
    /// The device node under the configured /dev root.
    pub dev_path: PathBuf,
}

impl Disk {
    /// Current size in bytes, asked of the device itself (seeking to the end of a block
    /// device returns its size), so it reflects a resize the moment the kernel knows it.
    pub fn size_bytes(&self) -> std::io::Result<u64> {
        std::fs::File::open(&self.dev_path)?.seek(SeekFrom::End(0))
    }
}

/// Discovery failed; each variant names the serial, disk or file involved.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("cannot read {path:?}")]
    ReadSysfs {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("bad device number in {path:?}")]
    BadDevFile {
        path: PathBuf,
        #[source]
        source: DevNoParseError,
    },
    /// Two or more disks carry the serial; picking one could hand a tenant the wrong disk.
    #[error("serial {serial:?} matches more than one disk: {disks:?}")]
    Ambiguous { serial: String, disks: Vec<String> },
    /// The node under the /dev root is not the device sysfs describes.
    #[error("{dev_path:?} is not block device {expected} (found {found})")]
    NodeMismatch {
        dev_path: PathBuf,
        expected: DevNo,
        found: String,
    },
    #[error("no disk with serial {serial:?} appeared within {waited:?}{note}")]
    Timeout {
        serial: String,
        waited: Duration,
        note: String,
    },
    #[error("waiting for disk events failed")]
    Events {
        #[source]
        source: std::io::Error,
    },
}

/// Where discovery looks: the sysfs and /dev roots (fixture trees in tests).
#[derive(Debug, Clone)]
pub struct Sysfs {
    sysfs_root: PathBuf,
    dev_root: PathBuf,
}

/// Result of one pass over sysfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scan {
    Found(Disk),
    Absent,
    /// sysfs shows the disk but its device node is not there (yet).
    NodeMissing(String),
}

impl Sysfs {
    pub fn new(sysfs_root: impl Into<PathBuf>, dev_root: impl Into<PathBuf>) -> Self {
        Self {
            sysfs_root: sysfs_root.into(),
            dev_root: dev_root.into(),
        }
    }

    fn block_dir(&self) -> PathBuf {
        self.sysfs_root.join("block")
    }

    /// Whole disks known to the kernel, by name, sorted.
    pub fn disk_names(&self) -> Result<Vec<String>, DiscoveryError> {
        let dir = self.block_dir();
        let entries = std::fs::read_dir(&dir).map_err(|source| DiscoveryError::ReadSysfs {
            path: dir.clone(),
            source,
        })?;
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|source| DiscoveryError::ReadSysfs {
                path: dir.clone(),
                source,
            })?;
            if let Some(name) = entry.file_name().to_str() {
                names.push(name.to_owned());
            }
        }
        names.sort();
        Ok(names)
    }

    /// The serial sysfs shows for a disk on the given bus (both places when unknown).
    pub fn serial_of(
        &self,
        name: &str,
        bus: Option<Bus>,
    ) -> Result<Option<String>, DiscoveryError> {
        let dir = self.block_dir().join(name);
        let virtio = matches!(bus, None | Some(Bus::Virtio));
        if let Some(raw) = virtio
            .then(|| read_optional(&dir.join("serial")))
            .transpose()?
            .flatten()
        {
            let s = trim_serial(&raw);
            if !s.is_empty() {
                return Ok(Some(s));
            }
        }
        let scsi = matches!(bus, None | Some(Bus::Scsi) | Some(Bus::Sata));
        if let Some(raw) = scsi
            .then(|| read_optional(&dir.join("device").join("vpd_pg80")))
            .transpose()?
            .flatten()
        {
            return Ok(vpd_pg80_serial(&raw));
        }
        Ok(None)
    }

    /// The device number sysfs gives a disk.
    pub fn devno_of(&self, name: &str) -> Result<Option<DevNo>, DiscoveryError> {
        let path = self.block_dir().join(name).join("dev");
        let Some(raw) = read_optional(&path)? else {
            return Ok(None);
        };
        let text = String::from_utf8_lossy(&raw);
        text.parse()
            .map(Some)
            .map_err(|source| DiscoveryError::BadDevFile { path, source })
    }

    /// The disk with this device number, if the kernel still has it: how stats and expand
    /// get from a mount back to a disk, and how "the disk is gone" is noticed.
    pub fn disk_by_devno(&self, devno: DevNo) -> Result<Option<Disk>, DiscoveryError> {
        for name in self.disk_names()? {
            if self.devno_of(&name)? == Some(devno) {
                return self.checked_node(&name, devno).map(|d| d.ok());
            }
        }
        Ok(None)
    }

    /// Asks the SCSI layer to re-read the capacity (virtio-blk updates on its own); the
    /// hypervisor grows the disk but a SCSI guest only notices when told to look.
    pub fn rescan(&self, name: &str) -> Result<(), DiscoveryError> {
        let path = self.block_dir().join(name).join("device").join("rescan");
        // Open without O_CREAT: sysfs answers EACCES, not ENOENT, to creating a missing
        // attribute, and virtio-blk disks have no `rescan`.
        let written = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|mut f| std::io::Write::write_all(&mut f, b"1"));
        match written {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(DiscoveryError::ReadSysfs { path, source }),
        }
    }

    /// One pass over every disk. Serials of virtio-blk disks are compared as the guest sees
    /// them, i.e. cut to 20 bytes.
    pub fn scan(&self, serial: &str, bus: Option<Bus>) -> Result<Scan, DiscoveryError> {
        let mut matches = Vec::new();
        for name in self.disk_names()? {
            let Some(found) = self.serial_of(&name, bus)? else {
                continue;
            };
            if found == serial
                || found == virtio_visible(serial)
                    && self.block_dir().join(&name).join("serial").exists()
            {
                matches.push(name);
            }
        }
        match matches.as_slice() {
            [] => Ok(Scan::Absent),
            [name] => {
                let Some(devno) = self.devno_of(name)? else {
                    return Ok(Scan::Absent);
                };
                Ok(match self.checked_node(name, devno)? {
                    Ok(disk) => Scan::Found(disk),
                    Err(()) => Scan::NodeMissing(name.clone()),
                })
            }
            _ => Err(DiscoveryError::Ambiguous {
                serial: serial.to_owned(),
                disks: matches,
            }),
        }
    }

    /// Subscribe-then-scan-then-wait: `events` must have been subscribed before this call
    /// so nothing that happens during the scan is missed. Without events (subscription
    /// failed) we scan once.
    pub fn wait_for(
        &self,
        serial: &str,
        bus: Option<Bus>,
        mut events: Option<&mut dyn DiskEvents>,
        timeout: Duration,
    ) -> Result<Disk, DiscoveryError> {
        let start = Instant::now();
        let deadline = start + timeout;
        loop {
            let scan = self.scan(serial, bus)?;
            let note = match scan {
                Scan::Found(disk) => return Ok(disk),
                Scan::Absent => String::new(),
                Scan::NodeMissing(name) => format!(
                    " (sysfs shows {name} but {:?} is missing)",
                    self.dev_root.join(&name)
                ),
            };
            let timed_out = |note: String| DiscoveryError::Timeout {
                serial: serial.to_owned(),
                waited: start.elapsed(),
                note,
            };
            let Some(ev) = events.as_deref_mut() else {
                return Err(timed_out(format!(
                    "{note} (kernel uevents unavailable, scanned once)"
                )));
            };
            match ev
                .wait(deadline)
                .map_err(|source| DiscoveryError::Events { source })?
            {
                Wakeup::Changed => continue,
                Wakeup::TimedOut => {
                    // One last look: an event may have been coalesced with the timeout.
                    if let Scan::Found(disk) = self.scan(serial, bus)? {
                        return Ok(disk);
                    }
                    return Err(timed_out(note));
                }
            }
        }
    }

    /// Checks that `<dev_root>/<name>` is the block device sysfs describes; `Err(())` when
    /// the node does not exist yet.
    fn checked_node(&self, name: &str, devno: DevNo) -> Result<Result<Disk, ()>, DiscoveryError> {
        let dev_path = self.dev_root.join(name);
        let meta = match std::fs::metadata(&dev_path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Err(())),
            Err(source) => {
                return Err(DiscoveryError::ReadSysfs {
                    path: dev_path,
                    source,
                });
            }
        };
        if !meta.file_type().is_block_device() {
            return Err(DiscoveryError::NodeMismatch {
                dev_path,
                expected: devno,
                found: "not a block device".into(),
            });
        }
        let found = DevNo::from_raw(meta.rdev());
        if found != devno {
            return Err(DiscoveryError::NodeMismatch {
                dev_path,
                expected: devno,
                found: found.to_string(),
            });
        }
        Ok(Ok(Disk {
            name: name.to_owned(),
            devno,
            dev_path,
        }))
    }
}

/// Reads a sysfs attribute, treating "not there" (hidden attribute, disk just removed) as
/// `None` and anything else as an error we do not paper over.
fn read_optional(path: &Path) -> Result<Option<Vec<u8>>, DiscoveryError> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if matches!(e.kind(), std::io::ErrorKind::NotFound) => Ok(None),
        Err(source) => Err(DiscoveryError::ReadSysfs {
            path: path.to_owned(),
            source,
        }),
    }
}

fn trim_serial(raw: &[u8]) -> String {
    let s = String::from_utf8_lossy(raw);
    s.trim_matches(|c: char| c.is_ascii_whitespace() || c == '\0')
        .to_owned()
}

/// The serial in a VPD page 0x80 (Unit Serial Number): byte 1 is the page code, bytes 2-3
/// the big-endian length of the serial that follows the 4-byte header. QEMU and libata pad
/// it with spaces.
pub fn vpd_pg80_serial(page: &[u8]) -> Option<String> {
    if page.len() < 4 || page[1] != 0x80 {
        return None;
    }
    let len = usize::from(u16::from_be_bytes([page[2], page[3]]));
    let end = page.len().min(4 + len);
    let s = trim_serial(&page[4..end]);
    (!s.is_empty()).then_some(s)
}

/// What virtio-blk lets the guest see of a serial.
pub fn virtio_visible(serial: &str) -> &str {
    let mut end = serial.len().min(VIRTIO_SERIAL_BYTES);
    while !serial.is_char_boundary(end) {
        end -= 1;
    }
    &serial[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_vpd_pg80_with_header_and_padding() {
        let mut page = vec![0x00, 0x80, 0x00, 0x18];
        page.extend_from_slice(b"  kvcsi-0123456789abcd  ");
        assert_eq!(
            vpd_pg80_serial(&page).as_deref(),
            Some("kvcsi-0123456789abcd")
        );
        // Length shorter than the buffer: only the announced bytes count.
        let page = [0x00, 0x80, 0x00, 0x02, b'a', b'b', b'c'];
        assert_eq!(vpd_pg80_serial(&page).as_deref(), Some("ab"));
    }

    #[test]
    fn refuses_malformed_vpd_pages() {
        assert_eq!(vpd_pg80_serial(&[0x00, 0x83, 0x00, 0x01, b'a']), None);
        assert_eq!(vpd_pg80_serial(&[0x00, 0x80]), None);
        assert_eq!(
            vpd_pg80_serial(&[0x00, 0x80, 0x00, 0x04, b' ', b' ', b' ', b' ']),
            None
        );
    }

    #[test]
    fn virtio_truncates_to_twenty_bytes() {
        assert_eq!(
            virtio_visible("0123456789abcdef0123456789"),
            "0123456789abcdef0123"
        );
        assert_eq!(virtio_visible("short"), "short");
    }
}
