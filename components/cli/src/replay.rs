//! `spawner replay TRACE`: plays a session trace against a running deployment over real HTTP
//! and WebSockets, as the simulator's users do in a simulated world: each session asks the api
//! for its key's backend (`POST /connect`), waits until it is Ready, opens WebSockets through
//! the URL the api returns, sends messages of the recorded sizes, and closes (or abandons) them.
//! A session whose backend has ended asks again, like a web app would. At the end it prints the
//! replay report (`spawner_core::trace::ReplayReport`).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use spawner_core::trace::{ReplayReport, Trace, TraceEvent, TraceEventKind};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

#[derive(Debug, Clone, clap::Args)]
pub struct ReplayArgs {
    /// The session trace to play (JSON Lines, docs/trace-format.md).
    pub trace: PathBuf,
    #[command(flatten)]
    pub target: crate::client::ApiTarget,
    /// Time compression: 10 plays a 10-minute trace in one minute.
    #[arg(long, default_value_t = 1.0)]
    pub speed: f64,
    /// Sessions played at once; a session waits for a free slot (and runs late).
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,
    /// Stop playing the trace after this many seconds (of replay time); what started ends.
    #[arg(long)]
    pub duration: Option<f64>,
    /// Grace period of the backends spawned, in seconds.
    #[arg(long, default_value_t = 10)]
    pub grace: u32,
    /// The spawn request sent for every key, as JSON (the key and grace are set by replay).
    /// Default: the demo backend of this `spawner` binary (a `spawner dev` deployment).
    #[arg(long)]
    pub spawn_body: Option<String>,
    /// After the trace, wait up to this many seconds for the backends to end (swept).
    #[arg(long, default_value_t = 120)]
    pub settle_seconds: u64,
    /// How long a session waits for its backend to be Ready before it counts a failure.
    #[arg(long, default_value_t = 60)]
    pub ready_timeout_seconds: u64,
}

/// Header that names the session on the api (recorded in its traces).
const SESSION_HEADER: &str = "x-spawner-session";
/// Retries of a connection whose backend ended or refused, and the first pause (doubled each
/// time), as the simulator's users do.
const RECONNECT_ATTEMPTS: u32 = 4;
const RECONNECT_BACKOFF: Duration = Duration::from_millis(250);
/// How often the replay lists the backends (peak, Ready times, idle time).
const MONITOR_INTERVAL: Duration = Duration::from_millis(200);

type Http = Client<HttpConnector, Full<Bytes>>;
type Sink =
    futures::stream::SplitSink<tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>, Message>;

/// What the sessions and the monitor saw.
#[derive(Default)]
struct Seen {
    sessions: u64,
    events_played: u64,
    connect_failures: u64,
    found_gone: u64,
    /// Backends this replay created (the api answered `spawned`), with when.
    created: BTreeMap<String, Instant>,
    /// Earlier backends under a name that was used again (a key's generation restarts once its
    /// old backends are deleted): how many, how many were swept, their Ready latencies.
    retired: u64,
    retired_swept: u64,
    retired_ready_ms: Vec<u64>,
    ready: BTreeMap<String, Instant>,
    /// Connections open now, by backend.
    open: BTreeMap<String, u64>,
    /// Last phase seen, by backend.
    phases: BTreeMap<String, String>,
    live_now: u64,
    peak_live: u64,
    idle: Duration,
}

type Shared = Arc<Mutex<Seen>>;

fn update<R>(seen: &Shared, f: impl FnOnce(&mut Seen) -> R) -> R {
    let mut guard = seen.lock().unwrap_or_else(|e| e.into_inner());
    f(&mut guard)
}

struct Target {
    base: String,
    token: Option<String>,
    http: Http,
    template: Value,
    ready_timeout: Duration,
}

impl Target {
    async fn call(
        &self,
        method: http::Method,
        path: &str,
        body: Option<&Value>,
        session: Option<&str>,
    ) -> anyhow::Result<(http::StatusCode, Value)> {
        let mut builder = http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        if let Some(token) = &self.token {
            builder = builder.header("authorization", format!("Bearer {token}"));
        }
        if let Some(session) = session {
            builder = builder.header(SESSION_HEADER, session);
        }
        let body = match body {
            Some(b) => {
                builder = builder.header("content-type", "application/json");
                Bytes::from(b.to_string())
            }
            None => Bytes::new(),
        };
        let request = builder.body(Full::new(body))?;
        let response = tokio::time::timeout(Duration::from_secs(30), self.http.request(request))
            .await
            .context("the api did not answer within 30 s")??;
        let status = response.status();
        let bytes = response.into_body().collect().await?.to_bytes();
        Ok((
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        ))
    }
}

