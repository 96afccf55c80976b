//! The virt-controller/virt-handler stand-in for hotplug.
//!
//! VMI controller: every hotpluggable volume in a VMI's spec moves through
//! Pending → AttachedToNode → MountedToPod → Ready in `status.volumeStatus`, the backend doing
//! the real attach between AttachedToNode and MountedToPod; a hotplugged entry whose volume
//! left the spec goes Detaching and, once the backend detached it, disappears.
//!
//! VM controller: applies `status.volumeRequests` to the VM template, and keeps the running
//! VMI's hotpluggable volumes in line with the template (which is also declarative hotplug).

use crate::backend::{AttachRequest, Bus};
use crate::context::Ctx;
use crate::error::Error;
use crate::faults::{AttachFailure, Operation};
use crate::hotplug_api::{apply_add, apply_remove};
use crate::provisioner::bound_volume;
use crate::types::{
    Disk, HotplugVolumeStatus, VirtualMachine, VirtualMachineInstance, VmStatus, VmiStatus,
    VmiTemplate, Volume, VolumeStatus, vm_resource, vmi_resource,
};
use crate::update::{Change, StatusWrites, is_already_exists, update};
use futures::StreamExt;
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio_stream::wrappers::WatchStream;
use tracing::{Instrument, info, info_span, warn};

pub const PENDING: &str = "Pending";
pub const ATTACHED_TO_NODE: &str = "AttachedToNode";
pub const MOUNTED_TO_POD: &str = "MountedToPod";
pub const READY: &str = "Ready";
pub const DETACHING: &str = "Detaching";
/// VMI annotation: the hotplug volumes the VM controller put into this VMI.
pub const VM_VOLUMES_ANNOTATION: &str = "standin.kubevirt-csi.io/vm-hotplug-volumes";
/// Upper bound of state-machine steps per reconcile (each step is one status write).
const MAX_STEPS: usize = 256;

/// What the claim behind a volume looks like right now.
#[derive(Clone, Debug, PartialEq)]
pub struct ClaimInfo {
    pub path: PathBuf,
    pub size: u64,
    pub claim: String,
    pub volume_mode: String,
    pub access_modes: Vec<String>,
}

/// The next step for a VMI.
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    /// Insert or replace this entry.
    Write(Box<VolumeStatus>),
    /// Attach through the backend; then write `MountedToPod`.
    Attach { volume: String },
    /// Detach through the backend; then remove the entry.
    Detach { volume: String },
    /// Remove the entry.
    Remove { volume: String },
}

/// Knob values the planner needs.
#[derive(Clone, Debug, Default)]
pub struct Knobs {
    pub never_ready: bool,
    pub attach_failure: Option<AttachFailure>,
}

fn short_hash(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The attachment "pod" KubeVirt would create for a volume, as a stable name and UID.
pub fn attach_pod(vmi_uid: &str, volume: &str) -> HotplugVolumeStatus {
    let h = short_hash(&format!("{vmi_uid}/{volume}"));
    let g = short_hash(&format!("{volume}/{vmi_uid}"));
    let name = format!("hp-volume-{:05x}", h & 0xfffff);
    let uid = format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        h >> 32,
        (h >> 16) & 0xffff,
        h & 0xfff,
        g >> 52,
        g & 0xffff_ffff_ffff
    );
    HotplugVolumeStatus {
        attach_pod_name: Some(name),
        attach_pod_uid: Some(uid),
    }
}

fn bus_of(disk: Option<&Disk>) -> Bus {
    disk.and_then(Disk::bus)
        .and_then(Bus::parse)
        .unwrap_or(Bus::Scsi)
}

/// The next free guest device name (`sda`, `sdb`, … or `vda`, …) among the status targets.
pub fn next_target(statuses: &[VolumeStatus], bus: Bus) -> String {
    let used: HashSet<&str> = statuses.iter().map(|s| s.target.as_str()).collect();
    let prefix = bus.target_prefix();
    for c in 'a'..='z' {
        let t = format!("{prefix}{c}");
        if !used.contains(t.as_str()) {
            return t;
        }
    }
    for a in 'a'..='z' {
        for b in 'a'..='z' {
            let t = format!("{prefix}{a}{b}");
            if !used.contains(t.as_str()) {
                return t;
            }
        }
    }
    format!("{prefix}zzz")
}

