//! WebSocket load for `bench/run.sh`.
//!
//! - `bench_ws echo <addr> <connections> <seconds> <message-bytes>`: every connection sends a
//!   message and waits for its echo, in a loop; prints JSON with messages/s and round-trip
//!   p50/p99 in microseconds.
//! - `bench_ws hold <addr> <connections>`: opens that many WebSockets, prints `ready`, keeps
//!   them idle until stdin closes, then closes them.
//!
//! `<addr>` is `host:port` (WebSocket at `/ws`) or `host:port/path` (at `/path/ws`).

use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

type Ws = tokio_tungstenite::WebSocketStream<TcpStream>;

/// `addr` is `host:port`, or `host:port/path` for a WebSocket at `/path/ws` (a router's path
/// mode).
async fn open(addr: &str) -> Ws {
    let (host, path) = addr.split_once('/').unwrap_or((addr, ""));
    let stream = TcpStream::connect(host).await.expect("connect");
    let _ = stream.set_nodelay(true);
    let url = if path.is_empty() {
        format!("ws://{host}/ws")
    } else {
        format!("ws://{host}/{path}/ws")
    };
    let (ws, _) = tokio_tungstenite::client_async(url, stream)
        .await
        .expect("websocket handshake");
    ws
}

async fn echo_loop(mut ws: Ws, until: Instant, size: usize) -> Vec<u32> {
    let payload = vec![b'x'; size];
    let mut rtts = Vec::with_capacity(100_000);
    while Instant::now() < until {
        let sent = Instant::now();
        ws.send(Message::binary(payload.clone()))
            .await
            .expect("send");
        loop {
            match ws.next().await {
                Some(Ok(Message::Binary(_))) => break,
                Some(Ok(_)) => continue,
                other => panic!("echo failed: {other:?}"),
            }
        }
        rtts.push(sent.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
    }
    let _ = ws.close(None).await;
    rtts
}

fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).map(String::as_str).unwrap_or("");
    let addr = args
        .get(2)
        .cloned()
        .unwrap_or_else(|| "127.0.0.1:18090".into());
    let n: usize = args.get(3).and_then(|v| v.parse().ok()).unwrap_or(32);
    match mode {
        "echo" => {
            let seconds: u64 = args.get(4).and_then(|v| v.parse().ok()).unwrap_or(10);
            let size: usize = args.get(5).and_then(|v| v.parse().ok()).unwrap_or(64);
            let mut conns = Vec::with_capacity(n);
            for _ in 0..n {
                conns.push(open(&addr).await);
            }
            let started = Instant::now();
            let until = started + Duration::from_secs(seconds);
            let tasks: Vec<_> = conns
                .into_iter()
                .map(|ws| tokio::spawn(echo_loop(ws, until, size)))
                .collect();
            let mut all = Vec::new();
            for t in tasks {
                all.extend(t.await.expect("echo task"));
            }
            let elapsed = started.elapsed().as_secs_f64();
            all.sort_unstable();
            println!(
                "{{\"messages\":{},\"messages_per_sec\":{:.0},\"p50_us\":{},\"p99_us\":{}}}",
                all.len(),
                all.len() as f64 / elapsed,
                percentile(&all, 0.50),
                percentile(&all, 0.99)
            );
        }
        "hold" => {
            let mut conns = Vec::with_capacity(n);
            for chunk in 0..n.div_ceil(100) {
                let batch = (n - chunk * 100).min(100);
                let opens: Vec<_> = (0..batch)
                    .map(|_| {
                        let addr = addr.clone();
                        tokio::spawn(async move { open(&addr).await })
                    })
                    .collect();
                for o in opens {
                    conns.push(o.await.expect("open"));
                }
            }
            println!("ready {}", conns.len());
            let _ = tokio::task::spawn_blocking(|| {
                let mut sink = Vec::new();
                std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink)
            })
            .await;
            for mut ws in conns {
                let _ = ws.close(None).await;
            }
        }
        _ => {
            eprintln!("usage: bench_ws echo|hold <addr> <connections> [seconds] [bytes]");
            std::process::exit(2);
        }
    }
}
