//! Stand-ins for the node side of KubeVirt, which cannot run here: a kubelet (with the
//! scheduler's one decision) for pods, and virt-handler for VMIs; plus the `default`
//! ServiceAccount per namespace that kube-controller-manager would create.
//!
//! - **Pods**: a pod with no node whose `nodeSelector` the node's labels satisfy is bound
//!   to the node; a bound pod becomes `Running` with every container started and ready; a
//!   terminating pod on the node is deleted at once (as kubelet does once its containers
//!   stopped). This runs as an administrator: there is no Node authorizer in this cluster.
//! - **virt-handler**, with virt-handler's own identity (so KubeVirt's RBAC, its
//!   ValidatingAdmissionPolicy on node updates and its VMI update admission apply): labels
//!   the node `kubevirt.io/schedulable=true`, turns a `Scheduled` VMI on the node into a
//!   `Running` one with a "domain" holding its disks, and keeps `status.volumeStatus` the way
//!   `pkg/virt-handler/vm.go` (`updateVolumeStatusesFromDomain`, `updateHotplugVolumeStatus`)
//!   does: `target` is the domain's device for the volume; a hotplug volume whose attachment
//!   pod runs is `MountedToPod`, then plugged into the domain, then `Ready` once it has a
//!   target; removed from the spec it stays `Ready` while the domain has it, is unplugged,
//!   then `UnMountedFromPod`. The domain is bookkeeping, except for a VMI that names a QMP
//!   socket (annotation [`QMP_SOCKET_ANNOTATION`], as the stand-in's QEMU backend reads it):
//!   its volumes are plugged into that QEMU with the worker VM's own QMP hotplug
//!   ([`crate::vm::disk`]), backed by the PV's file, and only then counted in the domain;
//!   when that file grows and the `KubeVirt` CR enables `ExpandDisks`, the disk is resized
//!   in QEMU (virt-launcher's part of online expansion).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, PersistentVolume, PersistentVolumeClaim, Pod};
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::cluster::{ClusterError, ControlPlane};
use crate::fixtures::{QMP_SOCKET_ANNOTATION, vmi_resource};
use crate::vm::disk::DiskSlots;
use crate::vm::{DiskBus, DiskSpec, Qmp, VmOptions};

/// The label virt-handler puts on nodes it serves, and launcher pods select.
pub const SCHEDULABLE_LABEL: &str = "kubevirt.io/schedulable";
/// The label virt-controller puts on a VMI once it is scheduled.
const VMI_NODE_LABEL: &str = "kubevirt.io/nodeName";

#[derive(Debug, thiserror::Error)]
pub enum NodeStandinError {
    #[error("cannot create node {node}")]
    CreateNode {
        node: String,
        #[source]
        source: kube::Error,
    },
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error("cannot make virt-handler's identity on node {node}")]
    HandlerIdentity {
        node: String,
        #[source]
        source: kube::Error,
    },
    #[error("virt-handler's identity cannot label node {node}")]
    LabelNode {
        node: String,
        #[source]
        source: kube::Error,
    },
}

/// The node's disks for one VMI: volume name to guest device (`sda`, `vdb`).
type Domain = BTreeMap<String, String>;

/// The running stand-ins; their tasks end when this is dropped.
#[derive(Debug)]
pub struct NodeStandin {
    name: String,
    tasks: Vec<JoinHandle<()>>,
    domains: Arc<Mutex<HashMap<String, Domain>>>,
    errors: Errors,
}

/// The latest failures of the stand-in loops (they retry; tests print these when a wait
/// times out).
type Errors = Arc<Mutex<Vec<String>>>;

fn record(errors: &Errors, what: String) {
    let mut e = errors.lock().expect("errors lock");
    if e.len() >= 20 {
        e.remove(0);
    }
    e.push(what);
}

