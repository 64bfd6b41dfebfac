//! Plain HTTP through the sidecar: real loopback sockets, a real hyper application.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, StreamBody};
use hyper::StatusCode;
use hyper::body::Frame;

#[tokio::test]
async fn plain_requests_flow_over_keep_alive_with_forwarded_headers() {
    let app = HttpApp::start().await;
    let sidecar = TestSidecar::ready(app.addr).await;
    let mut client = HttpClient::connect(sidecar.addr).await;
    for _ in 0..3 {
        let reply = client.get("/hello").await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.text(), "hello from the app");
    }
    let mut req = get("/headers?x=1");
    let h = req.headers_mut();
    h.insert("connection", "keep-alive, x-hop".parse().unwrap());
    h.insert("x-hop", "secret".parse().unwrap());
    h.insert("keep-alive", "timeout=5".parse().unwrap());
    h.insert("x-forwarded-for", "203.0.113.9".parse().unwrap());
    h.insert("x-custom", "kept".parse().unwrap());
    let reply = client.request(req).await;
    let seen = reply.text();
    assert!(seen.starts_with("GET /headers?x=1\n"), "{seen}");
    assert!(
        seen.contains("x-forwarded-for: 203.0.113.9, 127.0.0.1\n"),
        "{seen}"
    );
    assert!(seen.contains("x-forwarded-proto: http\n"), "{seen}");
    assert!(seen.contains("x-forwarded-host: app.test\n"), "{seen}");
    assert!(seen.contains("host: app.test\n"), "{seen}");
    assert!(seen.contains("x-custom: kept\n"), "{seen}");
    assert!(!seen.contains("x-hop"), "{seen}");
    assert!(!seen.contains("keep-alive"), "{seen}");
    let reply = client.get("/nope").await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    sidecar.wait_live(0).await;
    sidecar.stop().await;
}

#[tokio::test]
async fn chunked_and_large_bodies_stream_both_ways() {
    let app = HttpApp::start().await;
    let sidecar = TestSidecar::ready(app.addr).await;
    let mut client = HttpClient::connect(sidecar.addr).await;

    let reply = client.get("/chunked?50").await;
    let expected: String = (0..50).map(|i| format!("chunk-{i};")).collect();
    assert_eq!(reply.text(), expected);

    let big = 8 * 1024 * 1024 + 17;
    let reply = client.get(&format!("/big?{big}")).await;
    assert_eq!(reply.body.len(), big);
    assert!(reply.body[..] == pattern(big)[..]);

    // A large upload with a known length, echoed back while it is being sent.
    let upload = pattern(6 * 1024 * 1024 + 3);
    let reply = client.request(post("/echo", upload.clone())).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(reply.body[..] == upload[..]);

    // A chunked upload (no length), many pieces.
    let pieces: Vec<Result<Frame<Bytes>, hyper::Error>> = upload
        .chunks(64 * 1024)
        .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
        .collect();
    let body = BodyExt::boxed(StreamBody::new(futures::stream::iter(pieces)));
    let req = hyper::Request::post("/echo")
        .header("host", "app.test")
        .body(body)
        .unwrap();
    let reply = client.request(req).await;
    assert!(reply.body[..] == upload[..]);
    sidecar.wait_live(0).await;
}

#[tokio::test]
async fn sse_from_the_app_flows_event_by_event() {
    let app = HttpApp::start().await;
    let sidecar = TestSidecar::ready(app.addr).await;
    let mut client = HttpClient::connect(sidecar.addr).await;
    let response = client.send(get("/sse")).await;
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut body = response.into_body();
    // The first event must arrive while the app still holds back the second one.
    let first = tokio::time::timeout(PATIENCE, body.frame())
        .await
        .expect("first event before the app continues")
        .expect("open")
        .expect("frame")
        .into_data()
        .expect("data");
    assert_eq!(&first[..], b"data: one\n\n");
    // While the stream is open the request is live.
    sidecar.wait_live(1).await;
    app.control.release.notify_one();
    let second = tokio::time::timeout(PATIENCE, body.frame())
        .await
        .expect("second event")
        .expect("open")
        .expect("frame")
        .into_data()
        .expect("data");
    assert_eq!(&second[..], b"data: two\n\n");
    sidecar.wait_live(0).await;
}

