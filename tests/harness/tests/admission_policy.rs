//! The shipped admission policy (`deploy/infra/admission-policy.yaml`) on a real
//! kube-apiserver with the upstream KubeVirt, CDI and snapshot CRDs: `deploy/infra` is
//! rendered with the pinned kubectl as the overlays render it and applied, and requests are
//! sent with a token of the controller's ServiceAccount. The controller is also granted a
//! Role wider than the shipped one here, so every refusal below is the policy's (its message
//! names it), not RBAC's: the policy must hold even where RBAC is too generous. The same
//! requests by a cluster admin are admitted: the policy binds the controller only. Last,
//! the controller's declarative hotplug runs through KubeVirt's own virt-api webhooks with
//! the policy in force.

use std::collections::BTreeMap;
use std::process::Command;

use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::authorization::v1::SubjectAccessReview;
use k8s_openapi::api::core::v1::{Namespace, PersistentVolumeClaim, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::{Value, json};

use kubevirt_csi_harness::cluster::ControlPlane;
use kubevirt_csi_harness::crds;
use kubevirt_csi_harness::csi::{
    admission_policy_name, apply_rendered, controller_token, render_infra,
};
use kubevirt_csi_harness::fixtures::{self, data_volume_resource, vm_resource, vmi_resource};
use kubevirt_csi_harness::kubevirt::{GateProfile, KubeVirt, KubeVirtOptions};
use kubevirt_csi_harness::tools::{Tools, repo_root};

const NS: &str = "tenant-a";
const SA: &str = "kubevirt-csi-controller";

fn snapshot_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("snapshot.storage.k8s.io", "v1", "VolumeSnapshot"),
        "volumesnapshots",
    )
}

fn user(ns: &str) -> String {
    format!("system:serviceaccount:{ns}:{SA}")
}

struct Env {
    _cp: ControlPlane,
    admin: kube::Client,
    /// The controller's ServiceAccount token, bound by the shipped Role and a wider one.
    controller: kube::Client,
}

impl Env {
    fn dvs(&self, admin: bool, ns: &str) -> Api<DynamicObject> {
        Api::namespaced_with(self.pick(admin), ns, &data_volume_resource())
    }
    fn pvcs(&self, admin: bool) -> Api<PersistentVolumeClaim> {
        Api::namespaced(self.pick(admin), NS)
    }
    fn snapshots(&self, admin: bool) -> Api<DynamicObject> {
        Api::namespaced_with(self.pick(admin), NS, &snapshot_resource())
    }
    fn vms(&self, admin: bool) -> Api<DynamicObject> {
        Api::namespaced_with(self.pick(admin), NS, &vm_resource())
    }
    fn vmis(&self, admin: bool) -> Api<DynamicObject> {
        Api::namespaced_with(self.pick(admin), NS, &vmi_resource())
    }
    fn pick(&self, admin: bool) -> kube::Client {
        if admin {
            self.admin.clone()
        } else {
            self.controller.clone()
        }
    }
}

/// A control plane with the CRDs and tenant `tenant-a` (labels `cluster=a`), whose
/// `deploy/infra` the fixture renders, applies and waits to be enforced.
async fn env() -> Env {
    let cp = ControlPlane::start(Default::default())
        .await
        .expect("control plane");
    let admin = cp.client().await.unwrap();
    crds::install(&admin).await.expect("crds");
    let tenant = fixtures::tenant(&cp, NS, &[("cluster", "a")], None)
        .await
        .expect("tenant with the admission policy in force");
    grant_wide_role(&admin, NS, NS).await;
    let controller = cp
        .client_from_kubeconfig(&user(NS), &tenant.controller_kubeconfig)
        .await
        .unwrap();
    Env {
        _cp: cp,
        admin,
        controller,
    }
}

