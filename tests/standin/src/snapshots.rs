//! VolumeSnapshots: a copy of the source PVC's file, a VolumeSnapshotContent for it, and
//! readyToUse/restoreSize on the snapshot. Deleting the snapshot removes content and copy.

use crate::context::{Ctx, DRIVER, MANAGER};
use crate::error::Error;
use crate::faults::Operation;
use crate::files::{self, snapshot_content_name};
use crate::provisioner::bound_volume;
use crate::quantity::format_bytes;
use crate::types::{
    SnapshotError, VolumeSnapshot, VolumeSnapshotContent, VsStatus, VscSource, VscSpec, VscStatus,
    vs_resource, vsc_resource,
};
use crate::update::{
    Change, add_finalizer, delete_ignoring_missing, is_already_exists, now_rfc3339,
    remove_finalizer, update,
};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{ObjectReference, PersistentVolumeClaim};
use kube::api::{Api, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use std::sync::Arc;
use std::time::Duration;
use tracing::{Instrument, info, info_span, warn};

pub const VS_FINALIZER: &str = "standin.kubevirt-csi.io/snapshot";

async fn set_error(ctx: &Ctx, vs: &VolumeSnapshot, message: &str) -> Result<(), Error> {
    let api: Api<VolumeSnapshot> = Api::namespaced_with(
        ctx.client.clone(),
        &vs.namespace().unwrap_or_default(),
        &vs_resource(),
    );
    update(
        &api,
        &vs.name_any(),
        ctx.status.vs,
        true,
        |s: &mut VolumeSnapshot| {
            let st = s.status.get_or_insert_with(VsStatus::default);
            if st.error.as_ref().and_then(|e| e.message.as_deref()) == Some(message) {
                return Ok::<_, Error>(Change::Keep(()));
            }
            st.ready_to_use = Some(false);
            st.error = Some(SnapshotError {
                message: Some(message.into()),
                time: Some(now_rfc3339()),
            });
            Ok(Change::Write(()))
        },
    )
    .await?;
    Ok(())
}

async fn reconcile(vs: Arc<VolumeSnapshot>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let span = info_span!("volumesnapshot", namespace = %vs.namespace().unwrap_or_default(), name = %vs.name_any());
    reconcile_inner(vs, ctx).instrument(span).await
}

async fn reconcile_inner(vs: Arc<VolumeSnapshot>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let ns = vs.namespace().unwrap_or_default();
    let name = vs.name_any();
    let uid = vs.uid().unwrap_or_default();
    let vss: Api<VolumeSnapshot> = Api::namespaced_with(ctx.client.clone(), &ns, &vs_resource());
    let vscs: Api<VolumeSnapshotContent> = Api::all_with(ctx.client.clone(), &vsc_resource());
    let content = snapshot_content_name(&uid)?;
    let path = ctx.data.snapshot_path(&uid)?;
    if vs.meta().deletion_timestamp.is_some() {
        if vs.finalizers().iter().any(|f| f == VS_FINALIZER) {
            delete_ignoring_missing(&vscs, &content).await?;
            files::blocking(move || files::remove(&path)).await?;
            remove_finalizer(&vss, &name, VS_FINALIZER).await?;
            info!(content, "snapshot deleted");
        }
        return Ok(Action::await_change());
    }
    if vs.status.as_ref().and_then(|s| s.ready_to_use) == Some(true) {
        return Ok(Action::await_change());
    }
    let Some(claim) = vs.spec.source.persistent_volume_claim_name.clone() else {
        set_error(
            &ctx,
            &vs,
            "only dynamic snapshots of a persistentVolumeClaimName are supported",
        )
        .await?;
        return Ok(Action::await_change());
    };
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &ns);
    let Some(bound) = pvcs
        .get_opt(&claim)
        .await?
        .and_then(|p| bound_volume(&ctx, &p))
    else {
        set_error(
            &ctx,
            &vs,
            &format!("source PersistentVolumeClaim {claim} is not bound"),
        )
        .await?;
        return Ok(Action::await_change());
    };
    if !vs.finalizers().iter().any(|f| f == VS_FINALIZER) {
        add_finalizer(&vss, &name, VS_FINALIZER).await?;
    }
    ctx.faults.wait(Operation::Snapshot).await;
    if let Some(f) = ctx.faults.take_failure(Operation::Snapshot) {
        set_error(&ctx, &vs, &f.message).await?;
        return Err(Error::Injected {
            op: Operation::Snapshot,
            message: f.message,
        });
    }
    let size = {
        let (src, dst) = (bound.path.clone(), path.clone());
        files::blocking(move || files::sparse_copy(&src, &dst, 0)).await?
    };
    let size_i64 = i64::try_from(size).unwrap_or(i64::MAX);
    let mut vsc = VolumeSnapshotContent::new(
        &content,
        &vsc_resource(),
        VscSpec {
            deletion_policy: "Delete".into(),
            driver: DRIVER.into(),
            source: VscSource {
                volume_handle: Some(bound.pv_name.clone()),
                snapshot_handle: None,
            },
            volume_snapshot_ref: ObjectReference {
                api_version: Some("snapshot.storage.k8s.io/v1".into()),
                kind: Some("VolumeSnapshot".into()),
                name: Some(name.clone()),
                namespace: Some(ns.clone()),
                uid: Some(uid.clone()),
                ..Default::default()
            },
            volume_snapshot_class_name: vs.spec.volume_snapshot_class_name.clone(),
            source_volume_mode: Some(bound.volume_mode.clone()),
        },
    );
    vsc.metadata.annotations = Some(
        [(
            "standin.kubevirt-csi.io/file".to_string(),
            path.display().to_string(),
        )]
        .into(),
    );
    match vscs
        .create(
            &PostParams {
                field_manager: Some(MANAGER.into()),
                ..Default::default()
            },
            &vsc,
        )
        .await
    {
        Ok(_) => {}
        Err(e) if is_already_exists(&e) => {}
        Err(e) => return Err(e.into()),
    }
    let created_ns = k8s_openapi::jiff::Timestamp::now().as_nanosecond();
    let created_ns = i64::try_from(created_ns).unwrap_or(i64::MAX);
    let handle = format!("snapshot-{uid}");
    update(
        &vscs,
        &content,
        ctx.status.vsc,
        true,
        |c: &mut VolumeSnapshotContent| {
            if c.status.as_ref().and_then(|s| s.ready_to_use) == Some(true) {
                return Ok::<_, Error>(Change::Keep(()));
            }
            c.status = Some(VscStatus {
                snapshot_handle: Some(handle.clone()),
                ready_to_use: Some(true),
                restore_size: Some(size_i64),
                creation_time: Some(created_ns),
            });
            Ok(Change::Write(()))
        },
    )
    .await?;
    update(
        &vss,
        &name,
        ctx.status.vs,
        true,
        |s: &mut VolumeSnapshot| {
            let st = s.status.get_or_insert_with(VsStatus::default);
            st.bound_volume_snapshot_content_name = Some(content.clone());
            st.ready_to_use = Some(true);
            st.restore_size = Some(format_bytes(size));
            st.creation_time = Some(now_rfc3339());
            st.error = None;
            Ok::<_, Error>(Change::Write(()))
        },
    )
    .await?;
    info!(content, size, "snapshot ready");
    Ok(Action::await_change())
}

