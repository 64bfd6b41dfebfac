//! One client connection: hyper's HTTP/1.1 server in front, requests routed to the control
//! paths (`/_spawner/`), the WebSocket relay or the application (through the proxy core's
//! [`UpstreamConnections`], one per client connection).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::server::conn::http1 as server_http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use spawner_proxy::bodyless::{BodylessError, BodylessResponse};
use spawner_proxy::headers::{forward_request_headers, origin_form, remove_hop_by_hop};
use spawner_proxy::{UpstreamConnections, UpstreamError};

use crate::body::{RequestBody, ResponseBody};
use crate::control::{self, CONTROL_PREFIX};
use crate::drain::{DrainState, TaskGuard};
use crate::head_timer::HeadTimer;
use crate::monitor::LiveGuard;
use crate::shared::Shared;
use crate::{Connect, Listener, websocket};

/// A client connection's state shared by its requests.
pub(crate) struct ClientConn<C: Connect> {
    pub shared: Arc<Shared<C>>,
    /// The client's address as an `X-Forwarded-For` entry, formatted once.
    pub peer_ip: HeaderValue,
    upstream: UpstreamConnections<C, RequestBody>,
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
        upstream: UpstreamConnections::new(),
    });
    let driver_state = Arc::clone(&conn_state);
    let upstream_driver = std::future::poll_fn(move |cx| driver_state.upstream.poll_driver(cx));
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
    if req.uri().path().starts_with(CONTROL_PREFIX) {
        return Ok(control::handle(&conn.shared, &req));
    }
    if spawner_proxy::websocket::is_upgrade(&req) {
        return Ok(websocket::proxy::<L, C>(&conn, req).await);
    }
    let shared = &conn.shared;
    let Some(guard) = shared.monitor.connection_started_unless_sealed() else {
        return Ok(control::sealed_response());
    };
    let limit = shared.config.max_request_body_bytes;
    if let Some(limit) = limit
        && content_length(req.headers()).is_some_and(|len| len > limit)
    {
        return Ok(control::plain(
            StatusCode::PAYLOAD_TOO_LARGE,
            "request body too large\n",
        ));
    }
    if http_body::Body::is_end_stream(req.body()) && req.method() != Method::CONNECT {
        // The bodyless client writes the head itself: hop-by-hop headers are skipped and
        // `X-Forwarded-*` added while encoding (`headers::encode_forwarded_head`), not in the map.
        let exchange = conn
            .upstream
            .send_bodyless(&shared.upstream, &req, &conn.peer_ip)
            .await;
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
    forward_request_headers(&mut parts.headers, &conn.peer_ip, false);
    parts.uri = origin_form(&parts.uri);
    let req = Request::from_parts(
        parts,
        RequestBody::from_client(body, &shared.monitor, limit),
    );

    match conn.upstream.send(&shared.upstream, req).await {
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
        Err(e) => upstream_failure(shared, e),
    }
}

/// The client's response to a request without a body, which went through the bodyless client.
fn bodyless_response<C: Connect>(
    shared: &Shared<C>,
    exchange: Result<BodylessResponse<C::Io>, BodylessError>,
    guard: LiveGuard,
) -> Response<ResponseBody> {
    match exchange {
        Ok(BodylessResponse::Whole(mut parts, data)) => {
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
        Ok(BodylessResponse::Streaming(mut parts, body)) => {
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
        Err(BodylessError::Connect(e)) => upstream_failure(shared, UpstreamError::Connect(e)),
        Err(e) => {
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

/// What the client gets when a request could not be forwarded.
pub(crate) fn upstream_failure<C: Connect>(
    shared: &Shared<C>,
    error: UpstreamError,
) -> Response<ResponseBody> {
    match error {
        UpstreamError::Connect(e) => {
            tracing::warn!(upstream = %shared.config.upstream, error = %e, "application refused the connection");
            shared.monitor.upstream_unreachable();
            bad_gateway(format!(
                "502 Bad Gateway: the application is not accepting connections on {} ({e})\n",
                shared.config.upstream
            ))
        }
        UpstreamError::TooLarge => {
            control::plain(StatusCode::PAYLOAD_TOO_LARGE, "request body too large\n")
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

fn bad_gateway(text: String) -> Response<ResponseBody> {
    let mut response = Response::new(ResponseBody::full(text));
    *response.status_mut() = StatusCode::BAD_GATEWAY;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// hyper's default limit on request header fields (`hyper::proto::h1::role::DEFAULT_MAX_HEADERS`;
/// `tests/http.rs` checks that 100 fields pass and 101 get 431 with the default config).
const HYPER_DEFAULT_MAX_HEADERS: usize = 100;