/// More than deploy/infra/role.yaml grants: every write on the objects the policy guards,
/// to the ServiceAccount of `sa_ns`, in `ns`. Waits until the authorizer sees the grant.
async fn grant_wide_role(admin: &kube::Client, sa_ns: &str, ns: &str) {
    let pp = PatchParams::apply("admission-test").force();
    let role: Role = serde_json::from_value(json!({
        "metadata": {"name": "too-wide", "namespace": ns},
        "rules": [
            {"apiGroups": ["cdi.kubevirt.io"], "resources": ["datavolumes"], "verbs": ["*"]},
            {"apiGroups": [""], "resources": ["persistentvolumeclaims", "persistentvolumeclaims/status"], "verbs": ["*"]},
            {"apiGroups": ["snapshot.storage.k8s.io"], "resources": ["volumesnapshots"], "verbs": ["*"]},
            {"apiGroups": ["kubevirt.io"], "resources": ["virtualmachines", "virtualmachineinstances"], "verbs": ["*"]}
        ]
    }))
    .unwrap();
    Api::<Role>::namespaced(admin.clone(), ns)
        .patch("too-wide", &pp, &Patch::Apply(&role))
        .await
        .unwrap();
    let binding: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "too-wide", "namespace": ns},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "too-wide"},
        "subjects": [{"kind": "ServiceAccount", "name": SA, "namespace": sa_ns}]
    }))
    .unwrap();
    Api::<RoleBinding>::namespaced(admin.clone(), ns)
        .patch("too-wide", &pp, &Patch::Apply(&binding))
        .await
        .unwrap();
    // The authorizer reads RBAC from informers: ask it (as the requests below will) until
    // the grant is visible, so no refusal below can be RBAC's.
    let review: SubjectAccessReview = serde_json::from_value(json!({
        "spec": {"user": user(sa_ns), "groups": ["system:serviceaccounts"],
                 "resourceAttributes": {"namespace": ns, "verb": "create", "group": "kubevirt.io", "resource": "virtualmachines"}}
    }))
    .unwrap();
    let reviews: Api<SubjectAccessReview> = Api::all(admin.clone());
    for _ in 0..200 {
        let r = reviews
            .create(&PostParams::default(), &review)
            .await
            .unwrap();
        if r.status.is_some_and(|s| s.allowed) {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!(
        "the wide Role for {} in {ns} never took effect",
        user(sa_ns)
    );
}

/// Refused by this tenant's policy: the message names the policy and contains `why`.
#[track_caller]
fn refused<T: std::fmt::Debug>(what: &str, r: Result<T, kube::Error>, why: &str) {
    let policy = admission_policy_name(NS);
    match r {
        Err(kube::Error::Api(s))
            if s.message
                .contains(&format!("ValidatingAdmissionPolicy '{policy}'")) =>
        {
            assert!(
                s.message.contains(why),
                "{what}: refused by the policy, but not because {why:?}: {}",
                s.message
            );
        }
        other => panic!("{what}: expected a refusal by {policy}, got {other:?}"),
    }
}

#[track_caller]
fn admitted<T: std::fmt::Debug>(what: &str, r: Result<T, kube::Error>) -> T {
    r.unwrap_or_else(|e| panic!("{what}: expected it to be admitted, got {e}"))
}

fn labels(value: Option<&str>) -> BTreeMap<String, String> {
    value
        .map(|v| BTreeMap::from([("cluster".to_string(), v.to_string())]))
        .unwrap_or_default()
}

/// A DataVolume shaped like the controller's: prefix, CSI name annotation, blank source.
fn dv(name: &str, tenant: Option<&str>) -> DynamicObject {
    dv_from(name, tenant, json!({"blank": {}}))
}

fn dv_from(name: &str, tenant: Option<&str>, source: Value) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
        "metadata": {"name": name, "labels": labels(tenant),
                     "annotations": {"csi.kubevirt.io/csi-name": format!("pvc-{name}")}},
        "spec": {"source": source, "storage": {"resources": {"requests": {"storage": "1Gi"}}}}
    }))
    .unwrap()
}

fn pvc(name: &str, tenant: Option<&str>) -> PersistentVolumeClaim {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels(tenant)},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}
    }))
    .unwrap()
}

fn snapshot(name: &str, tenant: Option<&str>, claim: &str) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot",
        "metadata": {"name": name, "labels": labels(tenant),
                     "annotations": {"csi.kubevirt.io/csi-name": format!("snap-{name}")}},
        "spec": {"source": {"persistentVolumeClaimName": claim}}
    }))
    .unwrap()
}

fn json_patch(ops: Value) -> Patch<()> {
    Patch::Json(serde_json::from_value(ops).expect("a JSON patch"))
}

fn merge(v: Value) -> Patch<Value> {
    Patch::Merge(v)
}

