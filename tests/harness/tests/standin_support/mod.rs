//! Shared helpers of the `standin_*` integration tests.
#![allow(dead_code)]

use std::time::Duration;

use futures::StreamExt;
use kube::api::{Api, DynamicObject, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::runtime::watcher;
use kubevirt_csi_harness::cluster::{ControlPlane, ControlPlaneOptions};
use kubevirt_csi_harness::standin::{Standin, StandinOptions};
use serde_json::{Value, json};

pub const WAIT: Duration = Duration::from_secs(30);

pub struct Env {
    pub standin: Standin,
    pub client: kube::Client,
    pub cp: ControlPlane,
}

pub async fn env(name: &str) -> Env {
    let cp = ControlPlane::start(ControlPlaneOptions {
        name: name.into(),
        ..Default::default()
    })
    .await
    .expect("control plane starts");
    let client = cp.client().await.expect("admin client");
    kubevirt_csi_harness::crds::install(&client)
        .await
        .expect("upstream crds install");
    let standin = Standin::start(&cp, StandinOptions::default())
        .await
        .expect("stand-in starts");
    eprintln!(
        "stand-in ready in {:?} at {}",
        standin.started_in(),
        standin.addr()
    );
    Env {
        standin,
        client,
        cp,
    }
}

pub fn ar(group: &str, version: &str, kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural)
}
pub fn vm_ar() -> ApiResource {
    ar("kubevirt.io", "v1", "VirtualMachine", "virtualmachines")
}
pub fn vmi_ar() -> ApiResource {
    ar(
        "kubevirt.io",
        "v1",
        "VirtualMachineInstance",
        "virtualmachineinstances",
    )
}
pub fn dv_ar() -> ApiResource {
    ar("cdi.kubevirt.io", "v1beta1", "DataVolume", "datavolumes")
}
pub fn vs_ar() -> ApiResource {
    ar(
        "snapshot.storage.k8s.io",
        "v1",
        "VolumeSnapshot",
        "volumesnapshots",
    )
}
pub fn vsc_ar() -> ApiResource {
    ar(
        "snapshot.storage.k8s.io",
        "v1",
        "VolumeSnapshotContent",
        "volumesnapshotcontents",
    )
}

pub fn dynamic(v: Value) -> DynamicObject {
    serde_json::from_value(v).expect("valid object")
}

pub async fn namespace(client: &kube::Client, name: &str) {
    let api: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    let ns = serde_json::from_value(
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}),
    )
    .unwrap();
    api.create(&PostParams::default(), &ns)
        .await
        .expect("namespace created");
}

/// Creates a blank DataVolume (`storage` form) of `size`.
pub async fn blank_dv(client: &kube::Client, ns: &str, name: &str, size: &str) {
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &dv_ar());
    let dv = dynamic(
        json!({"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
        "metadata": {"name": name, "annotations": {"cdi.kubevirt.io/storage.deleteAfterCompletion": "false"}},
        "spec": {"source": {"blank": {}}, "storage": {"resources": {"requests": {"storage": size}}, "volumeMode": "Block"}}}),
    );
    api.create(&PostParams::default(), &dv)
        .await
        .expect("datavolume created");
}

/// Waits (watch) until `pred` holds for the named object; panics with the last state after WAIT.
pub async fn wait_for(
    api: &Api<DynamicObject>,
    name: &str,
    what: &str,
    pred: impl Fn(&DynamicObject) -> bool,
) -> DynamicObject {
    let cfg = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut last = None;
    let fut = async {
        let mut w = watcher::watcher(api.clone(), cfg).boxed();
        while let Some(ev) = w.next().await {
            if let Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) = ev {
                if pred(&o) {
                    return o;
                }
                last = Some(o);
            }
        }
        panic!("watch on {name} ended");
    };
    match tokio::time::timeout(WAIT, fut).await {
        Ok(o) => o,
        Err(_) => panic!(
            "{name}: {what} not reached within {WAIT:?}; last: {}",
            serde_json::to_string_pretty(&last).unwrap_or_default()
        ),
    }
}

