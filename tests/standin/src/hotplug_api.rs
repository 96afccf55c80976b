//! The `subresources.kubevirt.io/v1` addvolume/removevolume handlers, with virt-api's semantics:
//! 202 and an empty body on success; 400 invalid body; 404 unknown VM/VMI/volume; 409
//! duplicate volume name or source, or (VMI level) a VMI that is not running.

use crate::backend::Bus;
use crate::context::Ctx;
use crate::faults::Operation;
use crate::types::{
    AddVolumeOptions, DataVolumeSource, Disk, DiskTarget, PvcVolumeSource, RemoveVolumeOptions,
    VirtualMachine, VirtualMachineInstance, VmStatus, VmiSpec, Volume, VolumeRequest, vm_resource,
    vmi_resource,
};
use crate::update::{Change, StatusWrites, update};
use kube::api::Api;
use thiserror::Error;
use tracing::info;

/// A failed subresource call, mapped to an HTTP status and a metav1 Status reason.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ApiError {
    /// 400: the body is not valid options.
    #[error("{0}")]
    BadRequest(String),
    /// 404: no such VM, VMI or volume.
    #[error("{0}")]
    NotFound(String),
    /// 409: duplicate volume, VMI not running.
    #[error("{0}")]
    Conflict(String),
    /// 500: the apiserver failed us.
    #[error("{0}")]
    Internal(String),
    /// A fault knob answered with this status.
    #[error("{message}")]
    Injected { status: u16, message: String },
}

impl ApiError {
    pub fn code(&self) -> u16 {
        match self {
            Self::BadRequest(_) => 400,
            Self::NotFound(_) => 404,
            Self::Conflict(_) => 409,
            Self::Internal(_) => 500,
            Self::Injected { status, .. } => *status,
        }
    }

    pub fn reason(&self) -> &'static str {
        match self.code() {
            400 => "BadRequest",
            401 => "Unauthorized",
            403 => "Forbidden",
            404 => "NotFound",
            409 => "Conflict",
            422 => "Invalid",
            429 => "TooManyRequests",
            503 => "ServiceUnavailable",
            504 => "Timeout",
            _ => "InternalError",
        }
    }
}

impl From<kube::Error> for ApiError {
    fn from(e: kube::Error) -> Self {
        Self::Internal(format!("kubernetes api call failed: {e}"))
    }
}

/// VM or VMI: which object the subresource was called on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Vm,
    Vmi,
}

fn check_dry_run(dry_run: &[String]) -> Result<bool, ApiError> {
    match dry_run {
        [] => Ok(false),
        [all] if all == "All" => Ok(true),
        other => Err(ApiError::BadRequest(format!(
            "invalid dryRun {other:?}: only [\"All\"] is supported"
        ))),
    }
}

