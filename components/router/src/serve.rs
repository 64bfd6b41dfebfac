//! Serving client connections: route, check access, wait for Ready, forward with the proxy
//! core.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use spawner_core::connect_token::QUERY_PARAM;
use spawner_core::trace::TraceEventKind;
use spawner_proxy::headers::{
    X_FORWARDED_FOR, X_FORWARDED_HOST, X_FORWARDED_PROTO, forward_request_headers,
    remove_hop_by_hop,
};
use spawner_proxy::websocket::{self, ClientFrame, ClientObserver, Handshake, RelaySettings};
use spawner_proxy::{Connect, Upstream, UpstreamConnections};
use spawner_trace_recorder::TraceRecorder;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::access::{self, Access, CookiePolicy, SESSION_COOKIE};
use crate::cache::{Backends, Lookup};
use crate::config::RouterConfig;
use crate::metrics::{Metrics, Outcome};
use crate::route::{self, RouteError, Target};

/// Header carrying the token's user to the app.
pub const X_SPAWNER_USER: HeaderName = HeaderName::from_static("x-spawner-user");
/// Header carrying, in path mode, what the app is mounted under.
pub const X_FORWARDED_PREFIX: HeaderName = HeaderName::from_static("x-forwarded-prefix");

/// Headers a client may not set for the app: the router sets them (or nobody does).
const CLIENT_HEADERS_DROPPED: [HeaderName; 6] = [
    X_FORWARDED_FOR,
    X_FORWARDED_PROTO,
    X_FORWARDED_HOST,
    X_FORWARDED_PREFIX,
    X_SPAWNER_USER,
    header::FORWARDED,
];

/// Of those, what a trusted proxy in front may set.
const FORWARDED_BY_TRUSTED: [HeaderName; 3] =
    [X_FORWARDED_FOR, X_FORWARDED_PROTO, X_FORWARDED_HOST];

type Body = Either<Incoming, Full<Bytes>>;

/// The upstream connections of one client connection: to one backend at a time (a client
/// connection almost always talks to one backend; a switch starts afresh).
type Kept<C> = Mutex<Option<(String, Arc<UpstreamConnections<C, Incoming>>)>>;

pub(crate) struct Router<C: Connect> {
    inner: Arc<Inner<C>>,
}

struct Inner<C: Connect> {
    backends: Backends,
    connector: C,
    config: RouterConfig,
    metrics: Arc<Metrics>,
    relay: RelaySettings,
    connections: Arc<Semaphore>,
    /// Names recorded WebSocket connections: a random prefix (unique to this router, so
    /// merged replicas' traces do not share ids) and a counter.
    trace_prefix: String,
    traced_connections: std::sync::atomic::AtomicU64,
}

impl<C: Connect> Router<C> {
    pub(crate) fn new(
        backends: Backends,
        connector: C,
        config: RouterConfig,
        metrics: Arc<Metrics>,
    ) -> Self {
        let connections = Arc::new(Semaphore::new(config.max_connections));
        Self {
            inner: Arc::new(Inner {
                backends,
                connector,
                config,
                metrics,
                relay: RelaySettings {
                    ping_interval: Duration::from_secs(30),
                    max_missed_pongs: 2,
                    close_linger: Duration::from_secs(5),
                    // Not the sidecar's: the router must pass on the pongs answering the
                    // sidecar's pings, which reach the client through it.
                    ping_payload: spawner_proxy::websocket::ROUTER_PING_PAYLOAD,
                },
                connections,
                trace_prefix: spawner_core::id::new_backend_id("ws-").unwrap_or_default(),
                traced_connections: Default::default(),
            }),
        }
    }

