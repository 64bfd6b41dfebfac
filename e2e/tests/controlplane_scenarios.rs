//! The control-plane integration scenarios: every Spawner component runs in this process (their
//! library `run` functions, as `spawner dev` runs them) against the REAL kube-apiserver, each
//! authenticated as its own ServiceAccount and authorized only by the roles in `deploy/rbac/`:
//!
//! - localcluster's node agent (kubelet and scheduler stand-in, identity `node-agent`) running
//!   pods as local processes behind the in-process sidecar, two nodes;
//! - the controller (identity `controller`, `--url-mode pod-ip`, leader election on: it takes a
//!   Lease in `spawner-system`, which its Role allows);
//! - one sweeper per node (identity `sweeper`);
//! - the api on a loopback listener (identity `api`), driven over HTTP like a web app would.
//!
//! A missing grant in `deploy/rbac/` shows up here as a scenario that never finishes, with the
//! component's 403 in the captured log.
//!
//! The node agent binds every pending pod of the cluster to its nodes, so two worlds at once
//! would run each other's pods: the tests take turns (`SERIAL`), each with a world of its own
//! (fresh namespace, node names, Lease and loopback range).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::rt::TokioExecutor;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::Client;
use kube::api::Api;
use serde_json::json;
use spawner_core::Phase;
use spawner_core::resource::SessionLivedBackend;
use spawner_e2e::controlplane::{ControlPlane, DEPLOY_RBAC, Identity, SYSTEM_NAMESPACE};
use spawner_e2e::scenarios::{
    self, ApiClient, App, Apps, Failure, Target, Timings, authority, ensure, local::DirectTcp,
    unique,
};
use spawner_node_agent::NodeAgentArgs;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, OnceCell, oneshot};
use tokio::task::JoinHandle;

const SPAWNER: &str = env!("CARGO_BIN_EXE_spawner-e2e-cli");

/// Grace period of the backends that are meant to be swept.
const GRACE: Duration = Duration::from_secs(3);
/// How long a backend may run without being Ready before the controller fails it.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the controller keeps a finished backend before deleting it.
const RETENTION_SECONDS: u64 = 3;
/// Longest wait for anything the scenarios expect (spawn → Ready, cleanup ...).
const PATIENCE: Duration = Duration::from_secs(60);

/// One world at a time (see the module comment).
static SERIAL: Mutex<()> = Mutex::const_new(());

/// The control plane of this test binary with `deploy/rbac/` applied.
async fn control_plane(test: &str) -> Option<&'static ControlPlane> {
    static APPLIED: OnceCell<()> = OnceCell::const_new();
    let cp = ControlPlane::shared_or_skip(test).await?;
    APPLIED
        .get_or_init(|| async {
            let admin = cp.admin_client().await.unwrap();
            for (file, yaml) in DEPLOY_RBAC {
                cp.apply_yaml(&admin, yaml, SYSTEM_NAMESPACE)
                    .await
                    .unwrap_or_else(|e| panic!("applying deploy/rbac/{file}: {e}"));
            }
        })
        .await;
    Some(cp)
}

/// Parses a component's clap arguments from a list, so each component is configured exactly
/// as its own command line would configure it (defaults included), as every host does.
fn args_of<T: clap::Args>(argv: &[&str]) -> T {
    spawner_assembly::args_of("component", argv).unwrap_or_else(|e| panic!("{e}"))
}

/// RBAC is served from informer caches: a binding just applied takes a moment to count. Waits
/// until `client` may list backends in `namespace` (anything but 403 counts).
async fn wait_authorized(client: &Client, who: &str, namespace: &str) {
    let backends: Api<SessionLivedBackend> = Api::namespaced(client.clone(), namespace);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match backends.list(&Default::default()).await {
            Err(kube::Error::Api(status)) if status.code == 403 && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{who} cannot list backends in {namespace}: {e}"),
            Ok(_) => return,
        }
    }
}

/// A client authenticated as `identity`; for Spawner's components, once their bindings count.
async fn identity_client(cp: &ControlPlane, identity: Identity, namespace: &str) -> Client {
    let client = cp.client_for(identity).await.unwrap();
    if identity != Identity::NodeAgent {
        wait_authorized(&client, identity.name(), namespace).await;
    }
    client
}

/// A component running in this process.
struct Component {
    name: String,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), String>>,
}

/// Spawns a component's `run` future; it stops when `stop` fires.
fn component<F, E>(name: String, run: impl FnOnce(oneshot::Receiver<()>) -> F) -> Component
where
    F: Future<Output = Result<(), E>> + Send + 'static,
    E: std::fmt::Display,
{
    let (stop, stopped) = oneshot::channel();
    let running = run(stopped);
    let task = tokio::spawn(async move { running.await.map_err(|e| e.to_string()) });
    Component { name, stop, task }
}

