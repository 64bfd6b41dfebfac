//! turmoil transports for production code: a listener that axum can serve on, a connector that
//! hyper-util's client can dial through, and a `kube::Client` built on them.
//!
//! Components receive their listeners, connectors and clients (DESIGN.md rule 2); these types
//! are what the simulator passes in place of real sockets.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tower::ServiceBuilder;

/// A turmoil TCP listener that `axum::serve` accepts.
pub struct SimListener(pub turmoil::net::TcpListener);

impl SimListener {
    pub async fn bind(addr: impl turmoil::ToSocketAddrs) -> io::Result<Self> {
        Ok(Self(turmoil::net::TcpListener::bind(addr).await?))
    }
}

impl axum::serve::Listener for SimListener {
    type Io = turmoil::net::TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.0.accept().await {
                Ok(pair) => return pair,
                // Accept errors in turmoil are transient (a host restarting); retry after a
                // pause, as axum does for real sockets.
                Err(error) => {
                    tracing::debug!(%error, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.0.local_addr()
    }
}

/// A turmoil TCP stream as hyper-util's client wants it.
pub struct SimConnection(TokioIo<turmoil::net::TcpStream>);

impl Connection for SimConnection {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl hyper::rt::Read for SimConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for SimConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// Dials `host:port` of a URI over turmoil's network.
#[derive(Clone, Copy, Debug, Default)]
pub struct SimConnector;

impl tower::Service<http::Uri> for SimConnector {
    type Response = SimConnection;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<SimConnection>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        Box::pin(async move {
            let host = uri
                .host()
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "URI has no host"))?
                .to_string();
            let port = uri.port_u16().unwrap_or(80);
            let stream = turmoil::net::TcpStream::connect((host.as_str(), port)).await?;
            Ok(SimConnection(TokioIo::new(stream)))
        })
    }
}

/// A `kube::Client` talking to the API server at `base` (for example `http://apiserver:6443`)
/// over turmoil, authenticated with `token`. Build it inside the host that uses it: kube's
/// internal buffer spawns a task on the current runtime.
pub fn kube_client(base: http::Uri, token: &str, namespace: &str) -> kube::Client {
    let http_client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .build::<_, kube::client::Body>(SimConnector);
    let bearer = format!("Bearer {token}");
    let service = ServiceBuilder::new()
        .layer(kube::client::middleware::BaseUriLayer::new(base))
        .map_request(move |mut request: http::Request<kube::client::Body>| {
            if let Ok(value) = http::HeaderValue::from_str(&bearer) {
                request
                    .headers_mut()
                    .insert(http::header::AUTHORIZATION, value);
            }
            request
        })
        .service(http_client);
    kube::Client::new(service, namespace)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn axum_serves_and_hyper_dials_over_turmoil() -> turmoil::Result {
        let mut sim = turmoil::Builder::new()
            .simulation_duration(Duration::from_secs(10))
            .build();
        sim.host("server", || async {
            let router = axum::Router::new().route("/", axum::routing::get(|| async { "hello" }));
            let listener = SimListener::bind(("0.0.0.0", 8080)).await?;
            axum::serve(listener, router).await?;
            Ok(())
        });
        sim.client("client", async {
            let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
                .build::<_, http_body_util::Empty<bytes::Bytes>>(SimConnector);
            let response = client.get("http://server:8080/".parse()?).await?;
            assert_eq!(response.status(), 200);
            let body = http_body_util::BodyExt::collect(response.into_body())
                .await?
                .to_bytes();
            assert_eq!(&body[..], b"hello");
            Ok(())
        });
        sim.run()
    }
}

impl spawner_sidecar::Listener for SimListener {
    type Io = turmoil::net::TcpStream;

    async fn accept(&mut self) -> io::Result<(Self::Io, SocketAddr)> {
        self.0.accept().await
    }
}

/// Dials a sidecar's application over turmoil.
#[derive(Clone, Copy, Debug, Default)]
pub struct SimSidecarConnector;

impl spawner_sidecar::Connect for SimSidecarConnector {
    type Io = turmoil::net::TcpStream;

    async fn connect(&self, addr: &str) -> io::Result<Self::Io> {
        turmoil::net::TcpStream::connect(addr).await
    }
}
