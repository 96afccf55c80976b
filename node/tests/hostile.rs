//! The node boundary against hostile input, on real loop devices and mounts: what a pod
//! puts inside its volume, paths that lie, capacity ranges no size satisfies, and mounts
//! this plugin did not make. Needs root, loop devices and mkfs.ext4.

mod support;

use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use csi_proto::v1::node_server::Node;
use csi_proto::v1::volume_capability::access_mode::Mode;
use csi_proto::v1::{
    CapacityRange, NodeExpandVolumeRequest, NodeGetVolumeStatsRequest, NodePublishVolumeRequest,
};
use kubevirt_csi_node::node_service::NodeService;
use kubevirt_csi_node::volume_ops::LEGACY_BLOCK_FILE;
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use support::*;
use tonic::{Code, Request, Status};

/// Long enough for any RPC here; only a hang (the bug this guards against) gets near it.
const HANG: Duration = Duration::from_secs(60);

async fn stage(svc: &NodeService, id: &str, staging: &Path, serial: &str) -> Result<(), Status> {
    let req = stage_req(
        id,
        staging,
        serial,
        mount_cap("ext4", &[], Mode::SingleNodeWriter),
    );
    tokio::time::timeout(HANG, svc.node_stage_volume(Request::new(req)))
        .await
        .unwrap_or_else(|_| panic!("NodeStage of {id} hung"))
        .map(drop)
}

async fn publish(svc: &NodeService, id: &str, staging: &Path, target: &Path) -> Result<(), Status> {
    let req = publish_req(
        id,
        staging,
        target,
        mount_cap("ext4", &[], Mode::SingleNodeWriter),
        false,
    );
    svc.node_publish_volume(Request::new(req)).await.map(drop)
}

async fn unpublish(svc: &NodeService, id: &str, target: &Path) -> Result<(), Status> {
    svc.node_unpublish_volume(Request::new(unpublish_req(id, target)))
        .await
        .map(drop)
}

async fn unstage(svc: &NodeService, id: &str, staging: &Path) -> Result<(), Status> {
    svc.node_unstage_volume(Request::new(unstage_req(id, staging)))
        .await
        .map(drop)
}

fn code(r: Result<(), Status>) -> Code {
    match r {
        Ok(()) => Code::Ok,
        Err(s) => s.code(),
    }
}

#[derive(Debug, Clone, Copy)]
enum Plant {
    Fifo,
    SymlinkToLargeFile,
    SymlinkToDevZero,
    Garbage,
}

#[tokio::test]
async fn stage_never_reads_what_a_pod_puts_in_its_volume() {
    let mut env = Env::new();
    env.add_disk("kvcsi-hostile-stage", 32 * MIB);
    let staging = env.mkdir("plugins/kubernetes.io/csi/csi.kubevirt.io/h/globalmount");
    let target = env
        .mkdir("pods/h/volumes/kubernetes.io~csi/pv")
        .join("mount");
    stage(&env.svc, "h", &staging, "kvcsi-hostile-stage")
        .await
        .expect("stage");
    publish(&env.svc, "h", &staging, &target)
        .await
        .expect("publish");
    // A large sparse file outside the volume, as a symlink's target.
    let large = env.dir.path().join("large");
    std::fs::File::create(&large)
        .and_then(|f| f.set_len(64 << 30))
        .expect("large file");

    // What the pod writes in its volume appears at the volume's root, under the name
    // earlier versions read their block record from.
    let planted = target.join(LEGACY_BLOCK_FILE);
    for plant in [
        Plant::Fifo,
        Plant::SymlinkToLargeFile,
        Plant::SymlinkToDevZero,
        Plant::Garbage,
    ] {
        let _ = std::fs::remove_file(&planted);
        match plant {
            Plant::Fifo => {
                nix::unistd::mkfifo(&planted, nix::sys::stat::Mode::from_bits_truncate(0o666))
                    .expect("mkfifo")
            }
            Plant::SymlinkToLargeFile => {
                std::os::unix::fs::symlink(&large, &planted).expect("symlink")
            }
            Plant::SymlinkToDevZero => {
                std::os::unix::fs::symlink("/dev/zero", &planted).expect("symlink")
            }
            Plant::Garbage => std::fs::write(&planted, b"\x00{{not json").expect("write"),
        }
        // The idempotent NodeStage kubelet sends after a restart answers OK...
        stage(&env.svc, "h", &staging, "kvcsi-hostile-stage")
            .await
            .unwrap_or_else(|e| panic!("{plant:?}: idempotent stage: {e:?}"));
        // ...and holds no lock afterwards: the next call on the volume is not ABORTED.
        publish(&env.svc, "h", &staging, &target)
            .await
            .unwrap_or_else(|e| panic!("{plant:?}: idempotent publish: {e:?}"));
        let kind = std::fs::symlink_metadata(&planted)
            .expect("the plant is left alone")
            .file_type();
        assert!(
            kind.is_fifo() || kind.is_symlink() || kind.is_file(),
            "{plant:?}"
        );
    }
    unpublish(&env.svc, "h", &target).await.expect("unpublish");
    unstage(&env.svc, "h", &staging).await.expect("unstage");
    assert!(mount_at(&staging).is_none());
}