#[tokio::test]
async fn a_request_in_flight_is_live_until_it_ends_even_when_the_client_resets() {
    let app = HttpApp::start().await;
    let sidecar = TestSidecar::ready(app.addr).await;

    // Completed normally.
    let mut client = HttpClient::connect(sidecar.addr).await;
    let pending = tokio::spawn(async move { client.get("/slow").await });
    sidecar.wait_live(1).await;
    app.control.release.notify_one();
    assert_eq!(pending.await.unwrap().text(), "finally");
    sidecar.wait_live(0).await;

    // The client vanishes with a TCP reset while the app is still working.
    let stream = std::net::TcpStream::connect(sidecar.addr).unwrap();
    use std::io::Write;
    (&stream)
        .write_all(b"GET /slow HTTP/1.1\r\nhost: app.test\r\n\r\n")
        .unwrap();
    sidecar.wait_live(1).await;
    let socket = socket2_reset(stream);
    drop(socket);
    sidecar.wait_live(0).await;
    let state = sidecar.handle.state();
    assert_eq!(state.live_connections, 0);
}

/// Closes with SO_LINGER 0, so the peer gets a TCP reset instead of a FIN.
fn socket2_reset(stream: std::net::TcpStream) -> tokio::net::TcpStream {
    stream.set_nonblocking(true).unwrap();
    let stream = tokio::net::TcpStream::from_std(stream).unwrap();
    stream.set_zero_linger().unwrap();
    stream
}

#[tokio::test]
async fn app_not_accepting_gives_a_clear_502_and_not_ready() {
    let app = HttpApp::start().await;
    let sidecar = TestSidecar::ready(app.addr).await;
    assert_eq!(fetch(sidecar.addr, "/hello").await.status, StatusCode::OK);
    let addr = app.addr;
    drop(app);
    // The app's port is closed now: the next request cannot be forwarded.
    let reply = fetch(sidecar.addr, "/hello").await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    assert!(
        reply.text().contains("not accepting connections"),
        "{}",
        reply.text()
    );
    assert!(reply.text().contains(&addr.to_string()), "{}", reply.text());
    sidecar.wait_for(|a| !a.ready).await;
    let health = fetch(sidecar.addr, "/_spawner/health").await;
    assert_eq!(health.status, StatusCode::SERVICE_UNAVAILABLE);
    let metrics = fetch(sidecar.addr, "/_spawner/metrics").await.text();
    assert!(
        metrics.contains("spawner_sidecar_upstream_errors_total 1\n"),
        "{metrics}"
    );
    assert!(metrics.contains("spawner_sidecar_ready 0\n"), "{metrics}");
    sidecar.wait_live(0).await;
}