/// The backend a session was given: its name and the URL the api answered (with its connect
/// token, if any), if it had one yet.
#[derive(Clone)]
struct Backend {
    name: String,
    url: Option<String>,
}

enum OpenError {
    ReadyTimeout,
    Ended,
    Refused,
}

/// Plays the trace and returns the report.
pub async fn replay(args: &ReplayArgs, progress: bool) -> anyhow::Result<ReplayReport> {
    let file = std::fs::File::open(&args.trace)
        .with_context(|| format!("opening {}", args.trace.display()))?;
    let trace = Trace::read(std::io::BufReader::new(file))
        .with_context(|| format!("reading {}", args.trace.display()))?;
    if !(args.speed > 0.0 && args.speed.is_finite()) {
        bail!("--speed must be a positive number");
    }
    let base = args.target.api.trim_end_matches('/').to_string();
    if !base.starts_with("http://") {
        bail!("the api URL must start with http:// (got {base:?})");
    }
    let mut template = match &args.spawn_body {
        Some(body) => serde_json::from_str(body).context("--spawn-body is not JSON")?,
        None => {
            let exe = std::env::current_exe().context("finding the spawner binary")?;
            json!({"command": [exe.display().to_string(), "demo-backend"]})
        }
    };
    template["gracePeriodSeconds"] = args.grace.into();
    let target = Arc::new(Target {
        base,
        token: args.target.token.clone(),
        http: Client::builder(TokioExecutor::new()).build_http(),
        template,
        ready_timeout: Duration::from_secs(args.ready_timeout_seconds),
    });
    let total_events = trace.events.len() as u64;
    let sessions = spawner_core::trace::by_session(trace.events);
    let seen: Shared = Arc::default();
    let start = Instant::now();
    let speed = args.speed;
    let stop_at = args
        .duration
        .map(|d| start + Duration::from_secs_f64(d.max(0.0)));
    let slots = Arc::new(tokio::sync::Semaphore::new(args.concurrency.max(1)));
    let parked: Arc<Mutex<Vec<Sink>>> = Arc::default();
    let mut tasks = tokio::task::JoinSet::new();
    for (session, events) in sessions {
        let (target, seen, slots, parked) =
            (target.clone(), seen.clone(), slots.clone(), parked.clone());
        tasks.spawn(async move {
            let first = events.first().map_or(0, |e| e.t_ms);
            tokio::time::sleep_until(at(start, first, speed)).await;
            let Ok(_slot) = slots.acquire_owned().await else {
                return;
            };
            update(&seen, |s| s.sessions += 1);
            play_session(
                &session, events, start, speed, stop_at, &target, &seen, &parked,
            )
            .await;
        });
    }
    let monitor = {
        let (target, seen) = (target.clone(), seen.clone());
        tokio::spawn(async move { monitor(&target, &seen).await })
    };
    let mut ticker = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            next = tasks.join_next() => if next.is_none() { break },
            _ = ticker.tick(), if progress => {
                let (played, live, peak) = update(&seen, |s| (s.events_played, s.live_now, s.peak_live));
                eprint!(
                    "\r  {:>7.1} s  events {played}/{total_events}  backends live {live} (peak {peak})   ",
                    start.elapsed().as_secs_f64()
                );
            }
        }
    }
    // Abandoned connections end with the replay.
    parked.lock().unwrap_or_else(|e| e.into_inner()).clear();
    let settle_until = Instant::now() + Duration::from_secs(args.settle_seconds);
    loop {
        let pending = update(&seen, |s| {
            s.created
                .keys()
                .filter(|name| !is_ended(s.phases.get(*name).map(String::as_str)))
                .count()
        });
        if pending == 0 || Instant::now() >= settle_until {
            break;
        }
        if progress {
            eprint!(
                "\r  {:>7.1} s  trace played; waiting for {pending} backends to end   ",
                start.elapsed().as_secs_f64()
            );
        }
        tokio::time::sleep(MONITOR_INTERVAL).await;
    }
    // One more look, so the last phases are counted.
    tokio::time::sleep(MONITOR_INTERVAL * 2).await;
    monitor.abort();
    if progress {
        eprintln!();
    }
    Ok(update(&seen, |s| ReplayReport {
        clock: "wall time".into(),
        sessions: s.sessions,
        backends_created: s.created.len() as u64 + s.retired,
        backends_swept: s
            .created
            .keys()
            .filter(|n| s.phases.get(*n).map(String::as_str) == Some("Swept"))
            .count() as u64
            + s.retired_swept,
        connect_failures: s.connect_failures,
        spawn_to_ready_ms: s
            .retired_ready_ms
            .iter()
            .copied()
            .chain(s.created.iter().filter_map(|(n, c)| {
                s.ready
                    .get(n)
                    .map(|r| r.duration_since(*c).as_millis() as u64)
            }))
            .collect(),
        peak_live_backends: s.peak_live,
        backend_idle_seconds: s.idle.as_secs_f64(),
        sessions_found_backend_gone: s.found_gone,
    }))
}

