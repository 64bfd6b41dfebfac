//! Readiness, the event stream, its token, and graceful shutdown.

mod common;

use std::time::Duration;

use common::*;
use hyper::StatusCode;
use spawner_core::state_stream::StateMessage;
use spawner_sidecar::SidecarConfig;
use tokio::net::TcpListener;

#[tokio::test]
async fn not_ready_until_the_app_binds_and_the_event_stream_shows_both() {
    // Reserve a port, then free it: nothing listens there yet.
    let port_holder = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app_addr = port_holder.local_addr().unwrap();
    drop(port_holder);

    let sidecar = TestSidecar::start(test_config(app_addr)).await;
    let mut events = EventReader::open(sidecar.addr, None).await;
    let first = events.next().await;
    assert!(matches!(first, StateMessage::State(_)), "{first:?}");
    assert!(!first.state().ready);
    assert_eq!(
        fetch(sidecar.addr, "/_spawner/health").await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    let proxied = fetch(sidecar.addr, "/hello").await;
    assert_eq!(proxied.status, StatusCode::BAD_GATEWAY);
    // Heartbeats keep coming while not ready.
    let beat = events
        .until(|e| matches!(e, StateMessage::Heartbeat(_)))
        .await;
    assert!(!beat.state().ready);

    let app = HttpApp::serve(TcpListener::bind(app_addr).await.unwrap());
    let ready = events.until(|e| e.state().ready).await;
    assert!(matches!(ready, StateMessage::State(_)), "{ready:?}");
    assert_eq!(
        fetch(sidecar.addr, "/_spawner/health").await.status,
        StatusCode::OK
    );
    assert_eq!(
        fetch(sidecar.addr, "/hello").await.text(),
        "hello from the app"
    );

    // The app goes away: the periodic check notices without any request.
    drop(app);
    let gone = events.until(|e| !e.state().ready).await;
    assert_eq!(gone.state().live_connections, 0);
}

#[tokio::test]
async fn event_stream_reports_changes_and_heartbeats_with_growing_idle_time() {
    let app = WsApp::start().await;
    let sidecar = TestSidecar::ready(app.addr).await;
    let mut events = EventReader::open(sidecar.addr, None).await;
    let first = events.next().await;
    assert_eq!(first.state().live_connections, 0);
    assert!(first.state().ready);

    let ws = ws_connect(sidecar.addr, "/ws").await;
    let up = events.until(|e| e.state().live_connections == 1).await;
    assert!(matches!(up, StateMessage::State(_)));
    drop(ws);
    let down = events.until(|e| e.state().live_connections == 0).await;
    assert_eq!(down.state().seconds_since_active, 0);

    // Heartbeats carry seconds_since_active, growing from the close.
    let later = events
        .until(|e| matches!(e, StateMessage::Heartbeat(s) if s.seconds_since_active >= 2))
        .await;
    assert_eq!(later.state().live_connections, 0);
}

#[tokio::test]
async fn the_events_token_is_required_when_configured() {
    let app = HttpApp::start().await;
    let mut config = test_config(app.addr);
    config.events_token = Some("t0ken".into());
    let sidecar = TestSidecar::ready_with(config).await;

    let denied = fetch(sidecar.addr, "/_spawner/events").await;
    assert_eq!(denied.status, StatusCode::UNAUTHORIZED);
    let mut client = HttpClient::connect(sidecar.addr).await;
    let mut wrong = get("/_spawner/events");
    wrong
        .headers_mut()
        .insert("x-spawner-token", "nope".parse().unwrap());
    assert_eq!(client.request(wrong).await.status, StatusCode::UNAUTHORIZED);

    let mut events = EventReader::open(sidecar.addr, Some("t0ken")).await;
    assert!(events.next().await.state().ready);

    let mut bearer = get("/_spawner/events");
    bearer
        .headers_mut()
        .insert("authorization", "Bearer t0ken".parse().unwrap());
    let response = HttpClient::connect(sidecar.addr).await.send(bearer).await;
    assert_eq!(response.status(), StatusCode::OK);

    // Health stays open for the kubelet.
    assert_eq!(
        fetch(sidecar.addr, "/_spawner/health").await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn shutdown_finishes_requests_in_flight_and_stops_accepting() {
    let app = HttpApp::start().await;
    let sidecar = TestSidecar::ready(app.addr).await;
    let addr = sidecar.addr;
    let mut client = HttpClient::connect(addr).await;
    let in_flight = tokio::spawn(async move { client.get("/slow").await });
    sidecar.wait_live(1).await;
    let stopping = tokio::spawn(sidecar.stop());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !stopping.is_finished(),
        "the drain waits for the request in flight"
    );
    app.control.release.notify_one();
    assert_eq!(in_flight.await.unwrap().text(), "finally");
    tokio::time::timeout(PATIENCE, stopping)
        .await
        .unwrap()
        .unwrap();
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "no longer accepting"
    );
}

#[tokio::test]
async fn the_drain_is_bounded_by_its_timeout() {
    let app = WsApp::start().await;
    let mut config = test_config(app.addr);
    config.drain_timeout = Duration::from_millis(300);
    let sidecar = TestSidecar::ready_with(config).await;
    let mut ws = ws_connect(sidecar.addr, "/ws").await;
    ws_echo(&mut ws, "hi").await;
    let handle = sidecar.handle.clone();
    // A WebSocket that never closes does not hold the shutdown forever.
    tokio::time::timeout(PATIENCE, sidecar.stop())
        .await
        .unwrap();
    assert_eq!(handle.state().live_connections, 0);
}

/// Without a token the control paths are closed (outside development): nobody may read the
/// backend's idleness or seal it. Liveness is open (the kubelet probes it).
#[tokio::test]
async fn control_paths_are_closed_without_a_token() {
    let app = WsApp::start().await;
    let config = SidecarConfig {
        allow_unauthenticated_control: false,
        events_token: None,
        ..test_config(app.addr)
    };
    let sidecar = TestSidecar::ready_with(config).await;
    assert_eq!(
        fetch(sidecar.addr, "/_spawner/events").await.status,
        StatusCode::UNAUTHORIZED
    );
    for path in [
        "/_spawner/seal",
        "/_spawner/seal/permanent",
        "/_spawner/unseal",
    ] {
        let status = HttpClient::connect(sidecar.addr)
            .await
            .request(post(path, ""))
            .await
            .status;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}");
    }
    assert_eq!(
        fetch(sidecar.addr, "/_spawner/alive").await.status,
        StatusCode::OK
    );
    let mut ws = ws_connect(sidecar.addr, "/").await;
    ws_echo(&mut ws, "not sealed").await;
}

