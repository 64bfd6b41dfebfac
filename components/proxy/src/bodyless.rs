//! A bodyless HTTP/1.1 client for the common case: requests without a body.
//!
//! hyper's client hands every request and every body chunk between the caller and its
//! connection task through channels, which costs several wake-ups per request. For a bodyless
//! request the exchange is simple enough to do inline: write the head, parse the response head
//! with `httparse`, and hand a small response over whole (or stream a large one straight from
//! the socket). Requests with a body keep using hyper's client ([`crate::upstream`]).

use std::cell::Cell;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Version, header};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::BoxError;
use crate::connect::{Connect, Upstream};
use crate::headers::encode_forwarded_head;

/// Largest response head accepted from the application.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
const MAX_RESPONSE_HEADERS: usize = 128;
const READ_CHUNK: usize = 8 * 1024;

/// A keep-alive connection to the upstream and the bytes read from it past the last response.
pub struct BodylessConn<Io> {
    io: Io,
    buf: BytesMut,
}

/// The place a bodyless connection waits between requests: one per client connection, shared
/// with the response body streaming from it, which puts the connection back when it ends.
pub struct KeptConnection<Io>(Arc<Mutex<Option<BodylessConn<Io>>>>);

impl<Io> KeptConnection<Io> {
    pub fn new() -> Self {
        Self(Arc::new(Mutex::new(None)))
    }

    fn take(&self) -> Option<BodylessConn<Io>> {
        self.0.lock().ok().and_then(|mut slot| slot.take())
    }

    fn put(&self, conn: BodylessConn<Io>) {
        if let Ok(mut slot) = self.0.lock() {
            *slot = Some(conn);
        }
    }

    fn share(&self) -> Self {
        Self(Arc::clone(&self.0))
    }
}

impl<Io> Default for KeptConnection<Io> {
    fn default() -> Self {
        Self::new()
    }
}

/// Why a bodyless exchange failed. The message is the cause alone (the caller words the 502).
#[derive(Debug, thiserror::Error)]
pub enum BodylessError {
    /// The upstream does not accept connections.
    #[error("{0}")]
    Connect(io::Error),
    /// Reading or writing the connection failed before a whole response head arrived.
    #[error("{0}")]
    Io(io::Error),
    /// The upstream's response is not valid HTTP/1.1.
    #[error("{0}")]
    Protocol(&'static str),
}

/// How the response body is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Framing {
    Length(u64),
    Chunked,
    UntilClose,
}

/// The response body, read from the connection as the client takes it; the connection goes
/// back to its [`KeptConnection`] when the body ends cleanly and the upstream keeps it alive.
pub struct BodylessBody<Io> {
    conn: Option<BodylessConn<Io>>,
    kept: KeptConnection<Io>,
    state: BodyState,
    keep_alive: bool,
}

#[derive(Debug)]
enum BodyState {
    Length(u64),
    ChunkSize,
    ChunkData(u64),
    ChunkDataEnd,
    Trailers,
    UntilClose,
    Done,
}

/// The upstream's response (head with its hop-by-hop fields still in).
pub enum BodylessResponse<Io> {
    /// The whole body was already read.
    Whole(http::response::Parts, Bytes),
    Streaming(http::response::Parts, BodylessBody<Io>),
}

fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// Sends a bodyless request over the kept connection (or a new one): origin-form target,
/// hop-by-hop fields left out, `X-Forwarded-*` written for `peer_ip` ([`crate::headers`]).
pub async fn exchange<C: Connect, B>(
    kept: &KeptConnection<C::Io>,
    upstream: &Upstream<C>,
    req: &http::Request<B>,
    peer_ip: &HeaderValue,
) -> Result<BodylessResponse<C::Io>, BodylessError> {
    if let Some(conn) = kept.take() {
        match exchange_on(kept, conn, req, peer_ip).await {
            Ok(response) => return Ok(response),
            // A kept connection the application closed while idle: nothing was answered, so an
            // idempotent request goes again on a fresh connection.
            Err(BodylessError::Io(e)) if is_idempotent(req.method()) => {
                tracing::trace!(error = %e, "kept upstream connection failed; redialling");
            }
            Err(e) => return Err(e),
        }
    }
    let io = upstream.connect().await.map_err(BodylessError::Connect)?;
    let conn = BodylessConn {
        io,
        buf: BytesMut::new(),
    };
    exchange_on(kept, conn, req, peer_ip).await
}

