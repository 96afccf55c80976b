//! Stage, publish, unpublish and unstage on real loop devices with real mounts.
//! Needs root, loop devices, mkfs.ext4, mkfs.xfs, blkid, resize2fs and xfs_growfs.

mod support;

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::time::Duration;

use csi_proto::v1::node_server::Node;
use csi_proto::v1::volume_capability::access_mode::Mode;
use csi_proto::v1::volume_usage::Unit;
use csi_proto::v1::{CapacityRange, NodeExpandVolumeRequest, NodeGetVolumeStatsRequest};
use kubevirt_csi_node::devno::DevNo;
use nix::mount::{MsFlags, mount};
use support::*;
use tonic::{Code, Request};

async fn fs_lifecycle(fs: &str, size: u64) {
    require_tool(if fs == "xfs" { "mkfs.xfs" } else { "mkfs.ext4" });
    let mut env = Env::new();
    let serial = format!("kvcsi-{fs}-lifecycle");
    let d = env.add_disk(&serial, size);
    let staging = env.mkdir("plugins/csi.kubevirt.io/pv/vol/globalmount");
    let target = env.mkdir("pods/p1/volumes/vol").join("mount");
    let cap = mount_cap(fs, &[], Mode::SingleNodeWriter);

    for _ in 0..2 {
        env.svc
            .node_stage_volume(Request::new(stage_req(
                "vol",
                &staging,
                &serial,
                cap.clone(),
            )))
            .await
            .expect("stage");
    }
    let staged = mount_at(&staging).expect("staging is mounted");
    assert_eq!(staged.fs_type, fs);
    assert_eq!(staged.devno, env.disks[d].devno);
    assert_eq!(fs_type_on(&env.disks[d].dev), fs);

    for _ in 0..2 {
        env.svc
            .node_publish_volume(Request::new(publish_req(
                "vol",
                &staging,
                &target,
                cap.clone(),
                false,
            )))
            .await
            .expect("publish");
    }
    let published = mount_at(&target).expect("target is mounted");
    assert_eq!(published.devno, env.disks[d].devno);
    assert_eq!(
        MountTableCount::at(&target),
        1,
        "idempotent publish must not stack mounts"
    );
    std::fs::write(target.join("hello"), b"world").expect("write through target");
    assert_eq!(
        std::fs::read(staging.join("hello")).expect("read through staging"),
        b"world"
    );

    for _ in 0..2 {
        env.svc
            .node_unpublish_volume(Request::new(unpublish_req("vol", &target)))
            .await
            .expect("unpublish");
    }
    assert!(!target.exists(), "target path must be removed");
    for _ in 0..2 {
        env.svc
            .node_unstage_volume(Request::new(unstage_req("vol", &staging)))
            .await
            .expect("unstage");
    }
    assert!(mount_at(&staging).is_none());

    // Staging again finds the filesystem and keeps the data: no reformat.
    env.svc
        .node_stage_volume(Request::new(stage_req("vol", &staging, &serial, cap)))
        .await
        .expect("restage");
    assert_eq!(
        std::fs::read(staging.join("hello")).expect("data survives restage"),
        b"world"
    );
    env.svc
        .node_unstage_volume(Request::new(unstage_req("vol", &staging)))
        .await
        .expect("unstage");
}

struct MountTableCount;
impl MountTableCount {
    fn at(path: &std::path::Path) -> usize {
        kubevirt_csi_node::mountinfo::MountTable::read()
            .expect("mountinfo")
            .at(path)
            .len()
    }
}

#[tokio::test]
async fn ext4_lifecycle_is_idempotent() {
    fs_lifecycle("ext4", 64 * MIB).await;
}

#[tokio::test]
async fn xfs_lifecycle_is_idempotent() {
    // mkfs.xfs refuses filesystems under 300 MiB.
    fs_lifecycle("xfs", 512 * MIB).await;
}

#[tokio::test]
async fn default_fs_type_is_ext4() {
    let mut env = Env::new();
    let d = env.add_disk("kvcsi-default-fs", 32 * MIB);
    let staging = env.mkdir("staging/default");
    let cap = mount_cap("", &[], Mode::SingleNodeWriter);
    env.svc
        .node_stage_volume(Request::new(stage_req(
            "v",
            &staging,
            "kvcsi-default-fs",
            cap,
        )))
        .await
        .expect("stage");
    assert_eq!(fs_type_on(&env.disks[d].dev), "ext4");
    env.svc
        .node_unstage_volume(Request::new(unstage_req("v", &staging)))
        .await
        .expect("unstage");
}

