//! KubeVirt's own virt-api and virt-controller (v1.7, built from Go modules) on a real
//! kube-apiserver, with the kubelet and virt-handler stand-ins of
//! `kubevirt_csi_harness::kubevirt_node`: the bed comes up on both feature-gate profiles, a
//! VM becomes a Running VMI, a hotplug through the aggregated API reaches `Ready` and goes
//! away again, and virt-api answers bad hotplugs with its own codes (422 for a bus or serial
//! its admission refuses, 409 for removing a volume the VM does not have).

use std::time::Duration;

use k8s_openapi::api::core::v1::{
    Namespace, PersistentVolume, PersistentVolumeClaim, ServiceAccount,
};
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::runtime::wait::await_condition;
use kubevirt_csi_common::error_chain as chain;
use kubevirt_csi_harness::cluster::{ControlPlane, ControlPlaneOptions};
use kubevirt_csi_harness::kubevirt::{
    GateProfile, KubeVirt, KubeVirtOptions, vm_resource, vmi_resource,
};
use serde_json::{Value, json};

const NS: &str = "tenant";

async fn bed(profile: GateProfile) -> (ControlPlane, KubeVirt) {
    let cp = ControlPlane::start(ControlPlaneOptions::default())
        .await
        .expect("control plane starts");
    let kv = KubeVirt::start(
        &cp,
        KubeVirtOptions {
            profile,
            ..Default::default()
        },
    )
    .await
    .unwrap_or_else(|e| panic!("kubevirt starts: {}", chain(&e)));
    eprintln!(
        "control plane in {:?}; kubevirt {:?}",
        cp.started_in(),
        kv.timings()
    );
    (cp, kv)
}

/// A tenant namespace with the `default` ServiceAccount pods need (no controller-manager
/// here creates it) and a PVC bound to a PV, as a provisioner would leave them.
async fn tenant(client: &kube::Client, pvcs: &[&str]) {
    let pp = PatchParams::apply("kvcsi-test").force();
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": NS}})).unwrap();
    Api::<Namespace>::all(client.clone())
        .patch(NS, &pp, &Patch::Apply(&ns))
        .await
        .unwrap();
    let sa: ServiceAccount =
        serde_json::from_value(json!({"metadata": {"name": "default", "namespace": NS}})).unwrap();
    Api::<ServiceAccount>::namespaced(client.clone(), NS)
        .patch("default", &pp, &Patch::Apply(&sa))
        .await
        .unwrap();
    for name in pvcs {
        let pv: PersistentVolume = serde_json::from_value(json!({
            "metadata": {"name": format!("pv-{name}")},
            "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"],
                "hostPath": {"path": format!("/tmp/kvcsi-{name}")},
                "claimRef": {"namespace": NS, "name": name}}
        }))
        .unwrap();
        Api::<PersistentVolume>::all(client.clone())
            .create(&PostParams::default(), &pv)
            .await
            .unwrap();
        let pvc: PersistentVolumeClaim = serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": NS},
            "spec": {"accessModes": ["ReadWriteOnce"], "volumeName": format!("pv-{name}"),
                "storageClassName": "", "resources": {"requests": {"storage": "1Gi"}}}
        }))
        .unwrap();
        let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), NS);
        pvcs.create(&PostParams::default(), &pvc).await.unwrap();
        // No kube-controller-manager binds it: say what its PV controller would.
        pvcs.patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(
                json!({"status": {"phase": "Bound", "accessModes": ["ReadWriteOnce"],
                "capacity": {"storage": "1Gi"}}}),
            ),
        )
        .await
        .unwrap();
    }
}

async fn running_vm(kv: &KubeVirt, client: &kube::Client, name: &str) -> DynamicObject {
    let vm: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"runStrategy": "Always", "template": {"spec": {
            "domain": {"devices": {"disks": [{"name": "root", "disk": {"bus": "virtio"}}]},
                "resources": {"requests": {"memory": "128Mi"}}},
            "volumes": [{"name": "root", "containerDisk": {"image": "quay.io/containerdisks/fedora:latest"}}]}}}
    }))
    .unwrap();
    let vms: Api<DynamicObject> = Api::namespaced_with(client.clone(), NS, &vm_resource());
    vms.create(&PostParams::default(), &vm)
        .await
        .unwrap_or_else(|e| panic!("create vm: {}", chain(&e)));
    wait_vmi(kv, client, name, "Running", |v| {
        v["status"]["phase"] == "Running"
    })
    .await
}

