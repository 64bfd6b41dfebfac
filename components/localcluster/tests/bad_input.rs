//! Input nobody planned for gets the status the real API server gives, and the server keeps
//! serving: raw HTTP requests, so that a panic shows as a connection closed without a response.

use std::collections::HashMap;
use std::sync::Arc;

use spawner_localcluster::{Auth, Cluster, Identity, ServerConfig, SystemClock, serve};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const TOKEN: &str = "admin-token";

async fn start() -> std::net::SocketAddr {
    let config = ServerConfig {
        auth: Auth::tokens(HashMap::from([(TOKEN.to_string(), Identity::admin())])),
        ..ServerConfig::default()
    };
    let cluster = Cluster::new(config, Arc::new(SystemClock));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve(listener, cluster));
    addr
}

/// Sends one request on its own connection; the status code and the body, or `None` when the
/// server closed the connection without a response.
async fn request(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> Option<(u16, String)> {
    let mut conn = TcpStream::connect(addr).await.unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let content_type = if method == "PATCH" {
        "application/merge-patch+json"
    } else {
        "application/json"
    };
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{auth}Content-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    conn.write_all(body.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        conn.read_to_end(&mut out),
    )
    .await
    .expect("a response within 10 s");
    read.ok()?;
    let text = String::from_utf8_lossy(&out).into_owned();
    let code = text.get(9..12)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((code, body))
}

async fn admin(addr: std::net::SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    request(addr, method, path, Some(TOKEN), body)
        .await
        .unwrap_or_else(|| panic!("{method} {path} {body}: connection closed without a response"))
}

async fn still_serving(addr: std::net::SocketAddr) {
    let (code, _) = admin(addr, "GET", "/api/v1/namespaces/default/pods", "").await;
    assert_eq!(code, 200);
}

#[tokio::test]
async fn objects_of_the_wrong_shape_are_rejected_and_never_stored() {
    let addr = start().await;
    let cases = [
        (
            "/api/v1/namespaces/default/services",
            r#"{"metadata":{"name":"s1"},"spec":"x"}"#,
            "s1",
        ),
        (
            "/api/v1/namespaces/default/services",
            r#"{"metadata":{"name":"s2"},"spec":{"ports":"x"}}"#,
            "s2",
        ),
        (
            "/api/v1/namespaces",
            r#"{"metadata":{"name":"n1","labels":"x"}}"#,
            "n1",
        ),
        (
            "/api/v1/namespaces/default/pods",
            r#"{"metadata":{"name":"p1"},"spec":{"containers":[{"name":"a","image":"i"}],"terminationGracePeriodSeconds":9e12}}"#,
            "p1",
        ),
        (
            "/apis/spawner.dev/v1/namespaces/default/sessionlivedbackends",
            r#"{"metadata":{"name":"b1","labels":["x"]},"spec":{"template":{"spec":{"containers":[{"name":"a","image":"i"}]}}}}"#,
            "b1",
        ),
    ];
    for (path, body, name) in cases {
        let (code, answer) = admin(addr, "POST", path, body).await;
        assert_eq!(code, 400, "POST {path} {body}: {answer}");
        let (code, _) = admin(addr, "GET", &format!("{path}/{name}"), "").await;
        assert_eq!(code, 404, "{path}/{name} was stored");
        still_serving(addr).await;
    }
}

#[tokio::test]
async fn updates_of_the_wrong_shape_are_rejected() {
    let addr = start().await;
    let svc = r#"{"metadata":{"name":"s"},"spec":{"ports":[{"port":80}]}}"#;
    let (code, _) = admin(addr, "POST", "/api/v1/namespaces/default/services", svc).await;
    assert_eq!(code, 201);
    let path = "/api/v1/namespaces/default/services/s";
    let (code, answer) = admin(addr, "PUT", path, r#"{"metadata":{"name":"s"},"spec":"x"}"#).await;
    assert_eq!(code, 400, "{answer}");
    let (code, answer) = admin(addr, "PATCH", path, r#"{"spec":{"ports":"x"}}"#).await;
    assert_eq!(code, 400, "{answer}");
    let (code, answer) = admin(addr, "PATCH", path, r#"{"spec":"x"}"#).await;
    assert_eq!(code, 400, "{answer}");
    let ns = "/api/v1/namespaces/default";
    let (code, answer) = admin(
        addr,
        "PUT",
        ns,
        r#"{"metadata":{"name":"default","labels":7}}"#,
    )
    .await;
    assert_eq!(code, 400, "{answer}");
    still_serving(addr).await;
}

#[tokio::test]
async fn huge_grace_periods_and_watch_timeouts_are_answered() {
    let addr = start().await;
    let pod = r#"{"metadata":{"name":"p"},"spec":{"nodeName":"n","containers":[{"name":"a","image":"i"}]}}"#;
    let (code, _) = admin(addr, "POST", "/api/v1/namespaces/default/pods", pod).await;
    assert_eq!(code, 201);
    let big = r#"{"metadata":{"name":"q"},"spec":{"containers":[{"name":"a","image":"i"}],"terminationGracePeriodSeconds":9000000000000}}"#;
    let (code, answer) = admin(addr, "POST", "/api/v1/namespaces/default/pods", big).await;
    assert_eq!(code, 422, "{answer}");

    let path = "/api/v1/namespaces/default/pods/p";
    for query in [
        "?gracePeriodSeconds=9223372036854775807",
        "?gracePeriodSeconds=9000000000000",
    ] {
        let (code, answer) = admin(addr, "DELETE", &format!("{path}{query}"), "").await;
        assert_eq!(code, 422, "{query}: {answer}");
    }
    let (code, answer) = admin(
        addr,
        "DELETE",
        path,
        r#"{"gracePeriodSeconds":9223372036854775807}"#,
    )
    .await;
    assert_eq!(code, 422, "{answer}");

    // A watch with a huge timeout is served (its first bytes arrive) and the server goes on.
    let mut conn = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "GET /api/v1/namespaces/default/pods?watch=true&timeoutSeconds=18446744073709551615 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    let mut buf = [0u8; 12];
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        conn.read_exact(&mut buf),
    )
    .await
    .expect("watch answered in time")
    .expect("watch answered");
    assert_eq!(&buf[..], b"HTTP/1.1 200");
    still_serving(addr).await;

    // A normal graceful delete still works.
    let (code, answer) = admin(addr, "DELETE", &format!("{path}?gracePeriodSeconds=30"), "").await;
    assert_eq!(code, 200, "{answer}");
}

#[tokio::test]
async fn unauthenticated_requests_are_refused_before_their_body_is_read() {
    let addr = start().await;
    let (code, _) = request(addr, "GET", "/api/v1/namespaces", None, "")
        .await
        .expect("a response");
    assert_eq!(code, 401);
    let (code, _) = request(addr, "GET", "/api/v1/namespaces", Some("wrong"), "")
        .await
        .expect("a response");
    assert_eq!(code, 401);
    // Health stays public.
    let (code, _) = request(addr, "GET", "/healthz", None, "")
        .await
        .expect("a response");
    assert_eq!(code, 200);

    // A 10 MB body announced by a caller without a token: 401 as soon as the head is read,
    // with no byte of the body sent.
    for token in [None, Some(TOKEN)] {
        let mut conn = TcpStream::connect(addr).await.unwrap();
        let auth = token
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        let head = format!(
            "POST /api/v1/namespaces/default/pods HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\nContent-Length: 10000000\r\n\r\n"
        );
        conn.write_all(head.as_bytes()).await.unwrap();
        let mut buf = [0u8; 12];
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            conn.read_exact(&mut buf),
        )
        .await
        .expect("answered before the body was sent")
        .expect("answered");
        let expected: &[u8] = if token.is_some() {
            b"HTTP/1.1 413"
        } else {
            b"HTTP/1.1 401"
        };
        assert_eq!(&buf[..], expected);
    }
    still_serving(addr).await;
}

#[tokio::test]
async fn silent_connections_are_closed_after_the_header_timeout() {
    let config = ServerConfig {
        auth: Auth::tokens(HashMap::from([(TOKEN.to_string(), Identity::admin())])),
        limits: spawner_serve::Limits {
            header_read_timeout: std::time::Duration::from_secs(1),
            ..spawner_serve::Limits::default()
        },
        ..ServerConfig::default()
    };
    let cluster = Cluster::new(config, Arc::new(SystemClock));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve(listener, cluster));
    let mut silent = Vec::new();
    for _ in 0..200 {
        let mut conn = TcpStream::connect(addr).await.unwrap();
        conn.write_all(b"GET /api/v1/namespaces HTTP/1.1\r\n")
            .await
            .unwrap();
        silent.push(conn);
    }
    still_serving(addr).await;
    for conn in &mut silent {
        let mut rest = Vec::new();
        tokio::time::timeout(
            std::time::Duration::from_secs(20),
            conn.read_to_end(&mut rest),
        )
        .await
        .expect("closed after the header timeout")
        .ok();
    }
    still_serving(addr).await;
}