#[tokio::test]
async fn block_lifecycle_is_idempotent() {
    let mut env = Env::new();
    let d = env.add_disk("kvcsi-block-life", 16 * MIB);
    let staging = env.mkdir("plugins/csi.kubevirt.io/volumeDevices/staging/blk");
    let target = env
        .mkdir("plugins/kubernetes.io/csi/volumeDevices/publish/blk")
        .join("pod-uid");
    let cap = block_cap(Mode::SingleNodeWriter);

    for _ in 0..2 {
        env.svc
            .node_stage_volume(Request::new(stage_req(
                "blk",
                &staging,
                "kvcsi-block-life",
                cap.clone(),
            )))
            .await
            .expect("stage");
    }
    assert!(
        mount_at(&staging).is_none(),
        "block volumes need no staging mount"
    );
    for _ in 0..2 {
        env.svc
            .node_publish_volume(Request::new(publish_req(
                "blk",
                &staging,
                &target,
                cap.clone(),
                false,
            )))
            .await
            .expect("publish");
    }
    let meta = std::fs::metadata(&target).expect("stat target");
    assert!(meta.file_type().is_block_device(), "target is the device");
    assert_eq!(DevNo::from_raw(meta.rdev()), env.disks[d].devno);
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&target)
            .expect("open target");
        f.write_all(b"raw block data").expect("write");
        f.sync_all().expect("sync");
    }
    let mut back = [0u8; 14];
    std::fs::File::open(&env.disks[d].dev)
        .and_then(|mut f| f.read_exact(&mut back))
        .expect("read disk");
    assert_eq!(&back, b"raw block data");
    assert_eq!(
        fs_type_on(&env.disks[d].dev),
        "",
        "block volumes are never formatted"
    );

    for _ in 0..2 {
        env.svc
            .node_unpublish_volume(Request::new(unpublish_req("blk", &target)))
            .await
            .expect("unpublish");
    }
    assert!(!target.exists(), "target file removed");
    for _ in 0..2 {
        env.svc
            .node_unstage_volume(Request::new(unstage_req("blk", &staging)))
            .await
            .expect("unstage");
    }
    assert_eq!(
        std::fs::read_dir(&staging)
            .expect("staging dir stays")
            .count(),
        0,
        "no state left behind"
    );
}

#[tokio::test]
async fn read_only_publish_is_enforced() {
    let mut env = Env::new();
    env.add_disk("kvcsi-readonly", 32 * MIB);
    let staging = env.mkdir("staging/ro");
    let target = env.mkdir("pods/ro").join("mount");
    let cap = mount_cap("ext4", &["nodev"], Mode::SingleNodeWriter);
    env.svc
        .node_stage_volume(Request::new(stage_req(
            "ro",
            &staging,
            "kvcsi-readonly",
            cap.clone(),
        )))
        .await
        .expect("stage");
    env.svc
        .node_publish_volume(Request::new(publish_req(
            "ro",
            &staging,
            &target,
            cap.clone(),
            true,
        )))
        .await
        .expect("publish ro");
    env.svc
        .node_publish_volume(Request::new(publish_req(
            "ro",
            &staging,
            &target,
            cap.clone(),
            true,
        )))
        .await
        .expect("publish ro again");

    let m = mount_at(&target).expect("mounted");
    assert!(m.mount_is_read_only());
    assert!(
        m.mount_options.iter().any(|o| o == "nodev"),
        "flags of the staging mount carried over: {:?}",
        m.mount_options
    );
    let err = std::fs::write(target.join("x"), b"x").expect_err("write must fail");
    assert_eq!(err.raw_os_error(), Some(nix::libc::EROFS));
    std::fs::write(staging.join("x"), b"x").expect("staging stays writable");

    let err = env
        .svc
        .node_publish_volume(Request::new(publish_req(
            "ro", &staging, &target, cap, false,
        )))
        .await
        .expect_err("rw over ro");
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    env.svc
        .node_unpublish_volume(Request::new(unpublish_req("ro", &target)))
        .await
        .expect("unpublish");
    env.svc
        .node_unstage_volume(Request::new(unstage_req("ro", &staging)))
        .await
        .expect("unstage");
}

