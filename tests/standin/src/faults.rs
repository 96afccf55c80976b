//! Fault and timing knobs, read at run time from the ConfigMap `kubevirt-standin-faults`
//! (key `faults.json`) in the stand-in's namespace.
//!
//! Once a new `faults.json` is applied, the stand-in copies it into the ConfigMap annotation
//! [`APPLIED_ANNOTATION`], so a test can wait (with a watch) until its knobs are live. Any
//! change of `faults.json` re-arms the "fail the next N calls" counters.

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tracing::{info, warn};

pub const CONFIGMAP: &str = "kubevirt-standin-faults";
pub const KEY: &str = "faults.json";
pub const APPLIED_ANNOTATION: &str = "standin.kubevirt-csi.io/applied-faults";
pub const ERROR_ANNOTATION: &str = "standin.kubevirt-csi.io/faults-error";

/// An operation a knob can slow down or fail.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Operation {
    /// The `addvolume` subresource call (VM or VMI).
    Addvolume,
    /// The `removevolume` subresource call (VM or VMI).
    Removevolume,
    /// Attaching a volume to the VMI (the backend step between AttachedToNode and MountedToPod).
    Attach,
    /// Detaching a volume from the VMI.
    Detach,
    /// Provisioning a PVC (creating its file and PV).
    Provision,
    /// Taking a VolumeSnapshot.
    Snapshot,
    /// Growing a PVC.
    Expand,
}

impl Operation {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Addvolume => "addvolume",
            Self::Removevolume => "removevolume",
            Self::Attach => "attach",
            Self::Detach => "detach",
            Self::Provision => "provision",
            Self::Snapshot => "snapshot",
            Self::Expand => "expand",
        }
    }
}

/// Fail the next `count` calls of an operation.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FailNext {
    pub count: u32,
    /// HTTP status for `addvolume`/`removevolume`; recorded in the failure message otherwise.
    #[serde(default = "default_status")]
    pub status: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

fn default_status() -> u16 {
    500
}

/// Report every attach as failed while set.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AttachFailure {
    #[serde(default = "default_attach_reason")]
    pub reason: String,
    #[serde(default = "default_attach_message")]
    pub message: String,
}

fn default_attach_reason() -> String {
    "AttachFailed".into()
}
fn default_attach_message() -> String {
    "injected attach failure".into()
}

/// The `faults.json` document.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Faults {
    /// Extra latency per operation, in milliseconds.
    #[serde(default)]
    pub delay_ms: BTreeMap<Operation, u64>,
    /// Fail the next N calls of an operation.
    #[serde(default)]
    pub fail: BTreeMap<Operation, FailNext>,
    /// Attaches stop at MountedToPod and never become Ready.
    #[serde(default)]
    pub never_ready: bool,
    /// Attaches are reported failed (phase stays AttachedToNode with this reason).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attach_failure: Option<AttachFailure>,
}

/// An injected failure of one call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Injected {
    pub status: u16,
    pub message: String,
}

#[derive(Default)]
struct Inner {
    faults: Faults,
    remaining: BTreeMap<Operation, u32>,
}

/// The live knobs, shared by every controller and handler.
#[derive(Clone)]
pub struct FaultState {
    inner: Arc<Mutex<Inner>>,
    changed: watch::Sender<u64>,
}

impl Default for FaultState {
    fn default() -> Self {
        Self {
            inner: Arc::default(),
            changed: watch::channel(0).0,
        }
    }
}

impl FaultState {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave the counters inconsistent.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Replaces the knobs and re-arms the counters.
    pub fn apply(&self, faults: Faults) {
        {
            let mut inner = self.lock();
            inner.remaining = faults.fail.iter().map(|(op, f)| (*op, f.count)).collect();
            inner.faults = faults;
        }
        self.changed.send_modify(|g| *g += 1);
    }

    /// Fires whenever the knobs change (used to re-run reconcilers blocked by a knob).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    pub fn delay(&self, op: Operation) -> Duration {
        Duration::from_millis(self.lock().faults.delay_ms.get(&op).copied().unwrap_or(0))
    }

    /// Sleeps for the configured delay of `op`.
    pub async fn wait(&self, op: Operation) {
        let d = self.delay(op);
        if !d.is_zero() {
            tokio::time::sleep(d).await;
        }
    }

    /// Consumes one injected failure of `op`, if any is armed.
    pub fn take_failure(&self, op: Operation) -> Option<Injected> {
        let mut inner = self.lock();
        let left = inner.remaining.get_mut(&op)?;
        if *left == 0 {
            return None;
        }
        *left -= 1;
        let spec = inner.faults.fail.get(&op)?;
        Some(Injected {
            status: spec.status,
            message: spec.message.clone().unwrap_or_else(|| {
                format!("injected {} failure (status {})", op.as_str(), spec.status)
            }),
        })
    }

    pub fn never_ready(&self) -> bool {
        self.lock().faults.never_ready
    }

    pub fn attach_failure(&self) -> Option<AttachFailure> {
        self.lock().faults.attach_failure.clone()
    }
}

