//! Simulated users: they replay a trace's sessions against the api and the backends' sidecars,
//! over turmoil, as browsers would — get-or-create a backend by key, wait until it is Ready,
//! open WebSockets through the sidecar, send messages, refresh, leave or vanish. Like a real web
//! app, a user whose backend ended or refused the connection (a sidecar sealed for its sweep
//! answers 503) asks the api for the key's backend again, with a short backoff, a few times.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use spawner_core::trace::{TraceEvent, TraceEventKind};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use crate::net::SimConnector;

type HttpClient = Client<SimConnector, Full<bytes::Bytes>>;
type Socket = tokio_tungstenite::WebSocketStream<turmoil::net::TcpStream>;

/// How users reach Spawner.
#[derive(Clone, Debug)]
pub struct UsersConfig {
    /// Base URLs of the api replicas, e.g. `http://api-0:7070`. A session starts with one
    /// (by its id) and moves to the next after a failed request, as behind a load balancer.
    pub apis: Vec<String>,
    pub token: String,
    /// The spawn request sent for every key (without the key).
    pub spawn_template: serde_json::Value,
    /// How long a user waits for its backend to become Ready before giving up.
    pub ready_timeout: Duration,
    /// How often a waiting user polls the backend's status.
    pub poll_interval: Duration,
}

/// What users saw, shared with the sim loop.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct UsersReport {
    pub sessions: u64,
    pub spawned: u64,
    pub connected: u64,
    pub messages_echoed: u64,
    pub connect_failures: u64,
    pub ready_timeouts: u64,
    /// Connections tried again through a fresh get-or-create (the backend had ended, or its
    /// sidecar refused: sealed for a sweep).
    pub retries: u64,
    pub api_errors: u64,
    /// Sessions that, at least once, found the backend they had been given gone (ended, or
    /// sealed for its sweep) when they connected.
    pub sessions_found_backend_gone: u64,
    /// Backend name by key, as the api answered last.
    pub backends_by_key: BTreeMap<String, String>,
    /// Connections open now, by backend name.
    pub open_by_backend: BTreeMap<String, u64>,
}

/// Shared, updated by every user task.
#[derive(Clone, Debug, Default)]
pub struct SharedReport(Arc<Mutex<UsersReport>>);

impl SharedReport {
    pub fn update<R>(&self, f: impl FnOnce(&mut UsersReport) -> R) -> R {
        let mut report = self.0.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut report)
    }

    pub fn snapshot(&self) -> UsersReport {
        self.update(|r| r.clone())
    }
}

