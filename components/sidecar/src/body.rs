//! Request and response bodies of the data path: streamed frame by frame, never buffered, with
//! byte counting and the live-connection guard riding along.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
// A request body past `SidecarConfig::max_request_body_bytes` fails with the proxy core's
// `BodyTooLarge`, which its client reports as `UpstreamError::TooLarge` (a 413).
use spawner_proxy::{BodyTooLarge, BoxError};
use tokio::sync::mpsc;

use crate::monitor::{LiveGuard, Monitor};

/// The body sent to the application.
#[derive(Debug)]
pub(crate) enum RequestBody {
    Empty,
    Client {
        inner: Incoming,
        monitor: Arc<Monitor>,
        seen: u64,
        limit: Option<u64>,
    },
}

impl RequestBody {
    pub fn from_client(inner: Incoming, monitor: &Arc<Monitor>, limit: Option<u64>) -> Self {
        if inner.is_end_stream() {
            return RequestBody::Empty;
        }
        RequestBody::Client {
            inner,
            monitor: Arc::clone(monitor),
            seen: 0,
            limit,
        }
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        if let RequestBody::Client { monitor, seen, .. } = self
            && *seen > 0
        {
            monitor
                .counters
                .bytes_from_clients
                .fetch_add(*seen, Ordering::Relaxed);
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            RequestBody::Empty => Poll::Ready(None),
            RequestBody::Client {
                inner, seen, limit, ..
            } => match Pin::new(inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Some(data) = frame.data_ref() {
                        *seen += data.len() as u64;
                        if let Some(limit) = *limit
                            && *seen > limit
                        {
                            return Poll::Ready(Some(Err(Box::new(BodyTooLarge(limit)))));
                        }
                    }
                    Poll::Ready(Some(Ok(frame)))
                }
                Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(Box::new(e)))),
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Empty => true,
            RequestBody::Client { inner, .. } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Empty => SizeHint::with_exact(0),
            RequestBody::Client { inner, .. } => inner.size_hint(),
        }
    }
}

/// The body sent to the client.
pub(crate) enum ResponseBody {
    /// A response of the sidecar itself.
    Full(Option<Bytes>),
    /// The application's response, streamed; the request is live until this is dropped.
    Proxied {
        inner: Incoming,
        guard: LiveGuard,
        sent: u64,
    },
    /// The application's response, read whole already (small bodies).
    Buffered {
        data: Option<Bytes>,
        guard: LiveGuard,
        sent: u64,
    },
    /// The application's response streamed from the lean client's connection.
    Streaming {
        inner: Pin<Box<dyn Body<Data = Bytes, Error = BoxError> + Send>>,
        guard: LiveGuard,
        sent: u64,
    },
    /// The event stream, fed by its task.
    Events(mpsc::Receiver<Bytes>),
}

impl std::fmt::Debug for ResponseBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self {
            ResponseBody::Full(_) => "Full",
            ResponseBody::Proxied { .. } => "Proxied",
            ResponseBody::Buffered { .. } => "Buffered",
            ResponseBody::Streaming { .. } => "Streaming",
            ResponseBody::Events(_) => "Events",
        };
        f.write_str(kind)
    }
}

impl ResponseBody {
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        ResponseBody::Full(Some(bytes.into()))
    }

    pub fn empty() -> Self {
        ResponseBody::Full(None)
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        if let ResponseBody::Proxied { guard, sent, .. }
        | ResponseBody::Buffered { guard, sent, .. }
        | ResponseBody::Streaming { guard, sent, .. } = self
            && *sent > 0
        {
            guard
                .monitor()
                .counters
                .bytes_to_clients
                .fetch_add(*sent, Ordering::Relaxed);
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ResponseBody::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            ResponseBody::Proxied { inner, sent, .. } => match Pin::new(inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Some(data) = frame.data_ref() {
                        *sent += data.len() as u64;
                    }
                    Poll::Ready(Some(Ok(frame)))
                }
                Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(Box::new(e)))),
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            },
            ResponseBody::Buffered { data, sent, .. } => Poll::Ready(data.take().map(|b| {
                *sent += b.len() as u64;
                Ok(Frame::data(b))
            })),
            ResponseBody::Streaming { inner, sent, .. } => {
                let frame = std::task::ready!(inner.as_mut().poll_frame(cx));
                if let Some(Ok(frame)) = &frame
                    && let Some(data) = frame.data_ref()
                {
                    *sent += data.len() as u64;
                }
                Poll::Ready(frame)
            }
            ResponseBody::Events(rx) => rx.poll_recv(cx).map(|m| m.map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Full(bytes) => bytes.is_none(),
            ResponseBody::Proxied { inner, .. } => inner.is_end_stream(),
            ResponseBody::Buffered { data, .. } => data.is_none(),
            ResponseBody::Streaming { inner, .. } => inner.is_end_stream(),
            ResponseBody::Events(_) => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            ResponseBody::Full(None) => SizeHint::with_exact(0),
            ResponseBody::Proxied { inner, .. } => inner.size_hint(),
            ResponseBody::Buffered { data, .. } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |b| b.len() as u64))
            }
            ResponseBody::Streaming { inner, .. } => inner.size_hint(),
            ResponseBody::Events(_) => SizeHint::default(),
        }
    }
}