fn error_policy(vs: Arc<VolumeSnapshot>, err: &Error, _ctx: Arc<Ctx>) -> Action {
    warn!(namespace = ?vs.namespace(), volumesnapshot = %vs.name_any(), error = %err, "snapshot reconcile failed; retrying");
    Action::requeue(Duration::from_millis(500))
}

pub fn controller(
    ctx: Arc<Ctx>,
) -> (
    impl std::future::Future<Output = ()>,
    impl std::future::Future<Output = ()>,
) {
    let ar = vs_resource();
    let vss: Api<VolumeSnapshot> = Api::all_with(ctx.client.clone(), &ar);
    let mw = crate::watches::main_watch(vss, ar.clone());
    let c = Controller::for_stream_with(mw.stream, mw.store.clone(), ar.clone());
    let store = mw.store.clone();
    let s = store.clone();
    // A snapshot waiting for its PVC to be bound re-runs when that PVC changes.
    let run = c
        .watches(
            Api::<PersistentVolumeClaim>::all(ctx.client.clone()),
            watcher::Config::default(),
            move |p: PersistentVolumeClaim| {
                let (ns, name) = (p.namespace(), p.name_any());
                s.state()
                    .into_iter()
                    .filter(|v| {
                        v.namespace() == ns
                            && v.spec.source.persistent_volume_claim_name.as_deref()
                                == Some(name.as_str())
                    })
                    .filter(|v| v.status.as_ref().and_then(|s| s.ready_to_use) != Some(true))
                    .map(|v| ObjectRef::from_obj_with(&*v, ar.clone()))
                    .collect::<Vec<_>>()
            },
        )
        .run(reconcile, error_policy, ctx)
        .for_each(|_| futures::future::ready(()));
    let ready = mw.ready;
    (ready, run)
}
