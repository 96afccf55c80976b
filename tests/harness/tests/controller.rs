//! The controller plugin as a real process, against a real kube-apiserver with the
//! upstream CRDs and the KubeVirt/CDI stand-in, running with only the shipped infra Role.

use std::time::{Duration, Instant};

use csi::volume_capability::access_mode::Mode;
use csi::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
use csi_proto::v1 as csi;
use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kubevirt_csi_harness::cluster::{ControlPlane, ControlPlaneOptions};
use kubevirt_csi_harness::csi::{ControllerOptions, ControllerPlugin};
use kubevirt_csi_harness::fixtures::{
    self, TenantFixture, data_volume_resource, vm_resource, vmi_resource,
};
use kubevirt_csi_harness::proxy::TcpProxy;
use kubevirt_csi_harness::standin::{Standin, StandinOptions};
use tonic::Code;

const MIB: i64 = 1 << 20;

struct Env {
    cp: ControlPlane,
    client: kube::Client,
    _standin: Standin,
}

async fn env() -> Env {
    let t = Instant::now();
    let cp = ControlPlane::start(ControlPlaneOptions::default())
        .await
        .expect("control plane");
    let client = cp.client().await.unwrap();
    kubevirt_csi_harness::crds::install(&client)
        .await
        .expect("crds");
    let crds_at = t.elapsed();
    fixtures::infra_storage_classes(&client)
        .await
        .expect("storage classes");
    let standin = Standin::start(&cp, StandinOptions::default())
        .await
        .expect("stand-in");
    eprintln!(
        "infra up in {:?} (apiserver {:?}, crds at {crds_at:?})",
        t.elapsed(),
        cp.started_in()
    );
    Env {
        cp,
        client,
        _standin: standin,
    }
}

async fn controller(tenant: &TenantFixture, extra: &[&str]) -> ControllerPlugin {
    let t = Instant::now();
    let p = ControllerPlugin::start(ControllerOptions {
        infra_kubeconfig: tenant.controller_kubeconfig.clone(),
        namespace: tenant.namespace.clone(),
        tenant_labels: tenant.label_args(),
        config_yaml: Some("storageClassEnforcement:\n  allowList: [fast, slow]\n  allowDefault: true\nsnapshotClasses:\n- infraStorageClass: fast\n  infraSnapshotClass: fast-snap\n".into()),
        extra_args: extra.iter().map(|s| s.to_string()).collect(),
    })
    .await
    .expect("controller starts");
    eprintln!("controller up in {:?}", t.elapsed());
    p
}

fn cap(block: bool, mode: Mode) -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_type: Some(if block {
            AccessType::Block(BlockVolume {})
        } else {
            AccessType::Mount(MountVolume::default())
        }),
        access_mode: Some(AccessMode { mode: mode as i32 }),
    }
}

fn create_req(
    name: &str,
    size: i64,
    block: bool,
    mode: Mode,
    params: &[(&str, &str)],
) -> csi::CreateVolumeRequest {
    csi::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: size,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![cap(block, mode)],
        parameters: params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    }
}

fn code<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> Code {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(s) => {
            assert!(!s.message().is_empty(), "error without a message: {s:?}");
            s.code()
        }
    }
}

fn publish_req(
    volume: &str,
    node: &str,
    block: bool,
    readonly: bool,
) -> csi::ControllerPublishVolumeRequest {
    csi::ControllerPublishVolumeRequest {
        volume_id: volume.into(),
        node_id: node.into(),
        volume_capability: Some(cap(block, Mode::SingleNodeWriter)),
        readonly,
        ..Default::default()
    }
}

fn unpublish_req(volume: &str, node: &str) -> csi::ControllerUnpublishVolumeRequest {
    csi::ControllerUnpublishVolumeRequest {
        volume_id: volume.into(),
        node_id: node.into(),
        ..Default::default()
    }
}

/// Sets the stand-in's fault knobs and waits until it reports them applied.
async fn set_faults(client: &kube::Client, faults: serde_json::Value) {
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "kubevirt");
    let text = faults.to_string();
    let cm: ConfigMap = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "kubevirt-standin-faults", "namespace": "kubevirt"},
        "data": {"faults.json": text}
    }))
    .unwrap();
    cms.patch(
        "kubevirt-standin-faults",
        &PatchParams::apply("test").force(),
        &Patch::Apply(&cm),
    )
    .await
    .unwrap();
    let want: serde_json::Value = faults;
    let applied = async {
        let mut w = watcher::watcher(
            cms.clone(),
            watcher::Config::default().fields("metadata.name=kubevirt-standin-faults"),
        )
        .boxed();
        while let Some(Ok(ev)) = w.next().await {
            let objs: Vec<ConfigMap> = match ev {
                watcher::Event::Apply(o) | watcher::Event::InitApply(o) => vec![o],
                _ => vec![],
            };
            for o in objs {
                let got = o
                    .metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get("standin.kubevirt-csi.io/applied-faults"))
                    .and_then(|s| serde_json::from_str::<serde_json::Value>(s).ok());
                if got.as_ref().is_some_and(|g| same_faults(g, &want)) {
                    return;
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), applied)
        .await
        .expect("stand-in applies the faults");
}

/// The stand-in echoes the faults back with defaults filled in; compare what we set.
fn same_faults(got: &serde_json::Value, want: &serde_json::Value) -> bool {
    match (got, want) {
        (serde_json::Value::Object(g), serde_json::Value::Object(w)) => w
            .iter()
            .all(|(k, v)| g.get(k).is_some_and(|gv| same_faults(gv, v))),
        _ => got == want,
    }
}

async fn dv_labels(
    client: &kube::Client,
    ns: &str,
    name: &str,
) -> std::collections::BTreeMap<String, String> {
    let dvs: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &data_volume_resource());
    dvs.get(name)
        .await
        .unwrap()
        .metadata
        .labels
        .unwrap_or_default()
}

