//! A lean HTTP/1.1 client for the common case: requests without a body.
//!
//! hyper's client hands every request and every body chunk between the caller and its
//! connection task through channels, which costs several wake-ups per request. For a bodyless
//! request the exchange is simple enough to do inline: write the head, parse the response head
//! with `httparse`, and hand a small response over whole (or stream a large one straight from
//! the socket). Requests with a body keep using hyper's client.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf};

use crate::Connect;
use crate::body::BoxError;
use crate::proxy::ClientConn;

/// Largest response head accepted from the application.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
const MAX_RESPONSE_HEADERS: usize = 128;
const READ_CHUNK: usize = 8 * 1024;

/// A keep-alive connection to the application.
pub(crate) struct LeanConn<Io> {
    io: Io,
    buf: BytesMut,
}

#[derive(Debug)]
pub(crate) enum LeanError {
    Connect(io::Error),
    /// Reading or writing the connection failed before a whole response head arrived.
    Io(io::Error),
    Protocol(&'static str),
}

/// How the response body is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Framing {
    Length(u64),
    Chunked,
    UntilClose,
}

/// The response body, read from the connection as the client takes it.
pub(crate) struct LeanBody<C: Connect> {
    conn: Option<LeanConn<C::Io>>,
    owner: Arc<ClientConn<C>>,
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

pub(crate) enum LeanResponse<C: Connect> {
    /// The whole body was already read.
    Whole(http::response::Parts, Bytes),
    Streaming(http::response::Parts, LeanBody<C>),
}

fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

fn encode_head(parts: &http::request::Parts) -> Vec<u8> {
    let mut head = Vec::with_capacity(256);
    head.extend_from_slice(parts.method.as_str().as_bytes());
    head.push(b' ');
    let target = parts
        .uri
        .path_and_query()
        .map(|pq| pq.as_str())
        .unwrap_or("/");
    head.extend_from_slice(target.as_bytes());
    head.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in &parts.headers {
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
    head
}

/// Sends a bodyless request over the client connection's kept connection (or a new one).
pub(crate) async fn exchange<C: Connect>(
    owner: &Arc<ClientConn<C>>,
    parts: &http::request::Parts,
) -> Result<LeanResponse<C>, LeanError> {
    let head = encode_head(parts);
    if let Some(conn) = owner.take_lean() {
        match exchange_on(owner, conn, &head, &parts.method).await {
            Ok(response) => return Ok(response),
            // A kept connection the application closed while idle: nothing was answered, so an
            // idempotent request goes again on a fresh connection.
            Err(LeanError::Io(e)) if is_idempotent(&parts.method) => {
                tracing::trace!(error = %e, "kept upstream connection failed; redialling");
            }
            Err(e) => return Err(e),
        }
    }
    let io = owner
        .shared
        .connector
        .connect(&owner.shared.config.upstream)
        .await
        .map_err(LeanError::Connect)?;
    let conn = LeanConn {
        io,
        buf: BytesMut::new(),
    };
    exchange_on(owner, conn, &head, &parts.method).await
}

async fn exchange_on<C: Connect>(
    owner: &Arc<ClientConn<C>>,
    mut conn: LeanConn<C::Io>,
    head: &[u8],
    method: &Method,
) -> Result<LeanResponse<C>, LeanError> {
    conn.io.write_all(head).await.map_err(LeanError::Io)?;
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
                    owner.keep_lean(conn);
                }
                return Ok(LeanResponse::Whole(parts, body));
            }
            let state = match framing {
                Framing::Length(n) => BodyState::Length(n),
                Framing::Chunked => BodyState::ChunkSize,
                Framing::UntilClose => BodyState::UntilClose,
            };
            let body = LeanBody {
                conn: Some(conn),
                owner: Arc::clone(owner),
                state,
                keep_alive,
            };
            return Ok(LeanResponse::Streaming(parts, body));
        }
        if conn.buf.len() > MAX_RESPONSE_HEAD {
            return Err(LeanError::Protocol("response head too large"));
        }
        conn.buf.reserve(READ_CHUNK);
        let n = conn
            .io
            .read_buf(&mut conn.buf)
            .await
            .map_err(LeanError::Io)?;
        if n == 0 {
            return Err(LeanError::Io(io::ErrorKind::UnexpectedEof.into()));
        }
    }
}

type Head = (http::response::Parts, usize, Framing, bool);

fn parse_head(buf: &[u8], method: &Method) -> Result<Option<Head>, LeanError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    let head_len = match response.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(LeanError::Protocol("malformed response head")),
    };
    let status = response
        .code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or(LeanError::Protocol("bad status"))?;
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
            .map_err(|_| LeanError::Protocol("bad header name"))?;
        let value = HeaderValue::from_bytes(h.value)
            .map_err(|_| LeanError::Protocol("bad header value"))?;
        if name == header::CONTENT_LENGTH {
            let n: u64 = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .ok_or(LeanError::Protocol("bad content-length"))?;
            if content_length.is_some_and(|m| m != n) {
                return Err(LeanError::Protocol("conflicting content-length"));
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
    let mut builder = http::Response::builder().status(status).version(version);
    if let Some(h) = builder.headers_mut() {
        *h = map;
    }
    let (parts, ()) = builder
        .body(())
        .map_err(|_| LeanError::Protocol("bad response"))?
        .into_parts();
    Ok(Some((parts, head_len, framing, keep_alive)))
}

impl<C: Connect> LeanBody<C> {
    /// Reads more from the connection into its buffer; `Ok(0)` at end of stream.
    fn poll_fill(conn: &mut LeanConn<C::Io>, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
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
            self.owner.keep_lean(conn);
        }
    }
}

fn protocol(message: &'static str) -> BoxError {
    Box::new(io::Error::new(io::ErrorKind::InvalidData, message))
}

impl<C: Connect> Body for LeanBody<C> {
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

    #[test]
    fn request_heads_are_origin_form_with_all_headers() {
        let (parts, ()) = http::Request::get("/a?b=c")
            .header("host", "x")
            .header("x-y", "z")
            .body(())
            .expect("request")
            .into_parts();
        assert_eq!(
            String::from_utf8(encode_head(&parts)).expect("ascii"),
            "GET /a?b=c HTTP/1.1\r\nhost: x\r\nx-y: z\r\n\r\n"
        );
    }
}