#[tokio::test]
async fn reader_only_access_mode_stages_read_only() {
    let mut env = Env::new();
    let d = env.add_disk("kvcsi-reader-only", 32 * MIB);
    format("mkfs.ext4", &env.disks[d].dev);
    let staging = env.mkdir("staging/rox");
    let cap = mount_cap("ext4", &[], Mode::MultiNodeReaderOnly);
    env.svc
        .node_stage_volume(Request::new(stage_req(
            "rox",
            &staging,
            "kvcsi-reader-only",
            cap,
        )))
        .await
        .expect("stage");
    assert!(mount_at(&staging).expect("mounted").mount_is_read_only());
    env.svc
        .node_unstage_volume(Request::new(unstage_req("rox", &staging)))
        .await
        .expect("unstage");
}

#[tokio::test]
async fn mount_flags_are_applied() {
    let mut env = Env::new();
    env.add_disk("kvcsi-flags", 32 * MIB);
    let staging = env.mkdir("staging/flags");
    let target = env.mkdir("pods/flags").join("mount");
    let cap = mount_cap(
        "ext4",
        &["noexec", "noatime,nosuid", "data=ordered"],
        Mode::SingleNodeWriter,
    );
    env.svc
        .node_stage_volume(Request::new(stage_req(
            "f",
            &staging,
            "kvcsi-flags",
            cap.clone(),
        )))
        .await
        .expect("stage");
    env.svc
        .node_publish_volume(Request::new(publish_req(
            "f", &staging, &target, cap, false,
        )))
        .await
        .expect("publish");
    for path in [&staging, &target] {
        let m = mount_at(path).expect("mounted");
        for flag in ["noexec", "noatime", "nosuid"] {
            assert!(
                m.mount_options.iter().any(|o| o == flag),
                "{flag} missing at {path:?}: {:?}",
                m.mount_options
            );
        }
        assert!(
            m.super_options.iter().any(|o| o == "data=ordered"),
            "{:?}",
            m.super_options
        );
    }
    env.svc
        .node_unpublish_volume(Request::new(unpublish_req("f", &target)))
        .await
        .expect("unpublish");
    env.svc
        .node_unstage_volume(Request::new(unstage_req("f", &staging)))
        .await
        .expect("unstage");
}

#[tokio::test]
async fn refuses_bad_mount_flags_and_fs_types() {
    let mut env = Env::new();
    env.add_disk("kvcsi-badflags", 32 * MIB);
    let staging = env.mkdir("staging/bad");
    for cap in [
        mount_cap("ext4", &["bind"], Mode::SingleNodeWriter),
        mount_cap("ntfs", &[], Mode::SingleNodeWriter),
    ] {
        let err = env
            .svc
            .node_stage_volume(Request::new(stage_req(
                "b",
                &staging,
                "kvcsi-badflags",
                cap,
            )))
            .await
            .expect_err("refused");
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    }
    let cap = mount_cap("ext4", &[], Mode::MultiNodeMultiWriter);
    let err = env
        .svc
        .node_stage_volume(Request::new(stage_req(
            "b",
            &staging,
            "kvcsi-badflags",
            cap,
        )))
        .await
        .expect_err("refused");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert_eq!(fs_type_on(&env.disks[0].dev), "", "nothing formatted");
}

#[tokio::test]
async fn never_formats_a_disk_with_a_signature() {
    let mut env = Env::new();
    let d = env.add_disk("kvcsi-has-xfs", 512 * MIB);
    format("mkfs.xfs", &env.disks[d].dev);
    let staging = env.mkdir("staging/sig");
    let cap = mount_cap("ext4", &[], Mode::SingleNodeWriter);
    let err = env
        .svc
        .node_stage_volume(Request::new(stage_req("s", &staging, "kvcsi-has-xfs", cap)))
        .await
        .expect_err("refused");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("xfs"), "{}", err.message());
    assert_eq!(fs_type_on(&env.disks[d].dev), "xfs", "disk untouched");
    assert!(mount_at(&staging).is_none());
}

#[tokio::test]
async fn refuses_to_format_unknown_contents() {
    let mut env = Env::new();
    let d = env.add_disk("kvcsi-has-mbr", 32 * MIB);
    {
        // A boot-sector signature only: blkid may or may not name it, but either way the
        // disk is not blank and must not be formatted.
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&env.disks[d].dev)
            .expect("open");
        f.seek(SeekFrom::Start(510))
            .and_then(|_| f.write_all(&[0x55, 0xaa]))
            .expect("write signature");
        f.sync_all().expect("sync");
    }
    let staging = env.mkdir("staging/mbr");
    let cap = mount_cap("ext4", &[], Mode::SingleNodeWriter);
    let err = env
        .svc
        .node_stage_volume(Request::new(stage_req("m", &staging, "kvcsi-has-mbr", cap)))
        .await
        .expect_err("refused");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert_ne!(fs_type_on(&env.disks[d].dev), "ext4");
}

