//! Regenerates the node plugin's sysfs fixtures from a live guest:
//! `cargo test -p kubevirt-csi-harness --test vm_fixtures -- --ignored`.
//!
//! Writes `node/tests/fixtures/sysfs/qemu-{virtio,scsi}/block/<dev>/...` (symlinks dereferenced,
//! binary bytes kept) and a README per directory recording the kernel and QEMU used. Ignored by
//! default because it rewrites files in the source tree.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use kubevirt_csi_harness::vm::image::repo_root;
use kubevirt_csi_harness::vm::{DiskBus, DiskSpec, VmOptions, WorkerVm};

const AGENT: &str = env!("CARGO_BIN_EXE_kvcsi-guest-agent");
const FILES: &[&str] = &[
    "dev",
    "size",
    "ro",
    "serial",
    "device/vpd_pg80",
    "device/vpd_pg83",
    "device/model",
    "device/vendor",
];

/// Copies the fixture files that exist for `dev` from the guest's sysfs into `dst` (a guest path
/// under the shared dir) with `cat`, which dereferences links and keeps binary attributes intact.
const COPY: &str = r#"src="/sys/block/$1"; dst="$2"; shift 2
for f in "$@"; do
  if [ -e "$src/$f" ]; then mkdir -p "$(dirname "$dst/$f")" && cat "$src/$f" > "$dst/$f"; fi
done"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "rewrites node/tests/fixtures/sysfs/qemu-*; run explicitly to regenerate"]
async fn capture_sysfs_fixtures() {
    let shared = tempfile::tempdir().unwrap();
    let backing = tempfile::tempdir().unwrap();
    let mut options = VmOptions::new(AGENT);
    options.shared_dir = Some(shared.path().to_owned());
    let vm = WorkerVm::boot(options)
        .await
        .unwrap_or_else(|e| panic!("boot failed: {e}"));
    let kernel = vm.exec_ok(["cat", "/proc/version"]).await.unwrap();
    let qemu = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .unwrap();
    let qemu = String::from_utf8_lossy(&qemu.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned();

    let fixtures = repo_root().join("node/tests/fixtures/sysfs");
    let cases = [
        (
            "qemu-virtio",
            DiskBus::Virtio,
            "KVCSI-VIRT-000000002",
            "virtio-blk-pci in a pcie-root-port",
        ),
        (
            "qemu-scsi",
            DiskBus::Scsi,
            "KVCSI-SCSI-000000001",
            "scsi-hd on virtio-scsi-pci (bus scsi0.0)",
        ),
    ];
    for (name, bus, serial, device) in cases {
        let file = backing.path().join(format!("{name}.img"));
        std::fs::File::create(&file)
            .unwrap()
            .set_len(1 << 30)
            .unwrap();
        vm.hotplug_disk(&DiskSpec {
            id: name.into(),
            file_path: file,
            serial: serial.into(),
            bus,
            read_only: false,
        })
        .await
        .unwrap();
        let dev = vm
            .wait_for_disk(serial, Duration::from_secs(60))
            .await
            .unwrap();
        let staged = shared.path().join(name);
        let dst = staged.join("block").join(&dev);
        let mut argv = vec![
            "sh".to_owned(),
            "-c".into(),
            COPY.into(),
            "sh".into(),
            dev.clone(),
        ];
        argv.push(dst.to_str().unwrap().to_owned());
        argv.extend(FILES.iter().map(|f| f.to_string()));
        vm.exec_ok(argv).await.unwrap();

        let out = fixtures.join(name);
        if out.exists() {
            std::fs::remove_dir_all(&out).unwrap();
        }
        copy_tree(&staged, &out);
        let captured: Vec<&str> = FILES
            .iter()
            .copied()
            .filter(|f| out.join("block").join(&dev).join(f).exists())
            .collect();
        std::fs::write(
            out.join("README.md"),
            format!(
                "# sysfs of a hotplugged {device} disk\n\n\
                 Captured from a live worker VM by `tests/harness/tests/vm_fixtures.rs`\n\
                 (`cargo test -p kubevirt-csi-harness --test vm_fixtures -- --ignored`), which boots\n\
                 the guest from `hack/guest.sh`, hotplugs a 1 GiB sparse raw file over QMP as\n\
                 `{device}` with serial `{serial}`, and copies `/sys/block/{dev}/...` with `cat`\n\
                 (links dereferenced, binary VPD pages byte for byte).\n\n\
                 Files: {files}.\n\n\
                 - Guest kernel: `{kernel}`\n\
                 - QEMU: `{qemu}` (`-machine q35 -accel tcg`)\n",
                files = captured.iter().map(|f| format!("`{f}`")).collect::<Vec<_>>().join(", "),
                kernel = kernel.trim(),
            ),
        )
        .unwrap();
        eprintln!("captured {name}: /sys/block/{dev} -> {}", out.display());
        vm.unplug_disk(name).await.unwrap();
    }
    vm.shutdown().await.unwrap();
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}
