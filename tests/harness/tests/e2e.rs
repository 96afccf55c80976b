//! End to end through the real CSI sidecars: a guest cluster (kube-apiserver +
//! kube-controller-manager) with external-provisioner, external-attacher, external-resizer,
//! csi-snapshotter and snapshot-controller talking to our controller plugin, which drives
//! the infra cluster under the shipped tenant Role; the node plugin runs inside a real QEMU
//! worker VM, and a kubelet stand-in stages and publishes. The infra cluster runs KubeVirt's
//! own virt-api and virt-controller (v1.7), once per feature-gate profile, with stand-ins
//! only for CDI and the node side (kubelet, virt-handler plugging disks over QMP).
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::VolumeAttachment;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::wait::await_condition;
use kubevirt_csi_harness::csi::connect_tcp;
use kubevirt_csi_harness::fixtures::data_volume_resource;
use kubevirt_csi_harness::guest::{FullStack, FullStackOptions, snapshot_resource};
use kubevirt_csi_harness::kubelet::{KubeletStandin, PodVolume, wait_for};
use kubevirt_csi_harness::kubevirt::GateProfile;
use kubevirt_csi_harness::stack::{Bed, StackOptions};

const NS: &str = "default";
const MI: i64 = 1 << 20;
const WAIT: Duration = Duration::from_secs(90);

fn claim(name: &str, class: &str, size: &str, snapshot: Option<&str>) -> PersistentVolumeClaim {
    claim_with_mode(name, class, size, snapshot, "Filesystem")
}

fn claim_with_mode(
    name: &str,
    class: &str,
    size: &str,
    snapshot: Option<&str>,
    mode: &str,
) -> PersistentVolumeClaim {
    let mut spec = serde_json::json!({
        "volumeMode": mode,
        "storageClassName": class,
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": size}},
    });
    if let Some(s) = snapshot {
        spec["dataSource"] = serde_json::json!({
            "apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": s,
        });
    }
    serde_json::from_value(serde_json::json!({"metadata": {"name": name}, "spec": spec})).unwrap()
}

/// A pod using `claim`; `uses` is how its container takes the volume
/// (`volumeMounts` for a filesystem, `volumeDevices` for a raw block device).
fn pod_using(name: &str, node: &str, claim: &str, uses: serde_json::Value) -> Pod {
    let mut container = serde_json::json!({"name": "c", "image": "busybox"});
    if let (Some(c), Some(u)) = (container.as_object_mut(), uses.as_object()) {
        c.extend(u.clone());
    }
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "spec": {
            "nodeName": node,
            "automountServiceAccountToken": false,
            "containers": [container],
            "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": claim}}],
        }
    }))
    .unwrap()
}

fn pod(name: &str, node: &str, claim: &str) -> Pod {
    let uses = serde_json::json!({"volumeMounts": [{"name": "data", "mountPath": "/data"}]});
    pod_using(name, node, claim, uses)
}

fn block_pod(name: &str, node: &str, claim: &str) -> Pod {
    let uses = serde_json::json!({"volumeDevices": [{"name": "data", "devicePath": "/dev/xvda"}]});
    pod_using(name, node, claim, uses)
}

async fn wait_bound(pvcs: &Api<PersistentVolumeClaim>, name: &str) -> PersistentVolumeClaim {
    let cond = await_condition(pvcs.clone(), name, |o: Option<&PersistentVolumeClaim>| {
        o.and_then(|p| p.status.as_ref())
            .and_then(|s| s.phase.as_deref())
            == Some("Bound")
    });
    tokio::time::timeout(WAIT, cond)
        .await
        .unwrap_or_else(|_| panic!("pvc {name} not Bound within {WAIT:?}"))
        .unwrap()
        .unwrap()
}

async fn wait_gone<K>(api: Api<K>, name: &str, what: &str)
where
    K: kube::Resource + Clone + std::fmt::Debug + Send + serde::de::DeserializeOwned + 'static,
{
    let cond = await_condition(api, name, |o: Option<&K>| o.is_none());
    tokio::time::timeout(WAIT, cond)
        .await
        .unwrap_or_else(|_| panic!("{what} {name} still there after {WAIT:?}"))
        .unwrap();
}

/// Tenant DataVolumes left in the infra namespace.
async fn infra_data_volumes(fs: &FullStack) -> Vec<DynamicObject> {
    let client = fs.stack.cp.client().await.unwrap();
    let dvs: Api<DynamicObject> =
        Api::namespaced_with(client, &fs.stack.tenant.namespace, &data_volume_resource());
    dvs.list(&ListParams::default()).await.unwrap().items
}

