//! The QEMU backend: hotplug over QMP on the socket named by the VMI's annotation.
//!
//! Attach is `blockdev-add` (a raw node over the PV's file) then `device_add` (`scsi-hd` on the
//! `scsi0` virtio-scsi controller, or `virtio-blk-pci` in a free `hpN` PCIe root port) with
//! the requested serial. Detach is `device_del`, the `DEVICE_DELETED` event, then
//! `blockdev-del`. One QMP session is kept per socket and its operations are serialised.

use super::{AttachBackend, AttachRequest, BackendError, Bus, QMP_SOCKET_ANNOTATION};
use futures::future::{BoxFuture, FutureExt};
use kubevirt_csi_harness::vm::qmp::{Qmp, QmpError};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex;
use tracing::{debug, info, warn};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const UNPLUG_TIMEOUT: Duration = Duration::from_secs(30);
/// The worker VM names its empty PCIe root ports `hp0`, `hp1`, ...
const MAX_ROOT_PORTS: usize = 32;
const SCSI_BUS: &str = "scsi0.0";

struct Session {
    qmp: Qmp,
    /// device id -> what it occupies and is backed by.
    attached: HashMap<String, Attached>,
}

struct Attached {
    /// Root port the device occupies (virtio only).
    port: Option<String>,
    /// Block node name, for block_resize.
    node: String,
    /// Backing file.
    path: PathBuf,
}

#[derive(Default)]
pub struct Qemu {
    sessions: Mutex<HashMap<PathBuf, Arc<Mutex<Option<Session>>>>>,
}

/// FNV-1a: a short stable id from the volume's identity (QEMU node names stop at 31 bytes).
fn short_hash(s: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// The QEMU device id and block node name for a request.
pub fn ids(req: &AttachRequest) -> (String, String) {
    let h = short_hash(&format!("{}/{}/{}", req.namespace, req.vmi, req.volume));
    (format!("hpd-{h}"), format!("hpn-{h}"))
}

fn qmp_err(step: &'static str, req: &AttachRequest, socket: &str, e: QmpError) -> BackendError {
    BackendError::Qmp {
        step,
        volume: req.volume.clone(),
        socket: socket.to_string(),
        message: e.to_string(),
    }
}

fn is_gone(e: &QmpError) -> bool {
    matches!(e, QmpError::Closed | QmpError::Io(_))
}

impl Qemu {
    fn socket(req: &AttachRequest) -> String {
        req.vmi_annotations
            .get(QMP_SOCKET_ANNOTATION)
            .cloned()
            .unwrap_or_default()
    }

    async fn slot(&self, socket: &str) -> Arc<Mutex<Option<Session>>> {
        self.sessions
            .lock()
            .await
            .entry(PathBuf::from(socket))
            .or_default()
            .clone()
    }

    async fn connect(
        slot: &mut Option<Session>,
        socket: &str,
        req: &AttachRequest,
    ) -> Result<(), BackendError> {
        if slot.is_none() {
            let qmp = Qmp::connect(socket.as_ref(), CONNECT_TIMEOUT)
                .await
                .map_err(|e| qmp_err("connect", req, socket, e))?;
            info!(socket, "qmp session open");
            *slot = Some(Session {
                qmp,
                attached: HashMap::new(),
            });
        }
        Ok(())
    }

    async fn attach_inner(&self, req: &AttachRequest) -> Result<(), BackendError> {
        let socket = Self::socket(req);
        let slot = self.slot(&socket).await;
        let mut guard = slot.lock().await;
        Self::connect(&mut guard, &socket, req).await?;
        let Some(session) = guard.as_mut() else {
            return Err(qmp_err("connect", req, &socket, QmpError::Closed));
        };
        let result = attach_on(session, req, &socket).await;
        if let Err(BackendError::Qmp { message, .. }) = &result {
            debug!(%message, "qmp attach failed");
        }
        if result.as_ref().is_err_and(|_| session_broken(session)) {
            *guard = None;
        }
        result
    }

    async fn detach_inner(&self, req: &AttachRequest) -> Result<(), BackendError> {
        let socket = Self::socket(req);
        let slot = self.slot(&socket).await;
        let mut guard = slot.lock().await;
        Self::connect(&mut guard, &socket, req).await?;
        let Some(session) = guard.as_mut() else {
            return Err(qmp_err("connect", req, &socket, QmpError::Closed));
        };
        let result = detach_on(session, req, &socket).await;
        if result.as_ref().is_err_and(|_| session_broken(session)) {
            *guard = None;
        }
        result
    }
}

fn session_broken(session: &Session) -> bool {
    // A closed connection makes every later command fail with Closed; probing is cheap.
    session.qmp.subscribe().is_closed()
}

async fn attach_on(
    session: &mut Session,
    req: &AttachRequest,
    socket: &str,
) -> Result<(), BackendError> {
    let (dev, node) = ids(req);
    if session.attached.contains_key(&dev) {
        return Ok(());
    }
    let exec = |cmd: &'static str, args: Value| {
        let qmp = &session.qmp;
        async move { qmp.execute(cmd, Some(args)).await }
    };
    exec(
        "blockdev-add",
        json!({"driver": "raw", "node-name": node, "read-only": req.read_only,
               "file": {"driver": "file", "filename": req.path, "read-only": req.read_only}}),
    )
    .await
    .map_err(|e| qmp_err("blockdev-add", req, socket, e))?;
    let mut device = json!({"id": dev, "drive": node});
    if let Some(serial) = &req.serial {
        device["serial"] = json!(serial);
    }
    let outcome = match req.bus {
        Bus::Scsi | Bus::Sata => {
            device["driver"] = json!("scsi-hd");
            device["bus"] = json!(SCSI_BUS);
            exec("device_add", device)
                .await
                .map(|_| None)
                .map_err(|e| qmp_err("device_add", req, socket, e))
        }
        Bus::Virtio => {
            device["driver"] = json!("virtio-blk-pci");
            let used: Vec<String> = session
                .attached
                .values()
                .filter_map(|a| a.port.clone())
                .collect();
            let mut last = Err(BackendError::NoFreeSlot(req.volume.clone()));
            for port in (0..MAX_ROOT_PORTS).map(|n| format!("hp{n}")) {
                if used.contains(&port) {
                    continue;
                }
                device["bus"] = json!(port);
                match exec("device_add", device.clone()).await {
                    Ok(_) => {
                        last = Ok(Some(port));
                        break;
                    }
                    Err(e) if is_gone(&e) => {
                        last = Err(qmp_err("device_add", req, socket, e));
                        break;
                    }
                    // Occupied or missing port: try the next one.
                    Err(e) => last = Err(qmp_err("device_add", req, socket, e)),
                }
            }
            last
        }
    };
    match outcome {
        Ok(port) => {
            info!(volume = %req.volume, vmi = %req.vmi, dev, ?port, "qmp attach done");
            session.attached.insert(
                dev,
                Attached {
                    port,
                    node: node.clone(),
                    path: req.path.clone(),
                },
            );
            Ok(())
        }
        Err(e) => {
            // Best effort: do not leave the block node behind.
            let _ = exec("blockdev-del", json!({"node-name": node})).await;
            Err(e)
        }
    }
}