async fn wait_vmi(
    kv: &KubeVirt,
    client: &kube::Client,
    name: &str,
    what: &str,
    cond: impl Fn(&Value) -> bool,
) -> DynamicObject {
    let vmis: Api<DynamicObject> = Api::namespaced_with(client.clone(), NS, &vmi_resource());
    let fut = await_condition(vmis.clone(), name, move |o: Option<&DynamicObject>| {
        o.is_some_and(|o| cond(&o.data))
    });
    match tokio::time::timeout(Duration::from_secs(60), fut).await {
        Ok(Ok(Some(o))) => o,
        other => {
            let last = vmis.get_opt(name).await.ok().flatten().map(|o| o.data);
            let vms: Api<DynamicObject> = Api::namespaced_with(client.clone(), NS, &vm_resource());
            let vm = vms.get_opt(name).await.ok().flatten().map(|o| o.data);
            let pods: Vec<Value> = Api::<k8s_openapi::api::core::v1::Pod>::namespaced(client.clone(), NS)
                .list(&Default::default())
                .await
                .map(|l| l.items)
                .unwrap_or_default()
                .into_iter()
                .map(|p| json!({"name": p.metadata.name, "nodeSelector": p.spec.as_ref().map(|s| s.node_selector.clone()),
                    "nodeName": p.spec.as_ref().map(|s| s.node_name.clone()),
                    "affinity": p.spec.as_ref().map(|s| s.affinity.clone()),
                    "phase": p.status.as_ref().map(|s| s.phase.clone())}))
                .collect();
            let events: Vec<String> =
                Api::<k8s_openapi::api::core::v1::Event>::namespaced(client.clone(), NS)
                    .list(&Default::default())
                    .await
                    .map(|l| l.items)
                    .unwrap_or_default()
                    .into_iter()
                    .map(|e| format!("{:?} {:?}", e.reason, e.message))
                    .collect();
            panic!(
                "vmi {name} never got {what}: {other:?}; stand-in errors: {:#?}\nevents: {events:#?}\nlast: {}\npods: {}\nvm: {}\nvirt-controller:\n{}\nvirt-api:\n{}",
                kv.node().recent_errors(),
                serde_json::to_string_pretty(&last).unwrap_or_default(),
                serde_json::to_string_pretty(&pods).unwrap_or_default(),
                serde_json::to_string_pretty(&vm).unwrap_or_default(),
                kv.virt_controller_log_tail(30),
                kv.virt_api_log_tail(10),
            )
        }
    }
}

fn volume_status<'a>(vmi: &'a Value, volume: &str) -> Option<&'a Value> {
    vmi["status"]["volumeStatus"]
        .as_array()?
        .iter()
        .find(|s| s["name"] == volume)
}

/// PUT `subresources.kubevirt.io/v1/.../virtualmachines/<vm>/<verb>` through the aggregator.
async fn vm_subresource(
    client: &kube::Client,
    vm: &str,
    verb: &str,
    body: &Value,
) -> Result<(), kube::Error> {
    let req = http::Request::put(format!(
        "/apis/subresources.kubevirt.io/v1/namespaces/{NS}/virtualmachines/{vm}/{verb}"
    ))
    .header("content-type", "application/json")
    .body(serde_json::to_vec(body).unwrap())
    .unwrap();
    client.request_text(req).await.map(|_| ())
}

fn add_volume(name: &str, claim: &str, bus: &str) -> Value {
    json!({"name": name,
        "disk": {"name": name, "disk": {"bus": bus}},
        "volumeSource": {"persistentVolumeClaim": {"claimName": claim, "hotpluggable": true}}})
}

