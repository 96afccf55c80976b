//! Registers the stand-in behind the aggregation layer: a namespace, an ExternalName Service
//! pointing at localhost:<port>, and the APIService `v1.subresources.kubevirt.io`; then waits
//! (with a watch) until the aggregator reports it Available.

use crate::context::MANAGER;
use crate::server::{GROUP, VERSION};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Namespace, Service, ServicePort, ServiceSpec};
use k8s_openapi::kube_aggregator::pkg::apis::apiregistration::v1::{
    APIService, APIServiceSpec, ServiceReference,
};
use kube::Client;
use kube::api::{Api, ObjectMeta, Patch, PatchParams};
use kube::runtime::wait::await_condition;
use std::time::Duration;
use thiserror::Error;
use tracing::info;

pub const SERVICE: &str = "virt-api";

pub fn apiservice_name() -> String {
    format!("{VERSION}.{GROUP}")
}

#[derive(Debug, Error)]
pub enum RegistrationError {
    /// Creating the namespace, Service or APIService failed.
    #[error("cannot apply {what}: {source}")]
    Apply { what: String, source: kube::Error },
    /// The watch on the APIService failed.
    #[error("watching apiservice {name} failed: {message}")]
    Watch { name: String, message: String },
    /// The aggregator never reported the APIService Available.
    #[error("apiservice {name} not available after {timeout:?}; last status: {last}")]
    NotAvailable {
        name: String,
        timeout: Duration,
        last: String,
    },
}

fn ssa() -> PatchParams {
    PatchParams::apply(MANAGER).force()
}

/// Applies namespace, Service and APIService (idempotent, server-side apply).
pub async fn register(
    client: &Client,
    namespace: &str,
    port: u16,
    ca_pem: &str,
) -> Result<(), RegistrationError> {
    let err = |what: &str| {
        let what = what.to_string();
        move |source| RegistrationError::Apply { what, source }
    };
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(namespace.into()),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::<Namespace>::all(client.clone())
        .patch(namespace, &ssa(), &Patch::Apply(&ns))
        .await
        .map_err(err("namespace"))?;
    let svc = Service {
        metadata: ObjectMeta {
            name: Some(SERVICE.into()),
            namespace: Some(namespace.into()),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            type_: Some("ExternalName".into()),
            external_name: Some("localhost".into()),
            ports: Some(vec![ServicePort {
                name: Some("https".into()),
                port: i32::from(port),
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        status: None,
    };
    Api::<Service>::namespaced(client.clone(), namespace)
        .patch(SERVICE, &ssa(), &Patch::Apply(&svc))
        .await
        .map_err(err("service"))?;
    let name = apiservice_name();
    let apisvc = APIService {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            ..Default::default()
        },
        spec: Some(APIServiceSpec {
            group: Some(GROUP.into()),
            version: Some(VERSION.into()),
            group_priority_minimum: 1000,
            version_priority: 15,
            ca_bundle: Some(ByteString(ca_pem.as_bytes().to_vec())),
            service: Some(ServiceReference {
                namespace: Some(namespace.into()),
                name: Some(SERVICE.into()),
                port: Some(i32::from(port)),
            }),
            insecure_skip_tls_verify: None,
        }),
        status: None,
    };
    Api::<APIService>::all(client.clone())
        .patch(&name, &ssa(), &Patch::Apply(&apisvc))
        .await
        .map_err(err("apiservice"))?;
    info!(apiservice = %name, port, "registered with the aggregation layer");
    Ok(())
}

fn available(a: Option<&APIService>) -> bool {
    a.and_then(|a| a.status.as_ref())
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| {
            c.iter()
                .any(|c| c.type_ == "Available" && c.status == "True")
        })
}

/// Waits (watch, bounded by `timeout`) until the APIService is Available=True.
pub async fn wait_available(client: &Client, timeout: Duration) -> Result<(), RegistrationError> {
    let name = apiservice_name();
    let api = Api::<APIService>::all(client.clone());
    let cond = |a: Option<&APIService>| {
        let conds = a
            .and_then(|a| a.status.as_ref())
            .and_then(|s| s.conditions.as_ref());
        tracing::debug!(?conds, "apiservice status");
        available(a)
    };
    match tokio::time::timeout(timeout, await_condition(api.clone(), &name, cond)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(RegistrationError::Watch {
            name,
            message: e.to_string(),
        }),
        Err(_) => {
            let last = api
                .get_opt(&name)
                .await
                .ok()
                .flatten()
                .and_then(|a| a.status)
                .and_then(|s| serde_json::to_string(&s).ok())
                .unwrap_or_default();
            Err(RegistrationError::NotAvailable {
                name,
                timeout,
                last,
            })
        }
    }
}
