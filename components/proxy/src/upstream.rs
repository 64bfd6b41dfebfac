//! A client connection's own connections to the upstream ([`UpstreamConnections`]): hyper's
//! HTTP/1.1 client for requests with a body (the body streams while the response may already
//! come) and the bodyless client ([`crate::bodyless`]) for the rest.
//!
//! Each client connection owns at most one keep-alive connection of each kind: HTTP/1.1 serves
//! one request at a time per connection, so a 1:1 pairing needs no shared pool, no lock
//! contention, and keeps the upstream's view of connections close to the clients'.

use std::error::Error as _;
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};

use http::header::HeaderValue;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1 as client_http1;
use hyper_util::rt::TokioIo;

use crate::BoxError;
use crate::bodyless::{self, BodylessError, BodylessResponse, KeptConnection};
use crate::connect::{Connect, Upstream};

/// A request body grew past its limit (`http_body::Body::poll_frame` of a limiting body
/// returns it; [`UpstreamConnections::send`] reports it as [`UpstreamError::TooLarge`]).
#[derive(Debug, thiserror::Error)]
#[error("request body larger than {0} bytes")]
pub struct BodyTooLarge(pub u64);

/// Why a request could not be forwarded by hyper's client.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The upstream does not accept connections.
    #[error("{0}")]
    Connect(std::io::Error),
    /// The request body exceeded its limit ([`BodyTooLarge`]).
    #[error("request body too large")]
    TooLarge,
    /// The upstream took the connection but failed the exchange.
    #[error("{0}")]
    Exchange(hyper::Error),
}

/// hyper's HTTP/1.1 client half of one upstream connection.
pub type Sender<B> = client_http1::SendRequest<B>;
/// The I/O future of one upstream connection; the caller must poll it.
pub type Driver<Io, B> = client_http1::Connection<TokioIo<Io>, B>;

type BoxedDriver = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Opens a connection to the upstream: its HTTP/1.1 client and the future doing its I/O.
pub async fn dial<C, B>(
    upstream: &Upstream<C>,
) -> Result<(Sender<B>, Driver<C::Io, B>), UpstreamError>
where
    C: Connect,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let io = upstream.connect().await.map_err(UpstreamError::Connect)?;
    client_http1::Builder::new()
        .handshake(TokioIo::new(io))
        .await
        .map_err(UpstreamError::Exchange)
}

/// The upstream connections one client connection owns; `B` is the request body type sent with
/// hyper's client.
pub struct UpstreamConnections<C: Connect, B> {
    sender: Mutex<Option<Sender<B>>>,
    /// The hyper connection's I/O future. The client connection's task polls it next to its
    /// server side ([`UpstreamConnections::poll_driver`]), so a request and its response never
    /// hop between tasks.
    driver: Mutex<Option<BoxedDriver>>,
    /// The bodyless client's connection between requests.
    bodyless: KeptConnection<C::Io>,
}

impl<C: Connect, B> Default for UpstreamConnections<C, B> {
    fn default() -> Self {
        Self {
            sender: Mutex::new(None),
            driver: Mutex::new(None),
            bodyless: KeptConnection::new(),
        }
    }
}

impl<C, B> UpstreamConnections<C, B>
where
    C: Connect,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    pub fn new() -> Self {
        Self::default()
    }

    /// Sends a request without a body through the bodyless client.
    pub async fn send_bodyless<X>(
        &self,
        upstream: &Upstream<C>,
        req: &Request<X>,
        peer_ip: &HeaderValue,
    ) -> Result<BodylessResponse<C::Io>, BodylessError> {
        bodyless::exchange(&self.bodyless, upstream, req, peer_ip).await
    }

    /// Sends `req` (headers already prepared, e.g. by
    /// [`crate::headers::forward_request_headers`]) over the kept hyper connection, dialling a
    /// new one when there is none or the kept one was closed before the request could be
    /// written.
    pub async fn send(
        &self,
        upstream: &Upstream<C>,
        req: Request<B>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let kept = self.sender.lock().ok().and_then(|mut slot| slot.take());
        let mut req = req;
        if let Some(mut sender) = kept
            && sender.ready().await.is_ok()
        {
            match sender.try_send_request(req).await {
                Ok(response) => {
                    self.keep(sender);
                    return Ok(response);
                }
                Err(mut e) => match e.take_message() {
                    // Never written: the app closed the idle connection; retry on a fresh one.
                    Some(unsent) => req = unsent,
                    None => return Err(classify(e.into_error())),
                },
            }
        }
        let (mut sender, driver) = dial(upstream).await?;
        if let Ok(mut slot) = self.driver.lock() {
            *slot = Some(Box::pin(async move {
                let _ = driver.await;
            }));
        }
        let response = sender.send_request(req).await.map_err(classify)?;
        self.keep(sender);
        Ok(response)
    }

    fn keep(&self, sender: Sender<B>) {
        if let Ok(mut slot) = self.sender.lock() {
            *slot = Some(sender);
        }
    }
}

impl<C: Connect, B> UpstreamConnections<C, B> {
    /// Polls the hyper connection, if there is one. Never completes: a finished connection is
    /// just removed (the next request dials a new one).
    pub fn poll_driver(&self, cx: &mut Context<'_>) -> Poll<()> {
        if let Ok(mut slot) = self.driver.lock()
            && let Some(driver) = slot.as_mut()
            && driver.as_mut().poll(cx).is_ready()
        {
            *slot = None;
        }
        Poll::Pending
    }
}

fn classify(e: hyper::Error) -> UpstreamError {
    let mut source = e.source();
    while let Some(s) = source {
        if s.is::<BodyTooLarge>() {
            return UpstreamError::TooLarge;
        }
        source = s.source();
    }
    UpstreamError::Exchange(e)
}
