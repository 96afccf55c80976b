//! Start-up of the stand-in: READY only once the APIService is Available, measured.

mod standin_support;

use k8s_openapi::kube_aggregator::pkg::apis::apiregistration::v1::APIService;
use kube::api::Api;
use standin_support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standin_starts_registers_and_stops() {
    let env = env("standin-startup").await;
    eprintln!("{}", env.standin.log_tail(60));
    let svc: Api<APIService> = Api::all(env.client.clone());
    let a = svc
        .get("v1.subresources.kubevirt.io")
        .await
        .expect("apiservice registered");
    let conds = a.status.and_then(|s| s.conditions).unwrap_or_default();
    assert!(
        conds
            .iter()
            .any(|c| c.type_ == "Available" && c.status == "True"),
        "{conds:?}"
    );
    let spec = a.spec.expect("spec");
    assert_eq!(
        spec.service.as_ref().and_then(|s| s.name.as_deref()),
        Some("virt-api")
    );
    assert!(spec.ca_bundle.is_some());
    assert!(
        env.standin.started_in() < std::time::Duration::from_secs(30),
        "slow start: {:?}",
        env.standin.started_in()
    );
    env.standin.stop(std::time::Duration::from_secs(5)).await;
}
