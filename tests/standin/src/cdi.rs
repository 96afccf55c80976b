//! The CDI stand-in: a DataVolume becomes a PVC (owned by it, named like it), whose
//! provisioning the provisioner does; the DataVolume's status follows the PVC.

use crate::context::{Ctx, MANAGER};
use crate::error::Error;
use crate::provisioner::{CONTENT_SOURCE_ANNOTATION, ContentSource, bound_volume, release};
use crate::types::{Condition, DataVolume, DvStatus, dv_resource};
use crate::update::{
    Change, add_finalizer, is_already_exists, now_rfc3339, remove_finalizer, update,
};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, PersistentVolumeClaimSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tracing::{Instrument, info, info_span, warn};

/// The finalizer CDI puts on DataVolumes.
pub const DV_FINALIZER: &str = "cdi.kubevirt.io/dataVolumeFinalizer";

/// What the PVC for a DataVolume looks like, and where its content comes from.
#[derive(Debug, PartialEq)]
pub struct ClaimPlan {
    pub spec: PersistentVolumeClaimSpec,
    pub source: ContentSource,
}

/// Translates a DataVolume spec into the PVC to create (pure, unit-tested).
///
/// `spec.pvc` is taken exactly; `spec.storage` gets defaults as a StorageProfile-less CDI
/// would: ReadWriteOnce and Filesystem. Data sources become a stand-in annotation because a
/// PVC `dataSourceRef` cannot point into another namespace.
pub fn plan_claim(dv: &DataVolume) -> Result<ClaimPlan, Error> {
    let name = dv.name_any();
    let ns = dv.namespace().unwrap_or_default();
    let unsupported = |message: String| Error::Unsupported {
        kind: "DataVolume",
        name: name.clone(),
        message,
    };
    let (mut spec, exact) = match (&dv.spec.pvc, &dv.spec.storage) {
        (Some(p), None) => (p.clone(), true),
        (None, Some(s)) => (s.clone(), false),
        (Some(_), Some(_)) => {
            return Err(unsupported(
                "spec.pvc and spec.storage are mutually exclusive".into(),
            ));
        }
        (None, None) => {
            return Err(unsupported(
                "one of spec.pvc or spec.storage is required".into(),
            ));
        }
    };
    let reference = spec
        .data_source_ref
        .take()
        .map(|r| (r.api_group, r.kind, r.namespace, r.name));
    let plain = spec
        .data_source
        .take()
        .map(|r| (r.api_group, r.kind, None, r.name));
    let from_spec = reference
        .or(plain)
        .map(|(g, k, n, nm)| {
            ContentSource::from_ref(g.as_deref(), &k, n.unwrap_or_else(|| ns.clone()), nm, &name)
        })
        .transpose()?;
    let src = dv.spec.source.as_ref();
    let from_source = if let Some(p) = src.and_then(|s| s.pvc.as_ref()) {
        Some(ContentSource::Pvc {
            namespace: p.namespace.clone().unwrap_or_else(|| ns.clone()),
            name: p.name.clone(),
        })
    } else if let Some(s) = src.and_then(|s| s.snapshot.as_ref()) {
        Some(ContentSource::Snapshot {
            namespace: s.namespace.clone().unwrap_or_else(|| ns.clone()),
            name: s.name.clone(),
        })
    } else if src.is_some_and(|s| s.blank.is_some()) || src.is_none() {
        None
    } else {
        let kinds: Vec<_> = src
            .map(|s| s.extra.keys().cloned().collect())
            .unwrap_or_default();
        return Err(unsupported(format!(
            "unsupported source {kinds:?} (only blank, pvc and snapshot)"
        )));
    };
    if from_spec.is_some() && from_source.is_some() {
        return Err(unsupported(
            "both spec.source and a dataSourceRef are set".into(),
        ));
    }
    let source = from_spec.or(from_source).unwrap_or(ContentSource::Blank);
    if !exact {
        if spec.access_modes.as_ref().is_none_or(Vec::is_empty) {
            spec.access_modes = Some(vec!["ReadWriteOnce".into()]);
        }
        if spec.volume_mode.is_none() {
            spec.volume_mode = Some("Filesystem".into());
        }
    }
    let has_size = spec
        .resources
        .as_ref()
        .and_then(|r| r.requests.as_ref())
        .is_some_and(|r| r.contains_key("storage"));
    if !has_size && source == ContentSource::Blank {
        return Err(unsupported("no storage size requested".into()));
    }
    Ok(ClaimPlan { spec, source })
}