thread_local! {
    /// The buffer request heads are encoded into, reused by every request of the thread: taken
    /// while a head is written (a write that has to wait keeps it; another request meanwhile
    /// uses a new one).
    static HEAD_SCRATCH: Cell<Vec<u8>> = const { Cell::new(Vec::new()) };
}

/// A head buffer larger than this (a request with huge headers) is not kept for reuse.
const MAX_SCRATCH_HEAD: usize = 16 * 1024;

async fn write_head<Io: AsyncWrite + Unpin, B>(
    io: &mut Io,
    req: &http::Request<B>,
    peer_ip: &HeaderValue,
) -> io::Result<()> {
    let mut head = HEAD_SCRATCH.take();
    encode_forwarded_head(req.method(), req.uri(), req.headers(), peer_ip, &mut head);
    let written = io.write_all(&head).await;
    if head.capacity() <= MAX_SCRATCH_HEAD {
        HEAD_SCRATCH.set(head);
    }
    written
}

async fn exchange_on<Io: AsyncRead + AsyncWrite + Unpin, B>(
    kept: &KeptConnection<Io>,
    mut conn: BodylessConn<Io>,
    req: &http::Request<B>,
    peer_ip: &HeaderValue,
) -> Result<BodylessResponse<Io>, BodylessError> {
    write_head(&mut conn.io, req, peer_ip)
        .await
        .map_err(BodylessError::Io)?;
    let method = req.method();
    loop {
        if let Some((parts, head_len, framing, keep_alive)) = parse_head(&conn.buf, method)? {
            conn.buf.advance(head_len);
            if parts.status.is_informational() {
                continue;
            }
            if let Framing::Length(n) = framing
                && (conn.buf.len() as u64) >= n
            {
                let body = conn.buf.split_to(n as usize).freeze();
                if keep_alive && conn.buf.is_empty() {
                    kept.put(conn);
                }
                return Ok(BodylessResponse::Whole(parts, body));
            }
            let state = match framing {
                Framing::Length(n) => BodyState::Length(n),
                Framing::Chunked => BodyState::ChunkSize,
                Framing::UntilClose => BodyState::UntilClose,
            };
            let body = BodylessBody {
                conn: Some(conn),
                kept: kept.share(),
                state,
                keep_alive,
            };
            return Ok(BodylessResponse::Streaming(parts, body));
        }
        if conn.buf.len() > MAX_RESPONSE_HEAD {
            return Err(BodylessError::Protocol("response head too large"));
        }
        conn.buf.reserve(READ_CHUNK);
        let n = conn
            .io
            .read_buf(&mut conn.buf)
            .await
            .map_err(BodylessError::Io)?;
        if n == 0 {
            return Err(BodylessError::Io(io::ErrorKind::UnexpectedEof.into()));
        }
    }
}

type Head = (http::response::Parts, usize, Framing, bool);