#[tokio::test]
async fn block_stage_records_outside_the_staging_directory() {
    let mut env = Env::new();
    env.add_disk("kvcsi-hostile-blk", 16 * MIB);
    let staging = env.mkdir("plugins/kubernetes.io/csi/volumeDevices/staging/pv-b");
    let cap = block_cap(Mode::SingleNodeWriter);
    let req = stage_req("b", &staging, "kvcsi-hostile-blk", cap.clone());
    env.svc
        .node_stage_volume(Request::new(req.clone()))
        .await
        .expect("stage");
    assert_eq!(
        std::fs::read_dir(&staging).expect("ls staging").count(),
        0,
        "nothing is written into the staging directory"
    );
    assert!(std::fs::read_dir(&env.state_dir).expect("ls state").count() > 0);
    // An earlier version's record in the staging directory is neither read nor trusted...
    std::fs::write(staging.join(LEGACY_BLOCK_FILE), b"garbage").expect("write");
    env.svc
        .node_stage_volume(Request::new(req))
        .await
        .expect("idempotent stage");
    // ...and removed on unstage, so kubelet can remove the directory.
    unstage(&env.svc, "b", &staging).await.expect("unstage");
    assert!(!staging.join(LEGACY_BLOCK_FILE).exists());
    std::fs::remove_dir(&staging).expect("staging directory is empty");
}

fn stats_req(path: &str) -> NodeGetVolumeStatsRequest {
    NodeGetVolumeStatsRequest {
        volume_id: "p".into(),
        volume_path: path.into(),
        ..Default::default()
    }
}

fn expand_req(path: &str, required: i64, limit: i64) -> NodeExpandVolumeRequest {
    NodeExpandVolumeRequest {
        volume_id: "p".into(),
        volume_path: path.into(),
        capacity_range: Some(CapacityRange {
            required_bytes: required,
            limit_bytes: limit,
        }),
        ..Default::default()
    }
}

