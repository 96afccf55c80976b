//! The infra storage provisioner and binder: one sparse file and one PV per PVC, bound by the
//! stand-in itself (the infra cluster has no kube-controller-manager); PVC growth; cleanup.

use crate::context::{Ctx, DRIVER, MANAGER};
use crate::error::Error;
use crate::faults::Operation;
use crate::files::{self, pv_name};
use crate::quantity::{format_bytes, parse_bytes};
use crate::types::{VolumeSnapshot, vs_resource};
use crate::update::{
    Change, StatusWrites, add_finalizer, delete_ignoring_missing, is_already_exists,
    remove_finalizer, update,
};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{
    HostPathVolumeSource, ObjectReference, PersistentVolume, PersistentVolumeClaim,
    PersistentVolumeClaimStatus, PersistentVolumeSpec, PersistentVolumeStatus,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tracing::{Instrument, info, info_span, warn};

/// Finalizer the stand-in keeps on PVCs it provisions, removed once PV and file are gone.
pub const PVC_FINALIZER: &str = "standin.kubevirt-csi.io/provisioner";
/// Added by the apiserver's StorageObjectInUseProtection admission; normally removed by
/// kube-controller-manager, which this cluster does not run.
pub const PVC_PROTECTION: &str = "kubernetes.io/pvc-protection";
pub const PV_PROTECTION: &str = "kubernetes.io/pv-protection";
/// Where the content of a new PVC comes from (set by the DataVolume controller).
pub const CONTENT_SOURCE_ANNOTATION: &str = "standin.kubevirt-csi.io/content-source";
/// PVCs with this annotation are left alone.
pub const IGNORE_ANNOTATION: &str = "standin.kubevirt-csi.io/ignore";

/// Content to put in a new volume.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum ContentSource {
    /// Zeroes.
    Blank,
    /// A copy of another PVC's bytes.
    Pvc { namespace: String, name: String },
    /// A copy of a VolumeSnapshot's bytes.
    Snapshot { namespace: String, name: String },
}

impl ContentSource {
    /// Reads the content source of a PVC: the stand-in annotation, else `spec.dataSourceRef`
    /// (or `dataSource`) naming a PVC or a VolumeSnapshot, else blank.
    pub fn of(pvc: &PersistentVolumeClaim) -> Result<Self, Error> {
        let ns = pvc.namespace().unwrap_or_default();
        if let Some(a) = pvc.annotations().get(CONTENT_SOURCE_ANNOTATION) {
            return serde_json::from_str(a).map_err(|e| Error::Unsupported {
                kind: "PersistentVolumeClaim",
                name: pvc.name_any(),
                message: format!("invalid {CONTENT_SOURCE_ANNOTATION} annotation: {e}"),
            });
        }
        let spec = pvc.spec.as_ref();
        if let Some(r) = spec.and_then(|s| s.data_source_ref.as_ref()) {
            let ns = r.namespace.clone().unwrap_or(ns);
            return Self::from_ref(
                r.api_group.as_deref(),
                &r.kind,
                ns,
                r.name.clone(),
                &pvc.name_any(),
            );
        }
        if let Some(r) = spec.and_then(|s| s.data_source.as_ref()) {
            return Self::from_ref(
                r.api_group.as_deref(),
                &r.kind,
                ns,
                r.name.clone(),
                &pvc.name_any(),
            );
        }
        Ok(Self::Blank)
    }

    pub fn from_ref(
        group: Option<&str>,
        kind: &str,
        namespace: String,
        name: String,
        owner: &str,
    ) -> Result<Self, Error> {
        match (group.unwrap_or(""), kind) {
            ("", "PersistentVolumeClaim") => Ok(Self::Pvc { namespace, name }),
            ("snapshot.storage.k8s.io", "VolumeSnapshot") => Ok(Self::Snapshot { namespace, name }),
            (g, k) => Err(Error::Unsupported {
                kind: "PersistentVolumeClaim",
                name: owner.to_string(),
                message: format!("unsupported data source {k}.{g}"),
            }),
        }
    }
}

