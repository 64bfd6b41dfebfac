//! End-to-end scenarios: what a web application does with Spawner, run against a live
//! deployment through its public surfaces only (the api over HTTP, the backend through the
//! router and its sidecar). The same scenarios run against `spawner dev` on this machine
//! (`tests/scenarios_local.rs`), against a kind cluster (`tests/scenarios_kind.rs`) and, with
//! pod-IP URLs and no router, against the real kube-apiserver (`tests/controlplane_scenarios.rs`).
//!
//! A [`Target`] says where the api is, how to open a byte stream to a backend's `url` (direct
//! TCP: to the router's `<name>.localhost` address under `spawner dev` and on kind, where its
//! NodePort is mapped to loopback), and which commands the test applications are.

pub mod client;
pub mod disruption;
pub mod kind;
pub mod local;
pub mod phases;
pub mod room;
pub mod suite;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use spawner_core::Phase;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::tungstenite::Message;

pub use client::{ApiClient, BackendStatus, PhaseEvent, StatusStream, StreamItem};
// The disruption scenarios, beside the others for the suites' `scenario_tests!`.
pub use disruption::{
    api_pod_deleted_while_streaming, controller_leader_deleted_mid_spawn,
    sweeper_deleted_while_user_connected, worker_deleted_backends_fail,
    worker_drained_backends_fail,
};
pub use phases::{ended, wait_ready};

use phases::{end, never_ready, spawn_until_ended, terminate};
use room::{next_room_state, open_room};

/// Why a scenario failed, in words a person can act on.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Failure(String);

impl Failure {
    pub fn new(message: impl Into<String>) -> Self {
        Self(message.into())
    }
}

/// `Ok` if `condition` holds, else a Failure saying `message`.
pub fn ensure(condition: bool, message: impl FnOnce() -> String) -> Result<(), Failure> {
    if condition {
        Ok(())
    } else {
        Err(Failure(message()))
    }
}

/// A byte stream to a backend's sidecar.
pub trait BackendStream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> BackendStream for T {}

pub type BoxedStream = Box<dyn BackendStream>;
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Opens a stream to the sidecar at `backend.url`.
pub trait Connect: Send + Sync {
    fn connect<'a>(
        &'a self,
        backend: &'a BackendStatus,
    ) -> BoxFuture<'a, Result<BoxedStream, Failure>>;
}

/// An application to spawn: an image (Kubernetes) and a command (both modes; local mode runs
/// commands as processes and ignores the image).
#[derive(Clone, Debug)]
pub struct App {
    pub image: Option<String>,
    pub command: Vec<String>,
}

impl App {
    /// The spawn request for this app, with `extra` fields (gracePeriodSeconds, key, ...).
    pub fn request(&self, extra: Value) -> Value {
        let mut request = json!({ "command": self.command });
        if let Some(image) = &self.image {
            request["image"] = json!(image);
        }
        if let (Some(request), Some(extra)) = (request.as_object_mut(), extra.as_object()) {
            request.extend(extra.clone());
        }
        request
    }

    /// This app, started only after `delay` (`sh -c 'sleep N; exec ...'`): an app slower to
    /// accept connections than a short grace period.
    pub fn started_after(&self, delay: Duration) -> App {
        let quoted: Vec<String> = self
            .command
            .iter()
            .map(|arg| format!("'{}'", arg.replace('\'', r"'\''")))
            .collect();
        App {
            image: self.image.clone(),
            command: vec![
                "/bin/sh".into(),
                "-c".into(),
                format!("sleep {}; exec {}", delay.as_secs(), quoted.join(" ")),
            ],
        }
    }
}

/// The applications the scenarios spawn.
#[derive(Clone, Debug)]
pub struct Apps {
    /// `spawner demo-backend`: HTTP and a WebSocket room at `/ws` on `$PORT`.
    pub demo: App,
    /// Exits at once with code [`CRASH_EXIT_CODE`].
    pub crash: App,
    /// Runs but never listens, so it never becomes Ready.
    pub never_ready: App,
}