/// Sealing: refused while a connection is live, then once idle it succeeds and every new
/// connection is refused, so a sweep never races with a user connecting.
#[tokio::test]
async fn sealing_is_refused_while_live_and_then_refuses_new_connections() {
    let app = WsApp::start().await;
    let mut config = test_config(app.addr);
    config.events_token = Some("t0ken".into());
    let sidecar = TestSidecar::ready_with(config).await;
    let seal = |token: Option<&'static str>| async move {
        let mut request = post("/_spawner/seal", "");
        if let Some(token) = token {
            request
                .headers_mut()
                .insert("x-spawner-token", token.parse().unwrap());
        }
        HttpClient::connect(sidecar.addr)
            .await
            .request(request)
            .await
            .status
    };

    assert_eq!(seal(None).await, StatusCode::UNAUTHORIZED);
    let mut ws = ws_connect(sidecar.addr, "/").await;
    ws_echo(&mut ws, "hello").await;
    assert_eq!(seal(Some("t0ken")).await, StatusCode::CONFLICT);
    // A refused seal leaves the backend open.
    let mut second = ws_connect(sidecar.addr, "/").await;
    ws_echo(&mut second, "still open").await;
    drop(ws);
    drop(second);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while sidecar.handle.state().live_connections > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "connections never ended"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(seal(Some("t0ken")).await, StatusCode::OK);
    assert_eq!(
        fetch(sidecar.addr, "/anything").await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    let refused = tokio_tungstenite::client_async(
        format!("ws://{}/", sidecar.addr),
        tokio::net::TcpStream::connect(sidecar.addr).await.unwrap(),
    )
    .await;
    assert!(
        refused.is_err(),
        "a WebSocket to a sealed backend must be refused"
    );
    assert_eq!(sidecar.handle.state().live_connections, 0);
}
