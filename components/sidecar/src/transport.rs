//! The sidecar's injected I/O: where client connections come from and how the application is
//! dialled. Binaries pass tokio TCP; the simulator passes turmoil's sockets.

use std::future::Future;
use std::io;
use std::net::SocketAddr;

use tokio::io::{AsyncRead, AsyncWrite};

/// A source of accepted client connections.
pub trait Listener: Send + 'static {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;

    /// Waits for the next client connection and its peer address.
    fn accept(&mut self) -> impl Future<Output = io::Result<(Self::Io, SocketAddr)>> + Send;
}

/// Dials the application. Used for every proxied request, every WebSocket and the readiness
/// probe, so a simulated network sees all of the sidecar's upstream traffic.
pub trait Connect: Clone + Send + Sync + 'static {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;

    /// Opens a connection to `addr` (`host:port`, as configured in `SidecarConfig::upstream`).
    fn connect(&self, addr: &str) -> impl Future<Output = io::Result<Self::Io>> + Send;
}

impl Listener for tokio::net::TcpListener {
    type Io = tokio::net::TcpStream;

    async fn accept(&mut self) -> io::Result<(Self::Io, SocketAddr)> {
        let (stream, peer) = tokio::net::TcpListener::accept(self).await?;
        // Small request/response exchanges must not wait for Nagle's algorithm.
        let _ = stream.set_nodelay(true);
        Ok((stream, peer))
    }
}

/// Dials the application over TCP.
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

#[cfg(feature = "turmoil")]
mod simulated {
    use super::*;

    impl Listener for turmoil::net::TcpListener {
        type Io = turmoil::net::TcpStream;

        async fn accept(&mut self) -> io::Result<(Self::Io, SocketAddr)> {
            turmoil::net::TcpListener::accept(self).await
        }
    }

    /// Dials the application over turmoil's simulated network (`host:port`, host names
    /// resolved by turmoil).
    #[derive(Clone, Copy, Debug, Default)]
    pub struct TurmoilConnector;

    impl Connect for TurmoilConnector {
        type Io = turmoil::net::TcpStream;

        async fn connect(&self, addr: &str) -> io::Result<Self::Io> {
            turmoil::net::TcpStream::connect(addr).await
        }
    }
}

#[cfg(feature = "turmoil")]
pub use simulated::TurmoilConnector;
