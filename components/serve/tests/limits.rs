//! Slow clients, floods and panics against a served router, over loopback TCP. Bounded: at most
//! 2,000 connections, each wait capped.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use spawner_serve::{Limits, serve};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

async fn start(limits: Limits) -> (SocketAddr, oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = Router::new().route("/", get(|| async { "ok" })).route(
        "/panic",
        get(|| async {
            if true {
                panic!("handler panic (expected by the test)");
            }
            "unreachable"
        }),
    );
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, router, limits, async move {
        let _ = stopped.await;
    }));
    (addr, stop, server)
}

/// One request on a fresh connection: the status code, within 5 s.
async fn get_status(addr: SocketAddr, path: &str) -> u16 {
    let attempt = async {
        let mut conn = TcpStream::connect(addr).await.ok()?;
        let head = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        conn.write_all(head.as_bytes()).await.ok()?;
        let mut out = Vec::new();
        conn.read_to_end(&mut out).await.ok()?;
        String::from_utf8_lossy(&out).get(9..12)?.parse().ok()
    };
    tokio::time::timeout(Duration::from_secs(5), attempt)
        .await
        .expect("answered within 5 s")
        .expect("a response")
}

/// Waits (at most `limit`) until the server closes `conn`.
async fn closed_by_server(conn: &mut TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 512];
    let read = tokio::time::timeout(limit, async {
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                // A 408 may precede the close.
                Ok(_) => continue,
            }
        }
    });
    read.await.is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_half_sent_connections_are_closed_while_a_normal_client_is_served() {
    let limits = Limits {
        header_read_timeout: Duration::from_secs(2),
        max_connections: 4096,
    };
    let (addr, _stop, _server) = start(limits).await;
    let mut idle = Vec::new();
    for i in 0..2000 {
        let mut conn = TcpStream::connect(addr).await.unwrap();
        // Half the connections send half a request head, the others nothing at all.
        if i % 2 == 0 {
            conn.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
                .await
                .unwrap();
        }
        idle.push(conn);
    }
    // A normal client is served while the idle connections are open and as they are closed.
    let normal = tokio::spawn(async move {
        for _ in 0..20 {
            assert_eq!(get_status(addr, "/").await, 200);
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    });
    for conn in &mut idle {
        assert!(
            closed_by_server(conn, Duration::from_secs(20)).await,
            "an idle connection outlived the header-read timeout"
        );
    }
    normal.await.unwrap();
}

#[tokio::test]
async fn a_keep_alive_connection_is_closed_once_idle() {
    let limits = Limits {
        header_read_timeout: Duration::from_millis(500),
        max_connections: 16,
    };
    let (addr, _stop, _server) = start(limits).await;
    let mut conn = TcpStream::connect(addr).await.unwrap();
    conn.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 12];
    conn.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"HTTP/1.1 200");
    assert!(closed_by_server(&mut conn, Duration::from_secs(10)).await);
}

#[tokio::test]
async fn past_the_cap_connections_wait_until_one_closes() {
    let limits = Limits {
        header_read_timeout: Duration::from_secs(60),
        max_connections: 8,
    };
    let (addr, _stop, _server) = start(limits).await;
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(TcpStream::connect(addr).await.unwrap());
    }
    // The ninth is not served while the cap is full (the server would answer in
    // microseconds; it cannot answer at all until a slot frees).
    let ninth = tokio::spawn(get_status(addr, "/"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!ninth.is_finished(), "served past the connection cap");
    held.pop();
    assert_eq!(ninth.await.unwrap(), 200);
}

#[tokio::test]
async fn a_panicking_handler_is_a_500_and_the_server_goes_on() {
    let (addr, _stop, _server) = start(Limits::default()).await;
    assert_eq!(get_status(addr, "/panic").await, 500);
    assert_eq!(get_status(addr, "/").await, 200);
}

#[tokio::test]
async fn shutdown_stops_accepting_and_returns_once_connections_end() {
    let (addr, stop, server) = start(Limits::default()).await;
    let mut idle = TcpStream::connect(addr).await.unwrap();
    assert_eq!(get_status(addr, "/").await, 200);
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("serve returned")
        .unwrap();
    assert!(closed_by_server(&mut idle, Duration::from_secs(5)).await);
}
