//! Test harness: a localcluster API server on loopback, the controller running against it, and
//! helpers that act as the kubelet would on a backend's pod (binding it, reporting its status).

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::{Value, json};
use spawner_controller::{ControllerConfig, LeaseSettings, SystemClock, UrlMode};
use spawner_core::children::ChildrenConfig;
use spawner_core::phase::Phase;
use spawner_core::resource::SessionLivedBackend;
use spawner_core::validation::Limits;
use spawner_localcluster::{Cluster, ServerConfig};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const SECRET: &[u8] = b"test-events-secret";

/// A localcluster API server on a loopback port; returns its address.
pub async fn cluster() -> SocketAddr {
    let cluster = Cluster::new(
        ServerConfig::for_tests(),
        Arc::new(spawner_localcluster::SystemClock),
    );
    let (addr, _task) = spawner_localcluster::serve_on_loopback(cluster)
        .await
        .expect("serve localcluster");
    addr
}

pub fn client_for(addr: SocketAddr) -> Client {
    let mut config = kube::Config::new(format!("http://{addr}").parse().expect("uri"));
    config.default_namespace = "default".into();
    // Watches get a bookmark every second, so a few seconds of silence is a dead stream.
    config.read_timeout = Some(Duration::from_secs(5));
    // Counted from each request: else a pooled connection's idle time counts too, and the
    // first request after a quiet spell as long as the timeout fails at once.
    config.reset_reader_on_write = true;
    Client::try_from(config).expect("client")
}

pub fn config(identity: &str, lease: bool) -> ControllerConfig {
    ControllerConfig {
        namespace: Some("default".into()),
        children: ChildrenConfig::default(),
        events_secret: SECRET.to_vec(),
        url_mode: UrlMode::Service,
        image_pull_timeout: Duration::from_secs(2),
        // No start timeout: nothing here writes Ready (no sweeper); tests that want one set it.
        start_timeout: None,
        retention: Duration::from_secs(2),
        resync: Duration::from_secs(30),
        concurrency: 8,
        limits: Limits::default(),
        pod_policy: Default::default(),
        pod_refusal_retry: Duration::from_secs(1),
        lease: lease.then(|| LeaseSettings {
            name: "spawner-controller".into(),
            namespace: "default".into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(3),
            renew_deadline: Duration::from_secs(2),
            retry_period: Duration::from_millis(300),
        }),
        identity: identity.into(),
        clock: Arc::new(SystemClock),
    }
}

/// A controller running on its own runtime thread, so stopping it can also be a crash: the
/// runtime is dropped with every task (lease renewal included) mid-flight.
pub struct RunningController {
    pub metrics_addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    crash: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RunningController {
    pub fn start(api: SocketAddr, config: ControllerConfig) -> Self {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let (stop, stopped) = oneshot::channel::<()>();
        let (crash, crashed) = oneshot::channel::<()>();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
                addr_tx
                    .send(listener.local_addr().expect("addr"))
                    .expect("send");
                let client = client_for(api);
                let run: JoinHandle<_> = tokio::spawn(spawner_controller::run(
                    client,
                    listener,
                    config,
                    async move {
                        let _ = stopped.await;
                    },
                ));
                tokio::select! {
                    r = run => r.expect("controller task").expect("controller run"),
                    _ = crashed => {}
                }
            });
            // Dropping the runtime here cancels whatever is left: a crash.
            drop(runtime);
        });
        let metrics_addr = addr_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("listener");
        Self {
            metrics_addr,
            stop: Some(stop),
            crash: Some(crash),
            thread: Some(thread),
        }
    }

    /// Graceful stop: finishes reconciles, releases the lease.
    pub fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.join();
    }

    /// Abrupt stop: nothing is finished or released.
    pub fn crash(mut self) {
        if let Some(crash) = self.crash.take() {
            let _ = crash.send(());
        }
        self.join();
    }

    fn join(&mut self) {
        if let Some(thread) = self.thread.take() {
            thread.join().expect("controller thread");
        }
    }
}

