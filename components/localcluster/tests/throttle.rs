//! Throttling (`Cluster::throttle`): callers are answered `429 Too Many Requests` with a
//! `Retry-After` as a real API server's priority and fairness answers them, administrators and
//! health checks are exempt, and everything is served again once it stops.

use std::collections::HashMap;
use std::sync::Arc;

use spawner_localcluster::{Auth, Cluster, Identity, ServerConfig, SystemClock, Throttle, serve};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn start() -> (std::net::SocketAddr, Cluster) {
    let config = ServerConfig {
        auth: Auth::tokens(HashMap::from([
            ("admin-token".to_string(), Identity::admin()),
            (
                "sa-token".to_string(),
                Identity::service_account("default", "default"),
            ),
        ])),
        ..ServerConfig::default()
    };
    let cluster = Cluster::new(config, Arc::new(SystemClock));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve(listener, cluster.clone()));
    (addr, cluster)
}

/// The whole response of one GET on its own connection.
async fn get(addr: std::net::SocketAddr, path: &str, token: &str) -> String {
    let mut conn = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {token}\r\n\r\n"
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        conn.read_to_end(&mut out),
    )
    .await
    .expect("a response within 10 s")
    .unwrap();
    String::from_utf8_lossy(&out).to_lowercase()
}

#[tokio::test]
async fn throttled_callers_are_told_when_to_come_back() {
    let (addr, cluster) = start().await;
    let pods = "/api/v1/namespaces/default/pods";
    cluster.throttle(Throttle {
        per_mille: 1000,
        retry_after_seconds: 3,
    });
    let answer = get(addr, pods, "sa-token").await;
    assert!(answer.starts_with("http/1.1 429"), "{answer}");
    assert!(answer.contains("\r\nretry-after: 3\r\n"), "{answer}");
    assert!(
        answer.contains("\"reason\":\"toomanyrequests\""),
        "{answer}"
    );
    assert!(answer.contains("\"retryafterseconds\":3"), "{answer}");
    // Administrators and health checks are exempt.
    assert!(
        get(addr, pods, "admin-token")
            .await
            .starts_with("http/1.1 200")
    );
    assert!(
        get(addr, "/readyz", "sa-token")
            .await
            .starts_with("http/1.1 200")
    );
    assert_eq!(
        cluster.throttled_requests(),
        [("system:serviceaccount:default:default".to_string(), 1)].into()
    );
    cluster.stop_throttling();
    let answer = get(addr, pods, "sa-token").await;
    assert!(!answer.starts_with("http/1.1 429"), "{answer}");
}