fn condition(type_: &str, status: bool, reason: &str, message: &str) -> Condition {
    Condition {
        type_: type_.into(),
        status: if status { "True" } else { "False" }.into(),
        reason: Some(reason.into()),
        message: Some(message.into()),
        last_transition_time: None,
        last_heartbeat_time: None,
    }
}

/// Sets the DataVolume's status; transition times change only when a condition does.
async fn set_status(
    ctx: &Ctx,
    dv: &DataVolume,
    phase: &str,
    progress: &str,
    conditions: Vec<Condition>,
) -> Result<(), Error> {
    let api: Api<DataVolume> = Api::namespaced_with(
        ctx.client.clone(),
        &dv.namespace().unwrap_or_default(),
        &dv_resource(),
    );
    let claim = dv.name_any();
    update(
        &api,
        &dv.name_any(),
        ctx.status.dv,
        true,
        |d: &mut DataVolume| {
            let st = d.status.get_or_insert_with(DvStatus::default);
            let now = now_rfc3339();
            let mut conds = conditions.clone();
            for c in &mut conds {
                let old = st.conditions.iter().find(|o| o.type_ == c.type_);
                c.last_transition_time = match old {
                    Some(o) if o.status == c.status => o.last_transition_time.clone(),
                    _ => Some(now.clone()),
                };
                c.last_heartbeat_time = old
                    .filter(|o| o.status == c.status && o.reason == c.reason)
                    .and_then(|o| o.last_heartbeat_time.clone())
                    .or(Some(now.clone()));
            }
            let same = st.phase.as_deref() == Some(phase)
                && st.progress.as_deref() == Some(progress)
                && st.claim_name.as_deref() == Some(claim.as_str())
                && st.conditions.len() == conds.len()
                && st.conditions.iter().zip(&conds).all(|(a, b)| {
                    a.type_ == b.type_
                        && a.status == b.status
                        && a.reason == b.reason
                        && a.message == b.message
                });
            if same {
                return Ok::<_, Error>(Change::Keep(()));
            }
            st.phase = Some(phase.into());
            st.progress = Some(progress.into());
            st.claim_name = Some(claim.clone());
            st.conditions = conds;
            Ok(Change::Write(()))
        },
    )
    .await?;
    Ok(())
}

async fn reconcile(dv: Arc<DataVolume>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let span = info_span!("datavolume", namespace = %dv.namespace().unwrap_or_default(), name = %dv.name_any());
    reconcile_inner(dv, ctx).instrument(span).await
}

fn owned_by(pvc: &PersistentVolumeClaim, dv: &DataVolume) -> bool {
    let uid = dv.uid();
    pvc.owner_references()
        .iter()
        .any(|o| Some(&o.uid) == uid.as_ref())
}

