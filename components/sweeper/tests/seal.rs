//! The seal outlasts a slow sweep: the real sweeper (`subscription::follow`) against the real
//! sidecar and an in-process localcluster, all over in-memory streams in paused tokio time, with
//! the API server answering the sweeper's status PATCH 35 s late. A user who connects 31 s into
//! the sweep is refused (the seal is renewed while the write is in flight), and so is one who
//! connects long after Swept was written (the seal is then permanent): nobody connects to a
//! backend whose pod is about to be deleted.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo};
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use spawner_core::phase::Phase;
use spawner_core::resource::{NODE_LABEL, SessionLivedBackend};
use spawner_core::token::{events_token, token_check};
use spawner_core::transition_event::EventReporter;
use spawner_kube_events::EventPublisher;
use spawner_localcluster::{Cluster, ServerConfig};
use spawner_sweeper::{Metrics, Shared, SweeperConfig, TokioClock, TransitionEvents};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tower::ServiceExt;

const SECRET: &[u8] = b"seal-test-events-secret";
const PATCH_DELAY: Duration = Duration::from_secs(35);

/// Client connections into the sidecar, as in-memory streams.
struct MemListener(mpsc::UnboundedReceiver<DuplexStream>);

impl spawner_sidecar::Listener for MemListener {
    type Io = DuplexStream;

    async fn accept(&mut self) -> io::Result<(DuplexStream, SocketAddr)> {
        match self.0.recv().await {
            Some(io) => Ok((io, SocketAddr::from(([10, 0, 0, 1], 40000)))),
            None => std::future::pending().await,
        }
    }
}

/// The application: answers every request head with a WebSocket handshake (or 200 for plain
/// requests) and keeps the connection open, like a WebSocket server would.
#[derive(Clone)]
struct MemApp;

impl spawner_sidecar::Connect for MemApp {
    type Io = DuplexStream;

    async fn connect(&self, _addr: &str) -> io::Result<DuplexStream> {
        let (ours, mut theirs) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match theirs.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
            let answer: &[u8] = if text.contains("upgrade: websocket") {
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
            } else {
                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
            };
            let _ = theirs.write_all(answer).await;
            let _ = theirs.read(&mut buf).await;
        });
        Ok(ours)
    }
}

/// The sweeper's connections to the sidecar.
struct MemConn(TokioIo<DuplexStream>);

