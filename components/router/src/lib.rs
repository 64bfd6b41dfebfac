//! Spawner's router: the one public entry for browsers.
//!
//! - Routes HTTP and WebSocket traffic to the sidecar of a Ready backend, straight to the
//!   address in its `status.url`, from a watch cache of the namespace's backends ([`cache`]):
//!   host mode `<name>.<domain>` or path mode `/<prefix>/<name>/...` ([`route`]).
//! - Unknown backend: 404; ended (Swept, Terminated, Failed): 410; still starting: the request
//!   waits for Ready up to a bound, then 503.
//! - Lets in only requests with a valid connect token or the session cookie it was swapped for
//!   ([`access`]), except for public backends; hands the token's user to the app as
//!   `X-Spawner-User`; sets `X-Forwarded-For/Proto/Host` itself (client copies are dropped,
//!   except from trusted proxies: [`trust`]).
//! - Forwards with the proxy core ([`spawner_proxy`]) that the sidecar uses too.
//! - Serves `/healthz` and `/metrics` (Prometheus text) on any host that is not a backend's.
//!
//! [`run`] receives its listener, its kube client and its upstream connector, so tests use
//! loopback sockets and an in-process API server.

pub mod access;
pub mod cache;
pub mod config;
pub mod metrics;
pub mod mutants;
pub mod route;
mod serve;
pub mod trust;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};

pub use cache::Backends;
pub use config::{Clock, ConfigError, RouterArgs, RouterConfig, SystemClock};
pub use metrics::{Metrics, Outcome};
pub use spawner_proxy::{Connect, TcpConnector};

/// A source of accepted client connections.
pub trait Listener: Send + 'static {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;

    /// Waits for the next client connection and its peer address.
    fn accept(&mut self) -> impl Future<Output = io::Result<(Self::Io, SocketAddr)>> + Send;
}

impl Listener for tokio::net::TcpListener {
    type Io = tokio::net::TcpStream;

    async fn accept(&mut self) -> io::Result<(Self::Io, SocketAddr)> {
        let (stream, peer) = tokio::net::TcpListener::accept(self).await?;
        let _ = stream.set_nodelay(true);
        Ok((stream, peer))
    }
}

/// A running router's handle on its state, for tests and `spawner dev`.
#[derive(Clone)]
pub struct RouterHandle {
    pub metrics: Arc<Metrics>,
    pub backends: Backends,
}

/// Serves `listener` until `shutdown` completes, routing to the backends `client` sees in
/// `config.namespace` and dialling them with `connector`.
pub async fn run<L: Listener, C: Connect>(
    listener: L,
    client: kube::Client,
    connector: C,
    config: RouterConfig,
    shutdown: impl Future<Output = ()> + Send,
) {
    let (handle, serve) = start(listener, client, connector, config);
    drop(handle);
    tokio::select! {
        () = serve => {}
        () = shutdown => tracing::info!("router shutting down"),
    }
}

/// The router's handle and the future that serves (drop it to stop).
pub fn start<L: Listener, C: Connect>(
    listener: L,
    client: kube::Client,
    connector: C,
    config: RouterConfig,
) -> (RouterHandle, impl Future<Output = ()> + Send) {
    let (backends, watch) = Backends::watch(client, &config.namespace);
    let metrics = Arc::new(Metrics::default());
    let handle = RouterHandle {
        metrics: metrics.clone(),
        backends: backends.clone(),
    };
    let router = serve::Router::new(backends, connector, config, metrics);
    let serve = async move {
        tokio::select! {
            () = watch => tracing::warn!("backend watch ended"),
            () = router.serve(listener) => {}
        }
    };
    (handle, serve)
}
