//! Test harness: a localcluster API server on loopback, and sidecars that speak the real event
//! protocol (core's `StateMessage::to_sse`) with a state the test controls.

#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;
use spawner_core::phase::Phase;
use spawner_core::resource::{NODE_LABEL, SessionLivedBackend};
use spawner_core::state_stream::{
    CONTROL_TOKEN_HEADER, PROTOCOL_VERSION, SidecarState, StateMessage,
};
use spawner_localcluster::{Cluster, ServerConfig, SystemClock};
use tokio::net::TcpListener;

pub const SECRET: &[u8] = b"test-events-secret";

/// A localcluster API server on a loopback port, and a client of it.
pub async fn cluster() -> Client {
    let cluster = Cluster::new(ServerConfig::for_tests(), Arc::new(SystemClock));
    let (addr, _task) = spawner_localcluster::serve_on_loopback(cluster)
        .await
        .expect("serve localcluster");
    client_for(addr)
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

/// What a fake sidecar reports; the test changes it.
#[derive(Debug)]
pub struct SidecarControl {
    pub ready: bool,
    pub live: u64,
    pub last_active: Instant,
    /// A silent sidecar keeps connections open and sends nothing (a partition dropping packets).
    pub silent: bool,
    pub connections: u64,
    /// Set when the sweeper sealed this sidecar (it refuses seals while `live > 0`).
    pub sealed: bool,
    version: u64,
}

#[derive(Clone)]
pub struct FakeSidecar {
    pub addr: SocketAddr,
    pub control: Arc<Mutex<SidecarControl>>,
    token: Arc<Mutex<Option<String>>>,
}

impl FakeSidecar {
    pub async fn start(heartbeat: Duration) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let sidecar = FakeSidecar {
            addr,
            control: Arc::new(Mutex::new(SidecarControl {
                ready: false,
                live: 0,
                last_active: Instant::now(),
                silent: false,
                connections: 0,
                sealed: false,
                version: 0,
            })),
            token: Arc::new(Mutex::new(None)),
        };
        let app =
            Router::new()
                .route(
                    "/_spawner/events",
                    get(move |State(s): State<FakeSidecar>, headers: HeaderMap| {
                        events(s, headers, heartbeat)
                    }),
                )
                .route(
                    "/_spawner/seal",
                    axum::routing::post(
                        |State(s): State<FakeSidecar>, headers: HeaderMap| async move {
                            seal(s, headers)
                        },
                    ),
                )
                // Permanence and release are not modelled: a permanent seal is a seal here.
                .route(
                    "/_spawner/seal/permanent",
                    axum::routing::post(
                        |State(s): State<FakeSidecar>, headers: HeaderMap| async move {
                            seal(s, headers)
                        },
                    ),
                )
                .route(
                    "/_spawner/unseal",
                    axum::routing::post(
                        |State(s): State<FakeSidecar>, headers: HeaderMap| async move {
                            let response = seal(s.clone(), headers);
                            s.control.lock().expect("lock").sealed = false;
                            response
                        },
                    ),
                )
                .with_state(sidecar.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        sidecar
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn expect_token(&self, token: String) {
        *self.token.lock().expect("lock") = Some(token);
    }

    pub fn set(&self, f: impl FnOnce(&mut SidecarControl)) {
        let mut c = self.control.lock().expect("lock");
        f(&mut c);
        c.version += 1;
    }

    pub fn connections(&self) -> u64 {
        self.control.lock().expect("lock").connections
    }

    fn snapshot(&self) -> (SidecarState, bool, u64) {
        let c = self.control.lock().expect("lock");
        (
            SidecarState {
                v: PROTOCOL_VERSION,
                ready: c.ready,
                live_connections: c.live,
                seconds_since_active: if c.live > 0 {
                    0
                } else {
                    c.last_active.elapsed().as_secs()
                },
                millis_since_active: None,
            },
            c.silent,
            c.version,
        )
    }
}

/// As the real sidecar: 409 while a connection is live, else sealed.
fn seal(sidecar: FakeSidecar, headers: HeaderMap) -> Response {
    let expected = sidecar.token.lock().expect("lock").clone();
    let given = headers
        .get(CONTROL_TOKEN_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    if expected.is_none() || expected != given {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let mut control = sidecar.control.lock().expect("lock");
    if control.live > 0 {
        return StatusCode::CONFLICT.into_response();
    }
    control.sealed = true;
    StatusCode::OK.into_response()
}

async fn events(sidecar: FakeSidecar, headers: HeaderMap, heartbeat: Duration) -> Response {
    let expected = sidecar.token.lock().expect("lock").clone();
    let given = headers
        .get(CONTROL_TOKEN_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    if expected.is_none() || expected != given {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    sidecar.control.lock().expect("lock").connections += 1;
    // (last version sent, when anything was last sent)
    let stream = futures::stream::unfold(
        (sidecar, None::<u64>, Instant::now()),
        move |(sidecar, sent_version, mut last_sent)| async move {
            loop {
                let (state, silent, version) = sidecar.snapshot();
                if !silent {
                    if sent_version != Some(version) {
                        let bytes = Bytes::from(StateMessage::State(state).to_sse());
                        return Some((
                            Ok::<_, Infallible>(bytes),
                            (sidecar, Some(version), Instant::now()),
                        ));
                    }
                    if last_sent.elapsed() >= heartbeat {
                        last_sent = Instant::now();
                        let bytes = Bytes::from(StateMessage::Heartbeat(state).to_sse());
                        return Some((Ok(bytes), (sidecar, sent_version, last_sent)));
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        },
    );
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(stream))
        .expect("response")
}

/// Creates a backend already Running on `node` (as the controller would leave it), pointing
/// at `url`. Returns it as stored.
pub async fn running_backend(
    client: &Client,
    name: &str,
    node: &str,
    url: &str,
    grace_seconds: u32,
) -> SessionLivedBackend {
    let api: Api<SessionLivedBackend> = Api::default_namespaced(client.clone());
    let backend: SessionLivedBackend = serde_json::from_value(json!({
        "apiVersion": "spawner.dev/v1",
        "kind": "SessionLivedBackend",
        "metadata": {"name": name, "labels": {NODE_LABEL: node}},
        "spec": {
            "template": {"spec": {"containers": [{"name": "app", "command": ["app"]}]}},
            "gracePeriodSeconds": grace_seconds
        }
    }))
    .expect("backend");
    api.create(&PostParams::default(), &backend)
        .await
        .expect("create");
    let status = json!({"status": {
        "phase": "Running",
        "nodeName": node,
        "url": url,
        "conditions": [{"type": "Running", "status": "True",
            "lastTransitionTime": "2024-01-01T00:00:00Z"}]
    }});
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .expect("status")
}

pub async fn phase_of(client: &Client, name: &str) -> Phase {
    let api: Api<SessionLivedBackend> = Api::default_namespaced(client.clone());
    api.get(name).await.expect("get").phase()
}

/// Polls until `name` reaches `phase`, failing after `limit`.
pub async fn wait_for_phase(client: &Client, name: &str, phase: Phase, limit: Duration) {
    let start = Instant::now();
    loop {
        let current = phase_of(client, name).await;
        if current == phase {
            return;
        }
        assert!(
            start.elapsed() < limit,
            "{name} still {current} after {limit:?}, expected {phase}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