impl Connection for MemConn {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl hyper::rt::Read for MemConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for MemConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

/// Opens a connection to the sidecar.
fn dial(sidecar: &mpsc::UnboundedSender<DuplexStream>) -> DuplexStream {
    let (ours, theirs) = tokio::io::duplex(64 * 1024);
    sidecar.send(theirs).expect("sidecar accepting");
    ours
}

/// A user's WebSocket handshake through the sidecar; the status code it gets.
async fn websocket_attempt(sidecar: &mpsc::UnboundedSender<DuplexStream>) -> u16 {
    let mut io = dial(sidecar);
    io.write_all(
        b"GET /ws HTTP/1.1\r\nHost: backend\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await
    .expect("write");
    let mut head = Vec::new();
    let mut buf = [0u8; 512];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = io.read(&mut buf).await.expect("read");
        assert!(
            n > 0,
            "closed before an answer: {}",
            String::from_utf8_lossy(&head)
        );
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    line.split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .expect("status code")
}

/// A kube client on the in-process API server whose answers to status PATCHes come
/// `PATCH_DELAY` late once `slow` is set; `patch_seen` gets when such a PATCH arrived.
fn client(
    cluster: &Cluster,
    slow: watch::Receiver<bool>,
    patch_seen: Arc<Mutex<Option<Instant>>>,
) -> Client {
    let router = spawner_localcluster::router(cluster.clone());
    let service = tower::service_fn(move |request: http::Request<kube::client::Body>| {
        let router = router.clone();
        let slow = *slow.borrow();
        let patch_seen = patch_seen.clone();
        async move {
            let delayed = slow
                && request.method() == http::Method::PATCH
                && request.uri().path().ends_with("/status");
            if delayed {
                *patch_seen.lock().expect("lock") = Some(Instant::now());
            }
            let response = router.oneshot(request.map(axum::body::Body::new)).await?;
            if delayed {
                tokio::time::sleep(PATCH_DELAY).await;
            }
            Ok::<_, std::convert::Infallible>(response)
        }
    });
    Client::new(service, "default")
}

#[tokio::test(start_paused = true)]
async fn a_user_connecting_while_a_slow_sweep_is_written_is_refused_and_so_is_one_after() {
    let cluster = Cluster::new(
        ServerConfig {
            auth: spawner_localcluster::Auth::anyone_is_admin(),
            ..ServerConfig::default()
        },
        Arc::new(spawner_localcluster::SystemClock),
    );
    let (slow_tx, slow) = watch::channel(false);
    let patch_seen = Arc::new(Mutex::new(None));
    let kube = client(&cluster, slow, patch_seen.clone());
    let backends: Api<SessionLivedBackend> = Api::default_namespaced(kube.clone());
    let backend: SessionLivedBackend = serde_json::from_value(json!({
        "apiVersion": "spawner.dev/v1",
        "kind": "SessionLivedBackend",
        "metadata": {"name": "slab-slow-sweep", "labels": {NODE_LABEL: "node-a"}},
        "spec": {
            "template": {"spec": {"containers": [{"name": "app", "command": ["app"]}]}},
            "gracePeriodSeconds": 5
        }
    }))
    .expect("backend");
    let created = backends
        .create(&PostParams::default(), &backend)
        .await
        .expect("create");
    let status = json!({"status": {
        "phase": "Ready",
        "nodeName": "node-a",
        "url": "http://slab-slow-sweep.default.svc:9090",
        "conditions": [{"type": "Ready", "status": "True",
            "lastTransitionTime": "2030-01-01T00:00:00Z"}]
    }});
    let stored = backends
        .patch_status(
            &created.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&status),
        )
        .await
        .expect("status");
    let uid = stored.uid().expect("uid");

    // The real sidecar, checking the token the controller would give it.
    let (to_sidecar, accepted) = mpsc::unbounded_channel();
    let config = spawner_sidecar::SidecarConfig {
        events_token: Some(token_check(&events_token(SECRET, &uid))),
        ..spawner_sidecar::SidecarConfig::new("app:8080")
    };
    let (sidecar, _handle) = spawner_sidecar::Sidecar::new(MemApp, config).expect("sidecar");
    {
        let serving = sidecar.clone();
        tokio::spawn(async move { serving.serve(MemListener(accepted)).await });
        tokio::spawn(async move { sidecar.supervise(std::future::pending()).await });
    }

    // The sweeper's subscription to it.
    let connector = {
        let to_sidecar = to_sidecar.clone();
        tower::service_fn(move |_uri: http::Uri| {
            let io = dial(&to_sidecar);
            std::future::ready(Ok::<_, io::Error>(MemConn(TokioIo::new(io))))
        })
    };
    let http = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build(connector);
    let (publisher, _publishing) = EventPublisher::start(kube.clone());
    let shared = Arc::new(Shared {
        http,
        kube: kube.clone(),
        config: SweeperConfig {
            node_name: "node-a".into(),
            namespace: Some("default".into()),
            events_secret: SECRET.to_vec(),
            heartbeat: Duration::from_secs(5),
            read_timeout_heartbeats: 3,
            reconnect_min: Duration::from_millis(200),
            reconnect_max: Duration::from_secs(5),
            identity: "sweeper-a".into(),
            clock: Arc::new(TokioClock::starting_at(
                "2030-01-01T00:00:10Z".parse().expect("time"),
            )),
        },
        metrics: Arc::new(Metrics::default()),
        events: TransitionEvents {
            reporter: EventReporter {
                controller: "spawner-sweeper".into(),
                instance: "sweeper-a".into(),
            },
            publisher,
        },
    });
    slow_tx.send(true).expect("slow");
    let target = spawner_sweeper::target_of(&stored).expect("followed");
    let (_cancel, cancelled) = watch::channel(());
    let following = tokio::spawn(spawner_sweeper::subscription::follow(
        target, shared, cancelled,
    ));

    // Idle past the 5 s grace: the sweeper seals and writes Swept, which takes 35 s.
    let deadline = Instant::now() + Duration::from_secs(600);
    let sweep_started = loop {
        if let Some(at) = *patch_seen.lock().expect("lock") {
            break at;
        }
        assert!(Instant::now() < deadline, "never swept");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    tokio::time::sleep_until(sweep_started + Duration::from_secs(31)).await;
    assert_eq!(
        websocket_attempt(&to_sidecar).await,
        503,
        "a user connected 31 s into the sweep, past the first seal's hold"
    );

    tokio::time::timeout(Duration::from_secs(60), following)
        .await
        .expect("the sweep ends")
        .expect("follow");
    assert_eq!(
        backends.get("slab-slow-sweep").await.expect("get").phase(),
        Phase::Swept
    );

    // Long after Swept, with the pod not yet deleted: still refused.
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert_eq!(
        websocket_attempt(&to_sidecar).await,
        503,
        "the seal lapsed after Swept"
    );
}