fn entry(
    name: &str,
    phase: &str,
    reason: &str,
    message: String,
    base: Option<&VolumeStatus>,
    vmi_uid: &str,
) -> VolumeStatus {
    let mut e = base.cloned().unwrap_or_else(|| VolumeStatus {
        name: name.into(),
        ..Default::default()
    });
    e.phase = Some(phase.into());
    e.reason = Some(reason.into());
    e.message = Some(message);
    if e.hotplug_volume.is_none() {
        e.hotplug_volume = Some(attach_pod(vmi_uid, name));
    }
    e
}

/// Decides the next step for a VMI (pure). `skip` holds volumes already attempted in this run.
pub fn plan(
    vmi: &VirtualMachineInstance,
    claims: &BTreeMap<String, ClaimInfo>,
    knobs: &Knobs,
    skip: &HashSet<String>,
) -> Option<Step> {
    let uid = vmi.metadata.uid.clone().unwrap_or_default();
    let statuses = vmi
        .status
        .as_ref()
        .map(|s| s.volume_status.as_slice())
        .unwrap_or(&[]);
    let desired: Vec<&Volume> = vmi
        .spec
        .volumes
        .iter()
        .filter(|v| v.is_hotpluggable())
        .collect();
    for v in &desired {
        let tried = skip.contains(&v.name);
        let st = statuses.iter().find(|s| s.name == v.name);
        let phase = st.and_then(|s| s.phase.as_deref());
        let claim = v.claim_name().unwrap_or_default();
        let info = claims.get(claim);
        match phase {
            None | Some("") | Some(PENDING) => {
                let want = match info {
                    None => entry(
                        &v.name,
                        PENDING,
                        "PVCNotReady",
                        format!("PVC {claim} is not bound yet"),
                        st,
                        &uid,
                    ),
                    Some(_) => {
                        let pod = attach_pod(&uid, &v.name)
                            .attach_pod_name
                            .unwrap_or_default();
                        entry(
                            &v.name,
                            ATTACHED_TO_NODE,
                            "SuccessfulCreate",
                            format!(
                                "Created hotplug attachment pod {pod}, for volume {}",
                                v.name
                            ),
                            st,
                            &uid,
                        )
                    }
                };
                if st == Some(&want) {
                    continue;
                }
                // Pending is always reported before the volume moves on.
                if st.is_none() && info.is_some() {
                    let pod = attach_pod(&uid, &v.name)
                        .attach_pod_name
                        .unwrap_or_default();
                    return Some(Step::Write(Box::new(entry(
                        &v.name,
                        PENDING,
                        "SuccessfulCreate",
                        format!(
                            "Created hotplug attachment pod {pod}, for volume {}",
                            v.name
                        ),
                        None,
                        &uid,
                    ))));
                }
                return Some(Step::Write(Box::new(want)));
            }
            Some(ATTACHED_TO_NODE) => {
                // One backend attempt per run; a failure is retried on the next event.
                if info.is_none() || tried {
                    continue;
                }
                if let Some(f) = &knobs.attach_failure {
                    let want = entry(
                        &v.name,
                        ATTACHED_TO_NODE,
                        &f.reason,
                        f.message.clone(),
                        st,
                        &uid,
                    );
                    if st == Some(&want) {
                        continue;
                    }
                    return Some(Step::Write(Box::new(want)));
                }
                return Some(Step::Attach {
                    volume: v.name.clone(),
                });
            }
            Some(MOUNTED_TO_POD) => {
                if knobs.never_ready {
                    continue;
                }
                let bus = bus_of(
                    vmi.spec
                        .domain
                        .devices
                        .disks
                        .iter()
                        .find(|d| d.name == v.name),
                );
                let mut want = entry(
                    &v.name,
                    READY,
                    "VolumeReady",
                    format!("Successfully attach hotplugged volume {} to VM", v.name),
                    st,
                    &uid,
                );
                if want.target.is_empty() {
                    want.target = next_target(statuses, bus);
                }
                if let Some(i) = info {
                    want.size = i64::try_from(i.size).ok();
                }
                return Some(Step::Write(Box::new(want)));
            }
            Some(READY) => {
                // Keep the size in line with the claim (expansion).
                if let (Some(i), Some(s)) = (info, st)
                    && s.size != i64::try_from(i.size).ok()
                {
                    let mut want = s.clone();
                    want.size = i64::try_from(i.size).ok();
                    return Some(Step::Write(Box::new(want)));
                }
            }
            // Detaching while it is back in the spec: finish the detach first.
            Some(DETACHING) if !tried => {
                return Some(Step::Detach {
                    volume: v.name.clone(),
                });
            }
            Some(_) => {}
        }
    }
    for st in statuses {
        let hotplugged = st.hotplug_volume.is_some();
        if !hotplugged || desired.iter().any(|v| v.name == st.name) {
            continue;
        }
        return Some(match st.phase.as_deref() {
            Some(DETACHING) if skip.contains(&st.name) => continue,
            Some(DETACHING) => Step::Detach {
                volume: st.name.clone(),
            },
            // Never reached the backend: nothing to undo.
            None | Some(PENDING) => Step::Remove {
                volume: st.name.clone(),
            },
            _ => Step::Write(Box::new(entry(
                &st.name,
                DETACHING,
                "VolumeDetaching",
                format!("Detaching volume {}", st.name),
                Some(st),
                &uid,
            ))),
        });
    }
    None
}