#[tokio::test]
async fn staging_path_with_another_device_is_already_exists() {
    let mut env = Env::new();
    env.add_disk("kvcsi-first", 32 * MIB);
    env.add_disk("kvcsi-second", 32 * MIB);
    let staging = env.mkdir("staging/shared");
    let cap = mount_cap("ext4", &[], Mode::SingleNodeWriter);
    env.svc
        .node_stage_volume(Request::new(stage_req(
            "a",
            &staging,
            "kvcsi-first",
            cap.clone(),
        )))
        .await
        .expect("stage a");
    let err = env
        .svc
        .node_stage_volume(Request::new(stage_req("b", &staging, "kvcsi-second", cap)))
        .await
        .expect_err("b over a");
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    let bstaging = env.mkdir("staging/blk");
    let bcap = block_cap(Mode::SingleNodeWriter);
    env.svc
        .node_stage_volume(Request::new(stage_req(
            "c",
            &bstaging,
            "kvcsi-first",
            bcap.clone(),
        )))
        .await
        .expect("stage block");
    let err = env
        .svc
        .node_stage_volume(Request::new(stage_req(
            "d",
            &bstaging,
            "kvcsi-second",
            bcap,
        )))
        .await
        .expect_err("other block");
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    env.svc
        .node_unstage_volume(Request::new(unstage_req("a", &staging)))
        .await
        .expect("unstage");
}

#[tokio::test]
async fn publish_before_stage_is_failed_precondition() {
    let mut env = Env::new();
    env.add_disk("kvcsi-unstaged", 32 * MIB);
    let staging = env.mkdir("staging/none");
    let target = env.mkdir("pods/none").join("t");
    for cap in [
        mount_cap("ext4", &[], Mode::SingleNodeWriter),
        block_cap(Mode::SingleNodeWriter),
    ] {
        let err = env
            .svc
            .node_publish_volume(Request::new(publish_req(
                "u", &staging, &target, cap, false,
            )))
            .await
            .expect_err("unstaged");
        assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    }
}

#[tokio::test]
async fn paths_outside_the_kubelet_root_are_invalid() {
    let mut env = Env::new();
    env.add_disk("kvcsi-paths", 32 * MIB);
    let cap = mount_cap("ext4", &[], Mode::SingleNodeWriter);
    let inside = env.path("staging/x");
    let dotted = format!("{}/../escape", env.kubelet.display());
    for bad in ["/etc", "relative/path", dotted.as_str(), ""] {
        let mut req = stage_req("p", &inside, "kvcsi-paths", cap.clone());
        req.staging_target_path = bad.to_owned();
        let err = env
            .svc
            .node_stage_volume(Request::new(req))
            .await
            .expect_err("bad path");
        assert_eq!(err.code(), Code::InvalidArgument, "{bad}: {err:?}");
    }
    std::os::unix::fs::symlink("/tmp", env.path("link")).expect("symlink");
    for escaping in [env.path("link"), env.path("link/created-outside")] {
        let req = stage_req("p", &escaping, "kvcsi-paths", cap.clone());
        let err = env
            .svc
            .node_stage_volume(Request::new(req))
            .await
            .expect_err("symlink escape");
        assert_eq!(err.code(), Code::InvalidArgument, "{escaping:?}: {err:?}");
    }
    assert!(
        !std::path::Path::new("/tmp/created-outside").exists(),
        "nothing created outside the root"
    );
    let mut req = stage_req("", &inside, "kvcsi-paths", cap.clone());
    assert_eq!(
        env.svc
            .node_stage_volume(Request::new(req.clone()))
            .await
            .expect_err("no id")
            .code(),
        Code::InvalidArgument
    );
    req.volume_id = "p".into();
    req.volume_capability = None;
    assert_eq!(
        env.svc
            .node_stage_volume(Request::new(req.clone()))
            .await
            .expect_err("no cap")
            .code(),
        Code::InvalidArgument
    );
    req.volume_capability = Some(cap);
    req.publish_context.clear();
    assert_eq!(
        env.svc
            .node_stage_volume(Request::new(req))
            .await
            .expect_err("no serial")
            .code(),
        Code::InvalidArgument
    );
    let err = env
        .svc
        .node_unpublish_volume(Request::new(unpublish_req(
            "p",
            std::path::Path::new("/etc/passwd"),
        )))
        .await
        .expect_err("outside");
    assert_eq!(err.code(), Code::InvalidArgument);
}

