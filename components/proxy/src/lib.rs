//! Spawner's proxy core: what any HTTP/1.1 + WebSocket reverse proxy in front of one upstream
//! needs, below the processes that serve connections (the sidecar and the router).
//!
//! - [`headers`]: the header policy (hop-by-hop fields, `X-Forwarded-*`, origin-form targets).
//! - [`connect`]: how the upstream is dialled ([`Connect`], [`Upstream`]).
//! - [`upstream`]: a client connection's own upstream connections ([`UpstreamConnections`]):
//!   hyper's client for requests with a body, [`bodyless`] (an inline HTTP/1.1 client) for the
//!   rest.
//! - [`websocket`]: forwarding a WebSocket handshake and relaying the upgraded connections
//!   byte for byte, pinging quiet clients and dropping those that stop answering.
//!
//! Nothing here serves connections, counts activity or knows about Spawner's control paths;
//! callers pass what they need (peer address, byte counters, an abort future).

pub mod bodyless;
pub mod connect;
#[cfg(not(feature = "fuzzing"))]
mod frames;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod frames;
pub mod headers;
pub mod mutants;
pub mod upstream;
pub mod websocket;

#[cfg(feature = "turmoil")]
pub use connect::TurmoilConnector;
pub use connect::{Connect, TcpConnector, Upstream};
pub use upstream::{BodyTooLarge, UpstreamConnections, UpstreamError};

/// The boxed error of the bodies this crate streams.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