#[tokio::test]
async fn storage_writes_only_on_the_tenants_driver_objects() {
    let env = env().await;
    let pp = PostParams::default();
    let dp = DeleteParams::default();

    // Create: what the controller makes is admitted; anything without this tenant's labels,
    // the driver's marker or an allowed source is not.
    admitted(
        "a labelled DataVolume",
        env.dvs(false, NS)
            .create(&pp, &dv("kvcsi-ours", Some("a")))
            .await,
    );
    refused(
        "an unlabelled DataVolume",
        env.dvs(false, NS)
            .create(&pp, &dv("kvcsi-bare", None))
            .await,
        "must carry the tenant labels cluster=a",
    );
    refused(
        "another tenant's DataVolume",
        env.dvs(false, NS)
            .create(&pp, &dv("kvcsi-theirs", Some("b")))
            .await,
        "must carry the tenant labels cluster=a",
    );
    refused(
        "a DataVolume without the prefix",
        env.dvs(false, NS)
            .create(&pp, &dv("root-disk", Some("a")))
            .await,
        "must be named with the prefix kvcsi-",
    );
    refused(
        "an import from a URL",
        env.dvs(false, NS)
            .create(
                &pp,
                &dv_from(
                    "kvcsi-import",
                    Some("a"),
                    json!({"http": {"url": "http://10.0.0.1/x"}}),
                ),
            )
            .await,
        "source must be blank",
    );
    refused(
        "a clone from another namespace",
        env.dvs(false, NS)
            .create(
                &pp,
                &dv_from(
                    "kvcsi-clone",
                    Some("a"),
                    json!({"pvc": {"namespace": "tenant-b", "name": "kvcsi-x"}}),
                ),
            )
            .await,
        "source must be blank",
    );
    admitted(
        "a clone of one of ours",
        env.dvs(false, NS)
            .create(
                &pp,
                &dv_from(
                    "kvcsi-clone",
                    Some("a"),
                    json!({"pvc": {"namespace": NS, "name": "kvcsi-ours"}}),
                ),
            )
            .await,
    );
    admitted(
        "a labelled snapshot of one of ours",
        env.snapshots(false)
            .create(&pp, &snapshot("kvcsi-snap", Some("a"), "kvcsi-ours"))
            .await,
    );
    refused(
        "a snapshot of a foreign claim",
        env.snapshots(false)
            .create(&pp, &snapshot("kvcsi-snap2", Some("a"), "root-disk"))
            .await,
        "source must be one of this tenant's volumes",
    );
    refused(
        "an unlabelled snapshot",
        env.snapshots(false)
            .create(&pp, &snapshot("kvcsi-snap3", None, "kvcsi-ours"))
            .await,
        "must carry the tenant labels",
    );

    // Objects the controller did not make: unlabelled ones, and a tenant-labelled one
    // without the driver's marker (a worker's root disk stamped with the operator's labels).
    for (name, tenant) in [("kvcsi-foreign", None), ("root-disk", Some("a"))] {
        env.dvs(true, NS)
            .create(&pp, &dv(name, tenant))
            .await
            .unwrap();
        env.pvcs(true)
            .create(&pp, &pvc(name, tenant))
            .await
            .unwrap();
        env.snapshots(true)
            .create(&pp, &snapshot(name, tenant, name))
            .await
            .unwrap();
    }
    // Prefix and labels, but no CSI name annotation: not made by the driver either.
    let mut unmarked: DynamicObject = dv("kvcsi-unmarked", Some("a"));
    unmarked.metadata.annotations = None;
    env.dvs(true, NS).create(&pp, &unmarked).await.unwrap();
    for name in ["kvcsi-foreign", "root-disk", "kvcsi-unmarked"] {
        refused(
            &format!("deleting DataVolume {name}"),
            env.dvs(false, NS).delete(name, &dp).await,
            "is not one the driver created for this tenant",
        );
        refused(
            &format!("patching DataVolume {name}"),
            env.dvs(false, NS)
                .patch(
                    name,
                    &PatchParams::default(),
                    &merge(
                        json!({"metadata": {"annotations": {"csi.kubevirt.io/attached-to": "vm"}}}),
                    ),
                )
                .await,
            "is not one the driver created for this tenant",
        );
    }
    for name in ["kvcsi-foreign", "root-disk"] {
        refused(
            &format!("deleting claim {name}"),
            env.pvcs(false).delete(name, &dp).await,
            "is not one the driver created for this tenant",
        );
        refused(
            &format!("deleting snapshot {name}"),
            env.snapshots(false).delete(name, &dp).await,
            "is not one the driver created for this tenant",
        );
    }

    // Claims: CDI makes them; the controller only patches its own.
    env.pvcs(true)
        .create(&pp, &pvc("kvcsi-ours", Some("a")))
        .await
        .unwrap();
    admitted(
        "a metadata-only patch of our claim",
        env.pvcs(false)
            .patch(
                "kvcsi-ours",
                &PatchParams::default(),
                &merge(json!({"metadata": {"annotations": {"note": "x"}}})),
            )
            .await,
    );
    refused(
        "dropping our claim's tenant label",
        env.pvcs(false)
            .patch(
                "kvcsi-ours",
                &PatchParams::default(),
                &merge(json!({"metadata": {"labels": {"cluster": null}}})),
            )
            .await,
        "must carry the tenant labels",
    );
    refused(
        "writing our claim's status",
        env.pvcs(false)
            .patch_status(
                "kvcsi-ours",
                &PatchParams::default(),
                &merge(json!({"status": {"capacity": {"storage": "100Gi"}}})),
            )
            .await,
        "may not write persistentvolumeclaims/status",
    );
    refused(
        "moving our claim to another tenant",
        env.pvcs(false)
            .patch(
                "kvcsi-ours",
                &PatchParams::default(),
                &merge(json!({"metadata": {"labels": {"cluster": "b"}}})),
            )
            .await,
        "must carry the tenant labels",
    );
    refused(
        "creating a claim",
        env.pvcs(false)
            .create(&pp, &pvc("kvcsi-new", Some("a")))
            .await,
        "neither creates nor deletes claims",
    );
    refused(
        "deleting our claim",
        env.pvcs(false).delete("kvcsi-ours", &dp).await,
        "neither creates nor deletes claims",
    );
    refused(
        "changing a DataVolume's spec",
        env.dvs(false, NS)
            .patch(
                "kvcsi-ours",
                &PatchParams::default(),
                &merge(json!({"spec": {"storage": {"storageClassName": "slow"}}})),
            )
            .await,
        "may not change the spec",
    );
    admitted(
        "annotating our DataVolume (the attachment record)",
        env.dvs(false, NS)
            .patch(
                "kvcsi-ours",
                &PatchParams::default(),
                &merge(json!({"metadata": {"annotations": {"csi.kubevirt.io/attached-to": "vm"}}})),
            )
            .await,
    );
    admitted(
        "deleting our snapshot",
        env.snapshots(false).delete("kvcsi-snap", &dp).await,
    );
    admitted(
        "deleting our DataVolume",
        env.dvs(false, NS).delete("kvcsi-ours", &dp).await,
    );

    // Another namespace, even where RBAC lets the controller in.
    let other: Namespace = serde_json::from_value(json!({"metadata": {"name": "other"}})).unwrap();
    Api::<Namespace>::all(env.admin.clone())
        .create(&pp, &other)
        .await
        .unwrap();
    grant_wide_role(&env.admin, NS, "other").await;
    refused(
        "a labelled DataVolume in another namespace",
        env.dvs(false, "other")
            .create(&pp, &dv("kvcsi-elsewhere", Some("a")))
            .await,
        "only in its own tenant's infra namespace",
    );

    // The cluster admin is not bound by the policy.
    admitted(
        "admin: an unlabelled DataVolume",
        env.dvs(true, NS).create(&pp, &dv("kvcsi-bare", None)).await,
    );
    admitted(
        "admin: another tenant's DataVolume",
        env.dvs(true, NS)
            .create(&pp, &dv("kvcsi-theirs", Some("b")))
            .await,
    );
    admitted(
        "admin: a DataVolume in another namespace",
        env.dvs(true, "other")
            .create(&pp, &dv("kvcsi-elsewhere", Some("a")))
            .await,
    );
    admitted(
        "admin: dropping a claim's tenant label",
        env.pvcs(true)
            .patch(
                "kvcsi-ours",
                &PatchParams::default(),
                &merge(json!({"metadata": {"labels": {"cluster": null}}})),
            )
            .await,
    );
    for name in ["kvcsi-foreign", "root-disk"] {
        admitted(
            &format!("admin: deleting DataVolume {name}"),
            env.dvs(true, NS).delete(name, &dp).await,
        );
        admitted(
            &format!("admin: deleting claim {name}"),
            env.pvcs(true).delete(name, &dp).await,
        );
        admitted(
            &format!("admin: deleting snapshot {name}"),
            env.snapshots(true).delete(name, &dp).await,
        );
    }
}