impl Drop for RunningController {
    fn drop(&mut self) {
        if let Some(crash) = self.crash.take() {
            let _ = crash.send(());
        }
        self.join();
    }
}

pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let response = client
        .get(format!("http://{addr}{path}").parse().expect("uri"))
        .await
        .expect("request");
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.expect("body");
    (
        status,
        String::from_utf8_lossy(&body.to_bytes()).into_owned(),
    )
}

pub fn backend_json(name: &str, extra_spec: Value) -> SessionLivedBackend {
    let mut spec = json!({
        "template": {"spec": {"containers": [{"name": "app", "image": "acme/app:1", "command": ["app"]}]}},
        "gracePeriodSeconds": 30
    });
    if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra_spec.as_object()) {
        for (k, v) in extra {
            spec.insert(k.clone(), v.clone());
        }
    }
    serde_json::from_value(json!({
        "apiVersion": "spawner.dev/v1",
        "kind": "SessionLivedBackend",
        "metadata": {"name": name},
        "spec": spec
    }))
    .expect("backend")
}

pub async fn create_backend(client: &Client, backend: &SessionLivedBackend) -> SessionLivedBackend {
    let api: Api<SessionLivedBackend> = Api::default_namespaced(client.clone());
    api.create(&PostParams::default(), backend)
        .await
        .expect("create backend")
}

pub async fn get_backend(client: &Client, name: &str) -> Option<SessionLivedBackend> {
    let api: Api<SessionLivedBackend> = Api::default_namespaced(client.clone());
    api.get_opt(name).await.expect("get backend")
}

/// Polls until `check` holds for the backend, failing after `limit`.
pub async fn wait_for<F>(
    client: &Client,
    name: &str,
    limit: Duration,
    what: &str,
    check: F,
) -> Option<SessionLivedBackend>
where
    F: Fn(Option<&SessionLivedBackend>) -> bool,
{
    let start = Instant::now();
    loop {
        let backend = get_backend(client, name).await;
        if check(backend.as_ref()) {
            return backend;
        }
        assert!(
            start.elapsed() < limit,
            "{name}: not {what} after {limit:?}; last seen {:?}",
            backend.as_ref().and_then(|b| b.status.as_ref())
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn wait_for_phase(client: &Client, name: &str, phase: Phase) -> SessionLivedBackend {
    wait_for(client, name, Duration::from_secs(15), phase.as_str(), |b| {
        b.is_some_and(|b| b.phase() == phase)
    })
    .await
    .expect("backend")
}

pub async fn wait_for_pod(client: &Client, name: &str) -> Pod {
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    let start = Instant::now();
    loop {
        if let Some(pod) = pods.get_opt(name).await.expect("get pod") {
            return pod;
        }
        assert!(start.elapsed() < Duration::from_secs(15), "no pod {name}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn wait_for_pod_gone(client: &Client, name: &str) {
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    let start = Instant::now();
    while pods.get_opt(name).await.expect("get pod").is_some() {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "pod {name} still there"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Binds the pod to `node`, as a scheduler does.
pub async fn bind(client: &Client, name: &str, node: &str) {
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    let binding = json!({
        "apiVersion": "v1", "kind": "Binding",
        "metadata": {"name": name},
        "target": {"apiVersion": "v1", "kind": "Node", "name": node}
    });
    let _: Value = pods
        .create_subresource("binding", name, &PostParams::default(), &binding)
        .await
        .expect("bind");
}

/// Writes the pod's status, as a kubelet does.
pub async fn set_pod_status(client: &Client, name: &str, status: Value) {
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    pods.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(&json!({ "status": status })),
    )
    .await
    .expect("pod status");
}

pub fn container(name: &str, state: Value) -> Value {
    json!({"name": name, "image": "", "imageID": "", "ready": false, "restartCount": 0, "state": state})
}