fn parse_head(buf: &[u8], method: &Method) -> Result<Option<Head>, BodylessError> {
    if buf.is_empty() {
        return Ok(None);
    }
    // Uninitialised: zeroing 128 headers (4 KiB) cost more than parsing a small head.
    let mut headers =
        [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_RESPONSE_HEADERS];
    let mut response = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut response,
        buf,
        &mut headers,
    );
    let head_len = match parsed {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(BodylessError::Protocol("malformed response head")),
    };
    let status = response
        .code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or(BodylessError::Protocol("bad status"))?;
    let version = if response.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    let mut map = HeaderMap::with_capacity(response.headers.len());
    let mut content_length: Option<u64> = None;
    let mut chunked = false;
    let mut has_transfer_encoding = false;
    let mut close = version == Version::HTTP_10;
    for h in response.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| BodylessError::Protocol("bad header name"))?;
        let value = HeaderValue::from_bytes(h.value)
            .map_err(|_| BodylessError::Protocol("bad header value"))?;
        if name == header::CONTENT_LENGTH {
            let n: u64 = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .ok_or(BodylessError::Protocol("bad content-length"))?;
            if content_length.is_some_and(|m| m != n) {
                return Err(BodylessError::Protocol("conflicting content-length"));
            }
            content_length = Some(n);
        } else if name == header::TRANSFER_ENCODING {
            has_transfer_encoding = true;
            chunked = value
                .to_str()
                .ok()
                .and_then(|v| v.rsplit(',').next())
                .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
        } else if name == header::CONNECTION
            && let Ok(v) = value.to_str()
        {
            for token in v.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    close = true;
                } else if token.eq_ignore_ascii_case("keep-alive") && version == Version::HTTP_10 {
                    close = false;
                }
            }
        }
        map.append(name, value);
    }
    let framing = if *method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        Framing::Length(0)
    } else if has_transfer_encoding {
        if chunked {
            Framing::Chunked
        } else {
            Framing::UntilClose
        }
    } else if let Some(n) = content_length {
        Framing::Length(n)
    } else {
        Framing::UntilClose
    };
    let keep_alive = !close && framing != Framing::UntilClose;
    let (mut parts, ()) = http::Response::new(()).into_parts();
    parts.status = status;
    parts.version = version;
    parts.headers = map;
    Ok(Some((parts, head_len, framing, keep_alive)))
}

impl<Io: AsyncRead + Unpin> BodylessBody<Io> {
    /// Reads more from the connection into its buffer; `Ok(0)` at end of stream.
    fn poll_fill(conn: &mut BodylessConn<Io>, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let mut tmp = [0u8; 16 * 1024];
        let mut read = ReadBuf::new(&mut tmp);
        ready!(Pin::new(&mut conn.io).poll_read(cx, &mut read))?;
        let filled = read.filled();
        conn.buf.extend_from_slice(filled);
        Poll::Ready(Ok(filled.len()))
    }

    fn finish(&mut self) {
        self.state = BodyState::Done;
        if let Some(conn) = self.conn.take()
            && self.keep_alive
            && conn.buf.is_empty()
        {
            self.kept.put(conn);
        }
    }
}

fn protocol(message: &'static str) -> BoxError {
    Box::new(io::Error::new(io::ErrorKind::InvalidData, message))
}

