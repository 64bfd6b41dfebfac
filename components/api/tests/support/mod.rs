//! A localcluster API server and the api on loopback ports, and a small HTTP client.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode};
use chrono::{DateTime, TimeZone, Utc};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::Value;
use spawner_api::{ApiConfig, Clock};
use spawner_core::SessionLivedBackend;
use spawner_core::resource::BackendCondition;
use spawner_core::state_stream::{SseMessage, SseParser};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const TOKEN: &str = "test-token-1";
pub const NAMESPACE: &str = "default";
/// Bound on any single wait in these tests, so a bug shows as a failure instead of a hang.
pub const WAIT: Duration = Duration::from_secs(20);

/// The api's clock in tests: a fixed instant.
#[derive(Debug)]
pub struct FixedClock(pub DateTime<Utc>);

impl Clock for FixedClock {
    fn now(&self) -> k8s_openapi::jiff::Timestamp {
        spawner_core::clock::from_chrono(self.0)
    }
}

pub fn fixed_time() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2030, 1, 2, 3, 4, 5)
        .single()
        .expect("valid time")
}

pub struct Harness {
    pub base: String,
    pub backends: Api<SessionLivedBackend>,
    http: HttpClient<HttpConnector, Full<Bytes>>,
    shutdown: Option<oneshot::Sender<()>>,
    pub api_task: Option<JoinHandle<Result<(), spawner_api::RunError>>>,
    cluster_task: JoinHandle<()>,
}

/// A kube client for the server at `url`.
pub fn kube_client(url: &str) -> kube::Client {
    let mut config = kube::Config::new(url.parse().expect("url"));
    config.default_namespace = NAMESPACE.to_string();
    config.read_timeout = Some(Duration::from_secs(30));
    // Counted from each request: else a pooled connection's idle time counts too, and the
    // first request after a quiet spell as long as the timeout fails at once.
    config.reset_reader_on_write = true;
    kube::Client::try_from(config).expect("client")
}

impl Harness {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// Starts localcluster and the api; `configure` adjusts the api's config.
    pub async fn start_with(configure: impl FnOnce(&mut ApiConfig)) -> Self {
        let cluster = spawner_localcluster::Cluster::new(
            spawner_localcluster::ServerConfig::for_tests(),
            Arc::new(spawner_localcluster::SystemClock),
        );
        let (k8s_addr, cluster_task) = spawner_localcluster::serve_on_loopback(cluster)
            .await
            .expect("serve localcluster");
        let client = kube_client(&format!("http://{k8s_addr}"));
        Self::start_api(client, cluster_task, configure).await
    }

    /// Like `start_with`, but the api reaches the API server through `proxy` (and its client
    /// has no read timeout, as `kube::Config` defaults); the test's own client goes direct.
    pub async fn start_behind_proxy(configure: impl FnOnce(&mut ApiConfig)) -> (Self, Proxy) {
        let server_config = spawner_localcluster::ServerConfig {
            bookmark_interval: Duration::from_secs(60),
            auth: spawner_localcluster::Auth::anyone_is_admin(),
            ..Default::default()
        };
        let cluster = spawner_localcluster::Cluster::new(
            server_config,
            Arc::new(spawner_localcluster::SystemClock),
        );
        let (k8s_addr, cluster_task) = spawner_localcluster::serve_on_loopback(cluster)
            .await
            .expect("serve localcluster");
        let proxy = Proxy::start(k8s_addr).await;
        let mut config = kube::Config::new(format!("http://{}", proxy.addr).parse().expect("url"));
        config.default_namespace = NAMESPACE.to_string();
        let api_client = kube::Client::try_from(config).expect("client");
        let mut harness = Self::start_api(api_client, cluster_task, configure).await;
        harness.backends = Api::namespaced(kube_client(&format!("http://{k8s_addr}")), NAMESPACE);
        (harness, proxy)
    }

    /// The api against a Kubernetes API server that refuses connections.
    pub async fn start_without_kubernetes() -> Self {
        let closed = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", closed.local_addr().expect("addr"));
        drop(closed);
        let idle = tokio::spawn(async {});
        Self::start_api(kube_client(&url), idle, |_| {}).await
    }

