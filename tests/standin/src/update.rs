//! Optimistic, resourceVersion-guarded read-modify-write of API objects.
//!
//! Every write sends the resourceVersion it read; a 409 Conflict from the apiserver means
//! someone else wrote in between, so the object is read again and the change re-applied.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, PostParams};
use kube::{Client, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::fmt::Debug;
use tracing::debug;

/// How many times a conflicting write is retried before giving up.
pub const MAX_ATTEMPTS: usize = 16;

pub fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.is_conflict())
}

pub fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.is_not_found())
}

pub fn is_already_exists(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.is_already_exists())
}

/// Where status writes go for a kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatusWrites {
    /// The CRD has a status subresource: write through `/status`.
    Subresource,
    /// No status subresource: status is part of the main object.
    MainResource,
}

/// Reads the CRD `name` and reports whether its served version `version` has a status subresource.
pub async fn status_writes_for(
    client: &Client,
    crd_name: &str,
    version: &str,
) -> Result<StatusWrites, kube::Error> {
    let crd = Api::<CustomResourceDefinition>::all(client.clone())
        .get(crd_name)
        .await?;
    let has = crd
        .spec
        .versions
        .iter()
        .find(|v| v.name == version)
        .and_then(|v| v.subresources.as_ref())
        .and_then(|s| s.status.as_ref())
        .is_some();
    Ok(if has {
        StatusWrites::Subresource
    } else {
        StatusWrites::MainResource
    })
}

/// What a change function decided.
pub enum Change<T> {
    /// Write the modified object, then return `T`.
    Write(T),
    /// Leave the object as it is and return `T`.
    Keep(T),
}

/// Reads `name`, applies `f`, writes the result guarded by resourceVersion; retries on conflicts.
///
/// Returns `Ok(None)` when the object does not exist. `f` may refuse with an error of its own,
/// which is returned unchanged (nothing is written).
pub async fn update<K, T, E>(
    api: &Api<K>,
    name: &str,
    target: StatusWrites,
    status: bool,
    mut f: impl FnMut(&mut K) -> Result<Change<T>, E>,
) -> Result<Option<(K, T)>, E>
where
    K: Resource + Clone + Serialize + DeserializeOwned + Debug,
    E: From<kube::Error>,
{
    let mut attempt = 0;
    loop {
        attempt += 1;
        let Some(mut obj) = api.get_opt(name).await? else {
            return Ok(None);
        };
        let out = match f(&mut obj)? {
            Change::Keep(t) => return Ok(Some((obj, t))),
            Change::Write(t) => t,
        };
        let pp = PostParams::default();
        let res = if status && target == StatusWrites::Subresource {
            api.replace_status(name, &pp, &obj).await
        } else {
            api.replace(name, &pp, &obj).await
        };
        match res {
            Ok(written) => return Ok(Some((written, out))),
            Err(e) if is_conflict(&e) && attempt < MAX_ATTEMPTS => {
                debug!(name, attempt, "write conflict, retrying");
            }
            Err(e) if is_not_found(&e) => return Ok(None),
            Err(e) => return Err(e.into()),
        }
    }
}

/// Removes a finalizer from an object, if present.
pub async fn remove_finalizer<K>(
    api: &Api<K>,
    name: &str,
    finalizer: &str,
) -> Result<(), kube::Error>
where
    K: Resource + Clone + Serialize + DeserializeOwned + Debug,
{
    update(api, name, StatusWrites::MainResource, false, |o: &mut K| {
        let fins = o.meta_mut().finalizers.get_or_insert_with(Vec::new);
        let before = fins.len();
        fins.retain(|f| f != finalizer);
        Ok::<_, kube::Error>(if fins.len() == before {
            Change::Keep(())
        } else {
            Change::Write(())
        })
    })
    .await
    .map(|_| ())
}

/// Adds a finalizer to an object, if missing. Returns the object as written.
pub async fn add_finalizer<K>(
    api: &Api<K>,
    name: &str,
    finalizer: &str,
) -> Result<Option<K>, kube::Error>
where
    K: Resource + Clone + Serialize + DeserializeOwned + Debug,
{
    let r = update(api, name, StatusWrites::MainResource, false, |o: &mut K| {
        let fins = o.meta_mut().finalizers.get_or_insert_with(Vec::new);
        if fins.iter().any(|f| f == finalizer) {
            return Ok::<_, kube::Error>(Change::Keep(()));
        }
        fins.push(finalizer.to_string());
        Ok(Change::Write(()))
    })
    .await?;
    Ok(r.map(|(o, ())| o))
}

/// Deletes an object; one that is already gone is fine.
pub async fn delete_ignoring_missing<K>(api: &Api<K>, name: &str) -> Result<(), kube::Error>
where
    K: Resource + Clone + DeserializeOwned + Debug,
{
    match api.delete(name, &Default::default()).await {
        Ok(_) => Ok(()),
        Err(e) if is_not_found(&e) => Ok(()),
        Err(e) => Err(e),
    }
}

/// The current time as an RFC 3339 string, as Kubernetes writes timestamps.
pub fn now_rfc3339() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .round(k8s_openapi::jiff::Unit::Second)
        .map(|t| t.to_string())
        .unwrap_or_default()
}