    /// Accepts connections until the listener fails for good (never, for TCP).
    pub(crate) async fn serve<L: crate::Listener>(self, mut listener: L) {
        loop {
            // The cap: past it, connections wait in the kernel's accept queue.
            let Ok(permit) = self.inner.connections.clone().acquire_owned().await else {
                return;
            };
            let (io, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: pause rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let inner = self.inner.clone();
            match inner.config.tls.clone() {
                None => {
                    tokio::spawn(async move {
                        inner.connection::<L::Io>(io, peer).await;
                        drop(permit);
                    });
                }
                Some(tls) => {
                    tokio::spawn(async move {
                        // The handshake counts against the header-read timeout, so a client
                        // that never finishes it does not hold a connection slot.
                        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
                        let handshake = tokio::time::timeout(
                            inner.config.header_read_timeout,
                            acceptor.accept(io),
                        );
                        match handshake.await {
                            Ok(Ok(stream)) => {
                                inner
                                    .connection::<tokio_rustls::server::TlsStream<L::Io>>(
                                        stream, peer,
                                    )
                                    .await;
                            }
                            Ok(Err(e)) => {
                                tracing::debug!(error = %e, %peer, "TLS handshake failed")
                            }
                            Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                        }
                        drop(permit);
                    });
                }
            }
        }
    }
}

impl<C: Connect> Inner<C> {
    async fn connection<Io>(self: Arc<Self>, io: Io, peer: SocketAddr)
    where
        Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        self.metrics.connection_opened();
        let kept: Arc<Kept<C>> = Arc::new(Mutex::new(None));
        let peer_ip = HeaderValue::from_str(&peer.ip().to_string())
            .unwrap_or(HeaderValue::from_static("unknown"));
        // A load balancer we trust says who the client is; anyone else is not believed.
        let trusted = self.config.trusted_proxies.trusts(peer.ip());
        let service = {
            let inner = self.clone();
            let kept = kept.clone();
            service_fn(move |req| {
                let inner = inner.clone();
                let kept = kept.clone();
                let peer_ip = peer_ip.clone();
                async move {
                    Ok::<_, Infallible>(inner.handle::<Io>(req, &kept, peer_ip, trusted).await)
                }
            })
        };
        let mut builder = http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(self.config.header_read_timeout)
            .max_buf_size(self.config.max_header_bytes.max(8192));
        let conn = builder
            .serve_connection(TokioIo::new(io), service)
            .with_upgrades();
        tokio::pin!(conn);
        // The kept upstream connection's I/O runs in this task next to the client's, so a
        // request and its response never hop between tasks. It is polled after the client side
        // so a connection dialled during this poll starts at once.
        let result = std::future::poll_fn(|cx| {
            let polled = conn.as_mut().poll(cx);
            let current = kept
                .lock()
                .ok()
                .and_then(|k| k.as_ref().map(|(_, u)| u.clone()));
            if let Some(upstreams) = current {
                let _ = upstreams.poll_driver(cx);
            }
            polled
        })
        .await;
        if let Err(e) = result {
            tracing::debug!(error = %e, %peer, "client connection ended with an error");
        }
        self.metrics.connection_closed();
    }