    async fn start_api(
        client: kube::Client,
        cluster_task: JoinHandle<()>,
        configure: impl FnOnce(&mut ApiConfig),
    ) -> Self {
        let mut config = ApiConfig::new(NAMESPACE);
        config.tokens = spawner_api::auth::TokenSet::new(&[TOKEN, "test-token-2"]);
        config.clock = Arc::new(FixedClock(fixed_time()));
        config.heartbeat = Duration::from_millis(500);
        config.watch_idle_timeout = Duration::from_secs(3);
        config.max_body_bytes = 64 * 1024;
        configure(&mut config);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let (shutdown, stop) = oneshot::channel::<()>();
        let api_task = tokio::spawn(spawner_api::run(
            client.clone(),
            listener,
            config,
            async move {
                let _ = stop.await;
            },
        ));
        let http = HttpClient::builder(TokioExecutor::new()).build_http();
        Self {
            base,
            backends: Api::namespaced(client, NAMESPACE),
            http,
            shutdown: Some(shutdown),
            api_task: Some(api_task),
            cluster_task,
        }
    }

    /// Asks the api to shut down.
    pub fn shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    pub async fn send(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Vec<u8>>,
        headers: &[(&str, &str)],
    ) -> hyper::Response<hyper::body::Incoming> {
        let mut request = hyper::Request::builder()
            .method(method)
            .uri(format!("{}{}", self.base, path));
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        if body.is_some() {
            request = request.header("content-type", "application/json");
        }
        let request = request
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .expect("request");
        tokio::time::timeout(WAIT, self.http.request(request))
            .await
            .expect("answer in time")
            .expect("request succeeds")
    }

    /// A request whose answer is JSON (or empty).
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> (StatusCode, HeaderMap, Value) {
        let response = self.send(method, path, token, body, &[]).await;
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = tokio::time::timeout(WAIT, response.into_body().collect())
            .await
            .expect("body in time")
            .expect("body")
            .to_bytes();
        let value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        (status, headers, value)
    }

    pub async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        let (status, _, value) = self
            .call(
                Method::POST,
                path,
                Some(TOKEN),
                Some(serde_json::to_vec(&body).expect("json")),
            )
            .await;
        (status, value)
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        let (status, _, value) = self.call(Method::GET, path, Some(TOKEN), None).await;
        (status, value)
    }

    /// Opens the status stream of `name`.
    pub async fn stream(&self, name: &str, last_event_id: Option<&str>) -> EventStream {
        let headers: Vec<(&str, &str)> = last_event_id
            .map(|id| vec![("last-event-id", id)])
            .unwrap_or_default();
        let response = self
            .send(
                Method::GET,
                &format!("/backend/{name}/status/stream"),
                None,
                None,
                &headers,
            )
            .await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            response.headers()["content-type"]
                .to_str()
                .expect("content type"),
            "text/event-stream"
        );
        EventStream::new(response)
    }

    /// Writes `status` on the status subresource, as the controller and sweeper do.
    pub async fn patch_status(&self, name: &str, status: Value) {
        self.backends
            .patch_status(
                name,
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({ "status": status })),
            )
            .await
            .expect("status patch");
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.shutdown();
        if let Some(task) = self.api_task.take() {
            task.abort();
        }
        self.cluster_task.abort();
    }
}

/// Messages of one SSE response.
pub struct EventStream {
    body: hyper::body::Incoming,
    parser: SseParser,
    pending: Vec<SseMessage>,
}

impl EventStream {
    pub fn new(response: hyper::Response<hyper::body::Incoming>) -> Self {
        Self {
            body: response.into_body(),
            parser: SseParser::new(),
            pending: Vec::new(),
        }
    }

    /// The next message, or `None` when the stream ended; heartbeats do not count, so a
    /// message that does not come within `WAIT` fails the test.
    pub async fn next(&mut self) -> Option<SseMessage> {
        tokio::time::timeout(WAIT, self.next_unbounded())
            .await
            .expect("an event or the end in time")
    }

    async fn next_unbounded(&mut self) -> Option<SseMessage> {
        loop {
            if !self.pending.is_empty() {
                return Some(self.pending.remove(0));
            }
            let frame = self.body.frame().await?.expect("stream frame");
            if let Ok(data) = frame.into_data() {
                self.pending = self.parser.push(&data).expect("sse");
            }
        }
    }