/// A worker VM as KubeVirt users write them: a container-disk root volume and its disk.
fn worker(name: &str, tenant: &str) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
        "metadata": {"name": name, "labels": labels(Some(tenant))},
        "spec": {"runStrategy": "Always", "template": {
            "metadata": {"labels": labels(Some(tenant))},
            "spec": {
                "domain": {"devices": {"disks": [{"name": "root", "disk": {"bus": "virtio"}}]},
                           "resources": {"requests": {"memory": "1Gi"}}},
                "volumes": [{"name": "root", "containerDisk": {"image": "quay.io/containerdisks/fedora:41"}}]
            }}}
    }))
    .unwrap()
}

const VOLUMES: &str = "/spec/template/spec/volumes";
const DISKS: &str = "/spec/template/spec/domain/devices/disks";

/// The controller's declarative hotplug patch (controller/src/attach.rs), for `name`.
fn hotplug_ops(name: &str, source: Value, disk: Value) -> Value {
    json!([
        {"op": "add", "path": format!("{VOLUMES}/-"), "value": {"name": name, "dataVolume": source}},
        {"op": "add", "path": format!("{DISKS}/-"), "value": disk}
    ])
}

fn hot_disk(name: &str) -> Value {
    json!({"name": name, "disk": {"bus": "scsi"}, "serial": "serial0001"})
}

