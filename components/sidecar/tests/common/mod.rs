//! Shared test fixtures: a sidecar on a loopback port, real upstream applications (hyper for
//! HTTP, tokio-tungstenite for WebSockets), an HTTP client, an SSE reader and a TCP relay that
//! can stop forwarding (a client that vanished without FIN or RST).
#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use spawner_core::state_stream::{SseParser, StateMessage};
use spawner_sidecar::{Activity, SidecarConfig, SidecarHandle, TcpConnector};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, oneshot};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

/// Upper bound for anything a test waits for; tests never assert speed.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// A config for tests: short intervals so state changes show quickly.
pub fn test_config(upstream: SocketAddr) -> SidecarConfig {
    SidecarConfig {
        heartbeat_interval: Duration::from_millis(200),
        probe_backoff_min: Duration::from_millis(10),
        probe_backoff_max: Duration::from_millis(100),
        ready_check_interval: Duration::from_millis(200),
        drain_timeout: Duration::from_secs(2),
        // Most tests read the event stream without a token; those about tokens set one.
        allow_unauthenticated_control: true,
        ..SidecarConfig::new(upstream.to_string())
    }
}

pub struct TestSidecar {
    pub addr: SocketAddr,
    pub handle: SidecarHandle,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl TestSidecar {
    pub async fn start(config: SidecarConfig) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, rx) = oneshot::channel::<()>();
        let (handle, serve) =
            spawner_sidecar::run_with_handle(listener, TcpConnector, config, async {
                let _ = rx.await;
            })
            .expect("config");
        let task = tokio::spawn(async move {
            serve.await.expect("sidecar");
        });
        Self {
            addr,
            handle,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    /// Starts with `upstream` and waits until the sidecar reports ready.
    pub async fn ready(upstream: SocketAddr) -> Self {
        Self::ready_with(test_config(upstream)).await
    }

    pub async fn ready_with(config: SidecarConfig) -> Self {
        let sidecar = Self::start(config).await;
        sidecar.wait_for(|a| a.ready).await;
        sidecar
    }

    /// Waits until a published state satisfies `f`; panics after [`PATIENCE`].
    pub async fn wait_for(&self, f: impl Fn(&Activity) -> bool) -> Activity {
        let mut rx = self.handle.subscribe();
        let result = tokio::time::timeout(PATIENCE, rx.wait_for(|a| f(a)))
            .await
            .map(|found| found.map(|a| *a));
        match result {
            Ok(found) => found.expect("sidecar running"),
            Err(_) => panic!("state never matched; now: {:?}", self.handle.state()),
        }
    }

    pub async fn wait_live(&self, n: u64) {
        self.wait_for(|a| a.live_connections == n).await;
    }

    /// Requests shutdown and waits for the drain to finish.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(PATIENCE, task)
                .await
                .expect("sidecar stops")
                .expect("sidecar task");
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }
}

impl Drop for TestSidecar {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// A background task aborted on drop.
pub struct Background(pub JoinHandle<()>);

impl Drop for Background {
    fn drop(&mut self) {
        self.0.abort();
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP application

type AppBody = http_body_util::combinators::BoxBody<Bytes, hyper::Error>;

/// Hooks the HTTP app waits on, so tests control its timing.
#[derive(Default)]
pub struct AppControl {
    /// `/sse` sends its second event after this fires; `/slow` answers after it.
    pub release: Notify,
}

pub struct HttpApp {
    pub addr: SocketAddr,
    pub control: Arc<AppControl>,
    _task: Background,
}

fn full(bytes: impl Into<Bytes>) -> AppBody {
    Full::new(bytes.into())
        .map_err(|never: Infallible| match never {})
        .boxed()
}

async fn app_handle(
    control: Arc<AppControl>,
    req: Request<Incoming>,
) -> Result<Response<AppBody>, Infallible> {
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let response = match path.as_str() {
        "/hello" => Response::new(full("hello from the app")),
        "/headers" => {
            let mut text = format!("{} {}\n", req.method(), req.uri());
            for (name, value) in req.headers() {
                text.push_str(&format!("{}: {}\n", name, value.to_str().unwrap_or("?")));
            }
            Response::new(full(text))
        }
        // Streams the request body back as it arrives.
        "/echo" => Response::new(req.into_body().boxed()),
        "/chunked" => {
            let n: usize = query.parse().unwrap_or(5);
            let chunks =
                futures::stream::iter((0..n).map(|i| {
                    Ok::<_, hyper::Error>(Frame::data(Bytes::from(format!("chunk-{i};"))))
                }));
            Response::new(BodyExt::boxed(StreamBody::new(chunks)))
        }
        "/big" => {
            let n: usize = query.parse().unwrap_or(1 << 20);
            Response::new(full(pattern(n)))
        }
        "/sse" => {
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, hyper::Error>>(4);
            let control = Arc::clone(&control);
            tokio::spawn(async move {
                let _ = tx.send(Ok(Frame::data(Bytes::from("data: one\n\n")))).await;
                control.release.notified().await;
                let _ = tx.send(Ok(Frame::data(Bytes::from("data: two\n\n")))).await;
            });
            let stream = futures::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|item| (item, rx))
            });
            let mut response = Response::new(BodyExt::boxed(StreamBody::new(stream)));
            response.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("text/event-stream"),
            );
            response
        }
        "/nocontent" => {
            let mut r = Response::new(full(Bytes::new()));
            *r.status_mut() = StatusCode::NO_CONTENT;
            r
        }
        "/close" => {
            let mut r = Response::new(full("closing"));
            r.headers_mut().insert(
                hyper::header::CONNECTION,
                hyper::header::HeaderValue::from_static("close"),
            );
            r
        }
        "/slow" => {
            control.release.notified().await;
            Response::new(full("finally"))
        }
        _ => {
            let mut r = Response::new(full("not found"));
            *r.status_mut() = StatusCode::NOT_FOUND;
            r
        }
    };
    Ok(response)
}

