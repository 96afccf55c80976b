//! Kernel uevents over netlink (NETLINK_KOBJECT_UEVENT): how discovery learns that a disk
//! appeared without udev and without polling.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::Instant;

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, setsockopt,
    socket, sockopt,
};

/// Something that tells a waiting discovery "look again".
pub trait DiskEvents {
    /// Blocks until something relevant may have changed or the deadline passes.
    fn wait(&mut self, deadline: Instant) -> std::io::Result<Wakeup>;
}

/// Why [`DiskEvents::wait`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wakeup {
    /// A block device was added or changed (or events were lost): rescan.
    Changed,
    TimedOut,
}

/// The kernel's multicast group for uevents (udev rebroadcasts on group 2; we want the
/// kernel's own messages, which need no udev).
const KERNEL_GROUP: u32 = 1;

/// A subscription to kernel uevents. Create it *before* scanning sysfs so a disk that
/// appears between the scan and the wait still wakes us.
#[derive(Debug)]
pub struct UeventSocket {
    fd: OwnedFd,
}

impl UeventSocket {
    pub fn subscribe() -> nix::Result<Self> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            SockProtocol::NetlinkKObjectUEvent,
        )?;
        // A hotplug burst (one disk brings SCSI host, target, device, bsg and block events)
        // must not overflow the default buffer; an overflow still only costs a rescan.
        let _ = setsockopt(&fd, sockopt::RcvBuf, &(1 << 20));
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, KERNEL_GROUP))?;
        Ok(Self { fd })
    }

    /// Reads every queued message; true if one of them concerns a block disk.
    fn drain(&self) -> std::io::Result<bool> {
        let mut buf = vec![0u8; 16 * 1024];
        let mut relevant = false;
        loop {
            match recv(self.fd.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT) {
                Ok(n) => {
                    relevant |= Uevent::parse(&buf[..n]).is_some_and(|e| e.is_disk_appearance())
                }
                Err(Errno::EAGAIN) => return Ok(relevant),
                // Lost messages may have included ours.
                Err(Errno::ENOBUFS) => relevant = true,
                Err(Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl DiskEvents for UeventSocket {
    fn wait(&mut self, deadline: Instant) -> std::io::Result<Wakeup> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(Wakeup::TimedOut);
            }
            let millis = u16::try_from(left.as_millis().max(1)).unwrap_or(u16::MAX);
            let mut fds = [PollFd::new(self.fd.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::from(millis)) {
                Ok(0) | Err(Errno::EINTR) => continue,
                Ok(_) => {
                    if self.drain()? {
                        return Ok(Wakeup::Changed);
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Tests (and fixture-driven runs) wake discovery through a channel.
impl DiskEvents for std::sync::mpsc::Receiver<()> {
    fn wait(&mut self, deadline: Instant) -> std::io::Result<Wakeup> {
        let left = deadline.saturating_duration_since(Instant::now());
        match self.recv_timeout(left) {
            Ok(()) => Ok(Wakeup::Changed),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Ok(Wakeup::TimedOut),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                std::thread::sleep(left);
                Ok(Wakeup::TimedOut)
            }
        }
    }
}

/// One kernel uevent: `action@devpath\0KEY=VALUE\0...`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Uevent {
    pub action: String,
    pub devpath: String,
    pub subsystem: String,
    pub devtype: String,
    pub devname: String,
}

impl Uevent {
    pub fn parse(msg: &[u8]) -> Option<Self> {
        let mut parts = msg.split(|b| *b == 0).filter(|p| !p.is_empty());
        let header = std::str::from_utf8(parts.next()?).ok()?;
        // udev's rebroadcasts start with "libudev"; we only bind the kernel group, but a
        // message without '@' is not a kernel event either way.
        let (action, devpath) = header.split_once('@')?;
        let mut ev = Uevent {
            action: action.to_owned(),
            devpath: devpath.to_owned(),
            ..Default::default()
        };
        for part in parts {
            let Ok(kv) = std::str::from_utf8(part) else {
                continue;
            };
            let Some((k, v)) = kv.split_once('=') else {
                continue;
            };
            match k {
                "SUBSYSTEM" => ev.subsystem = v.to_owned(),
                "DEVTYPE" => ev.devtype = v.to_owned(),
                "DEVNAME" => ev.devname = v.to_owned(),
                _ => {}
            }
        }
        Some(ev)
    }

    /// A whole disk was added or changed (a `change` can bring a serial or size with it).
    pub fn is_disk_appearance(&self) -> bool {
        self.subsystem == "block"
            && self.devtype == "disk"
            && matches!(self.action.as_str(), "add" | "change")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kernel_block_add() {
        let msg = b"add@/devices/pci0000:00/0000:00:04.0/virtio2/block/vdb\0ACTION=add\0DEVPATH=/devices/pci0000:00/0000:00:04.0/virtio2/block/vdb\0SUBSYSTEM=block\0MAJOR=254\0MINOR=16\0DEVNAME=vdb\0DEVTYPE=disk\0DISKSEQ=3\0SEQNUM=1234\0";
        let e = Uevent::parse(msg).unwrap();
        assert_eq!(e.action, "add");
        assert_eq!(e.devname, "vdb");
        assert!(e.is_disk_appearance());
    }

    #[test]
    fn ignores_partitions_other_subsystems_and_udev_messages() {
        let part =
            Uevent::parse(b"add@/x/block/vdb/vdb1\0SUBSYSTEM=block\0DEVTYPE=partition\0").unwrap();
        assert!(!part.is_disk_appearance());
        let scsi =
            Uevent::parse(b"add@/x/target0:0:1\0SUBSYSTEM=scsi\0DEVTYPE=scsi_target\0").unwrap();
        assert!(!scsi.is_disk_appearance());
        let remove =
            Uevent::parse(b"remove@/x/block/vdb\0SUBSYSTEM=block\0DEVTYPE=disk\0").unwrap();
        assert!(!remove.is_disk_appearance());
        assert!(Uevent::parse(b"libudev\0\xfe\xed").is_none());
    }
}