impl Drop for NodeStandin {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl NodeStandin {
    /// Creates the Node and a virt-handler pod on it, takes a token bound to that pod for
    /// the handler, labels the node schedulable as virt-handler, and starts both loops.
    pub async fn start(cp: &ControlPlane, name: &str) -> Result<Self, NodeStandinError> {
        let admin = cp.client().await?;
        let nodes: Api<Node> = Api::all(admin.clone());
        let node: Node = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Node",
            // Labels and annotation as kubelet registers a node (KubeVirt's node policy
            // evaluates `metadata.annotations` and fails on a node without any).
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64"},
                "annotations": {"volumes.kubernetes.io/controller-managed-attach-detach": "true"}}
        }))
        .expect("static node");
        nodes
            .patch(
                name,
                &PatchParams::apply("kvcsi-kubelet-standin").force(),
                &Patch::Apply(&node),
            )
            .await
            .map_err(|source| NodeStandinError::CreateNode {
                node: name.to_string(),
                source,
            })?;
        let handler = handler_client(cp, &admin, name).await?;
        Api::<Node>::all(handler.clone())
            .patch(
                name,
                &PatchParams::default(),
                // What virt-handler and its node-labeller put on a node that can run q35 VMs.
                &Patch::Merge(json!({"metadata": {"labels": {SCHEDULABLE_LABEL: "true",
                    "machine-type.node.kubevirt.io/q35": "true"}}})),
            )
            .await
            .map_err(|source| NodeStandinError::LabelNode {
                node: name.to_string(),
                source,
            })?;

        let domains = Arc::new(Mutex::new(HashMap::new()));
        let errors = Errors::default();
        let pods: Api<Pod> = Api::all(admin.clone());
        let (pod_store, pod_writer) = reflector::store();
        let changed = Arc::new(Notify::new());
        let kubelet = tokio::spawn(kubelet_loop(
            pods.clone(),
            pod_writer,
            name.to_string(),
            changed.clone(),
            errors.clone(),
        ));
        let handler_task = tokio::spawn(handler_loop(
            handler,
            admin.clone(),
            pod_store,
            name.to_string(),
            domains.clone(),
            changed,
            errors.clone(),
        ));
        let service_accounts =
            tokio::spawn(default_service_accounts(admin.clone(), errors.clone()));
        Ok(Self {
            name: name.to_string(),
            tasks: vec![kubelet, handler_task, service_accounts],
            domains,
            errors,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The latest errors of the kubelet and virt-handler loops, oldest first.
    pub fn recent_errors(&self) -> Vec<String> {
        self.errors.lock().expect("errors lock").clone()
    }

    /// The stand-in domain's disks of a VMI (`namespace/name`), volume to device.
    pub fn domain(&self, vmi: &str) -> Option<Domain> {
        self.domains.lock().expect("domains lock").get(vmi).cloned()
    }
}

async fn kubelet_loop(
    pods: Api<Pod>,
    writer: reflector::store::Writer<Pod>,
    node: String,
    changed: Arc<Notify>,
    errors: Errors,
) {
    let nodes: Api<Node> = Api::all(pods.clone().into_client());
    let mut stream = watcher(pods.clone(), watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .applied_objects()
        .boxed();
    while let Some(ev) = stream.next().await {
        let Ok(pod) = ev else { continue };
        if let Err(e) = kubelet_sync(&pods, &nodes, &pod, &node).await {
            record(
                &errors,
                format!("kubelet stand-in, pod {:?}: {e}", pod.metadata.name),
            );
        }
        changed.notify_one();
    }
}

async fn kubelet_sync(
    pods: &Api<Pod>,
    nodes: &Api<Node>,
    pod: &Pod,
    node: &str,
) -> Result<(), kube::Error> {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    let api: Api<Pod> = Api::namespaced(pods.clone().into_client(), &ns);
    let spec = pod.spec.clone().unwrap_or_default();
    let bound = spec.node_name.as_deref();
    if pod.metadata.deletion_timestamp.is_some() {
        if bound == Some(node) {
            let dp = DeleteParams {
                grace_period_seconds: Some(0),
                ..Default::default()
            };
            match api.delete(&name, &dp).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e),
            }
        }
        return Ok(());
    }
    match bound {
        None => {
            let labels = nodes.get(node).await?.metadata.labels.unwrap_or_default();
            if !fits(&spec, &labels) {
                return Ok(());
            }
            let binding = json!({
                "apiVersion": "v1", "kind": "Binding",
                "metadata": {"name": name, "namespace": ns},
                "target": {"apiVersion": "v1", "kind": "Node", "name": node}
            });
            api.create_subresource::<Value, Value>(
                "binding",
                &name,
                &PostParams::default(),
                &binding,
            )
            .await?;
        }
        Some(n) if n == node => {
            let phase = pod.status.as_ref().and_then(|s| s.phase.clone());
            if phase.as_deref() == Some("Running") {
                return Ok(());
            }
            let now = chrono_now();
            let running = |c: &k8s_openapi::api::core::v1::Container| {
                json!({"name": c.name, "image": c.image, "imageID": "", "ready": true,
                    "started": true, "restartCount": 0, "state": {"running": {"startedAt": now}}})
            };
            let containers: Vec<Value> = spec.containers.iter().map(running).collect();
            let inits: Vec<Value> = spec
                .init_containers
                .unwrap_or_default()
                .iter()
                .map(|c| {
                    json!({"name": c.name, "image": c.image, "imageID": "", "ready": true,
                        "restartCount": 0, "state": {"terminated": {"exitCode": 0, "reason": "Completed",
                        "startedAt": now, "finishedAt": now}}})
                })
                .collect();
            let cond = |t: &str| json!({"type": t, "status": "True", "lastTransitionTime": now});
            let status = json!({"status": {
                "phase": "Running", "hostIP": "127.0.0.1", "podIP": "10.244.0.10",
                "podIPs": [{"ip": "10.244.0.10"}], "startTime": now,
                "conditions": [cond("PodScheduled"), cond("Initialized"), cond("ContainersReady"), cond("Ready")],
                "containerStatuses": containers, "initContainerStatuses": inits,
            }});
            api.patch_status(&name, &PatchParams::default(), &Patch::Merge(status))
                .await?;
        }
        Some(_) => {}
    }
    Ok(())
}

