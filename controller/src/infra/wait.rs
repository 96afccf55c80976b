//! Waiting for an infra object to reach a state, on a watch.
//!
//! The reference driver polls every second; we watch the one object by name and decide on
//! every event, so a wait ends as soon as the apiserver tells us. A dropped watch is
//! re-established with backoff by kube-runtime's watcher; the whole wait is bounded.

use std::fmt::Debug;
use std::time::Duration;

use futures::StreamExt;
use kube::api::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use serde::de::DeserializeOwned;

use crate::error::InfraError;

/// What a wait predicate decides about the object's current state.
#[derive(Debug, PartialEq, Eq)]
pub enum Progress {
    /// Keep waiting.
    Pending,
    /// The state we waited for.
    Done,
    /// A state that will not turn into the one we want; the string says why.
    Failed(String),
}

/// A wait that ended in a state we cannot get past.
#[derive(Debug, thiserror::Error)]
pub enum WaitError {
    #[error(transparent)]
    Infra(#[from] InfraError),
    #[error("{0}")]
    Failed(String),
}

/// Watches `name` in `api` until `check` says Done or Failed, or `timeout` passes.
/// `check` sees `None` while the object does not exist.
pub async fn wait_for<K>(
    api: Api<K>,
    name: &str,
    what: &str,
    timeout: Duration,
    mut check: impl FnMut(Option<&K>) -> Progress,
) -> Result<Option<K>, WaitError>
where
    K: kube::Resource + Clone + Debug + DeserializeOwned + Send + 'static,
{
    let cfg = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut events = watcher::watcher(api, cfg).default_backoff().boxed();
    let mut current: Option<K> = None;
    let mut init: Option<K> = None;
    let work = async {
        while let Some(event) = events.next().await {
            let decide = match event {
                Ok(Event::Init) => {
                    init = None;
                    false
                }
                Ok(Event::InitApply(obj)) => {
                    init = Some(obj);
                    false
                }
                Ok(Event::InitDone) => {
                    current = init.take();
                    true
                }
                Ok(Event::Apply(obj)) => {
                    current = Some(obj);
                    true
                }
                Ok(Event::Delete(_)) => {
                    current = None;
                    true
                }
                Err(err) => {
                    // The watcher retries with backoff; the overall timeout bounds us.
                    tracing::debug!(%name, error = %err, "watch interrupted while waiting; resuming");
                    false
                }
            };
            if decide {
                match check(current.as_ref()) {
                    Progress::Pending => {}
                    Progress::Done => return Ok(current.take()),
                    Progress::Failed(why) => return Err(WaitError::Failed(why)),
                }
            }
        }
        Err(WaitError::Failed(format!("watch on {name} ended")))
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(result) => result,
        Err(_) => Err(InfraError::Timeout {
            what: what.to_string(),
            waited: timeout,
        }
        .into()),
    }
}
