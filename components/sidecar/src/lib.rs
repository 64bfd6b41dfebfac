//! Spawner sidecar: the HTTP/WebSocket reverse proxy that runs in front of every backend's
//! application and knows when the backend is idle.
//!
//! - Everything outside `/_spawner/` is proxied to the application (HTTP/1.1 keep-alive,
//!   streamed bodies, WebSocket upgrades relayed byte for byte).
//! - A monitor counts live connections (open WebSockets and requests in flight) and the time of
//!   last activity; readiness is "the application accepts TCP on its port".
//! - `/_spawner/events` streams that state as Server-Sent Events in the core protocol
//!   ([`spawner_core::state_stream`]), `/_spawner/health` answers 200/503, `/_spawner/metrics` is
//!   Prometheus text.
//! - WebSocket clients are pinged; one that stops answering (a half-open connection) is dropped.
//!
//! [`run`] receives its listener and its upstream connector ([`Listener`], [`Connect`]), so tests
//! use loopback sockets and the simulator turmoil's; all waiting is `tokio::time`.

mod balance;
mod body;
mod config;
mod connection;
mod control;
mod drain;
mod head_timer;
mod listener;
mod monitor;
#[cfg_attr(not(feature = "sim-mutants"), allow(dead_code))]
pub mod mutants;
mod per_core;
mod readiness;
mod shared;
mod websocket;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use spawner_core::state_stream::SidecarState;
use tokio::sync::watch;

pub use config::{SidecarArgs, SidecarConfig};
pub use listener::Listener;
pub use monitor::Activity;
pub use per_core::run_per_core;
#[cfg(feature = "turmoil")]
pub use spawner_proxy::TurmoilConnector;
pub use spawner_proxy::{Connect, TcpConnector};

use crate::drain::{DrainState, Tasks};
use crate::monitor::Monitor;
use crate::shared::Shared;

#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
    #[error("invalid sidecar configuration: {0}")]
    InvalidConfig(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start a runtime thread: {0}")]
    Runtime(std::io::Error),
}

/// Lets an embedding process (the node agent, a test) watch the sidecar without HTTP.
#[derive(Clone, Debug)]
pub struct SidecarHandle {
    monitor: Arc<Monitor>,
}

impl SidecarHandle {
    /// The state now, as `/_spawner/events` would report it.
    pub fn state(&self) -> SidecarState {
        self.monitor
            .activity()
            .state_at(tokio::time::Instant::now())
    }

    /// Every published change (coalesced by `SidecarConfig::publish_coalesce`).
    pub fn subscribe(&self) -> watch::Receiver<Activity> {
        self.monitor.subscribe()
    }
}

/// Serves until `shutdown` completes, then stops accepting and drains live connections for at
/// most `config.drain_timeout`.
pub async fn run<L: Listener, C: Connect>(
    listener: L,
    connector: C,
    config: SidecarConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), SidecarError> {
    let (_handle, serve) = run_with_handle(listener, connector, config, shutdown)?;
    serve.await
}

/// Like [`run`], but returns a [`SidecarHandle`] first and the serving future to drive.
pub fn run_with_handle<L: Listener, C: Connect>(
    listener: L,
    connector: C,
    config: SidecarConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<
    (
        SidecarHandle,
        impl Future<Output = Result<(), SidecarError>> + Send,
    ),
    SidecarError,
> {
    let (sidecar, handle) = Sidecar::new(connector, config)?;
    let serve = async move {
        let (_, result) = tokio::join!(sidecar.serve(listener), sidecar.supervise(shutdown));
        result
    };
    Ok((handle, serve))
}

/// One sidecar that may accept on several listeners, each on its own runtime ([`run_per_core`]
/// runs one single-threaded runtime per core, like nginx's workers). All of them share one
/// monitor, one readiness probe and one drain.
///
/// Drive [`Sidecar::serve`] once per listener and [`Sidecar::supervise`] exactly once; [`run`]
/// does that for one listener.
#[derive(Clone)]
pub struct Sidecar<C: Connect> {
    shared: Arc<Shared<C>>,
}

impl<C: Connect> Sidecar<C> {
    pub fn new(connector: C, config: SidecarConfig) -> Result<(Self, SidecarHandle), SidecarError> {
        config.validate()?;
        let monitor = Monitor::new();
        let handle = SidecarHandle {
            monitor: Arc::clone(&monitor),
        };
        let shared = Arc::new(Shared {
            upstream: spawner_proxy::Upstream::new(connector, config.upstream.clone()),
            config,
            monitor,
            tasks: Tasks::new(),
        });
        Ok((Self { shared }, handle))
    }

    /// Accepts on `listener` until shutdown begins, then waits until the drain is over (the
    /// connections it accepted run as tasks of the current runtime, which must stay alive).
    pub async fn serve<L: Listener>(&self, mut listener: L) {
        let shared = &self.shared;
        let mut drain = shared.tasks.subscribe();
        loop {
            tokio::select! {
                biased;
                () = drain::reached(&mut drain, DrainState::Draining) => break,
                accepted = listener.accept() => match accepted {
                    Ok((io, peer)) => {
                        let task = shared.tasks.start();
                        tokio::spawn(connection::serve_connection::<L, C>(Arc::clone(shared), io, peer, task));
                    }
                    Err(e) => {
                        // Out of descriptors or a connection reset before accept: not fatal,
                        // but do not spin.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                },
            }
        }
        drop(listener);
        drain::reached(&mut drain, DrainState::Finished).await;
    }

    /// Runs the state publisher and the readiness probe until `shutdown` completes, then
    /// drains: stops the listeners, lets live connections finish for at most
    /// `config.drain_timeout`, and closes what remains.
    pub async fn supervise(
        &self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), SidecarError> {
        let shared = &self.shared;
        let monitor = &shared.monitor;
        let _publisher = AbortOnDrop(tokio::spawn(
            Arc::clone(monitor).publish(shared.config.publish_coalesce),
        ));
        let _probe = AbortOnDrop(tokio::spawn(readiness::probe(Arc::clone(shared))));
        shutdown.await;
        tracing::info!(
            live = monitor.activity().live_connections,
            "shutting down: draining connections"
        );
        shared.tasks.set(DrainState::Draining);
        let drained =
            tokio::time::timeout(shared.config.drain_timeout, shared.tasks.all_done()).await;
        if drained.is_err() {
            tracing::warn!(
                remaining = shared.tasks.count(),
                "drain timeout: closing remaining connections"
            );
            shared.tasks.set(DrainState::Abort);
            // Tasks close on the abort signal at their next poll; give them a moment to do so.
            let _ = tokio::time::timeout(Duration::from_secs(1), shared.tasks.all_done()).await;
        }
        shared.tasks.set(DrainState::Finished);
        Ok(())
    }
}

/// Aborts a background task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