async fn on_stop(stopped: oneshot::Receiver<()>) {
    let _ = stopped.await;
}

/// What a scenario works with: the api as a web app sees it, and an admin's view of the objects.
#[derive(Clone)]
struct Scene {
    target: Target,
    admin: Client,
    namespace: String,
}

/// Every component, each as its own identity, in a namespace of its own.
struct World {
    scene: Scene,
    /// In start order: the node agent first, the api last.
    components: Vec<Component>,
    log_dir: PathBuf,
}

impl World {
    async fn start(cp: &ControlPlane) -> World {
        let namespace = cp.create_namespace("cpscen").await.unwrap();
        let admin = cp.admin_client().await.unwrap();
        let client = |identity| identity_client(cp, identity, &namespace);
        let log_dir = std::env::temp_dir().join(unique("spawner-cpscen-logs"));
        std::fs::create_dir_all(&log_dir).unwrap();
        let events_secret = unique("events-secret");
        let mut components = Vec::new();

        // Node agent: two nodes, pods on a loopback range of their own (other suites on this
        // machine use other ranges).
        let nodes = [format!("{namespace}-a"), format!("{namespace}-b")];
        let mut octets = [0u8; 2];
        getrandom::fill(&mut octets).unwrap();
        let first_pod_ip = format!("127.{}.{}.1", 130 + octets[0] % 120, octets[1]);
        let node_list = nodes.join(",");
        let log_dir_arg = log_dir.display().to_string();
        let agent_args: NodeAgentArgs = args_of(&[
            "--node",
            &node_list,
            "--first-pod-ip",
            &first_pod_ip,
            "--log-dir",
            &log_dir_arg,
            "--heartbeat-seconds",
            "2",
            "--shutdown-grace-seconds",
            "2",
        ]);
        {
            let client = client(Identity::NodeAgent).await;
            let runtime = Arc::new(agent_args.process_runtime());
            let config = agent_args.config();
            components.push(component("node agent".into(), move |stopped| {
                spawner_node_agent::run(client, config, runtime, on_stop(stopped))
            }));
        }

        // Controller, leader-elected on a Lease of its own in spawner-system.
        let lease = format!("spawner-controller-{namespace}");
        let retention = RETENTION_SECONDS.to_string();
        let start_timeout = START_TIMEOUT.as_secs().to_string();
        let controller_args: spawner_controller::ControllerArgs = args_of(&[
            "--namespace",
            &namespace,
            "--events-secret",
            &events_secret,
            "--url-mode",
            "pod-ip",
            "--retention-seconds",
            &retention,
            "--start-timeout-seconds",
            &start_timeout,
            "--lease-name",
            &lease,
            "--lease-namespace",
            SYSTEM_NAMESPACE,
            "--identity",
            "controller-0",
        ]);
        {
            let client = client(Identity::Controller).await;
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let config = controller_args.into_config();
            assert!(config.lease.is_some(), "leader election is on");
            components.push(component("controller".into(), move |stopped| {
                spawner_controller::run(client, listener, config, on_stop(stopped))
            }));
        }

        // One sweeper per node.
        for node in &nodes {
            let identity = format!("sweeper-{node}");
            let sweeper_args: spawner_sweeper::SweeperArgs = args_of(&[
                "--node-name",
                node,
                "--namespace",
                &namespace,
                "--events-secret",
                &events_secret,
                "--reconnect-max-ms",
                "1000",
                "--identity",
                &identity,
            ]);
            let client = client(Identity::Sweeper).await;
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let config = sweeper_args.into_config();
            components.push(component(format!("sweeper of {node}"), move |stopped| {
                spawner_sweeper::run(
                    client,
                    listener,
                    spawner_sweeper::tcp_transport(),
                    config,
                    on_stop(stopped),
                )
            }));
        }

        // The api on a loopback listener.
        let api_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let api_url = format!("http://{}", api_listener.local_addr().unwrap());
        let token = unique("api-token");
        let key_secret = unique("key-secret");
        let api_args: spawner_api::ApiArgs = args_of(&[
            "--namespace",
            &namespace,
            "--token",
            &token,
            "--key-secret",
            &key_secret,
            "--public-base-url",
            &api_url,
        ]);
        {
            let client = client(Identity::Api).await;
            let config = api_args.config().unwrap();
            components.push(component("api".into(), move |stopped| {
                spawner_api::run(client, api_listener, config, on_stop(stopped))
            }));
        }

        let target = Target {
            name: "controlplane".into(),
            api: ApiClient::new(&api_url, &token),
            connector: Arc::new(DirectTcp),
            apps: Apps {
                demo: App {
                    image: Some("spawner:dev".into()),
                    command: vec![SPAWNER.into(), "demo-backend".into()],
                },
                crash: App {
                    image: Some("busybox:1.36".into()),
                    command: vec![
                        "sh".into(),
                        "-c".into(),
                        format!("exit {}", scenarios::CRASH_EXIT_CODE),
                    ],
                },
                never_ready: App {
                    image: Some("busybox:1.36".into()),
                    command: vec!["sleep".into(), "3600".into()],
                },
            },
            ready_timeout: PATIENCE,
            start_timeout: START_TIMEOUT,
        };
        World {
            scene: Scene {
                target,
                admin,
                namespace,
            },
            components,
            log_dir,
        }
    }