#[tokio::test]
async fn bed_starts_on_hotplug_volumes_gate() {
    let (cp, kv) = bed(GateProfile::HotplugVolumes).await;
    let client = cp.client().await.unwrap();
    let kvs: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        "kubevirt",
        &kube::core::ApiResource::from_gvk_with_plural(
            &kube::core::GroupVersionKind::gvk("kubevirt.io", "v1", "KubeVirt"),
            "kubevirts",
        ),
    );
    let cr = kvs.get("kubevirt").await.unwrap();
    assert_eq!(
        cr.data["spec"]["configuration"]["developerConfiguration"]["featureGates"],
        json!(["HotplugVolumes"])
    );
    assert_eq!(cr.data["status"]["phase"], "Deployed");
    let node = kv.node().name().to_string();
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client);
    let labels = nodes
        .get(&node)
        .await
        .unwrap()
        .metadata
        .labels
        .unwrap_or_default();
    assert_eq!(
        labels.get("kubevirt.io/schedulable").map(String::as_str),
        Some("true")
    );
}

#[tokio::test]
async fn bed_starts_on_declarative_gate_only() {
    let (cp, _kv) = bed(GateProfile::DeclarativeOnly).await;
    let client = cp.client().await.unwrap();
    let kvs: Api<DynamicObject> = Api::namespaced_with(
        client,
        "kubevirt",
        &kube::core::ApiResource::from_gvk_with_plural(
            &kube::core::GroupVersionKind::gvk("kubevirt.io", "v1", "KubeVirt"),
            "kubevirts",
        ),
    );
    let cr = kvs.get("kubevirt").await.unwrap();
    assert_eq!(
        cr.data["spec"]["configuration"]["developerConfiguration"]["featureGates"],
        json!(["DeclarativeHotplugVolumes"])
    );
}

#[tokio::test]
async fn vm_becomes_a_running_vmi_on_the_node() {
    let (cp, kv) = bed(GateProfile::HotplugVolumes).await;
    let client = cp.client().await.unwrap();
    tenant(&client, &[]).await;
    let vmi = running_vm(&kv, &client, "worker-0").await;
    assert_eq!(vmi.data["status"]["nodeName"], kv.node().name());
    // virt-controller's mutating webhook gave it a machine type; the launcher pod runs.
    assert!(
        vmi.data["spec"]["domain"]["machine"]["type"].is_string(),
        "{:?}",
        vmi.data
    );
    let root = volume_status(&vmi.data, "root");
    assert_eq!(
        root.map(|s| s["target"].clone()),
        Some(json!("vda")),
        "{:?}",
        vmi.data["status"]
    );
}

fn attachment_pods(pods: &[k8s_openapi::api::core::v1::Pod]) -> Vec<String> {
    pods.iter()
        .filter_map(|p| p.metadata.name.clone())
        .filter(|n| n.starts_with("hp-volume-"))
        .collect()
}

