//! Benchmark (not a test): one sweeper following N backends on its node, against a localcluster
//! API server and one SSE server standing in for N sidecars (one stream per backend), all in
//! this process on loopback. Prints the time until every stream is open and the resident memory
//! this added (sweeper tasks and connections plus the server's side of each stream, so an upper
//! bound of the sweeper's own cost).
//!
//! `cargo run --release -p spawner-sweeper --example scale -- 2000`

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::response::Response;
use axum::routing::get;
use bytes::Bytes;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;
use spawner_core::resource::{NODE_LABEL, SessionLivedBackend};
use spawner_core::state_stream::{PROTOCOL_VERSION, SidecarState, StateMessage};
use spawner_localcluster::{Cluster, ServerConfig, SystemClock};
use spawner_sweeper::{SweeperConfig, tcp_transport};
use tokio::net::TcpListener;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1000)
        .min(10_000);

    let api_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let api_addr = api_listener.local_addr().expect("addr");
    let cluster = Cluster::new(
        ServerConfig {
            bookmark_interval: Duration::from_secs(1),
            auth: spawner_localcluster::Auth::anyone_is_admin(),
            ..ServerConfig::default()
        },
        Arc::new(SystemClock),
    );
    tokio::spawn(spawner_localcluster::serve(api_listener, cluster));
    let mut config = kube::Config::new(format!("http://{api_addr}").parse().expect("uri"));
    config.default_namespace = "default".into();
    config.read_timeout = Some(Duration::from_secs(10));
    // Counted from each request: else a pooled connection's idle time counts too, and the
    // first request after a quiet spell as long as the timeout fails at once.
    config.reset_reader_on_write = true;
    let client = Client::try_from(config).expect("client");

    // Idle sidecars with a live connection each (so nothing is swept), heartbeat every 5 s.
    let streams = Arc::new(AtomicU64::new(0));
    let open = streams.clone();
    let sse = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let sse_addr = sse.local_addr().expect("addr");
    let app = Router::new().route(
        "/_spawner/events",
        get(move || {
            let open = open.clone();
            async move {
                open.fetch_add(1, Ordering::Relaxed);
                let state = SidecarState {
                    v: PROTOCOL_VERSION,
                    ready: true,
                    live_connections: 1,
                    seconds_since_active: 0,
                    millis_since_active: None,
                };
                let stream = futures::stream::unfold(true, move |first| async move {
                    if !first {
                        tokio::time::sleep(Duration::from_secs(5)).await;
                    }
                    let event = if first {
                        StateMessage::State(state)
                    } else {
                        StateMessage::Heartbeat(state)
                    };
                    Some((Ok::<_, Infallible>(Bytes::from(event.to_sse())), false))
                });
                Response::new(Body::from_stream(stream))
            }
        }),
    );
    tokio::spawn(async move { axum::serve(sse, app).await });

    let api: Api<SessionLivedBackend> = Api::default_namespaced(client.clone());
    let created = Instant::now();
    for i in 0..n {
        let name = format!("slab-{i}");
        let backend: SessionLivedBackend = serde_json::from_value(json!({
            "apiVersion": "spawner.dev/v1", "kind": "SessionLivedBackend",
            "metadata": {"name": name, "labels": {NODE_LABEL: "node-a"}},
            "spec": {
                "template": {"spec": {"containers": [{"name": "app", "image": "x"}]}},
                "gracePeriodSeconds": 60
            }
        }))
        .expect("backend");
        api.create(&PostParams::default(), &backend)
            .await
            .expect("create");
        let status = json!({"status": {"phase": "Ready", "nodeName": "node-a",
            "url": format!("http://{sse_addr}")}});
        api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .expect("status");
    }
    println!("created {n} backends in {:?}", created.elapsed());

    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_kib();
    let started = Instant::now();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let sweeper = tokio::spawn(spawner_sweeper::run(
        client.clone(),
        TcpListener::bind("127.0.0.1:0").await.expect("bind"),
        tcp_transport(),
        SweeperConfig {
            node_name: "node-a".into(),
            namespace: Some("default".into()),
            events_secret: b"bench".to_vec(),
            heartbeat: Duration::from_secs(5),
            read_timeout_heartbeats: 3,
            reconnect_min: Duration::from_millis(200),
            reconnect_max: Duration::from_secs(10),
            identity: "bench".into(),
            clock: Arc::new(spawner_sweeper::SystemClock),
        },
        async move {
            let _ = stopped.await;
        },
    ));
    let deadline = Instant::now() + Duration::from_secs(120);
    while streams.load(Ordering::Relaxed) < n as u64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let connected = streams.load(Ordering::Relaxed);
    println!(
        "{connected}/{n} event streams open after {:?}",
        started.elapsed()
    );
    // Let a heartbeat round pass, then measure.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let after = rss_kib();
    let added = after.saturating_sub(before);
    println!(
        "resident memory: {before} KiB before, {after} KiB with {connected} streams: {added} KiB added, {:.1} KiB per backend (sweeper and server side together)",
        added as f64 / connected.max(1) as f64
    );
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(20), sweeper).await;
}
