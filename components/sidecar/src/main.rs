//! `spawner-sidecar`: parses its configuration, binds the serve port and runs the sidecar until
//! SIGTERM or SIGINT, then drains.
//!
//! Like nginx's workers, it runs one single-threaded runtime per core: a connection's tasks never
//! hop between threads. One listener feeds them all, each new connection going to the runtime
//! with the fewest live ones (`balance`). All of them share one sidecar (monitor, readiness,
//! drain).

use std::net::SocketAddr;

use anyhow::Context as _;
use clap::Parser;
use spawner_sidecar::{Sidecar, SidecarArgs, TcpConnector, balance};
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
    /// Single-threaded runtimes (accepting threads); default: one per core.
    #[arg(long, env = "SPAWNER_SIDECAR_THREADS")]
    threads: Option<usize>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    let addr = cli.sidecar.serve_addr();
    let config = cli.sidecar.to_config();
    let threads = cli
        .threads
        .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()))
        .unwrap_or(1)
        .max(1);
    let runtime = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting a runtime")
    };
    tracing::info!(%addr, upstream = %config.upstream, threads, "spawner sidecar serving");
    let (sidecar, _handle) = Sidecar::new(TcpConnector, config)?;

    // The listener is bound before any thread starts, so a port in use fails fast.
    let main_runtime = runtime()?;
    let listener = main_runtime.block_on(async { bind(addr) })?;
    let (acceptor, mut lanes) = balance::balanced(listener, threads);
    let main_lane = lanes.remove(0);
    let mut workers = Vec::new();
    for (i, lane) in lanes.into_iter().enumerate() {
        let sidecar = sidecar.clone();
        let worker_runtime = runtime()?;
        workers.push(
            std::thread::Builder::new()
                .name(format!("sidecar-{}", i + 1))
                .spawn(move || worker_runtime.block_on(sidecar.serve(lane)))
                .context("starting a thread")?,
        );
    }
    let result = main_runtime.block_on(async {
        let (_, _, result) = tokio::join!(
            acceptor.run(),
            sidecar.serve(main_lane),
            sidecar.supervise(shutdown_signal())
        );
        result
    });
    for worker in workers {
        let _ = worker.join();
    }
    result?;
    tracing::info!("spawner sidecar stopped");
    Ok(())
}

/// The listener on `addr`; its connections are dealt out to the threads by `balance`.
fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }?;
    socket.set_reuseaddr(true)?;
    socket
        .bind(addr)
        .with_context(|| format!("binding {addr}"))?;
    Ok(socket.listen(1024)?)
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
