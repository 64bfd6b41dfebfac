//! Where client connections come from: tokio TCP in binaries (or a lane of the per-core
//! runtimes, `balance`), turmoil's sockets in the simulator. How the application is dialled is
//! the proxy core's [`spawner_proxy::Connect`].

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

impl Listener for tokio::net::TcpListener {
    type Io = tokio::net::TcpStream;

    async fn accept(&mut self) -> io::Result<(Self::Io, SocketAddr)> {
        let (stream, peer) = tokio::net::TcpListener::accept(self).await?;
        // Small request/response exchanges must not wait for Nagle's algorithm.
        let _ = stream.set_nodelay(true);
        Ok((stream, peer))
    }
}

#[cfg(feature = "turmoil")]
impl Listener for turmoil::net::TcpListener {
    type Io = turmoil::net::TcpStream;

    async fn accept(&mut self) -> io::Result<(Self::Io, SocketAddr)> {
        turmoil::net::TcpListener::accept(self).await
    }
}
