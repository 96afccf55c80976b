//! The control-plane harness against real etcd and kube-apiserver processes.

use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{Api, PostParams};
use kubevirt_csi_harness::cluster::{ControlPlane, ControlPlaneOptions};

fn pid_alive(pid: u32) -> bool {
    PathBuf::from(format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

fn ns(name: &str) -> Namespace {
    serde_json::from_value(serde_json::json!({"metadata": {"name": name}})).unwrap()
}

#[tokio::test]
async fn starts_serves_enforces_rbac_and_cleans_up() {
    let cp = ControlPlane::start(ControlPlaneOptions::default())
        .await
        .expect("control plane starts");
    eprintln!("control plane ready in {:?}", cp.started_in());

    let admin = cp.client().await.unwrap();
    let namespaces: Api<Namespace> = Api::all(admin.clone());
    namespaces
        .create(&PostParams::default(), &ns("tenant-a"))
        .await
        .expect("admin can create a namespace");

    // RBAC is on: an authenticated user with no bindings is forbidden.
    let yaml = cp.kubeconfig_for("nobody", &[]).unwrap();
    let nobody = cp.client_from_kubeconfig("nobody", &yaml).await.unwrap();
    let cms: Api<ConfigMap> = Api::namespaced(nobody, "tenant-a");
    match cms.list(&Default::default()).await {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 403, "{s:?}"),
        other => panic!("expected 403 for an unbound user, got {other:?}"),
    }

    // The kubeconfig file on disk works for outside tools too.
    let text = std::fs::read_to_string(cp.kubeconfig_path()).unwrap();
    assert!(text.contains(cp.url()));

    let dir = cp.dir().to_path_buf();
    let pids: Vec<u32> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|pid: &u32| {
            std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
                .unwrap_or_default()
                .contains(dir.to_str().unwrap())
        })
        .collect();
    assert!(
        !pids.is_empty(),
        "expected apiserver processes using {dir:?}"
    );
    drop(cp);
    tokio::time::sleep(Duration::from_millis(500)).await;
    for pid in pids {
        assert!(!pid_alive(pid), "process {pid} outlived its control plane");
    }
    assert!(!dir.exists(), "{dir:?} outlived its control plane");
}

#[tokio::test]
async fn two_planes_run_side_by_side_independently() {
    let (a, b) = tokio::join!(
        ControlPlane::start(ControlPlaneOptions {
            name: "a".into(),
            ..Default::default()
        }),
        ControlPlane::start(ControlPlaneOptions {
            name: "b".into(),
            ..Default::default()
        }),
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_ne!(a.url(), b.url());
    let na: Api<Namespace> = Api::all(a.client().await.unwrap());
    let nb: Api<Namespace> = Api::all(b.client().await.unwrap());
    na.create(&PostParams::default(), &ns("only-in-a"))
        .await
        .unwrap();
    assert!(nb.get_opt("only-in-a").await.unwrap().is_none());
}

#[tokio::test]
async fn upstream_crds_install_and_validate_structurally() {
    let cp = ControlPlane::start(ControlPlaneOptions::default())
        .await
        .unwrap();
    let client = cp.client().await.unwrap();
    let started = std::time::Instant::now();
    let names = kubevirt_csi_harness::crds::install(&client).await.unwrap();
    eprintln!("installed {} CRDs in {:?}", names.len(), started.elapsed());
    for want in [
        "virtualmachines.kubevirt.io",
        "virtualmachineinstances.kubevirt.io",
        "datavolumes.cdi.kubevirt.io",
        "volumesnapshots.snapshot.storage.k8s.io",
        "volumesnapshotcontents.snapshot.storage.k8s.io",
        "volumesnapshotclasses.snapshot.storage.k8s.io",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "missing CRD {want} in {names:?}"
        );
    }

    let ar = kube::core::ApiResource::from_gvk_with_plural(
        &kube::core::GroupVersionKind::gvk("cdi.kubevirt.io", "v1beta1", "DataVolume"),
        "datavolumes",
    );
    let dvs: Api<kube::core::DynamicObject> = Api::namespaced_with(client, "default", &ar);
    let good: kube::core::DynamicObject = serde_json::from_value(serde_json::json!({
        "apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
        "metadata": {"name": "good"},
        "spec": {"source": {"blank": {}}, "storage": {"resources": {"requests": {"storage": "1Gi"}}}}
    }))
    .unwrap();
    dvs.create(&PostParams::default(), &good)
        .await
        .expect("a valid DataVolume is accepted");
    let bad: kube::core::DynamicObject = serde_json::from_value(serde_json::json!({
        "apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
        "metadata": {"name": "bad"},
        "spec": {"source": {"blank": "yes"}, "storage": {}}
    }))
    .unwrap();
    match dvs.create(&PostParams::default(), &bad).await {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 422, "{s:?}"),
        other => panic!("a DataVolume with a string blank source must be rejected, got {other:?}"),
    }
}
