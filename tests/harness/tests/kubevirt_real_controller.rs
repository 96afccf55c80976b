//! The controller plugin against KubeVirt's own virt-api and virt-controller (v1.7), with
//! the stand-in playing only CDI (`--cdi-only`) and the node stand-ins of
//! `kubevirt_csi_harness::kubevirt_node`: a publish reaches a `Ready` hotplug on both
//! feature-gate profiles with the controller's default hotplug mode, and a hotplug virt-api's
//! admission refuses (bus `sata`) reaches the CSI caller with a spec code.

use std::time::Instant;

use csi::volume_capability::access_mode::Mode;
use csi::volume_capability::{AccessMode, AccessType, MountVolume};
use csi_proto::v1 as csi;
use kube::api::{Api, DynamicObject};
use kubevirt_csi_common::error_chain as chain;
use kubevirt_csi_harness::cluster::{ControlPlane, ControlPlaneOptions};
use kubevirt_csi_harness::csi::{ControllerOptions, ControllerPlugin};
use kubevirt_csi_harness::fixtures::{self, TenantFixture, vmi_resource};
use kubevirt_csi_harness::kubevirt::{GateProfile, KubeVirt, KubeVirtOptions};
use kubevirt_csi_harness::standin::{Standin, StandinOptions};
use tonic::Code;

const MIB: i64 = 1 << 20;
const NS: &str = "tenant-a";

struct Env {
    cp: ControlPlane,
    client: kube::Client,
    kv: KubeVirt,
    _standin: Standin,
}

async fn env(profile: GateProfile) -> Env {
    let t = Instant::now();
    let cp = ControlPlane::start(ControlPlaneOptions::default())
        .await
        .expect("control plane");
    let client = cp.client().await.unwrap();
    kubevirt_csi_harness::crds::install_beside_kubevirt(&client)
        .await
        .unwrap_or_else(|e| panic!("crds: {}", chain(&e)));
    kubevirt_csi_harness::kubevirt::install_cdi_companion_crds(&client)
        .await
        .unwrap_or_else(|e| panic!("cdi crds: {}", chain(&e)));
    let kv = KubeVirt::start(
        &cp,
        KubeVirtOptions {
            profile,
            ..Default::default()
        },
    )
    .await
    .unwrap_or_else(|e| panic!("kubevirt starts: {}", chain(&e)));
    fixtures::infra_storage_classes(&client)
        .await
        .expect("storage classes");
    let standin = Standin::start(
        &cp,
        StandinOptions {
            extra_args: vec!["--cdi-only".into()],
            ..Default::default()
        },
    )
    .await
    .expect("cdi stand-in");
    eprintln!(
        "infra up in {:?} (kubevirt {:?})",
        t.elapsed(),
        kv.timings()
    );
    Env {
        cp,
        client,
        kv,
        _standin: standin,
    }
}

/// The tenant with the shipped controller identity and a running worker VM (the bed's
/// stand-ins give the namespace its `default` ServiceAccount, which launcher pods need).
async fn tenant_with_worker(env: &Env) -> TenantFixture {
    tenant_with_worker_on(env, None).await
}

async fn tenant_with_worker_on(env: &Env, qmp_socket: Option<&std::path::Path>) -> TenantFixture {
    let tenant = fixtures::tenant(&env.cp, NS, &[("cluster", "a")], None)
        .await
        .unwrap();
    if let Err(e) = fixtures::worker_vm(&env.client, &tenant, "worker-0", qmp_socket).await {
        panic!(
            "worker vm: {}\nstand-in errors: {:?}\nvirt-controller:\n{}",
            chain(&e),
            env.kv.node().recent_errors(),
            env.kv.virt_controller_log_tail(20)
        );
    }
    tenant
}

async fn controller(tenant: &TenantFixture) -> ControllerPlugin {
    ControllerPlugin::start(ControllerOptions {
        infra_kubeconfig: tenant.controller_kubeconfig.clone(),
        namespace: tenant.namespace.clone(),
        tenant_labels: tenant.label_args(),
        config_yaml: Some("storageClassEnforcement:\n  allowList: [fast]\n".into()),
        extra_args: vec![],
    })
    .await
    .expect("controller starts")
}

fn create_req(name: &str, bus: &str) -> csi::CreateVolumeRequest {
    csi::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: 10 * MIB,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![cap()],
        parameters: [("infraStorageClassName", "fast"), ("bus", bus)]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    }
}

fn cap() -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume::default())),
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
    }
}

fn publish_req(
    volume: &str,
    context: &std::collections::HashMap<String, String>,
) -> csi::ControllerPublishVolumeRequest {
    csi::ControllerPublishVolumeRequest {
        volume_id: volume.into(),
        node_id: format!("{NS}/worker-0"),
        volume_capability: Some(cap()),
        volume_context: context.clone(),
        ..Default::default()
    }
}