    async fn handle<Io>(
        self: &Arc<Self>,
        req: Request<Incoming>,
        kept: &Kept<C>,
        peer_ip: HeaderValue,
        trusted: bool,
    ) -> Response<Body>
    where
        Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let started = Instant::now();
        let upgrade = websocket::is_upgrade(&req);
        let (outcome, response) = self
            .route_and_forward::<Io>(req, kept, peer_ip, trusted, upgrade, started)
            .await;
        self.metrics.count(upgrade, outcome);
        response
    }

    async fn route_and_forward<Io>(
        self: &Arc<Self>,
        req: Request<Incoming>,
        kept: &Kept<C>,
        peer_ip: HeaderValue,
        trusted: bool,
        upgrade: bool,
        started: Instant,
    ) -> (Outcome, Response<Body>)
    where
        Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_string);
        let path_and_query = req
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string();
        let target = match route::route(&self.config.mode, host.as_deref(), &path_and_query) {
            Ok(target) => target,
            Err(e) => return self.not_routed(&req, e),
        };

        let lookup = self.backends.lookup(&target.backend);
        if let Lookup::Ended(phase) = lookup {
            return gone(&target.backend, phase);
        }
        let public = matches!(
            lookup,
            Lookup::Starting { public: true, .. } | Lookup::Ready { public: true, .. }
        );
        let user = if public {
            None
        } else {
            match self.decide(&req, &target, &path_and_query, upgrade) {
                Access::Granted { user } => user,
                Access::Redirect {
                    location,
                    set_cookie,
                } => return (Outcome::Redirected, redirect(&location, &set_cookie)),
                // No valid credential for a backend the cache does not know: say only that it
                // is not there.
                Access::Denied(_) if lookup == Lookup::Unknown => {
                    return (Outcome::NotFound, unknown(&target.backend));
                }
                Access::Denied(denial) => {
                    return (
                        Outcome::Unauthorized,
                        error(
                            StatusCode::UNAUTHORIZED,
                            denial.code(),
                            &denial.message(),
                            None,
                        ),
                    );
                }
            }
        };

        let (upstream_addr, waited) = match lookup {
            Lookup::Ready { upstream, .. } => (upstream, false),
            _ => match self
                .backends
                .wait_ready(&target.backend, self.config.wait_ready)
                .await
            {
                Lookup::Ready { upstream, .. } => (upstream, true),
                Lookup::Ended(phase) => return gone(&target.backend, phase),
                Lookup::Unknown => return (Outcome::NotFound, unknown(&target.backend)),
                Lookup::Starting { phase, .. } => {
                    let mut response = error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "not_ready",
                        &format!(
                            "backend {} is {phase}, not Ready after {} s",
                            target.backend,
                            self.config.wait_ready.as_secs()
                        ),
                        Some(phase.as_str()),
                    );
                    response
                        .headers_mut()
                        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                    return (Outcome::NotReady, response);
                }
            },
        };

        let (mut parts, body) = req.into_parts();
        let Ok(uri) =
            access::without_query_param(&target.path_and_query, QUERY_PARAM).parse::<Uri>()
        else {
            return (
                Outcome::BadRequest,
                error(
                    StatusCode::BAD_REQUEST,
                    "bad_path",
                    "the path is not acceptable",
                    None,
                ),
            );
        };
        parts.uri = uri;
        self.prepare_headers(
            &mut parts.headers,
            host.as_deref(),
            user.as_deref(),
            &target,
            trusted,
        );
        let upstream = Upstream::new(self.connector.clone(), upstream_addr.clone());
        let outcome = if waited {
            Outcome::Waited
        } else {
            Outcome::Routed
        };
        self.metrics.routing_latency(started.elapsed());

        if upgrade {
            let req = Request::from_parts(parts, body);
            return match websocket::forward_handshake(&upstream, req, &peer_ip).await {
                Ok(Handshake::Declined(response)) => (outcome, response.map(Either::Left)),
                Ok(Handshake::Accepted { response, upgrade }) => {
                    let inner = self.clone();
                    let traced = self.trace_connection(&target.backend, user.as_deref());
                    tokio::spawn(async move {
                        let observer = traced.as_ref().map(TracedConnection::observer);
                        let Some(relay) = upgrade.connect_observed::<Io, C::Io>(observer).await
                        else {
                            if let Some(traced) = &traced {
                                traced.ended();
                            }
                            return;
                        };
                        inner.metrics.websocket_opened();
                        let end = relay
                            .run(&inner.relay, |_, _| {}, std::future::pending())
                            .await;
                        tracing::debug!(?end, "websocket relay ended");
                        if let Some(traced) = &traced {
                            traced.ended();
                        }
                        inner.metrics.websocket_closed();
                    });
                    (
                        outcome,
                        response.map(|()| Either::Right(Full::new(Bytes::new()))),
                    )
                }
                Err(e) => upstream_failed(&upstream_addr, &e),
            };
        }

        forward_request_headers(&mut parts.headers, &peer_ip, false);
        let upstreams = {
            let Ok(mut slot) = kept.lock() else {
                return upstream_failed(&upstream_addr, &"lock poisoned");
            };
            match slot.as_ref() {
                Some((addr, u)) if *addr == upstream_addr => u.clone(),
                _ => {
                    let fresh = Arc::new(UpstreamConnections::new());
                    *slot = Some((upstream_addr.clone(), fresh.clone()));
                    fresh
                }
            }
        };
        match upstreams
            .send(&upstream, Request::from_parts(parts, body))
            .await
        {
            Ok(mut response) => {
                remove_hop_by_hop(response.headers_mut());
                (outcome, response.map(Either::Left))
            }
            Err(e) => upstream_failed(&upstream_addr, &e),
        }
    }

    /// Records that a WebSocket to `backend` opened, when recording: its session is the
    /// token's user (the api records a `/connect` with that `user` under the same session), or
    /// without one the connection alone.
    fn trace_connection(&self, backend: &str, user: Option<&str>) -> Option<TracedConnection> {
        let recorder = self.config.trace.clone()?;
        let n = self
            .traced_connections
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let conn: Arc<str> = format!("{}-{n}", self.trace_prefix).into();
        let session: Arc<str> = user.map_or_else(|| conn.clone(), Arc::from);
        let key: Arc<str> = self
            .backends
            .trace_key(backend)
            .map_or_else(|| Arc::from(backend), Arc::from);
        recorder.record(
            &session,
            &key,
            TraceEventKind::Connect {
                conn: conn.to_string(),
            },
        );
        Some(TracedConnection {
            recorder,
            session,
            key,
            conn,
            client_closed: Arc::default(),
        })
    }

    fn decide(
        &self,
        req: &Request<Incoming>,
        target: &Target,
        path_and_query: &str,
        upgrade: bool,
    ) -> Access {
        let cookies = joined(req, header::COOKIE);
        let authorization = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        let request = access::Request {
            backend: &target.backend,
            path_and_query,
            authorization,
            cookies: cookies.as_deref(),
            redirectable: !upgrade && matches!(*req.method(), Method::GET | Method::HEAD),
        };
        let policy = CookiePolicy {
            path: target.prefix.clone().unwrap_or_else(|| "/".to_string()),
            secure: self.config.https,
            ttl_seconds: self.config.session_ttl.as_secs(),
        };
        access::decide(
            &self.config.keys,
            &request,
            &policy,
            self.config.clock.now().as_second().max(0) as u64,
        )
    }

    /// What the app gets: the router's own credentials removed, `X-Forwarded-*` and
    /// `X-Spawner-User` from the router only; from a `trusted` proxy, its
    /// `X-Forwarded-For/Proto/Host` are kept (the proxy core appends the peer to `-For`).
    fn prepare_headers(
        &self,
        headers: &mut http::HeaderMap,
        host: Option<&str>,
        user: Option<&str>,
        target: &Target,
        trusted: bool,
    ) {
        for name in CLIENT_HEADERS_DROPPED {
            if !(trusted && FORWARDED_BY_TRUSTED.contains(&name)) {
                headers.remove(name);
            }
        }
        let cookies: Vec<String> = headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok().map(str::to_string))
            .collect();
        headers.remove(header::COOKIE);
        if let Some(rest) = access::without_cookie(&cookies.join("; "), SESSION_COOKIE)
            && let Ok(value) = HeaderValue::from_str(&rest)
        {
            headers.insert(header::COOKIE, value);
        }
        if headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .is_some_and(access::is_connect_bearer)
        {
            headers.remove(header::AUTHORIZATION);
        }
        if !headers.contains_key(X_FORWARDED_PROTO) {
            let proto = if self.config.https { "https" } else { "http" };
            headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
        }
        if !headers.contains_key(X_FORWARDED_HOST)
            && let Some(value) = host.and_then(|h| HeaderValue::from_str(h).ok())
        {
            headers.insert(X_FORWARDED_HOST, value);
        }
        if let Some(value) = user.and_then(|u| HeaderValue::from_str(u).ok()) {
            headers.insert(X_SPAWNER_USER, value);
        }
        if let Some(value) = target
            .prefix
            .as_deref()
            .and_then(|p| HeaderValue::from_str(p).ok())
        {
            headers.insert(X_FORWARDED_PREFIX, value);
        }
    }

    /// A request that names no backend: the router's own routes, else 400/404.
    fn not_routed(&self, req: &Request<Incoming>, e: RouteError) -> (Outcome, Response<Body>) {
        if matches!(*req.method(), Method::GET | Method::HEAD) {
            match req.uri().path() {
                // Ready to take traffic once the cache holds the backends.
                "/healthz" if self.backends.is_synced() => {
                    return (Outcome::Routed, text(StatusCode::OK, "ok\n".into()));
                }
                "/healthz" => {
                    let body = "backend cache not synced yet\n".into();
                    return (Outcome::Routed, text(StatusCode::SERVICE_UNAVAILABLE, body));
                }
                "/metrics" => {
                    let body = self.metrics.render(self.backends.len());
                    return (Outcome::Routed, text(StatusCode::OK, body));
                }
                _ => {}
            }
        }
        let (status, outcome) = match e {
            RouteError::NotOurs => (StatusCode::NOT_FOUND, Outcome::NotFound),
            RouteError::BadHost | RouteError::BadPath => {
                (StatusCode::BAD_REQUEST, Outcome::BadRequest)
            }
        };
        (outcome, error(status, e.code(), &e.to_string(), None))
    }
}

