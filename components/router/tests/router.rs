//! The router against an in-process localcluster API server, with echo apps standing in for
//! backends' sidecars, over loopback sockets.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use spawner_router::Outcome;
use spawner_router::route::Mode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

mod support;

use support::*;

#[tokio::test]
async fn a_token_becomes_a_cookie_that_opens_only_its_backend() {
    let w = World::start(host_mode()).await;
    let (a_addr, _a) = echo_app("sb-a").await;
    let (b_addr, _b) = echo_app("sb-b").await;
    w.backend("sb-a", "Ready", Some(a_addr), false).await;
    w.backend("sb-b", "Ready", Some(b_addr), false).await;
    let token = w.token("sb-a", Some("alice@example.com"));

    // No credential: 401, the app never sees it.
    let answer = get(w.router, "sb-a.localhost", "/", "").await;
    assert_eq!(answer.status, 401, "{}", answer.body);
    assert_eq!(answer.json()["error"]["code"], "token_missing");

    // The token: 302 to the same URL without it, with the session cookie.
    let answer = get(
        w.router,
        "sb-a.localhost:8000",
        &format!("/game?x=1&spawner_token={token}"),
        "",
    )
    .await;
    assert_eq!(answer.status, 302, "{}", answer.body);
    assert_eq!(answer.header("location"), Some("/game?x=1"));
    let set_cookie = answer.header("set-cookie").expect("cookie").to_string();
    assert!(
        set_cookie.contains("HttpOnly; SameSite=Lax"),
        "{set_cookie}"
    );
    let cookie = set_cookie.split(';').next().expect("pair").to_string();

    // The cookie: routed, with the user, the router's X-Forwarded-*, without the cookie.
    let answer = get(
        w.router,
        "sb-a.localhost:8000",
        "/game?x=1",
        &format!(
            "Cookie: theme=dark; {cookie}\r\nX-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Host: evil\r\nX-Spawner-User: mallory\r\nX-Forwarded-Proto: https\r\n"
        ),
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let seen = answer.json();
    assert_eq!(seen["backend"], "sb-a");
    assert_eq!(seen["uri"], "/game?x=1");
    assert_eq!(seen["headers"]["x-spawner-user"], "alice@example.com");
    assert_eq!(seen["headers"]["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen["headers"]["x-forwarded-host"], "sb-a.localhost:8000");
    assert_eq!(seen["headers"]["x-forwarded-proto"], "http");
    assert_eq!(seen["headers"]["cookie"], "theme=dark");

    // Neither the token nor the cookie opens the other backend.
    let answer = get(
        w.router,
        "sb-b.localhost",
        &format!("/?spawner_token={token}"),
        "",
    )
    .await;
    assert_eq!(answer.status, 401);
    assert_eq!(answer.json()["error"]["code"], "token_other_backend");
    let answer = get(
        w.router,
        "sb-b.localhost",
        "/",
        &format!("Cookie: {cookie}\r\n"),
    )
    .await;
    assert_eq!(answer.status, 401);
    assert_eq!(answer.json()["error"]["code"], "token_other_backend");

    // A bearer token works for non-browser clients, and is not passed on.
    let answer = get(
        w.router,
        "sb-a.localhost",
        "/api",
        &format!("Authorization: Bearer {token}\r\n"),
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert!(answer.json()["headers"].get("authorization").is_none());

    // Expired: 401 saying so.
    w.now.fetch_add(301, Ordering::SeqCst);
    let answer = get(
        w.router,
        "sb-a.localhost",
        &format!("/?spawner_token={token}"),
        "",
    )
    .await;
    assert_eq!(answer.status, 401);
    assert_eq!(answer.json()["error"]["code"], "token_expired");
    // The cookie lives on.
    let answer = get(
        w.router,
        "sb-a.localhost",
        "/",
        &format!("Cookie: {cookie}\r\n"),
    )
    .await;
    assert_eq!(answer.status, 200);

    assert!(w.handle.metrics.requests(Outcome::Unauthorized) >= 4);
    assert_eq!(w.handle.metrics.requests(Outcome::Redirected), 1);
}

#[tokio::test]
async fn unknown_ended_public_and_bad_hosts() {
    let w = World::start(host_mode()).await;
    let (addr, _app) = echo_app("demo").await;
    w.backend("demo", "Ready", Some(addr), true).await;
    w.backend("sb-ended", "Swept", None, false).await;

    let answer = get(w.router, "demo.localhost", "/hello", "").await;
    assert_eq!(answer.status, 200, "public backends need no token");
    assert!(answer.json()["headers"].get("x-spawner-user").is_none());

    let answer = get(w.router, "sb-nope.localhost", "/", "").await;
    assert_eq!(answer.status, 404);
    let token = w.token("sb-ended", None);
    let answer = get(
        w.router,
        "sb-ended.localhost",
        &format!("/?spawner_token={token}"),
        "",
    )
    .await;
    assert_eq!(answer.status, 410);
    assert_eq!(answer.json()["error"]["code"], "backend_ended");
    assert_eq!(answer.json()["phase"], "Swept");

    assert_eq!(get(w.router, "example.com", "/", "").await.status, 404);
    assert_eq!(get(w.router, "a..localhost", "/", "").await.status, 400);
    let long = format!("{}.localhost", "a".repeat(300));
    assert_eq!(get(w.router, &long, "/", "").await.status, 400);
    assert_eq!(
        send(w.router, "GET / HTTP/1.1\r\n").await.status,
        400,
        "no Host header"
    );
    assert_eq!(
        get(w.router, "demo.localhost", "/a/../b", "").await.status,
        400
    );

    // The router's own routes on a host that is not a backend's.
    let answer = get(w.router, "10.0.0.1:8443", "/healthz", "").await;
    assert_eq!((answer.status, answer.body.as_str()), (200, "ok\n"));
    let answer = get(w.router, "10.0.0.1", "/metrics", "").await;
    assert!(
        answer
            .body
            .contains("spawner_router_requests_total{outcome=\"gone\"} 1"),
        "{}",
        answer.body
    );
    assert!(
        answer.body.contains("spawner_router_backends 2"),
        "{}",
        answer.body
    );
}

#[tokio::test]
async fn a_request_waits_for_a_starting_backend_within_the_bound() {
    let w = World::start_with(host_mode(), |c| c.wait_ready = Duration::from_secs(10)).await;
    let (addr, _app) = echo_app("sb-slow").await;
    w.backend("sb-slow", "Running", None, true).await;
    w.backend("sb-stuck", "Running", None, true).await;
    let router = w.router;
    let waiting = tokio::spawn(async move { get(router, "sb-slow.localhost", "/", "").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished());
    w.set_phase("sb-slow", "Ready", Some(addr)).await;
    let answer = waiting.await.expect("task");
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(w.handle.metrics.requests(Outcome::Waited), 1);

    // Ended while waiting: 410.
    let router = w.router;
    let waiting = tokio::spawn(async move { get(router, "sb-stuck.localhost", "/", "").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    w.set_phase("sb-stuck", "Failed", None).await;
    assert_eq!(waiting.await.expect("task").status, 410);
}

#[tokio::test]
async fn a_backend_that_stays_starting_is_503_after_the_bound() {
    let w = World::start_with(host_mode(), |c| c.wait_ready = Duration::from_millis(300)).await;
    w.backend("sb-slow", "Scheduled", None, true).await;
    let answer = get(w.router, "sb-slow.localhost", "/", "").await;
    assert_eq!(answer.status, 503);
    assert_eq!(answer.json()["phase"], "Scheduled");
    assert_eq!(answer.header("retry-after"), Some("1"));
}

#[tokio::test]
async fn path_mode_strips_the_prefix_and_scopes_the_cookie() {
    let w = World::start(Mode::Path { prefix: "b".into() }).await;
    let (addr, _app) = echo_app("sb-a").await;
    w.backend("sb-a", "Ready", Some(addr), false).await;
    let token = w.token("sb-a", None);
    let answer = get(
        w.router,
        "rooms.example.com",
        &format!("/b/sb-a/x/y?spawner_token={token}&q=1"),
        "",
    )
    .await;
    assert_eq!(answer.status, 302);
    assert_eq!(answer.header("location"), Some("/b/sb-a/x/y?q=1"));
    let set_cookie = answer.header("set-cookie").expect("cookie");
    assert!(set_cookie.contains("Path=/b/sb-a;"), "{set_cookie}");
    let cookie = set_cookie.split(';').next().expect("pair").to_string();
    let answer = get(
        w.router,
        "rooms.example.com",
        "/b/sb-a/x/y?q=1",
        &format!("Cookie: {cookie}\r\n"),
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let seen = answer.json();
    assert_eq!(seen["uri"], "/x/y?q=1");
    assert_eq!(seen["headers"]["x-forwarded-prefix"], "/b/sb-a");
    for path in [
        "/b/sb-a/../sb-b/",
        "/b/sb-a/%2e%2e/sb-b/",
        "/b/sb-a%2F..%2Fsb-b/",
    ] {
        let answer = get(
            w.router,
            "rooms.example.com",
            path,
            &format!("Cookie: {cookie}\r\n"),
        )
        .await;
        assert_eq!(answer.status, 400, "{path}");
    }
    assert_eq!(get(w.router, "x", "/other/", "").await.status, 404);
}

#[tokio::test]
async fn websockets_go_through_with_a_query_token_and_never_without() {
    let w = World::start(host_mode()).await;
    let (addr, _app) = ws_app("sb-ws").await;
    w.backend("sb-ws", "Ready", Some(addr), false).await;
    let token = w.token("sb-ws", Some("bob"));

    let stream = TcpStream::connect(w.router).await.expect("connect");
    let url = format!("ws://sb-ws.localhost/socket?spawner_token={token}");
    let (mut ws, response) = tokio_tungstenite::client_async(url, stream)
        .await
        .expect("handshake");
    assert_eq!(response.status(), 101);
    ws.send(Message::text("hello")).await.expect("send");
    let echoed = tokio::time::timeout(WAIT, ws.next())
        .await
        .expect("in time")
        .expect("message")
        .expect("ok");
    assert_eq!(echoed.into_text().expect("text").as_str(), "sb-ws:hello");
    assert_eq!(w.handle.metrics.upgrades(Outcome::Routed), 1);

    let stream = TcpStream::connect(w.router).await.expect("connect");
    let refused = tokio_tungstenite::client_async("ws://sb-ws.localhost/socket", stream).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 401)
        }
        other => panic!("expected 401, got {other:?}"),
    }
    assert_eq!(w.handle.metrics.upgrades(Outcome::Unauthorized), 1);
}

/// The router records each WebSocket in the session trace: its connect under the token's user
/// and the backend's key, every whole client message by size, its disconnect (clean when the
/// client closed it), all under opaque ids and without a byte of payload.
#[tokio::test]
async fn websockets_are_recorded_by_size_under_opaque_ids() {
    use spawner_core::trace::{Trace, TraceEventKind};
    use spawner_trace_recorder::{RecorderConfig, TraceRecorder, opaque_id};
    const TRACE_KEY: &[u8] = b"trace-key";
    let dir = std::env::temp_dir().join(format!("spawner-router-trace-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let path = dir.join("router.jsonl");
    let config = RecorderConfig::new(&path, TRACE_KEY, "router", "2026-12-05T00:00:00Z");
    let (recorder, recording) = TraceRecorder::start(config).expect("recorder");
    let w = World::start_with(host_mode(), |c| c.trace = Some(recorder.clone())).await;
    let (addr, _app) = ws_app("sb-rec").await;
    w.backend_with_key("sb-rec", Some("doc-7"), "Ready", Some(addr), false)
        .await;
    let open = |token: String| async move {
        let stream = TcpStream::connect(w.router).await.expect("connect");
        let url = format!("ws://sb-rec.localhost/socket?spawner_token={token}");
        let (ws, _) = tokio_tungstenite::client_async(url, stream)
            .await
            .expect("handshake");
        ws
    };
    async fn echo(ws: &mut tokio_tungstenite::WebSocketStream<TcpStream>) -> Message {
        tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("in time")
            .expect("message")
            .expect("ok")
    }

    // Alice's tab: two messages, a close.
    let mut alice = open(w.token("sb-rec", Some("alice"))).await;
    alice.send(Message::text("hello")).await.expect("send");
    echo(&mut alice).await;
    alice
        .send(Message::Binary(vec![7u8; 300].into()))
        .await
        .expect("send");
    alice
        .send(Message::text("payload-secret"))
        .await
        .expect("send");
    echo(&mut alice).await;
    alice.close(None).await.expect("close");
    while let Some(Ok(_)) = alice.next().await {}
    // A tab without a user that vanishes: no close frame.
    let mut anonymous = open(w.token("sb-rec", None)).await;
    anonymous.send(Message::text("x")).await.expect("send");
    echo(&mut anonymous).await;
    drop(anonymous);

    // Two connects, four messages, two disconnects.
    let deadline = tokio::time::Instant::now() + WAIT;
    while recorder.stats().accepted < 8 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:?}",
            recorder.stats()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stats = tokio::task::spawn_blocking(move || recording.finish())
        .await
        .expect("finish");
    assert_eq!((stats.written, stats.dropped_full), (8, 0), "{stats:?}");
    let text = std::fs::read_to_string(&path).expect("trace");
    for raw in ["alice", "hello", "payload-secret", "doc-7", "sb-rec"] {
        assert!(!text.contains(raw), "{raw} in {text}");
    }
    let trace = Trace::read(text.as_bytes()).expect("a valid trace");
    let alice_id = opaque_id(TRACE_KEY, "alice");
    let key = opaque_id(TRACE_KEY, "doc-7");
    assert!(trace.events.iter().all(|e| e.key == key), "{text}");
    let (alices, others): (Vec<_>, Vec<_>) =
        trace.events.iter().partition(|e| e.session == alice_id);
    let shape = |events: &[&spawner_core::trace::TraceEvent]| -> Vec<String> {
        events
            .iter()
            .map(|e| match &e.kind {
                TraceEventKind::Connect { .. } => "connect".to_string(),
                TraceEventKind::Message { bytes, .. } => format!("message {bytes}"),
                TraceEventKind::Disconnect { clean, .. } => format!("disconnect clean={clean}"),
                TraceEventKind::Spawn => "spawn".to_string(),
            })
            .collect()
    };
    assert_eq!(
        shape(&alices),
        [
            "connect",
            "message 5",
            "message 300",
            "message 14",
            "disconnect clean=true"
        ]
    );
    assert_eq!(
        shape(&others),
        ["connect", "message 1", "disconnect clean=false"]
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// Behind a TLS-terminating load balancer: the forwarding headers of a trusted peer are kept
/// (the peer appended to `X-Forwarded-For`); an untrusted peer's are replaced, as always.
#[tokio::test]
async fn forwarding_headers_are_believed_from_trusted_proxies_only() {
    use spawner_router::trust::TrustedProxies;
    let (addr, _app) = echo_app("sb-lb").await;
    let claimed = "X-Forwarded-For: 203.0.113.7\r\nX-Forwarded-Proto: https\r\n\
                   X-Forwarded-Host: rooms.example.com\r\nX-Spawner-User: mallory\r\n";
    for (ranges, expected) in [
        (
            vec!["10.0.0.0/8", "127.0.0.0/8"],
            ("203.0.113.7, 127.0.0.1", "https", "rooms.example.com"),
        ),
        (vec!["10.0.0.0/8"], ("127.0.0.1", "http", "sb-lb.localhost")),
    ] {
        let trusted = TrustedProxies::parse(ranges.iter().copied()).expect("ranges");
        let w = World::start_with(host_mode(), |c| c.trusted_proxies = trusted).await;
        w.backend("sb-lb", "Ready", Some(addr), true).await;
        let answer = get(w.router, "sb-lb.localhost", "/", claimed).await;
        assert_eq!(answer.status, 200, "{}", answer.body);
        let seen = answer.json();
        let headers = &seen["headers"];
        assert_eq!(
            (
                headers["x-forwarded-for"].as_str(),
                headers["x-forwarded-proto"].as_str(),
                headers["x-forwarded-host"].as_str(),
            ),
            (Some(expected.0), Some(expected.1), Some(expected.2)),
            "trusting {ranges:?}: {seen}"
        );
        // The router's own headers are never taken from anyone.
        assert!(headers.get("x-spawner-user").is_none(), "{seen}");
    }
}

#[tokio::test]
async fn a_slow_request_head_is_cut_off() {
    let w = World::start_with(host_mode(), |c| {
        c.header_read_timeout = Duration::from_millis(300);
    })
    .await;
    let mut stream = TcpStream::connect(w.router).await.expect("connect");
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: x.localhost\r\n")
        .await
        .expect("write");
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest)).await;
    assert!(
        read.is_ok(),
        "the router kept a slow client past its header timeout"
    );
}

#[tokio::test]
async fn https_with_a_given_certificate_sets_secure_cookies() {
    let certified =
        rcgen::generate_simple_self_signed(vec!["*.rooms.test".to_string()]).expect("certificate");
    let cert_pem = certified.cert.pem();
    let key_pem = certified.signing_key.serialize_pem();
    let tls = spawner_router::config::tls_config(cert_pem.as_bytes(), key_pem.as_bytes())
        .expect("tls config");
    let w = World::start_with(
        Mode::Host {
            domain: "rooms.test".into(),
        },
        |c| {
            c.tls = Some(tls);
            c.https = true;
        },
    )
    .await;
    let (addr, _app) = echo_app("sb-a").await;
    w.backend("sb-a", "Ready", Some(addr), false).await;
    let token = w.token("sb-a", None);

    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    roots.add(certified.cert.der().clone()).expect("root");
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let client = tokio_rustls::rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let tcp = TcpStream::connect(w.router).await.expect("connect");
    let server_name = rustls_pki_types::ServerName::try_from("sb-a.rooms.test").expect("name");
    let mut tls_stream = connector
        .connect(server_name, tcp)
        .await
        .expect("TLS handshake");
    let request = format!(
        "GET /?spawner_token={token} HTTP/1.1\r\nHost: sb-a.rooms.test\r\nConnection: close\r\n\r\n"
    );
    tls_stream
        .write_all(request.as_bytes())
        .await
        .expect("write");
    let mut raw = Vec::new();
    // A TLS peer may end without close_notify after `Connection: close`: read what came.
    let _ = tokio::time::timeout(WAIT, tls_stream.read_to_end(&mut raw)).await;
    let text = String::from_utf8_lossy(&raw);
    assert!(text.starts_with("HTTP/1.1 302"), "{text}");
    assert!(text.contains("; Secure"), "{text}");

    // Plain HTTP to a TLS port is not served.
    let mut plain = TcpStream::connect(w.router).await.expect("connect");
    plain
        .write_all(b"GET / HTTP/1.1\r\nHost: sb-a.rooms.test\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(WAIT, plain.read_to_end(&mut raw)).await;
    assert!(
        !String::from_utf8_lossy(&raw).starts_with("HTTP/1.1"),
        "plain HTTP was answered on the TLS port"
    );
}

#[tokio::test]
async fn connections_past_the_cap_wait_until_one_closes() {
    let w = World::start_with(host_mode(), |c| c.max_connections = 1).await;
    let (addr, _app) = echo_app("demo").await;
    w.backend("demo", "Ready", Some(addr), true).await;
    // The first connection stays open (keep-alive) after its request.
    let mut first = TcpStream::connect(w.router).await.expect("connect");
    first
        .write_all(b"GET / HTTP/1.1\r\nHost: demo.localhost\r\n\r\n")
        .await
        .expect("write");
    let mut buf = [0u8; 1024];
    let n = tokio::time::timeout(WAIT, first.read(&mut buf))
        .await
        .expect("first answered")
        .expect("read");
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    // The second is accepted by the kernel but not served while the first is open.
    let router = w.router;
    let second = tokio::spawn(async move { get(router, "demo.localhost", "/", "").await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!second.is_finished(), "served past the connection cap");
    drop(first);
    let answer = tokio::time::timeout(WAIT, second)
        .await
        .expect("served once the first closed")
        .expect("task");
    assert_eq!(answer.status, 200);
}