async fn detach_on(
    session: &mut Session,
    req: &AttachRequest,
    socket: &str,
) -> Result<(), BackendError> {
    let (dev, node) = ids(req);
    let mut events = session.qmp.subscribe();
    match session
        .qmp
        .execute("device_del", Some(json!({"id": dev})))
        .await
    {
        Ok(_) => {
            let want = dev.clone();
            Qmp::wait_event(
                &mut events,
                "DEVICE_DELETED",
                &dev,
                UNPLUG_TIMEOUT,
                move |d| d.get("device").and_then(Value::as_str) == Some(want.as_str()),
            )
            .await
            .map_err(|e| qmp_err("wait DEVICE_DELETED", req, socket, e))?;
        }
        // Already gone (e.g. a retried detach): continue with the block node.
        Err(QmpError::Command { class, .. }) if class == "DeviceNotFound" => {}
        Err(e) => return Err(qmp_err("device_del", req, socket, e)),
    }
    match session
        .qmp
        .execute("blockdev-del", Some(json!({"node-name": node})))
        .await
    {
        Ok(_) => {}
        Err(QmpError::Command { desc, .. })
            if desc.contains("not found") || desc.contains("Cannot find") => {}
        Err(e) => return Err(qmp_err("blockdev-del", req, socket, e)),
    }
    session.attached.remove(&dev);
    info!(volume = %req.volume, vmi = %req.vmi, dev, "qmp detach done");
    Ok(())
}

impl Qemu {
    /// Tells every QEMU that has `path` attached that it grew (QMP `block_resize`), as
    /// libvirt does for KubeVirt when a hotplugged PVC is expanded: the guest is notified
    /// (virtio-blk config change, SCSI capacity-changed unit attention) and sees the new size.
    pub async fn resized(&self, path: &std::path::Path, size: u64) {
        let slots: Vec<(PathBuf, Arc<Mutex<Option<Session>>>)> = self
            .sessions
            .lock()
            .await
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (socket, slot) in slots {
            let mut guard = slot.lock().await;
            let Some(session) = guard.as_mut() else {
                continue;
            };
            let nodes: Vec<String> = session
                .attached
                .values()
                .filter(|a| a.path == path)
                .map(|a| a.node.clone())
                .collect();
            for node in nodes {
                match session
                    .qmp
                    .execute(
                        "block_resize",
                        Some(json!({"node-name": node, "size": size})),
                    )
                    .await
                {
                    Ok(_) => info!(socket = %socket.display(), node, size, "qmp block_resize done"),
                    Err(e) => {
                        warn!(socket = %socket.display(), node, error = %e, "qmp block_resize failed")
                    }
                }
            }
        }
    }
}

impl AttachBackend for Qemu {
    fn name(&self) -> &'static str {
        "qemu"
    }
    fn attach<'a>(&'a self, req: &'a AttachRequest) -> BoxFuture<'a, Result<(), BackendError>> {
        self.attach_inner(req).boxed()
    }
    fn detach<'a>(&'a self, req: &'a AttachRequest) -> BoxFuture<'a, Result<(), BackendError>> {
        self.detach_inner(req).boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_short_and_stable() {
        let req = AttachRequest {
            namespace: "tenant-a".into(),
            vmi: "worker-0".into(),
            volume: "pvc-0b8d5a0e-1a2b-4c3d-9e8f-001122334455".into(),
            serial: None,
            bus: Bus::Scsi,
            path: "/x".into(),
            read_only: false,
            vmi_annotations: Default::default(),
        };
        let (d, n) = ids(&req);
        assert!(d.len() <= 31 && n.len() <= 31);
        assert_eq!(ids(&req), (d, n.clone()));
        let other = AttachRequest {
            namespace: "tenant-b".into(),
            ..req
        };
        assert_ne!(ids(&other).1, n);
    }
}