#[tokio::test]
async fn hostile_paths_are_request_errors_never_internal() {
    let mut env = Env::new();
    env.add_disk("kvcsi-hostile-paths", 32 * MIB);
    let staging = env.mkdir("staging/p");
    let target_dir = env.mkdir("pods/p");
    stage(&env.svc, "p", &staging, "kvcsi-hostile-paths")
        .await
        .expect("stage");
    let outside = env.dir.path().join("outside");
    std::fs::create_dir(&outside).expect("outside");
    let dangling = target_dir.join("dangling");
    std::os::unix::fs::symlink("nowhere-at-all", &dangling).expect("symlink");
    let escaping = env.path("pods/escape");
    std::os::unix::fs::symlink(&outside, &escaping).expect("symlink");
    let climbing = env.path("pods/climb");
    std::os::unix::fs::symlink("../../outside", &climbing).expect("symlink");
    let k = env.kubelet.display().to_string();
    let nul = format!("{k}/pods/a\0b");
    let long = format!("{k}/{}", "d/".repeat(2100));
    let long_name = format!("{k}/pods/{}", "n".repeat(300));
    let through_escape = escaping.join("x").display().to_string();
    let through_climb = climbing.join("x").display().to_string();
    let dangling_s = dangling.display().to_string();
    let malformed = [nul.as_str(), long.as_str(), long_name.as_str()];
    let escapes = [through_escape.as_str(), through_climb.as_str()];

    for bad in malformed
        .iter()
        .chain(&escapes)
        .chain(&[dangling_s.as_str()])
    {
        let mut req = stage_req(
            "p",
            &staging,
            "kvcsi-hostile-paths",
            mount_cap("ext4", &[], Mode::SingleNodeWriter),
        );
        req.staging_target_path = (*bad).to_owned();
        let got = env.svc.node_stage_volume(Request::new(req)).await;
        assert_eq!(
            got.map(drop).unwrap_err().code(),
            Code::InvalidArgument,
            "stage {bad:?}"
        );

        let req = |staging: &str, target: &str| NodePublishVolumeRequest {
            staging_target_path: staging.into(),
            target_path: target.into(),
            ..publish_req(
                "p",
                Path::new("/"),
                Path::new("/"),
                mount_cap("ext4", &[], Mode::SingleNodeWriter),
                false,
            )
        };
        let good_target = target_dir.join("mount").display().to_string();
        let good_staging = staging.display().to_string();
        for (s, t) in [(good_staging.as_str(), *bad), (*bad, good_target.as_str())] {
            let got = env.svc.node_publish_volume(Request::new(req(s, t))).await;
            assert_eq!(
                got.map(drop).unwrap_err().code(),
                Code::InvalidArgument,
                "publish staging {s:?} target {t:?}"
            );
        }
    }
    for bad in malformed.iter().chain(&escapes) {
        let p = PathBuf::from(bad);
        assert_eq!(
            code(unpublish(&env.svc, "p", &p).await),
            Code::InvalidArgument,
            "unpublish {bad:?}"
        );
        assert_eq!(
            code(unstage(&env.svc, "other", &p).await),
            Code::InvalidArgument,
            "unstage {bad:?}"
        );
    }
    for bad in malformed {
        for got in [
            env.svc
                .node_get_volume_stats(Request::new(stats_req(bad)))
                .await
                .map(drop),
            env.svc
                .node_expand_volume(Request::new(expand_req(bad, 1, 0)))
                .await
                .map(drop),
        ] {
            assert_eq!(code(got), Code::InvalidArgument, "stats/expand {bad:?}");
        }
    }
    for missing in escapes.iter().chain(&[dangling_s.as_str()]) {
        for got in [
            env.svc
                .node_get_volume_stats(Request::new(stats_req(missing)))
                .await
                .map(drop),
            env.svc
                .node_expand_volume(Request::new(expand_req(missing, 1, 0)))
                .await
                .map(drop),
        ] {
            assert_eq!(code(got), Code::NotFound, "stats/expand {missing:?}");
        }
    }
    // A dangling symlink as the staging path holds nothing staged: unstage is OK and leaves
    // the CO's link; as the target, unpublish removes it (the SP deletes the target) without
    // following it.
    assert_eq!(code(unstage(&env.svc, "other", &dangling).await), Code::Ok);
    assert!(std::fs::symlink_metadata(&dangling).is_ok());
    assert_eq!(code(unpublish(&env.svc, "p", &dangling).await), Code::Ok);
    assert!(std::fs::symlink_metadata(&dangling).is_err());

    assert_eq!(
        std::fs::read_dir(&outside).expect("ls").count(),
        0,
        "nothing created outside the kubelet root"
    );
    let table = kubevirt_csi_node::mountinfo::MountTable::read().expect("mountinfo");
    assert!(
        !table
            .entries
            .iter()
            .any(|m| m.mount_point.starts_with(&outside)),
        "nothing mounted outside the kubelet root"
    );
    unstage(&env.svc, "p", &staging).await.expect("unstage");
}

#[tokio::test]
async fn paths_in_the_state_directory_are_refused() {
    let mut env = Env::new();
    env.add_disk("kvcsi-hostile-state", 32 * MIB);
    let state = env.path("plugins/csi.kubevirt.io/node-state");
    let svc = env.restarted(&state);
    for inside in [state.join("mounts"), state.clone()] {
        assert_eq!(
            code(stage(&svc, "s", &inside, "kvcsi-hostile-state").await),
            Code::InvalidArgument,
            "{inside:?}"
        );
    }
    assert!(mount_at(&state.join("mounts")).is_none());
}

#[tokio::test]
async fn expand_refuses_ranges_no_size_satisfies() {
    let mut env = Env::new();
    env.add_disk("kvcsi-hostile-expand", 16 * MIB);
    let staging = env.mkdir("staging/e");
    let target = env.mkdir("pods/e").join("dev");
    let cap = block_cap(Mode::SingleNodeWriter);
    env.svc
        .node_stage_volume(Request::new(stage_req(
            "e",
            &staging,
            "kvcsi-hostile-expand",
            cap.clone(),
        )))
        .await
        .expect("stage");
    env.svc
        .node_publish_volume(Request::new(publish_req(
            "e", &staging, &target, cap, false,
        )))
        .await
        .expect("publish");
    let t = target.display().to_string();
    let m = MIB as i64;
    for (required, limit, expected) in [
        (-1, 0, Code::InvalidArgument),
        (m, -1, Code::InvalidArgument),
        (i64::MIN, i64::MIN, Code::InvalidArgument),
        (2 * m, m, Code::OutOfRange),
        (i64::MAX, 1, Code::OutOfRange),
        (m, 0, Code::Ok),
        (m, m, Code::Ok),
        (0, 0, Code::Ok),
    ] {
        let got = env
            .svc
            .node_expand_volume(Request::new(expand_req(&t, required, limit)))
            .await
            .map(drop);
        assert_eq!(code(got), expected, "required {required} limit {limit}");
    }
}

