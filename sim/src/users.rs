//! Simulated users: they replay a trace's sessions against the api and the routers, over
//! turmoil, as browsers would — get-or-create a backend by key (`POST /connect`, answering a
//! `url` with a connect token), open WebSockets to that `url` through a router replica (which
//! waits for the backend to be Ready), send messages, refresh, leave or vanish. Like a real web
//! app, a user whose backend ended, whose token was refused, or whose connection was refused (a
//! sidecar sealed for its sweep answers 503) asks the api for the key's backend again, with a
//! short backoff, a few times.
//!
//! Every backend's app names itself in its answers ([`crate::app::BACKEND_HEADER`]): on every
//! connection the user checks that it reached the backend its token names, and one session in
//! [`FOREIGN_TOKEN_EVERY`] also tries its token on another room's backend, which must refuse
//! it. What breaks either is reported in [`UsersReport::misrouted`].

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
    /// How long a user waits for a router's answer to a WebSocket handshake (the router
    /// itself waits up to its bound, 30 s, for a starting backend).
    pub ready_timeout: Duration,
    /// `host:port` of every router replica. A session starts with one (by its id) and moves
    /// to the next when it cannot reach it, as behind a load balancer.
    pub routers: Vec<String>,
    /// One session in this many ends by terminating its backend (`DELETE /backend/{id}`, an
    /// "end session" button) when it leaves, unless it vanished; 0: none does.
    pub terminate_every: u64,
    /// The backends of one key in this many run an app that crashes `crash_after` after it
    /// started; 0: none.
    pub crash_every: u64,
    pub crash_after: Duration,
}

/// One session in this many tries its connect token on another room's backend.
pub const FOREIGN_TOKEN_EVERY: u64 = 8;

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
    /// Connections that reached a backend other than the one their token names, or a token
    /// that opened another backend: each must never happen.
    pub misrouted: Vec<String>,
    /// Tries of a token on another backend (each refused, or it is in `misrouted`).
    pub foreign_token_tries: u64,
    /// Backends users terminated (the api accepted the DELETE), not yet taken by the world's
    /// check that they end.
    pub terminate_requests: Vec<String>,
    /// Backends users terminated, in all.
    pub terminated_by_users: u64,
    /// Open connections that ended from the backend's side (its app crashed, it ended, or its
    /// sidecar took the user for dead); each was opened again.
    pub connections_lost: u64,
    /// The backends of connections lost since the world's check last took them, each with
    /// the simulated time (since the world's start) its connection was opened.
    pub lost_connections: Vec<(String, Duration)>,
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
        let routers = config.routers.len().max(1);
        config
            .routers
            .rotate_left(session_hash(&id) as usize % routers);
        let role = Role {
            tries_foreign_token: session_hash(&id).is_multiple_of(FOREIGN_TOKEN_EVERY),
            terminates: config.terminate_every > 0
                && (session_hash(&id) >> 16).is_multiple_of(config.terminate_every),
        };
        let report = report.clone();
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            session(events, start, &client, &config, &report, role).await
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
}

/// What a session does besides replaying its trace.
#[derive(Clone, Copy)]
struct Role {
    /// Tries its token on another room's backend once (it must be refused).
    tries_foreign_token: bool,
    /// Terminates its backend when it leaves (unless it vanished).
    terminates: bool,
}

struct Backend {
    name: String,
    /// The `url` the api answered: the routers' address of the backend, with a connect token.
    url: Option<String>,
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
    /// The backend was not Ready within the router's bound (503 `not_ready`): the user gives
    /// up.
    ReadyTimeout,
    /// The backend ended before the user connected (410), is unknown (404), or the token was
    /// refused (401, e.g. expired): a fresh `/connect` answers a live backend and a new token.
    Ended,
    /// The sidecar refused the WebSocket (503 while sealed), or neither a router nor the
    /// backend could be reached.
    Refused,
}

async fn session(
    events: Vec<TraceEvent>,
    start: Instant,
    client: &HttpClient,
    config: &UsersConfig,
    report: &SharedReport,
    role: Role,
) {
    report.update(|r| r.sessions += 1);
    let mut session = Session {
        client,
        config,
        report,
        tries_foreign_token: role.tries_foreign_token,
        vanished: false,
        backend: None,
        sockets: HashMap::new(),
        found_gone: false,
        asked: false,
    };
    for event in events {
        session
            .idle_until(start + Duration::from_millis(event.t_ms), &event.key)
            .await;
        match event.kind {
            TraceEventKind::Spawn => {
                session.asked = true;
                session.backend = get_or_create(client, config, report, &event.key).await;
            }
            TraceEventKind::Connect { conn } => session.connect(conn, &event.key).await,
            TraceEventKind::Message { conn, bytes } => {
                session.message(conn, &event.key, bytes).await;
            }
            TraceEventKind::Disconnect { conn, clean } => session.disconnect(&conn, clean).await,
        }
    }
    if role.terminates
        && !session.vanished
        && let Some(b) = &session.backend
    {
        terminate(client, config, report, &b.name).await;
    }
}