/// Exit code of [`Apps::crash`].
pub const CRASH_EXIT_CODE: i32 = 3;

/// A live Spawner deployment to run scenarios against.
#[derive(Clone)]
pub struct Target {
    /// `local` or `kind`, for messages.
    pub name: String,
    pub api: ApiClient,
    pub connector: Arc<dyn Connect>,
    pub apps: Apps,
    /// Longest wait from spawn to Ready (image pulls make a cluster slower than local).
    pub ready_timeout: Duration,
    /// The controller's start timeout: a backend Running this long without being Ready fails.
    pub start_timeout: Duration,
}

/// Durations a scenario observed, printed by the suites (never asserted: no wall-clock speed
/// in tests).
#[derive(Debug, Default)]
pub struct Timings(pub Vec<(&'static str, Duration)>);

impl Timings {
    /// Records `what` took from `since` until now.
    pub fn record(&mut self, what: &'static str, since: Instant) {
        self.0.push((what, since.elapsed()));
    }
}

impl fmt::Display for Timings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .0
            .iter()
            .map(|(what, d)| format!("{what} {:.2}s", d.as_secs_f64()))
            .collect();
        f.write_str(&parts.join(", "))
    }
}

/// A short random suffix, so scenarios running at once (or twice against one cluster) never
/// share a key.
pub fn unique(prefix: &str) -> String {
    let mut bytes = [0u8; 5];
    // The OS generator is always there on the platforms the suites run on; fall back to the
    // time so a failure to read it cannot fail a scenario.
    if getrandom::fill(&mut bytes).is_err() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or_default();
        bytes[..4].copy_from_slice(&nanos.to_le_bytes());
    }
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("{prefix}-{hex}")
}

/// The `host[:port]` part of an `http://` URL.
pub fn authority(url: &str) -> Result<&str, Failure> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| Failure::new(format!("backend url {url:?} is not http://")))?;
    let end = rest.find('/').unwrap_or(rest.len());
    ensure(end > 0, || format!("backend url {url:?} has no host"))?;
    Ok(&rest[..end])
}

