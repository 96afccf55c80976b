//! Disk discovery against sysfs fixture trees (`fixtures/sysfs/<name>/block/...`) and the
//! kernel's real uevent stream.

mod support;

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use kubevirt_csi_node::context::Bus;
use kubevirt_csi_node::devno::DevNo;
use kubevirt_csi_node::discovery::{DiscoveryError, Scan, Sysfs};
use kubevirt_csi_node::uevent::{DiskEvents, UeventSocket, Wakeup};
use nix::sys::stat::{Mode, SFlag, makedev, mknod};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sysfs")
}

/// Copies a fixture tree and creates matching device nodes, as devtmpfs would.
struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new(name: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("kvcsi-disc-")
            .tempdir()
            .expect("tempdir");
        copy_tree(&fixtures().join(name), &dir.path().join("sys"));
        std::fs::create_dir(dir.path().join("dev")).expect("dev dir");
        let f = Fixture { dir };
        for name in f.sysfs().disk_names().expect("disks") {
            f.mknod(&name);
        }
        f
    }

    fn sys(&self) -> PathBuf {
        self.dir.path().join("sys")
    }

    fn dev(&self) -> PathBuf {
        self.dir.path().join("dev")
    }

    fn sysfs(&self) -> Sysfs {
        Sysfs::new(self.sys(), self.dev())
    }

    fn mknod(&self, name: &str) {
        let devno = self
            .sysfs()
            .devno_of(name)
            .expect("dev file")
            .expect("dev file present");
        mknod(
            &self.dev().join(name),
            SFlag::S_IFBLK,
            Mode::from_bits_truncate(0o600),
            makedev(devno.major, devno.minor),
        )
        .expect("mknod (needs root)");
    }
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).unwrap_or_else(|e| panic!("read {from:?}: {e}")) {
        let entry = entry.expect("entry");
        let dest = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_tree(&entry.path(), &dest);
        } else {
            std::fs::copy(entry.path(), &dest).expect("copy");
        }
    }
}

fn found(scan: Scan) -> String {
    match scan {
        Scan::Found(d) => d.name,
        other => panic!("expected a disk, got {other:?}"),
    }
}

#[test]
fn virtio_fixture_finds_disk_by_serial_attribute() {
    let f = Fixture::new("virtio");
    let s = f.sysfs();
    assert_eq!(
        found(s.scan("kvcsi-0123456789abcd", Some(Bus::Virtio)).unwrap()),
        "vdb"
    );
    assert_eq!(found(s.scan("kvcsi-0123456789abcd", None).unwrap()), "vdb");
    let Scan::Found(disk) = s.scan("kvcsi-0123456789abcd", None).unwrap() else {
        unreachable!()
    };
    assert_eq!(disk.devno, DevNo::new(254, 16));
    assert_eq!(disk.dev_path, f.dev().join("vdb"));
    // vda has an empty serial and must never match anything.
    assert_eq!(s.serial_of("vda", None).unwrap(), None);
    assert_eq!(s.scan("", None).unwrap(), Scan::Absent);
    assert_eq!(
        s.scan("kvcsi-0123456789abcd", Some(Bus::Scsi)).unwrap(),
        Scan::Absent,
        "virtio serial is not a SCSI serial"
    );
    assert_eq!(s.scan("kvcsi-unknown", None).unwrap(), Scan::Absent);
}

#[test]
fn virtio_serial_longer_than_twenty_bytes_matches_its_visible_prefix() {
    let f = Fixture::new("virtio");
    assert_eq!(
        found(
            f.sysfs()
                .scan("kvcsi-0123456789abcdEXTRA", Some(Bus::Virtio))
                .unwrap()
        ),
        "vdb"
    );
}

#[test]
fn scsi_fixture_finds_disk_by_vpd_page_0x80() {
    let f = Fixture::new("scsi");
    let s = f.sysfs();
    assert_eq!(
        s.serial_of("sda", Some(Bus::Scsi)).unwrap().as_deref(),
        Some("kvcsi-fedcba98765432")
    );
    assert_eq!(
        found(s.scan("kvcsi-fedcba98765432", Some(Bus::Scsi)).unwrap()),
        "sda"
    );
    assert_eq!(
        found(s.scan("kvcsi-fedcba98765432", Some(Bus::Sata)).unwrap()),
        "sda"
    );
    assert_eq!(found(s.scan("kvcsi-fedcba98765432", None).unwrap()), "sda");
    assert_eq!(
        s.scan("kvcsi-fedcba98765432", Some(Bus::Virtio)).unwrap(),
        Scan::Absent
    );
}