/// One user session's state.
struct Session<'a> {
    client: &'a HttpClient,
    config: &'a UsersConfig,
    report: &'a SharedReport,
    tries_foreign_token: bool,
    /// The user vanished at least once (it does not end its session then).
    vanished: bool,
    backend: Option<Backend>,
    /// Each connection with the backend it was opened to.
    /// Open connections: the socket, its backend, and when it was opened (simulated time
    /// since the world's start).
    sockets: HashMap<String, (Socket, String, Duration)>,
    found_gone: bool,
    /// The session asked the api for its backend (a `spawn`) at least once.
    asked: bool,
}

impl Session<'_> {
    /// Opens connection `conn` to the backend of `key`, asking the api again (a few times, with
    /// backoff) when the backend ended or refused.
    async fn connect(&mut self, conn: String, key: &str) {
        let (client, config, report) = (self.client, self.config, self.report);
        // A session that connects without having asked (a connection the router recorded
        // without a user) asks for its key's backend first, as its web app did.
        if !self.asked {
            self.asked = true;
            self.backend = get_or_create(client, config, report, key).await;
        }
        let mut attempt = 0;
        let outcome = loop {
            let result = match &self.backend {
                Some(b) => open(b, config, report).await.map(|s| (s, b.name.clone())),
                // The spawn failed (the api was unreachable): ask again.
                None => Err(OpenError::Ended),
            };
            match result {
                Err(OpenError::Ended | OpenError::Refused) if attempt < RECONNECT_ATTEMPTS => {
                    // A backend the session had been given (not a failed spawn).
                    let gone = !self.found_gone && attempt == 0 && self.backend.is_some();
                    self.found_gone |= gone;
                    report.update(|r| {
                        r.retries += 1;
                        r.sessions_found_backend_gone += u64::from(gone);
                    });
                    tokio::time::sleep(RECONNECT_BACKOFF * 2u32.pow(attempt)).await;
                    attempt += 1;
                    // Get-or-create by key: the same backend while it lives, a fresh one once
                    // it ended.
                    if let Some(b) = get_or_create(client, config, report, key).await {
                        self.backend = Some(b);
                    }
                }
                other => break other,
            }
        };
        if self.tries_foreign_token
            && outcome.is_ok()
            && let Some(b) = &self.backend
        {
            self.tries_foreign_token = false;
            try_foreign_token(b, key, config, report).await;
        }
        match outcome {
            Ok((socket, name)) => {
                report.update(|r| {
                    r.connected += 1;
                    *r.open_by_backend.entry(name.clone()).or_default() += 1;
                });
                self.sockets
                    .insert(conn, (socket, name, crate::clock::sim_elapsed()));
            }
            Err(error) => report.update(|r| {
                r.connect_failures += 1;
                if error == OpenError::ReadyTimeout {
                    r.ready_timeouts += 1;
                }
            }),
        }
    }

    /// Sends a message on `conn` and waits for its echo. A connection the backend's side
    /// ended (its app crashed, its backend ended) is reported lost and opened again, as a web
    /// app reconnects.
    async fn message(&mut self, conn: String, key: &str, bytes: u64) {
        let Some((socket, _, _)) = self.sockets.get_mut(&conn) else {
            return;
        };
        let text = "x".repeat(bytes.clamp(1, 4096) as usize);
        let echoed = if socket.send(Message::Text(text.into())).await.is_err() {
            Some(false)
        } else {
            // The sidecar's pings (sent while the user was idle longer than its ping interval)
            // may come before the echo; the socket itself answers them.
            let echo = async {
                loop {
                    match socket.next().await {
                        Some(Ok(Message::Text(_))) => return true,
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                        _ => return false,
                    }
                }
            };
            tokio::time::timeout(Duration::from_secs(5), echo)
                .await
                .ok()
        };
        match echoed {
            Some(true) => self.report.update(|r| r.messages_echoed += 1),
            Some(false) => self.lost(conn, key).await,
            // No answer yet (a slow or partitioned path): the connection may still be alive.
            None => {}
        }
    }

    /// Connection `conn` ended from the backend's side: it is reported lost and opened again,
    /// as a web app reconnects.
    async fn lost(&mut self, conn: String, key: &str) {
        if let Some((_, name, opened)) = self.sockets.remove(&conn) {
            self.report.update(|r| {
                r.connections_lost += 1;
                r.lost_connections.push((name.clone(), opened));
                if let Some(n) = r.open_by_backend.get_mut(&name) {
                    *n = n.saturating_sub(1);
                }
            });
        }
        self.connect(conn, key).await;
    }

    /// Waits until `deadline`, reading every open socket meanwhile as a browser does: the
    /// sidecar's pings are answered (the socket queues the pong and sends it as it reads), and
    /// a connection the backend's side ends is noticed at once.
    async fn idle_until(&mut self, deadline: Instant, key: &str) {
        loop {
            if self.sockets.is_empty() {
                tokio::time::sleep_until(deadline).await;
                return;
            }
            let ended = {
                let reads = self.sockets.iter_mut().map(|(conn, (socket, _, _))| {
                    Box::pin(async move { (conn.clone(), socket.next().await) })
                });
                tokio::select! {
                    () = tokio::time::sleep_until(deadline) => return,
                    ((conn, read), _, _) = futures::future::select_all(reads) => match read {
                        Some(Ok(message)) if !message.is_close() => None,
                        // Closed, reset or ended.
                        _ => Some(conn),
                    },
                }
            };
            if let Some(conn) = ended {
                self.lost(conn, key).await;
            }
        }
    }

    async fn disconnect(&mut self, conn: &str, clean: bool) {
        let Some((mut socket, name, _)) = self.sockets.remove(conn) else {
            return;
        };
        self.report.update(|r| {
            if let Some(n) = r.open_by_backend.get_mut(&name) {
                *n = n.saturating_sub(1);
            }
        });
        if clean {
            let _ = socket.close(None).await;
        } else {
            self.vanished = true;
            // The user vanished: no close frame, no FIN, and no pong ever again. The socket is
            // parked, unread, until the run ends; only the sidecar's pings can notice.
            tokio::spawn(async move {
                let _parked = socket;
                std::future::pending::<()>().await;
            });
        }
    }
}

