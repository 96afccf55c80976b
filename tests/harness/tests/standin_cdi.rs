//! CDI + provisioner stand-in through a real kube-apiserver: DataVolumes (`storage` and `pvc`
//! forms) become bound PVCs over sparse files; clones and snapshot restores copy bytes;
//! PVC growth; VolumeSnapshots; deletion cleans everything; two tenants stay apart.

mod standin_support;

use std::io::{Read, Seek, SeekFrom, Write};

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use serde_json::json;
use standin_support::*;

fn file_of(env: &Env, pvc: &PersistentVolumeClaim) -> std::path::PathBuf {
    env.standin
        .data_dir()
        .join(format!("pvc-{}.img", pvc.uid().unwrap()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standin_cdi_provisioning_clones_snapshots_expansion_cleanup() {
    let env = env("standin-cdi").await;
    let c = &env.client;
    for ns in ["tenant-a", "tenant-b"] {
        namespace(c, ns).await;
    }
    // Growing a PVC needs a class that allows it (the apiserver's resize admission checks).
    let scs: Api<k8s_openapi::api::storage::v1::StorageClass> = Api::all(c.clone());
    for (name, grow) in [("fast", true), ("slow", false)] {
        let sc = serde_json::from_value(json!({"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
            "metadata": {"name": name}, "provisioner": "standin.kubevirt-csi.io", "allowVolumeExpansion": grow})).unwrap();
        scs.create(&PostParams::default(), &sc).await.unwrap();
    }
    let dvs_a: Api<DynamicObject> = Api::namespaced_with(c.clone(), "tenant-a", &dv_ar());
    let dvs_b: Api<DynamicObject> = Api::namespaced_with(c.clone(), "tenant-b", &dv_ar());
    let pvcs_a: Api<PersistentVolumeClaim> = Api::namespaced(c.clone(), "tenant-a");
    let pvcs_b: Api<PersistentVolumeClaim> = Api::namespaced(c.clone(), "tenant-b");
    let pvs: Api<PersistentVolume> = Api::all(c.clone());

    // storage form (defaults) in tenant-a, pvc form (exact) with the same name in tenant-b.
    dvs_a.create(&PostParams::default(), &dynamic(json!({"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
        "metadata": {"name": "disk", "labels": {"tenant": "a"}, "annotations": {"cdi.kubevirt.io/storage.deleteAfterCompletion": "false"}},
        "spec": {"source": {"blank": {}}, "storage": {"storageClassName": "fast", "resources": {"requests": {"storage": "16Mi"}}}}}))).await.unwrap();
    dvs_b.create(&PostParams::default(), &dynamic(json!({"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
        "metadata": {"name": "disk"},
        "spec": {"source": {"blank": {}}, "pvc": {"accessModes": ["ReadWriteMany"], "volumeMode": "Block", "storageClassName": "slow",
                 "resources": {"requests": {"storage": "8Mi"}}}}}))).await.unwrap();
    let dv = wait_for(&dvs_a, "disk", "Succeeded", |o| {
        o.data["status"]["phase"] == "Succeeded"
    })
    .await;
    assert_eq!(dv.data["status"]["progress"], "100.0%");
    let conds = dv.data["status"]["conditions"].as_array().unwrap();
    assert!(
        conds
            .iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True"),
        "{conds:?}"
    );
    assert!(
        dv.finalizers()
            .iter()
            .any(|f| f == "cdi.kubevirt.io/dataVolumeFinalizer")
    );
    wait_for(&dvs_b, "disk", "Succeeded", |o| {
        o.data["status"]["phase"] == "Succeeded"
    })
    .await;

    let a = pvcs_a.get("disk").await.unwrap();
    let b = pvcs_b.get("disk").await.unwrap();
    assert_ne!(a.uid(), b.uid());
    let (sa, sb) = (a.spec.clone().unwrap(), b.spec.clone().unwrap());
    assert_eq!(
        sa.access_modes.as_deref(),
        Some(&["ReadWriteOnce".to_string()][..])
    );
    assert_eq!(sa.volume_mode.as_deref(), Some("Filesystem"));
    assert_eq!(sa.storage_class_name.as_deref(), Some("fast"));
    assert_eq!(
        sb.access_modes.as_deref(),
        Some(&["ReadWriteMany".to_string()][..])
    );
    assert_eq!(sb.volume_mode.as_deref(), Some("Block"));
    assert_eq!(a.status.as_ref().unwrap().phase.as_deref(), Some("Bound"));
    assert_eq!(
        a.status.as_ref().unwrap().capacity.as_ref().unwrap()["storage"].0,
        "16Mi"
    );
    assert_eq!(a.owner_references()[0].kind, "DataVolume");
    assert_eq!(a.labels().get("tenant").map(String::as_str), Some("a"));
    let pv_a = pvs.get(sa.volume_name.as_deref().unwrap()).await.unwrap();
    assert_eq!(pv_a.name_any(), format!("pvc-{}", a.uid().unwrap()));
    let pv_spec = pv_a.spec.clone().unwrap();
    assert_eq!(pv_spec.claim_ref.as_ref().unwrap().uid, a.uid());
    assert_eq!(pv_spec.storage_class_name.as_deref(), Some("fast"));
    assert_eq!(
        pv_a.status.as_ref().unwrap().phase.as_deref(),
        Some("Bound")
    );
    let pv_b = pvs.get(sb.volume_name.as_deref().unwrap()).await.unwrap();
    assert_eq!(pv_b.spec.unwrap().volume_mode.as_deref(), Some("Block"));
    let fa = file_of(&env, &a);
    assert_eq!(std::fs::metadata(&fa).unwrap().len(), 16 << 20);
    assert_eq!(std::fs::metadata(file_of(&env, &b)).unwrap().len(), 8 << 20);

    // Write into tenant-a's disk, then clone it (dataSourceRef) and snapshot it.
    {
        let mut f = std::fs::OpenOptions::new().write(true).open(&fa).unwrap();
        f.seek(SeekFrom::Start(3 << 20)).unwrap();
        f.write_all(b"tenant-a data").unwrap();
    }
    dvs_a.create(&PostParams::default(), &dynamic(json!({"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
        "metadata": {"name": "clone"},
        "spec": {"storage": {"dataSourceRef": {"kind": "PersistentVolumeClaim", "name": "disk"}, "resources": {"requests": {"storage": "32Mi"}}}}}))).await.unwrap();
    let vss_a: Api<DynamicObject> = Api::namespaced_with(c.clone(), "tenant-a", &vs_ar());
    vss_a.create(&PostParams::default(), &dynamic(json!({"apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot",
        "metadata": {"name": "snap"}, "spec": {"volumeSnapshotClassName": "fast-snap", "source": {"persistentVolumeClaimName": "disk"}}}))).await.unwrap();
    wait_for(&dvs_a, "clone", "clone Succeeded", |o| {
        o.data["status"]["phase"] == "Succeeded"
    })
    .await;
    let snap = wait_for(&vss_a, "snap", "readyToUse", |o| {
        o.data["status"]["readyToUse"] == true
    })
    .await;
    assert_eq!(snap.data["status"]["restoreSize"], "16Mi");
    assert!(
        snap.finalizers()
            .iter()
            .any(|f| f == "standin.kubevirt-csi.io/snapshot"),
        "{:?}",
        snap.metadata
    );
    let content = snap.data["status"]["boundVolumeSnapshotContentName"]
        .as_str()
        .unwrap()
        .to_string();
    let vscs: Api<DynamicObject> = Api::all_with(c.clone(), &vsc_ar());
    let vsc = vscs.get(&content).await.unwrap();
    assert_eq!(vsc.data["status"]["readyToUse"], true);
    assert_eq!(vsc.data["status"]["restoreSize"], 16 << 20);
    assert_eq!(vsc.data["spec"]["volumeSnapshotRef"]["name"], "snap");

    let read_at = |path: &std::path::Path| {
        let mut f = std::fs::File::open(path).unwrap();
        f.seek(SeekFrom::Start(3 << 20)).unwrap();
        let mut buf = [0u8; 13];
        f.read_exact(&mut buf).unwrap();
        buf
    };
    let clone = pvcs_a.get("clone").await.unwrap();
    let fc = file_of(&env, &clone);
    assert_eq!(&read_at(&fc), b"tenant-a data");
    assert_eq!(std::fs::metadata(&fc).unwrap().len(), 32 << 20);

    // Change the source after the snapshot: the restore has the old bytes.
    {
        let mut f = std::fs::OpenOptions::new().write(true).open(&fa).unwrap();
        f.seek(SeekFrom::Start(3 << 20)).unwrap();
        f.write_all(b"changed later").unwrap();
    }
    dvs_a.create(&PostParams::default(), &dynamic(json!({"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
        "metadata": {"name": "restored"},
        "spec": {"source": {"snapshot": {"namespace": "tenant-a", "name": "snap"}}, "storage": {"resources": {"requests": {"storage": "16Mi"}}}}}))).await.unwrap();
    wait_for(&dvs_a, "restored", "restore Succeeded", |o| {
        o.data["status"]["phase"] == "Succeeded"
    })
    .await;
    let restored = pvcs_a.get("restored").await.unwrap();
    assert_eq!(&read_at(&file_of(&env, &restored)), b"tenant-a data");

    // Grow tenant-a's disk: file, PVC status and PV capacity follow.
    pvcs_a
        .patch(
            "disk",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"resources": {"requests": {"storage": "48Mi"}}}})),
        )
        .await
        .unwrap();
    let pvc_dyn: Api<DynamicObject> = Api::namespaced_with(
        c.clone(),
        "tenant-a",
        &kube::core::ApiResource::erase::<PersistentVolumeClaim>(&()),
    );
    wait_for(&pvc_dyn, "disk", "capacity 48Mi", |o| {
        o.data["status"]["capacity"]["storage"] == "48Mi"
    })
    .await;
    assert_eq!(std::fs::metadata(&fa).unwrap().len(), 48 << 20);
    let pv = pvs.get(&format!("pvc-{}", a.uid().unwrap())).await.unwrap();
    assert_eq!(pv.spec.unwrap().capacity.unwrap()["storage"].0, "48Mi");
    // tenant-b's same-named disk is untouched.
    assert_eq!(std::fs::metadata(file_of(&env, &b)).unwrap().len(), 8 << 20);

    // Deleting the snapshot removes content and copy.
    let snap_file = env
        .standin
        .data_dir()
        .join(format!("snapshot-{}.img", snap.uid().unwrap()));
    assert!(snap_file.exists());
    vss_a
        .delete("snap", &DeleteParams::default())
        .await
        .unwrap();
    wait_gone(&vss_a, "snap").await;
    wait_gone(&vscs, &content).await;
    assert!(
        !snap_file.exists(),
        "{}",
        env.standin
            .log_tail(400)
            .lines()
            .filter(|l| l.contains("snap"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    // Deleting the DataVolume removes PVC, PV and file (the finalizer goes last).
    dvs_a
        .delete("disk", &DeleteParams::default())
        .await
        .unwrap();
    wait_gone(&dvs_a, "disk").await;
    assert!(pvcs_a.get_opt("disk").await.unwrap().is_none());
    assert!(
        pvs.get_opt(&format!("pvc-{}", a.uid().unwrap()))
            .await
            .unwrap()
            .is_none()
    );
    assert!(!fa.exists());
    assert!(
        pvcs_b.get_opt("disk").await.unwrap().is_some(),
        "tenant-b keeps its disk"
    );
    assert!(file_of(&env, &b).exists());

    // A plain PVC (no DataVolume) is provisioned too, and cleaned up on deletion.
    let plain: PersistentVolumeClaim = serde_json::from_value(json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": "plain"}, "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "4Mi"}}}})).unwrap();
    pvcs_b.create(&PostParams::default(), &plain).await.unwrap();
    let pvc_dyn_b: Api<DynamicObject> = Api::namespaced_with(
        c.clone(),
        "tenant-b",
        &kube::core::ApiResource::erase::<PersistentVolumeClaim>(&()),
    );
    wait_for(&pvc_dyn_b, "plain", "Bound", |o| {
        o.data["status"]["phase"] == "Bound"
    })
    .await;
    let plain = pvcs_b.get("plain").await.unwrap();
    let fp = file_of(&env, &plain);
    assert!(fp.exists());
    pvcs_b
        .delete("plain", &DeleteParams::default())
        .await
        .unwrap();
    wait_gone(&pvc_dyn_b, "plain").await;
    assert!(!fp.exists());

    // An invalid DataVolume fails visibly.
    dvs_b
        .create(
            &PostParams::default(),
            &dynamic(
                json!({"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
        "metadata": {"name": "bad"}, "spec": {"source": {"blank": {}}, "storage": {}}}),
            ),
        )
        .await
        .unwrap();
    let bad = wait_for(&dvs_b, "bad", "Failed", |o| {
        o.data["status"]["phase"] == "Failed"
    })
    .await;
    assert!(
        bad.data["status"]["conditions"]
            .to_string()
            .contains("no storage size")
    );

    env.standin.stop(std::time::Duration::from_secs(5)).await;
}