fn at(start: Instant, t_ms: u64, speed: f64) -> Instant {
    start + Duration::from_secs_f64(t_ms as f64 / 1000.0 / speed)
}

fn is_ended(phase: Option<&str>) -> bool {
    matches!(phase, Some("Swept" | "Failed" | "Terminated" | "deleted"))
}

/// Lists the backends every interval: live count and its peak, Ready times, idle time.
async fn monitor(target: &Target, seen: &Shared) {
    let mut last = Instant::now();
    loop {
        tokio::time::sleep(MONITOR_INTERVAL).await;
        let Ok((status, list)) = target
            .call(http::Method::GET, "/backends", None, None)
            .await
        else {
            continue;
        };
        if !status.is_success() {
            continue;
        }
        let now = Instant::now();
        let elapsed = now - last;
        last = now;
        let mut phases = BTreeMap::new();
        for item in list["items"].as_array().into_iter().flatten() {
            if let (Some(name), Some(phase)) = (item["name"].as_str(), item["phase"].as_str()) {
                phases.insert(name.to_string(), phase.to_string());
            }
        }
        update(seen, |s| {
            let ours: BTreeSet<String> = s.created.keys().cloned().collect();
            for name in &ours {
                match phases.get(name) {
                    Some(phase) => {
                        if phase == "Ready" {
                            s.ready.entry(name.clone()).or_insert(now);
                            if s.open.get(name).copied().unwrap_or(0) == 0 {
                                s.idle += elapsed;
                            }
                        }
                        s.phases.insert(name.clone(), phase.clone());
                    }
                    // Listed before, gone now: deleted after its retention.
                    None if s.phases.contains_key(name) => {
                        let ended = is_ended(s.phases.get(name).map(String::as_str));
                        if !ended {
                            s.phases.insert(name.clone(), "deleted".into());
                        }
                    }
                    None => {}
                }
            }
            s.live_now = ours
                .iter()
                .filter(|n| {
                    s.phases.contains_key(*n) && !is_ended(s.phases.get(*n).map(String::as_str))
                })
                .count() as u64;
            s.peak_live = s.peak_live.max(s.live_now);
        });
    }
}