async fn write_entry(
    ctx: &Ctx,
    api: &Api<VirtualMachineInstance>,
    name: &str,
    want: Option<VolumeStatus>,
    remove: Option<&str>,
) -> Result<(), Error> {
    update(
        api,
        name,
        ctx.status.vmi,
        true,
        |v: &mut VirtualMachineInstance| {
            let st = v.status.get_or_insert_with(VmiStatus::default);
            let before = st.volume_status.clone();
            if let Some(w) = &want {
                match st.volume_status.iter_mut().find(|s| s.name == w.name) {
                    Some(s) => *s = w.clone(),
                    None => st.volume_status.push(w.clone()),
                }
            }
            if let Some(r) = remove {
                st.volume_status.retain(|s| s.name != r);
            }
            Ok::<_, Error>(if st.volume_status == before {
                Change::Keep(())
            } else {
                Change::Write(())
            })
        },
    )
    .await?;
    Ok(())
}

async fn claims_of(
    ctx: &Ctx,
    vmi: &VirtualMachineInstance,
) -> Result<BTreeMap<String, ClaimInfo>, Error> {
    let ns = vmi.namespace().unwrap_or_default();
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &ns);
    let mut out = BTreeMap::new();
    for v in vmi.spec.volumes.iter().filter(|v| v.is_hotpluggable()) {
        let Some(claim) = v.claim_name() else {
            continue;
        };
        if let Some(b) = pvcs
            .get_opt(claim)
            .await?
            .and_then(|p| bound_volume(ctx, &p))
        {
            out.insert(
                claim.to_string(),
                ClaimInfo {
                    path: b.path,
                    size: b.size,
                    claim: claim.to_string(),
                    volume_mode: b.volume_mode,
                    access_modes: b.access_modes,
                },
            );
        }
    }
    Ok(out)
}

fn attach_request(
    vmi: &VirtualMachineInstance,
    volume: &str,
    claims: &BTreeMap<String, ClaimInfo>,
) -> AttachRequest {
    let disk = vmi
        .spec
        .domain
        .devices
        .disks
        .iter()
        .find(|d| d.name == volume);
    let vol = vmi.spec.volumes.iter().find(|v| v.name == volume);
    let path = vol
        .and_then(Volume::claim_name)
        .and_then(|c| claims.get(c))
        .map(|c| c.path.clone())
        .unwrap_or_default();
    AttachRequest {
        namespace: vmi.namespace().unwrap_or_default(),
        vmi: vmi.name_any(),
        volume: volume.to_string(),
        serial: disk.and_then(|d| d.serial.clone()),
        bus: bus_of(disk),
        path,
        read_only: vol
            .and_then(|v| v.persistent_volume_claim.as_ref())
            .and_then(|p| p.read_only)
            .unwrap_or(false),
        vmi_annotations: vmi.annotations().clone(),
    }
}

async fn reconcile_vmi(vmi: Arc<VirtualMachineInstance>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let span =
        info_span!("vmi", namespace = %vmi.namespace().unwrap_or_default(), name = %vmi.name_any());
    reconcile_vmi_inner(vmi, ctx).instrument(span).await
}