pub fn requested_bytes(pvc: &PersistentVolumeClaim) -> Result<Option<u64>, Error> {
    pvc.spec
        .as_ref()
        .and_then(|s| s.resources.as_ref())
        .and_then(|r| r.requests.as_ref())
        .and_then(|r| r.get("storage"))
        .map(|q| parse_bytes(&q.0).map_err(Error::from))
        .transpose()
}

fn capacity_bytes(pvc: &PersistentVolumeClaim) -> Option<u64> {
    pvc.status
        .as_ref()
        .and_then(|s| s.capacity.as_ref())
        .and_then(|c| c.get("storage"))
        .and_then(|q| parse_bytes(&q.0).ok())
}

fn is_ours(pvc: &PersistentVolumeClaim) -> bool {
    pvc.finalizers().iter().any(|f| f == PVC_FINALIZER)
}

/// A bound PVC provisioned by the stand-in: its PV name and backing file.
#[derive(Clone, Debug)]
pub struct BoundVolume {
    pub pv_name: String,
    pub path: PathBuf,
    pub size: u64,
    pub volume_mode: String,
    pub access_modes: Vec<String>,
}

/// Returns the backing file of a PVC if it is bound to a PV the stand-in made.
pub fn bound_volume(ctx: &Ctx, pvc: &PersistentVolumeClaim) -> Option<BoundVolume> {
    let uid = pvc.uid()?;
    let pv = pv_name(&uid).ok()?;
    let spec = pvc.spec.as_ref()?;
    let bound = spec.volume_name.as_deref() == Some(pv.as_str())
        && pvc.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound");
    if !bound {
        return None;
    }
    Some(BoundVolume {
        path: ctx.data.volume_path(&uid).ok()?,
        pv_name: pv,
        size: capacity_bytes(pvc).unwrap_or(0),
        volume_mode: spec
            .volume_mode
            .clone()
            .unwrap_or_else(|| "Filesystem".into()),
        access_modes: spec.access_modes.clone().unwrap_or_default(),
    })
}

/// Deletes the PV and file of a PVC and drops the finalizers that hold it (ours and
/// pvc-protection). Idempotent; used for PVC deletion and DataVolume deletion.
pub async fn release(ctx: &Ctx, pvc: &PersistentVolumeClaim) -> Result<(), Error> {
    let ns = pvc.namespace().unwrap_or_default();
    let name = pvc.name_any();
    if let Some(uid) = pvc.uid() {
        let pv = pv_name(&uid)?;
        let pvs: Api<PersistentVolume> = Api::all(ctx.client.clone());
        if pvs.get_opt(&pv).await?.is_some() {
            remove_finalizer(&pvs, &pv, PV_PROTECTION).await?;
            delete_ignoring_missing(&pvs, &pv).await?;
        }
        let path = ctx.data.volume_path(&uid)?;
        files::blocking(move || files::remove(&path)).await?;
    }
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &ns);
    remove_finalizer(&pvcs, &name, PVC_FINALIZER).await?;
    remove_finalizer(&pvcs, &name, PVC_PROTECTION).await?;
    info!(namespace = %ns, pvc = %name, "released volume");
    Ok(())
}

