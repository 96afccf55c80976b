//! The volume half of a kubelet, for a guest with no kubelet: once the attach/detach
//! controller's VolumeAttachment for a pod's volume is attached, it calls the node plugin's
//! NodeStageVolume and NodePublishVolume with the paths and publish context kubelet would
//! use, and reports the volume in the Node's `status.volumesInUse` (which keeps the
//! attach/detach controller from detaching a mounted volume); on pod deletion it does the
//! reverse and then removes the pod, as kubelet does once a pod's volumes are torn down.
//! With no container runtime a pod never leaves Pending, so [`KubeletStandin::run`] records
//! on it what it did, where `kubectl describe pod` shows it: a `SuccessfulMountVolume` (or
//! `FailedMount`) Event, and a `VolumesMounted` condition that `kubectl wait` can wait for.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use csi_proto::v1 as csi;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{
    Event, EventSource, Node, ObjectReference, PersistentVolume, PersistentVolumeClaim, Pod,
};
use k8s_openapi::api::storage::v1::VolumeAttachment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use sha2::Digest;
use tonic::transport::Channel;

use crate::guest::DRIVER;
use crate::vm::{VmError, WorkerVm};
use kubevirt_csi_common::error_chain as chain;

/// Why the stand-in could not mount or unmount a pod's volumes.
#[derive(Debug, thiserror::Error)]
pub enum KubeletError {
    /// A guest API call failed.
    #[error("cannot {what}")]
    Api {
        what: String,
        #[source]
        source: kube::Error,
    },
    /// The pod, claim or volume lacks something kubelet needs.
    #[error("{0}")]
    Shape(String),
    /// Waiting for an object's state timed out.
    #[error("{what} not reached within {waited:?}")]
    Timeout { what: String, waited: Duration },
    /// A watch ended with an error.
    #[error("watch for {what} failed")]
    Watch {
        what: String,
        #[source]
        source: kube::runtime::watcher::Error,
    },
    /// A node plugin RPC failed.
    #[error("{rpc} for volume {volume} failed: {status}")]
    Rpc {
        rpc: &'static str,
        volume: String,
        status: tonic::Status,
    },
    /// A command inside the worker VM failed.
    #[error(transparent)]
    Vm(#[from] VmError),
}

/// A CSI volume of a pod, as kubelet resolves it.
#[derive(Clone, Debug)]
pub struct PodVolume {
    pub pv: String,
    pub volume_handle: String,
    pub fs_type: String,
    /// A raw block volume (PV volumeMode Block): no filesystem, the target is a device file.
    pub block: bool,
    pub staging_path: PathBuf,
    pub target_path: PathBuf,
    pub publish_context: HashMap<String, String>,
    /// The VolumeAttachment that attached it.
    pub attachment: String,
}

/// The stand-in for one node.
pub struct KubeletStandin<'a> {
    client: kube::Client,
    node: csi::node_client::NodeClient<Channel>,
    vm: &'a WorkerVm,
    node_name: String,
    root: PathBuf,
    timeout: Duration,
}

impl<'a> KubeletStandin<'a> {
    /// `root` is the kubelet root the node plugin accepts (a path inside the guest).
    pub fn new(
        client: kube::Client,
        node_channel: Channel,
        vm: &'a WorkerVm,
        node_name: &str,
        root: &Path,
    ) -> Self {
        Self {
            client,
            node: csi::node_client::NodeClient::new(node_channel),
            vm,
            node_name: node_name.to_string(),
            root: root.to_path_buf(),
            timeout: Duration::from_secs(90),
        }
    }

