//! How the proxy reaches its upstream: a [`Connect`] implementation (tokio TCP in binaries,
//! turmoil's sockets in the simulator) and the address it dials, together an [`Upstream`].

use std::future::Future;
use std::io;

use tokio::io::{AsyncRead, AsyncWrite};

/// Dials the upstream. Every proxied request, WebSocket and probe goes through it, so a
/// simulated network sees all of a proxy's upstream traffic.
pub trait Connect: Clone + Send + Sync + 'static {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;

    /// Opens a connection to `addr` (`host:port`).
    fn connect(&self, addr: &str) -> impl Future<Output = io::Result<Self::Io>> + Send;
}

/// Dials over TCP, with Nagle's algorithm off (small request/response exchanges must not wait
/// for it).
#[derive(Clone, Copy, Debug, Default)]
pub struct TcpConnector;

impl Connect for TcpConnector {
    type Io = tokio::net::TcpStream;

    async fn connect(&self, addr: &str) -> io::Result<Self::Io> {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }
}

/// Dials over turmoil's simulated network (`host:port`, host names resolved by turmoil).
#[cfg(feature = "turmoil")]
#[derive(Clone, Copy, Debug, Default)]
pub struct TurmoilConnector;

#[cfg(feature = "turmoil")]
impl Connect for TurmoilConnector {
    type Io = turmoil::net::TcpStream;

    async fn connect(&self, addr: &str) -> io::Result<Self::Io> {
        turmoil::net::TcpStream::connect(addr).await
    }
}

/// One upstream: the connector and the `host:port` it dials.
#[derive(Clone, Debug)]
pub struct Upstream<C> {
    connector: C,
    addr: String,
}

impl<C: Connect> Upstream<C> {
    pub fn new(connector: C, addr: impl Into<String>) -> Self {
        Self {
            connector,
            addr: addr.into(),
        }
    }

    /// The `host:port` dialled.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Opens a new connection.
    pub fn connect(&self) -> impl Future<Output = io::Result<C::Io>> + Send + '_ {
        self.connector.connect(&self.addr)
    }
}