/// Resolves the file to copy from, or `None` while the source is not ready yet.
async fn source_file(ctx: &Ctx, src: &ContentSource) -> Result<Option<(PathBuf, u64)>, Error> {
    match src {
        ContentSource::Blank => Ok(None),
        ContentSource::Pvc { namespace, name } => {
            let api: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), namespace);
            let Some(p) = api.get_opt(name).await? else {
                return Ok(None);
            };
            Ok(bound_volume(ctx, &p).map(|b| (b.path, b.size)))
        }
        ContentSource::Snapshot { namespace, name } => {
            let api: Api<VolumeSnapshot> =
                Api::namespaced_with(ctx.client.clone(), namespace, &vs_resource());
            let Some(vs) = api.get_opt(name).await? else {
                return Ok(None);
            };
            let st = vs.status.as_ref();
            if st.and_then(|s| s.ready_to_use) != Some(true) {
                return Ok(None);
            }
            let size = st
                .and_then(|s| s.restore_size.as_deref())
                .and_then(|q| parse_bytes(q).ok())
                .unwrap_or(0);
            let uid = vs.uid().unwrap_or_default();
            Ok(Some((ctx.data.snapshot_path(&uid)?, size)))
        }
    }
}

async fn reconcile(pvc: Arc<PersistentVolumeClaim>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let ns = pvc.namespace().unwrap_or_default();
    let name = pvc.name_any();
    let span = info_span!("pvc", namespace = %ns, name = %name);
    reconcile_inner(pvc, ctx).instrument(span).await
}

