//! `spawner-sidecar`: parses its configuration, binds the serve port and runs the sidecar until
//! SIGTERM or SIGINT, then drains.

use anyhow::Context as _;
use clap::Parser;
use spawner_sidecar::{SidecarArgs, TcpConnector};
use tracing_subscriber::EnvFilter;

#[derive(Parser, Debug)]
#[command(
    name = "spawner-sidecar",
    version,
    about = "Spawner's sidecar: proxies to the application and reports its idleness"
)]
struct Cli {
    #[command(flatten)]
    sidecar: SidecarArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    let addr = cli.sidecar.serve_addr();
    let config = cli.sidecar.to_config();
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    tracing::info!(%addr, upstream = %config.upstream, "spawner sidecar serving");
    spawner_sidecar::run(listener, TcpConnector, config, shutdown_signal()).await?;
    tracing::info!("spawner sidecar stopped");
    Ok(())
}

/// Resolves on SIGTERM (Kubernetes stopping the pod) or SIGINT.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only SIGINT stops the sidecar");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
