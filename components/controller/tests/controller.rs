//! The controller against a localcluster API server on loopback. The test plays the scheduler
//! and the kubelet on the backend's pod (binding it, writing its status), so every phase the
//! controller derives from a pod can be driven precisely.

mod common;

use std::time::Duration;

use common::*;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::events::v1::Event;
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, ResourceExt};
use serde_json::json;
use spawner_controller::ControllerConfig;
use spawner_core::children::{EVENTS_TOKEN_ENV, SIDECAR_CONTAINER_NAME};
use spawner_core::phase::Phase;
use spawner_core::resource::{NODE_LABEL, SessionLivedBackend};
use spawner_core::token::{check_token, events_token};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawn_runs_then_app_crash_fails_with_exit_code_and_is_cleaned_up() {
    let api = cluster().await;
    let client = client_for(api);
    let controller = RunningController::start(api, config("c1", false));

    let created = create_backend(&client, &backend_json("slab-crash", json!({}))).await;
    let uid = created.uid().expect("uid");
    let constructed = wait_for_phase(&client, "slab-crash", Phase::Constructed).await;
    let status = constructed.status.expect("status");
    assert_eq!(
        status.url.as_deref(),
        Some("http://slab-crash.default.svc.cluster.local:80")
    );
    let types: Vec<_> = status.conditions.iter().map(|c| c.type_.as_str()).collect();
    assert_eq!(types, ["Submitted", "Constructed"]);

    // The pod carries the sidecar with this backend's events token, and is owned by it.
    let pod = wait_for_pod(&client, "slab-crash").await;
    let spec = pod.spec.as_ref().expect("spec");
    let sidecar = spec
        .containers
        .iter()
        .find(|c| c.name == SIDECAR_CONTAINER_NAME)
        .expect("sidecar");
    let token = sidecar
        .env
        .as_deref()
        .unwrap_or_default()
        .iter()
        .find(|e| e.name == EVENTS_TOKEN_ENV)
        .and_then(|e| e.value.clone());
    // It carries a check of the token, not the token: reading pods does not open the stream.
    let check = token.expect("events token check");
    let expected = events_token(SECRET, &uid);
    assert!(check_token(&check, &expected), "{check}");
    assert!(
        !check.contains(&expected),
        "the pod spec reveals the events token"
    );
    assert_eq!(pod.owner_references()[0].uid, uid);
    let services: Api<Service> = Api::default_namespaced(client.clone());
    assert!(services.get_opt("slab-crash").await.expect("svc").is_some());

    bind(&client, "slab-crash", "node-a").await;
    let scheduled = wait_for_phase(&client, "slab-crash", Phase::Scheduled).await;
    assert_eq!(
        scheduled
            .status
            .as_ref()
            .and_then(|s| s.node_name.as_deref()),
        Some("node-a")
    );
    let labelled = wait_for(
        &client,
        "slab-crash",
        Duration::from_secs(10),
        "labelled",
        |b| b.is_some_and(|b| b.labels().get(NODE_LABEL).map(String::as_str) == Some("node-a")),
    )
    .await;
    assert!(labelled.is_some());

    set_pod_status(
        &client,
        "slab-crash",
        json!({"phase": "Running", "podIP": "127.0.5.6",
               "containerStatuses": [container("app", json!({"running": {}}))]}),
    )
    .await;
    wait_for_phase(&client, "slab-crash", Phase::Running).await;

    set_pod_status(
        &client,
        "slab-crash",
        json!({"phase": "Failed",
               "containerStatuses": [container("app", json!({"terminated": {"exitCode": 3, "reason": "Error"}}))]}),
    )
    .await;
    let failed = wait_for_phase(&client, "slab-crash", Phase::Failed).await;
    let status = failed.status.expect("status");
    assert_eq!(status.exit_code, Some(3));
    assert_eq!(status.reason.as_deref(), Some("ApplicationExited"));
    assert_eq!(status.observed_generation, failed.metadata.generation);
    let types: Vec<_> = status.conditions.iter().map(|c| c.type_.as_str()).collect();
    assert_eq!(
        types,
        ["Submitted", "Constructed", "Scheduled", "Running", "Failed"]
    );

    // The pod goes at once; the backend stays readable for the retention period, then goes.
    wait_for_pod_gone(&client, "slab-crash").await;
    assert!(get_backend(&client, "slab-crash").await.is_some());
    wait_for(
        &client,
        "slab-crash",
        Duration::from_secs(15),
        "deleted",
        |b| b.is_none(),
    )
    .await;

    // One Event per transition.
    let events: Api<Event> = Api::default_namespaced(client.clone());
    let reasons: Vec<String> = events
        .list(&ListParams::default())
        .await
        .expect("events")
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("slab-crash"))
        .filter_map(|e| e.reason)
        .collect();
    for reason in ["Constructed", "Scheduled", "Running", "ApplicationExited"] {
        assert!(
            reasons.iter().any(|r| r == reason),
            "{reason} in {reasons:?}"
        );
    }

    let (code, metrics) = http_get(controller.metrics_addr, "/metrics").await;
    assert_eq!(code, 200);
    assert!(
        metrics.contains("spawner_controller_transitions_total{to=\"Failed\"} 1\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("spawner_controller_leader 1\n"),
        "{metrics}"
    );
    let (code, body) = http_get(controller.metrics_addr, "/healthz").await;
    assert_eq!((code, body.as_str()), (200, "ok"));
    controller.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminate_invalid_spec_lifetime_and_missing_pod() {
    let api = cluster().await;
    let client = client_for(api);
    let controller = RunningController::start(api, config("c1", false));
    let backends: Api<SessionLivedBackend> = Api::default_namespaced(client.clone());

    // Terminate requested while starting: honoured, pod removed.
    create_backend(&client, &backend_json("slab-stop", json!({}))).await;
    wait_for_phase(&client, "slab-stop", Phase::Constructed).await;
    backends
        .patch(
            "slab-stop",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {
                "spawner.dev/terminate-requested": "2024-01-01T00:00:00Z"}}})),
        )
        .await
        .expect("annotate");
    let stopped = wait_for_phase(&client, "slab-stop", Phase::Terminated).await;
    assert_eq!(
        stopped.status.and_then(|s| s.reason).as_deref(),
        Some("TerminateRequested")
    );
    wait_for_pod_gone(&client, "slab-stop").await;

    // A spec created around the api's validation: Failed with the field path.
    create_backend(
        &client,
        &backend_json("slab-invalid", json!({"httpPort": 9090})),
    )
    .await;
    let invalid = wait_for_phase(&client, "slab-invalid", Phase::Failed).await;
    let status = invalid.status.expect("status");
    assert_eq!(status.reason.as_deref(), Some("InvalidSpec"));
    assert!(
        status
            .message
            .as_deref()
            .unwrap_or_default()
            .contains("spec.httpPort"),
        "{status:?}"
    );
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    assert!(pods.get_opt("slab-invalid").await.expect("pod").is_none());

    // Maximum lifetime: terminated at the deadline, not before.
    let created = create_backend(
        &client,
        &backend_json("slab-lifetime", json!({"maxLifetimeSeconds": 2})),
    )
    .await;
    let start = std::time::Instant::now();
    wait_for_phase(&client, "slab-lifetime", Phase::Constructed).await;
    let ended = wait_for_phase(&client, "slab-lifetime", Phase::Terminated).await;
    assert!(
        start.elapsed() >= Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(
        ended.status.and_then(|s| s.reason).as_deref(),
        Some("MaxLifetimeExceeded")
    );
    assert!(created.metadata.creation_timestamp.is_some());

    // The pod vanishes behind the controller's back: Failed, PodMissing.
    create_backend(&client, &backend_json("slab-vanish", json!({}))).await;
    wait_for_phase(&client, "slab-vanish", Phase::Constructed).await;
    pods.delete("slab-vanish", &Default::default())
        .await
        .expect("delete pod");
    let vanished = wait_for_phase(&client, "slab-vanish", Phase::Failed).await;
    assert_eq!(
        vanished.status.and_then(|s| s.reason).as_deref(),
        Some("PodMissing")
    );

    // An image that never comes: Failed after the pull timeout.
    create_backend(&client, &backend_json("slab-pull", json!({}))).await;
    wait_for_pod(&client, "slab-pull").await;
    bind(&client, "slab-pull", "node-a").await;
    set_pod_status(
        &client,
        "slab-pull",
        json!({"phase": "Pending", "startTime": k8s_openapi::jiff::Timestamp::now().to_string(),
               "containerStatuses": [container("app", json!({"waiting": {"reason": "ImagePullBackOff", "message": "not found"}}))]}),
    )
    .await;
    let pulled = wait_for_phase(&client, "slab-pull", Phase::Failed).await;
    assert_eq!(
        pulled.status.and_then(|s| s.reason).as_deref(),
        Some("ImagePullTimeout")
    );
    controller.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_restarted_mid_spawn_finishes_the_job_without_duplicates() {
    let api = cluster().await;
    let client = client_for(api);
    let first = RunningController::start(api, config("c1", false));
    for i in 0..5 {
        create_backend(&client, &backend_json(&format!("slab-r{i}"), json!({}))).await;
    }
    wait_for_pod(&client, "slab-r0").await;
    first.crash();
    // Created while no controller runs.
    create_backend(&client, &backend_json("slab-r5", json!({}))).await;

    let second = RunningController::start(api, config("c2", false));
    for i in 0..6 {
        let name = format!("slab-r{i}");
        wait_for_phase(&client, &name, Phase::Constructed).await;
        bind(&client, &name, "node-a").await;
        set_pod_status(
            &client,
            &name,
            json!({"phase": "Running", "podIP": "127.0.9.9"}),
        )
        .await;
        wait_for_phase(&client, &name, Phase::Running).await;
    }
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    let listed = pods.list(&ListParams::default()).await.expect("pods");
    assert_eq!(listed.items.len(), 6);
    second.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_leader_reconciles_and_a_standby_takes_over_when_it_dies() {
    let api = cluster().await;
    let client = client_for(api);
    let a = RunningController::start(api, config("replica-a", true));
    // Let replica a win the lease first.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let b = RunningController::start(api, config("replica-b", true));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (_, metrics_a) = http_get(a.metrics_addr, "/metrics").await;
    let (_, metrics_b) = http_get(b.metrics_addr, "/metrics").await;
    assert!(
        metrics_a.contains("spawner_controller_leader 1\n"),
        "{metrics_a}"
    );
    assert!(
        metrics_b.contains("spawner_controller_leader 0\n"),
        "{metrics_b}"
    );

    create_backend(&client, &backend_json("slab-led", json!({}))).await;
    wait_for_phase(&client, "slab-led", Phase::Constructed).await;
    let (_, metrics_b) = http_get(b.metrics_addr, "/metrics").await;
    assert!(
        metrics_b.contains("spawner_controller_reconciles_total 0\n"),
        "{metrics_b}"
    );

    // The leader dies without releasing the lease: b takes over after the lease expires.
    a.crash();
    create_backend(&client, &backend_json("slab-after", json!({}))).await;
    wait_for(
        &client,
        "slab-after",
        Duration::from_secs(20),
        "constructed",
        |bk| bk.is_some_and(|bk| bk.phase() == Phase::Constructed),
    )
    .await;
    let (_, metrics_b) = http_get(b.metrics_addr, "/metrics").await;
    assert!(
        metrics_b.contains("spawner_controller_leader 1\n"),
        "{metrics_b}"
    );

    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::default_namespaced(client.clone());
    let lease = leases.get("spawner-controller").await.expect("lease");
    let spec = lease.spec.expect("spec");
    assert_eq!(spec.holder_identity.as_deref(), Some("replica-b"));
    assert_eq!(spec.lease_transitions, Some(1));

    // A graceful stop releases the lease at once.
    b.stop();
    let lease = leases.get("spawner-controller").await.expect("lease");
    assert_eq!(lease.spec.and_then(|s| s.holder_identity), None);
}

/// A backend created around the api with a template the backend pod policy refuses (here host
/// networking and a hostPath volume) never gets a pod: it fails with `PolicyViolation`, the
/// refused fields in its message, and an Event says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_refused_by_the_pod_policy_fails_with_an_event() {
    let api = cluster().await;
    let client = client_for(api);
    let controller = RunningController::start(api, config("c1", false));
    let mut backend = backend_json("slab-hostile", json!({}));
    let pod = backend.spec.template.spec.as_mut().expect("pod spec");
    pod.host_network = Some(true);
    pod.volumes = Some(vec![
        serde_json::from_value(json!({"name": "root", "hostPath": {"path": "/"}})).expect("volume"),
    ]);
    create_backend(&client, &backend).await;
    let failed = wait_for_phase(&client, "slab-hostile", Phase::Failed).await;
    let status = failed.status.expect("status");
    assert_eq!(status.reason.as_deref(), Some("PolicyViolation"));
    let message = status.message.unwrap_or_default();
    assert!(
        message.contains("spec.template.spec.hostNetwork"),
        "{message}"
    );
    assert!(
        message.contains("spec.template.spec.volumes[0].hostPath"),
        "{message}"
    );
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    assert!(pods.get_opt("slab-hostile").await.expect("pod").is_none());

    let events: Api<Event> = Api::default_namespaced(client.clone());
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let found = events
            .list(&ListParams::default())
            .await
            .expect("events")
            .items
            .into_iter()
            .any(|e| {
                e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("slab-hostile")
                    && e.reason.as_deref() == Some("PolicyViolation")
            });
        if found {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no PolicyViolation Event"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    controller.stop();
}

/// An application that never accepts connections does not keep its pod forever: not Ready
/// `start_timeout` after it became Running, the backend fails with `StartTimeout`, an Event,
/// and its pod and Service deleted. The deadline is a requeue, not the resync (30 s here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_never_ready_fails_with_start_timeout_at_its_deadline() {
    let api = cluster().await;
    let client = client_for(api);
    let timeout = Duration::from_secs(2);
    let controller = RunningController::start(
        api,
        ControllerConfig {
            start_timeout: Some(timeout),
            ..config("c1", false)
        },
    );
    create_backend(
        &client,
        &backend_json("slab-mute", json!({"httpPort": 8123})),
    )
    .await;
    wait_for_pod(&client, "slab-mute").await;
    bind(&client, "slab-mute", "node-a").await;
    set_pod_status(
        &client,
        "slab-mute",
        json!({"phase": "Running", "podIP": "127.0.5.7",
               "containerStatuses": [container("app", json!({"running": {}}))]}),
    )
    .await;
    wait_for_phase(&client, "slab-mute", Phase::Running).await;
    let failed = wait_for_phase(&client, "slab-mute", Phase::Failed).await;
    let status = failed.status.expect("status");
    assert_eq!(status.reason.as_deref(), Some("StartTimeout"));
    let message = status.message.clone().unwrap_or_default();
    assert!(
        message.contains("2s") && message.contains("port 8123"),
        "{message}"
    );
    let at = |phase: Phase| {
        spawner_core::status::phase_time(&status, phase)
            .and_then(|t| t.parse::<k8s_openapi::jiff::Timestamp>().ok())
            .expect("condition time")
    };
    let waited = at(Phase::Failed).duration_since(at(Phase::Running));
    assert!(
        waited.as_secs_f64() >= timeout.as_secs_f64(),
        "failed {waited:?} after Running"
    );
    // Deleted: a bound, running pod waits for its kubelet (none here) to confirm, so it may
    // still be listed, with its deletion timestamp.
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while pods
        .get_opt("slab-mute")
        .await
        .expect("pod")
        .is_some_and(|p| p.metadata.deletion_timestamp.is_none())
    {
        assert!(std::time::Instant::now() < deadline, "pod not deleted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let services: Api<Service> = Api::default_namespaced(client.clone());
    while services.get_opt("slab-mute").await.expect("svc").is_some() {
        assert!(std::time::Instant::now() < deadline, "service left behind");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let events: Api<Event> = Api::default_namespaced(client.clone());
    loop {
        let found = events
            .list(&ListParams::default())
            .await
            .expect("events")
            .items
            .into_iter()
            .any(|e| {
                e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("slab-mute")
                    && e.reason.as_deref() == Some("StartTimeout")
                    && e.type_.as_deref() == Some("Warning")
            });
        if found {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no StartTimeout Event"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    controller.stop();
}