/// Plays `events` (one client host's share of a trace) from the moment it is called.
pub async fn play(events: Vec<TraceEvent>, config: UsersConfig, report: SharedReport) {
    let client: HttpClient = Client::builder(TokioExecutor::new()).build(SimConnector);
    let sessions = spawner_core::trace::by_session(events);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (id, events) in sessions {
        let mut config = config.clone();
        // Sessions of one room reach different replicas: get-or-create races cross replicas.
        let replicas = config.apis.len().max(1);
        config
            .apis
            .rotate_left(session_hash(&id) as usize % replicas);
        let report = report.clone();
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            session(events, start, &client, &config, &report).await
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
}

struct Backend {
    name: String,
}

fn session_hash(id: &str) -> u64 {
    id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// Times a user asks for the key's backend again after a failed connection, and the first
/// pause (doubled each time): 0.25 + 0.5 + 1 + 2 s, enough for a sweep in progress to finish
/// and the key to get a fresh backend.
const RECONNECT_ATTEMPTS: u32 = 4;
const RECONNECT_BACKOFF: Duration = Duration::from_millis(250);

/// Why a connection could not be opened.
#[derive(Debug, PartialEq, Eq)]
enum OpenError {
    /// The backend was not Ready within the user's patience: the user gives up.
    ReadyTimeout,
    /// The backend ended before the user connected (swept, failed, terminated).
    Ended,
    /// The sidecar refused the WebSocket (503 while sealed) or could not be reached.
    Refused,
}

async fn session(
    events: Vec<TraceEvent>,
    start: Instant,
    client: &HttpClient,
    config: &UsersConfig,
    report: &SharedReport,
) {
    report.update(|r| r.sessions += 1);
    let mut backend: Option<Backend> = None;
    // Each connection with the backend it was opened to.
    let mut sockets: HashMap<String, (Socket, String)> = HashMap::new();
    let mut found_gone = false;
    // The session asked the api for its backend (a `spawn`) at least once.
    let mut asked = false;
    for event in events {
        tokio::time::sleep_until(start + Duration::from_millis(event.t_ms)).await;
        match event.kind {
            TraceEventKind::Spawn => {
                asked = true;
                backend = get_or_create(client, config, report, &event.key).await;
            }
            TraceEventKind::Connect { conn } => {
                // A session that connects without having asked (a connection the router
                // recorded without a user) asks for its key's backend first, as its web app did.
                if !asked {
                    asked = true;
                    backend = get_or_create(client, config, report, &event.key).await;
                }
                let mut attempt = 0;
                let outcome = loop {
                    let result = match &backend {
                        Some(b) => open(b, config, client).await.map(|s| (s, b.name.clone())),
                        // The spawn failed (the api was unreachable): ask again.
                        None => Err(OpenError::Ended),
                    };
                    match result {
                        Err(OpenError::Ended | OpenError::Refused)
                            if attempt < RECONNECT_ATTEMPTS =>
                        {
                            // A backend the session had been given (not a failed spawn).
                            let gone = !found_gone && attempt == 0 && backend.is_some();
                            found_gone |= gone;
                            report.update(|r| {
                                r.retries += 1;
                                r.sessions_found_backend_gone += u64::from(gone);
                            });
                            tokio::time::sleep(RECONNECT_BACKOFF * 2u32.pow(attempt)).await;
                            attempt += 1;
                            // Get-or-create by key: the same backend while it lives, a fresh one
                            // once it is swept.
                            if let Some(b) = get_or_create(client, config, report, &event.key).await
                            {
                                backend = Some(b);
                            }
                        }
                        other => break other,
                    }
                };
                match outcome {
                    Ok((socket, name)) => {
                        report.update(|r| {
                            r.connected += 1;
                            *r.open_by_backend.entry(name.clone()).or_default() += 1;
                        });
                        sockets.insert(conn, (socket, name));
                    }
                    Err(error) => report.update(|r| {
                        r.connect_failures += 1;
                        if error == OpenError::ReadyTimeout {
                            r.ready_timeouts += 1;
                        }
                    }),
                }
            }
            TraceEventKind::Message { conn, bytes } => {
                let Some((socket, _)) = sockets.get_mut(&conn) else {
                    continue;
                };
                let text = "x".repeat(bytes.clamp(1, 4096) as usize);
                if socket.send(Message::Text(text.into())).await.is_err() {
                    continue;
                }
                // The sidecar's pings (sent while the user was idle longer than its ping
                // interval) may come before the echo; the socket itself answers them.
                let echo = async {
                    loop {
                        match socket.next().await {
                            Some(Ok(Message::Text(_))) => return true,
                            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                            _ => return false,
                        }
                    }
                };
                if let Ok(true) = tokio::time::timeout(Duration::from_secs(5), echo).await {
                    report.update(|r| r.messages_echoed += 1);
                }
            }
            TraceEventKind::Disconnect { conn, clean } => {
                let Some((mut socket, name)) = sockets.remove(&conn) else {
                    continue;
                };
                report.update(|r| {
                    if let Some(n) = r.open_by_backend.get_mut(&name) {
                        *n = n.saturating_sub(1);
                    }
                });
                if clean {
                    let _ = socket.close(None).await;
                } else {
                    // The user vanished: no close frame, no FIN, and no pong ever again. The
                    // socket is parked, unread, until the run ends; only the sidecar's pings
                    // can notice.
                    tokio::spawn(async move {
                        let _parked = socket;
                        std::future::pending::<()>().await;
                    });
                }
            }
        }
    }
}

/// One request to the api replica `attempt` picks: the session's own, or after failures the
/// next ones in turn.
async fn request(
    client: &HttpClient,
    config: &UsersConfig,
    attempt: usize,
    method: http::Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> Result<(http::StatusCode, serde_json::Value), String> {
    let base = config
        .apis
        .get(attempt % config.apis.len().max(1))
        .ok_or("no api replica")?;
    let uri: http::Uri = format!("{base}{path}")
        .parse()
        .map_err(|e| format!("bad uri: {e}"))?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let request = http::Request::builder()
        .method(method)
        .uri(uri)
        .header("authorization", format!("Bearer {}", config.token))
        .header("content-type", "application/json")
        .body(Full::new(bytes::Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    let response = tokio::time::timeout(Duration::from_secs(10), client.request(request))
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let status = response.status();
    let bytes = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    let json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    Ok((status, json))
}

async fn get_or_create(
    client: &HttpClient,
    config: &UsersConfig,
    report: &SharedReport,
    key: &str,
) -> Option<Backend> {
    let mut body = config.spawn_template.clone();
    body["key"] = serde_json::Value::String(key.to_string());
    for attempt in 0..5u32 {
        match request(
            client,
            config,
            attempt as usize,
            http::Method::POST,
            "/connect",
            Some(body.clone()),
        )
        .await
        {
            Ok((status, json)) if status.is_success() => {
                let name = json["name"].as_str()?.to_string();
                report.update(|r| {
                    if json["spawned"].as_bool() == Some(true) {
                        r.spawned += 1;
                    }
                    r.backends_by_key.insert(key.to_string(), name.clone());
                });
                return Some(Backend { name });
            }
            _ => {
                report.update(|r| r.api_errors += 1);
                tokio::time::sleep(Duration::from_millis(200 * 2u64.pow(attempt))).await;
            }
        }
    }
    None
}

/// Waits for the backend to be Ready (learning its URL), then opens a WebSocket through its
/// sidecar.
async fn open(
    backend: &Backend,
    config: &UsersConfig,
    client: &HttpClient,
) -> Result<Socket, OpenError> {
    let deadline = Instant::now() + config.ready_timeout;
    let mut failed_reads = 0;
    let url = loop {
        let read = request(
            client,
            config,
            failed_reads,
            http::Method::GET,
            &format!("/backend/{}/status", backend.name),
            None,
        )
        .await;
        match read {
            Ok((status, json)) if status.is_success() => match json["phase"].as_str() {
                Some("Ready") => {
                    if let Some(url) = json["url"].as_str() {
                        break url.to_string();
                    }
                }
                Some("Swept" | "Failed" | "Terminated") => return Err(OpenError::Ended),
                _ => {}
            },
            // Gone already (deleted after its retention).
            Ok((http::StatusCode::NOT_FOUND, _)) => return Err(OpenError::Ended),
            _ => failed_reads += 1,
        }
        if Instant::now() > deadline {
            return Err(OpenError::ReadyTimeout);
        }
        tokio::time::sleep(config.poll_interval).await;
    };
    let uri: http::Uri = url.parse().map_err(|_| OpenError::Refused)?;
    let host = uri.host().ok_or(OpenError::Refused)?.to_string();
    let port = uri.port_u16().unwrap_or(80);
    let stream = turmoil::net::TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|_| OpenError::Refused)?;
    let ws_url = format!("ws://{host}:{port}/ws");
    let (socket, _) = tokio_tungstenite::client_async(ws_url, stream)
        .await
        .map_err(|_| OpenError::Refused)?;
    Ok(socket)
}