async fn reconcile_inner(dv: Arc<DataVolume>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let ns = dv.namespace().unwrap_or_default();
    let name = dv.name_any();
    let dvs: Api<DataVolume> = Api::namespaced_with(ctx.client.clone(), &ns, &dv_resource());
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &ns);
    if dv.meta().deletion_timestamp.is_some() {
        if dv.finalizers().iter().any(|f| f == DV_FINALIZER) {
            if let Some(pvc) = pvcs.get_opt(&name).await?.filter(|p| owned_by(p, &dv)) {
                if pvc.meta().deletion_timestamp.is_none() {
                    pvcs.delete(&name, &Default::default()).await?;
                }
                release(&ctx, &pvc).await?;
            }
            remove_finalizer(&dvs, &name, DV_FINALIZER).await?;
            info!("datavolume cleaned up");
        }
        return Ok(Action::await_change());
    }
    if !dv.finalizers().iter().any(|f| f == DV_FINALIZER) {
        add_finalizer(&dvs, &name, DV_FINALIZER).await?;
        // The write re-triggers this reconciler with the new object.
        return Ok(Action::await_change());
    }
    let plan = match plan_claim(&dv) {
        Ok(p) => p,
        Err(e) => {
            warn!(error = %e, "invalid datavolume");
            set_status(
                &ctx,
                &dv,
                "Failed",
                "N/A",
                vec![
                    condition("Bound", false, "Invalid", &e.to_string()),
                    condition("Ready", false, "Invalid", &e.to_string()),
                    condition("Running", false, "Invalid", &e.to_string()),
                ],
            )
            .await?;
            return Ok(Action::await_change());
        }
    };
    let pvc = match pvcs.get_opt(&name).await? {
        Some(p) if owned_by(&p, &dv) => p,
        Some(_) => {
            let msg = format!(
                "PersistentVolumeClaim {name} already exists and is not owned by this DataVolume"
            );
            set_status(
                &ctx,
                &dv,
                "Pending",
                "N/A",
                vec![
                    condition("Bound", false, "ErrClaimNotValid", &msg),
                    condition("Ready", false, "ErrClaimNotValid", &msg),
                    condition("Running", false, "ErrClaimNotValid", &msg),
                ],
            )
            .await?;
            return Ok(Action::await_change());
        }
        None => {
            let mut labels = dv.labels().clone();
            labels.insert("app".into(), "containerized-data-importer".into());
            labels.insert("app.kubernetes.io/component".into(), "storage".into());
            let mut annotations = BTreeMap::from([
                (
                    "cdi.kubevirt.io/storage.contentType".to_string(),
                    "kubevirt".to_string(),
                ),
                (
                    "cdi.kubevirt.io/createdForDataVolume".to_string(),
                    dv.uid().unwrap_or_default(),
                ),
            ]);
            if plan.source != ContentSource::Blank {
                annotations.insert(
                    CONTENT_SOURCE_ANNOTATION.into(),
                    serde_json::to_string(&plan.source).unwrap_or_default(),
                );
            }
            let obj = PersistentVolumeClaim {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    namespace: Some(ns.clone()),
                    labels: Some(labels),
                    annotations: Some(annotations),
                    owner_references: Some(vec![OwnerReference {
                        api_version: "cdi.kubevirt.io/v1beta1".into(),
                        kind: "DataVolume".into(),
                        name: name.clone(),
                        uid: dv.uid().unwrap_or_default(),
                        controller: Some(true),
                        block_owner_deletion: Some(true),
                    }]),
                    ..Default::default()
                },
                spec: Some(plan.spec.clone()),
                status: None,
            };
            match pvcs
                .create(
                    &PostParams {
                        field_manager: Some(MANAGER.into()),
                        ..Default::default()
                    },
                    &obj,
                )
                .await
            {
                Ok(p) => {
                    info!(source = ?plan.source, "created pvc");
                    p
                }
                Err(e) if is_already_exists(&e) => return Ok(Action::await_change()),
                Err(e) => return Err(e.into()),
            }
        }
    };
    if bound_volume(&ctx, &pvc).is_some() {
        set_status(
            &ctx,
            &dv,
            "Succeeded",
            "100.0%",
            vec![
                condition("Bound", true, "Bound", &format!("PVC {name} Bound")),
                condition("Ready", true, "", ""),
                condition("Running", false, "Completed", "Import Complete"),
            ],
        )
        .await?;
    } else {
        let (phase, msg) = match plan.source {
            ContentSource::Blank => (
                "ImportScheduled",
                "Import into ".to_string() + &name + " scheduled",
            ),
            ContentSource::Pvc { .. } => {
                ("CloneScheduled", format!("Cloning into {name} scheduled"))
            }
            ContentSource::Snapshot { .. } => (
                "CloneScheduled",
                format!("Restoring snapshot into {name} scheduled"),
            ),
        };
        set_status(
            &ctx,
            &dv,
            phase,
            "N/A",
            vec![
                condition("Bound", false, "Pending", &format!("PVC {name} Pending")),
                condition("Ready", false, "Pending", &msg),
                condition("Running", false, "Pending", &msg),
            ],
        )
        .await?;
    }
    Ok(Action::await_change())
}

fn error_policy(dv: Arc<DataVolume>, err: &Error, _ctx: Arc<Ctx>) -> Action {
    warn!(namespace = ?dv.namespace(), datavolume = %dv.name_any(), error = %err, "datavolume reconcile failed; retrying");
    Action::requeue(Duration::from_millis(500))
}