/// Spawn → Ready (seen on the status stream) → a WebSocket through the sidecar that works and
/// keeps the backend alive past its grace period → disconnect → Swept after the grace period.
pub async fn spawn_connect_disconnect_swept(target: &Target) -> Result<Timings, Failure> {
    const GRACE: Duration = Duration::from_secs(3);
    let mut timings = Timings::default();
    let start = Instant::now();
    let spawned = target
        .api
        .spawn(
            &target
                .apps
                .demo
                .request(json!({ "gracePeriodSeconds": GRACE.as_secs() })),
        )
        .await?;
    ensure(spawned.spawned, || {
        format!("{}: spawn without a key must create", spawned.name)
    })?;
    let name = spawned.name;
    wait_ready(target, &name).await?;
    timings.record("spawn→Ready", start);

    let status = target.api.status(&name).await?;
    let mut ws = open_room(target, &status, spawned.url.as_deref()).await?;
    let joined = next_room_state(&mut ws).await?;
    ensure(joined.peers == 1, || {
        format!("{name}: first peer sees {} peers", joined.peers)
    })?;
    ws.send(Message::Text(r#"{"op":"increment"}"#.into()))
        .await
        .map_err(|e| Failure::new(format!("sending through the sidecar: {e}")))?;
    let clicked = next_room_state(&mut ws).await?;
    ensure(clicked.count == 1, || {
        format!("{name}: count after one increment is {}", clicked.count)
    })?;

    // Safety: a live connection keeps the backend, however long it stays quiet. Keep reading
    // (pings from the sidecar are answered while reading) for longer than the grace period.
    let held_until = tokio::time::Instant::now() + GRACE + Duration::from_secs(4);
    while let Ok(message) = tokio::time::timeout_at(held_until, ws.next()).await {
        match message {
            Some(Ok(Message::Close(_))) | Some(Err(_)) | None => {
                return Err(Failure::new(format!(
                    "{name}: the WebSocket ended while held open: {message:?}"
                )));
            }
            Some(Ok(_)) => {}
        }
    }
    let during = target.api.status(&name).await?;
    ensure(during.phase == Phase::Ready, || {
        format!(
            "{name} is {:?} while a WebSocket is open ({:?})",
            during.phase, during.reason
        )
    })?;

    let _ = ws.close(None).await;
    drop(ws);
    let closed = Instant::now();
    ended(
        target,
        &name,
        GRACE + Duration::from_secs(60),
        "after its WebSocket closed",
        Phase::Swept,
        None,
    )
    .await?;
    timings.record("disconnect→Swept", closed);
    Ok(timings)
}

/// An app slower to start than its grace period is not Ready before it accepts, and still gets
/// its grace period from Ready: a WebSocket opened right after Ready works (found on kind, where the sweeper swept such a
/// backend the moment it marked it Ready, and the WebSocket got the sealed sidecar's 503).
pub async fn slow_start_keeps_its_grace_period_after_ready(
    target: &Target,
) -> Result<Timings, Failure> {
    const GRACE: Duration = Duration::from_secs(3);
    let mut timings = Timings::default();
    let start = Instant::now();
    let delay = GRACE + Duration::from_secs(2);
    let app = target.apps.demo.started_after(delay);
    let spawned = target
        .api
        .spawn(&app.request(json!({ "gracePeriodSeconds": GRACE.as_secs() })))
        .await?;
    let name = spawned.name;
    wait_ready(target, &name).await?;
    timings.record("spawn→Ready", start);
    // Never Ready before the app accepts: it cannot listen before its delay has passed.
    ensure(start.elapsed() >= delay, || {
        format!(
            "{name} was Ready {:.2}s after its spawn, before its app (started after {}s) could accept",
            start.elapsed().as_secs_f64(),
            delay.as_secs()
        )
    })?;
    let status = target.api.status(&name).await?;
    let mut ws = open_room(target, &status, spawned.url.as_deref()).await?;
    let joined = next_room_state(&mut ws).await?;
    ensure(joined.peers == 1, || {
        format!("{name}: first peer sees {} peers", joined.peers)
    })?;
    let during = target.api.status(&name).await?;
    ensure(during.phase == Phase::Ready, || {
        format!(
            "{name} is {:?} while a WebSocket is open ({:?})",
            during.phase, during.reason
        )
    })?;
    let _ = ws.close(None).await;
    drop(ws);
    ended(
        target,
        &name,
        GRACE + Duration::from_secs(60),
        "after its WebSocket closed",
        Phase::Swept,
        None,
    )
    .await?;
    timings.record("spawn→Swept", start);
    Ok(timings)
}

/// The router is the public entry: a request to a Ready backend's `url` without its connect
/// token gets 401 (nothing reaches the backend), and the `url` as `/connect` gave it (with the
/// token) opens the demo room's WebSocket. For targets whose `url` is the router's.
pub async fn router_requires_a_connect_token(target: &Target) -> Result<Timings, Failure> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut timings = Timings::default();
    let start = Instant::now();
    let request = target
        .apps
        .demo
        .request(json!({ "key": unique("e2e-router"), "gracePeriodSeconds": 30 }));
    let connected = target.api.connect(&request).await?;
    let name = connected.name;
    let url = connected
        .url
        .ok_or_else(|| Failure::new(format!("/connect gave {name} no url")))?;
    ensure(url.contains("token="), || {
        format!("{name}: /connect url {url:?} carries no connect token")
    })?;
    wait_ready(target, &name).await?;
    timings.record("connect→Ready", start);
    let status = target.api.status(&name).await?;
    let host = authority(status.url.as_deref().unwrap_or(&url))?.to_string();

    let mut stream = target.connector.connect(&status).await?;
    let plain = format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    stream
        .write_all(plain.as_bytes())
        .await
        .map_err(|e| Failure::new(format!("request without a token: {e}")))?;
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut answer))
        .await
        .map_err(|_| Failure::new("request without a token: no answer in 30 s"))?
        .map_err(|e| Failure::new(format!("request without a token: {e}")))?;
    let answer = String::from_utf8_lossy(&answer);
    let status_line = answer.lines().next().unwrap_or_default();
    ensure(status_line.starts_with("HTTP/1.1 401"), || {
        format!("{name}: a request without a connect token got {status_line:?}")
    })?;

    let mut ws = open_room(target, &status, Some(&url)).await?;
    let joined = next_room_state(&mut ws).await?;
    ensure(joined.peers == 1, || {
        format!(
            "{name}: first peer through the router sees {} peers",
            joined.peers
        )
    })?;
    timings.record("connect→WebSocket", start);
    let _ = ws.close(None).await;
    drop(ws);
    terminate(target, &name).await?;
    Ok(timings)
}