/// `DELETE /backend/{name}` (through the session's api replica, then the next ones); an
/// accepted request is reported for the world's check that the backend ends.
async fn terminate(client: &HttpClient, config: &UsersConfig, report: &SharedReport, name: &str) {
    for attempt in 0..config.apis.len().max(1) {
        let path = format!("/backend/{name}");
        match request(client, config, attempt, http::Method::DELETE, &path, None).await {
            Ok((status, _)) if status.is_success() => {
                report.update(|r| {
                    r.terminated_by_users += 1;
                    r.terminate_requests.push(name.to_string());
                });
                return;
            }
            // Gone already: nothing to end.
            Ok((http::StatusCode::NOT_FOUND, _)) => return,
            _ => report.update(|r| r.api_errors += 1),
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
    if config.crash_every > 0 && session_hash(key).is_multiple_of(config.crash_every) {
        body["command"] = serde_json::json!([
            crate::pods::APP_COMMAND,
            format!(
                "{}{}",
                crate::pods::APP_EXIT_AFTER,
                config.crash_after.as_millis()
            ),
        ]);
    }
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
                let url = json["url"].as_str().map(str::to_string);
                report.update(|r| {
                    if json["spawned"].as_bool() == Some(true) {
                        r.spawned += 1;
                    }
                    r.backends_by_key.insert(key.to_string(), name.clone());
                });
                return Some(Backend { name, url });
            }
            _ => {
                report.update(|r| r.api_errors += 1);
                tokio::time::sleep(Duration::from_millis(200 * 2u64.pow(attempt))).await;
            }
        }
    }
    None
}

/// A backend's `url` as the api answered it: `http://<authority>/<path>?<query>`, the query
/// carrying the connect token.
struct RouterUrl {
    authority: String,
    query: String,
}

impl RouterUrl {
    fn parse(url: &str) -> Option<Self> {
        let rest = url.strip_prefix("http://")?;
        let (authority, path_and_query) = rest.split_once('/').unwrap_or((rest, ""));
        let query = path_and_query
            .split_once('?')
            .map_or("", |(_, q)| q)
            .to_string();
        Some(Self {
            authority: authority.to_string(),
            query,
        })
    }

