//! One client connection: hyper's HTTP/1.1 server in front, requests routed to the reserved
//! paths, the WebSocket relay or the application.
//!
//! Each client connection owns at most one keep-alive connection to the application: HTTP/1.1
//! serves one request at a time per connection, so a 1:1 pairing needs no shared pool, no lock
//! contention, and keeps the application's view of connections close to the clients'.

use std::convert::Infallible;
use std::error::Error as _;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http1 as client_http1;
use hyper::server::conn::http1 as server_http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

use crate::body::{BodyTooLarge, RequestBody, ResponseBody};
use crate::drain::{DrainState, TaskGuard};
use crate::head_timer::HeadTimer;
use crate::lean::{self, LeanConn, LeanError, LeanResponse};
use crate::monitor::LiveGuard;
use crate::reserved::{self, RESERVED_PREFIX};
use crate::{Connect, Listener, Shared, websocket};

type Sender = client_http1::SendRequest<RequestBody>;

/// A client connection's state shared by its requests.
pub(crate) struct ClientConn<C: Connect> {
    pub shared: Arc<Shared<C>>,
    /// The client's address as an `X-Forwarded-For` entry, formatted once.
    pub peer_ip: HeaderValue,
    upstream: Mutex<Option<Sender>>,
    /// The keep-alive upstream connection's I/O future. The client connection's task polls it
    /// next to the server side, so a request and its response never hop between tasks.
    upstream_driver: Mutex<Option<Driver>>,
    /// The kept connection of the lean client (bodyless requests).
    lean: Mutex<Option<LeanConn<C::Io>>>,
}

type Driver = Pin<Box<dyn Future<Output = ()> + Send>>;

impl<C: Connect> ClientConn<C> {
    pub(crate) fn take_lean(&self) -> Option<LeanConn<C::Io>> {
        self.lean.lock().ok().and_then(|mut slot| slot.take())
    }

    pub(crate) fn keep_lean(&self, conn: LeanConn<C::Io>) {
        if let Ok(mut slot) = self.lean.lock() {
            *slot = Some(conn);
        }
    }

    /// Polls the upstream connection, if there is one. Never completes: a finished upstream
    /// connection is just removed (the next request dials a new one).
    fn poll_upstream_driver(&self, cx: &mut Context<'_>) -> Poll<()> {
        if let Ok(mut slot) = self.upstream_driver.lock()
            && let Some(driver) = slot.as_mut()
            && driver.as_mut().poll(cx).is_ready()
        {
            *slot = None;
        }
        Poll::Pending
    }
}

pub(crate) async fn serve_connection<L: Listener, C: Connect>(
    shared: Arc<Shared<C>>,
    io: L::Io,
    peer: SocketAddr,
    task: TaskGuard,
) {
    if task.state() != DrainState::Running {
        return;
    }
    let config = &shared.config;
    let peer_ip = HeaderValue::from_str(&peer.ip().to_canonical().to_string())
        .unwrap_or(HeaderValue::from_static("unknown"));
    let conn_state = Arc::new(ClientConn {
        shared: Arc::clone(&shared),
        peer_ip,
        upstream: Mutex::new(None),
        upstream_driver: Mutex::new(None),
        lean: Mutex::new(None),
    });
    let driver_state = Arc::clone(&conn_state);
    let upstream_driver = std::future::poll_fn(move |cx| driver_state.poll_upstream_driver(cx));
    tokio::pin!(upstream_driver);
    let service = service_fn(move |req| route::<L, C>(Arc::clone(&conn_state), req));
    let head_timer = HeadTimer::default();
    let head_timer_driver = head_timer.driver();
    tokio::pin!(head_timer_driver);
    let mut builder = server_http1::Builder::new();
    builder
        .timer(head_timer)
        .header_read_timeout(config.header_read_timeout)
        .max_buf_size(config.max_header_bytes.max(8192));
    // hyper's own limit is the same 100 fields, kept in an inline array; a configured limit
    // (even an equal one) makes it build two 100-element heap vectors for every request head.
    if config.max_headers != HYPER_DEFAULT_MAX_HEADERS {
        builder.max_headers(config.max_headers);
    }
    let conn = builder
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(conn);
    // `biased`: the server side runs first, so an upstream connection its request just opened,
    // and a header-read deadline it just set, are polled in the same pass.
    tokio::select! {
        biased;
        result = conn.as_mut() => {
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "client connection ended with an error");
            }
            return;
        }
        () = upstream_driver.as_mut() => {}
        () = head_timer_driver.as_mut() => {}
        () = task.reached(DrainState::Draining) => {}
    }
    // Draining: finish the request in flight, then close instead of keeping alive.
    conn.as_mut().graceful_shutdown();
    tokio::select! {
        biased;
        _ = conn.as_mut() => {}
        () = upstream_driver.as_mut() => {}
        () = head_timer_driver.as_mut() => {}
        () = task.reached(DrainState::Abort) => {}
    }
}