/// An image that cannot be pulled ends its backend Failed with `ImagePullTimeout` and a
/// message naming the image, never Ready. For targets that pull images (a cluster).
pub async fn image_pull_failure_fails(target: &Target) -> Result<Timings, Failure> {
    const IMAGE: &str = "registry.invalid/spawner-e2e/absent:1";
    let mut timings = Timings::default();
    let start = Instant::now();
    let app = App {
        image: Some(IMAGE.into()),
        command: target.apps.demo.command.clone(),
    };
    let (name, events) = spawn_until_ended(
        target,
        &app,
        30,
        target.ready_timeout,
        "with an image that cannot be pulled",
        Phase::Failed,
        Some("ImagePullTimeout"),
    )
    .await?;
    timings.record("spawn→Failed", start);
    let message = &end(&events).message;
    ensure(
        message.as_deref().is_some_and(|m| m.contains(IMAGE)),
        || format!("{name}: the Failed message {message:?} does not name the image"),
    )?;
    never_ready(&name, &events)?;
    Ok(timings)
}

/// 20 concurrent get-or-create requests for one new key give one backend: every answer names
/// it, exactly one created it, listing by key finds only it, and it becomes Ready.
pub async fn get_or_create_concurrently(target: &Target) -> Result<Timings, Failure> {
    const REQUESTS: usize = 20;
    let mut timings = Timings::default();
    let key = unique("e2e-room");
    let request = target
        .apps
        .demo
        .request(json!({ "key": key, "gracePeriodSeconds": 30 }));
    let start = Instant::now();
    let answers = futures::future::join_all((0..REQUESTS).map(|_| {
        let api = target.api.clone();
        let request = request.clone();
        async move { api.connect(&request).await }
    }))
    .await;
    timings.record("20 concurrent /connect", start);
    let answers: Vec<_> = answers.into_iter().collect::<Result<_, _>>()?;
    let name = answers[0].name.clone();
    ensure(answers.iter().all(|a| a.name == name), || {
        let names: std::collections::BTreeSet<_> = answers.iter().map(|a| &a.name).collect();
        format!("key {key} gave several backends: {names:?}")
    })?;
    let created = answers.iter().filter(|a| a.spawned).count();
    ensure(created == 1, || {
        format!("{created} of {REQUESTS} answers for key {key} say they created {name}")
    })?;
    let listed = target.api.list_by_key(&key).await?;
    ensure(listed.len() == 1 && listed[0].name == name, || {
        let names: Vec<_> = listed.iter().map(|b| &b.name).collect();
        format!("backends listed for key {key}: {names:?}, expected [{name}]")
    })?;
    wait_ready(target, &name).await?;
    timings.record("spawn→Ready", start);

    // Once Ready, the key still leads to the same backend.
    let again = target.api.connect(&request).await?;
    ensure(again.name == name && !again.spawned, || {
        format!(
            "a later /connect for {key} gave {} (spawned {})",
            again.name, again.spawned
        )
    })?;
    terminate(target, &name).await?;
    Ok(timings)
}