    /// Components that stopped on their own (an error, e.g. a 403 they gave up on).
    fn stopped_early(&self) -> Vec<String> {
        self.components
            .iter()
            .filter(|c| c.task.is_finished())
            .map(|c| c.name.clone())
            .collect()
    }

    /// Stops the api, sweepers and controller, then the node agent (which stops the pods it
    /// runs); returns every component's error.
    async fn stop(self) -> Vec<String> {
        let mut problems = Vec::new();
        for component in self.components.into_iter().rev() {
            let _ = component.stop.send(());
            match tokio::time::timeout(Duration::from_secs(30), component.task).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => problems.push(format!("{} failed: {e}", component.name)),
                Ok(Err(e)) => problems.push(format!("{} panicked: {e}", component.name)),
                Err(_) => problems.push(format!("{} did not stop within 30 s", component.name)),
            }
        }
        let _ = std::fs::remove_dir_all(&self.log_dir);
        problems
    }
}

/// Starts a world, runs `scenario` in it, stops the world, and fails the test with everything a
/// person needs: the scenario's failure and any component's error.
async fn run<F, Fut>(test: &str, scenario: F)
where
    F: FnOnce(Scene) -> Fut,
    Fut: Future<Output = Result<Timings, Failure>>,
{
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,kube_runtime=warn".into()),
        )
        .with_test_writer()
        .try_init();
    let Some(cp) = control_plane(test).await else {
        return;
    };
    let _turn = SERIAL.lock().await;
    let started = Instant::now();
    let world = World::start(cp).await;
    let startup = started.elapsed();
    let outcome = scenario(world.scene.clone()).await;
    let stopped_early = world.stopped_early();
    let stopping = Instant::now();
    let problems = world.stop().await;
    match outcome {
        Ok(timings) if problems.is_empty() => eprintln!(
            "{test} (controlplane): world up in {:.2}s, {timings}, stopped in {:.2}s",
            startup.as_secs_f64(),
            stopping.elapsed().as_secs_f64()
        ),
        outcome => panic!(
            "{test} (controlplane): {}\ncomponents stopped early: {stopped_early:?}\ncomponent problems: {problems:#?}",
            match outcome {
                Ok(_) => "the scenario passed".to_string(),
                Err(failure) => failure.to_string(),
            }
        ),
    }
}

/// Polls `check` until it gives `Some`, for at most [`PATIENCE`].
async fn eventually<T, Fut>(what: &str, mut check: impl FnMut() -> Fut) -> Result<T, Failure>
where
    Fut: Future<Output = Result<Option<T>, Failure>>,
{
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(value) = check().await? {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            return Err(Failure::new(format!("{what}: not within {PATIENCE:?}")));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `GET url` through the backend's sidecar: status and body.
async fn http_get(url: &str) -> Result<(u16, Bytes), Failure> {
    let client = HttpClient::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let uri = url
        .parse()
        .map_err(|e| Failure::new(format!("{url}: {e}")))?;
    let response = tokio::time::timeout(Duration::from_secs(10), client.get(uri))
        .await
        .map_err(|_| Failure::new(format!("GET {url}: no answer in 10 s")))?
        .map_err(|e| Failure::new(format!("GET {url}: {e:?}")))?;
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| Failure::new(format!("GET {url}: reading the body: {e}")))?
        .to_bytes();
    Ok((status, body))
}

/// Processes whose command line mentions `marker`.
fn processes_mentioning(marker: &Path) -> Vec<u32> {
    let marker = marker.as_os_str().as_encoded_bytes();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|cmdline| cmdline.windows(marker.len()).any(|w| w == marker))
        })
        .collect()
}