    /// Waits for the pod's CSI volumes to be attached to this node, then stages and
    /// publishes them. Returns the volumes in the pod's order.
    pub async fn mount_pod(&self, ns: &str, name: &str) -> Result<Vec<PodVolume>, KubeletError> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), ns);
        let pod = pods
            .get(name)
            .await
            .map_err(api(format!("get pod {ns}/{name}")))?;
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let sa = pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".into());
        let mut out = Vec::new();
        for (pv, claim) in self.pod_volumes(&pod).await? {
            let csi_src = pv
                .spec
                .as_ref()
                .and_then(|s| s.csi.clone())
                .ok_or_else(|| KubeletError::Shape(format!("pv {claim} is not a CSI volume")))?;
            let pv_name = pv.metadata.name.clone().unwrap_or_default();
            let handle = csi_src.volume_handle.clone();
            self.set_in_use(&handle, true).await?;
            // A volume the stand-in gives up on is no longer in use: it does not retry, and
            // the attach/detach controller must be free to detach it once the pod is gone.
            let mounted: Result<PodVolume, KubeletError> = async {
                let va = self.wait_attached(&pv_name).await?;
                let attachment = va.metadata.name.clone().unwrap_or_default();
                let publish_context: HashMap<String, String> = va
                    .status
                    .and_then(|s| s.attachment_metadata)
                    .unwrap_or_default()
                    .into_iter()
                    .collect();
                let block =
                    pv.spec.as_ref().and_then(|s| s.volume_mode.as_deref()) == Some("Block");
                // kubelet's own layout: a global mount per volume for filesystems; for block, a
                // staging directory and one device file per pod under volumeDevices.
                let (staging, target) = if block {
                    (
                        self.root.join(format!(
                            "plugins/kubernetes.io/csi/volumeDevices/staging/{pv_name}"
                        )),
                        self.root.join(format!(
                            "plugins/kubernetes.io/csi/volumeDevices/publish/{pv_name}/{uid}"
                        )),
                    )
                } else {
                    let hash = hex(&sha2::Sha256::digest(handle.as_bytes()));
                    (
                        self.root.join(format!(
                            "plugins/kubernetes.io/csi/{DRIVER}/{hash}/globalmount"
                        )),
                        self.root.join(format!(
                            "pods/{uid}/volumes/kubernetes.io~csi/{pv_name}/mount"
                        )),
                    )
                };
                let target_parent = target.parent().unwrap_or(&self.root).to_path_buf();
                self.vm
                    .exec_ok([
                        "mkdir".to_string(),
                        "-p".into(),
                        staging.display().to_string(),
                        target_parent.display().to_string(),
                    ])
                    .await?;
                let fs_type = csi_src.fs_type.clone().unwrap_or_else(|| "ext4".into());
                let cap = capability(&fs_type, block);
                let attrs: HashMap<String, String> = csi_src
                    .volume_attributes
                    .clone()
                    .unwrap_or_default()
                    .into_iter()
                    .collect();
                let mut node = self.node.clone();
                node.node_stage_volume(csi::NodeStageVolumeRequest {
                    volume_id: handle.clone(),
                    publish_context: publish_context.clone(),
                    staging_target_path: staging.display().to_string(),
                    volume_capability: Some(cap.clone()),
                    volume_context: attrs.clone(),
                    ..Default::default()
                })
                .await
                .map_err(rpc("NodeStageVolume", &handle))?;
                let mut ctx = attrs;
                ctx.insert("csi.storage.k8s.io/pod.name".into(), name.into());
                ctx.insert("csi.storage.k8s.io/pod.namespace".into(), ns.into());
                ctx.insert("csi.storage.k8s.io/pod.uid".into(), uid.clone());
                ctx.insert("csi.storage.k8s.io/serviceAccount.name".into(), sa.clone());
                ctx.insert("csi.storage.k8s.io/ephemeral".into(), "false".into());
                node.node_publish_volume(csi::NodePublishVolumeRequest {
                    volume_id: handle.clone(),
                    publish_context: publish_context.clone(),
                    staging_target_path: staging.display().to_string(),
                    target_path: target.display().to_string(),
                    volume_capability: Some(cap),
                    readonly: false,
                    volume_context: ctx,
                    ..Default::default()
                })
                .await
                .map_err(rpc("NodePublishVolume", &handle))?;
                Ok(PodVolume {
                    pv: pv_name,
                    volume_handle: handle.clone(),
                    fs_type,
                    block,
                    staging_path: staging,
                    target_path: target,
                    publish_context,
                    attachment,
                })
            }
            .await;
            match mounted {
                Ok(v) => out.push(v),
                Err(e) => {
                    if let Err(undo) = self.set_in_use(&handle, false).await {
                        tracing::warn!(volume = %handle, error = %undo, "cannot drop the volume from volumesInUse");
                    }
                    return Err(e);
                }
            }
        }
        Ok(out)
    }

    /// Unpublishes and unstages `volumes`, drops them from `volumesInUse`, and removes
    /// the pod (kubelet's part of a graceful deletion).
    pub async fn unmount_and_delete_pod(
        &self,
        ns: &str,
        name: &str,
        volumes: &[PodVolume],
    ) -> Result<(), KubeletError> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), ns);
        let mut node = self.node.clone();
        for v in volumes {
            node.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                volume_id: v.volume_handle.clone(),
                target_path: v.target_path.display().to_string(),
            })
            .await
            .map_err(rpc("NodeUnpublishVolume", &v.volume_handle))?;
            node.node_unstage_volume(csi::NodeUnstageVolumeRequest {
                volume_id: v.volume_handle.clone(),
                staging_target_path: v.staging_path.display().to_string(),
            })
            .await
            .map_err(rpc("NodeUnstageVolume", &v.volume_handle))?;
            self.set_in_use(&v.volume_handle, false).await?;
        }
        match pods
            .delete(name, &DeleteParams::default().grace_period(0))
            .await
        {
            Ok(_) => Ok(()),
            // Already gone (a second event for the same deletion).
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
            Err(source) => Err(KubeletError::Api {
                what: format!("delete pod {ns}/{name}"),
                source,
            }),
        }
    }

    /// NodeExpandVolume on a published volume, then the claim's status, as kubelet does
    /// after the external-resizer has grown the infra volume.
    pub async fn expand(
        &self,
        ns: &str,
        claim: &str,
        volume: &PodVolume,
        bytes: i64,
    ) -> Result<(), KubeletError> {
        let mut node = self.node.clone();
        node.node_expand_volume(csi::NodeExpandVolumeRequest {
            volume_id: volume.volume_handle.clone(),
            volume_path: volume.target_path.display().to_string(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: bytes,
                limit_bytes: 0,
            }),
            staging_target_path: volume.staging_path.display().to_string(),
            volume_capability: Some(capability(&volume.fs_type, volume.block)),
            ..Default::default()
        })
        .await
        .map_err(rpc("NodeExpandVolume", &volume.volume_handle))?;
        let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(self.client.clone(), ns);
        let status = serde_json::json!({"status": {
            "capacity": {"storage": bytes.to_string()},
            "conditions": null,
            "allocatedResourceStatuses": null,
        }});
        pvcs.patch_status(claim, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .map_err(api(format!("update pvc {ns}/{claim} status")))?;
        Ok(())
    }

    /// Runs until the watch fails: stages and publishes the volumes of every pod bound to
    /// this node, and when a pod is being deleted, unpublishes and unstages them and removes
    /// the pod. One pod at a time, like a kubelet with a single volume worker; a failure is
    /// logged and the pod left as it is.
    pub async fn run(&self) -> Result<(), KubeletError> {
        let pods: Api<Pod> = Api::all(self.client.clone());
        let cfg = watcher::Config::default().fields(&format!("spec.nodeName={}", self.node_name));
        let stream = watcher(pods, cfg).applied_objects();
        let mut stream = std::pin::pin!(stream);
        let mut mounted: HashMap<String, Vec<PodVolume>> = HashMap::new();
        let mut deleting: std::collections::HashSet<String> = Default::default();
        while let Some(pod) = stream.next().await {
            let pod = pod.map_err(|source| KubeletError::Watch {
                what: format!("pods on {}", self.node_name),
                source,
            })?;
            let uid = pod.metadata.uid.clone().unwrap_or_default();
            let ns = pod.metadata.namespace.clone().unwrap_or_default();
            let name = pod.metadata.name.clone().unwrap_or_default();
            if pod.metadata.deletion_timestamp.is_some() {
                // Further events for a pod already being torn down change nothing.
                if !deleting.insert(uid.clone()) {
                    continue;
                }
                let volumes = mounted.remove(&uid).unwrap_or_default();
                match self.unmount_and_delete_pod(&ns, &name, &volumes).await {
                    Ok(()) => {
                        tracing::info!(pod = %format!("{ns}/{name}"), "volumes torn down, pod removed")
                    }
                    Err(e) => {
                        tracing::warn!(pod = %format!("{ns}/{name}"), error = %e, "tearing down volumes failed")
                    }
                }
            } else if let std::collections::hash_map::Entry::Vacant(slot) = mounted.entry(uid) {
                let pod_name = format!("{ns}/{name}");
                let volumes = match self.mount_pod(&ns, &name).await {
                    Ok(volumes) => {
                        for v in &volumes {
                            tracing::info!(pod = %pod_name, pv = %v.pv, target = %v.target_path.display(), "volume staged and published");
                            let what = if v.block {
                                "device"
                            } else {
                                v.fs_type.as_str()
                            };
                            let message = format!(
                                "volume {pv} ({what}) staged at {staging} and published at {target} inside worker VM {vm} by the kubelet stand-in; no container will start (no container runtime), so the pod stays Pending",
                                pv = v.pv,
                                staging = v.staging_path.display(),
                                target = v.target_path.display(),
                                vm = self.node_name,
                            );
                            self.record_event(&pod, EventKind::Normal, MOUNTED_REASON, &message)
                                .await;
                        }
                        let message = format!(
                            "{} volume(s) staged and published by the kubelet stand-in",
                            volumes.len()
                        );
                        self.set_mounted_condition(&pod, true, "StagedAndPublished", &message)
                            .await;
                        volumes
                    }
                    Err(e) => {
                        // Not retried: recreate the pod.
                        tracing::warn!(pod = %pod_name, error = %e, "mounting volumes failed");
                        let message = format!(
                            "staging or publishing the pod's volumes failed: {}",
                            chain(&e)
                        );
                        self.record_event(&pod, EventKind::Warning, FAILED_MOUNT_REASON, &message)
                            .await;
                        self.set_mounted_condition(&pod, false, FAILED_MOUNT_REASON, &message)
                            .await;
                        Vec::new()
                    }
                };
                slot.insert(volumes);
            }
        }
        Ok(())
    }

    /// Records an Event on `pod`, as kubelet does for volume set-up, so `kubectl describe pod`
    /// shows that its volumes are in place although the pod itself never leaves Pending. A
    /// failure to record is logged only: the volumes themselves are what the stand-in is for.
    async fn record_event(&self, pod: &Pod, kind: EventKind, reason: &str, message: &str) {
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let pod_name = pod.metadata.name.clone().unwrap_or_default();
        let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::now(),
        );
        let nanos = now.0.as_nanosecond();
        let event = Event {
            metadata: ObjectMeta {
                // kubelet's own naming: the object's name and a unique suffix.
                name: Some(format!("{pod_name}.{nanos:x}")),
                namespace: Some(ns.clone()),
                ..Default::default()
            },
            involved_object: ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(pod_name.clone()),
                namespace: Some(ns.clone()),
                uid: pod.metadata.uid.clone(),
                resource_version: pod.metadata.resource_version.clone(),
                ..Default::default()
            },
            reason: Some(reason.into()),
            message: Some(message.into()),
            type_: Some(kind.as_str().into()),
            source: Some(EventSource {
                component: Some(EVENT_COMPONENT.into()),
                host: Some(self.node_name.clone()),
            }),
            first_timestamp: Some(now.clone()),
            last_timestamp: Some(now),
            count: Some(1),
            ..Default::default()
        };
        let events: Api<Event> = Api::namespaced(self.client.clone(), &ns);
        if let Err(e) = events.create(&PostParams::default(), &event).await {
            tracing::warn!(pod = %format!("{ns}/{pod_name}"), %reason, error = %e, "cannot record event");
        }
    }

    /// Sets the pod's [`MOUNTED_CONDITION`], so `kubectl wait --for=condition=VolumesMounted`
    /// can wait for the volumes of a pod that, with no container runtime, never runs. Like
    /// [`Self::record_event`], a failure is only logged.
    async fn set_mounted_condition(&self, pod: &Pod, ok: bool, reason: &str, message: &str) {
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::now(),
        );
        // Strategic merge: conditions merge by type, leaving the scheduler's alone.
        let patch = serde_json::json!({"status": {"conditions": [{
            "type": MOUNTED_CONDITION,
            "status": if ok { "True" } else { "False" },
            "reason": reason,
            "message": message,
            "lastTransitionTime": now,
        }]}});
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
        if let Err(e) = pods
            .patch_status(&name, &PatchParams::default(), &Patch::Strategic(&patch))
            .await
        {
            tracing::warn!(pod = %format!("{ns}/{name}"), error = %e, "cannot set the {MOUNTED_CONDITION} condition");
        }
    }

    async fn pod_volumes(
        &self,
        pod: &Pod,
    ) -> Result<Vec<(PersistentVolume, String)>, KubeletError> {
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(self.client.clone(), &ns);
        let pvs: Api<PersistentVolume> = Api::all(self.client.clone());
        let mut out = Vec::new();
        let volumes = pod
            .spec
            .as_ref()
            .and_then(|s| s.volumes.clone())
            .unwrap_or_default();
        for claim in volumes
            .iter()
            .filter_map(|v| v.persistent_volume_claim.as_ref())
            .map(|c| c.claim_name.clone())
        {
            // Kubelet waits for the claim to be bound (a pod and its claim are often
            // created together).
            let claim_name = claim.clone();
            let pvc = wait_for(
                pvcs.clone(),
                self.timeout,
                &format!("pvc {ns}/{claim} Bound"),
                move |p: &PersistentVolumeClaim| {
                    p.metadata.name.as_deref() == Some(claim_name.as_str())
                        && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound")
                },
            )
            .await?;
            let pv_name = pvc
                .spec
                .and_then(|s| s.volume_name)
                .ok_or_else(|| KubeletError::Shape(format!("pvc {ns}/{claim} is not bound")))?;
            let pv = pvs
                .get(&pv_name)
                .await
                .map_err(api(format!("get pv {pv_name}")))?;
            out.push((pv, claim));
        }
        Ok(out)
    }

    /// Waits (on a watch) for the VolumeAttachment of `pv` on this node to be attached.
    async fn wait_attached(&self, pv: &str) -> Result<VolumeAttachment, KubeletError> {
        let node = self.node_name.clone();
        let pv_name = pv.to_string();
        wait_for(
            Api::<VolumeAttachment>::all(self.client.clone()),
            self.timeout,
            &format!("VolumeAttachment of {pv} on {node} attached"),
            move |va: &VolumeAttachment| {
                va.spec.node_name == node
                    && va.spec.source.persistent_volume_name.as_deref() == Some(&pv_name)
                    && va.status.as_ref().is_some_and(|s| s.attached)
            },
        )
        .await
    }

    /// Adds or removes `kubernetes.io/csi/<driver>^<handle>` in the Node's volumesInUse.
    async fn set_in_use(&self, handle: &str, in_use: bool) -> Result<(), KubeletError> {
        let nodes: Api<Node> = Api::all(self.client.clone());
        let name = format!("kubernetes.io/csi/{DRIVER}^{handle}");
        let node = nodes
            .get_status(&self.node_name)
            .await
            .map_err(api(format!("get node {}", self.node_name)))?;
        let mut list = node
            .status
            .and_then(|s| s.volumes_in_use)
            .unwrap_or_default();
        list.retain(|v| v != &name);
        if in_use {
            list.push(name);
        }
        let patch = serde_json::json!({"status": {"volumesInUse": list}});
        nodes
            .patch_status(
                &self.node_name,
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
            .map_err(api(format!("update node {} volumesInUse", self.node_name)))?;
        Ok(())
    }
}