async fn reconcile_vmi_inner(
    vmi: Arc<VirtualMachineInstance>,
    ctx: Arc<Ctx>,
) -> Result<Action, Error> {
    let ns = vmi.namespace().unwrap_or_default();
    let name = vmi.name_any();
    let api: Api<VirtualMachineInstance> =
        Api::namespaced_with(ctx.client.clone(), &ns, &vmi_resource());
    let mut skip = HashSet::new();
    for _ in 0..MAX_STEPS {
        let Some(vmi) = api.get_opt(&name).await? else {
            return Ok(Action::await_change());
        };
        if vmi.meta().deletion_timestamp.is_some() {
            return Ok(Action::await_change());
        }
        let claims = claims_of(&ctx, &vmi).await?;
        let knobs = Knobs {
            never_ready: ctx.faults.never_ready(),
            attach_failure: ctx.faults.attach_failure(),
        };
        let Some(step) = plan(&vmi, &claims, &knobs, &skip) else {
            break;
        };
        let uid = vmi.uid().unwrap_or_default();
        let current = vmi.status.as_ref().and_then(|s| {
            s.volume_status
                .iter()
                .find(|e| match &step {
                    Step::Attach { volume } | Step::Detach { volume } => &e.name == volume,
                    _ => false,
                })
                .cloned()
        });
        match step {
            Step::Write(e) => {
                info!(volume = %e.name, phase = ?e.phase, reason = ?e.reason, "volume status");
                write_entry(&ctx, &api, &name, Some(*e), None).await?;
            }
            Step::Remove { volume } => {
                info!(%volume, "volume status removed");
                write_entry(&ctx, &api, &name, None, Some(&volume)).await?;
            }
            Step::Attach { volume } => {
                skip.insert(volume.clone());
                let req = attach_request(&vmi, &volume, &claims);
                let backend = ctx.backends.for_vmi(vmi.annotations());
                ctx.faults.wait(Operation::Attach).await;
                let result = match ctx.faults.take_failure(Operation::Attach) {
                    Some(f) => Err(f.message),
                    None => backend.attach(&req).await.map_err(|e| e.to_string()),
                };
                let e = match result {
                    Ok(()) => {
                        info!(%volume, backend = backend.name(), serial = ?req.serial, bus = req.bus.as_str(), "attached");
                        let mut e = entry(
                            &volume,
                            MOUNTED_TO_POD,
                            "SuccessfulMount",
                            format!("Volume {volume} has been mounted in virt-launcher pod"),
                            current.as_ref(),
                            &uid,
                        );
                        if let Some(c) = claims.get(
                            vmi.spec
                                .volumes
                                .iter()
                                .find(|v| v.name == volume)
                                .and_then(Volume::claim_name)
                                .unwrap_or(""),
                        ) {
                            e.size = i64::try_from(c.size).ok();
                            e.persistent_volume_claim_info = Some(serde_json::json!({
                                "claimName": c.claim, "accessModes": c.access_modes, "volumeMode": c.volume_mode,
                                "capacity": {"storage": crate::quantity::format_bytes(c.size)},
                                "requests": {"storage": crate::quantity::format_bytes(c.size)},
                                "filesystemOverhead": "0"
                            }));
                        }
                        e
                    }
                    Err(message) => {
                        warn!(%volume, %message, "attach failed");
                        entry(
                            &volume,
                            ATTACHED_TO_NODE,
                            "AttachFailed",
                            message,
                            current.as_ref(),
                            &uid,
                        )
                    }
                };
                write_entry(&ctx, &api, &name, Some(e), None).await?;
            }
            Step::Detach { volume } => {
                skip.insert(volume.clone());
                let mut req = attach_request(&vmi, &volume, &claims);
                if let Some(bus) = vmi
                    .spec
                    .domain
                    .devices
                    .disks
                    .iter()
                    .find(|d| d.name == volume)
                    .and_then(Disk::bus)
                    .and_then(Bus::parse)
                {
                    req.bus = bus;
                }
                let backend = ctx.backends.for_vmi(vmi.annotations());
                ctx.faults.wait(Operation::Detach).await;
                let result = match ctx.faults.take_failure(Operation::Detach) {
                    Some(f) => Err(f.message),
                    None => backend.detach(&req).await.map_err(|e| e.to_string()),
                };
                match result {
                    Ok(()) => {
                        info!(%volume, backend = backend.name(), "detached");
                        write_entry(&ctx, &api, &name, None, Some(&volume)).await?;
                    }
                    Err(message) => {
                        warn!(%volume, %message, "detach failed");
                        let e = entry(
                            &volume,
                            DETACHING,
                            "DetachFailed",
                            message,
                            current.as_ref(),
                            &uid,
                        );
                        write_entry(&ctx, &api, &name, Some(e), None).await?;
                    }
                }
            }
        }
    }
    Ok(Action::await_change())
}