/// hyper's service for one request. The request and the response are large values that every
/// async layer between hyper and the proxy moves once more, so this stays shallow: requests
/// without a body (most) are answered from here, borrowing the request.
async fn route<L: Listener, C: Connect>(
    conn: Arc<ClientConn<C>>,
    req: Request<Incoming>,
) -> Result<Response<ResponseBody>, Infallible> {
    if req.uri().path().starts_with(RESERVED_PREFIX) {
        return Ok(reserved::handle(&conn.shared, &req));
    }
    if websocket::is_upgrade(&req) {
        return Ok(websocket::proxy::<L, C>(&conn, req).await);
    }
    let shared = &conn.shared;
    let Some(guard) = shared.monitor.connection_started_unless_sealed() else {
        return Ok(reserved::sealed_response());
    };
    let limit = shared.config.max_request_body_bytes;
    if let Some(limit) = limit
        && content_length(req.headers()).is_some_and(|len| len > limit)
    {
        return Ok(reserved::plain(
            StatusCode::PAYLOAD_TOO_LARGE,
            "request body too large\n",
        ));
    }
    if http_body::Body::is_end_stream(req.body()) && req.method() != Method::CONNECT {
        // The lean client writes the head itself: hop-by-hop headers are skipped and
        // `X-Forwarded-*` added while encoding (`lean::encode_head`), not in the map.
        let exchange = lean::exchange(&conn, &req, &conn.peer_ip).await;
        return Ok(bodyless_response(shared, exchange, guard));
    }
    Ok(forward(&conn, req, guard).await)
}

/// Proxies one HTTP request with a body over the connection's keep-alive connection to the app
/// (hyper's client: the body streams while the response may already come).
async fn forward<C: Connect>(
    conn: &Arc<ClientConn<C>>,
    req: Request<Incoming>,
    guard: LiveGuard,
) -> Response<ResponseBody> {
    let shared = &conn.shared;
    let limit = shared.config.max_request_body_bytes;
    let (mut parts, body) = req.into_parts();
    prepare_request_headers(&mut parts.headers, &conn.peer_ip, false);
    parts.uri = origin_form(&parts.uri);
    let req = Request::from_parts(
        parts,
        RequestBody::from_client(body, &shared.monitor, limit),
    );

    match send(conn, req).await {
        Ok(response) => {
            let (mut parts, body) = response.into_parts();
            remove_hop_by_hop(&mut parts.headers);
            Response::from_parts(
                parts,
                ResponseBody::Proxied {
                    inner: body,
                    guard,
                    sent: 0,
                },
            )
        }
        Err(e) => e.into_response(shared),
    }
}

/// The client's response to a request without a body, which went through the lean client.
fn bodyless_response<C: Connect>(
    shared: &Shared<C>,
    exchange: Result<LeanResponse<C>, LeanError>,
    guard: LiveGuard,
) -> Response<ResponseBody> {
    match exchange {
        Ok(LeanResponse::Whole(mut parts, data)) => {
            remove_hop_by_hop(&mut parts.headers);
            Response::from_parts(
                parts,
                ResponseBody::Buffered {
                    data: Some(data),
                    guard,
                    sent: 0,
                },
            )
        }
        Ok(LeanResponse::Streaming(mut parts, body)) => {
            remove_hop_by_hop(&mut parts.headers);
            Response::from_parts(
                parts,
                ResponseBody::Streaming {
                    inner: Box::pin(body),
                    guard,
                    sent: 0,
                },
            )
        }
        Err(LeanError::Connect(e)) => UpstreamError::Connect(e).into_response(shared),
        Err(e) => {
            shared
                .monitor
                .counters
                .upstream_errors
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let detail = match e {
                LeanError::Io(e) => e.to_string(),
                LeanError::Protocol(p) => p.to_string(),
                LeanError::Connect(e) => e.to_string(),
            };
            tracing::debug!(error = %detail, "upstream exchange failed");
            bad_gateway(format!(
                "502 Bad Gateway: the application failed to answer ({detail})\n"
            ))
        }
    }
}