async fn publish_and_unpublish(profile: GateProfile) {
    let env = env(profile).await;
    let tenant = tenant_with_worker(&env).await;
    let plugin = controller(&tenant).await;
    let mut c = plugin.controller();
    let vol = c
        .create_volume(create_req("pvc-a", "scsi"))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let published = c
        .controller_publish_volume(publish_req(&vol.volume_id, &vol.volume_context))
        .await
        .unwrap_or_else(|s| {
            panic!(
                "publish: {s:?}\nstand-in errors: {:?}\nvirt-controller:\n{}",
                env.kv.node().recent_errors(),
                env.kv.virt_controller_log_tail(20)
            )
        })
        .into_inner();
    assert_eq!(published.publish_context["bus"], "scsi");
    let vmis: Api<DynamicObject> = Api::namespaced_with(env.client.clone(), NS, &vmi_resource());
    let vmi = vmis.get("worker-0").await.unwrap();
    let entry = vmi.data["status"]["volumeStatus"]
        .as_array()
        .and_then(|a| {
            a.iter()
                .find(|e| e["name"] == vol.volume_id.as_str())
                .cloned()
        })
        .expect("volume status entry");
    assert_eq!(entry["phase"], "Ready", "{entry}");
    assert_eq!(entry["target"], "sda", "{entry}");

    c.controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
        volume_id: vol.volume_id.clone(),
        node_id: format!("{NS}/worker-0"),
        ..Default::default()
    })
    .await
    .unwrap_or_else(|s| panic!("unpublish: {s:?}"));
    let vmi = vmis.get("worker-0").await.unwrap();
    let still_in_spec = vmi.data["spec"]["volumes"]
        .as_array()
        .is_some_and(|a| a.iter().any(|v| v["name"] == vol.volume_id.as_str()));
    assert!(
        !still_in_spec,
        "unpublish returned with the volume still in the VMI spec"
    );
}

#[tokio::test]
async fn publish_reaches_ready_on_real_kubevirt_with_hotplug_volumes_gate() {
    publish_and_unpublish(GateProfile::HotplugVolumes).await;
}

#[tokio::test]
async fn publish_reaches_ready_on_real_kubevirt_with_declarative_gate_only() {
    publish_and_unpublish(GateProfile::DeclarativeOnly).await;
}

/// virt-api refuses a hotplug on the `sata` bus (422 from its admission); the CSI caller
/// must get INVALID_ARGUMENT, not a retry loop or INTERNAL.
#[tokio::test]
async fn virt_api_refusal_reaches_the_csi_caller_as_invalid_argument() {
    let env = env(GateProfile::HotplugVolumes).await;
    let tenant = tenant_with_worker(&env).await;
    let plugin = controller(&tenant).await;
    let mut c = plugin.controller();
    let vol = c
        .create_volume(create_req("pvc-sata", "sata"))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let started = Instant::now();
    let status = c
        .controller_publish_volume(publish_req(&vol.volume_id, &vol.volume_context))
        .await
        .expect_err("virt-api refuses a sata hotplug");
    eprintln!("publish answered {status:?} after {:?}", started.elapsed());
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("sata"), "{status:?}");
}

const AGENT: &str = env!("CARGO_BIN_EXE_kvcsi-guest-agent");

/// With the worker VMI backed by a real QEMU (its QMP socket named on the VMI), a publish
/// through real virt-api and virt-controller plugs the disk into the guest, where it shows
/// up under the serial the controller chose; unpublish takes it out again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_plugs_the_disk_into_the_qemu_worker() {
    let env = env(GateProfile::HotplugVolumes).await;
    let vm =
        kubevirt_csi_harness::vm::WorkerVm::boot(kubevirt_csi_harness::vm::VmOptions::new(AGENT))
            .await
            .unwrap_or_else(|e| panic!("worker vm boots: {}", chain(&e)));
    let socket = vm.external_qmp_socket();
    let tenant = tenant_with_worker_on(&env, Some(&socket)).await;
    let plugin = controller(&tenant).await;
    let mut c = plugin.controller();
    let vol = c
        .create_volume(create_req("pvc-q", "scsi"))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let published = c
        .controller_publish_volume(publish_req(&vol.volume_id, &vol.volume_context))
        .await
        .unwrap_or_else(|s| {
            panic!(
                "publish: {s:?}\nstand-in errors: {:?}",
                env.kv.node().recent_errors()
            )
        })
        .into_inner();
    let serial = published.publish_context["serial"].clone();
    let dev = vm
        .wait_for_disk(&serial, std::time::Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| {
            panic!(
                "guest never saw serial {serial}: {}\nstand-in errors: {:?}",
                chain(&e),
                env.kv.node().recent_errors()
            )
        });
    assert!(dev.starts_with("sd"), "scsi disk appeared as {dev}");

    c.controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
        volume_id: vol.volume_id.clone(),
        node_id: format!("{NS}/worker-0"),
        ..Default::default()
    })
    .await
    .unwrap_or_else(|s| panic!("unpublish: {s:?}"));
    vm.wait_for_disk_gone(&serial, std::time::Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("serial {serial} still in the guest: {}", chain(&e)));
}