fn vmi_error_policy(vmi: Arc<VirtualMachineInstance>, err: &Error, _ctx: Arc<Ctx>) -> Action {
    warn!(namespace = ?vmi.namespace(), vmi = %vmi.name_any(), error = %err, "vmi reconcile failed; retrying");
    Action::requeue(Duration::from_millis(500))
}

pub fn vmi_controller(
    ctx: Arc<Ctx>,
) -> (
    impl std::future::Future<Output = ()>,
    impl std::future::Future<Output = ()>,
) {
    let ar = vmi_resource();
    let vmis: Api<VirtualMachineInstance> = Api::all_with(ctx.client.clone(), &ar);
    let mw = crate::watches::main_watch(vmis, ar.clone());
    let c = Controller::for_stream_with(mw.stream, mw.store.clone(), ar.clone());
    let store = mw.store.clone();
    let s = store.clone();
    let knob_changes = WatchStream::from_changes(ctx.faults.subscribe()).map(|_| ());
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
                            && v.spec
                                .volumes
                                .iter()
                                .any(|vol| vol.claim_name() == Some(name.as_str()))
                    })
                    .map(|v| ObjectRef::from_obj_with(&*v, ar.clone()))
                    .collect::<Vec<_>>()
            },
        )
        .reconcile_all_on(knob_changes)
        .run(reconcile_vmi, vmi_error_policy, ctx)
        .for_each(|_| futures::future::ready(()));
    let ready = mw.ready;
    (ready, run)
}

// ---------------------------------------------------------------- VM controller

fn wants_running(vm: &VirtualMachine) -> Option<bool> {
    if let Some(r) = vm
        .spec
        .extra
        .get("running")
        .and_then(serde_json::Value::as_bool)
    {
        return Some(r);
    }
    match vm
        .spec
        .extra
        .get("runStrategy")
        .and_then(serde_json::Value::as_str)
    {
        Some("Always" | "RerunOnFailure" | "Once") => Some(true),
        Some("Halted") => Some(false),
        _ => None,
    }
}

/// Syncs the VMI's hotpluggable volumes with the VM template; returns whether the VMI changed.
pub fn sync_vmi_volumes(template: &VmiTemplate, vmi: &mut VirtualMachineInstance) -> bool {
    let desired: Vec<&Volume> = template
        .spec
        .volumes
        .iter()
        .filter(|v| v.is_hotpluggable())
        .collect();
    let annotations = vmi.metadata.annotations.get_or_insert_with(BTreeMap::new);
    let previous: BTreeSet<String> = annotations
        .get(VM_VOLUMES_ANNOTATION)
        .map(|s| {
            s.split(',')
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect()
        })
        .unwrap_or_default();
    let mut changed = false;
    let mut managed = BTreeSet::new();
    for v in &desired {
        managed.insert(v.name.clone());
        if !vmi.spec.volumes.iter().any(|x| x.name == v.name) {
            vmi.spec.volumes.push((*v).clone());
            let disk = template
                .spec
                .domain
                .devices
                .disks
                .iter()
                .find(|d| d.name == v.name)
                .cloned();
            vmi.spec.domain.devices.disks.retain(|d| d.name != v.name);
            if let Some(d) = disk {
                vmi.spec.domain.devices.disks.push(d);
            }
            changed = true;
        }
    }
    for gone in previous.difference(&managed) {
        changed |= apply_remove(&mut vmi.spec, gone);
    }
    let value = managed.into_iter().collect::<Vec<_>>().join(",");
    if annotations.get(VM_VOLUMES_ANNOTATION) != Some(&value) {
        annotations.insert(VM_VOLUMES_ANNOTATION.into(), value);
        changed = true;
    }
    changed
}

async fn reconcile_vm(vm: Arc<VirtualMachine>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let span =
        info_span!("vm", namespace = %vm.namespace().unwrap_or_default(), name = %vm.name_any());
    reconcile_vm_inner(vm, ctx).instrument(span).await
}