/// Decodes and validates an AddVolumeOptions body; returns it normalised (disk name set,
/// source hotpluggable, default bus scsi) and whether it is a dry run.
pub fn parse_add(body: &[u8]) -> Result<(AddVolumeOptions, bool), ApiError> {
    let mut opts: AddVolumeOptions = serde_json::from_slice(body).map_err(|e| {
        ApiError::BadRequest(format!(
            "Can not unmarshal Request body to struct, error: {e}"
        ))
    })?;
    if opts.name.is_empty() {
        return Err(ApiError::BadRequest(
            "AddVolumeOptions requires name to be set".into(),
        ));
    }
    let Some(disk) = opts.disk.as_mut() else {
        return Err(ApiError::BadRequest(
            "AddVolumeOptions requires disk to not be nil".into(),
        ));
    };
    disk.name = opts.name.clone();
    if disk.disk.is_some() && disk.lun.is_some() {
        return Err(ApiError::BadRequest(
            "AddVolumeOptions disk must set only one of disk and lun".into(),
        ));
    }
    if disk.disk.is_none() && disk.lun.is_none() {
        disk.disk = Some(DiskTarget {
            bus: Some("scsi".into()),
            ..Default::default()
        });
    }
    let target = disk.disk.as_mut().or(disk.lun.as_mut());
    if let Some(t) = target {
        let bus = t.bus.get_or_insert_with(|| "scsi".into());
        if Bus::parse(bus).is_none() {
            return Err(ApiError::BadRequest(format!(
                "hotplug is not supported for bus {bus}: use scsi, virtio or sata"
            )));
        }
    }
    if disk
        .lun
        .as_ref()
        .and_then(|l| l.bus.as_deref())
        .is_some_and(|b| b != "scsi")
    {
        return Err(ApiError::BadRequest(
            "a hotplugged lun must use the scsi bus".into(),
        ));
    }
    if let Some(serial) = &disk.serial
        && (serial.is_empty()
            || serial.len() > 36
            || !serial
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)))
    {
        return Err(ApiError::BadRequest(format!(
            "invalid disk serial {serial:?}"
        )));
    }
    let Some(src) = opts.volume_source.as_mut() else {
        return Err(ApiError::BadRequest(
            "AddVolumeOptions requires VolumeSource to not be nil".into(),
        ));
    };
    match (
        src.data_volume.as_mut(),
        src.persistent_volume_claim.as_mut(),
    ) {
        (Some(dv), None) if !dv.name.is_empty() => dv.hotpluggable = Some(true),
        (None, Some(pvc)) if !pvc.claim_name.is_empty() => pvc.hotpluggable = Some(true),
        (Some(_), Some(_)) => {
            return Err(ApiError::BadRequest("AddVolumeOptions VolumeSource must set only one of dataVolume and persistentVolumeClaim".into()));
        }
        _ => {
            return Err(ApiError::BadRequest(
                "AddVolumeOptions requires a dataVolume name or a persistentVolumeClaim claimName"
                    .into(),
            ));
        }
    }
    let dry = check_dry_run(&opts.dry_run)?;
    Ok((opts, dry))
}

pub fn parse_remove(body: &[u8]) -> Result<(RemoveVolumeOptions, bool), ApiError> {
    let opts: RemoveVolumeOptions = serde_json::from_slice(body).map_err(|e| {
        ApiError::BadRequest(format!(
            "Can not unmarshal Request body to struct, error: {e}"
        ))
    })?;
    if opts.name.is_empty() {
        return Err(ApiError::BadRequest(
            "RemoveVolumeOptions requires name to be set".into(),
        ));
    }
    let dry = check_dry_run(&opts.dry_run)?;
    Ok((opts, dry))
}

fn source_name(o: &AddVolumeOptions) -> &str {
    o.volume_source
        .as_ref()
        .and_then(|s| {
            s.data_volume.as_ref().map(|d| d.name.as_str()).or(s
                .persistent_volume_claim
                .as_ref()
                .map(|p| p.claim_name.as_str()))
        })
        .unwrap_or("")
}

/// 409 when the name or the source is already in the spec or in pending requests.
pub fn check_add(
    spec: &VmiSpec,
    pending: &[VolumeRequest],
    o: &AddVolumeOptions,
) -> Result<(), ApiError> {
    let src = source_name(o);
    let pending_adds = pending.iter().filter_map(|r| r.add_volume_options.as_ref());
    for v in &spec.volumes {
        if v.name == o.name {
            return Err(ApiError::Conflict(format!(
                "Unable to add volume [{}] because volume with that name already exists",
                o.name
            )));
        }
        if v.claim_name() == Some(src) {
            return Err(ApiError::Conflict(format!(
                "Unable to add volume source [{src}] because it already exists"
            )));
        }
    }
    for p in pending_adds {
        if p.name == o.name {
            return Err(ApiError::Conflict(format!(
                "Unable to add volume [{}] because volume with that name already exists",
                o.name
            )));
        }
        if source_name(p) == src {
            return Err(ApiError::Conflict(format!(
                "Unable to add volume source [{src}] because it already exists"
            )));
        }
    }
    Ok(())
}