/// A client for `kubevirt:kubevirt-handler` with a token bound to a virt-handler pod on the
/// node, as the real DaemonSet pod gets: the token carries the node name, which KubeVirt's
/// node-restriction ValidatingAdmissionPolicy requires before virt-handler may touch a node.
async fn handler_client(
    cp: &ControlPlane,
    admin: &kube::Client,
    node: &str,
) -> Result<kube::Client, NodeStandinError> {
    let err = |source| NodeStandinError::HandlerIdentity {
        node: node.to_string(),
        source,
    };
    let pod_name = format!("virt-handler-{node}");
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": pod_name, "namespace": "kubevirt", "labels": {"kubevirt.io": "virt-handler"}},
        "spec": {"nodeName": node, "serviceAccountName": "kubevirt-handler",
            "automountServiceAccountToken": false,
            "containers": [{"name": "virt-handler", "image": "quay.io/kubevirt/virt-handler:v1.7.0"}]}
    }))
    .expect("static pod");
    let pods: Api<Pod> = Api::namespaced(admin.clone(), "kubevirt");
    let pod = pods
        .create(&PostParams::default(), &pod)
        .await
        .map_err(err)?;
    let request: k8s_openapi::api::authentication::v1::TokenRequest =
        serde_json::from_value(json!({
            "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
            "spec": {"audiences": [], "expirationSeconds": 86400,
                "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": pod_name,
                    "uid": pod.metadata.uid}}
        }))
        .expect("static token request");
    let sas: Api<k8s_openapi::api::core::v1::ServiceAccount> =
        Api::namespaced(admin.clone(), "kubevirt");
    let token = sas
        .create_token_request("kubevirt-handler", &PostParams::default(), &request)
        .await
        .map_err(err)?
        .status
        .map(|s| s.token)
        .unwrap_or_default();
    let user = "system:serviceaccount:kubevirt:kubevirt-handler";
    Ok(cp
        .client_from_kubeconfig(user, &cp.kubeconfig_with_token(user, &token))
        .await?)
}

/// kube-controller-manager's ServiceAccount controller, for the one thing KubeVirt's pods
/// need from it: a `default` ServiceAccount in every namespace (pod admission refuses a pod
/// whose ServiceAccount does not exist).
async fn default_service_accounts(admin: kube::Client, errors: Errors) {
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(admin.clone());
    let mut stream = watcher(namespaces, watcher::Config::default())
        .default_backoff()
        .applied_objects()
        .boxed();
    while let Some(ev) = stream.next().await {
        let Ok(ns) = ev else { continue };
        let Some(name) = ns.metadata.name else {
            continue;
        };
        if ns.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let sa: k8s_openapi::api::core::v1::ServiceAccount =
            serde_json::from_value(json!({"apiVersion": "v1", "kind": "ServiceAccount",
                "metadata": {"name": "default", "namespace": name}}))
            .expect("static service account");
        let api: Api<k8s_openapi::api::core::v1::ServiceAccount> =
            Api::namespaced(admin.clone(), &name);
        if let Err(e) = api
            .patch(
                "default",
                &PatchParams::apply("kvcsi-serviceaccount-standin"),
                &Patch::Apply(&sa),
            )
            .await
        {
            record(&errors, format!("default ServiceAccount in {name}: {e}"));
        }
    }
}

