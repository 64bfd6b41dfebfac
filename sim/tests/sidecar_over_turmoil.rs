//! The production sidecar proxies WebSockets to an application over turmoil, counts them, and
//! streams its state to a subscriber with the events token.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use spawner_sim::net::{SimListener, SimSidecarConnector};
use tokio_tungstenite::tungstenite::Message;

spawner_sim::install_entropy_hook!();

#[test]
fn sidecar_counts_simulated_websockets() -> turmoil::Result {
    let mut sim = turmoil::Builder::new()
        .simulation_duration(Duration::from_secs(120))
        .rng_seed(2)
        .build();
    let (handle_tx, handle_rx) = std::sync::mpsc::channel();
    sim.host("pod", move || {
        let handle_tx = handle_tx.clone();
        async move {
            let app = SimListener::bind(("0.0.0.0", 8080)).await?;
            tokio::spawn(async move {
                axum::serve(
                    app,
                    spawner_sim::app::router("sim-backend", Default::default()),
                )
                .await
            });
            let listener = SimListener::bind(("0.0.0.0", 9090)).await?;
            let config = spawner_sidecar::SidecarConfig::new("127.0.0.1:8080".to_string());
            let (handle, serve) = spawner_sidecar::run_with_handle(
                listener,
                SimSidecarConnector,
                config,
                std::future::pending(),
            )?;
            let _ = handle_tx.send(handle);
            serve.await?;
            Ok(())
        }
    });
    sim.client("user", async {
        // Give the sidecar time to see the app accept connections.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let stream = turmoil::net::TcpStream::connect(("pod", 9090)).await?;
        let (mut ws, _) = tokio_tungstenite::client_async("ws://pod:9090/ws", stream).await?;
        ws.send(Message::Text("hi".into())).await?;
        match ws.next().await {
            Some(Ok(Message::Text(t))) => assert_eq!(t.as_str(), "hi"),
            other => panic!("expected the echo, got {other:?}"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        ws.close(None).await?;
        drop(ws);
        tokio::time::sleep(Duration::from_secs(3)).await;
        Ok(())
    });
    let mut handle = None;
    let mut max_live = 0;
    while !sim.step()? {
        if handle.is_none() {
            handle = handle_rx.try_recv().ok();
        }
        if let Some(h) = &handle {
            let live = h.subscribe().borrow().live_connections;
            max_live = max_live.max(live);
        }
    }
    let handle = handle.expect("sidecar started");
    assert_eq!(max_live, 1, "one WebSocket was live");
    assert_eq!(handle.subscribe().borrow().live_connections, 0);
    Ok(())
}