/// Formats a fresh disk and mounts it at `at`, as something other than this plugin would.
fn foreign_ext4_mount(env: &mut Env, serial: &str, at: &Path) -> usize {
    let d = env.add_disk(serial, 32 * MIB);
    format("mkfs.ext4", &env.disks[d].dev);
    std::fs::create_dir_all(at).expect("mkdir");
    mount(
        Some(&env.disks[d].dev),
        at,
        Some("ext4"),
        MsFlags::empty(),
        None::<&str>,
    )
    .expect("foreign mount");
    d
}

#[tokio::test]
async fn never_unmounts_a_disk_mount_it_did_not_make() {
    let mut env = Env::new();
    // An ext4 filesystem on a disk at a target: the kind of mount this plugin makes, but
    // not made by it.
    let target = env.path("pods/foreign-ext4/mount");
    foreign_ext4_mount(&mut env, "kvcsi-foreign-ext4", &target);
    assert_eq!(
        code(unpublish(&env.svc, "x", &target).await),
        Code::FailedPrecondition
    );
    assert_eq!(
        code(unstage(&env.svc, "x", &target).await),
        Code::FailedPrecondition
    );
    assert_eq!(mount_at(&target).expect("still mounted").fs_type, "ext4");

    // A disk's device node bound onto a file, the way block volumes are published.
    let d = env.add_disk("kvcsi-foreign-dev", 16 * MIB);
    let file = env.mkdir("pods/foreign-dev").join("dev");
    std::fs::write(&file, b"").expect("file");
    mount(
        Some(&env.disks[d].dev),
        &file,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .expect("bind device");
    assert_eq!(
        code(unpublish(&env.svc, "x", &file).await),
        Code::FailedPrecondition
    );
    assert!(mount_at(&file).is_some());

    // A mount the plugin made, replaced by someone else's: the record no longer matches.
    env.add_disk("kvcsi-replaced", 32 * MIB);
    let staging = env.mkdir("staging/replaced");
    let target = env.mkdir("pods/replaced").join("mount");
    stage(&env.svc, "r", &staging, "kvcsi-replaced")
        .await
        .expect("stage");
    publish(&env.svc, "r", &staging, &target)
        .await
        .expect("publish");
    umount2(&target, MntFlags::empty()).expect("unmount ours");
    let d = env.add_disk("kvcsi-replacement", 32 * MIB);
    format("mkfs.ext4", &env.disks[d].dev);
    mount(
        Some(&env.disks[d].dev),
        &target,
        Some("ext4"),
        MsFlags::empty(),
        None::<&str>,
    )
    .expect("replacement mount");
    assert_eq!(
        code(unpublish(&env.svc, "r", &target).await),
        Code::FailedPrecondition
    );
    assert_eq!(
        mount_at(&target).expect("left alone").devno,
        env.disks[d].devno
    );
}

#[tokio::test]
async fn records_survive_a_restart_and_earlier_versions_mounts_are_adopted_once() {
    let mut env = Env::new();
    env.add_disk("kvcsi-restart", 32 * MIB);
    let staging = env.mkdir("staging/restart");
    let target = env.mkdir("pods/restart").join("mount");
    stage(&env.svc, "r", &staging, "kvcsi-restart")
        .await
        .expect("stage");
    publish(&env.svc, "r", &staging, &target)
        .await
        .expect("publish");
    // A restarted plugin reads its records and unmounts what it made.
    let restarted = env.restarted(&env.state_dir);
    unpublish(&restarted, "r", &target)
        .await
        .expect("unpublish after restart");
    unstage(&restarted, "r", &staging)
        .await
        .expect("unstage after restart");
    assert!(mount_at(&target).is_none() && mount_at(&staging).is_none());

    // Mounts made by an earlier version, which kept no records: a staging mount and its
    // bind at a target.
    let old_staging = env.path("staging/old");
    foreign_ext4_mount(&mut env, "kvcsi-old-version", &old_staging);
    let old_target = env.mkdir("pods/old").join("mount");
    std::fs::create_dir(&old_target).expect("mkdir");
    mount(
        Some(&old_staging),
        &old_target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .expect("bind");
    // The first start with a state directory adopts them...
    let upgraded_state = env.dir.path().join("upgraded-state");
    let upgraded = env.restarted(&upgraded_state);
    // ...but only them: a disk mount appearing later is not the plugin's.
    let later = env.path("pods/later/mount");
    foreign_ext4_mount(&mut env, "kvcsi-later", &later);
    let upgraded_again = env.restarted(&upgraded_state);
    for svc in [&upgraded, &upgraded_again] {
        assert_eq!(
            code(unpublish(svc, "x", &later).await),
            Code::FailedPrecondition
        );
    }
    unpublish(&upgraded_again, "old", &old_target)
        .await
        .expect("unpublish an adopted mount");
    unstage(&upgraded_again, "old", &old_staging)
        .await
        .expect("unstage an adopted mount");
    assert!(mount_at(&old_target).is_none() && mount_at(&old_staging).is_none());
}

#[tokio::test]
async fn a_failed_mount_leaves_no_record_behind() {
    let mut env = Env::new();
    let d = env.add_disk("kvcsi-failed-mount", 32 * MIB);
    let staging = env.mkdir("staging/failed");
    // ext4 refuses an option it does not know: the mount fails after the record was written.
    let req = stage_req(
        "f",
        &staging,
        "kvcsi-failed-mount",
        mount_cap("ext4", &["no_such_ext4_option"], Mode::SingleNodeWriter),
    );
    let err = env
        .svc
        .node_stage_volume(Request::new(req))
        .await
        .expect_err("mount must fail");
    assert_eq!(err.code(), Code::Internal, "{err:?}");
    // Someone else mounts that very disk there afterwards: not ours to unmount.
    mount(
        Some(&env.disks[d].dev),
        &staging,
        Some("ext4"),
        MsFlags::empty(),
        None::<&str>,
    )
    .expect("mount by someone else");
    assert_eq!(
        code(unstage(&env.svc, "f", &staging).await),
        Code::FailedPrecondition
    );
    assert!(mount_at(&staging).is_some());
}

/// A target directory someone filled (kubelet makes it empty, and nothing of ours writes
/// there) is refused with FAILED_PRECONDITION and left as it is, never INTERNAL, never
/// emptied.
#[tokio::test]
async fn unpublish_leaves_a_target_that_holds_foreign_files() {
    let env = Env::new();
    let target = env.mkdir("pods/p/volumes/kubernetes.io~csi/v/mount");
    std::fs::write(target.join("keep"), b"theirs").unwrap();
    assert_eq!(
        code(unpublish(&env.svc, "v", &target).await),
        Code::FailedPrecondition
    );
    assert_eq!(std::fs::read(target.join("keep")).unwrap(), b"theirs");
    // Emptied by its owner, the same call succeeds and removes the target.
    std::fs::remove_file(target.join("keep")).unwrap();
    unpublish(&env.svc, "v", &target).await.unwrap();
    assert!(!target.exists());
}

/// Someone else's mount of the very disk a volume is staged from, underneath our staging
/// mount at the same path: one record stands for one mount, so unstaging removes ours and
/// never the one beneath, although the two look alike (same device, same root).
#[tokio::test]
async fn unstage_removes_our_mount_and_never_the_alike_one_beneath() {
    let mut env = Env::new();
    let staging = env.path("staging/stacked");
    let d = foreign_ext4_mount(&mut env, "kvcsi-stacked", &staging);
    let beneath = mount_at(&staging).expect("foreign mount");
    // Whatever stage answers over a mount it did not make, unstage must leave that mount.
    let _ = stage(&env.svc, "s", &staging, "kvcsi-stacked").await;
    let _ = unstage(&env.svc, "s", &staging).await;
    let _ = unstage(&env.svc, "s", &staging).await;
    let left = mount_at(&staging).expect("the foreign mount is still there");
    assert_eq!(left.devno, env.disks[d].devno);
    assert_eq!(
        left.mount_id, beneath.mount_id,
        "the mount left is the foreign one"
    );
}

/// Only the file an earlier version wrote is cleaned up from a staging directory: a
/// directory under that name is left, and unstage still answers OK.
#[tokio::test]
async fn unstage_leaves_a_directory_named_like_the_old_marker() {
    let env = Env::new();
    let staging = env.mkdir("staging/marker-dir");
    let dir = staging.join(kubevirt_csi_node::volume_ops::LEGACY_BLOCK_FILE);
    std::fs::create_dir(&dir).unwrap();
    unstage(&env.svc, "m", &staging).await.unwrap();
    assert!(dir.is_dir());
}