pub fn controller(
    ctx: Arc<Ctx>,
) -> (
    impl std::future::Future<Output = ()>,
    impl std::future::Future<Output = ()>,
) {
    let ar = dv_resource();
    let dvs: Api<DataVolume> = Api::all_with(ctx.client.clone(), &ar);
    let mw = crate::watches::main_watch(dvs, ar.clone());
    let c = Controller::for_stream_with(mw.stream, mw.store.clone(), ar.clone());
    let run = c
        .owns(
            Api::<PersistentVolumeClaim>::all(ctx.client.clone()),
            watcher::Config::default(),
        )
        .run(reconcile, error_policy, ctx)
        .for_each(|_| futures::future::ready(()));
    let ready = mw.ready;
    (ready, run)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn dv(spec: serde_json::Value) -> DataVolume {
        serde_json::from_value(
            json!({"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
            "metadata": {"name": "d", "namespace": "t"}, "spec": spec}),
        )
        .unwrap()
    }

    #[test]
    fn storage_form_gets_defaults() {
        let p = plan_claim(&dv(json!({"source": {"blank": {}}, "storage": {"resources": {"requests": {"storage": "1Gi"}}, "storageClassName": "fast"}}))).unwrap();
        assert_eq!(p.spec.access_modes, Some(vec!["ReadWriteOnce".to_string()]));
        assert_eq!(p.spec.volume_mode.as_deref(), Some("Filesystem"));
        assert_eq!(p.spec.storage_class_name.as_deref(), Some("fast"));
        assert_eq!(p.source, ContentSource::Blank);
    }

    #[test]
    fn pvc_form_is_exact() {
        let p = plan_claim(&dv(json!({"source": {"blank": {}}, "pvc": {"accessModes": ["ReadWriteMany"], "volumeMode": "Block",
            "resources": {"requests": {"storage": "2Gi"}}}}))).unwrap();
        assert_eq!(p.spec.access_modes, Some(vec!["ReadWriteMany".to_string()]));
        assert_eq!(p.spec.volume_mode.as_deref(), Some("Block"));
        let p = plan_claim(&dv(
            json!({"pvc": {"resources": {"requests": {"storage": "2Gi"}}}}),
        ))
        .unwrap();
        assert_eq!(p.spec.volume_mode, None);
    }

    #[test]
    fn clone_and_snapshot_sources() {
        let p = plan_claim(&dv(
            json!({"storage": {"dataSourceRef": {"kind": "PersistentVolumeClaim", "name": "src"}}}),
        ))
        .unwrap();
        assert_eq!(
            p.source,
            ContentSource::Pvc {
                namespace: "t".into(),
                name: "src".into()
            }
        );
        assert!(p.spec.data_source_ref.is_none());
        let p = plan_claim(&dv(
            json!({"source": {"pvc": {"namespace": "o", "name": "src"}}, "storage": {}}),
        ))
        .unwrap();
        assert_eq!(
            p.source,
            ContentSource::Pvc {
                namespace: "o".into(),
                name: "src".into()
            }
        );
        let p = plan_claim(&dv(json!({"source": {"snapshot": {"namespace": "t", "name": "s1"}}, "storage": {"resources": {"requests": {"storage": "1Gi"}}}}))).unwrap();
        assert_eq!(
            p.source,
            ContentSource::Snapshot {
                namespace: "t".into(),
                name: "s1".into()
            }
        );
        let p = plan_claim(&dv(json!({"storage": {"dataSourceRef": {"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": "s2"}}}))).unwrap();
        assert_eq!(
            p.source,
            ContentSource::Snapshot {
                namespace: "t".into(),
                name: "s2".into()
            }
        );
    }

    #[test]
    fn invalid_specs() {
        assert!(plan_claim(&dv(json!({"source": {"blank": {}}}))).is_err());
        assert!(plan_claim(&dv(json!({"source": {"http": {"url": "x"}}, "storage": {"resources": {"requests": {"storage": "1Gi"}}}}))).is_err());
        assert!(plan_claim(&dv(json!({"source": {"blank": {}}, "storage": {}}))).is_err());
        assert!(plan_claim(&dv(json!({"pvc": {}, "storage": {}}))).is_err());
    }
}