/// An application that exits with code 3 makes its backend Failed, with that exit code on the
/// status stream and in the status.
pub async fn crashing_app_fails(target: &Target) -> Result<Timings, Failure> {
    let mut timings = Timings::default();
    let start = Instant::now();
    let (name, events) = spawn_until_ended(
        target,
        &target.apps.crash,
        30,
        target.ready_timeout,
        &format!("(an app exiting {CRASH_EXIT_CODE})"),
        Phase::Failed,
        None,
    )
    .await?;
    timings.record("spawn→Failed", start);
    let last = end(&events);
    ensure(last.exit_code == Some(CRASH_EXIT_CODE), || {
        format!(
            "{name}: Failed event has exit code {:?} ({:?}: {:?})",
            last.exit_code, last.reason, last.message
        )
    })?;
    let status = target.api.status(&name).await?;
    ensure(
        status.phase == Phase::Failed && status.exit_code == Some(CRASH_EXIT_CODE),
        || {
            format!(
                "{name}: status says {:?} with exit code {:?}",
                status.phase, status.exit_code
            )
        },
    )?;
    never_ready(&name, &events)?;
    Ok(timings)
}

/// An application that never accepts connections does not keep its backend forever: once the
/// controller's start timeout has passed since it became Running, it ends Failed with
/// `StartTimeout` and a message naming the port, and users on the status stream see it.
pub async fn never_ready_fails_with_start_timeout(target: &Target) -> Result<Timings, Failure> {
    let mut timings = Timings::default();
    let start = Instant::now();
    let (name, events) = spawn_until_ended(
        target,
        &target.apps.never_ready,
        5,
        target.ready_timeout + target.start_timeout,
        "(never listening)",
        Phase::Failed,
        Some("StartTimeout"),
    )
    .await?;
    timings.record("spawn→Failed", start);
    let message = end(&events).message.clone().unwrap_or_default();
    ensure(
        message.contains("never accepted") && message.contains("port"),
        || format!("{name}: StartTimeout message {message:?} does not say what never happened"),
    )?;
    ensure(events.iter().any(|e| e.phase == Phase::Running), || {
        format!(
            "{name} failed without running: {:?}",
            client::phases(&events)
        )
    })?;
    never_ready(&name, &events)?;
    Ok(timings)
}

/// A terminate sent right after the spawn (the backend is still starting) is never lost: the
/// backend ends Terminated and is never Ready.
pub async fn terminate_while_starting(target: &Target) -> Result<Timings, Failure> {
    let mut timings = Timings::default();
    let start = Instant::now();
    let spawned = target
        .api
        .spawn(
            &target
                .apps
                .never_ready
                .request(json!({ "gracePeriodSeconds": 30 })),
        )
        .await?;
    let name = spawned.name;
    ensure(!spawned.phase.is_terminal(), || {
        format!("{name} is {:?} right after its spawn", spawned.phase)
    })?;
    target.api.terminate(&name).await?;
    let events = ended(
        target,
        &name,
        target.ready_timeout,
        "(terminated while starting)",
        Phase::Terminated,
        None,
    )
    .await?;
    timings.record("spawn→Terminated", start);
    never_ready(&name, &events)?;
    Ok(timings)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authority_is_host_and_port() {
        assert_eq!(
            authority("http://127.0.3.7:9090").unwrap(),
            "127.0.3.7:9090"
        );
        assert_eq!(
            authority("http://slab-x.ns.svc.cluster.local/").unwrap(),
            "slab-x.ns.svc.cluster.local"
        );
        assert!(authority("https://x").is_err());
        assert!(authority("http:///path").is_err());
    }

    #[test]
    fn app_requests_merge_extra_fields() {
        let app = App {
            image: Some("spawner:dev".into()),
            command: vec!["/bin/sleep".into(), "5".into()],
        };
        let request = app.request(json!({ "key": "k", "gracePeriodSeconds": 3 }));
        assert_eq!(
            request,
            json!({
                "image": "spawner:dev",
                "command": ["/bin/sleep", "5"],
                "key": "k",
                "gracePeriodSeconds": 3,
            })
        );
    }

    #[test]
    fn unique_names_differ() {
        assert_ne!(unique("a"), unique("a"));
        assert!(unique("e2e").starts_with("e2e-"));
    }
}