/// Why a request could not be forwarded.
#[derive(Debug)]
pub(crate) enum UpstreamError {
    /// The application does not accept connections.
    Connect(std::io::Error),
    /// The request body exceeded the limit.
    TooLarge,
    /// The application took the connection but failed the exchange.
    Exchange(hyper::Error),
}

impl UpstreamError {
    pub fn into_response<C: Connect>(self, shared: &Shared<C>) -> Response<ResponseBody> {
        match self {
            UpstreamError::Connect(e) => {
                tracing::warn!(upstream = %shared.config.upstream, error = %e, "application refused the connection");
                shared.monitor.upstream_unreachable();
                bad_gateway(format!(
                    "502 Bad Gateway: the application is not accepting connections on {} ({e})\n",
                    shared.config.upstream
                ))
            }
            UpstreamError::TooLarge => {
                reserved::plain(StatusCode::PAYLOAD_TOO_LARGE, "request body too large\n")
            }
            UpstreamError::Exchange(e) => {
                shared
                    .monitor
                    .counters
                    .upstream_errors
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::debug!(error = %e, "upstream exchange failed");
                bad_gateway(format!(
                    "502 Bad Gateway: the application failed to answer ({e})\n"
                ))
            }
        }
    }
}

fn bad_gateway(text: String) -> Response<ResponseBody> {
    let mut response = Response::new(ResponseBody::full(text));
    *response.status_mut() = StatusCode::BAD_GATEWAY;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn classify(e: hyper::Error) -> UpstreamError {
    let mut source = e.source();
    while let Some(s) = source {
        if s.is::<BodyTooLarge>() {
            return UpstreamError::TooLarge;
        }
        source = s.source();
    }
    UpstreamError::Exchange(e)
}

/// Sends over the connection's upstream connection, dialling a new one when there is none or
/// the kept one was closed before the request could be written.
async fn send<C: Connect>(
    conn: &ClientConn<C>,
    req: Request<RequestBody>,
) -> Result<Response<Incoming>, UpstreamError> {
    let kept = conn.upstream.lock().ok().and_then(|mut slot| slot.take());
    let mut req = req;
    if let Some(mut sender) = kept
        && sender.ready().await.is_ok()
    {
        match sender.try_send_request(req).await {
            Ok(response) => {
                conn.keep(sender);
                return Ok(response);
            }
            Err(mut e) => match e.take_message() {
                // Never written: the app closed the idle connection; retry on a fresh one.
                Some(unsent) => req = unsent,
                None => return Err(classify(e.into_error())),
            },
        }
    }
    let (mut sender, driver) = dial(&conn.shared).await?;
    if let Ok(mut slot) = conn.upstream_driver.lock() {
        *slot = Some(Box::pin(async move {
            let _ = driver.await;
        }));
    }
    let response = sender.send_request(req).await.map_err(classify)?;
    conn.keep(sender);
    Ok(response)
}

impl<C: Connect> ClientConn<C> {
    fn keep(&self, sender: Sender) {
        if let Ok(mut slot) = self.upstream.lock() {
            *slot = Some(sender);
        }
    }
}

/// Opens a connection to the application: its HTTP/1.1 client and the future doing its I/O,
/// which the caller must poll.
pub(crate) async fn dial<C: Connect>(
    shared: &Shared<C>,
) -> Result<
    (
        Sender,
        client_http1::Connection<TokioIo<C::Io>, RequestBody>,
    ),
    UpstreamError,
> {
    let io = shared
        .connector
        .connect(&shared.config.upstream)
        .await
        .map_err(UpstreamError::Connect)?;
    client_http1::Builder::new()
        .handshake(TokioIo::new(io))
        .await
        .map_err(UpstreamError::Exchange)
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// The request target as the application should see it: path and query only.
pub(crate) fn origin_form(uri: &Uri) -> Uri {
    if uri.scheme().is_none() && uri.authority().is_none() {
        return uri.clone();
    }
    uri.path_and_query()
        .map(|pq| Uri::from(pq.clone()))
        .unwrap_or_else(|| Uri::from_static("/"))
}

const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// hyper's default limit on request header fields (`hyper::proto::h1::role::DEFAULT_MAX_HEADERS`;
/// `tests/http.rs` checks that 100 fields pass and 101 get 431 with the default config).
const HYPER_DEFAULT_MAX_HEADERS: usize = 100;

/// Whether `name` is removed by [`remove_hop_by_hop`] whatever `Connection` says: the fixed
/// hop-by-hop headers, `Upgrade`, and `Connection` itself.
pub(crate) fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
    )
}

