//! Controller and sweeper together against localcluster: the controller creates the pod and
//! labels the backend with its node, the sweeper of that node follows it through the URL and
//! token the controller derived, marks it Ready and Swept, and the controller removes the pod
//! and, after the retention period, the backend. The test plays the kubelet (binding the pod,
//! reporting it Running with its IP) and the sidecar (a protocol-speaking event stream on that
//! IP and the configured sidecar port).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{FakeSidecar, SECRET, cluster, phase_of, wait_for_phase};
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::json;
use spawner_controller::{ControllerConfig, UrlMode};
use spawner_core::children::ChildrenConfig;
use spawner_core::phase::Phase;
use spawner_core::resource::SessionLivedBackend;
use spawner_core::token::events_token;
use spawner_core::validation::Limits;
use spawner_sweeper::{SweeperConfig, tcp_transport};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawn_ready_swept_and_cleaned_up() {
    let client = cluster().await;
    let sidecar = FakeSidecar::start(Duration::from_millis(500)).await;

    let (stop_controller, controller_stopped) = oneshot::channel::<()>();
    let controller_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let controller_addr = controller_listener.local_addr().expect("addr");
    let controller = tokio::spawn(spawner_controller::run(
        client.clone(),
        controller_listener,
        ControllerConfig {
            namespace: Some("default".into()),
            children: ChildrenConfig {
                sidecar_port: sidecar.addr.port(),
                ..ChildrenConfig::default()
            },
            events_secret: SECRET.to_vec(),
            url_mode: UrlMode::PodIp,
            image_pull_timeout: Duration::from_secs(60),
            start_timeout: Some(Duration::from_secs(300)),
            retention: Duration::from_secs(1),
            resync: Duration::from_secs(30),
            concurrency: 4,
            limits: Limits {
                reserved_ports: vec![sidecar.addr.port()],
                ..Limits::default()
            },
            pod_policy: Default::default(),
            pod_refusal_retry: Duration::from_secs(1),
            lease: None,
            identity: "controller".into(),
            clock: Arc::new(spawner_controller::SystemClock),
        },
        async move {
            let _ = controller_stopped.await;
        },
    ));
    let (stop_sweeper, sweeper_stopped) = oneshot::channel::<()>();
    let sweeper = tokio::spawn(spawner_sweeper::run(
        client.clone(),
        TcpListener::bind("127.0.0.1:0").await.expect("bind"),
        tcp_transport(),
        SweeperConfig {
            node_name: "node-a".into(),
            namespace: Some("default".into()),
            events_secret: SECRET.to_vec(),
            heartbeat: Duration::from_millis(500),
            read_timeout_heartbeats: 3,
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(1),
            identity: "sweeper-node-a".into(),
            clock: Arc::new(spawner_sweeper::SystemClock),
        },
        async move {
            let _ = sweeper_stopped.await;
        },
    ));

    let backends: Api<SessionLivedBackend> = Api::default_namespaced(client.clone());
    let backend: SessionLivedBackend = serde_json::from_value(json!({
        "apiVersion": "spawner.dev/v1", "kind": "SessionLivedBackend",
        "metadata": {"name": "slab-e2e"},
        "spec": {
            "template": {"spec": {"containers": [{"name": "app", "image": "acme/app:1"}]}},
            "gracePeriodSeconds": 2
        }
    }))
    .expect("backend");
    let created = backends
        .create(&PostParams::default(), &backend)
        .await
        .expect("create");
    sidecar.expect_token(events_token(SECRET, &created.uid().expect("uid")));
    sidecar.set(|c| c.live = 1);
    wait_for_phase(
        &client,
        "slab-e2e",
        Phase::Constructed,
        Duration::from_secs(10),
    )
    .await;

    // The kubelet's part: bind the pod and report it running on the sidecar's address.
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    let binding = json!({
        "apiVersion": "v1", "kind": "Binding", "metadata": {"name": "slab-e2e"},
        "target": {"apiVersion": "v1", "kind": "Node", "name": "node-a"}
    });
    let _: serde_json::Value = pods
        .create_subresource("binding", "slab-e2e", &PostParams::default(), &binding)
        .await
        .expect("bind");
    pods.patch_status(
        "slab-e2e",
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"phase": "Running", "podIP": "127.0.0.1"}})),
    )
    .await
    .expect("pod status");
    wait_for_phase(&client, "slab-e2e", Phase::Running, Duration::from_secs(10)).await;
    let running = backends.get("slab-e2e").await.expect("get");
    assert_eq!(
        running.status.as_ref().and_then(|s| s.url.clone()),
        Some(sidecar.url())
    );

    // The sidecar sees the app accept connections; a user is connected.
    sidecar.set(|c| c.ready = true);
    wait_for_phase(&client, "slab-e2e", Phase::Ready, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(phase_of(&client, "slab-e2e").await, Phase::Ready);
    // The controller saw the Ready condition and measured the spawn-to-ready time once.
    let metrics = metrics_text(controller_addr).await;
    assert!(
        metrics.contains("spawner_spawn_to_ready_seconds_count 1\n"),
        "{metrics}"
    );

    // The user leaves: swept after the grace period, then the pod and service go, and after
    // the retention period the backend itself.
    let left = Instant::now();
    sidecar.set(|c| {
        c.live = 0;
        c.last_active = Instant::now();
    });
    wait_for_phase(&client, "slab-e2e", Phase::Swept, Duration::from_secs(10)).await;
    assert!(left.elapsed() >= Duration::from_secs(2));
    let services: Api<Service> = Api::default_namespaced(client.clone());
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let mut pod = pods.get_opt("slab-e2e").await.expect("pod");
        if pod
            .as_ref()
            .is_some_and(|p| p.metadata.deletion_timestamp.is_some())
        {
            // The kubelet's part again: the process stopped, the pod object may go.
            let _ = pods
                .delete(
                    "slab-e2e",
                    &kube::api::DeleteParams::default().grace_period(0),
                )
                .await;
            pod = pods.get_opt("slab-e2e").await.expect("pod");
        }
        let service = services.get_opt("slab-e2e").await.expect("service");
        let backend = backends.get_opt("slab-e2e").await.expect("backend");
        if pod.is_none() && service.is_none() && backend.is_none() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "left behind: pod {} service {} backend {}",
            pod.is_some(),
            service.is_some(),
            backend.is_some()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let _ = stop_controller.send(());
    let _ = stop_sweeper.send(());
    tokio::time::timeout(Duration::from_secs(10), controller)
        .await
        .expect("controller stops")
        .expect("task")
        .expect("controller");
    tokio::time::timeout(Duration::from_secs(10), sweeper)
        .await
        .expect("sweeper stops")
        .expect("task")
        .expect("sweeper");
}

async fn metrics_text(addr: std::net::SocketAddr) -> String {
    use http_body_util::BodyExt;
    let response = tcp_transport()
        .get(format!("http://{addr}/metrics").parse().expect("uri"))
        .await
        .expect("metrics");
    let body = response.into_body().collect().await.expect("body");
    String::from_utf8_lossy(&body.to_bytes()).into_owned()
}