#[tokio::test]
async fn volume_lifecycle_validation_listing_snapshots_and_expansion() {
    let env = env().await;
    let tenant = fixtures::tenant(&env.cp, "tenant-a", &[("cluster", "a")], None)
        .await
        .unwrap();
    let plugin = controller(&tenant, &[]).await;
    let mut c = plugin.controller();
    let mut id = plugin.identity();

    let info = id
        .get_plugin_info(csi::GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, "csi.kubevirt.io");
    let probe = id.probe(csi::ProbeRequest {}).await.unwrap().into_inner();
    assert_eq!(probe.ready, Some(true));

    // Bad input: clear codes, nothing created.
    let single = Mode::SingleNodeWriter;
    assert_eq!(
        code(
            c.create_volume(create_req("", MIB, false, single, &[]))
                .await
        ),
        Code::InvalidArgument
    );
    let mut no_caps = create_req("v", MIB, false, single, &[]);
    no_caps.volume_capabilities.clear();
    assert_eq!(code(c.create_volume(no_caps).await), Code::InvalidArgument);
    assert_eq!(
        code(
            c.create_volume(create_req("v", MIB, false, Mode::MultiNodeMultiWriter, &[]))
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            c.create_volume(create_req(
                "v",
                MIB,
                false,
                single,
                &[("infraStorageClass", "fast")]
            ))
            .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            c.create_volume(create_req(
                "v",
                MIB,
                false,
                single,
                &[("infraStorageClassName", "forbidden")]
            ))
            .await
        ),
        Code::InvalidArgument
    );
    let mut bad_range = create_req("v", 10 * MIB, false, single, &[]);
    bad_range.capacity_range.as_mut().unwrap().limit_bytes = MIB;
    assert_eq!(code(c.create_volume(bad_range).await), Code::OutOfRange);
    let dvs: Api<DynamicObject> =
        Api::namespaced_with(env.client.clone(), "tenant-a", &data_volume_resource());
    assert!(
        dvs.list(&Default::default())
            .await
            .unwrap()
            .items
            .is_empty(),
        "bad requests created objects"
    );

    // Create, with the infra class and tenant labels; idempotent; conflicting re-create.
    let params = [("infraStorageClassName", "fast"), ("bus", "virtio")];
    let v1 = c
        .create_volume(create_req("pvc-one", 100 * MIB, false, single, &params))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert!(v1.capacity_bytes >= 100 * MIB);
    assert_eq!(
        v1.volume_context.get("bus").map(String::as_str),
        Some("virtio")
    );
    assert_eq!(
        dv_labels(&env.client, "tenant-a", &v1.volume_id)
            .await
            .get("cluster")
            .map(String::as_str),
        Some("a")
    );
    let dv = dvs.get(&v1.volume_id).await.unwrap();
    assert_eq!(dv.data["spec"]["storage"]["storageClassName"], "fast");
    assert_eq!(dv.data["spec"]["storage"]["volumeMode"], "Filesystem");
    let again = c
        .create_volume(create_req("pvc-one", 100 * MIB, false, single, &params))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(again.volume_id, v1.volume_id);
    assert_eq!(
        code(
            c.create_volume(create_req("pvc-one", 200 * MIB, false, single, &params))
                .await
        ),
        Code::AlreadyExists
    );
    assert_eq!(
        code(
            c.create_volume(create_req("pvc-one", 100 * MIB, true, single, &params))
                .await
        ),
        Code::AlreadyExists
    );

    // Multi-node block is ReadWriteMany (live migration of the worker VMs).
    let rwx = c
        .create_volume(create_req(
            "pvc-rwx",
            50 * MIB,
            true,
            Mode::MultiNodeMultiWriter,
            &[],
        ))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let dv = dvs.get(&rwx.volume_id).await.unwrap();
    assert_eq!(
        dv.data["spec"]["storage"]["accessModes"][0],
        "ReadWriteMany"
    );
    assert_eq!(dv.data["spec"]["storage"]["volumeMode"], "Block");

    // ValidateVolumeCapabilities.
    let validate = |vid: &str, block: bool| csi::ValidateVolumeCapabilitiesRequest {
        volume_id: vid.into(),
        volume_capabilities: vec![cap(block, single)],
        ..Default::default()
    };
    assert!(
        c.validate_volume_capabilities(validate(&v1.volume_id, false))
            .await
            .unwrap()
            .into_inner()
            .confirmed
            .is_some()
    );
    let no = c
        .validate_volume_capabilities(validate(&v1.volume_id, true))
        .await
        .unwrap()
        .into_inner();
    assert!(no.confirmed.is_none() && !no.message.is_empty());
    assert!(
        c.validate_volume_capabilities(validate(&rwx.volume_id, true))
            .await
            .unwrap()
            .into_inner()
            .confirmed
            .is_some()
    );
    assert_eq!(
        code(
            c.validate_volume_capabilities(validate("kvcsi-nope", false))
                .await
        ),
        Code::NotFound
    );

    // ListVolumes pagination and tokens.
    let v3 = c
        .create_volume(create_req("pvc-three", 10 * MIB, false, single, &[]))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let p1 = c
        .list_volumes(csi::ListVolumesRequest {
            max_entries: 2,
            starting_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p1.entries.len(), 2);
    assert!(!p1.next_token.is_empty());
    let p2 = c
        .list_volumes(csi::ListVolumesRequest {
            max_entries: 2,
            starting_token: p1.next_token,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p2.entries.len(), 1);
    assert!(p2.next_token.is_empty());
    let mut ids: Vec<String> = p1
        .entries
        .iter()
        .chain(&p2.entries)
        .map(|e| e.volume.as_ref().unwrap().volume_id.clone())
        .collect();
    ids.sort();
    let mut want = vec![
        v1.volume_id.clone(),
        rwx.volume_id.clone(),
        v3.volume_id.clone(),
    ];
    want.sort();
    assert_eq!(ids, want);
    assert_eq!(
        code(
            c.list_volumes(csi::ListVolumesRequest {
                max_entries: 1,
                starting_token: "bogus".into()
            })
            .await
        ),
        Code::Aborted
    );

    // ControllerGetVolume with a healthy condition.
    let got = c
        .controller_get_volume(csi::ControllerGetVolumeRequest {
            volume_id: v1.volume_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let cond = got.status.unwrap().volume_condition.unwrap();
    assert!(!cond.abnormal, "{cond:?}");
    assert_eq!(
        code(
            c.controller_get_volume(csi::ControllerGetVolumeRequest {
                volume_id: "kvcsi-nope".into()
            })
            .await
        ),
        Code::NotFound
    );

    // Expansion grows the infra claim and asks for node expansion of filesystems.
    let grown = c
        .controller_expand_volume(csi::ControllerExpandVolumeRequest {
            volume_id: v1.volume_id.clone(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: 200 * MIB,
                limit_bytes: 0,
            }),
            volume_capability: Some(cap(false, single)),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(grown.capacity_bytes >= 200 * MIB);
    assert!(grown.node_expansion_required);
    let after = c
        .controller_get_volume(csi::ControllerGetVolumeRequest {
            volume_id: v1.volume_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(after.volume.unwrap().capacity_bytes >= 200 * MIB);

    // Snapshots: create (ready), list by source, restore, clone, delete.
    let snap = c
        .create_snapshot(csi::CreateSnapshotRequest {
            source_volume_id: v1.volume_id.clone(),
            name: "snap-1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert!(snap.ready_to_use);
    assert_eq!(snap.source_volume_id, v1.volume_id);
    assert!(snap.creation_time.is_some());
    let again = c
        .create_snapshot(csi::CreateSnapshotRequest {
            source_volume_id: v1.volume_id.clone(),
            name: "snap-1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.snapshot.unwrap().snapshot_id, snap.snapshot_id);
    assert_eq!(
        code(
            c.create_snapshot(csi::CreateSnapshotRequest {
                source_volume_id: v3.volume_id.clone(),
                name: "snap-1".into(),
                ..Default::default()
            })
            .await
        ),
        Code::AlreadyExists
    );
    assert_eq!(
        code(
            c.create_snapshot(csi::CreateSnapshotRequest {
                source_volume_id: "kvcsi-nope".into(),
                name: "snap-x".into(),
                ..Default::default()
            })
            .await
        ),
        Code::NotFound
    );
    let listed = c
        .list_snapshots(csi::ListSnapshotsRequest {
            source_volume_id: v1.volume_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.entries.len(), 1);
    let none = c
        .list_snapshots(csi::ListSnapshotsRequest {
            snapshot_id: "kvcsi-nope".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(none.entries.is_empty());
    let mut restore = create_req("pvc-restored", 200 * MIB, false, single, &[]);
    restore.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(csi::volume_content_source::Type::Snapshot(
            csi::volume_content_source::SnapshotSource {
                snapshot_id: snap.snapshot_id.clone(),
            },
        )),
    });
    let restored = c
        .create_volume(restore)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert!(restored.content_source.is_some());
    let mut clone = create_req("pvc-clone", 200 * MIB, false, single, &[]);
    clone.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(csi::volume_content_source::Type::Volume(
            csi::volume_content_source::VolumeSource {
                volume_id: v1.volume_id.clone(),
            },
        )),
    });
    c.create_volume(clone).await.unwrap();
    let mut clone_missing = create_req("pvc-clone-2", 200 * MIB, false, single, &[]);
    clone_missing.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(csi::volume_content_source::Type::Volume(
            csi::volume_content_source::VolumeSource {
                volume_id: "kvcsi-nope".into(),
            },
        )),
    });
    assert_eq!(code(c.create_volume(clone_missing).await), Code::NotFound);
    c.delete_snapshot(csi::DeleteSnapshotRequest {
        snapshot_id: snap.snapshot_id.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    c.delete_snapshot(csi::DeleteSnapshotRequest {
        snapshot_id: snap.snapshot_id.clone(),
        ..Default::default()
    })
    .await
    .unwrap();

    // DeleteVolume: gone from the infra cluster; again and unknown are OK.
    c.delete_volume(csi::DeleteVolumeRequest {
        volume_id: v3.volume_id.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(dvs.get_opt(&v3.volume_id).await.unwrap().is_none());
    c.delete_volume(csi::DeleteVolumeRequest {
        volume_id: v3.volume_id.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    c.delete_volume(csi::DeleteVolumeRequest {
        volume_id: "kvcsi-never-existed".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(
        code(c.delete_volume(csi::DeleteVolumeRequest::default()).await),
        Code::InvalidArgument
    );
}

/// Publish/unpublish, its error paths, and the latency from the stand-in's Ready to our
/// answer (the issue asks for 50 ms at most).
#[tokio::test]
async fn attach_detach_errors_and_latency() {
    let env = env().await;
    let tenant = fixtures::tenant(&env.cp, "tenant-a", &[("cluster", "a")], None)
        .await
        .unwrap();
    fixtures::worker_vm(&env.client, &tenant, "worker-0", None)
        .await
        .unwrap();
    fixtures::worker_vm(&env.client, &tenant, "worker-1", None)
        .await
        .unwrap();
    let plugin = controller(&tenant, &["--max-volumes-per-vm=2"]).await;
    let mut c = plugin.controller();
    let single = Mode::SingleNodeWriter;
    let vol = |name: &'static str| create_req(name, 10 * MIB, false, single, &[]);
    let v1 = c
        .create_volume(vol("pvc-a"))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let node0 = "tenant-a/worker-0";

    // Watch the VMI ourselves to see when the stand-in reports Ready.
    let vmis: Api<DynamicObject> =
        Api::namespaced_with(env.client.clone(), "tenant-a", &vmi_resource());
    let (tx, rx) = tokio::sync::oneshot::channel::<Instant>();
    let watched = v1.clone();
    let mut stream = watcher::watcher(
        vmis.clone(),
        watcher::Config::default().fields("metadata.name=worker-0"),
    )
    .boxed();
    // Make sure the watch is established before publishing.
    while let Some(ev) = stream.next().await {
        if matches!(ev, Ok(watcher::Event::InitDone)) {
            break;
        }
    }
    let observer = tokio::spawn(async move {
        let mut tx = Some(tx);
        while let Some(ev) = stream.next().await {
            if let Ok(watcher::Event::Apply(o)) = ev {
                let ready = o.data["status"]["volumeStatus"]
                    .as_array()
                    .is_some_and(|a| {
                        a.iter()
                            .any(|e| e["name"] == watched.as_str() && e["phase"] == "Ready")
                    });
                if ready && let Some(tx) = tx.take() {
                    let _ = tx.send(Instant::now());
                    return;
                }
            }
        }
    });
    let started = Instant::now();
    let published = c
        .controller_publish_volume(publish_req(&v1, node0, false, false))
        .await
        .unwrap()
        .into_inner();
    let returned = Instant::now();
    let ready_at = tokio::time::timeout(Duration::from_secs(5), rx)
        .await
        .expect("ready observed")
        .unwrap();
    observer.abort();
    let lag = returned.saturating_duration_since(ready_at);
    eprintln!(
        "publish took {:?}; returned {:?} after the stand-in reported Ready",
        returned - started,
        lag
    );
    assert!(
        lag < Duration::from_millis(50),
        "publish returned {lag:?} after Ready"
    );

    let serial = published.publish_context["serial"].clone();
    assert!(serial.len() <= 20, "{serial}");
    assert_eq!(published.publish_context["bus"], "scsi");
    let vms: Api<DynamicObject> =
        Api::namespaced_with(env.client.clone(), "tenant-a", &vm_resource());
    let vm = vms.get("worker-0").await.unwrap();
    let disks = vm.data["spec"]["template"]["spec"]["domain"]["devices"]["disks"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        disks
            .iter()
            .any(|d| d["name"] == v1.as_str() && d["serial"] == serial.as_str()),
        "{disks:?}"
    );

    // Idempotent; an incompatible re-publish; single-node elsewhere; delete while attached.
    let again = c
        .controller_publish_volume(publish_req(&v1, node0, false, false))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.publish_context, published.publish_context);
    assert_eq!(
        code(
            c.controller_publish_volume(publish_req(&v1, node0, false, true))
                .await
        ),
        Code::AlreadyExists
    );
    assert_eq!(
        code(
            c.controller_publish_volume(publish_req(&v1, "tenant-a/worker-1", false, false))
                .await
        ),
        Code::FailedPrecondition
    );
    assert_eq!(
        code(
            c.delete_volume(csi::DeleteVolumeRequest {
                volume_id: v1.clone(),
                ..Default::default()
            })
            .await
        ),
        Code::FailedPrecondition
    );
    let listed = c
        .list_volumes(csi::ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    let entry = listed
        .entries
        .iter()
        .find(|e| e.volume.as_ref().unwrap().volume_id == v1)
        .unwrap();
    assert_eq!(
        entry.status.as_ref().unwrap().published_node_ids,
        vec![node0.to_string()]
    );

    // Unknown volume, unknown node, another tenant's namespace, missing fields.
    assert_eq!(
        code(
            c.controller_publish_volume(publish_req("kvcsi-nope", node0, false, false))
                .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code(
            c.controller_publish_volume(publish_req(&v1, "tenant-a/no-such-vm", false, false))
                .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code(
            c.controller_publish_volume(publish_req(&v1, "tenant-b/worker-0", false, false))
                .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code(
            c.controller_publish_volume(publish_req(&v1, "not-a-node-id", false, false))
                .await
        ),
        Code::NotFound
    );
    let mut no_cap = publish_req(&v1, node0, false, false);
    no_cap.volume_capability = None;
    assert_eq!(
        code(c.controller_publish_volume(no_cap).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            c.controller_publish_volume(publish_req(&v1, node0, true, false))
                .await
        ),
        Code::InvalidArgument
    );

    // The per-VM limit (2 here): a third hotplug is RESOURCE_EXHAUSTED.
    let v2 = c
        .create_volume(vol("pvc-b"))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let v3 = c
        .create_volume(vol("pvc-c"))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    c.controller_publish_volume(publish_req(&v2, node0, false, false))
        .await
        .unwrap();
    assert_eq!(
        code(
            c.controller_publish_volume(publish_req(&v3, node0, false, false))
                .await
        ),
        Code::ResourceExhausted
    );

    // Unpublish: the entry leaves the VMI; again, and for unknown volume or node, is OK.
    c.controller_unpublish_volume(unpublish_req(&v1, node0))
        .await
        .unwrap();
    let vmi = vmis.get("worker-0").await.unwrap();
    let statuses = vmi.data["status"]["volumeStatus"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        !statuses.iter().any(|e| e["name"] == v1.as_str()),
        "{statuses:?}"
    );
    c.controller_unpublish_volume(unpublish_req(&v1, node0))
        .await
        .unwrap();
    c.controller_unpublish_volume(unpublish_req("kvcsi-nope", node0))
        .await
        .unwrap();
    c.controller_unpublish_volume(unpublish_req(&v1, "tenant-a/no-such-vm"))
        .await
        .unwrap();
    // Now the volume moves to the other VM and can be deleted after leaving it.
    c.controller_publish_volume(publish_req(&v1, "tenant-a/worker-1", false, false))
        .await
        .unwrap();
    c.controller_unpublish_volume(unpublish_req(&v1, "tenant-a/worker-1"))
        .await
        .unwrap();
    c.delete_volume(csi::DeleteVolumeRequest {
        volume_id: v1.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
}

/// The stand-in's fault knobs: delays, injected HTTP failures, attaches that never become
/// Ready or fail, watches cut mid-wait, and an unreachable apiserver.
#[tokio::test]
async fn faults_delays_lost_watches_and_outages() {
    let env = env().await;
    let proxy = TcpProxy::start(env.cp.socket_addr()).await.unwrap();
    let server = format!("https://127.0.0.1:{}", proxy.addr().port());
    let tenant = fixtures::tenant(&env.cp, "tenant-a", &[("cluster", "a")], Some(&server))
        .await
        .unwrap();
    fixtures::worker_vm(&env.client, &tenant, "worker-0", None)
        .await
        .unwrap();
    let plugin = controller(&tenant, &["--attach-timeout=3s"]).await;
    let mut c = plugin.controller();
    let node = "tenant-a/worker-0";
    let vol = |name: &str| create_req(name, 10 * MIB, false, Mode::SingleNodeWriter, &[]);
    let v1 = c
        .create_volume(vol("pvc-a"))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;

    // A slow attach is waited for.
    set_faults(&env.client, serde_json::json!({"delayMs": {"attach": 800}})).await;
    let t = Instant::now();
    c.controller_publish_volume(publish_req(&v1, node, false, false))
        .await
        .unwrap();
    assert!(
        t.elapsed() >= Duration::from_millis(800),
        "{:?}",
        t.elapsed()
    );
    c.controller_unpublish_volume(unpublish_req(&v1, node))
        .await
        .unwrap();

    // A server error from virt-api is UNAVAILABLE (retried by the sidecar), then it works.
    set_faults(
        &env.client,
        serde_json::json!({"fail": {"addvolume": {"count": 1, "status": 500}}}),
    )
    .await;
    assert_eq!(
        code(
            c.controller_publish_volume(publish_req(&v1, node, false, false))
                .await
        ),
        Code::Unavailable
    );
    c.controller_publish_volume(publish_req(&v1, node, false, false))
        .await
        .unwrap();
    c.controller_unpublish_volume(unpublish_req(&v1, node))
        .await
        .unwrap();

    // Never Ready: DEADLINE_EXCEEDED within the configured bound; the retry then succeeds.
    set_faults(&env.client, serde_json::json!({"neverReady": true})).await;
    let t = Instant::now();
    assert_eq!(
        code(
            c.controller_publish_volume(publish_req(&v1, node, false, false))
                .await
        ),
        Code::DeadlineExceeded
    );
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    set_faults(&env.client, serde_json::json!({})).await;
    c.controller_publish_volume(publish_req(&v1, node, false, false))
        .await
        .unwrap();
    c.controller_unpublish_volume(unpublish_req(&v1, node))
        .await
        .unwrap();

    // A failed attach is reported as such, with KubeVirt's message.
    set_faults(
        &env.client,
        serde_json::json!({"attachFailure": {"reason": "AttachFailed", "message": "no free slot"}}),
    )
    .await;
    let err = c
        .controller_publish_volume(publish_req(&v1, node, false, false))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("no free slot"), "{}", err.message());
    set_faults(&env.client, serde_json::json!({})).await;
    c.controller_unpublish_volume(unpublish_req(&v1, node))
        .await
        .unwrap();

    // Watches cut while we wait: the wait resumes on a new watch and still succeeds.
    set_faults(
        &env.client,
        serde_json::json!({"delayMs": {"attach": 1500}}),
    )
    .await;
    let cutter = {
        let p = &proxy;
        async move {
            for _ in 0..3 {
                tokio::time::sleep(Duration::from_millis(400)).await;
                p.cut_all();
            }
        }
    };
    let (published, ()) = tokio::join!(
        c.controller_publish_volume(publish_req(&v1, node, false, false)),
        cutter
    );
    // A cut can also hit the gRPC-side request's own API calls: retry once as a sidecar would.
    if let Err(s) = &published {
        assert_eq!(s.code(), Code::Unavailable, "{s:?}");
        c.controller_publish_volume(publish_req(&v1, node, false, false))
            .await
            .unwrap();
    }
    set_faults(&env.client, serde_json::json!({})).await;
    c.controller_unpublish_volume(unpublish_req(&v1, node))
        .await
        .unwrap();

    // The infra apiserver unreachable: Probe says not ready (no error), RPCs are UNAVAILABLE.
    proxy.set_refuse(true);
    let probe = plugin
        .identity()
        .probe(csi::ProbeRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(probe.ready, Some(false));
    assert_eq!(
        code(c.create_volume(vol("pvc-outage")).await),
        Code::Unavailable
    );
    proxy.set_refuse(false);
    let probe = plugin
        .identity()
        .probe(csi::ProbeRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(probe.ready, Some(true));
    c.create_volume(vol("pvc-outage")).await.unwrap();
}

/// Two tenants in one infra cluster: neither can see, attach, or delete the other's volumes.
#[tokio::test]
async fn tenants_cannot_reach_each_other() {
    let env = env().await;
    let a = fixtures::tenant(&env.cp, "tenant-a", &[("cluster", "a")], None)
        .await
        .unwrap();
    let b = fixtures::tenant(&env.cp, "tenant-b", &[("cluster", "b")], None)
        .await
        .unwrap();
    fixtures::worker_vm(&env.client, &a, "worker-0", None)
        .await
        .unwrap();
    fixtures::worker_vm(&env.client, &b, "worker-0", None)
        .await
        .unwrap();
    let pa = controller(&a, &[]).await;
    let pb = controller(&b, &[]).await;
    let (mut ca, mut cb) = (pa.controller(), pb.controller());
    let req = || {
        create_req(
            "pvc-same-name",
            10 * MIB,
            false,
            Mode::SingleNodeWriter,
            &[],
        )
    };
    let va = ca
        .create_volume(req())
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let vb = cb
        .create_volume(req())
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    assert_eq!(
        va, vb,
        "same CSI name, same infra name, separate namespaces"
    );

    // B cannot publish A's node, nor publish into A's namespace.
    assert_eq!(
        code(
            cb.controller_publish_volume(publish_req(&vb, "tenant-a/worker-0", false, false))
                .await
        ),
        Code::NotFound
    );
    ca.controller_publish_volume(publish_req(&va, "tenant-a/worker-0", false, false))
        .await
        .unwrap();
    cb.controller_publish_volume(publish_req(&vb, "tenant-b/worker-0", false, false))
        .await
        .unwrap();

    // An object in B's namespace without B's labels (e.g. planted by someone else) is
    // invisible to B and survives B's delete.
    let dvs_b: Api<DynamicObject> =
        Api::namespaced_with(env.client.clone(), "tenant-b", &data_volume_resource());
    let planted: DynamicObject = serde_json::from_value(serde_json::json!({
        "apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
        "metadata": {"name": "kvcsi-planted", "labels": {"cluster": "a"}},
        "spec": {"source": {"blank": {}}, "storage": {"resources": {"requests": {"storage": "1Mi"}}}}
    }))
    .unwrap();
    dvs_b
        .create(&PostParams::default(), &planted)
        .await
        .unwrap();
    assert_eq!(
        code(
            cb.controller_get_volume(csi::ControllerGetVolumeRequest {
                volume_id: "kvcsi-planted".into()
            })
            .await
        ),
        Code::NotFound
    );
    cb.delete_volume(csi::DeleteVolumeRequest {
        volume_id: "kvcsi-planted".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(
        dvs_b.get_opt("kvcsi-planted").await.unwrap().is_some(),
        "a foreign object was deleted"
    );
    assert_eq!(
        code(
            cb.controller_publish_volume(publish_req(
                "kvcsi-planted",
                "tenant-b/worker-0",
                false,
                false
            ))
            .await
        ),
        Code::NotFound
    );
    let listed = cb
        .list_volumes(csi::ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.entries.len(), 1);

    // Detaching in B leaves A's attachment alone.
    cb.controller_unpublish_volume(unpublish_req(&vb, "tenant-b/worker-0"))
        .await
        .unwrap();
    let vmis_a: Api<DynamicObject> =
        Api::namespaced_with(env.client.clone(), "tenant-a", &vmi_resource());
    let vmi = vmis_a.get("worker-0").await.unwrap();
    let statuses = vmi.data["status"]["volumeStatus"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        statuses
            .iter()
            .any(|e| e["name"] == va.as_str() && e["phase"] == "Ready")
    );
}

/// The other two hotplug paths: a VMI with no VM behind it (VMI-level addvolume, which
/// does not survive a restart), and `--hotplug-mode=declarative`, which edits the VM spec.
#[tokio::test]
async fn vmi_only_and_declarative_hotplug() {
    let env = env().await;
    let tenant = fixtures::tenant(&env.cp, "tenant-a", &[("cluster", "a")], None)
        .await
        .unwrap();
    fixtures::worker_vm(&env.client, &tenant, "worker-0", None)
        .await
        .unwrap();
    // A bare VMI, as some setups run workers without a VirtualMachine.
    let vmis: Api<DynamicObject> =
        Api::namespaced_with(env.client.clone(), "tenant-a", &vmi_resource());
    let bare: DynamicObject = serde_json::from_value(serde_json::json!({
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
        "metadata": {"name": "bare-0", "labels": {"cluster": "a"}},
        "spec": {"domain": {"devices": {}, "resources": {"requests": {"memory": "1Gi"}}}},
        "status": {"phase": "Running"}
    }))
    .unwrap();
    vmis.create(&PostParams::default(), &bare).await.unwrap();

    let plugin = controller(&tenant, &["--hotplug-mode=declarative"]).await;
    let mut c = plugin.controller();
    let vol = |name: &str| create_req(name, 10 * MIB, false, Mode::SingleNodeWriter, &[]);
    let v1 = c
        .create_volume(vol("pvc-decl"))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let v2 = c
        .create_volume(vol("pvc-bare"))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;

    // Declarative: the VM spec carries the hotpluggable volume; the VMI reports it Ready.
    let pc = c
        .controller_publish_volume(publish_req(&v1, "tenant-a/worker-0", false, false))
        .await
        .unwrap()
        .into_inner();
    let vms: Api<DynamicObject> =
        Api::namespaced_with(env.client.clone(), "tenant-a", &vm_resource());
    let vm = vms.get("worker-0").await.unwrap();
    let volumes = vm.data["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        volumes
            .iter()
            .any(|v| v["name"] == v1.as_str() && v["dataVolume"]["hotpluggable"] == true),
        "{volumes:?}"
    );
    assert!(
        vm.data["status"]["volumeRequests"]
            .as_array()
            .is_none_or(|r| r.is_empty()),
        "declarative mode must not use addvolume"
    );
    let disks = vm.data["spec"]["template"]["spec"]["domain"]["devices"]["disks"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        disks
            .iter()
            .any(|d| d["name"] == v1.as_str()
                && d["serial"] == pc.publish_context["serial"].as_str())
    );
    c.controller_unpublish_volume(unpublish_req(&v1, "tenant-a/worker-0"))
        .await
        .unwrap();
    let vm = vms.get("worker-0").await.unwrap();
    let volumes = vm.data["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        !volumes.iter().any(|v| v["name"] == v1.as_str()),
        "{volumes:?}"
    );

    // VMI-level: no VM named bare-0, so the VMI subresource is used.
    c.controller_publish_volume(publish_req(&v2, "tenant-a/bare-0", false, false))
        .await
        .unwrap();
    let vmi = vmis.get("bare-0").await.unwrap();
    let st = vmi.data["status"]["volumeStatus"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        st.iter()
            .any(|e| e["name"] == v2.as_str() && e["phase"] == "Ready"),
        "{st:?}"
    );
    c.controller_unpublish_volume(unpublish_req(&v2, "tenant-a/bare-0"))
        .await
        .unwrap();
    let vmi = vmis.get("bare-0").await.unwrap();
    let st = vmi.data["status"]["volumeStatus"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(!st.iter().any(|e| e["name"] == v2.as_str()), "{st:?}");
}

/// The tenant boundary against a hostile guest admin (issue 11): aliases of real ids, ids
/// naming volumes the driver did not create, a foreign claim under our computed name, a
/// labelled DataVolume without our marker, and impossible sizes and names. Each line here
/// was a finding; each must leave every infra object untouched.
#[tokio::test]
async fn hostile_ids_and_foreign_objects_are_never_touched() {
    use kubevirt_csi_controller::names::{disk_serial, infra_name};
    let env = env().await;
    let tenant = fixtures::tenant(&env.cp, "tenant-a", &[("cluster", "a")], None)
        .await
        .unwrap();
    for vm in ["worker-0", "worker-1"] {
        fixtures::worker_vm(&env.client, &tenant, vm, None)
            .await
            .unwrap();
    }
    let plugin = controller(&tenant, &[]).await;
    let decl = controller(&tenant, &["--hotplug-mode=declarative"]).await;
    let mut c = plugin.controller();
    let mut d = decl.controller();
    let single = Mode::SingleNodeWriter;
    let (node0, node1) = ("tenant-a/worker-0", "tenant-a/worker-1");
    let dvs: Api<DynamicObject> =
        Api::namespaced_with(env.client.clone(), "tenant-a", &data_volume_resource());
    let vms: Api<DynamicObject> =
        Api::namespaced_with(env.client.clone(), "tenant-a", &vm_resource());
    let pvcs: Api<k8s_openapi::api::core::v1::PersistentVolumeClaim> =
        Api::namespaced(env.client.clone(), "tenant-a");
    let vm_volumes = |vm: &DynamicObject| -> Vec<String> {
        vm.data["spec"]["template"]["spec"]["volumes"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v["name"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };

    let real = c
        .create_volume(create_req("pvc-real", 10 * MIB, false, single, &[]))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    c.controller_publish_volume(publish_req(&real, node0, false, false))
        .await
        .unwrap();
    let real_uid = dvs.get(&real).await.unwrap().metadata.uid;

    // Aliases of the attached volume's id, and ids that cannot exist: Delete and Unpublish
    // answer OK and touch nothing; everything else is NOT_FOUND.
    let mut hostile: Vec<String> = ["?x", "#x", "/status", "/", "%2F", " ", "/../x", "\u{0}"]
        .iter()
        .map(|s| format!("{real}{s}"))
        .collect();
    hostile.extend(
        [".", "..", "%2e%2e", "a b", "root", "ROOT", "../worker-0"]
            .iter()
            .map(|s| s.to_string()),
    );
    hostile.push("v".repeat(64 * 1024));
    for id in &hostile {
        let shown: String = format!("{id:?}").chars().take(80).collect();
        c.delete_volume(csi::DeleteVolumeRequest {
            volume_id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("delete {shown}: {e:?}"));
        c.controller_unpublish_volume(unpublish_req(id, node0))
            .await
            .unwrap_or_else(|e| panic!("unpublish {shown}: {e:?}"));
        assert_eq!(
            code(
                c.controller_publish_volume(publish_req(id, node1, false, false))
                    .await
            ),
            Code::NotFound,
            "publish {shown}"
        );
        assert_eq!(
            code(
                c.controller_get_volume(csi::ControllerGetVolumeRequest {
                    volume_id: id.clone()
                })
                .await
            ),
            Code::NotFound,
            "get {shown}"
        );
        assert_eq!(
            code(
                c.controller_expand_volume(csi::ControllerExpandVolumeRequest {
                    volume_id: id.clone(),
                    capacity_range: Some(csi::CapacityRange {
                        required_bytes: 20 * MIB,
                        limit_bytes: 0
                    }),
                    ..Default::default()
                })
                .await
            ),
            Code::NotFound,
            "expand {shown}"
        );
        assert_eq!(
            code(
                c.create_snapshot(csi::CreateSnapshotRequest {
                    name: "snap-alias".into(),
                    source_volume_id: id.clone(),
                    ..Default::default()
                })
                .await
            ),
            Code::NotFound,
            "snapshot {shown}"
        );
        c.delete_snapshot(csi::DeleteSnapshotRequest {
            snapshot_id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("delete snapshot {shown}: {e:?}"));
    }
    // The attached volume survived every alias, still attached and still recorded, so a
    // single-node volume cannot be published to a second VM.
    let dv = dvs.get(&real).await.unwrap();
    assert_eq!(dv.metadata.uid, real_uid);
    assert!(dv.metadata.deletion_timestamp.is_none());
    assert_eq!(
        dv.metadata.annotations.as_ref().unwrap()["csi.kubevirt.io/attached-to"],
        "worker-0"
    );
    assert!(vm_volumes(&vms.get("worker-0").await.unwrap()).contains(&real));
    assert_eq!(
        code(
            c.controller_publish_volume(publish_req(&real, node1, false, false))
                .await
        ),
        Code::FailedPrecondition
    );

    // Volumes the driver did not hotplug: the root disk, and a hotpluggable volume with our
    // name shape but not our serial. Neither mode removes them.
    let foreign = infra_name("kvcsi-", "someone-else");
    let patch = serde_json::json!([
        {"op": "add", "path": "/spec/template/spec/volumes/-", "value": {"name": foreign, "dataVolume": {"name": foreign, "hotpluggable": true}}},
        {"op": "add", "path": "/spec/template/spec/domain/devices/disks/-", "value": {"name": foreign, "disk": {"bus": "scsi"}, "serial": "not-ours"}},
    ]);
    vms.patch(
        "worker-1",
        &PatchParams::default(),
        &Patch::<()>::Json(serde_json::from_value(patch).unwrap()),
    )
    .await
    .unwrap();
    let before = vms.get("worker-1").await.unwrap();
    for client in [&mut c, &mut d] {
        for id in ["root", foreign.as_str()] {
            client
                .controller_unpublish_volume(unpublish_req(id, node1))
                .await
                .unwrap_or_else(|e| panic!("unpublish {id}: {e:?}"));
        }
    }
    let after = vms.get("worker-1").await.unwrap();
    assert_eq!(
        before.data["spec"], after.data["spec"],
        "unpublish changed a VM spec it did not own"
    );
    assert_ne!(disk_serial(&foreign), "not-ours");

    // A claim that is not ours under the name our next volume would get: refused at once,
    // and no DataVolume is left behind.
    let taken = infra_name("kvcsi-", "pvc-taken");
    let claim: k8s_openapi::api::core::v1::PersistentVolumeClaim =
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": taken},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "10Mi"}}}
        }))
        .unwrap();
    pvcs.create(&PostParams::default(), &claim).await.unwrap();
    assert_eq!(
        code(
            c.create_volume(create_req("pvc-taken", 10 * MIB, false, single, &[]))
                .await
        ),
        Code::AlreadyExists
    );
    assert!(dvs.get_opt(&taken).await.unwrap().is_none());

    // A tenant-labelled DataVolume the driver did not create (no marker annotation): it can
    // be neither published, read, cloned, snapshotted nor deleted through the driver.
    let stolen = infra_name("kvcsi-", "stolen");
    let dv: DynamicObject = serde_json::from_value(serde_json::json!({
        "apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
        "metadata": {"name": stolen, "labels": {"cluster": "a"}},
        "spec": {"source": {"blank": {}}, "storage": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "10Mi"}}}}
    }))
    .unwrap();
    dvs.create(&PostParams::default(), &dv).await.unwrap();
    assert_eq!(
        code(
            c.controller_publish_volume(publish_req(&stolen, node1, false, false))
                .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code(
            c.controller_get_volume(csi::ControllerGetVolumeRequest {
                volume_id: stolen.clone()
            })
            .await
        ),
        Code::NotFound
    );
    let mut clone = create_req("pvc-clone-stolen", 10 * MIB, false, single, &[]);
    clone.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(csi::volume_content_source::Type::Volume(
            csi::volume_content_source::VolumeSource {
                volume_id: stolen.clone(),
            },
        )),
    });
    assert_eq!(code(c.create_volume(clone).await), Code::NotFound);
    assert_eq!(
        code(
            c.create_snapshot(csi::CreateSnapshotRequest {
                name: "snap-stolen".into(),
                source_volume_id: stolen.clone(),
                ..Default::default()
            })
            .await
        ),
        Code::NotFound
    );
    c.delete_volume(csi::DeleteVolumeRequest {
        volume_id: stolen.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(dvs.get_opt(&stolen).await.unwrap().is_some());
    let listed = c
        .list_volumes(csi::ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<String> = listed
        .entries
        .iter()
        .filter_map(|e| e.volume.as_ref().map(|v| v.volume_id.clone()))
        .collect();
    assert_eq!(ids, vec![real.clone()]);

    // A malformed capability is the request's fault whatever volume it names.
    for id in ["no-such-volume..", real.as_str()] {
        assert_eq!(
            code(
                c.validate_volume_capabilities(csi::ValidateVolumeCapabilitiesRequest {
                    volume_id: id.to_string(),
                    volume_capabilities: vec![csi::VolumeCapability::default()],
                    ..Default::default()
                })
                .await
            ),
            Code::InvalidArgument,
            "{id}"
        );
    }

    // Impossible sizes are OUT_OF_RANGE; names past the spec's 128 bytes INVALID_ARGUMENT.
    for huge in [i64::MAX, 1 << 62, (64 << 40) + 1] {
        assert_eq!(
            code(
                c.create_volume(create_req("pvc-huge", huge, false, single, &[]))
                    .await
            ),
            Code::OutOfRange,
            "{huge}"
        );
        assert_eq!(
            code(
                c.controller_expand_volume(csi::ControllerExpandVolumeRequest {
                    volume_id: real.clone(),
                    capacity_range: Some(csi::CapacityRange {
                        required_bytes: huge,
                        limit_bytes: 0
                    }),
                    ..Default::default()
                })
                .await
            ),
            Code::OutOfRange,
            "{huge}"
        );
    }
    assert!(
        dvs.get_opt(&infra_name("kvcsi-", "pvc-huge"))
            .await
            .unwrap()
            .is_none()
    );
    for name in ["n".repeat(129), "n".repeat(300 * 1024)] {
        assert_eq!(
            code(
                c.create_volume(create_req(&name, 10 * MIB, false, single, &[]))
                    .await
            ),
            Code::InvalidArgument
        );
    }

    c.controller_unpublish_volume(unpublish_req(&real, node0))
        .await
        .unwrap();
    c.delete_volume(csi::DeleteVolumeRequest {
        volume_id: real.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(dvs.get_opt(&real).await.unwrap().is_none());
}
