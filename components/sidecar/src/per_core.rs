//! `spawner sidecar`'s runtimes: like nginx's workers, one single-threaded runtime per core, so
//! a connection's tasks never hop between threads. One listener feeds them all, each new
//! connection going to the runtime with the fewest live ones (`balance`). All of them share one
//! sidecar (monitor, readiness, drain).

use std::future::Future;
use std::net::SocketAddr;

use crate::{Sidecar, SidecarArgs, SidecarError, TcpConnector, balance};

/// Binds `args.serve_addr()` and serves on `args.runtime_count()` single-threaded runtimes
/// until `shutdown` completes, then drains. Blocks the calling thread, which must not be
/// inside a tokio runtime (it becomes the first runtime; `shutdown` is polled there).
pub fn run_per_core(
    args: &SidecarArgs,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), SidecarError> {
    let addr = args.serve_addr();
    let config = args.to_config();
    let threads = args.runtime_count();
    let runtime = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(SidecarError::Runtime)
    };
    tracing::info!(%addr, upstream = %config.upstream, threads, "spawner sidecar serving");
    let (sidecar, _handle) = Sidecar::new(TcpConnector, config)?;

    // The listener is bound before any thread starts, so a port in use fails fast.
    let main_runtime = runtime()?;
    let listener = main_runtime
        .block_on(async { bind(addr) })
        .map_err(|source| SidecarError::Bind { addr, source })?;
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
                .map_err(SidecarError::Runtime)?,
        );
    }
    let result = main_runtime.block_on(async {
        let (_, _, result) = tokio::join!(
            acceptor.run(),
            sidecar.serve(main_lane),
            sidecar.supervise(shutdown)
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

/// The listener on `addr`; its connections are dealt out to the runtimes by `balance`.
fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}