fn stats_req(volume_id: &str, path: &std::path::Path) -> NodeGetVolumeStatsRequest {
    NodeGetVolumeStatsRequest {
        volume_id: volume_id.into(),
        volume_path: path.to_str().expect("utf-8").into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn stats_report_usage_and_condition() {
    let mut env = Env::new();
    let d = env.add_disk("kvcsi-stats", 64 * MIB);
    let b = env.add_disk("kvcsi-stats-blk", 16 * MIB);
    let staging = env.mkdir("staging/stats");
    let target = env.mkdir("pods/stats").join("mount");
    let cap = mount_cap("ext4", &[], Mode::SingleNodeWriter);
    env.svc
        .node_stage_volume(Request::new(stage_req(
            "s",
            &staging,
            "kvcsi-stats",
            cap.clone(),
        )))
        .await
        .expect("stage");
    env.svc
        .node_publish_volume(Request::new(publish_req(
            "s", &staging, &target, cap, false,
        )))
        .await
        .expect("publish");
    std::fs::write(target.join("data"), vec![7u8; 4 * MIB as usize]).expect("write");
    nix::unistd::sync();

    let stats = env
        .svc
        .node_get_volume_stats(Request::new(stats_req("s", &target)))
        .await
        .expect("stats")
        .into_inner();
    let bytes = stats
        .usage
        .iter()
        .find(|u| u.unit == Unit::Bytes as i32)
        .expect("bytes");
    let inodes = stats
        .usage
        .iter()
        .find(|u| u.unit == Unit::Inodes as i32)
        .expect("inodes");
    assert!(
        bytes.total > 50 * MIB as i64 && bytes.total <= 64 * MIB as i64,
        "{bytes:?}"
    );
    assert!(bytes.used >= 4 * MIB as i64, "{bytes:?}");
    assert!(bytes.available > 0 && bytes.available < bytes.total);
    assert!(inodes.total > 0 && inodes.used > 0, "{inodes:?}");
    assert!(!stats.volume_condition.expect("condition").abnormal);

    // Block: size only.
    let bstaging = env.mkdir("staging/stats-blk");
    let btarget = env.mkdir("pods/stats-blk").join("dev");
    let bcap = block_cap(Mode::SingleNodeWriter);
    env.svc
        .node_stage_volume(Request::new(stage_req(
            "sb",
            &bstaging,
            "kvcsi-stats-blk",
            bcap.clone(),
        )))
        .await
        .expect("stage");
    env.svc
        .node_publish_volume(Request::new(publish_req(
            "sb", &bstaging, &btarget, bcap, false,
        )))
        .await
        .expect("publish");
    let stats = env
        .svc
        .node_get_volume_stats(Request::new(stats_req("sb", &btarget)))
        .await
        .expect("stats")
        .into_inner();
    assert_eq!(stats.usage.len(), 1);
    assert_eq!(stats.usage[0].total, 16 * MIB as i64);
    assert!(!stats.volume_condition.expect("condition").abnormal);

    // Not a volume: missing path, and a plain directory.
    for path in [env.path("pods/missing"), env.mkdir("pods/plain")] {
        let err = env
            .svc
            .node_get_volume_stats(Request::new(stats_req("s", &path)))
            .await
            .expect_err("not a volume");
        assert_eq!(err.code(), Code::NotFound, "{path:?}: {err:?}");
    }

    // The disks go away: the condition turns abnormal.
    env.unplug_from_sysfs(d);
    env.unplug_from_sysfs(b);
    for path in [&target, &btarget] {
        let stats = env
            .svc
            .node_get_volume_stats(Request::new(stats_req("s", path)))
            .await
            .expect("stats")
            .into_inner();
        let cond = stats.volume_condition.expect("condition");
        assert!(cond.abnormal, "{path:?}");
        assert!(
            cond.message.contains("no longer attached"),
            "{}",
            cond.message
        );
    }
}

#[tokio::test]
async fn condition_is_abnormal_when_the_filesystem_goes_read_only() {
    let mut env = Env::new();
    env.add_disk("kvcsi-went-ro", 32 * MIB);
    let staging = env.mkdir("staging/wro");
    let target = env.mkdir("pods/wro").join("mount");
    let cap = mount_cap("ext4", &[], Mode::SingleNodeWriter);
    env.svc
        .node_stage_volume(Request::new(stage_req(
            "w",
            &staging,
            "kvcsi-went-ro",
            cap.clone(),
        )))
        .await
        .expect("stage");
    env.svc
        .node_publish_volume(Request::new(publish_req(
            "w", &staging, &target, cap, false,
        )))
        .await
        .expect("publish");
    // Remount the superblock read-only, as ext4 does itself on errors=remount-ro; the bind
    // at the target keeps its read-write mount flag.
    mount(
        None::<&str>,
        &staging,
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
        None::<&str>,
    )
    .expect("remount ro");
    let stats = env
        .svc
        .node_get_volume_stats(Request::new(stats_req("w", &target)))
        .await
        .expect("stats")
        .into_inner();
    let cond = stats.volume_condition.expect("condition");
    assert!(cond.abnormal);
    assert!(cond.message.contains("read-only"), "{}", cond.message);
}

fn expand_req(volume_id: &str, path: &std::path::Path, required: u64) -> NodeExpandVolumeRequest {
    NodeExpandVolumeRequest {
        volume_id: volume_id.into(),
        volume_path: path.to_str().expect("utf-8").into(),
        capacity_range: Some(CapacityRange {
            required_bytes: required as i64,
            limit_bytes: 0,
        }),
        ..Default::default()
    }
}

async fn expand_fs_online(fs: &str, size: u64, grown: u64) {
    require_tool(if fs == "xfs" {
        "xfs_growfs"
    } else {
        "resize2fs"
    });
    let mut env = Env::new();
    let serial = format!("kvcsi-grow-{fs}");
    let d = env.add_disk(&serial, size);
    let staging = env.mkdir("staging/grow");
    let target = env.mkdir("pods/grow").join("mount");
    let cap = mount_cap(fs, &[], Mode::SingleNodeWriter);
    env.svc
        .node_stage_volume(Request::new(stage_req("g", &staging, &serial, cap.clone())))
        .await
        .expect("stage");
    env.svc
        .node_publish_volume(Request::new(publish_req(
            "g", &staging, &target, cap, false,
        )))
        .await
        .expect("publish");
    std::fs::write(target.join("keep"), b"me").expect("write");
    let before = nix::sys::statvfs::statvfs(&target).expect("statvfs");

    let err = env
        .svc
        .node_expand_volume(Request::new(expand_req("g", &target, grown)))
        .await
        .expect_err("disk not grown yet");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");

    env.disks[d].grow(grown);
    if fs == "ext4" && !has_cap_sys_resource() {
        // The kernel refuses every ext4 online-resize ioctl without CAP_SYS_RESOURCE, and
        // some sandboxes (this project's dev machine among them) drop it. Say so loudly and
        // check the plugin reports the kernel's refusal instead of pretending it grew.
        eprintln!(
            "WARNING: CAP_SYS_RESOURCE is missing: ext4 online growth cannot succeed here; checking the error path only"
        );
        let err = env
            .svc
            .node_expand_volume(Request::new(expand_req("g", &target, grown)))
            .await
            .expect_err("EPERM");
        assert_eq!(err.code(), Code::Internal, "{err:?}");
        assert!(
            err.message().contains("resize2fs") && err.message().contains("Permission denied"),
            "{}",
            err.message()
        );
        return;
    }
    let resp = env
        .svc
        .node_expand_volume(Request::new(expand_req("g", &target, grown)))
        .await
        .expect("expand")
        .into_inner();
    assert_eq!(resp.capacity_bytes, grown as i64);
    let after = nix::sys::statvfs::statvfs(&target).expect("statvfs");
    let total = |s: &nix::sys::statvfs::Statvfs| s.blocks() * s.fragment_size();
    assert!(
        total(&after) > total(&before) + (grown - size) / 2,
        "{} -> {}",
        total(&before),
        total(&after)
    );
    assert_eq!(
        std::fs::read(target.join("keep")).expect("data kept"),
        b"me"
    );
    env.svc
        .node_unpublish_volume(Request::new(unpublish_req("g", &target)))
        .await
        .expect("unpublish");
    env.svc
        .node_unstage_volume(Request::new(unstage_req("g", &staging)))
        .await
        .expect("unstage");
}

/// CAP_SYS_RESOURCE (bit 24) in this process's effective set.
fn has_cap_sys_resource() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .expect("CapEff line")
        .trim();
    u64::from_str_radix(hex, 16).expect("CapEff hex") & (1 << 24) != 0
}

#[tokio::test]
async fn ext4_grows_online() {
    expand_fs_online("ext4", 64 * MIB, 256 * MIB).await;
}

#[tokio::test]
async fn xfs_grows_online() {
    expand_fs_online("xfs", 512 * MIB, GIB).await;
}

#[tokio::test]
async fn block_expand_reports_new_size() {
    let mut env = Env::new();
    let d = env.add_disk("kvcsi-grow-blk", 16 * MIB);
    let staging = env.mkdir("staging/gb");
    let target = env.mkdir("pods/gb").join("dev");
    let cap = block_cap(Mode::SingleNodeWriter);
    env.svc
        .node_stage_volume(Request::new(stage_req(
            "gb",
            &staging,
            "kvcsi-grow-blk",
            cap.clone(),
        )))
        .await
        .expect("stage");
    env.svc
        .node_publish_volume(Request::new(publish_req(
            "gb", &staging, &target, cap, false,
        )))
        .await
        .expect("publish");
    env.disks[d].grow(48 * MIB);
    let resp = env
        .svc
        .node_expand_volume(Request::new(expand_req("gb", &target, 48 * MIB)))
        .await
        .expect("expand")
        .into_inner();
    assert_eq!(resp.capacity_bytes, 48 * MIB as i64);
    let err = env
        .svc
        .node_expand_volume(Request::new(expand_req(
            "gb",
            &env.mkdir("pods/nothing"),
            1,
        )))
        .await
        .expect_err("not a volume");
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test]
async fn concurrent_call_on_the_same_volume_is_aborted() {
    let env = Env::with_timeout(Duration::from_secs(3));
    let staging = env.mkdir("staging/busy");
    let cap = mount_cap("ext4", &[], Mode::SingleNodeWriter);
    let svc = env.svc.clone();
    let req = stage_req("busy", &staging, "kvcsi-never-there", cap);
    let first = tokio::spawn({
        let req = req.clone();
        async move { svc.node_stage_volume(Request::new(req)).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let err = env
        .svc
        .node_stage_volume(Request::new(req))
        .await
        .expect_err("second call");
    assert_eq!(err.code(), Code::Aborted, "{err:?}");
    let err = env
        .svc
        .node_unstage_volume(Request::new(unstage_req("busy", &staging)))
        .await
        .expect_err("unstage while staging");
    assert_eq!(err.code(), Code::Aborted, "{err:?}");
    let started = std::time::Instant::now();
    let first = first.await.expect("join").expect_err("disk never appears");
    assert_eq!(first.code(), Code::NotFound, "{first:?}");
    assert!(
        first.message().contains("kvcsi-never-there"),
        "{}",
        first.message()
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    // Released: the next call gets through.
    env.svc
        .node_unstage_volume(Request::new(unstage_req("busy", &staging)))
        .await
        .expect("unstage");
}

#[tokio::test]
async fn never_unmounts_what_is_not_ours() {
    let env = Env::new();
    let target = env.mkdir("pods/foreign/mount");
    mount(
        Some("tmpfs"),
        &target,
        Some("tmpfs"),
        MsFlags::empty(),
        None::<&str>,
    )
    .expect("mount tmpfs");
    let err = env
        .svc
        .node_unpublish_volume(Request::new(unpublish_req("x", &target)))
        .await
        .expect_err("foreign");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let err = env
        .svc
        .node_unstage_volume(Request::new(unstage_req("x", &target)))
        .await
        .expect_err("foreign");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert_eq!(mount_at(&target).expect("still mounted").fs_type, "tmpfs");
    // A path merely inside a mount is not a mount point: nothing is unmounted, the
    // (empty) directory is removed.
    let inner = target.join("inner");
    std::fs::create_dir(&inner).expect("mkdir");
    env.svc
        .node_unpublish_volume(Request::new(unpublish_req("x", &inner)))
        .await
        .expect("not mounted");
    assert!(!inner.exists());
    assert!(mount_at(&target).is_some());
}
