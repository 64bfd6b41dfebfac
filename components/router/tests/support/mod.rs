//! The router's test world: an in-process localcluster API server, the router reading it,
//! echo apps standing in for backends' sidecars, and a raw HTTP/1.1 client, over loopback.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use spawner_core::SessionLivedBackend;
use spawner_core::connect_token::{self, Claims, KeyRing, Purpose};
use spawner_router::route::Mode;
use spawner_router::{RouterConfig, RouterHandle, TcpConnector};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;

pub const NS: &str = "default";
pub const WAIT: Duration = Duration::from_secs(20);

pub fn keys() -> KeyRing {
    KeyRing::parse(["k1:0123456789abcdef"], false).expect("keys")
}

pub struct World {
    pub router: SocketAddr,
    pub handle: RouterHandle,
    pub backends: Api<SessionLivedBackend>,
    /// What the test's clock says (Unix seconds).
    pub now: Arc<AtomicU64>,
    pub tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for World {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl World {
    pub async fn start(mode: Mode) -> Self {
        Self::start_with(mode, |_| {}).await
    }

    pub async fn start_with(mode: Mode, configure: impl FnOnce(&mut RouterConfig)) -> Self {
        let cluster = spawner_localcluster::Cluster::new(
            spawner_localcluster::ServerConfig::for_tests(),
            Arc::new(spawner_localcluster::SystemClock),
        );
        let (k8s, cluster_task) = spawner_localcluster::serve_on_loopback(cluster)
            .await
            .expect("serve localcluster");
        let url = format!("http://{k8s}");
        let mut kube_config = kube::Config::new(url.parse().expect("url"));
        kube_config.default_namespace = NS.into();
        let client = kube::Client::try_from(kube_config).expect("client");

        let now = Arc::new(AtomicU64::new(1_000_000));
        let mut config = RouterConfig::new(NS, mode, keys());
        config.clock = Arc::new(UnixSeconds(now.clone()));
        config.wait_ready = Duration::from_secs(5);
        configure(&mut config);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let router = listener.local_addr().expect("addr");
        let (handle, serve) = spawner_router::start(listener, client.clone(), TcpConnector, config);
        let router_task = tokio::spawn(serve);
        assert!(handle.backends.ready(WAIT).await, "cache never filled");
        World {
            router,
            handle,
            backends: Api::namespaced(client, NS),
            now,
            tasks: vec![cluster_task, router_task],
        }
    }

    pub fn token(&self, backend: &str, user: Option<&str>) -> String {
        connect_token::sign(
            &keys(),
            Purpose::Connect,
            &Claims {
                backend: backend.into(),
                expires_at: self.now.load(Ordering::SeqCst) + 300,
                user: user.map(str::to_string),
            },
        )
        .expect("sign")
    }

    /// Creates backend `name` in `phase`, its sidecar at `upstream`.
    pub async fn backend(
        &self,
        name: &str,
        phase: &str,
        upstream: Option<SocketAddr>,
        public: bool,
    ) {
        self.backend_with_key(name, None, phase, upstream, public)
            .await;
    }

    /// [`World::backend`] with a get-or-create `key`.
    pub async fn backend_with_key(
        &self,
        name: &str,
        key: Option<&str>,
        phase: &str,
        upstream: Option<SocketAddr>,
        public: bool,
    ) {
        let mut spec = json!({"template": {"spec": {"containers": [{"name": "app", "image": "x"}]}},
                              "httpPort": 8080, "gracePeriodSeconds": 300});
        if let Some(key) = key {
            spec["key"] = Value::from(key);
        }
        let mut b: SessionLivedBackend = serde_json::from_value(json!({
            "apiVersion": "spawner.dev/v1",
            "kind": "SessionLivedBackend",
            "metadata": {"name": name, "namespace": NS},
            "spec": spec
        }))
        .expect("backend");
        if public {
            b.metadata.annotations = Some(BTreeMap::from([(
                spawner_core::resource::PUBLIC_ANNOTATION.to_string(),
                "true".to_string(),
            )]));
        }
        self.backends
            .create(&PostParams::default(), &b)
            .await
            .expect("create");
        self.set_phase(name, phase, upstream).await;
    }

    pub async fn set_phase(&self, name: &str, phase: &str, upstream: Option<SocketAddr>) {
        let mut status = json!({"phase": phase});
        if let Some(addr) = upstream {
            status["url"] = Value::from(format!("http://{addr}"));
        }
        self.backends
            .patch_status(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({ "status": status })),
            )
            .await
            .expect("status");
        // Wait until the router's cache has seen it.
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let seen = self.handle.backends.lookup(name);
            let expected = match phase {
                "Ready" if upstream.is_some() => {
                    matches!(seen, spawner_router::cache::Lookup::Ready { .. })
                }
                "Swept" | "Terminated" | "Failed" => {
                    matches!(seen, spawner_router::cache::Lookup::Ended(_))
                }
                _ => matches!(seen, spawner_router::cache::Lookup::Starting { .. }),
            };
            if expected {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "cache never saw {name} {phase}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// An app answering every request with what it received, as JSON, and `name` (so a test sees
/// which backend answered).
pub async fn echo_app(name: &'static str) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    move |req: http::Request<hyper::body::Incoming>| async move {
                        let headers: BTreeMap<String, String> = req
                            .headers()
                            .iter()
                            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
                            .collect();
                        let body = json!({
                            "backend": name,
                            "method": req.method().as_str(),
                            "uri": req.uri().to_string(),
                            "headers": headers,
                        });
                        Ok::<_, std::convert::Infallible>(http::Response::new(
                            http_body_util::Full::new(bytes::Bytes::from(body.to_string())),
                        ))
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, task)
}

/// A WebSocket app echoing every text message prefixed with its name.
pub async fn ws_app(name: &'static str) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                while let Some(Ok(msg)) = ws.next().await {
                    if let Message::Text(text) = msg
                        && ws
                            .send(Message::text(format!("{name}:{text}")))
                            .await
                            .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    (addr, task)
}

pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|_| panic!("not JSON: {}", self.body))
    }
}

/// Sends a raw HTTP/1.1 request (the test writes every header; `Connection: close` is added)
/// and reads the whole answer.
pub async fn send(addr: SocketAddr, head: &str) -> Answer {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let request = format!("{head}Connection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut raw = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut raw))
        .await
        .expect("answer in time")
        .expect("read");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {text}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    Answer {
        status,
        headers,
        body: body.to_string(),
    }
}

pub async fn get(addr: SocketAddr, host: &str, path: &str, extra: &str) -> Answer {
    send(
        addr,
        &format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}"),
    )
    .await
}

pub fn host_mode() -> Mode {
    Mode::Host {
        domain: "localhost".into(),
    }
}

/// The router's clock in these tests: Unix seconds the test sets.
#[derive(Debug)]
pub struct UnixSeconds(Arc<AtomicU64>);

impl spawner_router::Clock for UnixSeconds {
    fn now(&self) -> k8s_openapi::jiff::Timestamp {
        let secs = self.0.load(Ordering::SeqCst) as i64;
        k8s_openapi::jiff::Timestamp::from_second(secs)
            .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH)
    }
}