#[allow(clippy::too_many_arguments)]
async fn play_session(
    session: &str,
    events: Vec<TraceEvent>,
    start: Instant,
    speed: f64,
    stop_at: Option<Instant>,
    target: &Target,
    seen: &Shared,
    parked: &Mutex<Vec<Sink>>,
) {
    let mut backend: Option<Backend> = None;
    let mut sockets: BTreeMap<String, (Sink, String)> = BTreeMap::new();
    let mut found_gone = false;
    // The session asked the api for its backend (a `spawn`) at least once.
    let mut asked = false;
    for event in events {
        let when = at(start, event.t_ms, speed);
        if stop_at.is_some_and(|stop| when > stop) {
            break;
        }
        tokio::time::sleep_until(when).await;
        update(seen, |s| s.events_played += 1);
        match event.kind {
            TraceEventKind::Spawn => {
                asked = true;
                backend = get_or_create(target, seen, session, &event.key).await;
            }
            TraceEventKind::Connect { conn } => {
                // A session that connects without having asked (a connection the router
                // recorded without a user) asks for its key's backend first, as its web app did.
                if !asked {
                    asked = true;
                    backend = get_or_create(target, seen, session, &event.key).await;
                }
                let mut attempt = 0;
                let outcome = loop {
                    let result = match &backend {
                        Some(b) => open(target, seen, b).await.map(|s| (s, b.name.clone())),
                        None => Err(OpenError::Ended),
                    };
                    match result {
                        Err(OpenError::Ended | OpenError::Refused)
                            if attempt < RECONNECT_ATTEMPTS =>
                        {
                            let gone = !found_gone && attempt == 0 && backend.is_some();
                            found_gone |= gone;
                            update(seen, |s| s.found_gone += u64::from(gone));
                            tokio::time::sleep(RECONNECT_BACKOFF * 2u32.pow(attempt)).await;
                            attempt += 1;
                            if let Some(b) = get_or_create(target, seen, session, &event.key).await
                            {
                                backend = Some(b);
                            }
                        }
                        other => break other,
                    }
                };
                match outcome {
                    Ok((socket, name)) => {
                        update(seen, |s| *s.open.entry(name.clone()).or_default() += 1);
                        sockets.insert(conn, (socket, name));
                    }
                    Err(_) => update(seen, |s| s.connect_failures += 1),
                }
            }
            TraceEventKind::Message { conn, bytes } => {
                if let Some((socket, _)) = sockets.get_mut(&conn) {
                    let _ = socket.send(Message::Text(click(bytes).into())).await;
                }
            }
            TraceEventKind::Disconnect { conn, clean } => {
                if let Some((mut socket, name)) = sockets.remove(&conn) {
                    update(seen, |s| {
                        if let Some(n) = s.open.get_mut(&name) {
                            *n = n.saturating_sub(1);
                        }
                    });
                    if clean {
                        let _ = socket.close().await;
                    } else {
                        // Vanished: no close frame; the socket stays open, silent, until the
                        // replay ends.
                        parked
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push(socket);
                    }
                }
            }
        }
    }
    // The trace was cut short (--duration): close what is still open.
    for (_, (mut socket, name)) in sockets {
        let _ = socket.close().await;
        update(seen, |s| {
            if let Some(n) = s.open.get_mut(&name) {
                *n = n.saturating_sub(1);
            }
        });
    }
}

async fn get_or_create(
    target: &Target,
    seen: &Shared,
    session: &str,
    key: &str,
) -> Option<Backend> {
    let mut body = target.template.clone();
    body["key"] = Value::String(key.to_string());
    // The session as the token's user too: the router records a connection under its token's
    // user, so a recording of this replay has each session's spawns and connections together.
    if spawner_core::connect_token::is_valid_user(session) {
        body["user"] = Value::String(session.to_string());
    }
    for attempt in 0..3u32 {
        match target
            .call(http::Method::POST, "/connect", Some(&body), Some(session))
            .await
        {
            Ok((status, answer)) if status.is_success() => {
                let name = answer["name"].as_str()?.to_string();
                if answer["spawned"].as_bool() == Some(true) {
                    update(seen, |s| {
                        if let Some(created) = s.created.insert(name.clone(), Instant::now()) {
                            s.retired += 1;
                            let phase = s.phases.remove(&name);
                            s.retired_swept += u64::from(phase.as_deref() == Some("Swept"));
                            if let Some(ready) = s.ready.remove(&name) {
                                s.retired_ready_ms
                                    .push(ready.duration_since(created).as_millis() as u64);
                            }
                        }
                    });
                }
                let url = answer["url"].as_str().map(str::to_string);
                return Some(Backend { name, url });
            }
            Ok((status, answer)) => {
                tracing::debug!(%status, %answer, "connect refused");
            }
            Err(e) => tracing::debug!(error = %e, "connect failed"),
        }
        tokio::time::sleep(Duration::from_millis(200 * 2u64.pow(attempt))).await;
    }
    None
}