/// 404 unknown volume, 400 a volume that is not hotpluggable.
pub fn check_remove(
    spec: &VmiSpec,
    pending: &[VolumeRequest],
    o: &RemoveVolumeOptions,
) -> Result<(), ApiError> {
    let pending_add = pending.iter().any(|r| {
        r.add_volume_options
            .as_ref()
            .is_some_and(|a| a.name == o.name)
    });
    let pending_remove = pending.iter().any(|r| {
        r.remove_volume_options
            .as_ref()
            .is_some_and(|a| a.name == o.name)
    });
    if pending_remove {
        return Err(ApiError::Conflict(format!(
            "Unable to remove volume [{}] because a removal is already pending",
            o.name
        )));
    }
    match spec.volumes.iter().find(|v| v.name == o.name) {
        Some(v) if !v.is_hotpluggable() => Err(ApiError::BadRequest(format!(
            "Unable to remove volume [{}] because it is not hotpluggable",
            o.name
        ))),
        Some(_) => Ok(()),
        None if pending_add => Ok(()),
        None => Err(ApiError::NotFound(format!(
            "Unable to remove volume [{}] because it does not exist",
            o.name
        ))),
    }
}

/// Adds the volume and its disk to a spec (idempotent).
pub fn apply_add(spec: &mut VmiSpec, o: &AddVolumeOptions) {
    if spec.volumes.iter().any(|v| v.name == o.name) {
        return;
    }
    let src = o.volume_source.clone().unwrap_or_default();
    spec.volumes.push(Volume {
        name: o.name.clone(),
        data_volume: src.data_volume.map(|d| DataVolumeSource {
            hotpluggable: Some(true),
            ..d
        }),
        persistent_volume_claim: src.persistent_volume_claim.map(|p| PvcVolumeSource {
            hotpluggable: Some(true),
            ..p
        }),
        extra: Default::default(),
    });
    let disk = o.disk.clone().unwrap_or_default();
    spec.domain.devices.disks.retain(|d| d.name != o.name);
    spec.domain.devices.disks.push(Disk {
        name: o.name.clone(),
        ..disk
    });
}

/// Removes a volume and its disk from a spec; returns whether anything changed.
pub fn apply_remove(spec: &mut VmiSpec, name: &str) -> bool {
    let before = spec.volumes.len() + spec.domain.devices.disks.len();
    spec.volumes.retain(|v| v.name != name);
    spec.domain.devices.disks.retain(|d| d.name != name);
    before != spec.volumes.len() + spec.domain.devices.disks.len()
}

fn not_found(kind: &str, name: &str) -> ApiError {
    ApiError::NotFound(format!("{kind}.kubevirt.io \"{name}\" not found"))
}