/// Deterministic bytes for large bodies.
pub fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8).collect()
}

impl HttpApp {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind app");
        Self::serve(listener)
    }

    pub fn serve(listener: TcpListener) -> Self {
        let addr = listener.local_addr().expect("addr");
        let control = Arc::new(AppControl::default());
        let ctl = Arc::clone(&control);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let ctl = Arc::clone(&ctl);
                tokio::spawn(async move {
                    let service =
                        hyper::service::service_fn(move |req| app_handle(Arc::clone(&ctl), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self {
            addr,
            control,
            _task: Background(task),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// WebSocket application

/// A WebSocket echo server. On path `/close-after-first` it answers the first message and then
/// closes the connection itself.
pub struct WsApp {
    pub addr: SocketAddr,
    _task: Background,
}

impl WsApp {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind ws app");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                #[allow(clippy::result_large_err)] // tungstenite's callback signature
                tokio::spawn(async move {
                    let mut path = String::new();
                    let ws = tokio_tungstenite::accept_hdr_async(
                        stream,
                        |req: &tokio_tungstenite::tungstenite::handshake::server::Request, resp| {
                            path = req.uri().path().to_string();
                            Ok(resp)
                        },
                    )
                    .await;
                    let Ok(mut ws) = ws else { return };
                    let close_after_first = path == "/close-after-first";
                    while let Some(Ok(message)) = ws.next().await {
                        match message {
                            Message::Text(_) | Message::Binary(_) => {
                                if ws.send(message).await.is_err() {
                                    return;
                                }
                                if close_after_first {
                                    let _ = ws.close(None).await;
                                    // Read until the client answers the close, then drop.
                                    while let Some(Ok(_)) = ws.next().await {}
                                    return;
                                }
                            }
                            Message::Close(_) => {
                                // tungstenite answers the close itself; keep polling to flush it.
                            }
                            _ => {}
                        }
                    }
                });
            }
        });
        Self {
            addr,
            _task: Background(task),
        }
    }
}

pub type WsClient = tokio_tungstenite::WebSocketStream<TcpStream>;

/// Opens a WebSocket to `addr` (the sidecar, or a relay in front of it).
pub async fn ws_connect(addr: SocketAddr, path: &str) -> WsClient {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (ws, response) = tokio_tungstenite::client_async(format!("ws://{addr}{path}"), stream)
        .await
        .expect("websocket handshake");
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    ws
}

/// Sends `text` and expects it back.
pub async fn ws_echo(ws: &mut WsClient, text: &str) {
    ws.send(Message::text(text)).await.expect("send");
    loop {
        match tokio::time::timeout(PATIENCE, ws.next())
            .await
            .expect("echo in time")
        {
            Some(Ok(Message::Text(t))) => {
                assert_eq!(t.as_str(), text);
                return;
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP client

pub struct HttpClient {
    sender: hyper::client::conn::http1::SendRequest<AppBody>,
    _conn: Background,
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

impl HttpClient {
    /// A keep-alive connection to `addr`.
    pub async fn connect(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).await.expect("connect");
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        let task = tokio::spawn(async move {
            let _ = conn.await;
        });
        Self {
            sender,
            _conn: Background(task),
        }
    }

    pub async fn send(&mut self, req: Request<AppBody>) -> Response<Incoming> {
        self.sender.ready().await.expect("connection ready");
        tokio::time::timeout(PATIENCE, self.sender.send_request(req))
            .await
            .expect("response in time")
            .expect("response")
    }

    pub async fn request(&mut self, req: Request<AppBody>) -> Reply {
        let response = self.send(req).await;
        let status = response.status();
        let headers = response.headers().clone();
        let body = tokio::time::timeout(PATIENCE, response.into_body().collect())
            .await
            .expect("body in time")
            .expect("body")
            .to_bytes();
        Reply {
            status,
            headers,
            body,
        }
    }

    pub async fn get(&mut self, path: &str) -> Reply {
        self.request(get(path)).await
    }
}

pub fn get(path: &str) -> Request<AppBody> {
    Request::get(path)
        .header("host", "app.test")
        .body(full(Bytes::new()))
        .expect("request")
}

pub fn post(path: &str, body: impl Into<Bytes>) -> Request<AppBody> {
    Request::post(path)
        .header("host", "app.test")
        .body(full(body))
        .expect("request")
}

/// One request on a fresh connection.
pub async fn fetch(addr: SocketAddr, path: &str) -> Reply {
    HttpClient::connect(addr).await.get(path).await
}

// ---------------------------------------------------------------------------------------------
// Event stream reader

pub struct EventReader {
    body: Incoming,
    parser: SseParser,
    queue: std::collections::VecDeque<StateMessage>,
    _client: HttpClient,
}

impl EventReader {
    pub async fn open(addr: SocketAddr, token: Option<&str>) -> Self {
        let mut client = HttpClient::connect(addr).await;
        let mut req = get("/_spawner/events");
        if let Some(token) = token {
            req.headers_mut().insert(
                "x-spawner-token",
                hyper::header::HeaderValue::from_str(token).expect("token"),
            );
        }
        let response = client.send(req).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        Self {
            body: response.into_body(),
            parser: SseParser::new(),
            queue: Default::default(),
            _client: client,
        }
    }

    pub async fn next(&mut self) -> StateMessage {
        loop {
            if let Some(event) = self.queue.pop_front() {
                return event;
            }
            let frame = tokio::time::timeout(PATIENCE, self.body.frame())
                .await
                .expect("event in time")
                .expect("stream open")
                .expect("frame");
            if let Ok(data) = frame.into_data() {
                for message in self.parser.push(&data).expect("sse") {
                    if let Some(event) = StateMessage::from_message(&message).expect("json") {
                        self.queue.push_back(event);
                    }
                }
            }
        }
    }

    /// Reads until an event satisfies `f`.
    pub async fn until(&mut self, f: impl Fn(&StateMessage) -> bool) -> StateMessage {
        loop {
            let event = self.next().await;
            if f(&event) {
                return event;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A TCP relay that can go silent

/// Forwards one listening port to `target`; after [`Relay::go_silent`] it keeps every socket
/// open but drops all traffic both ways, like a client whose network vanished.
pub struct Relay {
    pub addr: SocketAddr,
    silent: Arc<AtomicBool>,
    _task: Background,
}

impl Relay {
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let addr = listener.local_addr().expect("addr");
        let silent = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&silent);
        let task = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let Ok(outbound) = TcpStream::connect(target).await else {
                    continue;
                };
                let flag = Arc::clone(&flag);
                tokio::spawn(async move {
                    let (ri, wi) = inbound.into_split();
                    let (ro, wo) = outbound.into_split();
                    let a = tokio::spawn(pipe(ri, wo, Arc::clone(&flag)));
                    let b = tokio::spawn(pipe(ro, wi, flag));
                    let _ = tokio::join!(a, b);
                });
            }
        });
        Self {
            addr,
            silent,
            _task: Background(task),
        }
    }

    pub fn go_silent(&self) {
        self.silent.store(true, Ordering::SeqCst);
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    silent: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => {
                if silent.load(Ordering::SeqCst) {
                    // A vanished peer sends no FIN either: hold the other side open.
                    std::future::pending::<()>().await;
                }
                let _ = to.shutdown().await;
                return;
            }
            Ok(n) => n,
        };
        if silent.load(Ordering::SeqCst) {
            continue;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// Raw bytes to the sidecar; returns what it answered before closing (or within `PATIENCE`).
pub async fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(bytes).await.expect("write");
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(PATIENCE, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => {
                out.extend_from_slice(&buf[..n]);
                // Responses of the sidecar itself are complete once the head and a short body are in.
                if out.windows(4).any(|w| w == b"\r\n\r\n") && out.len() > 12 {
                    let text = String::from_utf8_lossy(&out);
                    if let Some(len) = text.lines().find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length: ")
                            .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                    }) {
                        let head = text.find("\r\n\r\n").unwrap_or(0) + 4;
                        if out.len() >= head + len {
                            break;
                        }
                    }
                }
            }
            Err(_) => panic!("no answer within {PATIENCE:?}"),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
