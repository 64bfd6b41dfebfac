//! Everything real on one machine: localcluster's API server, its node agent with two nodes
//! running pods as local processes behind the real in-process sidecar, the controller
//! (pod-IP URLs, as in `spawner dev`) and one sweeper per node.

mod common;

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{SECRET, cluster, phase_of, wait_for_phase};
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::PostParams;
use kube::{Api, Client};
use serde_json::{Value, json};
use spawner_controller::{ControllerConfig, UrlMode};
use spawner_core::children::ChildrenConfig;
use spawner_core::phase::Phase;
use spawner_core::resource::SessionLivedBackend;
use spawner_core::validation::Limits;
use spawner_node_agent::{
    NodeAgentConfig, ProcessRuntime, ProcessRuntimeConfig, SchedulingPolicy, SpawnerSidecar,
};
use spawner_sweeper::{SweeperConfig, tcp_transport};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const NODES: [&str; 2] = ["node-a", "node-b"];

struct World {
    client: Client,
    stops: Vec<oneshot::Sender<()>>,
    tasks: Vec<JoinHandle<()>>,
}

impl World {
    async fn start(first_pod_ip: Ipv4Addr) -> Self {
        let client = cluster().await;
        let mut world = World {
            client: client.clone(),
            stops: Vec::new(),
            tasks: Vec::new(),
        };

        let (stop, stopped) = oneshot::channel::<()>();
        let agent = spawner_node_agent::run(
            client.clone(),
            NodeAgentConfig {
                nodes: NODES.iter().map(|n| n.to_string()).collect(),
                scheduling: Some(SchedulingPolicy::RoundRobin),
                heartbeat_interval: Duration::from_millis(500),
                shutdown_grace: Duration::from_secs(2),
                ..NodeAgentConfig::default()
            },
            Arc::new(ProcessRuntime::new(
                ProcessRuntimeConfig {
                    first_pod_ip,
                    log_dir: None,
                },
                SpawnerSidecar,
            )),
            async move {
                let _ = stopped.await;
            },
        );
        world.stops.push(stop);
        world.tasks.push(tokio::spawn(async move {
            agent.await.expect("node agent");
        }));

        let (stop, stopped) = oneshot::channel::<()>();
        let controller = spawner_controller::run(
            client.clone(),
            TcpListener::bind("127.0.0.1:0").await.expect("bind"),
            ControllerConfig {
                namespace: Some("default".into()),
                children: ChildrenConfig::default(),
                events_secret: SECRET.to_vec(),
                url_mode: UrlMode::PodIp,
                image_pull_timeout: Duration::from_secs(60),
                start_timeout: Some(Duration::from_secs(300)),
                retention: Duration::from_secs(5),
                resync: Duration::from_secs(30),
                concurrency: 8,
                limits: Limits::default(),
                pod_policy: Default::default(),
                pod_refusal_retry: Duration::from_secs(1),
                lease: None,
                identity: "controller".into(),
                clock: Arc::new(spawner_controller::SystemClock),
            },
            async move {
                let _ = stopped.await;
            },
        );
        world.stops.push(stop);
        world.tasks.push(tokio::spawn(async move {
            controller.await.expect("controller");
        }));

        for node in NODES {
            let (stop, stopped) = oneshot::channel::<()>();
            let sweeper = spawner_sweeper::run(
                client.clone(),
                TcpListener::bind("127.0.0.1:0").await.expect("bind"),
                tcp_transport(),
                SweeperConfig {
                    node_name: node.into(),
                    namespace: Some("default".into()),
                    events_secret: SECRET.to_vec(),
                    // The sidecar's default heartbeat.
                    heartbeat: Duration::from_secs(5),
                    read_timeout_heartbeats: 3,
                    reconnect_min: Duration::from_millis(100),
                    reconnect_max: Duration::from_secs(1),
                    identity: format!("sweeper-{node}"),
                    clock: Arc::new(spawner_sweeper::SystemClock),
                },
                async move {
                    let _ = stopped.await;
                },
            );
            world.stops.push(stop);
            world.tasks.push(tokio::spawn(async move {
                sweeper.await.expect("sweeper");
            }));
        }
        world
    }

    async fn spawn(&self, name: &str, container: Value, grace: u32) {
        let api: Api<SessionLivedBackend> = Api::default_namespaced(self.client.clone());
        let backend: SessionLivedBackend = serde_json::from_value(json!({
            "apiVersion": "spawner.dev/v1", "kind": "SessionLivedBackend",
            "metadata": {"name": name},
            "spec": {
                "template": {"spec": {"containers": [container]}},
                "gracePeriodSeconds": grace
            }
        }))
        .expect("backend");
        api.create(&PostParams::default(), &backend)
            .await
            .expect("create");
    }