async fn reconcile_inner(pvc: Arc<PersistentVolumeClaim>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    if pvc.annotations().contains_key(IGNORE_ANNOTATION) {
        return Ok(Action::await_change());
    }
    let ns = pvc.namespace().unwrap_or_default();
    let name = pvc.name_any();
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &ns);
    if pvc.meta().deletion_timestamp.is_some() {
        if is_ours(&pvc) || pvc.finalizers().iter().any(|f| f == PVC_PROTECTION) {
            release(&ctx, &pvc).await?;
        }
        return Ok(Action::await_change());
    }
    let Some(uid) = pvc.uid() else {
        return Ok(Action::await_change());
    };
    let pv = pv_name(&uid)?;
    let spec = pvc.spec.clone().unwrap_or_default();
    match spec.volume_name.as_deref() {
        None | Some("") => {}
        Some(v) if v == pv => return finish_bound(&ctx, &pvc).await,
        // Statically bound to some other PV: not ours.
        Some(_) => return Ok(Action::await_change()),
    }
    let Some(size) = requested_bytes(&pvc)? else {
        return Err(Error::MissingField {
            kind: "PersistentVolumeClaim",
            name,
            field: "spec.resources.requests.storage",
        });
    };
    let source = ContentSource::of(&pvc)?;
    let from = match &source {
        ContentSource::Blank => None,
        other => match source_file(&ctx, other).await? {
            Some(f) => Some(f),
            None => {
                info!(?source, "waiting for the content source to be ready");
                return Ok(Action::await_change());
            }
        },
    };
    if !is_ours(&pvc) {
        add_finalizer(&pvcs, &name, PVC_FINALIZER).await?;
    }
    ctx.faults.wait(Operation::Provision).await;
    if let Some(f) = ctx.faults.take_failure(Operation::Provision) {
        return Err(Error::Injected {
            op: Operation::Provision,
            message: f.message,
        });
    }
    let path = ctx.data.volume_path(&uid)?;
    let size = {
        let path = path.clone();
        match from {
            None => files::blocking(move || files::create_sparse(&path, size)).await?,
            Some((src, _)) => {
                if path.exists() {
                    files::blocking(move || files::grow(&path, size)).await?
                } else {
                    files::blocking(move || files::sparse_copy(&src, &path, size)).await?
                }
            }
        }
    };
    let access_modes = spec
        .access_modes
        .clone()
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| vec!["ReadWriteOnce".into()]);
    let volume_mode = spec
        .volume_mode
        .clone()
        .unwrap_or_else(|| "Filesystem".into());
    let capacity = BTreeMap::from([("storage".to_string(), Quantity(format_bytes(size)))]);
    let pv_obj = PersistentVolume {
        metadata: ObjectMeta {
            name: Some(pv.clone()),
            annotations: Some(BTreeMap::from([
                (
                    "pv.kubernetes.io/provisioned-by".to_string(),
                    DRIVER.to_string(),
                ),
                (
                    "standin.kubevirt-csi.io/file".to_string(),
                    path.display().to_string(),
                ),
            ])),
            ..Default::default()
        },
        spec: Some(PersistentVolumeSpec {
            capacity: Some(capacity.clone()),
            access_modes: Some(access_modes.clone()),
            volume_mode: Some(volume_mode.clone()),
            storage_class_name: spec.storage_class_name.clone(),
            persistent_volume_reclaim_policy: Some("Delete".into()),
            host_path: Some(HostPathVolumeSource {
                path: path.display().to_string(),
                type_: None,
            }),
            claim_ref: Some(ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("PersistentVolumeClaim".into()),
                namespace: Some(ns.clone()),
                name: Some(name.clone()),
                uid: Some(uid.clone()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        status: None,
    };
    let pvs: Api<PersistentVolume> = Api::all(ctx.client.clone());
    match pvs
        .create(
            &PostParams {
                field_manager: Some(MANAGER.into()),
                ..Default::default()
            },
            &pv_obj,
        )
        .await
    {
        Ok(_) => {}
        Err(e) if is_already_exists(&e) => {}
        Err(e) => return Err(e.into()),
    }
    update(
        &pvs,
        &pv,
        StatusWrites::Subresource,
        true,
        |p: &mut PersistentVolume| {
            let st = p.status.get_or_insert_with(PersistentVolumeStatus::default);
            if st.phase.as_deref() == Some("Bound") {
                return Ok::<_, Error>(Change::Keep(()));
            }
            st.phase = Some("Bound".into());
            Ok(Change::Write(()))
        },
    )
    .await?;
    update(
        &pvcs,
        &name,
        StatusWrites::MainResource,
        false,
        |c: &mut PersistentVolumeClaim| {
            let s = c.spec.get_or_insert_with(Default::default);
            if s.volume_name.as_deref() == Some(pv.as_str()) {
                return Ok::<_, Error>(Change::Keep(()));
            }
            s.volume_name = Some(pv.clone());
            let a = c.metadata.annotations.get_or_insert_with(BTreeMap::new);
            a.insert("pv.kubernetes.io/bind-completed".into(), "yes".into());
            a.insert("pv.kubernetes.io/bound-by-controller".into(), "yes".into());
            a.insert(
                "volume.kubernetes.io/storage-provisioner".into(),
                DRIVER.into(),
            );
            Ok(Change::Write(()))
        },
    )
    .await?;
    info!(pv = %pv, size, ?source, "provisioned and bound");
    let Some(fresh) = pvcs.get_opt(&name).await? else {
        return Ok(Action::await_change());
    };
    finish_bound(&ctx, &fresh).await
}

/// A PVC bound to our PV: make its status say so, and grow it when asked.
async fn finish_bound(ctx: &Ctx, pvc: &PersistentVolumeClaim) -> Result<Action, Error> {
    let ns = pvc.namespace().unwrap_or_default();
    let name = pvc.name_any();
    let uid = pvc.uid().unwrap_or_default();
    let path = ctx.data.volume_path(&uid)?;
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &ns);
    let pvs: Api<PersistentVolume> = Api::all(ctx.client.clone());
    let pv = pv_name(&uid)?;
    let requested = requested_bytes(pvc)?.unwrap_or(0);
    let mut size = {
        let path = path.clone();
        files::blocking(move || files::size_of(&path)).await?
    };
    if requested > size {
        ctx.faults.wait(Operation::Expand).await;
        if let Some(f) = ctx.faults.take_failure(Operation::Expand) {
            return Err(Error::Injected {
                op: Operation::Expand,
                message: f.message,
            });
        }
        let p = path.clone();
        size = files::blocking(move || files::grow(&p, requested)).await?;
        info!(size, "expanded volume");
        ctx.backends.resized(&path, size).await;
    }
    let cap = Quantity(format_bytes(size));
    update(
        &pvs,
        &pv,
        StatusWrites::MainResource,
        false,
        |p: &mut PersistentVolume| {
            let s = p.spec.get_or_insert_with(Default::default);
            let c = s.capacity.get_or_insert_with(BTreeMap::new);
            if c.get("storage") == Some(&cap) {
                return Ok::<_, Error>(Change::Keep(()));
            }
            c.insert("storage".into(), cap.clone());
            Ok(Change::Write(()))
        },
    )
    .await?;
    let spec = pvc.spec.clone().unwrap_or_default();
    update(
        &pvcs,
        &name,
        StatusWrites::Subresource,
        true,
        |c: &mut PersistentVolumeClaim| {
            let want = PersistentVolumeClaimStatus {
                phase: Some("Bound".into()),
                access_modes: spec
                    .access_modes
                    .clone()
                    .filter(|m| !m.is_empty())
                    .or_else(|| Some(vec!["ReadWriteOnce".into()])),
                capacity: Some(BTreeMap::from([("storage".to_string(), cap.clone())])),
                ..c.status.clone().unwrap_or_default()
            };
            if c.status.as_ref() == Some(&want) {
                return Ok::<_, Error>(Change::Keep(()));
            }
            c.status = Some(want);
            Ok(Change::Write(()))
        },
    )
    .await?;
    Ok(Action::await_change())
}

fn error_policy(pvc: Arc<PersistentVolumeClaim>, err: &Error, _ctx: Arc<Ctx>) -> Action {
    warn!(namespace = ?pvc.namespace(), pvc = %pvc.name_any(), error = %err, "pvc reconcile failed; retrying");
    Action::requeue(Duration::from_millis(500))
}

/// Builds the PVC controller. Returns a future that resolves when `ready` is, plus the run loop.
pub fn controller(
    ctx: Arc<Ctx>,
) -> (
    impl std::future::Future<Output = ()>,
    impl std::future::Future<Output = ()>,
) {
    let client = ctx.client.clone();
    let pvcs: Api<PersistentVolumeClaim> = Api::all(client.clone());
    let mw = crate::watches::main_watch(pvcs.clone(), ());
    let c = Controller::for_stream_with(mw.stream, mw.store.clone(), ());
    let store = mw.store.clone();
    let s1 = store.clone();
    // A PVC whose content comes from another PVC or snapshot waits on it: re-run it when that
    // source changes.
    let waiting_on = move |kind: &'static str, ns: String, name: String| {
        s1.state()
            .into_iter()
            .filter(|p| {
                p.spec
                    .as_ref()
                    .and_then(|s| s.volume_name.as_deref())
                    .unwrap_or("")
                    .is_empty()
            })
            .filter(|p| match ContentSource::of(p) {
                Ok(ContentSource::Pvc { namespace, name: n }) => {
                    kind == "pvc" && namespace == ns && n == name
                }
                Ok(ContentSource::Snapshot { namespace, name: n }) => {
                    kind == "snapshot" && namespace == ns && n == name
                }
                _ => false,
            })
            .map(|p| ObjectRef::from_obj(&*p))
            .collect::<Vec<_>>()
    };
    let w1 = waiting_on.clone();
    let run = c
        .watches(
            pvcs,
            watcher::Config::default(),
            move |p: PersistentVolumeClaim| {
                w1("pvc", p.namespace().unwrap_or_default(), p.name_any())
            },
        )
        .watches_with(
            Api::<VolumeSnapshot>::all_with(client, &vs_resource()),
            vs_resource(),
            watcher::Config::default(),
            move |s: VolumeSnapshot| {
                waiting_on("snapshot", s.namespace().unwrap_or_default(), s.name_any())
            },
        )
        .run(reconcile, error_policy, ctx)
        .for_each(|_| futures::future::ready(()));
    let ready = mw.ready;
    (ready, run)
}
