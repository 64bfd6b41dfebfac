//! `spawner controller | sweeper | api | router | node-agent`: one production component, as the
//! container image runs it (`spawner sidecar` is [`spawner_sidecar::run_per_core`], on runtimes
//! of its own). Each takes its configuration from flags or environment variables and its
//! Kubernetes client from the pod's service account (or `KUBECONFIG`).

use anyhow::Context;
use tokio::net::TcpListener;

/// How long a Kubernetes connection may stay silent before it is dropped and re-established
/// (75 s: the one rule of `spawner_assembly::kube_read_timeout` for a real API server).
pub const KUBE_READ_TIMEOUT: std::time::Duration =
    spawner_assembly::kube_read_timeout(spawner_assembly::API_SERVER_BOOKMARK_INTERVAL);

async fn kube_client() -> anyhow::Result<kube::Client> {
    let config = kube::Config::infer()
        .await
        .context("no Kubernetes client: not in a pod and no usable KUBECONFIG")?;
    Ok(kube::Client::try_from(with_read_timeout(
        config,
        KUBE_READ_TIMEOUT,
    ))?)
}

/// Sets `read_timeout`, counted from each request written. Without `reset_reader_on_write` the
/// clock of a pooled keep-alive connection runs while it sits idle (up to 90 s), so the first
/// request after a quiet spell as long as the timeout fails at once with "timed out".
fn with_read_timeout(mut config: kube::Config, timeout: std::time::Duration) -> kube::Config {
    config.read_timeout = Some(timeout);
    config.reset_reader_on_write = true;
    config
}

/// Accepted connections with Nagle's algorithm off, as Go's servers (Kubernetes among them) do
/// by default: a watch or SSE stream writes small events back to back, and with Nagle each one
/// after the first waits for the client's delayed ACK (measured: about 15 ms per event on an
/// idle loopback in `just bench-spawn`).
pub(crate) fn without_nagle(
    listener: TcpListener,
) -> impl axum::serve::Listener<Io = tokio::net::TcpStream, Addr = std::net::SocketAddr> {
    use axum::serve::ListenerExt as _;
    listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
    })
}

async fn bind(addr: std::net::SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))
}

pub async fn controller(args: spawner_controller::ControllerArgs) -> anyhow::Result<()> {
    let listener = bind(args.listen).await?;
    let client = kube_client().await?;
    spawner_controller::run(
        client,
        listener,
        args.into_config(),
        crate::shutdown_signal(),
    )
    .await
    .context("controller")
}

pub async fn sweeper(args: spawner_sweeper::SweeperArgs) -> anyhow::Result<()> {
    let listener = bind(args.listen).await?;
    let client = kube_client().await?;
    spawner_sweeper::run(
        client,
        listener,
        spawner_sweeper::tcp_transport(),
        args.into_config(),
        crate::shutdown_signal(),
    )
    .await
    .context("sweeper")
}

pub async fn api(args: spawner_api::ApiArgs) -> anyhow::Result<()> {
    let mut config = args.config()?;
    let listener = bind(args.listen).await?;
    let client = kube_client().await?;
    let recording = crate::trace::start_recording(
        &args.trace,
        "api",
        spawner_core::clock::to_chrono(config.clock.now()),
    )?;
    config.trace = recording.as_ref().map(|(recorder, _)| recorder.clone());
    let served = spawner_api::run(
        client,
        without_nagle(listener),
        config,
        crate::shutdown_signal(),
    )
    .await
    .context("api");
    crate::trace::finish_recording(recording).await;
    served
}

pub async fn router(args: spawner_router::RouterArgs) -> anyhow::Result<()> {
    let mut config = args.config()?;
    let listener = bind(args.listen).await?;
    let client = kube_client().await?;
    let recording = crate::trace::start_recording(&args.trace, "router", chrono::Utc::now())?;
    config.trace = recording.as_ref().map(|(recorder, _)| recorder.clone());
    spawner_router::run(
        listener,
        client,
        spawner_router::TcpConnector,
        config,
        crate::shutdown_signal(),
    )
    .await;
    crate::trace::finish_recording(recording).await;
    Ok(())
}

pub async fn node_agent(args: spawner_node_agent::NodeAgentArgs) -> anyhow::Result<()> {
    let client = kube_client().await?;
    let runtime = std::sync::Arc::new(args.process_runtime());
    spawner_node_agent::run(client, args.config(), runtime, crate::shutdown_signal())
        .await
        .context("node agent")
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A server that answers every request on a keep-alive connection after `delay`; counts
    /// the connections it accepted.
    async fn slow_server(delay: Duration) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    loop {
                        let Ok(n) = tcp.read(&mut buf).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        head.extend_from_slice(&buf[..n]);
                        if head.windows(4).any(|w| w == b"\r\n\r\n") {
                            head.clear();
                            tokio::time::sleep(delay).await;
                            let answer = "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\nok";
                            if tcp.write_all(answer.as_bytes()).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (addr, accepted)
    }

    /// The flake behind a harness GET that "timed out" after a quiet spell: a pooled
    /// connection idle for 2 s, then a request answered in 2 s, with a 3 s read timeout. The
    /// read clock must start at the request, not when the connection went idle.
    #[tokio::test]
    async fn the_read_timeout_counts_from_the_request_not_from_idle() {
        let (addr, accepted) = slow_server(Duration::from_secs(2)).await;
        let config = kube::Config::new(format!("http://{addr}").parse().expect("uri"));
        let client =
            kube::Client::try_from(super::with_read_timeout(config, Duration::from_secs(3)))
                .expect("client");
        let get = || {
            http::Request::get("/version")
                .body(Vec::new())
                .expect("request")
        };
        assert_eq!(client.request_text(get()).await.expect("first"), "ok");
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(client.request_text(get()).await.expect("after idle"), "ok");
        // The second request reused the idle connection (else this proves nothing).
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }
}