    /// The ids of the messages until the stream ends.
    pub async fn rest(&mut self) -> Vec<String> {
        let mut ids = Vec::new();
        while let Some(message) = self.next().await {
            ids.push(message.id.unwrap_or(message.event));
        }
        ids
    }
}

pub fn condition(phase: &str) -> BackendCondition {
    BackendCondition {
        type_: phase.to_string(),
        status: "True".into(),
        last_transition_time: "2030-01-02T03:04:05Z".into(),
        reason: Some(phase.to_string()),
        message: None,
    }
}

/// Asserts the api's error shape.
pub fn assert_error(status: StatusCode, body: &Value, expected: StatusCode, code: &str) {
    assert_eq!(status, expected, "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(body["error"]["message"].is_string(), "{body}");
    assert!(body["error"]["fields"].is_array(), "{body}");
}

/// A TCP proxy that can silently black-hole every connection open at some instant (bytes are
/// read and dropped, nothing is closed), as a network partition does; later connections work.
/// It can also hold back every answer of the API server for a while (a slow network), to
/// order responses against what a test does meanwhile.
pub struct Proxy {
    pub addr: std::net::SocketAddr,
    accepted: Arc<AtomicU64>,
    frozen_before: Arc<AtomicU64>,
    holding: tokio::sync::watch::Sender<bool>,
    /// Every byte the API server sent while answers were held.
    held: Arc<std::sync::Mutex<Vec<u8>>>,
    task: JoinHandle<()>,
}

type Reader = Box<dyn tokio::io::AsyncRead + Send + Unpin>;
type Writer = Box<dyn tokio::io::AsyncWrite + Send + Unpin>;

impl Proxy {
    pub async fn start(upstream: std::net::SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicU64::new(0));
        let frozen_before = Arc::new(AtomicU64::new(0));
        let (holding, _) = tokio::sync::watch::channel(false);
        let held = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (counter, frozen) = (accepted.clone(), frozen_before.clone());
        let (hold, held_bytes) = (holding.clone(), held.clone());
        let task = tokio::spawn(async move {
            // Dropped with this task, which aborts every forwarding task.
            let mut forwarders = tokio::task::JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                let id = counter.fetch_add(1, Ordering::SeqCst);
                let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                    continue;
                };
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                let directions: [(Reader, Writer); 2] = [
                    (Box::new(client_read), Box::new(server_write)),
                    (Box::new(server_read), Box::new(client_write)),
                ];
                for (answers, (mut from, mut to)) in [false, true].into_iter().zip(directions) {
                    let frozen = frozen.clone();
                    let mut hold = hold.subscribe();
                    let held_bytes = held_bytes.clone();
                    forwarders.spawn(async move {
                        let mut buffer = vec![0u8; 16 * 1024];
                        loop {
                            let n = match from.read(&mut buffer).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            if id < frozen.load(Ordering::SeqCst) {
                                continue;
                            }
                            if answers && *hold.borrow_and_update() {
                                if let Ok(mut held) = held_bytes.lock() {
                                    held.extend_from_slice(&buffer[..n]);
                                }
                                if hold.wait_for(|holding| !*holding).await.is_err() {
                                    return;
                                }
                            }
                            if to.write_all(&buffer[..n]).await.is_err() {
                                return;
                            }
                        }
                    });
                }
            }
        });
        Self {
            addr,
            accepted,
            frozen_before,
            holding,
            held,
            task,
        }
    }

    /// Holds back every answer of the API server, on open and new connections, until
    /// [`Proxy::release_answers`]; requests still reach it.
    pub fn hold_answers(&self) {
        if let Ok(mut held) = self.held.lock() {
            held.clear();
        }
        self.holding.send_replace(true);
    }

    /// Delivers the held answers and forwards again.
    pub fn release_answers(&self) {
        self.holding.send_replace(false);
    }

    /// Waits until the held answers contain `needle` (the API server has answered a request
    /// whose answer contains it).
    pub async fn wait_until_held(&self, needle: &str) {
        let found = || {
            self.held.lock().is_ok_and(|held| {
                held.windows(needle.len())
                    .any(|window| window == needle.as_bytes())
            })
        };
        tokio::time::timeout(WAIT, async {
            while !found() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no held answer contains {needle:?}"));
    }

    /// Black-holes every connection accepted so far; new ones are forwarded.
    pub fn partition_open_connections(&self) {
        self.frozen_before
            .store(self.accepted.load(Ordering::SeqCst), Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