/// Handles `PUT .../{target}/{name}/addvolume|removevolume`.
pub async fn handle(
    ctx: &Ctx,
    target: Target,
    ns: &str,
    name: &str,
    add: bool,
    body: &[u8],
) -> Result<(), ApiError> {
    let op = if add {
        Operation::Addvolume
    } else {
        Operation::Removevolume
    };
    ctx.faults.wait(op).await;
    if let Some(f) = ctx.faults.take_failure(op) {
        return Err(ApiError::Injected {
            status: f.status,
            message: f.message,
        });
    }
    let vmis: Api<VirtualMachineInstance> =
        Api::namespaced_with(ctx.client.clone(), ns, &vmi_resource());
    match (target, add) {
        (Target::Vmi, true) => {
            let (opts, dry) = parse_add(body)?;
            let vmi = vmis
                .get_opt(name)
                .await?
                .ok_or_else(|| not_found("virtualmachineinstance", name))?;
            check_running(&vmi)?;
            let r = update(
                &vmis,
                name,
                StatusWrites::MainResource,
                false,
                |v: &mut VirtualMachineInstance| {
                    check_running(v)?;
                    check_add(&v.spec, &[], &opts)?;
                    if dry {
                        return Ok(Change::Keep(()));
                    }
                    apply_add(&mut v.spec, &opts);
                    Ok::<_, ApiError>(Change::Write(()))
                },
            )
            .await?;
            r.ok_or_else(|| not_found("virtualmachineinstance", name))?;
            info!(namespace = ns, vmi = name, volume = %opts.name, dry, "vmi addvolume accepted");
        }
        (Target::Vmi, false) => {
            let (opts, dry) = parse_remove(body)?;
            let vmi = vmis
                .get_opt(name)
                .await?
                .ok_or_else(|| not_found("virtualmachineinstance", name))?;
            check_running(&vmi)?;
            let r = update(
                &vmis,
                name,
                StatusWrites::MainResource,
                false,
                |v: &mut VirtualMachineInstance| {
                    check_remove(&v.spec, &[], &opts)?;
                    if dry {
                        return Ok(Change::Keep(()));
                    }
                    apply_remove(&mut v.spec, &opts.name);
                    Ok::<_, ApiError>(Change::Write(()))
                },
            )
            .await?;
            r.ok_or_else(|| not_found("virtualmachineinstance", name))?;
            info!(namespace = ns, vmi = name, volume = %opts.name, dry, "vmi removevolume accepted");
        }
        (Target::Vm, _) => {
            let vms: Api<VirtualMachine> =
                Api::namespaced_with(ctx.client.clone(), ns, &vm_resource());
            let parsed = if add {
                Ok(parse_add(body)?)
            } else {
                Err(parse_remove(body)?)
            };
            // A running VMI's own (VMI-level) volumes count as taken too.
            let vmi_spec = vmis.get_opt(name).await?.map(|v| v.spec);
            let r = update(
                &vms,
                name,
                ctx.status.vm,
                true,
                |vm: &mut VirtualMachine| {
                    let spec = vm
                        .spec
                        .template
                        .as_ref()
                        .map(|t| t.spec.clone())
                        .unwrap_or_default();
                    let st = vm.status.get_or_insert_with(VmStatus::default);
                    let request = match &parsed {
                        Ok((opts, _)) => {
                            check_add(&spec, &st.volume_requests, opts)?;
                            if let Some(vs) = &vmi_spec {
                                check_add(vs, &[], opts)?;
                            }
                            VolumeRequest {
                                add_volume_options: Some(AddVolumeOptions {
                                    dry_run: vec![],
                                    ..opts.clone()
                                }),
                                remove_volume_options: None,
                            }
                        }
                        Err((opts, _)) => {
                            check_remove(&spec, &st.volume_requests, opts)?;
                            VolumeRequest {
                                add_volume_options: None,
                                remove_volume_options: Some(RemoveVolumeOptions {
                                    dry_run: vec![],
                                    ..opts.clone()
                                }),
                            }
                        }
                    };
                    let dry = match &parsed {
                        Ok((_, d)) | Err((_, d)) => *d,
                    };
                    if dry {
                        return Ok(Change::Keep(()));
                    }
                    st.volume_requests.push(request);
                    Ok::<_, ApiError>(Change::Write(()))
                },
            )
            .await?;
            r.ok_or_else(|| not_found("virtualmachine", name))?;
            info!(namespace = ns, vm = name, add, "vm volume request recorded");
        }
    }
    Ok(())
}

