//! Worker VM plumbing: two VMs side by side, the agent's exit codes and stdin, the
//! `kvcsi-guest-exec` CLI, read-only disks, and Drop leaving nothing behind.

use std::error::Error;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use kubevirt_csi_harness::vm::{DiskBus, DiskSpec, ExecRequest, VmOptions, WorkerVm};

const AGENT: &str = env!("CARGO_BIN_EXE_kvcsi-guest-agent");
const EXEC: &str = env!("CARGO_BIN_EXE_kvcsi-guest-exec");

fn report(e: &dyn Error) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        msg.push_str(&format!("\ncaused by: {s}"));
        source = s.source();
    }
    msg
}

async fn boot() -> WorkerVm {
    WorkerVm::boot(VmOptions::new(AGENT))
        .await
        .unwrap_or_else(|e| panic!("boot failed: {}", report(&e)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_vms_run_side_by_side_and_drop_cleans_up() {
    let (a, b) = tokio::join!(boot(), boot());
    eprintln!(
        "parallel boots: {:?} and {:?}",
        a.boot_duration(),
        b.boot_duration()
    );
    assert_ne!(a.agent_addr(), b.agent_addr());
    assert_ne!(a.work_dir(), b.work_dir());
    for vm in [&a, &b] {
        assert_eq!(vm.exec_ok(["hostname"]).await.unwrap(), "kvcsi-worker\n");
    }

    // Exit codes, stderr, stdin and spawn failures come back as the guest saw them.
    let r = a.exec(["sh", "-c", "echo oops >&2; exit 3"]).await.unwrap();
    assert_eq!((r.code, r.stderr.as_str()), (3, "oops\n"));
    let r = a.exec(["/no/such/binary"]).await.unwrap();
    assert_eq!(r.code, 127, "{r:?}");
    let r = a
        .agent()
        .request(&ExecRequest::new(["tr", "a-z", "A-Z"]).with_stdin("piped in"))
        .await
        .unwrap();
    assert_eq!(r.stdout, "PIPED IN");
    let r = a.exec(["sh", "-c", "kill -9 $$"]).await.unwrap();
    assert_eq!(r.code, 128 + 9);

    // The host-side CLI csi-sanity will call.
    let out = Command::new(EXEC)
        .args([
            "--addr",
            &a.agent_addr().to_string(),
            "--",
            "sh",
            "-c",
            "echo out; echo err >&2; exit 5",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(5));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "out\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "err\n");

    // Background output lands in the log file the agent reports.
    let bg = a
        .spawn_background(
            ["sh", "-c", "echo from the background"],
            Some("/run/bg-test.log"),
        )
        .await
        .unwrap();
    assert_eq!(bg.log, "/run/bg-test.log");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        a.exec_ok(["cat", &bg.log]).await.unwrap(),
        "from the background\n"
    );

    // A read-only disk is read-only in the guest.
    let backing = tempfile::NamedTempFile::new().unwrap();
    backing.as_file().set_len(16 << 20).unwrap();
    b.hotplug_disk(&DiskSpec {
        id: "ro1".into(),
        file_path: backing.path().to_owned(),
        serial: "KVCSI-RO-1".into(),
        bus: DiskBus::Scsi,
        read_only: true,
    })
    .await
    .unwrap();
    let dev = b
        .wait_for_disk("KVCSI-RO-1", Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(
        b.exec_ok(["cat", &format!("/sys/block/{dev}/ro")])
            .await
            .unwrap(),
        "1\n"
    );
    // Unknown ids and taken ids are refused before QEMU sees them.
    assert!(b.unplug_disk("nope").await.is_err());

    // Dropping a VM kills its QEMU and removes its scratch directory, disk still attached or not.
    for vm in [a, b] {
        let pid = vm.qemu_pid();
        let dir = vm.work_dir().to_owned();
        drop(vm);
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "qemu {pid} survived drop"
        );
        assert!(!dir.exists(), "{} survived drop", dir.display());
    }
}
