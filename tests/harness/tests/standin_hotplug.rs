//! The stand-in's hotplug API and VMI state machine, through a real kube-apiserver's
//! aggregation layer: discovery, 202/400/404/409, VMI- and VM-level add/remove, the
//! volumeStatus phases, declarative hotplug, and two tenants with the same names.

mod standin_support;

use kube::api::{Api, DynamicObject, PostParams};
use serde_json::json;
use standin_support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standin_hotplug_api_and_state_machine() {
    let env = env("standin-hotplug").await;
    let c = &env.client;

    // Discovery through the aggregator.
    let list = c
        .request_text(
            http::Request::get("/apis/subresources.kubevirt.io/v1")
                .body(vec![])
                .unwrap(),
        )
        .await
        .expect("discovery served through the aggregator");
    for r in [
        "virtualmachines/addvolume",
        "virtualmachines/removevolume",
        "virtualmachineinstances/addvolume",
        "virtualmachineinstances/removevolume",
    ] {
        assert!(list.contains(r), "{r} missing from {list}");
    }

    for ns in ["tenant-a", "tenant-b"] {
        namespace(c, ns).await;
        blank_dv(c, ns, "vol1", "64Mi").await;
        blank_dv(c, ns, "vol2", "32Mi").await;
        running_vmi(c, ns, "worker", json!({})).await;
    }
    for ns in ["tenant-a", "tenant-b"] {
        let dvs: Api<DynamicObject> = Api::namespaced_with(c.clone(), ns, &dv_ar());
        for dv in ["vol1", "vol2"] {
            wait_for(&dvs, dv, "Succeeded", |o| {
                o.data["status"]["phase"] == "Succeeded"
            })
            .await;
        }
    }
    let vmis_a: Api<DynamicObject> = Api::namespaced_with(c.clone(), "tenant-a", &vmi_ar());
    let vmis_b: Api<DynamicObject> = Api::namespaced_with(c.clone(), "tenant-b", &vmi_ar());

    // 400: invalid bodies.
    let vmi = "virtualmachineinstances";
    for bad in [
        json!({"disk": {}}),
        json!({"name": "x"}),
        json!({"name": "x", "disk": {}}),
        json!({"name": "x", "disk": {"disk": {"bus": "ide"}}, "volumeSource": {"dataVolume": {"name": "vol1"}}}),
    ] {
        let (code, msg) = subresource(c, "tenant-a", vmi, "worker", "addvolume", &bad).await;
        assert_eq!(code, 400, "{bad}: {msg}");
    }
    let (code, _) = subresource(c, "tenant-a", vmi, "worker", "removevolume", &json!({})).await;
    assert_eq!(code, 400);
    // 404: unknown VMI, VM, volume.
    let (code, msg) = subresource(
        c,
        "tenant-a",
        vmi,
        "nope",
        "addvolume",
        &add_body("v1", "vol1", "s1", "scsi"),
    )
    .await;
    assert_eq!(code, 404, "{msg}");
    let (code, _) = subresource(
        c,
        "tenant-a",
        "virtualmachines",
        "nope",
        "addvolume",
        &add_body("v1", "vol1", "s1", "scsi"),
    )
    .await;
    assert_eq!(code, 404);
    let (code, _) = subresource(
        c,
        "tenant-a",
        vmi,
        "worker",
        "removevolume",
        &json!({"name": "ghost"}),
    )
    .await;
    assert_eq!(code, 404);

    // dryRun changes nothing.
    let mut dry = add_body("v1", "vol1", "serial-a1", "scsi");
    dry["dryRun"] = json!(["All"]);
    assert_eq!(
        subresource(c, "tenant-a", vmi, "worker", "addvolume", &dry)
            .await
            .0,
        202
    );
    let w = vmis_a.get("worker").await.unwrap();
    assert_eq!(
        w.data["spec"]["volumes"].as_array().unwrap().len(),
        1,
        "dry run must not change the spec"
    );

    // VMI-level add: 202, then Pending → AttachedToNode → MountedToPod → Ready.
    let (code, body) = subresource(
        c,
        "tenant-a",
        vmi,
        "worker",
        "addvolume",
        &add_body("v1", "vol1", "serial-a1", "scsi"),
    )
    .await;
    assert_eq!((code, body.as_str()), (202, ""));
    // The same names in tenant-b are independent.
    assert_eq!(
        subresource(
            c,
            "tenant-b",
            vmi,
            "worker",
            "addvolume",
            &add_body("v1", "vol1", "serial-b1", "virtio")
        )
        .await
        .0,
        202
    );
    let ready = wait_for(&vmis_a, "worker", "v1 Ready", |o| {
        phase_of(o, "v1").as_deref() == Some("Ready")
    })
    .await;
    let st = volume_status(&ready, "v1").unwrap();
    assert_eq!(st["target"], "sda");
    assert!(
        st["hotplugVolume"]["attachPodName"]
            .as_str()
            .unwrap()
            .starts_with("hp-volume-")
    );
    assert_eq!(st["size"], 64 << 20);
    let disk = ready.data["spec"]["domain"]["devices"]["disks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "v1")
        .unwrap()
        .clone();
    assert_eq!(
        (disk["serial"].as_str(), disk["disk"]["bus"].as_str()),
        (Some("serial-a1"), Some("scsi"))
    );
    let vol = ready.data["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "v1")
        .unwrap()
        .clone();
    assert_eq!(vol["dataVolume"]["hotpluggable"], true);
    let b = wait_for(&vmis_b, "worker", "tenant-b v1 Ready", |o| {
        phase_of(o, "v1").as_deref() == Some("Ready")
    })
    .await;
    assert_eq!(volume_status(&b, "v1").unwrap()["target"], "vda");
    let b_disk = b.data["spec"]["domain"]["devices"]["disks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "v1")
        .unwrap()
        .clone();
    assert_eq!(b_disk["serial"], "serial-b1");

    // 409: same name, same source.
    let (code, msg) = subresource(
        c,
        "tenant-a",
        vmi,
        "worker",
        "addvolume",
        &add_body("v1", "vol2", "s", "scsi"),
    )
    .await;
    assert_eq!(code, 409, "{msg}");
    let (code, msg) = subresource(
        c,
        "tenant-a",
        vmi,
        "worker",
        "addvolume",
        &add_body("other", "vol1", "s", "scsi"),
    )
    .await;
    assert_eq!(code, 409, "{msg}");
    // 400: removing a volume that is not hotpluggable.
    assert_eq!(
        subresource(
            c,
            "tenant-a",
            vmi,
            "worker",
            "removevolume",
            &json!({"name": "root"})
        )
        .await
        .0,
        400
    );

    // VMI-level remove: Detaching, then gone (spec entries removed).
    assert_eq!(
        subresource(
            c,
            "tenant-a",
            vmi,
            "worker",
            "removevolume",
            &json!({"name": "v1"})
        )
        .await
        .0,
        202
    );
    let gone = wait_for(&vmis_a, "worker", "v1 gone", |o| {
        volume_status(o, "v1").is_none()
    })
    .await;
    assert!(
        gone.data["spec"]["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|v| v["name"] != "v1")
    );
    // tenant-b untouched.
    assert_eq!(
        phase_of(&vmis_b.get("worker").await.unwrap(), "v1").as_deref(),
        Some("Ready")
    );

    // VMI not running → 409.
    let mut stopped = vmis_a.get("worker").await.unwrap();
    stopped.data["status"]["phase"] = json!("Succeeded");
    if vmis_a
        .replace_status("worker", &PostParams::default(), &stopped)
        .await
        .is_err()
    {
        vmis_a
            .replace("worker", &PostParams::default(), &stopped)
            .await
            .unwrap();
    }
    let (code, msg) = subresource(
        c,
        "tenant-a",
        vmi,
        "worker",
        "addvolume",
        &add_body("v2", "vol2", "s2", "scsi"),
    )
    .await;
    assert_eq!(code, 409, "{msg}");

    // VM-level add on a stopped VM (no VMI) only edits the VM spec.
    let vms_a: Api<DynamicObject> = Api::namespaced_with(c.clone(), "tenant-a", &vm_ar());
    let vm = dynamic(
        json!({"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "metadata": {"name": "vm1"},
        "spec": {"runStrategy": "Halted", "template": {"metadata": {"annotations": {"x": "y"}}, "spec": {
            "domain": {"devices": {"disks": [{"name": "root", "disk": {"bus": "virtio"}}]}, "resources": {"requests": {"memory": "64Mi"}}},
            "volumes": [{"name": "root", "containerDisk": {"image": "example/root"}}]}}}}),
    );
    vms_a.create(&PostParams::default(), &vm).await.unwrap();
    assert_eq!(
        subresource(
            c,
            "tenant-a",
            "virtualmachines",
            "vm1",
            "addvolume",
            &add_body("h1", "vol2", "serial-h1", "scsi")
        )
        .await
        .0,
        202
    );
    let vm = wait_for(&vms_a, "vm1", "h1 in template", |o| {
        o.data["spec"]["template"]["spec"]["volumes"]
            .as_array()
            .is_some_and(|v| v.iter().any(|v| v["name"] == "h1"))
            && o.data["status"]["volumeRequests"]
                .as_array()
                .is_none_or(|r| r.is_empty())
    })
    .await;
    let disks = vm.data["spec"]["template"]["spec"]["domain"]["devices"]["disks"]
        .as_array()
        .unwrap()
        .clone();
    assert!(
        disks
            .iter()
            .any(|d| d["name"] == "h1" && d["serial"] == "serial-h1")
    );
    let (code, msg) = subresource(
        c,
        "tenant-a",
        "virtualmachines",
        "vm1",
        "addvolume",
        &add_body("h1", "vol2", "x", "scsi"),
    )
    .await;
    assert_eq!(code, 409, "{msg}");

    // Start it: the stand-in creates the VMI from the template, hotplugged volume included.
    let mut vm = vms_a.get("vm1").await.unwrap();
    vm.data["spec"]["runStrategy"] = json!("Always");
    vms_a
        .replace("vm1", &PostParams::default(), &vm)
        .await
        .unwrap();
    let vmi1 = wait_for(&vmis_a, "vm1", "h1 Ready on the started VMI", |o| {
        phase_of(o, "h1").as_deref() == Some("Ready")
    })
    .await;
    assert_eq!(
        vmi1.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get("x"))
            .map(String::as_str),
        Some("y")
    );

    // Declarative hotplug: remove the volume from the VM spec directly → detached from the VMI.
    let mut vm = vms_a.get("vm1").await.unwrap();
    let t = &mut vm.data["spec"]["template"]["spec"];
    t["volumes"]
        .as_array_mut()
        .unwrap()
        .retain(|v| v["name"] != "h1");
    t["domain"]["devices"]["disks"]
        .as_array_mut()
        .unwrap()
        .retain(|v| v["name"] != "h1");
    vms_a
        .replace("vm1", &PostParams::default(), &vm)
        .await
        .unwrap();
    wait_for(&vmis_a, "vm1", "h1 detached", |o| {
        volume_status(o, "h1").is_none()
            && o.data["spec"]["volumes"]
                .as_array()
                .unwrap()
                .iter()
                .all(|v| v["name"] != "h1")
    })
    .await;
    // ...and added back declaratively.
    let mut vm = vms_a.get("vm1").await.unwrap();
    let t = &mut vm.data["spec"]["template"]["spec"];
    t["volumes"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "h2", "dataVolume": {"name": "vol2", "hotpluggable": true}}));
    t["domain"]["devices"]["disks"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "h2", "disk": {"bus": "scsi"}, "serial": "serial-h2"}));
    vms_a
        .replace("vm1", &PostParams::default(), &vm)
        .await
        .unwrap();
    wait_for(&vmis_a, "vm1", "h2 Ready", |o| {
        phase_of(o, "h2").as_deref() == Some("Ready")
    })
    .await;

    // VM-level remove: through volumeRequests to the template and the VMI.
    assert_eq!(
        subresource(
            c,
            "tenant-a",
            "virtualmachines",
            "vm1",
            "removevolume",
            &json!({"name": "h2"})
        )
        .await
        .0,
        202
    );
    wait_for(&vmis_a, "vm1", "h2 gone", |o| {
        volume_status(o, "h2").is_none()
    })
    .await;
    let vm = wait_for(&vms_a, "vm1", "h2 out of the template", |o| {
        o.data["spec"]["template"]["spec"]["volumes"]
            .as_array()
            .is_some_and(|v| v.iter().all(|v| v["name"] != "h2"))
    })
    .await;
    assert!(
        vm.data["status"]["volumeRequests"]
            .as_array()
            .is_none_or(|r| r.is_empty())
    );

    // Many concurrent VM-level adds: none is lost (resourceVersion-guarded writes).
    for i in 0..6 {
        blank_dv(c, "tenant-a", &format!("cc{i}"), "8Mi").await;
    }
    let calls = (0..6).map(|i| {
        let c = c.clone();
        async move {
            subresource(
                &c,
                "tenant-a",
                "virtualmachines",
                "vm1",
                "addvolume",
                &add_body(
                    &format!("c{i}"),
                    &format!("cc{i}"),
                    &format!("sc{i}"),
                    "scsi",
                ),
            )
            .await
            .0
        }
    });
    let codes = futures::future::join_all(calls).await;
    assert!(codes.iter().all(|c| *c == 202), "{codes:?}");
    let done = wait_for(&vmis_a, "vm1", "all six Ready", |o| {
        (0..6).all(|i| phase_of(o, &format!("c{i}")).as_deref() == Some("Ready"))
    })
    .await;
    let mut targets: Vec<String> = (0..6)
        .map(|i| {
            volume_status(&done, &format!("c{i}")).unwrap()["target"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    targets.sort();
    targets.dedup();
    assert_eq!(targets.len(), 6, "distinct targets");

    env.standin.stop(std::time::Duration::from_secs(5)).await;
}