/// Reason of the Event the stand-in records on a pod once a volume of it is staged and
/// published (kubelet's name for a volume set up for a pod).
pub const MOUNTED_REASON: &str = "SuccessfulMountVolume";
/// Pod condition the stand-in sets once all of a pod's volumes are staged and published (True)
/// or one of them failed (False). Not one of kubelet's: kubelet has no such condition because
/// it goes on to start the containers, which here never happens.
pub const MOUNTED_CONDITION: &str = "VolumesMounted";
/// Reason of the Event recorded when staging or publishing a pod's volumes failed.
pub const FAILED_MOUNT_REASON: &str = "FailedMount";
/// `source.component` of the stand-in's Events.
pub const EVENT_COMPONENT: &str = "kubelet-standin";

/// Event types as Kubernetes spells them.
#[derive(Clone, Copy, Debug)]
enum EventKind {
    Normal,
    Warning,
}

impl EventKind {
    fn as_str(self) -> &'static str {
        match self {
            EventKind::Normal => "Normal",
            EventKind::Warning => "Warning",
        }
    }
}

/// Waits on a watch of `api` until an object satisfies `pred`; returns that object.
pub async fn wait_for<K>(
    api: Api<K>,
    timeout: Duration,
    what: &str,
    pred: impl Fn(&K) -> bool + Send + 'static,
) -> Result<K, KubeletError>
where
    K: kube::Resource + Clone + std::fmt::Debug + Send + serde::de::DeserializeOwned + 'static,
{
    let stream = watcher(api, watcher::Config::default())
        .applied_objects()
        .try_filter(move |o| futures::future::ready(pred(o)));
    let mut stream = std::pin::pin!(stream);
    match tokio::time::timeout(timeout, stream.next()).await {
        Ok(Some(Ok(o))) => Ok(o),
        Ok(Some(Err(source))) => Err(KubeletError::Watch {
            what: what.into(),
            source,
        }),
        Ok(None) | Err(_) => Err(KubeletError::Timeout {
            what: what.into(),
            waited: timeout,
        }),
    }
}