/// Waits (watch) until the named object is gone.
pub async fn wait_gone(api: &Api<DynamicObject>, name: &str) {
    let gone = |o: Option<&DynamicObject>| o.is_none();
    let fut = kube::runtime::wait::await_condition(api.clone(), name, gone);
    match tokio::time::timeout(WAIT, fut).await {
        Ok(r) => {
            r.expect("watch");
        }
        Err(_) => panic!("{name} still exists after {WAIT:?}"),
    }
}

/// A running VMI (phase Running) with a root container disk, as KubeVirt would show it.
pub async fn running_vmi(client: &kube::Client, ns: &str, name: &str, annotations: Value) {
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &vmi_ar());
    let vmi = dynamic(
        json!({"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
        "metadata": {"name": name, "annotations": annotations},
        "spec": {"domain": {"devices": {"disks": [{"name": "root", "disk": {"bus": "virtio"}}]}, "resources": {"requests": {"memory": "64Mi"}}},
                 "volumes": [{"name": "root", "containerDisk": {"image": "example/root"}}]},
        "status": {"phase": "Running"}}),
    );
    let created = api
        .create(&PostParams::default(), &vmi)
        .await
        .expect("vmi created");
    // The phase is written as status (with the object if there is no status subresource).
    let mut obj = created;
    obj.data["status"] = json!({"phase": "Running"});
    if api
        .replace_status(name, &PostParams::default(), &obj)
        .await
        .is_err()
    {
        let mut fresh = api.get(name).await.unwrap();
        fresh.data["status"] = json!({"phase": "Running"});
        api.replace(name, &PostParams::default(), &fresh)
            .await
            .expect("vmi status written");
    }
}

pub fn volume_status<'a>(vmi: &'a DynamicObject, volume: &str) -> Option<&'a Value> {
    vmi.data["status"]["volumeStatus"]
        .as_array()?
        .iter()
        .find(|v| v["name"] == volume)
}

pub fn phase_of(vmi: &DynamicObject, volume: &str) -> Option<String> {
    volume_status(vmi, volume)
        .and_then(|v| v["phase"].as_str())
        .map(String::from)
}

/// PUT a hotplug subresource through the apiserver; returns (HTTP code, body or Status).
///
/// Success is 202 with an empty body; errors come back as a metav1 Status, decoded here.
pub async fn subresource(
    client: &kube::Client,
    ns: &str,
    kind: &str,
    name: &str,
    sub: &str,
    body: &Value,
) -> (u16, String) {
    let url = format!("/apis/subresources.kubevirt.io/v1/namespaces/{ns}/{kind}/{name}/{sub}");
    let req = http::Request::put(url)
        .header("content-type", "application/json")
        .body(serde_json::to_vec(body).unwrap())
        .unwrap();
    let resp = client
        .send(req.map(kube::client::Body::from))
        .await
        .expect("request sent");
    let code = resp.status().as_u16();
    let bytes = resp
        .into_body()
        .collect_bytes()
        .await
        .expect("response body");
    let text = String::from_utf8_lossy(&bytes).into_owned();
    if code == 202 {
        assert!(text.is_empty(), "202 must have an empty body, got {text:?}");
        return (code, text);
    }
    let s: kube::core::Status = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("error body {text:?} is not a Status: {e}"));
    assert_eq!(s.code, code, "Status code matches the HTTP code: {text}");
    assert!(!s.message.is_empty(), "error Status has a message: {text}");
    (code, format!("{}: {}", s.reason, s.message))
}

pub fn add_body(name: &str, dv: &str, serial: &str, bus: &str) -> Value {
    json!({"name": name, "disk": {"name": name, "disk": {"bus": bus}, "serial": serial},
           "volumeSource": {"dataVolume": {"name": dv, "hotpluggable": true}}})
}