#[tokio::test]
async fn malformed_oversized_and_garbage_requests_get_4xx_and_disturb_nothing() {
    let app = HttpApp::start().await;
    let mut config = test_config(app.addr);
    config.max_header_bytes = 16 * 1024;
    config.max_request_body_bytes = Some(1024);
    let sidecar = TestSidecar::ready_with(config).await;

    // A healthy keep-alive client and a live request in flight throughout.
    let mut healthy = HttpClient::connect(sidecar.addr).await;
    assert_eq!(healthy.get("/hello").await.status, StatusCode::OK);
    let mut waiting = HttpClient::connect(sidecar.addr).await;
    let in_flight = tokio::spawn(async move { waiting.get("/slow").await });
    sidecar.wait_live(1).await;

    let answer = raw_exchange(sidecar.addr, b"this is not http at all\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    let answer = raw_exchange(sidecar.addr, b"GET / HTTP/1.1\r\nbad header line\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    let mut huge = b"GET /hello HTTP/1.1\r\nhost: a\r\n".to_vec();
    for i in 0..2000 {
        huge.extend_from_slice(format!("x-filler-{i}: {}\r\n", "y".repeat(20)).as_bytes());
    }
    huge.extend_from_slice(b"\r\n");
    let answer = raw_exchange(sidecar.addr, &huge).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    let answer = raw_exchange(
        sidecar.addr,
        b"POST /echo HTTP/1.1\r\nhost: a\r\ncontent-length: 5000\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    let garbage: Vec<u8> = (0..20_000u32).map(|i| (i * 7 % 256) as u8).collect();
    let answer = raw_exchange(sidecar.addr, &garbage).await;
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 4"),
        "{answer}"
    );

    // Nothing above was counted, the in-flight request is still the only live one, and the
    // healthy connection still works.
    assert_eq!(sidecar.handle.state().live_connections, 1);
    assert_eq!(healthy.get("/hello").await.text(), "hello from the app");
    app.control.release.notify_one();
    assert_eq!(in_flight.await.unwrap().text(), "finally");
    sidecar.wait_live(0).await;
}

/// A request head with `fields` header fields (a `host` and fillers).
fn head_with_fields(fields: usize) -> Vec<u8> {
    let mut head = b"GET /hello HTTP/1.1\r\nhost: a\r\n".to_vec();
    for i in 1..fields {
        head.extend_from_slice(format!("x-f{i}: v\r\n").as_bytes());
    }
    head.extend_from_slice(b"\r\n");
    head
}

/// `spawner_sidecar_requests_total`: requests the sidecar proxied.
async fn proxied_requests(sidecar: &TestSidecar) -> u64 {
    let metrics = fetch(sidecar.addr, "/_spawner/metrics").await.text();
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("spawner_sidecar_requests_total "))
        .and_then(|n| n.trim().parse().ok())
        .expect("requests_total in the metrics")
}

#[tokio::test]
async fn requests_with_more_header_fields_than_max_headers_get_431() {
    let app = HttpApp::start().await;
    // The default limit, 100 (left to hyper's inline default). At 100 fields the sidecar
    // proxies the request (the application, at its own limit of 100, refuses the three
    // `X-Forwarded-*` more); at 101 the sidecar refuses it without proxying.
    let sidecar = TestSidecar::ready(app.addr).await;
    let answer = raw_exchange(sidecar.addr, &head_with_fields(97)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("hello from the app"), "{answer}");
    assert_eq!(proxied_requests(&sidecar).await, 1);
    raw_exchange(sidecar.addr, &head_with_fields(100)).await;
    assert_eq!(proxied_requests(&sidecar).await, 2);
    let answer = raw_exchange(sidecar.addr, &head_with_fields(101)).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    assert_eq!(proxied_requests(&sidecar).await, 2);
    sidecar.stop().await;
    // A configured limit.
    let mut config = test_config(app.addr);
    config.max_headers = 10;
    let sidecar = TestSidecar::ready_with(config).await;
    let answer = raw_exchange(sidecar.addr, &head_with_fields(10)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let answer = raw_exchange(sidecar.addr, &head_with_fields(11)).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    assert_eq!(proxied_requests(&sidecar).await, 1);
    sidecar.wait_live(0).await;
}

/// Reads until the sidecar closes the connection; what it sent before.
async fn until_closed(stream: &mut tokio::net::TcpStream) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut out = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(PATIENCE, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return out,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => panic!("connection still open after {PATIENCE:?}"),
        }
    }
}