async fn reconcile_vm_inner(vm: Arc<VirtualMachine>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let ns = vm.namespace().unwrap_or_default();
    let name = vm.name_any();
    let vms: Api<VirtualMachine> = Api::namespaced_with(ctx.client.clone(), &ns, &vm_resource());
    let vmis: Api<VirtualMachineInstance> =
        Api::namespaced_with(ctx.client.clone(), &ns, &vmi_resource());
    if vm.meta().deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    // 1. Volume requests → template.
    let requests = vm
        .status
        .as_ref()
        .map(|s| s.volume_requests.clone())
        .unwrap_or_default();
    if !requests.is_empty() {
        update(
            &vms,
            &name,
            StatusWrites::MainResource,
            false,
            |v: &mut VirtualMachine| {
                let t = v.spec.template.get_or_insert_with(VmiTemplate::default);
                let before = serde_json::to_value(&t.spec).ok();
                for r in &requests {
                    if let Some(a) = &r.add_volume_options {
                        apply_add(&mut t.spec, a);
                    }
                    if let Some(rm) = &r.remove_volume_options {
                        apply_remove(&mut t.spec, &rm.name);
                    }
                }
                Ok::<_, Error>(if serde_json::to_value(&t.spec).ok() == before {
                    Change::Keep(())
                } else {
                    Change::Write(())
                })
            },
        )
        .await?;
        update(
            &vms,
            &name,
            ctx.status.vm,
            true,
            |v: &mut VirtualMachine| {
                let st = v.status.get_or_insert_with(VmStatus::default);
                let before = st.volume_requests.len();
                st.volume_requests.retain(|r| !requests.contains(r));
                Ok::<_, Error>(if st.volume_requests.len() == before {
                    Change::Keep(())
                } else {
                    Change::Write(())
                })
            },
        )
        .await?;
        info!(
            count = requests.len(),
            "applied volume requests to the template"
        );
    }
    let Some(vm) = vms.get_opt(&name).await? else {
        return Ok(Action::await_change());
    };
    let template = vm.spec.template.clone().unwrap_or_default();
    // 2. Start a VMI for a VM that should run and has none.
    let existing = vmis.get_opt(&name).await?;
    if existing.is_none() && wants_running(&vm) == Some(true) {
        let mut vmi =
            VirtualMachineInstance::new(&name, &vmi_resource(), template.spec.clone()).within(&ns);
        if let Some(meta) = template
            .extra
            .get("metadata")
            .and_then(|m| serde_json::from_value::<kube::api::ObjectMeta>(m.clone()).ok())
        {
            vmi.metadata.labels = meta.labels;
            vmi.metadata.annotations = meta.annotations;
        }
        vmi.metadata.owner_references = Some(vec![OwnerReference {
            api_version: "kubevirt.io/v1".into(),
            kind: "VirtualMachine".into(),
            name: name.clone(),
            uid: vm.uid().unwrap_or_default(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        }]);
        let hotplugged: Vec<String> = template
            .spec
            .volumes
            .iter()
            .filter(|v| v.is_hotpluggable())
            .map(|v| v.name.clone())
            .collect();
        vmi.metadata
            .annotations
            .get_or_insert_with(BTreeMap::new)
            .insert(VM_VOLUMES_ANNOTATION.into(), hotplugged.join(","));
        match vmis.create(&PostParams::default(), &vmi).await {
            Ok(_) => info!("started vmi"),
            Err(e) if is_already_exists(&e) => {}
            Err(e) => return Err(e.into()),
        }
        update(
            &vmis,
            &name,
            ctx.status.vmi,
            true,
            |v: &mut VirtualMachineInstance| {
                let st = v.status.get_or_insert_with(VmiStatus::default);
                if st.phase.as_deref() == Some("Running") {
                    return Ok::<_, Error>(Change::Keep(()));
                }
                st.phase = Some("Running".into());
                Ok(Change::Write(()))
            },
        )
        .await?;
        return Ok(Action::await_change());
    }
    if let Some(vmi) = existing {
        let owned = vmi
            .owner_references()
            .iter()
            .any(|o| Some(&o.uid) == vm.uid().as_ref());
        if owned && wants_running(&vm) == Some(false) {
            crate::update::delete_ignoring_missing(&vmis, &name).await?;
            info!("stopped vmi");
            return Ok(Action::await_change());
        }
        // 3. Declarative hotplug: the running VMI follows the template's hotpluggable volumes.
        if vmi.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running") {
            let r = update(
                &vmis,
                &name,
                StatusWrites::MainResource,
                false,
                |v: &mut VirtualMachineInstance| {
                    Ok::<_, Error>(if sync_vmi_volumes(&template, v) {
                        Change::Write(())
                    } else {
                        Change::Keep(())
                    })
                },
            )
            .await?;
            if r.is_some() {
                tracing::debug!("vmi volumes in line with the vm template");
            }
        }
    }
    Ok(Action::await_change())
}

