//! The sidecar's control paths under `/_spawner/`: the event stream, seal, health and metrics. None of
//! them counts as activity or as a live connection (the sweeper's subscription and the kubelet's
//! probes must not keep a backend alive).

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use spawner_core::children::{ALIVE_PATH, HEALTH_PATH};
use spawner_core::state_stream::{
    CONTROL_TOKEN_HEADER, SEAL_HOLD_SECONDS, SEAL_PATH, SEAL_PERMANENT_PATH, STATE_STREAM_PATH,
    StateMessage, UNSEAL_PATH,
};
use spawner_core::token::check_token;
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};

use crate::Connect;
use crate::body::ResponseBody;
use crate::drain::{self, DrainState};
use crate::shared::Shared;

pub(crate) const CONTROL_PREFIX: &str = "/_spawner/";
pub(crate) const METRICS_PATH: &str = "/_spawner/metrics";

pub(crate) fn handle<C: Connect, B>(
    shared: &Arc<Shared<C>>,
    req: &Request<B>,
) -> Response<ResponseBody> {
    let path = req.uri().path();
    if matches!(path, SEAL_PATH | SEAL_PERMANENT_PATH | UNSEAL_PATH) {
        return seal(shared, req);
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "only GET here\n");
    }
    match path {
        STATE_STREAM_PATH => events(shared, req.headers()),
        HEALTH_PATH => {
            if shared.monitor.is_ready() {
                plain(StatusCode::OK, "ready\n")
            } else {
                plain(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not ready: the application does not accept connections yet\n",
                )
            }
        }
        ALIVE_PATH => plain(StatusCode::OK, "alive\n"),
        METRICS_PATH => {
            let mut response = Response::new(ResponseBody::full(metrics(shared)));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            response
        }
        _ => plain(
            StatusCode::NOT_FOUND,
            "no such sidecar path (paths under /_spawner/ are reserved)\n",
        ),
    }
}

/// `POST` on the seal paths: see `spawner_core::state_stream::SEAL_PATH`, `SEAL_PERMANENT_PATH` and
/// `UNSEAL_PATH`.
fn seal<C: Connect, B>(shared: &Arc<Shared<C>>, req: &Request<B>) -> Response<ResponseBody> {
    if req.method() != Method::POST {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "only POST here\n");
    }
    if !authorized(&shared.config, req.headers()) {
        return plain(
            StatusCode::UNAUTHORIZED,
            "a valid events token is required\n",
        );
    }
    let monitor = &shared.monitor;
    match req.uri().path() {
        SEAL_PERMANENT_PATH => {
            if monitor.seal_permanently() {
                tracing::info!("sealed for good: the backend was swept");
                plain(StatusCode::OK, "sealed for good\n")
            } else {
                plain(
                    StatusCode::CONFLICT,
                    "not sealed: the backend has live connections\n",
                )
            }
        }
        UNSEAL_PATH => {
            if monitor.unseal() {
                tracing::info!("unsealed: the sweep was called off");
                plain(StatusCode::OK, "unsealed\n")
            } else {
                plain(StatusCode::CONFLICT, "sealed for good\n")
            }
        }
        _ => {
            if monitor.try_seal(std::time::Duration::from_secs(SEAL_HOLD_SECONDS)) {
                tracing::debug!("sealed: refusing new connections while the backend is swept");
                plain(StatusCode::OK, "sealed\n")
            } else {
                plain(
                    StatusCode::CONFLICT,
                    "not sealed: the backend has live connections\n",
                )
            }
        }
    }
}

/// What a connection to a sealed (being swept) backend gets.
pub(crate) fn sealed_response() -> Response<ResponseBody> {
    plain(
        StatusCode::SERVICE_UNAVAILABLE,
        "this backend has been swept; ask for a new one\n",
    )
}