/// Parses `faults.json`; an absent or empty document means no faults.
pub fn parse(doc: Option<&str>) -> Result<Faults, serde_json::Error> {
    match doc.map(str::trim) {
        None | Some("") => Ok(Faults::default()),
        Some(s) => serde_json::from_str(s),
    }
}

/// Watches the faults ConfigMap until the stream ends, applying each new document.
pub async fn run(api: Api<ConfigMap>, state: FaultState) {
    let cfg = watcher::Config::default().fields(&format!("metadata.name={CONFIGMAP}"));
    let mut stream = watcher(api.clone(), cfg).default_backoff().boxed();
    loop {
        let cm = match stream.try_next().await {
            Ok(Some(watcher::Event::Apply(cm) | watcher::Event::InitApply(cm))) => Some(cm),
            Ok(Some(watcher::Event::Delete(_))) => None,
            Ok(Some(_)) => continue,
            Ok(None) => return,
            Err(e) => {
                warn!(error = %e, "faults configmap watch error");
                continue;
            }
        };
        let Some(cm) = cm else {
            info!("faults configmap deleted: clearing all faults");
            state.apply(Faults::default());
            continue;
        };
        let doc = cm
            .data
            .as_ref()
            .and_then(|d| d.get(KEY))
            .cloned()
            .unwrap_or_default();
        let annotations = cm.metadata.annotations.clone().unwrap_or_default();
        if annotations.get(APPLIED_ANNOTATION) == Some(&doc) {
            continue;
        }
        let patch = match parse(Some(&doc)) {
            Ok(faults) => {
                info!(?faults, "applying fault knobs");
                state.apply(faults);
                serde_json::json!({"metadata": {"annotations": {APPLIED_ANNOTATION: doc, ERROR_ANNOTATION: null}}})
            }
            Err(e) => {
                warn!(error = %e, "invalid faults.json: keeping the previous knobs");
                serde_json::json!({"metadata": {"annotations": {ERROR_ANNOTATION: e.to_string()}}})
            }
        };
        if annotations.get(ERROR_ANNOTATION).is_some_and(|v| {
            Some(v.as_str()) == patch["metadata"]["annotations"][ERROR_ANNOTATION].as_str()
        }) {
            continue;
        }
        if let Err(e) = api
            .patch(CONFIGMAP, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            warn!(error = %e, "could not acknowledge the faults configmap");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_full_document() {
        let f = parse(Some(
            r#"{"delayMs": {"attach": 250, "provision": 10},
                "fail": {"addvolume": {"count": 2, "status": 503}},
                "neverReady": true,
                "attachFailure": {"message": "boom"}}"#,
        ))
        .unwrap();
        assert_eq!(f.delay_ms[&Operation::Attach], 250);
        assert!(f.never_ready);
        let af = f.attach_failure.clone().unwrap();
        assert_eq!(
            (af.reason.as_str(), af.message.as_str()),
            ("AttachFailed", "boom")
        );
        let s = FaultState::default();
        s.apply(f);
        assert_eq!(s.delay(Operation::Provision), Duration::from_millis(10));
        assert_eq!(s.take_failure(Operation::Addvolume).unwrap().status, 503);
        assert!(s.take_failure(Operation::Addvolume).is_some());
        assert!(s.take_failure(Operation::Addvolume).is_none());
        assert!(s.take_failure(Operation::Removevolume).is_none());
    }

    #[test]
    fn empty_and_invalid_documents() {
        assert_eq!(parse(None).unwrap(), Faults::default());
        assert_eq!(parse(Some("  ")).unwrap(), Faults::default());
        assert!(parse(Some(r#"{"delayMs": {"teleport": 1}}"#)).is_err());
        assert!(parse(Some(r#"{"neverready": true}"#)).is_err());
    }

    #[test]
    fn reapply_rearms_counters() {
        let s = FaultState::default();
        let f = parse(Some(r#"{"fail": {"detach": {"count": 1}}}"#)).unwrap();
        s.apply(f.clone());
        assert_eq!(s.take_failure(Operation::Detach).unwrap().status, 500);
        assert!(s.take_failure(Operation::Detach).is_none());
        s.apply(f);
        assert!(s.take_failure(Operation::Detach).is_some());
    }
}