    async fn stop(self) {
        // Controller and sweepers first, the node agent (which stops every pod) last.
        for stop in self.stops.into_iter().rev() {
            let _ = stop.send(());
        }
        for task in self.tasks {
            tokio::time::timeout(Duration::from_secs(20), task)
                .await
                .expect("stops in time")
                .expect("task");
        }
    }
}

fn python_server() -> Value {
    json!({
        "name": "app",
        // Required by the API server; process mode runs the command.
        "image": "python:3.12",
        "command": ["python3", "-m", "http.server", "--bind", "127.0.0.1"],
        "args": ["$(PORT)"]
    })
}

async fn http_get(url: &str) -> u16 {
    let client = tcp_transport();
    let response = client
        .get(url.parse().expect("uri"))
        .await
        .expect("request");
    response.status().as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_backends_become_ready_are_swept_when_idle_and_fail_with_their_exit_code() {
    let world = World::start(Ipv4Addr::new(127, 61, 0, 1)).await;
    let client = world.client.clone();

    // A grace period longer than any stall of a loaded 2-core machine between two requests
    // below: with 2 s, one such stall swept the backend while the test was still using it.
    world.spawn("slab-py", python_server(), 5).await;
    let api: Api<SessionLivedBackend> = Api::default_namespaced(client.clone());
    world
        .spawn(
            "slab-crash",
            json!({"name": "app", "image": "busybox:1.36", "command": ["sh", "-c", "sleep 0.5; exit 3"]}),
            30,
        )
        .await;
    world
        .spawn(
            "slab-noimage",
            json!({"name": "app", "image": "acme/app:1"}),
            30,
        )
        .await;

    // The crashing app: Failed with its exit code.
    wait_for_phase(
        &client,
        "slab-crash",
        Phase::Failed,
        Duration::from_secs(30),
    )
    .await;
    let status = api
        .get("slab-crash")
        .await
        .expect("get")
        .status
        .expect("status");
    assert_eq!(status.exit_code, Some(3), "{status:?}");
    assert_eq!(status.reason.as_deref(), Some("ApplicationExited"));

    // An image with no command cannot run in process mode: Failed with a clear message.
    wait_for_phase(
        &client,
        "slab-noimage",
        Phase::Failed,
        Duration::from_secs(30),
    )
    .await;
    let status = api
        .get("slab-noimage")
        .await
        .expect("get")
        .status
        .expect("status");
    assert_eq!(
        status.reason.as_deref(),
        Some("ProcessModeNeedsCommand"),
        "{status:?}"
    );
    assert!(
        status
            .message
            .as_deref()
            .unwrap_or_default()
            .contains("command"),
        "{status:?}"
    );

    // Ready, found by the sweeper of whichever node it landed on.
    wait_for_phase(&client, "slab-py", Phase::Ready, Duration::from_secs(30)).await;
    let backend = api.get("slab-py").await.expect("get");
    let status = backend.status.expect("status");
    let url = status.url.expect("url");
    assert!(NODES.contains(&status.node_name.as_deref().unwrap_or_default()));
    // Requests through the sidecar keep the backend alive.
    let until = Instant::now() + Duration::from_secs(7);
    // When the last request was sent: the sidecar's idle clock starts at its end, later.
    let mut last_request_sent = Instant::now();
    while Instant::now() < until {
        last_request_sent = Instant::now();
        assert_eq!(http_get(&format!("{url}/")).await, 200);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(phase_of(&client, "slab-py").await, Phase::Ready);
    // Then nobody comes: swept after its 5 s grace period (counted by the sidecar from the end
    // of the last request, so never less than 5 s after it was sent), and everything goes.
    wait_for_phase(&client, "slab-py", Phase::Swept, Duration::from_secs(20)).await;
    let idle = last_request_sent.elapsed();
    assert!(idle >= Duration::from_secs(5), "{idle:?}");
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    let services: Api<Service> = Api::default_namespaced(client.clone());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = (
            pods.get_opt("slab-py").await.expect("pod").is_some(),
            services.get_opt("slab-py").await.expect("svc").is_some(),
            api.get_opt("slab-py").await.expect("backend").is_some(),
        );
        if left == (false, false, false) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "left behind (pod, service, backend): {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    world.stop().await;
}