pub(crate) fn plain(status: StatusCode, text: &'static str) -> Response<ResponseBody> {
    let mut response = Response::new(ResponseBody::full(Bytes::from_static(text.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Whether a request may use the control paths (events, seal). Without a configured token
/// they are closed, unless the sidecar was told to leave them open (development only).
fn authorized(config: &crate::SidecarConfig, headers: &HeaderMap) -> bool {
    let Some(expected) = config.events_token.as_deref() else {
        return config.allow_unauthenticated_control;
    };
    let given = headers
        .get(CONTROL_TOKEN_HEADER)
        .and_then(|v| v.to_str().ok())
        .or_else(|| {
            headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| {
                    v.strip_prefix("Bearer ")
                        .or_else(|| v.strip_prefix("bearer "))
                })
        });
    given.is_some_and(|given| check_token(expected, given.trim()))
}

fn events<C: Connect>(shared: &Arc<Shared<C>>, headers: &HeaderMap) -> Response<ResponseBody> {
    if !authorized(&shared.config, headers) {
        let mut response = plain(StatusCode::UNAUTHORIZED, "events token required\n");
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return response;
    }
    let (tx, rx) = mpsc::channel(8);
    tokio::spawn(stream_events(Arc::clone(shared), tx));
    let mut response = Response::new(ResponseBody::Events(rx));
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

/// Feeds one subscriber: the state at once, every published change, a heartbeat every
/// `heartbeat_interval`. Ends when the subscriber goes away or the sidecar drains.
async fn stream_events<C: Connect>(shared: Arc<Shared<C>>, tx: mpsc::Sender<Bytes>) {
    let mut changes = shared.monitor.subscribe();
    let mut drain = shared.tasks.subscribe();
    let period = shared.config.heartbeat_interval;
    let mut heartbeat = tokio::time::interval_at(Instant::now() + period, period);
    heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // The live atomics, not the coalesced snapshot: the first message is the truth right now.
    let mut last = shared.monitor.activity();
    changes.borrow_and_update();
    let first = StateMessage::State(last.state_at(Instant::now())).to_sse();
    if tx.send(Bytes::from(first)).await.is_err() {
        return;
    }
    loop {
        let event = tokio::select! {
            changed = changes.changed() => {
                if changed.is_err() {
                    return;
                }
                let now = *changes.borrow_and_update();
                if now == last {
                    continue;
                }
                last = now;
                StateMessage::State(now.state_at(Instant::now()))
            }
            _ = heartbeat.tick() => {
                StateMessage::Heartbeat(shared.monitor.activity().state_at(Instant::now()))
            }
            () = drain::reached(&mut drain, DrainState::Draining) => return,
            () = tx.closed() => return,
        };
        if tx.send(Bytes::from(event.to_sse())).await.is_err() {
            return;
        }
    }
}

fn metrics<C: Connect>(shared: &Shared<C>) -> String {
    let m = &shared.monitor;
    let c = &m.counters;
    let state = m.activity().state_at(Instant::now());
    let rows: [(&str, &str, &str, u64); 9] = [
        (
            "spawner_sidecar_live_connections",
            "gauge",
            "Open WebSockets plus HTTP requests in flight.",
            state.live_connections,
        ),
        (
            "spawner_sidecar_ready",
            "gauge",
            "1 when the application accepts connections.",
            u64::from(state.ready),
        ),
        (
            "spawner_sidecar_seconds_since_active",
            "gauge",
            "Seconds since the last connect, disconnect or request.",
            state.seconds_since_active,
        ),
        (
            "spawner_sidecar_requests_total",
            "counter",
            "Proxied requests, WebSocket upgrades included.",
            c.requests.load(Ordering::Relaxed),
        ),
        (
            "spawner_sidecar_websockets_total",
            "counter",
            "WebSocket connections established.",
            c.websockets.load(Ordering::Relaxed),
        ),
        (
            "spawner_sidecar_websocket_dead_clients_total",
            "counter",
            "WebSocket clients dropped for not answering pings.",
            c.dead_clients.load(Ordering::Relaxed),
        ),
        (
            "spawner_sidecar_received_bytes_total",
            "counter",
            "Body and WebSocket bytes received from clients.",
            c.bytes_from_clients.load(Ordering::Relaxed),
        ),
        (
            "spawner_sidecar_sent_bytes_total",
            "counter",
            "Body and WebSocket bytes sent to clients.",
            c.bytes_to_clients.load(Ordering::Relaxed),
        ),
        (
            "spawner_sidecar_upstream_errors_total",
            "counter",
            "Requests the application could not be reached or answer for.",
            c.upstream_errors.load(Ordering::Relaxed),
        ),
    ];
    let mut out = String::with_capacity(1536);
    for (name, kind, help, value) in rows {
        let _ = write!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_is_accepted_in_either_header_and_checked() {
        let config = |token: Option<&str>, open: bool| crate::SidecarConfig {
            events_token: token.map(str::to_string),
            allow_unauthenticated_control: open,
            ..crate::SidecarConfig::default()
        };
        let mut headers = HeaderMap::new();
        // No token configured: closed, unless explicitly left open.
        assert!(!authorized(&config(None, false), &headers));
        assert!(authorized(&config(None, true), &headers));
        assert!(!authorized(&config(Some("abc"), true), &headers));
        headers.insert(CONTROL_TOKEN_HEADER, HeaderValue::from_static("abc"));
        assert!(authorized(&config(Some("abc"), false), &headers));
        assert!(!authorized(&config(Some("abd"), false), &headers));
        // The controller configures a digest of the token, not the token.
        let check = spawner_core::token::token_check("abc");
        assert!(authorized(&config(Some(&check), false), &headers));
        assert!(!authorized(&config(Some(&check), false), &{
            let mut h = HeaderMap::new();
            h.insert(
                CONTROL_TOKEN_HEADER,
                HeaderValue::from_str(&check).expect("value"),
            );
            h
        }));
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer abc"),
        );
        assert!(authorized(&config(Some("abc"), false), &headers));
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert!(!authorized(&config(Some("abc"), false), &headers));
    }
}
