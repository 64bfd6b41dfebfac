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
use std::time::Duration;

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

/// A turmoil TCP stream as hyper-util's client wants it, optionally failing a read that
/// waits longer than a timeout (as kube's `Config::read_timeout` does for real clients).
pub struct SimConnection {
    io: TokioIo<turmoil::net::TcpStream>,
    read_timeout: Option<Duration>,
    read_deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

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
        let this = &mut *self;
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(result) => {
                this.read_deadline = None;
                Poll::Ready(result)
            }
            Poll::Pending => {
                let Some(timeout) = this.read_timeout else {
                    return Poll::Pending;
                };
                let deadline = this
                    .read_deadline
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                match deadline.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        this.read_deadline = None;
                        Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "read timed out",
                        )))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

impl hyper::rt::Write for SimConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Dials `host:port` of a URI over turmoil's network.
#[derive(Clone, Copy, Debug, Default)]
pub struct SimConnector;

/// Like [`SimConnector`], with a read timeout on every connection: what the Kubernetes
/// clients of the components use, so that a watch stalled by a silent partition fails and is
/// retried (the API server sends bookmarks every few seconds on an idle watch).
#[derive(Clone, Copy, Debug)]
pub struct SimTimeoutConnector(pub Duration);

/// How often the simulated API server sends watch bookmarks.
pub const BOOKMARK_INTERVAL: Duration = Duration::from_secs(5);

/// The read timeout of the components' Kubernetes clients, by the one rule every host uses
/// (`spawner_assembly::kube_read_timeout`): 15 s.
pub const KUBE_READ_TIMEOUT: Duration = spawner_assembly::kube_read_timeout(BOOKMARK_INTERVAL);

async fn dial(uri: http::Uri, read_timeout: Option<Duration>) -> io::Result<SimConnection> {
    let host = uri
        .host()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "URI has no host"))?
        .to_string();
    let port = uri.port_u16().unwrap_or(80);
    let stream = turmoil::net::TcpStream::connect((host.as_str(), port)).await?;
    Ok(SimConnection {
        io: TokioIo::new(stream),
        read_timeout,
        read_deadline: None,
    })
}

impl tower::Service<http::Uri> for SimTimeoutConnector {
    type Response = SimConnection;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<SimConnection>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        Box::pin(dial(uri, Some(self.0)))
    }
}

impl tower::Service<http::Uri> for SimConnector {
    type Response = SimConnection;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<SimConnection>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        Box::pin(dial(uri, None))
    }
}

/// A `kube::Client` talking to the API server at `base` (for example `http://apiserver:6443`)
/// over turmoil, authenticated with `token`. Build it inside the host that uses it: kube's
/// internal buffer spawns a task on the current runtime.
pub fn kube_client(base: http::Uri, token: &str, namespace: &str) -> kube::Client {
    kube_client_over(base, token, namespace, |http| http)
}

/// The turmoil HTTP client a `kube::Client` of this module sends through.
pub type KubeHttp = hyper_util::client::legacy::Client<SimTimeoutConnector, kube::client::Body>;

/// [`kube_client`] with `wrap` around its HTTP client (the simulator's mutants sit there).
pub fn kube_client_over<S, B>(
    base: http::Uri,
    token: &str,
    namespace: &str,
    wrap: impl FnOnce(KubeHttp) -> S,
) -> kube::Client
where
    S: tower::Service<http::Request<kube::client::Body>, Response = http::Response<B>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let http_client = wrap(
        hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .build::<_, kube::client::Body>(SimTimeoutConnector(KUBE_READ_TIMEOUT)),
    );
    let bearer = format!("Bearer {token}");
    let service = ServiceBuilder::new()
        .layer(kube::client::middleware::BaseUriLayer::new(base))
        // What a production client built from a `kube::Config` does (its `default_retry`):
        // a request answered 429, 503 or 504 is sent again after the server's `Retry-After`
        // or an exponential backoff, up to 15 times.
        .layer(tower::retry::RetryLayer::new(
            kube::client::retry::RetryPolicy::server_retry(),
        ))
        .map_request(move |mut request: http::Request<kube::client::Body>| {
            if let Ok(value) = http::HeaderValue::from_str(&bearer) {
                request
                    .headers_mut()
                    .insert(http::header::AUTHORIZATION, value);
            }
            request
        })
        .map_err(Into::<tower::BoxError>::into)
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