#[tokio::test]
async fn vm_changes_only_by_hotpluggable_volumes() {
    let env = env().await;
    let pp = PostParams::default();
    let patch = |name: &str, ops: Value| {
        let vms = env.vms(false);
        let name = name.to_string();
        async move {
            vms.patch(&name, &PatchParams::default(), &json_patch(ops))
                .await
        }
    };
    env.vms(true)
        .create(&pp, &worker("worker", "a"))
        .await
        .unwrap();
    env.vms(true)
        .create(&pp, &worker("theirs", "b"))
        .await
        .unwrap();

    // The controller's own hotplug and unplug.
    admitted(
        "adding a hotpluggable volume and its disk",
        patch(
            "worker",
            hotplug_ops(
                "kvcsi-vol",
                json!({"name": "kvcsi-vol", "hotpluggable": true}),
                hot_disk("kvcsi-vol"),
            ),
        )
        .await,
    );
    admitted(
        "removing it again",
        patch(
            "worker",
            json!([
                {"op": "test", "path": format!("{VOLUMES}/1/name"), "value": "kvcsi-vol"},
                {"op": "remove", "path": format!("{VOLUMES}/1")},
                {"op": "remove", "path": format!("{DISKS}/1")}
            ]),
        )
        .await,
    );
    admitted(
        "adding it once more (kept for the refusals below)",
        patch(
            "worker",
            hotplug_ops(
                "kvcsi-vol",
                json!({"name": "kvcsi-vol", "hotpluggable": true}),
                hot_disk("kvcsi-vol"),
            ),
        )
        .await,
    );

    let forged: Vec<(&str, Value, &str)> = vec![
        (
            "adding a volume that is not hotpluggable",
            hotplug_ops(
                "kvcsi-cold",
                json!({"name": "kvcsi-cold"}),
                hot_disk("kvcsi-cold"),
            ),
            "not hotpluggable",
        ),
        (
            "removing the root volume and disk",
            json!([
                {"op": "remove", "path": format!("{VOLUMES}/0")},
                {"op": "remove", "path": format!("{DISKS}/0")}
            ]),
            "not hotpluggable",
        ),
        (
            "making the root volume hotpluggable",
            json!([{"op": "replace", "path": format!("{VOLUMES}/0"),
                    "value": {"name": "root", "dataVolume": {"name": "root", "hotpluggable": true}}}]),
            "not hotpluggable",
        ),
        (
            "changing the run strategy",
            json!([{"op": "replace", "path": "/spec/runStrategy", "value": "Halted"}]),
            "another part of the spec differs",
        ),
        (
            "changing the container disk image",
            json!([{"op": "replace", "path": format!("{VOLUMES}/0/containerDisk/image"),
                    "value": "registry.example/evil:latest"}]),
            "not hotpluggable",
        ),
        (
            "changing the root disk's bus",
            json!([{"op": "replace", "path": format!("{DISKS}/0/disk/bus"), "value": "sata"}]),
            "only the disks of hotpluggable volumes",
        ),
        (
            "changing the memory",
            json!([{"op": "replace", "path": "/spec/template/spec/domain/resources/requests/memory",
                    "value": "64Gi"}]),
            "another part of the spec differs",
        ),
        (
            "adding a node selector",
            json!([{"op": "add", "path": "/spec/template/spec/nodeSelector", "value": {"x": "y"}}]),
            "another part of the spec differs",
        ),
        (
            "changing the template's labels",
            json!([{"op": "add", "path": "/spec/template/metadata/labels/extra", "value": "x"}]),
            "another part of the spec differs",
        ),
        (
            "adding a label",
            json!([{"op": "add", "path": "/metadata/labels/extra", "value": "x"}]),
            "labels, annotations, finalizers or owners",
        ),
        (
            "dropping the tenant label",
            json!([{"op": "remove", "path": "/metadata/labels/cluster"}]),
            "labels, annotations, finalizers or owners",
        ),
        (
            "hotplugging a volume without the prefix",
            hotplug_ops(
                "root-copy",
                json!({"name": "root-copy", "hotpluggable": true}),
                hot_disk("root-copy"),
            ),
            "one of the tenant volumes",
        ),
        (
            "hotplugging a claim under another volume's name",
            hotplug_ops(
                "kvcsi-alias",
                json!({"name": "kvcsi-other", "hotpluggable": true}),
                hot_disk("kvcsi-alias"),
            ),
            "one of the tenant volumes",
        ),
        (
            "hotplugging a disk that boots first",
            hotplug_ops(
                "kvcsi-boot",
                json!({"name": "kvcsi-boot", "hotpluggable": true}),
                json!({"name": "kvcsi-boot", "disk": {"bus": "scsi"}, "bootOrder": 1}),
            ),
            "no boot order",
        ),
        (
            "adding a disk without a volume",
            json!([{"op": "add", "path": format!("{DISKS}/-"), "value": hot_disk("kvcsi-lonely")}]),
            "only the disks of hotpluggable volumes",
        ),
    ];
    for (what, ops, why) in &forged {
        refused(what, patch("worker", ops.clone()).await, why);
    }
    refused(
        "hotplugging into another tenant's VM",
        patch(
            "theirs",
            hotplug_ops(
                "kvcsi-vol",
                json!({"name": "kvcsi-vol", "hotpluggable": true}),
                hot_disk("kvcsi-vol"),
            ),
        )
        .await,
        "is not a worker of this tenant",
    );
    refused(
        "creating a VM",
        env.vms(false).create(&pp, &worker("new", "a")).await,
        "may not create virtualmachines",
    );
    refused(
        "deleting a VM",
        env.vms(false)
            .delete("worker", &DeleteParams::default())
            .await,
        "may not delete virtualmachines",
    );
    let vmi: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
        "metadata": {"name": "worker", "labels": labels(Some("a"))},
        "spec": {"domain": {"devices": {}, "resources": {"requests": {"memory": "1Gi"}}}}
    }))
    .unwrap();
    refused(
        "creating a VMI",
        env.vmis(false).create(&pp, &vmi).await,
        "may not create virtualmachineinstances",
    );

    // A worker at KubeVirt's own limit (the VM CRD allows 256 volumes and 256 disks): the
    // root volume, 254 hotplugged ones, and the controller adds the 256th. The policy's list
    // comparisons stay inside CEL's cost budget there, so its answers are the rules' and
    // never a cost error (which would refuse the controller's own hotplug).
    let mut big = worker("big", "a");
    for i in 0..254 {
        let name = format!("kvcsi-h{i:03}");
        big.data["spec"]["template"]["spec"]["volumes"]
            .as_array_mut()
            .unwrap()
            .push(json!({"name": name, "dataVolume": {"name": name, "hotpluggable": true}}));
        big.data["spec"]["template"]["spec"]["domain"]["devices"]["disks"]
            .as_array_mut()
            .unwrap()
            .push(hot_disk(&name));
    }
    env.vms(true).create(&pp, &big).await.unwrap();
    admitted(
        "hotplugging the 256th volume",
        patch(
            "big",
            hotplug_ops(
                "kvcsi-h254",
                json!({"name": "kvcsi-h254", "hotpluggable": true}),
                hot_disk("kvcsi-h254"),
            ),
        )
        .await,
    );
    admitted(
        "unplugging one in the middle",
        patch(
            "big",
            json!([
                {"op": "test", "path": format!("{VOLUMES}/129/name"), "value": "kvcsi-h128"},
                {"op": "remove", "path": format!("{VOLUMES}/129")},
                {"op": "remove", "path": format!("{DISKS}/129")}
            ]),
        )
        .await,
    );
    refused(
        "changing the run strategy of the big worker",
        patch(
            "big",
            json!([{"op": "replace", "path": "/spec/runStrategy", "value": "Halted"}]),
        )
        .await,
        "another part of the spec differs",
    );
    refused(
        "swapping two hotplugged volumes' claims on the big worker",
        patch(
            "big",
            json!([
                {"op": "replace", "path": format!("{VOLUMES}/1/dataVolume/name"), "value": "kvcsi-h001"},
                {"op": "replace", "path": format!("{VOLUMES}/2/dataVolume/name"), "value": "kvcsi-h000"}
            ]),
        )
        .await,
        "one of the tenant volumes",
    );

    // The cluster admin may do all of it (the policy binds the controller only): each
    // patch on a fresh copy of the worker in the state the controller's patches met.
    let vms = env.vms(true);
    let params = PatchParams::default();
    for (i, (what, ops, _)) in forged.iter().enumerate() {
        let name = format!("copy-{i}");
        vms.create(&pp, &worker(&name, "a")).await.unwrap();
        let hot = hotplug_ops(
            "kvcsi-vol",
            json!({"name": "kvcsi-vol", "hotpluggable": true}),
            hot_disk("kvcsi-vol"),
        );
        vms.patch(&name, &params, &json_patch(hot)).await.unwrap();
        admitted(
            &format!("admin: {what}"),
            vms.patch(&name, &params, &json_patch(ops.clone())).await,
        );
    }
    admitted(
        "admin: hotplugging into another tenant's VM",
        vms.patch(
            "theirs",
            &params,
            &json_patch(hotplug_ops(
                "kvcsi-vol",
                json!({"name": "kvcsi-vol", "hotpluggable": true}),
                hot_disk("kvcsi-vol"),
            )),
        )
        .await,
    );
    admitted(
        "admin: creating a VM",
        vms.create(&pp, &worker("new", "a")).await,
    );
    admitted(
        "admin: deleting a VM",
        vms.delete("worker", &DeleteParams::default()).await,
    );
    admitted(
        "admin: creating a VMI",
        env.vmis(true).create(&pp, &vmi).await,
    );
}

