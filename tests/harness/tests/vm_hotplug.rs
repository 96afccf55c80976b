//! The worker VM end to end: boot, hotplug a SCSI and a virtio disk with 20-character serials,
//! find them by serial in sysfs, format and mount one, unplug both, shut down.
//!
//! Needs qemu-system-x86_64 and the guest image; `hack/guest.sh` is run to build or find the
//! image, and a missing piece fails the test loudly rather than skipping it.

use std::error::Error;
use std::time::{Duration, Instant};

use kubevirt_csi_harness::vm::{AgentClient, DiskBus, DiskSpec, VmOptions, WorkerVm};

const AGENT: &str = env!("CARGO_BIN_EXE_kvcsi-guest-agent");
const SCSI_SERIAL: &str = "KVCSI-SCSI-000000001";
const VIRTIO_SERIAL: &str = "KVCSI-VIRT-000000002";
const NODE_PORT: u16 = 9000;

fn report(e: &dyn Error) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        msg.push_str(&format!("\ncaused by: {s}"));
        source = s.source();
    }
    msg
}

fn sparse_file(dir: &std::path::Path, name: &str, size: u64) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::File::create(&path).unwrap().set_len(size).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hotplug_scsi_and_virtio_disks_by_serial() {
    let shared = tempfile::tempdir().unwrap();
    let backing = tempfile::tempdir().unwrap();
    let mut options = VmOptions::new(AGENT);
    options.shared_dir = Some(shared.path().to_owned());
    options.forwarded_ports = vec![NODE_PORT];
    let vm = WorkerVm::boot(options)
        .await
        .unwrap_or_else(|e| panic!("boot failed: {}", report(&e)));
    eprintln!("boot to agent ready: {:?}", vm.boot_duration());

    // The guest runs the host's userland on its own kernel.
    let uname = vm.exec_ok(["uname", "-r"]).await.unwrap();
    assert!(uname.trim().ends_with("-amd64"), "guest kernel {uname}");

    // A background process whose port is forwarded: a second agent stands in for the node plugin.
    let bg = vm
        .spawn_background([AGENT, "--listen", &format!("0.0.0.0:{NODE_PORT}")], None)
        .await
        .unwrap();
    let node_addr = format!("127.0.0.1:{}", vm.host_port(NODE_PORT).unwrap());
    let second = AgentClient::new(node_addr.parse().unwrap()).with_timeout(Duration::from_secs(5));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match second.exec(["echo", "through the forwarded port"]).await {
            Ok(r) => {
                assert_eq!(r.stdout, "through the forwarded port\n");
                break;
            }
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("background agent {bg:?} unreachable: {}", report(&e)),
        }
    }

    let disks = [
        DiskSpec {
            id: "scsi1".into(),
            file_path: sparse_file(backing.path(), "scsi.img", 64 << 20),
            serial: SCSI_SERIAL.into(),
            bus: DiskBus::Scsi,
            read_only: false,
        },
        DiskSpec {
            id: "virtio1".into(),
            file_path: sparse_file(backing.path(), "virtio.img", 64 << 20),
            serial: VIRTIO_SERIAL.into(),
            bus: DiskBus::Virtio,
            read_only: false,
        },
    ];
    let mut devs = Vec::new();
    for disk in &disks {
        let start = Instant::now();
        vm.hotplug_disk(disk).await.unwrap_or_else(|e| {
            panic!("hotplug {}: {}\n{}", disk.id, report(&e), vm.console_tail())
        });
        let qmp_done = start.elapsed();
        let dev = vm
            .wait_for_disk(&disk.serial, Duration::from_secs(60))
            .await
            .unwrap_or_else(|e| panic!("{}\n{}", report(&e), vm.console_tail()));
        eprintln!(
            "hotplug {:?} {}: qmp {:?}, visible in guest as {dev} after {:?}",
            disk.bus,
            disk.id,
            qmp_done,
            start.elapsed()
        );
        devs.push(dev);
    }
    let (sd, vd) = (&devs[0], &devs[1]);
    assert!(sd.starts_with("sd"), "scsi disk came up as {sd}");
    assert!(vd.starts_with("vd"), "virtio disk came up as {vd}");

    let serial = vm
        .exec_ok(["cat", &format!("/sys/block/{vd}/serial")])
        .await
        .unwrap();
    assert_eq!(serial.trim_end(), VIRTIO_SERIAL);
    let pg80 = vm
        .exec_ok(["cat", &format!("/sys/block/{sd}/device/vpd_pg80")])
        .await
        .unwrap();
    assert!(pg80.contains(SCSI_SERIAL), "vpd_pg80 of {sd}: {pg80:?}");

    // Format, mount under the shared dir (as csi-sanity's target paths will be), write, unmount.
    let start = Instant::now();
    let target = shared.path().join("target");
    let target = target.to_str().unwrap();
    vm.exec_ok(["mkfs.ext4", "-q", "-F", &format!("/dev/{vd}")])
        .await
        .unwrap();
    vm.exec_ok(["mkdir", "-p", target]).await.unwrap();
    vm.exec_ok(["mount", "-t", "ext4", &format!("/dev/{vd}"), target])
        .await
        .unwrap_or_else(|e| panic!("{}\n{}", report(&e), vm.console_tail()));
    vm.exec_ok(["sh", "-c", "echo hello > \"$1/file\" && sync", "sh", target])
        .await
        .unwrap();
    let read = vm
        .exec_ok(["cat", &format!("{target}/file")])
        .await
        .unwrap();
    assert_eq!(read, "hello\n");
    // The mount exists only in the guest: the host sees the bare shared directory.
    assert!(!shared.path().join("target/file").exists());
    vm.exec_ok(["umount", target]).await.unwrap();
    eprintln!("mkfs.ext4 + mount + write + umount: {:?}", start.elapsed());

    for disk in &disks {
        let start = Instant::now();
        vm.unplug_disk(&disk.id).await.unwrap_or_else(|e| {
            panic!("unplug {}: {}\n{}", disk.id, report(&e), vm.console_tail())
        });
        vm.wait_for_disk_gone(&disk.serial, Duration::from_secs(30))
            .await
            .unwrap();
        eprintln!("unplug {:?} {}: {:?}", disk.bus, disk.id, start.elapsed());
    }
    let left = vm.exec_ok(["ls", "/sys/block"]).await.unwrap();
    for dev in &devs {
        assert!(
            !left.split_whitespace().any(|d| d == dev),
            "{dev} still in /sys/block: {left}"
        );
    }

    // A disk can go back into the port the unplug freed.
    let again = DiskSpec {
        id: "virtio2".into(),
        ..disks[1].clone()
    };
    vm.hotplug_disk(&again).await.unwrap();
    vm.wait_for_disk(VIRTIO_SERIAL, Duration::from_secs(60))
        .await
        .unwrap();
    vm.unplug_disk("virtio2").await.unwrap();

    vm.shutdown()
        .await
        .unwrap_or_else(|e| panic!("shutdown: {}", report(&e)));
}