/// Removes hop-by-hop headers (RFC 9110 §7.6.1), including those named by `Connection`, and
/// `Upgrade` (re-added by the WebSocket path where it belongs).
pub(crate) fn remove_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: one pass over the names is cheaper than nine removals, each
    // hashing its name. Headers named by `Connection` only go when a `Connection` is there.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    headers.remove(header::UPGRADE);
}

/// Hop-by-hop headers removed and `X-Forwarded-*` set. `X-Forwarded-For` gets the client's
/// address appended; `-Proto` and `-Host` are kept when a proxy in front already set them.
pub(crate) fn prepare_request_headers(
    headers: &mut HeaderMap,
    peer_ip: &HeaderValue,
    websocket: bool,
) {
    remove_hop_by_hop(headers);
    let appended = match headers.get(X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(existing) if !existing.trim().is_empty() => {
            let ip = peer_ip.to_str().unwrap_or("unknown");
            HeaderValue::from_str(&format!("{existing}, {ip}")).ok()
        }
        _ => Some(peer_ip.clone()),
    };
    if let Some(value) = appended {
        headers.insert(X_FORWARDED_FOR, value);
    }
    if !headers.contains_key(X_FORWARDED_PROTO) {
        let proto = if websocket { "ws" } else { "http" };
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    }
    if !headers.contains_key(X_FORWARDED_HOST)
        && let Some(host) = headers.get(header::HOST).cloned()
    {
        headers.insert(X_FORWARDED_HOST, host);
    }
}

pub(crate) const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub(crate) const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub(crate) const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_go_and_forwarded_headers_come() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("app.example"));
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        h.insert("x-kept", HeaderValue::from_static("yes"));
        prepare_request_headers(&mut h, &HeaderValue::from_static("127.0.0.2"), false);
        assert!(h.get(header::CONNECTION).is_none());
        assert!(h.get("x-secret").is_none());
        assert!(h.get("keep-alive").is_none());
        assert!(h.get(header::TE).is_none());
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 127.0.0.2");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "app.example");
        assert_eq!(h["x-kept"], "yes");
    }

    #[test]
    fn hop_by_hop_names_are_the_removed_ones() {
        for name in HOP_BY_HOP.iter().chain([&header::UPGRADE]) {
            assert!(is_hop_by_hop(name), "{name}");
        }
        for name in [header::HOST, header::CONTENT_LENGTH, X_FORWARDED_FOR] {
            assert!(!is_hop_by_hop(&name), "{name}");
        }
        // Nothing hop-by-hop: the map is left alone; a `Connection` naming others removes them.
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("x"));
        h.insert("x-a", HeaderValue::from_static("1"));
        let before = h.clone();
        remove_hop_by_hop(&mut h);
        assert_eq!(h, before);
        h.insert(header::CONNECTION, HeaderValue::from_static("x-a"));
        remove_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert_eq!(h[header::HOST], "x");
    }

    #[test]
    fn absolute_targets_become_origin_form() {
        let uri: Uri = "http://example.com/a/b?c=d".parse().unwrap();
        assert_eq!(origin_form(&uri), "/a/b?c=d");
        let uri: Uri = "/x?y".parse().unwrap();
        assert_eq!(origin_form(&uri), "/x?y");
    }
}
