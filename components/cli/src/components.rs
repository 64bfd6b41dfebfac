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
    let mut config = kube::Config::infer()
        .await
        .context("no Kubernetes client: not in a pod and no usable KUBECONFIG")?;
    config.read_timeout = Some(KUBE_READ_TIMEOUT);
    Ok(kube::Client::try_from(config)?)
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
    let config = args.config()?;
    let listener = bind(args.listen).await?;
    let client = kube_client().await?;
    spawner_router::run(
        listener,
        client,
        spawner_router::TcpConnector,
        config,
        crate::shutdown_signal(),
    )
    .await;
    Ok(())
}

pub async fn node_agent(args: spawner_node_agent::NodeAgentArgs) -> anyhow::Result<()> {
    let client = kube_client().await?;
    let runtime = std::sync::Arc::new(args.process_runtime());
    spawner_node_agent::run(client, args.config(), runtime, crate::shutdown_signal())
        .await
        .context("node agent")
}