fn check_running(vmi: &VirtualMachineInstance) -> Result<(), ApiError> {
    let phase = vmi
        .status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("");
    if phase == "Running" {
        Ok(())
    } else {
        Err(ApiError::Conflict(format!(
            "VMI is not running (phase {phase:?})"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn body(v: serde_json::Value) -> Vec<u8> {
        serde_json::to_vec(&v).unwrap()
    }

    #[test]
    fn add_body_validation() {
        let ok = body(
            json!({"name": "v", "disk": {"serial": "s1"}, "volumeSource": {"dataVolume": {"name": "dv"}}}),
        );
        let (o, dry) = parse_add(&ok).unwrap();
        assert!(!dry);
        let d = o.disk.unwrap();
        assert_eq!((d.name.as_str(), d.bus()), ("v", Some("scsi")));
        assert_eq!(
            o.volume_source.unwrap().data_volume.unwrap().hotpluggable,
            Some(true)
        );
        for (b, want) in [
            (b"not json".to_vec(), "unmarshal"),
            (
                body(json!({"disk": {}, "volumeSource": {"dataVolume": {"name": "d"}}})),
                "name",
            ),
            (
                body(json!({"name": "v", "volumeSource": {"dataVolume": {"name": "d"}}})),
                "disk",
            ),
            (body(json!({"name": "v", "disk": {}})), "VolumeSource"),
            (
                body(json!({"name": "v", "disk": {}, "volumeSource": {}})),
                "claimName",
            ),
            (
                body(
                    json!({"name": "v", "disk": {"disk": {"bus": "ide"}}, "volumeSource": {"dataVolume": {"name": "d"}}}),
                ),
                "bus",
            ),
            (
                body(
                    json!({"name": "v", "disk": {}, "volumeSource": {"dataVolume": {"name": "d"}}, "dryRun": ["x"]}),
                ),
                "dryRun",
            ),
            (
                body(
                    json!({"name": "v", "disk": {}, "volumeSource": {"dataVolume": {"name": "d"}, "persistentVolumeClaim": {"claimName": "c"}}}),
                ),
                "only one",
            ),
        ] {
            let e = parse_add(&b).unwrap_err();
            assert_eq!(e.code(), 400);
            assert!(e.to_string().contains(want), "{e} should mention {want}");
        }
        let (_, dry) = parse_add(&body(json!({"name": "v", "disk": {"lun": {}}, "volumeSource": {"persistentVolumeClaim": {"claimName": "c"}}, "dryRun": ["All"]}))).unwrap();
        assert!(dry);
        assert_eq!(parse_remove(b"{}").unwrap_err().code(), 400);
    }

    #[test]
    fn duplicates_conflict_and_remove_semantics() {
        let (o, _) = parse_add(&body(
            json!({"name": "v", "disk": {}, "volumeSource": {"dataVolume": {"name": "dv"}}}),
        ))
        .unwrap();
        let mut spec = VmiSpec::default();
        check_add(&spec, &[], &o).unwrap();
        apply_add(&mut spec, &o);
        assert_eq!(spec.domain.devices.disks.len(), 1);
        assert_eq!(check_add(&spec, &[], &o).unwrap_err().code(), 409);
        let (other_name_same_src, _) = parse_add(&body(json!({"name": "w", "disk": {}, "volumeSource": {"persistentVolumeClaim": {"claimName": "dv"}}}))).unwrap();
        assert!(
            check_add(&spec, &[], &other_name_same_src)
                .unwrap_err()
                .to_string()
                .contains("source")
        );
        let pending = vec![VolumeRequest {
            add_volume_options: Some(o.clone()),
            remove_volume_options: None,
        }];
        assert_eq!(
            check_add(&VmiSpec::default(), &pending, &o)
                .unwrap_err()
                .code(),
            409
        );
        let rm = RemoveVolumeOptions {
            name: "v".into(),
            dry_run: vec![],
        };
        check_remove(&spec, &[], &rm).unwrap();
        assert_eq!(
            check_remove(
                &spec,
                &[],
                &RemoveVolumeOptions {
                    name: "nope".into(),
                    dry_run: vec![]
                }
            )
            .unwrap_err()
            .code(),
            404
        );
        spec.volumes.push(Volume {
            name: "root".into(),
            ..Default::default()
        });
        assert_eq!(
            check_remove(
                &spec,
                &[],
                &RemoveVolumeOptions {
                    name: "root".into(),
                    dry_run: vec![]
                }
            )
            .unwrap_err()
            .code(),
            400
        );
        assert!(apply_remove(&mut spec, "v"));
        assert!(!apply_remove(&mut spec, "v"));
        assert!(spec.domain.devices.disks.is_empty());
    }
}