    /// The backend the connect token names (its third dot-separated field).
    fn token_backend(&self) -> Option<&str> {
        let token = self.query.split('&').find_map(|pair| {
            pair.strip_prefix(spawner_core::connect_token::QUERY_PARAM)?
                .strip_prefix('=')
        })?;
        token.split('.').nth(2)
    }

    /// The WebSocket URL of the app's `/ws`, on the host of backend `name` (the one the URL
    /// names, or another).
    fn ws_url(&self, own: &str, name: &str) -> String {
        let authority = match self.authority.strip_prefix(own) {
            Some(domain) => format!("{name}{domain}"),
            None => self.authority.clone(),
        };
        format!("ws://{authority}/ws?{}", self.query)
    }
}

/// What a router replica answered to a WebSocket handshake.
enum Handshake {
    /// Upgraded, by the backend named in the app's answer (if it named one).
    Open(Box<Socket>, Option<String>),
    Refused(OpenError),
}

/// Opens a WebSocket to the backend through a router replica (the router waits for it to be
/// Ready), and checks that the backend its token names answered.
async fn open(
    backend: &Backend,
    config: &UsersConfig,
    report: &SharedReport,
) -> Result<Socket, OpenError> {
    let url = backend
        .url
        .as_deref()
        .and_then(RouterUrl::parse)
        .ok_or(OpenError::Refused)?;
    let named = url.token_backend().unwrap_or(&backend.name).to_string();
    match handshake(config, &url.ws_url(&backend.name, &backend.name)).await {
        Handshake::Open(socket, answered) => {
            if answered.as_deref() != Some(named.as_str()) {
                report.update(|r| {
                    r.misrouted.push(format!(
                        "a user with a token for {named} reached {}",
                        answered
                            .as_deref()
                            .unwrap_or("an app that did not name itself")
                    ))
                });
            }
            Ok(*socket)
        }
        Handshake::Refused(error) => Err(error),
    }
}

/// Tries the token for `backend` on the backend of another key the users know: the router must
/// refuse it (401, or 404/410 for a backend it does not know or that ended).
async fn try_foreign_token(
    backend: &Backend,
    key: &str,
    config: &UsersConfig,
    report: &SharedReport,
) {
    let other = report.update(|r| {
        r.backends_by_key
            .iter()
            .find(|(k, name)| k.as_str() != key && **name != backend.name)
            .map(|(_, name)| name.clone())
    });
    let (Some(other), Some(url)) = (other, backend.url.as_deref().and_then(RouterUrl::parse))
    else {
        return;
    };
    report.update(|r| r.foreign_token_tries += 1);
    if let Handshake::Open(mut socket, answered) =
        handshake(config, &url.ws_url(&backend.name, &other)).await
    {
        report.update(|r| {
            r.misrouted.push(format!(
                "a token for {} opened {other} (answered by {})",
                backend.name,
                answered
                    .as_deref()
                    .unwrap_or("an app that did not name itself")
            ))
        });
        let _ = (*socket).close(None).await;
    }
}

/// A WebSocket handshake for `ws_url` through the session's router replica, or the next ones
/// when it cannot be reached.
async fn handshake(config: &UsersConfig, ws_url: &str) -> Handshake {
    use tokio_tungstenite::tungstenite::Error;
    for router in &config.routers {
        let dial = tokio::time::timeout(
            Duration::from_secs(5),
            turmoil::net::TcpStream::connect(router.as_str()),
        );
        let Ok(Ok(stream)) = dial.await else {
            continue;
        };
        let answer = tokio::time::timeout(
            config.ready_timeout + Duration::from_secs(10),
            tokio_tungstenite::client_async(ws_url, stream),
        );
        return match answer.await {
            Ok(Ok((socket, response))) => {
                let answered = response
                    .headers()
                    .get(crate::app::BACKEND_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                Handshake::Open(Box::new(socket), answered)
            }
            Ok(Err(Error::Http(response))) => Handshake::Refused(match response.status() {
                http::StatusCode::UNAUTHORIZED
                | http::StatusCode::NOT_FOUND
                | http::StatusCode::GONE => OpenError::Ended,
                http::StatusCode::SERVICE_UNAVAILABLE
                    if response
                        .body()
                        .as_deref()
                        .is_some_and(|b| b.windows(9).any(|w| w == b"not_ready")) =>
                {
                    OpenError::ReadyTimeout
                }
                _ => OpenError::Refused,
            }),
            // The router went away mid-handshake: the next one.
            Ok(Err(_)) => continue,
            Err(_) => Handshake::Refused(OpenError::Refused),
        };
    }
    Handshake::Refused(OpenError::Refused)
}