fn render_overlay(kubectl: &std::path::Path, dir: &str) -> Vec<Value> {
    let out = Command::new(kubectl)
        .arg("kustomize")
        .arg(repo_root().join(dir))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kubectl kustomize {dir}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_yaml::Deserializer::from_str(&String::from_utf8(out.stdout).unwrap())
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .filter(|v: &Value| !v.is_null())
        .collect()
}

/// The shipped infra overlays, rendered by the pinned kubectl: each names its policy and
/// binding after its namespace and gives the ServiceAccount the tenant label its controller
/// runs with. The tenant overlay is then applied as is: its policy holds the token of its
/// ServiceAccount.
#[tokio::test]
async fn the_infra_overlays_ship_an_enforced_policy() {
    let kubectl = Tools::locate().unwrap_or_else(|e| panic!("{e}")).kubectl;
    for (dir, ns) in [
        ("deploy/overlays/split/infra", "clusters-example"),
        ("deploy/overlays/tenant/infra", "tenant-example"),
    ] {
        let objects = render_overlay(&kubectl, dir);
        let policy = admission_policy_name(ns);
        let find = |kind: &str| {
            objects
                .iter()
                .find(|o| o["kind"] == kind)
                .unwrap_or_else(|| panic!("{dir} renders no {kind}"))
        };
        assert_eq!(
            find("ValidatingAdmissionPolicy")["metadata"]["name"],
            policy,
            "{dir}"
        );
        let binding = find("ValidatingAdmissionPolicyBinding");
        assert_eq!(binding["metadata"]["name"], policy, "{dir}");
        assert_eq!(binding["spec"]["policyName"], policy, "{dir}");
        assert_eq!(binding["spec"]["paramRef"]["namespace"], ns, "{dir}");
        assert_eq!(
            binding["spec"]["validationActions"],
            json!(["Deny"]),
            "{dir}"
        );
        assert_eq!(
            find("ValidatingAdmissionPolicy")["spec"]["failurePolicy"],
            "Fail",
            "{dir}"
        );
        assert_eq!(
            find("ServiceAccount")["metadata"]["annotations"]["csi.kubevirt.io/tenant-labels"],
            "csi.kubevirt.io/tenant=example",
            "{dir}"
        );
    }
    // Split: the label the policy holds the controller to is the one it is started with.
    let split = render_overlay(&kubectl, "deploy/overlays/split/infra");
    let tenant_cm = split
        .iter()
        .find(|o| {
            o["kind"] == "ConfigMap"
                && o["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with("kubevirt-csi-tenant"))
        })
        .expect("the tenant ConfigMap");
    let sa = split
        .iter()
        .find(|o| o["kind"] == "ServiceAccount")
        .unwrap();
    assert_eq!(
        sa["metadata"]["annotations"]["csi.kubevirt.io/tenant-labels"],
        tenant_cm["data"]["tenantLabel"]
    );

    let cp = ControlPlane::start(Default::default())
        .await
        .expect("control plane");
    let admin = cp.client().await.unwrap();
    crds::install(&admin).await.expect("crds");
    let objects = render_overlay(&kubectl, "deploy/overlays/tenant/infra");
    let ns = "tenant-example";
    let policy = admission_policy_name(ns);
    let namespace: Namespace = serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap();
    Api::<Namespace>::all(admin.clone())
        .create(&PostParams::default(), &namespace)
        .await
        .unwrap();
    // `kubectl apply -k`, exactly as deploy/README.md tells the infra admin (client-side
    // apply; kustomize's namespace on the cluster-scoped policy objects is dropped).
    let applied = Command::new(&kubectl)
        .arg("apply")
        .arg("-k")
        .arg(repo_root().join("deploy/overlays/tenant/infra"))
        .arg("--kubeconfig")
        .arg(cp.kubeconfig_path())
        .output()
        .unwrap();
    assert!(
        applied.status.success(),
        "kubectl apply -k deploy/overlays/tenant/infra: {}",
        String::from_utf8_lossy(&applied.stderr)
    );
    // Re-applying through the harness is a no-op for these objects; it proves the harness
    // and kubectl agree on what the overlay means.
    apply_rendered(&admin, &objects, "admission-test")
        .await
        .expect("harness apply");

    // A token of the overlay's ServiceAccount (the harness's controller_token would
    // re-apply deploy/infra's ServiceAccount without the overlay's annotation).
    let request: TokenRequest = serde_json::from_value(json!({
        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
        "spec": {"audiences": [], "expirationSeconds": 3600}
    }))
    .unwrap();
    let token = Api::<ServiceAccount>::namespaced(admin.clone(), ns)
        .create_token_request(SA, &PostParams::default(), &request)
        .await
        .expect("token")
        .status
        .expect("token status")
        .token;
    let controller = cp
        .client_from_kubeconfig(&user(ns), &cp.kubeconfig_with_token(&user(ns), &token))
        .await
        .unwrap();
    let dvs: Api<DynamicObject> = Api::namespaced_with(controller, ns, &data_volume_resource());
    let labelled = |value: &str| -> DynamicObject {
        serde_json::from_value(json!({
            "apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
            "metadata": {"name": format!("kvcsi-{}", value.len()),
                         "labels": {"csi.kubevirt.io/tenant": value},
                         "annotations": {"csi.kubevirt.io/csi-name": "pvc-1"}},
            "spec": {"source": {"blank": {}}, "storage": {"resources": {"requests": {"storage": "1Gi"}}}}
        }))
        .unwrap()
    };
    // Until the policy is in force, nothing below would mean anything: wait for the first
    // refusal by it (see enforce_admission_policy for why there is such a window).
    let mut last = String::new();
    let mut enforced = false;
    for _ in 0..300 {
        match dvs
            .create(
                &PostParams {
                    dry_run: true,
                    ..Default::default()
                },
                &labelled("other"),
            )
            .await
        {
            Err(kube::Error::Api(s))
                if s.message.contains(&policy) && s.message.contains("tenant labels") =>
            {
                enforced = true;
                break;
            }
            r => last = format!("{r:?}"),
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(enforced, "{policy} never refused a foreign label: {last}");
    refused_by(
        &policy,
        dvs.create(&PostParams::default(), &labelled("other")).await,
    );
    dvs.create(&PostParams::default(), &labelled("example"))
        .await
        .expect("a DataVolume with the overlay's tenant label is admitted");

    // Without the tenant labels on its ServiceAccount (an overlay that forgot them, or an
    // admin who removed them) the controller may write nothing: the policy fails closed.
    Api::<ServiceAccount>::namespaced(admin.clone(), ns)
        .patch(
            SA,
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"annotations": {"csi.kubevirt.io/tenant-labels": null}}}),
            ),
        )
        .await
        .unwrap();
    // The parameter reaches admission through an informer: probe with dry runs until the
    // change is seen, then check a real delete.
    let name = labelled("example").metadata.name.unwrap();
    let dry_run = DeleteParams {
        dry_run: true,
        ..Default::default()
    };
    let no_labels = |r: &Result<_, kube::Error>| {
        matches!(r, Err(kube::Error::Api(s))
            if s.message.contains(&policy) && s.message.contains("must list the tenant labels"))
    };
    let mut closed = false;
    for _ in 0..300 {
        let r = dvs.delete(&name, &dry_run).await;
        if no_labels(&r) {
            closed = true;
            break;
        }
        last = format!("{r:?}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(closed, "{policy} did not fail closed: {last}");
    let r = dvs.delete(&name, &DeleteParams::default()).await;
    assert!(
        no_labels(&r),
        "deleting with no tenant labels configured: {r:?}"
    );
}

#[track_caller]
fn refused_by<T: std::fmt::Debug>(policy: &str, r: Result<T, kube::Error>) {
    match r {
        Err(kube::Error::Api(s))
            if s.message
                .contains(&format!("ValidatingAdmissionPolicy '{policy}'")) => {}
        other => panic!("expected a refusal by {policy}, got {other:?}"),
    }
}

/// Waits (on a watch) until the VMI `name` satisfies `cond`; panics with its last state.
async fn wait_vmi(client: &kube::Client, name: &str, what: &str, cond: fn(&Value) -> bool) {
    let vmis: Api<DynamicObject> = Api::namespaced_with(client.clone(), NS, &vmi_resource());
    let fut = kube::runtime::wait::await_condition(
        vmis.clone(),
        name,
        move |o: Option<&DynamicObject>| o.is_some_and(|o| cond(&o.data)),
    );
    if !matches!(
        tokio::time::timeout(std::time::Duration::from_secs(60), fut).await,
        Ok(Ok(_))
    ) {
        let last = vmis.get_opt(name).await.ok().flatten().map(|o| o.data);
        panic!("vmi {name} never got {what}: {last:#?}");
    }
}

fn hotplug_phase(vmi: &Value) -> Option<&str> {
    vmi["status"]["volumeStatus"]
        .as_array()?
        .iter()
        .find(|s| s["name"] == "kvcsi-data-1")
        .and_then(|s| s["phase"].as_str())
}

/// The controller's declarative hotplug on KubeVirt's own virt-api and virt-controller
/// (`DeclarativeHotplugVolumes`): virt-api's mutating and validating webhooks run before the
/// policy, so a webhook that rewrote anything else in the VM on the controller's patch would
/// make the policy refuse it. The controller's token (shipped Role only) hotplugs a claim
/// into a running worker, the volume becomes Ready, and unplugs it again; a forged change
/// in the same way is still refused.
#[tokio::test]
async fn declarative_hotplug_passes_kubevirts_webhooks_and_the_policy() {
    let cp = ControlPlane::start(Default::default())
        .await
        .expect("control plane");
    let admin = cp.client().await.unwrap();
    // No CDI CRDs here: with DataVolumes served but no CDI, virt-controller waits for CDI's
    // other kinds and never starts a VM. So not fixtures::tenant (its enforcement probe
    // is a DataVolume); the same rendered deploy/infra, probed with a VM patch below.
    let _kv = KubeVirt::start(
        &cp,
        KubeVirtOptions {
            profile: GateProfile::DeclarativeOnly,
            ..Default::default()
        },
    )
    .await
    .unwrap_or_else(|e| panic!("kubevirt starts: {e}"));
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": NS}})).unwrap();
    Api::<Namespace>::all(admin.clone())
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();
    let token = controller_token(&admin, NS).await.expect("token");
    let kubectl = Tools::locate().unwrap_or_else(|e| panic!("{e}")).kubectl;
    let rendered = render_infra(&kubectl, NS, &["cluster=a".to_string()]).expect("render");
    apply_rendered(&admin, &rendered, "admission-test")
        .await
        .expect("apply deploy/infra");
    let controller = cp
        .client_from_kubeconfig(&user(NS), &cp.kubeconfig_with_token(&user(NS), &token))
        .await
        .unwrap();

    // What KubeVirt needs around it: a bound claim to hotplug (the bed gives every namespace
    // its default ServiceAccount, as kube-controller-manager would).
    let pp = PostParams::default();
    let pv: k8s_openapi::api::core::v1::PersistentVolume = serde_json::from_value(json!({
        "metadata": {"name": "pv-kvcsi-data-1"},
        "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"],
            "hostPath": {"path": "/tmp/kvcsi-admission-data-1"},
            "claimRef": {"namespace": NS, "name": "kvcsi-data-1"}}
    }))
    .unwrap();
    Api::<k8s_openapi::api::core::v1::PersistentVolume>::all(admin.clone())
        .create(&pp, &pv)
        .await
        .unwrap();
    let mut claim = pvc("kvcsi-data-1", Some("a"));
    let spec = claim.spec.as_mut().unwrap();
    spec.volume_name = Some("pv-kvcsi-data-1".into());
    spec.storage_class_name = Some(String::new());
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(admin.clone(), NS);
    pvcs.create(&pp, &claim).await.unwrap();
    pvcs.patch_status(
        "kvcsi-data-1",
        &PatchParams::default(),
        &merge(
            json!({"status": {"phase": "Bound", "accessModes": ["ReadWriteOnce"],
            "capacity": {"storage": "1Gi"}}}),
        ),
    )
    .await
    .unwrap();

    let vms: Api<DynamicObject> = Api::namespaced_with(admin.clone(), NS, &vm_resource());
    vms.create(&pp, &worker("worker", "a")).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_secs(10)).await;
    eprintln!(
        "DEBUG vm {:#?}",
        vms.get("worker").await.unwrap().data["status"]
    );
    eprintln!("DEBUG vc {}", _kv.virt_controller_log_tail(40));
    wait_vmi(&admin, "worker", "Running", |v| {
        v["status"]["phase"] == "Running"
    })
    .await;

    // Until a forged change is refused (dry run), the policy is not in force yet.
    let as_controller: Api<DynamicObject> = Api::namespaced_with(controller, NS, &vm_resource());
    let forged = json!([{"op": "replace", "path": "/spec/runStrategy", "value": "Halted"}]);
    let dry_run = PatchParams {
        dry_run: true,
        ..Default::default()
    };
    let policy = admission_policy_name(NS);
    let mut last = String::new();
    let mut enforced = false;
    for _ in 0..300 {
        match as_controller
            .patch("worker", &dry_run, &json_patch(forged.clone()))
            .await
        {
            Err(kube::Error::Api(s)) if s.message.contains(&policy) => {
                enforced = true;
                break;
            }
            r => last = format!("{r:?}"),
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(enforced, "{policy} never refused a forged VM patch: {last}");

    // The patch controller/src/attach.rs sends, with a claim as the volume source.
    let uid = vms.get("worker").await.unwrap().metadata.uid.unwrap();
    let params = PatchParams::default();
    admitted(
        "the controller's hotplug through KubeVirt's webhooks",
        as_controller
            .patch(
                "worker",
                &params,
                &json_patch(json!([
                    {"op": "test", "path": "/metadata/uid", "value": uid},
                    {"op": "add", "path": format!("{VOLUMES}/-"), "value": {"name": "kvcsi-data-1",
                        "persistentVolumeClaim": {"claimName": "kvcsi-data-1", "hotpluggable": true}}},
                    {"op": "add", "path": format!("{DISKS}/-"), "value": hot_disk("kvcsi-data-1")}
                ])),
            )
            .await,
    );
    wait_vmi(&admin, "worker", "kvcsi-data-1 Ready", |v| {
        hotplug_phase(v) == Some("Ready")
    })
    .await;
    refused(
        "a forged change riding on KubeVirt's webhooks",
        as_controller
            .patch(
                "worker",
                &params,
                &json_patch(
                    json!([{"op": "replace", "path": "/spec/runStrategy", "value": "Halted"}]),
                ),
            )
            .await,
        "another part of the spec differs",
    );

    // The unplug: the controller's remove ops, at the indices it read.
    let vm = vms.get("worker").await.unwrap();
    let index = |list: &str| {
        vm.data
            .pointer(list)
            .and_then(Value::as_array)
            .and_then(|l| l.iter().position(|x| x["name"] == "kvcsi-data-1"))
            .unwrap_or_else(|| panic!("no kvcsi-data-1 in {list}"))
    };
    let (v, d) = (index(VOLUMES), index(DISKS));
    admitted(
        "the controller's unplug through KubeVirt's webhooks",
        as_controller
            .patch(
                "worker",
                &params,
                &json_patch(json!([
                    {"op": "test", "path": format!("{VOLUMES}/{v}/name"), "value": "kvcsi-data-1"},
                    {"op": "test", "path": format!("{VOLUMES}/{v}/persistentVolumeClaim/hotpluggable"), "value": true},
                    {"op": "remove", "path": format!("{VOLUMES}/{v}")},
                    {"op": "test", "path": format!("{DISKS}/{d}/name"), "value": "kvcsi-data-1"},
                    {"op": "remove", "path": format!("{DISKS}/{d}")}
                ])),
            )
            .await,
    );
    wait_vmi(&admin, "worker", "kvcsi-data-1 gone", |v| {
        hotplug_phase(v).is_none()
    })
    .await;
}