/// Hot-plugs `data-1` into a running VM through virt-api's aggregated `addvolume`, follows
/// the VMI's volume status to `Ready`, then unplugs it again.
async fn hotplug_round_trip(profile: GateProfile) {
    let (cp, kv) = bed(profile).await;
    let client = cp.client().await.unwrap();
    tenant(&client, &["data-1"]).await;
    running_vm(&kv, &client, "worker-0").await;

    // Every status the VMI passes through, from before the request on.
    let vmis: Api<DynamicObject> = Api::namespaced_with(client.clone(), NS, &vmi_resource());
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let recorder = {
        let seen = seen.clone();
        let cfg = kube::runtime::watcher::Config::default().fields("metadata.name=worker-0");
        tokio::spawn(async move {
            use futures::StreamExt;
            let mut w = kube::runtime::watcher(vmis, cfg).boxed();
            while let Some(Ok(ev)) = w.next().await {
                if let kube::runtime::watcher::Event::Apply(o) = ev
                    && let Some(s) = volume_status(&o.data, "data-1")
                {
                    let phase = s["phase"].as_str().unwrap_or_default().to_string();
                    let mut seen = seen.lock().unwrap();
                    if seen.last() != Some(&phase) {
                        seen.push(phase);
                    }
                }
            }
        })
    };

    vm_subresource(
        &client,
        "worker-0",
        "addvolume",
        &add_volume("data-1", "data-1", "scsi"),
    )
    .await
    .unwrap_or_else(|e| panic!("addvolume: {}", chain(&e)));
    let vmi = wait_vmi(&kv, &client, "worker-0", "data-1 Ready", |v| {
        volume_status(v, "data-1").is_some_and(|s| s["phase"] == "Ready")
    })
    .await;
    let status = volume_status(&vmi.data, "data-1").unwrap();
    assert_eq!(status["target"], "sda", "{status}");
    assert_eq!(status["reason"], "VolumeReady", "{status}");
    let attach_pod = status["hotplugVolume"]["attachPodName"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(attach_pod.starts_with("hp-volume-"), "{status}");
    let on_node = kubevirt_csi_harness::kubevirt_node::pods_on_node(&client, kv.node().name())
        .await
        .unwrap();
    assert_eq!(attachment_pods(&on_node), vec![attach_pod.clone()]);
    // The VM spec holds the volume too (copied by virt-controller, or written by virt-api).
    let vms: Api<DynamicObject> = Api::namespaced_with(client.clone(), NS, &vm_resource());
    let vm = vms.get("worker-0").await.unwrap();
    let in_template = vm.data["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .is_some_and(|vs| vs.iter().any(|v| v["name"] == "data-1"));
    assert!(in_template, "{}", vm.data["spec"]);

    vm_subresource(
        &client,
        "worker-0",
        "removevolume",
        &json!({"name": "data-1"}),
    )
    .await
    .unwrap_or_else(|e| panic!("removevolume: {}", chain(&e)));
    wait_vmi(&kv, &client, "worker-0", "data-1 gone", |v| {
        volume_status(v, "data-1").is_none()
    })
    .await;
    recorder.abort();
    let seen = seen.lock().unwrap().clone();
    let pos = |p: &str| seen.iter().position(|s| s == p);
    assert!(
        pos("MountedToPod") < pos("Ready") && pos("MountedToPod").is_some(),
        "attach must pass MountedToPod before Ready: {seen:?}"
    );
    assert!(
        pos("UnMountedFromPod") > pos("Ready"),
        "detach must pass UnMountedFromPod after Ready: {seen:?}"
    );
    assert!(
        kv.node()
            .domain(&format!("{NS}/worker-0"))
            .is_some_and(|d| !d.contains_key("data-1")),
        "the domain still has data-1"
    );
}

#[tokio::test]
async fn hotplug_reaches_ready_and_unplugs_with_hotplug_volumes_gate() {
    hotplug_round_trip(GateProfile::HotplugVolumes).await;
}

#[tokio::test]
async fn hotplug_reaches_ready_and_unplugs_with_declarative_gate_only() {
    hotplug_round_trip(GateProfile::DeclarativeOnly).await;
}

fn refusal(err: kube::Error) -> Box<kube::core::Status> {
    match err {
        kube::Error::Api(s) => s,
        other => panic!("expected an API refusal, got {}", chain(&other)),
    }
}

/// virt-api's own rules, not ours: a hot-plugged disk on the SATA bus and a serial with
/// characters KubeVirt does not allow are refused by its admission (422), and removing a
/// volume the VM does not have is a conflict (409), not "not found".
#[tokio::test]
async fn virt_api_refuses_bad_hotplugs_with_its_own_codes() {
    let (cp, kv) = bed(GateProfile::HotplugVolumes).await;
    let client = cp.client().await.unwrap();
    tenant(&client, &["data-1"]).await;
    running_vm(&kv, &client, "worker-0").await;

    let sata = vm_subresource(
        &client,
        "worker-0",
        "addvolume",
        &add_volume("data-1", "data-1", "sata"),
    )
    .await
    .expect_err("a sata hotplug must be refused");
    let s = refusal(sata);
    assert_eq!(s.code, 422, "{s:?}");
    assert!(s.message.contains("sata"), "{s:?}");

    let mut bad_serial = add_volume("data-1", "data-1", "scsi");
    bad_serial["disk"]["serial"] = json!("no spaces allowed");
    let serial = vm_subresource(&client, "worker-0", "addvolume", &bad_serial)
        .await
        .expect_err("a serial with spaces must be refused");
    let s = refusal(serial);
    assert_eq!(s.code, 422, "{s:?}");
    let on_serial = s
        .details
        .as_ref()
        .is_some_and(|d| d.causes.iter().any(|c| c.field.ends_with(".serial")));
    assert!(on_serial, "{s:?}");

    let unknown = vm_subresource(
        &client,
        "worker-0",
        "removevolume",
        &json!({"name": "nope"}),
    )
    .await
    .expect_err("removing an unknown volume must fail");
    let s = refusal(unknown);
    assert_eq!(s.code, 409, "{s:?}");
}
