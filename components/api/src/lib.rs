//! Spawner api: JSON over HTTP for web applications to spawn, find (get-or-create by key),
//! watch and terminate session-lived backends. Every route maps to reads and writes of
//! `SessionLivedBackend` objects through the injected `kube::Client`; the controller and the
//! sweeper do the rest. The reference is `docs/api.md` (and `docs/openapi.json`).

pub mod auth;
pub mod config;
pub mod error;
pub mod extract;
pub mod hub;
pub mod model;
pub mod naming;
pub mod openapi;
pub mod routes;
pub mod stream;

use std::future::Future;

pub use config::{ApiArgs, ApiConfig, Clock, ConfigError, SystemClock};
pub use routes::router;

/// Why `run` stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// Serves the api on `listener` until `shutdown` completes. Status streams end at shutdown,
/// so graceful shutdown does not wait on them.
pub async fn run<L>(
    client: kube::Client,
    listener: L,
    config: ApiConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError>
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    config.check()?;
    tracing::info!(?config, "api starting");
    let (stop_streams, streams_stopped) = tokio::sync::watch::channel(false);
    let app = router(client, config, streams_stopped);
    let limits = spawner_serve::Limits::default();
    spawner_serve::serve(listener, app, limits, async move {
        shutdown.await;
        let _ = stop_streams.send(true);
    })
    .await;
    Ok(())
}