fn vm_error_policy(vm: Arc<VirtualMachine>, err: &Error, _ctx: Arc<Ctx>) -> Action {
    warn!(namespace = ?vm.namespace(), vm = %vm.name_any(), error = %err, "vm reconcile failed; retrying");
    Action::requeue(Duration::from_millis(500))
}

pub fn vm_controller(
    ctx: Arc<Ctx>,
) -> (
    impl std::future::Future<Output = ()>,
    impl std::future::Future<Output = ()>,
) {
    let ar = vm_resource();
    let vms: Api<VirtualMachine> = Api::all_with(ctx.client.clone(), &ar);
    let mw = crate::watches::main_watch(vms, ar.clone());
    let c = Controller::for_stream_with(mw.stream, mw.store.clone(), ar.clone());
    let run = c
        .watches_with(
            Api::<VirtualMachineInstance>::all_with(ctx.client.clone(), &vmi_resource()),
            vmi_resource(),
            watcher::Config::default(),
            move |v: VirtualMachineInstance| {
                let ns = v.namespace().unwrap_or_default();
                Some(ObjectRef::new_with(&v.name_any(), ar.clone()).within(&ns))
            },
        )
        .run(reconcile_vm, vm_error_policy, ctx)
        .for_each(|_| futures::future::ready(()));
    let ready = mw.ready;
    (ready, run)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn vmi(volumes: serde_json::Value, status: serde_json::Value) -> VirtualMachineInstance {
        serde_json::from_value(json!({"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
            "metadata": {"name": "w", "namespace": "t", "uid": "u-1"},
            "spec": {"domain": {"devices": {"disks": [{"name": "v1", "disk": {"bus": "virtio"}, "serial": "s1"}]}}, "volumes": volumes},
            "status": {"phase": "Running", "volumeStatus": status}})).unwrap()
    }

    fn claims() -> BTreeMap<String, ClaimInfo> {
        BTreeMap::from([(
            "dv1".to_string(),
            ClaimInfo {
                path: "/d/x.img".into(),
                size: 1 << 30,
                claim: "dv1".into(),
                volume_mode: "Block".into(),
                access_modes: vec!["ReadWriteOnce".into()],
            },
        )])
    }

    /// Runs the planner as the reconciler would, with a successful backend, recording phases.
    fn drive(
        mut v: VirtualMachineInstance,
        knobs: &Knobs,
        claims: &BTreeMap<String, ClaimInfo>,
    ) -> (VirtualMachineInstance, Vec<String>) {
        let mut phases = vec![];
        let mut skip = HashSet::new();
        while let Some(step) = plan(&v, claims, knobs, &skip) {
            let st = v.status.get_or_insert_with(Default::default);
            match step {
                Step::Write(e) => {
                    phases.push(format!(
                        "{}:{}",
                        e.name,
                        e.phase.clone().unwrap_or_default()
                    ));
                    match st.volume_status.iter_mut().find(|s| s.name == e.name) {
                        Some(s) => *s = *e,
                        None => st.volume_status.push(*e),
                    }
                }
                Step::Attach { volume } => {
                    skip.insert(volume.clone());
                    let e = st
                        .volume_status
                        .iter_mut()
                        .find(|s| s.name == volume)
                        .unwrap();
                    e.phase = Some(MOUNTED_TO_POD.into());
                    phases.push(format!("{volume}:{MOUNTED_TO_POD}"));
                }
                Step::Detach { volume } | Step::Remove { volume } => {
                    skip.insert(volume.clone());
                    st.volume_status.retain(|s| s.name != volume);
                    phases.push(format!("{volume}:gone"));
                }
            }
            assert!(phases.len() < 20, "planner loops: {phases:?}");
        }
        (v, phases)
    }

    #[test]
    fn attach_walks_every_phase() {
        let v = vmi(
            json!([{"name": "v1", "dataVolume": {"name": "dv1", "hotpluggable": true}}, {"name": "root", "containerDisk": {}}]),
            json!([]),
        );
        let (v, phases) = drive(v, &Knobs::default(), &claims());
        assert_eq!(
            phases,
            [
                "v1:Pending",
                "v1:AttachedToNode",
                "v1:MountedToPod",
                "v1:Ready"
            ]
        );
        let e = &v.status.as_ref().unwrap().volume_status[0];
        assert_eq!(e.target, "vda");
        assert!(
            e.hotplug_volume
                .as_ref()
                .unwrap()
                .attach_pod_name
                .as_deref()
                .unwrap()
                .starts_with("hp-volume-")
        );
        // Nothing more to do once Ready.
        assert_eq!(
            plan(&v, &claims(), &Knobs::default(), &HashSet::new()),
            None
        );
    }

    #[test]
    fn waits_for_claim_and_honours_knobs() {
        let v = vmi(
            json!([{"name": "v1", "dataVolume": {"name": "dv1", "hotpluggable": true}}]),
            json!([]),
        );
        let (v2, phases) = drive(v.clone(), &Knobs::default(), &BTreeMap::new());
        assert_eq!(phases, ["v1:Pending"]);
        assert_eq!(
            v2.status.unwrap().volume_status[0].reason.as_deref(),
            Some("PVCNotReady")
        );
        let (_, phases) = drive(
            v.clone(),
            &Knobs {
                never_ready: true,
                attach_failure: None,
            },
            &claims(),
        );
        assert_eq!(phases.last().map(String::as_str), Some("v1:MountedToPod"));
        let fail = AttachFailure {
            reason: "AttachFailed".into(),
            message: "boom".into(),
        };
        let (v3, phases) = drive(
            v,
            &Knobs {
                never_ready: false,
                attach_failure: Some(fail),
            },
            &claims(),
        );
        assert_eq!(phases.last().map(String::as_str), Some("v1:AttachedToNode"));
        assert_eq!(
            v3.status.unwrap().volume_status[0].reason.as_deref(),
            Some("AttachFailed")
        );
    }

    #[test]
    fn removal_detaches_and_forgets() {
        let ready = json!([{"name": "v1", "target": "sda", "phase": "Ready", "hotplugVolume": {"attachPodName": "hp-volume-1"}},
                           {"name": "root", "target": "vda", "phase": "Ready"}]);
        let v = vmi(json!([{"name": "root", "containerDisk": {}}]), ready);
        let (v, phases) = drive(v, &Knobs::default(), &claims());
        assert_eq!(phases, ["v1:Detaching", "v1:gone"]);
        let names: Vec<_> = v
            .status
            .unwrap()
            .volume_status
            .into_iter()
            .map(|s| s.name)
            .collect();
        assert_eq!(names, ["root"]);
    }

    #[test]
    fn targets_and_pods_are_stable() {
        let st = vec![VolumeStatus {
            name: "a".into(),
            target: "sda".into(),
            ..Default::default()
        }];
        assert_eq!(next_target(&st, Bus::Scsi), "sdb");
        assert_eq!(next_target(&st, Bus::Virtio), "vda");
        assert_eq!(attach_pod("u", "v"), attach_pod("u", "v"));
        assert_ne!(attach_pod("u", "v"), attach_pod("u", "w"));
    }

    #[test]
    fn declarative_sync_adds_and_removes_only_vm_volumes() {
        let template: VmiTemplate = serde_json::from_value(json!({"spec": {
            "domain": {"devices": {"disks": [{"name": "h1", "disk": {"bus": "scsi"}, "serial": "x"}]}},
            "volumes": [{"name": "h1", "persistentVolumeClaim": {"claimName": "c1", "hotpluggable": true}}]}})).unwrap();
        let mut v = vmi(
            json!([{"name": "vmilevel", "dataVolume": {"name": "dv9", "hotpluggable": true}}]),
            json!([]),
        );
        assert!(sync_vmi_volumes(&template, &mut v));
        assert_eq!(v.spec.volumes.len(), 2);
        assert!(!sync_vmi_volumes(&template, &mut v));
        let empty = VmiTemplate::default();
        assert!(sync_vmi_volumes(&empty, &mut v));
        let names: Vec<_> = v.spec.volumes.iter().map(|x| x.name.as_str()).collect();
        assert_eq!(names, ["vmilevel"]);
    }
}
