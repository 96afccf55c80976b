//! The stand-in's fault and timing knobs (ConfigMap `kubevirt-standin-faults`), end to end.

mod standin_support;

use std::time::{Duration, Instant};

use kube::api::{Api, DynamicObject};
use kubevirt_csi_harness::standin::set_faults;
use serde_json::json;
use standin_support::*;

const VMI: &str = "virtualmachineinstances";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standin_fault_knobs() {
    let env = env("standin-faults").await;
    let c = &env.client;
    namespace(c, "t").await;
    running_vmi(c, "t", "w", json!({})).await;
    let dvs: Api<DynamicObject> = Api::namespaced_with(c.clone(), "t", &dv_ar());
    let vmis: Api<DynamicObject> = Api::namespaced_with(c.clone(), "t", &vmi_ar());
    let knobs = |v| async move {
        set_faults(c, &v, Duration::from_secs(10))
            .await
            .expect("faults applied")
    };

    // Provision delay.
    knobs(json!({"delayMs": {"provision": 700}})).await;
    let t = Instant::now();
    blank_dv(c, "t", "d1", "8Mi").await;
    wait_for(&dvs, "d1", "Succeeded", |o| {
        o.data["status"]["phase"] == "Succeeded"
    })
    .await;
    assert!(
        t.elapsed() >= Duration::from_millis(700),
        "{:?}",
        t.elapsed()
    );

    // Fail the next 2 addvolume calls with 409, then succeed. (kube-rs retries 429/503/504
    // itself, so those statuses would be consumed by the client's own retries.)
    knobs(json!({"fail": {"addvolume": {"count": 2, "status": 409, "message": "try later"}}}))
        .await;
    for _ in 0..2 {
        let (code, msg) = subresource(
            c,
            "t",
            VMI,
            "w",
            "addvolume",
            &add_body("v1", "d1", "s1", "scsi"),
        )
        .await;
        assert_eq!(code, 409, "{msg}");
        assert!(msg.contains("try later"), "{msg}");
    }
    assert_eq!(
        subresource(
            c,
            "t",
            VMI,
            "w",
            "addvolume",
            &add_body("v1", "d1", "s1", "scsi")
        )
        .await
        .0,
        202
    );
    wait_for(&vmis, "w", "v1 Ready", |o| {
        phase_of(o, "v1").as_deref() == Some("Ready")
    })
    .await;

    // Attach delay.
    knobs(json!({"delayMs": {"attach": 800}})).await;
    blank_dv(c, "t", "d2", "8Mi").await;
    wait_for(&dvs, "d2", "Succeeded", |o| {
        o.data["status"]["phase"] == "Succeeded"
    })
    .await;
    let t = Instant::now();
    assert_eq!(
        subresource(
            c,
            "t",
            VMI,
            "w",
            "addvolume",
            &add_body("v2", "d2", "s2", "scsi")
        )
        .await
        .0,
        202
    );
    wait_for(&vmis, "w", "v2 Ready", |o| {
        phase_of(o, "v2").as_deref() == Some("Ready")
    })
    .await;
    assert!(
        t.elapsed() >= Duration::from_millis(800),
        "{:?}",
        t.elapsed()
    );

    // neverReady: the attach stops at MountedToPod; clearing the knob lets it finish.
    knobs(json!({"neverReady": true})).await;
    blank_dv(c, "t", "d3", "8Mi").await;
    wait_for(&dvs, "d3", "Succeeded", |o| {
        o.data["status"]["phase"] == "Succeeded"
    })
    .await;
    assert_eq!(
        subresource(
            c,
            "t",
            VMI,
            "w",
            "addvolume",
            &add_body("v3", "d3", "s3", "scsi")
        )
        .await
        .0,
        202
    );
    wait_for(&vmis, "w", "v3 MountedToPod", |o| {
        phase_of(o, "v3").as_deref() == Some("MountedToPod")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        phase_of(&vmis.get("w").await.unwrap(), "v3").as_deref(),
        Some("MountedToPod")
    );
    knobs(json!({})).await;
    wait_for(&vmis, "w", "v3 Ready", |o| {
        phase_of(o, "v3").as_deref() == Some("Ready")
    })
    .await;

    // attachFailure: non-Ready with reason/message; removal still cleans up.
    knobs(json!({"attachFailure": {"reason": "AttachFailed", "message": "no free slot"}})).await;
    blank_dv(c, "t", "d4", "8Mi").await;
    wait_for(&dvs, "d4", "Succeeded", |o| {
        o.data["status"]["phase"] == "Succeeded"
    })
    .await;
    assert_eq!(
        subresource(
            c,
            "t",
            VMI,
            "w",
            "addvolume",
            &add_body("v4", "d4", "s4", "scsi")
        )
        .await
        .0,
        202
    );
    let failed = wait_for(&vmis, "w", "v4 AttachFailed", |o| {
        volume_status(o, "v4").is_some_and(|s| s["reason"] == "AttachFailed")
    })
    .await;
    let st = volume_status(&failed, "v4").unwrap();
    assert_ne!(st["phase"], "Ready");
    assert_eq!(st["message"], "no free slot");
    assert_eq!(
        subresource(c, "t", VMI, "w", "removevolume", &json!({"name": "v4"}))
            .await
            .0,
        202
    );
    wait_for(&vmis, "w", "v4 gone", |o| volume_status(o, "v4").is_none()).await;

    // Fail the next detach once: Detaching with DetachFailed, then retried to completion.
    knobs(json!({"fail": {"detach": {"count": 1}}})).await;
    assert_eq!(
        subresource(c, "t", VMI, "w", "removevolume", &json!({"name": "v1"}))
            .await
            .0,
        202
    );
    wait_for(&vmis, "w", "v1 gone after a failed detach", |o| {
        volume_status(o, "v1").is_none()
    })
    .await;

    // removevolume failure with a chosen status.
    knobs(json!({"fail": {"removevolume": {"count": 1, "status": 500}}})).await;
    assert_eq!(
        subresource(c, "t", VMI, "w", "removevolume", &json!({"name": "v2"}))
            .await
            .0,
        500
    );
    assert_eq!(
        subresource(c, "t", VMI, "w", "removevolume", &json!({"name": "v2"}))
            .await
            .0,
        202
    );

    // An invalid faults.json is reported on the ConfigMap and the old knobs stay.
    let err = set_faults(
        c,
        &json!({"delayMs": {"teleport": 1}}),
        Duration::from_secs(10),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("teleport"), "{err}");

    env.standin.stop(Duration::from_secs(5)).await;
}
