//! WebSockets through the sidecar: real loopback sockets, a real tokio-tungstenite application.

mod common;

use std::time::Duration;

use common::*;
use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn echo_and_exact_counts_up_and_down() {
    let app = WsApp::start().await;
    let sidecar = TestSidecar::ready(app.addr).await;
    let mut a = ws_connect(sidecar.addr, "/ws").await;
    sidecar.wait_live(1).await;
    let mut b = ws_connect(sidecar.addr, "/ws").await;
    sidecar.wait_live(2).await;
    ws_echo(&mut a, "hello").await;
    ws_echo(&mut b, &"x".repeat(100_000)).await;
    b.send(Message::binary(vec![1u8, 2, 3])).await.unwrap();
    assert_eq!(
        b.next().await.unwrap().unwrap(),
        Message::binary(vec![1u8, 2, 3])
    );

    // A clean close from the client.
    a.close(None).await.unwrap();
    while let Some(Ok(_)) = a.next().await {}
    sidecar.wait_live(1).await;
    // A client killed without a close frame: the socket is just dropped.
    drop(b);
    sidecar.wait_live(0).await;
    let metrics = fetch(sidecar.addr, "/_spawner/metrics").await.text();
    assert!(
        metrics.contains("spawner_sidecar_websockets_total 2\n"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_client_reset_is_counted_down() {
    let app = WsApp::start().await;
    let sidecar = TestSidecar::ready(app.addr).await;
    let mut ws = ws_connect(sidecar.addr, "/ws").await;
    ws_echo(&mut ws, "before reset").await;
    sidecar.wait_live(1).await;
    let stream = ws.into_inner();
    stream.set_zero_linger().unwrap();
    drop(stream);
    sidecar.wait_live(0).await;
}

#[tokio::test]
async fn an_upstream_close_reaches_the_client() {
    let app = WsApp::start().await;
    let sidecar = TestSidecar::ready(app.addr).await;
    let mut ws = ws_connect(sidecar.addr, "/close-after-first").await;
    ws.send(Message::text("bye")).await.unwrap();
    let mut saw_close = false;
    while let Some(message) = tokio::time::timeout(PATIENCE, ws.next()).await.unwrap() {
        match message {
            Ok(Message::Close(_)) => saw_close = true,
            Ok(_) => {}
            Err(_) => break,
        }
    }
    assert!(
        saw_close,
        "the application's close frame reached the client"
    );
    sidecar.wait_live(0).await;
}

#[tokio::test]
async fn a_half_open_client_is_detected_by_pings_and_counted_down() {
    let app = WsApp::start().await;
    let mut config = test_config(app.addr);
    config.ws_ping_interval = Duration::from_millis(200);
    config.ws_max_missed_pongs = 2;
    let sidecar = TestSidecar::ready_with(config).await;
    let relay = Relay::start(sidecar.addr).await;

    // A client that answers pings stays connected through several ping periods.
    let mut alive = ws_connect(relay.addr, "/ws").await;
    let mut quiet_but_alive = ws_connect(sidecar.addr, "/ws").await;
    sidecar.wait_live(2).await;
    let keep_reading = tokio::spawn(async move {
        // tungstenite answers pings while the stream is read.
        while let Some(Ok(message)) = quiet_but_alive.next().await {
            assert!(
                !matches!(message, Message::Pong(_)),
                "our pongs never reach clients"
            );
        }
    });
    let mut pings = 0;
    let started = tokio::time::Instant::now();
    while started.elapsed() < Duration::from_millis(1500) {
        match tokio::time::timeout(Duration::from_millis(300), alive.next()).await {
            Ok(Some(Ok(Message::Ping(payload)))) => {
                assert_eq!(&payload[..], b"spawner1");
                pings += 1;
            }
            Ok(other) => panic!("unexpected {other:?}"),
            Err(_) => {}
        }
    }
    assert!(pings >= 2, "quiet clients are pinged ({pings} pings)");
    assert_eq!(sidecar.handle.state().live_connections, 2);
    ws_echo(&mut alive, "still here").await;

    // Now the network between client and sidecar goes silent: no FIN, no RST, nothing.
    relay.go_silent();
    let silent_since = tokio::time::Instant::now();
    sidecar.wait_live(1).await;
    // Detected within ping_interval × (max_missed + 1) plus scheduling slack; bounded, not timed.
    assert!(silent_since.elapsed() < Duration::from_secs(10));
    let metrics = fetch(sidecar.addr, "/_spawner/metrics").await.text();
    assert!(
        metrics.contains("spawner_sidecar_websocket_dead_clients_total 1\n"),
        "{metrics}"
    );
    keep_reading.abort();
}

#[tokio::test]
async fn a_thousand_concurrent_websockets_are_counted_exactly() {
    const N: usize = 1000;
    let app = WsApp::start().await;
    let sidecar = TestSidecar::ready(app.addr).await;
    let mut clients = Vec::with_capacity(N);
    for batch in 0..(N / 100) {
        let opens: Vec<_> = (0..100)
            .map(|_| tokio::spawn(ws_connect(sidecar.addr, "/ws")))
            .collect();
        for open in opens {
            clients.push(open.await.unwrap());
        }
        sidecar.wait_live(((batch + 1) * 100) as u64).await;
    }
    assert_eq!(sidecar.handle.state().live_connections, N as u64);
    // Every one of them relays.
    let echoes: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, mut ws)| {
            tokio::spawn(async move {
                ws_echo(&mut ws, &format!("client {i}")).await;
                ws
            })
        })
        .collect();
    let mut clients = Vec::with_capacity(N);
    for echo in echoes {
        clients.push(echo.await.unwrap());
    }
    assert_eq!(sidecar.handle.state().live_connections, N as u64);

    // Half close cleanly, half just vanish.
    let closes: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, mut ws)| {
            tokio::spawn(async move {
                if i % 2 == 0 {
                    let _ = ws.close(None).await;
                    while let Some(Ok(_)) = ws.next().await {}
                } else {
                    drop(ws);
                }
            })
        })
        .collect();
    for close in closes {
        close.await.unwrap();
    }
    sidecar.wait_live(0).await;
    let closed_at = sidecar.handle.state();
    assert_eq!(closed_at.live_connections, 0);
    assert!(closed_at.seconds_since_active <= 1);
    // seconds_since_active grows from the last close.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let later = sidecar.handle.state();
    assert_eq!(later.live_connections, 0);
    assert!(later.seconds_since_active >= 2, "{later:?}");
}