/// The scheduler's node filter, for the two constraints KubeVirt's pods use: `nodeSelector`
/// and required node affinity (one term of match expressions must hold).
fn fits(spec: &k8s_openapi::api::core::v1::PodSpec, labels: &BTreeMap<String, String>) -> bool {
    let selector_ok = spec
        .node_selector
        .as_ref()
        .is_none_or(|sel| sel.iter().all(|(k, v)| labels.get(k) == Some(v)));
    let terms = spec
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|n| {
            n.required_during_scheduling_ignored_during_execution
                .as_ref()
        })
        .map(|r| r.node_selector_terms.clone());
    let affinity_ok = terms.is_none_or(|terms| {
        terms.iter().any(|t| {
            t.match_expressions.iter().flatten().all(|e| {
                let have = labels.get(&e.key);
                let values = e.values.clone().unwrap_or_default();
                match e.operator.as_str() {
                    "In" => have.is_some_and(|v| values.contains(v)),
                    "NotIn" => have.is_none_or(|v| !values.contains(v)),
                    "Exists" => have.is_some(),
                    "DoesNotExist" => have.is_none(),
                    _ => false,
                }
            })
        })
    });
    selector_ok && affinity_ok
}

/// RFC 3339 "now" for status timestamps.
fn chrono_now() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .round(k8s_openapi::jiff::Unit::Second)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

async fn handler_loop(
    client: kube::Client,
    admin: kube::Client,
    pods: Store<Pod>,
    node: String,
    domains: Arc<Mutex<HashMap<String, Domain>>>,
    pod_changed: Arc<Notify>,
    errors: Errors,
) {
    let ar = vmi_resource();
    let vmis: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
    let writer = reflector::store::Writer::new(ar.clone());
    let store = writer.as_reader();
    let cfg = watcher::Config::default().labels(&format!("{VMI_NODE_LABEL}={node}"));
    let mut stream = watcher(vmis, cfg)
        .default_backoff()
        .reflect(writer)
        .applied_objects()
        .boxed();
    // virt-handler re-queues a VMI a second after a mount check that may change; a short
    // tick does the same for every VMI here.
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let hypervisors = Hypervisors::default();
    loop {
        tokio::select! {
            ev = stream.next() => if ev.is_none() { return },
            _ = pod_changed.notified() => {},
            _ = tick.tick() => {},
        }
        for vmi in store.state() {
            let api: Api<DynamicObject> = Api::namespaced_with(
                client.clone(),
                vmi.metadata.namespace.as_deref().unwrap_or_default(),
                &ar,
            );
            let env = SyncEnv {
                api: &api,
                admin: &admin,
                pods: &pods,
                domains: &domains,
                hypervisors: &hypervisors,
                errors: &errors,
            };
            if let Err(e) = handler_sync(&env, &vmi).await {
                record(
                    &errors,
                    format!("virt-handler stand-in, vmi {:?}: {e}", vmi.metadata.name),
                );
            }
        }
    }
}