/// POST /spawn of a Python HTTP server → Ready on the status stream → a file served through
/// the sidecar at `status.url` → no connection for the grace period → Swept → its Pod, Service,
/// process and sidecar are gone → after the controller's retention, the backend itself.
async fn served_swept_and_cleaned_up(scene: Scene) -> Result<Timings, Failure> {
    let Scene {
        target,
        admin,
        namespace,
    } = scene;
    let mut timings = Timings::default();
    // A directory only this backend serves: the file proves the answer comes from our app, and
    // the path finds its process.
    let site = std::env::temp_dir().join(unique("spawner-cpscen-site"));
    std::fs::create_dir_all(&site).map_err(|e| Failure::new(format!("{e}")))?;
    let greeting = unique("hello");
    std::fs::write(site.join("greeting.txt"), &greeting)
        .map_err(|e| Failure::new(format!("{e}")))?;
    let outcome = async {
        let start = Instant::now();
        let spawned = target
            .api
            .spawn(&json!({
                "image": "python:3.12",
                "command": ["python3", "-m", "http.server", "--bind", "127.0.0.1",
                            "--directory", site.display().to_string(), "$(PORT)"],
                "gracePeriodSeconds": GRACE.as_secs(),
            }))
            .await?;
        let name = spawned.name;
        scenarios::wait_ready(&target, &name).await?;
        timings.record("spawn→Ready", start);
        ensure(processes_mentioning(&site).len() == 1, || {
            format!("{name}: Ready, but its process is not running")
        })?;

        let status = target.api.status(&name).await?;
        let url = status
            .url
            .ok_or_else(|| Failure::new(format!("{name} is Ready without a url")))?;
        let (code, body) = http_get(&format!("{url}/greeting.txt")).await?;
        ensure(code == 200 && body == greeting.as_bytes(), || {
            format!("GET {url}/greeting.txt through the sidecar: {code} {body:?}")
        })?;
        let last_request = Instant::now();

        scenarios::ended(
            &target,
            &name,
            GRACE + PATIENCE,
            "after its last request",
            Phase::Swept,
            None,
        )
        .await?;
        timings.record("last request→Swept", last_request);

        // The pod goes (and with it the process and the sidecar), then the backend.
        let pods: Api<Pod> = Api::namespaced(admin.clone(), &namespace);
        let services: Api<Service> = Api::namespaced(admin.clone(), &namespace);
        let backends: Api<SessionLivedBackend> = Api::namespaced(admin.clone(), &namespace);
        let swept = Instant::now();
        eventually(&format!("{name}: pod and process gone"), || async {
            let pod = pods
                .get_opt(&name)
                .await
                .map_err(|e| Failure::new(format!("get pod {name}: {e}")))?;
            Ok((pod.is_none() && processes_mentioning(&site).is_empty()).then_some(()))
        })
        .await?;
        timings.record("Swept→pod and process gone", swept);
        let address = authority(&url)?.to_string();
        ensure(TcpStream::connect(&address).await.is_err(), || {
            format!("{name}: its sidecar at {address} still accepts connections")
        })?;
        eventually(&format!("{name}: backend and service deleted"), || async {
            let backend = backends
                .get_opt(&name)
                .await
                .map_err(|e| Failure::new(format!("get backend {name}: {e}")))?;
            let service = services
                .get_opt(&name)
                .await
                .map_err(|e| Failure::new(format!("get service {name}: {e}")))?;
            Ok((backend.is_none() && service.is_none()).then_some(()))
        })
        .await?;
        timings.record("Swept→backend deleted", swept);
        let (code, _) = target
            .api
            .call(http::Method::GET, &format!("/backend/{name}/status"), None)
            .await?;
        ensure(code == 404, || {
            format!("GET /backend/{name}/status after deletion: {code}")
        })?;
        Ok(timings)
    }
    .await;
    let _ = std::fs::remove_dir_all(&site);
    outcome
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn served_swept_and_cleaned_up_as_service_accounts() {
    run("served_swept_and_cleaned_up_as_service_accounts", |scene| {
        served_swept_and_cleaned_up(scene)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashing_app_fails_as_service_accounts() {
    run(
        "crashing_app_fails_as_service_accounts",
        |scene| async move { scenarios::crashing_app_fails(&scene.target).await },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_ready_fails_with_start_timeout_as_service_accounts() {
    run(
        "never_ready_fails_with_start_timeout_as_service_accounts",
        |scene| async move { scenarios::never_ready_fails_with_start_timeout(&scene.target).await },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminate_while_starting_as_service_accounts() {
    run(
        "terminate_while_starting_as_service_accounts",
        |scene| async move { scenarios::terminate_while_starting(&scene.target).await },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_keeps_the_backend_then_swept_as_service_accounts() {
    run(
        "websocket_keeps_the_backend_then_swept_as_service_accounts",
        |scene| async move { scenarios::spawn_connect_disconnect_swept(&scene.target).await },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_start_keeps_its_grace_period_after_ready_as_service_accounts() {
    run(
        "slow_start_keeps_its_grace_period_after_ready_as_service_accounts",
        |scene| async move {
            scenarios::slow_start_keeps_its_grace_period_after_ready(&scene.target).await
        },
    )
    .await;
}
