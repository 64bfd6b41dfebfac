//! Serves an axum router with the limits every Spawner server needs against slow clients and
//! floods (`axum::serve` sets no timer, so hyper's header-read timeout never applies there):
//!
//! - a **header-read timeout**: a connection that does not finish sending a request head in
//!   time is closed. hyper starts this timer whenever it waits for a head, so it is also the
//!   **idle timeout** of a keep-alive connection between requests;
//! - a **connection cap**: past it, connections wait in the listen backlog (as Go's
//!   `netutil.LimitListener` does) until one closes;
//! - a handler **panic** is answered 500 and logged; the connection and the server go on.
//!
//! Any transport that implements [`axum::serve::Listener`] works (loopback TCP, or turmoil
//! sockets in the simulator).

use std::convert::Infallible;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use futures::FutureExt as _;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::{Semaphore, watch};

/// The limits of one server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest wait for a complete request head, and longest idle time of a keep-alive
    /// connection between requests.
    pub header_read_timeout: Duration,
    /// Most connections served at once.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(30),
            max_connections: 4096,
        }
    }
}

/// Serves `router` on `listener` until `shutdown` completes, then stops accepting, lets every
/// connection finish its request in flight and returns once all are closed.
pub async fn serve<L>(
    mut listener: L,
    router: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    // Every connection task holds a receiver: `closed()` on the sender resolves when all ended.
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut shutdown = pin!(shutdown);
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let (io, peer) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        tracing::trace!(?peer, "connection accepted");
        let service = hyper::service::service_fn({
            let router = router.clone();
            move |req: Request<Incoming>| call(router.clone(), req.map(Body::new))
        });
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout);
            let conn = builder
                .serve_connection(TokioIo::new(io), service)
                .with_upgrades();
            let mut conn = pin!(conn);
            let mut stopping = false;
            loop {
                tokio::select! {
                    result = conn.as_mut() => {
                        if let Err(e) = result {
                            tracing::debug!(error = %e, "connection ended");
                        }
                        break;
                    }
                    changed = stop.wait_for(|s| *s), if !stopping => {
                        let _ = changed;
                        stopping = true;
                        conn.as_mut().graceful_shutdown();
                    }
                }
            }
        });
    }
    drop(stop_rx);
    let _ = stop_tx.send(true);
    stop_tx.closed().await;
}

/// Calls the router, answering a panicking handler with a 500 instead of a closed connection.
async fn call(router: Router, req: Request) -> Result<Response, Infallible> {
    use tower::ServiceExt as _;
    match AssertUnwindSafe(router.oneshot(req)).catch_unwind().await {
        Ok(response) => response,
        Err(_) => {
            tracing::error!("a request handler panicked");
            Ok((
                axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                "internal error\n",
            )
                .into_response())
        }
    }
}