/// The spec volumes that are hotpluggable.
fn hotpluggable(vmi: &Value) -> BTreeMap<String, bool> {
    vmi["spec"]["volumes"]
        .as_array()
        .map(|vs| {
            vs.iter()
                .filter_map(|v| {
                    let name = v["name"].as_str()?.to_string();
                    let hot = v["persistentVolumeClaim"]["hotpluggable"] == true
                        || v["dataVolume"]["hotpluggable"] == true;
                    Some((name, hot))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// `sd` or `vd`: how the domain names a disk on this bus.
fn device_prefix(vmi: &Value, volume: &str) -> &'static str {
    let disk = vmi["spec"]["domain"]["devices"]["disks"]
        .as_array()
        .and_then(|ds| ds.iter().find(|d| d["name"] == volume));
    let bus = disk
        .and_then(|d| d["disk"]["bus"].as_str().or(d["lun"]["bus"].as_str()))
        .unwrap_or("virtio");
    if bus == "virtio" { "vd" } else { "sd" }
}

fn next_device(domain: &Domain, prefix: &str) -> String {
    let used: Vec<&String> = domain.values().collect();
    ('a'..='z')
        .map(|c| format!("{prefix}{c}"))
        .find(|d| !used.contains(&d))
        .unwrap_or_else(|| format!("{prefix}zz"))
}

fn can_update_to_mounted(phase: &str) -> bool {
    matches!(phase, "Bound" | "Pending" | "AttachedToNode")
}

fn can_update_to_unmounted(phase: &str) -> bool {
    matches!(phase, "Ready" | "MountedToPod" | "AttachedToNode")
}

/// What one pass of the virt-handler stand-in works with.
struct SyncEnv<'a> {
    api: &'a Api<DynamicObject>,
    /// Reads PersistentVolumes, to find a QEMU-backed volume's file.
    admin: &'a kube::Client,
    pods: &'a Store<Pod>,
    domains: &'a Mutex<HashMap<String, Domain>>,
    hypervisors: &'a Hypervisors,
    errors: &'a Errors,
}

async fn handler_sync(env: &SyncEnv<'_>, vmi: &DynamicObject) -> Result<(), kube::Error> {
    let SyncEnv {
        api, pods, domains, ..
    } = *env;
    let key = format!(
        "{}/{}",
        vmi.metadata.namespace.as_deref().unwrap_or_default(),
        vmi.metadata.name.as_deref().unwrap_or_default()
    );
    let ns = vmi.metadata.namespace.clone().unwrap_or_default();
    let data = &vmi.data;
    let phase = data["status"]["phase"].as_str().unwrap_or_default();
    let hot = hotpluggable(data);
    let mut new = vmi.clone();

    if vmi.metadata.deletion_timestamp.is_some() {
        if !matches!(phase, "Scheduled" | "Running") {
            return Ok(());
        }
        // The domain is shut down; virt-controller takes it from here.
        domains.lock().expect("domains lock").remove(&key);
        new.data["status"]["phase"] = json!("Succeeded");
        api.replace(
            vmi.metadata.name.as_deref().unwrap_or_default(),
            &PostParams::default(),
            &new,
        )
        .await?;
        return Ok(());
    }

    match phase {
        "Scheduled" => {
            // Start the "domain" with every disk that is not hotplugged.
            let mut domain = Domain::new();
            for (volume, is_hot) in &hot {
                if !is_hot {
                    let dev = next_device(&domain, device_prefix(data, volume));
                    domain.insert(volume.clone(), dev);
                }
            }
            new.data["status"]["phase"] = json!("Running");
            // What virt-handler reports on a host without SELinux; virt-controller will not
            // render an attachment pod for a VMI that has no SELinux context.
            new.data["status"]["selinuxContext"] = json!("none");
            set_volume_status(&mut new.data, &ns, &domain, &hot, pods);
            domains.lock().expect("domains lock").insert(key, domain);
        }
        "Running" => {
            let domain = domains
                .lock()
                .expect("domains lock")
                .get(&key)
                .cloned()
                .unwrap_or_default();
            set_volume_status(&mut new.data, &ns, &domain, &hot, pods);
            if new.data["status"]["volumeStatus"] == data["status"]["volumeStatus"] {
                // Status matches the domain: now change the domain (virt-launcher's part),
                // and let the next pass report it.
                let mut domain = domain;
                let statuses = data["status"]["volumeStatus"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                let socket = vmi
                    .metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(QMP_SOCKET_ANNOTATION))
                    .map(PathBuf::from);
                for s in &statuses {
                    let name = s["name"].as_str().unwrap_or_default();
                    if hot.get(name) == Some(&true)
                        && s["phase"] == "MountedToPod"
                        && !domain.contains_key(name)
                    {
                        if let Some(socket) = &socket
                            && let Err(e) = plug(env, socket, &key, data, &ns, name).await
                        {
                            record(env.errors, format!("plugging {name} into {key}: {e}"));
                            continue;
                        }
                        let dev = next_device(&domain, device_prefix(data, name));
                        domain.insert(name.to_string(), dev);
                    }
                }
                let gone: Vec<String> = domain
                    .keys()
                    .filter(|v| !hot.contains_key(*v))
                    .cloned()
                    .collect();
                for v in gone {
                    if let Some(socket) = &socket
                        && let Err(e) = unplug(env, socket, &key, &v).await
                    {
                        record(env.errors, format!("unplugging {v} from {key}: {e}"));
                        continue;
                    }
                    domain.remove(&v);
                }
                if let Some(socket) = &socket
                    && let Err(e) = resize_grown(env, socket, &key, &domain).await
                {
                    record(env.errors, format!("resizing disks of {key}: {e}"));
                }
                domains.lock().expect("domains lock").insert(key, domain);
                return Ok(());
            }
        }
        _ => return Ok(()),
    }
    if new.data != vmi.data {
        api.replace(
            vmi.metadata.name.as_deref().unwrap_or_default(),
            &PostParams::default(),
            &new,
        )
        .await?;
    }
    Ok(())
}

/// A QEMU that backs VMIs naming its QMP socket (annotation [`QMP_SOCKET_ANNOTATION`]):
/// plugging a volume is the worker VM's own `blockdev-add` + `device_add`
/// ([`crate::vm::disk`]), with the PV's file as backing.
struct Hypervisor {
    qmp: Qmp,
    slots: DiskSlots,
    /// Device id to the backing file and the size QEMU was last given for it.
    sizes: HashMap<String, (PathBuf, u64)>,
}

type Hypervisors = Arc<tokio::sync::Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<Hypervisor>>>>>;

#[derive(Debug, thiserror::Error)]
enum PlugError {
    #[error("cannot reach QMP")]
    Qmp(#[from] crate::vm::QmpError),
    #[error(transparent)]
    Disk(#[from] crate::vm::DiskError),
    #[error("cannot find the volume's file")]
    Lookup(#[from] kube::Error),
    #[error("volume {0} has no PersistentVolumeClaim with a hostPath PersistentVolume")]
    NoFile(String),
}

async fn hypervisor(
    env: &SyncEnv<'_>,
    socket: &Path,
) -> Result<Arc<tokio::sync::Mutex<Hypervisor>>, PlugError> {
    let mut all = env.hypervisors.lock().await;
    if let Some(h) = all.get(socket) {
        return Ok(h.clone());
    }
    let qmp = Qmp::connect(socket, Duration::from_secs(5)).await?;
    // The worker VM's default root-port count (its `hotplug_slots`).
    let slots = DiskSlots::new(VmOptions::new("").hotplug_slots);
    let h = Arc::new(tokio::sync::Mutex::new(Hypervisor {
        qmp,
        slots,
        sizes: HashMap::new(),
    }));
    all.insert(socket.to_path_buf(), h.clone());
    Ok(h)
}

/// A QEMU device id for a VMI's volume: a letter, then hex (QEMU ids stop at 24 here).
fn device_id(vmi_key: &str, volume: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in format!("{vmi_key}/{volume}").bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("kv{h:016x}")
}

async fn plug(
    env: &SyncEnv<'_>,
    socket: &Path,
    vmi_key: &str,
    vmi: &Value,
    ns: &str,
    volume: &str,
) -> Result<(), PlugError> {
    let spec_volume = vmi["spec"]["volumes"]
        .as_array()
        .and_then(|vs| vs.iter().find(|v| v["name"] == volume))
        .cloned()
        .unwrap_or_default();
    let claim = spec_volume["persistentVolumeClaim"]["claimName"]
        .as_str()
        .or(spec_volume["dataVolume"]["name"].as_str())
        .ok_or_else(|| PlugError::NoFile(volume.to_string()))?;
    let pvc = Api::<PersistentVolumeClaim>::namespaced(env.admin.clone(), ns)
        .get(claim)
        .await?;
    let pv_name = pvc
        .spec
        .and_then(|s| s.volume_name)
        .ok_or_else(|| PlugError::NoFile(volume.to_string()))?;
    let pv = Api::<PersistentVolume>::all(env.admin.clone())
        .get(&pv_name)
        .await?;
    let file = pv
        .spec
        .and_then(|s| s.host_path)
        .map(|h| PathBuf::from(h.path))
        .ok_or_else(|| PlugError::NoFile(volume.to_string()))?;
    let disk = vmi["spec"]["domain"]["devices"]["disks"]
        .as_array()
        .and_then(|ds| ds.iter().find(|d| d["name"] == volume))
        .cloned()
        .unwrap_or_default();
    let serial = disk["serial"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| volume.chars().take(20).collect());
    let bus = if device_prefix(vmi, volume) == "vd" {
        DiskBus::Virtio
    } else {
        DiskBus::Scsi
    };
    let read_only = spec_volume["persistentVolumeClaim"]["readOnly"] == true;
    let spec = DiskSpec {
        id: device_id(vmi_key, volume),
        file_path: file,
        serial,
        bus,
        read_only,
    };
    let size = std::fs::metadata(&spec.file_path)
        .map(|m| m.len())
        .unwrap_or(0);
    let h = hypervisor(env, socket).await?;
    let mut h = h.lock().await;
    let Hypervisor { qmp, slots, sizes } = &mut *h;
    slots.attach(qmp, &spec).await?;
    sizes.insert(spec.id.clone(), (spec.file_path.clone(), size));
    Ok(())
}

/// virt-launcher's `ExpandDisks` step: a plugged volume whose backing grew (the CDI
/// stand-in grows the PV's file before it reports the claim's new capacity, which is all
/// virt-launcher compares against) is resized in QEMU, so the guest sees the new size.
/// Without the `ExpandDisks` gate in the KubeVirt CR, KubeVirt v1.7 leaves the running
/// guest's disk as it was, and so does this.
async fn resize_grown(
    env: &SyncEnv<'_>,
    socket: &Path,
    vmi_key: &str,
    domain: &Domain,
) -> Result<(), PlugError> {
    let h = hypervisor(env, socket).await?;
    let mut h = h.lock().await;
    let Hypervisor { qmp, sizes, .. } = &mut *h;
    for volume in domain.keys() {
        let id = device_id(vmi_key, volume);
        let Some((file, known)) = sizes.get_mut(&id) else {
            continue;
        };
        let now = std::fs::metadata(&*file).map(|m| m.len()).unwrap_or(0);
        if now <= *known {
            continue;
        }
        *known = now;
        if !expand_disks_enabled(env.admin).await? {
            continue;
        }
        // The block-node name `crate::vm::disk` gave the disk when it plugged it.
        qmp.execute(
            "block_resize",
            Some(json!({"node-name": crate::vm::disk::node_name(&id), "size": now})),
        )
        .await?;
    }
    Ok(())
}

/// Whether the `KubeVirt` CR enables the `ExpandDisks` feature gate.
async fn expand_disks_enabled(admin: &kube::Client) -> Result<bool, kube::Error> {
    let ar = kube::core::ApiResource::from_gvk_with_plural(
        &kube::core::GroupVersionKind::gvk("kubevirt.io", "v1", "KubeVirt"),
        "kubevirts",
    );
    let kvs: Api<DynamicObject> = Api::all_with(admin.clone(), &ar);
    let list = kvs.list(&ListParams::default()).await?;
    Ok(list.items.iter().any(|kv| {
        kv.data["spec"]["configuration"]["developerConfiguration"]["featureGates"]
            .as_array()
            .is_some_and(|g| g.iter().any(|g| g == "ExpandDisks"))
    }))
}

async fn unplug(
    env: &SyncEnv<'_>,
    socket: &Path,
    vmi_key: &str,
    volume: &str,
) -> Result<(), PlugError> {
    let h = hypervisor(env, socket).await?;
    let mut h = h.lock().await;
    let Hypervisor { qmp, slots, sizes } = &mut *h;
    let timeout = VmOptions::new("").unplug_timeout;
    let id = device_id(vmi_key, volume);
    match slots.detach(qmp, &id, timeout).await {
        // A disk of the VMI's first domain (not hotplugged by us) has nothing to unplug.
        Ok(()) | Err(crate::vm::DiskError::NotAttached(_)) => {
            sizes.remove(&id);
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// `updateVolumeStatusesFromDomain` + `updateHotplugVolumeStatus`, with "mounted" meaning:
/// the entry's attachment pod runs, and the volume is still in the spec or the domain (the
/// real handler unmounts only after the domain let go).
fn set_volume_status(
    vmi: &mut Value,
    ns: &str,
    domain: &Domain,
    hot: &BTreeMap<String, bool>,
    pods: &Store<Pod>,
) {
    let Some(statuses) = vmi["status"]["volumeStatus"].as_array().cloned() else {
        return;
    };
    let mut out = Vec::new();
    for mut s in statuses {
        let name = s["name"].as_str().unwrap_or_default().to_string();
        let target = domain.get(&name).cloned().unwrap_or_default();
        // `target` has no omitempty upstream: an unplugged volume reports "".
        s["target"] = json!(target);
        if s["hotplugVolume"].is_object() {
            let phase = s["phase"].as_str().unwrap_or_default().to_string();
            let in_spec = hot.contains_key(&name);
            if target.is_empty() {
                let uid = s["hotplugVolume"]["attachPodUID"]
                    .as_str()
                    .unwrap_or_default();
                let pod_runs = !uid.is_empty()
                    && pods.state().iter().any(|p| {
                        p.metadata.namespace.as_deref() == Some(ns)
                            && p.metadata.uid.as_deref() == Some(uid)
                            && p.metadata.deletion_timestamp.is_none()
                            && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
                    });
                let mounted = pod_runs && in_spec;
                if mounted && can_update_to_mounted(&phase) {
                    s["phase"] = json!("MountedToPod");
                    s["reason"] = json!("VolumeMountedToPod");
                    s["message"] = json!(format!(
                        "Volume {name} has been mounted in virt-launcher pod"
                    ));
                } else if !mounted && !in_spec && can_update_to_unmounted(&phase) {
                    s["phase"] = json!("UnMountedFromPod");
                    s["reason"] = json!("VolumeUnMountedFromPod");
                    s["message"] = json!(format!(
                        "Volume {name} has been unmounted from virt-launcher pod"
                    ));
                }
            } else {
                s["phase"] = json!("Ready");
                s["reason"] = json!("VolumeReady");
                s["message"] = json!(format!(
                    "Successfully attach hotplugged volume {name} to VM"
                ));
            }
        }
        out.push(s);
    }
    out.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    vmi["status"]["volumeStatus"] = json!(out);
}

/// Lists the pods the kubelet stand-in runs on `node`, for assertions.
pub async fn pods_on_node(client: &kube::Client, node: &str) -> Result<Vec<Pod>, kube::Error> {
    let lp = ListParams::default().fields(&format!("spec.nodeName={node}"));
    Ok(Api::<Pod>::all(client.clone()).list(&lp).await?.items)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_follow_the_bus() {
        let vmi = json!({"spec": {"domain": {"devices": {"disks": [
            {"name": "root", "disk": {"bus": "virtio"}},
            {"name": "hp", "disk": {"bus": "scsi"}}]}}}});
        let mut d = Domain::new();
        d.insert("root".into(), next_device(&d, device_prefix(&vmi, "root")));
        d.insert("hp".into(), next_device(&d, device_prefix(&vmi, "hp")));
        assert_eq!(d["root"], "vda");
        assert_eq!(d["hp"], "sda");
        assert_eq!(next_device(&d, "sd"), "sdb");
    }

    #[test]
    fn scheduling_checks_selector_and_affinity() {
        let labels = BTreeMap::from([
            ("kubernetes.io/hostname".to_string(), "n".to_string()),
            (SCHEDULABLE_LABEL.to_string(), "true".to_string()),
        ]);
        let spec = |v: Value| -> k8s_openapi::api::core::v1::PodSpec {
            serde_json::from_value(v).expect("pod spec")
        };
        assert!(fits(
            &spec(json!({"containers": [], "nodeSelector": {SCHEDULABLE_LABEL: "true"}})),
            &labels
        ));
        assert!(!fits(
            &spec(json!({"containers": [], "nodeSelector": {"other": "x"}})),
            &labels
        ));
        let aff = |op: &str, key: &str, values: Value| {
            json!({"containers": [], "affinity": {"nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchExpressions": [{"key": key, "operator": op, "values": values}]}]}}}})
        };
        assert!(fits(
            &spec(aff("In", "kubernetes.io/hostname", json!(["n"]))),
            &labels
        ));
        assert!(!fits(
            &spec(aff("In", "kubernetes.io/hostname", json!(["m"]))),
            &labels
        ));
        assert!(fits(
            &spec(aff("DoesNotExist", "obsolete", json!(null))),
            &labels
        ));
        assert!(!fits(
            &spec(aff("Exists", "obsolete", json!(null))),
            &labels
        ));
    }

    #[test]
    fn mount_transitions_follow_virt_handler() {
        assert!(can_update_to_mounted("AttachedToNode"));
        assert!(!can_update_to_mounted("Ready"));
        assert!(can_update_to_unmounted("Ready"));
        assert!(!can_update_to_unmounted("Detaching"));
    }
}
