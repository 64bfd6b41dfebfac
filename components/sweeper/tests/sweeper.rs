//! The sweeper against a localcluster API server and sidecars speaking the event protocol, all
//! on loopback sockets.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{FakeSidecar, SECRET, cluster, phase_of, running_backend, wait_for_phase};
use http_body_util::BodyExt;
use kube::{Client, ResourceExt};
use spawner_core::phase::Phase;
use spawner_core::token::events_token;
use spawner_sweeper::{SweeperConfig, SystemClock, tcp_transport};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const HEARTBEAT: Duration = Duration::from_millis(500);

fn config(node: &str) -> SweeperConfig {
    SweeperConfig {
        node_name: node.into(),
        namespace: Some("default".into()),
        events_secret: SECRET.to_vec(),
        heartbeat: HEARTBEAT,
        read_timeout_heartbeats: 3,
        reconnect_min: Duration::from_millis(100),
        reconnect_max: Duration::from_secs(1),
        identity: format!("sweeper-{node}"),
        clock: Arc::new(SystemClock),
    }
}

struct Sweeper {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Sweeper {
    async fn start(client: &Client, node: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(spawner_sweeper::run(
            client.clone(),
            listener,
            tcp_transport(),
            config(node),
            async move {
                let _ = stopped.await;
            },
        ));
        let task = tokio::spawn(async move {
            task.await.expect("sweeper task").expect("sweeper run");
        });
        Sweeper {
            addr,
            stop: Some(stop),
            task,
        }
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("sweeper stops")
            .expect("sweeper task");
    }