#[tokio::test]
async fn header_read_timeout_closes_slow_and_idle_connections_but_not_busy_ones() {
    use tokio::io::AsyncWriteExt;
    let app = HttpApp::start().await;
    let mut config = test_config(app.addr);
    config.header_read_timeout = Duration::from_millis(300);
    let sidecar = TestSidecar::ready_with(config).await;

    // A busy keep-alive connection outlives many timeout periods.
    let mut busy = HttpClient::connect(sidecar.addr).await;
    for _ in 0..12 {
        assert_eq!(busy.get("/hello").await.status, StatusCode::OK);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A head that never finishes.
    let mut slow = tokio::net::TcpStream::connect(sidecar.addr).await.unwrap();
    slow.write_all(b"GET /hello HTTP/1.1\r\nhost: a\r\n")
        .await
        .unwrap();
    assert!(until_closed(&mut slow).await.is_empty());
    // A keep-alive connection that goes quiet after its request.
    let mut idle = tokio::net::TcpStream::connect(sidecar.addr).await.unwrap();
    idle.write_all(b"GET /hello HTTP/1.1\r\nhost: a\r\n\r\n")
        .await
        .unwrap();
    let answer = String::from_utf8(until_closed(&mut idle).await).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("hello from the app"), "{answer}");
    sidecar.wait_live(0).await;
}

#[tokio::test]
async fn reserved_paths_are_not_proxied_and_not_counted() {
    let app = HttpApp::start().await;
    let sidecar = TestSidecar::ready(app.addr).await;
    let before = sidecar.handle.state();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let health = fetch(sidecar.addr, "/_spawner/health").await;
    assert_eq!(health.status, StatusCode::OK);
    let unknown = fetch(sidecar.addr, "/_spawner/other").await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    let metrics = fetch(sidecar.addr, "/_spawner/metrics").await;
    assert!(
        metrics
            .text()
            .contains("spawner_sidecar_requests_total 0\n")
    );
    assert_eq!(
        metrics.headers["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    // Probes are not activity: the idle time kept growing.
    let after = sidecar.handle.state();
    assert!(after.seconds_since_active > before.seconds_since_active);
    assert_eq!(after.live_connections, 0);
}

#[tokio::test]
async fn bodyless_exchanges_keep_their_framing_and_survive_closed_upstream_connections() {
    let app = HttpApp::start().await;
    let sidecar = TestSidecar::ready(app.addr).await;
    let mut client = HttpClient::connect(sidecar.addr).await;
    // The app closes its connection after this one; the next request needs a new one.
    let reply = client.get("/close").await;
    assert_eq!(reply.text(), "closing");
    assert_eq!(client.get("/hello").await.text(), "hello from the app");
    let head = hyper::Request::head("/hello")
        .header("host", "app.test")
        .body(http_body_util::BodyExt::boxed(
            http_body_util::Empty::new().map_err(|never: std::convert::Infallible| match never {}),
        ))
        .unwrap();
    let reply = client.request(head).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.headers["content-length"], "18");
    assert!(reply.body.is_empty());
    let reply = client.get("/nocontent").await;
    assert_eq!(reply.status, StatusCode::NO_CONTENT);
    assert!(reply.body.is_empty());
    assert_eq!(client.get("/hello").await.text(), "hello from the app");
    sidecar.wait_live(0).await;
}

/// An application that answers one request per connection and then closes it without saying
/// so: the sidecar's kept connection is dead by the next request.
async fn one_shot_app() -> (std::net::SocketAddr, Background) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut seen = Vec::new();
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await;
            });
        }
    });
    (addr, Background(task))
}

#[tokio::test]
async fn a_kept_connection_the_app_dropped_is_replaced_transparently() {
    let (addr, _app) = one_shot_app().await;
    let sidecar = TestSidecar::ready(addr).await;
    let mut client = HttpClient::connect(sidecar.addr).await;
    for _ in 0..5 {
        let reply = client.get("/anything").await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.text(), "ok");
        // Let the app's close reach the sidecar's kept connection.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let metrics = fetch(sidecar.addr, "/_spawner/metrics").await.text();
    assert!(
        metrics.contains("spawner_sidecar_upstream_errors_total 0\n"),
        "{metrics}"
    );
}