/// A WebSocket being recorded in the session trace.
struct TracedConnection {
    recorder: TraceRecorder,
    session: Arc<str>,
    key: Arc<str>,
    conn: Arc<str>,
    /// The client sent a close frame: its disconnect is clean.
    client_closed: Arc<std::sync::atomic::AtomicBool>,
}

impl TracedConnection {
    /// Records each whole message the client sends (its size only) and notes its close frame;
    /// runs on the relay's poll, and recording never blocks.
    fn observer(&self) -> ClientObserver {
        let recorder = self.recorder.clone();
        let (session, key, conn) = (self.session.clone(), self.key.clone(), self.conn.clone());
        let client_closed = self.client_closed.clone();
        Box::new(move |frame| match frame {
            ClientFrame::Message { bytes } => recorder.record(
                &session,
                &key,
                TraceEventKind::Message {
                    conn: conn.to_string(),
                    bytes,
                },
            ),
            ClientFrame::Close => {
                client_closed.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        })
    }

    /// The connection ended: clean when the client closed it with a close frame; not when it
    /// vanished (no close frame: reset, dropped, stopped answering pings).
    fn ended(&self) {
        let clean = self
            .client_closed
            .load(std::sync::atomic::Ordering::Relaxed);
        self.recorder.record(
            &self.session,
            &self.key,
            TraceEventKind::Disconnect {
                conn: self.conn.to_string(),
                clean,
            },
        );
    }
}

/// Every value of header `name`, joined with `; ` (browsers may split cookies over several).
fn joined(req: &Request<Incoming>, name: HeaderName) -> Option<String> {
    let values: Vec<&str> = req
        .headers()
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    (!values.is_empty()).then(|| values.join("; "))
}

fn gone(name: &str, phase: spawner_core::Phase) -> (Outcome, Response<Body>) {
    (
        Outcome::Gone,
        error(
            StatusCode::GONE,
            "backend_ended",
            &format!("backend {name} has ended ({phase})"),
            Some(phase.as_str()),
        ),
    )
}

fn unknown(name: &str) -> Response<Body> {
    error(
        StatusCode::NOT_FOUND,
        "not_found",
        &format!("no backend {name}"),
        None,
    )
}

fn upstream_failed(addr: &str, e: &dyn std::fmt::Display) -> (Outcome, Response<Body>) {
    tracing::warn!(upstream = addr, error = %e, "cannot reach the backend's sidecar");
    (
        Outcome::UpstreamError,
        error(
            StatusCode::BAD_GATEWAY,
            "upstream_unreachable",
            "the backend did not answer",
            None,
        ),
    )
}

/// A JSON error: `{"error": {"code", "message"}}`, with `phase` when it says something.
fn error(status: StatusCode, code: &str, message: &str, phase: Option<&str>) -> Response<Body> {
    let mut body = serde_json::json!({"error": {"code": code, "message": message}});
    if let Some(phase) = phase {
        body["phase"] = serde_json::Value::from(phase);
    }
    let mut response = Response::new(Either::Right(Full::new(Bytes::from(body.to_string()))));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn redirect(location: &str, set_cookie: &str) -> Response<Body> {
    let mut response = Response::new(Either::Right(Full::new(Bytes::new())));
    *response.status_mut() = StatusCode::FOUND;
    let headers = response.headers_mut();
    if let (Ok(location), Ok(cookie)) = (
        HeaderValue::from_str(location),
        HeaderValue::from_str(set_cookie),
    ) {
        headers.insert(header::LOCATION, location);
        headers.insert(header::SET_COOKIE, cookie);
    }
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

fn text(status: StatusCode, body: String) -> Response<Body> {
    let mut response = Response::new(Either::Right(Full::new(Bytes::from(body))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    response
}