impl<Io: AsyncRead + Unpin> Body for BodylessBody<Io> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match this.state {
                BodyState::Done => return Poll::Ready(None),
                BodyState::Length(0) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                BodyState::Length(left) => {
                    if conn.buf.is_empty() {
                        let n = ready!(Self::poll_fill(conn, cx))?;
                        if n == 0 {
                            return Poll::Ready(Some(Err(protocol("response body cut short"))));
                        }
                    }
                    let take = (conn.buf.len() as u64).min(left) as usize;
                    let data = conn.buf.split_to(take).freeze();
                    this.state = BodyState::Length(left - take as u64);
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                BodyState::UntilClose => {
                    if conn.buf.is_empty() {
                        let n = ready!(Self::poll_fill(conn, cx))?;
                        if n == 0 {
                            this.finish();
                            return Poll::Ready(None);
                        }
                    }
                    let data = conn.buf.split().freeze();
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                BodyState::ChunkSize | BodyState::ChunkDataEnd | BodyState::Trailers => {
                    let Some(line_end) = conn.buf.windows(2).position(|w| w == b"\r\n") else {
                        if conn.buf.len() > 4096 {
                            return Poll::Ready(Some(Err(protocol("chunk line too long"))));
                        }
                        let n = ready!(Self::poll_fill(conn, cx))?;
                        if n == 0 {
                            return Poll::Ready(Some(Err(protocol("chunked body cut short"))));
                        }
                        continue;
                    };
                    let line = conn.buf.split_to(line_end + 2);
                    let line = &line[..line_end];
                    match this.state {
                        BodyState::ChunkSize => {
                            let size = std::str::from_utf8(line)
                                .ok()
                                .map(|l| l.split(';').next().unwrap_or("").trim())
                                .and_then(|hex| u64::from_str_radix(hex, 16).ok());
                            this.state = match size {
                                Some(0) => BodyState::Trailers,
                                Some(n) => BodyState::ChunkData(n),
                                None => {
                                    return Poll::Ready(Some(Err(protocol("bad chunk size"))));
                                }
                            };
                        }
                        BodyState::ChunkDataEnd => {
                            if !line.is_empty() {
                                return Poll::Ready(Some(Err(protocol("bad chunk end"))));
                            }
                            this.state = BodyState::ChunkSize;
                        }
                        _ => {
                            // Trailers are dropped (hop-by-hop for this proxy); a blank line ends.
                            if line.is_empty() {
                                this.finish();
                                return Poll::Ready(None);
                            }
                        }
                    }
                }
                BodyState::ChunkData(left) => {
                    if conn.buf.is_empty() {
                        let n = ready!(Self::poll_fill(conn, cx))?;
                        if n == 0 {
                            return Poll::Ready(Some(Err(protocol("chunked body cut short"))));
                        }
                    }
                    let take = (conn.buf.len() as u64).min(left) as usize;
                    let data = conn.buf.split_to(take).freeze();
                    let left = left - take as u64;
                    this.state = if left == 0 {
                        BodyState::ChunkDataEnd
                    } else {
                        BodyState::ChunkData(left)
                    };
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, BodyState::Done | BodyState::Length(0))
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            BodyState::Length(n) => SizeHint::with_exact(n),
            BodyState::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &str, method: Method) -> (StatusCode, Framing, bool, usize) {
        let (parts, len, framing, keep_alive) = parse_head(text.as_bytes(), &method)
            .expect("valid")
            .expect("complete");
        (parts.status, framing, keep_alive, len)
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let r = "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello";
        assert_eq!(
            head(r, Method::GET),
            (StatusCode::OK, Framing::Length(5), true, r.len() - 5)
        );
        assert_eq!(head(r, Method::HEAD).1, Framing::Length(0));
        let r = "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\ncontent-length: 9\r\n\r\n";
        assert_eq!(head(r, Method::GET).1, Framing::Chunked);
        let r = "HTTP/1.1 204 No Content\r\n\r\n";
        assert_eq!(head(r, Method::GET).1, Framing::Length(0));
        let r = "HTTP/1.1 200 OK\r\n\r\n";
        assert_eq!(head(r, Method::GET).1, Framing::UntilClose);
        assert!(
            !head(r, Method::GET).2,
            "a close-delimited body ends the connection"
        );
        let r = "HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 0\r\n\r\n";
        assert!(!head(r, Method::GET).2);
        let r = "HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n";
        assert!(!head(r, Method::GET).2);
        let r = "HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 0\r\n\r\n";
        assert!(head(r, Method::GET).2);
    }

    #[test]
    fn partial_and_broken_heads() {
        assert!(matches!(
            parse_head(b"HTTP/1.1 200 OK\r\ncontent-le", &Method::GET),
            Ok(None)
        ));
        assert!(parse_head(b"garbage\r\n\r\n", &Method::GET).is_err());
        let conflicting = b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n";
        assert!(parse_head(conflicting, &Method::GET).is_err());
    }
}