/// Runs over every fixture tree, including the ones captured from QEMU guests later: each
/// disk that shows a serial is found by it, uniquely.
#[test]
fn every_fixture_disk_with_a_serial_is_found_uniquely() {
    let mut checked = 0;
    for tree in std::fs::read_dir(fixtures()).expect("fixtures") {
        let name = tree
            .expect("entry")
            .file_name()
            .into_string()
            .expect("utf-8 fixture name");
        let f = Fixture::new(&name);
        let s = f.sysfs();
        for disk in s.disk_names().expect("disks") {
            if let Some(serial) = s.serial_of(&disk, None).expect("serial") {
                assert_eq!(
                    found(s.scan(&serial, None).expect("scan")),
                    disk,
                    "fixture {name}"
                );
                checked += 1;
            }
        }
    }
    assert!(
        checked >= 2,
        "fixtures must hold at least the virtio and scsi disks"
    );
}

#[test]
fn a_serial_on_two_disks_is_an_error() {
    let f = Fixture::new("virtio");
    copy_tree(&f.sys().join("block/vdb"), &f.sys().join("block/vdc"));
    std::fs::write(f.sys().join("block/vdc/dev"), "254:32\n").unwrap();
    f.mknod("vdc");
    match f.sysfs().scan("kvcsi-0123456789abcd", None) {
        Err(DiscoveryError::Ambiguous { disks, .. }) => assert_eq!(disks, vec!["vdb", "vdc"]),
        other => panic!("expected Ambiguous, got {other:?}"),
    }
}

#[test]
fn a_device_node_that_is_not_the_disk_is_an_error() {
    let f = Fixture::new("virtio");
    std::fs::remove_file(f.dev().join("vdb")).unwrap();
    mknod(
        &f.dev().join("vdb"),
        SFlag::S_IFBLK,
        Mode::from_bits_truncate(0o600),
        makedev(254, 99),
    )
    .unwrap();
    assert!(matches!(
        f.sysfs().scan("kvcsi-0123456789abcd", None),
        Err(DiscoveryError::NodeMismatch { .. })
    ));
    std::fs::remove_file(f.dev().join("vdb")).unwrap();
    assert_eq!(
        f.sysfs().scan("kvcsi-0123456789abcd", None).unwrap(),
        Scan::NodeMissing("vdb".into())
    );
}

#[test]
fn waits_for_a_disk_announced_by_an_event() {
    let f = Fixture::new("virtio");
    let (tx, mut rx) = mpsc::channel();
    let sys = f.sys();
    let dev = f.dev();
    let plug = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        let disk = sys.join("block/vdc");
        std::fs::create_dir_all(&disk).unwrap();
        std::fs::write(disk.join("dev"), "254:32\n").unwrap();
        std::fs::write(disk.join("serial"), "kvcsi-hotplugged0001").unwrap();
        mknod(
            &dev.join("vdc"),
            SFlag::S_IFBLK,
            Mode::from_bits_truncate(0o600),
            makedev(254, 32),
        )
        .unwrap();
        tx.send(()).unwrap();
        // Keep the channel open so the waiter sees a timeout, not a hang-up, if it misses us.
        std::thread::sleep(Duration::from_secs(2));
    });
    let start = Instant::now();
    let disk = f
        .sysfs()
        .wait_for(
            "kvcsi-hotplugged0001",
            None,
            Some(&mut rx as &mut dyn DiskEvents),
            Duration::from_secs(10),
        )
        .unwrap();
    assert_eq!(disk.name, "vdc");
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "woken by the event, not the timeout"
    );
    plug.join().unwrap();
}

#[test]
fn gives_up_after_the_timeout() {
    let f = Fixture::new("scsi");
    let (_tx, mut rx) = mpsc::channel::<()>();
    let start = Instant::now();
    let err = f
        .sysfs()
        .wait_for(
            "kvcsi-absent",
            Some(Bus::Scsi),
            Some(&mut rx as &mut dyn DiskEvents),
            Duration::from_millis(300),
        )
        .unwrap_err();
    assert!(matches!(err, DiscoveryError::Timeout { .. }), "{err:?}");
    assert!(err.to_string().contains("kvcsi-absent"));
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    // Without an event source we scan once and say why.
    let err = f
        .sysfs()
        .wait_for("kvcsi-absent", None, None, Duration::from_secs(60))
        .unwrap_err();
    assert!(err.to_string().contains("uevents unavailable"), "{err}");
}

#[test]
fn kernel_uevents_wake_the_waiter_when_a_loop_disk_appears() {
    let dir = tempfile::Builder::new()
        .prefix("kvcsi-uevent-")
        .tempdir()
        .unwrap();
    let mut socket = UeventSocket::subscribe().expect("subscribe to NETLINK_KOBJECT_UEVENT");
    let disk = support::LoopDevice::new(dir.path().join("img"), 8 << 20);
    let woke = socket
        .wait(Instant::now() + Duration::from_secs(10))
        .expect("wait");
    assert_eq!(
        woke,
        Wakeup::Changed,
        "no block uevent seen for {:?}",
        disk.dev
    );
}