fn capability(fs_type: &str, block: bool) -> csi::VolumeCapability {
    use csi::volume_capability::{AccessType, BlockVolume, MountVolume};
    csi::VolumeCapability {
        access_mode: Some(csi::volume_capability::AccessMode {
            mode: csi::volume_capability::access_mode::Mode::SingleNodeWriter as i32,
        }),
        access_type: Some(if block {
            AccessType::Block(BlockVolume {})
        } else {
            AccessType::Mount(MountVolume {
                fs_type: fs_type.into(),
                ..Default::default()
            })
        }),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn api(what: String) -> impl FnOnce(kube::Error) -> KubeletError {
    move |source| KubeletError::Api { what, source }
}

fn rpc(rpc: &'static str, volume: &str) -> impl FnOnce(tonic::Status) -> KubeletError {
    let volume = volume.to_string();
    move |status| KubeletError::Rpc {
        rpc,
        volume,
        status,
    }
}

/// A scheduler stand-in: binds every pod that names no node to `node` (the guest has one
/// worker and no kube-scheduler). Runs until its watch fails.
pub async fn bind_unscheduled_pods(client: kube::Client, node: String) -> Result<(), KubeletError> {
    let pods: Api<Pod> = Api::all(client.clone());
    let stream = watcher(pods, watcher::Config::default()).applied_objects();
    let mut stream = std::pin::pin!(stream);
    while let Some(pod) = stream.next().await {
        let pod = pod.map_err(|source| KubeletError::Watch {
            what: "pods to schedule".into(),
            source,
        })?;
        let unscheduled = pod.spec.as_ref().is_some_and(|s| s.node_name.is_none());
        if !unscheduled || pod.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        let binding = serde_json::json!({
            "apiVersion": "v1", "kind": "Binding",
            "metadata": {"name": name, "namespace": ns},
            "target": {"apiVersion": "v1", "kind": "Node", "name": node},
        });
        let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
        match api
            .create_subresource::<_, serde_json::Value>(
                "binding",
                &name,
                &kube::api::PostParams::default(),
                &binding,
            )
            .await
        {
            Ok(_) => tracing::info!(pod = %format!("{ns}/{name}"), %node, "bound pod"),
            // Already bound (a second event for the same pod) or gone meanwhile.
            Err(kube::Error::Api(e)) if e.code == 409 || e.code == 404 => {}
            Err(source) => {
                return Err(KubeletError::Api {
                    what: format!("bind pod {ns}/{name} to {node}"),
                    source,
                });
            }
        }
    }
    Ok(())
}