/// Waits until the backend is Ready, then opens a WebSocket at `/ws` under its URL.
async fn open(target: &Target, seen: &Shared, backend: &Backend) -> Result<Sink, OpenError> {
    let deadline = Instant::now() + target.ready_timeout;
    let status_url = loop {
        let path = format!("/backend/{}/status", backend.name);
        match target.call(http::Method::GET, &path, None, None).await {
            Ok((status, answer)) if status.is_success() => match answer["phase"].as_str() {
                Some("Ready") => {
                    update(seen, |s| {
                        s.ready
                            .entry(backend.name.clone())
                            .or_insert_with(Instant::now);
                    });
                    break answer["url"].as_str().map(str::to_string);
                }
                Some("Swept" | "Failed" | "Terminated") => return Err(OpenError::Ended),
                _ => {}
            },
            Ok((http::StatusCode::NOT_FOUND, _)) => return Err(OpenError::Ended),
            _ => {}
        }
        if Instant::now() > deadline {
            return Err(OpenError::ReadyTimeout);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // The URL the api answered (it carries the connect token when there is one), else the
    // one in the Ready status.
    let Some(url) = backend.url.clone().or(status_url) else {
        return Err(OpenError::Refused);
    };
    let ws_url = websocket_url(&url).ok_or(OpenError::Refused)?;
    let uri: http::Uri = ws_url.parse().map_err(|_| OpenError::Refused)?;
    let host = uri.host().ok_or(OpenError::Refused)?;
    let port = uri.port_u16().unwrap_or(80);
    // `<name>.localhost` (the router of `spawner dev`) is loopback, as browsers resolve it;
    // the Host header keeps the name.
    let address = if host == "localhost" || host.ends_with(".localhost") {
        "127.0.0.1"
    } else {
        host
    };
    let opened = tokio::time::timeout(Duration::from_secs(10), async {
        let stream = tokio::net::TcpStream::connect((address, port)).await.ok()?;
        tokio_tungstenite::client_async(ws_url.as_str(), stream)
            .await
            .ok()
    })
    .await;
    let Ok(Some((socket, _))) = opened else {
        return Err(OpenError::Refused);
    };
    let (sink, mut stream) = socket.split();
    // Read (and drop) what the backend sends, so it is never blocked on this client.
    tokio::spawn(async move { while let Some(Ok(_)) = stream.next().await {} });
    Ok(sink)
}

/// The demo backend's click, padded to `bytes` (exactly, from the 27 bytes of an unpadded
/// click on; at most 64 KiB of padding).
fn click(bytes: u64) -> String {
    let pad = "x".repeat((bytes as usize).saturating_sub(27).min(64 * 1024));
    json!({"op": "increment", "pad": pad}).to_string()
}

/// `http://host/a/?q` -> `ws://host/a/ws?q`.
fn websocket_url(url: &str) -> Option<String> {
    let rest = url.strip_prefix("http://").map(|r| ("ws://", r));
    let rest = rest.or_else(|| url.strip_prefix("https://").map(|r| ("wss://", r)));
    let (scheme, rest) = rest?;
    let (path, query) = match rest.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (rest, None),
    };
    let mut out = format!("{scheme}{}", path.trim_end_matches('/'));
    out.push_str("/ws");
    if let Some(query) = query {
        out.push('?');
        out.push_str(query);
    }
    Some(out)
}

/// `spawner replay`: plays the trace, then prints the report.
pub async fn run(args: ReplayArgs, out: &mut (dyn Write + Send)) -> anyhow::Result<()> {
    let report = replay(&args, std::io::stderr().is_terminal()).await?;
    writeln!(out, "{report}")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clicks_have_the_recorded_size() {
        for bytes in [27, 40, 120, 5000] {
            assert_eq!(click(bytes).len() as u64, bytes);
        }
        assert_eq!(click(3).len(), 27);
    }

    #[test]
    fn websocket_urls_keep_the_path_and_the_token() {
        assert_eq!(
            websocket_url("http://127.0.0.2:4000").as_deref(),
            Some("ws://127.0.0.2:4000/ws")
        );
        assert_eq!(
            websocket_url("https://r.example.com/b/x/?token=abc").as_deref(),
            Some("wss://r.example.com/b/x/ws?token=abc")
        );
        assert_eq!(websocket_url("ftp://x"), None);
    }
}
