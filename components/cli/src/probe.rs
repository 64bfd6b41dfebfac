//! `spawner probe URL`: a health check for images without a shell or curl (the component
//! images' Docker HEALTHCHECK). One HTTP/1.0 GET; succeeds on a 2xx status.

use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Debug, clap::Args)]
pub struct ProbeArgs {
    /// The URL to GET, `http://HOST:PORT/PATH`.
    pub url: String,
    /// Give up after this many milliseconds.
    #[arg(long, default_value_t = 2000)]
    pub timeout_ms: u64,
}

/// Host (with port) and path of an `http://` URL.
fn split_url(url: &str) -> anyhow::Result<(&str, &str)> {
    let Some(rest) = url.strip_prefix("http://") else {
        bail!("only http:// URLs can be probed: {url}");
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, "/"),
    };
    if authority.is_empty() || !authority.contains(':') {
        bail!("the URL needs a host and a port: {url}");
    }
    Ok((authority, path))
}

/// The status code of an HTTP response's first line.
fn status_code(head: &[u8]) -> Option<u16> {
    let line = head.split(|b| *b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.split_whitespace();
    parts.next().filter(|v| v.starts_with("HTTP/"))?;
    parts.next()?.parse().ok()
}

pub async fn run(args: ProbeArgs) -> anyhow::Result<()> {
    let (authority, path) = split_url(&args.url)?;
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(authority)
            .await
            .with_context(|| format!("cannot connect to {authority}"))?;
        let request = format!("GET {path} HTTP/1.0\r\nHost: {authority}\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        // The status line fits in the first read of any real server's answer; read until it
        // has arrived or the server closes.
        let mut head = Vec::with_capacity(256);
        let mut buf = [0u8; 256];
        while !head.contains(&b'\n') {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        anyhow::Ok(head)
    };
    let head = tokio::time::timeout(Duration::from_millis(args.timeout_ms), exchange)
        .await
        .with_context(|| format!("{} did not answer within {} ms", args.url, args.timeout_ms))??;
    match status_code(&head) {
        Some(code) if (200..300).contains(&code) => Ok(()),
        Some(code) => bail!("{} answered {code}", args.url),
        None => bail!("{} did not answer HTTP", args.url),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_into_authority_and_path() {
        assert_eq!(
            split_url("http://127.0.0.1:9090/_spawner/health").unwrap(),
            ("127.0.0.1:9090", "/_spawner/health")
        );
        assert_eq!(split_url("http://h:1").unwrap(), ("h:1", "/"));
        assert!(split_url("https://h:1/").is_err());
        assert!(split_url("http://h/").is_err());
    }

    #[test]
    fn status_codes_come_from_the_first_line() {
        assert_eq!(status_code(b"HTTP/1.1 200 OK\r\n"), Some(200));
        assert_eq!(
            status_code(b"HTTP/1.0 503 Service Unavailable\r\nx: y"),
            Some(503)
        );
        assert_eq!(status_code(b"SSH-2.0-OpenSSH\r\n"), None);
        assert_eq!(status_code(b""), None);
    }

    async fn serve_once(answer: &'static [u8]) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/healthz", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 512];
            let _ = conn.read(&mut buf).await;
            let _ = conn.write_all(answer).await;
        });
        url
    }

    #[tokio::test]
    async fn a_2xx_answer_passes_and_others_fail() {
        let url = serve_once(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
        run(ProbeArgs {
            url,
            timeout_ms: 2000,
        })
        .await
        .unwrap();
        let url = serve_once(b"HTTP/1.1 503 Service Unavailable\r\n\r\n").await;
        let err = run(ProbeArgs {
            url,
            timeout_ms: 2000,
        })
        .await
        .unwrap_err();
        assert!(err.to_string().contains("503"), "{err}");
    }

    #[tokio::test]
    async fn nothing_listening_fails() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        drop(listener);
        assert!(
            run(ProbeArgs {
                url,
                timeout_ms: 2000
            })
            .await
            .is_err()
        );
    }
}