fn step(t: Instant, what: &str) {
    eprintln!("[e2e {:>6.1}s] {what}", t.elapsed().as_secs_f64());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volume_lifecycle_through_real_sidecars_on_hotplug_volumes_gate() {
    lifecycle(Bed::KubeVirt(GateProfile::HotplugVolumes)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volume_lifecycle_through_real_sidecars_on_declarative_gate_only() {
    lifecycle(Bed::KubeVirt(GateProfile::DeclarativeOnly)).await;
}

async fn lifecycle(bed: Bed) {
    let t = Instant::now();
    let fs = FullStack::start(FullStackOptions {
        stack: StackOptions {
            bed,
            ..Default::default()
        },
        ..Default::default()
    })
    .await
    .unwrap();
    step(
        t,
        &format!("stack up on {bed:?} (guest + kcm + infra + VM + plugins + sidecars)"),
    );
    let result = run(&fs, t).await;
    if let Err(e) = &result {
        eprintln!("e2e failed: {e}\n{}", fs.diagnostics());
    }
    result.unwrap();
    eprintln!("e2e suite wall time: {:.1}s", t.elapsed().as_secs_f64());
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

async fn run(fs: &FullStack, t: Instant) -> Result<(), BoxError> {
    let guest = fs.guest.client().await?;
    let vm = fs.stack.vm.as_ref().ok_or("the stack has no VM")?;
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(guest.clone(), NS);
    let pods: Api<Pod> = Api::namespaced(guest.clone(), NS);
    let pvs: Api<PersistentVolume> = Api::all(guest.clone());
    let vas: Api<VolumeAttachment> = Api::all(guest.clone());
    let node_channel = connect_tcp(fs.stack.node_endpoint().parse()?).await?;
    // The node plugin was started with --node-name only: its id comes from the guest Node's
    // providerID and cluster-namespace annotation, read from inside the VM.
    let info = csi_proto::v1::node_client::NodeClient::new(node_channel.clone())
        .node_get_info(csi_proto::v1::NodeGetInfoRequest {})
        .await?
        .into_inner();
    assert_eq!(
        info.node_id, "tenant-a/worker-0",
        "node id resolved from the guest Node"
    );
    let kubelet = KubeletStandin::new(
        guest.clone(),
        node_channel,
        vm,
        &fs.node.name,
        &fs.stack.kubelet_root(),
    );

    // 1. Provisioning through external-provisioner.
    pvcs.create(
        &PostParams::default(),
        &claim("data", "kubevirt-fast", "64Mi", None),
    )
    .await?;
    let bound = wait_bound(&pvcs, "data").await;
    let pv_name = bound.spec.and_then(|s| s.volume_name).ok_or("no PV")?;
    step(t, &format!("pvc data Bound to {pv_name}"));
    let dvs = infra_data_volumes(fs).await;
    assert_eq!(dvs.len(), 1, "one infra DataVolume: {dvs:?}");
    let dv = &dvs[0];
    let labels = dv.metadata.labels.clone().unwrap_or_default();
    for (k, v) in &fs.stack.tenant.labels {
        assert_eq!(labels.get(k), Some(v), "tenant label {k} on {dv:?}");
    }
    let dv_class = dv.data["spec"]["storage"]["storageClassName"]
        .as_str()
        .or(dv.data["spec"]["pvc"]["storageClassName"].as_str());
    assert_eq!(dv_class, Some("fast"), "infra storage class of {dv:?}");
    let dv_name = dv.metadata.name.clone().unwrap_or_default();

    // 2. Attach through kube-controller-manager's ADC and external-attacher, then stage
    //    and publish as kubelet does.
    pods.create(
        &PostParams::default(),
        &pod("writer-1", &fs.node.name, "data"),
    )
    .await?;
    let vols = kubelet.mount_pod(NS, "writer-1").await?;
    let vol = vols.first().ok_or("pod has no CSI volume")?.clone();
    let serial = vol
        .publish_context
        .get("serial")
        .ok_or("no serial in publish context")?;
    let dev = vm.find_disk_by_serial(serial).await?;
    assert!(dev.is_some(), "disk with serial {serial} not in the VM");
    let sys_block = vm.exec_ok(["ls", "/sys/block"]).await?;
    step(
        t,
        &format!(
            "attached ({dev:?}; /sys/block: {})",
            sys_block.trim().replace('\n', " ")
        ),
    );
    let target = vol.target_path.display().to_string();
    vm.exec_ok(["sh", "-c", &format!("echo kept > {target}/file && sync")])
        .await?;

    // 3. Pod deletion: unpublish, unstage, and the ADC detaches.
    kubelet
        .unmount_and_delete_pod(NS, "writer-1", &vols)
        .await?;
    wait_gone(vas.clone(), &vol.attachment, "VolumeAttachment").await;
    vm.wait_for_disk_gone(serial, WAIT).await?;
    step(t, "pod 1 deleted, volume detached");

    // 4. A new pod sees the data.
    pods.create(
        &PostParams::default(),
        &pod("writer-2", &fs.node.name, "data"),
    )
    .await?;
    let vols = kubelet.mount_pod(NS, "writer-2").await?;
    let vol: PodVolume = vols.first().ok_or("pod has no CSI volume")?.clone();
    let target = vol.target_path.display().to_string();
    let content = vm.exec_ok(["cat", &format!("{target}/file")]).await?;
    assert_eq!(content.trim(), "kept");
    step(t, "pod 2 reads the data pod 1 wrote");

    // 5. Expansion through external-resizer, then NodeExpandVolume.
    let grow = serde_json::json!({"spec": {"resources": {"requests": {"storage": "128Mi"}}}});
    pvcs.patch("data", &PatchParams::default(), &Patch::Merge(&grow))
        .await?;
    let pv_name2 = pv_name.clone();
    wait_for(
        pvs.clone(),
        WAIT,
        "PV grown to 128Mi",
        move |pv: &PersistentVolume| {
            pv.metadata.name.as_deref() == Some(pv_name2.as_str())
                && pv
                    .spec
                    .as_ref()
                    .and_then(|s| s.capacity.as_ref())
                    .and_then(|c| c.get("storage"))
                    .is_some_and(|q| q.0 == "128Mi" || q.0 == (128 * MI).to_string())
        },
    )
    .await?;
    let infra = fs.stack.cp.client().await?;
    let infra_pvc = Api::<PersistentVolumeClaim>::namespaced(infra, &fs.stack.tenant.namespace)
        .get(&dv_name)
        .await?;
    let infra_req = infra_pvc
        .spec
        .and_then(|s| s.resources)
        .and_then(|r| r.requests)
        .and_then(|r| r.get("storage").cloned())
        .map(|q| q.0);
    assert!(
        matches!(infra_req.as_deref(), Some("128Mi") | Some("134217728")),
        "infra pvc request {infra_req:?}"
    );
    kubelet.expand(NS, "data", &vol, 128 * MI).await?;
    let df = vm.exec_ok(["df", "-k", "-P", &target]).await?;
    let size_k: i64 = df
        .lines()
        .nth(1)
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("cannot parse df output {df:?}"))?;
    assert!(size_k > 100 * 1024, "filesystem not grown: {df}");
    step(
        t,
        &format!("expanded: infra pvc {infra_req:?}, fs {size_k} KiB"),
    );

    // 6. Snapshot and restore through csi-snapshotter + snapshot-controller.
    let snaps: Api<DynamicObject> = Api::namespaced_with(guest.clone(), NS, &snapshot_resource());
    let snap: DynamicObject = serde_json::from_value(serde_json::json!({
        "apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot",
        "metadata": {"name": "snap"},
        "spec": {"volumeSnapshotClassName": "kubevirt-snapshots", "source": {"persistentVolumeClaimName": "data"}},
    }))?;
    snaps.create(&PostParams::default(), &snap).await?;
    let ready = await_condition(snaps.clone(), "snap", |o: Option<&DynamicObject>| {
        o.is_some_and(|s| s.data["status"]["readyToUse"] == true)
    });
    tokio::time::timeout(WAIT, ready)
        .await
        .map_err(|_| "VolumeSnapshot snap not readyToUse")??;
    step(t, "snapshot ready");
    pvcs.create(
        &PostParams::default(),
        &claim("restored", "kubevirt-fast", "128Mi", Some("snap")),
    )
    .await?;
    wait_bound(&pvcs, "restored").await;
    pods.create(
        &PostParams::default(),
        &pod("reader", &fs.node.name, "restored"),
    )
    .await?;
    let rvols = kubelet.mount_pod(NS, "reader").await?;
    let rvol = rvols.first().ok_or("pod has no CSI volume")?.clone();
    let content = vm
        .exec_ok(["cat", &format!("{}/file", rvol.target_path.display())])
        .await?;
    assert_eq!(content.trim(), "kept", "restored volume content");
    step(t, "restored volume has the data");

    // 7. Teardown: nothing stays behind in the infra namespace.
    kubelet.unmount_and_delete_pod(NS, "reader", &rvols).await?;
    kubelet
        .unmount_and_delete_pod(NS, "writer-2", &vols)
        .await?;
    wait_gone(vas.clone(), &rvol.attachment, "VolumeAttachment").await;
    wait_gone(vas.clone(), &vol.attachment, "VolumeAttachment").await;
    snaps.delete("snap", &DeleteParams::default()).await?;
    wait_gone(snaps.clone(), "snap", "VolumeSnapshot").await;
    let restored_pv = pvcs
        .get("restored")
        .await?
        .spec
        .and_then(|s| s.volume_name)
        .ok_or("no PV")?;
    pvcs.delete("restored", &DeleteParams::default()).await?;
    pvcs.delete("data", &DeleteParams::default()).await?;
    wait_gone(pvs.clone(), &pv_name, "PersistentVolume").await;
    wait_gone(pvs.clone(), &restored_pv, "PersistentVolume").await;
    // 7. A raw block volume: the pod gets the device itself; bytes survive a re-attach.
    pvcs.create(
        &PostParams::default(),
        &claim_with_mode("raw", "kubevirt-fast", "32Mi", None, "Block"),
    )
    .await?;
    let raw_pv = wait_bound(&pvcs, "raw")
        .await
        .spec
        .and_then(|s| s.volume_name)
        .ok_or("no PV")?;
    pods.create(
        &PostParams::default(),
        &block_pod("block-1", &fs.node.name, "raw"),
    )
    .await?;
    let vols = kubelet.mount_pod(NS, "block-1").await?;
    let vol = vols.first().ok_or("pod has no CSI volume")?.clone();
    assert!(vol.block, "PV {raw_pv} should be a block volume");
    let dev = vol.target_path.display().to_string();
    let kind = vm
        .exec_ok(["sh", "-c", &format!("test -b {dev} && echo block")])
        .await?;
    assert_eq!(
        kind.trim(),
        "block",
        "{dev} is not a block device in the VM"
    );
    vm.exec_ok([
        "sh",
        "-c",
        &format!("printf raw-bytes | dd of={dev} bs=512 conv=sync,fsync 2>/dev/null"),
    ])
    .await?;
    kubelet.unmount_and_delete_pod(NS, "block-1", &vols).await?;
    wait_gone(vas.clone(), &vol.attachment, "VolumeAttachment").await;
    pods.create(
        &PostParams::default(),
        &block_pod("block-2", &fs.node.name, "raw"),
    )
    .await?;
    let vols = kubelet.mount_pod(NS, "block-2").await?;
    let vol = vols.first().ok_or("pod has no CSI volume")?.clone();
    let dev = vol.target_path.display().to_string();
    let back = vm
        .exec_ok(["sh", "-c", &format!("dd if={dev} bs=9 count=1 2>/dev/null")])
        .await?;
    assert_eq!(
        back, "raw-bytes",
        "block data did not survive detach and re-attach"
    );
    kubelet.unmount_and_delete_pod(NS, "block-2", &vols).await?;
    wait_gone(vas.clone(), &vol.attachment, "VolumeAttachment").await;
    pvcs.delete("raw", &DeleteParams::default()).await?;
    wait_gone(pvs.clone(), &raw_pv, "PersistentVolume").await;
    step(
        t,
        "block volume: device in the pod, data kept across re-attach, deleted",
    );

    let left: BTreeMap<String, String> = infra_data_volumes(fs)
        .await
        .into_iter()
        .map(|d| {
            (
                d.metadata.name.clone().unwrap_or_default(),
                d.data["status"].to_string(),
            )
        })
        .collect();
    assert!(
        left.is_empty(),
        "DataVolumes left in the infra namespace: {left:?}"
    );
    let infra = fs.stack.cp.client().await?;
    let ns = fs.stack.tenant.namespace.as_str();
    let infra_snaps: Vec<String> =
        Api::<DynamicObject>::namespaced_with(infra.clone(), ns, &snapshot_resource())
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .filter_map(|o| o.metadata.name)
            .collect();
    assert!(
        infra_snaps.is_empty(),
        "VolumeSnapshots left in the infra namespace: {infra_snaps:?}"
    );
    let infra_pvcs: Vec<String> = Api::<PersistentVolumeClaim>::namespaced(infra, ns)
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter_map(|o| o.metadata.name)
        .collect();
    assert!(
        infra_pvcs.is_empty(),
        "PersistentVolumeClaims left in the infra namespace: {infra_pvcs:?}"
    );
    step(t, "claims deleted, infra namespace clean");
    let forbidden = fs.sidecars.log_lines_matching("forbidden");
    assert!(
        forbidden.is_empty(),
        "sidecars hit RBAC denials with the shipped ClusterRoles:\n{}",
        forbidden.join("\n")
    );
    Ok(())
}
