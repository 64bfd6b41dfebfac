//! The sidecar on turmoil's simulated network and clock: the same `run`, with simulated sockets
//! injected. The application binds only after 3 simulated seconds.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use spawner_core::state_stream::{SseParser, StateMessage};
use spawner_sidecar::{SidecarConfig, TurmoilConnector};

async fn app() -> Result<(), Box<dyn std::error::Error>> {
    tokio::time::sleep(Duration::from_secs(3)).await;
    let listener = turmoil::net::TcpListener::bind("0.0.0.0:8080").await?;
    loop {
        let (stream, _) = listener.accept().await?;
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(|_req: Request<hyper::body::Incoming>| async {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"simulated"))))
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn get(path: &str) -> Result<Response<hyper::body::Incoming>, Box<dyn std::error::Error>> {
    let stream = turmoil::net::TcpStream::connect("backend:9090").await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = Request::get(path)
        .header("host", "backend")
        .body(Empty::<Bytes>::new())?;
    Ok(sender.send_request(req).await?)
}

#[test]
fn the_sidecar_runs_on_the_simulated_network_and_clock() -> turmoil::Result {
    let mut sim = turmoil::Builder::new()
        .simulation_duration(Duration::from_secs(60))
        .build();
    sim.host("backend", || async {
        tokio::spawn(async {
            let _ = app().await;
        });
        let listener = turmoil::net::TcpListener::bind("0.0.0.0:9090").await?;
        let config = SidecarConfig {
            heartbeat_interval: Duration::from_secs(1),
            events_token: Some("sim-token".into()),
            ..SidecarConfig::new("127.0.0.1:8080")
        };
        spawner_sidecar::run(listener, TurmoilConnector, config, std::future::pending()).await?;
        Ok(())
    });
    sim.client("sweeper", async {
        let stream = turmoil::net::TcpStream::connect("backend:9090").await?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let req = Request::get("/_spawner/events")
            .header("host", "backend")
            .header("x-spawner-token", "sim-token")
            .body(Empty::<Bytes>::new())?;
        let mut body = sender.send_request(req).await?.into_body();
        let mut parser = SseParser::new();
        let mut events = Vec::new();
        let mut proxied = false;
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame?.into_data() {
                for message in parser.push(&data)? {
                    if let Some(event) = StateMessage::from_message(&message)? {
                        // Simulated time since the world started, as the app's 3 s are counted.
                        events.push((turmoil::sim_elapsed().unwrap_or_default(), event));
                    }
                }
            }
            let ready = events.iter().any(|(_, e)| e.state().ready);
            if ready && !proxied {
                let response = get("/hello").await?;
                assert_eq!(response.status(), 200);
                let text = response.into_body().collect().await?.to_bytes();
                assert_eq!(&text[..], b"simulated");
                proxied = true;
            }
            if let Some((_, StateMessage::Heartbeat(state))) = events.last()
                && proxied
                && state.seconds_since_active >= 5
            {
                break;
            }
        }
        let (_, first) = events.first().expect("an event at once");
        assert!(!first.state().ready, "not ready before the app binds");
        let (became_ready_at, _) = events
            .iter()
            .find(|(_, e)| e.state().ready)
            .expect("ready once the app binds");
        assert!(
            *became_ready_at >= Duration::from_secs(3),
            "ready at {became_ready_at:?}"
        );
        // Simulated time drives the idle clock: a few simulated seconds after the request.
        let (_, last) = events.last().expect("events");
        assert_eq!(last.state().live_connections, 0);
        assert!(last.state().seconds_since_active >= 5);
        Ok(())
    });
    sim.run()
}