    async fn get(&self, path: &str) -> (u16, String) {
        let client = tcp_transport();
        let response = client
            .get(format!("http://{}{path}", self.addr).parse().expect("uri"))
            .await
            .expect("request");
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.expect("body");
        (
            status,
            String::from_utf8_lossy(&body.to_bytes()).into_owned(),
        )
    }
}

async fn sidecar_for(client: &Client, name: &str, node: &str, grace: u32) -> FakeSidecar {
    let sidecar = FakeSidecar::start(HEARTBEAT).await;
    let backend = running_backend(client, name, node, &sidecar.url(), grace).await;
    sidecar.expect_token(events_token(SECRET, &backend.uid().expect("uid")));
    sidecar
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn marks_ready_never_sweeps_a_live_backend_and_sweeps_after_grace() {
    let client = cluster().await;
    let sidecar = sidecar_for(&client, "slab-live", "node-a", 2).await;
    sidecar.set(|c| c.live = 1);
    // A backend on another node, which this sweeper must leave alone.
    let elsewhere = sidecar_for(&client, "slab-elsewhere", "node-b", 1).await;
    let sweeper = Sweeper::start(&client, "node-a").await;

    // Not ready yet: stays Running.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(phase_of(&client, "slab-live").await, Phase::Running);
    assert!(sidecar.connections() >= 1);

    sidecar.set(|c| c.ready = true);
    wait_for_phase(&client, "slab-live", Phase::Ready, Duration::from_secs(10)).await;

    // Connected for twice the grace period: never swept.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(phase_of(&client, "slab-live").await, Phase::Ready);

    // The last user leaves: swept after the grace period, not before.
    let left = Instant::now();
    sidecar.set(|c| {
        c.live = 0;
        c.last_active = Instant::now();
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(phase_of(&client, "slab-live").await, Phase::Ready);
    wait_for_phase(&client, "slab-live", Phase::Swept, Duration::from_secs(10)).await;
    assert!(left.elapsed() >= Duration::from_secs(2));
    assert!(
        sidecar.control.lock().expect("lock").sealed,
        "the sidecar is sealed before the sweep is written"
    );

    let api: kube::Api<spawner_core::SessionLivedBackend> =
        kube::Api::default_namespaced(client.clone());
    let status = api
        .get("slab-live")
        .await
        .expect("get")
        .status
        .expect("status");
    assert_eq!(status.reason.as_deref(), Some("IdlePastGracePeriod"));
    let types: Vec<_> = status.conditions.iter().map(|c| c.type_.as_str()).collect();
    assert_eq!(types, ["Running", "Ready", "Swept"]);

    // The other node's backend was never subscribed to.
    assert_eq!(elsewhere.connections(), 0);
    assert_eq!(phase_of(&client, "slab-elsewhere").await, Phase::Running);

    let (code, body) = sweeper.get("/healthz").await;
    assert_eq!((code, body.as_str()), (200, "ok"));
    let (code, metrics) = sweeper.get("/metrics").await;
    assert_eq!(code, 200);
    assert!(
        metrics.contains("spawner_sweeper_swept_total{node=\"node-a\"} 1\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("spawner_sweeper_marked_ready_total{node=\"node-a\"} 1\n"),
        "{metrics}"
    );
    sweeper.stop().await;
}

/// The time of `name`'s condition `type_`.
async fn condition_time(client: &Client, name: &str, type_: &str) -> k8s_openapi::jiff::Timestamp {
    let api: kube::Api<spawner_core::SessionLivedBackend> =
        kube::Api::default_namespaced(client.clone());
    let status = api.get(name).await.expect("get").status.expect("status");
    let condition = status
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .unwrap_or_else(|| panic!("{name} has no {type_} condition: {:?}", status.conditions));
    condition
        .last_transition_time
        .parse()
        .expect("RFC 3339 time")
}

/// Found on kind: the app took longer than the grace period to accept connections (or the
/// sweeper reached the sidecar late, through the readiness-gated Service), so the sidecar's
/// first report already said "idle past grace", and the backend was swept the moment it was
/// marked Ready: the user's WebSocket got the sealed sidecar's 503. Ready is when users learn
/// of the backend; its grace period starts there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_idle_before_ready_gets_a_full_grace_period_after_it() {
    let client = cluster().await;
    let sidecar = sidecar_for(&client, "slab-late", "node-a", 2).await;
    sidecar.set(|c| {
        c.ready = true;
        c.last_active = Instant::now() - Duration::from_secs(10);
    });
    let sweeper = Sweeper::start(&client, "node-a").await;
    wait_for_phase(&client, "slab-late", Phase::Ready, Duration::from_secs(10)).await;
    wait_for_phase(&client, "slab-late", Phase::Swept, Duration::from_secs(15)).await;
    let ready = condition_time(&client, "slab-late", "Ready").await;
    let swept = condition_time(&client, "slab-late", "Swept").await;
    let after_ready = swept.duration_since(ready);
    assert!(
        after_ready >= k8s_openapi::jiff::SignedDuration::from_secs(2),
        "swept {after_ready:?} after Ready, within its 2 s grace period"
    );
    sweeper.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_sweeper_resumes_the_countdown() {
    let client = cluster().await;
    let sidecar = sidecar_for(&client, "slab-idle", "node-a", 5).await;
    let idle_since = Instant::now();
    sidecar.set(|c| {
        c.ready = true;
        c.last_active = idle_since;
    });
    let first = Sweeper::start(&client, "node-a").await;
    wait_for_phase(&client, "slab-idle", Phase::Ready, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    first.stop().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(phase_of(&client, "slab-idle").await, Phase::Ready);

    let second = Sweeper::start(&client, "node-a").await;
    wait_for_phase(&client, "slab-idle", Phase::Swept, Duration::from_secs(15)).await;
    let swept_after = idle_since.elapsed();
    // Never early ...
    assert!(swept_after > Duration::from_secs(5), "{swept_after:?}");
    // ... and resumed, not restarted: a fresh countdown would end 5 s after the restart,
    // at 8 s or later.
    assert!(swept_after < Duration::from_millis(7500), "{swept_after:?}");
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_or_lost_stream_is_never_a_reason_to_sweep() {
    let client = cluster().await;
    let sidecar = sidecar_for(&client, "slab-partitioned", "node-a", 2).await;
    sidecar.set(|c| {
        c.ready = true;
        c.last_active = Instant::now();
    });
    let sweeper = Sweeper::start(&client, "node-a").await;
    wait_for_phase(
        &client,
        "slab-partitioned",
        Phase::Ready,
        Duration::from_secs(10),
    )
    .await;
    // The network starts dropping everything; meanwhile a user connects, which the sweeper
    // cannot hear about.
    sidecar.set(|c| {
        c.silent = true;
        c.live = 1;
    });
    let connections_before = sidecar.connections();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(phase_of(&client, "slab-partitioned").await, Phase::Ready);
    // The silent stream was dropped and a new one opened.
    assert!(sidecar.connections() > connections_before);
    let (_, metrics) = sweeper.get("/metrics").await;
    assert!(
        !metrics.contains("spawner_sweeper_read_timeouts_total{node=\"node-a\"} 0\n"),
        "{metrics}"
    );

    // The partition heals: the sweeper hears the live connection and keeps the backend.
    sidecar.set(|c| c.silent = false);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(phase_of(&client, "slab-partitioned").await, Phase::Ready);

    // The sidecar goes away entirely (connection refused): still never swept.
    sidecar.set(|c| c.silent = true);
    let refused = running_backend(
        &client,
        "slab-unreachable",
        "node-a",
        "http://127.0.0.1:9",
        1,
    )
    .await;
    assert!(refused.uid().is_some());
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(phase_of(&client, "slab-unreachable").await, Phase::Running);
    sweeper.stop().await;
}
